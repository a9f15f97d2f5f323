"""Shared building blocks of the mixing policies: settings checks, group weights, plan assembly.

Everything here works on whole arrays at once. Plans for ten million samples are rebuilt every
epoch, so no step may loop over samples or slots in Python.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from ..plan import Layout, MixPlan
from . import epoch_rng

__all__ = [
    "STREAM_ORDER", "STREAM_SKIP", "LAYOUTS",
    "check_int", "check_float", "check_choice", "resolve_group_size", "groups_for_fraction",
    "loss_shares", "floor_shares", "snap_shares", "group_weights", "assemble", "slot_order",
    "spread",
]

# epoch_rng streams: each random decision draws from its own stream, so changing one rule (e.g.
# how many samples are skipped) does not reshuffle an unrelated one (e.g. the slot order).
STREAM_ORDER = 0  #: the walk over the samples: slot order and grouping
STREAM_SKIP = 1  #: which easy samples shrink leaves out

#: settings spelling -> layout code, and the group sizes each layout allows (default first)
LAYOUTS = {
    "halves": (Layout.HALVES, (2,)),
    "quads": (Layout.QUADS, (4,)),
    "blend": (Layout.BLEND, (2, 4)),
}


# ------------------------------------------------------------------------------ settings checks
def _interval(lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def check_int(owner: Any, field: str, lo: Optional[int] = None, hi: Optional[int] = None,
              optional: bool = False) -> None:
    """Refuse a non-integer or out-of-range integer setting, naming ``Class.field`` and range."""
    value = getattr(owner, field)
    if optional and value is None:
        return
    where = f"{type(owner).__name__}.{field}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where} must be an integer in {_interval(lo, hi, False, False)}"
                         f"{' or None' if optional else ''}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{where} must lie in {_interval(lo, hi, False, False)}, got {value!r}")
    object.__setattr__(owner, field, int(value))


def check_float(owner: Any, field: str, lo: Optional[float] = None, hi: Optional[float] = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Refuse a non-finite or out-of-range number setting; store it as a plain float."""
    value = getattr(owner, field)
    where = f"{type(owner).__name__}.{field}"
    span = _interval(lo, hi, lo_open, hi_open)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where} must be a number in {span}, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    bad |= lo is not None and (v <= lo if lo_open else v < lo)
    bad |= hi is not None and (v >= hi if hi_open else v > hi)
    if bad:
        raise ValueError(f"{where} must lie in {span}, got {value!r}")
    object.__setattr__(owner, field, v)


def check_choice(owner: Any, field: str, choices: tuple) -> None:
    value = getattr(owner, field)
    if value not in choices:
        raise ValueError(f"{type(owner).__name__}.{field} must be one of "
                         f"{', '.join(map(repr, choices))}; got {value!r}")


def resolve_group_size(owner: Any) -> None:
    """Check ``layout`` and fill ``group_size`` (None -> the layout's natural size)."""
    check_choice(owner, "layout", tuple(LAYOUTS))
    allowed = LAYOUTS[owner.layout][1]
    if owner.group_size is None:
        object.__setattr__(owner, "group_size", allowed[0])
    where = f"{type(owner).__name__}.group_size"
    if isinstance(owner.group_size, bool) or owner.group_size not in allowed:
        raise ValueError(f"{where} must be one of {list(allowed)} for layout "
                         f"{owner.layout!r}, got {owner.group_size!r}")
    object.__setattr__(owner, "group_size", int(owner.group_size))


