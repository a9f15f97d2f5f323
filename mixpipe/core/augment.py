"""Per-constituent augmentation for the torch loader: random resized crop to the region, flip.

Each constituent is cropped straight to its region's size, so a half-width region gets a
half-width crop at full resolution instead of a full image squeezed afterwards.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Tuple, Union

import numpy as np

from .compose import resize

__all__ = ["fit_aspect", "size_pair", "random_resized_crop_boxes", "random_resized_crop_box",
           "crop_box_from_uniforms", "CROP_DRAWS", "RandomResizedCropFlip", "is_pil_image"]


def fit_aspect(src_h: np.ndarray, src_w: np.ndarray,
               aspect: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Largest (h, w) of the given width/height ``aspect`` inside (src_h, src_w), at least 1 px."""
    src_h = np.asarray(src_h, np.float64)
    src_w = np.asarray(src_w, np.float64)
    wide = src_w >= src_h * aspect
    h = np.where(wide, src_h, np.round(src_w / aspect))
    w = np.where(wide, np.round(src_h * aspect), src_w)
    return np.clip(h, 1, src_h).astype(np.int64), np.clip(w, 1, src_w).astype(np.int64)


def random_resized_crop_boxes(src_h: np.ndarray, src_w: np.ndarray, aspect: np.ndarray,
                              rng: np.random.Generator, scale: Tuple[float, float],
                              ratio: Tuple[float, float], attempts: int = 10) -> np.ndarray:
    """int64[n, 4] (top, left, h, w): Inception-style random crops, one per source image.

    Area share uniform in ``scale``; aspect log-uniform in ``ratio`` times ``aspect`` (the
    region's width/height, so a crop for a half-width region is not squashed; 1 for plain crops).
    The first of ``attempts`` draws that fits wins; if none fits, the centred largest window with
    the image's aspect clamped to the ratio range. Vectorised because the FFCV decoders draw a
    whole epoch's crops at once; the torch and DALI adapters draw one crop at a time through
    :func:`random_resized_crop_box`, so all three follow one rule.
    """
    src_h = np.asarray(src_h, np.int64).reshape(-1)
    src_w = np.asarray(src_w, np.int64).reshape(-1)
    n = src_h.shape[0]
    h_src = src_h.astype(np.float64)
    w_src = src_w.astype(np.float64)
    aspect = np.broadcast_to(np.asarray(aspect, np.float64), (n,))
    shares = rng.uniform(scale[0], scale[1], (n, attempts))
    log_r = rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, attempts))
    pos = rng.uniform(0.0, 1.0, (n, 2))
    draw_aspect = np.exp(log_r) * aspect[:, None]
    target = (h_src * w_src)[:, None] * shares
    w = np.round(np.sqrt(target * draw_aspect))
    h = np.round(np.sqrt(target / draw_aspect))
    fits = (w > 0) & (w <= w_src[:, None]) & (h > 0) & (h <= h_src[:, None])
    any_fit = fits.any(axis=1)
    pick = np.argmax(fits, axis=1)
    rows = np.arange(n)
    fallback = np.clip(w_src / h_src, ratio[0] * aspect, ratio[1] * aspect)
    fh, fw = fit_aspect(h_src, w_src, fallback)
    ch = np.where(any_fit, h[rows, pick], fh).astype(np.int64)
    cw = np.where(any_fit, w[rows, pick], fw).astype(np.int64)
    top = np.where(any_fit, (pos[:, 0] * (src_h - ch + 1)).astype(np.int64), (src_h - ch) // 2)
    left = np.where(any_fit, (pos[:, 1] * (src_w - cw + 1)).astype(np.int64), (src_w - cw) // 2)
    return np.stack([top, left, ch, cw], axis=1).astype(np.int64)


#: Uniform draws one crop takes: ``ATTEMPTS`` area shares, ``ATTEMPTS`` log aspects, 2 positions.
ATTEMPTS = 10
CROP_DRAWS = 2 * ATTEMPTS + 2


def random_resized_crop_box(height: int, width: int, scale: Tuple[float, float],
                            ratio: Tuple[float, float],
                            rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of one crop: exactly row 0 of :func:`random_resized_crop_boxes` for a
    single image with aspect 1 (same draws, same result; tested), in plain Python because the
    torch and DALI adapters call it once per constituent and numpy's per-call overhead on
    one-element arrays made it cost 76 us instead of about 10."""
    return crop_box_from_uniforms(height, width, scale, ratio,
                                  rng.random(CROP_DRAWS).tolist())


def crop_box_from_uniforms(height: int, width: int, scale: Tuple[float, float],
                           ratio: Tuple[float, float],
                           u: Sequence[float]) -> Tuple[int, int, int, int]:
    """:func:`random_resized_crop_box` given its ``CROP_DRAWS`` uniforms in [0, 1), in the order
    the generator yields them, so a caller can take every draw of a slot in one call.

    Each value is mapped as ``low + (high - low) * u``, the arithmetic ``Generator.uniform``
    performs, so one draw of 22 and three ``uniform`` calls give the same crop (tested).
    """
    share_low, share_range = float(scale[0]), float(scale[1]) - float(scale[0])
    log_low = math.log(ratio[0])
    log_range = math.log(ratio[1]) - log_low
    area = float(height) * float(width)
    for i in range(ATTEMPTS):
        aspect = math.exp(log_low + log_range * u[ATTEMPTS + i])
        target = area * (share_low + share_range * u[i])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return (int(u[2 * ATTEMPTS] * (height - h + 1)),
                    int(u[2 * ATTEMPTS + 1] * (width - w + 1)), h, w)
    fh, fw = fit_aspect(np.array([height]), np.array([width]),
                        np.clip(width / height, ratio[0], ratio[1]))
    h, w = int(fh[0]), int(fw[0])
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

    def window(self, height: int, width: int, region: Tuple[int, int],
               rng: np.random.Generator) -> Tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) for an image of (height, width) going to ``region``: the draw
        the torch transform and DALI's view share, in the same order."""
        rh, rw = region
        # keep the crop's aspect equal to the region's so nothing is stretched
        aspect = rw / rh
        ratio = (self.ratio[0] * aspect, self.ratio[1] * aspect)
        # every draw in one call (the crop's, then the mirror's coin when flipping), in the
        # order separate calls would take them
        u = rng.random(CROP_DRAWS + 1 if self.flip else CROP_DRAWS).tolist()
        top, left, ch, cw = crop_box_from_uniforms(height, width, self.scale, ratio, u)
        return top, left, ch, cw, bool(self.flip and u[CROP_DRAWS] < 0.5)

    #: Loaders may hand this transform a decoded pillow image as it is (see ``__call__``).
    takes_pil = True

    def __call__(self, image, region: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """``image``: uint8 HWC/HW numpy, or a pillow image ("L" or "RGB" are cropped and
        resized by pillow without a full-size numpy copy; other modes go through numpy as
        ``np.asarray(image)``, HW made HW1). The result is the same either way; HWC out."""
        if is_pil_image(image):
            if image.mode in ("L", "RGB"):
                return self._from_pil(image, region, rng)
            image = np.asarray(image)
            image = image[:, :, None] if image.ndim == 2 else image
        top, left, ch, cw, flip = self.window(image.shape[0], image.shape[1], region, rng)
        crop = image[top:top + ch, left:left + cw]
        if _pillow_can_resize(crop):
            return _pillow_resize(crop, region, flip)
        if flip:
            crop = crop[:, ::-1]
        out = resize(crop, *region)
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)

    def _from_pil(self, image, region: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        # pillow's crop copies exactly the pixels a numpy crop would, so this is the numpy
        # path's result without converting the whole decoded image first
        width, height = image.size
        top, left, ch, cw, flip = self.window(height, width, region, rng)
        rh, rw = region
        return _resized(image.crop((left, top, left + cw, top + ch)), region,
                        flip).reshape(rh, rw, -1)


def is_pil_image(image) -> bool:
    """Whether ``image`` is a pillow image (told by its class's module, so pillow need not be
    imported to ask)."""
    return type(image).__module__.startswith("PIL.")


def _resized(image, region: Tuple[int, int], flip: bool) -> np.ndarray:
    """A pillow image resized to ``region`` (rh, rw) by pillow's bilinear resample, mirrored
    after when ``flip``, as a fresh writable array."""
    from PIL import Image

    resized = image.resize((region[1], region[0]), Image.BILINEAR)
    if flip:
        resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
    return np.array(resized)


def _pillow_can_resize(image: np.ndarray) -> bool:
    """uint8 grey (HW, HW1) or RGB (HW3): the modes pillow's "L" and "RGB" resample natively."""
    return image.dtype == np.uint8 and (image.ndim == 2 or
                                        (image.ndim == 3 and image.shape[2] in (1, 3)))


def _pillow_resize(crop: np.ndarray, region: Tuple[int, int], flip: bool) -> np.ndarray:
    """``crop`` resized to ``region`` (rh, rw) by one pillow call, mirrored after when ``flip``;
    the crop's dtype and channel axis (none, 1 or 3) kept, a fresh writable array.

    Why pillow: its one native bilinear resample is the same antialiased triangle filter,
    widened by the downscale factor, as :func:`~mixpipe.core.compose.resize`, and ~5x cheaper
    than those two float32 tensordots (0.6 ms against 3-4 ms per 375x500 image to 224x224). It
    rounds its intermediate (horizontal) pass to uint8, so results differ from the float
    reference by at most 1 grey level (mean 0.16-0.18 on noise; tested). Why crop with numpy
    first rather than hand pillow the whole image and a ``box``: with a box its filter also reads
    the pixels just outside the box, up to ~20 grey levels off the reference along the crop's
    edges. Why mirror after the resize: the filter is symmetric, so this equals resizing the
    mirrored crop bit for bit (tested), and pillow's transpose keeps the result contiguous,
    which pastes ~4x faster than a mirrored numpy view.
    """
    from PIL import Image

    plane = crop[:, :, 0] if crop.ndim == 3 and crop.shape[2] == 1 else crop
    return _resized(Image.fromarray(np.ascontiguousarray(plane)), region,
                    flip).reshape(tuple(region) + crop.shape[2:])


def size_pair(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    """``(height, width)`` from ``S`` or ``(height, width)``, each at least 1."""
    pair = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(x) for x in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"size must be S or (height, width) >= 1, got {size!r}")
    return pair  # type: ignore[return-value]
