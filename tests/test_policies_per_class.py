"""mixtrain's per-class selection: the same mixed share in every class, lowest losses within."""
from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mixpipe.core.ledger import Ledger
from mixpipe.core.policies import make_plan
from mixpipe.core.policies.mixtrain import MixTrainSettings, lowest_per_class


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 300), st.integers(1, 6), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_quota_is_proportional_and_lowest_within_each_class(n, classes, seed, share) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    score = rng.integers(0, 5, n).astype(np.float32)  # many ties on purpose
    pool = rng.random(n) < 0.8
    available = int(pool.sum())
    take = int(round(share * available))
    mask = lowest_per_class(score, pool, take, labels)
    assert int(mask.sum()) == take and not (mask & ~pool).any()
    for c in range(classes):
        in_pool = pool & (labels == c)
        size = int(in_pool.sum())
        chosen = mask & (labels == c)
        # the class's share is within one sample of the overall share
        assert abs(int(chosen.sum()) - size * take / max(available, 1)) < 1 + 1e-9
        if chosen.any() and (in_pool & ~chosen).any():
            # nothing left out of the class has a lower loss than something chosen, and ties
            # at the cut go to the lower ids
            worst = score[chosen].max()
            assert score[in_pool & ~chosen].min() >= worst
            tied_out = np.flatnonzero(in_pool & ~chosen & (score == worst))
            tied_in = np.flatnonzero(chosen & (score == worst))
            if tied_out.size:
                assert tied_in.max() < tied_out.min()


def test_plan_mixes_every_class_alike_when_labels_are_known() -> None:
    n = 1000
    labels = np.arange(n) % 4
    losses = (labels * 10 + np.random.default_rng(0).random(n)).astype(np.float32)
    ledger = Ledger(n)
    ledger.update(0, np.arange(n), losses)
    snap = dataclasses.replace(ledger.snapshot(), labels=labels)
    mix = MixTrainSettings(selection="lowest", schedule="constant", fraction=0.5, layout="halves",
                           grid_cells=4, per_class=True)
    plan = make_plan(snap, mix, seed=1, epoch=1)
    mixed_ids = plan.ids[(plan.counts > 1)].ravel()
    mixed_ids = mixed_ids[mixed_ids >= 0]
    per_class = np.bincount(labels[mixed_ids], minlength=4)
    np.testing.assert_array_equal(per_class, [125, 125, 125, 125])
    # without per-class selection the lowest losses are all of class 0 and 1
    overall = make_plan(snap, dataclasses.replace(mix, per_class=False), seed=1, epoch=1)
    ids = overall.ids[overall.counts > 1].ravel()
    assert set(np.unique(labels[ids[ids >= 0]]).tolist()) == {0, 1}
    # and without labels per_class changes nothing
    no_labels = ledger.snapshot()
    assert make_plan(no_labels, mix, 1, 1).equals(
        make_plan(no_labels, dataclasses.replace(mix, per_class=False), 1, 1))
