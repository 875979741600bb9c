"""Calibration: fit a controller's per-prototype gains on a multiple-choice task.

A task is a list of multiple-choice items (:mod:`core.control.formats` reads task files). A
choice is scored by the mean log-probability of its tokens after the prompt (prompt and choice
tokenised separately, then joined, as in lm-eval-harness); the item is right when the answer
scores highest. The mean rather than the sum keeps long choices from losing by length alone.

Gains act in the prototype head only, after the backbone: a token's hidden state, active set
and base weights softplus(s_j) do not depend on them. :func:`calibrate` therefore runs the
backbone once per (prompt, choice), caches for every choice token its k active prototypes,
their base weights and its target, and then fits the gains on that cache:

    logits_t = E (sum_j softplus(s_tj) g_j W_j),   score_c = mean_t log p(y_t),
    loss = CE(softmax_c(score_c / tau), answer) + penalty * sum_j |g_j - 1|.

g = max(0, 1 + delta) with delta trained by Adam and shrunk towards 0 after every step by a
soft threshold (a proximal step for the L1 penalty), so prototypes the task does not need
keep a gain of exactly 1 and the controller stays sparse. Optionally (``dev`` > 0) part of
the calibration split picks the best step (early stopping); on the demo tasks that hurt
(wordnet_pos: +7.5 points held-out without it, +0.0 with dev=0.2), so it is off by
default. The settings are a :class:`CalibrationArguments`. The model's weights are never
touched: the gains reach it as the per-call ``prototype_gains`` argument, and held-out
accuracy before and after is measured with real forward passes through :func:`evaluate_task`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from core.bundle import Bundle
from core.control.arguments import CalibrationArguments
from core.control.controls import Controls, control_kwargs
from core.control.formats import TaskItem
from core.errors import TaskError
from core.model.head import gained, mix_values

logger = logging.getLogger(__name__)

CHANGED_TOLERANCE = 1e-3  # |g - 1| above this counts as a changed gain
MOVED_SHOWN = 10  # prototypes listed in CalibrationResult.moved
EXAMPLES_PER_PROTOTYPE = 3


@dataclass
class ChoiceCache:
    """The head's inputs for every scored token, gain-independent.

    Attributes:
        ids: (N, k) active prototypes of each choice token's position.
        base: (N, k) their weights before gains, softplus(s_j).
        targets: (N,) the choice token predicted there.
        segment: (N,) which (item, choice) pair the token belongs to (row of ``pairs``).
        pairs: (C, 2) item index and choice index of each segment.
        answers: (I,) right choice of each item; choices: (I,) number of choices.
    """

    ids: torch.Tensor
    base: torch.Tensor
    targets: torch.Tensor
    segment: torch.Tensor
    pairs: torch.Tensor
    answers: torch.Tensor
    choices: torch.Tensor


def _sequences(bundle: Bundle, items: Sequence[TaskItem]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + choice, number of choice tokens) per (item, choice), item-major."""
    tok = bundle.tokenizer
    context = bundle.model.config.get_text_config().max_position_embeddings
    out = []
    for item in items:
        prompt = tok(item.prompt, add_special_tokens=False)["input_ids"]
        for choice in item.choices:
            ids = tok(choice, add_special_tokens=False)["input_ids"][: context - 1]
            keep = context - len(ids)
            out.append((prompt[-keep:] + ids, len(ids)))
    return out


