"""The selection service's state machine, shared by the in-process and the network service.

Semantics (the contract every transport inherits):

* ``report(epoch, ids, losses, rank)`` is all or nothing. Everything is checked before anything
  is stored: integer ids in range, finite non-negative float losses of the same length, an epoch
  that is an integer in ``[0, 2**31 - 1]``, later than the committed epoch and at most
  ``max_epochs_ahead`` past it, a rank in ``[0, MAX_WORLD_SIZE)``, and an epoch that does not
  already hold ``max_losses_per_sample`` losses per sample. An accepted report is appended to the
  write-ahead log (when there is a state directory) and to that epoch's pending buffer; the
  ledger itself changes only at a commit.
* ``commit(epoch)`` folds the pending reports of every epoch <= ``epoch`` into the ledger, in epoch
  order, and replaces the ledger file atomically before the log of those epochs is deleted.
  Committing an epoch that is already committed is a no-op (every rank may call it). The caller
  vouches that every rank's reports for those epochs are in (after a barrier); trainers without
  a barrier call ``end_epoch`` instead.
* ``end_epoch(epoch, rank, world_size)``: rank ``rank`` has delivered all its reports of
  ``epoch``. When every rank of ``world_size`` has said so, the epoch is committed.
* ``plan(epoch, rank, world_size)`` is derived from the ledger holding exactly the epochs before
  ``epoch``, the policy settings and the seed. If epochs before ``epoch`` are still open, asking
  for the plan commits them first: **asking for epoch e's plan closes reporting for every earlier
  epoch.** With ``world_size > 1`` the request also says that this rank has finished epoch
  ``e - 1``, and the epoch is closed only once every rank has (or it was committed explicitly):
  until then the request waits (in-process, up to ``wait`` seconds, then ``TimeoutError``) or is
  answered :class:`PlanNotReady` (``wait=0``, what the network server does; its clients poll).
  So several trainers can share one server with no barrier of their own. The global plan is
  computed once per epoch and cached; other ranks and repeated calls cut their shard from the
  cached plan. The arrays of a returned global plan (world_size 1) are the cache's own and
  read-only; shards are copies. A plan for an epoch that is already committed can only come
  from the cache (the ledger it was derived from is gone); otherwise it is refused.

**Validate, then mutate.** Every operation checks all of its arguments against the current
state before it changes anything, and a commit, or a plan that closes epochs, builds the new
ledger (and runs the policy) on the side and installs it only when everything succeeded. So a
refused request (``TypeError`` / ``ValueError``, or a policy or disk error) leaves the ledger,
the pending reports, the policy state, the labels and the files on disk byte-identical
(``tests/test_server_core.py`` checks this with random operations). Only monitoring counters
(``reports_refused``, ...) and the record of which ranks finished which epoch move.

A learning policy (``assist``) carries state from one plan to the next (opaque bytes, see
:data:`mixpipe.core.policies.STATEFUL`): it is updated only when a computed plan enters the
cache, and travels in ``state_dict`` (key ``policy_state``) and in the state directory
(``policy.bin``, written atomically before the plan is cached), so a restored or restarted
service plans the next epoch exactly as the original would. A policy state from outside
(``load_state_dict``, the state directory) is parsed and checked by its policy first, and a
ledger from outside must make sense (finite non-negative losses, non-negative counts, nothing
seen after the committed epoch). ``set_labels`` gives policies the dataset's classes (on the
snapshot, ``labels``); they are kept in ``state_dict`` (``labels``) and the state directory
(``labels.npy``).

Threads: one re-entrant lock guards the state, and nothing slow runs under it. Reports take it
only to append; commits and plans take a second lock (one fold at a time), fold into a new
ledger and run the policy outside the state lock, on a snapshot that shares the installed
ledger's columns (installed ledgers are never updated in place, so no copy is needed), and take
the state lock again only to install the result. While epochs ``<= e`` are being folded, reports
for them are refused as behind the committed epoch (the commit is ordered before them) and
reports for later epochs are accepted as usual.
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np

from ..core.ledger import MAX_EPOCH, Ledger, LedgerFormatError, check_report
from ..core.plan import MixPlan
from ..core.policies import (PolicySettings, check_policy_state, make_plan_with_state,
                             settings_from_dict)
from .store import StateDir

__all__ = ["SelectionCore", "PlanNotReady", "prepare_report", "check_epoch", "check_int",
           "MAX_EPOCH", "MAX_WORLD_SIZE", "MAX_SEED"]

_STATE_FORMAT = 1

log = logging.getLogger(__name__)

#: most ranks one job may have: far above any real job, small enough to keep per-epoch rank
#: bookkeeping bounded
MAX_WORLD_SIZE = 1 << 16
#: seeds are stored and compared as signed 64-bit integers
MAX_SEED = 2**63 - 1


class PlanNotReady(Exception):
    """The plan cannot be given yet: some ranks have not finished the previous epoch.

    Not an error: ask again later (the network client does this on its own).
    """

    def __init__(self, epoch: int, world_size: int, missing: List[int]) -> None:
        self.epoch, self.world_size, self.missing = epoch, world_size, missing
        super().__init__(f"plan for epoch {epoch} waits for rank(s) {_shown(missing)} of "
                         f"{world_size} to finish epoch {epoch - 1}")


def _shown(ranks: List[int]) -> List[Any]:
    """At most 20 ranks, so that a message about a large job stays one readable line."""
    return ranks[:20] + (["..."] if len(ranks) > 20 else [])


def check_int(value: Any, what: str, lo: int, hi: int) -> int:
    """``value`` as a plain int in ``[lo, hi]``; refuse bools, floats, strings, out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueError(f"{what} must be >= {lo}, got {value}")
    if value > hi:
        raise ValueError(f"{what} must be <= {hi}, got {value}")
    return int(value)


