"""The assist policy (AutoAssist): the assistant learns rules, the plan keeps caps and floors.

References are computed here with plain numpy / Python loops; the service-level tests go through
InProcessService, so the policy's state travels exactly as in training.
"""
from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixpipe.core import assist as core
from mixpipe.core.ledger import Ledger, LedgerSnapshot
from mixpipe.core.policies import (POLICIES, STATEFUL, make_plan, make_plan_with_state,
                                   settings_from_dict)
from mixpipe.core.policies.assist import AssistSettings, choose_skips
from mixpipe.core.policies.mixtrain import MixTrainSettings
from mixpipe.server import InProcessService

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------ helpers
def snap(last, ema, last_epoch, count, committed, labels=None) -> LedgerSnapshot:
    return LedgerSnapshot(np.asarray(last, np.float32), np.asarray(ema, np.float32),
                          np.asarray(last_epoch, np.int32), np.asarray(count, np.int32),
                          committed_epoch=committed, labels=labels)


def run_service(svc, epochs, loss_fn, start=0):
    """Ask for each epoch's plan, report a loss for every planned constituent, commit."""
    plan = None
    for epoch in range(start, start + epochs):
        plan = svc.plan(epoch)
        ids = plan.ids[plan.ids >= 0]
        svc.report(epoch, ids, loss_fn(epoch, ids).astype(np.float32))
        svc.commit(epoch)
    return plan


def class_rule_losses(labels, seed=0):
    rng = np.random.default_rng(seed)

    def loss(epoch, ids):  # class 0 stays hard; the rest get easier, with noise
        base = np.where(labels[ids] == 0, 2.0, 1.0 / (1 + epoch))
        return base * rng.uniform(0.6, 1.4, ids.size)

    return loss


def state_of(svc) -> core.AssistState:
    return core.AssistState.from_bytes(svc.state_dict()["policy_state"], svc.num_samples)


# ------------------------------------------------------------------------------ registration
def test_registered_like_the_others_and_round_trips_through_dict():
    s = settings_from_dict({"policy": "assist", "max_skip": 0.2,
                            "mix": {"policy": "mixtrain", "fraction": 0.4}})
    assert "assist" in POLICIES and "assist" in STATEFUL
    assert isinstance(s, AssistSettings) and isinstance(s.mix, MixTrainSettings)
    assert settings_from_dict(s.to_dict()) == s
    assert s.to_dict()["mix"]["fraction"] == 0.4


@pytest.mark.parametrize("field,value", [
    ("warmup_epochs", -1), ("target_quantile", 0.0), ("target_quantile", 1.0),
    ("threshold", 1.5), ("skip_ratio", -0.1), ("skip_ratio", 1.01), ("max_skip", 1.0),
    ("class_floor", 2.0), ("rescale", "yes"), ("l2", 0.0), ("newton_steps", 0),
    ("max_train", 3), ("epochs", 0), ("anneal_epochs", -2), ("mix", 3),
    ("mix", {"fraction": 0.5, "bogus": 1}), ("threshold", float("nan")),
])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"AssistSettings.{field}"):
        AssistSettings(**{field: value})


def test_anneal_needs_the_run_length():
    with pytest.raises(ValueError, match="AssistSettings.anneal_epochs"):
        AssistSettings(anneal_epochs=2)
    with pytest.raises(ValueError, match="AssistSettings.anneal_epochs"):
        AssistSettings(epochs=3, anneal_epochs=4)


