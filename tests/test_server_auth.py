"""Issue 17 (and the server items of issue 16) over the network: CURVE keys end to end, refusals
logged, LOAD_STATE off by default, bounded failure when nobody listens, addresses without a
transport, and two trainer processes on one server with no barrier of their own."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from mixpipe.core.ledger import Ledger  # noqa: E402
from mixpipe.server import InProcessService, SelectionServer, connect  # noqa: E402
from mixpipe.server.client import ServerRefused, ServerUnavailable  # noqa: E402
from mixpipe.server.keys import generate_keys, new_job_keys  # noqa: E402

N = 100
PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def keyed(tmp_path):
    keydir = str(tmp_path / "keys")
    generate_keys(keydir)
    svc = InProcessService(N, "none", seed=1)
    server = SelectionServer(svc, "tcp://127.0.0.1:*", poll_ms=20, keys=keydir).start()
    yield svc, server, keydir
    server.stop()


def test_generated_keys_are_private_and_not_overwritten(tmp_path):
    keydir = tmp_path / "k"
    server, client = generate_keys(keydir)
    assert client.server == server.public and client.public in server.clients
    assert oct(os.stat(keydir).st_mode & 0o777) == "0o700"
    for name in ("server.key_secret", "client.key_secret"):
        assert oct(os.stat(keydir / name).st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="already holds keys"):
        generate_keys(keydir)


def test_a_client_with_the_keys_is_served(keyed):
    svc, server, keydir = keyed
    with connect(server.endpoint, timeout=5, keys=keydir) as client:
        assert client.hello()["authenticated"] is True
        client.report(0, np.array([1, 2]), np.array([0.5, 1.0], np.float32))
    assert svc.stats()["pending_losses"] == 2


def test_keys_from_the_environment(keyed, monkeypatch):
    _svc, server, keydir = keyed
    monkeypatch.setenv("MIXPIPE_KEYS", keydir)
    with connect(server.endpoint, timeout=5) as client:
        assert client.hello()["authenticated"] is True


@pytest.mark.parametrize("who", ["no keys", "unknown key", "wrong server key"])
def test_unauthenticated_clients_are_refused_at_once_and_logged(keyed, who, caplog,
                                                                monkeypatch):
    svc, server, keydir = keyed
    for name in ("MIXPIPE_KEYS", "MIXPIPE_SERVER_KEY", "MIXPIPE_CLIENT_KEY",
                 "MIXPIPE_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    _, stranger = new_job_keys()
    from mixpipe.server.keys import ClientKeys, client_keys

    good = client_keys(keydir)
    keys = {"no keys": None, "unknown key": ClientKeys(good.server, stranger.public,
                                                       stranger.secret),
            "wrong server key": ClientKeys(stranger.server, good.public, good.secret)}[who]
    caplog.set_level(logging.WARNING, logger="mixpipe")
    client = connect(server.endpoint, timeout=10, retries=2, keys=keys, num_samples=N)
    start = time.monotonic()
    with pytest.raises(ServerRefused, match="selection server tcp://127.0.0.1"):
        client.plan(0)  # no fallback plan hides a key problem
    assert time.monotonic() - start < 5  # refused at the handshake, not after the timeouts
    with pytest.raises(ServerRefused):
        client.report(0, np.array([1]), np.array([0.5], np.float32))
    client.close()
    assert svc.stats()["reports_received"] == 0
    deadline = time.monotonic() + 5
    while "refused a client" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "refused a client" in caplog.text
    if who == "unknown key":
        assert stranger.public.decode() in caplog.text and "127.0.0.1" in caplog.text
    with connect(server.endpoint, timeout=5, keys=keydir) as ok:
        assert ok.stats()["clients_refused"] >= 1


def test_a_server_without_keys_refuses_a_public_bind_and_keyed_clients():
    svc = InProcessService(N, "none")
    with pytest.raises(ValueError, match="without keys would let any host"):
        SelectionServer(svc, "tcp://0.0.0.0:*", keys=False)
    server = SelectionServer(svc, "tcp://127.0.0.1:*", poll_ms=20, keys=False).start()
    try:
        _, job_client = new_job_keys()
        client = connect(server.endpoint, timeout=5, keys=job_client)
        with pytest.raises(ServerRefused, match="runs without keys"):
            client.hello()
        client.close()
    finally:
        server.stop()


def test_load_state_over_the_network_needs_the_flag(keyed, caplog):
    svc, server, keydir = keyed
    caplog.set_level(logging.WARNING, logger="mixpipe")
    with connect(server.endpoint, timeout=5, keys=keydir) as client:
        client.report(0, np.array([1]), np.array([0.5], np.float32))
        before = svc.ledger_bytes(), svc.stats()["pending"]
        with pytest.raises(PermissionError, match="--allow-load-state"):
            client.load_state_dict(Ledger(N).state_dict() | {
                "num_samples": N, "seed": 0, "settings": {"policy": "none"}, "pending": {}})
        assert (svc.ledger_bytes(), svc.stats()["pending"]) == before
    assert "refused LOAD_STATE" in caplog.text


# ----------------------------------------------------------------------------- issue 16
@pytest.mark.parametrize("url,fix", [
    ("localhost:5999", "use 'tcp://localhost:5999'"),
    ("http://localhost:5999", "unknown transport"),
    ("", "must be a string"),
])
def test_an_address_without_transport_names_the_fix(url, fix):
    with pytest.raises(ValueError, match=fix) as info:
        connect(url)
    assert "\n" not in str(info.value)


def test_nobody_listening_fails_within_the_stated_time_in_one_line():
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = connect(f"tcp://127.0.0.1:{port}", timeout=30, retries=2, connect_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(ServerUnavailable) as info:
        client.stats()
    spent = time.monotonic() - start
    assert spent < 3 * 0.5 + 1.0  # (retries + 1) x connect_timeout, not 3 x 30 s
    assert "\n" not in str(info.value) and "no selection server at tcp://127.0.0.1" in \
        str(info.value)
    client.close()


TRAINER = textwrap.dedent("""
    import sys, time, numpy as np
    from mixpipe.server import connect
    url, rank, epochs, slow = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    client = connect(url, timeout=20, retries=1, wait=60)
    losses = np.random.default_rng(rank).random({n}).astype(np.float32)
    for epoch in range(epochs):
        shard = client.plan(epoch, rank, 2)
        ids = shard.ids[(shard.ids >= 0) & (shard.loss_scale > 0)]
        for chunk in np.array_split(ids, 4):
            time.sleep(slow)  # the slow rank takes its time over every chunk
            client.report(epoch, chunk, losses[chunk], rank=rank)
        print("epoch", epoch, shard.to_bytes().hex(), flush=True)
    client.end_epoch(epochs - 1, rank, 2)
    print("done", flush=True)
