"""Shrink: leave out some easy samples, unbiased, and optionally mix others (InfoBatch-style).

Among the seen samples whose loss is below the mean, a random share ``prune_ratio`` is skipped
for the epoch. The kept below-mean samples carry ``loss_scale = n / (n - k)`` (``n`` below the
mean, ``k = floor(prune_ratio * n)`` skipped), so each below-mean sample's expected loss weight,
P(kept) * scale = ((n - k) / n) * (n / (n - k)), is exactly 1: the expected gradient equals the
full epoch's. With ``k`` a floor the scale is ``~1 / (1 - prune_ratio)`` and never undefined.
Samples at or above the mean, and never-seen ones, are always kept with scale 1. In the last
``anneal_epochs`` of a run of ``epochs`` nothing is skipped, as InfoBatch does, so the final
epochs see the full data.

With ``mix`` set, the remaining samples then go through the mixtrain rules: the lowest-loss ones
among the kept seen samples are mixed, and the mix fraction (or speed-up) counts against the kept
samples, so the epoch's forward passes are ``(N - skipped) / speedup``. A kept below-mean sample
keeps its raised loss scale inside a composite.

Example::

    >>> from mixpipe.core.ledger import Ledger
    >>> from mixpipe.core.policies import make_plan
    >>> ledger = Ledger(8)
    >>> ledger.update(0, np.arange(8), np.array([1, 1, 1, 1, 3, 3, 3, 3], np.float32))
    >>> plan = make_plan(ledger.snapshot(), ShrinkSettings(prune_ratio=0.5), seed=0, epoch=1)
    >>> plan.skipped.size, sorted(set(plan.loss_scale.ravel().tolist()))
    (2, [1.0, 2.0])
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional

import numpy as np

from ..ledger import LedgerSnapshot
from ..plan import MixPlan
from . import PolicySettings, epoch_rng, register
from ._common import STREAM_SKIP, check_choice, check_float, check_int
from .mixtrain import STATISTICS, MixTrainSettings, plan_kept, seen_mask, statistic

__all__ = ["ShrinkSettings", "plan_shrink", "skip_easy", "mix_settings"]


@dataclasses.dataclass(frozen=True)
class ShrinkSettings(PolicySettings):
    """Settings of the shrink policy.

    Attributes:
        prune_ratio: share of the below-mean-loss samples skipped each epoch, in [0, 1).
        statistic: ``ema`` or ``last`` loss to compare with the mean.
        epochs: the run's length (needed only for annealing).
        anneal_epochs: the last ``anneal_epochs`` epochs skip nothing.
        mix: mixtrain settings for the kept samples, or None for skipping only. A dict (as
            ``to_dict`` writes it) is accepted and turned into :class:`MixTrainSettings`.
    """

    name = "shrink"

    prune_ratio: float = 0.5
    statistic: str = "ema"
    epochs: Optional[int] = None
    anneal_epochs: int = 0
    mix: Optional[MixTrainSettings] = None

    def __post_init__(self) -> None:
        check_float(self, "prune_ratio", 0.0, 1.0, hi_open=True)
        check_choice(self, "statistic", STATISTICS)
        check_int(self, "epochs", 1, optional=True)
        check_int(self, "anneal_epochs", 0)
        if self.anneal_epochs and self.epochs is None:
            raise ValueError("ShrinkSettings.anneal_epochs needs ShrinkSettings.epochs (the run's "
                             "length) to be set")
        if self.epochs is not None and self.anneal_epochs > self.epochs:
            raise ValueError(f"ShrinkSettings.anneal_epochs must lie in [0, epochs="
                             f"{self.epochs}], got {self.anneal_epochs}")
        object.__setattr__(self, "mix", mix_settings(self.mix, "ShrinkSettings.mix"))

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        d["mix"] = None if self.mix is None else self.mix.to_dict()
        return d


def mix_settings(mix: Any, where: str) -> Optional[MixTrainSettings]:
    """``mix`` as :class:`MixTrainSettings` (from itself, a ``to_dict()`` dict, or None).

    ``where`` names the field in errors (``"ShrinkSettings.mix"``); shared with ``assist``.
    """
    if mix is None:
        return None
    if isinstance(mix, dict):
        mix = _from_dict(mix, where)
    elif not isinstance(mix, MixTrainSettings):
        raise ValueError(f"{where} must be MixTrainSettings, a dict of its fields or "
                         f"None, got {type(mix).__name__}")
    if mix.skip_hardest:
        raise ValueError(f"{where}.skip_hardest must be 0: the skipping policy decides what it "
                         f"leaves out; give the share to mixtrain itself or set it to 0")
    return mix


def _from_dict(mix: Dict[str, Any], where: str) -> MixTrainSettings:
    d = dict(mix)
    policy = d.pop("policy", MixTrainSettings.name)
    if policy != MixTrainSettings.name:
        raise ValueError(f"{where} must hold {MixTrainSettings.name!r} settings, "
                         f"got policy {policy!r}")
    known = {f.name for f in dataclasses.fields(MixTrainSettings)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where} has no setting(s) {unknown}; known: {sorted(known)}")
    return MixTrainSettings(**d)


def annealed(settings: Any, epoch: int) -> bool:
    """True in the last ``settings.anneal_epochs`` of ``settings.epochs``: skip nothing then."""
    return settings.epochs is not None and epoch >= settings.epochs - settings.anneal_epochs


def skip_easy(score: np.ndarray, seen: np.ndarray, settings: ShrinkSettings, seed: int,
              epoch: int) -> tuple:
    """(skip mask bool[N], per-sample loss scale float32[N] or None) for one epoch."""
    n_all = score.shape[0]
    skip = np.zeros(n_all, dtype=bool)
    if settings.prune_ratio == 0.0 or annealed(settings, epoch) or not seen.any():
        return skip, None
    seen_ids = np.flatnonzero(seen)
    seen_score = score[seen_ids]
    below = seen_ids[seen_score < seen_score.mean(dtype=np.float64)]
    n = below.size
    k = int(math.floor(settings.prune_ratio * n))
    if k == 0:
        return skip, None
    if n_all < 2**31:  # shuffled as int32: the same swaps (they depend on the length only),
        below = below.astype(np.int32)  # half the memory traffic
    epoch_rng(seed, epoch, STREAM_SKIP).shuffle(below)
    skip[below[:k]] = True
    scale = np.ones(n_all, dtype=np.float32)
    scale[below[k:]] = np.float32(n / (n - k))
    return skip, scale


@register(ShrinkSettings)
def plan_shrink(snapshot: LedgerSnapshot, settings: ShrinkSettings, seed: int,
                epoch: int) -> MixPlan:
    score = statistic(snapshot, settings.statistic)
    skip, scale = skip_easy(score, seen_mask(snapshot, score), settings, seed, epoch)
    return plan_kept(snapshot, skip, scale, settings.mix, seed, epoch)
