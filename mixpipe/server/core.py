"""The selection service's state machine, shared by the in-process and the network service.

Semantics (the contract every transport inherits):

* ``report(epoch, ids, losses, rank)`` is all or nothing. Everything is checked before anything
  is stored: integer ids in range, finite non-negative float losses of the same length, an epoch
  that is an integer >= 0 and later than the committed epoch. An accepted report is appended to
  the write-ahead log (when there is a state directory) and to that epoch's pending buffer; the
  ledger itself changes only at a commit.
* ``commit(epoch)`` folds the pending reports of every epoch <= ``epoch`` into the ledger, in epoch
  order, and replaces the ledger file atomically before the log of those epochs is deleted.
  Committing an epoch that is already committed is a no-op (every rank may call it).
* ``plan(epoch)`` is derived from the ledger holding exactly the epochs before ``epoch``, the
  policy settings and the seed. If epochs before ``epoch`` are still open, asking for the plan
  commits them first: **asking for epoch e's plan closes reporting for every earlier epoch.**
  This makes the plan a function of the sequence of calls alone, the same on every rank and after
  a restart. The global plan is computed once per epoch and cached; other ranks and repeated calls
  cut their shard from the cached plan. The arrays of a returned global plan (world_size 1) are
  the cache's own and read-only; shards are copies. A plan for an epoch that is already
  committed can only come from the cache (the ledger it was derived from is gone); otherwise it
  is refused.

A learning policy (``assist``) carries state from one plan to the next (opaque bytes, see
:data:`mixpipe.core.policies.STATEFUL`): it is updated only when a computed plan enters the
cache, and travels in ``state_dict`` (key ``policy_state``) and in the state directory
(``policy.bin``, written atomically before the plan is cached), so a restored or restarted
service plans the next epoch exactly as the original would. ``set_labels`` gives policies the
dataset's classes (on the snapshot, ``labels``); they are kept in ``state_dict`` (``labels``) and
the state directory (``labels.npy``). The network transport carries both (op ``SET_LABELS``).

Thread-safe: one re-entrant lock serialises state changes. Validation of a report's arrays runs
before the lock is taken, so concurrent reporters overlap their checks, and a policy runs on a
snapshot outside the lock, so reporting goes on while the next epoch's plan is computed.
"""
from __future__ import annotations

import dataclasses
import numbers
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..core.ledger import Ledger, check_report
from ..core.plan import MixPlan
from ..core.policies import PolicySettings, make_plan_with_state, settings_from_dict
from .store import StateDir

__all__ = ["SelectionCore", "prepare_report", "check_epoch"]

_STATE_FORMAT = 1


def check_epoch(epoch: Any, what: str = "epoch") -> int:
    """An epoch (or rank) is a plain integer >= 0; refuse bools, floats, strings."""
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {type(epoch).__name__} {epoch!r}")
    if epoch < 0:
        raise ValueError(f"{what} must be >= 0, got {epoch}")
    return int(epoch)


