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

__all__ = ["Schedule"]

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
