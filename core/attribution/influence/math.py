"""The maths of prototype-block influence (notation: :mod:`core.attribution.influence`):
active sets, the per-token gradient parts and gradients of the prototype blocks, sampled Fisher
labels, and the complement-preserving inverse of the curvature blocks. Functions on tensors;
the build (:mod:`.fit`, :mod:`.store`) and the queries (:mod:`.query`) own the loops, devices
and files.
"""

from __future__ import annotations

import torch

from core.model.head import gained, mix_values, prototype_weights_grad, route


def active_set(
    hidden: torch.Tensor, keys: torch.Tensor, top_k: int, power: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) active prototype ids and weights a_j (no gains) of (N, d) hidden states; ``power`` is p."""
    ids, weights, _ = route(hidden, keys, top_k, power=power)  # (N, k)
    return ids, weights


def head_probabilities(
    ids: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, embedding: torch.Tensor
) -> torch.Tensor:
    """(N, V) p = softmax(E z) with z = sum_j a_j W_j."""
    return (mix_values(ids, weights, values) @ embedding.T).softmax(-1)  # (N, V)


def gradient_parts(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    targets: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    embedding: torch.Tensor,
    gains: torch.Tensor | None = None,
    power: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two per-position factors of the block gradients, from the forward pass alone.

    Args:
        hidden: (N, d); ids: (N, k) active set; probs: (N, V); targets: (N,) token ids;
        keys, values: (P, d); embedding: (V, d); gains: (P,) or None; power: the weight power p.

    Returns:
        r = E^T (p - e_y) (N, d) and c_j = dL/ds_j = g_j (da_j/ds_j) (W_j . r) (N, k), with
        da_j/ds_j = sigmoid(s_j) for p = 1 (p softplus(s_j)^(p-1) sigmoid(s_j) in general), so
        that block j's gradient is [c_j h ; a_j r].
    """
    r = probs @ embedding - embedding[targets]  # (N, d)
    scores = (keys[ids] * hidden.unsqueeze(1)).sum(-1)  # (N, k) s_j
    gate = gained(prototype_weights_grad(scores, power), ids, gains)  # (N, k) da_j/ds_j
    c = gate * (values[ids] @ r.unsqueeze(-1)).squeeze(-1)  # (N, k)
    return r, c


def block_gradients(hidden: torch.Tensor, r: torch.Tensor, c: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, k, 2d) block gradients [c_j h ; a_j r] from (N, d) h and r and (N, k) c and a."""
    return torch.cat([c.unsqueeze(-1) * hidden.unsqueeze(1), weights.unsqueeze(-1) * r.unsqueeze(1)], dim=-1)


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
    power: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Gradients of -log p(target) with respect to each active prototype's (K_j, W_j).

    Args:
        hidden: (N, d); ids, weights: (N, k) active set and weights (gains applied);
        probs: (N, V) the model's next-token distribution; targets: (N,) token ids;
        keys, values: (P, d); embedding: (V, d); gains: (P,) or None; power: the weight power p.

    Returns:
        (N, k, 2d): [dL/dK_j, dL/dW_j] for the k active prototypes of each position.
    """
    r, c = gradient_parts(hidden, ids, probs, targets, keys, values, embedding, gains, power)
    return block_gradients(hidden, r, c, weights)


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


