"""The plan-driven source: a per-sample callback for ``fn.external_source``.

One call = one slot of the epoch's walk. The callback does all the *decisions* in Python (which
files, each constituent's region from :func:`mixpipe.core.layouts.regions`, its crop window and
flip from :meth:`mixpipe.core.augment.RandomResizedCropFlip.window`), and ships them as small
per-sample tensors; the DALI graph (:mod:`mixpipe.dali.ops`) only executes them. So the geometry
is the core's, bit for bit, and nothing is re-derived in DALI.

The callback is picklable and keeps no state a worker needs to share: it reads the walk of
``SampleInfo.epoch_idx`` from a :class:`~mixpipe.dali.plans.PlanBoard` and caches it.
"""
from __future__ import annotations

import dataclasses
import io
import struct
from typing import Callable, Optional, Tuple

import numpy as np

from ..core.augment import RandomResizedCropFlip
from ..core.layouts import regions
from ..core.plan import Layout, MixPlan
from .files import EncodedImages, describe, open_files
from .plans import PlanBoard

__all__ = ["SlotSource", "RandomView", "FixedView", "GEOMETRY_FIELDS", "META_FIELDS", "META",
           "image_size", "unpack_meta"]

#: Columns of the per-constituent view geometry (the first columns of ``meta``).
GEOMETRY_FIELDS = ("crop_top", "crop_left", "crop_height", "crop_width", "region_height",
                   "region_width", "flip")

#: Columns of the per-slot ``meta`` output, float64[K, len(META_FIELDS)]: one row per
#: constituent stream. float64 holds every field exactly (ids below 2**53, float32 weights).
#: ``layout`` and ``count`` are per slot and repeated on every row.
META_FIELDS = GEOMETRY_FIELDS + ("target", "id", "weight", "loss_scale", "byte_offset",
                                 "byte_length", "layout", "count")
META = {name: i for i, name in enumerate(META_FIELDS)}

#: ``view(height, width, (region_h, region_w), rng) -> (top, left, crop_h, crop_w, flip)``
ViewFn = Callable[[int, int, Tuple[int, int], np.random.Generator],
                  Tuple[int, int, int, int, bool]]


@dataclasses.dataclass(frozen=True)
class RandomView:
    """Random resized crop straight to the region's aspect, and a coin-flip mirror.

    Draws exactly what the torch adapter's :class:`~mixpipe.core.augment.RandomResizedCropFlip`
    draws, in the same order, so the same plan and seed give the same crop windows in both.
    """

    settings: RandomResizedCropFlip = RandomResizedCropFlip()

    def __call__(self, height: int, width: int, region: Tuple[int, int],
                 rng: np.random.Generator) -> Tuple[int, int, int, int, bool]:
        return self.settings.window(height, width, region, rng)


@dataclasses.dataclass(frozen=True)
class FixedView:
    """The whole image, mirrored when ``flip``: the deterministic view (tests, validation)."""

    flip: bool = False

    def __call__(self, height: int, width: int, region: Tuple[int, int],
                 rng: np.random.Generator) -> Tuple[int, int, int, int, bool]:
        return 0, 0, height, width, self.flip


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_size(encoded: np.ndarray) -> Tuple[int, int]:
    """(height, width) of an encoded image from its header, without decoding it.

    JPEG is parsed directly (the common case, a few microseconds); other formats go through
    pillow, which also reads only the header.
    """
    data = encoded.tobytes() if isinstance(encoded, np.ndarray) else bytes(encoded)
    if data[:2] == b"\xff\xd8":
        pos = 2
        n = len(data)
        while pos + 4 <= n:
            if data[pos] != 0xFF:
                pos += 1
                continue
            marker = data[pos + 1]
            if marker == 0xFF:
                pos += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            (length,) = struct.unpack_from(">H", data, pos + 2)
            if marker in _SOF_MARKERS and pos + 9 <= n:
                height, width = struct.unpack_from(">HH", data, pos + 5)
                return int(height), int(width)
            pos += 2 + length
        raise ValueError("JPEG without a frame header (SOF): truncated or corrupt file")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    return int(height), int(width)


