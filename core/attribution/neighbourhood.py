"""Neighbourhood credit (level 0 of the design): a token's logit slices shared among its
prototypes' neighbourhoods in the index.

The slice of prototype j is shared among j's neighbourhood in proportion to similarity (its
non-negative part, normalised over the neighbourhood); a document's score is the sum of the
shares of its neighbour positions over all active prototypes (and, for a span, over its
tokens). What is attributed is the logit: the scores of all documents add up to it.

Similarity (``similarity="code"``, the default) is the cosine between the query's prototype
code and the neighbour's: each position's cosines with its k active prototypes, as a sparse
P-vector. Neighbours whose context activates the same prototypes as the query's take most of
the credit. ``similarity="key"`` uses cos(K_j, h_n), which gives every query the same shares:
on the planted-canary setup of tests/attribution/test_engine.py (64 or 128 prototypes, 3 seeds
each) it put no canary in the top 3, while the code put one first or second every time.

Credit is the *signed* slice. A negative slice (a prototype that pushed against the token)
gives its neighbours negative scores, so examples that opposed the prediction rank last, and
the scores of all documents add up to the logit (to the part of it whose prototypes have a
neighbour of positive similarity, which is the usual case for all of them). Using |slice|
would rank opposing examples as support and break that sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from core.attribution.ranking import rank_groups
from core.attribution.records import Example
from core.errors import ArgumentError
from core.index.format import PrototypeIndex

if TYPE_CHECKING:  # the engine imports this module
    from scipy.sparse import csr_matrix

    from core.attribution.engine import Query

MEASUREMENT = "logit slice"


@dataclass
class Credit:
    """Credit given to neighbour positions: (C,) position rows, prototypes and values."""

    rows: np.ndarray
    prototypes: np.ndarray
    values: np.ndarray

    @staticmethod
    def concat(parts: list[Credit]) -> Credit:
        return Credit(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("rows", "prototypes", "values")))


def unit_codes(index: PrototypeIndex) -> csr_matrix:
    """(R, P) scipy CSR matrix of the index positions' prototype codes: row t holds the cosines
    of t's k active prototypes, scaled to unit length (a row without cosines stays zero), so
    that one sparse product gives a query code's cosine to every neighbour's code."""
    from scipy.sparse import csr_matrix

    ids = index.positions["code_ids"]  # (R, k)
    cos = index.positions["code_cosine"].astype(np.float64)  # (R, k)
    norms = np.linalg.norm(cos, axis=1, keepdims=True)  # (R, 1)
    unit = np.divide(cos, norms, out=np.zeros_like(cos), where=norms > 0)
    R, k = ids.shape
    return csr_matrix((unit.ravel(), ids.ravel(), np.arange(0, R * k + 1, k)), shape=(R, index.num_prototypes))


def neighbourhood_credit(
    index: PrototypeIndex,
    prototype_ids: np.ndarray,
    slices: np.ndarray,
    query_cosine: np.ndarray,
    similarity: Literal["code", "key"] = "code",
    codes: csr_matrix | None = None,
) -> Credit:
    """Share each slice among its prototype's neighbourhood in proportion to similarity.

    Args:
        prototype_ids: (k,) active prototypes of one token.
        slices: (k,) their slices of the token's logit.
        query_cosine: (k,) cos(K_j, h_q) of the query's hidden state with each of them.
        similarity: ``code``: cosine between the query's prototype code and the neighbour's
            (the cosines to each position's k active prototypes, as sparse P-vectors), so
            that the neighbours whose context activates the same prototypes as the query's
            take most of the credit; ``key``: cos(K_j, h_n), the same shares for every query.
        codes: the index's :func:`unit_codes` (the engine keeps them per index); built here
            when not given.

    Returns:
        the credit of every neighbour position: slice_j * share_j(n), where share_j is the
        non-negative part of the similarity, normalised over j's neighbourhood.
    """
    rows = index.neighbour_row[prototype_ids]  # (k, M)
    filled = rows >= 0
    if similarity == "key":
        sim = np.clip(index.cosine[prototype_ids].astype(np.float64), 0, None)  # (k, M)
    elif similarity == "code":
        # cos(code of the query, code of each neighbour): one sparse product with the index's
        # unit-length codes; a dense gather of (k, M, k) entries per token cost 4x more at k=64.
        codes = unit_codes(index) if codes is None else codes
        query = np.zeros(index.num_prototypes)
        norm = np.linalg.norm(query_cosine)
        if norm > 0:
            query[prototype_ids] = query_cosine / norm  # (P,) unit code of the query
        sim = np.clip(codes[np.clip(rows, 0, None).ravel()] @ query, 0, None).reshape(rows.shape)  # (k, M)
    else:
        raise ArgumentError(f"unknown similarity {similarity!r}; choose code or key")
    sim = np.where(filled, sim, 0.0)
    totals = sim.sum(axis=1, keepdims=True)  # (k, 1)
    shares = np.divide(sim, totals, out=np.zeros_like(sim), where=totals > 0)  # (k, M), rows sum to 1 or 0
    values = slices.astype(np.float64)[:, None] * shares  # (k, M)
    keep = filled & (shares > 0)
    protos = np.broadcast_to(prototype_ids[:, None], rows.shape)
    return Credit(rows[keep].astype(np.int64), protos[keep].astype(np.int64), values[keep])


def rank_examples(index: PrototypeIndex, credit: Credit, top: int) -> list[Example]:
    """Sum credit per document and return the ``top`` documents, highest score first.

    Ties are broken by the document's row in the training split, so the order is stable.
    """
    # Documents are rows of documents.jsonl (thousands), so the ranker counts rather than sorts.
    ranking = rank_groups(
        index.positions["document"][credit.rows],
        credit.values,
        top,
        tiebreak=index.positions["doc_index"][credit.rows],
        size=len(index.documents),
    )
    if not len(ranking):
        return []
    best_row, n_rows = ranking.best(credit.rows)
    best_proto, _ = ranking.best(credit.prototypes)
    examples = []
    for r, total in enumerate(ranking.totals.tolist()):
        record = index.example(int(best_row[r]))
        del record["token_id"], record["next_token_id"]
        examples.append(Example(**record, score=total, prototype=int(best_proto[r]), positions=int(n_rows[r])))
    return examples


# ------------------------------------------------------------------ the engine's method


def credit(query: Query) -> list[Credit]:
    """One credit per completion token: its slices shared over the neighbourhoods."""
    similarity = query.options.get("similarity", "code")
    codes = query.codes() if similarity == "code" else None
    credits = []
    for token in query.decomposition.tokens:
        ids = np.array([p.id for p in token.prototypes], dtype=np.int64)
        slices = np.array([p.slice for p in token.prototypes], dtype=np.float64)
        cosines = np.array([p.cosine for p in token.prototypes], dtype=np.float64)
        credits.append(neighbourhood_credit(query.index, ids, slices, cosines, similarity, codes))
    return credits


def examples(query: Query, credits: list[Credit], top: int) -> list[list[Example]]:
    """The ranked examples of each credit."""
    return [rank_examples(query.index, c, top) for c in credits]
