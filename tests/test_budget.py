"""The equal-compute baseline: budget plans match forward inputs to the sample, and the
learning-rate schedule is spread over the shorter run."""
import math

import numpy as np
import pytest

from mixpipe.core.ledger import Ledger
from mixpipe.core.policies import make_plan
from mixpipe.core.policies.budget import BudgetSettings
from mixpipe.train.schedule import BudgetSchedule, Schedule


@pytest.mark.parametrize("n,epochs", [(1000, 11.0925), (997, 3.5), (64, 2.0), (50, 0.3)])
def test_budget_plans_train_exactly_the_budgets_inputs(n, epochs):
    snap = Ledger(n).snapshot()
    settings = BudgetSettings(epochs=epochs)
    plans = [make_plan(snap, settings, seed=3, epoch=e) for e in range(settings.run_epochs + 1)]
    slots = [p.num_forward_inputs for p in plans]
    assert settings.run_epochs == math.ceil(epochs)
    # whole epochs see everything, the partial one its rounded share, then nothing
    whole = int(epochs)
    assert slots[:whole] == [n] * whole
    assert sum(slots) == whole * n + round((epochs - whole) * n)
    assert slots[-1] == 0
    for plan in plans:  # every sample once: in a slot or skipped
        seen = np.concatenate([plan.ids[plan.ids >= 0], plan.skipped])
        assert np.array_equal(np.sort(seen), np.arange(n))
        assert np.all(plan.layout == 0)


def test_partial_epoch_is_a_seeded_random_subset():
    snap = Ledger(1000).snapshot()
    s = BudgetSettings(epochs=1.3)
    a = make_plan(snap, s, seed=0, epoch=1).ids.ravel()
    b = make_plan(snap, s, seed=0, epoch=1).ids.ravel()
    c = make_plan(snap, s, seed=1, epoch=1).ids.ravel()
    assert np.array_equal(a, b) and not np.array_equal(np.sort(a), np.sort(c))
    assert a.max() > 900 and a.min() < 100  # drawn from the whole dataset, not a prefix


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_budget_must_be_a_positive_finite_length(bad):
    with pytest.raises(ValueError, match="epochs"):
        BudgetSettings(epochs=bad)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_budget_schedule_follows_the_base_over_the_data_and_ends_at_zero(kind):
    budget = 2.5
    base = Schedule(kind)
    sched = BudgetSchedule(base, budget)
    run = sched.run_epochs
    assert run == 3
    # the loop's progress (epoch + step / steps) / run, with a half-size last epoch
    for epoch, step, steps in [(0, 0, 10), (0, 5, 10), (1, 7, 10), (2, 0, 5), (2, 3, 5)]:
        loop = (epoch + step / steps) / run
        data = epoch + (step / steps) * min(1.0, budget - epoch)  # epochs of data seen
        assert sched.factor(loop) == pytest.approx(base.factor(data / budget))
    assert sched.factor(1.0) == pytest.approx(0.0, abs=1e-12)
    # a whole-epoch budget is the base schedule itself
    whole = BudgetSchedule(base, 4.0)
    for t in np.linspace(0, 1, 17):
        assert whole.factor(t) == pytest.approx(base.factor(t))


def test_budget_schedule_refuses_an_empty_budget():
    with pytest.raises(ValueError, match="budget"):
        BudgetSchedule(Schedule(), 0.0)
