"""What defines a speed-up run, and how each arm's selection policy follows from it.

Arms (``policies``):

- ``none``: every sample alone, every epoch: the full-length baseline.
- ``budget``: the plain model trained on as many forward inputs as ``mixtrain`` uses, with the
  learning-rate schedule spread over that shorter run (a partial last epoch rather than rounding).
  The equal-compute baseline every mixing arm must beat.
- ``progressive``: the plain model with progressive resizing (FFCV's ResNet recipes: small
  images first, full size from late in the run), as long as buys the FLOPs of ``budget``'s
  run (:mod:`.progressive`). The equal-compute baseline with the best-known plain-model trick.
- ``random``: naive mixing, matched to mixtrain's forward inputs over the run.
- ``mixtrain``: the loss-driven policy; ``shrink``, ``assist``: skipping;
  ``shrink+mixtrain``, ``assist+mixtrain``: skip some easy samples, mix the next ones.
- ``local-static``, ``local-dynamic``: the plain model on every sample, with LoCal+SGD's local
  rule in place of backpropagation in the early blocks (:mod:`mixpipe.train.local`): it saves
  backward work, not forward inputs.

``budget`` and ``progressive`` match the compute of the arm ``budget_match`` names, counted in
full passes of the plain model (forward inputs, or for a LoCal arm its FLOPs over a plain
pass's): predicted from the schedule for mixtrain and random, and taken from that arm's run in
the same seed otherwise (the matched arm then runs first).

``frontier`` adds the plain model at fractions of the run (``none@0.55`` ...), the curve a method
must lie above to be worth using.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import List, Optional, Tuple

from mixpipe.bench.flags import field
from mixpipe.core.policies import PolicySettings
from mixpipe.core.policies.assist import AssistSettings
from mixpipe.core.policies.budget import BudgetSettings, whole_epochs
from mixpipe.core.policies.mixtrain import MixTrainSettings
from mixpipe.core.policies.none import NoneSettings
from mixpipe.core.policies.random import RandomSettings
from mixpipe.core.policies.shrink import ShrinkSettings

__all__ = ["SpeedupSettings", "POLICIES", "MIXING", "QUICK", "arm_names", "arm_policy",
           "arm_epochs", "budget_epochs", "run_epochs", "run_order", "seed_arms",
           "recalibration_images", "splits_norms", "trains_plain_model", "PLAIN_ARMS",
           "FRONTIER_PREFIX", "eval_framing", "arm_batch_size", "MATCHING_ARMS",
           "matched_forward_inputs", "LOCAL_ARMS", "arm_local", "traces_frontier"]

POLICIES = ("none", "budget", "progressive", "random", "mixtrain", "shrink", "shrink+mixtrain",
            "assist", "assist+mixtrain", "local-static", "local-dynamic")
#: arms that train the plain model with LoCal+SGD, by the kind of boundary schedule
LOCAL_ARMS = {"local-static": "static", "local-dynamic": "dynamic"}
#: arms whose compute a budget arm can match
MIXING = ("random", "mixtrain", "shrink", "shrink+mixtrain", "assist", "assist+mixtrain",
          *LOCAL_ARMS)
LOADERS = ("torch", "dali", "ffcv")
LAYOUTS = ("halves", "quads")
MIX_SCHEDULES = ("constant", "ramp")
STATISTICS = ("ema", "last")  # mixpipe.core.policies.mixtrain.STATISTICS
NORMALISATIONS = ("constituent", "slot")  # mixpipe.train.loss.NORMALISATIONS, without torch
LOSS_PER = "slot"  # mixpipe.train.loss's default; a test holds the two equal
AUGMENTS = ("none", "flip", "crop")
EVAL_SPLITS = ("val", "test")
FASHION = "fashion-mnist"
FRONTIER_PREFIX = "none@"
#: policies that train the plain (unmixed) model; with the frontier arms they trace the frontier
PLAIN_ARMS = ("none", "budget", "progressive")
#: arms whose length is set by the compute of the arm ``budget_match`` names
MATCHING_ARMS = ("budget", "progressive")


#: ImageNet's evaluation framing (resize to 256, centre crop 224): the counterpart of training
#: on random crops (mixpipe.train.evaluate.IMAGENET_CROP_RATIO, kept here free of torch)
CROP_EVAL_RATIO = 224 / 256
#: loaders whose ``--augment crop`` trains on random crops; the FFCV arm decodes whole images
#: under every --augment (SimpleMixDecoder), so its model never saw a crop
CROPPING_LOADERS = ("torch", "dali")


def eval_framing(augment: str, loader: str, explicit: Optional[float] = None) -> float:
    """The evaluation's centre-crop ratio, following what training shows the model.

    A model trained on whole images resized to their regions must be scored on whole images:
    a 0.875 centre crop zooms them in by 14 % and cost the plain model 9 points on CIFAR-10.
    Only training on random crops is scored on ImageNet's centre crop. ``explicit`` (the
    ``--eval-crop-ratio`` flag) wins over the rule."""
    if explicit is not None:
        return float(explicit)
    return CROP_EVAL_RATIO if augment == "crop" and loader in CROPPING_LOADERS else 1.0


def trains_plain_model(arm: str) -> bool:
    """Whether the arm trains the plain model (none, budget, progressive, a LoCal arm, a
    frontier point) on single images, not a mixing one."""
    return arm in PLAIN_ARMS or arm in LOCAL_ARMS or arm.startswith(FRONTIER_PREFIX)


def traces_frontier(arm: str) -> bool:
    """Whether the arm is a point of the plain model's accuracy-against-compute curve: full
    backpropagation on every sample for some share of the run (none, budget, a frontier point),
    the curve every faster method must lie above at its own compute."""
    return arm in ("none", "budget") or arm.startswith(FRONTIER_PREFIX)


def arm_local(arm: str, s: "SpeedupSettings") -> Optional[str]:
    """The LoCal+SGD boundary schedule the arm trains with: its own for a LoCal arm, else
    ``--local`` (which applies it to every arm), else None."""
    return LOCAL_ARMS.get(arm, s.local)


@dataclasses.dataclass(frozen=True)
class SpeedupSettings:
    """Everything that defines a speed-up run; recorded in the JSON beside the results.

    Every field is a flag of ``mixpipe bench speedup`` (:mod:`mixpipe.bench.flags`).
    """

    data: str = field(FASHION, "'fashion-mnist' (prepared on first use) or a directory written "
                               "by `mixpipe data prepare tree`")
    data_root: str = field("data/fashion-mnist", "where Fashion-MNIST is prepared")
    eval_split: str = field("val", "split scored after every epoch: 'val' (held out of the "
                                   "training images; choose settings here) or 'test' (score once,"
                                   " for the record)", choices=EVAL_SPLITS, flag="--eval")
    loader: str = field("torch", "loader that composes the batches", choices=LOADERS)
    model: str = field("resnet-tiny", "resnet-tiny | resnet-small | resnet-wide | vit-small, or "
                                      "tv:NAME for torchvision.models.NAME when installed")
    epochs: int = field(10, "epochs of the full-length arms")
    policies: Tuple[str, ...] = field(("none", "budget", "random", "mixtrain"),
                                      "arms, run side by side in every seed", choices=POLICIES)
    frontier: Tuple[float, ...] = field((), "also train the plain model for these fractions of "
                                            "the epochs (e.g. 0.4,0.55,0.7): the frontier a "
                                            "mixing arm must beat")
    frontier_seeds: Tuple[int, ...] = field((), "the seeds the frontier arms run in (empty: "
                                                "every seed); a frontier from fewer seeds "
                                                "costs less of a long run")
    seeds: Tuple[int, ...] = field((0, 1), "seeds (the outer loop; arms run inside each)")
    batch_size: int = field(128, "samples per batch (see --batch-unit)")
    batch_unit: str = field("samples", "what --batch-size counts. samples: a mixing arm's "
                            "batch holds that many samples on average (batch-size / samples "
                            "per composite, over its run), so every arm takes as many optimiser "
                            "steps per epoch of data; slots: composites and single images alike "
                            "(a batch of composites then averages over more samples per step)",
                            choices=("samples", "slots"))
    lr: float = field(0.1, "base learning rate (SGD)")
    momentum: float = field(0.9, "SGD momentum (Nesterov when > 0)")
    weight_decay: float = field(5e-4, "weight decay of the weights (not of biases and norms)")
    schedule: str = field("cosine", "learning-rate decay to zero over each arm's own run",
                          choices=("cosine", "linear"))
    warmup: float = field(0.0, "share of the run spent ramping the learning rate up")
    layout: str = field(MixTrainSettings.layout, "composite layout of the mixing arms", choices=LAYOUTS)
    fraction: float = field(MixTrainSettings.fraction, "share of the dataset mixtrain mixes per epoch after warm-up "
                                  "(with a ramp: in its last mixed epoch)")
    mix_schedule: str = field(MixTrainSettings.schedule, "mixtrain's share per epoch: constant, or a linear ramp "
                                      "over the mixed epochs from --fraction-start to --fraction",
                              choices=MIX_SCHEDULES)
    fraction_start: Optional[float] = field(MixTrainSettings.fraction_start,
                                            "the ramp's first mixed epoch (none with "
                                            "--mix-schedule constant)")
    statistic: str = field(MixTrainSettings.statistic,
                           "mixtrain ranks samples by their loss EMA or last loss",
                           choices=STATISTICS)
    gamma: float = field(MixTrainSettings.gamma, "sharpness of the loss-driven shares (0: equal shares)")
    w_min: float = field(0.25, "smallest share a constituent gets")
    per_class: bool = field(False, "mixtrain mixes the same share of every class")
    halves_share: float = field(MixTrainSettings.halves_share,
                                "with --layout quads: the share of mixtrain's mixed samples (the "
                                "hardest of them) composed as halves instead of quads")
    skip_hardest: float = field(MixTrainSettings.skip_hardest,
                                "mixtrain leaves out this share of the dataset in each mixed "
                                "epoch: the highest fresh losses (back the epoch after)")
    selection: str = field(MixTrainSettings.selection, "mixtrain mixes the lowest losses "
                           "(lowest) or draws the mixed samples each epoch, the easier the "
                           "likelier (sampled)", choices=("lowest", "sampled"))
    ease_power: float = field(MixTrainSettings.ease_power, "sharpness of --selection sampled "
                                                           "(0: uniform)")
    calibrate: bool = field(MixTrainSettings.calibrate, "mixtrain ranks each loss within the "
                            "view it came from (constituent or single image)")
    warmup_epochs: int = field(MixTrainSettings.warmup_epochs, "first epochs that mix nothing")
    final_full_epochs: int = field(0, "last epochs that mix nothing")
    loss_per: str = field(LOSS_PER, "divide the summed loss by composites or by real "
                                  "constituents (mixpipe.train.loss)", choices=NORMALISATIONS)
    prune_ratio: float = field(0.5, "shrink: share of the below-mean samples skipped per epoch")
    anneal_epochs: int = field(0, "shrink: the last epochs skip nothing")
    recalibrate: int = field(0, "mixing arms: after the last epoch, re-estimate the batch-norm "
                                "statistics on this many single training images (forward only; "
                                "counted as forward inputs, so budget gets them too); it cost "
                                "mixtrain 0.8-0.9 points in the pilot, so 0 by default")
    split_norms: bool = field(False, "mixing arms: composites get batch-norm layers of their own, "
                                     "so single images are normalised by singles only "
                                     "(mixpipe.train.splitnorm); it lifted random mixing by 0.37 "
                                     "points on test but not mixtrain, and costs wall-clock, so "
                                     "off by default (benchmarks/README.md)")
    budget_match: str = field("mixtrain", "the arm whose compute the budget arm (forward inputs;"
                                          " a LoCal arm's FLOPs in plain passes) and the "
                                          "progressive arm (FLOPs) match", choices=MIXING)
    progressive_min: Optional[int] = field(None, "progressive: the side in px it starts at (a "
                                                 "multiple of --stride, at least two strides); "
                                                 "none: half of --image-size, snapped down to "
                                                 "the stride")
    progressive_ramp: Tuple[float, ...] = field((0.0, 0.75), "progressive: START,END fractions "
                                                "of the arm's own run between which the side "
                                                "ramps linearly from --progressive-min to "
                                                "--image-size")
    limit: Optional[int] = field(None, "train on the first N samples (torch and DALI loaders)")
    eval_limit: Optional[int] = field(None, "score the first N samples of the eval split")
    workers: int = field(1, "loader worker processes")
    threads: Optional[int] = field(1, "torch intra-op threads (1: on a shared 2-core machine "
                                      "two threads stall on each other; none: torch's default)")
    augment: str = field("flip", "per-constituent augmentation", choices=AUGMENTS)
    image_size: int = field(32, "composite side in px (224 for ImageNet-style models)")
    stride: int = field(8, "the network's total stride: region boundaries snap to it")
    channels_last: str = field("auto", "channels_last memory format: auto (where it runs: CUDA, "
                                       "and the CPU below 48 px), on or off",
                               choices=("auto", "on", "off"))
    eval_crop_ratio: Optional[float] = field(None, "evaluation resizes the shorter side to "
                                                   "image-size / ratio and centre-crops; none: "
                                                   "framed as training shows images: 0.875 "
                                                   "(ImageNet's 224/256) where training crops "
                                                   "(--augment crop on the torch and DALI "
                                                   "loaders), 1 (whole images) otherwise")
    device: str = field("cpu", "torch device to train on (cpu, cuda, cuda:N)")
    progress: bool = field(True, "progress bars")
    server: Optional[str] = field(None, "tcp://host:port of a running `mixpipe serve` (one "
                                        "policy and seed); default: an embedded server")
    local: Optional[str] = field(None, "LoCal+SGD for the early blocks: static or dynamic",
                                 choices=("static", "dynamic"))
    tensorboard: Optional[str] = field(None, "write every epoch's mixing metrics (shares, "
                                             "speed-up bound, loop timings, loss quantiles) as "
                                             "TensorBoard scalars under DIR/ARM-seedSEED "
                                             "(pip install 'mixpipe[tensorboard]')")

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, allowed: str) -> None:
            if not cond:
                raise ValueError(f"speedup setting {name}={getattr(self, name)!r}: must be "
                                 f"{allowed}")
        need(self.loader in LOADERS, "loader", f"one of {LOADERS}")
        need(self.eval_split in EVAL_SPLITS, "eval_split", f"one of {EVAL_SPLITS}")
        need(self.epochs >= 1, "epochs", ">= 1")
        need(len(self.policies) >= 1 and all(p in POLICIES for p in self.policies), "policies",
             f"a non-empty list drawn from {POLICIES}")
        need(len(set(self.policies)) == len(self.policies), "policies", "without repeats")
        need(all(0.0 < f <= 1.0 for f in self.frontier), "frontier", "fractions in (0, 1]")
        need(len(self.seeds) >= 1, "seeds", "at least one seed")
        need(set(self.frontier_seeds) <= set(self.seeds), "frontier_seeds",
             "a subset of --seeds")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.batch_unit in ("samples", "slots"), "batch_unit", "'samples' or 'slots'")
        need(self.lr > 0, "lr", "> 0")
        need(self.layout in LAYOUTS, "layout", f"one of {LAYOUTS}")
        need(0.0 <= self.fraction <= 1.0, "fraction", "in [0, 1]")
        need(0.0 <= self.halves_share <= 1.0 and (not self.halves_share or self.layout == "quads"),
             "halves_share", "in [0, 1], and 0 unless --layout is quads")
        need(0.0 <= self.skip_hardest <= 0.5, "skip_hardest", "in [0, 0.5]")
        need(self.mix_schedule in MIX_SCHEDULES, "mix_schedule", f"one of {MIX_SCHEDULES}")
        need((self.fraction_start is None) == (self.mix_schedule == "constant"),
             "fraction_start", "set exactly when mix_schedule is 'ramp' (give --fraction-start "
             "none with --mix-schedule constant)")
        need(self.fraction_start is None or 0.0 <= self.fraction_start <= 1.0, "fraction_start",
             "in [0, 1]")
        need(self.statistic in STATISTICS, "statistic", f"one of {STATISTICS}")
        need(self.loss_per in NORMALISATIONS, "loss_per", f"one of {NORMALISATIONS}")
        mixing = {p for p in self.policies if not trains_plain_model(p)}
        need(not mixing or 0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
             "in [0, epochs) when a mixing arm runs")
        need(0 <= self.final_full_epochs <= max(self.epochs - self.warmup_epochs, 0),
             "final_full_epochs", "in [0, epochs - warmup_epochs]")
        need(0.0 <= self.prune_ratio < 1.0, "prune_ratio", "in [0, 1)")
        need(0 <= self.anneal_epochs <= self.epochs, "anneal_epochs", "in [0, epochs]")
        need(self.recalibrate >= 0, "recalibrate", ">= 0")
        need(self.budget_match in MIXING, "budget_match", f"one of {MIXING}")
        need(self.limit is None or self.limit >= 1, "limit", ">= 1 or None")
        need(self.eval_limit is None or self.eval_limit >= 1, "eval_limit", ">= 1 or None")
        need(self.workers >= 0, "workers", ">= 0")
        need(self.channels_last in ("auto", "on", "off"), "channels_last", "auto, on or off")
        need(self.eval_crop_ratio is None or 0 < self.eval_crop_ratio <= 1, "eval_crop_ratio",
             "in (0, 1] or None")
        need(self.threads is None or self.threads >= 0, "threads", ">= 0 or None")
        need(self.local in (None, "static", "dynamic"), "local", "None, 'static' or 'dynamic'")
        need(self.local is None or not set(self.policies) & set(LOCAL_ARMS), "local",
             "None when a LoCal arm runs (local-static, local-dynamic: the arms carry their own "
             "kind; --local applies one kind to every arm)")
        need(self.augment in AUGMENTS, "augment", f"one of {AUGMENTS}")
        need(self.image_size >= 2 * self.stride, "image_size", f">= 2 * stride ({self.stride})")
        need(self.image_size % self.stride == 0, "image_size", f"a multiple of stride "
             f"({self.stride})")
        need(self.progressive_min is None or (
            2 * self.stride <= self.progressive_min <= self.image_size
            and self.progressive_min % self.stride == 0), "progressive_min",
             f"none or a multiple of stride ({self.stride}) from {2 * self.stride} to "
             f"image_size ({self.image_size})")
        need(len(self.progressive_ramp) == 2
             and 0.0 <= self.progressive_ramp[0] < self.progressive_ramp[1] <= 1.0,
             "progressive_ramp", "START,END with 0 <= START < END <= 1")
        need(self.server is None or (str(self.server).startswith("tcp://")
                                     and len(self.policies) == 1 and len(self.seeds) == 1
                                     and not self.frontier),
             "server", "None, or a tcp:// URL with one policy and one seed (a server runs one "
             "policy and seed; arms otherwise get their own embedded servers)")

    @property
    def prepared_root(self) -> str:
        """The directory the loaders read: where Fashion-MNIST is prepared, or ``--data``."""
        return self.data_root if self.data == FASHION else self.data

    @property
    def crop_ratio(self) -> float:
        """The evaluation's centre-crop ratio: :func:`eval_framing` of these settings."""
        return eval_framing(self.augment, self.loader, self.eval_crop_ratio)

    def uses_channels_last(self) -> bool:
        """channels_last where it runs (torch 2.13's CPU backward crashes in it from 48 px)."""
        if self.channels_last != "auto":
            return self.channels_last == "on"
        from mixpipe.train.evaluate import channels_last_runs

        return channels_last_runs(self.device, self.image_size)

    @property
    def grid_cells(self) -> int:
        return self.image_size // self.stride

    @property
    def mixed_epochs(self) -> int:
        return self.epochs - self.warmup_epochs - self.final_full_epochs

    @property
    def group_size(self) -> int:
        return 2 if self.layout == "halves" else 4

    def mixtrain_fractions(self) -> List[float]:
        """mixtrain's mixed fraction in every epoch (0 in warm-up and final epochs)."""
        from mixpipe.core.policies.mixtrain import mixing_fraction

        mix = arm_policy("mixtrain", self)
        return [mixing_fraction(mix, e) for e in range(self.epochs)]

    def random_fraction(self) -> float:
        """Random's per-epoch fraction that matches mixtrain's forward inputs over the run.

        Random composes groups of ``group_size`` only; a tier of mixtrain's halves saves a third
        less per sample than quads, so it counts as two thirds of its samples in quads; a share
        ``q`` that mixtrain leaves out saves ``q`` passes, which random saves by mixing
        ``q / (1 - 1 / K)`` more of the data.
        """
        quads_equivalent = 1.0 - self.halves_share / 3.0
        q, per_sample = self.skip_hardest, 1.0 - 1.0 / self.group_size
        return statistics.fmean(
            (q / per_sample + (1.0 - q) * f * quads_equivalent) if f else 0.0
            for f in self.mixtrain_fractions())