def _batches(sequences: list[tuple[list[int], int]], batch_tokens: int) -> list[list[int]]:
    """Indices of sequences grouped so that each padded batch holds about ``batch_tokens``."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    batches, current, longest = [], [], 0
    for i in order:
        longest = max(longest, len(sequences[i][0]))
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], len(sequences[i][0])
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _run(
    bundle: Bundle,
    items: Sequence[TaskItem],
    kwargs: dict,
    batch_tokens: int,
    progress: Callable[[int, int], None] | None,
    want_cache: bool,
) -> tuple[torch.Tensor, ChoiceCache | None]:
    """Score every choice with real forward passes; optionally cache the head's inputs."""
    model = bundle.model
    device = next(model.parameters()).device
    sequences = _sequences(bundle, items)
    scores = torch.zeros(len(sequences))
    cache_parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    batches = _batches(sequences, batch_tokens)
    pad = bundle.tokenizer.eos_token_id or 0
    with torch.no_grad():
        for done, batch in enumerate(batches):
            width = max(len(sequences[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = sequences[i][0]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            out = model(ids.to(device), attention_mask=mask.to(device), return_prototypes=want_cache, **kwargs)
            logprobs = out.logits.float().log_softmax(-1).cpu()  # (B, T, V)
            for row, i in enumerate(batch):
                seq, n = sequences[i]
                positions = torch.arange(len(seq) - n - 1, len(seq) - 1)  # predict each choice token
                targets = torch.tensor(seq[len(seq) - n :])
                scores[i] = logprobs[row, positions, targets].mean()
                if want_cache:
                    cache_parts.append(
                        (
                            i,
                            out.prototype_ids[row, positions].cpu(),
                            out.prototype_weights[row, positions].cpu(),
                            targets,
                        )
                    )
            if progress:
                progress(done + 1, len(batches))
    if not want_cache:
        return scores, None
    cache_parts.sort(key=lambda part: part[0])
    pairs = torch.tensor([(n, c) for n, item in enumerate(items) for c in range(len(item.choices))])
    cache = ChoiceCache(
        ids=torch.cat([p[1] for p in cache_parts]),
        base=torch.cat([p[2] for p in cache_parts]),
        targets=torch.cat([p[3] for p in cache_parts]),
        segment=torch.cat([torch.full((len(p[3]),), p[0]) for p in cache_parts]),
        pairs=pairs,
        answers=torch.tensor([item.answer for item in items]),
        choices=torch.tensor([len(item.choices) for item in items]),
    )
    return scores, cache


def _accuracy(scores: torch.Tensor, items: Sequence[TaskItem]) -> float:
    right, start = 0, 0
    for item in items:
        chunk = scores[start : start + len(item.choices)]
        right += int(int(chunk.argmax()) == item.answer)
        start += len(item.choices)
    return right / max(1, len(items))


def evaluate_task(
    bundle: Bundle,
    items: Sequence[TaskItem],
    controls: Controls | None = None,
    batch_tokens: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Accuracy of the model (under ``controls``, for this call only) on the task items.

    Each choice is scored by the mean log-probability of its tokens after the prompt.
    """
    if not items:
        raise TaskError("the task has no items")
    kwargs = control_kwargs(controls, bundle.model, bundle.fingerprint, next(bundle.model.parameters()).device)
    scores, _ = _run(bundle, items, kwargs, batch_tokens, progress, want_cache=False)
    return _accuracy(scores, items)


def cached_scores(
    cache: ChoiceCache,
    gains: torch.Tensor,
    values: torch.Tensor,
    embedding: torch.Tensor,
    token_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """(C,) choice scores under ``gains`` (P,) from a cache; differentiable in ``gains``.

    Args:
        values: (P, d) prototype values W; embedding: (V, d) the tied unembedding E.
        token_rows: restrict to these cached tokens (a minibatch); segments without tokens
            in it score 0.
    """
    rows = torch.arange(len(cache.targets)) if token_rows is None else token_rows
    ids = cache.ids[rows]  # (n, k)
    weights = gained(cache.base[rows], ids, gains)  # (n, k)
    mixed = mix_values(ids, weights, values)  # (n, d)
    logits = mixed @ embedding.T  # (n, V)
    logp = logits.gather(1, cache.targets[rows, None]).squeeze(1) - logits.logsumexp(-1)  # (n,)
    segment = cache.segment[rows]
    total = torch.zeros(len(cache.pairs), dtype=logp.dtype).index_add(0, segment, logp)
    count = torch.zeros(len(cache.pairs), dtype=logp.dtype).index_add(0, segment, torch.ones_like(logp))
    return total / count.clamp_min(1)


def _item_loss(scores: torch.Tensor, cache: ChoiceCache, item_rows: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean cross-entropy over ``item_rows`` of softmax(score / tau) against the answers."""
    width = int(cache.choices.max())
    offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), cache.choices[:-1]]), 0)  # (I,)
    grid = offsets[item_rows, None] + torch.arange(width)  # (b, width)
    valid = torch.arange(width) < cache.choices[item_rows, None]  # (b, width)
    logits = scores[grid.clamp_max(len(scores) - 1)].masked_fill(~valid, float("-inf")) / tau
    return F.cross_entropy(logits, cache.answers[item_rows])


@dataclass
class CalibrationResult:
    """What a calibration run produced.

    Attributes:
        controls: the fitted controller (gains only).
        before, after: held-out accuracy without and with it (real forward passes).
        calibration_before, calibration_after: the same on the calibration split.
        changed: number of prototypes whose gain moved by more than 1e-3.
        moved: the most moved prototypes, most first: {"id", "gain", "label", "examples"},
            examples being the prototype's nearest training neighbours from the index.
        calibration_items, holdout_items: split sizes; settings: the arguments used.
    """

    controls: Controls
    before: float
    after: float
    calibration_before: float
    calibration_after: float
    changed: int
    moved: list[dict] = field(default_factory=list)
    calibration_items: int = 0
    holdout_items: int = 0
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "before": self.before,
            "after": self.after,
            "gain_points": round(100 * (self.after - self.before), 2),
            "calibration_before": self.calibration_before,
            "calibration_after": self.calibration_after,
            "changed": self.changed,
            "calibration_items": self.calibration_items,
            "holdout_items": self.holdout_items,
            "settings": self.settings,
            "moved": self.moved,
            "controls": self.controls.to_json(),
        }


