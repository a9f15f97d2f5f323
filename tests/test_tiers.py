"""Tiered mixing (``halves_share``): the hardest samples single, the middle ones in halves, the
easiest in quads. References are computed here from the losses with plain Python sorting; every
plan goes through ``make_plan`` and so through validate()."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixpipe.core.ledger import Ledger
from mixpipe.core.plan import Layout
from mixpipe.core.policies import make_plan
from mixpipe.core.policies.mixtrain import (MixTrainSettings, epoch_forward_inputs,
                                            tier_groups)
from mixpipe.core.policies.shrink import ShrinkSettings

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def snapshot(losses, seen=None, labels=None):
    losses = np.asarray(losses, np.float32)
    ledger = Ledger(losses.size)
    ids = np.arange(losses.size) if seen is None else np.flatnonzero(seen)
    ledger.update(0, ids, losses[ids])
    snap = ledger.snapshot()
    return snap if labels is None else dataclasses.replace(snap, labels=np.asarray(labels))


def tiered(**kw) -> MixTrainSettings:
    return MixTrainSettings(selection="lowest", **{"schedule": "constant", "fraction": 0.6, "halves_share": 1 / 3,
                               **kw})


def rows_of(plan, layout: Layout) -> np.ndarray:
    return plan.ids[plan.layout == layout]


def reference_tiers(losses, seen, fraction, share):
    """(quads ids, halves ids) from a sort by (loss, id): the counts written out by hand."""
    seen_ids = [i for i in range(len(losses)) if seen[i]]
    by_loss = sorted(seen_ids, key=lambda i: (float(np.float32(losses[i])), i))
    wanted = fraction * len(losses)
    pairs = math.floor(share * wanted / 2 + 0.5)
    quads = min(max(math.floor((wanted - 2 * pairs) / 4 + 0.5), 0), len(seen_ids) // 4)
    pairs = min(pairs, (len(seen_ids) - 4 * quads) // 2)
    return set(by_loss[:4 * quads]), set(by_loss[4 * quads:4 * quads + 2 * pairs])


@FAST
@given(losses=st.lists(st.floats(0.0, 5.0, width=32) | st.sampled_from([0.3, 1.0]),
                       min_size=0, max_size=150),
       data=st.data())
def test_tiers_take_the_easiest_into_quads_the_next_into_halves(losses, data):
    n = len(losses)
    seen = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    fraction = data.draw(st.floats(0.0, 1.0))
    share = data.draw(st.floats(0.0, 1.0))
    plan = make_plan(snapshot(losses, seen), tiered(fraction=fraction, halves_share=share),
                     seed=data.draw(st.integers(0, 2**31)), epoch=1)
    want_quads, want_halves = reference_tiers(losses, seen, fraction, share)
    quads, halves = rows_of(plan, Layout.QUADS), rows_of(plan, Layout.HALVES)
    assert set(quads.ravel().tolist()) == want_quads
    assert (halves[:, 2:] == -1).all() and (halves[:, :2] >= 0).all()
    assert set(halves[:, :2].ravel().tolist()) == want_halves
    # padding of the narrower tier carries neither weight nor loss
    pad = plan.ids == -1
    assert (plan.weights[pad] == 0).all() and (plan.loss_scale[pad] == 0).all()
    assert (plan.loss_scale[~pad] == 1).all()
    singles = plan.ids[plan.layout == Layout.SINGLE, 0]
    assert plan.num_slots == n - 3 * len(want_quads) // 4 - len(want_halves) // 2
    assert sorted(np.concatenate([quads.ravel(), halves[:, :2].ravel(), singles]).tolist()) == \
        list(range(n))
    assert plan.num_forward_inputs == n - 3 * (len(want_quads) // 4) - len(want_halves) // 2


def test_tiers_are_ordered_by_loss_on_a_concrete_epoch():
    losses = np.arange(40, dtype=np.float32)[::-1] / 10  # sample 39 is the easiest
    plan = make_plan(snapshot(losses), tiered(fraction=0.6, halves_share=1 / 3), 3, 1)
    # 24 mixed samples: 8 in 4 pairs, 16 in 4 quads
    assert sorted(rows_of(plan, Layout.QUADS).ravel().tolist()) == list(range(24, 40))
    assert sorted(rows_of(plan, Layout.HALVES)[:, :2].ravel().tolist()) == list(range(16, 24))
    assert sorted(plan.ids[plan.layout == Layout.SINGLE, 0].tolist()) == list(range(16))
    # inside a pair the harder sample gets the larger half (losses 1.6 .. 2.3, w_min 0.25)
    for ids, w in zip(rows_of(plan, Layout.HALVES), plan.weights[plan.layout == Layout.HALVES]):
        assert (w[0] >= w[1]) == (losses[ids[0]] >= losses[ids[1]])


def test_tiers_interleave_with_singles_along_the_walk():
    plan = make_plan(snapshot(np.linspace(0.0, 2.0, 400)), tiered(fraction=0.6), 5, 1)
    half = plan.num_slots // 2
    for layout in (Layout.SINGLE, Layout.HALVES, Layout.QUADS):
        where = np.flatnonzero(plan.layout == layout)
        assert where.min() < half <= where.max(), layout  # spread, not bunched at one end


def test_without_a_halves_share_the_plan_is_the_single_tier_one():
    """halves_share=0 must not change a byte of the plans the headlines were measured with."""
    from mixpipe.core.policies._common import groups_for_fraction

    losses = np.random.default_rng(1).random(1001).astype(np.float32)
    base = MixTrainSettings(selection="lowest", epochs=20)
    assert tier_groups(base, 0.7, 1001, 1001) == [(4, Layout.QUADS,
                                                   groups_for_fraction(0.7, 1001, 4, 1001))]
    plan = make_plan(snapshot(losses), base, 7, 5)
    assert set(plan.layout.tolist()) == {int(Layout.SINGLE), int(Layout.QUADS)}
    assert plan.ids.shape[1] == 4


@pytest.mark.parametrize("epochs,share", [(20, 1 / 3), (7, 0.5), (5, 1.0)])
def test_epoch_forward_inputs_match_the_real_plans(epochs, share):
    n = 997
    s = MixTrainSettings(selection="lowest", epochs=epochs, halves_share=share)
    snap = snapshot(np.random.default_rng(epochs).random(n))
    for e in range(epochs):
        assert epoch_forward_inputs(s, e, n) == make_plan(snap, s, 0, e).num_forward_inputs


def test_a_halves_share_with_another_layout_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"halves_share needs layout='quads'.*set halves_share=0"):
        MixTrainSettings(selection="lowest", layout="halves", halves_share=0.3)
    with pytest.raises(ValueError, match=r"MixTrainSettings\.halves_share must lie in"):
        MixTrainSettings(selection="lowest", halves_share=1.5)


def test_shrink_mixes_its_kept_samples_in_tiers():
    losses = np.linspace(0.0, 3.0, 300).astype(np.float32)
    s = ShrinkSettings(prune_ratio=0.5, statistic="last",
                       mix=tiered(fraction=0.6, statistic="last"))
    plan = make_plan(snapshot(losses), s, 2, 1)
    kept = np.setdiff1d(np.arange(300), plan.skipped)
    quads = rows_of(plan, Layout.QUADS).ravel()
    halves = rows_of(plan, Layout.HALVES)[:, :2].ravel()
    assert quads.size and halves.size
    assert np.intersect1d(np.concatenate([quads, halves]), plan.skipped).size == 0
    # the kept samples' lowest losses go to quads, the next to halves, the rest single
    singles = np.setdiff1d(kept, np.concatenate([quads, halves]))
    assert losses[quads].max() <= losses[halves].min() <= losses[halves].max() <= \
        losses[singles].min()


def test_per_class_tiers_take_each_tier_class_by_class():
    labels = np.repeat(np.arange(3), 40)
    losses = np.concatenate([np.linspace(0, 1, 40), np.linspace(5, 6, 40),
                             np.linspace(9, 10, 40)]).astype(np.float32)
    s = tiered(fraction=0.6, per_class=True, halves_share=0.4)
    plan = make_plan(snapshot(losses, labels=labels), s, 0, 1)
    for layout in (Layout.QUADS, Layout.HALVES):
        members = rows_of(plan, layout)
        members = members[members >= 0]
        counts = np.bincount(labels[members], minlength=3)
        assert counts.max() - counts.min() <= 1, (layout, counts)
