"""The prototype index: one pass over the training split that gives every prototype its
neighbourhood of training positions, its usage and the tokens it promotes.

A training *position* t of a packed sequence is the context up to and including token t,
which the model trained to predict token t + 1; its hidden state is h_t. EOS separators (no
document to point back to) and the last position of each sequence (no target inside it) are
not indexed.

Neighbourhood of prototype j: the top-M positions by cos(K_j, h_t) among the positions where
j was active (one of the k prototypes of h_t), at most one per document (its best). Adjacent
tokens of a long document are near-duplicates: without that rule a few long documents fill
most neighbourhoods, and document rankings favour long documents (on the planted-canary
corpus of tests/test_attribution.py the canaries then fell out of the top 3). A prototype active in fewer than M
documents fills its remaining places with the nearest positions where it was not active;
those carry ``active = 0`` and ``weight = 0``, so a user can tell them apart.

Layout of ``BUNDLE/index/`` (safetensors and JSON only; nothing is ever unpickled)::

    meta.json                   format version, build arguments, model and corpus
                                fingerprints, counts, build time, file sizes
    neighbourhoods.safetensors  per prototype (P rows, M slots):
        neighbour_row (P, M) int32    row of the positions table, -1 for an empty slot
        cosine (P, M)                 cos(K_j, h_t) of each neighbour
        weight (P, M)                 a_j at that position, 0 where j was not active
        active (P, M) uint8           1 where j was one of the k active prototypes
        usage_count (P,) int64        positions where j was active
        usage_share (P,) float64      usage_count / (positions * k): sums to 1 over prototypes
        promoted_token_ids (P, L) int32, promoted_logits (P, L) float32: top tokens of E W_j
    positions.safetensors       per neighbour position (R rows): document (row of
                                documents.jsonl), doc_index (row of the training split),
                                char_offset, token_id, next_token_id, sequence, offset, and
                                its prototype code: code_ids (R, k) int32, its k active
                                prototypes, and code_cosine (R, k), their cos(K_j, h_t)
    positions.jsonl             per neighbour position: {"snippet", "start", "end"}, the text
                                around it with [start, end) the trigger token inside it
    documents.jsonl             per referenced document: {"doc_index", "id", "source", "chars"}

Later artifacts (labels, the atlas, influence factors) are added as further files listed in
``meta.json["files"]``; a reader ignores files it does not know.

The index is written to a temporary folder inside the bundle and renamed into place, so an
interrupted or failed build never leaves a partial ``index/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from core.model.head import prototype_weights
from core.bundle import Bundle, load_bundle, model_fingerprint
from core.data.corpus import load_corpus, pack
from core.errors import PrototypeIndexError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_DIR = "index"
SNIPPET_BEFORE = 120  # characters of context kept before a neighbour's trigger token
SNIPPET_AFTER = 60  # and after it
PROMOTED_TOKENS = 10  # top tokens of E W_j stored per prototype
REQUIRED_FILES = (
    "meta.json", "neighbourhoods.safetensors", "positions.safetensors", "positions.jsonl", "documents.jsonl"
)


def index_dir(bundle_dir: str | Path) -> Path:
    """Where a bundle's index lives."""
    return Path(bundle_dir) / INDEX_DIR


def index_exists(bundle_dir: str | Path) -> bool:
    """True when the bundle holds a complete index (it may still be stale)."""
    folder = index_dir(bundle_dir)
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _rebuild_hint(bundle_dir: str | Path, corpus: str = "PATH") -> str:
    return f"`prism index --model {bundle_dir} --corpus {corpus}`"