class _WalkRows:
    """A walk's per-slot arrays padded to K once, so a sample only indexes rows.

    (``MixPlan.slot()`` would recount the whole plan per call, O(M) per sample.)
    """

    def __init__(self, walk: MixPlan, k: int, images: EncodedImages) -> None:
        self.walk = walk
        m, kp = walk.ids.shape
        width = max(k, kp)
        self.ids = np.full((m, width), -1, np.int64)
        self.ids[:, :kp] = walk.ids
        self.weights = np.zeros((m, width), np.float32)
        self.weights[:, :kp] = walk.weights
        self.scale = np.zeros((m, width), np.float32)
        self.scale[:, :kp] = walk.loss_scale
        self.counts = (self.ids >= 0).sum(axis=1)
        labels = getattr(images, "labels", None)
        if labels is not None:
            labels = np.asarray(labels, np.int64)
            self.targets = np.where(self.ids >= 0, labels[np.maximum(self.ids, 0)], -1)
        else:
            self.targets = np.vectorize(lambda i: images.label(int(i)) if i >= 0 else -1,
                                        otypes=[np.int64])(self.ids)
        # only the first k columns travel (check_plan refused plans with more constituents)
        self.ids, self.weights = self.ids[:, :k], self.weights[:, :k]
        self.scale, self.targets = self.scale[:, :k], self.targets[:, :k]


def unpack_meta(meta: np.ndarray) -> dict:
    """The ``meta`` output as named arrays with their MixedBatch dtypes (tests, debugging)."""
    meta = np.asarray(meta)
    col = lambda name: meta[..., META[name]]  # noqa: E731
    return {"geometry": meta[..., :len(GEOMETRY_FIELDS)].astype(np.int32),
            "targets": col("target").astype(np.int64), "ids": col("id").astype(np.int64),
            "weights": col("weight").astype(np.float32),
            "loss_scale": col("loss_scale").astype(np.float32),
            "byte_offset": col("byte_offset").astype(np.int64),
            "byte_length": col("byte_length").astype(np.int64),
            "layout": col("layout")[..., 0].astype(np.uint8),
            "count": col("count")[..., 0].astype(np.int32)}


