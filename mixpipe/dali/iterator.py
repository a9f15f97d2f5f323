"""The trainer-side wrapper: plans in, :class:`~mixpipe.core.batch.MixedBatch` es out.

It owns the order of events DALI needs: fetch the epoch's plan (falling back to no mixing when the
server fails), publish its walk on the board, and only then reset the pipeline, because a reset
is what starts DALI's workers on the next epoch.
"""
from __future__ import annotations

import atexit
import functools
import weakref
from typing import Optional, Union

import torch

from ..core.batch import MixedBatch
from ..core.plan import MixPlan
from ..core.source import PlanSource, UnmixedPlans, fetch_plan, warn_fallback
from .plans import epoch_walk
from .source import SlotSource

__all__ = ["MixIterator", "OUTPUT_NAMES", "close_pipeline"]

#: What the pipeline must return, in this order (``mixpipe.dali.mix`` + the source's tensors).
OUTPUT_NAMES = ("image", "targets", "weights", "ids", "layout", "loss_scale")


def close_pipeline(pipeline) -> None:
    """Stop a pipeline's source worker processes now, not at interpreter exit.

    DALI stops them from a finalizer that can run after ``multiprocessing`` has started joining
    its children at exit, which then waits forever; closing explicitly avoids that.
    """
    pool = getattr(pipeline, "_py_pool", None)
    if pool is not None:
        pool.close()
    shutdown = getattr(pipeline, "_shutdown", None)
    if shutdown is not None:
        shutdown()


