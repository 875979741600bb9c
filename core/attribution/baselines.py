"""Post-hoc training-data attribution on the dense twin, through existing libraries.

Thin adapters only: the libraries do the maths. Both attribute the summed next-token loss of a
query's completion to fixed-length training examples, with + = helpful (upweighting the
example lowers the query loss), the sign convention of :mod:`core.attribution.influence`.

- :func:`ekfac_scores`: EK-FAC influence through Kronfluence (``Analyzer.fit_all_factors``
  then ``compute_pairwise_scores``). It tracks the backbone's ``nn.Linear`` layers (the tied
  unembedding is a matrix product, not a module, so no shared-parameter handling is needed)
  and recomputes every training gradient for each query batch.
- :func:`logra_scores`: LoGra through dattri: a gradient store, each training example's
  gradient projected per layer (Kronecker-factored) once, then a dot product per query.

Neither library is a runtime requirement: both come from ``requirements-bench.txt``. The
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
from torch.utils.data import Dataset

from core.errors import BaselineError


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


def _trainable_copy(model) -> torch.nn.Module:
    twin = copy.deepcopy(model).float().eval()
    for parameter in twin.parameters():
        parameter.requires_grad_(True)
    return twin


@dataclass
class BaselineResult:
    """Scores (Q, N) (+ = helpful) and timings in seconds: ``fit`` (one-time factors or
    store), ``score`` (all queries), plus the bytes stored per training example."""

    scores: np.ndarray
    fit_seconds: float
    score_seconds: float
    bytes_per_example: float


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
) -> tuple[np.ndarray, float]:
    """(Q, N) influence scores (+ = helpful) of every training example on every query, from the
    factors :func:`ekfac_fit` wrote into ``output_dir``; and the seconds it took."""
    analyzer = _kronfluence_analyzer(model, output_dir)  # raises BaselineError without kronfluence
    from kronfluence.arguments import ScoreArguments

    t0 = time.perf_counter()
    analyzer.compute_pairwise_scores(
        scores_name=strategy,
        factors_name=strategy,
        query_dataset=queries,
        train_dataset=train,
        per_device_query_batch_size=query_batch_size,
        per_device_train_batch_size=train_batch_size,
        score_args=ScoreArguments(),
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
) -> BaselineResult:
    """EK-FAC (or ``identity``/``diagonal``/``kfac``) influence through Kronfluence: factors
    fitted on ``train``, then pairwise scores.

    Raises:
        BaselineError: kronfluence is not installed.
    """
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as tmp:
        out = output_dir or tmp
        fit = ekfac_fit(model, train, out, strategy=strategy, train_batch_size=train_batch_size)
        scores, seconds = ekfac_pairwise(
            model,
            train,
            queries,
            out,
            strategy=strategy,
            train_batch_size=train_batch_size,
            query_batch_size=query_batch_size,
        )
    return BaselineResult(scores, fit, seconds, 0.0)


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
) -> BaselineResult:
    """LoGra (a per-layer projected gradient store with an empirical-Fisher preconditioner)
    through dattri, over the backbone's ``nn.Linear`` layers.

    Args:
        proj_dim: projected dimension per layer (a perfect square: the input and output sides
            are projected to sqrt(proj_dim) each); the store holds proj_dim floats per layer
            per training example.

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
            damping=None,
            proj_dim=proj_dim,
            offload="cpu",
            cache_dir=cache_dir,
        )
        t0 = time.perf_counter()
        attributor.cache(train_loader)
        t1 = time.perf_counter()
        scores = attributor.attribute(train_loader, query_loader)  # (N, Q); computes query gradients itself
        t2 = time.perf_counter()
    return BaselineResult(scores.T.double().cpu().numpy(), t1 - t0, t2 - t1, 4.0 * proj_dim * len(layers))


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