class SlotSource:
    """``fn.external_source`` callback (``batch=False``, ``parallel=True`` capable).

    Per slot it returns two arrays: ``blob``, the slot's constituents' encoded files back to
    back (uint8), and ``meta`` float64[K, len(META_FIELDS)], one row per constituent stream
    (see :data:`META_FIELDS`; rows beyond the slot's count have id -1, weight 0 and length 0).
    :func:`mixpipe.dali.ops.plan_inputs` unpacks them in the graph. Two outputs, not one per
    field: each external-source output costs about 20 us of CPU per sample (measured here:
    11 outputs 242 us, 1 output 22 us), more than the Python that fills it.
    After the walk's last slot it raises ``StopIteration``.

    Args:
        images: encoded images and labels by dataset index.
        board: where the trainer publishes each epoch's walk.
        size: (height, width) of the composite the pipeline outputs.
        stride: the network's total stride; spatial splits are snapped to it.
        max_constituents: K, the number of constituent streams the pipeline is built with.
        view: crop window and flip per constituent (:class:`RandomView` or :class:`FixedView`).
        seed: seeds each slot's views together with the plan's epoch and the slot's ids.
    """

    def __init__(self, images: EncodedImages, board: PlanBoard, size: Tuple[int, int],
                 stride: int = 1, max_constituents: int = 4,
                 view: Optional[ViewFn] = None, seed: int = 0) -> None:
        height, width = (int(size[0]), int(size[1]))
        if height < 1 or width < 1:
            raise ValueError(f"size must be positive (height, width), got {size}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if not 1 <= max_constituents <= 64:
            raise ValueError(f"max_constituents must be in [1, 64], got {max_constituents}")
        self.images = images
        self.board = board
        self.size = (height, width)
        self.stride = int(stride)
        self.max_constituents = int(max_constituents)
        self.view = view if view is not None else RandomView()
        self.seed = int(seed)
        self._cache: dict = {}

    @classmethod
    def from_files(cls, board: PlanBoard, size: Tuple[int, int], *,
                   file_root: Optional[str] = None, file_list: Optional[str] = None,
                   **kwargs) -> "SlotSource":
        """The source over the user's own files, named as ``fn.readers.file`` names them:
        ``file_root`` (class folders, or the base of ``file_list``'s paths) and/or
        ``file_list`` (``relative/path label`` lines). No ``mixpipe data prepare`` step.
        Other keywords as for the constructor (``stride``, ``view``, ``seed``, ...)."""
        return cls(open_files(file_root, file_list), board, size, **kwargs)

    # Worker copies start with an empty cache: the cached walk belongs to one process.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    num_outputs = 2  #: blob, meta

    def check_plan(self, plan: MixPlan) -> None:
        """Refuse a plan this source cannot deliver, naming the fix."""
        if plan.num_samples != len(self.images):
            raise ValueError(f"plan covers {plan.num_samples} samples but the source has "
                             f"{len(self.images)} images: plan and dataset do not belong together")
        if plan.max_constituents > self.max_constituents and (
                plan.counts.max(initial=0) > self.max_constituents):
            raise ValueError(f"plan has slots of {int(plan.counts.max())} constituents but the "
                             f"pipeline was built with max_constituents={self.max_constituents}; "
                             "build the SlotSource with a larger max_constituents")
        h, w = self.size
        spatial = np.isin(plan.layout, [Layout.HALVES, Layout.QUADS])
        if spatial.any():
            needs = {Layout.HALVES: (1, 2), Layout.QUADS: (2, 2)}
            for code, (rows, cols) in needs.items():
                if (plan.layout == code).any() and (h < rows * self.stride or
                                                    w < cols * self.stride):
                    raise ValueError(f"{Layout(code).name} slots need the composite to span at "
                                     f"least two stride cells per split side; size {self.size} "
                                     f"at stride {self.stride} is too small")

    def _walk(self, round_index: int) -> MixPlan:
        walk = self._cache.get(round_index)
        if walk is None:
            walk = self.board.read(round_index)
            self.check_plan(walk)
            self._cache = {round_index: walk}  # rounds only move forward
        return walk

    def _rows(self, walk: MixPlan) -> "_WalkRows":
        rows = self.__dict__.get("_rows_cache")
        if rows is None or rows.walk is not walk:
            rows = _WalkRows(walk, self.max_constituents, self.images)
            self.__dict__["_rows_cache"] = rows
        return rows

    def slot_arrays(self, walk: MixPlan, row: int) -> tuple:
        """The callback's outputs for one row of a walk (also handy to inspect a slot)."""
        k = self.max_constituents
        rows = self._rows(walk)
        n = int(rows.counts[row])
        ids = rows.ids[row, :n].tolist()
        layout = Layout(int(walk.layout[row]))
        height, width = self.size
        if layout in (Layout.SINGLE, Layout.BLEND):
            shapes = [(height, width)] * n
        else:
            shapes = [(r.height, r.width) for r in regions(
                layout, rows.weights[row, :n].tolist(), height, width, self.stride)]
        meta = np.zeros((k, len(META_FIELDS)), np.float64)
        meta[:, META["region_height"]] = height
        meta[:, META["region_width"]] = width
        meta[:, META["target"]] = rows.targets[row]
        meta[:, META["id"]] = rows.ids[row]
        meta[:, META["weight"]] = rows.weights[row]
        meta[:, META["loss_scale"]] = rows.scale[row]
        meta[:, META["layout"]] = int(layout)
        meta[:, META["count"]] = n
        encoded = []
        offset = 0
        rng = np.random.default_rng([self.seed, walk.epoch, *ids])
        for i, (sample, shape) in enumerate(zip(ids, shapes)):
            data = self.images.encoded(sample)
            try:
                img_h, img_w = image_size(data)
            except Exception as err:  # noqa: BLE001 - pillow raises many kinds; name the file
                raise ValueError(f"{describe(self.images, sample)}: not a readable image "
                                 f"({type(err).__name__}: {err}); remove or replace it (`mixpipe"
                                 " data prepare tree --on-bad skip` lists and skips such files)"
                                 ) from None
            top, left, ch, cw, flip = self.view(img_h, img_w, shape, rng)
            meta[i, :len(GEOMETRY_FIELDS)] = (top, left, ch, cw, shape[0], shape[1], int(flip))
            meta[i, META["byte_offset"]] = offset
            meta[i, META["byte_length"]] = data.size
            offset += data.size
            encoded.append(data)
        blob = encoded[0] if n == 1 else np.concatenate(encoded)
        return blob, meta

    def __call__(self, sample_info) -> tuple:
        walk = self._walk(int(sample_info.epoch_idx))
        row = int(sample_info.idx_in_epoch)
        if row >= walk.num_slots:
            raise StopIteration
        return self.slot_arrays(walk, row)
