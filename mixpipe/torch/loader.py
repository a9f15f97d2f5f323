"""The plain-PyTorch adapter: the reference loader every other adapter is compared with.

The sampler yields whole slot descriptions, not slot numbers. A DataLoader worker therefore needs
no copy of the plan: the slot it must build arrives with the index, so the same dataset object
works with persistent workers across epochs whose plans differ.

The DataLoader hands a worker a whole batch of slots (``MixedDataset.__getitems__``), which is
built in one go by :func:`mixpipe.core.compose.compose_slots`: item by item, the numpy per-call
overhead of composing ate a large share of the forward passes mixing saves (figures in
benchmarks/README.md, "Loaders in the speed-up benchmark"). The composites are the same bytes as
``dataset[slot]`` gives.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..core.augment import is_pil_image
from ..core.batch import MixedBatch
from ..core.compose import compose_slot, compose_slots, slot_regions
from ..core.plan import Layout, MixPlan
from ..core.seeding import slot_rng
from ..core.source import PlanSource, fetch_plan, warn_fallback
from ..data.datasets import ArrayDataset
from .threads import WorkerInit, limited_blas

__all__ = ["SlotRef", "PlanSource", "PlanSampler", "MixedDataset", "collate_mixed",
           "MixedLoader", "ConstituentTransform", "BuiltBatch"]


#: ``transform(image uint8 HWC, (region_h, region_w), rng) -> uint8 HWC`` augments one
#: constituent for its region (random resized crop straight to the region size, flip, ...).
ConstituentTransform = Callable[[np.ndarray, Tuple[int, int], np.random.Generator], np.ndarray]


@dataclasses.dataclass(frozen=True)
class SlotRef:
    """Everything a worker needs to build one composite; small enough to pass as an index."""

    epoch: int
    ids: Tuple[int, ...]
    weights: Tuple[float, ...]
    loss_scale: Tuple[float, ...]
    layout: int

    @classmethod
    def from_plan(cls, plan: MixPlan, row: int) -> "SlotRef":
        ids, weights, scale, layout = plan.slot(row)
        return cls(plan.epoch, tuple(int(i) for i in ids), tuple(float(w) for w in weights),
                   tuple(float(s) for s in scale), int(layout))


class PlanSampler(Sampler):
    """Yields the current epoch's slots as :class:`SlotRef`, shuffled by (seed, epoch).

    Call :meth:`set_epoch` before each epoch (as with DistributedSampler); it fetches this rank's
    shard of the plan from the source.
    """

    def __init__(self, source: PlanSource, num_samples: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0) -> None:
        self.source = source
        self.num_samples = int(num_samples)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed = shuffle, int(seed)
        self.epoch = -1
        self.plan: Optional[MixPlan] = None
        self._warned = False

    def set_epoch(self, epoch: int) -> MixPlan:
        self.epoch = int(epoch)
        self.plan = fetch_plan(self.source, self.epoch, self.rank, self.world_size,
                               self.num_samples, self._on_failure)
        return self.plan

    def _on_failure(self, epoch: int, err: Exception) -> None:
        if not self._warned:  # once per loader, not once per epoch
            self._warned = True
            warn_fallback(epoch, err)

    def __len__(self) -> int:
        return self.plan.num_slots if self.plan is not None else 0

    def __iter__(self) -> Iterator[SlotRef]:
        if self.plan is None:
            raise RuntimeError("PlanSampler: call set_epoch(epoch) before iterating")
        plan = self.plan
        # whole-plan lists once per epoch: per-slot numpy indexing cost ~10 us a slot, paid in the
        # training process; the values are those of SlotRef.from_plan
        counts = np.count_nonzero(plan.ids >= 0, axis=1).tolist()
        ids, weights = plan.ids.tolist(), plan.weights.tolist()
        scale, layout = plan.loss_scale.tolist(), plan.layout.tolist()
        epoch = plan.epoch
        for row in plan.delivery_order(self.seed, self.shuffle).tolist():
            n = counts[row]
            yield SlotRef(epoch, tuple(ids[row][:n]), tuple(weights[row][:n]),
                          tuple(scale[row][:n]), layout[row])


def _as_hwc_uint8(image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3):
            image = np.moveaxis(image, 0, 2)
    arr = np.asarray(image)  # PIL images convert here
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8:
        raise TypeError(f"base dataset images must be uint8 (HWC, CHW or PIL), got {arr.dtype}")
    return arr


class MixedDataset(Dataset):
    """Builds the composite of a :class:`SlotRef` from a map-style ``base`` dataset.

    ``base[i]`` returns ``(image, label)`` with a uint8 image (HWC numpy, CHW tensor or PIL).
    Each constituent is augmented for its own region by ``constituent_transform`` with a
    generator seeded from (seed, epoch, ids), so a slot's pixels are reproducible, then composed
    by the reference composer. ``dataset[slot]`` returns a dict of numpy arrays (see
    :func:`collate_mixed`); the DataLoader asks for whole batches (:meth:`__getitems__`), which
    are the same bytes built with a fraction of the numpy calls.
    """

    def __init__(self, base: Dataset, size: Tuple[int, int], stride: int = 1,
                 max_constituents: int = 4,
                 constituent_transform: Optional[ConstituentTransform] = None,
                 seed: int = 0) -> None:
        self.base = base
        self.size = (int(size[0]), int(size[1]))
        self.stride = int(stride)
        self.max_constituents = int(max_constituents)
        self.transform = constituent_transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def _check(self, slot: Any) -> None:
        if not isinstance(slot, SlotRef):
            raise TypeError(f"MixedDataset is indexed by SlotRef (from PlanSampler), got "
                            f"{type(slot).__name__}")
        if len(slot.ids) > self.max_constituents:
            raise ValueError(f"slot has {len(slot.ids)} constituents, max_constituents is "
                             f"{self.max_constituents}")

    def _augment(self, slot: SlotRef, images: Sequence[np.ndarray]) -> list:
        """The slot's constituents after the transform, each for its own region.

        One generator per slot, seeded by (seed, epoch, ids) and drawn from constituent by
        constituent in slot order, whichever path (per item or batched) builds the slot.
        """
        if self.transform is None:
            return list(images)
        geometry = slot_regions(Layout(slot.layout), tuple(slot.weights), *self.size,
                                self.stride)
        rng = slot_rng([self.seed, slot.epoch, *slot.ids])
        return [_as_hwc_uint8(self.transform(image, (reg.height, reg.width), rng))
                for image, reg in zip(images, geometry)]

    def _keeps_pil(self) -> bool:
        """Whether decoded pillow images reach the transform as they are (it crops and resizes
        them natively, which skips a full-size numpy copy of every constituent)."""
        return bool(getattr(self.transform, "takes_pil", False))

    def __getitem__(self, slot: SlotRef) -> dict:
        self._check(slot)
        fetched = [self.base[sample_id] for sample_id in slot.ids]
        images = self._augment(slot, [_as_input(image, self._keeps_pil())
                                      for image, _ in fetched])
        composite = compose_slot(images, slot.weights, Layout(slot.layout), self.size,
                                 self.stride)
        return _slot_item(np.ascontiguousarray(np.moveaxis(composite, 2, 0)), slot,
                          [int(label) for _, label in fetched], self.max_constituents)

    def __getitems__(self, slots: Sequence[SlotRef]) -> "BuiltBatch":
        """A whole batch of slots at once (the DataLoader calls this when it exists).

        Returns the per-item dicts (so any collate function still works) with the finished
        :class:`MixedBatch` attached, which :func:`collate_mixed` passes through unchanged.
        """
        slots = list(slots)
        if not slots:
            raise ValueError("MixedDataset.__getitems__ got no slots")
        for slot in slots:
            self._check(slot)
        flat = np.fromiter((i for slot in slots for i in slot.ids), np.int64)
        images, labels = _gather(self.base, flat, self._keeps_pil())
        per_slot, start = [], 0
        for slot in slots:
            stop = start + len(slot.ids)
            per_slot.append(self._augment(slot, images[start:stop]))
            start = stop
        composites = compose_slots(per_slot, [slot.weights for slot in slots],
                                   [slot.layout for slot in slots], self.size, self.stride)
        b, k = len(slots), self.max_constituents
        channels = composites.shape[3] if composites.ndim == 4 else 1
        tensors, arrays = _one_storage(b, k, (channels,) + self.size)
        arrays["image"][:] = composites.reshape((b,) + self.size + (channels,)).transpose(
            0, 3, 1, 2)
        counts = np.fromiter((len(slot.ids) for slot in slots), np.int64, b)
        rows = np.repeat(np.arange(b), counts)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
        for key, fill, values in (
                ("targets", -1, labels), ("ids", -1, flat),
                ("weights", 0.0, [w for slot in slots for w in slot.weights]),
                ("loss_scale", 0.0, [x for slot in slots for x in slot.loss_scale])):
            arrays[key][:] = fill
            arrays[key][rows, cols] = values
        arrays["layout"][:] = [slot.layout for slot in slots]
        built = BuiltBatch({key: arrays[key][r] for key in _FIELDS} for r in range(b))
        built.batch = MixedBatch(**tensors)
        return built


#: MixedBatch fields in storage order, with their dtypes.
_FIELDS = {"image": np.uint8, "targets": np.int64, "ids": np.int64, "weights": np.float32,
           "loss_scale": np.float32, "layout": np.uint8}


_TORCH_DTYPES = {np.uint8: torch.uint8, np.int64: torch.int64, np.float32: torch.float32}


def _batch_storage(nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor for one batch: in shared memory when built in a DataLoader worker.

    What a worker returns travels to the training process through shared memory; a tensor
    allocated in ordinary memory is first copied into a new shared segment on the way (torch's
    own collate allocates in shared memory for the same reason).
    """
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.empty(nbytes, dtype=torch.uint8).share_memory_()


