"""The network selection service over loopback ZeroMQ: refusals over the wire, malformed
messages, crash and restart of a `mixpipe serve` process, concurrent clients, client fallback."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from mixpipe.core.ledger import Ledger  # noqa: E402
from mixpipe.core.policies import settings_from_dict  # noqa: E402
from mixpipe.server import (InProcessService, SelectionServer, SelectionService,  # noqa: E402
                            ServerUnavailable, ServerUnavailableWarning, connect)
from mixpipe.server.protocol import HEADER, MAGIC, VERSION, Op, Status, decode, encode  # noqa

N = 300
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




@pytest.fixture
def served(tmp_path):
    """An in-process service behind a SelectionServer thread, and a client for it."""
    svc = InProcessService(N, "mixtrain", seed=7, state_dir=str(tmp_path / "state"))
    server = SelectionServer(svc, "tcp://127.0.0.1:*", poll_ms=20, allow_load_state=True).start()
    client = connect(server.endpoint, timeout=5, retries=0)
    yield svc, server, client
    client.close()
    server.stop()
    svc.close()


def raw_request(endpoint, frames, timeout=5.0):
    """Send arbitrary frames from a bare DEALER and return the decoded reply."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(int(timeout * 1000)), "server did not reply"
        reply = sock.recv_multipart()
        if reply and reply[0] == b"":  # echoed as a REQ envelope delimiter
            reply = reply[1:]
        return decode(reply)
    finally:
        sock.close()


def rand_report(rng, n=40, num_samples=N):
    return rng.integers(0, num_samples, n), rng.random(n).astype(np.float32)


# ----------------------------------------------------------------------------- interface
def test_client_satisfies_the_protocol_and_learns_the_dataset(served):
    svc, _server, client = served
    assert isinstance(client, SelectionService)
    assert client.num_samples == N
    assert client.hello()["settings"] == svc.settings.to_dict()


def test_remote_and_in_process_give_the_same_results(served):
    svc, _server, client = served
    rng = np.random.default_rng(1)
    twin = InProcessService(N, "mixtrain", seed=7)
    for epoch in range(3):
        for _ in range(3):
            r = rand_report(rng)
            client.report(epoch, *r, rank=1)
            twin.report(epoch, *r, rank=1)
        client.commit(epoch)
        twin.commit(epoch)
        for rank, world in ((0, 1), (1, 2)):
            assert client.plan(epoch + 1, rank, world).equals(twin.plan(epoch + 1, rank, world))
    assert client.state_dict()["ledger"] == twin.ledger_bytes()
    stats = client.stats()
    assert stats["losses_received"] == 9 * 40 and stats["committed_epoch"] == 2


def test_state_dict_round_trip_over_the_wire(served):
    svc, _server, client = served
    rng = np.random.default_rng(2)
    client.report(0, *rand_report(rng))
    client.commit(0)
    client.report(1, *rand_report(rng))
    state = client.state_dict()
    other = InProcessService(N, "none")
    other.load_state_dict(state)
    assert other.ledger_bytes() == svc.ledger_bytes()
    client.report(1, *rand_report(rng))
    client.load_state_dict(state)  # back to the snapshot: the second epoch-1 report is gone
    assert client.stats()["pending"] == [[1, 40]]


# ----------------------------------------------------------------------------- refusals
BAD = [
    (1, np.array([0, N]), np.array([1.0, 1.0], np.float32), ValueError, f"id {N} out of range"),
    (1, np.array([0, 1]), np.array([np.nan, 1.0], np.float32), ValueError, "not finite"),
    (1, np.array([0, 1]), np.array([np.inf, 1.0]), ValueError, "not finite"),
    (1, np.array([0, 1, 2]), np.array([1.0, 1.0], np.float32), ValueError, "length mismatch"),
    (1, np.array([0.0, 1.0]), np.array([1.0, 1.0], np.float32), TypeError, "ids must be an int"),
    (1, np.array([0, 1]), np.array([1, 2], np.int32), TypeError, "losses must be a float"),
    (-1, np.array([0]), np.array([1.0], np.float32), ValueError, "epoch must be >= 0"),
    (0, np.array([0]), np.array([1.0], np.float32), ValueError, "behind the committed epoch 0"),
]


