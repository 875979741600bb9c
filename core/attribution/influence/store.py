"""The position store: every training position's block gradients, exactly and compactly.

A training position t with hidden state h_t, active set S_t, weights a_tj and target y_t has
the k block gradients g_tj = [c_tj h_t ; a_tj r_t] (j in S_t), with r_t = E^T (p_t - e_y) (d,)
and c_tj = dL/ds_tj (:func:`.math.gradient_parts`), all from one forward pass. So the store
keeps, per position, in stream order (a document's positions are one contiguous range):

    hidden (N, d) h_t,  output_grad (N, d) r_t,  active (N, k) ids,  score_grad (N, k) c_tj,
    weights (N, k) a_tj,  char_start / char_end (N,) the token's span in its document's text

and per document ``documents`` (D,) training-split rows with ``document_offsets`` (D + 1,)
(document i's positions are offsets[i]:offsets[i + 1]) and ``self_influence`` (D,). The four
float arrays are stored in ``storage`` precision with one float scale per row (``*_scale``,
(N,)): int8 rows are round(x / s), s = max|x| / 127; float rows are x / max|x| (float16 keeps
its range that way). At d = 256, k = 64 a position takes 2 x 256 + 2 x 64 + 128 (int16 ids)
+ 16 (scales) + 8 (span) = 792 bytes in int8, 1,432 in float16.

A query's scores are read from it in bulk (:func:`document_scores`): for the query's (token,
prototype) pairs with psi = A_j g_qj, I(q, D) = sum_{t in D} sum_{j in S_t and Q} c_tj
<psi_j^K, h_t> + a_tj <psi_j^W, r_t>, computed only at the (position, slot) entries whose
active prototype the query has (:func:`pair_entries`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.attribution.influence.math import groups_by_prototype

if TYPE_CHECKING:
    from core.attribution.influence.sketch import GradientSketch

ROW_ARRAYS = ("hidden", "output_grad", "score_grad", "weights")  # each with a (N,) ``*_scale``
STORE_DTYPES = {"int8": np.int8, "float16": np.float16, "float32": np.float32, "float64": np.float64}


def quantise(x: torch.Tensor, storage: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, w) rows -> (N, w) stored values and (N,) scales (see the module docstring)."""
    top = x.abs().amax(dim=1)
    top = torch.where(top > 0, top, torch.ones_like(top))  # (N,) an all-zero row keeps scale 1
    scale_dtype = np.float64 if storage == "float64" else np.float32
    if storage == "int8":
        scale = top / 127
        values = (x / scale.unsqueeze(1)).round().clamp(-127, 127).cpu().numpy().astype(np.int8)
    else:
        scale = top
        values = (x / scale.unsqueeze(1)).cpu().numpy().astype(STORE_DTYPES[storage])
    return values, scale.cpu().numpy().astype(scale_dtype)


def position_bytes(d: int, k: int, storage: str, P: int) -> int:
    """Bytes one stored position takes (rows, ids, scales and span)."""
    value = np.dtype(STORE_DTYPES[storage]).itemsize
    scale = 8 if storage == "float64" else 4
    ids = 2 if P <= np.iinfo(np.int16).max else 4
    return 2 * d * value + 2 * k * value + k * ids + 4 * scale + 8


