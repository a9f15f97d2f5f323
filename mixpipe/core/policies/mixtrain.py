"""MixTrain: mix the samples that teach least on their own, weighted towards the harder one.

A composite costs one forward pass but carries K samples, so every mixed group of K saves K - 1
forward passes. Samples with a low loss are already learned; putting them into composites buys the
speed-up where it costs the least accuracy, while the hard samples (and any sample the trainer has
not reported yet) stay single. Inside a composite the harder constituent gets the larger share,
``w_a = l_a^g / (l_a^g + l_b^g)``, clipped to ``[w_min, 1 - w_min]`` and snapped to the grid of
stride cells the network can pool separately.

Which samples are "easy" is decided by rank, not by value, and in two steps that natural images
forced (docs/design.md, "Natural images"). A constituent shrunk into its region reports a loss
on another scale than a whole image, so each loss is ranked among the losses of its own view
(``calibrate``, the policy's state remembering which samples the last plan mixed); and the mixed
samples are drawn afresh each epoch with weight ``(1 - q) ** ease_power`` by rank ``q``
(``selection="sampled"``), so the easiest are the likeliest but none is kept in composites by
rule. ``selection="lowest"`` takes the lowest ranks, the rule of the paper.

Schedules for the mixed fraction ``f`` of the dataset (``schedule``):

* ``constant``: ``f = fraction``.
* ``ramp``: linear from ``fraction_start`` (first epoch after warm-up) to ``fraction`` over
  ``ramp_epochs`` epochs, then constant.
* ``speedup``: ``f`` set so that the epoch needs ``1 / speedup`` as many forward passes: with
  groups of K, ``slots = N (1 - f (K - 1) / K)``, so ``f = (1 - 1 / speedup) K / (K - 1)``.

Groups of four (``quads``, or ``blend`` with ``group_size=4``): shares proportional to ``l^g``;
each share below ``w_min`` is lifted to it and the difference is taken from the shares above
``w_min`` in proportion to their excess (for pairs this is exactly the clip above). A 2x2 grid
cannot give four free areas (its cells are products of one column and one row split), so the
constituents are placed by loss, hardest top-left and easiest bottom-right, and the shares are
snapped with :func:`mixpipe.core.layouts.snap_weights`; the areas keep the order of the losses.

Tiers (``halves_share``, quads only): the mixed samples split by loss once more. The hardest
``halves_share`` of them go into HALVES, where each keeps half the area instead of a quarter, and
the rest into QUADS: the hardest samples single, the middle ones at half resolution, the easiest
at a quarter. Halves save one pass per two samples instead of three per four, so the same bound
needs a larger mixed fraction (:func:`tier_groups` is the one count).

Pairing: one (seed, epoch)-random walk over the samples decides everything random: consecutive
mixed samples along the walk form a group, and each slot sits where its (first) sample stands, so
composites and singles interleave through the epoch.

The fraction counts samples of the whole dataset (so the promised speed-up is a speed-up of the
epoch); when fewer samples have been seen, all seen ones may be mixed and no more. Leftovers that
do not fill a group stay single.

``grid_cells``, when set, is the composite's width in stride cells (7 for a 224 px input at total
stride 32, 4 for 32 px at stride 8): the shares are then recorded as the areas that grid really
gives (with an odd number of cells an even split is impossible, so equal losses give 4/7 and
3/7). Left unset, the shares stay as the rules set them and each loader snaps the geometry to its
own image size and stride.

Example::

    >>> from mixpipe.core.ledger import Ledger
    >>> from mixpipe.core.policies import make_plan
    >>> ledger = Ledger(8)
    >>> ledger.update(0, np.arange(8), np.linspace(0.1, 2.0, 8, dtype=np.float32))
    >>> settings = MixTrainSettings(schedule="constant", fraction=0.5, layout="halves",
    ...                             selection="lowest")
    >>> plan = make_plan(ledger.snapshot(), settings, seed=0, epoch=1)
    >>> plan.num_slots, sorted(plan.ids[plan.counts == 2].ravel().tolist())
    (6, [0, 1, 2, 3])
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import numpy as np

from ..ledger import LedgerSnapshot
from ..plan import Layout, MixPlan
from . import STATE_CHECKS, PolicySettings, epoch_rng, register, register_stateful
from ._common import (LAYOUTS, STREAM_SELECT, Tier, assemble_tiers, check_choice, check_float,
                      check_int, group_weights, groups_for_fraction, resolve_group_size, slot_order)
from .views import ViewState, mixed_mask, view_quantiles

__all__ = ["MixTrainSettings", "plan_mixtrain", "mixing_fraction", "tier_groups",
           "epoch_forward_inputs", "sampled_order", "samples_per_slot", "skip_count", "hardest_fresh", "choose_tiers", "walk_tiers",
           "plan_kept",
           "lowest_per_class", "weigher", "statistic", "seen_mask"]

SCHEDULES = ("constant", "ramp", "speedup")
SELECTIONS = ("lowest", "sampled")
#: a ramp's length when the run's length is not given: the 20-epoch benchmark's (one warm-up
#: epoch, nineteen mixed ones)
DEFAULT_RAMP_EPOCHS = 18
STATISTICS = ("ema", "last")


@dataclasses.dataclass(frozen=True)
class MixTrainSettings(PolicySettings):
    """Settings of the mixtrain policy (see the module docstring for the rules).

    Attributes:
        warmup_epochs: epochs ``0 .. warmup_epochs - 1`` mix nothing (the ledger is empty or thin).
        schedule: ``constant``, ``ramp`` or ``speedup``: how the mixed fraction is set per epoch.
        fraction: the mixed fraction of the dataset (constant value, or the ramp's end).
        fraction_start: the ramp's value in the first epoch after warm-up.
        ramp_epochs: epochs the ramp takes to reach ``fraction``; None: to the run's last mixed
            epoch when ``epochs`` is set, else ``DEFAULT_RAMP_EPOCHS``.
        speedup: target forward-pass speed-up for ``schedule="speedup"``, in ``[1, group_size]``.
        statistic: ``last`` (the default) or ``ema`` (smoothed) loss to rank and weight samples.
        gamma: sharpness of the loss-driven shares (0: equal shares).
        w_min: no constituent gets less than this share, in ``[0, 1 / group_size]``; None picks
            ``min(0.25, 1 / group_size)``: 0.25 for pairs, and for quads equal quarters (a 2x2
            grid cannot give four free areas anyway).
        layout: ``halves``, ``quads`` or ``blend`` (blend weights are not snapped).
        group_size: constituents per composite; None picks the layout's own (2, 4, 2).
        grid_cells: composite width in stride cells (>= 2), to record spatial shares as the areas
            the grid really gives; None leaves them as the policy set them, and every loader
            snaps its geometry to its own image size and stride (the areas follow from the input
            without anyone setting them by hand).
        epochs, final_full_epochs: with the run's length known, its last ``final_full_epochs``
            epochs mix nothing.
        per_class: when the service knows the labels, mix the same share of every class (the
            lowest-loss samples within each class) instead of the lowest-loss samples overall.
            Low losses cluster by class, so mixing by overall loss can turn "mixed" into a
            class cue; per-class selection removes the cue. It is off by default because it
            did not pay on the full data set (figures in benchmarks/README.md). Without labels
            it has no effect.
        halves_share: with ``layout="quads"``, the share of the mixed samples (the hardest of
            them) that go into HALVES instead: three tiers, the hardest samples single, the
            middle ones in pairs at half the area, the easiest in quads at a quarter. The
            mixed fraction still counts every mixed sample, so a tier of halves saves fewer
            passes than the same samples in quads (see :func:`tier_groups`).
        selection: how the mixed samples are chosen from the ranking. ``lowest``: always the
            lowest losses. ``sampled``: drawn afresh each epoch, without replacement, with a
            weight ``(1 - q) ** ease_power`` where ``q`` in [0, 1) is the sample's loss rank
            among those that may be mixed (0: the easiest). The easiest are the likeliest to be
            mixed and the very hardest never are, but no sample is mixed every epoch by rule,
            so every one is seen whole now and then, and a choice that follows loss cannot
            freeze into a choice of classes or of one view.
        calibrate: rank each sample's loss within the view it was last reported from (as a
            constituent, or as a single image) instead of all losses together: a shrunk view
            reports a loss on another scale, so a joint ranking makes every mixed sample look
            easy and keeps it mixed (:mod:`mixpipe.core.policies.views`). The policy then
            remembers which samples its last plan mixed (its state, one bit per sample); without
            a state (the first plan, or the stateless ``make_plan``) every loss counts as a
            single image's.
        ease_power: sharpness of ``sampled`` (0: uniform, as random mixing; large: nearly
            ``lowest``).
        skip_hardest: in a mixed epoch, leave out this share of the dataset: the samples with
            the highest loss among those reported in the last committed epoch. Hard samples
            are the ones mixtrain keeps single, so late in a run its single images are its
            hardest fifth, and a mislabelled or ambiguous image among them weighs far more
            than in plain training. Only freshly reported losses qualify, so a left-out
            sample is back the next epoch (its loss is then measured again): it is halved,
            not dropped. The mixed fraction then counts against the kept samples.
    """

    name = "mixtrain"

    # the defaults are the benchmark's chosen settings (benchmarks/README.md): QUADS composites of
    # the lowest-last-loss 45 % of the data after one warm-up epoch, rising to 80 % at the end,
    # each loss ranked within the view it came from
    warmup_epochs: int = 1
    schedule: str = "ramp"
    fraction: float = 0.80
    fraction_start: float = 0.45
    ramp_epochs: Optional[int] = None
    speedup: float = 1.25
    statistic: str = "last"
    gamma: float = 1.0
    w_min: Optional[float] = None
    layout: str = "quads"
    group_size: Optional[int] = None
    grid_cells: Optional[int] = None
    epochs: Optional[int] = None
    final_full_epochs: int = 0
    per_class: bool = False
    halves_share: float = 0.0
    skip_hardest: float = 0.0
    selection: str = "sampled"
    ease_power: float = 1.0
    calibrate: bool = True

    def __post_init__(self) -> None:
        resolve_group_size(self)
        k = self.group_size
        check_int(self, "warmup_epochs", 0)
        check_choice(self, "schedule", SCHEDULES)
        check_float(self, "fraction", 0.0, 1.0)
        check_float(self, "fraction_start", 0.0, 1.0)
        if self.ramp_epochs is None:
            ramp = DEFAULT_RAMP_EPOCHS if self.epochs is None else max(
                self.epochs - self.warmup_epochs - self.final_full_epochs - 1, 0)
            object.__setattr__(self, "ramp_epochs", ramp)
        check_int(self, "ramp_epochs", 0)
        check_float(self, "speedup", 1.0, float(k))
        check_choice(self, "statistic", STATISTICS)
        check_float(self, "gamma", 0.0, 64.0)
        if self.w_min is None:
            object.__setattr__(self, "w_min", min(0.25, 1.0 / k))
        check_float(self, "w_min", 0.0, 1.0 / k)
        check_int(self, "grid_cells", 2, optional=True)
        check_int(self, "epochs", 1, optional=True)
        check_int(self, "final_full_epochs", 0)
        check_float(self, "halves_share", 0.0, 1.0)
        check_float(self, "skip_hardest", 0.0, 0.5)
        check_choice(self, "selection", SELECTIONS)
        check_float(self, "ease_power", 0.0, 64.0)
        if self.halves_share and self.layout != "quads":
            raise ValueError(f"MixTrainSettings.halves_share needs layout='quads' (it moves the "
                             f"hardest mixed samples from quads into halves), got layout "
                             f"{self.layout!r}; set halves_share=0 or layout='quads'")
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"MixTrainSettings.calibrate must be True or False, got "
                             f"{self.calibrate!r}")
        if not isinstance(self.per_class, bool):
            raise ValueError(f"MixTrainSettings.per_class must be True or False, got "
                             f"{self.per_class!r}")
        if self.final_full_epochs and self.epochs is None:
            raise ValueError("MixTrainSettings.final_full_epochs needs MixTrainSettings.epochs "
                             "(the run's length) to be set")
        if self.epochs is not None and self.final_full_epochs > self.epochs:
            raise ValueError(f"MixTrainSettings.final_full_epochs must lie in [0, epochs="
                             f"{self.epochs}], got {self.final_full_epochs}")

    @property
    def layout_code(self) -> Layout:
        return LAYOUTS[self.layout][0]


def mixing_fraction(settings: MixTrainSettings, epoch: int) -> float:
    """The fraction of the dataset the schedule puts into composites in ``epoch``."""
    s = settings
    if epoch < s.warmup_epochs:
        return 0.0
    if s.epochs is not None and epoch >= s.epochs - s.final_full_epochs:
        return 0.0
    if s.schedule == "constant":
        return s.fraction
    if s.schedule == "ramp":
        done = 1.0 if s.ramp_epochs == 0 else min(1.0, (epoch - s.warmup_epochs) / s.ramp_epochs)
        return s.fraction_start + (s.fraction - s.fraction_start) * done
    k = s.group_size
    return min(1.0, (1.0 - 1.0 / s.speedup) * k / (k - 1))


def statistic(snapshot: LedgerSnapshot, name: str) -> np.ndarray:
    """The per-sample loss a policy ranks by: the EMA or the last reported loss (float32[N])."""
    return snapshot.ema if name == "ema" else snapshot.last_loss


def seen_mask(snapshot: LedgerSnapshot, score: np.ndarray) -> np.ndarray:
    """Samples with at least one reported (finite) loss: the only ones a policy may act on."""
    return (snapshot.count > 0) & np.isfinite(score)


def lowest_per_class(score: np.ndarray, pool_mask: np.ndarray, n: int,
                     labels: np.ndarray) -> np.ndarray:
    """bool[N]: ``n`` pool samples, the lowest-``score`` ones of each class, every class
    contributing the same share of its pool samples.

    Quotas are split by largest remainder so they add up to exactly ``n``; within a class, ties
    are taken in id order (a stable sort of the pool, which is in id order).
    """
    pool = np.flatnonzero(pool_mask)
    if n <= 0 or pool.size == 0:
        return np.zeros(score.shape[0], dtype=bool)
    if n > pool.size:
        raise ValueError(f"cannot choose {n} samples from a pool of {pool.size}")
    lab = np.asarray(labels)[pool]
    by_class = np.lexsort((score[pool], lab))  # class first, then loss, then id
    sizes = np.bincount(lab)
    exact = sizes * (n / pool.size)
    quota = np.floor(exact).astype(np.int64)
    short = n - int(quota.sum())
    if short:
        # the classes with the largest fractional parts (lowest class id first on ties)
        frac_order = np.lexsort((np.arange(sizes.size), -(exact - quota)))
        quota[frac_order[:short]] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sorted_lab = lab[by_class]
    rank_in_class = np.arange(pool.size) - starts[sorted_lab]
    mask = np.zeros(score.shape[0], dtype=bool)
    mask[pool[by_class[rank_in_class < quota[sorted_lab]]]] = True
    return mask


def tier_groups(settings: MixTrainSettings, fraction: float, base: int,
                pool: int) -> list:
    """``[(k, layout, groups), ...]``, easiest tier first: the composites that put ``fraction``
    of ``base`` samples into the settings' tiers, clipped to the ``pool`` that may be mixed.

    The one count of both the policy and anyone predicting its forward inputs (a tier of
    ``groups`` composites of ``k`` saves ``groups * (k - 1)`` passes). Without ``halves_share``
    this is one tier of :func:`groups_for_fraction` groups; with it, the halves take the share of
    the mixed samples nearest to ``halves_share`` that pairs can fill, the quads the rest.
    """
    k = settings.group_size
    if not settings.halves_share:
        return [(k, settings.layout_code, groups_for_fraction(fraction, base, k, pool))]
    wanted = fraction * base
    pairs = int(math.floor(settings.halves_share * wanted / 2 + 0.5))
    quads = max(0, int(math.floor((wanted - 2 * pairs) / 4 + 0.5)))
    quads = min(quads, pool // 4)
    pairs = max(0, min(pairs, (pool - 4 * quads) // 2))
    return [(4, Layout.QUADS, quads), (2, Layout.HALVES, pairs)]


def skip_count(settings: MixTrainSettings, epoch: int, num_samples: int) -> int:
    """How many of the hardest samples a mixed epoch leaves out (before the cap to those with a
    fresh loss)."""
    if not settings.skip_hardest or mixing_fraction(settings, epoch) <= 0.0:
        return 0
    return int(math.floor(settings.skip_hardest * num_samples + 0.5))


def epoch_forward_inputs(settings: MixTrainSettings, epoch: int, base: int) -> int:
    """Forward inputs of an epoch over ``base`` samples, every one of them reported in the
    epoch before unless left out then: the budget a plain run must match."""
    fraction = mixing_fraction(settings, epoch)
    if fraction <= 0.0:
        return base
    kept = base - skip_count(settings, epoch, base)
    return kept - sum(g * (k - 1) for k, _, g in tier_groups(settings, fraction, kept, kept))


def samples_per_slot(settings: MixTrainSettings, epochs: int, num_samples: int) -> float:
    """Samples a slot carries on average over a run of ``epochs`` (the kept samples over the
    forward inputs): a loader batch of ``B / samples_per_slot`` slots then holds ``B`` samples
    on average, so the optimiser takes as many steps per epoch of data as the plain model's
    with batch ``B``. A batch of ``B`` composites would instead average the gradient over more
    samples per step and take fewer steps, a larger effective batch at the same learning rate.
    """
    kept = inputs = 0
    for epoch in range(epochs):
        kept += num_samples - skip_count(settings, epoch, num_samples)
        inputs += epoch_forward_inputs(settings, epoch, num_samples)
    return kept / max(inputs, 1)


def hardest_fresh(snapshot: LedgerSnapshot, score: np.ndarray, settings: MixTrainSettings,
                  epoch: int) -> np.ndarray:
    """bool[N]: the samples a mixed epoch leaves out (:attr:`MixTrainSettings.skip_hardest`):
    the highest-``score`` ones among those reported in the last committed epoch, ties in id
    order."""
    skip = np.zeros(snapshot.num_samples, dtype=bool)
    count = skip_count(settings, epoch, snapshot.num_samples)
    if count == 0:
        return skip
    fresh = seen_mask(snapshot, score) & (snapshot.last_epoch == snapshot.committed_epoch)
    count = min(count, int(np.count_nonzero(fresh)))
    if count == 0:
        return skip
    fresh_ids = np.flatnonzero(fresh)
    # descending by score, ascending by id among ties (a stable sort of the ids, in id order)
    by_score = fresh_ids[np.argsort(-score[fresh_ids], kind="stable")]
    skip[by_score[:count]] = True
    return skip


def _lowest(score: np.ndarray, pool_mask: np.ndarray, n: int, per_class: bool,
            labels: Optional[np.ndarray]) -> np.ndarray:
    """bool[N]: the ``n`` lowest-``score`` samples of the pool; ties in id order."""
    available = int(np.count_nonzero(pool_mask))
    if n == available:
        return pool_mask.copy()
    if labels is not None and per_class:
        return lowest_per_class(score, pool_mask, n, labels)
    everyone = available == score.shape[0]
    # the n-th lowest loss of the pool (partitioning values, not indices: half the memory)
    cut = np.partition(score if everyone else score[pool_mask], n - 1)[n - 1]
    mask = score < cut
    tied = score == cut
    if not everyone:
        mask &= pool_mask
        tied &= pool_mask
    need = n - int(np.count_nonzero(mask))
    mask[np.flatnonzero(tied)[:need]] = True
    return mask


def choose_tiers(score: np.ndarray, pool_mask: np.ndarray, base: int,
                 settings: MixTrainSettings, epoch: int,
                 labels: Optional[np.ndarray] = None) -> list:
    """``[(bool[N] members, k, layout), ...]``: the lowest-``score`` samples of the pool that
    the epoch's schedule mixes, easiest tier first; empty when nothing is mixed.

    ``pool_mask`` marks the samples that may be mixed (seen, not skipped); ``base`` is the number
    of samples the fraction counts against. Each tier takes the lowest-loss samples the tiers
    before it left. With ``labels`` and ``settings.per_class`` each tier is taken class by
    class (:func:`lowest_per_class`). Samples tied with a cut-off loss are taken in id order, so
    the choice does not depend on how numpy partitions. Shared with ``shrink``.
    """
    fraction = mixing_fraction(settings, epoch)
    if fraction <= 0.0:
        return []
    available = int(np.count_nonzero(pool_mask))
    tiers, left = [], pool_mask
    counts = [t for t in tier_groups(settings, fraction, base, available) if t[2] > 0]
    for i, (k, layout, groups) in enumerate(counts):
        members = _lowest(score, left, groups * k, settings.per_class, labels)
        tiers.append((members, k, layout))
        if i + 1 < len(counts):
            left = left & ~members
    return tiers


def sampled_order(score: np.ndarray, pool_mask: np.ndarray, power: float,
                  rng: np.random.Generator) -> np.ndarray:
    """float64[N], lower first: a random order of the pool in which taking the ``n`` lowest is
    drawing ``n`` samples without replacement with weights ``(1 - q) ** power`` (``q``: the
    sample's loss rank in the pool over the pool's size; Gumbel top-k). Outside the pool: +inf.
    """
    out = np.full(score.shape[0], np.inf)
    pool = np.flatnonzero(pool_mask)
    if pool.size == 0:
        return out
    q = np.empty(pool.size)
    q[np.argsort(score[pool], kind="stable")] = np.arange(pool.size) / pool.size
    gumbel = rng.gumbel(size=pool.size)
    out[pool] = -(power * np.log1p(-q) + gumbel)
    return out


def walk_tiers(tiers: list, order: np.ndarray, score: np.ndarray,
               settings: MixTrainSettings) -> list:
    """:func:`choose_tiers`' members as :class:`Tier` s along the epoch's walk ``order``."""
    return [Tier(members[order], k, layout, weigher(score, settings, layout))
            for members, k, layout in tiers]


def weigher(score: np.ndarray, settings: MixTrainSettings, layout: Layout):
    """``groups -> (groups, weights)`` with the loss-driven, clipped and snapped shares of one
    tier's ``layout``."""
    s = settings

    def weigh(groups: np.ndarray) -> tuple:
        return group_weights(groups, score[groups], s.gamma, s.w_min, layout, s.grid_cells)

    return weigh


