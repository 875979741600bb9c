"""Bundles: a model folder holding what save_pretrained writes, the tokenizer, training.json
and (after ``prism index``) index/.

Weights are safetensors only; nothing in a bundle is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core import store
from core.errors import BundleError
from core.model.modeling import PrismForCausalLM

MAX_SHARD_SIZE = "8MB"  # keeps every committed file small; transformers reassembles shards
WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json")


@dataclass
class Bundle:
    """A loaded bundle.

    Attributes:
        path: the bundle folder.
        model: the model, in eval mode; callers must not modify it.
        tokenizer: its tokenizer.
        training: the contents of training.json ({} if absent).
        fingerprint: sha256 of the weight files, short form.
    """

    path: Path
    model: PrismForCausalLM
    tokenizer: object
    training: dict = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def is_prism(self) -> bool:
        return self.model.prototypes is not None


def weight_files(path: Path) -> list[Path]:
    files: list[Path] = []
    for pattern in WEIGHT_PATTERNS:
        files.extend(path.glob(pattern))
    return sorted(set(files))


def model_fingerprint(path: str | Path) -> str:
    """A short sha256 over a bundle's weight files; controls and indexes record it."""
    digest = hashlib.sha256()
    for f in weight_files(Path(path)):
        if f.suffix == ".safetensors":
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def write_bundle(out: str | Path, model: PrismForCausalLM, tokenizer, training: dict) -> None:
    """Write model, tokenizer and training.json into ``out``.

    Everything is first written to a staging folder, then moved into place file by file, so
    an interruption never leaves a half-written weight file under its final name.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model.save_pretrained(staging, max_shard_size=MAX_SHARD_SIZE)
    # A tokenizer loaded from a folder carries that load's options (transformers 5); a bundle
    # keeps only the tokenizer's own settings.
    for option in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(option, None)
    tokenizer.save_pretrained(staging)
    training = {**training, "model_fingerprint": model_fingerprint(staging)}
    store.write_json(staging / "training.json", training, indent=2)
    for stale in weight_files(out):
        stale.unlink()
    for f in sorted(staging.iterdir()):
        os.replace(f, out / f.name)
    staging.rmdir()


def load_bundle(path: str | Path, device: str = "cpu") -> Bundle:
    """Load a bundle for inference.

    Raises:
        BundleError: the folder is missing or is not a PRISM bundle.
    """
    from transformers import PreTrainedTokenizerFast

    p = Path(path)
    if not p.is_dir():
        raise BundleError(f"model folder not found: {p}")
    if not (p / "config.json").exists():
        raise BundleError(f"{p} is not a PRISM bundle: no config.json (train one with `prism train`)")
    config = store.read_json(p / "config.json", "the model config", error=BundleError)
    if not isinstance(config, dict):
        raise BundleError(f"{p} is not a PRISM bundle: config.json is not a JSON object")
    if config.get("model_type") != "prism":
        raise BundleError(f"{p} is not a PRISM bundle: model_type is {config.get('model_type')!r}, not 'prism'")
    if not any(f.suffix == ".safetensors" for f in weight_files(p)):
        raise BundleError(f"{p} has no safetensors weights")
    if not (p / "tokenizer.json").exists():
        raise BundleError(f"{p} has no tokenizer.json")
    model = PrismForCausalLM.from_pretrained(str(p), use_safetensors=True, dtype=torch.float32)
    model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(p))
    training = {}
    if (p / "training.json").exists():
        training = store.read_json(p / "training.json", "the training record", error=BundleError)
    return Bundle(p, model, tokenizer, training, model_fingerprint(p))
