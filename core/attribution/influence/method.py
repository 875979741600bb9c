"""Influence as one of the attribution engine's methods (:mod:`core.attribution.engine`):
the factors checked against the model, each completion token's credit, and the ranked examples
of the tokens, the span and its harmful documents in one pass (:meth:`.query.InfluenceFactors.rank_many`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.attribution.influence.credit import InfluenceCredit, RankedDocument
from core.attribution.influence.query import MEASUREMENT
from core.attribution.records import Example
from core.errors import PrototypeIndexError
from core.store import rebuild_hint

if TYPE_CHECKING:  # the engine imports this module
    from core.attribution.engine import Query

__all__ = ["MEASUREMENT", "InfluenceCredit", "check", "credit", "examples"]


def check(query: Query) -> None:
    """Refuse factors built for other weights, before the forward pass.

    Raises:
        InfluenceError: the index's factors are missing or stale.
        PrototypeIndexError: the factors given belong to another model.
    """
    factors, bundle = query.influence(), query.bundle
    if factors.model_fingerprint != bundle.fingerprint:
        raise PrototypeIndexError(
            f"the influence factors were built for model {factors.model_fingerprint}, not this "
            f"model ({bundle.fingerprint}); rebuild it with {rebuild_hint(bundle.path)}"
        )


def credit(query: Query) -> list[InfluenceCredit]:
    """One credit per completion token: every stored document's influence on its loss."""
    t = query.tensors
    return query.influence().credit(query.bundle.model, t.hidden, t.ids, t.weights, t.targets, t.gains, t.probs)


def examples(
    query: Query, credits: list[InfluenceCredit], top: int, harmful: InfluenceCredit | None = None
) -> list[list[Example]]:
    """Ranked documents of each influence credit as examples, with the training token that
    carried most of the credit marked, and, given a ``harmful`` credit, last, the documents
    with the most negative influence on its loss, lowest first. All the rankings share one
    search, one pass over the store and one read of the corpus."""
    factors = query.influence()
    candidates, ranking = query.options.get("candidates"), query.options.get("ranking", "relative")
    requests = [*credits, *([harmful] if harmful is not None else [])]
    signs = [False] * len(credits) + [True] * (harmful is not None)
    ranked = factors.rank_many(requests, signs, top, candidates, ranking)
    records = iter(factors.describe([r for documents in ranked for r in documents]))
    return [[_example(next(records), r) for r in documents] for documents in ranked]


def _example(record: dict, r: RankedDocument) -> Example:
    return Example(**record, score=r.score, relative=r.relative, prototype=r.prototype, positions=r.entries)
