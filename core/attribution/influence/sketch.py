"""The retrieval tier: a sketch of every document's gradient, searched before the exact scores.

A document D's influence on a query is an inner product over the prototype blocks,
I(q, D) = sum_j <psi_j, g_jD> (notation: :mod:`core.attribution.influence`), in a space of
P x 2d numbers in which a document fills most blocks. The sketch maps a block gradient g of
prototype j to

    phi(j, g) = rho_j * (R g)        (m,)

with R (m x 2d) Gaussian with variance 1/m and rho_j (m,) random signs per prototype, and a
document to the sum over its blocks. phi is linear and E[<phi(j, x), phi(i, y)>] = [i = j]
<x, y>, so <phi(psi), phi(g_D)> is an unbiased estimate of I(q, D), with an error that shrinks
as 1/sqrt(m). Because g_tj = [c_tj h_t ; a_tj r_t], a position's sketch needs no (k, 2d)
gradient:

    phi_t = (R_K h_t) * (sum_j c_tj rho_j) + (R_W r_t) * (sum_j a_tj rho_j),    R = [R_K  R_W],

two (d x m) products and two sums of k sign rows, in the same forward pass that fills the
position store. A query sketches its (token, prototype) pairs the same way, finds the
documents with the largest (helpful) and smallest (harmful) estimates by an inner-product
search (faiss), and only those candidates are scored exactly from the position store.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class GradientSketch:
    """The projection R (m, 2d) and the signs rho (P, m); see the module docstring."""

    def __init__(self, projection: torch.Tensor, signs: torch.Tensor):
        self.projection = projection  # (m, 2d)
        self.signs = signs  # (P, m), +-1
        self.width, two_d = projection.shape
        self.d = two_d // 2

    @classmethod
    def draw(cls, num_prototypes: int, d: int, width: int, seed: int, dtype: torch.dtype) -> GradientSketch:
        """A fresh sketch of ``width`` coordinates from a seeded generator."""
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(width, 2 * d, generator=generator, dtype=torch.float64) / width**0.5
        signs = torch.randint(0, 2, (num_prototypes, width), generator=generator) * 2 - 1
        return cls(projection.to(dtype), signs.to(dtype))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> GradientSketch:
        return GradientSketch(self.projection.to(device, dtype), self.signs.to(device, dtype))

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
        """(n, m) phi_t of positions given by (n, d) h and r and (n, k) ids, c and a."""
        d = self.d
        P = self.projection.to(hidden.dtype)
        keys = (hidden @ P[:, :d].T) * self._sign_sums(ids, c).to(hidden.dtype)
        return keys + (r @ P[:, d:].T) * self._sign_sums(ids, a).to(hidden.dtype)

    def pairs(self, prototypes: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """(R, m) phi(j, psi) of (R,) prototype ids and their (R, 2d) vectors."""
        return self.signs[prototypes].to(psi.dtype) * (psi @ self.projection.to(psi.dtype).T)


class CandidateSearch:
    """Inner-product search over the documents' sketches (faiss, exact flat index).

    The flat index scans every sketch (D x m multiply-adds per query column): at the sizes
    this library indexes that is milliseconds, and it returns the sketch's own top exactly, so
    the only approximation is the sketch's. Harmful candidates are the top of the negated query.
    """

    def __init__(self, sketches: np.ndarray, threads: int | None = None):
        import faiss

        if threads is not None:
            faiss.omp_set_num_threads(threads)
        vectors = np.ascontiguousarray(sketches, dtype=np.float32)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.size = len(vectors)

    def search(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(c, count) document numbers and estimates of the largest inner products per query
        row; -1 pads when there are fewer documents."""
        count = max(1, min(count, self.size))
        values, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), count)
        return rows, values
