"""Region geometry of the layouts: which pixels, and which feature-map cells, belong to whom.

The composer (pixels) and region pooling (feature-map cells) must agree exactly, or a
constituent's logits would see its neighbour's features. Both derive their boundaries from
:func:`split_position`, and boundaries are snapped to the network's total stride so that a
boundary in the image is also a boundary between feature-map cells.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .plan import Layout

__all__ = ["Region", "split_position", "regions", "region_masks", "snap_weights"]


@dataclasses.dataclass(frozen=True)
class Region:
    """A rectangle of the composite, in pixels: rows [top, top+height), cols [left, left+width)."""

    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


def split_position(share: float, length: int, stride: int) -> int:
    """Pixel where the first part of a split ends, given the first part's share of ``length``.

    The boundary is a multiple of ``stride`` and leaves at least one stride cell on each side, so
    both constituents own at least one feature-map cell. Rounding is half-up in float64 so that
    numpy and torch callers agree bit for bit.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if length < 2 * stride:
        raise ValueError(f"a side of {length} px is too small to split at stride {stride}: "
                         f"it needs at least {2 * stride} px (one stride cell per constituent)")
    if not np.isfinite(share) or not 0.0 <= share <= 1.0:
        raise ValueError(f"split share must lie in [0, 1], got {share}")
    cells = int(np.floor(float(share) * length / stride + 0.5))
    max_cells = (length - stride) // stride  # the second part keeps >= one whole stride cell
    return int(min(max(cells, 1), max_cells) * stride)


def _quad_shares(weights: Sequence[float]) -> tuple[float, float]:
    """(left column share, top row share) of a 2x2 grid from its four area shares."""
    w = [float(x) for x in weights]
    return w[0] + w[2], w[0] + w[1]


def regions(layout: Layout, weights: Sequence[float], height: int, width: int,
            stride: int = 1) -> list[Region]:
    """One region per constituent, in the order of the slot's ids.

    SINGLE and BLEND constituents all cover the whole composite. HALVES puts constituent 0 left
    of the split and 1 right of it; QUADS orders top-left, top-right, bottom-left, bottom-right.
    """
    layout = Layout(layout)
    if layout == Layout.SINGLE:
        return [Region(0, 0, height, width)]
    if layout == Layout.BLEND:
        return [Region(0, 0, height, width) for _ in weights]
    if layout == Layout.HALVES:
        if len(weights) != 2:
            raise ValueError(f"HALVES needs 2 weights, got {len(weights)}")
        x = split_position(float(weights[0]), width, stride)
        return [Region(0, 0, height, x), Region(0, x, height, width - x)]
    if layout == Layout.QUADS:
        if len(weights) != 4:
            raise ValueError(f"QUADS needs 4 weights, got {len(weights)}")
        col_share, row_share = _quad_shares(weights)
        x = split_position(col_share, width, stride)
        y = split_position(row_share, height, stride)
        return [Region(0, 0, y, x), Region(0, x, y, width - x),
                Region(y, 0, height - y, x), Region(y, x, height - y, width - x)]
    raise ValueError(f"unknown layout {layout!r}")


def region_masks(layout: Layout, weights: Sequence[float], height: int, width: int,
                 stride: int, feature_height: int, feature_width: int) -> np.ndarray:
    """bool[K, fh, fw]: which feature-map cells each constituent owns.

    A cell belongs to the region that contains its centre, mapped back to image pixels. With
    boundaries on the stride grid and ``fh = ceil(height / stride)`` this is exact; at any other
    resolution it still assigns every cell to exactly one constituent (spatial layouts). SINGLE
    and BLEND constituents own every cell.
    """
    layout = Layout(layout)
    k = len(weights)
    masks = np.zeros((k, feature_height, feature_width), dtype=bool)
    rows = (np.arange(feature_height) + 0.5) * (height / feature_height)
    cols = (np.arange(feature_width) + 0.5) * (width / feature_width)
    for i, reg in enumerate(regions(layout, weights, height, width, stride)):
        in_rows = (rows >= reg.top) & (rows < reg.top + reg.height)
        in_cols = (cols >= reg.left) & (cols < reg.left + reg.width)
        masks[i] = in_rows[:, None] & in_cols[None, :]
    return masks


def snap_weights(layout: Layout, weights: Sequence[float], cells: int) -> np.ndarray:
    """Weights rewritten to the area shares the layout really gives on a ``cells``-wide grid.

    Policies call this so that a plan's weights are the true shares when the composite is
    ``cells`` stride cells wide (7 for 224 px at stride 32, 4 for 32 px at stride 8). BLEND and
    SINGLE weights are returned normalised but otherwise unchanged.
    """
    layout = Layout(layout)
    w = np.asarray(weights, dtype=np.float64)
    if layout in (Layout.SINGLE, Layout.BLEND):
        return (w / w.sum()).astype(np.float32)
    length = cells  # geometry on a stride-1 grid of `cells` cells is the snapped geometry
    if layout == Layout.HALVES:
        a = split_position(float(w[0] / w.sum()), length, 1) / length
        return np.array([a, 1.0 - a], dtype=np.float32)
    col_share, row_share = _quad_shares(w / w.sum())
    a = split_position(col_share, length, 1) / length
    b = split_position(row_share, length, 1) / length
    return np.array([a * b, (1 - a) * b, a * (1 - b), (1 - a) * (1 - b)], dtype=np.float32)
