"""A query's credit and a ranked document: the two values an influence query passes around
(:mod:`.query` computes and ranks them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from core.attribution.influence.query import InfluenceFactors


@dataclass
class InfluenceCredit:
    """The credit of one or more query tokens: their pairs psi_j = A_j g_qj, g_qj summed over
    the tokens. Documents are scored from it when asked: :meth:`InfluenceFactors.rank` (the
    retrieval tier, then exact scores of its candidates) or :attr:`scores` (every document,
    exactly).

    Attributes:
        prototypes: (m,) the query's distinct active prototypes.
        psi: (m, 2d) A_j g_qj of each.
        root: (m, 2d) A_j^{1/2} g_qj of each, whose sketch estimates the scores (:mod:`.sketch`).
        factors: the factors that score it.
        parts: the credits it is the sum of (:meth:`concat`); scored with them, its scores are
            theirs summed (scores are linear in psi), so the store is read once for their pairs.
    """

    prototypes: np.ndarray
    psi: torch.Tensor
    root: torch.Tensor
    factors: InfluenceFactors | None = None
    parts: tuple[InfluenceCredit, ...] = field(default=(), repr=False, compare=False)
    _exact: tuple[np.ndarray, np.ndarray] | None = None
    _sketch: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (m,) its query sketch

    @property
    def scores(self) -> np.ndarray:
        """(D,) I(q, D) of every stored document, + = helpful, - = harmful (one bulk scan)."""
        return self._every_document()[0]

    @property
    def terms(self) -> np.ndarray:
        """(D,) (position, prototype) terms each document shares with the query; 0: none. Scored
        through its :attr:`parts`, a term counts once per part whose prototypes hold it."""
        return self._every_document()[1]

    def _every_document(self) -> tuple[np.ndarray, np.ndarray]:
        if self._exact is None:
            scores, terms = self.factors.exact_scores(self)
            self._exact = (scores, terms)
        return self._exact

    @staticmethod
    def concat(parts: list[InfluenceCredit]) -> InfluenceCredit:
        """The credit of several tokens together: psi summed per prototype (scores are linear in it)."""
        if not parts:
            return InfluenceCredit(np.zeros(0, dtype=np.int64), torch.zeros(0, 0), torch.zeros(0, 0))
        ids = np.concatenate([p.prototypes for p in parts])
        prototypes, inverse = np.unique(ids, return_inverse=True)
        inverse = torch.from_numpy(inverse)

        def summed(rows: list[torch.Tensor]) -> torch.Tensor:
            stacked = torch.cat(rows)  # (sum m, 2d)
            return torch.zeros(len(prototypes), stacked.shape[1], dtype=stacked.dtype).index_add_(0, inverse, stacked)

        psi, root = summed([p.psi for p in parts]), summed([p.root for p in parts])
        return InfluenceCredit(prototypes, psi, root, parts[0].factors, tuple(parts))


@dataclass
class RankedDocument:
    """A training document's influence: its score I(q, D), its relative score I(q, D) /
    ||g_D||_A, the prototype that carried most of it, the span of its training token that
    carried most of it, and the number of the query's prototypes it shares."""

    doc_index: int
    score: float
    relative: float
    prototype: int
    start: int
    end: int
    entries: int
