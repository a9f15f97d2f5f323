"""Budget: the plain model trained on a given number of epochs of data, possibly fractional.

The equal-compute baseline of every mixing method ("budgeted training"): instead of mixing, train
the unmixed model on as many forward inputs as the method uses. Where whole epochs do not match,
the last epoch is partial: a (seed, epoch)-random subset of the samples takes its slots and the
rest are skipped, so the run's forward inputs match to the sample instead of being rounded to
whole epochs. Epochs past the budget skip everything. The learning-rate schedule must be spread
over the shorter run too (:class:`mixpipe.train.schedule.BudgetSchedule`).

Example::

    >>> from mixpipe.core.ledger import Ledger
    >>> from mixpipe.core.policies import make_plan
    >>> snap = Ledger(10).snapshot()
    >>> [make_plan(snap, BudgetSettings(epochs=2.3), 0, e).num_slots for e in range(4)]
    [10, 10, 3, 0]
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..ledger import LedgerSnapshot
from ..plan import MixPlan
from . import PolicySettings, epoch_rng, register
from ._common import check_float

__all__ = ["BudgetSettings", "plan_budget", "samples_in_epoch", "whole_epochs"]


def whole_epochs(epochs: float) -> int:
    """Epochs a training loop runs for a budget of ``epochs`` (a partial last one counts)."""
    return max(1, math.ceil(epochs - 1e-9))


@dataclasses.dataclass(frozen=True)
class BudgetSettings(PolicySettings):
    """epochs: the run's length in epochs of data (> 0; 11.1 = eleven epochs and a tenth)."""

    name = "budget"

    epochs: float = 1.0

    def __post_init__(self) -> None:
        check_float(self, "epochs", 0.0, None, lo_open=True)

    @property
    def run_epochs(self) -> int:
        """Epochs the training loop runs (a partial last epoch counts as one)."""
        return whole_epochs(self.epochs)


def samples_in_epoch(settings: BudgetSettings, num_samples: int, epoch: int) -> int:
    """How many samples epoch ``epoch`` trains on: all, a rounded share, or none."""
    left = settings.epochs - epoch
    if left >= 1.0 - 1e-9:
        return num_samples
    if left <= 0.0:
        return 0
    return int(round(left * num_samples))


@register(BudgetSettings)
def plan_budget(snapshot: LedgerSnapshot, settings: BudgetSettings, seed: int,
                epoch: int) -> MixPlan:
    n = snapshot.num_samples
    order = epoch_rng(seed, epoch).permutation(n)
    take = samples_in_epoch(settings, n, epoch)
    plan = MixPlan.singles(n, epoch=epoch, seed=seed, order=order[:take])
    if take == n:
        return plan
    return MixPlan(plan.ids, plan.weights, plan.loss_scale, plan.layout,
                   np.sort(order[take:]).astype(np.int64), n, epoch, seed)
