"""Top-1 evaluation and the input preparation that training and evaluation share."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..core.augment import size_pair

__all__ = ["Normalize", "EvalBatches", "evaluate", "center_crop", "channels_last_runs",
           "IMAGENET_CROP_RATIO"]

#: The share of the resized image that ImageNet validation keeps: resize to 256, crop 224.
IMAGENET_CROP_RATIO = 224 / 256
#: Smallest input side at which torch 2.13's CPU backward of a 1x1 stride-2 convolution in
#: channels_last crashed the process (exit 139) in the small ResNets here.
_CPU_CHANNELS_LAST_CRASH_PX = 48
#: EvalBatches keeps resized images in memory up to this many bytes (by default).
_CACHE_BYTES = 1 << 30


def channels_last_runs(device: Union[str, "torch.device", None], image_size: int) -> bool:
    """Whether to train in channels_last on ``device`` at ``image_size`` px: the fast choice that
    is known to run.

    On CUDA channels_last is the usual choice for convolutions. On the CPU it is 1.3-1.6x faster
    for the small ResNets here at 32 px, but torch 2.13's CPU backward of a 1x1 stride-2
    convolution in channels_last crashes the whole process (exit 139, no Python error) from
    48 px up, so it is chosen on the CPU only below that size.
    """
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return True
    return kind == "cpu" and int(image_size) < _CPU_CHANNELS_LAST_CRASH_PX


def center_crop(image: np.ndarray, size: Union[int, Tuple[int, int]],
                ratio: float = IMAGENET_CROP_RATIO) -> np.ndarray:
    """uint8 HWC (or HW) -> uint8 [h, w, C]: resize so the crop covers ``ratio`` of the image's
    shorter extent, then cut the centre ``size`` out: ImageNet validation (resize the shorter
    side to 256, centre crop 224 is ``ratio = 224 / 256``).

    Resizing is pillow's antialiased bilinear, like the DALI and FFCV validation paths.
    A 2-D (greyscale) image comes out with three equal channels: the loaders decode to RGB.
    """
    from PIL import Image

    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    th, tw = size_pair(size)
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ValueError(f"center_crop needs a uint8 HWC image, got {image.dtype} "
                         f"{image.shape}")
    h, w = image.shape[:2]
    scale = max(th / (ratio * h), tw / (ratio * w))
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (rh, rw) != (h, w):
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(image.shape[2])
        if mode is None:
            raise ValueError(f"center_crop handles 1, 3 or 4 channels, got {image.shape[2]}")
        pil = Image.fromarray(image[:, :, 0] if mode == "L" else image, mode)
        image = np.asarray(pil.resize((rw, rh), Image.BILINEAR))
        if image.ndim == 2:
            image = image[:, :, None]
    top, left = (rh - th) // 2, (rw - tw) // 2
    return np.ascontiguousarray(image[top:top + th, left:left + tw])


@dataclasses.dataclass(frozen=True)
class Normalize:
    """uint8 [B, C, H, W] -> float, ``(x / 255 - mean) / std`` per channel, on ``device``.

    ``channels_last`` stores the result NHWC, which the CPU convolution kernels run faster on
    (1.3-1.6x for the small ResNets here); the values are the same. It is off by default:
    torch 2.13's CPU backward crashes the process in channels_last from 48 px up. Pass
    ``channels_last=channels_last_runs(device, image_size)`` to take it where it runs.

    Off, the result is contiguous NCHW whatever the input's memory: loaders hand over NHWC
    memory as a permuted view (FFCV's ``ToTorchImage()`` default, a MixLoader without it), and
    torch 2.13's CPU backward of a 1x1 stride-2 convolution on such input also crashes the
    process at 16 and 32 px (``free(): invalid next size``, exit 134/139) once torch runs two or
    more threads and the batch is odd (a plan's last batch). An FFCV loader with
    ``num_workers=n`` sets torch's thread count to n, which is how ``num_workers=2`` crashed in
    ``loss.backward()`` and ``num_workers=1`` did not.
    """

    mean: Tuple[float, ...] = (0.5, 0.5, 0.5)
    std: Tuple[float, ...] = (0.25, 0.25, 0.25)
    channels_last: bool = False

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"Normalize.mean has {len(self.mean)} channels, std has "
                             f"{len(self.std)}: they must match")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Normalize.std must be > 0 per channel, got {self.std}")

    def __call__(self, images: torch.Tensor, device=None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != len(self.mean):
            raise ValueError(f"images must be [B, {len(self.mean)}, H, W], got "
                             f"{tuple(images.shape)}")
        x = images.to(device) if device is not None else images
        if not self.channels_last:
            x = x.contiguous()  # NCHW memory, not a loader's NHWC view (see above)
        x = x.float() if images.dtype != torch.uint8 else x.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class EvalBatches:
    """(images uint8 [B, C, H, W], labels int64 [B]) batches over a map-style dataset.

    ``dataset[i]`` returns ``(HWC uint8 image, label)``.

    ``size`` (S or (height, width)) resizes and centre-crops every image to that size
    (:func:`center_crop` with ``crop_ratio``; ImageNet's 224 of 256 by default, 1.0 keeps the
    whole shorter side): what a tree of photos of many sizes needs, since whole images of
    different sizes cannot share a batch. Without ``size`` the images are stacked as stored and
    must all have one size (small datasets kept as arrays).

    ``cache`` keeps the batches after the first pass: evaluation runs every epoch and must not
    be charged a decode each time. The default (None) caches unless the images would take more
    than 1 GiB (ImageNet's validation set at 224 px is 7.5 GB: decoded again every pass).
    """

    def __init__(self, dataset, batch_size: int = 512, cache: Optional[bool] = None,
                 size: Union[int, Tuple[int, int], None] = None,
                 crop_ratio: float = IMAGENET_CROP_RATIO) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must lie in (0, 1], got {crop_ratio}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.size = size_pair(size) if size is not None else None
        self.crop_ratio = float(crop_ratio)
        if cache is None:
            cache = self.size is None or (
                len(dataset) * 3 * self.size[0] * self.size[1] <= _CACHE_BYTES)
        self.cache = bool(cache)
        self._tensors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _item(self, i: int) -> Tuple[np.ndarray, int]:
        image, label = self.dataset[i]
        image = np.asarray(image)
        if self.size is not None:
            image = center_crop(image, self.size, self.crop_ratio)
        elif image.ndim == 2:
            image = image[:, :, None]
        return np.moveaxis(image, 2, 0), int(label)

    def _stack(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*(self._item(int(i)) for i in indices))
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(f"evaluation images differ in size ({len(shapes)} shapes, e.g. "
                             f"{sorted(shapes)[:2]} as CHW); pass EvalBatches(..., size=S) to "
                             "resize and centre-crop them to the training size")
        return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        if self.cache:
            if self._tensors is None:
                self._tensors = self._stack(range(n))
            images, labels = self._tensors
            for lo in range(0, n, self.batch_size):
                yield images[lo:lo + self.batch_size], labels[lo:lo + self.batch_size]
            return
        for lo in range(0, n, self.batch_size):
            yield self._stack(range(lo, min(lo + self.batch_size, n)))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, prepare: Normalize = Normalize(),
             device=None) -> float:
    """Top-1 accuracy (in [0, 1]) of the model's plain forward over (images, labels) batches.

    A :class:`mixpipe.core.batch.MixedBatch` of unmixed slots is accepted too (its first target).
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in batches:
            if hasattr(batch, "targets"):
                images, labels = batch.image, batch.targets[:, 0]
            else:
                images, labels = batch
            logits = model(prepare(images, device))
            correct += int((logits.argmax(dim=1).cpu() == labels.cpu()).sum())
            total += int(labels.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate() got no samples")
    return correct / total
