"""PRISM Explorer's library: the PRISM model, training, attribution and controllers.

Importing ``core`` registers the ``prism`` model type with transformers' Auto classes.
"""

from .config import PrismConfig
from .model import PrismCausalLMOutput, PrismForCausalLM, PrototypeHead, prototype_slices

__all__ = ["PrismCausalLMOutput", "PrismConfig", "PrismForCausalLM", "PrototypeHead", "prototype_slices"]
