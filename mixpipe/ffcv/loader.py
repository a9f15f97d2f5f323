"""An FFCV ``Loader`` that walks a mix plan, and the adapter that yields :class:`MixedBatch`.

FFCV 1.0.2 traps this handles (see DESIGN.md, Known traps):

* ``Loader.__len__`` is computed once, from the order made at construction, and ``__iter__`` cuts
  every epoch's order to that length (FFCV issue #152): a plan with more slots than epoch 0 would
  lose slots and ``len()`` would be wrong whenever the slot count changes. :class:`MixLoader`
  overrides both, from the plan of the epoch in question.
* ``Loader(order=SomeTraversalOrder)`` does not work in 1.0.2 (it calls the instance); the plan
  order is installed after the base constructor instead. Nothing in ffcv is patched globally.
* The process cache (``os_cache=False``) loads pages for the indices of each batch; those indices
  are slot rows here, so the memory manager is wrapped to schedule every constituent's pages.
* The plan tables are shared with the running epoch, so a new epoch first stops an abandoned
  previous one before overwriting them.
"""
from __future__ import annotations

import queue
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Type

import numpy as np
import torch
from ffcv.fields.base import Field
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.loader.loader import DEFAULT_OS_CACHE
from ffcv.pipeline import Compiler, PipelineSpec
from ffcv.reader import Reader
from ffcv.traversal_order.base import TraversalOrder

from ..core.batch import MixedBatch
from ..core.plan import MixPlan
from ..core.source import PlanSource, fetch_plan
from .decoders import MixLabelDecoder, unpack_labels
from .tables import PlanTables

__all__ = ["PlanProvider", "PlanOrder", "MixLoader", "MixedBatches"]


#: Anything with the SelectionService ``plan`` method (in-process service, network client).
PlanProvider = PlanSource


class PlanOrder(TraversalOrder):
    """Traversal order whose epoch is the plan: one index per slot, the slot's row number.

    Fetching epoch ``e``'s order also writes its plan into the shared tables, so it must only
    happen right before that epoch is decoded (the loader sees to that).
    """

    def __init__(self, loader: "MixLoader", plans: PlanProvider, rank: int, world_size: int,
                 tables: PlanTables):
        super().__init__(loader)
        self.plans = plans
        self.rank, self.world_size = int(rank), int(world_size)
        self.tables = tables
        self.num_samples = int(loader.reader.num_samples)
        self._cache: Dict[int, MixPlan] = {}

    def plan(self, epoch: int) -> MixPlan:
        """This rank's plan for ``epoch``, fetched once and checked against the dataset."""
        if epoch not in self._cache:
            # an unreachable server gives a no-mixing plan and one warning (core.source)
            plan = fetch_plan(self.plans, epoch, self.rank, self.world_size, self.num_samples)
            if not isinstance(plan, MixPlan):
                raise TypeError(f"plan provider returned {type(plan).__name__}, not a MixPlan")
            if (plan.rank, plan.world_size) != (self.rank, self.world_size):
                raise ValueError(f"plan for epoch {epoch} is shard {plan.rank}/{plan.world_size}"
                                 f", this loader is rank {self.rank} of {self.world_size}")
            if plan.epoch != epoch:
                raise ValueError(f"asked for the plan of epoch {epoch}, got epoch {plan.epoch}")
            plan.validate()
            self.tables.check(plan)
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = plan
        return self._cache[epoch]

    def sample_order(self, epoch: int) -> Sequence[int]:
        plan = self.plan(epoch)
        self.tables.load(plan)
        return np.arange(plan.num_slots, dtype=np.int64)


class _PlanPages:
    """Memory-manager proxy: page scheduling by constituent ids instead of slot rows."""

    def __init__(self, inner, tables: PlanTables):
        self._inner = inner
        self._tables = tables

    def schedule_epoch(self, batches):
        return self._inner.schedule_epoch([self._tables.constituents(b) for b in batches])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _first_decoder(spec) -> Any:
    if isinstance(spec, PipelineSpec):
        return spec.decoder if spec.decoder is not None else (
            spec.transforms[0] if spec.transforms else None)
    return spec[0] if len(spec) else None


class _EpochRun:
    """The epoch being iterated: FFCV's iterator plus the bookkeeping ``len()`` needs."""

    def __init__(self, loader: "MixLoader", epoch: int, inner: EpochIterator):
        self.loader, self.epoch, self.inner = loader, epoch, inner
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