@register(MixTrainSettings)
def plan_mixtrain(snapshot: LedgerSnapshot, settings: MixTrainSettings, seed: int,
                  epoch: int) -> MixPlan:
    return _plan(snapshot, settings, seed, epoch, None)


@register_stateful(MixTrainSettings)
def plan_mixtrain_step(snapshot: LedgerSnapshot, settings: MixTrainSettings, seed: int,
                       epoch: int, state: Optional[bytes]) -> Tuple[MixPlan, Optional[bytes]]:
    """(plan, state): with ``calibrate`` the state remembers which samples this plan mixed, so
    the next plan knows which view each loss came from; without it, no state."""
    if not settings.calibrate:
        return _plan(snapshot, settings, seed, epoch, None), state
    view = None if state is None else ViewState.from_bytes(state, snapshot.num_samples)
    plan = _plan(snapshot, settings, seed, epoch, view)
    return plan, ViewState(epoch, mixed_mask(plan)).to_bytes()


def _plan(snapshot: LedgerSnapshot, settings: MixTrainSettings, seed: int, epoch: int,
          view: Optional[ViewState]) -> MixPlan:
    score = statistic(snapshot, settings.statistic)
    skip = hardest_fresh(snapshot, score, settings, epoch)
    rank = view_quantiles(score, snapshot, view) if settings.calibrate else None
    return plan_kept(snapshot, skip, None, settings, seed, epoch, rank)


