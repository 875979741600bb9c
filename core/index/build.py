"""Building the prototype index: one streamed pass over the training split that gives every
prototype its neighbourhood of training positions, its usage and the tokens it promotes.

EOS separators (no document to point back to) and the last position of each sequence (no
target inside it) are not indexed.

Neighbourhood of prototype j: the top-M positions by cos(K_j, h_t) among the positions where
j was active (one of the k prototypes of h_t), at most one per document (its best). Adjacent
tokens of a long document are near-duplicates: without that rule a few long documents fill
most neighbourhoods, and document rankings favour long documents (on the planted-canary
corpus of tests/attribution/test_engine.py the canaries then fell out of the top 3). A prototype active in fewer than M
documents fills its remaining places with the nearest positions where it was not active;
those carry ``active = 0`` and ``weight = 0``, so a user can tell them apart.

The index (layout: :mod:`core.index.format`) is written to a temporary folder inside the
bundle and renamed into place, so an interrupted or failed build never leaves a partial
``index/``.

Under ``torchrun`` every rank scans a contiguous shard of the training sequences; the ranks'
neighbourhoods are gathered and merged on rank 0 (:func:`_gather_neighbourhoods`: exactly the
single pass's, up to the order of equal keys), which alone describes the positions and writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core import distributed
from core.bundle import Bundle, load_bundle
from core.data.corpus import datasets_progress, load_corpus, pack
from core.errors import ArgumentError, PrototypeIndexError
from core.index.format import (
    FORMAT_VERSION,
    INDEX_DIR,
    META_FILE,
    PROMOTED_TOKENS,
    SNIPPET_AFTER,
    SNIPPET_BEFORE,
    check_training_corpus,
    index_dir,
    snippet_window,
)
from core.model.head import prototype_weights
from core.options import check_fields, option
from core.store import read_json, write_json, write_jsonl, write_safetensors

logger = logging.getLogger(__name__)


@dataclass
class IndexArguments:
    """How the index is built (``top_m``, ``batch_size``, ``max_tokens`` and ``dtype`` are stored
    in its ``meta.json``)."""

    top_m: int = option(32, "neighbours kept per prototype", minimum=1)
    batch_size: int = option(16, "sequences per forward pass; the index does not depend on it", minimum=1)
    max_tokens: int | None = option(
        None,
        "index only the first N training tokens (rounded up to whole sequences); default: the whole training split",
        minimum=1,
    )
    device: str = option("cpu", "where the model runs (cpu, cuda)")
    dtype: Literal["float32", "float64"] = option(
        "float32",
        "precision of the pass and of the stored cosines and weights; float64 is for tests that compare builds exactly",
        cli=False,
    )

    def __post_init__(self) -> None:
        check_fields(self, ArgumentError)


def promoted_tokens(bundle: Bundle, count: int = PROMOTED_TOKENS, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The tokens each prototype promotes most: the top ``count`` entries of E W_j.

    Returns:
        (P, count) token ids (int32) and their logits (float32).
    """
    model = bundle.model
    values = model.prototypes.values  # (P, d), float32 even in a bfloat16 model
    E = model.unembedding.to(values.dtype)  # (V, d)
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
    model_dtype: str = "float32",
) -> dict | None:
    """Build ``bundle_dir/index/`` with one streamed, batched pass over the training split.

    Under ``torchrun`` (several ranks) every rank runs this with the same arguments: each scans
    its shard of the sequences, and rank 0 merges and writes (the others wait for it).

    Args:
        bundle_dir: a PRISM bundle.
        corpus_path: the corpus the model was trained on (split and packed as in training).
        top_m, batch_size, max_tokens, device, dtype: see :class:`IndexArguments`.
        model_dtype: the backbone's dtype for the pass (``--dtype``: float32, bfloat16, float16 or
            auto); the prototype head, the cosines and the stored arrays stay ``dtype``.
        show_progress: show progress bars.

    Returns:
        a summary: counts, fingerprints, ``build_seconds`` and ``index_bytes`` / ``index_mb``
        (None on ranks other than 0).

    Raises:
        ArgumentError: bad arguments.
        PrototypeIndexError: a dense bundle, a corpus that is not the one the model was trained on
            (when training.json records it), or a corpus shorter than one sequence.
        CorpusError, BundleError: the corpus or the bundle cannot be read.
    """
    IndexArguments(top_m=top_m, batch_size=batch_size, max_tokens=max_tokens, device=device, dtype=dtype)
    t0 = time.time()
    distributed.start(cpu=device == "cpu")
    device = distributed.rank_device(device)
    show_progress = show_progress and distributed.is_main()
    with datasets_progress(show_progress), distributed.main_process_first():  # rank 0 fills the datasets cache
        corpus = load_corpus(corpus_path)  # before anything is written: a bad path leaves no trace
    bundle = load_bundle(bundle_dir, device=device, dtype="float32" if dtype == "float64" else model_dtype)
    if not bundle.is_prism:
        raise PrototypeIndexError(f"{bundle_dir} is a dense twin: only PRISM models have prototypes to index")
    check_training_corpus(bundle_dir, bundle.training, corpus.fingerprint, f"corpus {corpus_path}")
    model = bundle.model.to(torch.float64) if dtype == "float64" else bundle.model
    P, k = model.config.num_prototypes, model.config.prototype_top_k
    seq_len = model.config.sequence_length  # the training sequences (not the backbone's context)
    with datasets_progress(show_progress), distributed.main_process_first():
        packed = pack(corpus.train, bundle.tokenizer, seq_len)
    n_sequences = len(packed) if max_tokens is None else min(len(packed), -(-max_tokens // seq_len))
    if n_sequences == 0:
        raise PrototypeIndexError(f"corpus {corpus_path} is shorter than one sequence of {seq_len} tokens")
    shard = distributed.shard_range(n_sequences)  # every sequence when alone
    running, usage, n_positions = _scan(model, packed, shard, top_m, batch_size, device, show_progress)
    running = _gather_neighbourhoods(running)
    usage = distributed.all_reduce_sum(usage)
    n_positions = int(distributed.all_reduce_sum(torch.tensor([n_positions], device=usage.device)).item())
    usage = usage.cpu().numpy().astype(np.int64)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 writes the index, which the influence build then reads
        return None

    running.sort()
    filled = (torch.isfinite(running.key) & (running.position >= 0)).cpu().numpy()  # (P, M)
    unique_pos, first, inverse = np.unique(
        running.position.cpu().numpy()[filled], return_index=True, return_inverse=True
    )
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
        "ranks": distributed.world_size(),
    }
    folder = _write_staged(Path(bundle_dir), meta, arrays, positions, snippets, documents, t0)
    distributed.barrier()
    meta = read_json(folder / META_FILE, "the index metadata", error=PrototypeIndexError)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    summary = {
        key: meta[key]
        for key in (
            "num_prototypes",
            "sequences",
            "positions",
            "neighbour_positions",
            "documents",
            "dead_prototypes",
            "model_fingerprint",
            "corpus_fingerprint",
            "build_seconds",
        )
    }
    return {"path": str(folder), "top_m": top_m, **summary, "index_bytes": size, "index_mb": round(size / 2**20, 3)}


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


FIELDS = ("key", "cosine", "weight", "position", "document", "code_ids", "code_cosine")  # (P, M, ...) each


def _gather_neighbourhoods(running: _RunningNeighbourhoods) -> _RunningNeighbourhoods:
    """Every rank's neighbourhoods merged into the single pass's (the rank's own when alone).

    Exact: a document's best position is its best in the shard that holds that position, and
    a document among the top M of the whole split is among the top M of that shard (whatever
    outranks it there outranks it everywhere). So the top M of all ranks' candidates, one per
    document, are the single pass's; a document on two shards keeps its better entry (the
    earlier position on a tie, as within a pass). Equal keys of different documents at the
    M-th place are the only choice that may differ (the pass breaks such ties arbitrarily).
    Every rank receives all ranks' (P, M) tables: world size x P x M x (2k + 5) numbers.
    """
    if not distributed.is_distributed():
        return running
    W = distributed.world_size()
    P, M = running.key.shape
    parts = {}
    for name in FIELDS:
        table = distributed.all_gather_rows(getattr(running, name))  # (W P, M, ...) in rank order
        table = table.reshape(W, P, M, *table.shape[2:]).movedim(0, 1)  # (P, W, M, ...)
        parts[name] = table.reshape(P, W * M, *table.shape[3:]).cpu().numpy()  # (P, W M, ...)
    key, position, document = parts["key"], parts["position"], parts["document"]
    # One entry per (prototype, document): its best key, then its earliest position.
    order = np.lexsort((position, -key, document), axis=-1)  # (P, W M)
    doc_sorted = np.take_along_axis(document, order, axis=-1)
    repeat = np.zeros_like(doc_sorted, dtype=bool)
    repeat[:, 1:] = doc_sorted[:, 1:] == doc_sorted[:, :-1]
    duplicate = np.zeros_like(repeat)
    np.put_along_axis(duplicate, order, repeat, axis=-1)
    key = np.where(duplicate, -np.inf, key)
    top = np.lexsort((position, -key), axis=-1)[:, :M]  # (P, M): best keys, earlier positions first
    merged = _RunningNeighbourhoods(P, M, running.code_ids.shape[-1], running.key.dtype, running.key.device)
    for name in FIELDS:
        values = key if name == "key" else parts[name]
        index = top.reshape(P, M, *([1] * (values.ndim - 2)))
        chosen = np.take_along_axis(values, index, axis=1)  # (P, M, ...)
        setattr(merged, name, torch.from_numpy(chosen).to(running.key.device))
    return merged


@torch.no_grad()
def _scan(
    model, packed, shard: range, top_m: int, batch_size: int, device: str, show_progress: bool
) -> tuple[_RunningNeighbourhoods, torch.Tensor, int]:
    """The pass over the sequences of ``shard``: (neighbourhoods, (P,) usage counts, number of
    indexed positions), of the shard alone."""
    from tqdm.auto import tqdm

    head = model.prototypes
    P, k = model.config.num_prototypes, model.config.prototype_top_k
    dev = torch.device(device)
    running = _RunningNeighbourhoods(P, top_m, k, head.keys.dtype, dev)
    usage = torch.zeros(P, dtype=torch.long, device=dev)
    n_positions = 0
    columns = packed.with_format("numpy", columns=["input_ids", "doc_index"])
    batches = range(shard.start, shard.stop, batch_size)
    for start in tqdm(batches, desc="indexing", unit="batch", disable=not show_progress):
        rows = columns[start : min(shard.stop, start + batch_size)]
        ids = torch.as_tensor(rows["input_ids"], dtype=torch.long, device=dev)  # (B, T)
        docs = torch.as_tensor(rows["doc_index"], dtype=torch.long, device=dev)  # (B, T)
        B, T = ids.shape
        hidden = model.model(input_ids=ids).last_hidden_state.reshape(B * T, -1)  # (N, d)
        hidden = hidden.to(head.keys.dtype)  # a bfloat16 backbone's states, read by the float32 head
        act = head(hidden)
        cosine = head.cosine(hidden, act.scores)  # (N, P)
        valid = docs >= 0
        valid[:, -1] = False  # the last position has no target inside its sequence
        valid = valid.reshape(-1)  # (N,)
        active = torch.zeros_like(cosine, dtype=torch.bool).scatter_(1, act.ids, True) & valid[:, None]  # (N, P)
        key = torch.where(active, cosine, cosine - 3.0).masked_fill(~valid[:, None], float("-inf"))  # (N, P)
        weight = torch.where(active, prototype_weights(act.scores, head.weight_power), 0.0)  # (N, P)
        position = torch.arange(start * T, start * T + B * T, device=dev)  # (N,) global position
        running.update(key, cosine, weight, position, docs.reshape(-1), act.ids, cosine.gather(1, act.ids))
        usage += torch.bincount(act.ids[valid].flatten(), minlength=P)
        n_positions += int(valid.sum())
    return running, usage, n_positions


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
                snippet, lo, hi = snippet_window(text, begin, end)
                snippets[r] = {"snippet": snippet, "start": lo, "end": hi}
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


def _write_staged(
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
        header = {"format_version": str(FORMAT_VERSION)}
        write_safetensors(staging / "neighbourhoods.safetensors", arrays, metadata=header)
        write_safetensors(staging / "positions.safetensors", positions, metadata=header)
        write_jsonl(staging / "positions.jsonl", snippets)
        write_jsonl(staging / "documents.jsonl", documents)
        meta = {**meta, "files": {f.name: f.stat().st_size for f in sorted(staging.iterdir())}}
        meta["build_seconds"] = round(time.time() - t0, 3)
        write_json(staging / META_FILE, meta, indent=2)
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