# ------------------------------------------------------------------------------ counting
def groups_for_fraction(fraction: float, base: int, k: int, pool: int) -> int:
    """Composites that put ``fraction`` of ``base`` samples into groups of ``k``.

    Rounded half-up, so the slot count ``base - groups * (k - 1)`` is the nearest one to the
    promised ``base * (1 - fraction * (k - 1) / k)``; clipped to the ``pool`` that may be mixed.
    """
    groups = int(math.floor(fraction * base / k + 0.5))
    return max(0, min(groups, pool // k))


# ------------------------------------------------------------------------------ weights
def loss_shares(losses: np.ndarray, gamma: float) -> np.ndarray:
    """Row shares proportional to ``loss ** gamma`` (float64[G, K]).

    Rows are divided by their largest loss first, so a large ``gamma`` cannot overflow; a row of
    zero losses (nothing to tell the constituents apart) gets equal shares.
    """
    losses = np.asarray(losses, dtype=np.float64)
    k = losses.shape[1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if gamma == 1.0:  # the common case: no power, no overflow to guard against
            power = losses
        else:
            power = losses / losses.max(axis=1, keepdims=True)
            power **= gamma
        total = power.sum(axis=1, keepdims=True)
        shares = power / total
    flat = ~(total[:, 0] > 0) | ~np.isfinite(total[:, 0])
    if flat.any():
        shares[flat] = 1.0 / k
    return shares


def floor_shares(shares: np.ndarray, w_min: float) -> np.ndarray:
    """Lift every share to at least ``w_min``, taking the difference from the shares above it.

    For pairs this is exactly the clip ``w_a -> clip(w_a, w_min, 1 - w_min)``. For K constituents
    each share above ``w_min`` keeps the same proportion of the mass left after every constituent
    got ``w_min``; the order of the shares is kept and none ends above ``1 - (K - 1) w_min``.
    Needs ``w_min <= 1 / K``.
    """
    k = shares.shape[1]
    excess = np.maximum(shares - w_min, 0.0)
    total = excess.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = w_min + excess * ((1.0 - k * w_min) / total)
    out[total[:, 0] <= 0] = 1.0 / k
    return out


def _snap_split(share: np.ndarray, cells: int) -> np.ndarray:
    """Vector form of ``layouts.split_position(share, cells, 1) / cells``."""
    c = np.floor(share * cells + 0.5)
    return np.clip(c, 1, cells - 1) / cells


def snap_shares(layout: Layout, weights: np.ndarray, cells: int) -> np.ndarray:
    """Row-wise :func:`mixpipe.core.layouts.snap_weights`, for every composite at once."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum(axis=1, keepdims=True)
    if layout == Layout.HALVES:
        a = _snap_split(w[:, 0], cells)
        return np.stack([a, 1.0 - a], axis=1).astype(np.float32)
    if layout == Layout.QUADS:
        a = _snap_split(w[:, 0] + w[:, 2], cells)  # left column
        b = _snap_split(w[:, 0] + w[:, 1], cells)  # top row
        return np.stack([a * b, (1 - a) * b, a * (1 - b), (1 - a) * (1 - b)],
                        axis=1).astype(np.float32)
    return w.astype(np.float32)


def group_weights(groups: np.ndarray, losses: np.ndarray, gamma: float, w_min: float,
                  layout: Layout, cells: int) -> tuple:
    """(groups, float32 weights) for loss-driven composites; may reorder ids within a group.

    QUADS cells are products of one column split and one row split, so four free shares cannot be
    met exactly. Putting the largest share top-left and the smallest bottom-right (the ids are
    sorted by loss, descending, which sorts the shares too and breaks their ties by loss) gives
    the grid its best chance, and the snapped areas keep the order of the losses.
    """
    shares = floor_shares(loss_shares(losses, gamma), w_min)
    if layout == Layout.QUADS and len(groups):
        order = np.argsort(-np.asarray(losses, np.float64), axis=1, kind="stable")
        groups = np.take_along_axis(groups, order, axis=1)
        shares = np.take_along_axis(shares, order, axis=1)
    return groups, snap_shares(layout, shares, cells)


# ------------------------------------------------------------------------------ assembly
def _set_rows(out: np.ndarray, where: np.ndarray, rows: np.ndarray) -> None:
    """``out[where] = rows`` for a C-contiguous 2-D ``out``, through a 1-D view of whole rows.

    Moving each row as one opaque item is 2-4x faster than numpy's row-wise indexing.
    """
    width = out.shape[1] * out.itemsize
    rows = np.ascontiguousarray(rows, dtype=out.dtype)
    out.view(f"V{width}")[where, 0] = rows.view(f"V{width}")[:, 0]


def spread(count: int, total: int) -> np.ndarray:
    """bool[total] with ``count`` True entries spaced as evenly as integers allow."""
    mask = np.zeros(total, dtype=bool)
    if count:
        mask[(np.arange(count, dtype=np.int64) * total) // count] = True
    return mask


def assemble(num_samples: int, order: np.ndarray, mixed: np.ndarray, k: int, layout: Layout,
             weigh: Callable[[np.ndarray], tuple], skipped: np.ndarray, seed: int, epoch: int,
             scale: Optional[np.ndarray] = None) -> MixPlan:
    """Turn a random walk over the samples into a plan, with streaming passes only.

    ``order`` lists every sample that gets a slot, in a (seed, epoch)-random order; ``mixed``
    (bool, aligned with ``order``, a multiple of ``k`` True) marks those that go into
    composites. Each run of ``k`` consecutive mixed samples forms one composite, placed where its
    first member stands; every other sample is a single at its own place. So the grouping is as
    random as the order, composites and singles interleave, and every array of the plan is
    written front to back, never scattered: a 10M-sample plan is bound by memory bandwidth, not
    by cache misses. ``weigh(groups) -> (groups, float32 weights)`` sets the shares (it may
    reorder ids within a group). ``scale`` is an optional per-sample float32[N] loss multiplier;
    padding entries get weight and loss scale 0.
    """
    mixed = np.asarray(mixed, dtype=bool)
    g = int(np.count_nonzero(mixed)) // k
    if g * k != int(np.count_nonzero(mixed)):
        raise ValueError(f"{int(np.count_nonzero(mixed))} mixed samples do not fill groups of {k}")
    width = k if g else 1
    starts = ~mixed
    starts[np.flatnonzero(mixed)[::k]] = True
    composite = mixed[starts]  # bool[M]: which slots are composites
    single = ~composite
    m = composite.size
    singles = order[~mixed]
    ids = np.full((m, width), -1, dtype=np.int64)
    w = np.zeros((m, width), dtype=np.float32)
    loss_scale = np.zeros((m, width), dtype=np.float32)
    if g:
        groups, weights = weigh(order[mixed].reshape(g, k))
        _set_rows(ids, composite, groups)
        _set_rows(w, composite, weights)
        _set_rows(loss_scale, composite,
                  np.ones((g, k), np.float32) if scale is None else scale[groups])
    ids[single, 0] = singles
    w[single, 0] = 1.0
    loss_scale[single, 0] = 1.0 if scale is None else scale[singles]
    lay = np.where(composite, np.uint8(layout), np.uint8(Layout.SINGLE)).astype(np.uint8)
    return MixPlan(ids, w, loss_scale, lay, np.asarray(skipped, dtype=np.int64), num_samples,
                   epoch, seed)


def slot_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The epoch's random walk over all samples: it fixes both grouping and slot order."""
    return epoch_rng(seed, epoch, STREAM_ORDER).permutation(num_samples)
