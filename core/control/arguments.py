"""The options of calibration, declared once (help text and bounds per field): the library, the
command line (``prism calibrate``) and the explorer's Calibrate page read them from here."""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import ArgumentError
from core.options import check_fields, option


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class CalibrationArguments:
    """How :func:`calibrate` fits a controller's gains (kept in ``CalibrationResult.settings``)."""

    holdout: float = option(0.3, "fraction of items kept for held-out accuracy")
    penalty: float = option(0.01, "L1 weight pulling every gain towards 1 (larger: fewer, smaller changes)", minimum=0)
    steps: int = option(150, "optimisation steps (minibatches of --batch-items items)", minimum=1)
    lr: float = option(0.05, "Adam learning rate on the gains", exclusive_minimum=0)
    tau: float = option(0.1, "temperature of the softmax over choice scores", exclusive_minimum=0)
    batch_items: int = option(64, "task items per optimisation step", minimum=1)
    dev: float = option(
        0.0,
        "fraction of the calibration items held back to pick the best step (early "
        "stopping); 0 fits on all of them and keeps the last step",
    )
    seed: int = option(0, "split and minibatch seed")

    def __post_init__(self) -> None:
        if _is_number(self.holdout) and not 0 < self.holdout < 1:
            raise ArgumentError(f"holdout must be a fraction between 0 and 1, got {self.holdout}")
        if _is_number(self.dev) and not 0 <= self.dev < 1:
            raise ArgumentError(f"dev must be a fraction in [0, 1), got {self.dev}")
        if _is_number(self.steps) and _is_number(self.batch_items) and (self.steps < 1 or self.batch_items < 1):
            raise ArgumentError(f"steps and batch_items must be >= 1, got {self.steps} and {self.batch_items}")
        check_fields(self, ArgumentError)
