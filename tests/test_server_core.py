"""The selection core and the in-process service: refusals, commit/plan semantics, crash safety.

Reference results are recomputed here with a plain numpy model of the ledger rules, not read back
from the service.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mixpipe.core.ledger import Ledger
from mixpipe.core.policies import POLICIES, _load_builtin, make_plan, settings_from_dict
from mixpipe.server import InProcessService, SelectionService
from mixpipe.server.wal import RECORD_HEADER, WriteAheadLog

N = 200


def _policies():
    _load_builtin()
    return sorted(POLICIES)




def reference_ledger(num_samples, epochs, decay=0.7):
    """Plain-python model of the ledger after committing ``epochs``: {epoch: [(ids, losses)]}."""
    last = np.full(num_samples, np.nan, np.float32)
    ema = np.full(num_samples, np.nan, np.float32)
    last_epoch = np.full(num_samples, -1, np.int32)
    count = np.zeros(num_samples, np.int32)
    d = np.float32(decay)
    for epoch in sorted(epochs):
        final = {}
        for ids, losses in epochs[epoch]:
            for i, v in zip(ids.tolist(), np.asarray(losses, np.float32).tolist()):
                final[i] = np.float32(v)
        for i, v in final.items():
            ema[i] = v if count[i] == 0 else d * ema[i] + (np.float32(1) - d) * v
            last[i] = v
            last_epoch[i] = epoch
            count[i] += 1
    return last, ema, last_epoch, count


def assert_ledger_matches(svc, epochs, decay=0.7):
    got = Ledger.from_bytes(svc.ledger_bytes())
    last, ema, last_epoch, count = reference_ledger(svc.num_samples, epochs, decay)
    np.testing.assert_array_equal(got.count, count)
    np.testing.assert_array_equal(got.last_epoch, last_epoch)
    np.testing.assert_allclose(got.last_loss, last, rtol=0, atol=0)
    np.testing.assert_allclose(got.ema, ema, rtol=1e-6)


def rand_report(rng, n=50, num_samples=N):
    return rng.integers(0, num_samples, n), rng.random(n).astype(np.float32) * 3


# ----------------------------------------------------------------------------- interface
def test_in_process_service_satisfies_the_protocol():
    assert isinstance(InProcessService(N), SelectionService)


def test_policy_given_as_name_dict_or_settings_gives_the_same_plan():
    name = "mixtrain"
    settings = settings_from_dict({"policy": name})
    plans = [InProcessService(N, p, seed=5).plan(0) for p in (name, {"policy": name}, settings)]
    assert plans[0].equals(plans[1]) and plans[0].equals(plans[2])


def test_unknown_policy_is_refused_with_its_name():
    with pytest.raises(ValueError, match="unknown policy 'nosuch'"):
        InProcessService(N, "nosuch")
    with pytest.raises(ValueError, match="unknown policy"):
        InProcessService(N, {"policy": "nosuch"})


# ----------------------------------------------------------------------------- refusals
BAD_REPORTS = [
    # (epoch, ids, losses, error type, message fragment)
    (0, np.array([0, N]), np.array([1.0, 1.0], np.float32), ValueError, f"id {N} out of range"),
    (0, np.array([-1, 0]), np.array([1.0, 1.0], np.float32), ValueError, "id -1 out of range"),
    (0, np.array([0, 1]), np.array([1.0, np.nan], np.float32), ValueError, "not finite"),
    (0, np.array([0, 1]), np.array([np.inf, 1.0], np.float32), ValueError, "not finite"),
    (0, np.array([0, 1]), np.array([1e300, 1.0]), ValueError, "overflows float32"),
    (0, np.array([0, 1]), np.array([-0.5, 1.0], np.float32), ValueError, "negative"),
    (0, np.array([0, 1, 2]), np.array([1.0, 1.0], np.float32), ValueError, "length mismatch"),
    (0, np.array([0.0, 1.0]), np.array([1.0, 1.0], np.float32), TypeError,
     "ids must be an integer"),
    (0, np.array([0, 1]), np.array([1, 1]), TypeError, "losses must be a float"),
    (0, np.array([[0, 1]]), np.array([[1.0, 1.0]], np.float32), ValueError, "1-D"),
    (-1, np.array([0]), np.array([1.0], np.float32), ValueError, "epoch must be >= 0"),
    (1.0, np.array([0]), np.array([1.0], np.float32), TypeError, "epoch must be an integer"),
    ("1", np.array([0]), np.array([1.0], np.float32), TypeError, "epoch must be an integer"),
]


@pytest.mark.parametrize("epoch,ids,losses,kind,message", BAD_REPORTS)
def test_bad_report_is_refused_and_changes_nothing(tmp_path, epoch, ids, losses, kind, message):
    svc = InProcessService(N, state_dir=str(tmp_path))
    rng = np.random.default_rng(0)
    svc.report(0, *rand_report(rng))
    svc.commit(0)
    svc.report(1, *rand_report(rng))
    before_ledger, before_state = svc.ledger_bytes(), svc.state_dict()
    wal_before = sorted((p, os.path.getsize(tmp_path / "wal" / p))
                        for p in os.listdir(tmp_path / "wal"))
    epoch = epoch + 1 if isinstance(epoch, int) and epoch >= 0 else epoch  # past the commit
    with pytest.raises(kind, match=message):
        svc.report(epoch, ids, losses)
    assert svc.ledger_bytes() == before_ledger
    after = svc.state_dict()
    assert after["pending"].keys() == before_state["pending"].keys()
    for e in after["pending"]:
        np.testing.assert_array_equal(after["pending"][e]["ids"], before_state["pending"][e]["ids"])
    assert sorted((p, os.path.getsize(tmp_path / "wal" / p))
                  for p in os.listdir(tmp_path / "wal")) == wal_before
    assert svc.stats()["reports_refused"] == 1


def test_report_behind_the_committed_epoch_is_refused(tmp_path):
    svc = InProcessService(N, state_dir=str(tmp_path))
    svc.report(3, np.array([1]), np.array([0.5], np.float32))
    svc.commit(3)
    before = svc.ledger_bytes()
    for epoch in (0, 3):
        with pytest.raises(ValueError, match="behind the committed epoch 3"):
            svc.report(epoch, np.array([2]), np.array([0.5], np.float32))
    assert svc.ledger_bytes() == before
    svc.report(4, np.array([2]), np.array([0.5], np.float32))  # the next epoch is open


def test_plan_for_epoch_closes_reporting_for_earlier_epochs():
    svc = InProcessService(N)
    svc.report(0, np.array([1, 2]), np.array([0.5, 1.5], np.float32))
    svc.plan(1)
    assert svc.stats()["committed_epoch"] == 0
    with pytest.raises(ValueError, match="behind the committed epoch"):
        svc.report(0, np.array([3]), np.array([0.5], np.float32))


def test_bad_plan_and_commit_arguments_are_refused():
    svc = InProcessService(N)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        svc.plan(-1)
    with pytest.raises(ValueError, match="rank"):
        svc.plan(0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        svc.plan(0, rank=0, world_size=0)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        svc.commit(-2)
    svc.commit(4)
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        svc.plan(2)


def test_bad_state_dict_is_refused_and_changes_nothing():
    svc = InProcessService(N, seed=1)
    svc.report(0, np.array([1]), np.array([0.5], np.float32))
    svc.commit(0)
    good = svc.state_dict()
    before = svc.ledger_bytes()
    cases = [
        ({**good, "settings": {"policy": "nosuch"}}, ValueError, "unknown policy"),
        ({**good, "num_samples": N + 1}, ValueError, "samples"),
        ({**good, "ledger": good["ledger"][:-3]}, ValueError, "truncated"),
        ({**good, "pending": {0: {"ids": np.array([1]), "losses": np.array([1.0])}}},
         ValueError, "behind"),
        ({**good, "pending": {5: {"ids": np.array([N]), "losses": np.array([1.0])}}},
         ValueError, "out of range"),
    ]
    for state, kind, message in cases:
        with pytest.raises(kind, match=message):
            svc.load_state_dict(state)
        assert svc.ledger_bytes() == before
        assert svc.stats()["policy"] == good["settings"]


# ----------------------------------------------------------------------------- semantics
@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 30), st.integers(0, 10**6)),
                min_size=1, max_size=12),
       st.integers(0, 3))
def test_commit_folds_pending_epochs_in_order_like_the_reference(reports, commit_through):
    svc = InProcessService(N)
    by_epoch = {}
    for epoch, n, seed in reports:
        ids, losses = rand_report(np.random.default_rng(seed), n)
        svc.report(epoch, ids, losses)
        by_epoch.setdefault(epoch, []).append((ids, losses))
    svc.commit(commit_through)
    assert_ledger_matches(svc, {e: r for e, r in by_epoch.items() if e <= commit_through})
    left = {e for e in by_epoch if e > commit_through}
    assert {p[0] for p in svc.stats()["pending"]} == left
    svc.commit(3)
    assert_ledger_matches(svc, by_epoch)


def test_commit_of_a_committed_epoch_is_a_no_op():
    svc = InProcessService(N)
    svc.report(0, np.array([1]), np.array([0.5], np.float32))
    svc.commit(1)
    before = svc.ledger_bytes()
    svc.commit(1)
    svc.commit(0)
    assert svc.ledger_bytes() == before and svc.stats()["committed_epoch"] == 1


@pytest.mark.parametrize("policy", _policies())
def test_plan_is_the_policy_on_the_ledger_before_the_epoch_and_is_cached(policy):
    rng = np.random.default_rng(3)
    svc = InProcessService(N, policy, seed=11)
    reports = {0: [rand_report(rng, 150)], 1: [rand_report(rng, 150)]}
    for e, rs in reports.items():
        for ids, losses in rs:
            svc.report(e, ids, losses)
    plan = svc.plan(2)
    # independent derivation: a fresh ledger fed the same epochs, then the policy itself
    ledger = Ledger(N)
    for e in (0, 1):
        ledger.update(e, *reports[e][0])
    ledger.committed_epoch = 1
    expected = make_plan(ledger.snapshot(), settings_from_dict({"policy": policy}), 11, 2)
    assert plan.equals(expected)
    assert svc.plan(2).equals(plan)
    assert svc.stats()["plans_computed"] == 1
    # callers cannot alter the cached plan: its arrays are read-only, its fields are their own
    with pytest.raises(ValueError, match="read-only"):
        plan.ids[:] = -7
    plan.epoch = 99
    plan.ids = plan.ids[::-1]
    assert svc.plan(2).equals(expected)
    shard = svc.plan(2, 0, 2)
    shard.ids[:] = -7  # a shard is a copy
    assert svc.plan(2, 0, 2).equals(expected.shard(0, 2))


@pytest.mark.parametrize("policy", _policies())
@pytest.mark.parametrize("world", [2, 3])
def test_shards_of_all_ranks_are_the_global_plan(policy, world):
    rng = np.random.default_rng(4)
    svc = InProcessService(N + 1, policy, seed=2)
    svc.report(0, *rand_report(rng, 300, N + 1))
    glob = svc.plan(1)
    shards = [svc.plan(1, r, world) for r in range(world)]
    assert len({s.num_slots for s in shards}) == 1
    for r, s in enumerate(shards):
        assert s.equals(glob.shard(r, world))
    real = np.concatenate([s.ids[(s.ids >= 0) & (s.loss_scale > 0)] for s in shards])
    covered = np.sort(np.concatenate([real, glob.skipped]))
    np.testing.assert_array_equal(covered, np.arange(N + 1))
    assert svc.stats()["plans_computed"] == 1


# ----------------------------------------------------------------------------- crash safety
def test_restart_replays_uncommitted_reports_and_keeps_the_committed_ledger(tmp_path):
    rng = np.random.default_rng(5)
    policy = "mixtrain"
    svc = InProcessService(N, policy, seed=9, state_dir=str(tmp_path))
    epochs = {0: [rand_report(rng)], 1: [rand_report(rng), rand_report(rng)],
              2: [rand_report(rng)]}
    for e, rs in epochs.items():
        for r in rs:
            svc.report(e, *r)
    svc.commit(0)
    plan2 = svc.plan(2)  # commits 1; epoch 2 stays pending
    del svc  # no close(): the process "dies" here
    again = InProcessService(N, policy, seed=9, state_dir=str(tmp_path))
    assert again.stats()["committed_epoch"] == 1
    assert again.stats()["pending"] == [[2, 50]]
    assert again.plan(2).equals(plan2)  # recomputed, not cached: determinism across restarts
    again.commit(2)
    assert_ledger_matches(again, epochs)


def test_a_torn_log_tail_is_dropped_not_fatal(tmp_path):
    rng = np.random.default_rng(6)
    svc = InProcessService(N, state_dir=str(tmp_path))
    good = [rand_report(rng) for _ in range(3)]
    for r in good:
        svc.report(0, *r)
    svc.close()
    path = tmp_path / "wal" / "epoch-00000000.wal"
    full = path.read_bytes()
    record = RECORD_HEADER.size + 12 * 50
    assert len(full) == 3 * record
    for cut in (5, RECORD_HEADER.size + 7, record - 1):  # header, ids, losses torn
        path.write_bytes(full[: 2 * record + cut])
        again = InProcessService(N, state_dir=str(tmp_path))
        st_ = again.stats()
        assert st_["pending"] == [[0, 100]] and st_["wal_dropped_bytes"] == cut
        assert path.stat().st_size == 2 * record  # truncated to the intact prefix
        again.report(0, *good[2])  # new records append cleanly after the cut
        again.close()
        again = InProcessService(N, state_dir=str(tmp_path))
        again.commit(0)
        assert_ledger_matches(again, {0: good})
        # back to the torn state for the next cut
        for name in os.listdir(tmp_path):
            if name != "wal" and name != "meta.json":
                os.unlink(tmp_path / name)
        os.makedirs(tmp_path / "wal", exist_ok=True)


def test_a_corrupted_record_is_dropped_with_everything_after_it(tmp_path):
    rng = np.random.default_rng(7)
    svc = InProcessService(N, state_dir=str(tmp_path))
    good = [rand_report(rng) for _ in range(3)]
    for r in good:
        svc.report(0, *r)
    svc.close()
    path = tmp_path / "wal" / "epoch-00000000.wal"
    data = bytearray(path.read_bytes())
    record = len(data) // 3
    data[record + RECORD_HEADER.size + 3] ^= 0xFF  # a flipped bit in the second record's ids
    path.write_bytes(bytes(data))
    again = InProcessService(N, state_dir=str(tmp_path))
    again.commit(0)
    assert_ledger_matches(again, {0: good[:1]})


def test_restart_with_other_settings_is_refused(tmp_path):
    InProcessService(N, "none", seed=1, state_dir=str(tmp_path)).close()
    with pytest.raises(ValueError, match="seed"):
        InProcessService(N, "none", seed=2, state_dir=str(tmp_path))
    with pytest.raises(ValueError, match="num_samples"):
        InProcessService(N + 1, "none", seed=1, state_dir=str(tmp_path))


def test_commit_saves_the_ledger_file_and_deletes_the_folded_logs(tmp_path):
    svc = InProcessService(N, state_dir=str(tmp_path))
    svc.report(0, np.array([1]), np.array([0.5], np.float32))
    svc.report(1, np.array([2]), np.array([0.7], np.float32))
    svc.commit(0)
    assert Ledger.load(tmp_path / "ledger.bin").to_bytes() == svc.ledger_bytes()
    assert sorted(os.listdir(tmp_path / "wal")) == ["epoch-00000001.wal"]


def test_fsync_option_logs_the_same_records(tmp_path):
    svc = InProcessService(N, state_dir=str(tmp_path), fsync=True)
    rng = np.random.default_rng(8)
    r = rand_report(rng)
    svc.report(0, *r)
    recs = list(WriteAheadLog(str(tmp_path / "wal")).replay())
    assert len(recs) == 1
    np.testing.assert_array_equal(recs[0].ids, r[0])
    np.testing.assert_array_equal(recs[0].losses, r[1])


def test_state_dict_round_trip_into_another_service(tmp_path):
    rng = np.random.default_rng(9)
    policy = "mixtrain"
    a = InProcessService(N, policy, seed=4)
    a.report(0, *rand_report(rng))
    a.commit(0)
    a.report(1, *rand_report(rng))
    b = InProcessService(N, "none", seed=0, state_dir=str(tmp_path))
    b.load_state_dict(a.state_dict())
    assert b.ledger_bytes() == a.ledger_bytes()
    assert b.plan(2).equals(a.plan(2))
    # and the loaded state is on disk: a restart (with the loaded settings) sees it
    c = InProcessService(N, policy, seed=4, state_dir=str(tmp_path))
    assert c.ledger_bytes() == b.ledger_bytes()


# ----------------------------------------------------------------------------- threads
def test_concurrent_reporters_and_planners_lose_nothing():
    svc = InProcessService(N, "mixtrain", seed=3)
    per_thread = {}
    errors = []

    def reporter(t):
        rng = np.random.default_rng(100 + t)
        mine = [rand_report(rng, 20) for _ in range(40)]
        per_thread[t] = mine
        for r in mine:
            svc.report(0, *r, rank=t)

    def planner():
        try:
            for _ in range(20):
                svc.plan(0)
                svc.stats()
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=reporter, args=(t,)) for t in range(8)]
    threads += [threading.Thread(target=planner) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert svc.stats()["pending_losses"] == 8 * 40 * 20
    svc.commit(0)
    got = Ledger.from_bytes(svc.ledger_bytes())
    every_id = np.concatenate([r[0] for rs in per_thread.values() for r in rs])
    every_loss = np.concatenate([r[1] for rs in per_thread.values() for r in rs])
    np.testing.assert_array_equal(got.count, (np.bincount(every_id, minlength=N) > 0))
    for i in np.flatnonzero(got.count)[:50]:  # the kept loss is one this id was reported with
        assert got.last_loss[i] in every_loss[every_id == i]


def test_docstring_examples_run():
    import doctest

    import mixpipe.server.inprocess as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_reports_go_on_while_a_plan_is_computed_and_it_is_computed_once():
    import dataclasses

    from mixpipe.core.policies import PolicySettings, register
    from mixpipe.core.policies.none import plan_none

    entered, release = threading.Event(), threading.Event()

    @dataclasses.dataclass(frozen=True)
    class GatedSettings(PolicySettings):
        name = "gated-test-policy"

    def gated(snapshot, settings, seed, epoch):
        entered.set()
        assert release.wait(30)
        return plan_none(snapshot, settings, seed, epoch)

    register(GatedSettings)(gated)
    try:
        svc = InProcessService(N, GatedSettings(), seed=2)
        svc.report(0, np.array([1]), np.array([0.5], np.float32))
        results = []
        planners = [threading.Thread(target=lambda: results.append(svc.plan(1)))
                    for _ in range(3)]
        planners[0].start()
        assert entered.wait(30)
        for t in planners[1:]:
            t.start()
        # the policy is running: epoch 0 is closed already, epoch 1 takes reports at once
        with pytest.raises(ValueError, match="behind the committed epoch 0"):
            svc.report(0, np.array([2]), np.array([0.5], np.float32))
        svc.report(1, np.array([2]), np.array([0.5], np.float32))
        assert svc.stats()["pending_losses"] == 1
        release.set()
        for t in planners:
            t.join(30)
        assert len(results) == 3 and all(p.equals(results[0]) for p in results)
        assert svc.stats()["plans_computed"] == 1
        reference = InProcessService(N, "none", seed=2)
        reference.report(0, np.array([1]), np.array([0.5], np.float32))
        assert results[0].equals(reference.plan(1))
    finally:
        del POLICIES[GatedSettings.name]