# ------------------------------------------------------------------------------ the assistant
def test_features_match_a_per_sample_reference():
    rng = np.random.default_rng(3)
    n = 40
    count = rng.integers(0, 4, n)
    last = np.where(count > 0, rng.uniform(0, 3, n), np.nan).astype(np.float32)
    ema = np.where(count > 0, rng.uniform(0, 3, n), np.nan).astype(np.float32)
    last_epoch = np.where(count > 0, rng.integers(0, 5, n), -1)
    labels = rng.integers(0, 5, n)
    s = snap(last, ema, last_epoch, count, 4, labels)
    ids, x, cls = core.features(s, 6, 4)
    assert list(ids) == [i for i in range(n) if count[i] > 0]
    m = np.mean([float(ema[i]) for i in ids])
    for row, c, i in zip(x, cls, ids):
        e, la = float(ema[i]), float(last[i])
        want = [1.0, math.log(e / m + 0.01), math.log(la / m + 0.01),
                max(-5.0, min(5.0, (la - e) / (e + 0.01 * m))), math.log(1 + count[i]),
                math.log(1 + 6 - 1 - last_epoch[i])]
        np.testing.assert_allclose(row, want, rtol=1e-12, atol=1e-12)
        assert c == (labels[i] if labels[i] < 4 else -1)  # a class beyond the weights: none
    assert (core.features(dataclasses.replace(s, labels=None), 6, 4)[2] == -1).all()


def test_fit_reaches_the_minimum_of_the_proximal_objective():
    rng = np.random.default_rng(1)
    x = np.c_[np.ones(500), rng.normal(size=(500, 3))]
    cls = rng.integers(-1, 3, 500)  # -1: no class
    dense = np.c_[x, cls[:, None] == np.arange(3)]  # the one-hot block, written out
    y = rng.random(500) < 1 / (1 + np.exp(-(dense @ [0.2, 1.5, -1.0, 0.0, 2.0, 0.0, -2.0])))
    w0 = np.array([0.1, 0.0, 0.3, -0.2, 0.0, 0.5, 0.0])
    w = core.fit_assistant(x, cls, y, w0, l2=0.05, steps=30)
    p = 1 / (1 + np.exp(-(dense @ w)))
    grad = dense.T @ (p - y) / 500 + 0.05 * (w - w0)  # the objective's gradient, by hand
    assert np.abs(grad).max() < 1e-10
    np.testing.assert_allclose(core.predict(w, x, cls), p, rtol=1e-12)
    assert w[1] > 0.5 and w[2] < -0.3 and w[4] > w[6] + 1  # the rule that made the data


def test_training_pairs_use_features_from_before_the_new_loss():
    old = snap([1.0, 2.0, 3.0, np.nan], [1.0, 2.0, 3.0, np.nan], [0, 0, 0, -1], [1, 1, 1, 0], 0)
    new = snap([5.0, 2.0, 0.1, 9.0], [2.2, 2.0, 2.1, 9.0], [1, 0, 1, 1], [2, 1, 2, 1], 1)
    x, cls, y = core.training_pairs(old, 1, new, 0, 0.5)
    # samples 0 and 2 were reported since (1 was not, 3 was not seen before): features are the
    # old snapshot's rows, targets compare their new losses (5.0, 0.1) with their median
    np.testing.assert_array_equal(x, core.features(old, 1, 0)[1][[0, 2]])
    assert cls.tolist() == [-1, -1]
    assert y.tolist() == [True, False]


def test_state_bytes_round_trip_and_refuse_damage():
    s = snap([1.0, 2.0], [1.5, 2.5], [0, 1], [1, 2], 1)
    state = core.AssistState(2, np.array([0.5, -1.0, 2.0]), 3, s, 2, {"pairs": 7})
    back = core.AssistState.from_bytes(state.to_bytes(), 2)
    np.testing.assert_array_equal(back.weights, state.weights)
    for name in ("last_loss", "ema", "last_epoch", "count"):
        np.testing.assert_array_equal(getattr(back.memory, name), getattr(s, name))
    assert (back.num_classes, back.memory_epoch, back.info) == (3, 2, {"pairs": 7})
    assert back.memory.committed_epoch == 1
    cold = core.AssistState.from_bytes(core.AssistState(2).to_bytes(), 2)
    assert cold.weights is None and cold.memory is None
    data = state.to_bytes()
    with pytest.raises(core.AssistStateError, match="truncated"):
        core.AssistState.from_bytes(data[:-3], 2)
    with pytest.raises(core.AssistStateError, match="checksum"):
        core.AssistState.from_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:], 2)
    with pytest.raises(core.AssistStateError, match="magic"):
        core.AssistState.from_bytes(b"X" + data[1:], 2)
    with pytest.raises(core.AssistStateError, match="for 2 samples"):
        core.AssistState.from_bytes(data, 3)


