"""Targeting: choosing the prototypes a controller suppresses, each choice with its evidence.

Four ways in, all returning :class:`Target` records best first:

- :func:`target_by_ids`: the ids a user names (evidence: their label and usage);
- :func:`target_by_label`: prototypes whose automatic label contains a text;
- :func:`target_by_query`: prototypes whose training neighbourhood is about a text: the share
  of neighbours whose trigger or next token is one of the query's words, plus whether the
  prototype promotes those words (top of E W_j);
- :func:`target_by_contrast`: prototypes active far more on texts that show a behaviour than
  on neutral texts. By default only the last position of each text counts, so behaviour
  texts cut right before the behaviour (e.g. before "thou") and neutral texts cut before
  another word of the same kind of text isolate the prototypes that produce the behaviour
  rather than those of its whole domain. The score is the difference of mean mixture weights
  a_j between the two sets; ``controls`` (a controller already in force) lets a second round
  look for the prototypes that take over once the first ones are suppressed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.bundle import Bundle
from core.control.controls import Controls, control_kwargs
from core.errors import TargetingError
from core.index.format import PrototypeIndex, load_index

EXAMPLES_PER_TARGET = 3


@dataclass(frozen=True)
class Target:
    """A prototype chosen for suppression.

    Attributes:
        id: prototype id.
        score: how strongly the evidence points at it (method-specific; larger is stronger).
        evidence: one line saying why it was chosen.
        examples: a few of its training neighbours ({"doc_id", "source", "snippet", ...}).
    """

    id: int
    score: float
    evidence: str
    examples: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"id": self.id, "score": self.score, "evidence": self.evidence, "examples": self.examples}


def _examples(index: PrototypeIndex | None, prototype: int) -> list[dict]:
    if index is None:
        return []
    keep = ("doc_id", "source", "snippet", "highlight_start", "highlight_end")
    return [{k: n[k] for k in keep} for n in index.neighbourhood(prototype)[:EXAMPLES_PER_TARGET]]


def _index_of(bundle_dir_or_index: str | Path | PrototypeIndex | Bundle) -> PrototypeIndex:
    if isinstance(bundle_dir_or_index, PrototypeIndex):
        return bundle_dir_or_index
    if isinstance(bundle_dir_or_index, Bundle):
        return load_index(bundle_dir_or_index.path)
    return load_index(bundle_dir_or_index)


def _check_top(top: int) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise TargetingError(f"top must be a positive integer, got {top!r}")


def target_by_ids(
    ids: Sequence[int], index: PrototypeIndex | None = None, num_prototypes: int | None = None
) -> list[Target]:
    """The given prototypes, in the given order, described from the index when there is one."""
    total = index.num_prototypes if index is not None else num_prototypes
    targets = []
    for pid in dict.fromkeys(int(i) for i in ids):
        if total is not None and not 0 <= pid < total:
            raise TargetingError(f"unknown prototype id {pid} (the model has 0..{total - 1})")
        evidence = "chosen by id"
        if index is not None:
            label = index.label(pid)
            evidence += f"; label {label!r}" if label else ""
            evidence += f"; active at {int(index.usage_count[pid])} indexed training positions"
        targets.append(Target(pid, 1.0, evidence, _examples(index, pid)))
    return targets


def target_by_label(bundle_dir_or_index: str | Path | PrototypeIndex, text: str, top: int = 10) -> list[Target]:
    """Prototypes whose label contains ``text`` (case-insensitive), most used first."""
    _check_top(top)
    if not text.strip():
        raise TargetingError("the label text is empty")
    index = _index_of(bundle_dir_or_index)
    if not index.labels:
        raise TargetingError(f"the index in {index.path} has no labels yet; compute them with `prism label`")
    needle = text.strip().lower()
    found = [pid for pid, label in index.labels.items() if needle in str(label).lower()]
    found.sort(key=lambda pid: (-int(index.usage_count[pid]), pid))
    return [
        Target(
            pid, float(index.usage_share[pid]), f"label {index.label(pid)!r} contains {text!r}", _examples(index, pid)
        )
        for pid in found[:top]
    ]


def _query_words(text: str) -> list[str]:
    words = [w.lower() for w in re.findall(r"[A-Za-z0-9_']+", text)]
    if not words:
        raise TargetingError(f"the query {text!r} has no words")
    return words


def target_by_query(index: PrototypeIndex, text: str, top: int = 10, tokenizer=None) -> list[Target]:
    """Prototypes whose neighbourhood is about the query's words.

    Score of prototype j: the share-weighted fraction of its neighbours whose trigger token
    or next token is one of the query's words, plus 0.5 if one of them is among the tokens j
    promotes most (needs ``tokenizer`` to read token ids; without it the neighbourhood text
    around the trigger is matched instead of token ids).
    """
    _check_top(top)
    words = set(_query_words(text))
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words)) + r")\b", re.IGNORECASE)
    shares = index.shares()  # (P, M)
    scores = np.zeros(index.num_prototypes)
    hits = np.zeros(index.num_prototypes, dtype=int)
    promotes = np.zeros(index.num_prototypes, dtype=bool)

    def is_hit(row: int) -> bool:
        if tokenizer is not None:
            pair = (index.positions["token_id"][row], index.positions["next_token_id"][row])
            return any(tokenizer.decode([int(t)]).strip().lower() in words for t in pair)
        snippet = index.snippets[row]
        window = snippet["snippet"][snippet["start"] : snippet["end"] + 12]
        return pattern.search(window) is not None

    row_hit: dict[int, bool] = {}
    for pid in range(index.num_prototypes):
        for slot, row in enumerate(index.neighbour_row[pid]):
            if row < 0:
                continue
            if int(row) not in row_hit:
                row_hit[int(row)] = is_hit(int(row))
            if row_hit[int(row)]:
                scores[pid] += shares[pid, slot]
                hits[pid] += 1
        if tokenizer is not None:
            promoted = {tokenizer.decode([int(t)]).strip().lower() for t in index.promoted_token_ids[pid]}
            promotes[pid] = bool(promoted & words)
    scores = scores + 0.5 * promotes
    order = [int(p) for p in np.argsort(-scores, kind="stable") if scores[p] > 0][:top]
    targets = []
    for pid in order:
        filled = int((index.neighbour_row[pid] >= 0).sum())
        evidence = f"{hits[pid]} of {filled} neighbours have {text!r} at the trigger"
        evidence += "; promotes it" if promotes[pid] else ""
        targets.append(Target(pid, float(scores[pid]), evidence, _examples(index, pid)))
    return targets


def promotion(bundle: Bundle, token_ids: Sequence[int]) -> torch.Tensor:
    """(P,) how much each prototype's value pushes the given tokens: max_y (E_y . W_j), floored at 0."""
    model = bundle.model
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    with torch.no_grad():
        dots = model.unembedding[ids].float() @ model.prototypes.values.float().T  # (m, P)
    return dots.max(0).values.clamp_min(0).cpu()