@pytest.mark.parametrize("epoch,ids,losses,kind,message", BAD)
def test_bad_reports_over_the_wire_are_refused_and_change_nothing(served, epoch, ids, losses,
                                                                  kind, message):
    svc, _server, client = served
    client.report(0, np.array([3]), np.array([0.25], np.float32))
    client.commit(0)
    client.report(1, np.array([4]), np.array([0.5], np.float32))
    before_ledger, before_pending = svc.ledger_bytes(), svc.stats()["pending"]
    with pytest.raises(kind, match=message):
        client.report(epoch, ids, losses)
    assert svc.ledger_bytes() == before_ledger
    assert svc.stats()["pending"] == before_pending
    client.report(1, np.array([5]), np.array([0.5], np.float32))  # still serving


def test_bad_plan_and_commit_requests_come_back_as_errors(served):
    _svc, _server, client = served
    with pytest.raises(ValueError, match="rank"):
        client.plan(0, rank=3, world_size=2)
    with pytest.raises(TypeError, match="epoch must be an integer"):
        client.commit("two")
    with pytest.raises(ValueError, match="unknown policy"):
        client.load_state_dict({**client.state_dict(), "settings": {"policy": "nosuch"}})


def _header(op=Op.REPORT, request_id=9, meta=None, magic=MAGIC, version=VERSION):
    return HEADER.pack(magic, version, int(op), 0, request_id) + json.dumps(meta or {}).encode()


MALFORMED = [
    ([b""], "empty message"),
    ([b"MXSV\x01"], "header frame truncated"),
    ([_header(magic=b"HTTP")], "bad magic"),
    ([_header(version=9)], "protocol version 9 not supported"),
    ([_header(op=42)], "unknown op 42"),
    ([HEADER.pack(MAGIC, VERSION, Op.REPORT, 0, 9) + b"{not json"], "not valid UTF-8 JSON"),
    ([HEADER.pack(MAGIC, VERSION, Op.REPORT, 0, 9) + b"[1, 2]"], "must be a JSON object"),
    ([_header(meta={"epoch": 1, "ids_dtype": "<i8", "losses_dtype": "<f4"}),
      np.arange(3).tobytes()], "report needs 2 data frames"),
    ([_header(meta={"epoch": 1, "ids_dtype": "<i8", "losses_dtype": "<f4"}),
      np.arange(3).tobytes()[:13], np.ones(3, np.float32).tobytes()], "not a whole number"),
    ([_header(meta={"epoch": 1, "ids_dtype": "<i8", "losses_dtype": "<f4"}),
      np.arange(3).tobytes(), np.ones(3, np.float32).tobytes()[:8]], "length mismatch"),
    ([_header(meta={"epoch": 1, "ids_dtype": "|O", "losses_dtype": "<f4"}),
      b"", b""], "not a plain integer"),
    ([_header(meta={"epoch": 1, "ids_dtype": "nonsense", "losses_dtype": "<f4"}),
      b"", b""], "not a numpy dtype"),
    ([_header(meta={"epoch": 1, "losses_dtype": "<f4"}), b"", b""], "ids_dtype must be"),
    ([_header(meta={"ids_dtype": "<i8", "losses_dtype": "<f4"}),
      np.arange(3).tobytes(), np.ones(3, np.float32).tobytes()], "epoch must be an integer"),
    ([_header(op=Op.LOAD_STATE, meta={"state": {}})], "needs a 'pending' list"),
    ([_header(op=Op.LOAD_STATE, meta={"state": {"pending": []}})], "needs 1 data frames"),
]


