"""The clustering objectives that tie prototypes to neighbourhoods of training tokens.

L = CE + l_clst * L_clst + l_anc * L_anchor + l_div * L_div + l_bal * L_bal [+ l_conc * L_conc], where
- L_clst = mean_t (1 - max_j cos(h_t, K_j)): every token sits near some prototype;
- L_anchor = mean_j (1 - max_t cos(K_j, h_t)) over a bank of this batch's (detached)
  hidden states: every prototype sits on real training data;
- L_div = mean over pairs j != l of relu(cos(K_j, K_l) - margin)^2: distinct neighbourhoods;
- L_bal = P * sum_j f_j * p_j with f_j the share of active slots held by prototype j and p_j
  its mean full-softmax probability (minimum 1 when usage is uniform): no dead prototypes;
- L_conc = mean_t H(a_t / sum_j a_tj) / log k, the entropy of each token's k active weights
  normalised to [0, 1] (only when ``concentration_weight`` > 0): a few prototypes per prediction.
"""

from __future__ import annotations

import math
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


def concentration_loss(weights: torch.Tensor) -> torch.Tensor:
    """(N, k) non-negative active weights -> mean normalised entropy of each row's distribution.

    0 when one prototype holds all of a token's weight, 1 when the k share it equally.
    """
    k = weights.shape[-1]
    if k < 2:
        return weights.sum() * 0.0
    share = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)  # (N, k)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(-1)  # (N,)
    return entropy.mean() / math.log(k)


def prototype_losses(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    cosine: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    head: PrototypeHead,
    config: PrismConfig,
) -> dict[str, torch.Tensor]:
    """The prototype terms for one batch (or a strided token subset of it), unweighted.

    The model passes every (N / TOKEN_SAMPLE)-th token: the terms' cost stays small next to
    the backbone's, and bench/quality.py measures the throughput ratio to the dense twin.

    Args:
        hidden: (N, d) hidden states the head read.
        scores: (N, P) their prototype scores h . K_j.
        cosine: (N, P) their cosines to every prototype key.
        ids: (N, k) active prototype ids.
        weights: (N, k) their weights.

    Returns:
        cluster, anchor, diversity and balance; concentration too when its weight is > 0.
    """
    bank = hidden[:: max(1, hidden.shape[0] // ANCHOR_BANK_SIZE)]
    terms = {
        "cluster": cluster_loss(cosine),
        "anchor": anchor_loss(head.keys, bank),
        "diversity": diversity_loss(head.keys, config.diversity_margin, DIVERSITY_SAMPLE),
        "balance": balance_loss(scores, ids),
    }
    if config.concentration_weight > 0:
        terms["concentration"] = concentration_loss(weights)
    return terms


def total_loss(ce: torch.Tensor, aux: dict[str, torch.Tensor], config: PrismConfig) -> torch.Tensor:
    """CE plus the weighted prototype terms."""
    weights = {
        "cluster": config.cluster_weight,
        "anchor": config.anchor_weight,
        "diversity": config.diversity_weight,
        "balance": config.balance_weight,
        "concentration": config.concentration_weight,
    }
    return ce + sum(weights[name] * value for name, value in aux.items())
