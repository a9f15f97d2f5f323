"""Resume: a job killed mid-epoch and resumed from its last checkpoint gets, byte for byte, the
plans of a job that never stopped, and its ledger ends the same."""
import multiprocessing
import os
import signal
import time

import pytest
import torch

from mixpipe.server import InProcessService, connect
from mixpipe.torch import MixedLoader
from mixpipe.train import Schedule, fit
from mixpipe.train.distributed import load_checkpoint, save_checkpoint, start_server

from test_distributed_job import N, POLICY, SEED, Recorder, StripeDataset, Watched, make_model

EPOCHS = 4
KILL_AT = (2, 3)  # epoch, step: the checkpoint of epoch 1 is the last one written


def run(service, ckpt_path, die_at=None, how="raise", on_batch=None, resume=False):
    """Train EPOCHS epochs (or resume from ``ckpt_path``), checkpointing after every epoch."""
    recorder = Recorder(service)
    loader = MixedLoader(StripeDataset(N), recorder, batch_size=16, size=(32, 32), stride=8,
                         seed=SEED)
    watched = Watched(loader, die_at=die_at, how=how, on_batch=on_batch)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = load_checkpoint(ckpt_path, model, opt, service) if resume else 0

    def on_epoch(record):
        save_checkpoint(ckpt_path, record["epoch"], model, opt, service)

    fit(model, watched, opt, EPOCHS, Schedule("linear"), service=recorder, progress=False,
        reporter_chunk=48, on_epoch=on_epoch, start_epoch=start)
    return recorder, model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    torch.set_num_threads(1)
    service = InProcessService(N, POLICY, seed=SEED)
    recorder, model = run(service, str(tmp_path_factory.mktemp("ref") / "ckpt.pt"))
    return recorder.plans, service.ledger_bytes(), model.state_dict()


def test_killed_mid_epoch_and_resumed_gets_the_same_plans(tmp_path, uninterrupted):
    plans, ledger, weights = uninterrupted
    torch.set_num_threads(1)
    ckpt = str(tmp_path / "ckpt.pt")
    service = InProcessService(N, POLICY, seed=SEED)
    with pytest.raises(RuntimeError, match="killed at epoch 2"):
        run(service, ckpt, die_at=KILL_AT)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1
    fresh = InProcessService(N, POLICY, seed=SEED)  # the process died: its service with it
    recorder, model = run(fresh, ckpt, resume=True)
    assert sorted(recorder.plans) == [2, 3]
    for epoch in (2, 3):
        assert recorder.plans[epoch] == plans[epoch], f"epoch {epoch} plan differs"
    assert fresh.ledger_bytes() == ledger
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key


def _trainer(url, ckpt, marker):
    """A trainer process that is SIGKILLed by the test in the middle of epoch 2."""
    torch.set_num_threads(1)

    def on_batch(epoch, step):
        if (epoch, step) == KILL_AT:
            with open(marker, "w") as f:
                f.write("ready")
            time.sleep(120)  # the test kills us here

    run(connect(url, timeout=20.0, num_samples=N, seed=SEED), ckpt, on_batch=on_batch)


@pytest.mark.slow
def test_trainer_sigkilled_with_a_network_server_resumes_to_the_same_plans(tmp_path,
                                                                         uninterrupted):
    plans, ledger, _ = uninterrupted
    torch.set_num_threads(1)
    ckpt, marker = str(tmp_path / "ckpt.pt"), str(tmp_path / "marker")
    server = start_server(N, POLICY, SEED, state_dir=str(tmp_path / "state"),
                          allow_load_state=True)  # the resume restores the state over the wire
    proc = multiprocessing.get_context("spawn").Process(target=_trainer,
                                                         args=(server.url, ckpt, marker))
    try:
        proc.start()
        deadline = time.monotonic() + 90
        while not os.path.exists(marker):
            assert proc.is_alive() and time.monotonic() < deadline, "trainer never got there"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        # the server still holds the killed epoch's acknowledged partial reports
        assert server.core.stats()["pending"][0][0] == 2
        client = connect(server.url, timeout=20.0, num_samples=N, seed=SEED)
        try:
            recorder, _ = run(client, ckpt, resume=True)
        finally:
            client.close()
        for epoch in (2, 3):
            assert recorder.plans[epoch] == plans[epoch], f"epoch {epoch} plan differs"
        assert server.core.ledger_bytes() == ledger
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        server.stop()
