"""Two ranks, gloo on the CPU, one selection server: the shards, the reports and the ledger."""
import numpy as np
import pytest
import torch

from mixpipe.core.ledger import Ledger
from mixpipe.core.plan import Layout, MixPlan
from mixpipe.server import InProcessService
from mixpipe.train.distributed import DistEnv, ResilientService, agree_steps, free_port, \
    init_distributed, job_service, start_server, wrap_model

from test_distributed_job import N, POLICY, SEED, launch, load, make_model

EPOCHS = 3


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank job (rank 0 serves the job's selection service), shared by the checks below."""
    out = str(tmp_path_factory.mktemp("ddp"))
    codes = launch(2, out, {"epochs": EPOCHS})
    assert codes == [0, 0]
    results = [load(out, r) for r in range(2)]
    for r in results:
        assert r["fit"] == "ok", r["fit"]
    return results


@pytest.mark.slow
def test_the_jobs_own_server_is_authenticated_with_keys_handed_over_by_the_store(two_ranks):
    """Issue 17: rank 0 generates the keys, the other ranks get them from torch.distributed's
    store; no user step, and the server speaks CURVE."""
    assert [r["auth"] for r in two_ranks] == [True, True]
    keys = {r["client_key_env"] for r in two_ranks}
    assert len(keys) == 1 and None not in keys  # the same client key on every rank


@pytest.mark.slow
def test_ranks_cover_every_sample_exactly_once_per_epoch(two_ranks):
    assert [r["world"] for r in two_ranks] == [2, 2]
    assert {r["backend"] for r in two_ranks} == {"gloo"}
    for epoch in range(EPOCHS):
        seen = np.concatenate([r["seen"][epoch] for r in two_ranks])
        np.testing.assert_array_equal(np.sort(seen), np.arange(N))
        # each rank trained its own part, not the whole dataset
        assert all(0 < r["seen"][epoch].size < N for r in two_ranks)


@pytest.mark.slow
def test_every_rank_reports_its_losses_and_the_ledger_counts_each_sample_per_epoch(two_ranks):
    for epoch in range(EPOCHS):
        ids = np.concatenate([r["reports"][epoch][0] for r in two_ranks])
        np.testing.assert_array_equal(np.sort(ids), np.arange(N))
        for r in two_ranks:  # a rank reports exactly what it trained on
            np.testing.assert_array_equal(np.sort(r["reports"][epoch][0]),
                                          np.sort(r["seen"][epoch]))
    ledger = Ledger.from_bytes(two_ranks[0]["state"]["ledger"])
    assert ledger.committed_epoch == EPOCHS - 1
    np.testing.assert_array_equal(ledger.count, np.full(N, EPOCHS))
    last = np.full(N, np.nan, np.float32)
    for r in two_ranks:
        ids, losses = r["reports"][EPOCHS - 1]
        last[ids] = losses
    np.testing.assert_array_equal(ledger.last_loss, last)
    assert two_ranks[0]["state"]["pending"] == {}


@pytest.mark.slow
def test_each_rank_gets_its_shard_of_one_global_plan(two_ranks):
    """Replay the job's reports into a fresh in-process service: its global plans, sharded,
    must be byte for byte what each rank's loader got."""
    ref = InProcessService(N, POLICY, seed=SEED)
    mixed_epochs = 0
    for epoch in range(EPOCHS):
        global_plan = ref.plan(epoch)
        for rank, r in enumerate(two_ranks):
            assert r["plans"][epoch] == global_plan.shard(rank, 2).to_bytes()
        shards = [MixPlan.from_bytes(r["plans"][epoch]) for r in two_ranks]
        assert shards[0].num_slots == shards[1].num_slots  # equal steps on every rank
        mixed_epochs += int((global_plan.layout == Layout.HALVES).any())
        for r in two_ranks:
            ref.report(epoch, *r["reports"][epoch])
    assert mixed_epochs == EPOCHS - 1  # warm-up, then mixing: the test exercises real plans


@pytest.mark.slow
def test_ddp_keeps_the_ranks_parameters_identical(two_ranks):
    # (BatchNorm running statistics are rank-local between forwards, as in any DDP job)
    a, b = (r["weights"] for r in two_ranks)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    fresh = dict(make_model().named_parameters())
    assert any(not torch.equal(fresh[k], a[k]) for k in a)  # they did train


@pytest.mark.slow
def test_split_norms_train_under_ddp_though_batches_without_composites_leave_twins_idle(tmp_path):
    """Epoch 0 mixes nothing, so the composites' norms get no gradient for a whole epoch: DDP
    must expect unused parameters, and the ranks must still agree on every weight."""
    codes = launch(2, str(tmp_path), {"epochs": EPOCHS, "split_norms": True})
    assert codes == [0, 0]
    a, b = (load(str(tmp_path), r) for r in range(2))
    assert a["fit"] == "ok" and b["fit"] == "ok", (a["fit"], b["fit"])
    assert any(".aux." in k for k in a["weights"])
    for key in a["weights"]:
        torch.testing.assert_close(a["weights"][key], b["weights"][key], rtol=0, atol=1e-6,
                                   msg=key)
    fresh = dict(make_model().named_parameters())
    twin = next(k for k in a["weights"] if k.endswith(".aux.weight"))
    assert not torch.equal(a["weights"][twin], fresh[twin.replace(".aux.", ".")])  # trained


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == DistEnv()
    assert agree_steps(5) == 5
    net = torch.nn.Linear(2, 2)
    assert wrap_model(net) is net
    service, owned = job_service(10, "none", 0)
    assert isinstance(service, InProcessService) and owned is None


def test_dist_env_refuses_bad_ranks():
    with pytest.raises(ValueError, match="rank"):
        DistEnv(rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        DistEnv(rank=0, world_size=0)


def test_resilient_service_passes_refusals_through():
    service = ResilientService(InProcessService(4, "none"))
    with pytest.raises(ValueError):
        service.report(0, np.array([9]), np.array([1.0], np.float32))
    assert service.dropped_losses == 0


@pytest.mark.slow
def test_ranks_whose_plans_differ_in_length_still_take_the_same_steps(tmp_path):
    """Rank 1 cannot reach the server and trains on the longer unmixed fallback shard; without
    agreeing on the step count DDP would hang at the first all-reduce rank 0 skips."""
    server = start_server(N, POLICY, SEED)
    try:
        dead = f"tcp://127.0.0.1:{free_port()}"
        codes = launch(2, str(tmp_path), {
            "epochs": 2, "pg_timeout": 30, "server": server.url,
            "rank_cfg": {1: {"server": dead, "timeout": 0.3, "retries": 0}}})
    finally:
        server.stop()
    assert codes == [0, 0]
    r0, r1 = load(str(tmp_path), 0), load(str(tmp_path), 1)
    assert r0["fit"] == "ok" and r1["fit"] == "ok"
    plans = [[MixPlan.from_bytes(r["plans"][e]) for e in range(2)] for r in (r0, r1)]
    assert plans[0][1].num_slots < plans[1][1].num_slots  # mixed shard vs unmixed fallback
    for epoch in range(2):
        assert r0["batches"][epoch] == r1["batches"][epoch] == \
            -(-min(p[epoch].num_slots for p in plans) // 16)
    assert r1["dropped"] > 0 and r0["dropped"] == 0


@pytest.mark.slow
def test_concurrent_rank_processes_over_loopback_lose_no_report():
    """The load benchmark's machinery, small: every acknowledged loss is in the ledger file."""
    from mixpipe.bench.load import LoadSettings, run_load

    payload = run_load(LoadSettings(clients=4, losses_per_client=3000, epochs=2, chunk=500,
                                    timeout=30.0, time_limit=60.0), log=lambda *a: None)
    v = payload["verify"]
    assert not payload["errors"] and not payload["truncated"]
    assert v["acked_losses"] == v["ledger_count_sum"] == 24000
    # the probe reported for the next epoch during each commit and plan: counted, not lost
    assert v["acked_losses"] + v["probe_acked_losses"] == v["server_losses_received"]
    assert payload["report_latency_during_commit_and_plan"]["n"] > 0
    assert "report_p99_ms_during_commit_and_plan" in payload["meets_targets"]
    assert v["ledger_count_equals_epochs"] and v["committed_epochs"] == 2
    assert payload["nothing_lost"]
    assert payload["report_latency"]["n"] >= 24000 // 500  # chunks of at most 500 losses
