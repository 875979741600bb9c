"""Training-data attribution: completion tokens linked to training documents through the index.

:func:`attribute` decomposes the completion (:mod:`core.attribution.decompose`), then hands the
decomposition to an attribution *method* from :data:`REGISTRY`, which credits training
documents for each token; the credits of each token, and of the tokens of the span together,
are ranked into examples.

- ``neighbourhood`` (level 0 of the design, :mod:`core.attribution.neighbourhood`): the
  logit slice of prototype j is shared among j's neighbourhood in proportion to similarity.
- ``influence`` (level 1, :mod:`core.attribution.influence`): influence functions
  restricted to the prototype parameters; a document's score is the change of the attributed
  tokens' summed loss it explains, + = helpful, and its ``prototype`` is the block that
  carried most of it.
- ``spans`` (:mod:`core.attribution.spans`): exact-span matching, like OLMoTrace; a
  document's score is the length of the longest span of the prompt + completion covering the
  token that it contains verbatim (found in a suffix array over the training tokens).

A method is a :class:`Method` registered by name; a new one is a module with its credit and
ranking functions and one entry in :data:`REGISTRY`.

The engine also owns what methods derive from a loaded index (the neighbours' unit codes,
the influence factors): built once per index object behind a lock and kept beside it, so
the shared, read-only index (the explorer's sessions share one) is never written to and
later queries (a report's items, the explorer's requests) do not read the files again.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from core.attribution import neighbourhood, spans
from core.attribution.decompose import QueryTensors, decompose_with_tensors
from core.attribution.influence import method as influence_method
from core.attribution.influence.loading import load_influence
from core.attribution.influence.query import RANKINGS, InfluenceFactors
from core.attribution.records import Attribution, Decomposition, Example
from core.bundle import Bundle
from core.control.controls import Controls
from core.errors import ArgumentError, PrototypeIndexError
from core.generation import GenerationSettings
from core.index.format import PrototypeIndex
from core.store import rebuild_hint

T = TypeVar("T")


@dataclass(frozen=True)
class Method:
    """An attribution method.

    Attributes:
        measurement: what its scores attribute (``logit slice``, ``loss``), recorded in the
            result.
        credit: (query) -> one credit per completion token.
        concat: credits of several tokens -> one credit, for a span.
        examples: (query, credits, top) -> the ranked examples of each credit; for a method
            with ``harmful``, (query, credits, top, harmful=credit) -> the same lists and, last,
            the examples whose scores oppose that credit most (influence: the documents whose
            upweighting raises the loss), ranked in the same pass.
        check: (query) -> None, run before the forward pass; raises when the method cannot
            run on this bundle and index (influence factors missing or stale, say).
        harmful: whether the method's scores can be negative (it ranks harmful examples).
    """

    measurement: str
    credit: Callable[[Query], list[Any]]
    concat: Callable[[list[Any]], Any]
    examples: Callable[..., list[list[Example]]]
    check: Callable[[Query], None] | None = None
    harmful: bool = False


REGISTRY: dict[str, Method] = {
    "neighbourhood": Method(
        neighbourhood.MEASUREMENT, neighbourhood.credit, neighbourhood.Credit.concat, neighbourhood.examples
    ),
    "influence": Method(
        influence_method.MEASUREMENT,
        influence_method.credit,
        influence_method.InfluenceCredit.concat,
        influence_method.examples,
        influence_method.check,
        harmful=True,
    ),
    "spans": Method(spans.MEASUREMENT, spans.credit, spans.SpanCredit.concat, spans.examples, spans.check),
}
METHODS = tuple(REGISTRY)
AUTO = "auto"
# What "auto" tries, most faithful first: influence answers "which documents taught the model
# this", spans "which documents hold this text verbatim", neighbourhood only "what do the active
# prototypes stand for" (exemplars), so it is the fallback.
FAITHFULNESS = ("influence", "spans", "neighbourhood")


def _most_faithful(bundle: Bundle, index: PrototypeIndex, options: dict) -> str:
    """The first method of :data:`FAITHFULNESS` whose files this bundle has.

    A method whose files are absent is skipped; one whose files are present but damaged or
    stale is not: its check raises, naming the file, rather than another method answering in
    its place without a word.
    """
    from core.attribution.influence.query import influence_exists
    from core.attribution.spans_index import spans_exist

    query = Query(bundle, index, options)
    present = {
        "influence": lambda: options.get("influence") is not None or influence_exists(index.path.parent),
        "spans": lambda: spans_exist(index.path.parent),
    }
    for name in FAITHFULNESS:
        if name in present and not present[name]():
            continue
        check = REGISTRY[name].check
        if check is not None:
            check(query)
        return name
    return FAITHFULNESS[-1]


# ------------------------------------------------------------------- per-index resources

_lock = threading.Lock()
_derived: dict[tuple[int, str], Any] = {}


def derived(index: PrototypeIndex, name: str, build: Callable[[], T]) -> T:
    """``build()`` once per index object and ``name``, kept until the index is collected.

    Built under a lock, so concurrent sessions on one cached index build it once.
    """
    key = (id(index), name)
    with _lock:
        if key not in _derived:
            _derived[key] = build()
            weakref.finalize(index, _derived.pop, key, None)  # the id may be reused afterwards
        return _derived[key]


def neighbour_codes(index: PrototypeIndex):
    """The index's unit-length neighbour codes (:func:`core.attribution.neighbourhood.unit_codes`),
    built on first use."""
    return derived(index, "neighbour codes", lambda: neighbourhood.unit_codes(index))


def influence_factors(index: PrototypeIndex) -> InfluenceFactors:
    """The bundle's influence factors (:func:`core.attribution.influence.load_influence`), loaded
    on first use and kept for later queries on the same index.

    Raises:
        InfluenceError: no factors, or factors for other weights or corpus.
    """
    return derived(index, "influence factors", lambda: load_influence(index.path.parent))


@dataclass
class Query:
    """What a method gets: the bundle and index, the call's options and, once the forward pass
    ran, the decomposition and its tensors."""

    bundle: Bundle
    index: PrototypeIndex
    options: dict[str, Any] = field(default_factory=dict)
    decomposition: Decomposition | None = None
    tensors: QueryTensors | None = None

    def codes(self):
        """The index's neighbour codes (cached per index)."""
        return neighbour_codes(self.index)

    def influence(self) -> InfluenceFactors:
        """The factors given to :func:`attribute`, else the index's (cached per index)."""
        given = self.options.get("influence")
        return given if given is not None else influence_factors(self.index)


