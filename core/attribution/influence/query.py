"""Influence queries: the stored factors and position store loaded once, a query's tokens
scored against every stored document (notation: :mod:`core.attribution.influence`), and the
documents ranked by the shared ranker (:mod:`core.attribution.ranking`) and described from the
corpus, with the training token that carried most of the query's credit marked.

File: ``BUNDLE/index/influence.safetensors`` (safetensors only), its build arguments and the
model and corpus fingerprints in the header; a mismatch is refused with the command to rebuild.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from core.attribution.influence.credit import InfluenceCredit, RankedDocument
from core.attribution.influence.math import apply_inverse_and_root, head_probabilities, prototype_gradients
from core.attribution.influence.sketch import CandidateSearch, GradientSketch
from core.attribution.influence.store import (
    PositionStore,
    block_scores,
    document_scores,
    pair_entries,
    pair_lookup,
)
from core.attribution.ranking import best_per_group, rank_groups
from core.data.corpus import CorpusError, load_corpus
from core.errors import InfluenceError
from core.index.format import index_dir, snippet_window
from core.store import rebuild_hint

# 1: (P, M) tables padded with -1; 2: per-prototype entry lists of the top documents, rank-r
# whitening; 3: every position in a store, complement-preserving inverse; 4: the store written
# in place and read memory-mapped, with each document's gradient sketch; 5: the sketch is of the
# whitened gradient A^{1/2} g_D; 6: the complement weight is 1/(mean dropped eigenvalue + lambda),
# not 1/lambda.
FORMAT_VERSION = 6
INFLUENCE_FILE = "influence.safetensors"
MEASUREMENT = "loss"  # the summed loss -log p of the attributed tokens; + = the document lowers it
# How documents are ranked: "relative" (the default) by I(q, D) / ||g_D||_A, the score of a
# unit-norm document gradient, so that a document ranks by how closely its gradient points
# along the query's rather than by its size (long or unusual documents have large gradients
# and large scores for every query; docs/attribution.md measures the difference); "loss" by
# I(q, D) itself, the predicted change of the query's loss (what LDS scores).
RANKINGS = ("relative", "loss")

# (position, active prototype, query token) entries a bulk scan handles at once: about 32 MB
# for each of its (chunk, k, tokens) float64 arrays. A query's memory stays bounded however many
# positions are stored; the scores do not depend on it.
CREDIT_CHUNK_ENTRIES = 1 << 22


def influence_exists(bundle_dir: str | Path) -> bool:
    """True when the bundle's index holds influence factors (they may still be stale)."""
    return (index_dir(bundle_dir) / INFLUENCE_FILE).is_file()


def checked_corpus(bundle_dir: Path, meta: dict):
    """The training corpus an influence build recorded in ``meta`` (its path as given, or
    relative to the bundle), checked to be the one it was built from.

    Raises:
        InfluenceError: it moved, or its files changed since the build.
    """
    recorded = meta["corpus_path"]
    candidates = [Path(bundle_dir) / meta.get("corpus_path_from_bundle", recorded), Path(recorded)]
    path = next((p for p in candidates if p.exists()), None)
    hint = f"move it back, or rebuild with {rebuild_hint(bundle_dir, 'NEWPATH')}"
    if path is None:
        raise InfluenceError(
            f"the corpus the influence factors were built from is no longer at {recorded} "
            f"(it moved or was deleted); {hint}"
        )
    try:
        corpus = load_corpus(path)
    except CorpusError as err:
        raise InfluenceError(f"cannot read the corpus at {path} ({err}); {hint}") from None
    if corpus.fingerprint != meta["corpus_fingerprint"]:
        raise InfluenceError(
            f"the corpus at {path} changed since the influence factors were built; "
            f"rebuild with {rebuild_hint(bundle_dir, str(path))}"
        )
    return corpus


