"""Reference composition: decoded constituents in, one composite out.

This is the golden implementation. The torch loader uses it directly; the DALI and FFCV adapters
build composites with their own operators and are tested against it. Two entry points:

* :func:`compose_slot` (numpy, one slot, HWC) for loader workers;
* :func:`compose_batch` (torch, a batch of slots, NCHW, any device) for composing after collate,
  on the GPU when the batch is there.

Spatial layouts resize each constituent to its region with antialiased bilinear filtering (the
triangle filter widened by the downscale factor, as PIL and ``torch.nn.functional.interpolate(
antialias=True)`` do) and paste it; a constituent already decoded at its region's size is copied
untouched. BLEND interpolates in float32. Integer inputs come back rounded to the input dtype.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np

from .filter import resize_weights
from .layouts import regions
from .plan import Layout, constituent_range

__all__ = ["resize_weights", "resize", "compose_slot", "compose_batch", "resize_torch",
           "infer_counts", "region_masks_batch", "resize_batch", "slot_regions", "compose_slots"]


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an HWC (or HW) image with antialiased bilinear filtering; float32 result."""
    src = image.astype(np.float32, copy=False)
    if src.shape[0] == height and src.shape[1] == width:
        return src.copy()
    rows = resize_weights(src.shape[0], height)
    cols = resize_weights(src.shape[1], width)
    tmp = np.tensordot(rows, src, axes=([1], [0]))  # [H, w, C]
    return np.moveaxis(np.tensordot(cols, tmp, axes=([1], [1])), 0, 1)  # [H, W, C]


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.floor(values + 0.5), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def _check_slot(constituents: Sequence, weights: Sequence[float], layout: Layout) -> None:
    lo, hi = constituent_range(layout)
    if not lo <= len(constituents) <= hi:
        raise ValueError(f"layout {Layout(layout).name} takes {lo if lo == hi else f'{lo}+'} "
                         f"constituents, got {len(constituents)}")
    if len(weights) != len(constituents):
        raise ValueError(f"{len(constituents)} constituents but {len(weights)} weights")


def compose_slot(constituents: Sequence[np.ndarray], weights: Sequence[float], layout: Layout,
                 size: Optional[tuple[int, int]] = None, stride: int = 1) -> np.ndarray:
    """Build one composite (HWC or HW) of ``size`` (default: the first constituent's size).

    The result has the first constituent's dtype; all constituents must share channels.
    """
    layout = Layout(layout)
    _check_slot(constituents, weights, layout)
    first = np.asarray(constituents[0])
    height, width = size if size is not None else first.shape[:2]
    dtype = first.dtype
    channels = first.shape[2:]
    for i, img in enumerate(constituents):
        if np.asarray(img).shape[2:] != channels:
            raise ValueError(f"constituent {i} has shape {np.asarray(img).shape}; constituent 0 "
                             f"has {first.shape}: channels must match")
    if layout == Layout.BLEND:
        acc = np.zeros((height, width) + channels, dtype=np.float32)
        for img, w in zip(constituents, weights):
            acc += np.float32(w) * resize(np.asarray(img), height, width)
        return _to_dtype(acc, dtype)
    out = np.empty((height, width) + channels, dtype=dtype)
    for img, reg in zip(constituents, regions(layout, weights, height, width, stride)):
        img = np.asarray(img)
        if img.shape[:2] == (reg.height, reg.width):
            out[reg.slices] = img
        else:
            out[reg.slices] = _to_dtype(resize(img, reg.height, reg.width), dtype)
    return out


