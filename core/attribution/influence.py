"""Prototype-block influence: influence functions restricted to the prototype parameters.

Notation (see core/model.py). Prototype j owns theta_j = (K_j, W_j), 2d numbers. A position
with final hidden state h has scores s_j = h . K_j, active set S = top k of s, weights
a_j = g_j softplus(s_j) (g: controller gains), z = sum_{j in S} a_j W_j, logits = E z and
p = softmax(logits). Its loss L = -log p_y has, for j in S,

    dL/dW_j = a_j r,    dL/dK_j = g_j sigmoid(s_j) (W_j . r) h,    r = E^T (p - e_y)   (d,)

and zero for every other prototype (the top-k choice is piecewise constant). A token's
gradient therefore touches only its k active blocks, and all k are built from the same two
d-vectors h and r.

Curvature. The Gauss-Newton matrix of the training loss, G = sum_t J_t^T H_t J_t with
H_t = diag(p_t) - p_t p_t^T, only has entries in blocks (i, j) with i, j both active at t. We
keep its diagonal blocks G_j (2d x 2d): EK-FAC restricts the curvature to layers, we restrict
it to prototypes. Each block is estimated as the Fisher, which equals the Gauss-Newton matrix
in expectation: with a label y' drawn from p_t, E[g' g'^T] = J_t^T H_t J_t, so
G_j ~ (N / n) sum over n sampled positions t with j in S_t of g'_tj g'_tj^T (N: positions in
the training split). Labels come from a generator seeded by (seed, sequence), so the factors
do not depend on the batch size.

Inversion, once at index time: a whitening factor V_j (2d x r) per block with
V_j V_j^T ~ (G_j + lambda_j I)^-1, damping lambda_j = damping * mean eigenvalue of G_j (the
mean over all blocks for an unused prototype). At full rank (r = 2d) V_j = L_j^-T from the
Cholesky factor of G_j + lambda_j I, and the inverse is exact. With r < 2d (the memory bound:
2d x r numbers per prototype) V_j = U_j (Sigma_j + lambda_j)^-1/2 from the top r eigenpairs
(found by subspace iteration), the projection onto the dominant curvature directions (the
idea of Arnoldi influence, Schioppa et al. 2022).

Scores. The influence of training document D on a query (the summed loss of the attributed
tokens), + = helpful (upweighting D lowers the query loss), is

    I(q, D) = g_q^T (G_blockdiag + Lambda)^-1 g_D = sum_j (V_j^T g_qj) . c_jD,
    c_jD = V_j^T sum_{t in D, j in S_t} g_tj,

so only blocks active in both the query and D contribute, and a query meets only documents
with a token that shares one of its active prototypes. The index stores, per prototype, the
r-vectors c_jD of its M documents with the largest self-influence |c_jD|^2 (the second memory
bound; M = None keeps all), as one list of entries sorted by prototype (``offsets[j]`` to
``offsets[j + 1]`` are prototype j's), so a prototype used by few documents costs only those.
A query costs one forward pass, k (2d x r) products per token and one (entries x r) product
per active prototype, read in the stored precision.

File: ``BUNDLE/index/influence.safetensors`` (safetensors only), its build arguments and the
model and corpus fingerprints in the header; a mismatch is refused with the command to rebuild.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from core.model.head import gained, mix_values, prototype_weights_grad, route
from core.bundle import load_bundle, model_fingerprint
from core.data.corpus import CorpusError, load_corpus, pack
from core.index.format import SNIPPET_AFTER, SNIPPET_BEFORE, PrototypeIndexError, best_per_group, index_dir
from core.errors import InfluenceError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: (P, M) tables padded with -1; 2: entries sorted by prototype with offsets
INFLUENCE_FILE = "influence.safetensors"


# Entries (kept (prototype, document) pairs) an influence query reads at once: about 64 MB for
# each of its (entries, r) float32 arrays at r = 16. A query whose tokens reach more is worked
# through in runs of tokens, so its memory stays bounded when every document is kept.
CREDIT_CHUNK_ENTRIES = 1 << 20


@dataclass
class InfluenceArguments:
    """How the influence factors are built (stored with them).

    Attributes:
        rank: columns r of each block's whitening factor (r <= 2d); None keeps all 2d (exact).
        damping: lambda_j = damping * mean eigenvalue of block j.
        top_documents: documents kept per prototype (M), by self-influence; None keeps all.
        curvature_tokens: positions sampled (whole sequences, evenly spread) for the Fisher
            blocks; None uses every position.
        document_tokens: positions (whole sequences, evenly spread) whose gradients are summed
            into the documents' coefficients; None uses every position. A cap makes each
            document's coefficient a partial sum and leaves out documents never sampled.
        batch_size: sequences per forward pass; the factors do not depend on it.
        max_tokens: use only the first sequences holding this many tokens; None: all.
        dtype: precision of the passes; float64 is for tests that compare exactly.
        storage: precision of the stored whitening factors and coefficients.
        seed: seeds the sampled Fisher labels.
        curvature_memory_mb: memory for the curvature blocks held at once; more blocks than
            fit are accumulated and inverted in several passes over the curvature sample.
    """

    rank: int | None = 16
    damping: float = 0.1
    top_documents: int | None = 64
    curvature_tokens: int | None = 131_072
    document_tokens: int | None = None
    batch_size: int = 8
    max_tokens: int | None = None
    dtype: Literal["float32", "float64"] = "float32"
    storage: Literal["float16", "float32", "float64"] = "float16"
    seed: int = 0
    curvature_memory_mb: int = 2048

    def __post_init__(self) -> None:
        for name in ("rank", "top_documents", "curvature_tokens", "document_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InfluenceError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("batch_size", "curvature_memory_mb"):
            if getattr(self, name) < 1:
                raise InfluenceError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.damping > 0:
            raise InfluenceError(f"damping must be > 0, got {self.damping}")
        if self.dtype not in ("float32", "float64"):
            raise InfluenceError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.storage not in ("float16", "float32", "float64"):
            raise InfluenceError(f"storage must be float16, float32 or float64, got {self.storage!r}")


# ----------------------------------------------------------------------------- the maths


def active_set(hidden: torch.Tensor, keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) active prototype ids and weights a_j (no gains) of (N, d) hidden states."""
    ids, weights, _ = route(hidden, keys, top_k)  # (N, k)
    return ids, weights


