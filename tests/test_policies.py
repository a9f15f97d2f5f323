"""Selection policies (random, mixtrain, shrink): their rules checked as properties.

References are computed here from the ledger snapshot with plain numpy / Python, independently of
the policies' vectorised code; every plan goes through ``make_plan`` and so through validate().
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixpipe.core.layouts import snap_weights
from mixpipe.core.ledger import Ledger, LedgerSnapshot
from mixpipe.core.plan import Layout
from mixpipe.core.policies import make_plan, settings_from_dict
from mixpipe.core.policies._common import snap_shares
from mixpipe.core.policies.mixtrain import MixTrainSettings

#: the settings these rule tests were written for (a constant share of HALVES ranked by the
#: EMA); the library's defaults are tested on their own at the end of this file
CLASSIC = dict(schedule="constant", fraction=0.5, statistic="ema", layout="halves",
               grid_cells=7)


def classic(**kw) -> MixTrainSettings:
    """MixTrainSettings with the classic rules unless ``kw`` says otherwise (w_min as the
    classic default: half an equal share)."""
    merged = {**CLASSIC, **kw}
    if "w_min" not in kw:
        k = kw.get("group_size") or {"quads": 4}.get(merged["layout"], 2)
        merged["w_min"] = 0.5 / k
    return MixTrainSettings(selection="lowest", **merged)
from mixpipe.core.policies.random import RandomSettings
from mixpipe.core.policies.shrink import ShrinkSettings

LAYOUT_CODE = {"halves": Layout.HALVES, "quads": Layout.QUADS, "blend": Layout.BLEND}
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------ helpers
def snapshot_of(losses, seen=None, history=None) -> LedgerSnapshot:
    """A real ledger fed through ``update``: ``history`` (earlier epochs) then ``losses``."""
    losses = np.asarray(losses, np.float32)
    n = losses.size
    seen = np.ones(n, bool) if seen is None else np.asarray(seen, bool)
    ledger = Ledger(n, ema_decay=0.5)
    ids = np.flatnonzero(seen)
    for epoch, old in enumerate(history or []):
        ledger.update(epoch, ids, np.asarray(old, np.float32)[ids])
    ledger.update(len(history or []), ids, losses[ids])
    return ledger.snapshot()


def composites(plan):
    """[(ids, weights, loss_scale, layout)] of the slots with more than one constituent."""
    rows = np.flatnonzero(plan.counts > 1)
    return [plan.slot(int(r)) for r in rows]


def assert_snapped(w, layout, ref, cells):
    """``w`` equals snap_weights(ref), except where ref sits within rounding error of a cell
    boundary (the policy computes l^g / sum in another order, so the last bit may differ)."""
    want = snap_weights(layout, ref, cells)
    if np.array_equal(w, want):
        return
    r = np.asarray(ref, np.float64) / np.sum(ref)
    splits = [r[0]] if layout == Layout.HALVES else [r[0] + r[2], r[0] + r[1]]
    near = [abs(x * cells + 0.5 - round(x * cells + 0.5)) < 1e-9 for x in splits]
    assert any(near), (w, want, ref)


def mixed_ids(plan) -> np.ndarray:
    return np.sort(plan.ids[plan.counts > 1].ravel())


def expected_groups(fraction: float, base: int, k: int, pool: int) -> int:
    return max(0, min(int(math.floor(fraction * base / k + 0.5)), pool // k))


def reference_shares(losses, gamma: float, w_min: float) -> np.ndarray:
    """Per-row Python reference: shares ~ l^g; pairs clipped to [w_min, 1 - w_min]; larger groups
    lift every share to w_min, the deficit taken from the shares above w_min in proportion to
    their excess."""
    out = []
    for row in np.asarray(losses, np.float64):
        k = len(row)
        top = max(float(x) for x in row)  # l^g / sum(l^g) == (l/top)^g / sum((l/top)^g),
        p = [(float(x) / top) ** gamma for x in row] if top > 0 else [0.0] * k  # no underflow
        total = sum(p)
        p = [x / total for x in p] if total > 0 else [1.0 / k] * k
        if k == 2:
            a = min(max(p[0], w_min), 1 - w_min)
            out.append([a, 1 - a])
            continue
        excess = [max(x - w_min, 0.0) for x in p]
        if sum(excess) == 0:
            out.append([1.0 / k] * k)
        else:
            out.append([w_min + e * (1 - k * w_min) / sum(excess) for e in excess])
    return np.array(out)


losses_st = st.lists(st.sampled_from([0.0, 0.05, 0.3, 0.3, 0.7, 1.0, 1.5, 2.5, 4.0]) |
                     st.floats(0.0, 10.0, width=32), min_size=0, max_size=120)


# ------------------------------------------------------------------------------ mixtrain: which
@FAST
@given(losses=losses_st, data=st.data())
def test_mixtrain_mixes_exactly_the_lowest_share_of_the_seen(losses, data):
    n = len(losses)
    seen = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    layout = data.draw(st.sampled_from(["halves", "quads", "blend"]))
    k = 4 if layout == "quads" else data.draw(st.sampled_from([2, 4])) if layout == "blend" else 2
    fraction = data.draw(st.floats(0.0, 1.0))
    s = classic(fraction=fraction, layout=layout, group_size=k, w_min=0.0,
                         grid_cells=data.draw(st.integers(2, 9)))
    snap = snapshot_of(losses, seen)
    plan = make_plan(snap, s, seed=data.draw(st.integers(0, 2**32 - 1)), epoch=1)
    score = np.asarray(losses, np.float32)

    groups = expected_groups(fraction, n, k, int(seen.sum()))
    mixed = mixed_ids(plan)
    assert mixed.size == groups * k
    assert np.unique(mixed).size == mixed.size
    assert seen[mixed].all(), "a never-seen sample was mixed"
    rest = np.setdiff1d(np.flatnonzero(seen), mixed)
    if mixed.size and rest.size:
        assert score[mixed].max() <= score[rest].min()
    assert plan.num_slots == n - groups * (k - 1)
    assert (plan.counts[plan.counts > 1] == k).all()
    assert set(plan.layout[plan.counts > 1].tolist()) <= {int(LAYOUT_CODE[layout])}
    assert plan.skipped.size == 0 and (plan.loss_scale[plan.ids >= 0] == 1).all()


def test_mixtrain_ranks_by_the_chosen_statistic():
    rng = np.random.default_rng(3)
    old, new = rng.random(200), rng.random(200)
    snap = snapshot_of(new, history=[old])
    for stat, column in (("last", snap.last_loss), ("ema", snap.ema)):
        plan = make_plan(snap, classic(fraction=0.3, statistic=stat), 0, 2)
        want = np.sort(np.argsort(column, kind="stable")[:60])
        np.testing.assert_array_equal(mixed_ids(plan), want)
    assert not np.array_equal(np.argsort(snap.last_loss)[:60], np.argsort(snap.ema)[:60])


def test_unseen_samples_are_never_mixed_even_when_the_schedule_wants_more():
    losses = np.linspace(0.1, 1.0, 100)
    seen = np.zeros(100, bool)
    seen[::3] = True  # 34 seen
    plan = make_plan(snapshot_of(losses, seen), classic(fraction=1.0), 5, 3)
    assert np.array_equal(mixed_ids(plan), np.flatnonzero(seen)[:34])
    assert plan.num_slots == 100 - 17
    empty = Ledger(50).snapshot()
    plan = make_plan(empty, classic(fraction=1.0, warmup_epochs=0), 5, 3)
    assert (plan.counts == 1).all() and plan.num_slots == 50


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_warmup_and_final_full_epochs_are_single_only(warmup):
    snap = snapshot_of(np.random.default_rng(0).random(64))
    s = classic(fraction=0.5, warmup_epochs=warmup, epochs=10, final_full_epochs=2)
    for epoch in range(12):
        plan = make_plan(snap, s, 1, epoch)
        single_only = bool((plan.counts == 1).all())
        assert single_only == (epoch < warmup or epoch >= 8), epoch
        assert plan.max_constituents == (1 if single_only else 2)


# ------------------------------------------------------------------------------ mixtrain: weights
@FAST
@given(data=st.data())
def test_pair_weights_follow_the_loss_ratio_clipped_then_snapped(data):
    n = data.draw(st.integers(2, 80))
    losses = np.array(data.draw(st.lists(st.floats(0.0, 5.0, width=32), min_size=n,
                                         max_size=n)), np.float32)
    gamma = data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.5]))
    w_min = data.draw(st.floats(0.0, 0.5))
    cells = data.draw(st.integers(2, 16))
    layout = data.draw(st.sampled_from(["halves", "blend"]))
    s = classic(fraction=1.0, gamma=gamma, w_min=w_min, grid_cells=cells, layout=layout)
    plan = make_plan(snapshot_of(losses), s, data.draw(st.integers(0, 99)), 1)
    for ids, w, _, lay in composites(plan):
        ref = reference_shares(losses[ids][None, :], gamma, w_min)[0]
        assert w_min - 1e-9 <= ref[0] <= 1 - w_min + 1e-9
        if lay == Layout.BLEND:
            np.testing.assert_allclose(w, ref, rtol=0, atol=1e-6)
            assert w.min() >= np.float32(w_min) - 1e-6
        else:
            assert_snapped(w, Layout.HALVES, ref, cells)
        if gamma == 0 or w_min == 0.5:
            continue  # loss-blind shares: equal halves, an odd grid gives the first the extra cell
        if losses[ids[0]] > losses[ids[1]]:
            assert w[0] >= w[1]
        elif losses[ids[0]] < losses[ids[1]]:
            assert w[0] <= w[1]


@FAST
@given(data=st.data())
def test_quad_weights_keep_the_loss_order_and_the_floor(data):
    n = data.draw(st.integers(4, 80))
    losses = np.array(data.draw(st.lists(st.floats(0.0, 5.0, width=32), min_size=n,
                                         max_size=n)), np.float32)
    gamma = data.draw(st.sampled_from([0.5, 1.0, 2.0]))
    w_min = data.draw(st.floats(0.0, 0.25))
    cells = data.draw(st.integers(2, 12))
    layout = data.draw(st.sampled_from(["quads", "blend"]))
    s = classic(fraction=1.0, layout=layout, group_size=4, gamma=gamma, w_min=w_min,
                         grid_cells=cells)
    plan = make_plan(snapshot_of(losses), s, 7, 2)
    assert len(composites(plan)) == n // 4
    for ids, w, _, lay in composites(plan):
        ref = reference_shares(losses[ids][None, :], gamma, w_min)[0]
        assert np.all(ref >= w_min - 1e-9) and abs(ref.sum() - 1) < 1e-9
        if lay == Layout.BLEND:
            np.testing.assert_allclose(w, ref, rtol=0, atol=1e-6)
        else:
            # the ids come sorted by share, largest top-left, and the areas are the snapped grid
            assert np.all(np.diff(ref) <= 1e-12)
            assert_snapped(w, Layout.QUADS, ref, cells)
        l = losses[ids]
        for a in range(4):
            for b in range(4):
                if l[a] > l[b]:
                    assert w[a] >= w[b] - 1e-7


@pytest.mark.parametrize("layout,k,cells", [("halves", 2, 4), ("halves", 2, 8), ("quads", 4, 4),
                                            ("blend", 2, 7), ("blend", 4, 7)])
def test_equal_losses_give_equal_shares(layout, k, cells):
    snap = snapshot_of(np.full(40, 0.8))
    s = classic(fraction=1.0, layout=layout, group_size=k, grid_cells=cells)
    plan = make_plan(snap, s, 0, 1)
    for _, w, _, _ in composites(plan):
        np.testing.assert_allclose(w, np.full(k, 1.0 / k), atol=1e-7)
    assert len(composites(plan)) == 40 // k


def test_higher_loss_gets_the_larger_half_on_a_concrete_pair():
    plan = make_plan(snapshot_of([0.5, 1.5]),
                     classic(fraction=1.0, w_min=0.1, grid_cells=8), 0, 1)
    ids, w, _, _ = composites(plan)[0]
    share = dict(zip(ids.tolist(), w.tolist()))
    assert share[1] == 0.75 and share[0] == 0.25  # 1.5 / 2.0 = 0.75 = 6 of 8 cells


@FAST
@given(rows=st.lists(st.lists(st.floats(0.001, 1.0), min_size=4, max_size=4), min_size=1,
                     max_size=30), cells=st.integers(2, 15))
def test_vectorised_snapping_matches_the_layouts_reference(rows, cells):
    w = np.array(rows)
    for layout, cols in ((Layout.HALVES, 2), (Layout.QUADS, 4), (Layout.BLEND, 4)):
        got = snap_shares(layout, w[:, :cols], cells)
        want = np.stack([snap_weights(layout, r, cells) for r in w[:, :cols]])
        np.testing.assert_allclose(got, want, rtol=0, atol=0 if layout != Layout.BLEND else 1e-7)


# ------------------------------------------------------------------------------ mixtrain: schedule
@pytest.mark.parametrize("k,layout", [(2, "halves"), (4, "quads"), (4, "blend")])
@pytest.mark.parametrize("n", [997, 1000, 4096])
def test_slot_count_matches_the_promised_speedup(k, layout, n):
    snap = snapshot_of(np.random.default_rng(n).random(n))
    for s in np.linspace(1.0, k, 9):
        plan = make_plan(snap, classic(schedule="speedup", speedup=float(s),
                                                layout=layout, group_size=k), 2, 4)
        assert abs(plan.num_slots - n / s) <= (k - 1) / 2 + 1e-9 or \
            plan.num_slots == n - (n // k) * (k - 1)  # s = K asks for more than n//K groups
        assert abs(plan.speedup_bound - s) <= s * s * ((k - 1) / 2 + 1) / n


def test_speedup_is_clipped_to_what_the_seen_samples_allow():
    seen = np.arange(1000) < 300
    plan = make_plan(snapshot_of(np.ones(1000), seen),
                     classic(schedule="speedup", speedup=1.9), 0, 1)
    assert plan.num_slots == 1000 - 150


def test_constant_and_ramp_schedules():
    n = 1000
    snap = snapshot_of(np.random.default_rng(1).random(n))
    const = classic(fraction=0.3, warmup_epochs=2)
    ramp = classic(schedule="ramp", fraction_start=0.1, fraction=0.9, ramp_epochs=4,
                            warmup_epochs=2)
    for epoch in range(2, 10):
        f = 0.1 + 0.8 * min(1.0, (epoch - 2) / 4)
        for s, want in ((const, 0.3), (ramp, f)):
            plan = make_plan(snap, s, 0, epoch)
            assert mixed_ids(plan).size == 2 * expected_groups(want, n, 2, n)
            assert plan.num_slots == n - expected_groups(want, n, 2, n)


def test_odd_leftovers_stay_single():
    plan = make_plan(snapshot_of(np.arange(7, dtype=float)), classic(fraction=1.0), 0, 1)
    assert sorted(plan.counts.tolist()) == [1, 2, 2, 2]
    assert plan.ids[plan.counts == 1][0, 0] == 6  # the hardest one is left over


# ------------------------------------------------------------------------------ determinism, order
@pytest.mark.parametrize("settings_", [classic(), RandomSettings(layout="quads"),
                                       ShrinkSettings(mix=classic(layout="blend"))])
def test_same_inputs_same_bytes_and_epochs_differ(settings_):
    rng = np.random.default_rng(5)
    snap = snapshot_of(rng.random(400), rng.random(400) < 0.8)
    a = make_plan(snap, settings_, 11, 3).to_bytes()
    b = make_plan(snapshot_of(np.array(snap.last_loss), snap.count > 0), settings_, 11, 3)
    assert a == b.to_bytes()

    def pairs(plan):
        return {tuple(sorted(row[row >= 0].tolist())) for row in plan.ids[plan.counts > 1]}

    assert pairs(make_plan(snap, settings_, 11, 3)) != pairs(make_plan(snap, settings_, 11, 4))
    assert pairs(make_plan(snap, settings_, 11, 3)) != pairs(make_plan(snap, settings_, 12, 3))


def test_composites_and_singles_interleave():
    n = 2000
    plan = make_plan(snapshot_of(np.random.default_rng(2).random(n)),
                     classic(fraction=0.5), 0, 1)
    is_comp = plan.counts > 1
    quarters = np.array_split(is_comp, 4)
    share = is_comp.mean()
    for q in quarters:  # each quarter of the epoch holds about its share of composites
        assert abs(q.mean() - share) < 0.1
    first = plan.ids[plan.counts == 1, 0]
    assert not np.all(np.diff(first) > 0), "singles are still in id order"


# ------------------------------------------------------------------------------ random
@FAST
@given(n=st.integers(0, 300), fraction=st.floats(0, 1),
       layout=st.sampled_from(["halves", "quads", "blend"]), cells=st.integers(2, 9),
       seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 50))
def test_random_policy_mixes_a_fixed_share_of_all_samples(n, fraction, layout, cells, seed,
                                                         epoch):
    k = 4 if layout == "quads" else 2
    s = RandomSettings(fraction=fraction, layout=layout, grid_cells=cells)
    plan = make_plan(Ledger(n).snapshot(), s, seed, epoch)  # nothing seen: random ignores it
    groups = expected_groups(fraction, n, k, n)
    assert plan.num_slots == n - groups * (k - 1)
    equal = snap_weights(LAYOUT_CODE[layout], np.full(k, 1.0 / k), cells)
    for _, w, _, lay in composites(plan):
        assert lay == LAYOUT_CODE[layout]
        np.testing.assert_array_equal(w, equal)


def test_random_policy_choice_is_not_loss_driven():
    n = 4000
    snap = snapshot_of(np.arange(n, dtype=float))
    mixed = mixed_ids(make_plan(snap, RandomSettings(fraction=0.5), 0, 1))
    # about half of the low-loss half and half of the high-loss half are mixed
    assert abs((mixed < n // 2).mean() - 0.5) < 0.05
    counts = [np.isin(np.arange(n), mixed_ids(make_plan(snap, RandomSettings(fraction=0.5), 0, e)))
              for e in range(20)]
    freq = np.mean(counts, axis=0)  # every sample is mixed in about half of the epochs
    assert 0.45 < freq.mean() < 0.55 and freq.min() > 0.0 and freq.max() < 1.0


# ------------------------------------------------------------------------------ shrink
def _below_mean(snap):
    seen = snap.count > 0
    mean = snap.ema[seen].astype(np.float64).mean()
    return seen & (snap.ema < mean)


@FAST
@given(losses=losses_st, data=st.data())
def test_shrink_skips_a_share_of_the_below_mean_seen_samples(losses, data):
    n = len(losses)
    seen = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    r = data.draw(st.floats(0.0, 0.99))
    snap = snapshot_of(losses, seen)
    plan = make_plan(snap, ShrinkSettings(prune_ratio=r), data.draw(st.integers(0, 999)), 1)
    below = _below_mean(snap) if seen.any() else np.zeros(n, bool)
    nb = int(below.sum())
    k = int(math.floor(r * nb))
    assert plan.skipped.size == k
    assert below[plan.skipped].all()
    kept_below = below.copy()
    kept_below[plan.skipped] = False
    scale = np.ones(n)
    scale[kept_below] = nb / (nb - k) if k else 1.0
    ids = plan.ids[:, 0]
    np.testing.assert_allclose(plan.loss_scale[:, 0], scale[ids], rtol=1e-6)
    assert (plan.counts == 1).all()


def test_shrink_expected_loss_weight_is_unbiased():
    """Mean over seeds of (kept) * loss_scale is 1 for every sample, within 5 standard errors."""
    n, seeds, r = 120, 1500, 0.6
    snap = snapshot_of(np.random.default_rng(0).random(n))
    below = _below_mean(snap)
    weight = np.zeros(n)
    for seed in range(seeds):
        plan = make_plan(snap, ShrinkSettings(prune_ratio=r), seed, 1)
        present = plan.ids >= 0
        np.add.at(weight, plan.ids[present], plan.loss_scale[present])
    weight /= seeds
    nb = int(below.sum())
    p_keep = (nb - math.floor(r * nb)) / nb
    stderr = math.sqrt(p_keep * (1 - p_keep)) / p_keep / math.sqrt(seeds)
    assert np.all(np.abs(weight[below] - 1) < 5 * stderr), (weight[below], stderr)
    np.testing.assert_allclose(weight[~below], 1.0)  # never skipped, never rescaled
    assert abs(weight[below].mean() - 1) < 5 * stderr / math.sqrt(nb)


def test_shrink_anneal_epochs_skip_nothing():
    snap = snapshot_of(np.random.default_rng(1).random(300))
    s = ShrinkSettings(prune_ratio=0.5, epochs=10, anneal_epochs=3)
    for epoch in range(1, 10):
        plan = make_plan(snap, s, 0, epoch)
        assert (plan.skipped.size == 0) == (epoch >= 7)
        if epoch >= 7:
            assert (plan.loss_scale[plan.ids >= 0] == 1).all()


@FAST
@given(losses=losses_st, data=st.data())
def test_shrink_then_mix_skip_and_mix_disjoint_and_lowest_of_the_kept(losses, data):
    n = len(losses)
    seen = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    layout = data.draw(st.sampled_from(["halves", "quads", "blend"]))
    fraction = data.draw(st.floats(0, 1))
    mix = classic(fraction=fraction, layout=layout)
    snap = snapshot_of(losses, seen)
    plan = make_plan(snap, ShrinkSettings(prune_ratio=0.5, mix=mix), 3, 2)
    mixed, skipped = mixed_ids(plan), plan.skipped
    assert np.intersect1d(mixed, skipped).size == 0
    assert seen[mixed].all() and seen[skipped].all()
    k = mix.group_size
    kept_seen = np.setdiff1d(np.flatnonzero(seen), skipped)
    assert mixed.size == k * expected_groups(fraction, n - skipped.size, k, kept_seen.size)
    rest = np.setdiff1d(kept_seen, mixed)
    score = snap.ema
    if mixed.size and rest.size:
        assert score[mixed].max() <= score[rest].min()
    # the raised loss scale of kept easy samples survives inside composites
    below = _below_mean(snap) if seen.any() else np.zeros(n, bool)
    present = plan.ids >= 0
    ids, scale = plan.ids[present], plan.loss_scale[present]
    if skipped.size:
        assert np.all(scale[below[ids]] > 1) and np.all(scale[~below[ids]] == 1)
    else:
        assert np.all(scale == 1)


def test_shrink_with_mix_counts_the_speedup_against_the_kept_samples():
    n = 2000
    snap = snapshot_of(np.random.default_rng(4).random(n))
    mix = classic(schedule="speedup", speedup=1.5)
    plan = make_plan(snap, ShrinkSettings(prune_ratio=0.4, mix=mix), 0, 1)
    kept = n - plan.skipped.size
    assert plan.skipped.size > 0
    assert abs(plan.num_slots - kept / 1.5) <= 0.5 + 1e-9


# ------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("s", [
    classic(), classic(layout="quads", w_min=0.1, schedule="ramp", epochs=9,
                                         final_full_epochs=2),
    RandomSettings(layout="blend", group_size=4, fraction=0.25),
    ShrinkSettings(), ShrinkSettings(epochs=20, anneal_epochs=3, mix=classic(
        schedule="speedup", speedup=1.4, layout="blend")),
])
def test_settings_round_trip_through_dicts(s):
    d = s.to_dict()
    again = settings_from_dict(d)
    assert again == s and type(again) is type(s)
    assert again.to_dict() == d
    import json
    assert settings_from_dict(json.loads(json.dumps(d))) == s


@pytest.mark.parametrize("factory,field", [
    (lambda: classic(fraction=1.5), "MixTrainSettings.fraction"),
    (lambda: classic(fraction=float("nan")), "MixTrainSettings.fraction"),
    (lambda: classic(warmup_epochs=-1), "MixTrainSettings.warmup_epochs"),
    (lambda: classic(warmup_epochs=1.5), "MixTrainSettings.warmup_epochs"),
    (lambda: classic(schedule="cosine"), "MixTrainSettings.schedule"),
    (lambda: classic(speedup=2.5), "MixTrainSettings.speedup"),
    (lambda: classic(speedup=0.5), "MixTrainSettings.speedup"),
    (lambda: classic(w_min=0.3, layout="quads"), "MixTrainSettings.w_min"),
    (lambda: classic(gamma=-1), "MixTrainSettings.gamma"),
    (lambda: classic(statistic="median"), "MixTrainSettings.statistic"),
    (lambda: classic(layout="thirds"), "MixTrainSettings.layout"),
    (lambda: classic(layout="halves", group_size=4), "MixTrainSettings.group_size"),
    (lambda: classic(grid_cells=1), "MixTrainSettings.grid_cells"),
    (lambda: classic(final_full_epochs=2), "MixTrainSettings.epochs"),
    (lambda: classic(epochs=3, final_full_epochs=4), "MixTrainSettings.final_full"),
    (lambda: RandomSettings(fraction=-0.1), "RandomSettings.fraction"),
    (lambda: RandomSettings(layout="quads", group_size=2), "RandomSettings.group_size"),
    (lambda: ShrinkSettings(prune_ratio=1.0), "ShrinkSettings.prune_ratio"),
    (lambda: ShrinkSettings(anneal_epochs=2), "ShrinkSettings.epochs"),
    (lambda: ShrinkSettings(epochs=0), "ShrinkSettings.epochs"),
    (lambda: ShrinkSettings(mix={"fraction": 2.0}), "MixTrainSettings.fraction"),
    (lambda: ShrinkSettings(mix={"fractoin": 0.5}), "fractoin"),
    (lambda: ShrinkSettings(mix={"policy": "random"}), "ShrinkSettings.mix"),
    (lambda: ShrinkSettings(mix=RandomSettings()), "ShrinkSettings.mix"),
    (lambda: settings_from_dict({"policy": "mixtrain", "fraction": 3}),
     "MixTrainSettings.fraction"),
])
def test_bad_settings_are_refused_naming_the_field(factory, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        factory()


def test_settings_are_frozen_and_normalised():
    assert classic().w_min == 0.25 and classic(layout="quads").w_min == 0.125
    assert MixTrainSettings(selection="lowest", layout="halves").w_min == 0.25
    assert MixTrainSettings(selection="lowest").w_min == 0.25  # quads: equal quarters
    s = classic(fraction=1, layout="quads", w_min=0)
    assert s.group_size == 4 and isinstance(s.fraction, float) and s.w_min == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.fraction = 0.2  # type: ignore[misc]
    assert hash(ShrinkSettings(mix=s)) == hash(ShrinkSettings(mix=dict(s.to_dict())))


@pytest.mark.parametrize("module", ["random", "mixtrain", "shrink"])
def test_docstring_examples_run(module):
    import doctest
    import importlib
    mod = importlib.import_module(f"mixpipe.core.policies.{module}")
    result = doctest.testmod(mod)
    assert result.attempted > 0 and result.failed == 0


def test_ties_at_the_cut_are_taken_in_id_order():
    losses = np.array([0.1, 1.0, 1.0, 0.2, 1.0, 1.0, 1.0, 3.0])
    plan = make_plan(snapshot_of(losses), classic(fraction=0.5), 9, 1)
    np.testing.assert_array_equal(mixed_ids(plan), [0, 1, 2, 3])
    seen = np.array([1, 0, 1, 1, 1, 1, 1, 1], bool)
    plan = make_plan(snapshot_of(losses, seen), classic(fraction=0.5), 9, 1)
    np.testing.assert_array_equal(mixed_ids(plan), [0, 2, 3, 4])


def test_the_library_defaults_are_the_benchmarks_chosen_settings():
    """``policy="mixtrain"`` gets the method the benchmark measures, not a rule-test setting."""
    from mixpipe.bench.speedup import SpeedupSettings, arm_policy
    from mixpipe.core.policies.mixtrain import DEFAULT_RAMP_EPOCHS
    from mixpipe.server.inprocess import resolve_settings

    d = MixTrainSettings()
    assert (d.layout, d.schedule, d.fraction_start, d.fraction, d.statistic, d.w_min,
            d.warmup_epochs, d.grid_cells) == ("quads", "ramp", 0.45, 0.80, "last", 0.25, 1, None)
    assert (d.selection, d.ease_power, d.calibrate) == ("sampled", 1.0, True)
    assert d.ramp_epochs == DEFAULT_RAMP_EPOCHS == 18  # the 20-epoch run: 19 mixed epochs
    assert resolve_settings("mixtrain") == d
    # the benchmark's mixtrain arm for a 20-epoch run is the library default plus the run's
    # length and the recorded grid
    bench = arm_policy("mixtrain", SpeedupSettings(epochs=20))
    assert bench == dataclasses.replace(MixTrainSettings(epochs=20), grid_cells=4)
    # with the run's length given, the ramp spans the mixed epochs
    assert MixTrainSettings(selection="lowest", epochs=10).ramp_epochs == 8
    assert MixTrainSettings(selection="lowest", epochs=10, final_full_epochs=2).ramp_epochs == 6


def test_unsnapped_shares_are_the_rules_own_and_loaders_snap_them():
    from mixpipe.core.layouts import snap_weights
    from mixpipe.core.plan import Layout

    losses = np.array([1.0, 3.0, 2.0, 2.0])
    snap = snapshot_of(losses)
    free = make_plan(snap, MixTrainSettings(selection="lowest", schedule="constant", fraction=1.0, layout="halves",
                                            warmup_epochs=0), 0, 1)
    grid = make_plan(snap, MixTrainSettings(selection="lowest", schedule="constant", fraction=1.0, layout="halves",
                                            warmup_epochs=0, grid_cells=7), 0, 1)
    # same groups, same order; the gridded shares are the free ones snapped to 7 cells
    assert np.array_equal(free.ids, grid.ids)
    for w_free, w_grid in zip(free.weights, grid.weights):
        np.testing.assert_allclose(snap_weights(Layout.HALVES, w_free, 7), w_grid, atol=1e-6)
    a, b = free.ids[0]
    share = losses[a] / (losses[a] + losses[b])  # gamma 1, inside the [0.25, 0.75] clip
    np.testing.assert_allclose(free.weights[0], [share, 1 - share], atol=1e-6)
def test_none_policy_keeps_the_permutation_of_its_original_formula():
    """The none plan is shuffled as int32 for speed (issue 17); its order must stay
    epoch_rng(seed, epoch).permutation(n), bit for bit."""
    from mixpipe.core.ledger import Ledger
    from mixpipe.core.policies import epoch_rng, make_plan, settings_from_dict

    for n, seed, epoch in ((1, 0, 0), (1000, 5, 3), (4099, 2**40, 7)):
        plan = make_plan(Ledger(n).snapshot(), settings_from_dict({"policy": "none"}), seed,
                         epoch)
        np.testing.assert_array_equal(plan.ids[:, 0], epoch_rng(seed, epoch).permutation(n))
        assert plan.ids.dtype == np.int64