def check_epoch(epoch: Any, what: str = "epoch") -> int:
    """An epoch is an integer in ``[0, MAX_EPOCH]`` (the ledger stores it as int32)."""
    return check_int(epoch, what, 0, MAX_EPOCH)


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
    if arr.size and int(arr.max()) >= num_samples:
        raise ValueError(f"labels must be < {num_samples} (one class per sample at most), got "
                         f"{int(arr.max())} for sample {int(np.argmax(arr))}")
    out = arr.astype(np.int64, copy=True)
    out.setflags(write=False)
    return out


def _freeze(plan: MixPlan) -> MixPlan:
    for arr in (plan.ids, plan.weights, plan.loss_scale, plan.layout, plan.skipped):
        arr.setflags(write=False)
    return plan


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
        max_epochs_ahead: reports may run at most this many epochs past the committed one, so
            pending memory stays bounded whatever a client sends.
        max_losses_per_sample: one epoch holds at most this many pending losses per sample, plus
            16M (a retrying trainer sends some twice; far more means something is wrong).
        wait: default seconds ``plan`` waits for the other ranks to finish the previous epoch
            (30 minutes: a slow rank's epoch, a restart, a long evaluation all fit).
        log_after: default seconds before a waiting ``plan`` first logs a warning naming the
            ranks it waits for; the delay then doubles, so a long wait is a few lines.
    """

    def __init__(self, num_samples: int, settings: PolicySettings, seed: int = 0,
                 state_dir: Optional[str] = None, ema_decay: float = 0.7, fsync: bool = False,
                 plan_cache_size: int = 3, max_epochs_ahead: int = 32,
                 max_losses_per_sample: int = 8, wait: float = 1800.0,
                 log_after: float = 10.0) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) \
                or not 1 <= num_samples < 2**40:
            raise ValueError(f"num_samples must be an integer in [1, 2**40), got "
                             f"{num_samples!r}")
        if not isinstance(settings, PolicySettings):
            raise TypeError(f"settings must be a PolicySettings, got {type(settings).__name__}")
        if plan_cache_size < 1:
            raise ValueError(f"plan_cache_size must be >= 1, got {plan_cache_size}")
        self.num_samples = int(num_samples)
        self.settings = settings
        self.seed = check_int(seed, "seed", 0, MAX_SEED)
        self.plan_cache_size = int(plan_cache_size)
        self.max_epochs_ahead = check_int(max_epochs_ahead, "max_epochs_ahead", 1, 1 << 20)
        self.max_losses_per_sample = check_int(max_losses_per_sample, "max_losses_per_sample",
                                               1, 1 << 20)
        if not wait >= 0:
            raise ValueError(f"wait must be >= 0 seconds, got {wait}")
        self.wait = float(wait)
        if not log_after > 0:
            raise ValueError(f"log_after must be > 0 seconds, got {log_after}")
        self.log_after = float(log_after)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a commit, a plan or a rank arrived
        self._fold_lock = threading.Lock()  # one fold / plan computation / state load at a time
        self._ledger = Ledger(self.num_samples, ema_decay)  # installed: never updated in place
        self._seen = 0
        self._pending: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {}
        self._pending_sizes: Dict[int, int] = {}
        self._closing: Optional[int] = None  # epochs <= this are being folded right now
        self._ended: Dict[int, Tuple[int, Set[int]]] = {}  # epoch -> (world size, ranks done)
        self._plans: "OrderedDict[int, MixPlan]" = OrderedDict()
        self._policy_state: Optional[bytes] = None  # a learning policy's memory (opaque)
        self._labels: Optional[np.ndarray] = None  # int64[N], read-only, from set_labels
        self._counters = {"reports_received": 0, "losses_received": 0, "reports_refused": 0,
                          "commits": 0, "plans_computed": 0, "plan_requests": 0,
                          "plans_not_ready": 0, "last_plan_seconds": None,
                          "last_commit_seconds": None}
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
        """Rebuild the acknowledged state: ledger file, then every logged later report.

        What is read is checked as a state from outside would be: a directory whose files make
        no sense is refused at start-up rather than poisoning every plan.
        """
        store.check_or_write_meta(self._meta())
        ledger = store.read_ledger()
        if ledger is not None:
            if ledger.num_samples != self.num_samples:
                raise ValueError(f"{store.ledger_path} holds {ledger.num_samples} samples, "
                                 f"the service has {self.num_samples}")
            try:
                ledger.check_meaning()
            except LedgerFormatError as err:
                raise ValueError(f"{store.ledger_path}: {err}; restore a good copy or use a "
                                 "fresh --state-dir") from None
            self._install_ledger(ledger)
        committed = self._ledger.committed_epoch
        for rec in store.wal.replay():
            if rec.epoch <= committed:
                continue  # folded into the ledger before the crash; its log is deleted below
            ids, losses = prepare_report(self.num_samples, rec.ids, rec.losses, copy=False)
            self._pending.setdefault(rec.epoch, []).append((ids, losses))
            self._pending_sizes[rec.epoch] = self._pending_sizes.get(rec.epoch, 0) + ids.size
        store.wal.drop_through(committed)
        labels = store.read_labels()
        if labels is not None:
            self._labels = _check_labels(self.num_samples, labels)
        policy_state = store.read_policy_state()
        try:
            check_policy_state(self.settings, policy_state, self.num_samples)
        except ValueError as err:
            raise ValueError(f"{store.path}/policy.bin: {err}; delete it to start the policy "
                             "cold") from None
        self._policy_state = policy_state
        self._store = store

    def _install_ledger(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._seen = int(np.count_nonzero(ledger.count))

    def close(self) -> None:
        """Release the log's file handles (the state on disk is already complete)."""
        with self._lock:
            if self._store is not None:
                self._store.wal.close()

    @property
    def committed_epoch(self) -> int:
        return self._ledger.committed_epoch

    # ----------------------------------------------------------------------------- checks
    def _check_open(self, epoch: int) -> None:
        """Refuse a report for ``epoch`` (call under the lock)."""
        committed = self._ledger.committed_epoch
        if epoch <= committed or (self._closing is not None and epoch <= self._closing):
            shown = committed if epoch <= committed else self._closing
            raise ValueError(f"epoch {epoch} is behind the committed epoch {shown}: its losses "
                             "were already folded into the ledger (a commit, or a plan for a "
                             "later epoch, closes reporting for earlier ones)")
        if epoch > committed + self.max_epochs_ahead:
            raise ValueError(f"epoch {epoch} is more than {self.max_epochs_ahead} epochs past "
                             f"the committed epoch {committed}: commit the earlier epochs "
                             "first (or raise max_epochs_ahead)")

    @staticmethod
    def _check_world(rank: Any, world_size: Any) -> Tuple[int, int]:
        world_size = check_int(world_size, "world_size", 1, MAX_WORLD_SIZE)
        rank = check_int(rank, "rank", 0, MAX_WORLD_SIZE - 1)
        if rank >= world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} "
                             f"world_size={world_size}")
        return rank, world_size

    # ----------------------------------------------------------------------------- operations
    def report(self, epoch: int, ids: Any, losses: Any, rank: int = 0, copy: bool = True) -> None:
        """Accept one report, all or nothing (see the module docstring).

        ``copy=False`` lets a transport hand over buffers it owns without another copy.
        """
        try:
            epoch = check_epoch(epoch)
            rank = check_int(rank, "rank", 0, MAX_WORLD_SIZE - 1)
            ids, losses = prepare_report(self.num_samples, ids, losses, copy=copy)
            with self._lock:
                self._check_open(epoch)
                held = self._pending_sizes.get(epoch, 0)
                cap = self._pending_cap()
                if held + ids.size > cap:
                    raise ValueError(f"epoch {epoch} would hold {held + ids.size} losses, more "
                                     f"than {self.max_losses_per_sample} per sample: a trainer "
                                     "is resending; commit the epoch or restart the trainer")
                if self._store is not None:
                    self._store.wal.append(epoch, rank, ids, losses)
                self._pending.setdefault(epoch, []).append((ids, losses))
                self._pending_sizes[epoch] = held + int(ids.size)
                self._counters["reports_received"] += 1
                self._counters["losses_received"] += int(ids.size)
        except (TypeError, ValueError):
            with self._lock:
                self._counters["reports_refused"] += 1
            raise

    def commit(self, epoch: int) -> None:
        """Fold every pending epoch <= ``epoch`` into the ledger and persist it atomically."""
        epoch = check_epoch(epoch)
        with self._fold_lock:
            with self._lock:
                if epoch <= self._ledger.committed_epoch:
                    return
            self._advance(epoch, None)

    def end_epoch(self, epoch: int, rank: int, world_size: int) -> None:
        """Rank ``rank`` of ``world_size`` has delivered every report of ``epoch``; the epoch
        is committed once all ranks have said so (trainers without a barrier of their own)."""
        epoch = check_epoch(epoch)
        rank, world_size = self._check_world(rank, world_size)
        with self._lock:
            if epoch <= self._ledger.committed_epoch:
                return
            self._check_ahead(epoch)
            done = self._arrive(epoch, rank, world_size)
        if done:
            self.commit(epoch)

    def _pending_cap(self) -> int:
        # per sample, plus a floor so that small datasets with repeated ids are not refused
        return self.max_losses_per_sample * self.num_samples + (1 << 24)

    def _check_ahead(self, epoch: int) -> None:
        committed = self._ledger.committed_epoch
        if epoch > committed + self.max_epochs_ahead:
            raise ValueError(f"epoch {epoch} is more than {self.max_epochs_ahead} epochs past "
                             f"the committed epoch {committed}: commit the earlier epochs first")

    def _arrive(self, epoch: int, rank: int, world_size: int) -> bool:
        """Record that ``rank`` finished ``epoch``; True when every rank has (under the lock)."""
        world, ranks = self._ended.get(epoch, (world_size, set()))
        if world != world_size:
            raise ValueError(f"world_size {world_size} disagrees with {world} given by other "
                             f"ranks for epoch {epoch}: every rank must pass the same world_size")
        if rank not in ranks:
            ranks = ranks | {rank}
            self._ended[epoch] = (world, ranks)
            self._changed.notify_all()
        return len(ranks) == world

    def _missing(self, epoch: int, world_size: int) -> List[int]:
        ranks = self._ended.get(epoch, (world_size, set()))[1]
        return [r for r in range(world_size) if r not in ranks]

    def set_labels(self, labels: Any) -> None:
        """Give policies every sample's class (int, >= 0, one per sample); replaces earlier ones.

        Plans already cached keep the labels they were computed with.
        """
        labels = _check_labels(self.num_samples, labels)
        with self._lock:
            if self._store is not None:
                self._store.write_labels(labels)
            self._labels = labels

    def plan(self, epoch: int, rank: int = 0, world_size: int = 1,
             wait: Optional[float] = None, log_after: Optional[float] = None) -> MixPlan:
        """This rank's shard of the epoch's global plan (computed once, then cached).

        With ``world_size > 1`` this is also the barrier: the plan of epoch ``e`` is derived
        from every rank's losses of ``e - 1``, so it waits until each rank has asked for it (or
        called ``end_epoch``). A rank that never comes would hang the others without a word, so
        the wait is bounded and loud:

        ``wait``: seconds to wait for the other ranks, by default the service's ``wait``
        (**1800 s**, 30 minutes); then ``TimeoutError`` naming the missing ranks. 0 raises
        :class:`PlanNotReady` at once instead (what the network server uses; its clients poll).

        ``log_after``: seconds before the first warning (logger ``mixpipe.server.core``) naming
        the epoch and the ranks still missing, by default the service's ``log_after`` (10 s);
        after it the delay doubles (10, 20, 40, ... s).
        """
        epoch = check_epoch(epoch)
        rank, world_size = self._check_world(rank, world_size)
        wait = self.wait if wait is None else float(wait)
        log_after = self.log_after if log_after is None else float(log_after)
        if not log_after > 0:
            raise ValueError(f"log_after must be > 0 seconds, got {log_after}")
        with self._lock:
            self._counters["plan_requests"] += 1
            if world_size > 1 and epoch >= 1:
                self._wait_for_ranks(epoch, rank, world_size, wait, log_after)
        plan = self._global_plan(epoch)
        if world_size == 1:
            # a lookup: a new MixPlan over the cached arrays, which are read-only, so neither
            # a field reassignment nor an in-place write can alter the cache
            return MixPlan(plan.ids, plan.weights, plan.loss_scale, plan.layout, plan.skipped,
                           plan.num_samples, plan.epoch, plan.seed)
        return plan.shard(rank, world_size)  # fancy indexing: a copy

    def _wait_for_ranks(self, epoch: int, rank: int, world_size: int, wait: float,
                        log_after: float) -> None:
        """Hold a rank's request for ``epoch`` until every rank finished ``epoch - 1`` (under
        the lock; the condition releases it while waiting), warning at ``log_after`` seconds
        and then at doubling delays, so that a job stuck on a missing rank says which."""
        previous = epoch - 1
        if previous <= self._ledger.committed_epoch or epoch in self._plans:
            return
        self._check_ahead(previous)
        start = time.monotonic()
        deadline = start + wait
        next_log = start + log_after
        while not self._arrive(previous, rank, world_size):
            if previous <= self._ledger.committed_epoch or epoch in self._plans:
                return
            missing = self._missing(previous, world_size)
            if wait <= 0:
                self._counters["plans_not_ready"] += 1
                raise PlanNotReady(epoch, world_size, missing)
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(
                    f"plan for epoch {epoch}: rank(s) {_shown(missing)} of {world_size} did not "
                    f"finish epoch {previous} within {wait:g} s; start the other ranks (each "
                    f"asks for this plan or calls end_epoch({previous}, rank, {world_size})), "
                    f"pass world_size=1 if this process trains alone, or raise wait= if a rank "
                    f"is only slow")
            if now >= next_log:
                log.warning("plan for epoch %d (rank %d of %d): waited %.1f s for rank(s) %s "
                            "to finish epoch %d; giving up after %g s", epoch, rank,
                            world_size, now - start, _shown(missing), previous, wait)
                next_log = start + 2 * (next_log - start)
            self._changed.wait(min(deadline, next_log) - now)

    def _global_plan(self, epoch: int) -> MixPlan:
        """The cached global plan, computing it if needed (one computation at a time; a second
        caller for the same epoch finds it in the cache)."""
        with self._lock:
            plan = self._plans.get(epoch)
        if plan is not None:
            return plan
        with self._fold_lock:
            with self._lock:
                plan = self._plans.get(epoch)
                if plan is not None:
                    return plan
                committed = self._ledger.committed_epoch
                if epoch <= committed:
                    raise ValueError(
                        f"the plan for epoch {epoch} is not cached and cannot be rebuilt: "
                        f"epoch {committed} is already committed, and a plan is derived "
                        f"from the losses of the epochs before its own only")
            return self._advance(epoch - 1, epoch)

    def _advance(self, through: int, plan_epoch: Optional[int]) -> Optional[MixPlan]:
        """Fold every pending epoch <= ``through`` (if any is open), then compute the plan of
        ``plan_epoch`` (if given), and install both together (call with the fold lock held).

        The new ledger and the plan are built outside the state lock; nothing is installed,
        in memory or on disk, unless both succeeded.
        """
        start = time.perf_counter()
        with self._lock:
            base = self._ledger
            fold = through > base.committed_epoch
            chunks = {e: list(c) for e, c in self._pending.items() if e <= through} if fold \
                else {}
            if fold:
                self._closing = through
            labels, policy_state = self._labels, self._policy_state
            settings, seed = self.settings, self.seed
        try:
            ledger = base.folded(chunks, through) if fold else base
            commit_seconds = time.perf_counter() - start
            plan = None
            if plan_epoch is not None:
                snapshot = ledger.snapshot(copy=False)
                if labels is not None:
                    snapshot = dataclasses.replace(snapshot, labels=labels)
                start = time.perf_counter()
                plan, policy_state = make_plan_with_state(snapshot, settings, seed, plan_epoch,
                                                          policy_state)
                plan = _freeze(plan)
                plan_seconds = time.perf_counter() - start
            if self._store is not None:  # files first: memory follows only what is on disk
                if fold:
                    self._store.write_ledger(ledger)  # atomic: the old file or the new one
                if plan is not None and policy_state is not self._policy_state:
                    self._store.write_policy_state(policy_state)
            with self._lock:
                if fold:
                    self._install_ledger(ledger)
                    for e in chunks:
                        self._pending.pop(e, None)
                        self._pending_sizes.pop(e, None)
                    for e in [e for e in self._ended if e <= through]:
                        del self._ended[e]
                    if self._store is not None:
                        self._store.wal.drop_through(through)  # only after the ledger is safe
                    self._counters["commits"] += 1
                    self._counters["last_commit_seconds"] = commit_seconds
                    self._evict_finished_plans(through)
                if plan is not None:
                    self._counters["last_plan_seconds"] = plan_seconds
                    self._counters["plans_computed"] += 1
                    self._plans[plan_epoch] = plan
                    self._policy_state = policy_state
                    while len(self._plans) > self.plan_cache_size:
                        del self._plans[min(self._plans)]
                return plan
        finally:
            with self._lock:
                self._closing = None
                self._changed.notify_all()

    def _evict_finished_plans(self, committed: int) -> None:
        for e in [e for e in self._plans if e < committed]:  # finished epochs' plans
            if len(self._plans) > 1:
                del self._plans[e]

    def stats(self) -> Dict[str, Any]:
        """JSON-serialisable counters and sizes, for monitoring and the benchmark.

        Cheap at any size (nothing here walks the ledger): the network server answers it on
        its serving thread.
        """
        with self._lock:
            ledger = self._ledger
            closing = self._closing
            pending = [[e, size] for e, size in sorted(self._pending_sizes.items())
                       if closing is None or e > closing]
            out = {
                "num_samples": self.num_samples,
                "seen": self._seen,
                "committed_epoch": ledger.committed_epoch,
                "committing_through": closing,
                "pending": pending,
                "pending_losses": int(sum(p[1] for p in pending)),
                "ranks_done": {str(e): [w, sorted(r)[:64]] for e, (w, r) in
                               sorted(self._ended.items())},
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
        """Everything a restart needs (the plan cache is not included: plans are re-derivable).

        Serialised outside the lock: the installed ledger is never updated in place and the
        pending chunks are immutable, so references taken under the lock are a consistent state.
        """
        with self._lock:
            ledger = self._ledger
            chunks = {e: list(c) for e, c in sorted(self._pending.items())}
            labels, policy_state = self._labels, self._policy_state
            settings, seed = self.settings, self.seed
        pending = {e: {"ids": np.concatenate([c[0] for c in cs]),
                       "losses": np.concatenate([c[1] for c in cs])} for e, cs in chunks.items()}
        return {"format": _STATE_FORMAT, "num_samples": self.num_samples, "seed": seed,
                "settings": settings.to_dict(), "committed_epoch": ledger.committed_epoch,
                "ledger": ledger.to_bytes(), "pending": pending, "labels": labels,
                "policy_state": policy_state}

    def _parse_state(self, state: Dict[str, Any]) -> Tuple[Any, ...]:
        """Check a state dict completely (format and meaning); return its parts."""
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
            if not isinstance(settings, dict):
                raise TypeError(f"state settings must be a dict, got {type(settings).__name__}")
            settings = settings_from_dict(settings)
        seed = check_int(state["seed"], "state seed", 0, MAX_SEED)
        if not isinstance(state["ledger"], (bytes, bytearray, memoryview)):
            raise TypeError(f"state ledger must be bytes, got {type(state['ledger']).__name__}")
        ledger = Ledger.from_bytes(state["ledger"])
        if ledger.num_samples != self.num_samples:
            raise ValueError(f"state ledger holds {ledger.num_samples} samples, this service "
                             f"has {self.num_samples}")
        ledger.check_meaning()
        if "committed_epoch" in state and state["committed_epoch"] != ledger.committed_epoch:
            raise ValueError(f"state committed_epoch {state['committed_epoch']} disagrees with its "
                             f"ledger ({ledger.committed_epoch})")
        if not isinstance(state["pending"], dict):
            raise TypeError(f"state pending must be a dict, got {type(state['pending']).__name__}")
        pending: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {}
        for e, item in state["pending"].items():
            e = check_epoch(int(e) if isinstance(e, str) and e.isdigit() else e, "pending epoch")
            if e <= ledger.committed_epoch:
                raise ValueError(f"pending epoch {e} is behind the state's committed epoch "
                                 f"{ledger.committed_epoch}")
            if e > ledger.committed_epoch + self.max_epochs_ahead:
                raise ValueError(f"pending epoch {e} is more than {self.max_epochs_ahead} epochs "
                                 f"past the state's committed epoch {ledger.committed_epoch}")
            if not isinstance(item, dict) or not {"ids", "losses"} <= set(item):
                raise ValueError(f"pending epoch {e} must be a dict with 'ids' and 'losses'")
            ids, losses = prepare_report(self.num_samples, item["ids"], item["losses"])
            if ids.size > self._pending_cap():
                raise ValueError(f"pending epoch {e} holds {ids.size} losses, more than "
                                 f"{self.max_losses_per_sample} per sample")
            pending[e] = [(ids, losses)]
        # optional keys (states written before they existed): labels missing -> keep the current
        # ones (a fact about the dataset, not training state); policy state missing -> cold start
        has_labels = state.get("labels") is not None
        labels = _check_labels(self.num_samples, state["labels"]) if has_labels else None
        policy_state = state.get("policy_state")
        check_policy_state(settings, policy_state, self.num_samples)
        return settings, seed, ledger, pending, has_labels, labels, policy_state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Replace the whole state; everything is checked (format and meaning) before anything
        changes."""
        settings, seed, ledger, pending, has_labels, labels, policy_state = \
            self._parse_state(state)
        with self._fold_lock, self._lock:
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
            self._install_ledger(ledger)
            self._pending = pending
            self._pending_sizes = {e: int(c[0][0].size) for e, c in pending.items()}
            self._ended.clear()
            self._plans.clear()
            self._policy_state = None if policy_state is None else bytes(policy_state)
            if has_labels:
                self._labels = labels
            self._changed.notify_all()

    # ----------------------------------------------------------------------------- testing aids
    def ledger_bytes(self) -> bytes:
        """The ledger's serialised bytes (tests compare them before and after refused input)."""
        with self._lock:
            ledger = self._ledger
        return ledger.to_bytes()