def best_per_group(
    group: np.ndarray, item: np.ndarray, values: np.ndarray, groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each group g < ``groups`` of (C,) parallel arrays: the item whose summed values are
    highest (ties: the smallest item), and the number of distinct items in the group.

    Used to name, for each ranked document, the position or prototype that carried its credit.
    """
    width = int(item.max()) + 1
    pairs, inverse = np.unique(group.astype(np.int64) * width + item, return_inverse=True)  # by group, item
    sums = np.bincount(inverse, weights=values)
    pair_group, pair_item = np.divmod(pairs, width)
    order = np.lexsort((-sums, pair_group))  # by group, highest sum first (stable: smallest item)
    first = order[np.unique(pair_group[order], return_index=True)[1]]
    best = np.zeros(groups, dtype=np.int64)
    best[pair_group[first]] = pair_item[first]
    return best, np.bincount(pair_group, minlength=groups)


@dataclass
class PrototypeIndex:
    """A loaded index (see the module docstring for the meaning of each array).

    Attributes:
        path: the index folder.
        meta: the contents of meta.json.
        neighbour_row: (P, M) rows of the positions table, -1 for empty slots.
        cosine, weight: (P, M) cos(K_j, h_t) and a_j of each neighbour.
        active: (P, M) bool, j active at that neighbour.
        usage_count: (P,) positions where j was active; usage_share: (P,) its share.
        promoted_token_ids, promoted_logits: (P, L) top tokens of E W_j.
        positions: per-position arrays (R,): document, doc_index, char_offset, token_id,
            next_token_id, sequence, offset.
        snippets: R dicts {"snippet", "start", "end"}.
        documents: dicts {"doc_index", "id", "source", "chars"}, one per referenced document.
        labels: prototype id -> label, empty until labels are computed.
    """

    path: Path
    meta: dict
    neighbour_row: np.ndarray
    cosine: np.ndarray
    weight: np.ndarray
    active: np.ndarray
    usage_count: np.ndarray
    usage_share: np.ndarray
    promoted_token_ids: np.ndarray
    promoted_logits: np.ndarray
    positions: dict[str, np.ndarray]
    snippets: list[dict]
    documents: list[dict]
    labels: dict[int, str] = field(default_factory=dict)
    _shares: np.ndarray | None = field(default=None, repr=False)
    _codes: object | None = field(default=None, repr=False)
    _influence: object | None = field(default=None, repr=False)

    @property
    def model_fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    @property
    def corpus_fingerprint(self) -> str:
        return self.meta["corpus_fingerprint"]

    @property
    def num_prototypes(self) -> int:
        return self.neighbour_row.shape[0]

    @property
    def top_m(self) -> int:
        return self.neighbour_row.shape[1]

    def shares(self) -> np.ndarray:
        """(P, M) float64 share of each neighbour in its prototype's credit.

        The non-negative part of the cosine, normalised to sum to 1 over the prototype's
        neighbourhood; a prototype without any positive cosine shares nothing (all zeros).
        """
        if self._shares is None:
            similarity = np.where(self.neighbour_row >= 0, np.clip(self.cosine.astype(np.float64), 0, None), 0.0)
            totals = similarity.sum(axis=1, keepdims=True)  # (P, 1)
            self._shares = np.divide(similarity, totals, out=np.zeros_like(similarity), where=totals > 0)
        return self._shares

    def codes(self):
        """(R, P) scipy CSR matrix of the positions' prototype codes: row t holds the cosines
        of t's k active prototypes, scaled to unit length (a row without cosines stays zero),
        so that one sparse product gives a query code's cosine to every neighbour's code."""
        if self._codes is None:
            from scipy.sparse import csr_matrix

            ids = self.positions["code_ids"]  # (R, k)
            cos = self.positions["code_cosine"].astype(np.float64)  # (R, k)
            norms = np.linalg.norm(cos, axis=1, keepdims=True)  # (R, 1)
            unit = np.divide(cos, norms, out=np.zeros_like(cos), where=norms > 0)
            R, k = ids.shape
            self._codes = csr_matrix((unit.ravel(), ids.ravel(), np.arange(0, R * k + 1, k)),
                                     shape=(R, self.num_prototypes))
        return self._codes

    def influence_factors(self):
        """The bundle's influence factors (:func:`core.influence.load_influence`), loaded on
        first use and kept with the index, so that later queries (a report's items, the
        explorer's requests) do not read the file and the corpus again.

        Raises:
            core.influence.InfluenceError: no factors, or factors for other weights or corpus.
        """
        if self._influence is None:
            from core.attribution.influence import load_influence  # influence imports this module

            self._influence = load_influence(self.path.parent)
        return self._influence

    def label(self, prototype: int) -> str | None:
        """The prototype's label, or None until labels exist."""
        return self.labels.get(int(prototype))

    def example(self, row: int) -> dict:
        """A neighbour position as a record: document, snippet and the trigger's span in it."""
        document = self.documents[int(self.positions["document"][row])]
        snippet = self.snippets[row]
        return {
            "doc_id": document["id"],
            "source": document["source"],
            "doc_index": document["doc_index"],
            "char_offset": int(self.positions["char_offset"][row]),
            "token_id": int(self.positions["token_id"][row]),
            "next_token_id": int(self.positions["next_token_id"][row]),
            "snippet": snippet["snippet"],
            "highlight_start": snippet["start"],
            "highlight_end": snippet["end"],
        }

    def neighbourhood(self, prototype: int) -> list[dict]:
        """The neighbours of one prototype, nearest first, with cosine, weight and share."""
        if not 0 <= prototype < self.num_prototypes:
            raise ValueError(f"unknown prototype id {prototype} (the index has 0..{self.num_prototypes - 1})")
        shares = self.shares()[prototype]
        records = []
        for slot, row in enumerate(self.neighbour_row[prototype]):
            if row < 0:
                continue
            records.append(
                {
                    **self.example(int(row)),
                    "cosine": float(self.cosine[prototype, slot]),
                    "weight": float(self.weight[prototype, slot]),
                    "active": bool(self.active[prototype, slot]),
                    "share": float(shares[slot]),
                }
            )
        return records


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_index(bundle_dir: str | Path, corpus_fingerprint: str | None = None) -> PrototypeIndex:
    """Load a bundle's index after checking that it belongs to this model (and corpus).

    Args:
        bundle_dir: the bundle folder.
        corpus_fingerprint: if given, the index must have been built from this corpus.

    Raises:
        PrototypeIndexError: no index, an incomplete or unknown-format one, or one built for other
            weights or another corpus.
    """
    folder = index_dir(bundle_dir)
    if not (folder / "meta.json").is_file():
        raise PrototypeIndexError(f"{bundle_dir} has no index; build it with {_rebuild_hint(bundle_dir)}")
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        hint = _rebuild_hint(bundle_dir)
        raise PrototypeIndexError(f"{folder}/meta.json is not valid JSON ({err}); rebuild it with {hint}") from None
    corpus_hint = _rebuild_hint(bundle_dir, meta.get("corpus_path", "PATH"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise PrototypeIndexError(
            f"the index in {folder} has format {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}; "
            f"rebuild it with {corpus_hint}"
        )
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise PrototypeIndexError(
            f"the index in {folder} is incomplete (missing {', '.join(missing)}); rebuild it with {corpus_hint}"
        )
    current = model_fingerprint(bundle_dir)
    if meta.get("model_fingerprint") != current:
        raise PrototypeIndexError(
            f"the index in {folder} was built for model {meta.get('model_fingerprint')}, not this model ({current}); "
            f"rebuild it with {corpus_hint}"
        )
    if corpus_fingerprint is not None and meta.get("corpus_fingerprint") != corpus_fingerprint:
        raise PrototypeIndexError(
            f"the index in {folder} was built from corpus {str(meta.get('corpus_fingerprint'))[:16]} "
            f"({meta.get('corpus_path')}), not this corpus ({corpus_fingerprint[:16]}); rebuild it with "
            f"{_rebuild_hint(bundle_dir)}"
        )
    arrays = load_file(folder / "neighbourhoods.safetensors")
    positions = load_file(folder / "positions.safetensors")
    labels: dict[int, str] = {}
    if (folder / "labels.json").is_file():  # written by core/labels.py: "category: role" per prototype
        try:
            raw = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raw = {}
        if raw.get("model_fingerprint") == current:
            labels = {int(r["id"]): f"{r['category']}: {r['role']}" for r in raw.get("labels", [])}
        else:
            logger.warning("ignoring %s/labels.json: made for other weights; run `prism label`", folder)
    return PrototypeIndex(
        path=folder,
        meta=meta,
        neighbour_row=arrays["neighbour_row"],
        cosine=arrays["cosine"],
        weight=arrays["weight"],
        active=arrays["active"].astype(bool),
        usage_count=arrays["usage_count"],
        usage_share=arrays["usage_share"],
        promoted_token_ids=arrays["promoted_token_ids"],
        promoted_logits=arrays["promoted_logits"],
        positions=positions,
        snippets=_read_jsonl(folder / "positions.jsonl"),
        documents=_read_jsonl(folder / "documents.jsonl"),
        labels=labels,
    )


class _RunningNeighbourhoods:
    """The best M documents per prototype seen so far (each by its best position), merged
    batch by batch.

    Ranking key: the cosine where the prototype is active, the cosine - 3 elsewhere (cosines
    lie in [-1, 1]), so every active position outranks every inactive one, inactive ones only
    fill spare places, and active ones are ranked by their exact cosine. A document keeps only
    its best position per prototype (see the module docstring for why); ties within a
    document go to its earlier position, so the result does not depend on the batch size.
    Memory is O(P * (M + positions per batch)) whatever the corpus size.
    """

    def __init__(self, num_prototypes: int, top_m: int, top_k: int, dtype: torch.dtype, device: torch.device):
        P, M = num_prototypes, top_m
        self.key = torch.full((P, M), float("-inf"), dtype=dtype, device=device)
        self.cosine = torch.zeros(P, M, dtype=dtype, device=device)
        self.weight = torch.zeros(P, M, dtype=dtype, device=device)
        self.position = torch.full((P, M), -1, dtype=torch.long, device=device)
        self.document = torch.full((P, M), -2, dtype=torch.long, device=device)  # -2: empty slot
        self.code_ids = torch.zeros(P, M, top_k, dtype=torch.long, device=device)
        self.code_cosine = torch.zeros(P, M, top_k, dtype=dtype, device=device)

    def update(
        self,
        key: torch.Tensor,
        cosine: torch.Tensor,
        weight: torch.Tensor,
        position: torch.Tensor,
        document: torch.Tensor,
        code_ids: torch.Tensor,
        code_cosine: torch.Tensor,
    ) -> None:
        """Merge one batch of N positions.

        Args:
            key, cosine, weight: (N, P) ranking key (-inf: not indexed), cos(K_j, h_t), a_j.
            position: (N,) global positions, increasing.
            document: (N,) training-split row of each position's document.
            code_ids, code_cosine: (N, k) each position's active prototypes and their cosines.
        """
        P, M = self.key.shape
        N, k = code_ids.shape
        # Best position of every (prototype, document of this batch).
        docs, local = torch.unique(document, return_inverse=True)  # (D,), (N,)
        D = len(docs)
        spread = local.unsqueeze(0).expand(P, N)  # (P, N)
        key_t = key.T  # (P, N)
        best = torch.full((P, D), float("-inf"), dtype=key.dtype, device=key.device)
        best = best.scatter_reduce(1, spread, key_t, "amax")  # (P, D)
        is_best = key_t == best.gather(1, spread)  # (P, N)
        rows = torch.arange(N, device=key.device).expand(P, N)
        row = torch.full((P, D), N, dtype=torch.long, device=key.device)
        row = row.scatter_reduce(1, spread, torch.where(is_best, rows, N), "amin").clamp_max(N - 1)  # (P, D)
        # A document already kept from an earlier batch keeps one entry: the better one.
        loc = torch.searchsorted(docs, self.document.clamp_min(-1)).clamp_max(D - 1)  # (P, M)
        present = docs[loc] == self.document  # (P, M)
        running_wins = present & (self.key >= best.gather(1, loc))
        drop = torch.zeros(P, D, dtype=torch.long, device=key.device)
        drop = drop.scatter_reduce(1, loc, running_wins.long(), "amax").bool()  # (P, D)
        best = best.masked_fill(drop, float("-inf"))
        kept_key = self.key.masked_fill(present & ~running_wins, float("-inf"))

        top = torch.cat([kept_key, best], dim=1).topk(M, dim=1)  # (P, M) over M kept + D new
        from_batch = top.indices >= M  # (P, M)
        new = row.gather(1, (top.indices - M).clamp(0, D - 1))  # (P, M) row of the batch
        old = top.indices.clamp_max(M - 1)  # (P, M) slot kept from before
        self.key = top.values
        self.cosine = torch.where(from_batch, cosine.T.gather(1, new), self.cosine.gather(1, old))
        self.weight = torch.where(from_batch, weight.T.gather(1, new), self.weight.gather(1, old))
        self.position = torch.where(from_batch, position[new], self.position.gather(1, old))
        self.document = torch.where(from_batch, document[new], self.document.gather(1, old))
        old_k = old.unsqueeze(-1).expand(-1, -1, k)  # (P, M, k)
        from_batch_k = from_batch.unsqueeze(-1)
        self.code_ids = torch.where(from_batch_k, code_ids[new], self.code_ids.gather(1, old_k))
        self.code_cosine = torch.where(from_batch_k, code_cosine[new], self.code_cosine.gather(1, old_k))


    def sort(self) -> None:
        """Order each neighbourhood by key, ties by position, so the order is reproducible."""
        order = torch.from_numpy(np.lexsort((self.position.cpu().numpy(), -self.key.cpu().numpy()), axis=-1))
        order = order.to(self.key.device)  # (P, M)
        for name in ("key", "cosine", "weight", "position", "document"):
            setattr(self, name, getattr(self, name).gather(1, order))
        order_k = order.unsqueeze(-1).expand_as(self.code_ids)
        self.code_ids = self.code_ids.gather(1, order_k)
        self.code_cosine = self.code_cosine.gather(1, order_k)


@contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets.enable_progress_bars()


def promoted_tokens(bundle: Bundle, count: int = PROMOTED_TOKENS, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The tokens each prototype promotes most: the top ``count`` entries of E W_j.

    Returns:
        (P, count) token ids (int32) and their logits (float32).
    """
    model = bundle.model
    E = model.unembedding  # (V, d)
    values = model.prototypes.values  # (P, d)
    count = min(count, E.shape[0])
    ids, logits = [], []
    with torch.no_grad():
        for start in range(0, values.shape[0], chunk):
            top = (values[start : start + chunk] @ E.T).topk(count, dim=-1)  # (chunk, count)
            ids.append(top.indices.to(torch.int32).cpu().numpy())
            logits.append(top.values.float().cpu().numpy())
    return np.concatenate(ids), np.concatenate(logits)


def build_index(
    bundle_dir: str | Path,
    corpus_path: str | Path,
    *,
    top_m: int = 32,
    batch_size: int = 16,
    max_tokens: int | None = None,
    device: str = "cpu",
    show_progress: bool = True,
    dtype: Literal["float32", "float64"] = "float32",
) -> dict:
    """Build ``bundle_dir/index/`` with one streamed, batched pass over the training split.

    Args:
        bundle_dir: a PRISM bundle.
        corpus_path: the corpus the model was trained on (split and packed as in training).
        top_m: neighbours kept per prototype (M).
        batch_size: sequences per forward pass; the result does not depend on it.
        max_tokens: index only the first sequences holding this many tokens (rounded up to
            whole sequences); None for the whole training split.
        device: where the model runs (cpu, cuda).
        show_progress: show progress bars.
        dtype: precision of the pass and of the stored cosines and weights; float64 is for
            tests that compare builds exactly.

    Returns:
        a summary: counts, fingerprints, ``build_seconds`` and ``index_bytes`` / ``index_mb``.

    Raises:
        PrototypeIndexError: bad arguments, a dense bundle, or a corpus shorter than one sequence.
        CorpusError, BundleError: the corpus or the bundle cannot be read.
    """
    for name, value in (("top_m", top_m), ("batch_size", batch_size), ("max_tokens", max_tokens or 1)):
        if value < 1:
            raise PrototypeIndexError(f"{name} must be >= 1, got {value}")
    if dtype not in ("float32", "float64"):
        raise PrototypeIndexError(f"dtype must be float32 or float64, got {dtype!r}")
    t0 = time.time()
    corpus = load_corpus(corpus_path)  # before anything is written: a bad path leaves no trace
    bundle = load_bundle(bundle_dir, device=device)
    if not bundle.is_prism:
        raise PrototypeIndexError(f"{bundle_dir} is a dense twin: only PRISM models have prototypes to index")
    if bundle.training.get("corpus_fingerprint") not in (None, corpus.fingerprint):
        logger.warning("corpus %s differs from the one the model was trained on", corpus_path)
    model = bundle.model.to(torch.float64 if dtype == "float64" else torch.float32)
    P, k = model.config.num_prototypes, model.config.prototype_top_k
    seq_len = model.config.get_text_config().max_position_embeddings
    with _datasets_progress(show_progress):
        packed = pack(corpus.train, bundle.tokenizer, seq_len)
    n_sequences = len(packed) if max_tokens is None else min(len(packed), -(-max_tokens // seq_len))
    if n_sequences == 0:
        raise PrototypeIndexError(f"corpus {corpus_path} is shorter than one sequence of {seq_len} tokens")
    running, usage, n_positions = _scan(model, packed, n_sequences, top_m, batch_size, device, show_progress)

    running.sort()
    filled = (torch.isfinite(running.key) & (running.position >= 0)).cpu().numpy()  # (P, M)
    unique_pos, first, inverse = np.unique(running.position.cpu().numpy()[filled], return_index=True,
                                           return_inverse=True)
    neighbour_row = np.full(filled.shape, -1, dtype=np.int32)
    neighbour_row[filled] = inverse
    np_dtype = np.float64 if dtype == "float64" else np.float32
    positions, documents, snippets = _describe_positions(unique_pos, packed, corpus.train, seq_len)
    positions["code_ids"] = running.code_ids.cpu().numpy()[filled][first].astype(np.int32)  # (R, k)
    positions["code_cosine"] = running.code_cosine.cpu().numpy()[filled][first].astype(np_dtype)  # (R, k)
    promoted_ids, promoted_logits = promoted_tokens(bundle)
    arrays = {
        "neighbour_row": neighbour_row,
        "cosine": np.where(filled, running.cosine.cpu().numpy(), 0).astype(np_dtype),
        "weight": np.where(filled, running.weight.cpu().numpy(), 0).astype(np_dtype),
        "active": (filled & (running.key.cpu().numpy() >= -1.5)).astype(np.uint8),
        "usage_count": usage,
        "usage_share": usage / max(1, n_positions * k),
        "promoted_token_ids": promoted_ids,
        "promoted_logits": promoted_logits,
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_fingerprint": bundle.fingerprint,
        "corpus_fingerprint": corpus.fingerprint,
        "corpus_path": str(corpus_path),
        "arguments": {"top_m": top_m, "batch_size": batch_size, "max_tokens": max_tokens, "dtype": dtype},
        "neighbourhood": "top-M positions by cos(K_j, h_t) where j is active, one per document; "
        "spare places filled by inactive ones",
        "snippet_chars": {"before": SNIPPET_BEFORE, "after": SNIPPET_AFTER},
        "num_prototypes": P,
        "prototype_top_k": k,
        "seq_len": seq_len,
        "sequences": n_sequences,
        "positions": n_positions,
        "neighbour_positions": len(unique_pos),
        "documents": len(documents),
        "dead_prototypes": int((usage == 0).sum()),
    }
    folder = _write_atomically(Path(bundle_dir), meta, arrays, positions, snippets, documents, t0)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    summary = {key: meta[key] for key in ("num_prototypes", "sequences", "positions", "neighbour_positions",
                                          "documents", "dead_prototypes", "model_fingerprint",
                                          "corpus_fingerprint", "build_seconds")}
    return {"path": str(folder), "top_m": top_m, **summary, "index_bytes": size, "index_mb": round(size / 2**20, 3)}


@torch.no_grad()
def _scan(
    model, packed, n_sequences: int, top_m: int, batch_size: int, device: str, show_progress: bool
) -> tuple[_RunningNeighbourhoods, np.ndarray, int]:
    """The pass: (neighbourhoods, (P,) usage counts, number of indexed positions)."""
    from tqdm.auto import tqdm

    head = model.prototypes
    P, k = model.config.num_prototypes, model.config.prototype_top_k
    dev = torch.device(device)
    running = _RunningNeighbourhoods(P, top_m, k, head.keys.dtype, dev)
    usage = torch.zeros(P, dtype=torch.long, device=dev)
    n_positions = 0
    columns = packed.with_format("numpy", columns=["input_ids", "doc_index"])
    for start in tqdm(range(0, n_sequences, batch_size), desc="indexing", unit="batch", disable=not show_progress):
        rows = columns[start : min(n_sequences, start + batch_size)]
        ids = torch.as_tensor(rows["input_ids"], dtype=torch.long, device=dev)  # (B, T)
        docs = torch.as_tensor(rows["doc_index"], dtype=torch.long, device=dev)  # (B, T)
        B, T = ids.shape
        hidden = model.model(input_ids=ids).last_hidden_state.reshape(B * T, -1)  # (N, d)
        act = head(hidden)
        cosine = head.cosine(hidden, act.scores)  # (N, P)
        valid = docs >= 0
        valid[:, -1] = False  # the last position has no target inside its sequence
        valid = valid.reshape(-1)  # (N,)
        active = torch.zeros_like(cosine, dtype=torch.bool).scatter_(1, act.ids, True) & valid[:, None]  # (N, P)
        key = torch.where(active, cosine, cosine - 3.0).masked_fill(~valid[:, None], float("-inf"))  # (N, P)
        weight = torch.where(active, prototype_weights(act.scores), 0.0)  # (N, P)
        position = torch.arange(start * T, start * T + B * T, device=dev)  # (N,) global position
        running.update(key, cosine, weight, position, docs.reshape(-1), act.ids, cosine.gather(1, act.ids))
        usage += torch.bincount(act.ids[valid].flatten(), minlength=P)
        n_positions += int(valid.sum())
    return running, usage.cpu().numpy().astype(np.int64), n_positions


def _describe_positions(
    unique_pos: np.ndarray, packed, train, seq_len: int
) -> tuple[dict[str, np.ndarray], list[dict], list[dict]]:
    """Look up the neighbour positions: token ids, documents and snippets.

    Args:
        unique_pos: (R,) sorted global positions (sequence * seq_len + offset).

    Returns:
        (positions arrays, documents, snippets), rows aligned with ``unique_pos``.
    """
    sequence = (unique_pos // seq_len).astype(np.int64)
    offset = (unique_pos % seq_len).astype(np.int64)
    seqs, seq_row = np.unique(sequence, return_inverse=True)
    rows = packed.with_format("numpy")[seqs.tolist()] if len(seqs) else {}
    ids = rows.get("input_ids", np.zeros((0, seq_len), np.int32))  # (S, T)
    doc_idx = rows.get("doc_index", np.zeros((0, seq_len), np.int32))
    char_off = rows.get("char_offset", np.zeros((0, seq_len), np.int32))
    doc_index = doc_idx[seq_row, offset].astype(np.int32)  # (R,)
    next_doc = doc_idx[seq_row, offset + 1]  # offset < T - 1 for every indexed position
    start = char_off[seq_row, offset].astype(np.int32)
    next_start = char_off[seq_row, offset + 1]
    docs, document = np.unique(doc_index, return_inverse=True)

    by_document = np.argsort(document, kind="stable")  # position rows grouped by document
    bounds = np.searchsorted(document[by_document], np.arange(len(docs) + 1))
    documents: list[dict] = []
    snippets: list[dict] = [{}] * len(unique_pos)
    chunk = 1000  # documents read at a time, so that memory stays bounded on large corpora
    for first in range(0, len(docs), chunk):
        part = docs[first : first + chunk]
        table = train.select(part.tolist())
        for i, (row, doc_id, source, text) in enumerate(
            zip(part, table["id"], table["source"], table["text"], strict=True)
        ):
            documents.append({"doc_index": int(row), "id": doc_id, "source": source, "chars": len(text)})
            for r in by_document[bounds[first + i] : bounds[first + i + 1]]:
                begin = int(start[r])
                end = int(next_start[r]) if next_doc[r] == row else len(text)
                end = max(begin, end)
                lo, hi = max(0, begin - SNIPPET_BEFORE), min(len(text), end + SNIPPET_AFTER)
                snippets[r] = {"snippet": text[lo:hi], "start": begin - lo, "end": end - lo}
    positions = {
        "document": document.astype(np.int32),
        "doc_index": doc_index,
        "char_offset": start,
        "token_id": ids[seq_row, offset].astype(np.int32),
        "next_token_id": ids[seq_row, offset + 1].astype(np.int32),
        "sequence": sequence,
        "offset": offset.astype(np.int32),
    }
    return positions, documents, snippets


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_atomically(
    bundle_dir: Path,
    meta: dict,
    arrays: dict[str, np.ndarray],
    positions: dict[str, np.ndarray],
    snippets: list[dict],
    documents: list[dict],
    t0: float,
) -> Path:
    """Write the index into a temporary folder, then swap it in for ``bundle_dir/index``."""
    final = index_dir(bundle_dir)
    staging = Path(tempfile.mkdtemp(prefix=".index-", dir=bundle_dir))
    old: Path | None = None
    try:
        save_file(arrays, staging / "neighbourhoods.safetensors", metadata={"format_version": str(FORMAT_VERSION)})
        save_file(positions, staging / "positions.safetensors", metadata={"format_version": str(FORMAT_VERSION)})
        _write_jsonl(staging / "positions.jsonl", snippets)
        _write_jsonl(staging / "documents.jsonl", documents)
        meta = {**meta, "files": {f.name: f.stat().st_size for f in sorted(staging.iterdir())}}
        meta["build_seconds"] = round(time.time() - t0, 3)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".index-old-", dir=bundle_dir))
            os.replace(final, old / INDEX_DIR)
        os.replace(staging, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old / INDEX_DIR, final)  # put the previous index back
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
