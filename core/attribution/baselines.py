"""Post-hoc training-data attribution through existing libraries, on a PRISM model or its twin.

Thin adapters only: the libraries do the maths. They attribute the summed next-token loss of a
query's completion to fixed-length training examples, with + = helpful (upweighting the
example lowers the query loss), the sign convention of :mod:`core.attribution.influence`.

- :func:`linear_head_copy`: the model with its head as ``nn.Linear`` modules (the keys K, the
  values W fed the dense vector of the sparse weights, the unembedding E), so that libraries
  that track only ``nn.Linear`` see the head as well as the backbone; the dense twin keeps its
  output layer E as a module too. Its logits are the model's.
- :func:`ekfac_scores`: EK-FAC influence through Kronfluence (``Analyzer.fit_all_factors``
  then ``compute_pairwise_scores``), over the model's ``nn.Linear`` layers; it recomputes
  every training gradient for each query batch.
- :func:`logra_scores`: LoGra through dattri: a gradient store, each training example's
  gradient projected per layer (Kronecker-factored) once, then a dot product per query.
- :func:`bm25_scores`: the lexical baseline (bm25s): no model at all.
- :func:`document_windows` / :func:`sum_windows`: whole documents as windows of the model's
  sequence length, and their scores summed back per document.

Damping: one rule, :data:`DAMPING` x the mean eigenvalue of each block (a prototype block in
PRISM influence, a module in EK-FAC: Kronfluence's ``damping_factor=None`` heuristic, a layer's
projected Fisher in LoGra: dattri's ``damping`` is relative to trace / dimension).

None of the libraries is a runtime requirement: they come from ``requirements-bench.txt``. The
adapters deep-copy the model, so the caller's model is never modified.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers.modeling_outputs import CausalLMOutput

from core.errors import BaselineError
from core.model.head import active_prototypes, prototype_weights

# lambda = DAMPING x mean eigenvalue of each curvature block, the rule of core.attribution.influence
# (InfluenceArguments.damping) and of Kronfluence's heuristic (its HEURISTIC_DAMPING_SCALE).
DAMPING = 0.1


class LMExamples(Dataset):
    """Fixed-length causal-LM examples: dicts of ``input_ids`` and ``labels`` (T,) tensors.

    ``labels[t]`` is the token at t (the model predicts it from positions < t); -100 masks a
    position out of the loss (prompt tokens of a query, right padding).
    """

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        if input_ids.shape != labels.shape or input_ids.dim() != 2:
            raise BaselineError(
                f"input_ids and labels must both be (N, T), got {tuple(input_ids.shape)} and {tuple(labels.shape)}"
            )
        self.input_ids, self.labels = input_ids.long(), labels.long()

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def training_examples(token_ids: list[list[int]]) -> LMExamples:
    """Training examples of equal length; every position after the first is in the loss."""
    lengths = {len(t) for t in token_ids}
    if len(lengths) != 1:
        raise BaselineError(f"training examples must have one length, got lengths {sorted(lengths)[:5]}")
    ids = torch.tensor(token_ids)
    labels = ids.clone()
    labels[:, 0] = -100
    return LMExamples(ids, labels)


def query_examples(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> LMExamples:
    """Queries: prompt + completion, the completion tokens in the loss, right-padded (a causal
    model's earlier positions do not see the padding, and padding is out of the loss)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(prompts), width), pad_id)
    labels = torch.full((len(prompts), width), -100)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
    return LMExamples(ids, labels)


def summed_loss(model, batch: dict[str, torch.Tensor], sample: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch (labels drawn from the model if ``sample``)."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    if sample:
        with torch.no_grad():
            drawn = torch.multinomial(logits.detach().reshape(-1, logits.shape[-1]).softmax(-1), 1).view_as(labels)
        labels = torch.where(labels == -100, labels, drawn)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


class LinearHeadLM(nn.Module):
    """A PRISM model (or its dense twin) whose head is made of ``nn.Linear`` modules.

    PRISM computes the head with a gather (``embedding_bag``) and a product with the tied
    embedding, which libraries that track only ``nn.Linear`` do not see. Here the same maths
    runs through modules: ``keys`` = Linear(d, P) on the normalised hidden state (s = K h),
    ``values`` = Linear(P, d) fed the dense (P,) vector of the sparse weights (z = W^T a, a_j =
    softplus(s_j) on the top k, 0 elsewhere), and ``unembedding`` = Linear(d, V) (logits = E z;
    the twin: E h). The gradient of each weight is the model's (the top-k choice is piecewise
    constant, as in PRISM influence); E is an untied copy, so its gradient is the output side
    only (the input embedding is an ``nn.Embedding``, tracked by neither library). Controls
    (gains, suppression) do not apply.
    """

    def __init__(self, model):
        super().__init__()
        source = copy.deepcopy(model).float()
        self.backbone = source.model
        E = source.unembedding.detach()  # (V, d)
        self.top_k = None if source.prototypes is None else source.config.prototype_top_k
        self.power = 1.0 if source.prototypes is None else float(source.prototypes.weight_power)
        if source.prototypes is not None:
            keys, values = source.prototypes.keys.detach(), source.prototypes.values.detach()  # (P, d) each
            self.keys = nn.Linear(keys.shape[1], keys.shape[0], bias=False)
            self.values = nn.Linear(values.shape[0], values.shape[1], bias=False)
            self.keys.weight = nn.Parameter(keys.clone())  # (P, d): s = h K^T
            self.values.weight = nn.Parameter(values.T.contiguous())  # (d, P): z = a W
        self.unembedding = nn.Linear(E.shape[1], E.shape[0], bias=False)
        self.unembedding.weight = nn.Parameter(E.clone())  # (V, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """(B, T) token ids -> ``CausalLMOutput`` with (B, T, V) ``logits``."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
        if self.top_k is not None:
            scores = self.keys(hidden)  # (B, T, P)
            ids, top_scores = active_prototypes(scores, self.top_k)  # (B, T, k)
            weights = torch.zeros_like(scores).scatter(-1, ids, prototype_weights(top_scores, self.power))  # (B, T, P)
            hidden = self.values(weights)  # (B, T, d) z = sum_j a_j W_j
        return CausalLMOutput(logits=self.unembedding(hidden))  # (B, T, V)


def linear_head_copy(model) -> LinearHeadLM:
    """A float32 copy of a PRISM model (or its dense twin) with the head as ``nn.Linear``
    modules (:class:`LinearHeadLM`), in eval mode, every weight requiring gradients; the
    logits equal the model's."""
    copy_ = LinearHeadLM(model).eval()
    for parameter in copy_.parameters():
        parameter.requires_grad_(True)
    return copy_


def _trainable_copy(model) -> torch.nn.Module:
    twin = copy.deepcopy(model).float().eval()
    for parameter in twin.parameters():
        parameter.requires_grad_(True)
    return twin


@dataclass
class BaselineResult:
    """Scores (Q, N) (+ = helpful) and timings in seconds: ``fit`` (one-time factors or
    store), ``score`` (all queries together), ``single_query`` (one query against every
    training example, when measured), plus the bytes stored per training example."""

    scores: np.ndarray
    fit_seconds: float
    score_seconds: float
    bytes_per_example: float
    single_query_seconds: float | None = None


def _kronfluence_analyzer(model, output_dir: str | Path):
    """A Kronfluence task and analyzer over a trainable copy of ``model``, writing to ``output_dir``."""
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.task import Task
        from kronfluence.utils.dataset import DataLoaderKwargs
    except ImportError as err:
        raise BaselineError(f"kronfluence is not installed ({err}); `pip install -r requirements-bench.txt`") from None

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return summed_loss(model, batch, sample)

        def compute_measurement(self, batch, model):
            return summed_loss(model, batch)

    task = _Task()
    twin = prepare_model(_trainable_copy(model), task)
    analyzer = Analyzer(
        analysis_name="prism",
        model=twin,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(output_dir),
        disable_model_save=True,
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    return analyzer


def ekfac_fit(
    model, train: Dataset, output_dir: str | Path, *, strategy: str = "ekfac", train_batch_size: int = 8
) -> float:
    """Fit Kronfluence's ``strategy`` factors on ``train`` into ``output_dir``; returns seconds.

    The factors are a curvature estimate, so ``train`` may be a sample of the examples that
    :func:`ekfac_pairwise` later scores (Kronfluence's own examples fit on subsets too).
    """
    analyzer = _kronfluence_analyzer(model, output_dir)  # raises BaselineError without kronfluence
    from kronfluence.arguments import FactorArguments

    t0 = time.perf_counter()
    analyzer.fit_all_factors(
        factors_name=strategy,
        dataset=train,
        per_device_batch_size=train_batch_size,
        factor_args=FactorArguments(strategy=strategy),
        overwrite_output_dir=True,
    )
    return time.perf_counter() - t0


def ekfac_pairwise(
    model,
    train: LMExamples,
    queries: LMExamples,
    output_dir: str | Path,
    *,
    strategy: str = "ekfac",
    train_batch_size: int = 8,
    query_batch_size: int = 32,
    damping_factor: float | None = None,
) -> tuple[np.ndarray, float]:
    """(Q, N) influence scores (+ = helpful) of every training example on every query, from the
    factors :func:`ekfac_fit` wrote into ``output_dir``; and the seconds it took.

    ``damping_factor``: None is Kronfluence's heuristic, 0.1 x the mean eigenvalue of each
    module (:data:`DAMPING`, the rule of PRISM influence); a number is an absolute damping.
    """
    analyzer = _kronfluence_analyzer(model, output_dir)  # raises BaselineError without kronfluence
    from kronfluence.arguments import ScoreArguments
    from kronfluence.utils.constants import HEURISTIC_DAMPING_SCALE

    if damping_factor is None and HEURISTIC_DAMPING_SCALE != DAMPING:
        raise BaselineError(f"Kronfluence's damping heuristic is {HEURISTIC_DAMPING_SCALE} x mean, not {DAMPING}")

    t0 = time.perf_counter()
    analyzer.compute_pairwise_scores(
        scores_name=strategy,
        factors_name=strategy,
        query_dataset=queries,
        train_dataset=train,
        per_device_query_batch_size=query_batch_size,
        per_device_train_batch_size=train_batch_size,
        score_args=ScoreArguments(damping_factor=damping_factor),
        overwrite_output_dir=True,
    )
    seconds = time.perf_counter() - t0
    # Kronfluence's pairwise score is g_q^T H^-1 g_train of the two losses: + = helpful already.
    return analyzer.load_pairwise_scores(strategy)["all_modules"].double().numpy(), seconds


def ekfac_scores(
    model,
    train: LMExamples,
    queries: LMExamples,
    *,
    strategy: str = "ekfac",
    train_batch_size: int = 8,
    query_batch_size: int = 32,
    output_dir: str | Path | None = None,
    damping_factor: float | None = None,
    single_query: bool = False,
) -> BaselineResult:
    """EK-FAC (or ``identity``/``diagonal``/``kfac``) influence through Kronfluence: factors
    fitted on ``train``, then pairwise scores (``damping_factor``: see :func:`ekfac_pairwise`).

    ``single_query``: also time the first query alone against every training example (what an
    analyst waits for: Kronfluence recomputes every training gradient for each query batch).

    Raises:
        BaselineError: kronfluence is not installed.
    """
    options = dict(
        strategy=strategy,
        train_batch_size=train_batch_size,
        query_batch_size=query_batch_size,
        damping_factor=damping_factor,
    )
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as tmp:
        out = output_dir or tmp
        fit = ekfac_fit(model, train, out, strategy=strategy, train_batch_size=train_batch_size)
        scores, seconds = ekfac_pairwise(model, train, queries, out, **options)
        single = None
        if single_query:
            first = LMExamples(queries.input_ids[:1], queries.labels[:1])
            single = ekfac_pairwise(model, train, first, out, **options)[1]
    return BaselineResult(scores, fit, seconds, 0.0, single)


class _SummedLoss(torch.nn.Module):
    """The model behind dattri's ``model(**batch).loss`` convention, with a summed loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        from types import SimpleNamespace

        return SimpleNamespace(loss=summed_loss(self.model, {"input_ids": input_ids, "labels": labels}))


def logra_scores(
    model,
    train: LMExamples,
    queries: LMExamples,
    *,
    proj_dim: int = 64,
    train_batch_size: int = 8,
    query_batch_size: int = 32,
    damping: float = DAMPING,
    single_query: bool = False,
) -> BaselineResult:
    """LoGra (a per-layer projected gradient store with an empirical-Fisher preconditioner)
    through dattri, over the model's ``nn.Linear`` layers.

    Args:
        proj_dim: projected dimension per layer (a perfect square: the input and output sides
            are projected to sqrt(proj_dim) each); the store holds proj_dim floats per layer
            per training example.
        damping: lambda = damping x trace / dimension (the mean eigenvalue) of each layer's
            projected Fisher (dattri's relative damping).
        single_query: also time the first query alone against the store.

    Raises:
        BaselineError: dattri is not installed, or proj_dim is not a perfect square.
    """
    try:
        from dattri.algorithm import LoGraAttributor
        from dattri.task import AttributionTask
    except ImportError as err:
        raise BaselineError(f"dattri is not installed ({err}); `pip install -r requirements-bench.txt`") from None
    side = round(proj_dim**0.5)
    if side * side != proj_dim:
        raise BaselineError(f"proj_dim must be a perfect square (LoGra projects both sides), got {proj_dim}")
    from torch.utils.data import DataLoader

    wrapped = _SummedLoss(_trainable_copy(model))
    layers = [name for name, module in wrapped.named_modules() if isinstance(module, torch.nn.Linear)]
    task = AttributionTask(
        loss_func=lambda m, batch, device: m(**batch).loss, model=wrapped, checkpoints=wrapped.state_dict()
    )
    train_loader = DataLoader(train, batch_size=train_batch_size, shuffle=False)
    query_loader = DataLoader(queries, batch_size=query_batch_size, shuffle=False)
    # dattri writes its batch metadata into cache_dir (the working directory by default).
    with tempfile.TemporaryDirectory(prefix="prism-logra-") as cache_dir:
        attributor = LoGraAttributor(
            task=task,
            layer_names=layers,
            device="cpu",
            hessian="eFIM",
            damping=damping,
            proj_dim=proj_dim,
            offload="cpu",
            cache_dir=cache_dir,
        )
        t0 = time.perf_counter()
        attributor.cache(train_loader)  # the store, the preconditioners and the preconditioned store
        t1 = time.perf_counter()
        scores = attributor.attribute(train_loader, query_loader)  # (N, Q); computes query gradients itself
        t2 = time.perf_counter()
        single = None
        if single_query:
            first = DataLoader(LMExamples(queries.input_ids[:1], queries.labels[:1]), batch_size=1)
            attributor.attribute(train_loader, first)
            single = time.perf_counter() - t2
    stored = 4.0 * proj_dim * len(layers)
    return BaselineResult(scores.T.double().cpu().numpy(), t1 - t0, t2 - t1, stored, single)


def bm25_scores(documents: list[str], queries: list[str]) -> BaselineResult:
    """BM25 (bm25s, Lucene variant, English stopwords) of every document for each query text:
    the lexical baseline, + = more shared rare words. ``bytes_per_example``: the index's sparse
    matrix per document.

    Raises:
        BaselineError: bm25s is not installed.
    """
    try:
        import bm25s
    except ImportError as err:
        raise BaselineError(f"bm25s is not installed ({err}); `pip install -r requirements-bench.txt`") from None
    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
    t1 = time.perf_counter()
    tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    scores = [retriever.get_scores(q) for q in tokens]  # (N,) each
    t2 = time.perf_counter()
    single = None
    if queries:
        retriever.get_scores(bm25s.tokenize(queries[:1], stopwords="en", return_ids=False, show_progress=False)[0])
        single = time.perf_counter() - t2
    stored = sum(v.nbytes for v in retriever.scores.values() if hasattr(v, "nbytes"))
    result = np.array(scores, dtype=np.float64).reshape(len(queries), len(documents))
    return BaselineResult(result, t1 - t0, t2 - t1, stored / max(1, len(documents)), single)


def document_windows(token_ids: list[list[int]], length: int, pad_id: int) -> tuple[LMExamples, np.ndarray]:
    """Whole documents as training examples of ``length`` tokens: windows that overlap by one
    token, so that every token after a document's first is a target exactly once (as in
    training, where the first token of a document is predicted from the previous one's end).

    Returns:
        the windows (right-padded, padding out of the loss) and (W,) the document of each.
    """
    if length < 2:
        raise BaselineError(f"windows need length >= 2 tokens, got {length}")
    windows, owner = [], []
    for doc, tokens in enumerate(token_ids):
        for start in range(0, max(1, len(tokens) - 1), length - 1):
            windows.append(tokens[start : start + length])
            owner.append(doc)
    return padded_examples(windows, length, pad_id), np.asarray(owner, dtype=np.int64)


def sum_windows(scores: np.ndarray, owner: np.ndarray, documents: int) -> np.ndarray:
    """(Q, W) window scores -> (Q, documents) document scores, each the sum of its windows'."""
    out = np.zeros((scores.shape[0], documents), dtype=np.float64)
    np.add.at(out.T, owner, scores.T)
    return out


def padded_examples(token_ids: list[list[int]], length: int, pad_id: int) -> LMExamples:
    """Training examples of unequal length cut or right-padded to ``length`` (padding out of
    the loss; a causal model's real positions never see it)."""
    ids = torch.full((len(token_ids), length), pad_id)
    labels = torch.full((len(token_ids), length), -100)
    for i, tokens in enumerate(token_ids):
        tokens = tokens[:length]
        ids[i, : len(tokens)] = torch.tensor(tokens)
        labels[i, 1 : len(tokens)] = torch.tensor(tokens[1:])
    return LMExamples(ids, labels)
