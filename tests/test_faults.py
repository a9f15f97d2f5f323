"""Faults: the server SIGKILLed and restarted mid-epoch, a server that never answers, a rank
that dies. Loopback only, free ports, every process cleaned up."""
import os
import signal
import threading
import warnings

import numpy as np
import pytest
import torch

from mixpipe.core.ledger import Ledger
from mixpipe.core.plan import Layout, MixPlan
from mixpipe.server import InProcessService, ServerUnavailableWarning, connect
from mixpipe.torch import MixedLoader
from mixpipe.train import Schedule, fit
from mixpipe.train.distributed import ResilientService, free_port, start_server, \
    start_server_process

from test_distributed_job import N, POLICY, SEED, Recorder, StripeDataset, Watched, launch, \
    load, make_model


def _train(service, epochs, on_batch=None, rank=0, world=1):
    recorder = Recorder(service)
    loader = MixedLoader(StripeDataset(N), recorder, batch_size=16, size=(32, 32), stride=8,
                         seed=SEED, rank=rank, world_size=world)
    watched = Watched(loader, on_batch=on_batch)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = fit(model, watched, opt, epochs, Schedule("linear"), service=recorder,
                  progress=False, reporter_chunk=48, rank=rank)
    return history, recorder, watched


def _reference(recorder, epochs):
    """A fresh in-process service fed the acknowledged reports, epoch by epoch."""
    ref = InProcessService(N, POLICY, seed=SEED)
    plans = []
    for epoch in range(epochs):
        plans.append(ref.plan(epoch).to_bytes())
        for ids, losses, _ in recorder.reports[epoch]:
            ref.report(epoch, ids, losses)
    ref.commit(epochs - 1)
    return ref, plans


@pytest.mark.slow
def test_server_sigkilled_and_restarted_mid_epoch_loses_nothing_acknowledged(tmp_path):
    import json

    state = str(tmp_path / "state")
    port = free_port()
    policy_json = json.dumps({k: v for k, v in POLICY.items() if k != "policy"})
    servers = [start_server_process(N, POLICY["policy"], SEED, state_dir=state, port=port,
                                    policy_json=policy_json)]
    restarted = threading.Event()
    logged = []  # bytes of epoch 1 in the write-ahead log when the server was killed
    errors = []

    def restart():
        try:
            servers.append(start_server_process(N, POLICY["policy"], SEED, state_dir=state,
                                                port=port, policy_json=policy_json))
        except Exception as err:  # pragma: no cover - reported by the assertion below
            errors.append(err)
        restarted.set()

    def on_batch(epoch, step):
        if (epoch, step) == (1, 3):  # mid-epoch, with reports of this epoch acknowledged
            wal = os.path.join(state, "wal", "epoch-00000001.wal")
            logged.append(os.path.getsize(wal) if os.path.exists(wal) else 0)
            os.kill(servers[0].process.pid, signal.SIGKILL)
            servers[0].process.wait(10)
            threading.Thread(target=restart, daemon=True).start()

    client = connect(servers[0].url, timeout=5.0, retries=4, num_samples=N, seed=SEED)
    try:
        history, recorder, _ = _train(client, 3, on_batch)
        assert restarted.wait(30) and not errors
        assert servers[0].process.returncode == -signal.SIGKILL
        final = client.state_dict()
    finally:
        client.close()
        for s in servers:
            s.stop()
    assert len(history["epochs"]) == 3
    assert client.fallbacks == 0  # no epoch had to fall back: the restart was in time
    assert logged and logged[0] > 0  # the replay had acknowledged epoch-1 reports to restore
    ref, plans = _reference(recorder, 3)
    # the restarted server replayed its log: the ledger is exactly the acknowledged reports
    assert final["ledger"] == ref.ledger_bytes()
    ledger = Ledger.from_bytes(final["ledger"])
    np.testing.assert_array_equal(ledger.count, np.full(N, 3))
    # and every plan the loader got is what the uninterrupted reference derives
    assert [recorder.plans[e] for e in range(3)] == plans


def test_unreachable_server_falls_back_to_no_mixing_with_one_warning():
    url = f"tcp://127.0.0.1:{free_port()}"  # nobody listens here
    service = ResilientService(connect(url, timeout=0.3, retries=0, num_samples=N, seed=SEED))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history, recorder, watched = _train(service, 2)
    service.close()
    ours = [w for w in caught if issubclass(w.category, (ServerUnavailableWarning,
                                                          RuntimeWarning))]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert len(history["epochs"]) == 2
    for epoch in range(2):
        plan = MixPlan.from_bytes(recorder.plans[epoch])
        assert (plan.layout == Layout.SINGLE).all()
        np.testing.assert_array_equal(np.sort(np.concatenate(watched.seen[epoch])), np.arange(N))
    assert service.dropped_losses == 2 * N and service.dropped_commits == 2


@pytest.mark.slow
def test_a_rank_that_dies_leaves_the_server_consistent_and_the_survivors_reports_intact(
        tmp_path):
    state = str(tmp_path / "state")
    server = start_server(N, POLICY, SEED, state_dir=state)
    try:
        out = str(tmp_path)
        codes = launch(2, out, {"server": server.url, "die": {1: (1, 2)}, "epochs": 3,
                                "pg_timeout": 30}, timeout=100)
        assert codes[1] == 3  # rank 1 died mid-epoch 1
        survivor = load(out, 0)
        assert survivor["fit"] != "ok"  # rank 0 noticed its peer's death and stopped
        assert not os.path.exists(os.path.join(out, "rank1.pkl"))
        core = server.core
        live = core.state_dict()
        shards = [core.plan(1, rank, 2) for rank in range(2)]  # the job's epoch-1 plan
    finally:
        server.stop()
    # epoch 0 finished by both ranks: committed, every sample once
    ledger = Ledger.from_bytes(live["ledger"])
    assert ledger.committed_epoch == 0
    np.testing.assert_array_equal(ledger.count, np.ones(N))
    # epoch 1 is pending: rank 0's acknowledged reports all there, nothing foreign
    pending_ids, pending_losses = live["pending"][1]["ids"], live["pending"][1]["losses"]
    ids0, losses0 = survivor["reports"][1]
    assert ids0.size > 0
    found = dict(zip(pending_ids.tolist(), pending_losses.tolist()))
    assert all(found.get(i) == l for i, l in zip(ids0.tolist(), losses0.astype(float).tolist()))
    assert shards[0].to_bytes() == survivor["plans"][1]
    own0 = np.isin(pending_ids, shards[0].ids[shards[0].loss_scale > 0])
    # from rank 0's shard exactly its acknowledged reports; the rest is rank 1's partial epoch,
    # each id at most once (nothing duplicated, nothing torn)
    np.testing.assert_array_equal(np.sort(pending_ids[own0]), np.sort(ids0))
    assert np.unique(pending_ids).size == pending_ids.size
    assert np.isin(pending_ids[~own0], shards[1].ids[shards[1].loss_scale > 0]).all()
    # a restart on the same directory rebuilds exactly this state, and the job can go on
    again = InProcessService(N, POLICY, seed=SEED, state_dir=state)
    try:
        replayed = again.state_dict()
        assert replayed["ledger"] == live["ledger"]
        np.testing.assert_array_equal(np.sort(replayed["pending"][1]["ids"]),
                                      np.sort(pending_ids))
        plan = again.plan(2)
        plan.validate()
        assert Ledger.from_bytes(again.state_dict()["ledger"]).count[ids0].min() == 2
    finally:
        again.close()