class MixIterator:
    """Iterate a mixing DALI pipeline epoch by epoch; meets :class:`mixpipe.core.loader.PlanLoader`.

    Args:
        pipeline: a DALI pipeline whose outputs are :data:`OUTPUT_NAMES`, fed by ``slots``.
        slots: the pipeline's :class:`SlotSource` (its board is where walks are published).
        source: anything with ``plan(epoch, rank, world_size) -> MixPlan`` (a SelectionService,
            a network client, :class:`~mixpipe.core.source.FixedPlans`), a server URL (connected
            with ``mixpipe.server.connect``), or None for no mixing. If fetching fails the epoch
            runs without mixing and one warning says so.
        rank, world_size: this process's shard of each plan.
        shuffle, seed: the walk order within an epoch (see :func:`epoch_walk`).
        server_timeout: seconds per attempt when ``plans`` is a URL.

    Use::

        it = MixIterator(pipe, slots, service)
        for epoch in range(epochs):
            it.set_epoch(epoch)          # optional: defaults to the next epoch
            for batch in it: ...         # MixedBatch; rows with loss_scale 0 are padding
            service.commit(epoch)
        it.close()

    ``set_epoch`` fetches the plan, so call it after the previous epoch's losses are committed.
    Each epoch must be iterated to its end (DALI cannot reset mid-epoch). The pipeline's workers
    are also stopped at interpreter exit if :meth:`close` was never called.
    """

    def __init__(self, pipeline, slots: SlotSource,
                 source: Union[PlanSource, str, None] = None, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 server_timeout: float = 10.0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        from .ops import refuse_whole_batch_mirror

        refuse_whole_batch_mirror(pipeline)  # a mirror after mix() corrupts labels silently
        self.pipeline = pipeline
        self.slots = slots
        self.num_samples = len(slots.images)
        if source is None:
            source = UnmixedPlans(self.num_samples, seed)
        elif isinstance(source, str):
            source = _ServerAt(source, self.num_samples, seed, server_timeout)
        self.source: PlanSource = source
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed = shuffle, int(seed)
        self.batch_size = int(pipeline.max_batch_size)
        self.plan: Optional[MixPlan] = None  #: this epoch's shard, as fetched
        self.walk: Optional[MixPlan] = None  #: ... as delivered: shuffled, padded
        self.epoch = -1
        self._round = 0  # DALI's epoch_idx of the next epoch to run
        self._published = False  # a walk is on the board for self._round
        self._inner = None
        self._needs_reset = False
        self._in_epoch = False
        self._warned = False
        self.failures = 0  #: epochs that ran unmixed because the plan could not be fetched
        self.closed = False
        # Registered after multiprocessing's own exit hook (DALI imported it), so it runs first
        # (atexit is last in, first out); a weak reference leaves garbage collection as it was.
        self._exit_hook = functools.partial(_close_if_alive, weakref.ref(self))
        atexit.register(self._exit_hook)

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> MixPlan:
        """Fetch the plan of ``epoch`` and publish its walk for the next pass; returns the plan
        as fetched (the walk, padded to whole batches, is :attr:`walk`)."""
        if self._in_epoch:
            raise RuntimeError("set_epoch() called in the middle of an epoch; finish iterating "
                               "the current epoch first (DALI cannot reset mid-epoch)")
        self._check_open()
        plan = fetch_plan(self.source, int(epoch), self.rank, self.world_size, self.num_samples,
                          self._on_failure)
        self.slots.check_plan(plan)
        walk = epoch_walk(plan, self.batch_size, self.shuffle, self.seed)
        self.slots.board.publish(self._round, walk)
        self.plan, self.walk, self.epoch = plan, walk, int(epoch)
        self._published = True
        return plan

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this MixIterator is closed (its pipeline's workers are stopped); "
                               "build a new one to train further")

    def _on_failure(self, epoch: int, err: Exception) -> None:
        self.failures += 1
        if not self._warned:  # once per iterator, not once per epoch
            self._warned = True
            warn_fallback(epoch, err)

    def __len__(self) -> int:
        """Batches in the coming (or current) epoch; fetches its plan if not done yet."""
        if not self._published and not self._in_epoch:
            self.set_epoch(self.epoch + 1)
        return self.walk.num_slots // self.batch_size

    def __iter__(self) -> "MixIterator":
        if self._in_epoch:
            return self
        self._check_open()
        if not self._published:
            self.set_epoch(self.epoch + 1)
        if self._inner is None:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

            self._inner = DALIGenericIterator([self.pipeline], list(OUTPUT_NAMES), size=-1,
                                              auto_reset=False,
                                              last_batch_policy=LastBatchPolicy.PARTIAL)
        elif self._needs_reset:
            self._inner.reset()
            self._needs_reset = False
        self._in_epoch = True
        return self

    def __next__(self) -> MixedBatch:
        if not self._in_epoch:
            raise StopIteration
        try:
            out = next(self._inner)[0]
        except StopIteration:
            self._in_epoch = False
            self._published = False
            self._needs_reset = True
            self._round += 1
            raise
        return MixedBatch(image=out["image"], targets=out["targets"].long(),
                          weights=out["weights"].float(), ids=out["ids"].long(),
                          layout=out["layout"].to(torch.uint8).reshape(-1),
                          loss_scale=out["loss_scale"].float())

    def close(self) -> None:
        """Stop the pipeline's workers (see :func:`close_pipeline`); again, a no-op."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self._exit_hook)
        close_pipeline(self.pipeline)
        self._inner = None

    def __enter__(self) -> "MixIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_if_alive(ref: "weakref.ref[MixIterator]") -> None:
    iterator = ref()
    if iterator is not None:
        iterator.close()


class _ServerAt:
    """Connects to the selection server at ``url`` on first use (lazily, so a down server at
    start-up only costs the epochs it is down)."""

    def __init__(self, url: str, num_samples: int, seed: int, timeout: float) -> None:
        self.url, self.num_samples, self.seed, self.timeout = url, num_samples, seed, timeout
        self._client = None

    def plan(self, epoch: int, rank: int = 0, world_size: int = 1) -> MixPlan:
        if self._client is None:
            from ..server import connect

            # With num_samples the client itself falls back to the `none` policy's plan (the
            # same on every rank) and warns once.
            self._client = connect(self.url, timeout=self.timeout, num_samples=self.num_samples,
                                   seed=self.seed)
        return self._client.plan(epoch, rank, world_size)