def split_items(items: Sequence[TaskItem], holdout: float, seed: int) -> tuple[list[TaskItem], list[TaskItem]]:
    """(calibration, held-out) split of the items by a seeded shuffle."""
    if not 0 < holdout < 1:
        raise TaskError(f"holdout must be a fraction between 0 and 1, got {holdout}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_hold = max(1, round(holdout * len(items)))
    if n_hold >= len(items):
        raise TaskError(f"{len(items)} items are too few to keep {holdout:.0%} for held-out evaluation")
    return [items[i] for i in order[n_hold:]], [items[i] for i in order[:n_hold]]


def _cached_accuracy(cache: ChoiceCache, gains: torch.Tensor, values: torch.Tensor, embedding: torch.Tensor) -> float:
    with torch.no_grad():
        scores = cached_scores(cache, gains, values, embedding)
    right, start = 0, 0
    for n, count in enumerate(cache.choices.tolist()):
        right += int(int(scores[start : start + count].argmax()) == int(cache.answers[n]))
        start += count
    return right / max(1, len(cache.answers))


def fit_gains(
    cache: ChoiceCache,
    values: torch.Tensor,
    embedding: torch.Tensor,
    *,
    penalty: float,
    steps: int,
    lr: float,
    tau: float,
    batch_items: int,
    seed: int,
    dev: ChoiceCache | None = None,
    eval_every: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Fit (P,) gains on a cache by minibatch Adam with a proximal L1 step towards 1.

    With a ``dev`` cache, the gains are scored on it every ``eval_every`` steps (and before
    the first) and the best are returned, the earliest on ties: early stopping, so a task the
    controller cannot help keeps gains near (or at) 1 instead of fitting noise.
    """
    generator = torch.Generator().manual_seed(seed)
    P = values.shape[0]
    delta = torch.zeros(P, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr)
    n_items = len(cache.answers)
    item_of_token = cache.pairs[cache.segment, 0]  # (N,)
    best_gains = torch.ones(P)
    best = _cached_accuracy(dev, best_gains, values, embedding) if dev is not None else 0.0
    for step in range(steps):
        batch = torch.randperm(n_items, generator=generator)[: min(batch_items, n_items)]
        in_batch = torch.zeros(n_items, dtype=torch.bool)
        in_batch[batch] = True
        rows = in_batch[item_of_token].nonzero().squeeze(1)
        gains = (1 + delta).clamp_min(0)
        scores = cached_scores(cache, gains, values, embedding, rows)
        loss = _item_loss(scores, cache, batch, tau)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():  # proximal step of penalty * |delta|: exact zeros stay unchanged
            delta.copy_(delta.sign() * (delta.abs() - lr * penalty).clamp_min(0))
            delta.clamp_min_(-1)
        if dev is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
            gains = (1 + delta.detach()).clamp_min(0)
            accuracy = _cached_accuracy(dev, gains, values, embedding)
            if accuracy > best:
                best, best_gains = accuracy, gains.clone()
        if progress:
            progress(step + 1, steps)
    return best_gains if dev is not None else (1 + delta.detach()).clamp_min(0)


def calibrate(
    bundle: Bundle,
    items: Sequence[TaskItem],
    arguments: CalibrationArguments | None = None,
    *,
    index=None,
    progress: Callable[[int, int], None] | None = None,
    **options,
) -> CalibrationResult:
    """Fit a controller's gains on part of a task and measure it on the rest.

    Args:
        bundle: a PRISM bundle (not modified).
        items: the task.
        arguments: the fit's settings (default: :class:`CalibrationArguments`'s defaults).
        index: a :class:`core.index.PrototypeIndex` for the moved prototypes' neighbourhoods;
            by default the bundle's own index when it has one.
        progress: called with (done, total) work units.
        **options: fields of :class:`CalibrationArguments` (holdout, penalty, steps, lr, tau,
            batch_items, dev, seed) overriding ``arguments``.

    Raises:
        ArgumentError: bad settings.
        TaskError: too few items.
        ValueError: a dense bundle (no prototypes to calibrate).
    """
    if not bundle.is_prism:
        raise ValueError("calibration needs a PRISM model; this bundle is a dense twin")
    settings = dataclasses.replace(arguments or CalibrationArguments(), **options)
    holdout, penalty, steps, lr, tau = settings.holdout, settings.penalty, settings.steps, settings.lr, settings.tau
    batch_items, dev, seed = settings.batch_items, settings.dev, settings.seed
    calibration, held_out = split_items(items, holdout, seed)
    model = bundle.model
    values = model.prototypes.values.detach().float().cpu()
    embedding = model.unembedding.detach().float().cpu()

    # Work units: cache pass + steps + two held-out passes.
    total = 4 + steps
    done = [0]

    def tick(units: int = 1) -> None:
        done[0] += units
        if progress:
            progress(min(done[0], total), total)

    fit_items, dev_items = split_items(calibration, dev, seed + 1) if dev > 0 else (calibration, [])
    _, cache = _run(bundle, fit_items, {}, 4096, None, want_cache=True)
    dev_cache = _run(bundle, dev_items, {}, 4096, None, want_cache=True)[1] if dev_items else None
    tick()
    before = evaluate_task(bundle, held_out)
    tick()
    gains = fit_gains(
        cache,
        values,
        embedding,
        penalty=penalty,
        steps=steps,
        lr=lr,
        tau=tau,
        batch_items=batch_items,
        seed=seed,
        dev=dev_cache,
        progress=lambda *_: tick(),
    )
    changed_ids = ((gains - 1).abs() > CHANGED_TOLERANCE).nonzero().squeeze(1).tolist()
    controls = Controls(
        gains={int(j): round(float(gains[j]), 6) for j in changed_ids},
        model_fingerprint=bundle.fingerprint,
        note=f"calibrated on {len(calibration)} items (penalty {penalty}, {steps} steps, seed {seed})",
    )
    after = evaluate_task(bundle, held_out, controls)
    tick()
    applied = _gain_vector(controls, gains.shape[0])

    def calibration_accuracy(vector: torch.Tensor) -> float:
        right = _cached_accuracy(cache, vector, values, embedding) * len(fit_items)
        if dev_cache is not None:
            right += _cached_accuracy(dev_cache, vector, values, embedding) * len(dev_items)
        return right / len(calibration)

    calibration_before = calibration_accuracy(torch.ones_like(applied))
    calibration_after = calibration_accuracy(applied)
    tick()
    return CalibrationResult(
        controls=controls,
        before=before,
        after=after,
        calibration_before=calibration_before,
        calibration_after=calibration_after,
        changed=len(changed_ids),
        moved=moved_prototypes(controls, bundle, index),
        calibration_items=len(calibration),
        holdout_items=len(held_out),
        settings=dataclasses.asdict(settings),
    )


def _gain_vector(controls: Controls, num_prototypes: int) -> torch.Tensor:
    gains = torch.ones(num_prototypes)
    for pid, gain in controls.gains.items():
        gains[pid] = gain
    return gains


def moved_prototypes(controls: Controls, bundle: Bundle, index=None, top: int = MOVED_SHOWN) -> list[dict]:
    """The prototypes whose gains moved most, with labels and training neighbourhoods when
    an index is available ("this correction up-weights these training examples")."""
    if index is None:
        from core.index.format import PrototypeIndexError, index_exists, load_index

        if index_exists(bundle.path):
            try:
                index = load_index(bundle.path)
            except PrototypeIndexError as err:
                logger.warning("no neighbourhoods for the moved prototypes: %s", err)
    moved = sorted(controls.gains.items(), key=lambda kv: -abs(kv[1] - 1))[:top]
    records = []
    for pid, gain in moved:
        label = index.label(pid) if index is not None else None
        examples = []
        if index is not None:
            for n in index.neighbourhood(pid)[:EXAMPLES_PER_PROTOTYPE]:
                examples.append(
                    {k: n[k] for k in ("doc_id", "source", "snippet", "highlight_start", "highlight_end", "cosine")}
                )
        records.append({"id": pid, "gain": gain, "label": None if label is None else str(label), "examples": examples})
    return records


def format_report(result: CalibrationResult, examples: int = 1) -> str:
    """A readable report: accuracies, changed gains and the most moved prototypes."""
    lines = [
        f"held-out accuracy   {100 * result.before:5.1f}% -> {100 * result.after:5.1f}%  "
        f"({100 * (result.after - result.before):+.1f} points, {result.holdout_items} items)",
        f"calibration split   {100 * result.calibration_before:5.1f}% -> {100 * result.calibration_after:5.1f}%  "
        f"({result.calibration_items} items)",
        f"gains changed       {result.changed}",
    ]
    if result.moved:
        lines.append("most moved prototypes (this correction re-weights these training neighbourhoods):")
    for record in result.moved:
        label = f"  [{record['label']}]" if record["label"] else ""
        lines.append(f"  #{record['id']:<5} gain {record['gain']:.3f}{label}")
        for example in record["examples"][:examples]:
            snippet = " ".join(example["snippet"].split())[-90:]
            lines.append(f"         {example['source']}: ...{snippet}")
    return "\n".join(lines)
