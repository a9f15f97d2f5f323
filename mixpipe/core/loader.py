"""The one interface every mixpipe loader offers, so the trainer holds no adapter-specific code.

The torch, DALI and FFCV adapters differ in how they build composites, not in how a trainer
drives them: fetch the epoch's plan, count its batches, iterate them, let go of workers. Keeping
that surface identical is what lets :func:`mixpipe.train.fit` and the benchmarks take any of the
three (docs/design.md, "The loader protocol").
"""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

from .batch import MixedBatch
from .plan import MixPlan
from .source import PlanSource

__all__ = ["PlanLoader"]


@runtime_checkable
class PlanLoader(Protocol):
    """A loader that delivers the composites of one plan per epoch.

    ``source`` is where plans come from (a selection service, a client, fixed plans); a trainer
    that was given no service of its own reports losses to it when it takes reports.

    ``set_epoch(e)`` fetches this rank's shard of epoch ``e``'s plan (a plan without mixing when
    the source fails) and returns it as fetched: delivery padding is not part of it. Call it
    after the previous epoch's losses are committed, because the server plans from them.
    ``len()`` is the number of batches of that epoch and ``iter()`` yields them as
    :class:`MixedBatch` es. ``close()`` stops worker threads or processes; calling it again does
    nothing.
    """

    source: PlanSource

    def set_epoch(self, epoch: int) -> MixPlan: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[MixedBatch]: ...

    def close(self) -> None: ...
