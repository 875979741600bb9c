"""The named presets of `prism train --preset`: model size and training schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Preset:
    """Model size and training schedule of a named preset.

    Attributes:
        hidden_size, num_layers, num_heads, intermediate_size: the Llama-style backbone.
        seq_len: tokens per training sequence (also the context of a model built from the preset;
            a pretrained backbone keeps its own context, which caps the sequences when shorter).
        vocab_size: size of the BPE vocabulary trained on the corpus.
        num_prototypes, top_k: P prototypes, k of them active per token.
        batch_size, learning_rate, max_steps, warmup_steps: the optimisation schedule.
        save_steps: steps between checkpoints.
        eval_sequences: validation sequences scored at the end.
        router_gradient: PrismConfig.router_gradient ("active" or "all").
        weight_power: PrismConfig.weight_power p, active weights softplus(s)^p.
        top_k_start: PrismConfig.prototype_top_k_start: k at the start of training, annealed
            linearly down to ``top_k`` over the first half of the steps; None trains at ``top_k``
            throughout. A ``--top-k`` above it turns the annealing off.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq_len: int
    vocab_size: int
    num_prototypes: int
    top_k: int
    batch_size: int
    learning_rate: float
    max_steps: int
    warmup_steps: int
    save_steps: int
    eval_sequences: int
    router_gradient: str = "active"
    weight_power: float = 1.0
    top_k_start: int | None = None


PRESETS: dict[str, Preset] = {
    # Trains in well under a minute on 2 CPU cores; used by the tests.
    "tiny": Preset(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        seq_len=64,
        vocab_size=512,
        num_prototypes=64,
        top_k=8,
        batch_size=8,
        learning_rate=3e-3,
        max_steps=200,
        warmup_steps=20,
        save_steps=50,
        eval_sequences=64,
    ),
    # The shipped demo model: ~5.6M parameters, 1,024 prototypes, k = 12 active with weights
    # softplus(s)^2, trained with the straight-through router gradient and k annealed from 64 down
    # to 12 over the first half of the steps. k = 12 with p = 2 was the sparsest probe whose
    # explanations meet the readability goal (effective k <= 8, top-8 share >= 80%); annealing
    # recovered most of the validation loss that k = 12 costs (docs/benchmarks.md, probe table).
    "demo": Preset(
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=640,
        seq_len=256,
        vocab_size=8192,
        num_prototypes=1024,
        top_k=12,
        batch_size=16,
        learning_rate=2e-3,
        max_steps=1400,
        warmup_steps=100,
        save_steps=200,
        eval_sequences=256,
        router_gradient="all",
        weight_power=2.0,
        top_k_start=64,
    ),
    # For GPU users.
    "small": Preset(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        intermediate_size=1376,
        seq_len=512,
        vocab_size=16384,
        num_prototypes=4096,
        top_k=8,
        batch_size=32,
        learning_rate=1e-3,
        max_steps=20000,
        warmup_steps=1000,
        save_steps=1000,
        eval_sequences=1024,
    ),
}
PresetName = Literal["tiny", "demo", "small"]  # the keys of PRESETS
