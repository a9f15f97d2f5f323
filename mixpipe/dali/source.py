"""The plan-driven source: whole batches for ``fn.external_source(batch=True)``.

One call = one batch of slots of the epoch's walk. The callback makes all the *decisions* in
Python (which files, each constituent's region from :func:`mixpipe.core.layouts.regions`, its crop
window and flip from :meth:`mixpipe.core.augment.RandomResizedCropFlip.window`) and ships them as
ready-typed arrays, one output per field and per constituent stream, so the DALI graph
(:mod:`mixpipe.dali.ops`) only executes them: no unpacking, casting or byte slicing per sample in
the graph. The geometry is the core's, bit for bit, and nothing is re-derived in DALI.

Why whole batches: a per-sample callback paid DALI's per-call and per-output conversion for every
sample, and the graph then needed a dozen small subscript and cast operators per sample to unpack
one packed row; at 32 px that doubled the host CPU of the plain DALI pipeline
(``benchmarks/README.md``, "Where the host time goes").

The callback is picklable and keeps no state a worker needs to share: it reads the walk of
``BatchInfo.epoch_idx`` from a :class:`~mixpipe.dali.plans.PlanBoard` and caches it.
"""
from __future__ import annotations

import dataclasses
import io
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.augment import RandomResizedCropFlip
from ..core.compose import slot_regions
from ..core.plan import Layout, MixPlan
from ..core.seeding import SlotGenerators
from .files import EncodedImages, describe, open_files
from .plans import PlanBoard

__all__ = ["SlotSource", "SlotBatches", "RandomView", "FixedView", "SLOT_FIELDS",
           "CONSTITUENT_FIELDS", "output_names", "image_size"]

#: Per-slot outputs, in output order: int64[K] targets, float32[K] weights, int64[K] ids,
#: float32[K] loss_scale (rows beyond the slot's count: -1, 0, -1, 0), uint8 layout, int32 count.
SLOT_FIELDS = ("targets", "weights", "ids", "loss_scale", "layout", "count")
#: Per-constituent outputs, repeated for each of the K streams after the slot fields: the
#: ``file`` (uint8: its path, utf-8, when the images are files on disk, read in the graph by
#: DALI's C++ file reader; otherwise the encoded bytes; empty when the slot has no such
#: constituent), the crop window's
#: int32[2] anchor (top, left) and int32[2] shape (height, width) on the stored pixel grid, the
#: float32[2] region (height, width) it is resized to, and the int32 mirror flag.
CONSTITUENT_FIELDS = ("file", "anchor", "shape", "region", "flip")
_EMPTY = np.zeros(0, np.uint8)

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


_HEADER_BYTES = 16384


def file_image_size(path: str) -> Tuple[int, int]:
    """(height, width) of an image file from its first bytes (the whole file only when the
    header is longer, e.g. large EXIF or ICC segments before a JPEG's frame header)."""
    with open(path, "rb") as handle:
        head = handle.read(_HEADER_BYTES)
        try:
            return image_size(np.frombuffer(head, np.uint8))
        except Exception:  # noqa: BLE001 - a header cut short fails in many ways: read it all
            if len(head) < _HEADER_BYTES:
                raise
            return image_size(np.frombuffer(head + handle.read(), np.uint8))


class _WalkRows:
    """A walk's per-slot values laid out once per epoch, so a batch only indexes them.

    (``MixPlan.slot()`` would recount the whole plan per call, O(M) per sample.) The typed
    [M, K] arrays are what the slot outputs slice; the Python lists feed the per-constituent
    loop without a numpy scalar per access.
    """

    def __init__(self, walk: MixPlan, k: int, images: EncodedImages) -> None:
        self.walk = walk
        m, kp = walk.ids.shape
        width = max(k, kp)
        ids = np.full((m, width), -1, np.int64)
        ids[:, :kp] = walk.ids
        weights = np.zeros((m, width), np.float32)
        weights[:, :kp] = walk.weights
        scale = np.zeros((m, width), np.float32)
        scale[:, :kp] = walk.loss_scale
        counts = (ids >= 0).sum(axis=1)
        labels = getattr(images, "labels", None)
        if labels is not None:
            labels = np.asarray(labels, np.int64)
            targets = np.where(ids >= 0, labels[np.maximum(ids, 0)], -1)
        else:
            targets = np.vectorize(lambda i: images.label(int(i)) if i >= 0 else -1,
                                   otypes=[np.int64])(ids)
        # only the first k columns travel (check_plan refused plans with more constituents)
        self.arrays = {"targets": targets[:, :k], "weights": weights[:, :k], "ids": ids[:, :k],
                       "loss_scale": scale[:, :k], "layout": walk.layout.astype(np.uint8),
                       "count": counts.astype(np.int32)}
        self.id_lists = [row[:n] for row, n in zip(ids.tolist(), counts.tolist())]
        self.weight_tuples = [tuple(row[:n]) for row, n in zip(weights.tolist(),
                                                               counts.tolist())]
        self.layouts = walk.layout.tolist()