#: the quick run: the whole training set for a few epochs. An 8k subset for more epochs was
#: tried first: that little data leaves every mixing arm far behind, which says nothing about
#: full training (benchmarks/README.md).
QUICK = dict(epochs=4, seeds=(0,))


def budget_epochs(s: SpeedupSettings, num_samples: int) -> float:
    """Epochs of plain training that use as many forward inputs as mixtrain's run.

    Computed from mixtrain's schedule with the policy's own count (its tiers of composites over
    the whole, seen, dataset; a group of K costs one forward input instead of K). The warm-up
    epoch reports every sample, so from the first mixed epoch on the whole dataset is seen.
    The norms' recalibration (``recalibrate``) is part of mixtrain's inputs.
    """
    from mixpipe.core.policies.mixtrain import epoch_forward_inputs

    mix = arm_policy("mixtrain", s)
    inputs = recalibration_images(s, "mixtrain", num_samples)
    inputs += sum(epoch_forward_inputs(mix, e, num_samples) for e in range(s.epochs))
    return inputs / num_samples


def recalibration_images(s: SpeedupSettings, arm: str, num_samples: int) -> int:
    """Single images the arm's norms are re-estimated on after its run: mixing arms only (the
    plain model's norms already saw single images)."""
    return 0 if trains_plain_model(arm) else min(s.recalibrate, num_samples)