# ------------------------------------------------------------------------------ learned rules
def test_learns_a_class_rule_and_the_plan_keeps_that_class():
    n = 600
    labels = np.arange(n) % 6
    svc = InProcessService(n, AssistSettings(max_skip=0.4, class_floor=0.3), seed=5)
    svc.set_labels(labels)
    run_service(svc, 4, class_rule_losses(labels))
    plan = svc.plan(4).validate()
    hard = np.flatnonzero(labels == 0)
    assert plan.skipped.size > 0
    assert not np.isin(hard, plan.skipped).any()  # the hard class is never skipped
    st_ = state_of(svc)
    rate = st_.info["positive_rate"]
    assert st_.info["fitted"] and st_.info["train_accuracy"] > max(rate, 1 - rate) + 0.1
    # the learned class weights: class 0 far above every other class
    cls_w = st_.weights[core.NUM_BASE_FEATURES:]
    assert cls_w[0] > cls_w[1:].max() + 1.0


def trend_chain(n, steps, seed):
    """Snapshots where only the trend predicts the next loss: each step's level is set by the
    previous step's trend sign, so levels carry no information about the next target."""
    rng = np.random.default_rng(seed)
    sign = rng.choice([-1.0, 1.0], n)
    out = []
    for t in range(steps):
        ema = rng.uniform(0.8, 1.2, n) * np.exp(1.0 * sign)  # level from the previous trend
        sign = rng.choice([-1.0, 1.0], n)
        last = ema * np.exp(0.4 * sign)
        out.append((snap(last, ema, np.full(n, t), np.full(n, t + 1), t), sign))
    return out


def test_learns_a_trend_rule_and_skips_the_falling_samples():
    n = 1000
    s = AssistSettings(warmup_epochs=0, max_skip=0.45, class_floor=0.0, skip_ratio=0.8)
    state = None
    chain = trend_chain(n, 5, seed=2)
    for t, (snapshot, _) in enumerate(chain):
        plan, state = make_plan_with_state(snapshot, s, 0, t + 1, state)
    sign = chain[-1][1]
    skipped = np.isin(np.arange(n), plan.skipped)
    assert skipped.sum() > 0.3 * n
    assert skipped[sign > 0].mean() < 0.02  # rising samples are kept
    assert skipped[sign < 0].mean() > 0.6  # falling ones are what gets skipped
    w = core.AssistState.from_bytes(state, n).weights
    assert w[3] > 0 or (w[2] - w[1]) > 0  # the trend (or last - ema) raises the value


def test_cold_assistant_skips_nothing():
    snapshot = trend_chain(50, 1, 0)[0][0]
    plan = make_plan(snapshot, AssistSettings(warmup_epochs=0), 0, 3)
    assert plan.skipped.size == 0 and plan.num_slots == 50


# ------------------------------------------------------------------------------ caps and floors
@FAST
@given(n=st.integers(1, 300), classes=st.integers(1, 6), seed=st.integers(0, 10_000),
       skip_ratio=st.floats(0, 1), max_skip=st.floats(0, 0.99), floor=st.floats(0, 1),
       threshold=st.floats(0.05, 0.95), rescale=st.booleans())
