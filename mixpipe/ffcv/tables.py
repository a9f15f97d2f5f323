"""Per-epoch plan tables that FFCV's compiled pipeline reads without recompiling.

FFCV compiles its pipeline once. numba freezes numpy arrays captured by a compiled closure at
compile time, so a plan written into a captured array after compilation would never be seen.
Instead every table here is allocated ONCE, at its largest size (one row per dataset sample: no
plan has more slots than samples), and the compiled code rebuilds a view of it from its address
on every batch (:func:`table_view`). Each epoch the tables are overwritten in place. The owner
(:class:`PlanTables`, held by the loader and its decoders) keeps the arrays alive.

Decoders add their own per-slot tables (regions, crops) with a fill function that runs after the
plan columns are written; see :meth:`PlanTables.add_table`.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import numba
import numpy as np
from numba.core import cgutils, types
from numba.extending import intrinsic

from ..core.plan import MixPlan

__all__ = ["PlanTables", "table_view", "HEADER_SLOTS", "HEADER_EPOCH", "HEADER_K"]

#: positions in the int64 header table
HEADER_SLOTS, HEADER_EPOCH, HEADER_K, HEADER_SEED = 0, 1, 2, 3

FillFn = Callable[[MixPlan, "PlanTables", np.ndarray], None]


@intrinsic
def _address_as_pointer(typingctx, address):
    """A raw void* from an integer address (numba has no built-in for it)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


def table_view(array: np.ndarray, compiled: bool) -> Callable[[], np.ndarray]:
    """A no-argument function returning ``array`` as the compiled code should see it.

    Compiled: a numba function that wraps the array's memory with ``numba.carray`` on each call,
    so in-place updates are visible. Not compiled (FFCV's ``Compiler`` disabled): Python closures
    see the live object anyway.
    """
    if not array.flags.c_contiguous:
        raise ValueError("plan tables must be C-contiguous to be read through their address")
    if not compiled:
        return lambda: array
    address, shape, dtype = int(array.ctypes.data), tuple(array.shape), array.dtype

    @numba.njit(nogil=True)
    def view():
        return numba.carray(_address_as_pointer(address), shape, dtype)

    return view


class PlanTables:
    """The current epoch's plan, laid out for compiled decoders.

    Arrays (``capacity`` rows, ``max_constituents`` columns; rows past ``num_slots`` are stale):
    ``ids`` int64 (-1 padding), ``weights`` and ``loss_scale`` float32, ``layout`` uint8,
    ``counts`` int64 (constituents per slot), ``header`` int64[4] (slots, epoch, K, seed).
    """

    def __init__(self, capacity: int, max_constituents: int = 4):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (the dataset's sample count), got {capacity}")
        if max_constituents < 1:
            raise ValueError(f"max_constituents must be >= 1, got {max_constituents}")
        self.capacity = int(capacity)
        self.max_constituents = int(max_constituents)
        k = self.max_constituents
        self.ids = np.full((capacity, k), -1, np.int64)
        self.weights = np.zeros((capacity, k), np.float32)
        self.loss_scale = np.zeros((capacity, k), np.float32)
        self.layout = np.zeros(capacity, np.uint8)
        self.counts = np.zeros(capacity, np.int64)
        self.header = np.zeros(4, np.int64)
        self._extra: List[Tuple[np.ndarray, FillFn]] = []
        self.plan: MixPlan | None = None

    @property
    def num_slots(self) -> int:
        return int(self.header[HEADER_SLOTS])

    def add_table(self, per_slot_shape: tuple, dtype, fill: FillFn) -> np.ndarray:
        """Allocate a [capacity, *per_slot_shape] table that ``fill(plan, tables, table)``
        rewrites in place after each :meth:`load`. Tables are filled in the order added."""
        table = np.zeros((self.capacity,) + tuple(per_slot_shape), dtype)
        self._extra.append((table, fill))
        return table

    def check(self, plan: MixPlan) -> None:
        """Raise if ``plan`` does not fit these tables."""
        m, k = plan.ids.shape
        if m > self.capacity:
            raise ValueError(f"plan has {m} slots but the tables hold at most {self.capacity} "
                             "(one per dataset sample); was the plan made for another dataset?")
        if k > self.max_constituents:
            raise ValueError(f"plan has slots of up to {k} constituents but the loader was built "
                             f"with max_constituents={self.max_constituents}; raise it")

    def load(self, plan: MixPlan) -> None:
        """Write ``plan`` into the tables in place (the compiled code sees it on its next batch).

        Only call this while no epoch is being decoded: the tables are shared with the decoders.
        """
        self.check(plan)
        m, k = plan.ids.shape
        self.ids[:m, :k] = plan.ids
        self.ids[:m, k:] = -1
        self.weights[:m, :k] = plan.weights
        self.weights[:m, k:] = 0
        self.loss_scale[:m, :k] = plan.loss_scale
        self.loss_scale[:m, k:] = 0
        self.layout[:m] = plan.layout
        self.counts[:m] = plan.counts
        self.header[HEADER_SLOTS] = m
        self.header[HEADER_EPOCH] = plan.epoch
        self.header[HEADER_K] = k
        self.header[HEADER_SEED] = plan.seed
        self.plan = plan
        for table, fill in self._extra:
            fill(plan, self, table)

    def constituents(self, rows) -> np.ndarray:
        """Every dataset id the given slot rows read (for page scheduling)."""
        ids = self.ids[np.asarray(rows, np.int64)]
        return ids[ids >= 0]
