"""Starting PRISM from a local pretrained transformers decoder (`prism train --backbone DIR`).

The decoder's own config becomes the PRISM model's ``text_config``, its weights are copied into
the backbone, and its output matrix becomes E: the input embedding when the decoder ties them,
else a separate ``lm_head`` (the logits stay E z, without bias, so slices still add up). The
prototype head is new; ``--freeze-backbone N`` trains it alone for the first N steps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig

from core.errors import TrainingError
from core.model.modeling import PrismForCausalLM

logger = logging.getLogger(__name__)


def read_backbone_config(path: str | Path) -> PreTrainedConfig:
    """The decoder config saved in ``path`` (a save_pretrained folder), read explicitly.

    Raises:
        TrainingError: no such folder, no config.json, an unknown model type, a PRISM bundle,
            or a config without a hidden size.
    """
    p = Path(path)
    if not p.is_dir():
        raise TrainingError(f"--backbone {p}: folder not found (give a save_pretrained folder of a decoder)")
    if not (p / "config.json").exists():
        raise TrainingError(f"--backbone {p}: no config.json there (give a save_pretrained folder of a decoder)")
    try:
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"--backbone {p}: its config.json cannot be read by transformers ({first})") from None
    if config.model_type == "prism":
        raise TrainingError(
            f"--backbone {p} is a PRISM bundle, not a plain decoder; continue its training with --resume, "
            "or give the decoder it was built from"
        )
    text = config.get_text_config()
    if not getattr(text, "hidden_size", None) or not getattr(text, "vocab_size", None):
        raise TrainingError(f"--backbone {p}: a {config.model_type!r} config has no hidden_size/vocab_size")
    return text


def load_backbone_weights(model: PrismForCausalLM, path: str | Path) -> None:
    """Copy the pretrained decoder's weights into ``model``'s backbone (and ``lm_head`` if untied).

    Args:
        model: a PRISM model built from a config whose ``text_config`` is this decoder's.
        path: the decoder's save_pretrained folder.

    Raises:
        TrainingError: the weights do not fit the config (a layer missing or of another shape).
    """
    p = str(path)
    try:
        pretrained = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, local_files_only=True)
        base = pretrained.base_model
        output = pretrained.get_output_embeddings()
    except ValueError:  # no causal-LM class for this type: the bare decoder, with tied embeddings
        pretrained = base = AutoModel.from_pretrained(p, dtype=torch.float32, local_files_only=True)
        output = None
    except OSError as err:
        raise TrainingError(f"--backbone {p}: the weights cannot be loaded ({_first_line(err)})") from None
    try:
        model.model.load_state_dict(base.state_dict())
    except RuntimeError as err:
        raise TrainingError(f"--backbone {p}: the weights do not fit its config ({_first_line(err)})") from None
    if model.lm_head is not None:
        if output is None:
            raise TrainingError(f"--backbone {p}: the config says untied embeddings but there is no output layer")
        if getattr(output, "bias", None) is not None:
            logger.warning("--backbone %s: the output layer's bias is dropped (PRISM's logits are E z)", p)
        with torch.no_grad():
            model.lm_head.weight.copy_(output.weight)
    del pretrained


def backbone_parameters(model: PrismForCausalLM) -> list[torch.nn.Parameter]:
    """Every parameter outside the prototype head: the decoder and its (un)embedding."""
    head = {id(p) for p in model.prototypes.parameters()} if model.prototypes is not None else set()
    return [p for p in model.parameters() if id(p) not in head]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
