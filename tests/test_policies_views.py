"""mixtrain's view-calibrated ranking: the state, the ranks within each view, and the plans."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mixpipe.core.ledger import Ledger
from mixpipe.core.policies import check_policy_state, make_plan, make_plan_with_state
from mixpipe.core.policies.mixtrain import MixTrainSettings
from mixpipe.core.policies.views import ViewState, mixed_mask, view_quantiles


def test_calibration_is_the_default():
    assert MixTrainSettings().calibrate


def test_state_round_trips_and_refuses_foreign_bytes():
    mixed = np.array([1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0], bool)
    state = ViewState(7, mixed)
    back = ViewState.from_bytes(state.to_bytes(), mixed.size)
    assert back.epoch == 7 and np.array_equal(back.mixed, mixed)
    with pytest.raises(ValueError, match="another dataset"):
        ViewState.from_bytes(state.to_bytes(), 40)
    with pytest.raises(ValueError, match="bad header"):
        ViewState.from_bytes(b"XXXX" + state.to_bytes()[4:], mixed.size)
    settings = MixTrainSettings(calibrate=True)
    with pytest.raises(ValueError):
        check_policy_state(settings, b"\x00" * 3, mixed.size)


def test_ranks_are_taken_within_each_view():
    ledger = Ledger(6)
    ledger.update(0, np.arange(6), np.array([0.1, 0.2, 0.3, 1.0, 2.0, 3.0], np.float32))
    snap = ledger.snapshot()
    # the last plan (epoch 0) mixed samples 0-2: their small losses rank among themselves
    state = ViewState(0, np.array([1, 1, 1, 0, 0, 0], bool))
    q = view_quantiles(snap.last_loss, snap, state)
    assert q == pytest.approx([0, 1 / 3, 2 / 3, 0, 1 / 3, 2 / 3])
    # a report older than the remembered plan counts as a single image's
    older = ViewState(1, state.mixed)
    assert view_quantiles(snap.last_loss, snap, older) == pytest.approx(
        np.arange(6) / 6)
    # unseen samples get no rank
    fresh = Ledger(3).snapshot()
    assert np.isnan(view_quantiles(fresh.last_loss, fresh, None)).all()


def _losses_after(plan, rng):
    """Reported losses as a shrunk view reports them: constituents at a third of their loss."""
    base = rng.uniform(0.2, 2.0, plan.num_samples).astype(np.float32)
    return np.where(mixed_mask(plan), base / 3, base).astype(np.float32), base


def test_calibration_stops_a_deflated_view_from_keeping_samples_mixed():
    n, rng = 800, np.random.default_rng(0)
    plain = MixTrainSettings(schedule="constant", fraction=0.5, layout="halves", calibrate=False,
                             selection="lowest")
    calibrated = dataclasses.replace(plain, calibrate=True)
    stays = {}
    for name, settings in (("plain", plain), ("calibrated", calibrated)):
        ledger, state = Ledger(n), None
        ledger.update(0, np.arange(n), rng.uniform(0.2, 2.0, n).astype(np.float32))
        ledger.committed_epoch = 0
        stay = []
        for epoch in range(1, 6):
            plan, state = make_plan_with_state(ledger.snapshot(), settings, 0, epoch, state)
            reported, _ = _losses_after(plan, rng)
            ledger.update(epoch, np.arange(n), reported)
            ledger.committed_epoch = epoch
            nxt, _ = make_plan_with_state(ledger.snapshot(), settings, 0, epoch + 1, state)
            stay.append(mixed_mask(nxt)[mixed_mask(plan)].mean())
        stays[name] = float(np.mean(stay))
    # jointly ranked, a third of a loss wins nearly every place again; within views, a mixed
    # sample stays mixed about as often as half the data is mixed
    assert stays["plain"] > 0.75
    assert stays["calibrated"] == pytest.approx(0.5, abs=0.08)


def test_without_calibration_there_is_no_state_and_plans_are_unchanged():
    ledger = Ledger(50)
    ledger.update(0, np.arange(50), np.linspace(0.1, 2, 50).astype(np.float32))
    s = MixTrainSettings(calibrate=False)
    plan, state = make_plan_with_state(ledger.snapshot(), s, 1, 1, None)
    assert state is None
    assert np.array_equal(plan.ids, make_plan(ledger.snapshot(), s, 1, 1).ids)
    # with it, the first plan (no state yet) ranks as the plain policy does
    cal, state = make_plan_with_state(ledger.snapshot(), dataclasses.replace(s, calibrate=True),
                                      1, 1, None)
    assert np.array_equal(cal.ids, plan.ids)
    assert np.array_equal(ViewState.from_bytes(state, 50).mixed, mixed_mask(cal))