def _one_storage(b: int, k: int, image: Tuple[int, int, int]) -> Tuple[dict, dict]:
    """(tensors, numpy views) of a batch's fields, all carved out of one uint8 storage.

    A DataLoader worker hands every tensor storage to the training process through its own
    shared-memory file descriptor, paid in the training process; the six fields of a batch in
    one storage cost one handover (a synthetic 128-slot batch through one worker: ~1.1 ms of
    main-process CPU with six storages, ~0.5 ms with one, side by side).
    """
    shapes = {"image": (b,) + tuple(image), "layout": (b,)}
    offsets, total = {}, 0
    for key, dtype in _FIELDS.items():
        shape = shapes.get(key, (b, k))
        offsets[key] = (total, shape)
        total += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 8) * 8  # 8-byte aligned
    storage = _batch_storage(total)
    flat = storage.numpy()
    tensors, arrays = {}, {}
    for key, dtype in _FIELDS.items():
        start, shape = offsets[key]
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        arrays[key] = flat[start:start + nbytes].view(dtype).reshape(shape)
        tensors[key] = storage[start:start + nbytes].view(_TORCH_DTYPES[dtype]).view(shape)
    return tensors, arrays


class BuiltBatch(list):
    """The items of a batch built in one go, with the collated :class:`MixedBatch` as ``.batch``.

    A plain list of per-item dicts to any collate function; :func:`collate_mixed` returns
    ``.batch`` instead of stacking the items again.
    """

    batch: MixedBatch