def prepare_report(num_samples: int, ids: Any, losses: Any,
                   copy: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Validate one report and return it as contiguous (<i8 ids, <f4 losses).

    Losses wider than float32 are checked again after the cast: 1e300 is finite as float64 but
    would enter the ledger as inf.
    """
    ids = np.asarray(ids)
    losses = np.asarray(losses)
    check_report(num_samples, ids, losses)
    out_ids = ids.astype("<i8", copy=copy, order="C")
    with np.errstate(over="ignore"):  # overflow is reported below, as an error
        out_losses = losses.astype("<f4", copy=copy, order="C")
    if losses.dtype.itemsize > 4 and out_losses.size and not np.isfinite(out_losses).all():
        first = int(np.flatnonzero(~np.isfinite(out_losses))[0])
        raise ValueError(f"loss for id {int(out_ids[first])} ({losses[first]}) overflows float32")
    return np.ascontiguousarray(out_ids), np.ascontiguousarray(out_losses)


def _check_labels(num_samples: int, labels: Any) -> np.ndarray:
    """Labels as a read-only int64[N] copy; refuse a wrong length, dtype or a negative class."""
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, got dtype {arr.dtype}")
    if arr.shape != (num_samples,):
        raise ValueError(f"labels must have shape ({num_samples},), one per sample, got "
                         f"{arr.shape}")
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(arr.min())} for sample "
                         f"{int(np.argmin(arr))}")
    out = arr.astype(np.int64, copy=True)
    out.setflags(write=False)
    return out


class SelectionCore:
    """Ledger + pending reports + plan cache + (optional) crash-safe state directory.

    Args:
        num_samples: dataset size; ids are in ``[0, num_samples)``.
        settings: the policy settings (a :class:`PolicySettings`).
        seed: with the epoch, fixes every random choice of the policy.
        state_dir: where the ledger, the write-ahead log and the meta file live; None keeps
            everything in memory (no crash safety).
        ema_decay: the ledger's EMA decay.
        fsync: sync every logged report to disk before acknowledging it (power-loss durability;
            without it a report survives the death of the process, not of the machine).
        plan_cache_size: global plans kept in memory (the newest epochs).
    """

    def __init__(self, num_samples: int, settings: PolicySettings, seed: int = 0,
                 state_dir: Optional[str] = None, ema_decay: float = 0.7, fsync: bool = False,
                 plan_cache_size: int = 3) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) \
                or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if not isinstance(settings, PolicySettings):
            raise TypeError(f"settings must be a PolicySettings, got {type(settings).__name__}")
        if plan_cache_size < 1:
            raise ValueError(f"plan_cache_size must be >= 1, got {plan_cache_size}")
        self.num_samples = int(num_samples)
        self.settings = settings
        self.seed = int(seed)
        self.plan_cache_size = int(plan_cache_size)
        self._lock = threading.RLock()
        self._ledger = Ledger(self.num_samples, ema_decay)
        self._pending: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {}
        self._plans: "OrderedDict[int, MixPlan]" = OrderedDict()
        self._inflight: Dict[int, threading.Event] = {}  # epochs whose plan is being computed
        self._generation = 0  # bumped by load_state_dict: plans computed before are stale
        self._policy_state: Optional[bytes] = None  # a learning policy's memory (opaque)
        self._labels: Optional[np.ndarray] = None  # int64[N], read-only, from set_labels
        self._counters = {"reports_received": 0, "losses_received": 0, "reports_refused": 0,
                          "commits": 0, "plans_computed": 0, "plan_requests": 0,
                          "last_plan_seconds": None}
        self._store: Optional[StateDir] = None
        if state_dir is not None:
            self._open_store(StateDir(state_dir, fsync=fsync))

    # ----------------------------------------------------------------------------- persistence
    def _meta(self, settings: Optional[PolicySettings] = None, seed: Optional[int] = None,
              ema_decay: Optional[float] = None) -> Dict[str, Any]:
        return {"num_samples": self.num_samples,
                "settings": (settings or self.settings).to_dict(),
                "seed": self.seed if seed is None else seed,
                "ema_decay": self._ledger.ema_decay if ema_decay is None else ema_decay}

    def _open_store(self, store: StateDir) -> None:
        """Rebuild the acknowledged state: ledger file, then every logged later report."""
        store.check_or_write_meta(self._meta())
        ledger = store.read_ledger()
        if ledger is not None:
            if ledger.num_samples != self.num_samples:
                raise ValueError(f"{store.ledger_path} holds {ledger.num_samples} samples, "
                                 f"the service has {self.num_samples}")
            self._ledger = ledger
        committed = self._ledger.committed_epoch
        for rec in store.wal.replay():
            if rec.epoch <= committed:
                continue  # folded into the ledger before the crash; its log is deleted below
            ids, losses = prepare_report(self.num_samples, rec.ids, rec.losses, copy=False)
            self._pending.setdefault(rec.epoch, []).append((ids, losses))
        store.wal.drop_through(committed)
        labels = store.read_labels()
        if labels is not None:
            self._labels = _check_labels(self.num_samples, labels)
        self._policy_state = store.read_policy_state()
        self._store = store

    def close(self) -> None:
        """Release the log's file handles (the state on disk is already complete)."""
        with self._lock:
            if self._store is not None:
                self._store.wal.close()

    @property
    def committed_epoch(self) -> int:
        return self._ledger.committed_epoch

    # ----------------------------------------------------------------------------- operations
    def report(self, epoch: int, ids: Any, losses: Any, rank: int = 0, copy: bool = True) -> None:
        """Accept one report, all or nothing (see the module docstring).

        ``copy=False`` lets a transport hand over buffers it owns without another copy.
        """
        try:
            epoch = check_epoch(epoch)
            rank = check_epoch(rank, "rank")
            ids, losses = prepare_report(self.num_samples, ids, losses, copy=copy)
            with self._lock:
                committed = self._ledger.committed_epoch
                if epoch <= committed:
                    raise ValueError(f"epoch {epoch} is behind the committed epoch {committed}: "
                                     "its losses were already folded into the ledger (a plan for "
                                     "a later epoch closes reporting for earlier ones)")
                if self._store is not None:
                    self._store.wal.append(epoch, rank, ids, losses)
                self._pending.setdefault(epoch, []).append((ids, losses))
                self._counters["reports_received"] += 1
                self._counters["losses_received"] += int(ids.size)
        except (TypeError, ValueError):
            with self._lock:
                self._counters["reports_refused"] += 1
            raise

    def commit(self, epoch: int) -> None:
        """Fold every pending epoch <= ``epoch`` into the ledger and persist it atomically."""
        epoch = check_epoch(epoch)
        with self._lock:
            if epoch > self._ledger.committed_epoch:
                self._fold_through(epoch)

    def _fold_through(self, epoch: int) -> None:
        folded = sorted(e for e in self._pending if e <= epoch)
        if not folded:  # nothing to fold: only the committed epoch moves
            previous = self._ledger.committed_epoch
            self._ledger.committed_epoch = epoch
            try:
                if self._store is not None:
                    self._store.write_ledger(self._ledger)
                    self._store.wal.drop_through(epoch)
            except BaseException:
                self._ledger.committed_epoch = previous
                raise
            self._counters["commits"] += 1
            self._evict_finished_plans(epoch)
            return
        # Work on a copy so that a failure (disk full while saving) leaves memory as it was.
        ledger = self._ledger.copy()
        for e in folded:
            chunks = self._pending[e]
            ids = np.concatenate([c[0] for c in chunks]) if len(chunks) > 1 else chunks[0][0]
            losses = np.concatenate([c[1] for c in chunks]) if len(chunks) > 1 else chunks[0][1]
            ledger.update(e, ids, losses)
        ledger.committed_epoch = epoch
        if self._store is not None:
            self._store.write_ledger(ledger)  # atomic: the old file or the new one, never half
            self._store.wal.drop_through(epoch)  # only after the ledger holding them is safe
        self._ledger = ledger
        for e in folded:
            del self._pending[e]
        self._counters["commits"] += 1
        self._evict_finished_plans(epoch)

    def _evict_finished_plans(self, committed: int) -> None:
        for e in [e for e in self._plans if e < committed]:  # finished epochs' plans
            if len(self._plans) > 1:
                del self._plans[e]

    def set_labels(self, labels: Any) -> None:
        """Give policies every sample's class (int, >= 0, one per sample); replaces earlier ones.

        Plans already cached keep the labels they were computed with.
        """
        labels = _check_labels(self.num_samples, labels)
        with self._lock:
            if self._store is not None:
                self._store.write_labels(labels)
            self._labels = labels

    def plan(self, epoch: int, rank: int = 0, world_size: int = 1) -> MixPlan:
        """This rank's shard of the epoch's global plan (computed once, then cached)."""
        epoch = check_epoch(epoch)
        rank = check_epoch(rank, "rank")
        world_size = check_epoch(world_size, "world_size")
        if world_size < 1 or rank >= world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} "
                             f"world_size={world_size}")
        with self._lock:
            self._counters["plan_requests"] += 1
        plan = self._global_plan(epoch)
        if world_size == 1:
            # a lookup: a new MixPlan over the cached arrays, which are read-only, so neither
            # a field reassignment nor an in-place write can alter the cache
            return MixPlan(plan.ids, plan.weights, plan.loss_scale, plan.layout, plan.skipped,
                           plan.num_samples, plan.epoch, plan.seed)
        return plan.shard(rank, world_size)  # fancy indexing: a copy

    def _global_plan(self, epoch: int) -> MixPlan:
        """The cached global plan, computing it if needed.

        The policy runs outside the lock on a snapshot, so reports (and stats) go on meanwhile;
        a second caller for the same epoch waits for the first one's result instead of
        computing it again. The ledger state the plan depends on is fixed under the lock before
        the lock is released (earlier epochs committed, snapshot taken), so the result is the
        same as if everything had run under the lock.
        """
        while True:
            with self._lock:
                plan = self._plans.get(epoch)
                if plan is not None:
                    return plan
                waiting = self._inflight.get(epoch)
                if waiting is None:
                    committed = self._ledger.committed_epoch
                    if epoch <= committed:
                        raise ValueError(
                            f"the plan for epoch {epoch} is not cached and cannot be rebuilt: "
                            f"epoch {committed} is already committed, and a plan is derived "
                            f"from the losses of the epochs before its own only")
                    if committed < epoch - 1:
                        self._fold_through(epoch - 1)  # closes reporting for earlier epochs
                    snapshot = self._ledger.snapshot()
                    if self._labels is not None:
                        snapshot = dataclasses.replace(snapshot, labels=self._labels)
                    settings, seed, generation = self.settings, self.seed, self._generation
                    policy_state = self._policy_state
                    done = self._inflight[epoch] = threading.Event()
            if waiting is not None:
                waiting.wait()
                continue  # the result is in the cache now, or the computation failed: retry
            try:
                start = time.perf_counter()
                plan, policy_state = make_plan_with_state(snapshot, settings, seed, epoch,
                                                          policy_state)
                seconds = time.perf_counter() - start
                for arr in (plan.ids, plan.weights, plan.loss_scale, plan.layout, plan.skipped):
                    arr.setflags(write=False)
                with self._lock:
                    if generation == self._generation:  # no state was loaded meanwhile
                        if self._store is not None and policy_state is not self._policy_state:
                            self._store.write_policy_state(policy_state)
                        self._counters["last_plan_seconds"] = seconds
                        self._counters["plans_computed"] += 1
                        self._plans[epoch] = plan
                        self._policy_state = policy_state
                        while len(self._plans) > self.plan_cache_size:
                            del self._plans[min(self._plans)]
                        return plan
            finally:
                with self._lock:
                    del self._inflight[epoch]
                done.set()

    def stats(self) -> Dict[str, Any]:
        """JSON-serialisable counters and sizes, for monitoring and the benchmark."""
        with self._lock:
            ledger = self._ledger
            pending = [[e, int(sum(c[0].size for c in chunks))]
                       for e, chunks in sorted(self._pending.items())]
            out = {
                "num_samples": self.num_samples,
                "seen": int(np.count_nonzero(ledger.count)),
                "committed_epoch": ledger.committed_epoch,
                "pending": pending,
                "pending_losses": int(sum(p[1] for p in pending)),
                "plan_cache_epochs": sorted(self._plans),
                "ledger_bytes": ledger.nbytes,
                "bytes_per_sample": ledger.nbytes / self.num_samples,
                "policy": self.settings.to_dict(),
                "seed": self.seed,
                "state_dir": None if self._store is None else self._store.path,
                "wal_bytes": None if self._store is None else self._store.wal.nbytes,
                "wal_dropped_bytes": None if self._store is None else
                self._store.wal.dropped_bytes,
                **self._counters,
            }
        return out

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Everything a restart needs (the plan cache is not included: plans are re-derivable)."""
        with self._lock:
            pending = {}
            for e, chunks in sorted(self._pending.items()):
                pending[e] = {"ids": np.concatenate([c[0] for c in chunks]),
                              "losses": np.concatenate([c[1] for c in chunks])}
            return {"format": _STATE_FORMAT, "num_samples": self.num_samples, "seed": self.seed,
                    "settings": self.settings.to_dict(),
                    "committed_epoch": self._ledger.committed_epoch,
                    "ledger": self._ledger.to_bytes(), "pending": pending,
                    "labels": self._labels, "policy_state": self._policy_state}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Replace the whole state; everything is checked before anything changes."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = {"num_samples", "seed", "settings", "ledger", "pending"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        if state.get("format", _STATE_FORMAT) != _STATE_FORMAT:
            raise ValueError(f"state format {state.get('format')} not supported "
                             f"(reads {_STATE_FORMAT})")
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"state is for {state['num_samples']} samples, this service has "
                             f"{self.num_samples}")
        settings = state["settings"]
        if not isinstance(settings, PolicySettings):
            settings = settings_from_dict(settings)
        seed = check_epoch(state["seed"], "seed")
        ledger = Ledger.from_bytes(state["ledger"])
        if ledger.num_samples != self.num_samples:
            raise ValueError(f"state ledger holds {ledger.num_samples} samples, this service "
                             f"has {self.num_samples}")
        if "committed_epoch" in state and state["committed_epoch"] != ledger.committed_epoch:
            raise ValueError(f"state committed_epoch {state['committed_epoch']} disagrees with its "
                             f"ledger ({ledger.committed_epoch})")
        pending: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {}
        for e, item in dict(state["pending"]).items():
            e = check_epoch(int(e) if isinstance(e, str) and e.isdigit() else e, "pending epoch")
            if e <= ledger.committed_epoch:
                raise ValueError(f"pending epoch {e} is behind the state's committed epoch "
                                 f"{ledger.committed_epoch}")
            ids, losses = prepare_report(self.num_samples, item["ids"], item["losses"])
            pending[e] = [(ids, losses)]
        # optional keys (states written before they existed): labels missing -> keep the current
        # ones (a fact about the dataset, not training state); policy state missing -> cold start
        has_labels = state.get("labels") is not None
        labels = _check_labels(self.num_samples, state["labels"]) if has_labels else None
        policy_state = state.get("policy_state")
        if policy_state is not None and not isinstance(policy_state, (bytes, bytearray)):
            raise TypeError(f"state policy_state must be bytes or None, got "
                            f"{type(policy_state).__name__}")
        with self._lock:
            if self._store is not None:
                # meta first: a crash half-way leaves a directory that refuses to open with the
                # old settings, rather than old settings silently driving the new ledger
                self._store.write_meta(self._meta(settings, seed, ledger.ema_decay))
                self._store.write_ledger(ledger)
                self._store.wal.rewrite([(e, 0, c[0][0], c[0][1])
                                         for e, c in sorted(pending.items())])
                self._store.write_policy_state(policy_state)
                if has_labels:
                    self._store.write_labels(labels)
            self.settings, self.seed = settings, seed
            self._ledger = ledger
            self._pending = pending
            self._plans.clear()
            self._generation += 1
            self._policy_state = None if policy_state is None else bytes(policy_state)
            if has_labels:
                self._labels = labels

    # ----------------------------------------------------------------------------- testing aids
    def ledger_bytes(self) -> bytes:
        """The ledger's serialised bytes (tests compare them before and after refused input)."""
        with self._lock:
            return self._ledger.to_bytes()