def attribute(
    bundle: Bundle,
    index: PrototypeIndex,
    prompt: str,
    completion: str | None = None,
    top: int = 10,
    method: Literal["auto", "neighbourhood", "influence", "spans"] = AUTO,
    span: tuple[int, int] | None = None,
    *,
    controls: Controls | None = None,
    max_new_tokens: int = 16,
    top_alternatives: int = 5,
    similarity: Literal["code", "key"] = "code",
    influence: InfluenceFactors | None = None,
    min_span: int = spans.MIN_SPAN,
    candidates: int | None = None,
    ranking: Literal["relative", "loss"] = "relative",
    generation: GenerationSettings | None = None,
    seed: int = 0,
) -> Attribution:
    """Attribute each completion token, and the completion as a whole, to training documents.

    Args:
        bundle: a PRISM bundle.
        index: its index (:func:`core.index.format.load_index`).
        prompt, completion: as in :func:`decompose`; without a completion, ``max_new_tokens``
            are generated first (with ``generation`` and ``seed``), and exactly those tokens
            are attributed.
        top: examples kept per token and overall.
        method: ``neighbourhood`` (slices shared among neighbourhoods), ``influence``
            (prototype-block influence functions, :mod:`core.attribution.influence`),
            ``spans`` (verbatim spans, :mod:`core.attribution.spans`) or ``auto`` (the
            default: the first of :data:`FAITHFULNESS` whose files the bundle has; the
            result's ``method`` says which ran).
        span: (start, end) completion token indices, end exclusive, for the overall ranking;
            None for the whole completion.
        controls: per-call gains and suppression.
        top_alternatives: alternative tokens decomposed per position.
        similarity: neighbourhood method only, see
            :func:`core.attribution.neighbourhood.neighbourhood_credit`.
        influence: loaded influence factors (default: the index's, loaded once when first needed).
        min_span: spans method only: the shortest verbatim span credited, in tokens.
        candidates: influence method only: documents scored exactly per ranking, found by
            their gradient sketches (None: the default; 0: every document; see
            :meth:`core.attribution.influence.InfluenceFactors.rank`).
        ranking: influence method only: ``relative`` (the default) ranks documents by their
            score over the norm of their gradient, ``loss`` by the score itself (the predicted
            loss change; see :data:`core.attribution.influence.query.RANKINGS`).
        generation: how a missing completion is generated (None:
            :data:`core.generation.DEFAULT_GENERATION`; :data:`core.generation.GREEDY`: plain greedy).
        seed: the sampling seed of that generation.

    Raises:
        ValueError: bad input (see :func:`decompose`).
        ArgumentError: an unknown method, a bad ``top`` or a bad span.
        PrototypeIndexError: the index (or the influence factors, or the span index) belong to
            another model; the span index (``spans``) is missing.
        InfluenceError: the influence factors are missing or stale.
    """
    if method == AUTO:
        method = _most_faithful(bundle, index, {"similarity": similarity, "influence": influence, "min_span": min_span})
    chosen = REGISTRY.get(method)
    if chosen is None:
        raise ArgumentError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)} or {AUTO}")
    if top < 1:
        raise ArgumentError(f"top must be >= 1, got {top}")
    hint = f"rebuild it with {rebuild_hint(bundle.path)}"
    if index.model_fingerprint != bundle.fingerprint:
        raise PrototypeIndexError(
            f"the index was built for model {index.model_fingerprint}, not this model ({bundle.fingerprint}); {hint}"
        )
    if index.num_prototypes != bundle.model.config.num_prototypes:
        raise PrototypeIndexError(
            f"the index has {index.num_prototypes} prototypes, the model {bundle.model.config.num_prototypes}; {hint}"
        )
    if candidates is not None and (not isinstance(candidates, int) or candidates < 0):
        raise ArgumentError(f"candidates must be an integer >= 0, got {candidates!r}")
    if ranking not in RANKINGS:
        raise ArgumentError(f"unknown ranking {ranking!r}; choose one of {', '.join(RANKINGS)}")
    options = {
        "similarity": similarity,
        "influence": influence,
        "min_span": min_span,
        "candidates": candidates,
        "ranking": ranking,
    }
    query = Query(bundle, index, options)
    if chosen.check is not None:
        chosen.check(query)
    query.decomposition, query.tensors = decompose_with_tensors(
        bundle, None, prompt, completion, top_alternatives, controls, max_new_tokens, generation, seed
    )
    n = len(query.decomposition.tokens)
    if span is not None:
        start, end = span
        if not 0 <= start < end <= n:
            raise ArgumentError(
                f"span {start}:{end} is not inside the completion's {n} tokens (0 <= start < end <= {n})"
            )
    start, end = span if span is not None else (0, n)
    credits = chosen.credit(query)
    whole = chosen.concat(credits[start:end])
    if chosen.harmful:
        *token_examples, overall, harmful = chosen.examples(query, [*credits, whole], top, harmful=whole)
    else:
        *token_examples, overall = chosen.examples(query, [*credits, whole], top)
        harmful = []
    return Attribution(
        model=str(bundle.path),
        model_fingerprint=bundle.fingerprint,
        method=method,
        measurement=chosen.measurement
        + (" (estimated from gradient sketches)" if method == "influence" and not query.influence().exact else ""),
        decomposition=query.decomposition,
        token_examples=token_examples,
        examples=overall,
        harmful=harmful,
        labels=dict(index.labels),
        span=tuple(span) if span is not None else None,
    )
