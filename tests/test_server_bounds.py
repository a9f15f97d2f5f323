"""Issue 17: bounded arguments, validate-then-mutate, LOAD_STATE checks the meaning, and several
trainers on one service with no barrier of their own (in-process; the network and process
versions are in test_server_auth.py)."""
from __future__ import annotations

import os
import tempfile
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixpipe.core.ledger import Ledger
from mixpipe.core.policies.assist import AssistSettings
from mixpipe.server import InProcessService
from mixpipe.server.core import PlanNotReady

N = 50


def fingerprint(svc, state_dir=None):
    """Everything a refused request must leave alone: the state dict's bytes and every file."""
    state = svc.state_dict()
    parts = [repr(state["settings"]), repr(state["seed"]), repr(state["committed_epoch"]),
             state["ledger"], repr(state["policy_state"]),
             b"" if state["labels"] is None else state["labels"].tobytes()]
    for e, item in sorted(state["pending"].items()):
        parts += [repr(e), item["ids"].tobytes(), item["losses"].tobytes()]
    files = {}
    if state_dir is not None:
        for root, _dirs, names in os.walk(state_dir):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, state_dir)] = f.read()
    return parts, files


def service(tmp, policy="mixtrain"):
    settings = AssistSettings(warmup_epochs=1) if policy == "assist" else policy
    return InProcessService(N, settings, seed=3, state_dir=tmp)


def refused_unchanged(svc, tmp, call, *args, kind=(TypeError, ValueError), match=None, **kw):
    before = fingerprint(svc, tmp)
    with pytest.raises(kind, match=match):
        call(*args, **kw)
    assert fingerprint(svc, tmp) == before


# ----------------------------------------------------------------------------- bounds
def test_an_epoch_past_int32_is_refused_before_it_is_logged(tmp_path):
    """Defect 2: report(2**31) was accepted and logged, then no commit could ever fold it."""
    svc = service(str(tmp_path))
    refused_unchanged(svc, str(tmp_path), svc.report, 2**31, np.array([1]),
                      np.array([0.5], np.float32), match="epoch must be <= 2147483647")
    assert not os.listdir(tmp_path / "wal")
    svc.report(0, np.array([1]), np.array([0.5], np.float32))
    svc.commit(0)  # folding works as ever


@pytest.mark.parametrize("call,args,match", [
    ("plan", (2**63,), "epoch must be <="),
    ("plan", (2, 0, 2**63), "world_size must be <="),
    ("plan", (2, 2**40, 2), "rank must be <="),
    ("plan", (2, -1, 2), "rank must be >= 0"),
    ("commit", (2**62,), "epoch must be <="),
    ("end_epoch", (1, 0, 0), "world_size must be >= 1"),
    ("report", (1, np.array([1]), np.array([0.5], np.float32), 2**40), "rank must be <="),
])
def test_refused_requests_do_not_fold_or_write(tmp_path, call, args, match):
    """Defect 3: PLAN {epoch: 2**63} moved the committed epoch to 2**63-1 on disk, and PLAN with
    world_size 2**63 folded the open epoch before failing with an IndexError."""
    svc = service(str(tmp_path))
    svc.report(0, np.array([1, 2]), np.array([0.5, 1.0], np.float32))
    svc.commit(0)
    svc.report(1, np.array([3]), np.array([0.25], np.float32))  # epoch 1 is open
    refused_unchanged(svc, str(tmp_path), getattr(svc, call), *args, match=match)
    assert svc.committed_epoch == 0
    svc.report(1, np.array([4]), np.array([0.25], np.float32))  # epoch 1 still takes reports


def test_far_future_epochs_are_refused(tmp_path):
    svc = InProcessService(N, "none", state_dir=str(tmp_path), max_epochs_ahead=4)
    svc.report(3, np.array([1]), np.array([0.5], np.float32))  # committed -1, so 3 is the last
    refused_unchanged(svc, str(tmp_path), svc.report, 4, np.array([1]),
                      np.array([0.5], np.float32), match="more than 4 epochs past")
    svc.commit(0)
    svc.report(4, np.array([1]), np.array([0.5], np.float32))  # the window moved


def test_a_policy_failure_folds_nothing(tmp_path):
    svc = service(str(tmp_path), "assist")
    svc.report(0, np.array([1]), np.array([0.5], np.float32))
    svc._policy_state = b"garbage"  # what a bad LOAD_STATE used to leave behind
    refused_unchanged(svc, str(tmp_path), svc.plan, 1, match="assistant state")
    assert svc.committed_epoch == -1


# ----------------------------------------------------------------------------- LOAD_STATE
def _trained(tmp, policy="mixtrain"):
    svc = service(tmp, policy)
    rng = np.random.default_rng(0)
    for epoch in range(3):
        svc.plan(epoch)
        svc.report(epoch, np.arange(N), rng.random(N).astype(np.float32))
    svc.commit(2)
    return svc


