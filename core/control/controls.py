"""The controller: per-prototype gains and suppression, as data passed per request.

A controller is held in a :class:`Controls` object (the class keeps its historical name) and
stored as a controls document, JSON::

    {"model_fingerprint": "...", "gains": {"12": 1.5, "40": 0.0}, "suppressed": [7, 9], "note": "..."}

It is never written into a model: :meth:`Controls.tensors` turns it into the per-call
``prototype_gains`` / ``suppressed_prototypes`` arguments of the model's forward and generate.
A gain of 0 zeroes a prototype's slice while it still occupies one of the k active places;
suppression removes it from the candidates, so the next prototype takes its place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core import store
from core.errors import ControlsError

# The largest gain a controller may hold. Gains scale prototype weights, and so logits, linearly:
# far beyond this the logits leave float32's range (1e38 gives inf and NaN probabilities) and
# long before it one prototype drowns every other; calibration moves gains by a few units.
MAX_GAIN = 100.0
MAX_ID_RANGE = 1_000_000  # ids one "lo-hi" range may name when the model's prototype count is unknown


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Controls:
    """A controller: the gains and suppressions applied to one request.

    Attributes:
        gains: prototype id -> gain in [0, MAX_GAIN] (absent ids keep gain 1).
        suppressed: prototype ids kept out of every active set.
        model_fingerprint: the bundle these controls were made for ("" = any).
        note: free text.
    """

    gains: dict[int, float] = field(default_factory=dict)
    suppressed: list[int] = field(default_factory=list)
    model_fingerprint: str = ""
    note: str = ""

    @property
    def is_empty(self) -> bool:
        return not self.suppressed and all(g == 1.0 for g in self.gains.values())

    def validate(self, num_prototypes: int, top_k: int, fingerprint: str | None = None) -> None:
        """Raise :class:`ControlsError` if these controls cannot apply to the given model."""
        if fingerprint and self.model_fingerprint and self.model_fingerprint != fingerprint:
            raise ControlsError(
                f"controls were made for model {self.model_fingerprint}, not this model ({fingerprint})"
            )
        for pid, gain in self.gains.items():
            if not 0 <= pid < num_prototypes:
                raise ControlsError(f"unknown prototype id {pid} in gains (the model has 0..{num_prototypes - 1})")
            if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain) or gain < 0:
                raise ControlsError(f"gain of prototype {pid} must be a finite number >= 0, got {_short(gain)}")
            if gain > MAX_GAIN:
                raise ControlsError(
                    f"gain of prototype {pid} is {gain:g}; gains range from 0 to {MAX_GAIN:g} "
                    "(larger ones overflow the logits)"
                )
        for pid in self.suppressed:
            if not 0 <= pid < num_prototypes:
                raise ControlsError(f"unknown prototype id {pid} in suppressed (the model has 0..{num_prototypes - 1})")
        if len(set(self.suppressed)) > num_prototypes - top_k:
            raise ControlsError(f"at most {num_prototypes - top_k} prototypes can be suppressed")

    def tensors(self, num_prototypes: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor | None]:
        """The per-call model arguments: {"prototype_gains", "suppressed_prototypes"}, on ``device``
        (the model's): built on the host and copied once, not written entry by entry on a GPU."""
        gains = None
        if any(g != 1.0 for g in self.gains.values()):
            gains = torch.ones(num_prototypes)  # (P,) float32
            gains[list(self.gains)] = torch.tensor(list(self.gains.values()), dtype=torch.float32)
            gains = gains.to(device)
        mask = None
        if self.suppressed:
            mask = torch.zeros(num_prototypes, dtype=torch.bool)  # (P,)
            mask[list(self.suppressed)] = True
            mask = mask.to(device)
        return {"prototype_gains": gains, "suppressed_prototypes": mask}

    def to_json(self) -> dict:
        return {
            "model_fingerprint": self.model_fingerprint,
            "gains": {str(k): v for k, v in sorted(self.gains.items())},
            "suppressed": sorted(set(self.suppressed)),
            "note": self.note,
        }

    @classmethod
    def from_json(cls, data: object) -> Controls:
        """Parse a controls document, raising :class:`ControlsError` on a malformed one."""
        if not isinstance(data, dict):
            raise ControlsError("a controls document is a JSON object")
        unknown = set(data) - {"model_fingerprint", "gains", "suppressed", "note"}
        if unknown:
            raise ControlsError(f"unknown keys in controls: {sorted(unknown)}")
        raw_gains = data.get("gains", {})
        if not isinstance(raw_gains, dict):
            raise ControlsError('"gains" must be an object {prototype id: gain}')
        gains = {}
        for key, value in raw_gains.items():
            try:
                pid = int(key)
            except ValueError:
                raise ControlsError(f"prototype id {_short(key)} in gains is not an integer") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ControlsError(f"gain of prototype {pid} must be a number, got {_short(value)}")
            gains[pid] = float(value)
        suppressed = data.get("suppressed", [])
        if not isinstance(suppressed, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in suppressed
        ):
            raise ControlsError('"suppressed" must be a list of prototype ids')
        return cls(
            gains=gains,
            suppressed=list(suppressed),
            model_fingerprint=str(data.get("model_fingerprint", "")),
            note=str(data.get("note", "")),
        )


def control_kwargs(
    controls: Controls | None, model, fingerprint: str | None, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """Validated per-call model arguments for ``controls`` ({} when there is nothing to apply).

    Args:
        model: the PrismForCausalLM the controls will be applied to (it is not modified).
        fingerprint: the bundle's model fingerprint, checked against the controls' own.
    """
    if controls is None or controls.is_empty:
        return {}
    controls.validate(model.config.num_prototypes, model.config.prototype_top_k, fingerprint)
    return {k: v for k, v in controls.tensors(model.config.num_prototypes, device).items() if v is not None}


def load_controls(path: str | Path) -> Controls:
    """Read a controller from a controls JSON file."""
    p = Path(path)
    if not p.is_file():
        raise ControlsError(f"controls file not found: {p}")
    return Controls.from_json(store.read_json(p, "controls file", error=ControlsError))


def save_controls(controls: Controls, path: str | Path) -> None:
    """Write a controller to a controls JSON file atomically."""
    store.write_json(path, controls.to_json(), indent=2)


def parse_ids(text: str, num_prototypes: int | None = None) -> list[int]:
    """Parse "3,17,40-42" into [3, 17, 40, 41, 42].

    Args:
        text: comma-separated ids and inclusive ``lo-hi`` ranges.
        num_prototypes: the model's P; every id must lie in 0..P-1 (checked before a range is
            expanded). Without it a range may name at most :data:`MAX_ID_RANGE` ids.

    Raises:
        ControlsError: unreadable text, or an id out of range.
    """
    ids: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
            else:
                lo = hi = int(part)
        except ValueError:
            raise ControlsError(f"cannot read prototype ids from {_short(part)} (use e.g. 3,17,40-42)") from None
        if num_prototypes is not None and hi >= num_prototypes:
            raise ControlsError(
                f"prototype id {hi} in {_short(part)} is out of range: the model has 0..{num_prototypes - 1}"
            )
        if hi - lo >= MAX_ID_RANGE:
            raise ControlsError(f"the range {_short(part)} names {hi - lo + 1} ids; at most {MAX_ID_RANGE} at once")
        ids.extend(range(lo, hi + 1))
    return ids
