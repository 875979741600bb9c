"""The attribution methods of bench/lds.py, each scoring every training document for every query.

Every method returns a :class:`Scored`: (Q, D) scores, + = helpful (upweighting the document
lowers the query's summed completion loss), over the same D training documents in training-split
order, plus its own ranking of each query's documents (for recall@10) and its costs, kept
apart: the fixed cost (build s, peak RSS) and the per-query cost (one query alone, and per
query when all are scored together). Whole documents everywhere: PRISM influence stores every
position of every document; the post-hoc baselines score windows of the model's sequence
length (overlapping by one token) and sum them per document.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

MB = 1 << 20


class PeakRSS:
    """The largest resident set size of this process while the block runs (sampled every 10 ms)."""

    def __enter__(self) -> PeakRSS:
        self._process, self._stop = psutil.Process(), threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def mb(self) -> float:
        return self.peak / MB


@dataclass
class Query:
    """A prompt and the completion whose summed loss is attributed. ``kind``: ``lds`` (cut
    from a held-out document), ``verbatim`` or ``paraphrased`` (a planted fact's prompts)."""

    prompt: str
    completion: str
    kind: str
    fact: int | None = None


@dataclass
class Scored:
    """One method's scores of every document for every query, its rankings and its costs.

    Attributes:
        name, label: key and table label.
        kind: ``prism`` or ``dense``: the model it attributes, hence the retrains it is scored against.
        scores: (Q, D), + = helpful.
        orders: ranking name -> per query, the documents it ranks first (best first); the
            default ranking is "".
        build_s: fixed cost (index, factors or store), seconds.
        peak_rss_mb: the bench process's peak RSS while the method built and answered.
        single_query_ms: one query alone against every document, what an analyst waits for.
        query_ms: per query when all queries are scored together (the marginal cost).
        bytes_per_document: bytes the method stores per training document.
    """

    name: str
    label: str
    kind: str
    scores: np.ndarray
    orders: dict[str, list[np.ndarray]] = field(default_factory=dict)
    build_s: float = 0.0
    peak_rss_mb: float = 0.0
    single_query_ms: float | None = None
    query_ms: float | None = None
    bytes_per_document: float = 0.0


def by_score(scores: np.ndarray, top: int = 10) -> list[np.ndarray]:
    """Each query's ``top`` documents by decreasing score (ties: the lower training row)."""
    return [np.lexsort((np.arange(len(row)), -row))[:top] for row in scores]


def _files_bytes(folder: Path, names: list[str]) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def overall_examples(bundle, index, factors, method: str, query: Query, top: int, ranking: str = "relative"):
    """The examples ``attribute(bundle, index, prompt, completion, top=top, method=method,
    ranking=ranking)`` ranks over the whole completion, by the engine's own steps (decompose,
    credit each token, concatenate, rank), without ranking each token's examples as well (at
    ``top=10**6`` those are 16 more full rankings, and 16 times the time)."""
    from core.attribution.decompose import decompose_with_tensors
    from core.attribution.engine import REGISTRY
    from core.attribution.engine import Query as EngineQuery
    from core.attribution.spans import MIN_SPAN

    chosen = REGISTRY[method]
    options = {"similarity": "code", "influence": factors, "min_span": MIN_SPAN, "candidates": None, "ranking": ranking}
    q = EngineQuery(bundle, index, options)
    if chosen.check is not None:
        chosen.check(q)
    q.decomposition, q.tensors = decompose_with_tensors(bundle, None, query.prompt, query.completion, 5, None, 16)
    whole = chosen.concat(chosen.credit(q))
    return chosen.examples(q, [whole], top)[0]


def prism_methods(bundle_dir: Path, corpus: Path, queries: list[Query], documents: int, rank: int) -> list[Scored]:
    """PRISM neighbourhood and influence: the index and the influence store built (timed), then
    every document ranked per query (:func:`overall_examples`, ``top=10**6``): its ``score`` per
    document (the predicted loss change, influence; the credit, neighbourhood) and its order
    (influence: by relative score, and again by loss). Single-query latency: ``attribute(top=10)``
    (every document scored exactly, each token's examples too), median over the LDS queries."""
    from core.attribution.engine import attribute
    from core.attribution.influence import InfluenceArguments, build_influence, load_influence
    from core.bundle import load_bundle
    from core.index.build import build_index
    from core.index.format import index_dir, load_index

    with PeakRSS() as rss:
        t0 = time.perf_counter()
        build_index(bundle_dir, corpus, show_progress=False)
        index_s = time.perf_counter() - t0
    index_rss = rss.mb
    index_files = [p.name for p in index_dir(bundle_dir).iterdir() if p.is_file()]
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        arguments = InfluenceArguments(rank=rank) if rank else InfluenceArguments()  # as shipped
        build_influence(bundle_dir, corpus, arguments, show_progress=False)
        influence_s = time.perf_counter() - t0
    influence_rss = rss.mb
    bundle, index, factors = load_bundle(bundle_dir), load_index(bundle_dir), load_influence(bundle_dir)
    out = []
    builds = {"influence": (influence_s, influence_rss), "neighbourhood": (index_s, index_rss)}
    for method, (build_s, build_rss) in builds.items():
        scores = np.zeros((len(queries), documents))
        orders: dict[str, list[np.ndarray]] = {"": []}
        if method == "influence":
            orders["loss"] = []
        latency = []
        with PeakRSS() as rss:
            for q, query in enumerate(queries):
                for ranking in orders:
                    examples = overall_examples(bundle, index, factors, method, query, 10**6, ranking or "relative")
                    ranked = np.array([e.doc_index for e in examples], dtype=np.int64)
                    orders[ranking].append(ranked[:10])
                    scores[q, ranked] = [e.score for e in examples]
                if query.kind == "lds":
                    t0 = time.perf_counter()
                    attribute(bundle, index, query.prompt, query.completion, top=10, method=method, influence=factors)
                    latency.append(1000 * (time.perf_counter() - t0))
        stored = (
            factors.stored_bytes()
            if method == "influence"
            else _files_bytes(index_dir(bundle_dir), [n for n in index_files if n.endswith((".safetensors", ".jsonl"))])
        )
        label = "PRISM influence" if method == "influence" else "PRISM neighbourhood"
        ms = statistics.median(latency) if latency else None
        out.append(
            Scored(method, label, "prism", scores, orders, build_s, max(build_rss, rss.mb), ms, ms, stored / documents)
        )
    return out


def window_examples(token_ids: list[list[int]], length: int, pad_id: int):
    """The documents as windows (core.attribution.baselines.document_windows)."""
    from core.attribution.baselines import document_windows

    return document_windows(token_ids, length, pad_id)


def query_set(tokenizer, queries: list[Query]):
    """The queries as LMExamples: prompt and completion tokenised apart, as ``attribute`` does."""
    from core.attribution.baselines import query_examples

    prompts = [tokenizer(q.prompt, add_special_tokens=False)["input_ids"] for q in queries]
    completions = [tokenizer(q.completion, add_special_tokens=False)["input_ids"] for q in queries]
    return query_examples(prompts, completions, tokenizer.eos_token_id)


def ekfac(model, tokenizer, token_ids: list[list[int]], queries: list[Query], name: str, label: str, kind: str):
    """EK-FAC (Kronfluence) on the model's linear copy: factors over every window, all queries
    scored in one batch, then the first query alone (its single-query latency)."""
    from core.attribution.baselines import ekfac_scores, linear_head_copy

    seq_len = model.config.sequence_length
    windows, owner = window_examples(token_ids, seq_len, tokenizer.eos_token_id)
    with PeakRSS() as rss, tempfile.TemporaryDirectory(prefix="lds-ekfac-") as tmp:
        result = ekfac_scores(
            linear_head_copy(model),
            windows,
            query_set(tokenizer, queries),
            train_batch_size=16,
            query_batch_size=len(queries),
            output_dir=tmp,
            single_query=True,
        )
    return _windowed(name, label, kind, result, owner, len(token_ids), len(queries), rss.mb, 0.0)


def logra(model, tokenizer, token_ids: list[list[int]], queries: list[Query], proj_dim: int) -> Scored:
    """LoGra (dattri) on the PRISM model's linear copy: a projected gradient store of every window."""
    from core.attribution.baselines import linear_head_copy, logra_scores

    windows, owner = window_examples(token_ids, model.config.sequence_length, tokenizer.eos_token_id)
    with PeakRSS() as rss:
        result = logra_scores(
            linear_head_copy(model),
            windows,
            query_set(tokenizer, queries),
            proj_dim=proj_dim,
            train_batch_size=16,
            query_batch_size=len(queries),
            single_query=True,
        )
    label = f"LoGra (dattri, {proj_dim} per layer)"
    per_document = result.bytes_per_example * len(owner) / len(token_ids)
    return _windowed("logra", label, "prism", result, owner, len(token_ids), len(queries), rss.mb, per_document)


def _windowed(name, label, kind, result, owner, documents: int, queries: int, rss_mb: float, bytes_per_document):
    """A library baseline's window scores summed per document, with its costs."""
    from core.attribution.baselines import sum_windows

    scores = sum_windows(result.scores, owner, documents)
    return Scored(
        name,
        label,
        kind,
        scores,
        {"": by_score(scores)},
        result.fit_seconds,
        rss_mb,
        1000 * result.single_query_seconds,
        1000 * result.score_seconds / queries,
        bytes_per_document,
    )


def bm25(texts: list[str], queries: list[Query]) -> Scored:
    """BM25 (bm25s): query = prompt + completion, documents = the training texts."""
    from core.attribution.baselines import bm25_scores

    with PeakRSS() as rss:
        result = bm25_scores(texts, [q.prompt + q.completion for q in queries])
    return Scored(
        "bm25",
        "BM25 (bm25s)",
        "prism",
        result.scores,
        {"": by_score(result.scores)},
        result.fit_seconds,
        rss.mb,
        1000 * result.single_query_seconds,
        1000 * result.score_seconds / len(queries),
        result.bytes_per_example,
    )


def random_scores(queries: list[Query], documents: int) -> Scored:
    """Random scores: the harness check (LDS about 0, recall about 10 / D)."""
    scores = np.random.default_rng(0).standard_normal((len(queries), documents))
    return Scored("random", "random", "prism", scores, {"": by_score(scores)})
