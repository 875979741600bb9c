"""The clustering objectives that tie prototypes to neighbourhoods of training tokens.

L = CE + l_clst * L_clst + l_anc * L_anchor + l_div * L_div + l_bal * L_bal, where
- L_clst = mean_t (1 - max_j cos(h_t, K_j)): every token sits near some prototype;
- L_anchor = mean_j (1 - max_t cos(K_j, h_t)) over a bank of this batch's (detached)
  hidden states: every prototype sits on real training data;
- L_div = mean over pairs j != l of relu(cos(K_j, K_l) - margin)^2: distinct neighbourhoods;
- L_bal = P * sum_j f_j * p_j with f_j the share of active slots held by prototype j and p_j
  its mean full-softmax probability (minimum 1 when usage is uniform): no dead prototypes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # relative: a bundle's copy of this file runs without core
    from .config import PrismConfig
    from .head import PrototypeHead

ANCHOR_BANK_SIZE = 1024  # hidden states per batch that keys are anchored to
TOKEN_SAMPLE = 2048  # tokens per batch for the cluster and balance terms
DIVERSITY_SAMPLE = 256  # keys per batch compared against all keys


def cluster_loss(cosine: torch.Tensor) -> torch.Tensor:
    """(N, P) token-prototype cosines -> scalar."""
    return (1.0 - cosine.max(dim=-1).values).mean()


def anchor_loss(keys: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(P, d) keys, (M, d) detached hidden states -> scalar; gradient reaches the keys only."""
    cos = F.normalize(keys, dim=-1) @ F.normalize(bank.detach(), dim=-1).T  # (P, M)
    return (1.0 - cos.max(dim=-1).values).mean()


def diversity_loss(keys: torch.Tensor, margin: float, sample: int | None = None) -> torch.Tensor:
    """(P, d) keys -> scalar penalty on pairs whose cosine exceeds ``margin``.

    With ``sample``, only that many randomly chosen keys (global torch RNG, so seeded and
    restored on resume) are compared against all keys: an unbiased estimate at lower cost.
    """
    P = keys.shape[0]
    if P < 2:
        return keys.sum() * 0.0
    kn = F.normalize(keys, dim=-1)
    rows = torch.arange(P, device=keys.device)
    if sample is not None and sample < P:
        rows = torch.randperm(P, device=keys.device)[:sample]
    cos = kn[rows] @ kn.T  # (R, P)
    off_diagonal = rows[:, None] != torch.arange(P, device=keys.device)[None, :]
    return F.relu(cos[off_diagonal] - margin).pow(2).mean()


def balance_loss(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, P) prototype scores, (N, k) active ids -> scalar load-balance loss."""
    N, P = scores.shape
    mean_prob = torch.softmax(scores, dim=-1).mean(dim=0)  # (P,)
    share = torch.bincount(ids.flatten(), minlength=P).to(scores.dtype) / ids.numel()  # (P,)
    return P * (share * mean_prob).sum()


def prototype_losses(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    cosine: torch.Tensor,
    ids: torch.Tensor,
    head: PrototypeHead,
    config: PrismConfig,
) -> dict[str, torch.Tensor]:
    """The four prototype terms for one batch (or a strided token subset of it), unweighted.

    The model passes every (N / TOKEN_SAMPLE)-th token: the terms' cost stays small next to
    the backbone's, and bench/quality.py measures the throughput ratio to the dense twin.

    Args:
        hidden: (N, d) hidden states the head read.
        scores: (N, P) their prototype scores h . K_j.
        cosine: (N, P) their cosines to every prototype key.
        ids: (N, k) active prototype ids.
    """
    bank = hidden[:: max(1, hidden.shape[0] // ANCHOR_BANK_SIZE)]
    return {
        "cluster": cluster_loss(cosine),
        "anchor": anchor_loss(head.keys, bank),
        "diversity": diversity_loss(head.keys, config.diversity_margin, DIVERSITY_SAMPLE),
        "balance": balance_loss(scores, ids),
    }


def total_loss(ce: torch.Tensor, aux: dict[str, torch.Tensor], config: PrismConfig) -> torch.Tensor:
    """CE plus the weighted prototype terms."""
    weights = {
        "cluster": config.cluster_weight,
        "anchor": config.anchor_weight,
        "diversity": config.diversity_weight,
        "balance": config.balance_weight,
    }
    return ce + sum(weights[name] * value for name, value in aux.items())
