"""Learning-rate schedules indexed by training progress, not by step number.

A mixing policy changes the number of steps per epoch from one epoch to the next, so a schedule
over steps would give each arm of a comparison a different learning rate at the same epoch.
Indexing by progress (epochs done, fractional within an epoch) gives every arm the same rate at
the same point of the data, and it reaches zero at the end: small runs with a constant rate end
wherever the last noisy steps left them (docs/design.md, known traps).
"""
from __future__ import annotations

import dataclasses
import math

from ..core.policies.budget import whole_epochs

__all__ = ["Schedule", "BudgetSchedule"]

_KINDS = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """kind: 'cosine' or 'linear' decay to zero, or 'constant'; warmup: share of the run spent
    ramping linearly from 0 to the base rate, in [0, 1)."""

    kind: str = "cosine"
    warmup: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Schedule.kind must be one of {_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"Schedule.warmup must lie in [0, 1), got {self.warmup}")

    def factor(self, progress: float) -> float:
        """Multiplier on the base rate at ``progress`` in [0, 1] (clamped)."""
        t = min(max(float(progress), 0.0), 1.0)
        if self.warmup and t < self.warmup:
            return t / self.warmup
        if self.kind == "constant":
            return 1.0
        rest = (t - self.warmup) / (1.0 - self.warmup)
        if self.kind == "linear":
            return 1.0 - rest
        return 0.5 * (1.0 + math.cos(math.pi * rest))


@dataclasses.dataclass(frozen=True)
class BudgetSchedule:
    """A schedule spread over a run of ``budget`` epochs of data, fractional ones included.

    The training loop measures progress in whole epochs of its loop (``epoch + step / steps``
    over ``ceil(budget)`` epochs), but a partial last epoch covers only ``budget - floor(budget)``
    of the data. Mapping loop progress to data progress makes the rate reach zero exactly at the
    end of the budget and follow ``base`` over the data in between, as a run planned for that
    length would.
    """

    base: Schedule
    budget: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"BudgetSchedule.budget must be a positive number of epochs, got "
                             f"{self.budget!r}")

    @property
    def kind(self) -> str:
        return self.base.kind

    @property
    def run_epochs(self) -> int:
        return whole_epochs(self.budget)

    def data_progress(self, progress: float) -> float:
        """Share of the budget's data seen at loop ``progress`` in [0, 1]."""
        t = min(max(float(progress), 0.0), 1.0) * self.run_epochs
        epoch = min(int(t), self.run_epochs - 1)
        share = min(1.0, self.budget - epoch)
        return min((epoch + (t - epoch) * share) / self.budget, 1.0)

    def factor(self, progress: float) -> float:
        return self.base.factor(self.data_progress(progress))
