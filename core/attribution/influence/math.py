"""The maths of prototype-block influence (notation: :mod:`core.attribution.influence`):
active sets, per-token gradients of the prototype blocks, sampled Fisher labels, projections
onto the whitening factors and the inversion of the curvature blocks. Functions on tensors;
the build (:mod:`.fit`) and the queries (:mod:`.query`) own the loops, devices and files.
"""

from __future__ import annotations

import torch

from core.model.head import gained, mix_values, prototype_weights_grad, route


def active_set(hidden: torch.Tensor, keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) active prototype ids and weights a_j (no gains) of (N, d) hidden states."""
    ids, weights, _ = route(hidden, keys, top_k)  # (N, k)
    return ids, weights


def head_probabilities(
    ids: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, embedding: torch.Tensor
) -> torch.Tensor:
    """(N, V) p = softmax(E z) with z = sum_j a_j W_j."""
    return (mix_values(ids, weights, values) @ embedding.T).softmax(-1)  # (N, V)


def prototype_gradients(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    probs: torch.Tensor,
    targets: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    embedding: torch.Tensor,
    gains: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradients of -log p(target) with respect to each active prototype's (K_j, W_j).

    Args:
        hidden: (N, d); ids, weights: (N, k) active set and weights (gains applied);
        probs: (N, V) the model's next-token distribution; targets: (N,) token ids;
        keys, values: (P, d); embedding: (V, d); gains: (P,) or None.

    Returns:
        (N, k, 2d): [dL/dK_j, dL/dW_j] for the k active prototypes of each position.
    """
    r = probs @ embedding - embedding[targets]  # (N, d) = E^T (p - e_y)
    scores = (keys[ids] * hidden.unsqueeze(1)).sum(-1)  # (N, k) s_j
    gate = gained(prototype_weights_grad(scores), ids, gains)  # (N, k) da_j/ds_j
    c = gate * (values[ids] @ r.unsqueeze(-1)).squeeze(-1)  # (N, k) dL/ds_j
    return torch.cat([c.unsqueeze(-1) * hidden.unsqueeze(1), weights.unsqueeze(-1) * r.unsqueeze(1)], dim=-1)


def sampled_targets(probs: torch.Tensor, sequences: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels drawn from the model for the Fisher, one generator per packed sequence.

    Args:
        probs: (B, T, V) next-token distributions; sequences: (B,) global sequence numbers.

    Returns:
        (B, T) sampled token ids; the same for a sequence whatever batch it comes in.
    """
    B, T, V = probs.shape
    draws = []
    for s in sequences.tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(s))
        draws.append(torch.rand(T, generator=generator, dtype=torch.float64))
    u = torch.stack(draws).to(probs.device)  # (B, T)
    cdf = probs.double().cumsum(-1)  # (B, T, V)
    cdf = cdf / cdf[..., -1:]
    return torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1).clamp_max(V - 1)


def project(grads: torch.Tensor, ids: torch.Tensor, whitening: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """(N, k, r) V_j^T g_j for (N, k, 2d) gradients of (N, k) active prototypes; the (P, 2d, r)
    factors are gathered ``chunk`` positions at a time to bound memory."""
    out = torch.empty(*ids.shape, whitening.shape[-1], dtype=grads.dtype, device=grads.device)
    for lo in range(0, len(ids), chunk):
        out[lo : lo + chunk] = torch.einsum("nkd,nkdr->nkr", grads[lo : lo + chunk], whitening[ids[lo : lo + chunk]])
    return out


def groups_by_prototype(ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Rows of a flat (R,) prototype-id vector grouped by prototype: [(j, rows)]."""
    order = torch.argsort(ids, stable=True)
    unique, counts = torch.unique_consecutive(ids[order], return_counts=True)
    return list(zip(unique.tolist(), torch.split(order, counts.tolist()), strict=True))


def invert_blocks(
    G: torch.Tensor, lam: torch.Tensor, rank: int, start: torch.Tensor, iterations: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitening factors V_j with V_j V_j^T ~ (G_j + lambda_j I)^-1 for a few blocks, float64.

    Full rank (r = 2d): V_j = L_j^-T from the Cholesky factor G_j + lambda_j I = L_j L_j^T, so
    V_j V_j^T is the exact inverse. Low rank: the top r eigenpairs (U_j, Sigma_j) by subspace
    iteration from the seeded ``start`` (batched matrix products; LAPACK's eigh on a thousand
    512 x 512 blocks took minutes on 2 cores) and V_j = U_j (Sigma_j + lambda_j)^-1/2.

    Args:
        G: (c, 2d, 2d) curvature blocks (float64).
        lam: (c,) their damping.
        start: (2d, r + 8) start of the subspace iteration.

    Returns:
        ((c, 2d, r) V, (c, r) eigenvalues, zeros at full rank).
    """
    c, D, _ = G.shape
    eye = torch.eye(D, dtype=torch.float64)
    G = (G + G.transpose(1, 2)) / 2
    if rank >= D:
        L = torch.linalg.cholesky(G + lam[:, None, None] * eye)
        V = torch.linalg.solve_triangular(L, eye.expand_as(G), upper=False).transpose(1, 2)  # (c, 2d, 2d) L^-T
        return V, torch.zeros(c, rank, dtype=G.dtype)
    Q = start.expand(c, -1, -1)
    for _ in range(iterations):
        Q, _r = torch.linalg.qr(G @ Q)  # (c, D, r + 8)
    small = Q.transpose(1, 2) @ G @ Q  # (c, r + 8, r + 8) Rayleigh-Ritz
    eigvals, eigvecs = torch.linalg.eigh((small + small.transpose(1, 2)) / 2)
    values = eigvals.flip(-1)[:, :rank].clamp_min(0)  # (c, r) largest first
    vectors = Q @ eigvecs.flip(-1)[:, :, :rank]  # (c, D, r)
    return vectors / (values + lam[:, None]).sqrt().unsqueeze(1), values
