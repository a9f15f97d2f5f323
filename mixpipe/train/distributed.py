"""Multi-rank training: ``torchrun`` + DDP, with one selection server for the whole job.

What DDP needs from mixpipe, and why it is arranged this way:

* **One server.** Every rank must get its shard of *one* global plan, so every rank talks to the
  same :class:`~mixpipe.server.core.SelectionCore`. Either the user runs ``mixpipe serve`` beside
  the job and passes ``--server tcp://host:port``, or rank 0 serves its own embedded service on a
  network port (a background thread) and broadcasts the address; every rank, rank 0 included,
  then talks to it through :func:`mixpipe.server.connect`, so all ranks see the same transport.
* **Equal steps.** DDP's all-reduce hangs if one rank takes a step the others do not. Shards have
  equal slot counts, but a rank that fell back to a no-mixing plan (server unreachable) would have
  more; :func:`agree_steps` takes the minimum over the ranks, and :func:`mixpipe.train.fit` stops
  every rank there.
* **Report, barrier, commit.** Every rank flushes its reporter, all ranks meet at a barrier, and
  only then does rank 0 commit and anyone fetch the next plan (``fit`` does this). Without a
  barrier of their own, trainers still get one plan: the server knows the world size from the
  plan requests, and a rank's request for epoch ``e + 1`` waits until every rank has asked too
  (or called ``end_epoch(e, rank, world_size)``), so no rank's epoch-``e`` reports are cut off.
* **Authenticated by default.** Rank 0 makes a fresh CURVE key pair for the server and one for
  the clients (:func:`mixpipe.server.keys.new_job_keys`), serves with them, and hands the
  client keys to the other ranks through torch.distributed's own store (the rendezvous every
  rank already trusts), so a multi-node job's server accepts the job's ranks and nobody else,
  with no step by the user. The keys also go into this process's environment
  (``MIXPIPE_SERVER_KEY`` ...), so loaders that connect on their own (DALI workers) use them.
* **Training never stops because of the server.** :class:`ResilientService` drops the losses of
  an unreachable server (warning once) instead of raising from the reporter: the loader is
  already training unmixed on fallback plans then.

Everything here is a no-op (single process) when ``torch.distributed`` is not initialised.

A training script, launched with ``torchrun --nproc_per_node=N train.py`` or plain ``python``::

    env = init_distributed()                                   # gloo on CPU, nccl on GPUs
    service, owned = job_service(len(train), "mixtrain", seed=0)  # or server="tcp://host:port"
    loader = MixedLoader(train, service, 128, (32, 32), stride=8, rank=env.rank,
                         world_size=env.world_size)
    start = load_checkpoint(path, model, opt, service) if os.path.exists(path) else 0
    fit(model, loader, opt, epochs, service=service, start_epoch=start,
        on_epoch=lambda r: save_checkpoint(path, r["epoch"], model, opt, service))
    barrier()
    if owned is not None:
        owned.stop()

Resuming from a checkpoint restores the selection state with the weights, so the remaining
epochs get the same plans as a run that never stopped (``tests/test_resume.py``). Without a
checkpoint, a ``mixpipe serve --state-dir`` server keeps every acknowledged report across its
own crashes (write-ahead log).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistEnv", "init_distributed", "shutdown", "is_distributed", "world", "barrier",
           "broadcast_object", "agree_steps", "wrap_model", "free_port", "ResilientService",
           "JobServer", "start_server", "start_server_process", "job_service", "main_process",
           "save_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (from torchrun's environment variables)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"DistEnv.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"DistEnv.rank must be in [0, world_size={self.world_size}), got "
                             f"{self.rank}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> Tuple[int, int]:
    """(rank, world_size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def main_process() -> bool:
    """Only rank 0 writes files and prints tables."""
    return world()[0] == 0


def init_distributed(backend: Optional[str] = None, timeout: float = 300.0) -> DistEnv:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...).

    Without those variables (a plain ``python`` launch) nothing is initialised and the single
    process environment is returned, so the same script runs both ways. ``backend`` defaults to
    nccl when CUDA is available and gloo otherwise (the CPU).
    """
    if dist.is_available() and dist.is_initialized():
        rank, size = world()
        return DistEnv(rank, size, int(os.environ.get("LOCAL_RANK", 0)), dist.get_backend())
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout))
    return DistEnv(rank, size, local_rank, backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (identity outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree_steps(steps: int) -> int:
    """The smallest step count of all ranks: every rank must take the same number of steps."""
    if not is_distributed():
        return int(steps)
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(steps)], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def wrap_model(net: nn.Module, device: Any = None) -> nn.Module:
    """``net`` in DistributedDataParallel inside a multi-rank group, else ``net`` unchanged.

    Buffers (BatchNorm statistics) are broadcast from rank 0 at each forward, as DDP does by
    default, so every rank evaluates the same model.
    """
    if not is_distributed() or isinstance(net, nn.parallel.DistributedDataParallel):
        return net
    from .splitnorm import split_norm_layers

    device = torch.device(device) if device is not None else torch.device("cpu")
    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    # split norms (splitnorm.py): a batch without composites leaves the twins' parameters
    # without a gradient, which DDP must be told to expect
    return nn.parallel.DistributedDataParallel(
        net, device_ids=ids, find_unused_parameters=bool(split_norm_layers(net)))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ service
class ResilientService:
    """A selection service whose ``report`` / ``commit`` never stop training.

    If the server is unreachable (:class:`~mixpipe.server.ServerUnavailable`, after the client's
    own retries) the losses are dropped and counted, with one warning per service, unless the
    client already warned about falling back to unmixed plans (one warning in all). For
    ``retry_after`` seconds after an outage reports and commits are dropped without a round
    trip, so a dead server costs the trainer one timeout, not one per chunk. Errors the
    server *answers* with (a refused report) still raise: they are bugs, not outages.
    """

    def __init__(self, inner: Any, retry_after: float = 10.0) -> None:
        if retry_after < 0:
            raise ValueError(f"retry_after must be >= 0 seconds, got {retry_after}")
        self.inner = inner
        self.retry_after = float(retry_after)
        self.dropped_losses = 0
        self.dropped_commits = 0
        self._warned = False
        self._down_until = 0.0  # after an outage, drop at once instead of waiting out timeouts

    def _down(self) -> bool:
        return time.monotonic() < self._down_until

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def _outage(self, what: str, err: Exception) -> None:
        self._down_until = time.monotonic() + self.retry_after
        if not self._warned and getattr(self.inner, "fallbacks", 0) == 0:
            from mixpipe.server.client import ServerUnavailableWarning

            warnings.warn(f"{err}: {what} dropped; training continues without loss feedback "
                          "until the server is back", ServerUnavailableWarning, stacklevel=3)
        self._warned = True

    def report(self, epoch: int, ids: Any, losses: Any, rank: int = 0) -> None:
        from mixpipe.server.client import ServerUnavailable

        try:
            if self._down():
                raise ServerUnavailable("the selection server was unreachable moments ago")
            self.inner.report(epoch, ids, losses, rank=rank)
        except ServerUnavailable as err:
            self.dropped_losses += int(getattr(ids, "size", len(ids)))
            self._outage("losses", err)

    def commit(self, epoch: int) -> None:
        from mixpipe.server.client import ServerUnavailable

        try:
            if self._down():
                raise ServerUnavailable("the selection server was unreachable moments ago")
            self.inner.commit(epoch)
        except ServerUnavailable as err:
            self.dropped_commits += 1
            self._outage("commit", err)

    def end_epoch(self, epoch: int, rank: int, world_size: int) -> None:
        """This rank is done with ``epoch`` (trainers without a barrier); dropped in an outage
        like a commit."""
        from mixpipe.server.client import ServerUnavailable

        try:
            if self._down():
                raise ServerUnavailable("the selection server was unreachable moments ago")
            self.inner.end_epoch(epoch, rank, world_size)
        except ServerUnavailable as err:
            self.dropped_commits += 1
            self._outage("end of epoch", err)

    def plan(self, epoch: int, rank: int = 0, world_size: int = 1):
        return self.inner.plan(epoch, rank, world_size)

    def set_labels(self, labels: Any) -> None:
        """Labels are set once before training: an error here is worth stopping for."""
        self.inner.set_labels(labels)

    def stats(self) -> Dict[str, Any]:
        return self.inner.stats()

    def state_dict(self) -> Dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class JobServer:
    """A selection server owned by this process: a thread, or a ``mixpipe serve`` subprocess."""

    def __init__(self, url: str, server: Any = None, process: Optional[subprocess.Popen] = None,
                 core: Any = None) -> None:
        self.url = url
        self.server = server
        self.process = process
        self.core = core

    def stop(self, timeout: float = 10.0) -> None:
        if self.server is not None:
            self.server.stop(timeout)
            self.server = None
        if self.process is not None:
            proc, self.process = self.process, None
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
        if self.core is not None:
            self.core.close()
            self.core = None

    def __enter__(self) -> "JobServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_server(num_samples: int, policy: Any = None, seed: int = 0,
                 state_dir: Optional[str] = None, host: str = "127.0.0.1",
                 port: Optional[int] = None, keys: Any = None, allow_load_state: bool = False,
                 **service_kwargs: Any) -> JobServer:
    """An :class:`InProcessService` served on ``tcp://host:port`` from a background thread.

    ``port`` None picks a free one. The thread holds the GIL only while it serves a request, so
    training in the same process is barely disturbed; a dedicated ``mixpipe serve`` process
    (:func:`start_server_process`) keeps it entirely apart. ``keys`` (server keys or a key
    directory; None: the environment) and ``allow_load_state`` as in
    :class:`~mixpipe.server.SelectionServer`.
    """
    from mixpipe.server import InProcessService, SelectionServer

    core = InProcessService(num_samples, policy, seed=seed, state_dir=state_dir, **service_kwargs)
    try:
        server = SelectionServer(core, f"tcp://{host}:{'*' if port is None else int(port)}",
                                 keys=keys, allow_load_state=allow_load_state)
    except Exception:
        core.close()
        raise
    server.start()
    return JobServer(server.endpoint, server=server, core=core)


def start_server_process(num_samples: int, policy: str = "none", seed: int = 0,
                         state_dir: Optional[str] = None, host: str = "127.0.0.1",
                         port: Optional[int] = None, policy_json: Optional[str] = None,
                         ready_timeout: float = 60.0, extra: Optional[List[str]] = None,
                         stderr: Any = None) -> JobServer:
    """``mixpipe serve`` as a child process; returns once it prints that it listens."""
    port = free_port(host) if port is None else int(port)
    url = f"tcp://{host}:{port}"
    cmd = [sys.executable, "-m", "mixpipe", "serve", "--num-samples", str(int(num_samples)),
           "--bind", url, "--policy", policy, "--seed", str(int(seed)), "--log-level", "WARNING"]
    if policy_json:
        cmd += ["--policy-json", policy_json]
    if state_dir:
        cmd += ["--state-dir", os.fspath(state_dir)]
    cmd += list(extra or [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    ready = threading.Event()
    lines: List[str] = []

    def watch() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                ready.set()
        ready.set()  # EOF: the process is gone

    threading.Thread(target=watch, name="mixpipe-serve-stdout", daemon=True).start()
    if not ready.wait(ready_timeout) or proc.poll() is not None:
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"`mixpipe serve` did not start within {ready_timeout:g} s "
                           f"(exit code {proc.returncode}): {''.join(lines)[-2000:]}")
    return JobServer(url, process=proc)


def job_service(num_samples: int, policy: Any = None, seed: int = 0, *,
                server: Optional[str] = None, state_dir: Optional[str] = None,
                timeout: float = 30.0, retries: int = 2, host: Optional[str] = None,
                keys: Any = None) -> Tuple[Any, Optional[JobServer]]:
    """The selection service this rank should use, and the server it owns (rank 0 only).

    * ``server`` given (``tcp://...``): every rank connects to it.
    * else, inside a multi-rank job: rank 0 serves an embedded service on a free port of
      ``host``, broadcasts the address, and every rank connects.
    * else (one process): the embedded :class:`InProcessService`, no network at all.

    Remote services come wrapped in :class:`ResilientService`. Call ``owned.stop()`` at the end
    (after a barrier, so no rank still talks to it).

    ``host`` is where rank 0 binds its server: by default loopback when the whole job runs on
    one machine (torchrun's LOCAL_WORLD_SIZE == WORLD_SIZE), else every interface, advertised
    to the other nodes under rank 0's host name.

    The job's own server is always authenticated: rank 0 generates the keys, and the other
    ranks get the client keys from torch.distributed's store (see the module docstring).
    ``keys`` is for a ``server`` the user runs: a key directory (default: the environment).
    The job's server accepts ``load_state_dict`` over the network (``load_checkpoint`` needs it;
    only the job's ranks hold its keys).
    """
    from mixpipe.server import InProcessService, connect
    from mixpipe.server.keys import new_job_keys

    owned: Optional[JobServer] = None
    client_keys = keys
    if server is None and not is_distributed():
        return InProcessService(num_samples, policy, seed=seed, state_dir=state_dir), None
    if server is None:
        store = _store()
        key = f"mixpipe/job-server/{_job_token()}"
        if main_process():
            size = world()[1]
            multi_node = int(os.environ.get("LOCAL_WORLD_SIZE", size)) < size
            bind = host or ("0.0.0.0" if multi_node else "127.0.0.1")
            server_side, client_keys = new_job_keys()
            owned = start_server(num_samples, policy, seed=seed, state_dir=state_dir, host=bind,
                                 keys=server_side, allow_load_state=True)
            url = owned.url.replace("0.0.0.0", socket.gethostname()) if bind == "0.0.0.0" \
                else owned.url
            store.set(key, json.dumps({"url": url, **client_keys.to_env()}))
        entry = json.loads(bytes(store.get(key)).decode())  # blocks until rank 0 has set it
        url = entry.pop("url")
        from mixpipe.server.keys import ENV_CLIENT_KEY, ENV_CLIENT_SECRET, ENV_SERVER_KEY, \
            ClientKeys

        client_keys = ClientKeys(entry[ENV_SERVER_KEY].encode(), entry[ENV_CLIENT_KEY].encode(),
                                 entry[ENV_CLIENT_SECRET].encode())
        os.environ.update(client_keys.to_env())  # for loaders that connect on their own
        barrier()  # every rank has read the keys: nobody needs them in the store any more
        if main_process():
            store.delete_key(key)
    else:
        url = server
    client = connect(url, timeout=timeout, retries=retries, num_samples=num_samples, seed=seed,
                     keys=client_keys)
    return ResilientService(client), owned


def _store() -> Any:
    """torch.distributed's own key-value store (the rendezvous store every rank joined)."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _job_token() -> str:
    """Names this job's entry in the store: the same on every rank, new for every job."""
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}-{os.environ.get('MASTER_PORT', '')}"


# ------------------------------------------------------------------------------------ resume
def save_checkpoint(path: str, epoch: int, model: nn.Module, optimizer: Any,
                    service: Any = None, **extra: Any) -> Optional[Dict[str, Any]]:
    """Rank 0 writes ``{epoch, model, optimizer, selection, ...}`` atomically; others return None.

    The selection state (``service.state_dict()``: ledger + pending reports + policy + seed) is
    part of the checkpoint because the plans of later epochs are a function of it: restored with
    the weights, a resumed job gets the same plans as one that never stopped. Call it after the
    epoch's commit (``fit``'s ``on_epoch``), when every rank's reports are in.
    """
    if not main_process():
        return None
    state = {"epoch": int(epoch), "model": _unwrap(model).state_dict(),
             "optimizer": optimizer.state_dict(),
             "selection": None if service is None else service.state_dict(), **extra}
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return state


def load_checkpoint(path: str, model: nn.Module, optimizer: Any = None,
                    service: Any = None) -> int:
    """Restore what :func:`save_checkpoint` wrote; return the epoch to resume at (saved + 1).

    The selection state is loaded into ``service`` on rank 0 only (one server serves the job);
    the other ranks wait at a barrier so that none asks for a plan before it is restored.
    Reports of the interrupted epoch that the server still holds are replaced: that epoch is
    trained again from the same weights and reports its losses anew.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    _unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if service is not None and state.get("selection") is not None and main_process():
        service.load_state_dict(state["selection"])
    barrier()
    return int(state["epoch"]) + 1


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, nn.parallel.DistributedDataParallel) or \
            type(model).__name__ == "RegionPooledModel":
        model = model.module if hasattr(model, "module") and \
            isinstance(model, nn.parallel.DistributedDataParallel) else model.model
    return model
