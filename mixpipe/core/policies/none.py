"""The baseline: no mixing. Every sample is its own slot, in a (seed, epoch)-shuffled order."""
from __future__ import annotations

import dataclasses

from ..ledger import LedgerSnapshot
from ..plan import MixPlan
from . import PolicySettings, epoch_rng, register


@dataclasses.dataclass(frozen=True)
class NoneSettings(PolicySettings):
    name = "none"


@register(NoneSettings)
def plan_none(snapshot: LedgerSnapshot, settings: NoneSettings, seed: int, epoch: int) -> MixPlan:
    order = epoch_rng(seed, epoch).permutation(snapshot.num_samples)
    return MixPlan.singles(snapshot.num_samples, epoch=epoch, seed=seed, order=order)
