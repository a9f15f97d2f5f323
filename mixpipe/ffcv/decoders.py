"""FFCV decoders that build composites from the epoch's plan.

The loader (:class:`mixpipe.ffcv.loader.MixLoader`) hands the pipeline one index per slot: the
slot's ROW in the plan, not a sample id. The decoders look the row up in the plan tables
(:mod:`mixpipe.ffcv.tables`) and read every constituent through FFCV's own memory reader, so one
index yields the whole slot and the label decoder stays aligned with the pixels by construction.
(Rows rather than lead ids: a lead id does not name a slot uniquely once padding copies exist.)

* :class:`MixImageDecoder` decodes each constituent (JPEG via FFCV's ``imdecode`` or raw), takes
  its crop window, resizes it to its region with the reference's antialiased bilinear filter and
  pastes it (HALVES, QUADS, SINGLE) or blends it in float32 (BLEND); a single at its native size
  is decoded straight into the output as FFCV's own decoder does. Subclasses choose the crop:
  :class:`SimpleMixDecoder` (whole image), :class:`RandomResizedCropMixDecoder`,
  :class:`CenterCropMixDecoder`.
* :class:`MixLabelDecoder` emits one float64 row per slot (see :func:`unpack_labels`).

Ordinary FFCV transforms run after these decoders unchanged. Note that FFCV's
``RandomHorizontalFlip`` mirrors the whole composite, which swaps the sides of HALVES and QUADS
composites against their labels: use the decoders' ``flip_prob`` (each constituent mirrored
inside its own region) instead.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, List, Optional, Tuple

import numpy as np
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State

from ..core.plan import Layout, MixPlan
from . import geometry, kernels
from .tables import PlanTables, table_view

__all__ = ["MixImageDecoder", "SimpleMixDecoder", "RandomResizedCropMixDecoder",
           "CenterCropMixDecoder", "MixLabelDecoder", "unpack_labels", "label_width"]

_JPG = 0  # ffcv.fields.rgb_image.IMAGE_MODES['jpg']



#: Compiled FFCV library dispatchers, kept until the interpreter exits (see :func:`_kept`).
_KEPT: List[Callable] = []


def _kept(dispatcher: Callable) -> Callable:
    """Keep a compiled dispatcher alive for the rest of the process.

    Why: when a finished loader's decoder is garbage-collected mid-run (the next benchmark arm,
    the next loader), numba's finalizer for its ``imdecode`` dispatcher walks the dispatcher's
    overload table and fails with ``KeyError`` on the entry it is iterating (seen here with
    numba's table of the FFCV call signature, literal or not), printing ``Exception ignored
    ... numba ... KeyError`` once per dispatcher. At interpreter exit numba skips these
    finalizers, so a dispatcher kept until then never prints it. Sharing one dispatcher between
    decoders instead is worse: the same table lookup then fails while compiling the next
    pipeline. The cost is a few compiled functions per loader built, held until exit.
    """
    if Compiler.is_enabled:
        _KEPT.append(dispatcher)
    return dispatcher


class _PlanAware:
    """Mixin: an operation that reads the plan tables. The loader attaches its tables."""

    plan_aware = True
    _tables: Optional[PlanTables] = None

    def attach(self, tables: PlanTables) -> None:
        if self._tables is not None and self._tables is not tables:
            raise ValueError(f"this {type(self).__name__} already belongs to another MixLoader; "
                             "build one decoder per loader")
        if self._tables is None:
            self._tables = tables
            self._on_attach(tables)

    def _on_attach(self, tables: PlanTables) -> None:
        pass

    @property
    def tables(self) -> PlanTables:
        if self._tables is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to plan tables: use it in "
                               "a mixpipe.ffcv.MixLoader pipeline, not a plain ffcv Loader")
        return self._tables


class MixImageDecoder(_PlanAware, SimpleRGBImageDecoder):
    """Base of the mixing image decoders (an ``RGBImageField`` decoder for FFCV).

    Args:
        output_size: (height, width) of the composites; ``None`` keeps the dataset's constant
            image size (only :class:`SimpleMixDecoder`).
        stride: the network's total stride; spatial boundaries snap to it (core ``regions``).
        flip_prob: chance that a constituent is mirrored inside its region.
        resize: ``"reference"`` resizes with the reference compose filter in numba (composites
            equal :func:`mixpipe.core.compose.compose_slot` up to float32 ties);
            ``"fast"`` uses FFCV's own OpenCV crop-resize (INTER_AREA), several times faster on
            large images but not equal to the reference (box vs triangle filter; BLEND blends
            the rounded resized constituents).
    """

    #: salt of the crop generator, so different decoders draw different crops
    crop_salt = 0

    def __init__(self, output_size: Optional[Tuple[int, int]] = None, stride: int = 1,
                 flip_prob: float = 0.0, resize: str = "reference"):
        super().__init__()
        if resize not in ("reference", "fast"):
            raise ValueError(f"resize must be 'reference' or 'fast', got {resize!r}")
        self.resize = resize
        if output_size is not None:
            if len(output_size) != 2 or min(int(output_size[0]), int(output_size[1])) < 1:
                raise ValueError(f"output_size must be (height, width) >= 1, got {output_size}")
            output_size = (int(output_size[0]), int(output_size[1]))
        if int(stride) < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {flip_prob}")
        self.output_size = output_size
        self.stride = int(stride)
        self.flip_prob = float(flip_prob)
        self._out: Optional[Tuple[int, int]] = output_size

    # ----------------------------------------------------------------- tables (numpy, per epoch)
    def _on_attach(self, tables: PlanTables) -> None:
        k = tables.max_constituents
        self.regions = tables.add_table((k, 4), np.int32, self._fill_regions)
        self.crops = tables.add_table((k, 5), np.int32, self._fill_crops)

    def _fill_regions(self, plan: MixPlan, tables: PlanTables, table: np.ndarray) -> None:
        height, width = self._resolved_size()
        geometry.fill_regions(plan, table, height, width, self.stride)

    def _fill_crops(self, plan: MixPlan, tables: PlanTables, table: np.ndarray) -> None:
        m, k = plan.ids.shape
        table[:m] = 0
        rows, cols = geometry.constituent_cells(plan)
        ids = plan.ids[rows, cols]
        meta = self._metadata()
        src_h = meta["height"][ids].astype(np.int64)
        src_w = meta["width"][ids].astype(np.int64)
        reg = self.regions[rows, cols]
        rng = geometry.crop_rng(plan, self.crop_salt)
        crops = self.sample_crops(src_h, src_w, reg[:, 2].astype(np.int64),
                                  reg[:, 3].astype(np.int64), rng)
        flips = rng.uniform(size=len(ids)) < self.flip_prob
        table[rows, cols, :4] = crops
        table[rows, cols, 4] = flips

    def sample_crops(self, src_h, src_w, reg_h, reg_w, rng) -> np.ndarray:
        """int64[n, 4] (top, left, height, width) windows of the constituents' images."""
        raise NotImplementedError

    def _metadata(self) -> np.ndarray:
        if self.metadata is None:
            raise RuntimeError("the decoder has no field metadata yet (FFCV sets it when the "
                               "loader builds its pipeline)")
        return self.metadata

    def _resolved_size(self) -> Tuple[int, int]:
        if self._out is None:
            raise RuntimeError("output size unknown until the loader builds its pipeline")
        return self._out

    # ----------------------------------------------------------------- FFCV operation
    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Tuple]:
        self.tables  # noqa: B018 - fail early, with a clear message, outside a MixLoader
        meta = self._metadata()
        if self._out is None:
            heights, widths = meta["height"], meta["width"]
            if heights.min() != heights.max() or widths.min() != widths.max():
                raise TypeError(f"{type(self).__name__} without output_size needs images of one "
                                "size; give output_size=(height, width)")
            self._out = (int(heights.max()), int(widths.max()))
        height, width = self._out
        max_pixels = int(meta["height"].max()) * int(meta["width"].max())
        shape = (height, width, 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                (AllocationQuery(shape, np.dtype("<u1")),
                 AllocationQuery((max_pixels * 3,), np.dtype("<u1"))))

    def generate_code(self) -> Callable:
        enabled = bool(Compiler.is_enabled)
        tables = self.tables
        mem_read = self.memory_read
        imdecode_c = _kept(Compiler.compile(imdecode))
        k = kernels.compiled(enabled)
        paste, blend, round_into = k["paste_window"], k["blend_window"], k["round_into"]
        paste_u8, blend_u8 = k["paste_u8"], k["blend_u8"]
        # scratch arrays come from these, never from np.zeros/np.empty in the loop below: with
        # num_workers > 1 it is a prange loop and numba would hoist them (kernels.accumulator)
        new_acc, new_patch = k["accumulator"], k["u8_patch"]
        resize_crop_c = _kept(Compiler.compile(resize_crop))
        fast = self.resize == "fast"
        ids_view = table_view(tables.ids, enabled)
        weights_view = table_view(tables.weights, enabled)
        layout_view = table_view(tables.layout, enabled)
        counts_view = table_view(tables.counts, enabled)
        regions_view = table_view(self.regions, enabled)
        crops_view = table_view(self.crops, enabled)
        my_range = Compiler.get_iterator()
        out_h, out_w = self._resolved_size()
        blend_code, single_code, jpg = int(Layout.BLEND), int(Layout.SINGLE), _JPG

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            ids = ids_view()
            weights = weights_view()
            layout = layout_view()
            counts = counts_view()
            regions = regions_view()
            crops = crops_view()
            for dst_ix in my_range(len(batch_indices)):
                row = batch_indices[dst_ix]
                lay = layout[row]
                dest = destination[dst_ix]
                acc_h, acc_w = (out_h, out_w) if lay == blend_code else (1, 1)
                acc = new_acc(acc_h, acc_w)
                for c in range(counts[row]):
                    field = metadata[ids[row, c]]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.int64(field["height"])
                    width = np.int64(field["width"])
                    top = np.int64(crops[row, c, 0])
                    left = np.int64(crops[row, c, 1])
                    crop_h = np.int64(crops[row, c, 2])
                    crop_w = np.int64(crops[row, c, 3])
                    flip = crops[row, c, 4] != 0
                    whole = (top == 0 and left == 0 and crop_h == height and crop_w == width
                             and not flip)
                    if (lay == single_code and field["mode"] == jpg and whole
                            and height == out_h and width == out_w):
                        # the unmixed fast path: FFCV's own decode, straight into the output
                        imdecode_c(image_data, dest, height, width, height, width,
                                   0, 0, 1, 1, False, False)
                        continue
                    if field["mode"] == jpg:
                        temp = temp_storage[dst_ix]
                        imdecode_c(image_data, temp, height, width, height, width,
                                   0, 0, 1, 1, False, False)
                        image = temp[:height * width * 3].reshape(height, width, 3)
                    else:
                        image = image_data.reshape(height, width, 3)
                    r_top = np.int64(regions[row, c, 0])
                    r_left = np.int64(regions[row, c, 1])
                    r_h = np.int64(regions[row, c, 2])
                    r_w = np.int64(regions[row, c, 3])
                    if fast:
                        patch = new_patch(r_h, r_w)
                        resize_crop_c(image, top, top + crop_h, left, left + crop_w, patch)
                        if lay == blend_code:
                            blend_u8(patch, flip, weights[row, c], acc)
                        else:
                            paste_u8(patch, flip, dest, r_top, r_left)
                    elif lay == blend_code:
                        blend(image, top, left, crop_h, crop_w, flip, weights[row, c], acc)
                    else:
                        paste(image, top, left, crop_h, crop_w, flip, dest, r_top, r_left, r_h,
                              r_w)
                if lay == blend_code:
                    round_into(acc, dest)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SimpleMixDecoder(MixImageDecoder):
    """Whole images, resized to their regions (what :func:`mixpipe.core.compose.compose_slot`
    does with full constituents). Default output size: the dataset's constant image size."""

    def sample_crops(self, src_h, src_w, reg_h, reg_w, rng) -> np.ndarray:
        return geometry.full_crops(src_h, src_w, reg_h, reg_w, rng)


