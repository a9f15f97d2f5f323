"""Where loaders get plans from, and what they do when that fails.

Shared by every adapter so that the fallback (train unmixed, warn once) is the same everywhere.
"""
from __future__ import annotations

import warnings
from typing import Callable, Protocol

from .plan import MixPlan

__all__ = ["PlanSource", "FixedPlans", "UnmixedPlans", "fetch_plan", "warn_fallback"]


class PlanSource(Protocol):
    """Anything that hands out plans: a SelectionService, or a fixed plan in tests."""

    def plan(self, epoch: int, rank: int = 0, world_size: int = 1) -> MixPlan: ...


class FixedPlans:
    """A plan source that serves given plans by epoch (the last one repeats); for tests, demos."""

    def __init__(self, *plans: MixPlan) -> None:
        if not plans:
            raise ValueError("FixedPlans needs at least one plan")
        self.plans = plans
        self.num_samples = plans[0].num_samples

    def plan(self, epoch: int, rank: int = 0, world_size: int = 1) -> MixPlan:
        chosen = self.plans[min(epoch, len(self.plans) - 1)]
        plan = MixPlan(chosen.ids, chosen.weights, chosen.loss_scale, chosen.layout,
                       chosen.skipped, chosen.num_samples, epoch, chosen.seed)
        return plan if world_size == 1 else plan.shard(rank, world_size)


class UnmixedPlans:
    """Every sample alone, in index order: the no-mixing baseline, validation, and the fallback
    when the selection server cannot be reached."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples, self.seed = int(num_samples), int(seed)

    def plan(self, epoch: int, rank: int = 0, world_size: int = 1) -> MixPlan:
        plan = MixPlan.singles(self.num_samples, epoch=epoch, seed=self.seed)
        return plan if world_size == 1 else plan.shard(rank, world_size)


def warn_fallback(epoch: int, err: Exception) -> None:
    warnings.warn(f"mixpipe: could not fetch the plan for epoch {epoch} ({err!r}); training "
                  "without mixing until the selection server answers", RuntimeWarning,
                  stacklevel=4)


def fetch_plan(source: PlanSource, epoch: int, rank: int, world_size: int, num_samples: int,
               on_failure: Callable[[int, Exception], None] = warn_fallback) -> MixPlan:
    """The epoch's shard; on any failure of the source a no-mixing plan, so training goes on."""
    try:
        plan = source.plan(epoch, rank, world_size)
    except Exception as err:  # noqa: BLE001 - the server must never stop training
        on_failure(epoch, err)
        plan = UnmixedPlans(num_samples).plan(epoch, rank, world_size)
    if plan.num_samples != num_samples:
        raise ValueError(f"plan covers {plan.num_samples} samples but the dataset has "
                         f"{num_samples}: the server was started for another dataset")
    return plan