def head_probabilities(ids: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, embedding: torch.Tensor
                       ) -> torch.Tensor:
    """(N, V) p = softmax(E z) with z = sum_j a_j W_j."""
    return (mix_values(ids, weights, values) @ embedding.T).softmax(-1)  # (N, V)


def prototype_gradients(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    probs: torch.Tensor,
    targets: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    embedding: torch.Tensor,
    gains: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradients of -log p(target) with respect to each active prototype's (K_j, W_j).

    Args:
        hidden: (N, d); ids, weights: (N, k) active set and weights (gains applied);
        probs: (N, V) the model's next-token distribution; targets: (N,) token ids;
        keys, values: (P, d); embedding: (V, d); gains: (P,) or None.

    Returns:
        (N, k, 2d): [dL/dK_j, dL/dW_j] for the k active prototypes of each position.
    """
    r = probs @ embedding - embedding[targets]  # (N, d) = E^T (p - e_y)
    scores = (keys[ids] * hidden.unsqueeze(1)).sum(-1)  # (N, k) s_j
    gate = gained(prototype_weights_grad(scores), ids, gains)  # (N, k) da_j/ds_j
    c = gate * (values[ids] @ r.unsqueeze(-1)).squeeze(-1)  # (N, k) dL/ds_j
    return torch.cat([c.unsqueeze(-1) * hidden.unsqueeze(1), weights.unsqueeze(-1) * r.unsqueeze(1)], dim=-1)


def sampled_targets(probs: torch.Tensor, sequences: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels drawn from the model for the Fisher, one generator per packed sequence.

    Args:
        probs: (B, T, V) next-token distributions; sequences: (B,) global sequence numbers.

    Returns:
        (B, T) sampled token ids; the same for a sequence whatever batch it comes in.
    """
    B, T, V = probs.shape
    draws = []
    for s in sequences.tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(s))
        draws.append(torch.rand(T, generator=generator, dtype=torch.float64))
    u = torch.stack(draws).to(probs.device)  # (B, T)
    cdf = probs.double().cumsum(-1)  # (B, T, V)
    cdf = cdf / cdf[..., -1:]
    return torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1).clamp_max(V - 1)


