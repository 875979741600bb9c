"""The prototype head's arithmetic: the one place its formula is written.

For a token with final normalised hidden state h (dimension d), the head scores every
prototype by s_j = h . K_j, keeps the top k (suppressed prototypes are masked out first),
gives each active prototype the weight a_j = softplus(s_j)^p times its controller gain g_j
(the weight power p is 1 unless the model was trained with another, see PrismConfig), and
returns z = sum_j a_j W_j. The logits are E z with E the tied token embedding and no
bias, so the logit of any token y splits exactly into per-prototype slices

    logit(y) = sum_j a_j (E_y . W_j) = sum_j slice_j(y).

The model, calibration, the index, influence and re-seeding all call the functions here, so a
change of the weight function (it was once a softmax over the active set) is one edit; the tests
hold every caller to these definitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def prototype_scores(hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """s_j = h . K_j: (..., d) hidden states and (P, d) keys -> (..., P) scores."""
    return hidden @ keys.T


def prototype_weights(scores: torch.Tensor, power: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The weight of a prototype with score s before gains: softplus(s)^p > 0 (elementwise).

    A power p > 1 sharpens the weights: the ratio of two active weights is raised to p.
    """
    weights = F.softplus(scores)
    return weights if _is_one(power) else weights.pow(power)


def prototype_weights_grad(scores: torch.Tensor, power: float | torch.Tensor = 1.0) -> torch.Tensor:
    """d prototype_weights / d s, elementwise: p softplus(s)^(p - 1) sigmoid(s)."""
    gate = torch.sigmoid(scores)
    return gate if _is_one(power) else power * F.softplus(scores).pow(power - 1) * gate


def _is_one(power: float | torch.Tensor) -> bool:
    """True for the plain float 1 (a learned power is a tensor and always applied)."""
    return not isinstance(power, torch.Tensor) and power == 1.0