def activation_profile(
    bundle: Bundle,
    texts: Sequence[str],
    positions: Literal["last", "all"] = "last",
    controls: Controls | None = None,
    batch_size: int = 16,
    scale: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean mixture weight and active rate of every prototype over the texts' positions.

    With ``scale`` (P,), each weight a_j is multiplied by scale_j (e.g. :func:`promotion`,
    which turns weights into slices towards the behaviour's tokens).

    Returns:
        (P,) mean weight a_j (0 where inactive), (P,) fraction of positions where j is active,
        and the number of positions.
    """
    if positions not in ("last", "all"):
        raise TargetingError(f"positions must be 'last' or 'all', got {positions!r}")
    model = bundle.model
    device = next(model.parameters()).device
    P = model.config.num_prototypes
    context = model.config.get_text_config().max_position_embeddings
    kwargs = control_kwargs(controls, model, bundle.fingerprint, device)
    weight_sum = torch.zeros(P, dtype=torch.float64)
    active_sum = torch.zeros(P, dtype=torch.float64)
    count = 0
    encoded = []
    for text in texts:
        ids = bundle.tokenizer(text, add_special_tokens=False)["input_ids"][-context:]
        if ids:
            encoded.append(ids)
    if not encoded:
        raise TargetingError("no text to profile: every text is empty")
    pad = bundle.tokenizer.eos_token_id or 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            out = model(ids.to(device), attention_mask=mask.to(device), return_prototypes=True, **kwargs)
            for row, seq in enumerate(batch):
                span = slice(len(seq) - 1, len(seq)) if positions == "last" else slice(0, len(seq))
                pids = out.prototype_ids[row, span].reshape(-1).cpu()
                weights = out.prototype_weights[row, span].reshape(-1).double().cpu()
                if scale is not None:
                    weights = weights * scale[pids].double()
                weight_sum.index_add_(0, pids, weights)
                active_sum.index_add_(0, pids, torch.ones_like(weights))
                count += span.stop - span.start
    return (weight_sum / count).numpy(), (active_sum / count).numpy(), count


def target_by_contrast(
    bundle: Bundle,
    behaviour_prompts: Sequence[str],
    neutral_prompts: Sequence[str],
    top: int = 10,
    *,
    positions: Literal["last", "all"] = "last",
    controls: Controls | None = None,
    index: PrototypeIndex | None = None,
    background: Sequence[str] | None = None,
    token_ids: Sequence[int] | None = None,
) -> list[Target]:
    """Prototypes much more active on ``behaviour_prompts`` than on ``neutral_prompts``.

    Score: mean a_j over the behaviour positions minus mean a_j over the neutral ones, or,
    with ``background`` texts (every position counts), minus the larger of the two neutral
    means: a prototype busy on unrelated text is not worth its side effects.
    ``controls`` (e.g. the suppressions of an earlier round) apply to every pass;
    suppressed prototypes are never returned. With ``token_ids`` (the behaviour's own tokens,
    e.g. " thou"), weights become slices towards them, a_j max_y (E_y . W_j)+: the
    prototypes that write the behaviour rather than those that merely fire near it.
    """
    _check_top(top)
    if not behaviour_prompts or not neutral_prompts:
        raise TargetingError("contrast needs at least one behaviour prompt and one neutral prompt")
    if not bundle.is_prism:
        raise TargetingError("targeting needs a PRISM model; this bundle is a dense twin")
    scale = promotion(bundle, token_ids) if token_ids else None
    b_weight, b_active, b_n = activation_profile(bundle, behaviour_prompts, positions, controls, scale=scale)
    n_weight, n_active, n_n = activation_profile(bundle, neutral_prompts, positions, controls, scale=scale)
    g_weight = np.zeros_like(n_weight)
    if background:
        g_weight = activation_profile(bundle, background, "all", controls, scale=scale)[0]
    scores = b_weight - np.maximum(n_weight, g_weight)
    if controls is not None:
        scores[list(controls.suppressed)] = -np.inf
    order = [int(p) for p in np.argsort(-scores, kind="stable") if scores[p] > 0][:top]
    return [
        Target(
            pid,
            float(scores[pid]),
            f"active at {100 * b_active[pid]:.0f}% of {b_n} behaviour positions (mean weight {b_weight[pid]:.3f}) "
            f"vs {100 * n_active[pid]:.0f}% of {n_n} neutral ones ({n_weight[pid]:.3f})"
            + (f", background weight {g_weight[pid]:.3f}" if background else ""),
            _examples(index, pid),
        )
        for pid in order
    ]