""").format(n=N)


@pytest.mark.slow
def test_two_trainer_processes_share_a_server_with_no_barrier(tmp_path):
    """Issue 16: the fast rank's plan request for epoch 1 closed epoch 0 and the slow rank then
    failed with "epoch 0 is behind the committed epoch"; now the fast rank waits for it."""
    svc = InProcessService(N, {"policy": "mixtrain", "warmup_epochs": 1}, seed=4,
                           state_dir=str(tmp_path / "state"))
    server = SelectionServer(svc, "tcp://127.0.0.1:*", poll_ms=20, keys=False).start()
    epochs = 3
    try:
        procs = [subprocess.Popen([PY, "-c", TRAINER, server.endpoint, str(rank), str(epochs),
                                   str(slow)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT)
                 for rank, slow in ((0, 0.0), (1, 0.3))]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0 and out.strip().endswith("done"), err[-2000:]
        stats = svc.stats()
        assert stats["reports_refused"] == 0 and stats["committed_epoch"] == epochs - 1
        np.testing.assert_array_equal(Ledger.from_bytes(svc.ledger_bytes()).count,
                                      np.full(N, epochs))
        assert stats["plans_not_ready"] > 0  # the fast rank did have to wait
    finally:
        server.stop()
        svc.close()


@pytest.mark.slow
def test_mixpipe_serve_with_generated_keys_end_to_end(tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("MIXPIPE_")]:
        monkeypatch.delenv(name)
    keydir = str(tmp_path / "keys")
    made = subprocess.run([PY, "-m", "mixpipe", "serve", "--generate-keys", keydir],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert made.returncode == 0 and "client.key_secret" in made.stdout
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXPIPE_")}
    proc = subprocess.Popen([PY, "-m", "mixpipe", "serve", "--num-samples", str(N), "--bind",
                             url, "--keys", keydir, "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line and "auth=curve" in line, line
        with connect(url, timeout=10, keys=keydir) as client:
            client.report(0, np.array([1, 2]), np.array([0.5, 1.0], np.float32))
            assert client.stats()["pending_losses"] == 2
        stranger = connect(url, timeout=10, keys=False)
        with pytest.raises(ServerRefused, match="expects CURVE keys"):
            stranger.hello()
        stranger.close()
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert "refused a client" in err