def project(grads: torch.Tensor, ids: torch.Tensor, whitening: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """(N, k, r) V_j^T g_j for (N, k, 2d) gradients of (N, k) active prototypes; the (P, 2d, r)
    factors are gathered ``chunk`` positions at a time to bound memory."""
    out = torch.empty(*ids.shape, whitening.shape[-1], dtype=grads.dtype, device=grads.device)
    for lo in range(0, len(ids), chunk):
        out[lo : lo + chunk] = torch.einsum("nkd,nkdr->nkr", grads[lo : lo + chunk], whitening[ids[lo : lo + chunk]])
    return out


def _groups(ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Rows of a flat (R,) prototype-id vector grouped by prototype: [(j, rows)]."""
    order = torch.argsort(ids, stable=True)
    unique, counts = torch.unique_consecutive(ids[order], return_counts=True)
    return list(zip(unique.tolist(), torch.split(order, counts.tolist()), strict=True))


# ------------------------------------------------------------------------------ the build


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
def _fit_whitening(model, packed, sequences: np.ndarray, n_sequences: int, rank: int, args: InfluenceArguments,
                   device: torch.device, progress: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Fisher blocks, accumulated and inverted chunk by chunk.

    As many blocks as fit in ``args.curvature_memory_mb`` are accumulated in one pass over the
    curvature sample, scaled to the whole split, inverted (:func:`_invert_blocks`) and dropped,
    so the build holds one chunk of (2d x 2d) blocks at a time, never all P of them. Unused
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
            grads = prototype_gradients(hidden[valid], active[valid], weights[valid], probs[valid], labels[valid],
                                        head.keys, head.values, E)  # (n, k, 2d)
            flat_ids = active[valid].reshape(-1)
            flat = grads.reshape(-1, D)  # (n k, 2d)
            inside = (flat_ids >= lo) & (flat_ids < hi)
            flat_in = flat[inside]
            for j, rows in _groups(flat_ids[inside]):
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
            whitening[lo + part], spectrum[lo + part] = _invert_blocks(acc[part].double(), lam[lo + part], rank,
                                                                       start)
        del acc
    unused = torch.nonzero(mean_eig <= 0).flatten()
    if len(unused):
        fallback = float(mean_eig[mean_eig > 0].mean()) if len(unused) < P else 1.0
        lam[unused] = args.damping * fallback
        for part in unused.split(64):
            zeros = torch.zeros(len(part), D, D, dtype=torch.float64)
            whitening[part], spectrum[part] = _invert_blocks(zeros, lam[part], rank, start)
    return whitening, spectrum, lam, counts, n_positions


def _invert_blocks(G: torch.Tensor, lam: torch.Tensor, rank: int, start: torch.Tensor, iterations: int = 6
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitening factors V_j with V_j V_j^T ~ (G_j + lambda_j I)^-1 for a few blocks, float64.

    Full rank (r = 2d): V_j = L_j^-T from the Cholesky factor G_j + lambda_j I = L_j L_j^T, so
    V_j V_j^T is the exact inverse. Low rank: the top r eigenpairs (U_j, Sigma_j) by subspace
    iteration from the seeded ``start`` (batched matrix products; LAPACK's eigh on a thousand
    512 x 512 blocks took minutes on 2 cores) and V_j = U_j (Sigma_j + lambda_j)^-1/2.

    Args:
        G: (c, 2d, 2d) curvature blocks (float64).
        lam: (c,) their damping.
        start: (2d, r + 8) start of the subspace iteration.

    Returns:
        ((c, 2d, r) V, (c, r) eigenvalues, zeros at full rank).
    """
    c, D, _ = G.shape
    eye = torch.eye(D, dtype=torch.float64)
    G = (G + G.transpose(1, 2)) / 2
    if rank >= D:
        L = torch.linalg.cholesky(G + lam[:, None, None] * eye)
        return torch.linalg.solve_triangular(L, eye.expand_as(G), upper=False).transpose(1, 2), torch.zeros(c, rank,
                                                                                                         dtype=G.dtype)
    Q = start.expand(c, -1, -1)
    for _ in range(iterations):
        Q, _r = torch.linalg.qr(G @ Q)  # (c, D, r + 8)
    small = Q.transpose(1, 2) @ G @ Q  # (c, r + 8, r + 8) Rayleigh-Ritz
    eigvals, eigvecs = torch.linalg.eigh((small + small.transpose(1, 2)) / 2)
    values = eigvals.flip(-1)[:, :rank].clamp_min(0)  # (c, r) largest first
    vectors = Q @ eigvecs.flip(-1)[:, :, :rank]  # (c, D, r)
    return vectors / (values + lam[:, None]).sqrt().unsqueeze(1), values


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
            0, inverse, rows["score"], "amax")
        is_best = rows["score"] == best[inverse]
        big = torch.iinfo(torch.long).max
        first = torch.full((U,), big, dtype=torch.long).scatter_reduce(
            0, inverse, torch.where(is_best, rows["position"], big), "amin")
        is_first = rows["position"] == first[inverse]  # one row per group: positions are distinct in a group
        pick = torch.zeros(U, dtype=torch.long).scatter_(0, inverse[is_first], torch.nonzero(is_first).flatten())
        return {"proto": unique // (2**31), "doc": unique % (2**31), "coef": coef, "score": best,
                "position": first, "start": rows["start"][pick], "end": rows["end"][pick]}

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
        order = torch.from_numpy(np.lexsort((table["doc"].numpy(), -table["key"].double().numpy(),
                                             table["proto"].numpy())))
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
def _documents(model, packed, sequences: np.ndarray, whitening: torch.Tensor,
               args: InfluenceArguments, device: torch.device, progress: bool) -> dict[str, torch.Tensor]:
    """The pass over the training split: per prototype its documents' coefficients c_jD."""
    head, E = model.prototypes, model.unembedding
    dtype = head.keys.dtype
    T = len(packed[0]["input_ids"])
    whitening = whitening.to(device=device, dtype=dtype)
    table = _DocumentTable(args.top_documents)
    for seqs, ids, docs, chars in _batches(packed, sequences, args.batch_size, device, "influence: documents",
                                           progress):
        B = ids.shape[0]
        hidden, active, weights, probs, valid = _forward(model, ids, docs)
        targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).reshape(-1)  # next token (last one unused)
        grads = prototype_gradients(hidden[valid], active[valid], weights[valid], probs[valid], targets[valid],
                                    head.keys, head.values, E)  # (n, k, 2d)
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


