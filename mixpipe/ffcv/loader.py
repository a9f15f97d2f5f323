"""A plan-driven FFCV loader that yields :class:`MixedBatch` es.

It holds an FFCV ``Loader`` instead of subclassing it: the FFCV loader compiles the pipeline
(reader, graph, memory manager), and this class runs each epoch itself with FFCV's
``EpochIterator``, because FFCV 1.0.2's own epoch handling does not fit a plan whose slot count
changes (docs/design.md, Known traps):

* ``Loader.__len__`` is computed once, from the order made at construction, and ``__iter__`` cuts
  every epoch's order to that length (FFCV issue #152); here the order is the epoch's slot rows
  and ``len()`` is the batch count of the epoch's plan.
* ``Loader(order=SomeTraversalOrder)`` does not work in 1.0.2 (it calls the instance), so there
  is no traversal-order hook to use.
* The process cache (``os_cache=False``) loads pages for the indices of each batch; those indices
  are slot rows here, so the epoch runs against a view of the loader whose memory manager
  schedules every constituent's pages. The FFCV loader itself is never modified.
* The plan tables are shared with the running epoch, so a new epoch first stops an abandoned
  previous one before overwriting them.
"""
from __future__ import annotations

import queue
from typing import Any, Iterator, Mapping, Optional, Type

import numpy as np
import torch
from ffcv.fields.base import Field
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.loader.loader import DEFAULT_OS_CACHE
from ffcv.pipeline import Compiler, PipelineSpec
from ffcv.reader import Reader

from ..core.batch import MixedBatch
from ..core.plan import MixPlan
from ..core.source import PlanSource, fetch_plan
from .decoders import MixLabelDecoder, unpack_labels
from .tables import PlanTables

__all__ = ["MixLoader"]


class _PlanPages:
    """Memory-manager proxy: page scheduling by constituent ids instead of slot rows."""

    def __init__(self, inner, tables: PlanTables):
        self._inner = inner
        self._tables = tables

    def schedule_epoch(self, batches):
        return self._inner.schedule_epoch([self._tables.constituents(b) for b in batches])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _PlanView:
    """The FFCV loader as ``EpochIterator`` sees it: unchanged but for the memory manager."""

    def __init__(self, loader: Loader, tables: PlanTables):
        self._loader = loader
        self.memory_manager = _PlanPages(loader.memory_manager, tables)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def _first_decoder(spec) -> Any:
    if isinstance(spec, PipelineSpec):
        return spec.decoder if spec.decoder is not None else (
            spec.transforms[0] if spec.transforms else None)
    return spec[0] if len(spec) else None


class _EpochRun:
    """FFCV's iterator for one epoch, and whether it ran to its end."""

    def __init__(self, epoch: int, inner: EpochIterator):
        self.epoch, self.inner = epoch, inner
        self.done = False

    def __iter__(self) -> "_EpochRun":
        return self

    def __next__(self):
        try:
            return next(self.inner)
        except StopIteration:
            self.done = True
            raise

    def stop(self) -> None:
        """End a run that was abandoned part-way, and wait for its thread to finish."""
        it = self.inner
        it.terminate_event.set()
        while it.is_alive():
            it.join(0.6)
            if it.is_alive():
                try:  # unblock a final put(None) on a full queue
                    it.output_queue.get_nowait()
                except queue.Empty:
                    pass
        it.close()
        self.done = True


def _checked(plan: MixPlan, epoch: int, rank: int, world_size: int) -> MixPlan:
    if not isinstance(plan, MixPlan):
        raise TypeError(f"plan source returned {type(plan).__name__}, not a MixPlan")
    if (plan.rank, plan.world_size) != (rank, world_size):
        raise ValueError(f"plan for epoch {epoch} is shard {plan.rank}/{plan.world_size}"
                         f", this loader is rank {rank} of {world_size}")
    if plan.epoch != epoch:
        raise ValueError(f"asked for the plan of epoch {epoch}, got epoch {plan.epoch}")
    return plan.validate()


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def _to_batch(image, label, k: int) -> MixedBatch:
    """One FFCV output pair as a MixedBatch: HWC images become BCHW, label rows are split and
    trimmed to the epoch plan's K."""
    image = _as_tensor(image)
    if image.dim() == 4 and image.shape[-1] in (1, 3) and image.shape[1] not in (1, 3):
        image = image.permute(0, 3, 1, 2)
    targets, weights, ids, layout, scale = unpack_labels(_as_tensor(label), k)
    return MixedBatch(image, targets.to(torch.int64), weights.to(torch.float32),
                      ids.to(torch.int64), layout.to(torch.uint8), scale.to(torch.float32))