@pytest.mark.parametrize("frames,message", MALFORMED)
def test_malformed_messages_get_an_error_reply_and_the_server_survives(served, frames, message):
    svc, server, client = served
    client.report(0, np.array([1, 2]), np.array([0.5, 1.5], np.float32))
    before_ledger, before_pending = svc.ledger_bytes(), svc.stats()["pending"]
    _op, status, _rid, meta, _ = raw_request(server.endpoint, frames)
    assert status == Status.ERROR
    assert message in meta["error"]
    assert svc.ledger_bytes() == before_ledger and svc.stats()["pending"] == before_pending
    assert client.hello()["num_samples"] == N  # and it still answers


def test_a_resent_report_is_applied_once(served):
    svc, server, _client = served
    meta = {"epoch": 0, "rank": 0, "ids_dtype": "<i8", "losses_dtype": "<f4", "client": "c1"}
    msg = encode(Op.REPORT, 5, meta, [np.arange(10).tobytes(), np.ones(10, np.float32).tobytes()])
    for _ in range(2):  # a lazy-pirate retry resends the same request id
        _op, status, rid, reply, _ = raw_request(server.endpoint, msg)
        assert status == Status.OK and rid == 5 and reply == {"accepted": 10}
    assert svc.stats()["pending_losses"] == 10


