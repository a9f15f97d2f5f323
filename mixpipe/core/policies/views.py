"""Which view each sample's last loss came from, and a ranking that compares like with like.

A composite shows a constituent shrunk to its region; a single image is seen whole. The two
losses are not on one scale: in a watched CIFAR-10 run a sample's last loss as a constituent was
a third of its loss as a single image under the same model (docs/design.md). Ranking them
together makes every mixed sample look easy, so it stays mixed and is never seen whole again.

:class:`ViewState` remembers which samples the last plan put into composites (one bit each).
:func:`view_quantiles` turns losses into ranks within each view (samples last reported as
constituents among themselves, singles among themselves), so "easy" means easy for its view.
"""
from __future__ import annotations

import dataclasses
import struct
from typing import Optional

import numpy as np

from ..ledger import LedgerSnapshot
from ..plan import MixPlan

__all__ = ["ViewState", "mixed_mask", "view_quantiles"]

_MAGIC = b"MXV1"
_HEADER = struct.Struct("<4sq")  # magic, the epoch of the remembered plan


@dataclasses.dataclass(frozen=True)
class ViewState:
    """The samples one plan (of ``epoch``) put into composites."""

    epoch: int
    mixed: np.ndarray  # bool[N]

    def to_bytes(self) -> bytes:
        return _HEADER.pack(_MAGIC, int(self.epoch)) + np.packbits(self.mixed).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, num_samples: int) -> "ViewState":
        """Parse; ValueError naming the problem for bytes no plan could have written."""
        size = _HEADER.size + (num_samples + 7) // 8
        if len(data) != size:
            raise ValueError(f"mixtrain view state holds {len(data)} bytes, {size} expected for "
                             f"{num_samples} samples: it belongs to another dataset; drop it")
        magic, epoch = _HEADER.unpack_from(data)
        if magic != _MAGIC or epoch < 0:
            raise ValueError("mixtrain view state is not one a mixtrain plan wrote (bad header);"
                             " drop it")
        bits = np.frombuffer(data, np.uint8, offset=_HEADER.size)
        return cls(int(epoch), np.unpackbits(bits, count=num_samples).astype(bool))


def mixed_mask(plan: MixPlan) -> np.ndarray:
    """bool[N]: the samples the plan puts into composites."""
    mixed = np.zeros(plan.num_samples, bool)
    ids = plan.ids[plan.counts > 1]
    mixed[ids[ids >= 0]] = True
    return mixed


def view_quantiles(score: np.ndarray, snapshot: LedgerSnapshot,
                   state: Optional[ViewState]) -> np.ndarray:
    """float64[N]: each seen sample's loss rank within its view, over that view's size, in
    [0, 1) (0: the easiest); NaN for unseen samples.

    A sample's view is "constituent" when its last report came from the remembered plan's epoch
    and that plan mixed it; every other seen sample counts as a single (its last report was a
    single image, or is older than the plan remembered). Ties keep id order.
    """
    seen = (snapshot.count > 0) & np.isfinite(score)
    constituent = np.zeros(score.shape[0], bool)
    if state is not None:
        constituent = state.mixed & (snapshot.last_epoch == state.epoch)
    out = np.full(score.shape[0], np.nan)
    for view in (constituent & seen, ~constituent & seen):
        ids = np.flatnonzero(view)
        if ids.size:
            ranks = np.empty(ids.size)
            ranks[np.argsort(score[ids], kind="stable")] = np.arange(ids.size) / ids.size
            out[ids] = ranks
    return out