def test_choose_skips_caps_floors_and_unbiased_scales(n, classes, seed, skip_ratio, max_skip,
                                                      floor, threshold, rescale):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    ids = np.flatnonzero(rng.random(n) < 0.8)  # some samples never seen
    p = rng.random(ids.size)
    s = AssistSettings(skip_ratio=skip_ratio, max_skip=max_skip, class_floor=floor,
                       threshold=threshold, rescale=rescale)
    skip, scale = choose_skips(p, ids, labels, n, s, seed, 3)
    low = set(ids[p < threshold].tolist())
    assert set(np.flatnonzero(skip).tolist()) <= low  # only low-value seen samples
    assert skip.sum() <= max_skip * n
    want = {}
    for c in range(classes):
        size = int((labels == c).sum())
        kept = size - int(skip[labels == c].sum())
        assert kept >= floor * size  # the class floor
        n_low = sum(1 for i in low if labels[i] == c)
        want[c] = max(0, min(int(math.floor(skip_ratio * n_low)), size - math.ceil(floor * size)))
        k = int(skip[labels == c].sum())
        assert k <= want[c]
        if scale is not None and 0 < k < n_low:
            kept_low = [i for i in low if labels[i] == c and not skip[i]]
            np.testing.assert_allclose(scale[kept_low], n_low / (n_low - k), rtol=1e-6)
            # P(kept) * scale == 1: the expected loss weight of a low-value sample
            assert abs((n_low - k) / n_low * float(scale[kept_low[0]]) - 1) < 1e-6
    if sum(want.values()) <= math.floor(max_skip * n):  # cap not binding: exactly the counts
        assert int(skip.sum()) == sum(want.values())
    if scale is not None:
        others = [i for i in range(n) if i not in low]
        assert np.all(scale[others] == 1.0)
    assert (scale is None) == (not rescale or not skip.any())


@FAST
@given(seed=st.integers(0, 10_000), max_skip=st.floats(0, 0.9), floor=st.floats(0, 1),
       mix=st.booleans())
def test_service_plans_validate_and_respect_caps(seed, max_skip, floor, mix):
    n = 240
    labels = np.random.default_rng(seed).integers(0, 4, n)
    s = AssistSettings(max_skip=max_skip, class_floor=floor, skip_ratio=1.0,
                       mix=MixTrainSettings(schedule="constant", fraction=0.5, layout="halves",
                                            grid_cells=4) if mix else None)
    svc = InProcessService(n, s, seed=seed)
    svc.set_labels(labels)
    run_service(svc, 3, class_rule_losses(labels, seed))
    plan = svc.plan(3).validate()
    assert plan.skipped.size <= max_skip * n
    for c in range(4):
        size = int((labels == c).sum())
        assert size - int(np.isin(np.flatnonzero(labels == c), plan.skipped).sum()) >= floor * size


# ------------------------------------------------------------------------------ determinism
def _trained_state(n=300, seed=4):
    labels = np.arange(n) % 3
    svc = InProcessService(n, AssistSettings(), seed=seed)
    svc.set_labels(labels)
    run_service(svc, 3, class_rule_losses(labels, seed))
    return svc


def test_same_inputs_give_byte_identical_plans_and_states():
    svc = _trained_state()
    state = svc.state_dict()
    snapshot = dataclasses.replace(Ledger.from_bytes(state["ledger"]).snapshot(),
                                   labels=state["labels"])
    a = make_plan_with_state(snapshot, svc.settings, 4, 3, state["policy_state"])
    b = make_plan_with_state(snapshot, svc.settings, 4, 3, state["policy_state"])
    assert a[0].to_bytes() == b[0].to_bytes() and a[1] == b[1]
    assert a[0].skipped.size > 0
    c = make_plan_with_state(snapshot, svc.settings, 5, 3, state["policy_state"])
    assert c[0].to_bytes() != a[0].to_bytes()  # the seed matters


def test_state_dict_round_trip_gives_the_same_next_plan():
    svc = _trained_state()
    state = svc.state_dict()
    other = InProcessService(svc.num_samples, "none", seed=99)
    other.load_state_dict(state)
    assert other.plan(3).to_bytes() == svc.plan(3).to_bytes()
    assert other.state_dict()["policy_state"] == svc.state_dict()["policy_state"]
    # without the policy state the assistant starts cold: a different (unskipped) plan
    cold = InProcessService(svc.num_samples, "none")
    cold.load_state_dict({k: v for k, v in state.items() if k != "policy_state"})
    assert cold.plan(3).skipped.size == 0 < svc.plan(3).skipped.size
    assert cold.state_dict()["labels"] is not None