def check_state(state: bytes, num_samples: int) -> None:
    """Refuse a state no mixtrain plan could have written (the server asks before taking one
    from outside)."""
    ViewState.from_bytes(state, num_samples)


STATE_CHECKS[MixTrainSettings.name] = check_state


def plan_kept(snapshot: LedgerSnapshot, skip: np.ndarray, scale: Optional[np.ndarray],
              mix: Optional[MixTrainSettings], seed: int, epoch: int,
              rank: Optional[np.ndarray] = None) -> MixPlan:
    """The plan of the samples not in ``skip`` (bool[N]), mixed by ``mix`` if set.

    Shared by every policy that leaves samples out (mixtrain's ``skip_hardest``, shrink,
    assist): the mix fraction counts against the kept samples and only kept seen samples are
    mixed; ``scale`` (float32[N] or None) is each sample's loss multiplier, kept inside
    composites. ``rank`` (float[N], lower: easier) orders the choice of whom to mix in place of
    the loss (the shares inside a composite still follow the loss).
    """
    n = snapshot.num_samples
    skipped = np.flatnonzero(skip)
    order = slot_order(seed, epoch, n)
    if skipped.size:
        order = order[~skip[order]]
    if mix is None:
        return assemble_tiers(n, order, [], skipped, seed, epoch, scale)
    mix_score = statistic(snapshot, mix.statistic)
    pool = seen_mask(snapshot, mix_score) & ~skip
    ranked = mix_score if rank is None else rank
    rank_score = ranked if mix.selection == "lowest" else sampled_order(
        ranked, pool, mix.ease_power, epoch_rng(seed, epoch, STREAM_SELECT))
    tiers = choose_tiers(rank_score, pool, order.size, mix, epoch, snapshot.labels)
    return assemble_tiers(n, order, walk_tiers(tiers, order, mix_score, mix), skipped, seed,
                          epoch, scale)
