"""Building the influence factors: the curvature blocks fitted and eigendecomposed into the
complement-preserving inverse, then one forward pass over the training split that writes every
position into the store (:mod:`.store`) and sums each document's self-influence (notation:
:mod:`core.attribution.influence`), written to ``BUNDLE/index/influence.safetensors``.

Under ``torchrun`` both passes are shared out: each rank takes a contiguous shard of the
sampled sequences. The curvature sums are added up over ranks before the eigendecomposition
(which every rank then runs on the same sums). For the store, rank 0 lays the file out (its
size is known from the packed corpus) and every rank writes its own rows, a contiguous range,
straight into it through memory maps: nothing is gathered but the sums of each shard's first
and last documents, which may straddle a shard boundary and are completed on rank 0.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from core import distributed
from core.attribution.influence.arguments import InfluenceArguments
from core.attribution.influence.loading import save_self_influence
from core.attribution.influence.math import (
    active_set,
    complement_weights,
    eigen_blocks,
    gradient_parts,
    groups_by_prototype,
    head_probabilities,
    inverse_weights,
    prototype_gradients,
    sampled_targets,
)
from core.attribution.influence.query import FORMAT_VERSION, INFLUENCE_FILE
from core.attribution.influence.sketch import GradientSketch
from core.attribution.influence.store import (
    SelfInfluenceSums,
    StoreWriter,
    block_specs,
    position_bytes,
    store_specs,
)
from core.bundle import load_bundle
from core.data.corpus import load_corpus, pack
from core.errors import InfluenceError
from core.index.format import META_FILE, index_dir, register_index_file
from core.store import read_json, rebuild_hint
from core.tensorfile import TensorFileWriter, map_tensors


def _batches(packed, sequences: np.ndarray, batch_size: int, device: torch.device, desc: str, progress: bool):
    """Yield (sequence numbers (B,), input ids (B, T), doc_index (B, T))."""
    from tqdm.auto import tqdm

    columns = packed.with_format("numpy", columns=["input_ids", "doc_index"])
    for start in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch", disable=not progress):
        chosen = sequences[start : start + batch_size]
        rows = columns[chosen.tolist()]
        yield (
            torch.as_tensor(chosen, dtype=torch.long),
            torch.as_tensor(rows["input_ids"], dtype=torch.long, device=device),
            torch.as_tensor(rows["doc_index"], dtype=torch.long, device=device),
        )


@torch.no_grad()
def _forward(model, ids: torch.Tensor, docs: torch.Tensor):
    """Hidden states, active sets, probabilities and the mask of attributable positions."""
    B, T = ids.shape
    head, E = model.prototypes, model.unembedding
    hidden = model.model(input_ids=ids).last_hidden_state.reshape(B * T, -1)  # (N, d)
    active, weights = active_set(hidden, head.keys, model.config.prototype_top_k, head.weight_power)  # (N, k)
    probs = head_probabilities(active, weights, head.values, E)  # (N, V)
    return hidden, active, weights, probs, _attributable(docs).reshape(-1)


def _attributable(docs):
    """(B, T) positions a document is credited with: its own tokens whose target (the next
    token) lies inside the sequence. Not covered: each document's first token (predicted at
    the separator before it) and the last position of every sequence (its target is not
    trained on in that sequence)."""
    valid = docs >= 0
    valid[:, -1] = False
    return valid


@torch.no_grad()
def _fit_curvature(
    model,
    packed,
    sequences: np.ndarray,
    n_sequences: int,
    rank: int,
    args: InfluenceArguments,
    device: torch.device,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Fisher blocks, accumulated and eigendecomposed chunk by chunk.

    As many blocks as fit in ``args.curvature_memory_mb`` are accumulated in one pass over the
    curvature sample, scaled to the whole split, eigendecomposed (:func:`.math.eigen_blocks`)
    and dropped, so the build holds one chunk of (2d x 2d) blocks at a time, never all P of
    them. Unused prototypes (no sampled position) keep U = 0 (A_j = I / lambda_j) with the
    damping of the mean used block (and trace 0). Under several ranks each rank passes over its shard of
    ``sequences`` and the blocks are summed over ranks before they are decomposed.

    Returns:
        ((P, 2d, r) eigenvectors U, float64; (P, r) eigenvalues; (P,) damping; (P,) traces
        tr G_j; (P,) sampled positions per block; positions sampled).
    """
    head, E = model.prototypes, model.unembedding
    P, d = head.keys.shape
    D = 2 * d
    dtype = head.keys.dtype
    per_block = D**2 * torch.finfo(dtype).bits // 8
    chunk = max(1, min(P, args.curvature_memory_mb * 2**20 // per_block))
    vectors = torch.zeros(P, D, rank, dtype=torch.float64)
    spectrum = torch.zeros(P, rank, dtype=torch.float64)
    lam = torch.zeros(P, dtype=torch.float64)
    mean_eig = torch.zeros(P, dtype=torch.float64)
    counts = torch.zeros(P, dtype=torch.long)
    n_positions = 0
    start = torch.randn(D, min(D, rank + 8), generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    mine = distributed.shard_range(len(sequences))
    shard = sequences[mine.start : mine.stop]  # (S_r,) this rank's sequences
    for lo in range(0, P, chunk):
        hi = min(P, lo + chunk)
        acc = torch.zeros(hi - lo, D, D, dtype=dtype, device=device)
        desc = "influence: curvature" + (f" {lo}-{hi - 1}" if chunk < P else "")
        for seqs, ids, docs in _batches(packed, shard, args.batch_size, device, desc, progress):
            B, T = ids.shape
            hidden, active, weights, probs, valid = _forward(model, ids, docs)
            labels = sampled_targets(probs.view(B, T, -1), seqs, args.seed).reshape(-1)
            grads = prototype_gradients(
                hidden[valid],
                active[valid],
                weights[valid],
                probs[valid],
                labels[valid],
                head.keys,
                head.values,
                E,
                power=head.weight_power,
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
        # The sample's sums (over every rank's shard), scaled by (all sequences / sampled
        # sequences) to estimate the whole split's (in place).
        acc = distributed.all_reduce_sum(acc).cpu()
        acc *= n_sequences / len(sequences)
        mean_eig[lo:hi] = torch.diagonal(acc, dim1=1, dim2=2).double().sum(-1) / D  # trace / 2d
        used = torch.nonzero(mean_eig[lo:hi] > 0).flatten()
        lam[lo + used] = args.damping * mean_eig[lo + used]
        for part in used.split(64):
            vectors[lo + part], spectrum[lo + part] = eigen_blocks(acc[part].double(), rank, start)
        del acc
    counts = distributed.all_reduce_sum(counts.to(device)).cpu()
    n_positions = int(distributed.all_reduce_sum(torch.tensor([n_positions], device=device)).item())
    unused = mean_eig <= 0
    if bool(unused.any()):
        lam[unused] = args.damping * (float(mean_eig[~unused].mean()) if not bool(unused.all()) else 1.0)
    return vectors, spectrum, lam, mean_eig * D, counts, n_positions


def _layout(packed, sequences: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Where each stored position and document lies, from the packed columns alone.

    Returns:
        ``documents`` (D,), ``document_offsets`` (D + 1,), ``char_start`` and ``char_end`` (N,)
        (-1: to the text's end) of the attributable positions, in stream order; and the (S,)
        number of positions each sequence holds (where a shard's rows start).
    """
    columns = packed.with_format("numpy", columns=["doc_index", "char_offset"])[sequences.tolist()]
    docs = np.asarray(columns["doc_index"]).reshape(len(sequences), -1)  # (S, T)
    chars = np.asarray(columns["char_offset"]).reshape(len(sequences), -1)
    valid = _attributable(docs)
    next_doc, next_char = np.roll(docs, -1, axis=1), np.roll(chars, -1, axis=1)  # the last column is never valid
    end = np.where(next_doc == docs, next_char, -1)
    doc = docs[valid]  # (N,) row-major: stream order
    assert (np.diff(doc) >= 0).all(), "packed documents are not in training-split order"
    documents, counts = np.unique(doc, return_counts=True)
    layout = {
        "documents": documents.astype(np.int32),
        "document_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "char_start": chars[valid].astype(np.int32),
        "char_end": end[valid].astype(np.int32),
    }
    return layout, valid.sum(axis=1)


@torch.no_grad()
def _positions(
    model,
    packed,
    sequences: np.ndarray,
    layout: dict[str, np.ndarray],
    rows: range,
    inverse: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sketch: GradientSketch,
    arrays: dict[str, np.ndarray],
    args: InfluenceArguments,
    device: torch.device,
    progress: bool,
) -> tuple[torch.Tensor, ...]:
    """The pass over (a shard of) the training split: the positions of ``sequences``, the store's
    ``rows``, written into ``arrays`` (memory maps of the file being written: nothing is held in
    memory but a batch, the (D,) self-influence and the shard's (documents, m) sketches), and
    the self-influence (length-normalised) and gradient sketch of every document inside them.

    The first and last documents of ``rows`` may go on in a neighbouring shard, so their parts
    are returned instead (:func:`_finish_ends` adds them up): ((c,) keys document * P +
    prototype and (c, 2d) block sums g_jD; (e,) those documents and (e, m) their sketches).
    """
    head, E = model.prototypes, model.unembedding
    counts = np.diff(layout["document_offsets"])
    owner = np.repeat(np.arange(len(counts)), counts)  # (N,) store document of each position
    ends = np.unique(owner[[rows.start, rows.stop - 1]]) if len(rows) else np.zeros(0, dtype=np.int64)
    first, span = (int(ends[0]), int(ends[-1] - ends[0]) + 1) if len(ends) else (0, 0)  # documents of the shard
    owner = torch.from_numpy(owner)
    writer = StoreWriter(arrays, args.storage, cursor=rows.start)
    U, w, kappa = (x.to(device=device, dtype=head.keys.dtype) for x in inverse)
    blocks = (arrays["document_blocks"], arrays["document_blocks_scale"]) if "document_blocks" in arrays else None
    sketch = sketch.to(device, head.keys.dtype)
    self_influence = SelfInfluenceSums(
        U,
        w,
        kappa,
        len(counts),
        blocks=blocks,
        storage=args.storage,
        held=ends.tolist(),
        sketch=(sketch, arrays["document_sketch"]),  # adds each finished document's low-rank part
    )
    sketches = torch.zeros(span, sketch.width, dtype=torch.float64, device=device)  # (documents, m)
    for _, ids, docs in _batches(packed, sequences, args.batch_size, device, "influence: positions", progress):
        hidden, active, weights, probs, valid = _forward(model, ids, docs)
        targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).reshape(-1)[valid]  # next token
        h, ids_v, a = hidden[valid], active[valid], weights[valid]  # (n, d), (n, k), (n, k)
        r, c = gradient_parts(h, ids_v, probs[valid], targets, head.keys, head.values, E, power=head.weight_power)
        document = owner[writer.cursor : writer.cursor + len(h)].to(device)
        writer.add(h, r, ids_v, c, a)
        self_influence.add(document, h, r, ids_v, c, a)
        sketches.index_add_(0, document - first, sketch.positions(h, r, ids_v, c, a).double())
    assert writer.cursor == rows.stop, "the pass met another number of positions than the layout"
    totals = self_influence.finish().numpy()
    inner = slice(first + 1, max(first + 1, first + span - 1))  # the documents wholly inside the shard
    arrays["self_influence"][inner] = totals[inner] / np.maximum(counts[inner], 1)
    arrays["document_sketch"][inner] += sketches[1 : max(1, span - 1)].cpu().numpy()  # the isotropic part
    ends_t = torch.from_numpy(ends).to(device)
    return (*self_influence.held_sums(), ends_t, sketches[ends_t - first])


def _finish_ends(
    ends: tuple[torch.Tensor, ...],
    inverse: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    counts: np.ndarray,
    arrays: dict[str, np.ndarray] | None,
    storage: str,
    sketch: GradientSketch,
) -> None:
    """The shards' first and last documents, completed on rank 0 (alone: the pass's own two):
    every rank's parts of their block sums and sketches gathered and added up, then reduced
    and written as the pass does for the others.

    Args:
        ends: :func:`_positions`' return value.
        counts: (D,) positions per document.
        arrays: the file's arrays (rank 0), None on the other ranks.
    """
    keys, sums, documents, sketches = (distributed.all_gather_rows(t) for t in ends)
    if arrays is None:
        return
    U, w, kappa = (x.to(device=sums.device, dtype=sums.dtype) for x in inverse)
    blocks = (arrays["document_blocks"], arrays["document_blocks_scale"]) if "document_blocks" in arrays else None
    pairs, where = torch.unique(keys, return_inverse=True)
    sums = sums.new_zeros(len(pairs), sums.shape[1]).index_add_(0, where, sums)  # (c, 2d) complete g_jD
    sketch = sketch.to(sums.device, sums.dtype)
    self_influence = SelfInfluenceSums(
        U, w, kappa, len(counts), blocks=blocks, storage=storage, sketch=(sketch, arrays["document_sketch"])
    )
    self_influence.add_sums(pairs, sums)
    totals = self_influence.finish().numpy()
    documents, where = torch.unique(documents, return_inverse=True)
    sketches = sketches.new_zeros(len(documents), sketches.shape[1]).index_add_(0, where, sketches)
    rows = documents.cpu().numpy()
    arrays["self_influence"][rows] = totals[rows] / np.maximum(counts[rows], 1)
    arrays["document_sketch"][rows] += sketches.cpu().numpy()  # the isotropic part


def _shared_arrays(out: TensorFileWriter | None) -> dict[str, np.ndarray]:
    """The arrays of the file rank 0 is writing (``out`` there, None on the other ranks), on
    every rank: the other ranks map rank 0's temporary file (which must be on a filesystem they
    see) to write their own rows into it."""
    name = distributed.broadcast_object(str(out.tmp) if out is not None else None)
    if out is not None:
        return out.arrays
    fix = "the ranks must share the bundle's folder: run them on one machine or on a shared filesystem"
    arrays, _ = map_tensors(name, "the influence file being written", fix, InfluenceError, writable=True)
    return arrays


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
) -> dict | None:
    """Fit the prototype-block factors, store every training position and write
    ``BUNDLE/index/influence.safetensors``.

    Needs the bundle's index (:func:`core.index.build.build_index`) built from the same corpus.
    Memory: the store (about :func:`.store.position_bytes` per position) is written through
    memory maps of the file; the passes themselves hold a batch and the curvature blocks.

    Under ``torchrun`` every rank runs this with the same arguments and shares both passes (see
    the module docstring); the ranks must see the same bundle folder (one machine, or a shared
    filesystem), since each writes its rows of the store into the file rank 0 lays out.

    Returns:
        a summary: counts, sizes (``influence_bytes`` / ``influence_mb``, ``position_bytes``)
        and ``curvature_seconds``, ``documents_seconds``, ``build_seconds`` (None on ranks
        other than 0).

    Raises:
        InfluenceError: no index, an index built from another corpus, a dense bundle, or a
            corpus shorter than one sequence.
        ArgumentError: a bad argument (raised by :class:`InfluenceArguments`).
        CorpusError, BundleError: the corpus or the bundle cannot be read.
    """
    args = args or InfluenceArguments()
    t0 = time.time()
    distributed.start(cpu=device == "cpu")
    device = distributed.rank_device(device)
    main = distributed.is_main()
    show_progress = show_progress and main
    with distributed.main_process_first():  # rank 0 fills the datasets cache the others read
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
    k = model.config.prototype_top_k
    rank = min(args.rank or 2 * d, 2 * d)
    seq_len = model.config.sequence_length  # the training sequences (not the backbone's context)
    with distributed.main_process_first():
        packed = pack(corpus.train, bundle.tokenizer, seq_len)
    n_sequences = len(packed) if args.max_tokens is None else min(len(packed), -(-args.max_tokens // seq_len))
    if n_sequences == 0:
        raise InfluenceError(f"corpus {corpus_path} is shorter than one sequence of {seq_len} tokens")
    sample = _spread(n_sequences, args.curvature_tokens, seq_len)
    document_sample = _spread(n_sequences, args.document_tokens, seq_len)
    dev = torch.device(device)

    vectors, values, lam, trace, counts, sampled = _fit_curvature(
        model, packed, sample, n_sequences, rank, args, dev, show_progress
    )
    complement = complement_weights(trace, values, lam, 2 * d)  # (P,)
    weights = inverse_weights(values, lam, complement)  # (P, r)
    t_curv = time.time() - t0
    t1 = time.time()
    layout, per_sequence = _layout(packed, document_sample)
    n_positions, n_documents = len(layout["char_start"]), len(layout["documents"])
    positions = args.store == "positions"
    if not positions:  # a sketch-only store keeps no per-position arrays
        layout = {key: layout[key] for key in ("documents", "document_offsets")}
    factor = np.float64 if args.storage == "float64" else np.float32
    arrays = {
        "eigenvectors": vectors.numpy().astype(factor),  # (P, 2d, r) U
        "eigenvalues": values.numpy(),  # (P, r) sigma
        "inverse_weights": weights.numpy(),  # (P, r) w = 1/(sigma + lambda) - kappa
        "damping": lam.numpy(),  # (P,) lambda
        "complement": complement.numpy(),  # (P,) kappa = 1 / (mean dropped eigenvalue + lambda)
        "curvature_count": counts.numpy().astype(np.int64),  # (P,)
        **layout,
    }
    sketch = GradientSketch.draw(P, d, args.sketch_width, args.seed, torch.float64)
    arrays["sketch_projection"] = sketch.projection.numpy().astype(np.float32)  # (m, 2d) R
    arrays["sketch_signs"] = sketch.signs.numpy().astype(np.int8)  # (P, m) rho
    specs = {name: (a.shape, a.dtype) for name, a in arrays.items()}
    if positions:
        specs.update(store_specs(n_positions, d, k, P, args.storage))
    specs["self_influence"] = ((n_documents,), np.dtype(np.float64))  # sum_j g_jD^T A_j g_jD / positions
    # (D, m) phi(A^{1/2} g_D), zero-filled: the isotropic and low-rank parts are added in
    specs["document_sketch"] = ((n_documents, args.sketch_width), np.dtype(np.float32))
    # The per-document block sums g_jD score a query with one product over the query's blocks
    # (no pass over the positions); kept when they take no more room than the position store.
    blocks = block_specs(n_documents, P, d, args.storage)
    blocks_bytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in blocks.values())
    with_blocks = positions and blocks_bytes <= n_positions * position_bytes(d, k, args.storage, P)
    if with_blocks:
        specs.update(blocks)
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
        "documents": int(n_documents),
        "positions": n_positions,
        "entries": n_positions,
        "storage": args.storage,
        "store": args.store,
        "position_bytes": position_bytes(d, k, args.storage, P) if positions else 0,
        "sketch_width": args.sketch_width,
        "document_blocks": with_blocks,
        "ranks": distributed.world_size(),
    }
    path = folder / INFLUENCE_FILE
    shard = distributed.shard_range(len(document_sample))  # every sequence when alone
    rows = range(int(per_sequence[: shard.start].sum()), int(per_sequence[: shard.stop].sum()))  # its store rows
    inverse = (vectors, weights, complement)
    out = TensorFileWriter(path, specs, {"meta": json.dumps(meta)}) if main else None
    try:
        if out is not None:
            for name, array in arrays.items():
                out[name][...] = array
        store = _shared_arrays(out)
        # the sketch of A^{1/2} g (module core.attribution.influence.sketch), R as stored
        sketch = GradientSketch(torch.from_numpy(arrays["sketch_projection"]), sketch.signs).whitened(*inverse)
        ends = _positions(
            model,
            packed,
            document_sample[shard.start : shard.stop],
            layout,
            rows,
            inverse,
            sketch,
            store,
            args,
            dev,
            show_progress,
        )
        if out is None:
            for array in store.values():
                if isinstance(array, np.memmap):
                    array.flush()
            store = None
        # waits for every rank
        _finish_ends(ends, inverse, np.diff(layout["document_offsets"]), store, args.storage, sketch)
        if out is None:
            return None
        meta["curvature_seconds"] = round(t_curv, 3)
        meta["documents_seconds"] = round(time.time() - t1, 3)
        meta["build_seconds"] = round(time.time() - t0, 3)
        out.close({"meta": json.dumps(meta)})
    except BaseException:
        if out is not None:
            out.abort()
        raise
    size = path.stat().st_size
    summary = {k: meta[k] for k in ("arguments", "rank", "build_seconds", "documents", "positions", "storage", "store")}
    register_index_file(folder, INFLUENCE_FILE, influence=summary)
    save_self_influence(bundle_dir)  # outliers need only this part (a bundle may ship it alone)
    keys = ("rank", "num_prototypes", "sequences", "curvature_positions", "documents", "positions", "entries")
    keys += ("storage", "store", "position_bytes", "curvature_seconds", "documents_seconds", "build_seconds")
    return {**{key: meta[key] for key in keys}, "influence_bytes": size, "influence_mb": round(size / 2**20, 3)}
