"""A tiny multi-rank training job for the distributed, fault and resume tests (no tests here).

:func:`launch` spawns ``world`` processes that set torchrun's environment variables and run
:func:`rank_main`: ``init_distributed`` (gloo), ``job_service`` (rank 0 serves, or everybody
connects to ``server``), a :class:`MixedLoader` on the rank's shard, and ``fit`` under DDP. Each
rank writes what it saw (plan shards, slot ids, acknowledged reports, final weights) to
``out/rank<r>.pkl`` for the test to check against independent references.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import time
from typing import Any, Dict, List, Optional

import numpy as np

N = 200
SEED = 7
POLICY = {"policy": "mixtrain", "warmup_epochs": 1, "fraction": 0.5, "layout": "halves",
          "grid_cells": 4}


class StripeDataset:
    """Class c: a bright vertical stripe in column band c plus noise; deterministic by seed."""

    def __init__(self, n: int, classes: int = 4, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, classes, size=n)
        self.images = rng.integers(0, 60, size=(n, 32, 32, 3), dtype=np.uint8)
        band = 32 // classes
        for i, c in enumerate(self.labels):
            self.images[i, :, c * band:(c + 1) * band] += 150

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class Recorder:
    """Service proxy keeping each acknowledged report and each plan handed to the loader."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reports: Dict[int, List[tuple]] = {}
        self.plans: Dict[int, bytes] = {}
        self.on_report = None

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def report(self, epoch, ids, losses, rank=0):
        self.inner.report(epoch, ids, losses, rank=rank)
        dropped = getattr(self.inner, "dropped_losses", 0)
        self.reports.setdefault(epoch, []).append((np.array(ids), np.array(losses), dropped))
        if self.on_report is not None:
            self.on_report(epoch, sum(len(r[0]) for rs in self.reports.values() for r in rs))

    def commit(self, epoch):
        self.inner.commit(epoch)

    def plan(self, epoch, rank=0, world_size=1):
        plan = self.inner.plan(epoch, rank, world_size)
        self.plans[epoch] = plan.to_bytes()
        return plan

    def state_dict(self):
        return self.inner.state_dict()


class Watched:
    """Loader proxy recording the real (loss_scale > 0) ids of every batch; can die on cue."""

    def __init__(self, loader, die_at: Optional[tuple] = None, how: str = "exit",
                 on_batch=None) -> None:
        self.loader = loader
        self.die_at = die_at
        self.how = how
        self.on_batch = on_batch
        self.seen: Dict[int, List[np.ndarray]] = {}
        self.epoch = -1

    @property
    def source(self):
        return self.loader.source

    def close(self):
        self.loader.close()

    def set_epoch(self, epoch):
        self.epoch = epoch
        return self.loader.set_epoch(epoch)

    @property
    def plan(self):
        return self.loader.plan

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for step, batch in enumerate(self.loader):
            if self.die_at == (self.epoch, step):
                if self.how == "exit":
                    os._exit(3)  # no cleanup at all, like a crashed process
                raise RuntimeError(f"killed at epoch {self.epoch} step {step}")
            if self.on_batch is not None:
                self.on_batch(self.epoch, step)
            yield batch
            # resumed: the trainer took the step (a batch it fetched and dropped is not counted)
            real = batch.ids[batch.loss_scale > 0]
            self.seen.setdefault(self.epoch, []).append(real.numpy().copy())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model():
    import torch

    from mixpipe.train.models import SmallResNet, SmallResNetSettings

    torch.manual_seed(0)
    return SmallResNet(SmallResNetSettings(num_classes=4, width=4))


def rank_main(rank: int, world: int, port: int, out: str, cfg: Dict[str, Any]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from mixpipe.torch import MixedLoader
    from mixpipe.train import Schedule, fit
    from mixpipe.train.distributed import barrier, init_distributed, job_service, shutdown

    torch.set_num_threads(1)
    cfg = {**cfg, **cfg.get("rank_cfg", {}).get(rank, {})}
    env = init_distributed(timeout=cfg.get("pg_timeout", 60))
    service, owned = job_service(N, cfg.get("policy", POLICY), SEED, server=cfg.get("server"),
                                 timeout=cfg.get("timeout", 20.0),
                                 retries=cfg.get("retries", 2))
    recorder = Recorder(service)
    loader = MixedLoader(StripeDataset(N), recorder, batch_size=16, size=(32, 32), stride=8,
                         rank=env.rank, world_size=env.world_size, seed=SEED)
    die = cfg.get("die") or {}
    watched = Watched(loader, die.get(rank), cfg.get("how", "exit"))
    model = make_model()
    if cfg.get("split_norms"):
        from mixpipe.train.splitnorm import split_norms

        split_norms(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    result: Dict[str, Any] = {"rank": env.rank, "world": env.world_size, "backend": env.backend}
    inner = getattr(service, "inner", None)
    if inner is not None and cfg.get("server") is None:  # the job's own server
        result["auth"] = inner.hello().get("authenticated")
        result["client_key_env"] = os.environ.get("MIXPIPE_CLIENT_KEY")
    try:
        fit(model, watched, opt, cfg.get("epochs", 3), Schedule("linear"), service=recorder,
            progress=False, reporter_chunk=48)
        barrier()
        result["fit"] = "ok"
        if env.rank == 0:
            result["state"] = recorder.state_dict()
    except Exception as err:  # noqa: BLE001 - the test inspects it
        result["fit"] = f"{type(err).__name__}: {err}"
    result.update(seen={e: np.concatenate(v) for e, v in watched.seen.items()},
                  batches={e: len(v) for e, v in watched.seen.items()},
                  plans=recorder.plans,
                  reports={e: (np.concatenate([r[0] for r in rs]),
                               np.concatenate([r[1] for r in rs])) for e, rs in
                           recorder.reports.items()},
                  dropped=getattr(service, "dropped_losses", 0),
                  weights={k: v.detach().clone() for k, v in model.named_parameters()})
    with open(os.path.join(out, f"rank{env.rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if result["fit"] == "ok":
        barrier()  # nobody still talks to the server rank 0 owns
    if owned is not None:
        owned.stop()
    if result["fit"] == "ok":
        shutdown()


def launch(world: int, out: str, cfg: Dict[str, Any], timeout: float = 90.0) -> List[int]:
    """Run the job; return each rank's exit code. Every process is gone when this returns."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, out, cfg), daemon=True)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        if any(p.is_alive() for p in procs):
            raise TimeoutError(f"distributed job did not finish within {timeout:g} s")
        return [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)


def load(out: str, rank: int) -> Dict[str, Any]:
    with open(os.path.join(out, f"rank{rank}.pkl"), "rb") as f:
        return pickle.load(f)
