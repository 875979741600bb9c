"""Exact-span attribution: the training documents that contain the completion verbatim.

Like OLMoTrace: the span index (:mod:`core.attribution.spans_index`, a suffix array over the
training tokens) finds, for every start in the prompt + completion tokens, the longest span
each training document contains. Verbatim memorisation is then shown directly, without the
model's internals: what is attributed is the text, not a logit or a loss.

Credit. A document's score for a completion token is the length, in tokens, of the longest
span of prompt + completion that covers the token and occurs verbatim in the document (the
prompt gives context: a span may start in it), or nothing when that span is shorter than
``min_span`` tokens (default :data:`MIN_SPAN`). Short spans are common words and punctuation
that occur everywhere; four tokens is where a span starts to name a passage.

Over a span of completion tokens (the whole completion by default) a document's score is the
*maximum* of its token scores: the longest verbatim span it shares with those tokens, in the
same unit. A sum would count a long span once per token it covers (its square) and let many
short, common spans outweigh one long one. Ties are broken by the number of the tokens the
document covers (``positions``), then by its row in the training split.

Examples have no prototype (``prototype = -1``); the snippet highlights the matched span in the
document, around its first occurrence there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from core.attribution.records import Example
from core.attribution.spans_index import SpanIndex, SpanMatches, load_spans
from core.errors import ArgumentError, PrototypeIndexError
from core.index.format import snippet_window
from core.store import rebuild_hint

if TYPE_CHECKING:  # the engine imports this module
    from core.attribution.engine import Query

MEASUREMENT = "verbatim span (tokens)"
MIN_SPAN = 4  # shortest span credited, in tokens


@dataclass
class SpanCredit:
    """Credit given to documents, one entry per (completion token, document), all (C,) int64.

    Attributes:
        doc: the document (row of the training split).
        length: the longest span covering the token that the document contains, in tokens.
        token: the completion token (0 = first completion token).
        start: start of that span in prompt + completion.
        occurrence: its first occurrence in the span index's tokens.
    """

    doc: np.ndarray
    length: np.ndarray
    token: np.ndarray
    start: np.ndarray
    occurrence: np.ndarray

    @staticmethod
    def concat(parts: list[SpanCredit]) -> SpanCredit:
        fields = ("doc", "length", "token", "start", "occurrence")
        if not parts:
            return SpanCredit(*(np.zeros(0, dtype=np.int64) for _ in fields))
        return SpanCredit(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def _first_per_doc(doc: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Indices of the first entry of each document after ordering by ``keys`` (most
    significant first); documents ascending."""
    order = np.lexsort((*reversed(keys), doc))
    return order[np.r_[True, doc[order][1:] != doc[order][:-1]]] if len(doc) else order


def token_credits(matches: SpanMatches, prompt_tokens: int, completion_tokens: int) -> list[SpanCredit]:
    """Per completion token: each document's longest matching span covering it.

    Args:
        matches: :meth:`SpanIndex.longest_matches` of prompt + completion.
        prompt_tokens, completion_tokens: the lengths of the two parts.

    Ties between spans of one length go to the earlier start.
    """
    credits = []
    for c in range(completion_tokens):
        p = prompt_tokens + c  # the token's place in prompt + completion
        covers = np.flatnonzero((matches.start <= p) & (matches.start + matches.length > p))
        doc, length, start = matches.doc[covers], matches.length[covers], matches.start[covers]
        best = covers[_first_per_doc(doc, -length, start)]
        n = len(best)
        credits.append(
            SpanCredit(
                matches.doc[best], matches.length[best], np.full(n, c, np.int64), matches.start[best],
                matches.occurrence[best],
            )
        )  # fmt: skip
    return credits


@dataclass
class RankedSpan:
    """A ranked document: its score (longest span), its best entry and the tokens it covers."""

    doc: int
    score: int
    entry: int
    positions: int