def splits_norms(s: SpeedupSettings, arm: str) -> bool:
    """Whether the arm's model gets the composites' own batch norms: mixing arms only (a plain
    model never sees a composite, so its twins would stay unused)."""
    return s.split_norms and not trains_plain_model(arm)


def arm_names(s: SpeedupSettings) -> List[str]:
    """Every arm of a seed, in run order: the policies, then the frontier points."""
    frontier = [f"{FRONTIER_PREFIX}{f:g}" for f in s.frontier
                if not (f == 1.0 and "none" in s.policies)]
    return list(s.policies) + frontier


def predictable(s: SpeedupSettings) -> bool:
    """Whether the matching arms' lengths follow from the settings alone (no loss-driven
    skipping in the matched arm), so they need not wait for that arm's run."""
    return s.budget_match in ("mixtrain", "random")


def run_order(s: SpeedupSettings) -> List[str]:
    """:func:`arm_names` with the matching arms (budget, progressive) after the arm they match,
    where they must be."""
    arms = arm_names(s)
    matching = [a for a in arms if a in MATCHING_ARMS]
    if matching and not predictable(s):
        if s.budget_match not in arms:
            raise ValueError(f"budget_match={s.budget_match!r}: that arm must run too (add it "
                             f"to --policies), since {' and '.join(matching)} match its "
                             "forward inputs, known only after its run")
        for arm in matching:
            arms.remove(arm)
        at = arms.index(s.budget_match) + 1
        arms[at:at] = matching
    return arms