class MixLoader:
    """FFCV loader driven by a mix plan: one batch row per slot of the rank's plan.

    Meets :class:`mixpipe.core.loader.PlanLoader`: ``set_epoch(e)`` fetches the plan, iterating
    yields :class:`MixedBatch` es. Iterating without ``set_epoch`` runs the next epoch.

    Args:
        fname, batch_size, num_workers, os_cache, batches_ahead, recompile, custom_fields: as
            for ``ffcv.loader.Loader``.
        source: where plans come from (``plan(epoch, rank, world_size)``); asked once per
            epoch, by :meth:`set_epoch`, after the previous epoch's commit.
        pipelines: every field of the .beton must either be disabled (``None``) or start with a
            mixpipe decoder (:class:`MixImageDecoder` subclasses, :class:`MixLabelDecoder`):
            FFCV's own decoders would read slot rows as sample ids.
        image, label: the pipeline outputs that become the batch's image and its label columns.
            The image may be HWC numpy (no ToTensor) or a BCHW tensor (ToTensor + ToTorchImage
            [+ ToDevice]).
        rank, world_size: which shard of the plan this process loads.
        max_constituents: the largest K a plan may use (label rows and tables are this wide).
        drop_last: default False, so every slot of the plan is delivered.
    """

    def __init__(self, fname: str, batch_size: int, source: PlanSource, *,
                 pipelines: Mapping[str, Any], image: str = "image", label: str = "label",
                 rank: int = 0, world_size: int = 1, max_constituents: int = 4,
                 num_workers: int = -1, os_cache: bool = DEFAULT_OS_CACHE,
                 drop_last: bool = False, batches_ahead: int = 3, recompile: bool = False,
                 custom_fields: Optional[Mapping[str, Type[Field]]] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if not callable(getattr(source, "plan", None)):
            raise TypeError("source must have a plan(epoch, rank, world_size) method "
                            "(a SelectionService or anything like it)")
        custom_fields = dict(custom_fields or {})
        reader = Reader(fname, custom_fields)
        self.num_samples = int(reader.num_samples)
        self.tables = PlanTables(self.num_samples, max_constituents)
        self._check_pipelines(reader, pipelines)
        self.ffcv = Loader(fname, batch_size, num_workers=num_workers, os_cache=os_cache,
                           order=OrderOption.SEQUENTIAL, distributed=False, seed=0,
                           indices=None, pipelines=dict(pipelines), custom_fields=custom_fields,
                           drop_last=drop_last, batches_ahead=batches_ahead,
                           recompile=recompile)
        self._outputs = self._output_columns(image, label)
        self._view = _PlanView(self.ffcv, self.tables)
        self.source = source
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = -1
        self.plan: Optional[MixPlan] = None  #: the plan of :attr:`epoch`, as fetched
        self._pending = False  # self.plan is set and its epoch not started
        self._run: Optional[_EpochRun] = None

    def _check_pipelines(self, reader: Reader, pipelines: Mapping[str, Any]) -> None:
        for name in reader.handlers:
            if name not in pipelines:
                raise ValueError(f"field {name!r} has no pipeline: FFCV's default decoder would "
                                 "read slot rows as sample ids. Give it a mixpipe decoder or "
                                 f"disable it with pipelines[{name!r}] = None")
        for name, spec in pipelines.items():
            if spec is None:
                continue
            decoder = _first_decoder(spec)
            if isinstance(spec, PipelineSpec) and not isinstance(spec.source, str):
                continue  # a reference to another pipeline's operation: no decoder of its own
            if not getattr(decoder, "plan_aware", False):
                raise ValueError(f"pipeline {name!r} starts with {type(decoder).__name__}, not a "
                                 "mixpipe decoder (SimpleMixDecoder, RandomResizedCropMixDecoder, "
                                 "CenterCropMixDecoder, MixLabelDecoder)")
            source = spec.source if isinstance(spec, PipelineSpec) else name
            field = reader.handlers.get(source)
            if field is not None and not isinstance(decoder, field.get_decoder_class()):
                # FFCV would demote it to a transform and decode with the field's default
                raise ValueError(f"pipeline {name!r}: {type(decoder).__name__} cannot decode the "
                                 f"{type(field).__name__} field {source!r} (MixImageDecoder "
                                 "subclasses read RGBImageField, MixLabelDecoder IntField)")
            decoder.attach(self.tables)

    def _output_columns(self, image: str, label: str) -> tuple:
        names = list(self.ffcv.pipeline_specs)
        for name in (image, label):
            if name not in names:
                raise ValueError(f"the loader has no output {name!r}; outputs: {names}")
        if not isinstance(self.ffcv.pipeline_specs[label].decoder, MixLabelDecoder):
            raise ValueError(f"output {label!r} is not decoded by MixLabelDecoder")
        return names.index(image), names.index(label)

    # ------------------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> MixPlan:
        """Fetch this rank's plan of ``epoch`` for the next pass (a plan without mixing when the
        source fails) and return it."""
        epoch = int(epoch)
        plan = fetch_plan(self.source, epoch, self.rank, self.world_size, self.num_samples)
        plan = _checked(plan, epoch, self.rank, self.world_size)
        self.tables.check(plan)
        self.plan, self.epoch, self._pending = plan, epoch, True
        return plan

    def _running(self) -> bool:
        return self._run is not None and not self._run.done

    def _num_batches(self, slots: int) -> int:
        return slots // self.batch_size if self.drop_last else -(-slots // self.batch_size)

    def __len__(self) -> int:
        """Batches of the epoch in progress, else of the coming one (fetching its plan)."""
        if not self._pending and not self._running():
            self.set_epoch(self.epoch + 1)
        return self._num_batches(self.plan.num_slots)

    def __iter__(self) -> Iterator[MixedBatch]:
        if not self._pending:
            self.set_epoch(self.epoch + 1)
        self._stop_run()
        plan = self.plan
        self.tables.load(plan)  # in place: the compiled decoders read it from here on
        order = np.arange(plan.num_slots, dtype=np.int64)
        order = order[:self._num_batches(plan.num_slots) * self.batch_size]
        Compiler.set_num_threads(self.ffcv.num_workers)
        if self.ffcv.code is None or self.ffcv.recompile:
            self.ffcv.generate_code()
        self._pending = False
        self._run = _EpochRun(self.epoch, EpochIterator(self._view, order))
        return self._batches(self._run, plan.max_constituents)

    def _batches(self, run: _EpochRun, k: int) -> Iterator[MixedBatch]:
        image, label = self._outputs
        for outputs in run:
            yield _to_batch(outputs[image], outputs[label], k)

    def _stop_run(self) -> None:
        if self._running():
            self._run.stop()

    def close(self) -> None:
        """Stop an epoch that was left part-way (FFCV decodes ahead in a thread)."""
        self._stop_run()
