"""The plain-PyTorch adapter: the reference loader every other adapter is compared with.

The sampler yields whole slot descriptions, not slot numbers. A DataLoader worker therefore needs
no copy of the plan: the slot it must build arrives with the index, so the same dataset object
works with persistent workers across epochs whose plans differ.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.batch import MixedBatch
from ..core.compose import compose_slot
from ..core.layouts import regions
from ..core.plan import Layout, MixPlan
from ..core.source import PlanSource, fetch_plan, warn_fallback

__all__ = ["SlotRef", "PlanSource", "PlanSampler", "MixedDataset", "collate_mixed",
           "MixedLoader", "ConstituentTransform"]


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
        for row in plan.delivery_order(self.seed, self.shuffle):
            yield SlotRef.from_plan(plan, int(row))


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
    by the reference composer. Returns a dict of numpy arrays (see :func:`collate_mixed`).
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

    def __getitem__(self, slot: SlotRef) -> dict:
        if not isinstance(slot, SlotRef):
            raise TypeError(f"MixedDataset is indexed by SlotRef (from PlanSampler), got "
                            f"{type(slot).__name__}")
        n = len(slot.ids)
        if n > self.max_constituents:
            raise ValueError(f"slot has {n} constituents, max_constituents is "
                             f"{self.max_constituents}")
        layout = Layout(slot.layout)
        regs = regions(layout, slot.weights, *self.size, self.stride)
        rng = np.random.default_rng([self.seed, slot.epoch, *slot.ids])
        images, labels = [], []
        for sample_id, reg in zip(slot.ids, regs):
            image, label = self.base[sample_id]
            image = _as_hwc_uint8(image)
            if self.transform is not None:
                image = _as_hwc_uint8(self.transform(image, (reg.height, reg.width), rng))
            images.append(image)
            labels.append(int(label))
        composite = compose_slot(images, slot.weights, layout, self.size, self.stride)
        k = self.max_constituents
        pad = k - n
        return {
            "image": np.ascontiguousarray(np.moveaxis(composite, 2, 0)),
            "targets": np.array(labels + [-1] * pad, np.int64),
            "weights": np.array(list(slot.weights) + [0.0] * pad, np.float32),
            "ids": np.array(list(slot.ids) + [-1] * pad, np.int64),
            "layout": np.uint8(layout),
            "loss_scale": np.array(list(slot.loss_scale) + [0.0] * pad, np.float32),
        }


def collate_mixed(items: Sequence[dict]) -> MixedBatch:
    """Stack :class:`MixedDataset` items into a :class:`MixedBatch` (uint8 images stay uint8)."""
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

    ``len()`` is the batch count of the current epoch's plan (it changes with the plan).
    """

    def __init__(self, dataset: Dataset, source: PlanSource, batch_size: int,
                 size: Tuple[int, int], stride: int = 1, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0,
                 constituent_transform: Optional[ConstituentTransform] = None,
                 shuffle: bool = True, drop_last: bool = False, max_constituents: int = 4,
                 pin_memory: bool = False, persistent_workers: bool = False) -> None:
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
                                 persistent_workers=persistent_workers and num_workers > 0)

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
        return iter(self.loader)
