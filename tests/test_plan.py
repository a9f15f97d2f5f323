"""MixPlan invariants, sharding and serialisation, as properties over generated plans."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixpipe.core.plan import Layout, MixPlan, PlanFormatError

SIZES = {Layout.SINGLE: 1, Layout.HALVES: 2, Layout.QUADS: 4}


@st.composite
def valid_plans(draw, max_samples: int = 60) -> MixPlan:
    """A random valid plan: a permutation cut into slots of random layouts, some ids skipped."""
    n = draw(st.integers(0, max_samples))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n).tolist()
    n_skip = draw(st.integers(0, n // 3))
    skipped, rest = order[:n_skip], order[n_skip:]
    slots = []
    while rest:
        layout = Layout(int(rng.integers(0, 4)))
        k = SIZES.get(layout, int(rng.integers(2, 5)))
        if k > len(rest):
            layout, k = Layout.SINGLE, 1
        ids, rest = rest[:k], rest[k:]
        if layout == Layout.SINGLE:
            w = [1.0]
        else:
            raw = rng.random(k) + 0.05
            w = (raw / raw.sum()).astype(np.float32)
            w[-1] = np.float32(1.0) - np.float32(w[:-1].sum())
            w = w.tolist()
        slots.append((ids, w, layout))
    scales = [[float(rng.choice([1.0, 2.0]))] * len(s[0]) for s in slots]
    return MixPlan.from_slots(slots, n, skipped=skipped, loss_scale=scales,
                              epoch=draw(st.integers(0, 100)), seed=seed)


@settings(max_examples=60, deadline=None)
@given(valid_plans())
def test_generated_plans_are_valid(plan: MixPlan) -> None:
    plan.validate()


@settings(max_examples=60, deadline=None)
@given(valid_plans(), st.integers(1, 7))
def test_shards_partition_the_plan(plan: MixPlan, world: int) -> None:
    shards = [plan.shard(r, world).validate() for r in range(world)]
    # same number of slots on every rank
    assert len({s.num_slots for s in shards}) == 1
    assert shards[0].num_slots * world >= plan.num_slots
    # real (non-padding) constituents + skipped cover every id exactly once
    seen = []
    for s in shards:
        real = (s.ids >= 0) & (s.loss_scale > 0)
        seen.extend(s.ids[real].tolist())
        seen.extend(s.skipped.tolist())
    assert sorted(seen) == list(range(plan.num_samples))
    # padding copies are the only slots with loss_scale 0, and there are just enough of them
    pad_rows = sum(int(((s.loss_scale == 0) | (s.ids < 0)).all(axis=1).sum()) for s in shards)
    assert pad_rows == shards[0].num_slots * world - plan.num_slots


@settings(max_examples=60, deadline=None)
@given(valid_plans(), st.integers(1, 4))
def test_bytes_round_trip(plan: MixPlan, world: int) -> None:
    for candidate in [plan] + [plan.shard(r, world) for r in range(world)]:
        back = MixPlan.from_bytes(candidate.to_bytes())
        assert back.equals(candidate)
        for name in ("ids", "weights", "loss_scale", "layout", "skipped"):
            np.testing.assert_array_equal(getattr(back, name), getattr(candidate, name))
        assert (back.epoch, back.seed, back.rank, back.world_size, back.num_samples) == (
            candidate.epoch, candidate.seed, candidate.rank, candidate.world_size,
            candidate.num_samples)


def _example() -> MixPlan:
    return MixPlan.from_slots(
        [([0, 1], [0.25, 0.75], Layout.HALVES), ([2], [1.0], Layout.SINGLE),
         ([3, 4, 5, 6], [0.25] * 4, Layout.QUADS), ([7, 8], [0.4, 0.6], Layout.BLEND)],
        num_samples=10, skipped=[9], epoch=3, seed=7).validate()


def _tampered(mutate) -> MixPlan:
    plan = _example()
    mutate(plan)
    return plan


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.ids.__setitem__((1, 0), 0), r"id 0 appears more than once"),
    (lambda p: p.skipped.__setitem__(0, 2), r"id 2 appears more than once"),
    (lambda p: p.weights.__setitem__((0, 0), 0.5), r"slot 0: weights must sum to 1"),
    (lambda p: p.weights.__setitem__((3, 0), np.nan), r"slot 3: weights not finite"),
    (lambda p: p.loss_scale.__setitem__((2, 1), np.inf), r"slot 2: loss_scale not finite"),
    (lambda p: p.layout.__setitem__(1, Layout.HALVES), r"slot 1: layout HALVES needs 2"),
    (lambda p: p.layout.__setitem__(2, Layout.HALVES), r"slot 2: layout HALVES needs 2"),
    (lambda p: p.layout.__setitem__(0, 9), r"slot 0: unknown layout code 9"),
    (lambda p: p.ids.__setitem__((0, 1), 10), r"slot 0: id out of range \[0, 10\)"),
    (lambda p: p.ids.__setitem__((0, 1), -5), r"slot 0: id out of range \(negative\)"),
    (lambda p: p.weights.__setitem__((3, slice(0, 2)), [1.5, -0.5]),
     r"slot 3: weights must lie in \[0, 1\]"),
    (lambda p: p.loss_scale.__setitem__((2, 0), -1.0), r"slot 2: loss_scale must be >= 0"),
    (lambda p: setattr(p, "skipped", np.array([], np.int64)), r"1 dataset ids appear neither"),
    (lambda p: p.weights.__setitem__((1, 3), 0.5), r"slot 1: weight set where there is no"),
])
def test_tampered_plans_are_rejected_with_their_own_message(mutate, message) -> None:
    with pytest.raises(ValueError, match=message):
        _tampered(mutate).validate()


def test_ids_must_be_packed_left() -> None:
    plan = _example()
    plan.ids[1] = [-1, 2, -1, -1]
    with pytest.raises(ValueError, match="slot 1: ids must be packed left"):
        plan.validate()


def test_shape_mismatch_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="weights has shape"):
        MixPlan(np.zeros((2, 2)), np.zeros((2, 3)), np.zeros((2, 2)), np.zeros(2), [], 4)
    with pytest.raises(ValueError, match="layout has shape"):
        MixPlan(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)), np.zeros(3), [], 4)


def test_bytes_reject_foreign_truncated_and_corrupted() -> None:
    data = _example().to_bytes()
    with pytest.raises(PlanFormatError, match="not a mix plan"):
        MixPlan.from_bytes(b"GARBAGE!" + data[8:])
    with pytest.raises(PlanFormatError, match="truncated"):
        MixPlan.from_bytes(data[:-7])
    with pytest.raises(PlanFormatError, match="truncated"):
        MixPlan.from_bytes(data[:20])
    with pytest.raises(PlanFormatError, match="trailing bytes"):
        MixPlan.from_bytes(data + b"\0")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with pytest.raises(PlanFormatError, match="checksum"):
        MixPlan.from_bytes(bytes(flipped))
    newer = bytearray(data)
    newer[8] = 99  # version field
    with pytest.raises(PlanFormatError, match="version 99 not supported"):
        MixPlan.from_bytes(bytes(newer))


def test_counts_and_speedup_bound() -> None:
    plan = _example()
    assert plan.num_forward_inputs == 4
    assert plan.num_constituents == 9
    assert plan.speedup_bound == pytest.approx(10 / 4)
    shards = [plan.shard(r, 3) for r in range(3)]
    assert all(s.num_forward_inputs == 2 for s in shards)
    assert sum(s.num_constituents for s in shards) == 9
    assert shards[1].speedup_bound == pytest.approx(10 / 6)


def test_singles_plan_and_shard_of_shard() -> None:
    plan = MixPlan.singles(5, epoch=2, order=np.array([4, 3, 2, 1, 0])).validate()
    assert plan.ids[:, 0].tolist() == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="already a shard"):
        plan.shard(0, 2).shard(0, 2)
    with pytest.raises(ValueError, match="rank"):
        plan.shard(2, 2)


def test_delivery_order_is_a_seeded_permutation() -> None:
    plan = MixPlan.singles(40, epoch=2)
    order = plan.delivery_order(seed=3)
    assert sorted(order.tolist()) == list(range(40))
    np.testing.assert_array_equal(order, plan.delivery_order(seed=3))
    assert not np.array_equal(order, plan.delivery_order(seed=4))
    assert not np.array_equal(order, MixPlan.singles(40, epoch=3).delivery_order(seed=3))
    rank1 = MixPlan.singles(80, epoch=2).shard(1, 2)
    rank0 = MixPlan.singles(80, epoch=2).shard(0, 2)
    assert not np.array_equal(rank1.delivery_order(seed=3), rank0.delivery_order(seed=3))
    np.testing.assert_array_equal(plan.delivery_order(seed=3, shuffle=False), np.arange(40))