def _slot_item(image: np.ndarray, slot: SlotRef, labels: Sequence[int], k: int) -> dict:
    pad = k - len(slot.ids)
    return {
        "image": image,
        "targets": np.array(list(labels) + [-1] * pad, np.int64),
        "weights": np.array(list(slot.weights) + [0.0] * pad, np.float32),
        "ids": np.array(list(slot.ids) + [-1] * pad, np.int64),
        "layout": np.uint8(slot.layout),
        "loss_scale": np.array(list(slot.loss_scale) + [0.0] * pad, np.float32),
    }


def _as_input(image: Any, keep_pil: bool) -> Any:
    """A base dataset's image as the transform takes it: a pillow image as is when allowed,
    otherwise uint8 HWC numpy."""
    if keep_pil and is_pil_image(image):
        return image
    return _as_hwc_uint8(image)


def _is_plain_arrays(base: Any) -> bool:
    """True when ``base[i]`` is known to be ``(images[i], labels[i])`` of in-memory arrays.

    Only :class:`mixpipe.data.ArrayDataset` itself qualifies (not a subclass that overrides
    ``__getitem__``), and torch ``Subset`` views of it; anything else is fetched item by item.
    """
    if isinstance(base, Subset):
        return _is_plain_arrays(base.dataset)
    return (isinstance(base, ArrayDataset) and type(base).__getitem__ is ArrayDataset.__getitem__
            and isinstance(base.images, np.ndarray) and base.images.dtype == np.uint8
            and base.images.ndim == 4)


