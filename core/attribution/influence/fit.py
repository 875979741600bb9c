"""Building the influence factors: the curvature blocks fitted and inverted into whitening
factors, then one pass over the training split that sums each document's projected gradients
(notation: :mod:`core.attribution.influence`), written to ``BUNDLE/index/influence.safetensors``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from core.attribution.influence.arguments import InfluenceArguments
from core.attribution.influence.math import (
    active_set,
    groups_by_prototype,
    head_probabilities,
    invert_blocks,
    project,
    prototype_gradients,
    sampled_targets,
)
from core.attribution.influence.query import FORMAT_VERSION, INFLUENCE_FILE
from core.bundle import load_bundle
from core.data.corpus import load_corpus, pack
from core.errors import InfluenceError
from core.index.format import META_FILE, index_dir, register_index_file
from core.store import read_json, rebuild_hint, write_safetensors


def _batches(packed, sequences: np.ndarray, batch_size: int, device: torch.device, desc: str, progress: bool):
    """Yield (sequence numbers (B,), input ids (B, T), doc_index (B, T), char_offset (B, T))."""
    from tqdm.auto import tqdm

    columns = packed.with_format("numpy", columns=["input_ids", "doc_index", "char_offset"])
    for start in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch", disable=not progress):
        chosen = sequences[start : start + batch_size]
        rows = columns[chosen.tolist()]
        yield (
            torch.as_tensor(chosen, dtype=torch.long),
            torch.as_tensor(rows["input_ids"], dtype=torch.long, device=device),
            torch.as_tensor(rows["doc_index"], dtype=torch.long, device=device),
            torch.as_tensor(rows["char_offset"], dtype=torch.long, device=device),
        )


@torch.no_grad()
def _forward(model, ids: torch.Tensor, docs: torch.Tensor):
    """Hidden states, active sets, probabilities and the mask of attributable positions."""
    B, T = ids.shape
    head, E = model.prototypes, model.unembedding
    hidden = model.model(input_ids=ids).last_hidden_state.reshape(B * T, -1)  # (N, d)
    active, weights = active_set(hidden, head.keys, model.config.prototype_top_k)  # (N, k)
    probs = head_probabilities(active, weights, head.values, E)  # (N, V)
    valid = docs >= 0
    valid[:, -1] = False  # the last position has no target inside its sequence
    return hidden, active, weights, probs, valid.reshape(-1)


@torch.no_grad()
def _fit_whitening(
    model,
    packed,
    sequences: np.ndarray,
    n_sequences: int,
    rank: int,
    args: InfluenceArguments,
    device: torch.device,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Fisher blocks, accumulated and inverted chunk by chunk.

    As many blocks as fit in ``args.curvature_memory_mb`` are accumulated in one pass over the
    curvature sample, scaled to the whole split, inverted (:func:`.math.invert_blocks`) and
    dropped, so the build holds one chunk of (2d x 2d) blocks at a time, never all P of them. Unused
    prototypes (no sampled position) are inverted last: their damping is the mean over the
    used blocks.

    Returns:
        ((P, 2d, r) whitening V, float64; (P, r) eigenvalues; (P,) damping; (P,) sampled
        positions per block; positions sampled).
    """
    head, E = model.prototypes, model.unembedding
    P, d = head.keys.shape
    D = 2 * d
    dtype = head.keys.dtype
    per_block = D**2 * torch.finfo(dtype).bits // 8
    chunk = max(1, min(P, args.curvature_memory_mb * 2**20 // per_block))
    whitening = torch.zeros(P, D, rank, dtype=torch.float64)
    spectrum = torch.zeros(P, rank, dtype=torch.float64)
    lam = torch.zeros(P, dtype=torch.float64)
    mean_eig = torch.zeros(P, dtype=torch.float64)
    counts = torch.zeros(P, dtype=torch.long)
    n_positions = 0
    start = torch.randn(D, min(D, rank + 8), generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    for lo in range(0, P, chunk):
        hi = min(P, lo + chunk)
        acc = torch.zeros(hi - lo, D, D, dtype=dtype, device=device)
        desc = "influence: curvature" + (f" {lo}-{hi - 1}" if chunk < P else "")
        for seqs, ids, docs, _ in _batches(packed, sequences, args.batch_size, device, desc, progress):
            B, T = ids.shape
            hidden, active, weights, probs, valid = _forward(model, ids, docs)
            labels = sampled_targets(probs.view(B, T, -1), seqs, args.seed).reshape(-1)
            grads = prototype_gradients(
                hidden[valid], active[valid], weights[valid], probs[valid], labels[valid], head.keys, head.values, E
            )  # (n, k, 2d)
            flat_ids = active[valid].reshape(-1)
            flat = grads.reshape(-1, D)  # (n k, 2d)
            inside = (flat_ids >= lo) & (flat_ids < hi)
            flat_in = flat[inside]
            for j, rows in groups_by_prototype(flat_ids[inside]):
                g = flat_in[rows]  # (n_j, 2d)
                acc[j - lo] += g.T @ g
            if lo == 0:
                counts += torch.bincount(flat_ids.cpu(), minlength=P)
                n_positions += int(valid.sum())
        # The sample's sums, scaled by (all sequences / sampled sequences) to estimate the whole
        # split's (in place).
        acc = acc.cpu()
        acc *= n_sequences / len(sequences)
        mean_eig[lo:hi] = torch.diagonal(acc, dim1=1, dim2=2).double().sum(-1) / D  # trace / 2d
        used = torch.nonzero(mean_eig[lo:hi] > 0).flatten()
        lam[lo + used] = args.damping * mean_eig[lo + used]
        for part in used.split(64):
            whitening[lo + part], spectrum[lo + part] = invert_blocks(acc[part].double(), lam[lo + part], rank, start)
        del acc
    unused = torch.nonzero(mean_eig <= 0).flatten()
    if len(unused):
        fallback = float(mean_eig[mean_eig > 0].mean()) if len(unused) < P else 1.0
        lam[unused] = args.damping * fallback
        for part in unused.split(64):
            zeros = torch.zeros(len(part), D, D, dtype=torch.float64)
            whitening[part], spectrum[part] = invert_blocks(zeros, lam[part], rank, start)
    return whitening, spectrum, lam, counts, n_positions


class _DocumentTable:
    """Per (prototype, document): the summed coefficient vector c_jD, its best token and
    self-influence; documents still open at the end of a batch are carried to the next one,
    finished ones are merged into the top M per prototype."""

    def __init__(self, top_documents: int | None):
        self.top = top_documents
        self.open: dict[str, torch.Tensor] | None = None
        self.done: list[dict[str, torch.Tensor]] = []
        self.kept: dict[str, torch.Tensor] | None = None
        self.pending_rows = 0

    @staticmethod
    def _aggregate(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum rows with the same (prototype, document); keep the best token (ties: earliest)."""
        key = rows["proto"] * (2**31) + rows["doc"]
        unique, inverse = torch.unique(key, return_inverse=True)
        U = len(unique)
        coef = torch.zeros(U, rows["coef"].shape[1], dtype=rows["coef"].dtype).index_add_(0, inverse, rows["coef"])
        best = torch.full((U,), float("-inf"), dtype=rows["score"].dtype).scatter_reduce(
            0, inverse, rows["score"], "amax"
        )
        is_best = rows["score"] == best[inverse]
        big = torch.iinfo(torch.long).max
        first = torch.full((U,), big, dtype=torch.long).scatter_reduce(
            0, inverse, torch.where(is_best, rows["position"], big), "amin"
        )
        is_first = rows["position"] == first[inverse]  # one row per group: positions are distinct in a group
        pick = torch.zeros(U, dtype=torch.long).scatter_(0, inverse[is_first], torch.nonzero(is_first).flatten())
        return {
            "proto": unique // (2**31),
            "doc": unique % (2**31),
            "coef": coef,
            "score": best,
            "position": first,
            "start": rows["start"][pick],
            "end": rows["end"][pick],
        }

    def add(self, rows: dict[str, torch.Tensor], last_doc: int | None) -> None:
        """Add a batch's token rows; documents other than ``last_doc`` are finished."""
        if self.open is not None:
            rows = {name: torch.cat([self.open[name], rows[name]]) for name in rows}
        if len(rows["proto"]) == 0:
            self.open = None
            return
        table = self._aggregate(rows)
        still_open = table["doc"] == last_doc if last_doc is not None else torch.zeros_like(table["doc"], dtype=bool)
        self.open = {name: value[still_open] for name, value in table.items()}
        finished = {name: value[~still_open] for name, value in table.items()}
        finished["key"] = (finished["coef"] ** 2).sum(-1)  # self-influence ||V_j^T g_jD||^2
        self.done.append(finished)
        self.pending_rows += len(finished["proto"])
        if self.top is not None and self.pending_rows > 200_000:
            self._merge()

    def _merge(self) -> None:
        parts = ([self.kept] if self.kept is not None else []) + self.done
        if not parts:
            return
        table = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        # prototype, then self-influence (descending), then document: a reproducible order
        order = torch.from_numpy(
            np.lexsort((table["doc"].numpy(), -table["key"].double().numpy(), table["proto"].numpy()))
        )
        table = {name: value[order] for name, value in table.items()}
        if self.top is not None:
            starts = torch.searchsorted(table["proto"], table["proto"], right=False)
            rank = torch.arange(len(order)) - starts
            table = {name: value[rank < self.top] for name, value in table.items()}
        self.kept, self.done, self.pending_rows = table, [], 0

    def finish(self) -> dict[str, torch.Tensor] | None:
        """The kept rows sorted by prototype, then self-influence; None if there are none."""
        assert self.open is None or len(self.open["proto"]) == 0, "documents left open after the last batch"
        self._merge()
        return self.kept


@torch.no_grad()
def _documents(
    model,
    packed,
    sequences: np.ndarray,
    whitening: torch.Tensor,
    args: InfluenceArguments,
    device: torch.device,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """The pass over the training split: per prototype its documents' coefficients c_jD."""
    head, E = model.prototypes, model.unembedding
    dtype = head.keys.dtype
    T = len(packed[0]["input_ids"])
    whitening = whitening.to(device=device, dtype=dtype)
    table = _DocumentTable(args.top_documents)
    for seqs, ids, docs, chars in _batches(
        packed, sequences, args.batch_size, device, "influence: documents", progress
    ):
        B = ids.shape[0]
        hidden, active, weights, probs, valid = _forward(model, ids, docs)
        targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).reshape(-1)  # next token (last one unused)
        grads = prototype_gradients(
            hidden[valid], active[valid], weights[valid], probs[valid], targets[valid], head.keys, head.values, E
        )  # (n, k, 2d)
        k = active.shape[1]
        flat_ids = active[valid].reshape(-1)  # (n k,)
        coef = project(grads, active[valid], whitening).reshape(len(flat_ids), -1)  # (n k, r) V_j^T g
        score = (coef**2).sum(-1)  # each token's self-influence through each of its prototypes
        position = (seqs.to(device).unsqueeze(1) * T + torch.arange(T, device=device)).reshape(-1)[valid]
        doc = docs.reshape(-1)[valid]
        start = chars.reshape(-1)[valid]
        next_doc = torch.cat([docs[:, 1:], docs[:, :1]], dim=1).reshape(-1)[valid]
        next_char = torch.cat([chars[:, 1:], chars[:, :1]], dim=1).reshape(-1)[valid]
        end = torch.where(next_doc == doc, next_char, torch.full_like(next_char, -1))  # -1: to the text's end
        rows = {
            "proto": flat_ids.cpu(),
            "doc": doc.repeat_interleave(k).cpu(),
            "coef": coef.cpu(),
            "score": score.cpu(),
            "position": position.repeat_interleave(k).cpu(),
            "start": start.repeat_interleave(k).cpu(),
            "end": end.repeat_interleave(k).cpu(),
        }
        # The last sequence's last document may continue in the next sequence.
        tail = docs[-1][docs[-1] >= 0]
        last_doc = int(tail[-1]) if len(tail) and B else None
        table.add(rows, last_doc)
    table.add({name: value[:0] for name, value in rows.items()}, None)  # close the last document
    return table.finish()


def _spread(n_sequences: int, tokens: int | None, seq_len: int) -> np.ndarray:
    """Sequence numbers holding about ``tokens`` tokens, evenly spread (all for None)."""
    if tokens is None or tokens >= n_sequences * seq_len:
        return np.arange(n_sequences)
    wanted = -(-tokens // seq_len)
    return np.unique(np.linspace(0, n_sequences - 1, wanted).round().astype(np.int64))


def build_influence(
    bundle_dir: str | Path,
    corpus_path: str | Path,
    args: InfluenceArguments | None = None,
    *,
    device: str = "cpu",
    show_progress: bool = True,
) -> dict:
    """Fit the prototype-block factors and write ``BUNDLE/index/influence.safetensors``.

    Needs the bundle's index (:func:`core.index.build.build_index`) built from the same corpus.

    Returns:
        a summary: counts, sizes (``influence_bytes`` / ``influence_mb``) and
        ``curvature_seconds``, ``documents_seconds``, ``build_seconds``.

    Raises:
        InfluenceError: no index, an index built from another corpus, a dense bundle, or a
            corpus shorter than one sequence.
        ArgumentError: a bad argument (raised by :class:`InfluenceArguments`).
        CorpusError, BundleError: the corpus or the bundle cannot be read.
    """
    args = args or InfluenceArguments()
    t0 = time.time()
    corpus = load_corpus(corpus_path)
    folder = index_dir(bundle_dir)
    hint = rebuild_hint(bundle_dir, str(corpus_path))
    if not (folder / META_FILE).is_file():
        raise InfluenceError(f"{bundle_dir} has no index; build it with {hint}")
    index_meta = read_json(folder / META_FILE, "the index metadata", f"rebuild it with {hint}", InfluenceError)
    if index_meta.get("corpus_fingerprint") != corpus.fingerprint:
        raise InfluenceError(
            f"the index in {folder} was built from another corpus ({index_meta.get('corpus_path')}), not "
            f"{corpus_path}; rebuild both with {hint}"
        )
    bundle = load_bundle(bundle_dir, device=device)
    if not bundle.is_prism:
        raise InfluenceError(f"{bundle_dir} is a dense twin: only PRISM models have prototype blocks")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model = bundle.model.to(dtype)
    P, d = model.prototypes.keys.shape
    rank = min(args.rank or 2 * d, 2 * d)
    seq_len = model.config.get_text_config().max_position_embeddings
    packed = pack(corpus.train, bundle.tokenizer, seq_len)
    n_sequences = len(packed) if args.max_tokens is None else min(len(packed), -(-args.max_tokens // seq_len))
    if n_sequences == 0:
        raise InfluenceError(f"corpus {corpus_path} is shorter than one sequence of {seq_len} tokens")
    sample = _spread(n_sequences, args.curvature_tokens, seq_len)
    document_sample = _spread(n_sequences, args.document_tokens, seq_len)
    dev = torch.device(device)

    whitening, values, lam, counts, sampled = _fit_whitening(
        model, packed, sample, n_sequences, rank, args, dev, show_progress
    )
    t_curv = time.time() - t0
    t1 = time.time()
    table = _documents(model, packed, document_sample, whitening, args, dev, show_progress)
    t_docs = time.time() - t1

    arrays = _to_arrays(table, whitening, values, lam, counts, P, rank, args.storage)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "prototype-block influence",
        "model_fingerprint": bundle.fingerprint,
        "corpus_fingerprint": corpus.fingerprint,
        "corpus_path": str(corpus_path),
        "corpus_path_from_bundle": os.path.relpath(Path(corpus_path).resolve(), Path(bundle_dir).resolve()),
        "arguments": asdict(args),
        "rank": rank,
        "num_prototypes": P,
        "parameters_per_block": 2 * d,
        "sequences": n_sequences,
        "curvature_sequences": len(sample),
        "curvature_positions": sampled,
        "document_sequences": len(document_sample),
        "documents": int(len(np.unique(arrays["doc_index"]))),
        "entries": int(len(arrays["doc_index"])),
        "curvature_seconds": round(t_curv, 3),
        "documents_seconds": round(t_docs, 3),
    }
    meta["build_seconds"] = round(time.time() - t0, 3)
    size = save_influence(bundle_dir, arrays, meta)
    return {
        **{
            k: meta[k]
            for k in (
                "rank",
                "num_prototypes",
                "sequences",
                "curvature_positions",
                "documents",
                "entries",
                "curvature_seconds",
                "documents_seconds",
                "build_seconds",
            )
        },
        "top_documents": args.top_documents,
        "influence_bytes": size,
        "influence_mb": round(size / 2**20, 3),
    }


def _to_arrays(
    table: dict[str, torch.Tensor] | None,
    whitening: torch.Tensor,
    values: torch.Tensor,
    lam: torch.Tensor,
    counts: torch.Tensor,
    P: int,
    rank: int,
    storage: str,
) -> dict[str, np.ndarray]:
    """The kept (prototype, document) entries, sorted by prototype, and the per-prototype
    factors, as numpy arrays."""
    np_store = {"float16": np.float16, "float32": np.float32, "float64": np.float64}[storage]
    if table is None:
        table = {name: torch.zeros(0, dtype=torch.long) for name in ("proto", "doc", "start", "end")}
        table.update(coef=torch.zeros(0, rank, dtype=torch.float64), key=torch.zeros(0))
    proto = table["proto"].numpy()  # sorted by prototype, then self-influence
    offsets = np.zeros(P + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(proto, minlength=P))
    coefficients = table["coef"].double().numpy().reshape(len(proto), rank)
    # float16 keeps 3 significant digits but not the range: scale each prototype's rows to [-1, 1]
    scale = np.zeros(P)
    np.maximum.at(scale, proto, np.abs(coefficients).max(axis=1) if len(proto) else np.zeros(0))
    scale = np.where(scale > 0, scale, 1.0)
    w = whitening.numpy()
    w_scale = np.abs(w).reshape(P, -1).max(axis=1)
    w_scale = np.where(w_scale > 0, w_scale, 1.0)
    return {
        "whitening": (w / w_scale[:, None, None]).astype(np_store),  # (P, 2d, r) V_j / scale
        "whitening_scale": w_scale,  # (P,)
        "eigenvalues": values.numpy(),  # (P, r), zeros at full rank
        "damping": lam.numpy(),  # (P,)
        "curvature_count": counts.numpy().astype(np.int64),  # (P,)
        "offsets": offsets,  # (P + 1,) prototype j's entries are offsets[j]:offsets[j + 1]
        "doc_index": table["doc"].numpy().astype(np.int32),  # (N,) training-split row of each entry
        "char_start": table["start"].numpy().astype(np.int32),  # (N,) the document's best token for j
        "char_end": table["end"].numpy().astype(np.int32),  # (N,), -1: to the end of the text
        "coefficients": (coefficients / scale[proto][:, None]).astype(np_store),  # (N, r)
        "coefficient_scale": scale,  # (P,)
        "self_influence": table["key"].float().numpy(),  # (N,)
    }


def save_influence(bundle_dir: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> int:
    """Write the factors atomically into the bundle's index folder and list them in its
    ``meta.json``; return the file size."""
    folder = index_dir(bundle_dir)
    write_safetensors(
        folder / INFLUENCE_FILE,
        {k: np.ascontiguousarray(v) for k, v in arrays.items()},
        metadata={"meta": json.dumps(meta)},
    )
    summary = {k: meta[k] for k in ("arguments", "rank", "build_seconds", "documents", "entries")}
    register_index_file(folder, INFLUENCE_FILE, influence=summary)
    return (folder / INFLUENCE_FILE).stat().st_size
