"""Per-epoch geometry tables for the mixing image decoders, computed in numpy outside numba.

* Regions: where each constituent of each slot goes in the composite, from
  :func:`mixpipe.core.layouts.regions` (the one definition the composer and region pooling share).
* Crops: which window of each decoded constituent is used (top, left, height, width, flip). The
  crop samplers are vectorised over all constituents of an epoch and draw from a generator seeded
  by (plan seed, epoch, rank), so the same plan gives the same crops on a re-run and a test can
  read back exactly what the decoder did.

For spatial layouts a random or centre crop takes the aspect ratio of the constituent's REGION
(times the sampled ratio), so a constituent squeezed into half the composite is cropped, not
squashed. SINGLE and BLEND regions are the whole composite, which gives the usual crops.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from ..core.augment import fit_aspect, random_resized_crop_boxes
from ..core.layouts import regions
from ..core.plan import Layout, MixPlan

__all__ = ["fill_regions", "constituent_cells", "full_crops", "center_crops",
           "random_resized_crops", "crop_rng"]


def fill_regions(plan: MixPlan, table: np.ndarray, height: int, width: int, stride: int) -> None:
    """Write int32 (top, left, height, width) per slot and constituent into ``table[:M, :K]``.

    SINGLE and BLEND slots cover the whole composite. Spatial slots call core ``regions`` once per
    distinct (layout, weights) row: policies snap weights to the stride grid, so an epoch has few.
    """
    m, k = plan.ids.shape
    table[:m] = 0
    whole = np.array([0, 0, height, width], np.int32)
    present = plan.ids >= 0
    flat = (plan.layout == Layout.SINGLE) | (plan.layout == Layout.BLEND)
    mask = present & flat[:, None]
    table[:m, :k][mask] = whole
    spatial = np.flatnonzero(~flat)
    if spatial.size == 0:
        return
    keys = np.concatenate([plan.layout[spatial, None].astype(np.float32),
                           plan.weights[spatial]], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    for u, key in enumerate(uniq):
        layout = Layout(int(key[0]))
        n = 2 if layout == Layout.HALVES else 4
        rows = spatial[inverse == u]
        regs = regions(layout, [float(w) for w in key[1:1 + n]], height, width, stride)
        table[rows, :n] = np.array([[r.top, r.left, r.height, r.width] for r in regs], np.int32)


def constituent_cells(plan: MixPlan) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of every present constituent, in row-major order."""
    return np.nonzero(plan.ids >= 0)


def crop_rng(plan: MixPlan, salt: int) -> np.random.Generator:
    """The epoch's crop generator: fixed by (plan seed, epoch, rank, salt)."""
    return np.random.Generator(np.random.PCG64(
        [int(plan.seed) & 0xFFFFFFFF, int(plan.epoch), int(plan.rank), int(salt)]))


def full_crops(src_h: np.ndarray, src_w: np.ndarray, reg_h: np.ndarray, reg_w: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """The whole image: int64[n, 4] (top, left, height, width)."""
    zeros = np.zeros_like(src_h)
    return np.stack([zeros, zeros, src_h, src_w], axis=1).astype(np.int64)


def center_crops(src_h, src_w, reg_h, reg_w, rng, ratio: float = 224 / 256) -> np.ndarray:
    """Centred window of the region's aspect, ``ratio`` of the largest one that fits."""
    h, w = fit_aspect(src_h.astype(np.float64), src_w.astype(np.float64),
                      reg_w.astype(np.float64) / reg_h)
    h = np.maximum((h * ratio).astype(np.int64), 1)
    w = np.maximum((w * ratio).astype(np.int64), 1)
    return np.stack([(src_h - h) // 2, (src_w - w) // 2, h, w], axis=1).astype(np.int64)


def random_resized_crops(src_h, src_w, reg_h, reg_w, rng, scale=(0.08, 1.0),
                         ratio=(3 / 4, 4 / 3), attempts: int = 10) -> np.ndarray:
    """Inception-style random crops of the region's aspect for a whole epoch: the core rule
    (:func:`mixpipe.core.augment.random_resized_crop_boxes`) the other adapters use too."""
    aspect = np.asarray(reg_w, np.float64) / np.maximum(reg_h, 1)
    return random_resized_crop_boxes(src_h, src_w, aspect, rng, scale, ratio, attempts)