def _check_ids(ids: np.ndarray, n: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        bad = ids[(ids < 0) | (ids >= n)][0]
        raise IndexError(f"sample id {bad} out of range [0, {n}) of the base dataset")


def _gather(base: Any, ids: np.ndarray,
            keep_pil: bool = False) -> Tuple[Sequence[Any], np.ndarray]:
    """Constituent images (uint8 HWC each, or pillow images with ``keep_pil``) and int64
    labels for ``ids``, in order.

    Plain arrays are gathered with one fancy index instead of one ``base[i]`` call each.
    """
    if not _is_plain_arrays(base):
        fetched = [base[int(i)] for i in ids]
        return ([_as_input(image, keep_pil) for image, _ in fetched],
                np.array([int(label) for _, label in fetched], np.int64))
    _check_ids(ids, len(base))
    if isinstance(base, Subset):  # map only the ids asked for
        inner = np.fromiter((base.indices[i] for i in ids.tolist()), np.int64, len(ids))
        return _gather(base.dataset, inner, keep_pil)
    return base.images[ids], np.asarray(base.labels)[ids].astype(np.int64)


def collate_mixed(items: Sequence[dict]) -> MixedBatch:
    """Stack :class:`MixedDataset` items into a :class:`MixedBatch` (uint8 images stay uint8)."""
    if isinstance(items, BuiltBatch):
        return items.batch
    if not items:
        raise ValueError("collate_mixed got an empty batch")

    def stack(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([item[key] for item in items]))

    return MixedBatch(image=stack("image"), targets=stack("targets"), weights=stack("weights"),
                      ids=stack("ids"),
                      layout=torch.from_numpy(np.array([it["layout"] for it in items], np.uint8)),
                      loss_scale=stack("loss_scale"))


class MixedLoader:
    """DataLoader over a plan source: ``set_epoch(e)``, then iterate :class:`MixedBatch` es.

    Meets :class:`mixpipe.core.loader.PlanLoader`. ``len()`` is the batch count of the current
    epoch's plan (it changes with the plan).

    Each worker runs with one BLAS thread (:mod:`mixpipe.torch.threads`: the composer's resize is
    numpy matrix products, and a pool of one BLAS thread per core in every worker multiplied the
    loader's CPU time); the workers start under that limit, and ``worker_init_fn``, if given,
    runs in each as usual.
    """

    def __init__(self, dataset: Dataset, source: PlanSource, batch_size: int,
                 size: Tuple[int, int], stride: int = 1, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0,
                 constituent_transform: Optional[ConstituentTransform] = None,
                 shuffle: bool = True, drop_last: bool = False, max_constituents: int = 4,
                 pin_memory: bool = False, persistent_workers: bool = False,
                 worker_init_fn: Optional[Callable[[int], None]] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.sampler = PlanSampler(source, len(dataset), rank, world_size, shuffle, seed)
        self.dataset = MixedDataset(dataset, size, stride, max_constituents,
                                    constituent_transform, seed)
        self.loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                                 num_workers=num_workers, collate_fn=collate_mixed,
                                 drop_last=drop_last, pin_memory=pin_memory,
                                 persistent_workers=persistent_workers and num_workers > 0,
                                 worker_init_fn=WorkerInit(worker_init_fn))

    @property
    def source(self) -> PlanSource:
        return self.sampler.source

    @property
    def plan(self) -> Optional[MixPlan]:
        return self.sampler.plan

    def set_epoch(self, epoch: int) -> MixPlan:
        return self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        slots = len(self.sampler)
        return slots // self.batch_size if self.drop_last else -(-slots // self.batch_size)

    def __iter__(self) -> Iterator[MixedBatch]:
        if self.sampler.plan is None:
            self.set_epoch(0)
        if self.loader.num_workers == 0:
            return iter(self.loader)
        with limited_blas(1):  # the workers start here and inherit one BLAS thread
            return iter(self.loader)

    def close(self) -> None:
        """End persistent workers now; torch's DataLoader has no public call for it, and
        otherwise they live until the loader is garbage-collected."""
        running, self.loader._iterator = self.loader._iterator, None
        if running is not None and hasattr(running, "_shutdown_workers"):
            running._shutdown_workers()
