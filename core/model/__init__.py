"""The PRISM model: config, prototype head, causal LM and the clustering losses.

Importing this package registers the ``prism`` model type with transformers' Auto classes and
marks the classes for ``register_for_auto_class``, so that save_pretrained copies config.py,
modeling.py, head.py and losses.py into the bundle and writes ``auto_map`` into its config.json.
Those files use relative imports only, so the copies load with ``trust_remote_code=True`` where
core is not installed.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from core.model.config import PrismConfig
from core.model.modeling import PrismForCausalLM

AutoConfig.register("prism", PrismConfig, exist_ok=True)
AutoModelForCausalLM.register(PrismConfig, PrismForCausalLM, exist_ok=True)
PrismConfig.register_for_auto_class()
PrismForCausalLM.register_for_auto_class("AutoModelForCausalLM")
