"""Progressive resizing: train the early epochs on smaller images, the last ones at full size.

FFCV's ResNet recipes ramp the training resolution linearly from a low start to full size, which
buys epochs of data for less arithmetic (a convolution's cost grows with the image's area). Here
the training step resizes each batch to the epoch's side after the loader built it, so one
schedule works with every loader (torch, FFCV, DALI) and none needs a decoder of its own. Batches
must hold single images: a composite's region boundaries sit on the network's stride at the
loader's size and would not after resizing.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import numpy as np
import torch

from ..core.plan import Layout

__all__ = ["snap_size", "ProgressiveResize", "resize_images", "check_singles"]


def snap_size(size: float, stride: int) -> int:
    """``size`` rounded down to a multiple of ``stride``, at least two strides: a feature map
    under 2x2 cells leaves a stride-``stride`` network nothing to pool over."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return max(2 * stride, int(size + 1e-9) // stride * stride)


@dataclasses.dataclass(frozen=True)
class ProgressiveResize:
    """The training side per epoch: ``min_size`` until ``ramp[0]`` epochs of data, then linear
    to ``max_size`` at ``ramp[1]``, snapped down to ``stride``.

    An epoch takes the side the ramp gives where it begins (epochs of data done before it), as
    FFCV's recipes index the ramp by epoch. Rounding down keeps every size but the full one a
    step below the line, so the model reaches full size only once the ramp does."""

    min_size: int
    max_size: int
    ramp: Tuple[float, float]
    stride: int

    def __post_init__(self) -> None:
        if not 2 * self.stride <= self.min_size <= self.max_size:
            raise ValueError(f"ProgressiveResize needs 2 * stride ({2 * self.stride}) <= "
                             f"min_size ({self.min_size}) <= max_size ({self.max_size})")
        if self.min_size % self.stride or self.max_size % self.stride:
            raise ValueError(f"ProgressiveResize sizes {self.min_size} and {self.max_size} must "
                             f"be multiples of the stride {self.stride}")
        start, end = self.ramp
        if not 0.0 <= start < end:
            raise ValueError(f"ProgressiveResize.ramp must be (start, end) epochs with "
                             f"0 <= start < end, got {self.ramp}")

    def size(self, epoch: int) -> int:
        """The side (px) epoch ``epoch`` trains at."""
        side = float(np.interp(float(epoch), self.ramp, (self.min_size, self.max_size)))
        return snap_size(side, self.stride)

    __call__ = size


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float ``[B, C, H, W]`` -> ``[B, C, size, size]``, bilinear with antialiasing (what the
    loaders' own resizing does, so a small image is the same picture at lower resolution);
    unchanged at that size already. channels_last survives."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) \
        and not images.is_contiguous()
    out = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.contiguous(memory_format=torch.channels_last) if last else out


def check_singles(layout: torch.Tensor) -> None:
    """Refuse composites: their regions were snapped to the stride at the loader's size."""
    if bool((torch.as_tensor(layout) != int(Layout.SINGLE)).any()):
        raise ValueError("progressive resizing takes batches of single images, got composites; "
                         "train it with a plan of singles (NoneSettings or BudgetSettings)")