def groups_by_prototype(ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Rows of a flat (R,) prototype-id vector grouped by prototype: [(j, rows)]."""
    order = torch.argsort(ids, stable=True)
    unique, counts = torch.unique_consecutive(ids[order], return_counts=True)
    return list(zip(unique.tolist(), torch.split(order, counts.tolist()), strict=True))


def eigen_blocks(
    G: torch.Tensor, rank: int, start: torch.Tensor, iterations: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``rank`` eigenpairs (U_j, sigma_j) of a few curvature blocks, float64.

    Full rank (r = 2d): LAPACK's eigh, exact. Low rank: subspace iteration from the seeded
    ``start`` and a Rayleigh-Ritz step (batched matrix products; eigh on a thousand 512 x 512
    blocks took minutes on 2 cores). Either way U_j has orthonormal columns, which is all the
    complement-preserving inverse (:func:`inverse_weights`) needs to stay positive definite.

    Args:
        G: (c, 2d, 2d) curvature blocks (float64).
        start: (2d, r + 8) start of the subspace iteration (unused at full rank).

    Returns:
        ((c, 2d, r) U, (c, r) eigenvalues sigma, largest first, clamped at 0).
    """
    G = (G + G.transpose(1, 2)) / 2
    if rank >= G.shape[-1]:
        values, vectors = torch.linalg.eigh(G)  # ascending
        return vectors.flip(-1), values.flip(-1).clamp_min(0)
    Q = start.expand(G.shape[0], -1, -1)
    for _ in range(iterations):
        Q, _r = torch.linalg.qr(G @ Q)  # (c, 2d, r + 8)
    small = Q.transpose(1, 2) @ G @ Q  # (c, r + 8, r + 8) Rayleigh-Ritz
    eigvals, eigvecs = torch.linalg.eigh((small + small.transpose(1, 2)) / 2)
    values = eigvals.flip(-1)[:, :rank].clamp_min(0)  # (c, r) largest first
    vectors = Q @ eigvecs.flip(-1)[:, :, :rank]  # (c, 2d, r)
    return vectors, values


def complement_weights(trace: torch.Tensor, eigenvalues: torch.Tensor, damping: torch.Tensor, dim: int) -> torch.Tensor:
    """(c,) kappa_j = 1/(rho_j + lambda_j), the inverse's weight on the directions outside the
    kept eigenvectors: rho_j = (tr G_j - sum of the kept sigma_j) / (2d - r) is the mean of the
    block's dropped eigenvalues (the trace says how much curvature they hold even when they are
    not computed), 0 at full rank (no direction is left out).

    Args:
        trace: (c,) tr G_j; eigenvalues: (c, r) kept sigma_j; damping: (c,) lambda_j; dim: 2d.
    """
    rank = eigenvalues.shape[-1]
    rest = (trace - eigenvalues.sum(-1)).clamp_min(0) / (dim - rank) if rank < dim else torch.zeros_like(trace)
    return 1 / (rest + damping)


def inverse_weights(eigenvalues: torch.Tensor, damping: torch.Tensor, complement: torch.Tensor) -> torch.Tensor:
    """(c, r) w_j = 1/(sigma_j + lambda_j) - kappa_j of (c, r) eigenvalues, (c,) damping and
    (c,) complement weights kappa_j = 1/(rho_j + lambda_j) (:func:`complement_weights`).

    Written (rho - sigma) / ((sigma + lambda)(rho + lambda)), which does not cancel when sigma
    and rho are close. With them A_j = U_j diag(w_j) U_j^T + kappa_j I: (G_j + lambda_j I)^-1
    along the kept eigenvectors, and the damped mean of the dropped eigenvalues on every other
    direction (exact at full rank, where no direction is left).
    """
    lam = damping.unsqueeze(-1)  # (c, 1)
    rest = 1 / complement.unsqueeze(-1) - lam  # (c, 1) rho
    return (rest - eigenvalues) / ((eigenvalues + lam) * (rest + lam))


def apply_inverse_and_root(
    grads: torch.Tensor,
    ids: torch.Tensor,
    eigenvectors: torch.Tensor,
    weights: torch.Tensor,
    complement: torch.Tensor,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """psi = A_j g = U_j (w_j * (U_j^T g)) + kappa_j g and A_j^{1/2} g for (R, 2d) block
    gradients, sharing one gather of U_j. A_j has the eigenvalues w_j + kappa_j along U_j and
    kappa_j elsewhere, so A_j^{1/2} = U_j diag(sqrt(w_j + kappa_j) - sqrt(kappa_j)) U_j^T +
    sqrt(kappa_j) I (the gradient sketches are of A^{1/2} g: :mod:`.sketch`).

    Args:
        grads: (R, 2d) gradients of the (R,) prototype ``ids``.
        eigenvectors: (P, 2d, r) U; weights: (P, r) w; complement: (P,) kappa.
        chunk: rows whose (2d, r) factors are gathered at once (memory).

    Returns:
        ((R, 2d) A g, (R, 2d) A^{1/2} g), in the gradients' dtype.
    """
    dt = grads.dtype
    kappa = complement.to(dt)
    root_scale = kappa.sqrt()
    root_weights = (weights.to(dt) + kappa[:, None]).clamp_min(0).sqrt() - root_scale[:, None]
    factors = [(weights.to(dt), kappa), (root_weights, root_scale)]  # (v_j, s_j): U_j (v_j * (U_j^T g)) + s_j g
    inverse, root = (grads * scale[ids].unsqueeze(-1) for _, scale in factors)  # the isotropic parts
    # Rows grouped by prototype: each distinct U_j is gathered once and multiplied with all its
    # rows (a query's tokens share popular prototypes), (n_j, 2d) by (2d, r), padded to the
    # largest group, instead of one gathered (2d, r) factor per row.
    for lo in range(0, len(ids), chunk):
        rows, block = ids[lo : lo + chunk], grads[lo : lo + chunk]
        prototypes, group = torch.unique(rows, return_inverse=True)  # (u,), (c,) each row's prototype
        counts = torch.bincount(group, minlength=len(prototypes))
        order = torch.argsort(group, stable=True)
        slot = torch.empty_like(group)  # each row's place within its prototype's group
        slot[order] = torch.arange(len(group)) - (torch.cumsum(counts, 0) - counts)[group[order]]
        width = int(counts.max())
        padded = block.new_zeros(len(prototypes), width, block.shape[1])
        padded[group, slot] = block
        U = eigenvectors[prototypes].to(dt)  # (u, 2d, r)
        coef = torch.bmm(padded, U)  # (u, width, r) U_j^T g
        scaled = torch.cat([coef * v[prototypes].unsqueeze(1) for v, _ in factors], 1)  # (u, 2 width, r)
        low_rank = torch.bmm(scaled, U.transpose(1, 2))  # (u, 2 width, 2d): both factors in one product
        inverse[lo : lo + chunk] += low_rank[group, slot]
        root[lo : lo + chunk] += low_rank[group, width + slot]
    return inverse, root