def _with_column(state, name, index, value):
    ledger = Ledger.from_bytes(state["ledger"])
    column = getattr(ledger, name).copy()
    column[index] = value
    setattr(ledger, name, column)
    return {**state, "ledger": ledger.to_bytes()}


@pytest.mark.parametrize("change,match", [
    (lambda s: _with_column(s, "last_loss", 4, np.nan), "last_loss of sample 4"),
    (lambda s: _with_column(s, "ema", 7, -np.inf), "ema of sample 7"),
    (lambda s: _with_column(s, "ema", 7, -1.0), "ema of sample 7"),
    (lambda s: _with_column(s, "count", 2, -3), "count of sample 2 is negative"),
    (lambda s: _with_column(s, "count", 2, 99), "counts sample 2 99 times"),
    (lambda s: _with_column(s, "last_epoch", 5, 9), "after the committed epoch"),
    (lambda s: {**s, "policy_state": b"garbage"}, "assistant state"),
    (lambda s: {**s, "policy_state": s["policy_state"][:-9] + b"\x00" * 9}, "assistant state"),
    (lambda s: {**s, "seed": 2**64}, "seed must be <="),
])
def test_load_state_checks_meaning_not_just_the_checksum(tmp_path, change, match):
    """Defect 4: NaN/-inf losses, a count of -3, a last epoch past the committed one and garbage
    assist state passed (valid checksums) and poisoned every later plan."""
    svc = _trained(str(tmp_path), "assist")
    good = svc.state_dict()
    assert good["policy_state"] is not None
    refused_unchanged(svc, str(tmp_path), svc.load_state_dict, change(good), match=match)
    svc.load_state_dict(good)  # the untouched state loads
    svc.plan(3)


def test_policy_state_for_a_policy_that_keeps_none_is_refused(tmp_path):
    svc = _trained(str(tmp_path), "random")
    state = {**svc.state_dict(), "policy_state": b"x" * 40}
    refused_unchanged(svc, str(tmp_path), svc.load_state_dict, state, match="keeps no state")


def test_a_mixtrain_view_state_from_another_dataset_is_refused(tmp_path):
    svc = _trained(str(tmp_path), "mixtrain")
    assert svc.state_dict()["policy_state"] is not None  # calibrate keeps the last plan's views
    state = {**svc.state_dict(), "policy_state": b"x" * 40}
    refused_unchanged(svc, str(tmp_path), svc.load_state_dict, state, match="another dataset")


def test_a_state_directory_with_a_garbage_policy_file_refuses_to_start(tmp_path):
    svc = _trained(str(tmp_path), "assist")
    svc.close()
    with open(tmp_path / "policy.bin", "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="policy.bin"):
        service(str(tmp_path), "assist")


# ----------------------------------------------------------------------------- property
EPOCH = st.one_of(st.integers(-2, 5), st.sampled_from([2**31 - 1, 2**31, 2**63, -2**63]),
                  st.floats(allow_nan=True), st.just("1"), st.none())
RANK = st.one_of(st.integers(-1, 3), st.sampled_from([2**16, 2**63]), st.just(True))
WORLD = st.one_of(st.integers(0, 3), st.sampled_from([2**16 + 1, 2**63]))


@st.composite
def operations(draw):
    kind = draw(st.sampled_from(["report", "report", "report", "commit", "plan", "end_epoch",
                                 "load", "labels"]))
    if kind == "report":
        n = draw(st.integers(0, 6))
        ids = draw(st.lists(st.integers(-2, N + 1), min_size=n, max_size=n))
        losses = draw(st.lists(st.one_of(st.floats(0, 5), st.sampled_from(
            [np.nan, np.inf, -1.0, 1e300])), min_size=n, max_size=n + draw(st.integers(0, 1))))
        dtype = draw(st.sampled_from(["f4", "f8", "i4"]))
        with np.errstate(invalid="ignore", over="ignore"):  # nan/inf/1e300 as int32: garbage
            losses = np.array(losses).astype(dtype)  # on purpose
        return kind, (draw(EPOCH), np.array(ids, np.int64), losses, draw(RANK))
    if kind == "commit":
        return kind, (draw(EPOCH),)
    if kind in ("plan", "end_epoch"):
        return kind, (draw(EPOCH), draw(RANK), draw(WORLD))
    if kind == "labels":
        n = draw(st.sampled_from([N, N - 1]))
        return kind, (np.array(draw(st.lists(st.integers(-1, 4), min_size=n, max_size=n))),)
    damage = draw(st.sampled_from(["none", "nan", "count", "last_epoch", "policy", "behind",
                                   "samples"]))
    return kind, (damage,)


def _damaged(state, damage):
    if damage == "nan":
        return _with_column(state, "last_loss", 0, np.nan) if \
            Ledger.from_bytes(state["ledger"]).count[0] > 0 else {**state, "seed": -1}
    if damage == "count":
        return _with_column(state, "count", 1, -3)
    if damage == "last_epoch":
        committed = state["committed_epoch"]
        if committed >= 2**31 - 1:  # no later epoch fits the column: damage the count instead
            return _with_column(state, "count", 2, -5)
        return _with_column(state, "last_epoch", 2, committed + 1)
    if damage == "policy":
        return {**state, "policy_state": b"\x01" * 64}
    if damage == "behind":
        return {**state, "pending": {-1: {"ids": np.array([1]), "losses": np.array([1.0])}}}
    if damage == "samples":
        return {**state, "num_samples": N + 1}
    return state


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["mixtrain", "assist"]), st.lists(operations(), min_size=1, max_size=14))
def test_every_refused_request_leaves_memory_and_disk_byte_identical(policy, ops):
    with tempfile.TemporaryDirectory() as tmp:
        svc = service(tmp, policy)
        svc.set_labels(np.arange(N) % 3)
        saved = svc.state_dict()
        try:
            for kind, args in ops:
                before = fingerprint(svc, tmp)
                try:
                    if kind == "report":
                        svc.report(args[0], args[1], args[2], rank=args[3])
                    elif kind == "commit":
                        svc.commit(*args)
                    elif kind == "plan":
                        svc.plan(*args, wait=0)
                    elif kind == "end_epoch":
                        svc.end_epoch(*args)
                    elif kind == "labels":
                        svc.set_labels(*args)
                    else:
                        svc.load_state_dict(_damaged(saved, args[0]))
                except (TypeError, ValueError, PlanNotReady):
                    assert fingerprint(svc, tmp) == before, (kind, args)
                if kind == "commit" or kind == "plan":
                    saved = svc.state_dict()
        finally:
            svc.close()