# ----------------------------------------------------------------------------- fallback
def test_client_falls_back_to_a_no_mixing_plan_and_warns_once():
    url = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    client = connect(url, timeout=0.2, retries=1, num_samples=N, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plans = [client.plan(e, rank=1, world_size=2) for e in (0, 1)]
    assert [w.category for w in caught] == [ServerUnavailableWarning]
    none = InProcessService(N, "none", seed=3)
    for e, plan in enumerate(plans):
        assert plan.equals(none.plan(e).shard(1, 2))  # one thread: no rank 0 to wait for
        assert (plan.layout == 0).all()
    with pytest.raises(ServerUnavailable, match="no selection server at"):
        client.report(0, np.array([1]), np.array([0.5], np.float32))
    client.close()


def test_fallback_without_a_dataset_size_is_a_clear_error():
    client = connect(f"tcp://127.0.0.1:{free_port()}", timeout=0.2, retries=0)
    with pytest.raises(ServerUnavailable, match="num_samples"):
        client.plan(0)
    client.close()


@pytest.mark.slow
def test_client_reconnects_when_the_server_comes_back(tmp_path):
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    client = connect(url, timeout=0.3, retries=0, num_samples=N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert client.plan(0).num_slots == N  # fallback
    svc = InProcessService(N, "none", seed=0)
    server = SelectionServer(svc, url, poll_ms=20).start()
    try:
        client.timeout = 5
        client.report(0, np.array([1]), np.array([0.5], np.float32))
        assert svc.stats()["pending_losses"] == 1
    finally:
        client.close()
        server.stop()


# ----------------------------------------------------------------------------- processes
def start_serve(state_dir, port, policy, seed=5):
    proc = subprocess.Popen(
        [PY, "-m", "mixpipe", "serve", "--num-samples", str(N), "--state-dir", str(state_dir),
         "--bind", f"tcp://127.0.0.1:{port}", "--policy", policy, "--seed", str(seed),
         "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line


@pytest.mark.slow
def test_serve_killed_after_acks_restarts_with_every_acknowledged_report(tmp_path):
    policy = "mixtrain"
    port = free_port()
    proc, _ = start_serve(tmp_path, port, policy)
    url = f"tcp://127.0.0.1:{port}"
    rng = np.random.default_rng(11)
    epochs = {e: [rand_report(rng) for _ in range(3)] for e in range(3)}
    try:
        client = connect(url, timeout=5, retries=1)
        for e in (0, 1):
            for r in epochs[e]:
                client.report(e, *r)
        plan2 = client.plan(2)  # commits 0 and 1 (the ledger file), plan cached
        for r in epochs[2]:
            client.report(2, *r)  # acknowledged, logged, not committed
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    client.close()
    # a write torn by the crash: half a record's header at the end of the live log
    wal = tmp_path / "wal" / "epoch-00000002.wal"
    with open(wal, "ab") as f:
        f.write(b"MXRC\x00\x01\x02")
    proc, line = start_serve(tmp_path, port, policy)
    try:
        client = connect(url, timeout=5, retries=1)
        assert "committed_epoch=1" in line and "pending_losses=120" in line
        stats = client.stats()
        assert stats["wal_dropped_bytes"] == 7
        assert client.plan(2).equals(plan2)  # recomputed after the restart: identical
        client.commit(2)
        ledger = Ledger.from_bytes(client.state_dict()["ledger"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    expected = Ledger(N)
    for e, rs in epochs.items():
        expected.update(e, np.concatenate([r[0] for r in rs]), np.concatenate([r[1] for r in rs]))
    expected.committed_epoch = 2
    assert ledger.to_bytes() == expected.to_bytes()
    assert proc.returncode == 0


@pytest.mark.parametrize("args,message", [
    (["--policy", "nosuch"], "unknown policy 'nosuch'"),
    (["--policy", "none", "--policy-json", '{"no_such_field": 1}'], "no_such_field"),
    (["--policy", "none", "--policy-json", "{oops"], "not valid JSON"),
])
@pytest.mark.slow
def test_serve_refuses_bad_policy_settings(args, message):
    out = subprocess.run([PY, "-m", "mixpipe", "serve", "--num-samples", "10", "--bind",
                          f"tcp://127.0.0.1:{free_port()}", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr


@pytest.mark.slow
def test_serve_takes_policy_settings_as_json(tmp_path):
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "mixpipe", "serve", "--num-samples", str(N), "--bind",
                             f"tcp://127.0.0.1:{port}", "--policy", "mixtrain", "--policy-json",
                             '{"fraction": 0.3, "warmup_epochs": 2}', "--seed", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in proc.stdout.readline()
        client = connect(f"tcp://127.0.0.1:{port}", timeout=10)
        expected = settings_from_dict({"policy": "mixtrain", "fraction": 0.3,
                                       "warmup_epochs": 2}).to_dict()
        assert client.hello()["settings"] == json.loads(json.dumps(expected))
        assert client.hello()["seed"] == 4
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


CLIENT = textwrap.dedent("""
    import sys, numpy as np
    from mixpipe.server import connect
    url, rank = sys.argv[1], int(sys.argv[2])
    client = connect(url, timeout=20, retries=2)
    rng = np.random.default_rng(rank)
    for _ in range(25):
        ids = rng.integers(0, {n}, 64)
        client.report(0, ids, rng.random(64).astype(np.float32), rank=rank)
    print("done", flush=True)
""").format(n=N)


@pytest.mark.slow
def test_eight_client_processes_reporting_at_once_lose_nothing(served):
    svc, server, _client = served
    procs = [subprocess.Popen([PY, "-c", CLIENT, server.endpoint, str(rank)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(8)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "done" in out, err
    stats = svc.stats()
    assert stats["pending_losses"] == 8 * 25 * 64 and stats["reports_received"] == 8 * 25
    # the same reports, regenerated here, give the same ledger
    every_ids, every_losses = [], []
    for rank in range(8):
        rng = np.random.default_rng(rank)
        for _ in range(25):
            every_ids.append(rng.integers(0, N, 64))
            every_losses.append(rng.random(64).astype(np.float32))
    svc.commit(0)
    got = Ledger.from_bytes(svc.ledger_bytes())
    ids = np.concatenate(every_ids)
    np.testing.assert_array_equal(got.count, np.bincount(ids, minlength=N) > 0)
    losses = np.concatenate(every_losses)
    for i in np.flatnonzero(got.count)[:40]:
        assert got.last_loss[i] in losses[ids == i]


def test_eight_client_threads_sharing_and_not_sharing_a_client(served):
    import threading

    svc, server, client = served
    own = [connect(server.endpoint, timeout=10) for _ in range(4)]
    users = own + [client] * 4  # four threads with their own client, four sharing one

    def work(t):
        rng = np.random.default_rng(50 + t)
        for _ in range(20):
            users[t].report(0, *rand_report(rng, 32), rank=t)
            users[t].plan(0, rank=t % 2, world_size=2)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert svc.stats()["pending_losses"] == 8 * 20 * 32
    for c in own:
        c.close()