class RandomResizedCropMixDecoder(MixImageDecoder):
    """A random crop per constituent (Inception-style, in its region's aspect), resized."""

    crop_salt = 1

    def __init__(self, output_size: Tuple[int, int], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 stride: int = 1, flip_prob: float = 0.0, resize: str = "reference"):
        if output_size is None:
            raise ValueError("RandomResizedCropMixDecoder needs output_size=(height, width)")
        super().__init__(output_size, stride, flip_prob, resize)
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def sample_crops(self, src_h, src_w, reg_h, reg_w, rng) -> np.ndarray:
        return geometry.random_resized_crops(src_h, src_w, reg_h, reg_w, rng, self.scale,
                                             self.ratio)


class CenterCropMixDecoder(MixImageDecoder):
    """A centred crop (``ratio`` of the largest window of the region's aspect), resized."""

    crop_salt = 2

    def __init__(self, output_size: Tuple[int, int], ratio: float = 224 / 256, stride: int = 1,
                 resize: str = "reference"):
        if output_size is None:
            raise ValueError("CenterCropMixDecoder needs output_size=(height, width)")
        super().__init__(output_size, stride, 0.0, resize)
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
        self.ratio = float(ratio)

    def sample_crops(self, src_h, src_w, reg_h, reg_w, rng) -> np.ndarray:
        return geometry.center_crops(src_h, src_w, reg_h, reg_w, rng, self.ratio)


