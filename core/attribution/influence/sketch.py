"""The retrieval tier: a sketch of every document's whitened gradient, searched before the
exact scores.

A document D's influence on a query is an inner product over the prototype blocks,
I(q, D) = sum_j <psi_j, g_jD> = sum_j <A_j^{1/2} g_qj, A_j^{1/2} g_jD> (notation:
:mod:`core.attribution.influence`), in a space of P x 2d numbers in which a document fills
most blocks. The sketch maps a block vector x of prototype j to

    phi(j, x) = rho_j * (R x)        (m,)

with R (m x 2d) Gaussian with variance 1/m and rho_j (m,) random signs per prototype, and a
document to the sum over its blocks of phi(j, A_j^{1/2} g_jD). phi is linear and
E[<phi(j, x), phi(i, y)>] = [i = j] <x, y>, so <phi(q), phi(D)> with the query's
phi(j, A_j^{1/2} g_qj) = phi(j, A_j^{-1/2} psi_j) is an unbiased estimate of I(q, D), and
its error shrinks as |A^{1/2} g_q| |A^{1/2} g_D| / sqrt(m). Whitening is what makes it
useful: in the raw gradient most of a document's norm lies in directions the inverse
curvature weighs little, and an unwhitened sketch's error scales with that norm; divided by
|A^{1/2} g_D| = ||g_D||_A (the relative ranking), every document's sketch has unit length
and the estimate's error is the same for all of them (docs/benchmarks.md measures recall).

With A_j^{1/2} = U_j diag(s_j) U_j^T + mu_j I, s_j = sqrt(w_j + kappa_j) - sqrt(kappa_j)
and mu_j = sqrt(kappa_j), a document's sketch is two sums, and neither needs a position's
(k, 2d) gradients:

- the isotropic part, sum over positions of phi(j, mu_j g_tj) with g_tj = [c_tj h_t ; a_tj r_t]:
  (R_K h_t) * (sum_j mu_j c_tj rho_j) + (R_W r_t) * (sum_j mu_j a_tj rho_j), R = [R_K  R_W],
  in the same forward pass that fills the position store;
- the low-rank part, per (document, prototype) block sum: M_j (s_j * U_j^T g_jD) with
  M_j = diag(rho_j) R U_j (m x r), where U_j^T g_jD is what the self-influence already computes.

A query finds the documents with the largest (helpful) and smallest (harmful) estimates by an
inner-product search (:class:`CandidateSearch`), and only those candidates are scored exactly
from the store.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F


class GradientSketch:
    """The projection R (m, 2d) and the signs rho (P, m), and, once :meth:`whitened`, the
    square root of the inverse curvature it sketches through; see the module docstring."""

    def __init__(self, projection: torch.Tensor, signs: torch.Tensor):
        self.projection = projection  # (m, 2d)
        self.signs = signs  # (P, m), +-1
        self.width, two_d = projection.shape
        self.d = two_d // 2
        self.scale: torch.Tensor | None = None  # (P,) mu_j
        self.root: torch.Tensor | None = None  # (P, r) s_j
        self.basis: torch.Tensor | None = None  # (P, m, r) M_j = diag(rho_j) R U_j

    def whitened(self, eigenvectors: torch.Tensor, weights: torch.Tensor, complement: torch.Tensor) -> GradientSketch:
        """The same sketch of A^{1/2} g instead of g, for the build: A_j = U_j diag(w_j) U_j^T
        + kappa_j I from (P, 2d, r) U, (P, r) w and (P,) kappa (M_j takes P m r
        numbers: 268 MB in float32 at P = 1,024, m = 2,048, r = 32)."""
        out = GradientSketch(self.projection, self.signs)
        dt = self.projection.dtype
        kappa = complement.to(dt)
        out.scale = kappa.sqrt()
        out.root = (weights.to(dt) + kappa[:, None]).clamp_min(0).sqrt() - out.scale[:, None]
        out.basis = self.signs.to(dt)[:, :, None] * torch.einsum("md,pdr->pmr", self.projection, eigenvectors.to(dt))
        return out

    @classmethod
    def draw(cls, num_prototypes: int, d: int, width: int, seed: int, dtype: torch.dtype) -> GradientSketch:
        """A fresh sketch of ``width`` coordinates from a seeded generator."""
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(width, 2 * d, generator=generator, dtype=torch.float64) / width**0.5
        signs = torch.randint(0, 2, (num_prototypes, width), generator=generator) * 2 - 1
        return cls(projection.to(dtype), signs.to(dtype))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> GradientSketch:
        out = GradientSketch(self.projection.to(device, dtype), self.signs.to(device, dtype))
        for name in ("scale", "root", "basis"):
            value = getattr(self, name)
            setattr(out, name, None if value is None else value.to(device, dtype))
        return out

    def _sign_sums(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(n, m) sum_j w_j rho_j over each row's (n, k) ids and weights."""
        n, k = ids.shape
        offsets = torch.arange(0, n * k, k, device=ids.device)
        return F.embedding_bag(
            ids.reshape(-1), self.signs, offsets, mode="sum", per_sample_weights=weights.reshape(-1).to(self.signs)
        )

    def positions(
        self, hidden: torch.Tensor, r: torch.Tensor, ids: torch.Tensor, c: torch.Tensor, a: torch.Tensor
    ) -> torch.Tensor:
        """(n, m) sketches of positions given by (n, d) h and r and (n, k) ids, c and a:
        phi(j, g_tj) summed over their blocks, or, whitened, phi(j, mu_j g_tj) (the isotropic
        part; :meth:`blocks` adds the low-rank part per document)."""
        d = self.d
        P = self.projection.to(hidden.dtype)
        if self.scale is not None:
            mu = self.scale.to(c.dtype)[ids]  # (n, k)
            c, a = c * mu, a * mu
        keys = (hidden @ P[:, :d].T) * self._sign_sums(ids, c).to(hidden.dtype)
        return keys + (r @ P[:, d:].T) * self._sign_sums(ids, a).to(hidden.dtype)

    def blocks(self, prototype: int, coefficients: torch.Tensor) -> torch.Tensor:
        """(n, m) the low-rank part M_j (s_j * U_j^T g) of whitened block sums of one
        prototype, from their (n, r) coefficients U_j^T g."""
        dt = coefficients.dtype
        return (coefficients * self.root[prototype].to(dt)) @ self.basis[prototype].to(dt).T

    def pairs(self, prototypes: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """(R, m) phi(j, x) of (R,) prototype ids and their (R, 2d) block vectors x (a query's
        A_j^{1/2} g_qj for a whitened store)."""
        return self.signs[prototypes].to(vectors.dtype) * (vectors @ self.projection.to(vectors.dtype).T)


class CandidateSearch:
    """Inner-product search over the documents' sketches: the ``count`` largest float32 inner
    products per query row.

    A query scans every sketch. In float32 that is D x m multiply-adds per query row, which at
    the demo's size (36,998 documents, m = 512) takes about as long as the model's forward pass.
    So the scan runs in int8 (each sketch scaled to its largest entry; the query rows too, as
    the quantized linear product of torch's x86 backend, fbgemm, computes them) and keeps the
    ``PREFILTER`` x ``count`` best, whose float32 products then choose the ``count``: the result
    is the float32 search's unless one of its ``count`` falls outside four times as many int8
    estimates (on two demo stores: never, in 1,592 searches of 10 and of 100; bench/sketch_search.py).
    Where torch has no x86 quantized backend, the scan is in float32.
    """

    PREFILTER = 4

    def __init__(self, sketches: np.ndarray):
        self.vectors = torch.from_numpy(np.require(sketches, np.float32, ["C", "W"]))  # (D, m), copied if read-only
        self.size = len(self.vectors)
        self.packed = _packed_int8(self.vectors)  # None: no quantized backend

    def search(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(c, count) document numbers and float32 inner products, largest first, per query row;
        -1 pads when there are fewer documents."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (c, m)
        count = max(1, min(count, self.size))
        prefilter = min(self.size, self.PREFILTER * count)
        if self.packed is None or prefilter == self.size:
            values, rows = (self.vectors @ q.T).T.topk(count, dim=1)  # (c, count)
        else:
            pools = _int8_products(self.packed, q).topk(prefilter, dim=1).indices  # (c, prefilter)
            union, place = torch.unique(pools, return_inverse=True)
            exact = (self.vectors[union] @ q.T).T  # (c, U) float32 products of the pooled documents
            values, at = exact.gather(1, place).topk(count, dim=1)
            rows = pools.gather(1, at)
        return rows.numpy(), values.numpy()


def _packed_int8(vectors: torch.Tensor):
    """``vectors`` (D, m) as the int8 weight of a quantized linear product (per-row scales), or
    None where this torch has no x86 quantized backend (the search then scans in float32)."""
    if not {"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines) or not len(vectors):
        return None
    scale = vectors.abs().amax(1).clamp_min(1e-30).double() / 127
    try:
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch; pinned, tested
            warnings.simplefilter("ignore", UserWarning)
            zero = torch.zeros(len(vectors), dtype=torch.long)
            weight = torch.quantize_per_channel(vectors, scale, zero, 0, torch.qint8)
            return torch.ops.quantized.linear_prepack(weight, None)
    except (RuntimeError, AttributeError):
        return None


def _int8_products(packed, queries: torch.Tensor) -> torch.Tensor:
    """(c, D) int8 estimates of the inner products of (c, m) query rows with the packed vectors;
    each row is scaled to its largest entry first (the product quantizes its input per tensor)."""
    scale = queries.abs().amax(1, keepdim=True).clamp_min(1e-30)  # (c, 1)
    return torch.ops.quantized.linear_dynamic(queries / scale, packed, True) * scale
