"""The session's controls as one immutable value, and its undo/redo history (pure Python).

Every page and the sidebar render from ``ControlHistory.present``; it changes only when the
analyst acts (a slider or toggle callback, a table edit, load, reset, apply calibration, undo,
redo), each time as a new value committed to the history. Widgets never hold the truth: their
value is set from the present value on every run, so a widget that Streamlit dropped and
re-created cannot bring back a value the analyst did not set (issue 17, item 1).

Rule when a prototype is both suppressed and gained: **suppression wins**. core masks the
suppressed prototypes out of the candidates before the top-k choice (``Controls.tensors`` ->
``suppressed_prototypes``), so a suppressed prototype is never active and its gain, which only
multiplies the weights of active prototypes, has no effect. The gain is kept (un-suppressing
brings it back) and the app says so wherever such a prototype is shown.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from core import Controls, ControlsError

HISTORY_LIMIT = 200  # undo steps kept per session


def _number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _gain(prototype: int, value: object) -> float:
    if not _number(value):
        raise ControlsError(f"gain of prototype {prototype} must be a number, got {value!r}")
    gain = float(value)
    if math.isnan(gain) or math.isinf(gain) or gain < 0:
        raise ControlsError(f"gain of prototype {prototype} must be a finite number >= 0, got {value!r}")
    return gain


def _prototype(value: object) -> int:
    if not _number(value) or not math.isfinite(value) or int(value) != value or value < 0:
        raise ControlsError(f"a prototype id is a whole number >= 0, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ControlSet:
    """Gains and suppressions, immutable; a gain of 1 is no control and is not stored.

    Attributes:
        gain_items: ((prototype id, gain), ...) sorted by id, every gain != 1.
        suppressed: prototype ids kept out of every active set.
    """

    gain_items: tuple[tuple[int, float], ...] = ()
    suppressed: frozenset[int] = frozenset()

    @classmethod
    def of(cls, gains: Mapping[int, float] | None = None, suppressed: Iterable[int] = ()) -> ControlSet:
        """A normalised value (gains of 1 dropped); raises ControlsError on a bad id or gain."""
        items = {}
        for key, value in (gains or {}).items():
            prototype = _prototype(key)
            gain = _gain(prototype, value)
            if gain != 1.0:
                items[prototype] = gain
        return cls(tuple(sorted(items.items())), frozenset(_prototype(j) for j in suppressed))

    @classmethod
    def from_core(cls, controls: Controls) -> ControlSet:
        return cls.of(controls.gains, controls.suppressed)

    def to_core(self, fingerprint: str = "") -> Controls:
        """A fresh core.Controls (what generation and attribution take)."""
        return Controls(gains=self.gains, suppressed=sorted(self.suppressed), model_fingerprint=fingerprint)

    @cached_property
    def _gain_of(self) -> dict[int, float]:
        # built once per value: a table of 1,000 rows asks ``gain`` per row, and a dict per call
        # made a run of the Steer page with 1,000 gains spend 0.07-0.15 s in ``gain`` alone
        return dict(self.gain_items)

    @property
    def gains(self) -> dict[int, float]:
        """A copy of {prototype id: gain} (ids with gain 1 absent)."""
        return dict(self._gain_of)

    @property
    def is_empty(self) -> bool:
        return not self.gain_items and not self.suppressed

    @property
    def ids(self) -> list[int]:
        """Every prototype that carries a gain or is suppressed, ascending."""
        return sorted({j for j, _ in self.gain_items} | self.suppressed)

    @property
    def conflicts(self) -> list[int]:
        """Prototypes both suppressed and gained (suppression wins: the gain has no effect)."""
        return sorted(j for j, _ in self.gain_items if j in self.suppressed)

    def gain(self, prototype: int) -> float:
        """The gain of ``prototype`` (1 when it has none), in constant time."""
        return self._gain_of.get(int(prototype), 1.0)

    def with_gain(self, prototype: int, gain: float) -> ControlSet:
        return ControlSet.of(self.gains | {int(prototype): gain}, self.suppressed)

    def with_gains(self, gains: Mapping[int, float]) -> ControlSet:
        """These gains added (replacing the same ids' gains); suppressions kept."""
        return ControlSet.of(self.gains | {int(k): v for k, v in gains.items()}, self.suppressed)

    def with_suppressed(self, prototype: int, on: bool) -> ControlSet:
        j = int(prototype)
        return ControlSet(self.gain_items, self.suppressed | {j} if on else self.suppressed - {j})

    def without(self, prototypes: Iterable[int]) -> ControlSet:
        """These prototypes reset: gain 1 and not suppressed."""
        drop = {int(j) for j in prototypes}
        return ControlSet(tuple((j, g) for j, g in self.gain_items if j not in drop), self.suppressed - drop)

    def describe(self, limit: int = 6) -> str:
        """A short one-line summary: counts and the first ``limit`` entries."""
        if self.is_empty:
            return "none (the model as trained)"
        parts = [f"#{j}×{g:g}" for j, g in self.gain_items[:limit]]
        more = len(self.gain_items) - limit
        text = plural(len(self.gain_items), "gain")
        if parts:
            text += ": " + ", ".join(parts) + (f" and {more:,} more" if more > 0 else "")
        text += f" · {plural(len(self.suppressed), 'suppressed prototype')}"
        shown = sorted(self.suppressed)[:limit]
        if shown:
            text += ": " + ", ".join(f"#{j}" for j in shown)
            text += f" and {len(self.suppressed) - limit:,} more" if len(self.suppressed) > limit else ""
        return text


@dataclass(frozen=True)
class ControlHistory:
    """The present ControlSet with what came before (undo) and after (redo), immutable.

    ``serial`` grows with every change, undo and redo included, and is never reused: widgets
    whose whole state derives from the present value (the controls table) carry it in their key,
    so that a change made anywhere gives them a fresh state.
    """

    present: ControlSet = field(default_factory=ControlSet)
    past: tuple[tuple[ControlSet, str], ...] = ()  # (value before, action that left it), oldest first
    future: tuple[tuple[ControlSet, str], ...] = ()  # (value after, action that led to it), next first
    serial: int = 0

    def commit(self, value: ControlSet, action: str) -> ControlHistory:
        """The history after the analyst's ``action`` set ``value`` (itself when nothing changes)."""
        if value == self.present:
            return self
        past = (*self.past, (self.present, action))[-HISTORY_LIMIT:]
        return ControlHistory(value, past, (), self.serial + 1)

    @property
    def can_undo(self) -> bool:
        return bool(self.past)

    @property
    def can_redo(self) -> bool:
        return bool(self.future)

    @property
    def undo_action(self) -> str | None:
        return self.past[-1][1] if self.past else None

    @property
    def redo_action(self) -> str | None:
        return self.future[0][1] if self.future else None

    def undo(self) -> ControlHistory:
        if not self.past:
            return self
        value, action = self.past[-1]
        return ControlHistory(value, self.past[:-1], ((self.present, action), *self.future), self.serial + 1)

    def redo(self) -> ControlHistory:
        if not self.future:
            return self
        value, action = self.future[0]
        return ControlHistory(value, (*self.past, (self.present, action)), self.future[1:], self.serial + 1)


def table_rows(value: ControlSet, labels: Mapping[int, str] | None = None) -> list[dict]:
    """One row per controlled prototype: id, label, true gain, suppressed, and the rule's note."""
    gains = value.gains
    rows = []
    for j in value.ids:
        gained, suppressed = j in gains, j in value.suppressed
        rows.append(
            {
                "prototype": j,
                "label": (labels or {}).get(j, ""),
                "gain": gains.get(j, 1.0),
                "suppressed": suppressed,
                "note": "suppressed: gain has no effect" if gained and suppressed else "",
            }
        )
    return rows


def edited_table(rows: Sequence[Mapping], edit: Mapping) -> list[dict]:
    """The table's rows after an edit of ``st.data_editor``, from its editing state.

    Args:
        rows: the rows as the table was drawn (their order is the one the positions refer to,
            whatever column the analyst sorted the view by).
        edit: the editor's state: "edited_rows" {position: {column: value}}, "deleted_rows"
            [position, ...] and "added_rows" [{column: value}, ...].
    """
    changed = edit.get("edited_rows") or {}
    deleted = set(edit.get("deleted_rows") or [])
    kept = [dict(row) | dict(changed.get(i, {})) for i, row in enumerate(rows) if i not in deleted]
    return kept + [dict(row) for row in edit.get("added_rows") or []]


def apply_table(value: ControlSet, shown: Iterable[int], rows: Iterable[Mapping]) -> ControlSet:
    """The controls after editing the table that showed the prototypes ``shown``.

    ``rows`` are the table's rows after the edit (keys "prototype", "gain", "suppressed"). A
    shown prototype whose row is gone is reset; a row's values replace its prototype's controls;
    prototypes that were not shown (filtered out) are untouched. Raises ControlsError on a bad
    row (an empty id, a negative gain, an id twice).
    """
    result = value.without(shown)
    seen: set[int] = set()
    gains: dict[int, float] = {}
    suppressed: set[int] = set(result.suppressed)
    for row in rows:
        raw = row.get("prototype")
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            if _blank(row.get("gain")) and not _ticked(row.get("suppressed")):
                continue  # an added row left empty
            raise ControlsError("a row has no prototype id: type one, or delete the row")
        j = _prototype(raw)
        if j in seen:
            raise ControlsError(f"prototype {j} is in the table twice: keep one row")
        seen.add(j)
        gain = 1.0 if _blank(row.get("gain")) else _gain(j, row.get("gain"))
        gains[j] = gain
        if _ticked(row.get("suppressed")):
            suppressed.add(j)
        else:
            suppressed.discard(j)
    return ControlSet.of(result.gains | gains, suppressed)


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _ticked(value: object) -> bool:
    """A checkbox cell: True only when ticked (an added row's empty cell is None or NaN)."""
    return not _blank(value) and bool(value)


def plural(n: int, noun: str, many: str | None = None) -> str:
    """'1 prototype', '2 prototypes', '1,024 prototypes' (``many`` for irregular plurals)."""
    return f"{n:,} {noun if n == 1 else (many or noun + 's')}"
