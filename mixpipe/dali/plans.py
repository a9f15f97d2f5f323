"""How an epoch's plan reaches DALI's source workers.

DALI's parallel external source runs the callback in worker processes that share nothing with the
trainer, and it only tells the callback ``SampleInfo.epoch_idx`` (how many times the pipeline was
reset). So the trainer process decides each epoch's plan once (fetching it from the selection
service, or falling back to no mixing) and *publishes* it on a :class:`PlanBoard`, a directory of
small files keyed by that epoch index. Every worker reads the same file, so all workers agree on
the epoch even when the server is flaky: a worker never asks the server itself.

The published plan is the epoch's *walk*: the rank's shard, its rows shuffled and padded to whole
batches (:func:`epoch_walk`), so a worker maps ``idx_in_epoch`` straight to a row.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from typing import Optional

import numpy as np

from ..core.plan import MixPlan, PlanFormatError

__all__ = ["epoch_walk", "PlanBoard", "PlanNotPublished"]

def epoch_walk(plan: MixPlan, batch_size: int, shuffle: bool = True, seed: int = 0) -> MixPlan:
    """The order a loader delivers ``plan``'s slots in, padded to a whole number of batches.

    DALI drops a final partial batch (checked: 30 samples at batch 8 gave 24), so the slot count
    is rounded up with copies of the walk's first slots whose ``loss_scale`` is 0: every real slot
    is delivered, and the copies add neither gradient nor loss reports (the same convention as
    :meth:`MixPlan.shard`). The order is :meth:`MixPlan.delivery_order`, as in the torch loader.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    m = plan.num_slots
    if m == 0:
        raise ValueError(f"the plan for epoch {plan.epoch} has no slots (every sample skipped?); "
                         "a DALI pipeline cannot run an empty epoch")
    rows = plan.delivery_order(seed, shuffle)
    pad = (-m) % batch_size
    order = np.concatenate([rows, np.resize(rows, pad)])
    scale = plan.loss_scale[order].copy()
    scale[m:] = 0.0
    return MixPlan(plan.ids[order], plan.weights[order], scale, plan.layout[order],
                   plan.skipped, plan.num_samples, plan.epoch, plan.seed, plan.rank,
                   plan.world_size)


class PlanNotPublished(TimeoutError):
    """A worker waited for a round's plan that nobody published."""


def _remove_tree(path: str, owner_pid: int) -> None:
    # Forked DALI workers inherit finalizers; only the process that made the directory removes it.
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


class PlanBoard:
    """A directory where the trainer publishes each round's walk and workers read it.

    Picklable (it is just a path and a timeout), so it travels inside the source callback to
    DALI's worker processes. A "round" is DALI's ``epoch_idx``: 0 for the pipeline's first epoch,
    +1 at every reset. Files are written to a temporary name and renamed, so a reader never sees
    half a plan.
    """

    def __init__(self, directory: str, timeout: float = 300.0) -> None:
        if timeout <= 0:
            raise ValueError(f"PlanBoard.timeout must be > 0 seconds, got {timeout}")
        self.directory = os.path.abspath(directory)
        self.timeout = float(timeout)
        os.makedirs(self.directory, exist_ok=True)

    @classmethod
    def temporary(cls, timeout: float = 300.0) -> "PlanBoard":
        """A fresh private directory, removed when this (creating) process drops the board."""
        board = cls(tempfile.mkdtemp(prefix="mixpipe-dali-plans-"), timeout)
        board._finalizer = weakref.finalize(board, _remove_tree, board.directory, os.getpid())
        return board

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "timeout": self.timeout}

    def __setstate__(self, state: dict) -> None:
        self.directory, self.timeout = state["directory"], state["timeout"]

    def path(self, round_index: int) -> str:
        return os.path.join(self.directory, f"round-{int(round_index):08d}.plan")

    def publish(self, round_index: int, plan: MixPlan) -> None:
        """Make ``plan`` the walk of ``round_index``; replaces an earlier one for that round.

        Only call it for a round the pipeline has not started: DALI starts a round's work when
        the pipeline is reset (the iterator does that right after publishing).
        """
        if round_index < 0:
            raise ValueError(f"round_index must be >= 0, got {round_index}")
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(plan.to_bytes())
            os.replace(tmp, self.path(round_index))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        # Two rounds back can no longer be read by anyone: DALI resets between rounds.
        old = self.path(round_index - 2)
        if round_index >= 2 and os.path.exists(old):
            os.unlink(old)

    def read(self, round_index: int, timeout: Optional[float] = None) -> MixPlan:
        """The walk of ``round_index``, waiting for it to be published (default: ``timeout``)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        path = self.path(round_index)
        delay = 0.002
        while True:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise PlanNotPublished(
                        f"no plan was published for DALI epoch {round_index} in {self.directory}: "
                        "drive the pipeline with mixpipe.dali.MixIterator (it publishes each "
                        "epoch's plan before resetting the pipeline), or call "
                        "PlanBoard.publish() yourself before running the epoch") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            try:
                return MixPlan.from_bytes(data)
            except PlanFormatError as err:
                raise PlanFormatError(f"{path}: {err}") from err
