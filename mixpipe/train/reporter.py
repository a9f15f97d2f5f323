"""Loss feedback to the selection service, off the training step's critical path.

The step only appends the batch's ids and losses to a buffer (device tensors; on a GPU the copy to
host is started asynchronously). Full chunks go to one background thread that converts them to
numpy and calls ``service.report``, so a slow network round trip overlaps the next steps instead of
stalling them. At the end of an epoch :meth:`LossReporter.end_epoch` sends the remainder, waits for
the thread, and commits. An error in the thread is kept and raised at the next flush: a refused
report must not be lost silently, yet it must not kill the step that happened to be running.
"""
from __future__ import annotations

import queue
import threading
from typing import List, Optional, Tuple

import numpy as np
import torch

__all__ = ["LossReporter", "ReportError"]


class ReportError(RuntimeError):
    """A report the background thread could not deliver; ``__cause__`` holds the service error."""


class LossReporter:
    """Batched, asynchronous ``(ids, losses)`` reports for one rank.

    ``chunk`` is how many losses are gathered before a report is sent (fewer, larger messages are
    cheaper for the network service). Only real constituents are reported: ids >= 0 with a
    ``loss_scale`` > 0 (padding copies are never reported).
    """

    def __init__(self, service, rank: int = 0, chunk: int = 8192, max_queued: int = 64) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.service = service
        self.rank = int(rank)
        self.chunk = int(chunk)
        self._buffer: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[object]]] = []
        self._buffered = 0
        self._epoch: Optional[int] = None
        self._queue: "queue.Queue" = queue.Queue(maxsize=max_queued)
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self.reported = 0  #: losses delivered so far (for statistics and tests)
        self._thread = threading.Thread(target=self._worker, name="mixpipe-loss-reporter",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------ trainer side
    def add(self, epoch: int, ids: torch.Tensor, losses: torch.Tensor,
            loss_scale: Optional[torch.Tensor] = None) -> None:
        """Queue one batch's losses. ``ids`` / ``losses`` / ``loss_scale`` are [B, K] (or [N])."""
        if self._epoch is not None and epoch != self._epoch:
            raise ValueError(f"losses for epoch {epoch} added while epoch {self._epoch} is still "
                             "open: call end_epoch() first")
        if tuple(ids.shape) != tuple(losses.shape):
            raise ValueError(f"ids {tuple(ids.shape)} and losses {tuple(losses.shape)} must have "
                             "the same shape")
        self._epoch = int(epoch)
        keep = ids >= 0
        if loss_scale is not None:
            keep = keep & (loss_scale.to(ids.device) > 0)
        # Filtering happens in the thread: boolean indexing would synchronise a GPU step here.
        parts = (ids.detach().reshape(-1), losses.detach().to(ids.device).reshape(-1),
                 keep.reshape(-1))
        event = None
        if ids.is_cuda:
            parts = tuple(p.to("cpu", non_blocking=True) for p in parts)
            event = torch.cuda.Event()
            event.record()
        else:  # the caller may reuse its buffers for the next batch
            parts = tuple(p.clone() for p in parts)
        self._buffer.append(parts + (event,))
        self._buffered += int(parts[0].numel())
        if self._buffered >= self.chunk:
            self._send()

    def _send(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer, self._buffered = self._buffer, [], 0
        self._queue.put((self._epoch, batch))

    def flush(self) -> None:
        """Send what is buffered, wait until the thread has delivered it; raise a thread error."""
        self._send()
        self._queue.join()
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise ReportError(f"loss report to the selection service failed: {error}") from error

    def end_epoch(self, epoch: int, commit: bool = True) -> None:
        """Deliver everything for ``epoch`` and (if ``commit``) commit it on the service."""
        if self._epoch is not None and epoch != self._epoch:
            raise ValueError(f"end_epoch({epoch}) but the open epoch is {self._epoch}")
        try:
            self.flush()
        finally:  # the epoch is over either way; a failed one is just not committed
            self._epoch = None
        if commit:
            self.service.commit(int(epoch))

    def close(self, raise_errors: bool = True) -> None:
        """Flush and stop the thread (idempotent). ``raise_errors=False`` when already failing."""
        if not self._thread.is_alive():
            return
        try:
            self.flush()
        except ReportError:
            if raise_errors:
                raise
        finally:
            self._queue.put(None)
            self._thread.join(timeout=30)

    def __enter__(self) -> "LossReporter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(raise_errors=exc_type is None)

    # ------------------------------------------------------------------------ thread side
    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                epoch, batch = item
                with self._lock:
                    failed = self._error is not None
                if failed:  # keep the first error; drop later chunks of the broken stream
                    continue
                for *_, event in batch:
                    if event is not None:
                        event.synchronize()
                keep = np.concatenate([k.numpy() for _, _, k, _ in batch])
                ids = np.concatenate([i.numpy() for i, _, _, _ in batch])[keep].astype(np.int64)
                losses = np.concatenate([l.float().numpy() for _, l, _, _ in batch])[keep]
                losses = losses.astype(np.float32, copy=False)
                if ids.size:
                    self.service.report(epoch, ids, losses, rank=self.rank)
                self.reported += int(ids.size)
            except BaseException as err:  # noqa: BLE001 - surfaced to the trainer at flush
                with self._lock:
                    if self._error is None:
                        self._error = err
            finally:
                self._queue.task_done()
