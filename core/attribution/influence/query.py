"""Influence queries: the stored factors loaded once, a query's tokens credited through them
(notation: :mod:`core.attribution.influence`), and the credited documents ranked by the shared
ranker (:mod:`core.attribution.ranking`) and described from the corpus.

File: ``BUNDLE/index/influence.safetensors`` (safetensors only), its build arguments and the
model and corpus fingerprints in the header; a mismatch is refused with the command to rebuild.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.attribution.influence.math import head_probabilities, project, prototype_gradients
from core.attribution.ranking import rank_groups
from core.attribution.records import Example
from core.bundle import model_fingerprint
from core.data.corpus import CorpusError, load_corpus
from core.errors import InfluenceError, PrototypeIndexError
from core.index.format import META_FILE, index_dir, snippet_window
from core.store import read_json, read_safetensors, rebuild_hint

if TYPE_CHECKING:  # the engine imports this module
    from core.attribution.engine import Query

FORMAT_VERSION = 2  # 1: (P, M) tables padded with -1; 2: entries sorted by prototype with offsets
INFLUENCE_FILE = "influence.safetensors"
MEASUREMENT = "loss"  # the summed loss -log p of the attributed tokens; + = the document lowers it

# Entries (kept (prototype, document) pairs) an influence query reads at once: about 64 MB for
# each of its (entries, r) float32 arrays at r = 16. A query whose tokens reach more is worked
# through in runs of tokens, so its memory stays bounded when every document is kept.
CREDIT_CHUNK_ENTRIES = 1 << 20


def influence_exists(bundle_dir: str | Path) -> bool:
    """True when the bundle's index holds influence factors (they may still be stale)."""
    return (index_dir(bundle_dir) / INFLUENCE_FILE).is_file()


@dataclass
class InfluenceCredit:
    """Credit of one or more query tokens: (C,) documents, prototypes, values, best-token spans."""

    doc_index: np.ndarray
    prototypes: np.ndarray
    values: np.ndarray
    start: np.ndarray
    end: np.ndarray

    @staticmethod
    def concat(parts: list[InfluenceCredit]) -> InfluenceCredit:
        names = ("doc_index", "prototypes", "values", "start", "end")
        return InfluenceCredit(*(np.concatenate([getattr(p, n) for p in parts]) for n in names))


@dataclass
class RankedDocument:
    """A training document's influence: summed score, the prototype that carried most of it,
    the span of its best token for that prototype, and the number of credited entries."""

    doc_index: int
    score: float
    prototype: int
    start: int
    end: int
    entries: int


