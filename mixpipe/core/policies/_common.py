"""Shared building blocks of the mixing policies: settings checks, group weights, plan assembly.

Everything here works on whole arrays at once. Plans for ten million samples are rebuilt every
epoch, so no step may loop over samples or slots in Python.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from ..plan import Layout, MixPlan
from . import epoch_rng

__all__ = [
    "STREAM_ORDER", "STREAM_SKIP", "LAYOUTS",
    "check_int", "check_float", "check_choice", "resolve_group_size", "groups_for_fraction",
    "loss_shares", "floor_shares", "snap_shares", "group_weights", "Tier", "assemble",
    "assemble_tiers", "slot_order",
    "spread",
]

# epoch_rng streams: each random decision draws from its own stream, so changing one rule (e.g.
# how many samples are skipped) does not reshuffle an unrelated one (e.g. the slot order).
STREAM_ORDER = 0  #: the walk over the samples: slot order and grouping
STREAM_SKIP = 1  #: which easy samples shrink leaves out
STREAM_SELECT = 2  #: which samples mixtrain's sampled selection mixes

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
# Weights are computed column by column (one 1-D array per constituent position): numpy reduces
# across a narrow axis (K = 2 or 4) an order of magnitude slower than it adds two columns.
def _add(cols: list) -> np.ndarray:
    total = cols[0] + cols[1]
    for c in cols[2:]:
        total += c
    return total


def loss_shares(losses: list, gamma: float) -> list:
    """Per-position shares proportional to ``loss ** gamma`` (float64 columns).

    Losses are divided by their group's largest first, so a large ``gamma`` cannot overflow; a
    group of zero losses (nothing to tell the constituents apart) gets equal shares.
    """
    k = len(losses)
    cols = [np.asarray(c, dtype=np.float64) for c in losses]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if gamma != 1.0:  # gamma 1, the default, needs neither the power nor the guard
            top = cols[0]
            for c in cols[1:]:
                top = np.maximum(top, c)
            cols = [(c / top) ** gamma for c in cols]
        total = _add(cols)
        shares = [c / total for c in cols]
    flat = ~(total > 0) | ~np.isfinite(total)
    if flat.any():
        for c in shares:
            c[flat] = 1.0 / k
    return shares


def floor_shares(shares: list, w_min: float) -> list:
    """Lift every share to at least ``w_min``, taking the difference from the shares above it.

    For pairs this is exactly the clip ``w_a -> clip(w_a, w_min, 1 - w_min)``. For K constituents
    each share above ``w_min`` keeps the same proportion of the mass left after every constituent
    got ``w_min``; the order of the shares is kept and none ends above ``1 - (K - 1) w_min``.
    Needs ``w_min <= 1 / K``.
    """
    k = len(shares)
    if w_min == 0.0:
        return shares
    excess = [np.maximum(c - w_min, 0.0) for c in shares]
    total = _add(excess)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = (1.0 - k * w_min) / total
    out = [w_min + e * factor for e in excess]
    flat = ~(total > 0)
    if flat.any():
        for c in out:
            c[flat] = 1.0 / k
    return out


def _snap_split(share: np.ndarray, cells: Optional[int]) -> np.ndarray:
    """Vector form of ``layouts.split_position(share, cells, 1) / cells``; no grid: as is."""
    if cells is None:
        return share
    c = np.floor(share * cells + 0.5)
    return np.clip(c, 1, cells - 1, out=c) / cells


def _snap_columns(layout: Layout, w: list, cells: Optional[int]) -> np.ndarray:
    total = _add(w)
    w = [c / total for c in w]  # as snap_weights does: the shares of the normalised row
    if layout == Layout.HALVES:
        a = _snap_split(w[0], cells)
        cols = [a, 1.0 - a]
    elif layout == Layout.QUADS:
        a = _snap_split(w[0] + w[2], cells)  # left column
        b = _snap_split(w[0] + w[1], cells)  # top row
        cols = [a * b, (1 - a) * b, a * (1 - b), (1 - a) * (1 - b)]
    else:
        cols = w
    out = np.empty((cols[0].size, len(cols)), dtype=np.float32)
    for i, c in enumerate(cols):
        out[:, i] = c
    return out


def snap_shares(layout: Layout, weights: np.ndarray, cells: Optional[int]) -> np.ndarray:
    """Row-wise :func:`mixpipe.core.layouts.snap_weights`, for every composite at once."""
    w = np.asarray(weights, dtype=np.float64)
    return _snap_columns(Layout(layout), [w[:, i] for i in range(w.shape[1])], cells)


def _pair_weights(losses: np.ndarray, gamma: float, w_min: float, layout: Layout,
                  cells: Optional[int]) -> np.ndarray:
    """Pairs, the common case, on one column: ``w_a = clip(l_a^g / (l_a^g + l_b^g))``, snapped.

    The same numbers as the K-way path (for pairs the floor is the clip), computed in place on
    one column: at 10M samples the memory traffic is what costs.
    """
    a = losses[:, 0].astype(np.float64)
    b = losses[:, 1].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if gamma != 1.0:
            top = np.maximum(a, b)
            np.divide(a, top, out=a)
            np.divide(b, top, out=b)
            np.power(a, gamma, out=a)
            np.power(b, gamma, out=b)
        total = np.add(a, b, out=b)
        share = np.divide(a, total, out=a)
    flat = ~(total > 0) | ~np.isfinite(total)
    if flat.any():
        share[flat] = 0.5
    np.clip(share, w_min, 1.0 - w_min, out=share)
    out = np.empty((share.size, 2), dtype=np.float32)
    if layout == Layout.HALVES and cells is not None:
        np.multiply(share, cells, out=share)
        share += 0.5
        np.floor(share, out=share)
        np.clip(share, 1, cells - 1, out=share)
        share /= cells  # == layouts.split_position(share, cells, 1) / cells
    out[:, 0] = share
    out[:, 1] = 1.0 - share
    return out


# compare-exchange pairs of a sorting network for four items
_NET4 = ((0, 1), (2, 3), (0, 2), (1, 3), (1, 2))


def group_weights(groups: np.ndarray, losses: np.ndarray, gamma: float, w_min: float,
                  layout: Layout, cells: Optional[int]) -> tuple:
    """(groups, float32 weights) for loss-driven composites; may reorder ids within a group.

    QUADS cells are products of one column split and one row split, so four free shares cannot be
    met exactly. Putting the largest share top-left and the smallest bottom-right (the ids are
    sorted by loss, descending, which sorts the shares too) gives the grid its best chance, and
    the snapped areas keep the order of the losses.
    """
    k = groups.shape[1]
    if k == 2:
        return groups, _pair_weights(losses, gamma, w_min, layout, cells)
    ids = [groups[:, i] for i in range(k)]
    loss = [np.asarray(losses[:, i], dtype=np.float64) for i in range(k)]
    if layout == Layout.QUADS and len(groups):
        for i, j in _NET4:  # vectorised sorting network, descending by loss
            swap = loss[j] > loss[i]
            loss[i], loss[j] = np.where(swap, loss[j], loss[i]), np.where(swap, loss[i], loss[j])
            ids[i], ids[j] = np.where(swap, ids[j], ids[i]), np.where(swap, ids[i], ids[j])
        groups = np.stack(ids, axis=1)
    shares = floor_shares(loss_shares(loss, gamma), w_min)
    return groups, _snap_columns(layout, shares, cells)


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


class Tier(NamedTuple):
    """One kind of composite in an epoch: which walk positions it takes and how it groups them.

    ``mixed`` is bool, aligned with the walk, a multiple of ``k`` True; ``weigh(groups) ->
    (groups, float32 weights)`` sets the shares (it may reorder ids within a group).
    """

    mixed: np.ndarray
    k: int
    layout: Layout
    weigh: Callable[[np.ndarray], tuple]


def assemble(num_samples: int, order: np.ndarray, mixed: np.ndarray, k: int, layout: Layout,
             weigh: Optional[Callable[[np.ndarray], tuple]], skipped: np.ndarray, seed: int,
             epoch: int, scale: Optional[np.ndarray] = None) -> MixPlan:
    """:func:`assemble_tiers` with one kind of composite (or none, when ``mixed`` is all False)."""
    tiers = [Tier(mixed, k, layout, weigh)] if mixed.any() else []
    return assemble_tiers(num_samples, order, tiers, skipped, seed, epoch, scale)


def assemble_tiers(num_samples: int, order: np.ndarray, tiers: Sequence[Tier],
                   skipped: np.ndarray, seed: int, epoch: int,
                   scale: Optional[np.ndarray] = None) -> MixPlan:
    """Turn a random walk over the samples into a plan, with streaming passes only.

    ``order`` lists every sample that gets a slot, in a (seed, epoch)-random order; each tier
    marks (disjoint) walk positions that go into its composites. Each run of ``k`` consecutive
    positions of one tier forms one composite, placed where its first member stands; every
    unmarked sample is a single at its own place. So the grouping is as random as the order,
    composites of every tier and singles interleave, and every array of the plan is written front
    to back, never scattered: a 10M-sample plan is bound by memory bandwidth, not by cache misses.
    ``scale`` is an optional per-sample float32[N] loss multiplier; padding entries (a tier
    narrower than the widest) get id -1, weight and loss scale 0.
    """
    members = []
    for tier in tiers:
        at = np.flatnonzero(tier.mixed)
        if at.size % tier.k:
            raise ValueError(f"{at.size} mixed samples do not fill groups of {tier.k}")
        if at.size:
            members.append((tier, at))
    if not members:
        ids = order.reshape(-1, 1)
        loss_scale = np.ones(ids.shape, np.float32) if scale is None else scale[ids]
        return MixPlan(ids, np.ones(ids.shape, np.float32), loss_scale,
                       np.zeros(ids.shape[0], np.uint8), skipped, num_samples, epoch, seed)
    width = max(tier.k for tier, _ in members)
    if len(members) == 1:
        starts = ~members[0][0].mixed
    else:
        starts = np.ones(order.size, dtype=bool)
        for _, at in members:
            starts[at] = False
    for tier, at in members:
        starts[at[::tier.k]] = True
    first = order[starts]  # the single, or the first member of the composite, of every slot
    m = first.size
    ids = np.empty((m, width), dtype=np.int64)
    ids[:, 0] = first
    ids[:, 1:] = -1
    w = np.zeros((m, width), dtype=np.float32)
    w[:, 0] = 1.0
    loss_scale = np.zeros((m, width), dtype=np.float32)
    loss_scale[:, 0] = 1.0 if scale is None else scale[first]
    lay = np.zeros(m, dtype=np.uint8)
    # the slot of each group: a bool mask when there is one tier (the cheaper scatter), else
    # the slot numbers of the groups' first members, counted once for every tier
    slot_of = None if len(members) == 1 else np.cumsum(starts) - 1
    for tier, at in members:
        g = at.size // tier.k
        groups, weights = tier.weigh(order[at].reshape(g, tier.k))
        rows = tier.mixed[starts] if slot_of is None else slot_of[at[::tier.k]]
        if tier.k < width:
            groups, weights = _widen(groups, -1, width), _widen(weights, 0.0, width)
        _set_rows(ids, rows, groups)
        _set_rows(w, rows, weights)
        if scale is None:
            loss_scale[rows, 1:tier.k] = 1.0
        else:
            _set_rows(loss_scale, rows, np.where(groups >= 0, scale[groups], 0.0))
        lay[rows] = np.uint8(tier.layout)
    return MixPlan(ids, w, loss_scale, lay, skipped, num_samples, epoch, seed)


def _widen(rows: np.ndarray, fill: Any, width: int) -> np.ndarray:
    out = np.full((rows.shape[0], width), fill, dtype=rows.dtype)
    out[:, :rows.shape[1]] = rows
    return out


def slot_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The epoch's random walk over all samples: it fixes both grouping and slot order."""
    # int32 where it fits: the same permutation (one shuffle algorithm for every dtype), half
    # the memory to move around
    dtype = np.int32 if num_samples < 2**31 else np.int64
    order = np.arange(num_samples, dtype=dtype)
    epoch_rng(seed, epoch, STREAM_ORDER).shuffle(order)
    return order