# ------------------------------------------------------------------------------- numpy, batched
def resize_batch(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize N same-sized images (NHWC or NHW) at once; float32 result.

    Every image comes out bit for bit equal to :func:`resize` of it alone: the per-image matrix
    products keep the shapes and operand layouts ``resize`` hands to BLAS (one ``np.matmul`` loops
    over the images in C), so the sums run in the same order. What is saved is the per-call Python
    and numpy overhead, which dominates at the 8-32 px sizes of small-image composites.
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise ValueError(f"resize_batch takes [N, h, w] or [N, h, w, C] images, got shape "
                         f"{images.shape}")
    n, h, w = images.shape[:3]
    channels = images.shape[3:]
    src = images.astype(np.float32, copy=False)
    if (h, w) == (height, width):
        return src.copy()
    c = channels[0] if channels else 1
    rows = resize_weights(h, height)
    cols = resize_weights(w, width)
    tmp = np.matmul(rows, src.reshape(n, h, w * c))  # [N, H, w*C]
    if c == 1:
        # resize hands BLAS the transposed view here (no copy), so do the same
        out = np.matmul(cols, tmp.transpose(0, 2, 1))  # [N, W, H]
    else:
        # transpose whole pixels (C floats as one opaque item): numpy's copy loop over the short
        # channel axis is about twice as slow as copying 4*C-byte items
        pixel = np.dtype((np.void, 4 * c))
        tmp = tmp.reshape(n, height, w, c).view(pixel)[..., 0].transpose(0, 2, 1)
        tmp = np.ascontiguousarray(tmp).view(np.float32)  # [N, w, H*C]
        out = np.matmul(cols, tmp)  # [N, W, H*C]
    out = out.reshape(n, width, height, c).transpose(0, 2, 1, 3)
    return out.reshape((n, height, width) + channels)


@functools.lru_cache(maxsize=4096)
def slot_regions(layout: Layout, weights: tuple, height: int, width: int,
                 stride: int = 1) -> tuple:
    """:func:`~mixpipe.core.layouts.regions` memoised on the slot's (hashable) geometry.

    Plans reuse a handful of snapped weight tuples, so a loader building thousands of composites
    per epoch computes each distinct geometry once.
    """
    return tuple(regions(Layout(layout), weights, height, width, stride))


def _round_inplace(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """:func:`_to_dtype` without its temporaries (``values`` is scratch and gets overwritten)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values += np.float32(0.5)
        np.floor(values, out=values)
        np.clip(values, info.min, info.max, out=values)
    return values.astype(dtype, copy=False)


class _Constituents:
    """A batch's constituents in one list; whole groups come out stacked in one numpy call.

    When all share one shape they are stacked once. Mirrored views (a negative column stride,
    what a flip transform returns) are stacked unmirrored and mirrored afterwards, one channel
    plane at a time: numpy copies a mirrored HWC view pixel by pixel (an inner loop of C items),
    several times slower than a plain one, and that copy was the largest cost of a
    flip-augmented batch.
    """

    def __init__(self) -> None:
        self.images: list = []
        self.mirrored: list = []
        self._stacked: Optional[np.ndarray] = None

    def add(self, image: np.ndarray) -> int:
        if image.ndim >= 2 and image.strides[1] < 0 and image.shape[1] > 1:
            self.mirrored.append(len(self.images))
            image = image[:, ::-1]
        self.images.append(image)
        return len(self.images) - 1

    def _stack_all(self) -> np.ndarray:
        stacked = np.stack(self.images)
        if self.mirrored:
            rows = np.asarray(self.mirrored)
            plain = stacked[rows]
            if plain.ndim == 3:
                stacked[rows] = plain[:, :, ::-1]
            else:
                mirrored = np.empty_like(plain)
                for c in range(plain.shape[3]):
                    mirrored[..., c] = plain[:, :, ::-1, c]
                stacked[rows] = mirrored
        return stacked

    def take(self, index: list) -> np.ndarray:
        if self._stacked is None and len({img.shape for img in self.images}) == 1:
            self._stacked = self._stack_all()  # one copy serves every group
        if self._stacked is not None:
            return self._stacked[np.asarray(index)]
        mirrored = set(self.mirrored)
        return np.stack([self.images[i][:, ::-1] if i in mirrored else self.images[i]
                         for i in index])


def compose_slots(slots: Sequence[Sequence[np.ndarray]], weights: Sequence[Sequence[float]],
                  layouts: Sequence[Layout], size: tuple[int, int],
                  stride: int = 1) -> np.ndarray:
    """Compose many slots into one [B, H, W(, C)] array, equal to stacking :func:`compose_slot`.

    Constituents that need the same resize (source size to region size) are resized together
    (:func:`resize_batch`) and pasted one by one; constituents already at their region's size
    are pasted with one indexed assignment per region; BLEND slots accumulate their constituents
    position by position in the reference order. Every constituent of the batch must share one
    dtype and channel count (the composites are stacked).
    """
    b = len(slots)
    if b == 0:
        raise ValueError("compose_slots got no slots")
    if len(weights) != b or len(layouts) != b:
        raise ValueError(f"{b} slots but {len(weights)} weight rows and {len(layouts)} layouts")
    height, width = int(size[0]), int(size[1])
    if not len(slots[0]):
        raise ValueError("slot 0 has no constituents")
    first = np.asarray(slots[0][0])
    dtype, channels = first.dtype, first.shape[2:]
    store = _Constituents()
    direct: dict = {}  # region -> ([rows], [constituents]) already at the region's size
    scaled: dict = {}  # (h, w, region h, region w) -> ([(row, region)], [constituents])
    blend: dict = {}  # (position, h, w) -> ([blend rows], [constituents], [weights])
    blend_rows: list = []
    checked: set = set()
    for row, (images, slot_w, code) in enumerate(zip(slots, weights, layouts)):
        shape_key = (code, len(images), len(slot_w))
        if shape_key not in checked:
            _check_slot(images, slot_w, Layout(int(code)))
            checked.add(shape_key)
        images = [img if type(img) is np.ndarray else np.asarray(img) for img in images]
        for i, img in enumerate(images):
            if img.dtype != dtype or img.shape[2:] != channels:
                raise ValueError(f"slot {row} constituent {i} is {img.dtype} {img.shape}; slot 0 "
                                 f"constituent 0 is {dtype} {first.shape}: a batch needs one "
                                 "dtype and channel count")
        if code == Layout.BLEND:
            for k, (img, wk) in enumerate(zip(images, slot_w)):
                group = blend.setdefault((k,) + img.shape[:2], ([], [], []))
                group[0].append(len(blend_rows))
                group[1].append(store.add(img))
                group[2].append(wk)
            blend_rows.append(row)
            continue
        geometry = slot_regions(code, tuple(slot_w), height, width, stride)
        for img, reg in zip(images, geometry):
            h, w = img.shape[:2]
            if h == reg.height and w == reg.width:
                group = direct.setdefault(reg, ([], []))
                group[0].append(row)
            else:
                group = scaled.setdefault((h, w, reg.height, reg.width), ([], []))
                group[0].append((row, reg))
            group[1].append(store.add(img))
    out = np.empty((b, height, width) + channels, dtype=dtype)
    for reg, (rows, index) in direct.items():
        out[np.asarray(rows), reg.top:reg.top + reg.height,
            reg.left:reg.left + reg.width] = store.take(index)
    for (_, _, rh, rw), (targets, index) in scaled.items():
        patches = _round_inplace(resize_batch(store.take(index), rh, rw), dtype)
        for patch, (row, reg) in zip(patches, targets):
            out[row, reg.top:reg.top + rh, reg.left:reg.left + rw] = patch
    if blend_rows:
        acc = np.zeros((len(blend_rows), height, width) + channels, dtype=np.float32)
        for key in sorted(blend, key=lambda k: k[0]):  # position order = the reference's sum order
            rows, index, wts = blend[key]
            part = resize_batch(store.take(index), height, width)
            part *= np.asarray(wts, np.float32).reshape((-1,) + (1,) * (part.ndim - 1))
            idx = np.asarray(rows)
            acc[idx] += part
        out[np.asarray(blend_rows)] = _round_inplace(acc, dtype)
    return out


# --------------------------------------------------------------------------------------- torch
def resize_torch(images, height: int, width: int):
    """Resize NCHW tensors with the same antialiased bilinear filter as :func:`resize`."""
    import torch.nn.functional as F

    if images.shape[-2:] == (height, width):
        return images.float()
    return F.interpolate(images.float(), size=(height, width), mode="bilinear",
                         antialias=True, align_corners=False)


def _round_to(tensor, dtype):
    import torch

    if dtype.is_floating_point:
        return tensor.to(dtype)
    info = torch.iinfo(dtype)
    return torch.floor(tensor + 0.5).clamp_(info.min, info.max).to(dtype)


def infer_counts(layout, weights) -> np.ndarray:
    """int64[B] constituents per slot when only layouts and weights travel with a batch.

    Fixed by the layout for SINGLE, HALVES and QUADS (their count rules in ``plan.py``); a BLEND
    slot has as many constituents as non-zero weights (the plan zeroes weights of absent ones).
    """
    layout = np.asarray(layout, dtype=np.int64)
    weights = np.asarray(weights)
    counts = np.count_nonzero(weights > 0, axis=1).astype(np.int64)
    for code in (Layout.SINGLE, Layout.HALVES, Layout.QUADS):
        counts[layout == code] = constituent_range(code)[0]
    return counts


def compose_batch(constituents, weights, layout, counts=None,
                  size: Optional[tuple[int, int]] = None, stride: int = 1):
    """Compose a batch: ``constituents`` [B, K, C, h, w] -> [B, C, H, W] on the same device.

    ``weights`` [B, K] and ``layout`` [B] come from the plan; ``counts`` [B] (constituents per
    slot) defaults to what the layout implies, and for BLEND to the number of non-zero weights.
    BLEND slots are composed in one vectorised step; spatial slots paste region by region.
    """
    import torch

    if constituents.dim() != 5:
        raise ValueError(f"constituents must be [B, K, C, h, w], got shape "
                         f"{tuple(constituents.shape)}")
    b, k, c, h, w = constituents.shape
    height, width = size if size is not None else (h, w)
    layout_cpu = torch.as_tensor(layout).to("cpu", torch.int64)
    weights_cpu = torch.as_tensor(weights).to("cpu", torch.float64)
    if layout_cpu.shape != (b,) or weights_cpu.shape != (b, k):
        raise ValueError(f"layout must be [{b}] and weights [{b}, {k}], got "
                         f"{tuple(layout_cpu.shape)} and {tuple(weights_cpu.shape)}")
    if counts is None:
        counts_cpu = torch.from_numpy(infer_counts(layout_cpu.numpy(), weights_cpu.numpy()))
    else:
        counts_cpu = torch.as_tensor(counts).to("cpu", torch.int64)
    out = torch.empty((b, c, height, width), dtype=constituents.dtype, device=constituents.device)

    blend_rows = torch.nonzero(layout_cpu == Layout.BLEND).flatten()
    if blend_rows.numel():
        x = constituents[blend_rows.to(constituents.device)]
        x = resize_torch(x.reshape(-1, c, h, w), height, width).reshape(-1, k, c, height, width)
        wts = torch.as_tensor(weights, device=constituents.device)[
            blend_rows.to(constituents.device)].float()
        mixed = (x * wts[:, :, None, None, None]).sum(dim=1)
        out[blend_rows.to(constituents.device)] = _round_to(mixed, constituents.dtype)

    for row in torch.nonzero(layout_cpu != Layout.BLEND).flatten().tolist():
        n = int(counts_cpu[row])
        slot_layout = Layout(int(layout_cpu[row]))
        _check_slot(range(n), weights_cpu[row, :n].tolist(), slot_layout)
        for i, reg in enumerate(regions(slot_layout, weights_cpu[row, :n].tolist(), height,
                                        width, stride)):
            patch = constituents[row, i]
            if patch.shape[-2:] != (reg.height, reg.width):
                patch = _round_to(resize_torch(patch[None], reg.height, reg.width)[0],
                                  constituents.dtype)
            out[row, :, reg.top:reg.top + reg.height, reg.left:reg.left + reg.width] = patch
    return out


def region_masks_batch(layout, weights, image_size: tuple[int, int], feature_size: tuple[int, int],
                       stride: int, device=None):
    """bool[B, K, fh, fw] masks for a batch (see :func:`mixpipe.core.layouts.region_masks`)."""
    import torch

    from .layouts import region_masks

    layout_cpu = torch.as_tensor(layout).to("cpu", torch.int64)
    weights_cpu = torch.as_tensor(weights).to("cpu", torch.float64)
    b, k = weights_cpu.shape
    masks = np.zeros((b, k) + tuple(feature_size), dtype=bool)
    counts = infer_counts(layout_cpu.numpy(), weights_cpu.numpy())
    for row in range(b):
        slot_layout = Layout(int(layout_cpu[row]))
        n = int(counts[row])
        masks[row, :n] = region_masks(slot_layout, weights_cpu[row, :n].tolist(), *image_size,
                                      stride, *feature_size)
    return torch.from_numpy(masks).to(device if device is not None else "cpu")