def active_prototypes(
    scores: torch.Tensor, top_k: int, suppressed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The active set: the top k of ``scores`` (..., P) after masking ``suppressed`` (P,) bool.

    Returns:
        (..., k) ids by decreasing score and (..., k) their scores.
    """
    masked = scores if suppressed is None else scores.masked_fill(suppressed, float("-inf"))
    top_scores, ids = masked.topk(top_k, dim=-1)
    return ids, top_scores


def gained(weights: torch.Tensor, ids: torch.Tensor, gains: torch.Tensor | None) -> torch.Tensor:
    """a_j = weight_j * g_j for the (..., k) active ``ids``; ``gains`` (P,) or None for all ones."""
    return weights if gains is None else weights * gains.to(weights.dtype)[ids]


def route(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    top_k: int,
    gains: torch.Tensor | None = None,
    suppressed: torch.Tensor | None = None,
    power: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Active ids, their weights a_j (gains applied) and all scores for (N, d) hidden states.

    ``power`` is the head's weight power p (:attr:`PrototypeHead.weight_power`).

    Returns:
        ids (N, k), weights (N, k), scores (N, P).
    """
    scores = prototype_scores(hidden, keys)  # (N, P)
    ids, top_scores = active_prototypes(scores, top_k, suppressed)  # (N, k)
    return ids, gained(prototype_weights(top_scores, power), ids, gains), scores


def mix_values(ids: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """z = sum_j a_j W_j for each position: (N, k) ids and weights, (P, d) values -> (N, d)."""
    # embedding_bag is a fused gather-and-sum whose backward is a fast scatter on CPU and GPU;
    # bench/quality.py measures the head's overhead against the dense twin.
    return F.embedding_bag(ids, values, per_sample_weights=weights.to(values.dtype), mode="sum")


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 when it is bfloat16 or float16; float32 and float64 stay as they are."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def prototype_slices(
    ids: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, embedding: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """slice_j(y) = a_j (E_y . W_j) for the k active prototypes of each position.

    Computed in float32 (float64 for a float64 model) whatever the model's dtype: only the
    (k + m) rows involved are cast, so a bfloat16 model's slices are exact products of its
    bfloat16 weights, summed without bfloat16 rounding.

    Args:
        ids: (..., k) active prototype ids.
        weights: (..., k) their mixture weights.
        values: (P, d) prototype values W.
        embedding: (V, d) tied token embedding E.
        token_ids: (..., m) the tokens y whose logits are split.

    Returns:
        (..., m, k) slices; summing over the last axis gives the logits of ``token_ids``.
    """
    proto_values = at_least_float32(values[ids])  # (..., k, d)
    token_vectors = at_least_float32(embedding[token_ids])  # (..., m, d)
    dots = token_vectors @ proto_values.transpose(-1, -2)  # (..., m, k)
    return dots * at_least_float32(weights).unsqueeze(-2)


def token_logits(
    ids: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, embedding: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """logit(y) = E_y . z with z = sum_j a_j W_j, in float32 (float64 for a float64 model).

    The same logits as the model's forward pass, computed along another path (mix, then one dot
    product) and without the model dtype's rounding: the slices of :func:`prototype_slices` sum
    to these to float32 precision whatever the model's dtype.

    Args:
        ids, weights: (N, k) active prototypes and their weights.
        values: (P, d) prototype values W.
        embedding: (V, d) tied token embedding E.
        token_ids: (N, m) the tokens y.

    Returns:
        (N, m) logits.
    """
    mixed = mix_values(ids, at_least_float32(weights), at_least_float32(values))  # (N, d)
    token_vectors = at_least_float32(embedding[token_ids])  # (N, m, d)
    return (token_vectors @ mixed.unsqueeze(-1)).squeeze(-1)  # (N, m)


@dataclass
class PrototypeActivations:
    """What the prototype head computed for a batch of positions.

    Attributes:
        ids: (N, k) active prototype ids, by decreasing score.
        weights: (N, k) mixture weights a_j after gains (non-negative).
        scores: (N, P) s_j = h . K_j for every prototype (before masking).
        mixed: (N, d) z = sum_j a_j W_j.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    mixed: torch.Tensor


class PrototypeHead(nn.Module):
    """P prototypes with keys K (P, d) and values W (P, d).

    A token's active set is the top k of s_j = h . K_j; each active prototype gets the weight
    a_j = softplus(s_j)^p * g_j, so exactly k weights are positive (for positive gains) and the
    rest are zero. softplus rather than a softmax over the active set: a convex combination
    of k values cannot reach the output scale and directions a dense head reaches, and cost
    the tiny preset 0.5-1.4 nats of validation loss against its dense twin in our probes.

    ``top_k`` is an attribute that training may change between steps (k annealing,
    core/train/callbacks.py); outside training it is the config's ``prototype_top_k``.
    With ``learn_weight_power`` the power p = exp(``log_weight_power``) is a parameter.
    """

    def __init__(
        self,
        num_prototypes: int,
        hidden_size: int,
        top_k: int,
        router_gradient: str = "active",
        weight_power: float = 1.0,
        learn_weight_power: bool = False,
    ):
        super().__init__()
        self.num_prototypes = num_prototypes
        self.top_k = top_k
        self.router_gradient = router_gradient
        self.keys = nn.Parameter(torch.empty(num_prototypes, hidden_size))
        self.values = nn.Parameter(torch.empty(num_prototypes, hidden_size))
        self.initial_weight_power = weight_power
        self.log_weight_power = nn.Parameter(torch.tensor(math.log(weight_power))) if learn_weight_power else None
        # How often each prototype was active since the last dead-prototype check. Updated in
        # training mode only; persistent so that a resumed run continues the same window.
        self.register_buffer("usage_window", torch.zeros(num_prototypes), persistent=True)

    @property
    def weight_power(self) -> float | torch.Tensor:
        """The power p of the weights softplus(s)^p: a float, or a scalar tensor when learned."""
        if self.log_weight_power is None:
            return self.initial_weight_power
        return self.log_weight_power.exp()

    def forward(
        self,
        hidden: torch.Tensor,
        gains: torch.Tensor | None = None,
        suppressed: torch.Tensor | None = None,
    ) -> PrototypeActivations:
        """Mix prototypes for each position.

        Args:
            hidden: (N, d) final normalised hidden states.
            gains: (P,) non-negative controller gains, or None for all ones.
            suppressed: (P,) bool mask of prototypes that may not be active, or None.
        """
        hidden = hidden.to(self.keys.dtype)  # a bfloat16 backbone feeds a float32 head (see PrismPreTrainedModel)
        power = self.weight_power
        ids, weights, scores = route(hidden, self.keys, self.top_k, gains, suppressed, power)  # (N, k), (N, k), (N, P)
        if self.training and self.router_gradient == "all" and torch.is_grad_enabled():
            # Straight-through: the value of `mixed` is the sparse mixture, its gradient is
            # that of the weighted mixture of every (unsuppressed) prototype as well.
            every = prototype_weights(scores, power)  # (N, P)
            if suppressed is not None:
                every = every.masked_fill(suppressed, 0.0)
            if gains is not None:
                every = every * gains
            mixed = _StraightThroughMix.apply(ids, weights, every, self.values)  # (N, d)
        else:
            mixed = mix_values(ids, weights, self.values)  # (N, d)
        if self.training:
            with torch.no_grad():
                self.usage_window += torch.bincount(ids.flatten(), minlength=self.num_prototypes)
        return PrototypeActivations(ids=ids, weights=weights, scores=scores, mixed=mixed)

    def cosine(self, hidden: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(N, P) cos(h, K_j) from the (N, d) hidden states and their (N, P) scores."""
        norms = hidden.norm(dim=-1, keepdim=True) * self.keys.norm(dim=-1)  # (N, P)
        return scores / norms.clamp_min(1e-8)


class _StraightThroughMix(torch.autograd.Function):
    """z = sum_j a_j W_j over the k active prototypes, with the gradient of z + Z - stop(Z)
    where Z = sum_j e_j W_j over all P prototypes (e = softplus(s) with gains, suppressed 0).

    Same value and gradient as that expression written out, at lower cost: Z's forward
    product is never formed (its value cancels), and the backward pass serves both mixtures
    with the two dense products Z needs anyway: G = g W^T gives the gradient of e and, read
    at the active ids, that of a; the values' gradient is (e + a scattered)^T g.
    """

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weights: torch.Tensor, every: torch.Tensor, values: torch.Tensor):
        ctx.save_for_backward(ids, weights, every, values)
        return mix_values(ids, weights, values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ids, weights, every, values = ctx.saved_tensors
        grad = grad.to(values.dtype)
        grad_every = grad @ values.T  # (N, P)
        grad_weights = grad_every.gather(1, ids).to(weights.dtype)  # (N, k)
        both = every.to(values.dtype).scatter_add(1, ids, weights.to(values.dtype))  # (N, P)
        grad_values = both.T @ grad  # (P, d)
        return None, grad_weights, grad_every.to(every.dtype), grad_values
