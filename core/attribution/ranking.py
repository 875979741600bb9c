"""The one document ranker of every attribution method.

A method's credit is a list of C entries, each a value given to one document (through a
neighbour position, or through a (prototype, document) pair). :func:`rank_groups` sums the
values per document and keeps the ``top`` documents, highest total first, ties broken by a
stable key; :meth:`Ranking.best` then names, per ranked document, the position or prototype
that carried most of its credit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def best_per_group(
    group: np.ndarray, item: np.ndarray, values: np.ndarray, groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each group g < ``groups`` of (C,) parallel arrays: the item whose summed values are
    highest (ties: the smallest item), and the number of distinct items in the group.

    Used to name, for each ranked document, the position or prototype that carried its credit.
    """
    width = int(item.max()) + 1
    pairs, inverse = np.unique(group.astype(np.int64) * width + item, return_inverse=True)  # by group, item
    sums = np.bincount(inverse, weights=values)
    pair_group, pair_item = np.divmod(pairs, width)
    order = np.lexsort((-sums, pair_group))  # by group, highest sum first (stable: smallest item)
    first = order[np.unique(pair_group[order], return_index=True)[1]]
    best = np.zeros(groups, dtype=np.int64)
    best[pair_group[first]] = pair_item[first]
    return best, np.bincount(pair_group, minlength=groups)


@dataclass
class Ranking:
    """The top documents of a credit and the credit entries that reached them.

    Attributes:
        groups: (n,) the ranked documents' ids, best first.
        totals: (n,) their summed credit.
        entries: (E,) indices of the credit entries of the ranked documents, ascending.
        rank: (E,) the place of each such entry's document in the ranking.
        values: (E,) the entries' values.
    """

    groups: np.ndarray
    totals: np.ndarray
    entries: np.ndarray
    rank: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.groups)

    def best(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per ranked document: the item (of the (C,) ``items``, one per credit entry) with the
        highest summed credit (ties: the smallest item), and the number of distinct items."""
        return best_per_group(self.rank, items[self.entries], self.values, len(self.groups))


def rank_groups(
    group: np.ndarray,
    values: np.ndarray,
    top: int,
    tiebreak: np.ndarray | None = None,
    size: int = 0,
    distinct: bool = False,
) -> Ranking:
    """Sum (C,) ``values`` per (C,) ``group`` id and rank the ``top`` groups, highest sum first.

    Args:
        group: (C,) non-negative document id of each credit entry.
        values: (C,) their credit.
        top: documents kept (>= 1).
        tiebreak: (C,) a key per entry, equal within a group, that orders tied totals (lower
            first); None orders them by group id.
        size: a bound on the group ids, when known (skips a max over the entries).
        distinct: every group has one entry (a score per document): nothing to sum.

    Returns:
        the ranking; empty when there is no credit.
    """
    if len(values) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Ranking(empty, np.zeros(0), empty, empty, np.zeros(0))
    if distinct:  # each entry is its own group: nothing to sum
        groups, inverse, totals = group, np.arange(len(group)), np.asarray(values, dtype=np.float64)
    else:  # credited groups by counting, not sorting: a query's active prototypes can bring
        # hundreds of thousands of entries, but they fall on comparatively few documents
        counts = np.bincount(group, minlength=size)
        groups = np.flatnonzero(counts)  # (D,) credited groups, ascending
        inverse = np.cumsum(counts > 0)[group] - 1  # (C,) each entry's group among them
        totals = np.bincount(inverse, weights=values, minlength=len(groups))  # (D,)
    if tiebreak is None:
        key = groups
    else:
        key = np.empty(len(groups), dtype=tiebreak.dtype)
        key[inverse] = tiebreak  # (D,)
    candidates = np.arange(len(groups))
    if len(groups) > top:  # sort only the top scores and every tie with the last of them
        cut = np.partition(-totals, top - 1)[top - 1]
        candidates = np.flatnonzero(-totals <= cut)
    order = candidates[np.lexsort((key[candidates], -totals[candidates]))[:top]]  # (n,) ranked groups
    rank_of = np.full(len(groups), -1)
    rank_of[order] = np.arange(len(order))
    entries = np.flatnonzero(rank_of[inverse] >= 0)  # credit entries of the ranked groups
    return Ranking(groups[order], totals[order], entries, rank_of[inverse[entries]], values[entries])