def seed_arms(s: SpeedupSettings, seed: int) -> List[str]:
    """:func:`run_order` for one seed: the frontier arms only in ``frontier_seeds``."""
    arms = run_order(s)
    if not s.frontier_seeds or seed in s.frontier_seeds:
        return arms
    return [a for a in arms if not a.startswith(FRONTIER_PREFIX)]


def matched_forward_inputs(s: SpeedupSettings, num_samples: int,
                           measured: Optional[float] = None) -> float:
    """The forward inputs of the arm ``budget_match`` names: ``measured`` from its run, or
    predicted from the schedule where they follow from it."""
    if measured is not None:
        return float(measured)
    if not predictable(s):
        raise ValueError(f"budget and progressive match {s.budget_match!r}, whose forward inputs "
                         "are known only after its run: run it first in the same seed")
    return budget_epochs(s, num_samples) * num_samples


def arm_epochs(arm: str, s: SpeedupSettings, num_samples: int,
               matched_inputs: Optional[float] = None,
               num_classes: Optional[int] = None) -> float:
    """The arm's run length in epochs of data (fractional for budget, progressive and frontier
    arms); ``matched_inputs`` are the matched arm's forward inputs where they were measured.
    progressive's length is priced in the model's FLOPs, which need ``num_classes``."""
    if arm == "budget":
        return matched_forward_inputs(s, num_samples, matched_inputs) / num_samples
    if arm == "progressive":
        from .progressive import plan_progressive

        if num_classes is None:
            raise ValueError("the progressive arm's length is priced in the model's FLOPs: pass "
                             "num_classes")
        return plan_progressive(s, num_samples, num_classes, matched_inputs).epochs
    if arm.startswith(FRONTIER_PREFIX):
        return s.epochs * float(arm[len(FRONTIER_PREFIX):])
    return float(s.epochs)


