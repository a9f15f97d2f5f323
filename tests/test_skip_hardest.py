"""mixtrain's ``skip_hardest``: a mixed epoch leaves out the samples with the highest fresh loss.

The references sort the losses in plain Python; epochs run through the real in-process service
(report, commit, plan), so "fresh" means what it means in training.
"""
from __future__ import annotations

import numpy as np
import pytest

from mixpipe.core.ledger import Ledger
from mixpipe.core.policies import make_plan
from mixpipe.core.policies.mixtrain import MixTrainSettings, epoch_forward_inputs
from mixpipe.core.policies.shrink import ShrinkSettings
from mixpipe.server import InProcessService


def run_epochs(settings, losses_by_epoch, seed=0):
    """Train nothing, report ``losses_by_epoch[e]`` for every sample the plan of epoch e holds,
    commit; return the plans."""
    n = losses_by_epoch[0].size
    svc = InProcessService(n, settings, seed=seed)
    plans = []
    for epoch, losses in enumerate(losses_by_epoch):
        plan = svc.plan(epoch)
        plans.append(plan)
        ids = plan.ids[plan.ids >= 0]
        svc.report(epoch, ids, losses[ids].astype(np.float32))
        svc.commit(epoch)
    return plans


def test_the_left_out_are_the_highest_fresh_losses_ties_in_id_order():
    n = 50
    losses = np.linspace(0.0, 1.0, n)
    losses[[3, 7, 11]] = 5.0  # three tied at the top
    s = MixTrainSettings(selection="lowest", schedule="constant", fraction=0.4, skip_hardest=0.1)
    plans = run_epochs(s, [losses, losses])
    assert plans[0].skipped.size == 0  # warm-up: nothing mixed, nothing left out
    want = sorted(range(n), key=lambda i: (-losses[i], i))[:5]
    assert sorted(plans[1].skipped.tolist()) == sorted(want) == [3, 7, 11, 48, 49]
    # the mixed fraction counts against the 45 kept samples: 18 of them, 4.5 quads rounded up
    kept = np.setdiff1d(np.arange(n), plans[1].skipped)
    mixed = plans[1].ids[plans[1].counts > 1].ravel()
    assert mixed.size == 4 * int(np.floor(0.4 * kept.size / 4 + 0.5)) == 20
    assert np.isin(mixed, kept).all()
    assert set(mixed.tolist()) == set(sorted(kept, key=lambda i: (losses[i], i))[:20])


def test_a_left_out_sample_comes_back_the_next_epoch():
    """Its loss is stale (not reported), so it is not left out again however high it was."""
    n = 40
    rng = np.random.default_rng(0)
    epochs = [rng.random(n) for _ in range(6)]
    s = MixTrainSettings(selection="lowest", schedule="constant", fraction=0.5, skip_hardest=0.2)
    plans = run_epochs(s, epochs)
    for before, after in zip(plans[1:], plans[2:]):
        assert before.skipped.size == after.skipped.size == 8
        assert np.intersect1d(before.skipped, after.skipped).size == 0
    # each epoch's left-out are the top 8 among the samples reported the epoch before
    for epoch in range(2, 6):
        fresh = np.setdiff1d(np.arange(n), plans[epoch - 1].skipped)
        top = sorted(fresh, key=lambda i: (-epochs[epoch - 1][i], i))[:8]
        assert sorted(plans[epoch].skipped.tolist()) == sorted(top)


@pytest.mark.parametrize("epochs,skip,share", [(8, 0.05, 0.0), (6, 0.3, 0.5), (5, 0.0, 0.0)])
def test_forward_inputs_of_real_epochs_are_the_counted_ones(epochs, skip, share):
    n = 501
    rng = np.random.default_rng(epochs)
    s = MixTrainSettings(selection="lowest", epochs=epochs, skip_hardest=skip, halves_share=share)
    plans = run_epochs(s, [rng.random(n) for _ in range(epochs)])
    for epoch, plan in enumerate(plans):
        assert plan.num_forward_inputs == epoch_forward_inputs(s, epoch, n), epoch


def test_nothing_is_left_out_where_nothing_is_mixed():
    s = MixTrainSettings(selection="lowest", epochs=4, final_full_epochs=1, schedule="constant", fraction=0.5,
                         skip_hardest=0.2)
    plans = run_epochs(s, [np.linspace(0, 1, 30)] * 4)
    assert [p.skipped.size for p in plans] == [0, 6, 6, 0]


def test_without_skip_hardest_the_plan_is_unchanged():
    ledger = Ledger(300)
    ledger.update(0, np.arange(300), np.random.default_rng(2).random(300).astype(np.float32))
    snap = ledger.snapshot()
    base = make_plan(snap, MixTrainSettings(selection="lowest", epochs=20), 4, 6)
    assert base.skipped.size == 0
    # a never-committed ledger has no fresh losses, so even a share leaves nothing out
    assert make_plan(snap, MixTrainSettings(selection="lowest", epochs=20, skip_hardest=0.1), 4, 6).equals(base)


def test_settings_refuse_out_of_range_and_skipping_policies_refuse_it_in_their_mix():
    with pytest.raises(ValueError, match=r"MixTrainSettings\.skip_hardest must lie in"):
        MixTrainSettings(selection="lowest", skip_hardest=0.6)
    with pytest.raises(ValueError, match=r"ShrinkSettings\.mix\.skip_hardest must be 0"):
        ShrinkSettings(mix=MixTrainSettings(selection="lowest", skip_hardest=0.1))
    with pytest.raises(ValueError, match=r"ShrinkSettings\.mix\.skip_hardest must be 0"):
        ShrinkSettings(mix={"skip_hardest": 0.1})