def _has_paths(images: EncodedImages) -> bool:
    """Whether ``images`` are files with paths (a subset view may forward ``path`` to a base
    that has none, so ask for one)."""
    path = getattr(images, "path", None)
    if not callable(path) or len(images) == 0:
        return False
    try:
        return isinstance(path(0), str)
    except (AttributeError, NotImplementedError, IndexError, TypeError):
        return False


def output_names(max_constituents: int) -> List[str]:
    """Names of the source's outputs in order: :data:`SLOT_FIELDS`, then
    :data:`CONSTITUENT_FIELDS` for each stream as ``"<field><index>"``."""
    return list(SLOT_FIELDS) + [f"{field}{i}" for i in range(max_constituents)
                                for field in CONSTITUENT_FIELDS]


Batch = Tuple[Union[np.ndarray, List[np.ndarray]], ...]


class SlotSource:
    """The epoch walk's slots as whole batches of typed arrays (see :data:`SLOT_FIELDS` and
    :data:`CONSTITUENT_FIELDS`); :func:`mixpipe.dali.ops.plan_inputs` feeds them to
    ``fn.external_source`` through :class:`SlotBatches`.

    Args:
        images: encoded images and labels by dataset index.
        board: where the trainer publishes each epoch's walk.
        size: (height, width) of the composite the pipeline outputs.
        stride: the network's total stride; spatial splits are snapped to it.
        max_constituents: K, the number of constituent streams the pipeline is built with.
        view: crop window and flip per constituent (:class:`RandomView` or :class:`FixedView`).
        seed: seeds each slot's views together with the plan's epoch and the slot's ids
            (:func:`mixpipe.core.seeding.slot_rng`, as in the torch loader).
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
        #: True when the images are files: the ``file<i>`` outputs are paths and DALI's C++
        #: reader (``fn.io.file.read``) loads the bytes, so Python reads only each image's
        #: header, once per process
        self.reads_paths = _has_paths(images)
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._walk_cache: dict = {}
        self._rows_cache: Optional[_WalkRows] = None
        self._sizes: Dict[int, Tuple[int, int]] = {}  # image headers are read once per process
        self._shapes_cache: dict = {}
        self._paths: Dict[int, bytes] = {}

    @classmethod
    def from_files(cls, board: PlanBoard, size: Tuple[int, int], *,
                   file_root: Optional[str] = None, file_list: Optional[str] = None,
                   **kwargs) -> "SlotSource":
        """The source over the user's own files, named as ``fn.readers.file`` names them:
        ``file_root`` (class folders, or the base of ``file_list``'s paths) and/or
        ``file_list`` (``relative/path label`` lines). No ``mixpipe data prepare`` step.
        Other keywords as for the constructor (``stride``, ``view``, ``seed``, ...)."""
        return cls(open_files(file_root, file_list), board, size, **kwargs)

    # Worker copies start with empty caches (a cached walk belongs to one process), except the
    # image sizes, which hold for every process and were costly to read.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_walk_cache", "_rows_cache", "_shapes_cache", "_paths"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        sizes = state.pop("_sizes", {})
        self.__dict__.update(state)
        self._reset_caches()
        self._sizes = sizes

    def read_sizes(self) -> None:
        """Read every image's header now rather than during the first epoch.

        The crop windows need each image's size; without this, each process reads a header the
        first time it meets the image, which costs the first epoch about a header read per
        image (tens of microseconds on a local disk). Call it before the pipeline is built and
        its worker processes receive the sizes with the source.
        """
        for sample in range(len(self.images)):
            if sample not in self._sizes:
                self._file(sample)

    @property
    def num_outputs(self) -> int:
        return len(SLOT_FIELDS) + len(CONSTITUENT_FIELDS) * self.max_constituents

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

    def walk(self, round_index: int) -> MixPlan:
        """The walk published for DALI's epoch ``round_index`` (read once, then cached)."""
        walk = self._walk_cache.get(round_index)
        if walk is None:
            walk = self.board.read(round_index)
            self.check_plan(walk)
            self._walk_cache = {round_index: walk}  # rounds only move forward
        return walk

    def _rows(self, walk: MixPlan) -> _WalkRows:
        if self._rows_cache is None or self._rows_cache.walk is not walk:
            self._rows_cache = _WalkRows(walk, self.max_constituents, self.images)
        return self._rows_cache

    def _region_shapes(self, layout: int, weights: tuple) -> Sequence[Tuple[int, int]]:
        key = (layout, weights)
        shapes = self._shapes_cache.get(key)
        if shapes is None:
            if layout in (Layout.SINGLE, Layout.BLEND):
                shapes = [self.size] * len(weights)
            else:
                shapes = [(r.height, r.width) for r in slot_regions(
                    Layout(layout), weights, self.size[0], self.size[1], self.stride)]
            self._shapes_cache[key] = shapes
        return shapes

    def _file(self, sample: int) -> Tuple[Union[bytes, np.ndarray], Tuple[int, int]]:
        """What the ``file`` output carries for ``sample`` (its utf-8 path as bytes, or its
        encoded bytes as uint8) and the image's (height, width)."""
        size = self._sizes.get(sample)
        try:
            if self.reads_paths:
                data = self._paths.get(sample)
                if data is None or size is None:
                    path = self.images.path(sample)
                    data = self._paths[sample] = path.encode("utf-8")
                    size = size if size is not None else file_image_size(path)
            else:
                data = self.images.encoded(sample)
                if size is None:
                    size = image_size(data)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
            raise ValueError(f"{describe(self.images, sample)}: cannot be read "
                             f"({type(err).__name__}); check the path and its permissions"
                             ) from None
        except Exception as err:  # noqa: BLE001 - pillow raises many kinds; name the file
            raise ValueError(f"{describe(self.images, sample)}: not a readable image "
                             f"({type(err).__name__}: {err}); remove or replace it (`mixpipe"
                             " data prepare tree --on-bad skip` lists and skips such files)"
                             ) from None
        self._sizes[sample] = size
        return data, size

    def batch(self, walk: MixPlan, start: int, stop: int) -> Batch:
        """The outputs for slots ``start:stop`` of ``walk``, in :func:`output_names` order.

        Slot fields are [B, ...] arrays. ``file<i>`` holds paths or bytes (see
        :attr:`reads_paths`), nothing where the slot has fewer than i + 1 constituents (such
        streams are never read or decoded): paths as one [B, L] array, each NUL-padded (the C++
        reader stops at the first NUL), bytes as a list of B arrays; a stream no slot of the batch
        uses is one [B, 0] array. Dense arrays because DALI converts a list element by element in
        Python (~1.5 us each).
        """
        if not 0 <= start < stop <= walk.num_slots:
            raise IndexError(f"slots {start}:{stop} outside the walk's {walk.num_slots}")
        rows = self._rows(walk)
        k, b = self.max_constituents, stop - start
        files: List[list] = [[_EMPTY] * b for _ in range(k)]
        placed, windows = [], []  # (stream, position) and (top, left, h, w, rh, rw, flip)
        generators = SlotGenerators([[self.seed, walk.epoch, *rows.id_lists[start + j]]
                                     for j in range(b)])
        for j in range(b):
            row = start + j
            ids = rows.id_lists[row]
            shapes = self._region_shapes(rows.layouts[row], rows.weight_tuples[row])
            rng = generators.at(j)  # slot_rng's generator; used up before the next slot
            for i, sample in enumerate(ids):
                data, (img_h, img_w) = self._file(sample)
                top, left, ch, cw, flip = self.view(img_h, img_w, shapes[i], rng)
                files[i][j] = data
                placed.append((i, j))
                windows.append((top, left, ch, cw, shapes[i][0], shapes[i][1], int(flip)))
        geometry = np.zeros((k, b, 7), np.int32)
        where = np.array(placed, np.int64).reshape(-1, 2)
        geometry[where[:, 0], where[:, 1]] = np.array(windows, np.int32).reshape(-1, 7)
        slot = [rows.arrays[name][start:stop] for name in SLOT_FIELDS]
        streams = []
        present = np.bincount(where[:, 0], minlength=k) if len(placed) else np.zeros(k, int)
        for i in range(k):
            g = geometry[i]
            streams += [self._stream(files[i], present[i], b), np.ascontiguousarray(g[:, 0:2]),
                        np.ascontiguousarray(g[:, 2:4]), g[:, 4:6].astype(np.float32),
                        np.ascontiguousarray(g[:, 6])]
        return tuple(slot + streams)

    def _stream(self, files: list, present: int, b: int) -> Union[np.ndarray, List[np.ndarray]]:
        if not present:
            return np.zeros((b, 0), np.uint8)
        if not self.reads_paths:
            return files
        width = max(len(path) for path in files if isinstance(path, bytes)) + 1
        padded = b"".join(path.ljust(width, b"\0") if isinstance(path, bytes) else
                          bytes(width) for path in files)
        return np.frombuffer(padded, np.uint8).reshape(b, width)

    def slot(self, walk: MixPlan, row: int) -> Dict[str, object]:
        """One slot's outputs by name (:func:`output_names`), without the batch axis: handy to
        inspect what the pipeline will be fed."""
        values = self.batch(walk, row, row + 1)
        return {name: value[0] for name, value in zip(output_names(self.max_constituents),
                                                      values)}


class SlotBatches:
    """The ``fn.external_source`` callback (``batch=True, batch_info=True``): batch
    ``iteration`` of DALI's epoch ``epoch_idx`` is slots ``iteration * batch_size`` onwards of
    that epoch's walk. After the walk's last slot it raises ``StopIteration``.

    Picklable, so ``parallel=True`` runs it in the pipeline's worker processes, one batch each.
    """

    def __init__(self, source: SlotSource, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size = int(batch_size)

    def __call__(self, batch_info) -> Batch:
        walk = self.source.walk(int(batch_info.epoch_idx))
        start = int(batch_info.iteration) * self.batch_size
        if start >= walk.num_slots:
            raise StopIteration
        return self.source.batch(walk, start, min(start + self.batch_size, walk.num_slots))
