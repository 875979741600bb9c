"""How sparse a PRISM model's explanations are: measures of the slices of its predictions.

A position's logit of its target y is the sum of its k slices a_j (E_y . W_j)
(:func:`core.model.head.prototype_slices`). An explanation is readable when a few slices carry
most of the logit, so the measures are about the absolute slice mass |slice_j| of the target:

- top-n share: the mass of the n largest slices over the mass of all k;
- effective k: the fewest slices that hold ``mass`` (80% by default) of it;
- distinct prototypes per document: how many prototypes a whole window of text activates
  (attribution and suppression get coarser as it approaches P).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import numpy as np
import torch

from core.model.head import prototype_slices, route


@dataclass
class SliceConcentration:
    """Summary of the target slices of N positions (see the module docstring)."""

    positions: int
    top_k: int
    top1_share: float  # mean over positions
    top4_share: float
    top8_share: float
    effective_k_median: float  # fewest slices holding ``mass`` of the absolute slice mass
    effective_k_mean: float
    mass: float

    def to_json(self) -> dict:
        return asdict(self)


def target_slices(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, k) slices of each position's target token, from (N, d) head inputs."""
    head = model.prototypes
    ids, weights, _ = route(hidden, head.keys, model.config.prototype_top_k, power=head.weight_power)
    return prototype_slices(ids, weights, head.values, model.unembedding, targets.unsqueeze(-1))[..., 0, :]


def slice_concentration(slices: torch.Tensor, mass: float = 0.8) -> SliceConcentration:
    """Concentration of (N, k) slices (positions with no slice mass are left out)."""
    magnitude = slices.abs().double()
    total = magnitude.sum(-1)
    magnitude = magnitude[total > 0]
    total = total[total > 0]
    ordered = magnitude.sort(-1, descending=True).values
    share = ordered.cumsum(-1) / total.unsqueeze(-1)  # (N, k) share held by the n largest
    k = share.shape[-1]
    effective = (share < mass - 1e-12).sum(-1) + 1  # fewest n with share >= mass

    def top(n: int) -> float:
        return float(share[:, min(n, k) - 1].mean())

    return SliceConcentration(
        positions=int(len(share)),
        top_k=int(k),
        top1_share=top(1),
        top4_share=top(4),
        top8_share=top(8),
        effective_k_median=float(np.median(effective.numpy())),
        effective_k_mean=float(effective.double().mean()),
        mass=mass,
    )


def distinct_prototypes(model, hidden: torch.Tensor, window: int = 64) -> np.ndarray:
    """Distinct active prototypes in each window of ``window`` consecutive positions of
    (B, T, d) head inputs (T a multiple of ``window``): (B * T / window,)."""
    B, T, d = hidden.shape
    ids, _, _ = route(hidden.reshape(-1, d), model.prototypes.keys, model.config.prototype_top_k)
    ids = ids.reshape(B * T // window, window * ids.shape[-1])
    return np.array([len(torch.unique(row)) for row in ids])


@torch.no_grad()
def sparsity_figures(model, input_ids: torch.Tensor, window: int = 64) -> dict[str, float | int]:
    """The sparsity measures of a PRISM model on (n, T) token sequences, as flat figures.

    Slices are those of every next token (n * (T - 1) positions); distinct prototypes are
    counted per ``window`` tokens (the whole sequence when T is not a multiple of it).

    Returns:
        ``slices_*`` (:class:`SliceConcentration`'s fields), ``num_prototypes``,
        ``distinct_prototypes_per_window_median`` / ``_mean``, ``window_tokens`` and
        ``probe_sequences``.
    """
    hidden = model.model(input_ids=input_ids).last_hidden_state  # (n, T, d)
    d = hidden.shape[-1]
    slices = target_slices(model, hidden[:, :-1].reshape(-1, d), input_ids[:, 1:].reshape(-1))  # (n (T-1), k)
    window = window if input_ids.shape[1] % window == 0 else input_ids.shape[1]
    distinct = distinct_prototypes(model, hidden, window)
    return {
        **{f"slices_{name}": value for name, value in slice_concentration(slices).to_json().items()},
        "num_prototypes": model.config.num_prototypes,
        "distinct_prototypes_per_window_median": float(statistics.median(distinct.tolist())),
        "distinct_prototypes_per_window_mean": float(distinct.mean()),
        "window_tokens": window,
        "probe_sequences": int(input_ids.shape[0]),
    }