def _corpus_hint(bundle_dir: str | Path, corpus: str = "PATH") -> str:
    return f"`prism index --model {bundle_dir} --corpus {corpus}`"


def build_influence(
    bundle_dir: str | Path,
    corpus_path: str | Path,
    args: InfluenceArguments | None = None,
    *,
    device: str = "cpu",
    show_progress: bool = True,
) -> dict:
    """Fit the prototype-block factors and write ``BUNDLE/index/influence.safetensors``.

    Needs the bundle's index (:func:`core.index.build_index`) built from the same corpus.

    Returns:
        a summary: counts, sizes (``influence_bytes`` / ``influence_mb``) and
        ``curvature_seconds``, ``documents_seconds``, ``build_seconds``.

    Raises:
        InfluenceError: no index, an index built from another corpus, a dense bundle, a
            corpus shorter than one sequence, or a bad argument.
        CorpusError, BundleError: the corpus or the bundle cannot be read.
    """
    args = args or InfluenceArguments()
    t0 = time.time()
    corpus = load_corpus(corpus_path)
    folder = index_dir(bundle_dir)
    if not (folder / "meta.json").is_file():
        raise InfluenceError(f"{bundle_dir} has no index; build it with {_corpus_hint(bundle_dir, str(corpus_path))}")
    index_meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    if index_meta.get("corpus_fingerprint") != corpus.fingerprint:
        raise InfluenceError(
            f"the index in {folder} was built from another corpus ({index_meta.get('corpus_path')}), not "
            f"{corpus_path}; rebuild both with {_corpus_hint(bundle_dir, str(corpus_path))}"
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

    whitening, values, lam, counts, sampled = _fit_whitening(model, packed, sample, n_sequences, rank, args, dev,
                                                             show_progress)
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
    return {**{k: meta[k] for k in ("rank", "num_prototypes", "sequences", "curvature_positions", "documents",
                                    "entries", "curvature_seconds", "documents_seconds", "build_seconds")},
            "top_documents": args.top_documents, "influence_bytes": size, "influence_mb": round(size / 2**20, 3)}


def _to_arrays(table: dict[str, torch.Tensor] | None, whitening: torch.Tensor, values: torch.Tensor,
               lam: torch.Tensor, counts: torch.Tensor, P: int, rank: int, storage: str) -> dict[str, np.ndarray]:
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
    """Write the factors atomically into the bundle's index folder; return the file size."""
    folder = index_dir(bundle_dir)
    fd, tmp = tempfile.mkstemp(prefix=".influence-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp,
                  metadata={"meta": json.dumps(meta)})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the bundle's other files are world-readable
        os.replace(tmp, folder / INFLUENCE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    size = (folder / INFLUENCE_FILE).stat().st_size
    meta_path = folder / "meta.json"  # list the new file beside the index's own
    index_meta = json.loads(meta_path.read_text(encoding="utf-8"))
    index_meta.setdefault("files", {})[INFLUENCE_FILE] = size
    index_meta["influence"] = {k: meta[k] for k in ("arguments", "rank", "build_seconds", "documents", "entries")}
    fd, tmp = tempfile.mkstemp(prefix=".meta-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(index_meta, indent=2))
    os.chmod(tmp, 0o644)
    os.replace(tmp, meta_path)
    return size


def influence_exists(bundle_dir: str | Path) -> bool:
    return (index_dir(bundle_dir) / INFLUENCE_FILE).is_file()


# ---------------------------------------------------------------------------- the queries


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
        self.whitening = torch.from_numpy(arrays["whitening"]).to(dtype) * torch.from_numpy(
            arrays["whitening_scale"]).to(dtype)[:, None, None]  # (P, 2d, r)
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
    def credit(self, model, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor,
               gains: torch.Tensor | None = None, probs: torch.Tensor | None = None) -> list[InfluenceCredit]:
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
        return [credit for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
                for credit in self._credit_run(flat[lo * k : hi * k], scaled[lo * k : hi * k], k)]

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
            InfluenceCredit(self.doc_index[entries[lo:hi]].astype(np.int64), flat[owner[lo:hi]].astype(np.int64),
                            values[lo:hi], self.char_start[entries[lo:hi]], self.char_end[entries[lo:hi]])
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    @staticmethod
    def rank(credit: InfluenceCredit, top: int) -> list[RankedDocument]:
        """Sum credit per document; the ``top`` documents, highest first (ties: lower row)."""
        if len(credit.values) == 0:
            return []
        # Sums by document row with bincount (no sort of the entries: a query's active
        # prototypes can bring hundreds of thousands of them); only the candidates sort.
        size = int(credit.doc_index.max()) + 1
        by_doc = np.bincount(credit.doc_index, weights=credit.values, minlength=size)
        docs = np.flatnonzero(np.bincount(credit.doc_index, minlength=size))  # credited documents, ascending
        totals = by_doc[docs]
        if len(docs) > top:  # keep the top scores and every tie with the last of them
            cut = np.partition(-totals, top - 1)[top - 1]
            docs, totals = docs[-totals <= cut], totals[-totals <= cut]
        order = np.lexsort((docs, -totals))[:top]  # ranked documents (ties: lower row)
        rank_of_doc = np.full(size, -1)
        rank_of_doc[docs[order]] = np.arange(len(order))
        mine = np.flatnonzero(rank_of_doc[credit.doc_index] >= 0)  # entries of the ranked documents
        rank = rank_of_doc[credit.doc_index[mine]]
        protos, values = credit.prototypes[mine], credit.values[mine]
        # the prototype with the highest summed credit per document (ties: the lower id) ...
        best_proto, _ = best_per_group(rank, protos, values, len(order))  # (top,)
        # ... and its highest-valued entry (ties: the first entry), whose token span is shown
        candidate = np.where(protos == best_proto[rank], values, -np.inf)
        by_entry = np.lexsort((-candidate, rank))
        entry = mine[by_entry[np.unique(rank[by_entry], return_index=True)[1]]]  # (top,)
        entries = np.bincount(rank, minlength=len(order))
        return [RankedDocument(int(docs[d]), float(totals[d]), int(best_proto[r]), int(credit.start[entry[r]]),
                               int(credit.end[entry[r]]), int(entries[r])) for r, d in enumerate(order.tolist())]

    def corpus(self):
        """The training corpus the factors were built from (loaded once), checked unchanged.

        Raises:
            InfluenceError: it moved, or its files changed since the build.
        """
        if self._corpus is None:
            recorded = self.meta["corpus_path"]
            candidates = [self.bundle_dir / self.meta.get("corpus_path_from_bundle", recorded), Path(recorded)]
            path = next((p for p in candidates if p.exists()), None)
            hint = f"move it back, or rebuild with {_corpus_hint(self.bundle_dir, 'NEWPATH')}"
            if path is None:
                raise InfluenceError(f"the corpus the influence factors were built from is no longer at {recorded} "
                                     f"(it moved or was deleted); {hint}")
            try:
                corpus = load_corpus(path)
            except CorpusError as err:
                raise InfluenceError(f"cannot read the corpus at {path} ({err}); {hint}") from None
            if corpus.fingerprint != self.meta["corpus_fingerprint"]:
                raise InfluenceError(f"the corpus at {path} changed since the influence factors were built; "
                                     f"rebuild with {_corpus_hint(self.bundle_dir, str(path))}")
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
            lo, hi = max(0, begin - SNIPPET_BEFORE), min(len(text), end + SNIPPET_AFTER)
            records.append({"doc_id": doc_id, "source": source, "doc_index": r.doc_index, "char_offset": begin,
                            "snippet": text[lo:hi], "highlight_start": begin - lo, "highlight_end": end - lo})
        return records


def load_influence(bundle_dir: str | Path) -> InfluenceFactors:
    """Load a bundle's influence factors after checking that they belong to its weights and index.

    Raises:
        InfluenceError: no factors, another format, or factors built for other weights or
            another corpus than the index.
    """
    bundle_dir = Path(bundle_dir)
    path = index_dir(bundle_dir) / INFLUENCE_FILE
    hint = _corpus_hint(bundle_dir)
    if not path.is_file():
        raise InfluenceError(f"{bundle_dir} has no influence factors; build them with {hint}")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    if meta.get("format_version") not in (1, FORMAT_VERSION):
        raise InfluenceError(f"{path} has format {meta.get('format_version')!r}, this version reads "
                             f"{FORMAT_VERSION}; rebuild it with {hint}")
    hint = _corpus_hint(bundle_dir, meta.get("corpus_path", "PATH"))
    current = model_fingerprint(bundle_dir)
    if meta.get("model_fingerprint") != current:
        raise InfluenceError(f"the influence factors in {path.parent} were built for model "
                             f"{meta.get('model_fingerprint')}, not this model ({current}); rebuild them with {hint}")
    index_meta_path = index_dir(bundle_dir) / "meta.json"
    if index_meta_path.is_file():
        index_meta = json.loads(index_meta_path.read_text(encoding="utf-8"))
        if index_meta.get("corpus_fingerprint") != meta.get("corpus_fingerprint"):
            raise InfluenceError(f"the influence factors in {path.parent} were built from another corpus than the "
                                 f"index; rebuild both with {hint}")
    arrays = load_file(path)
    if meta["format_version"] == 1:
        arrays = _entries_from_tables(arrays)
    return InfluenceFactors(bundle_dir, arrays, meta)


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