def test_restart_from_the_state_directory_gives_the_same_next_plan(tmp_path):
    n = 300
    labels = np.arange(n) % 3
    loss = class_rule_losses(labels, 4)
    memory = InProcessService(n, AssistSettings(), seed=4)
    memory.set_labels(labels)
    run_service(memory, 3, loss)
    loss = class_rule_losses(labels, 4)  # the same loss stream again
    first = InProcessService(n, AssistSettings(), seed=4, state_dir=str(tmp_path))
    first.set_labels(labels)
    run_service(first, 3, loss)
    first.close()
    again = InProcessService(n, AssistSettings(), seed=4, state_dir=str(tmp_path))
    want = memory.plan(3)
    assert want.skipped.size > 0
    assert again.plan(3).to_bytes() == want.to_bytes()  # labels and assistant came back too
    assert again.state_dict()["policy_state"] == memory.state_dict()["policy_state"]
    again.close()


def test_composes_with_mixtrain_keeping_skips_and_scales():
    svc = _trained_state()
    state = svc.state_dict()
    snapshot = dataclasses.replace(Ledger.from_bytes(state["ledger"]).snapshot(),
                                   labels=state["labels"])
    mix = MixTrainSettings(schedule="constant", fraction=0.5, layout="halves", grid_cells=4)
    alone, _ = make_plan_with_state(snapshot, AssistSettings(), 4, 3, state["policy_state"])
    mixed, _ = make_plan_with_state(snapshot, AssistSettings(mix=mix), 4, 3,
                                    state["policy_state"])
    np.testing.assert_array_equal(np.sort(mixed.skipped), np.sort(alone.skipped))
    kept = svc.num_samples - alone.skipped.size
    groups = int(np.count_nonzero(mixed.counts == 2))
    assert groups == math.floor(0.5 * kept / 2 + 0.5)  # the fraction counts against kept ones
    assert mixed.num_slots == kept - groups
    scale_alone = dict(zip(alone.ids[:, 0].tolist(), alone.loss_scale[:, 0].tolist()))
    real = mixed.ids >= 0
    for i, sc in zip(mixed.ids[real].tolist(), mixed.loss_scale[real].tolist()):
        assert sc == scale_alone[i]  # a kept low-value sample keeps its scale in a composite
    assert max(scale_alone.values()) > 1.0


# ------------------------------------------------------------------------------ server
def test_assistant_training_never_blocks_report(monkeypatch):
    n = 200
    labels = np.arange(n) % 2
    svc = InProcessService(n, AssistSettings(), seed=1)
    svc.set_labels(labels)
    run_service(svc, 3, class_rule_losses(labels))
    started, release = threading.Event(), threading.Event()
    real_fit = core.fit_assistant

    def blocking_fit(*args, **kwargs):
        started.set()
        assert release.wait(30), "the test never released the assistant"
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(core, "fit_assistant", blocking_fit)
    result = []
    planner = threading.Thread(target=lambda: result.append(svc.plan(3)))
    planner.start()
    try:
        assert started.wait(30)  # the assistant is training (and held there)
        before = svc.stats()["losses_received"]
        svc.report(3, np.arange(10), np.ones(10, np.float32))  # returns while it trains
        assert svc.stats()["losses_received"] == before + 10
        assert svc.stats()["pending"] == [[3, 10]]
        assert planner.is_alive() and not result  # the training really was still going
    finally:
        release.set()
        planner.join(30)
    assert result and result[0].validate().skipped.size > 0


