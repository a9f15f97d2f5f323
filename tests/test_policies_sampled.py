"""mixtrain's sampled selection: the draw's statistics, determinism and the plan invariants."""
from __future__ import annotations

import numpy as np
import pytest

from mixpipe.core.ledger import Ledger
from mixpipe.core.policies import make_plan
from mixpipe.core.policies.mixtrain import MixTrainSettings, sampled_order


def _snapshot(n: int, seed: int = 0):
    ledger = Ledger(n)
    losses = np.random.default_rng(seed).permutation(np.linspace(0.05, 3.0, n)).astype(
        np.float32)
    ledger.update(0, np.arange(n), losses)
    return ledger.snapshot(), losses


def test_taking_the_lowest_of_the_order_is_a_weighted_draw():
    # one sample taken: Gumbel top-1 picks i with probability w_i / sum(w), w = (1 - q) ** a
    n, power, draws = 5, 2.0, 20000
    score = np.array([0.3, 0.1, 0.5, 0.2, 0.4])
    q = np.argsort(np.argsort(score)) / n
    w = (1 - q) ** power
    rng = np.random.default_rng(1)
    picks = np.bincount([int(np.argmin(sampled_order(score, np.ones(n, bool), power, rng)))
                         for _ in range(draws)], minlength=n)
    assert picks / draws == pytest.approx(w / w.sum(), abs=0.012)


def test_order_outside_the_pool_comes_last_and_power_zero_is_uniform():
    score = np.arange(6, dtype=float)
    pool = np.array([1, 1, 0, 1, 0, 1], bool)
    out = sampled_order(score, pool, 3.0, np.random.default_rng(0))
    assert np.isinf(out[~pool]).all() and np.isfinite(out[pool]).all()
    rng = np.random.default_rng(2)
    firsts = np.bincount([int(np.argmin(sampled_order(score, np.ones(6, bool), 0.0, rng)))
                          for _ in range(12000)], minlength=6)
    assert firsts / 12000 == pytest.approx(np.full(6, 1 / 6), abs=0.015)


def test_sampled_plans_mix_easy_samples_more_often_but_not_always():
    n, epochs = 400, 40
    snap, losses = _snapshot(n)
    s = MixTrainSettings(schedule="constant", fraction=0.5, layout="halves",
                         selection="sampled", ease_power=1.0)
    lowest = MixTrainSettings(schedule="constant", fraction=0.5, layout="halves")
    mixed = np.zeros(n)
    for e in range(1, epochs + 1):
        plan = make_plan(snap, s, seed=3, epoch=e)
        ids = plan.ids[plan.counts == 2].ravel()
        assert ids.size == make_plan(snap, lowest, seed=3, epoch=e).ids[
            make_plan(snap, lowest, seed=3, epoch=e).counts == 2].size  # same forward inputs
        mixed[ids] += 1
        # plan invariants: every sample exactly once
        seen = np.concatenate([plan.ids[plan.counts >= k, k - 1] for k in (1, 2)])
        assert np.array_equal(np.sort(seen), np.arange(n))
    rate = mixed / epochs
    order = np.argsort(losses)
    easiest, hardest = rate[order[:n // 10]].mean(), rate[order[-n // 10:]].mean()
    assert easiest > 0.75 and hardest < 0.2
    assert rate.max() < 1.0  # nobody is mixed in every epoch by rule
    # deterministic per (seed, epoch), different across epochs
    a = make_plan(snap, s, seed=3, epoch=5)
    assert np.array_equal(a.ids, make_plan(snap, s, seed=3, epoch=5).ids)
    assert not np.array_equal(a.ids, make_plan(snap, s, seed=3, epoch=6).ids)


def test_selection_setting_is_checked():
    with pytest.raises(ValueError, match="selection"):
        MixTrainSettings(selection="best")
    with pytest.raises(ValueError, match="ease_power"):
        MixTrainSettings(ease_power=-1.0)