def arm_policy(arm: str, s: SpeedupSettings, num_samples: Optional[int] = None,
               matched_inputs: Optional[float] = None,
               num_classes: Optional[int] = None) -> PolicySettings:
    """The selection-policy settings of one arm (budget, progressive and frontier arms need the
    dataset size, to match compute; progressive the class count too)."""
    if arm == "none" or arm in LOCAL_ARMS:
        return NoneSettings()
    if arm in MATCHING_ARMS or arm.startswith(FRONTIER_PREFIX):
        if num_samples is None:
            raise ValueError(f"arm {arm!r} needs the number of training samples")
        return BudgetSettings(epochs=arm_epochs(arm, s, num_samples, matched_inputs,
                                                num_classes))
    if arm == "random":
        return RandomSettings(fraction=s.random_fraction(), layout=s.layout,
                              grid_cells=s.grid_cells)
    # a ramp runs linearly over the mixed epochs, from fraction_start to fraction
    ramp = {} if s.mix_schedule == "constant" else {
        "fraction_start": s.fraction_start, "ramp_epochs": max(s.mixed_epochs - 1, 0)}
    mix = MixTrainSettings(warmup_epochs=s.warmup_epochs, schedule=s.mix_schedule, **ramp,
                           fraction=s.fraction, statistic=s.statistic, gamma=s.gamma,
                           w_min=s.w_min, layout=s.layout, grid_cells=s.grid_cells,
                           epochs=s.epochs, final_full_epochs=s.final_full_epochs,
                           per_class=s.per_class, halves_share=s.halves_share,
                           skip_hardest=s.skip_hardest, selection=s.selection,
                           ease_power=s.ease_power, calibrate=s.calibrate)
    if arm == "mixtrain":
        return mix
    if arm in ("assist", "assist+mixtrain"):
        return AssistSettings(epochs=s.epochs, mix=mix if arm == "assist+mixtrain" else None)
    if arm in ("shrink", "shrink+mixtrain"):
        return ShrinkSettings(prune_ratio=s.prune_ratio, epochs=s.epochs,
                              anneal_epochs=s.anneal_epochs,
                              mix=mix if arm == "shrink+mixtrain" else None)
    raise ValueError(f"unknown arm {arm!r}; known: {POLICIES} and {FRONTIER_PREFIX}<fraction>")