class InfluenceFactors:
    """Loaded factors and position store (see the module docstring); read-only, shared
    between queries."""

    def __init__(self, bundle_dir: Path, arrays: dict[str, np.ndarray], meta: dict):
        self.bundle_dir = bundle_dir
        self.meta = meta
        dtype = torch.float64 if meta["arguments"]["dtype"] == "float64" else torch.float32
        self.dtype = dtype
        self.eigenvectors = torch.from_numpy(np.array(arrays["eigenvectors"])).to(dtype)  # (P, 2d, r) U
        self.inverse_weights = torch.from_numpy(np.array(arrays["inverse_weights"])).to(dtype)  # (P, r) w
        self.complement = torch.from_numpy(np.array(arrays["complement"])).to(dtype)  # (P,) kappa
        self.eigenvalues, self.damping = np.array(arrays["eigenvalues"]), np.array(arrays["damping"])
        # None for a sketch-only store (``--influence-store sketch``): every document is scored by
        # its sketch's estimate, and no training token is marked
        self.store = PositionStore(arrays, dtype) if meta.get("store", "positions") == "positions" else None
        self.documents = np.asarray(arrays["documents"])  # (D,) training-split rows
        self.self_influence = np.array(arrays["self_influence"])  # (D,) g_D^T A g_D / positions
        positions = np.diff(np.asarray(arrays["document_offsets"])).astype(np.float64)
        # (D,) ||g_D||_A = sqrt(g_D^T A g_D), the divisor of the relative scores (0: no gradient)
        self.gradient_norm = np.sqrt(np.maximum(self.self_influence * positions, 0.0))
        norm = self.gradient_norm
        self._inverse_norm = np.divide(1.0, norm, out=np.zeros(len(norm)), where=norm > 0)  # 0: no gradient
        self.sketch = GradientSketch(
            torch.from_numpy(np.array(arrays["sketch_projection"])).to(dtype),
            torch.from_numpy(np.array(arrays["sketch_signs"])).to(dtype),
        )
        self._sketches = arrays["document_sketch"]  # (D, m), memory-mapped until searched
        # (D, P, 2d) block sums g_jD and their (D, P) scales, when the build kept them
        self.blocks = (
            (arrays["document_blocks"], arrays["document_blocks_scale"]) if "document_blocks" in arrays else None
        )
        self._search: dict[str, CandidateSearch] = {}
        self._sketch_rows: torch.Tensor | None = None
        self._search_lock = threading.Lock()
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
        """Each query token's credit: psi_j = A_j g_qj for its active prototypes (no document
        is scored yet; :meth:`rank` does that).

        Args:
            model: the PRISM model the factors were built for.
            hidden: (n, d) the head's input at each query position; ids, weights: (n, k) its
                active set and weights (controls applied); targets: (n,) the tokens.
            gains: (P,) controller gains of the call, or None.
            probs: (n, V) the next-token distributions of the forward pass that gave ``hidden``,
                used when already in the factors' precision (else recomputed in it).

        Returns:
            one credit per token.
        """
        head, E = model.prototypes, model.unembedding
        dt = self.dtype
        h, K, W, Em = hidden.to(dt), head.keys.to(dt), head.values.to(dt), E.to(dt)
        if probs is None or probs.dtype != dt:
            probs = head_probabilities(ids, weights.to(dt), W, Em)
        n, k = ids.shape
        if n == 0:
            return []
        power = head.weight_power
        grads = prototype_gradients(h, ids, weights.to(dt), probs, targets, K, W, Em, gains, power)  # (n, k, 2d)
        flat = ids.reshape(-1).cpu()  # (n k,) the (token, active prototype) pairs
        psi, root = apply_inverse_and_root(
            grads.reshape(n * k, -1).cpu(), flat, self.eigenvectors, self.inverse_weights, self.complement
        )  # (n k, 2d) A_j g_qj and A_j^{1/2} g_qj
        rows = [slice(i * k, (i + 1) * k) for i in range(n)]  # each token's k pairs
        return [InfluenceCredit(flat[r].numpy(), psi[r], root[r], self) for r in rows]

    def score_every_document(self, credits: list[InfluenceCredit]) -> None:
        """Score every stored document exactly for several credits in one scan of the store
        (each credit keeps its (D,) scores and terms)."""
        todo = [c for c in credits if c._exact is None]
        if not todo:
            return
        scores, terms = self._score_credits(todo, None)  # (D, n)
        for i, c in enumerate(todo):
            c._exact = (scores[:, i], terms[:, i])

    def _score_credits(self, credits: list[InfluenceCredit], documents: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """(C, n) scores and terms of store ``documents`` (None: every one) for distinct credits:
        exact, or the sketches' estimates for a sketch-only store. A credit whose parts are all
        among the others is their sum (the completion of its tokens; both are linear in its
        pairs), which spares the store's products its pairs or its column."""
        place = {id(c): i for i, c in enumerate(credits)}
        summed = [i for i, c in enumerate(credits) if c.parts and all(id(p) in place and not p.parts for p in c.parts)]
        direct = sorted(set(range(len(credits))) - set(summed))
        subset = [credits[i] for i in direct]
        sketched = self.store is None
        if sketched:
            scored, met = self._sketch_scores(subset, documents)
        else:
            scored, met = self._scores(*self._columns(subset), documents)
        scores = np.zeros((len(scored), len(credits)))
        scores[:, direct] = scored
        if sketched:  # one term per document with a gradient, whatever the credit (read-only)
            terms = np.broadcast_to(met[:, :1], scores.shape)
        else:
            terms = np.zeros((len(scored), len(credits)), dtype=np.int64)
            terms[:, direct] = met
        for i in summed:
            columns = [place[id(p)] for p in credits[i].parts]
            scores[:, i] = scores[:, columns].sum(1)
            if not sketched:
                terms[:, i] = terms[:, columns].sum(1)
        return scores, terms

    def _columns(self, credits: list[InfluenceCredit]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pairs, 2d) psi of several credits and their (P, n) lookup, one column per credit."""
        prototypes = torch.from_numpy(np.concatenate([c.prototypes for c in credits]).astype(np.int64))
        column = torch.cat([torch.full((len(c.prototypes),), i, dtype=torch.long) for i, c in enumerate(credits)])
        lookup = pair_lookup(prototypes, column, len(self.complement), len(credits))
        return torch.cat([c.psi.to(self.dtype) for c in credits]), lookup

    def exact_scores(self, credit: InfluenceCredit, documents: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """((C,) scores, (C,) terms met) of some store documents (None: every one), exactly (a
        sketch-only store: estimated)."""
        if self.store is None:
            scores, terms = self._sketch_scores([credit], documents)
            return scores[:, 0], terms[:, 0]
        prototypes = torch.from_numpy(np.asarray(credit.prototypes, dtype=np.int64))
        lookup = pair_lookup(prototypes, torch.zeros(len(prototypes), dtype=torch.long), len(self.complement), 1)
        scores, terms = self._scores(credit.psi.to(self.dtype), lookup, documents)
        return scores[:, 0], terms[:, 0]

    @property
    def exact(self) -> bool:
        """True when scores are exact (a position store); False for a sketch-only store, whose
        scores are the sketches' unbiased estimates."""
        return self.store is not None

    def _scores(self, psi: torch.Tensor, lookup: torch.Tensor, documents: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """(C, n) scores and shared terms, exactly: from the per-document block sums when the
        build kept them (one product over the query's blocks), else by a scan of the positions."""
        if self.blocks is not None:
            return block_scores(*self.blocks, psi, lookup, documents)
        return document_scores(self.store, psi, lookup, CREDIT_CHUNK_ENTRIES, documents)

    def _sketch_scores(
        self, credits: list[InfluenceCredit], documents: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(C, n) <phi(q), phi(D)> per store document and credit: the estimate of I(q, D)
        (:mod:`.sketch`), and terms 1 for a document with a gradient."""
        queries = self.query_sketches(credits)  # (n, m)
        if documents is None:
            sketches = self.sketch_matrix()
        elif self._sketch_rows is not None:
            sketches = self._sketch_rows[torch.from_numpy(documents)]
        else:  # a ranking's few candidates: read from the file, not the whole (D, m) matrix
            sketches = torch.from_numpy(np.asarray(self._sketches[np.asarray(documents)], dtype=np.float32))
        # in the sketches' float32: an estimate, and no (D, m) copy in a wider type per query
        scores = (sketches @ queries.to(sketches.dtype).T).double().numpy()  # (C, n)
        norm = self.gradient_norm if documents is None else self.gradient_norm[documents]
        return scores, np.broadcast_to((norm > 0).astype(np.int64)[:, None], scores.shape)  # read-only

    def sketch_matrix(self) -> torch.Tensor:
        """(D, m) the documents' sketches in memory (read from the file once)."""
        with self._search_lock:
            if self._sketch_rows is None:
                self._sketch_rows = torch.from_numpy(np.array(self._sketches, dtype=np.float32))
            return self._sketch_rows

    def relative(self, scores: np.ndarray, documents: np.ndarray | None = None) -> np.ndarray:
        """Scores of store ``documents`` (None: every one) divided by their ||g_D||_A (0 where
        a document has no gradient)."""
        inverse = self._inverse_norm if documents is None else self._inverse_norm[documents]
        return scores * inverse

    def searcher(self, ranking: str = "relative") -> CandidateSearch:
        """The inner-product search over the documents' sketches, divided by their gradient
        norms for the relative ranking (built once per ranking, on first use)."""
        with self._search_lock:
            if ranking not in self._search:
                sketches = np.asarray(self._sketches, dtype=np.float32)
                if ranking == "relative":
                    norm = self.gradient_norm.astype(np.float32)[:, None]
                    sketches = np.divide(sketches, norm, out=np.zeros_like(sketches), where=norm > 0)
                self._search[ranking] = CandidateSearch(sketches)
            return self._search[ranking]

    def query_sketches(self, credits: list[InfluenceCredit]) -> torch.Tensor:
        """(n, m) each credit's sketch, sum_j phi(j, A_j^{1/2} g_qj): its inner product with a
        document's stored sketch is an unbiased estimate of I(q, D) (:mod:`.sketch`). Computed
        once per credit (kept on it); a credit of several tokens is its parts' sum (phi is linear)."""
        todo = [c for c in {id(c): c for c in credits}.values() if c._sketch is None and not c.parts]
        for c in [c for c in todo if not len(c.prototypes)]:  # no active prototype: no gradient
            c._sketch = torch.zeros(self.sketch.width, dtype=self.dtype)
        todo = [c for c in todo if c._sketch is None]
        if todo:
            sizes = [len(c.prototypes) for c in todo]
            prototypes = torch.from_numpy(np.concatenate([c.prototypes for c in todo]).astype(np.int64))
            phi = self.sketch.pairs(prototypes, torch.cat([c.root.to(self.dtype) for c in todo]))  # (pairs, m)
            column = torch.repeat_interleave(torch.arange(len(todo)), torch.tensor(sizes))
            rows = torch.zeros(len(todo), phi.shape[1], dtype=phi.dtype).index_add_(0, column, phi)
            for c, row in zip(todo, rows, strict=True):
                c._sketch = row
        for c in credits:
            if c._sketch is None:  # several tokens
                c._sketch = self.query_sketches(list(c.parts)).sum(0)
        return torch.stack([c._sketch for c in credits])

    def candidates_for(
        self, credit: InfluenceCredit, count: int, harmful: bool = False, ranking: str = "relative"
    ) -> np.ndarray:
        """(<= count,) store documents whose sketched score (relative or not, as ``ranking``)
        is largest (``harmful``: smallest)."""
        return self._candidate_pools([credit], [harmful], count, ranking)[0]

    def _candidate_pools(
        self, credits: list[InfluenceCredit], harmful: list[bool], count: int, ranking: str
    ) -> list[np.ndarray]:
        """Per credit, the (<= count,) store documents whose sketched scores are best in the
        direction ``harmful`` asks for (ascending), all found in one search. The query sketch
        of a credit is the sum of its pairs' sketches, computed for every credit's pairs at once."""
        queries = self.query_sketches(credits)
        queries[torch.tensor(harmful, dtype=torch.bool)] *= -1
        rows, _ = self.searcher(ranking).search(queries.numpy(), count)
        return [np.sort(r[r >= 0]) for r in rows]

    def rank(
        self,
        credit: InfluenceCredit,
        top: int,
        harmful: bool = False,
        candidates: int | None = None,
        ranking: str = "relative",
    ) -> list[RankedDocument]:
        """The ``top`` documents by exact score, highest first (``harmful``: only documents with
        negative scores, lowest first; ties: lower training row), each with the prototype and
        the training token that carried most of its score (in the score's direction).

        ``ranking`` (:data:`RANKINGS`): ``relative`` ranks by I(q, D) / ||g_D||_A, ``loss`` by
        I(q, D). ``candidates`` 0 or None (the default): every document is scored exactly;
        > 0: the retrieval tier (:mod:`.sketch`), only the ``candidates`` documents with the
        best sketched scores are (faster on large stores, but it can miss documents of the
        exact top: docs/benchmarks.md measures how often).
        """
        return self.rank_many([credit], [harmful], top, candidates, ranking)[0]

    def rank_many(
        self,
        credits: list[InfluenceCredit],
        harmful: list[bool],
        top: int,
        candidates: int | None = None,
        ranking: str = "relative",
    ) -> list[list[RankedDocument]]:
        """:meth:`rank` for several (credit, harmful) requests at once, each ranked as if alone:
        every document scored exactly in one scan for all the credits (the default), or the
        retrieval tier's one search for all of them and each request's candidates scored for
        its own credit; then the stored positions of all the ranked documents read once. A
        credit may appear in several requests."""
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
        if not credits:
            return []
        if self.store is not None and not candidates:  # every document scored exactly
            self.score_every_document(list({id(c): c for c in credits}.values()))
            chosen = []
            for c, bad in zip(credits, harmful, strict=True):
                chosen.append(self._ranked(np.arange(len(self.documents)), c.scores, c.terms, bad, top, ranking, None))
        else:  # the search's candidates (a sketch-only store: its top ``top``), scored for their credit
            chosen = self._rank_candidates(credits, harmful, top, max(candidates or 0, top), ranking)
        carriers = self._carriers([(c, docs, s) for c, (docs, s, _) in zip(credits, chosen, strict=True)])
        return [
            [
                RankedDocument(int(self.documents[doc]), float(s), float(rel), int(p), int(a), int(b), int(n))
                for doc, s, rel, p, n, a, b in zip(docs, scores, relative, *carried, strict=True)
            ]
            for (docs, scores, relative), carried in zip(chosen, carriers, strict=True)
        ]

    def _rank_candidates(
        self, credits: list[InfluenceCredit], harmful: list[bool], top: int, candidates: int, ranking: str
    ) -> list[tuple[np.ndarray, ...]]:
        """Per request: (chosen store documents, their scores, their relative scores) among the
        ``candidates`` of the retrieval tier's one search, scored exactly for its own credit."""
        pools = self._candidate_pools(credits, harmful, max(candidates, top), ranking)
        # The pools' documents are read once and scored for every distinct credit (one column
        # each); a pool keeps its own credit's column.
        distinct = list({id(c): c for c in credits}.values())
        column = {id(c): i for i, c in enumerate(distinct)}
        union = np.unique(np.concatenate(pools))
        scores, terms = self._score_credits(distinct, union)  # (U, n)
        chosen = []
        for c, pool, bad in zip(credits, pools, harmful, strict=True):
            rows, i = np.searchsorted(union, pool), column[id(c)]
            chosen.append(self._ranked(pool, scores[rows, i], terms[rows, i], bad, top, ranking, pool))
        return chosen

    def _ranked(
        self,
        pool: np.ndarray,
        scores: np.ndarray,
        terms: np.ndarray,
        harmful: bool,
        top: int,
        ranking: str,
        documents: np.ndarray | None,
    ) -> tuple[np.ndarray, ...]:
        """(chosen store documents, their scores, their relative scores): the ``top`` of an
        ascending ``pool`` of store documents (``documents``: the same, or None for every one)
        by its (C,) scores and terms."""
        relative = self.relative(scores, documents)
        key = relative if ranking == "relative" else scores
        # places in the pool of documents sharing a block (harmful: and raising the loss)
        met = np.flatnonzero((terms > 0) & (scores < 0)) if harmful else np.flatnonzero(terms > 0)
        # one score per pool document: ranked without summing
        order = rank_groups(pool[met], (-1.0 if harmful else 1.0) * key[met], top, distinct=True)
        at = met[np.searchsorted(pool[met], order.groups)] if len(order) else met[:0]
        return pool[at], scores[at], relative[at]

    def _carriers(self, jobs: list[tuple[InfluenceCredit, np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, ...]]:
        """Per (credit, chosen store documents, their scores) job and chosen document: the
        prototype with the largest summed terms, the number of the credit's prototypes it
        meets, and the char span of the position whose terms sum to the most, both signed by
        the document's score (ties: the smaller id, the earlier position). The positions of
        every job's documents are read once, in chunks of documents."""
        store = self.store
        if store is None:  # no positions: no carrier prototype (-1) and no marked token
            return [
                (np.full(len(docs), -1), np.zeros(len(docs), dtype=np.int64), *[np.zeros(len(docs))] * 2)
                for _, docs, _ in jobs
            ]
        every = np.unique(np.concatenate([docs for _, docs, _ in jobs]))
        counts = store.offsets[every + 1] - store.offsets[every]
        budget = max(1, CREDIT_CHUNK_ENTRIES // store.k)
        parts = [{"totals": [], "positions": [], "owner": [], "mine": [], "ids": [], "values": []} for _ in jobs]
        lookups = [
            pair_lookup(
                torch.from_numpy(c.prototypes),
                torch.zeros(len(c.prototypes), dtype=torch.long),
                len(self.complement),
                1,
            )
            for c, _, _ in jobs
        ]
        sorters = [np.argsort(docs) for _, docs, _ in jobs]  # to find a position's place in its job
        lo = 0
        while lo < len(every):  # chunks of whole documents of about ``budget`` positions
            hi = lo + max(1, int(np.searchsorted(np.cumsum(counts[lo:]), budget, side="right")))
            block = every[lo:hi]
            positions, owner = store.positions_of(block)
            rows = store.read(positions)
            for job, (credit, docs, scores), lookup, sorter in zip(parts, jobs, lookups, sorters, strict=True):
                keep = np.flatnonzero(np.isin(block[owner], docs))  # the positions of this job's documents
                if not len(keep):
                    continue
                place = sorter[np.searchsorted(docs, block[owner[keep]], sorter=sorter)]  # (L,) place in the job
                sign = np.where(scores[place] < 0, -1.0, 1.0)
                subset = rows.select(torch.from_numpy(keep))
                pos, slot, _, terms = pair_entries(subset, credit.psi.to(self.dtype), lookup)
                pos, terms = pos.numpy(), terms.double().numpy()
                job["totals"].append(np.bincount(pos, terms, minlength=len(keep)) * sign)
                job["positions"].append(positions[keep])
                job["owner"].append(place)
                where = place[pos]
                job["mine"].append(where)
                job["ids"].append(subset.ids[torch.from_numpy(pos), slot].numpy())
                job["values"].append(terms * np.where(scores[where] < 0, -1.0, 1.0))
            lo = hi
        out = []
        for job, (_, docs, _) in zip(parts, jobs, strict=True):
            if not job["positions"]:
                empty = np.zeros(0, dtype=np.int64)
                out.append((empty, empty, empty, empty))
                continue
            totals, positions, owner, mine, ids, values = (np.concatenate(job[key]) for key in job)
            order = np.lexsort((positions, -totals, owner))  # by document, largest first, then earliest
            best = order[np.unique(owner[order], return_index=True)[1]]  # (n,) best position per document
            if len(mine):
                prototype, shared = best_per_group(mine, ids, values, len(docs))
            else:
                prototype, shared = np.zeros(len(docs), dtype=np.int64), np.zeros(len(docs), dtype=np.int64)
            out.append((prototype, shared, store.char_start[positions[best]], store.char_end[positions[best]]))
        return out

    def corpus(self):
        """The training corpus the factors were built from (loaded once), checked unchanged.

        Raises:
            InfluenceError: it moved, or its files changed since the build.
        """
        if self._corpus is None:
            self._corpus = checked_corpus(self.bundle_dir, self.meta)
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
