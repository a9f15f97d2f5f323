"""Naive mixing: the control arm for mixtrain.

A fixed fraction of all samples, chosen at random and grouped at random, with equal shares. It
saves exactly as many forward passes as mixtrain at the same fraction, so comparing the two
isolates what the losses add (which samples are mixed and how they are weighted).

Spatial shares are snapped to ``grid_cells`` stride cells like mixtrain's, so with an odd grid
(the default 7: 224 px at stride 32) "equal" halves are 4/7 and 3/7; the first id of a group (a
random one) gets the larger part.

Example::

    >>> from mixpipe.core.ledger import Ledger
    >>> from mixpipe.core.policies import make_plan
    >>> plan = make_plan(Ledger(10).snapshot(), RandomSettings(fraction=0.4), seed=0, epoch=0)
    >>> plan.num_slots, int((plan.counts == 2).sum())
    (8, 2)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..ledger import LedgerSnapshot
from ..plan import Layout, MixPlan
from . import PolicySettings, register
from ._common import (LAYOUTS, assemble, check_float, check_int, groups_for_fraction,
                      resolve_group_size, slot_order, snap_shares, spread)

__all__ = ["RandomSettings", "plan_random"]


@dataclasses.dataclass(frozen=True)
class RandomSettings(PolicySettings):
    """Settings of the random policy.

    Attributes:
        fraction: share of the whole dataset (seen or not) put into composites, in [0, 1].
        layout: ``halves``, ``quads`` or ``blend``.
        group_size: constituents per composite; None picks the layout's own (2, 4, 2).
        grid_cells: composite width in stride cells, for recording spatial shares as the grid's
            real areas (>= 2); None: equal shares as they are, each loader snaps the geometry.
    """

    name = "random"

    fraction: float = 0.5
    layout: str = "halves"
    group_size: Optional[int] = None
    grid_cells: Optional[int] = None

    def __post_init__(self) -> None:
        resolve_group_size(self)
        check_float(self, "fraction", 0.0, 1.0)
        check_int(self, "grid_cells", 2, optional=True)

    @property
    def layout_code(self) -> Layout:
        return LAYOUTS[self.layout][0]


@register(RandomSettings)
def plan_random(snapshot: LedgerSnapshot, settings: RandomSettings, seed: int,
                epoch: int) -> MixPlan:
    n = snapshot.num_samples
    k = settings.group_size
    groups = groups_for_fraction(settings.fraction, n, k, n)
    equal = snap_shares(settings.layout_code, np.full((1, k), 1.0 / k), settings.grid_cells)
    # Fixed, evenly spread places in a uniformly random walk pick a uniformly random set of
    # samples and a uniformly random grouping, with composites spread evenly over the epoch.
    return assemble(n, slot_order(seed, epoch, n), spread(groups * k, n), k,
                    settings.layout_code, lambda ids: (ids, np.broadcast_to(equal, ids.shape)),
                    np.empty(0, np.int64), seed, epoch)