def arm_batch_size(arm: str, s: SpeedupSettings, num_samples: int) -> int:
    """Slots per loader batch of the arm: ``batch_size`` unless the batch counts samples and the
    arm composes (mixtrain, random, and the skipping arms that mix), whose batch then holds
    ``batch_size`` samples on average over the run (one count for the arms that mix, so random
    and mixtrain take the same steps)."""
    if s.batch_unit == "slots" or arm not in ("random", "mixtrain", "shrink+mixtrain",
                                              "assist+mixtrain"):
        return s.batch_size
    from mixpipe.core.policies.mixtrain import samples_per_slot

    mix = arm_policy("mixtrain", s)
    if arm == "random":  # every sample, in mixtrain's forward inputs
        per_slot = s.epochs / budget_epochs(s, num_samples)
    else:
        per_slot = samples_per_slot(mix, s.epochs, num_samples)
    return max(1, int(round(s.batch_size / per_slot)))


def run_epochs(arm: str, s: SpeedupSettings, num_samples: int,
               matched_inputs: Optional[float] = None, num_classes: Optional[int] = None) -> int:
    """Whole epochs the arm's loop runs (a partial last epoch counts as one)."""
    return whole_epochs(arm_epochs(arm, s, num_samples, matched_inputs, num_classes))