# --------------------------------------------------------------------------------------- labels
def label_width(max_constituents: int) -> int:
    """Length of one :class:`MixLabelDecoder` row."""
    return 4 * max_constituents + 1


def unpack_labels(rows, k: Optional[int] = None):
    """Split float64 label rows [B, 4K+1] into (targets, weights, ids, layout, loss_scale).

    Row layout: targets[K] | weights[K] | ids[K] | loss_scale[K] | layout. float64 holds every id
    and class below 2**53 and every float32 weight exactly. ``k`` trims to the plan's K.
    Works on numpy arrays and torch tensors alike.
    """
    width = rows.shape[-1]
    full_k = (width - 1) // 4
    if 4 * full_k + 1 != width:
        raise ValueError(f"label rows must have 4K+1 columns, got {width}")
    k = full_k if k is None else int(k)
    part = [rows[:, i * full_k:i * full_k + k] for i in range(4)]
    return part[0], part[1], part[2], rows[:, 4 * full_k], part[3]


class MixLabelDecoder(_PlanAware, IntDecoder):
    """Labels of every constituent of a slot, with the plan's weights, ids, scales and layout."""

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, AllocationQuery]:
        shape = (label_width(self.tables.max_constituents),)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<f8")),
                AllocationQuery(shape, np.dtype("<f8")))

    def generate_code(self) -> Callable:
        enabled = bool(Compiler.is_enabled)
        tables = self.tables
        k = tables.max_constituents
        ids_view = table_view(tables.ids, enabled)
        weights_view = table_view(tables.weights, enabled)
        scale_view = table_view(tables.loss_scale, enabled)
        layout_view = table_view(tables.layout, enabled)
        my_range = Compiler.get_iterator()

        def decode(batch_indices, destination, metadata, storage_state):
            ids = ids_view()
            weights = weights_view()
            scales = scale_view()
            layout = layout_view()
            for i in my_range(len(batch_indices)):
                row = batch_indices[i]
                out = destination[i]
                for c in range(k):
                    sample = ids[row, c]
                    out[c] = metadata[sample] if sample >= 0 else -1
                    out[k + c] = weights[row, c]
                    out[2 * k + c] = sample
                    out[3 * k + c] = scales[row, c]
                out[4 * k] = layout[row]
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