def test_set_labels_is_checked_and_kept_in_the_state():
    svc = InProcessService(5, "assist")
    with pytest.raises(ValueError, match="shape"):
        svc.set_labels(np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="integer"):
        svc.set_labels(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        svc.set_labels(np.array([0, 1, -1, 0, 0]))
    svc.set_labels([0, 1, 2, 1, 0])
    state = svc.state_dict()
    assert state["labels"].tolist() == [0, 1, 2, 1, 0]
    other = InProcessService(5, "assist")
    other.load_state_dict(state)
    assert other.state_dict()["labels"].tolist() == [0, 1, 2, 1, 0]
    with pytest.raises(TypeError, match="policy_state"):
        other.load_state_dict({**state, "policy_state": 3})


def test_module_doctest():
    import doctest

    import mixpipe.core.policies.assist as mod
    result = doctest.testmod(mod)
    assert result.attempted > 0 and result.failed == 0


def test_labels_and_assistant_state_travel_over_the_network():
    pytest.importorskip("zmq")
    from mixpipe.server import SelectionServer, connect

    n = 300
    labels = np.arange(n) % 3
    local = InProcessService(n, AssistSettings(), seed=4)
    local.set_labels(labels)
    run_service(local, 3, class_rule_losses(labels, 4))
    remote_core = InProcessService(n, AssistSettings(), seed=4)
    server = SelectionServer(remote_core, "tcp://127.0.0.1:*", poll_ms=20,
                             allow_load_state=True).start()
    client = connect(server.endpoint, timeout=5, retries=0)
    try:
        client.set_labels(labels)
        assert remote_core.state_dict()["labels"].tolist() == labels.tolist()
        with pytest.raises(ValueError, match="shape"):
            client.set_labels(labels[:-1])
        run_service(client, 3, class_rule_losses(labels, 4))
        state = client.state_dict()
        assert state["policy_state"] == local.state_dict()["policy_state"]
        assert client.plan(3).to_bytes() == local.plan(3).to_bytes()
        restored = InProcessService(n, "none")
        restored.load_state_dict(state)  # a state fetched over the wire restores the assistant
        assert restored.plan(3).to_bytes() == local.plan(3).to_bytes()
        client.load_state_dict(local.state_dict())  # and one sent over it is applied whole
        assert remote_core.state_dict()["policy_state"] == local.state_dict()["policy_state"]
    finally:
        client.close()
        server.stop()


# ------------------------------------------------------------------------------ ties (issue 17)
def test_tied_top_losses_are_informative_and_skipping_follows_loss_order():
    """60 % of the losses share the top value: the assistant must learn that the tied block is
    hard, so every skipped sample is an easy one (before the fix it skipped at random)."""
    n = 1000
    rng = np.random.default_rng(3)
    hard = rng.permutation(n)[:600]
    easy_loss = rng.uniform(0.01, 2.0, n)

    def loss(epoch, ids):
        out = easy_loss[ids].copy()
        out[np.isin(ids, hard)] = 16.118
        return out

    svc = InProcessService(n, AssistSettings(), seed=0)
    run_service(svc, 3, loss)
    for epoch in (3, 4):
        plan = svc.plan(epoch)
        assert plan.skipped.size > 0  # the easy block is skippable
        assert not np.isin(plan.skipped, hard).any()
        skipped_loss = loss(epoch, plan.skipped)
        kept = np.setdiff1d(np.arange(n), plan.skipped)
        assert skipped_loss.max() < loss(epoch, kept).max()
        ids = plan.ids[plan.ids >= 0]
        svc.report(epoch, ids, loss(epoch, ids).astype(np.float32))
        svc.commit(epoch)


def test_all_equal_losses_skip_nothing_like_shrink():
    n = 500
    svc = InProcessService(n, AssistSettings(), seed=0)
    shrink = InProcessService(n, "shrink", seed=0)
    for epoch in range(5):
        for s in (svc, shrink):
            plan = s.plan(epoch)
            assert plan.skipped.size == 0, (s.settings.name, epoch)
            ids = plan.ids[plan.ids >= 0]
            s.report(epoch, ids, np.full(ids.size, 0.7, np.float32))
            s.commit(epoch)


def test_training_targets_with_ties_at_the_quantile():
    # tied top block: positive; all equal: no contrast, so no targets at all
    assert core.informative(np.array([1.0, 2.0, 5.0, 5.0, 5.0]), 0.5).tolist() == \
        [False, False, True, True, True]
    assert core.informative(np.array([1.0, 2.0, 3.0, 4.0]), 0.5).tolist() == \
        [False, False, True, True]
    assert core.informative(np.full(6, 0.7), 0.5) is None
