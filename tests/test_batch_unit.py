"""--batch-unit samples: a mixing arm's batch holds the plain batch's samples on average."""
from __future__ import annotations

import numpy as np
import pytest

from mixpipe.bench.speedup.combine import recorded_settings
from mixpipe.bench.speedup.settings import SpeedupSettings, arm_batch_size, arm_policy
from mixpipe.core.ledger import Ledger
from mixpipe.core.policies import make_plan
from mixpipe.core.policies.mixtrain import samples_per_slot


def _counted_samples_per_slot(settings, epochs: int, n: int) -> float:
    """Plans of a whole run on a ledger where every sample is reported each epoch."""
    ledger, samples, slots = Ledger(n), 0, 0
    rng = np.random.default_rng(0)
    for epoch in range(epochs):
        plan = make_plan(ledger.snapshot(), settings, seed=0, epoch=epoch)
        samples += int(plan.counts.sum())
        slots += plan.num_slots
        ledger.update(epoch, np.arange(n), rng.uniform(0.1, 2, n).astype(np.float32))
        ledger.committed_epoch = epoch
    return samples / slots


@pytest.mark.parametrize("extra", [{}, {"skip_hardest": 0.1}, {"layout": "halves"}])
def test_samples_per_slot_matches_the_plans(extra):
    s = SpeedupSettings(epochs=6, **extra)
    n = 2000
    mix = arm_policy("mixtrain", s)
    counted = _counted_samples_per_slot(mix, s.epochs, n)
    assert samples_per_slot(mix, s.epochs, n) == pytest.approx(counted, rel=2e-3)
    assert arm_batch_size("mixtrain", s, n) == round(s.batch_size / counted)


def test_plain_arms_and_the_slots_unit_keep_the_batch():
    s = SpeedupSettings(epochs=10)
    n = 45000
    for arm in ("none", "budget", "progressive", "shrink", "assist"):
        assert arm_batch_size(arm, s, n) == s.batch_size
    assert arm_batch_size("mixtrain", s, n) < s.batch_size
    # random mixes in mixtrain's forward inputs: the same steps
    assert abs(arm_batch_size("random", s, n) - arm_batch_size("mixtrain", s, n)) <= 1
    slots = SpeedupSettings(epochs=10, batch_unit="slots")
    assert arm_batch_size("mixtrain", slots, n) == slots.batch_size


def test_runs_recorded_before_the_unit_existed_read_as_slots():
    payload = {"settings": {"epochs": 10, "batch_size": 128}}
    assert recorded_settings(payload).batch_unit == "slots"
    with pytest.raises(ValueError, match="batch_unit"):
        SpeedupSettings(batch_unit="images")