class InfluenceFactors:
    """Loaded factors (see the module docstring); read-only, shared between queries."""

    def __init__(self, bundle_dir: Path, arrays: dict[str, np.ndarray], meta: dict):
        self.bundle_dir = bundle_dir
        self.meta = meta
        dtype = torch.float64 if meta["arguments"]["dtype"] == "float64" else torch.float32
        self.dtype = dtype
        self.whitening = (
            torch.from_numpy(arrays["whitening"]).to(dtype)
            * torch.from_numpy(arrays["whitening_scale"]).to(dtype)[:, None, None]
        )  # (P, 2d, r)
        # Entries stay in their stored precision (float16 for a default build): a query reads
        # only its active prototypes' rows and widens those.
        self.offsets = arrays["offsets"]  # (P + 1,)
        self.coefficients = torch.from_numpy(arrays["coefficients"])  # (N, r), scaled per prototype
        self.coefficient_scale = arrays["coefficient_scale"]  # (P,)
        self.doc_index = arrays["doc_index"]  # (N,)
        self.char_start = arrays["char_start"]
        self.char_end = arrays["char_end"]
        self.eigenvalues, self.damping = arrays["eigenvalues"], arrays["damping"]
        self.self_influence = arrays["self_influence"]
        self._corpus = None

    @property
    def model_fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    def stored_bytes(self) -> int:
        return (index_dir(self.bundle_dir) / INFLUENCE_FILE).stat().st_size

    @torch.no_grad()
    def credit(
        self,
        model,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        targets: torch.Tensor,
        gains: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
    ) -> list[InfluenceCredit]:
        """Influence of the kept documents on each query token's loss.

        Args:
            model: the PRISM model the factors were built for.
            hidden: (n, d) the head's input at each query position; ids, weights: (n, k) its
                active set and weights (controls applied); targets: (n,) the tokens.
            gains: (P,) controller gains of the call, or None.
            probs: (n, V) the next-token distributions of the forward pass that gave ``hidden``,
                used when already in the factors' precision (else recomputed in it).

        Returns:
            one credit per token: each of its active prototypes' kept documents, valued
            (U_j^T g_qj) . c_jD.
        """
        head, E = model.prototypes, model.unembedding
        dt = self.dtype
        h, K, W, Em = hidden.to(dt), head.keys.to(dt), head.values.to(dt), E.to(dt)
        if probs is None or probs.dtype != dt:
            probs = head_probabilities(ids, weights.to(dt), W, Em)
        grads = prototype_gradients(h, ids, weights.to(dt), probs, targets, K, W, Em, gains)  # (n, k, 2d)
        projected = project(grads, ids, self.whitening).cpu()  # (n, k, r) V_j^T g_qj
        n, k = ids.shape
        flat = ids.cpu().numpy().reshape(-1)  # (n k,) the (token, active prototype) pairs
        # c_jD = stored row * the prototype's scale; the scale multiplies the (n k) projections
        # instead of the (N_q) entries.
        scaled = projected.reshape(n * k, -1) * torch.from_numpy(self.coefficient_scale[flat]).to(dt)[:, None]
        per_token = (self.offsets[flat + 1] - self.offsets[flat]).reshape(n, k).sum(1)  # (n,) entries
        bounds, entries = [0], 0  # tokens in runs of at most CREDIT_CHUNK_ENTRIES entries (one token at least)
        for t, count in enumerate(per_token.tolist()):
            if entries and entries + count > CREDIT_CHUNK_ENTRIES:
                bounds.append(t)
                entries = 0
            entries += count
        bounds.append(n)
        return [
            credit
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
            for credit in self._credit_run(flat[lo * k : hi * k], scaled[lo * k : hi * k], k)
        ]

    def _credit_run(self, flat: np.ndarray, scaled: torch.Tensor, k: int) -> list[InfluenceCredit]:
        """Credits of a run of tokens from their (m k,) pairs and (m k, r) scaled projections."""
        starts, counts = self.offsets[flat], self.offsets[flat + 1] - self.offsets[flat]
        owner = np.repeat(np.arange(len(flat)), counts)  # (N_q,) pair of each entry read
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        entries = np.repeat(starts - first, counts) + np.arange(int(counts.sum()))  # (N_q,) entry rows
        coefficients = self.coefficients[torch.from_numpy(entries)].to(scaled.dtype)  # (N_q, r)
        values = (coefficients * scaled[torch.from_numpy(owner)]).sum(-1).double().numpy()
        bounds = np.searchsorted(owner, np.arange(0, len(flat) + 1, k))  # each token's slice of the entries
        return [
            InfluenceCredit(
                self.doc_index[entries[lo:hi]].astype(np.int64),
                flat[owner[lo:hi]].astype(np.int64),
                values[lo:hi],
                self.char_start[entries[lo:hi]],
                self.char_end[entries[lo:hi]],
            )
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    @staticmethod
    def rank(credit: InfluenceCredit, top: int) -> list[RankedDocument]:
        """Sum credit per document; the ``top`` documents, highest first (ties: lower row)."""
        ranking = rank_groups(credit.doc_index, credit.values, top)
        if not len(ranking):
            return []
        # the prototype with the highest summed credit per document (ties: the lower id) ...
        best_proto, _ = ranking.best(credit.prototypes)  # (top,)
        # ... and its highest-valued entry (ties: the first entry), whose token span is shown
        mine, rank = ranking.entries, ranking.rank
        candidate = np.where(credit.prototypes[mine] == best_proto[rank], ranking.values, -np.inf)
        by_entry = np.lexsort((-candidate, rank))
        entry = mine[by_entry[np.unique(rank[by_entry], return_index=True)[1]]]  # (top,)
        entries = np.bincount(rank, minlength=len(ranking))
        return [
            RankedDocument(
                int(d),
                float(total),
                int(best_proto[r]),
                int(credit.start[entry[r]]),
                int(credit.end[entry[r]]),
                int(entries[r]),
            )
            for r, (d, total) in enumerate(zip(ranking.groups, ranking.totals, strict=True))
        ]

    def corpus(self):
        """The training corpus the factors were built from (loaded once), checked unchanged.

        Raises:
            InfluenceError: it moved, or its files changed since the build.
        """
        if self._corpus is None:
            recorded = self.meta["corpus_path"]
            candidates = [self.bundle_dir / self.meta.get("corpus_path_from_bundle", recorded), Path(recorded)]
            path = next((p for p in candidates if p.exists()), None)
            hint = f"move it back, or rebuild with {rebuild_hint(self.bundle_dir, 'NEWPATH')}"
            if path is None:
                raise InfluenceError(
                    f"the corpus the influence factors were built from is no longer at {recorded} "
                    f"(it moved or was deleted); {hint}"
                )
            try:
                corpus = load_corpus(path)
            except CorpusError as err:
                raise InfluenceError(f"cannot read the corpus at {path} ({err}); {hint}") from None
            if corpus.fingerprint != self.meta["corpus_fingerprint"]:
                raise InfluenceError(
                    f"the corpus at {path} changed since the influence factors were built; "
                    f"rebuild with {rebuild_hint(self.bundle_dir, str(path))}"
                )
            self._corpus = corpus
        return self._corpus

    def describe(self, ranked: list[RankedDocument]) -> list[dict]:
        """Records for ranked documents: id, source and a snippet with the best token marked."""
        if not ranked:
            return []
        train = self.corpus().train
        unique = sorted({r.doc_index for r in ranked})
        rows = train[unique]  # each document read once, as lists (a column of a selection is lazy)
        row_of = {d: i for i, d in enumerate(unique)}
        ids, sources, texts = rows["id"], rows["source"], rows["text"]
        records = []
        for r in ranked:
            doc_id, source, text = (column[row_of[r.doc_index]] for column in (ids, sources, texts))
            begin = max(0, r.start)
            end = len(text) if r.end < 0 else max(begin, r.end)
            snippet, start, stop = snippet_window(text, begin, end)
            records.append(
                {
                    "doc_id": doc_id,
                    "source": source,
                    "doc_index": r.doc_index,
                    "char_offset": begin,
                    "snippet": snippet,
                    "highlight_start": start,
                    "highlight_end": stop,
                }
            )
        return records


def load_influence(bundle_dir: str | Path) -> InfluenceFactors:
    """Load a bundle's influence factors after checking that they belong to its weights and index.

    Raises:
        InfluenceError: no factors, another format, or factors built for other weights or
            another corpus than the index.
    """
    bundle_dir = Path(bundle_dir)
    path = index_dir(bundle_dir) / INFLUENCE_FILE
    hint = rebuild_hint(bundle_dir)
    if not path.is_file():
        raise InfluenceError(f"{bundle_dir} has no influence factors; build them with {hint}")
    meta = _header(path, f"rebuild them with {hint}")
    if meta.get("format_version") not in (1, FORMAT_VERSION):
        raise InfluenceError(
            f"{path} has format {meta.get('format_version')!r}, this version reads "
            f"{FORMAT_VERSION}; rebuild it with {hint}"
        )
    hint = rebuild_hint(bundle_dir, meta.get("corpus_path", "PATH"))
    current = model_fingerprint(bundle_dir)
    if meta.get("model_fingerprint") != current:
        raise InfluenceError(
            f"the influence factors in {path.parent} were built for model "
            f"{meta.get('model_fingerprint')}, not this model ({current}); rebuild them with {hint}"
        )
    index_meta_path = index_dir(bundle_dir) / META_FILE
    if index_meta_path.is_file():
        index_meta = read_json(index_meta_path, "the index metadata", f"rebuild it with {hint}", InfluenceError)
        if index_meta.get("corpus_fingerprint") != meta.get("corpus_fingerprint"):
            raise InfluenceError(
                f"the influence factors in {path.parent} were built from another corpus than the "
                f"index; rebuild both with {hint}"
            )
    arrays, _ = read_safetensors(path, "the influence factors", f"rebuild them with {hint}", InfluenceError)
    if meta["format_version"] == 1:
        arrays = _entries_from_tables(arrays)
    return InfluenceFactors(bundle_dir, arrays, meta)


def _header(path: Path, fix: str) -> dict:
    """The build metadata in the factors' safetensors header, read without the arrays."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise InfluenceError(f"the influence factors {path} are not readable ({err}); {fix}") from None


def _entries_from_tables(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Format 1 (P, M) tables padded with -1 -> format 2 entries (same numbers, same order)."""
    filled = arrays["doc_index"] >= 0  # (P, M); a prototype's entries fill its first slots
    counts = filled.sum(axis=1)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    out = {name: value for name, value in arrays.items() if name not in ("coefficients",)}
    out.update({name: arrays[name][filled] for name in ("doc_index", "char_start", "char_end", "self_influence")})
    out["coefficients"] = arrays["coefficients"][filled]  # (N, r)
    out["offsets"] = offsets
    return out


# ------------------------------------------------------------------ the engine's method


def check(query: Query) -> None:
    """Refuse factors built for other weights, before the forward pass.

    Raises:
        InfluenceError: the index's factors are missing or stale.
        PrototypeIndexError: the factors given belong to another model.
    """
    factors, bundle = query.influence(), query.bundle
    if factors.model_fingerprint != bundle.fingerprint:
        raise PrototypeIndexError(
            f"the influence factors were built for model {factors.model_fingerprint}, not this "
            f"model ({bundle.fingerprint}); rebuild it with {rebuild_hint(bundle.path)}"
        )


def credit(query: Query) -> list[InfluenceCredit]:
    """One credit per completion token: the kept documents' influence on its loss."""
    t = query.tensors
    return query.influence().credit(query.bundle.model, t.hidden, t.ids, t.weights, t.targets, t.gains, t.probs)


def examples(query: Query, credits: list[InfluenceCredit], top: int) -> list[list[Example]]:
    """Ranked documents of each influence credit as examples, with the best token marked (the
    documents' texts are read from the corpus in one pass for all the credits)."""
    factors = query.influence()
    ranked = [factors.rank(c, top) for c in credits]
    records = iter(factors.describe([r for ranking in ranked for r in ranking]))
    return [
        [Example(**next(records), score=r.score, prototype=r.prototype, positions=r.entries) for r in ranking]
        for ranking in ranked
    ]