def rank_spans(credit: SpanCredit, top: int) -> list[RankedSpan]:
    """The ``top`` documents by their longest span (ties: more completion tokens covered, then
    the lower row of the training split)."""
    if not len(credit.doc):
        return []
    # The best entry per document: the longest span, then the earliest token, start, occurrence.
    best = _first_per_doc(credit.doc, -credit.length, credit.token, credit.start, credit.occurrence)  # (D,)
    docs = credit.doc[best]  # ascending
    pairs = np.unique(np.stack([credit.doc, credit.token]), axis=1)  # (2, distinct (doc, token))
    covered = np.bincount(np.searchsorted(docs, pairs[0]), minlength=len(docs))  # (D,)
    order = np.lexsort((docs, -covered, -credit.length[best]))[:top]
    return [
        RankedSpan(int(docs[r]), int(credit.length[best[r]]), int(best[r]), int(covered[r])) for r in order.tolist()
    ]


def describe(spans: SpanIndex, tokenizer, credit: SpanCredit, ranked: list[RankedSpan], cache: dict) -> list[Example]:
    """Examples for ranked documents, the matched span highlighted in a snippet of the text.

    The document is tokenised again (as at build time) for the span's character offsets;
    ``cache`` keeps those per document across the credits of one query.

    Raises:
        PrototypeIndexError: the tokenizer no longer gives the stored tokens.
    """
    examples = []
    for r in ranked:
        if r.doc not in cache:
            text = spans.document_text(r.doc)
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            if not np.array_equal(np.asarray(encoded["input_ids"]), spans.document_tokens(r.doc)):
                raise PrototypeIndexError(
                    f"the bundle's tokenizer does not give the tokens stored in {spans.path} for document "
                    f"{spans.doc_ids[r.doc]!r}; rebuild it with {rebuild_hint(spans.path.parent.parent)}"
                )
            cache[r.doc] = (text, encoded["offset_mapping"])
        text, offsets = cache[r.doc]
        first = int(credit.occurrence[r.entry] - spans.doc_starts[r.doc])  # token in the document
        begin = offsets[first][0]
        end = max(begin, offsets[first + r.score - 1][1])
        snippet, lo, hi = snippet_window(text, begin, end)
        examples.append(
            Example(
                doc_id=spans.doc_ids[r.doc],
                source=spans.sources[r.doc],
                score=float(r.score),
                snippet=snippet,
                highlight_start=lo,
                highlight_end=hi,
                prototype=-1,
                doc_index=r.doc,
                char_offset=begin,
                positions=r.positions,
            )
        )
    return examples


# ------------------------------------------------------------------ the engine's method


def span_index(query: Query) -> SpanIndex:
    """The index's span index (:func:`load_spans`), loaded on first use and kept per index."""
    from core.attribution.engine import derived

    return derived(query.index, "span index", lambda: load_spans(query.index.path.parent))


def check(query: Query) -> None:
    """Refuse a bad ``min_span`` and a missing or stale span index, before the forward pass.

    Raises:
        ArgumentError: ``min_span`` < 1.
        PrototypeIndexError: the span index is missing, or built for other weights or corpus.
    """
    min_span = query.options.get("min_span", MIN_SPAN)
    if not isinstance(min_span, int) or min_span < 1:
        raise ArgumentError(f"min_span must be a whole number of tokens >= 1, got {min_span!r}")
    spans = span_index(query)
    if spans.model_fingerprint != query.bundle.fingerprint:
        raise PrototypeIndexError(
            f"the span index was built for model {spans.model_fingerprint}, not this model "
            f"({query.bundle.fingerprint}); rebuild it with {rebuild_hint(query.bundle.path)}"
        )


def credit(query: Query) -> list[SpanCredit]:
    """One credit per completion token: each document's longest verbatim span covering it."""
    dec = query.decomposition
    sequence = [*dec.prompt_ids, *dec.completion_ids]
    matches = span_index(query).longest_matches(
        sequence, query.options.get("min_span", MIN_SPAN), reach=len(dec.prompt_ids)
    )
    return token_credits(matches, len(dec.prompt_ids), len(dec.completion_ids))


def examples(query: Query, credits: list[SpanCredit], top: int) -> list[list[Example]]:
    """The ranked examples of each credit, each document's text tokenised once per query."""
    spans, cache = span_index(query), {}
    return [describe(spans, query.bundle.tokenizer, c, rank_spans(c, top), cache) for c in credits]