# ----------------------------------------------------------------------------- world size
def test_two_rank_threads_without_a_barrier_get_one_plan_and_lose_no_report():
    """Issue 16: the fast rank's request for epoch 1 closed epoch 0 and the slow rank's reports
    were refused. Now the fast rank waits for the slow one."""
    svc = InProcessService(N, {"policy": "mixtrain", "warmup_epochs": 1}, seed=1, wait=30)
    rng = np.random.default_rng(5)
    losses = rng.random(N).astype(np.float32)
    slow_done, plans, errors = threading.Event(), {}, []

    def rank(r):
        try:
            for epoch in range(3):
                shard = svc.plan(epoch, r, 2)
                plans[(r, epoch)] = shard
                ids = shard.ids[(shard.ids >= 0) & (shard.loss_scale > 0)]
                if r == 1 and epoch == 0:
                    assert not slow_done.wait(0.3)  # rank 0 is already asking for epoch 1
                for chunk in np.array_split(ids, 3):
                    svc.report(epoch, chunk, losses[chunk], rank=r)
            svc.end_epoch(2, r, 2)
        except Exception as err:  # noqa: BLE001 - checked below
            errors.append(err)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert svc.committed_epoch == 2  # the last epoch too, once both ranks ended it
    counts = Ledger.from_bytes(svc.ledger_bytes()).count
    np.testing.assert_array_equal(counts, np.full(N, 3))
    ref = InProcessService(N, {"policy": "mixtrain", "warmup_epochs": 1}, seed=1)
    for epoch in range(3):
        glob = ref.plan(epoch)
        for r in (0, 1):
            assert plans[(r, epoch)].equals(glob.shard(r, 2))
        real = glob.ids[(glob.ids >= 0) & (glob.loss_scale > 0)]
        ref.report(epoch, real, losses[real])


def test_a_rank_that_never_finishes_gives_a_clear_timeout():
    svc = InProcessService(N, "none", seed=1)
    svc.plan(0, 0, 2)
    svc.report(0, np.array([1]), np.array([0.5], np.float32))
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\] of 2 did not finish epoch 0 "
                                           r"within 0.2 s"):
        svc.plan(1, 0, 2, wait=0.2)
    with pytest.raises(PlanNotReady, match=r"waits for rank\(s\) \[1\] of 2"):
        svc.plan(1, 0, 2, wait=0)
    with pytest.raises(ValueError, match="world_size 3 disagrees with 2"):
        svc.plan(1, 2, 3, wait=0)
    svc.plan(1, 1, 2)  # rank 1 arrives: epoch 0 closes
    assert svc.committed_epoch == 0
    svc.commit(0)


def test_an_explicit_commit_releases_waiting_ranks():
    """With a barrier of their own (DDP), rank 0 commits: nobody waits for the others."""
    svc = InProcessService(N, "none", seed=1)
    svc.report(0, np.array([1]), np.array([0.5], np.float32))
    svc.commit(0)
    assert svc.plan(1, 0, 2, wait=0).num_slots > 0
