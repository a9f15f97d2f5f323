"""Per-constituent augmentation for the torch loader: random resized crop to the region, flip.

Each constituent is cropped straight to its region's size, so a half-width region gets a
half-width crop at full resolution instead of a full image squeezed afterwards.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import numpy as np

from .compose import resize

__all__ = ["random_resized_crop_box", "RandomResizedCropFlip"]


def random_resized_crop_box(height: int, width: int, scale: Tuple[float, float],
                            ratio: Tuple[float, float],
                            rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a random share of the area at a random aspect.

    Ten tries at the requested area and aspect, then the centred crop clamped to the ratio range,
    the usual Inception-style recipe.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass(frozen=True)
class RandomResizedCropFlip:
    """Callable constituent transform: ``(image HWC uint8, (rh, rw), rng) -> HWC uint8``."""

    scale: Tuple[float, float] = (0.35, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"RandomResizedCropFlip.scale must satisfy 0 < lo <= hi <= 1, "
                             f"got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"RandomResizedCropFlip.ratio must satisfy 0 < lo <= hi, "
                             f"got {self.ratio}")

    def __call__(self, image: np.ndarray, region: Tuple[int, int],
                 rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        rh, rw = region
        # keep the crop's aspect equal to the region's so nothing is stretched
        aspect = rw / rh
        ratio = (self.ratio[0] * aspect, self.ratio[1] * aspect)
        top, left, ch, cw = random_resized_crop_box(h, w, self.scale, ratio, rng)
        crop = image[top:top + ch, left:left + cw]
        if self.flip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        out = resize(crop, rh, rw)
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
