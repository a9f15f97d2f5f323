"""The baseline: no mixing. Every sample is its own slot, in a (seed, epoch)-shuffled order."""
from __future__ import annotations

import dataclasses

import numpy as np

from ..ledger import LedgerSnapshot
from ..plan import MixPlan
from . import PolicySettings, register
from ._common import slot_order


@dataclasses.dataclass(frozen=True)
class NoneSettings(PolicySettings):
    name = "none"


@register(NoneSettings)
def plan_none(snapshot: LedgerSnapshot, settings: NoneSettings, seed: int, epoch: int) -> MixPlan:
    # the permutation epoch_rng(seed, epoch).permutation(n) gives, shuffled as int32 (half the
    # memory traffic; numpy's shuffle draws the same swaps for every dtype)
    order = slot_order(seed, epoch, snapshot.num_samples).astype(np.int64)
    return MixPlan.singles(snapshot.num_samples, epoch=epoch, seed=seed, order=order)