def store_specs(n: int, d: int, k: int, P: int, storage: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the store's per-position arrays for ``n`` positions."""
    value, scale = np.dtype(STORE_DTYPES[storage]), np.dtype(np.float64 if storage == "float64" else np.float32)
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for name, width in zip(ROW_ARRAYS, (d, d, k, k), strict=True):
        specs[name] = ((n, width), value)
        specs[f"{name}_scale"] = ((n,), scale)
    specs["active"] = ((n, k), np.dtype(np.int16 if P <= np.iinfo(np.int16).max else np.int32))
    return specs


def block_specs(n_documents: int, P: int, d: int, storage: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes of the per-document block sums g_jD (D, P, 2d) and their (D, P) scales (0: the
    document has no position in block j)."""
    scale = np.dtype(np.float64 if storage == "float64" else np.float32)
    return {
        "document_blocks": ((n_documents, P, 2 * d), np.dtype(STORE_DTYPES[storage])),
        "document_blocks_scale": ((n_documents, P), scale),
    }


def block_scores(
    values: np.ndarray, scales: np.ndarray, psi: torch.Tensor, lookup: torch.Tensor, documents: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores from the per-document block sums: I(q, D) = sum_j <psi_j, g_jD>.

    Args:
        values, scales: the (D, P, 2d) block sums and their (D, P) scales.
        psi, lookup: as in :func:`document_scores`.
        documents: store documents to score, None for all.

    Returns:
        ((C, n) float64 scores; (C, n) blocks the document shares with each column).
    """
    m, n = len(psi), lookup.shape[1]
    used = torch.nonzero((lookup < m).any(1)).flatten()  # (q,) prototypes some column uses
    q = len(used)
    weights = torch.zeros(q, psi.shape[1], n, dtype=psi.dtype)  # psi of each (prototype, column)
    member = lookup[used] < m  # (q, n)
    rows, cols = torch.nonzero(member, as_tuple=True)
    weights[rows, :, cols] = psi[lookup[used][rows, cols]]
    flat = weights.reshape(q * psi.shape[1], n)
    index = np.arange(len(values)) if documents is None else np.asarray(documents, dtype=np.int64)
    protos = used.numpy()
    scores, shared = [], []
    step = max(1, (1 << 24) // max(1, q * psi.shape[1]))
    for lo in range(0, len(index), step):
        chosen = index[lo : lo + step]
        scale = torch.from_numpy(np.array(scales[chosen][:, protos])).to(psi.dtype)  # (c, q)
        block = torch.from_numpy(np.array(values[chosen][:, protos])).to(psi.dtype) * scale.unsqueeze(-1)
        scores.append((block.reshape(len(chosen), -1) @ flat).double())
        shared.append((scale != 0).to(torch.float64) @ member.to(torch.float64))
    if not scores:
        return np.zeros((0, n)), np.zeros((0, n), dtype=np.int64)
    return torch.cat(scores).numpy(), torch.cat(shared).numpy().astype(np.int64)


class StoreWriter:
    """Fills the store's arrays (:func:`store_specs`, in memory or memory-mapped into the file
    being written) batch by batch, in stream order from row ``cursor`` on (a rank's shard of
    the positions starts where the previous rank's ends)."""

    def __init__(self, arrays: dict[str, np.ndarray], storage: str, cursor: int = 0):
        self.storage = storage
        self.arrays = arrays
        self.cursor = cursor

    def add(self, hidden: torch.Tensor, r: torch.Tensor, ids: torch.Tensor, c: torch.Tensor, a: torch.Tensor) -> None:
        """Append (n, d) h and r and (n, k) ids, c and a of the next positions in stream order
        (a sketch-only store has no position arrays: the cursor alone moves on)."""
        lo, hi = self.cursor, self.cursor + len(ids)
        if "active" not in self.arrays:
            self.cursor = hi
            return
        for name, rows in zip(ROW_ARRAYS, (hidden, r, c, a), strict=True):
            self.arrays[name][lo:hi], self.arrays[f"{name}_scale"][lo:hi] = quantise(rows, self.storage)
        self.arrays["active"][lo:hi] = ids.cpu().numpy()
        self.cursor = hi


class SelfInfluenceSums:
    """Per-document self-influence sum_j g_jD^T A_j g_jD, g_jD = sum_{t in D, j in S_t} g_tj.

    Batches bring positions in stream order; a batch's (document, prototype) sums are built
    with a sparse product (no (n, k, 2d) gradients), the sums of its last document are carried
    into the next batch (it may continue there), and finished sums are buffered and reduced a
    prototype at a time: g^T A_j g = w_j . (U_j^T g)^2 + |g|^2 / lambda_j.

    The sums of the ``held`` documents are kept back instead (:meth:`held_sums`): a rank's first
    and last documents may go on in the neighbouring ranks' shards, so their sums are only
    complete once added up over ranks and given to one instance with :meth:`add_sums`.
    """

    def __init__(
        self,
        eigenvectors: torch.Tensor,
        weights: torch.Tensor,
        complement: torch.Tensor,
        n_documents: int,
        buffer_mb: int = 128,
        blocks: tuple[np.ndarray, np.ndarray] | None = None,
        storage: str = "int8",
        held: list[int] | None = None,
        sketch: tuple[GradientSketch, np.ndarray] | None = None,
    ):
        self.U, self.w, self.kappa = eigenvectors, weights, complement  # (P, 2d, r), (P, r), (P,)
        # a whitened sketch and the (D, m) document sketches its low-rank part is added to, or None
        self.sketch = sketch
        self.held_documents = torch.tensor(sorted(set(held or [])), dtype=torch.long, device=eigenvectors.device)
        self.held: list[tuple[torch.Tensor, torch.Tensor]] = []
        # (D, P, 2d) values and (D, P) scales the finished sums g_jD are also written to, or None
        self.blocks, self.storage = blocks, storage
        self.P, D = eigenvectors.shape[:2]
        self.total = torch.zeros(n_documents, dtype=torch.float64)
        self.buffer_rows = max(1, buffer_mb * 2**20 // (D * eigenvectors.element_size()))
        self.carry: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys (c,), sums (c, 2d))
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pending_rows = 0

    def add(
        self,
        document: torch.Tensor,
        hidden: torch.Tensor,
        r: torch.Tensor,
        ids: torch.Tensor,
        c: torch.Tensor,
        a: torch.Tensor,
    ) -> None:
        """Add the next positions: (n,) store document numbers (non-decreasing), (n, d) h and r,
        (n, k) ids, c and a."""
        n, k = ids.shape
        if n == 0:
            return
        keys = document.repeat_interleave(k) * self.P + ids.reshape(-1)  # (n k,) (document, prototype)
        carried = self.carry[0] if self.carry is not None else keys[:0]
        unique, inverse = torch.unique(torch.cat([carried, keys]), return_inverse=True)
        new = inverse[len(carried) :]
        rows = torch.arange(n, device=ids.device).repeat_interleave(k)  # (n k,) position of each pair
        index = torch.stack([new, rows])
        sums = torch.cat(
            [
                torch.sparse.mm(
                    torch.sparse_coo_tensor(index, c.reshape(-1), (len(unique), n), check_invariants=False), hidden
                ),
                torch.sparse.mm(
                    torch.sparse_coo_tensor(index, a.reshape(-1), (len(unique), n), check_invariants=False), r
                ),
            ],
            dim=1,
        )  # (U, 2d) g_jD of this batch's (document, prototype) pairs
        if self.carry is not None:
            sums.index_add_(0, inverse[: len(carried)], self.carry[1].to(sums.dtype))
        still_open = unique // self.P == document[-1]  # the batch's last document may go on
        self.carry = (unique[still_open], sums[still_open]) if bool(still_open.any()) else None
        done = ~still_open
        self.pending.append((unique[done], sums[done]))
        self.pending_rows += int(done.sum())
        if self.pending_rows >= self.buffer_rows:
            self._flush()

    def add_sums(self, keys: torch.Tensor, sums: torch.Tensor) -> None:
        """Add complete sums: (c,) keys document * P + prototype, each once, and their (c, 2d) g_jD."""
        self.pending.append((keys, sums))
        self.pending_rows += len(keys)
        if self.pending_rows >= self.buffer_rows:
            self._flush()

    def held_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held documents' (c,) keys and (c, 2d) sums, as far as this instance saw them
        (complete once :meth:`finish` has run)."""
        if not self.held:
            return self.held_documents[:0], self.U.new_zeros(0, self.U.shape[1])
        return torch.cat([h[0] for h in self.held]), torch.cat([h[1] for h in self.held])

    def _flush(self) -> None:
        if not self.pending:
            return
        keys = torch.cat([p[0] for p in self.pending])
        sums = torch.cat([p[1] for p in self.pending])
        self.pending, self.pending_rows = [], 0
        if len(self.held_documents):
            hold = torch.isin(keys // self.P, self.held_documents.to(keys.device))
            self.held.append((keys[hold], sums[hold]))
            keys, sums = keys[~hold], sums[~hold]
        docs, protos = keys // self.P, keys % self.P
        if self.blocks is not None:
            values, scales = quantise(sums, self.storage)
            d_np, p_np = docs.cpu().numpy(), protos.cpu().numpy()
            for lo in range(0, len(d_np), 1 << 16):  # fancy-index writes into the memory map, in runs
                part = slice(lo, lo + (1 << 16))
                self.blocks[0][d_np[part], p_np[part]] = values[part]
                self.blocks[1][d_np[part], p_np[part]] = scales[part]
        if self.sketch is not None:
            documents, place = torch.unique(docs, return_inverse=True)
            low_rank = torch.zeros(len(documents), self.sketch[0].width, dtype=torch.float64, device=docs.device)
        for j, rows in groups_by_prototype(protos):
            g = sums[rows]  # (n_j, 2d)
            coef = g @ self.U[j].to(g.dtype)  # (n_j, r) U_j^T g
            quad = (coef**2 * self.w[j].to(g.dtype)).sum(1) + (g**2).sum(1) * self.kappa[j].to(g.dtype)
            self.total.index_add_(0, docs[rows].cpu(), quad.double().cpu())
            if self.sketch is not None:
                low_rank.index_add_(0, place[rows], self.sketch[0].blocks(j, coef).double())
        if self.sketch is not None and len(documents):
            target, at = self.sketch[1], documents.cpu().numpy()
            target[at] = target[at] + low_rank.cpu().numpy()  # the documents are distinct

    def finish(self) -> torch.Tensor:
        """(D,) the documents' summed self-influence (not yet length-normalised; 0 for the held
        ones); the document still open is complete once no batch follows."""
        if self.carry is not None:
            self.pending.append(self.carry)
            self.carry = None
        self._flush()
        return self.total


@dataclass
class StoredRows:
    """L stored positions as :func:`pair_entries` reads them: (L, d) h and r as stored (int8
    or float) with their (L,) row scales (h_t = h[t] * h_scale[t]), (L, k) active ids, and
    (L, k) c and a."""

    h: torch.Tensor
    h_scale: torch.Tensor
    r: torch.Tensor
    r_scale: torch.Tensor
    ids: torch.Tensor
    c: torch.Tensor
    a: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index: torch.Tensor) -> StoredRows:
        """The positions at (L',) ``index``."""
        return StoredRows(*(getattr(self, f.name).index_select(0, index) for f in fields(self)))  # no copies


class PositionStore:
    """A loaded store (see the module docstring); read-only, shared between queries. The
    arrays may be memory maps (:func:`core.tensorfile.map_tensors`): a read touches only the
    positions it asks for."""

    def __init__(self, arrays: dict[str, np.ndarray], dtype: torch.dtype):
        self.dtype = dtype
        self.rows = {name: arrays[name] for name in ROW_ARRAYS}
        self.scales = {name: arrays[f"{name}_scale"] for name in ROW_ARRAYS}
        self.active = arrays["active"]  # (N, k)
        self.documents = np.asarray(arrays["documents"])  # (D,) training-split rows
        self.offsets = np.asarray(arrays["document_offsets"])  # (D + 1,)
        self.char_start, self.char_end = arrays["char_start"], arrays["char_end"]  # (N,)
        self.k = self.active.shape[1]

    def __len__(self) -> int:
        return len(self.active)

    def position_document(self, where: slice) -> torch.Tensor:
        """(L,) store document number of each position in a slice."""
        start, stop, _ = where.indices(len(self))
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left"))
        bounds = np.clip(self.offsets[first : last + 1], start, stop) - start
        return torch.from_numpy(np.repeat(np.arange(first, first + len(bounds) - 1), np.diff(bounds)))

    def read(self, where: slice | np.ndarray) -> StoredRows:
        """Positions (a slice or (L,) indices) with h and r as stored (int8 or float) beside
        their row scales, and c and a in the store's precision (:func:`pair_entries` applies
        the scales to its inner products, not to every (L, d) row)."""

        def column(name: str) -> torch.Tensor:
            return torch.from_numpy(np.array(self.rows[name][where]))

        def scale(name: str) -> torch.Tensor:
            return torch.from_numpy(np.array(self.scales[name][where])).to(self.dtype)

        c, a = (column(name).to(self.dtype) * scale(name).unsqueeze(1) for name in ("score_grad", "weights"))
        ids = torch.from_numpy(np.asarray(self.active[where]).astype(np.int64))
        return StoredRows(column("hidden"), scale("hidden"), column("output_grad"), scale("output_grad"), ids, c, a)

    def positions_of(self, documents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The positions of some store documents, document by document, and the place in
        ``documents`` of each: ((L,), (L,))."""
        starts, stops = self.offsets[documents], self.offsets[documents + 1]
        counts = stops - starts
        owner = np.repeat(np.arange(len(documents)), counts)
        positions = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        return positions.astype(np.int64), owner


def pair_lookup(prototypes: torch.Tensor, columns: torch.Tensor, P: int, width: int) -> torch.Tensor:
    """(P, width) the pair index of (prototype, column), m (the number of pairs) where none."""
    lookup = torch.full((P, width), len(prototypes), dtype=torch.long)
    lookup[prototypes, columns] = torch.arange(len(prototypes))
    return lookup


# pair_entries gathers when the dense products would do more than GATHER_COST times the
# multiply-adds of the gathered ones (a rough guess at a gathered entry's extra cost, not a
# measured crossover). Measured on the demo store (P = 1,024, k = 12, one query of 96 pairs:
# about one entry per position), one scan on 2 cores: 8 s gathered against 12 s dense.
GATHER_COST = 16


def pair_entries(
    rows: StoredRows, psi: torch.Tensor, lookup: torch.Tensor, gather: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (position, slot, column) entries whose active prototype is one of the column's
    pairs, and their terms c_tj <psi_j^K, h_t> + a_tj <psi_j^W, r_t>.

    The inner products are computed one of two ways, with the same result: as two dense
    products of every position with every pair (BLAS), read only at the entries, when a
    position meets many of the query's pairs (small P, large k); or, when it meets few (a
    position meets a query's prototypes at about k |Q| / P of its k slots: about 1 of 96 pairs
    at the demo's P = 1,024, k = 12), pair by pair over only the rows that hold it. Either way
    the stored rows are multiplied as stored and their scales applied to the products.

    Args:
        rows: L positions (:meth:`PositionStore.read`).
        psi: (m, 2d) A_j g_qj of the query's pairs.
        lookup: (P, n) pair of (prototype, column), m where the column lacks the prototype.
        gather: True / False forces the pair-by-pair / dense way; None chooses by cost.

    Returns:
        (E,) position in ``rows``, (E,) slot in its k, (E,) column, (E,) term, in (position,
        slot, column) order.
    """
    m, d, dt = len(psi), rows.h.shape[1], psi.dtype
    member = (lookup < m).any(1)  # (P,) prototypes some column has
    pos, slot = torch.nonzero(member[rows.ids], as_tuple=True)  # (E0,) active slots any column has
    cols = lookup[rows.ids[pos, slot]]  # (E0, n)
    entry, column = torch.nonzero(cols < m, as_tuple=True)
    pair, pos, slot = cols[entry, column], pos[entry], slot[entry]
    if gather is None:
        gather = len(pos) * GATHER_COST < len(rows) * m
    if gather:
        hk, rw = _gathered_products(rows, psi, pos, pair)
    else:
        hk = (rows.h.to(dt) @ psi[:, :d].T)[pos, pair]  # <psi_j^K, stored h_t>
        rw = (rows.r.to(dt) @ psi[:, d:].T)[pos, pair]
    terms = rows.c[pos, slot] * rows.h_scale[pos] * hk + rows.a[pos, slot] * rows.r_scale[pos] * rw
    return pos, slot, column, terms


def _gathered_products(
    rows: StoredRows, psi: torch.Tensor, pos: torch.Tensor, pair: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E,) <psi_pair^K, stored h_pos> and <psi_pair^W, stored r_pos> of each entry, pair by
    pair over the rows that hold it (each row gathered as stored, then converted)."""
    d, dt = rows.h.shape[1], psi.dtype
    order = torch.argsort(pair, stable=True)
    counts = torch.bincount(pair, minlength=len(psi)).tolist()
    hk, rw = torch.empty(len(pos), dtype=dt), torch.empty(len(pos), dtype=dt)
    at = 0
    for p, count in enumerate(counts):
        if not count:
            continue
        place = order[at : at + count]  # entries of pair p
        held = pos[place]
        hk[place] = torch.mv(rows.h.index_select(0, held).to(dt), psi[p, :d])
        rw[place] = torch.mv(rows.r.index_select(0, held).to(dt), psi[p, d:])
        at += count
    return hk, rw


def document_scores(
    store: PositionStore,
    psi: torch.Tensor,
    lookup: torch.Tensor,
    chunk_entries: int,
    documents: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of stored documents for n columns (query tokens) of pairs.

    Args:
        psi: (m, 2d) the pairs' A_j g_qj; lookup: (P, n) from :func:`pair_lookup`.
        chunk_entries: (position, active prototype, column) entries handled at once (memory).
        documents: (C,) store document numbers to score; None scores every document in one
            sequential scan of the store.

    Returns:
        ((C, n) float64 scores, + = helpful; (C, n) int64 (position, prototype) terms met), C = D
        for every document.
    """
    n = lookup.shape[1]
    step = max(1, chunk_entries // (store.k * n))
    if documents is None:
        size = len(store.documents)
        chunks = (
            (slice(lo, min(len(store), lo + step)), store.position_document(slice(lo, min(len(store), lo + step))))
            for lo in range(0, len(store), step)
        )
    else:
        size = len(documents)
        positions, owner = store.positions_of(np.asarray(documents, dtype=np.int64))
        chunks = (
            (positions[lo : lo + step], torch.from_numpy(owner[lo : lo + step]))
            for lo in range(0, len(positions), step)
        )
    scores = torch.zeros(size * n, dtype=torch.float64)
    hits = torch.zeros(size * n, dtype=torch.int64)
    for where, documents_of in chunks:  # (not ``owner``: the generator above reads that name)
        pos, _, column, terms = pair_entries(store.read(where), psi, lookup)
        cell = documents_of[pos] * n + column  # (E,) (document, column) of each entry
        scores.index_add_(0, cell, terms.double())
        hits.index_add_(0, cell, torch.ones_like(cell))
    return scores.reshape(size, n).numpy(), hits.reshape(size, n).numpy()