class MixLoader(Loader):
    """FFCV loader driven by a mix plan: one batch row per slot of the rank's plan.

    Args:
        fname, batch_size, num_workers, os_cache, batches_ahead, recompile, custom_fields: as
            for ``ffcv.loader.Loader``.
        plans: a :class:`PlanProvider`; asked for ``plan(epoch, rank, world_size)`` once per
            epoch, right before the epoch starts (after the previous epoch's commit).
        pipelines: every field of the .beton must either be disabled (``None``) or start with a
            mixpipe decoder (:class:`MixImageDecoder` subclasses, :class:`MixLabelDecoder`):
            FFCV's own decoders would read slot rows as sample ids.
        rank, world_size: which shard of the plan this process loads.
        max_constituents: the largest K a plan may use (label rows and tables are this wide).
        drop_last: default False, so every slot of the plan is delivered.
    """

    def __init__(self, fname: str, batch_size: int, plans: PlanProvider, *,
                 pipelines: Mapping[str, Any], rank: int = 0, world_size: int = 1,
                 max_constituents: int = 4, num_workers: int = -1,
                 os_cache: bool = DEFAULT_OS_CACHE, drop_last: bool = False,
                 batches_ahead: int = 3, recompile: bool = False,
                 custom_fields: Optional[Mapping[str, Type[Field]]] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if not callable(getattr(plans, "plan", None)):
            raise TypeError("plans must have a plan(epoch, rank, world_size) method "
                            "(a SelectionService or anything like it)")
        custom_fields = dict(custom_fields or {})
        reader = Reader(fname, custom_fields)
        self.tables = PlanTables(int(reader.num_samples), max_constituents)
        self._check_pipelines(reader, pipelines)
        super().__init__(fname, batch_size, num_workers=num_workers, os_cache=os_cache,
                         order=OrderOption.SEQUENTIAL, distributed=False, seed=0,
                         indices=None, pipelines=dict(pipelines), custom_fields=custom_fields,
                         drop_last=drop_last, batches_ahead=batches_ahead, recompile=recompile)
        self.traversal_order = PlanOrder(self, plans, rank, world_size, self.tables)
        self.memory_manager = _PlanPages(self.memory_manager, self.tables)
        self.rank, self.world_size = int(rank), int(world_size)
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

    # ------------------------------------------------------------------------------ epochs
    @property
    def current_epoch(self) -> int:
        """The epoch being iterated, or the next one when none is in progress."""
        if self._run is not None and not self._run.done:
            return self._run.epoch
        return self.next_epoch

    def plan(self, epoch: Optional[int] = None) -> MixPlan:
        """The plan of ``epoch`` (default: :attr:`current_epoch`)."""
        return self.traversal_order.plan(self.current_epoch if epoch is None else epoch)

    def _num_batches(self, slots: int) -> int:
        return slots // self.batch_size if self.drop_last else -(-slots // self.batch_size)

    def __len__(self) -> int:
        """Batches of the current epoch (the one in progress, else the next one)."""
        return self._num_batches(self.plan().num_slots)

    def __iter__(self) -> _EpochRun:
        if self._run is not None and not self._run.done:
            self._run.stop()
        Compiler.set_num_threads(self.num_workers)
        epoch = self.next_epoch
        order = self.traversal_order.sample_order(epoch)  # writes the plan tables in place
        order = order[:self._num_batches(len(order)) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        self._run = _EpochRun(self, epoch, EpochIterator(self, order))
        return self._run

    def mixed(self, image: str = "image", label: str = "label") -> "MixedBatches":
        """This loader's batches as :class:`MixedBatch` (see :class:`MixedBatches`)."""
        return MixedBatches(self, image, label)


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


class MixedBatches:
    """Iterate a :class:`MixLoader` as :class:`MixedBatch` es.

    ``image`` and ``label`` name the loader's outputs (pipeline keys). The image may still be
    HWC numpy (no ToTensor) or already a BCHW tensor (ToTensor + ToTorchImage [+ ToDevice]);
    HWC is turned into BCHW. Label columns are trimmed to the epoch plan's K.
    """

    def __init__(self, loader: MixLoader, image: str = "image", label: str = "label"):
        names = list(loader.pipeline_specs)
        for name in (image, label):
            if name not in names:
                raise ValueError(f"the loader has no output {name!r}; outputs: {names}")
        if not isinstance(loader.pipeline_specs[label].decoder, MixLabelDecoder):
            raise ValueError(f"output {label!r} is not decoded by MixLabelDecoder")
        self.loader = loader
        self._image = names.index(image)
        self._label = names.index(label)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[MixedBatch]:
        run = iter(self.loader)
        k = run.loader.plan(run.epoch).max_constituents
        for outputs in run:
            yield self._convert(outputs[self._image], outputs[self._label], k)

    @staticmethod
    def _convert(image, label, k: int) -> MixedBatch:
        image = _as_tensor(image)
        if image.dim() == 4 and image.shape[-1] in (1, 3) and image.shape[1] not in (1, 3):
            image = image.permute(0, 3, 1, 2)
        label = _as_tensor(label)
        targets, weights, ids, layout, scale = unpack_labels(label, k)
        return MixedBatch(image, targets.to(torch.int64), weights.to(torch.float32),
                          ids.to(torch.int64), layout.to(torch.uint8), scale.to(torch.float32))
