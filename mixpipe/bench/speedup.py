"""``mixpipe bench speedup``: training wall-clock and accuracy, arm by arm, in one run.

Every arm (a selection policy: none, random, mixtrain, shrink) trains the same model from the same
initial weights, with the same optimiser, learning-rate schedule (by progress through the data,
decaying to zero), epochs and data order seed; only the plan differs. Seeds are the outer loop and
arms the inner one, so a change of machine load during the run falls on every arm alike.

Per arm: training wall-clock (evaluation excluded), forward inputs per epoch, top-1 per epoch,
final top-1, the time to reach the baseline's final top-1, and the achieved speed-up against the
plan's bound (baseline forward inputs / arm forward inputs). Means and spreads are over seeds.
The random arm mixes the fraction that gives it the same forward inputs over the run as mixtrain
(mixtrain does not mix in its warm-up and final epochs), so the two compare at the same speed-up.

Output: JSON (machine, versions, git hash, settings, per-run histories, summary), a PNG of top-1
against training wall-clock (one line per arm, mean over seeds) and a table on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from mixpipe.core.policies.mixtrain import STATISTICS

__all__ = ["SpeedupSettings", "run_benchmark", "add_arguments", "run", "format_table"]

POLICIES = ("none", "random", "mixtrain", "shrink", "assist", "assist+mixtrain")
LOADERS = ("torch", "dali", "ffcv")
LAYOUTS = ("halves", "quads")
MIX_SCHEDULES = ("constant", "ramp")
NORMALISATIONS = ("constituent", "slot")  # mixpipe.train.loss.NORMALISATIONS, without torch
AUGMENTS = ("none", "flip", "crop")
FASHION = "fashion-mnist"


@dataclasses.dataclass(frozen=True)
class SpeedupSettings:
    """Everything that defines a speed-up run; recorded in the JSON beside the results."""

    data: str = FASHION
    data_root: str = "data/fashion-mnist"
    loader: str = "torch"
    model: str = "resnet-tiny"
    epochs: int = 10
    policies: Tuple[str, ...] = ("none", "random", "mixtrain")
    seeds: Tuple[int, ...] = (0, 1)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup: float = 0.0
    layout: str = "quads"
    # mixtrain's defaults are the pilots' best on full Fashion-MNIST (benchmarks/README.md): a
    # ramp that mixes more as the losses of the easy samples settle, ranked by the last loss
    fraction: float = 0.80
    mix_schedule: str = "ramp"
    fraction_start: Optional[float] = 0.45
    statistic: str = "last"
    gamma: float = 1.0
    w_min: float = 0.25
    per_class: bool = False
    warmup_epochs: int = 1
    final_full_epochs: int = 0
    loss_per: str = "slot"
    prune_ratio: float = 0.5
    limit: Optional[int] = None
    val_limit: Optional[int] = None
    workers: int = 1
    threads: Optional[int] = 1
    augment: str = "flip"
    image_size: int = 32
    stride: int = 8
    channels_last: bool = True
    device: str = "cpu"
    progress: bool = True
    server: Optional[str] = None  # tcp://... of a `mixpipe serve` job server (one arm only)
    local: Optional[str] = None  # LoCal+SGD for the early blocks: None, "static" or "dynamic"

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, allowed: str) -> None:
            if not cond:
                raise ValueError(f"speedup setting {field}={getattr(self, field)!r}: must be "
                                 f"{allowed}")
        need(self.loader in LOADERS, "loader", f"one of {LOADERS}")
        need(self.epochs >= 1, "epochs", ">= 1")
        need(len(self.policies) >= 1 and all(p in POLICIES for p in self.policies), "policies",
             f"a non-empty list drawn from {POLICIES}")
        need(len(set(self.policies)) == len(self.policies), "policies", "without repeats")
        need(len(self.seeds) >= 1, "seeds", "at least one seed")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.lr > 0, "lr", "> 0")
        need(self.layout in LAYOUTS, "layout", f"one of {LAYOUTS}")
        need(0.0 <= self.fraction <= 1.0, "fraction", "in [0, 1]")
        need(self.mix_schedule in MIX_SCHEDULES, "mix_schedule", f"one of {MIX_SCHEDULES}")
        need((self.fraction_start is None) == (self.mix_schedule == "constant"),
             "fraction_start", "set exactly when mix_schedule is 'ramp'")
        need(self.fraction_start is None or 0.0 <= self.fraction_start <= 1.0, "fraction_start",
             "in [0, 1]")
        need(self.statistic in STATISTICS, "statistic", f"one of {STATISTICS}")
        need(self.loss_per in NORMALISATIONS, "loss_per", f"one of {NORMALISATIONS}")
        need(0 <= self.warmup_epochs < self.epochs, "warmup_epochs", "in [0, epochs)")
        need(0 <= self.final_full_epochs <= self.epochs - self.warmup_epochs,
             "final_full_epochs", "in [0, epochs - warmup_epochs]")
        need(0.0 <= self.prune_ratio < 1.0, "prune_ratio", "in [0, 1)")
        need(self.limit is None or self.limit >= 1, "limit", ">= 1 or None")
        need(self.val_limit is None or self.val_limit >= 1, "val_limit", ">= 1 or None")
        need(self.workers >= 0, "workers", ">= 0")
        need(self.local in (None, "static", "dynamic"), "local", "None, 'static' or 'dynamic'")
        need(self.augment in AUGMENTS, "augment", f"one of {AUGMENTS}")
        need(self.image_size >= 2 * self.stride, "image_size", f">= 2 * stride ({self.stride})")
        need(self.image_size % self.stride == 0, "image_size", f"a multiple of stride "
             f"({self.stride})")
        need(self.server is None or (str(self.server).startswith("tcp://")
                                     and len(self.policies) == 1 and len(self.seeds) == 1),
             "server", "None, or a tcp:// URL with one policy and one seed (a server runs one "
             "policy and seed; arms otherwise get their own embedded servers)")

    @property
    def prepared_root(self) -> str:
        """The directory the loaders read: where Fashion-MNIST is prepared, or ``--data``."""
        return self.data_root if self.data == FASHION else self.data

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

        mix = policy_settings("mixtrain", self)
        return [mixing_fraction(mix, e) for e in range(self.epochs)]

    def random_fraction(self) -> float:
        """Random's per-epoch fraction that matches mixtrain's forward inputs over the run."""
        return statistics.fmean(self.mixtrain_fractions())


# ------------------------------------------------------------------------------------- pieces
def policy_settings(name: str, s: SpeedupSettings):
    """The policy settings object of one arm."""
    from mixpipe.core.policies import settings_from_dict

    if name == "none":
        return settings_from_dict({"policy": "none"})
    if name == "random":
        return settings_from_dict({"policy": "random", "fraction": s.random_fraction(),
                                   "layout": s.layout, "grid_cells": s.grid_cells})
    # a ramp runs linearly over the mixed epochs, from fraction_start to fraction
    ramp = {} if s.mix_schedule == "constant" else {
        "fraction_start": s.fraction_start, "ramp_epochs": max(s.mixed_epochs - 1, 0)}
    mix = {"policy": "mixtrain", "warmup_epochs": s.warmup_epochs, "schedule": s.mix_schedule,
           **ramp, "fraction": s.fraction, "statistic": s.statistic, "gamma": s.gamma,
           "w_min": s.w_min, "layout": s.layout,
           "grid_cells": s.grid_cells, "epochs": s.epochs,
           "final_full_epochs": s.final_full_epochs, "per_class": s.per_class}
    if name == "mixtrain":
        return settings_from_dict(mix)
    if name in ("assist", "assist+mixtrain"):
        return settings_from_dict({"policy": "assist", "epochs": s.epochs,
                                   "mix": mix if name == "assist+mixtrain" else None})
    return settings_from_dict({"policy": "shrink", "prune_ratio": s.prune_ratio,
                               "epochs": s.epochs})


class _Subset:
    """The first ``n`` samples of a map-style dataset (the quick mode's subset)."""

    def __init__(self, base, n: Optional[int]) -> None:
        self.base = base
        self.n = len(base) if n is None else min(int(n), len(base))

    def __len__(self) -> int:
        return self.n

    @property
    def labels(self) -> Optional[np.ndarray]:
        """The subset's labels when the base dataset exposes them (per-class policies use them)."""
        labels = getattr(self.base, "labels", None)
        return None if labels is None else np.asarray(labels)[:self.n]

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range [0, {self.n})")
        return self.base[i]


def load_data(s: SpeedupSettings, log=print):
    """(train, val, num_classes); prepares Fashion-MNIST on first use."""
    from mixpipe.data import ArrayDataset, FileListDataset, find_prepared

    root = s.prepared_root
    if s.data == FASHION:
        arrays = [os.path.join(root, f"{split}_arrays.npz") for split in ("train", "val")]
        if not all(os.path.exists(p) for p in arrays):
            from mixpipe.data import prepare_fashion_mnist

            log(f"preparing Fashion-MNIST in {root} (once)")
            prepare_fashion_mnist(root, log=log)
    elif not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root!r}: not a directory (give 'fashion-mnist' or "
                                    "a directory written by `mixpipe data prepare tree`)")
    prepared = find_prepared(root)
    kinds = prepared.splits.get("train", {})
    if "arrays" in kinds:
        train, val = ArrayDataset(root, "train"), ArrayDataset(root, "val")
    elif "files" in kinds:
        train, val = FileListDataset(root, "train"), FileListDataset(root, "val")
    else:
        raise FileNotFoundError(f"{root} has no prepared train split; run `mixpipe data prepare "
                                f"tree SRC --out {root}` first")
    return _Subset(train, s.limit), _Subset(val, s.val_limit), len(prepared.classes)


class _Flip:
    """Constituent transform: horizontal flip with probability 1/2 (the composer resizes)."""

    def __call__(self, image: np.ndarray, region, rng: np.random.Generator) -> np.ndarray:
        return image[:, ::-1] if rng.random() < 0.5 else image


def constituent_transform(s: SpeedupSettings):
    if s.augment == "none":
        return None
    if s.augment == "flip":
        return _Flip()
    from mixpipe.core.augment import RandomResizedCropFlip

    return RandomResizedCropFlip()


def make_loader(s: SpeedupSettings, train, service, seed: int):
    from mixpipe.train.distributed import world

    rank, world_size = world()
    if world_size > 1 and s.loader != "torch":
        raise SystemExit(f"--loader {s.loader} under torchrun: only the torch loader takes "
                         "rank / world_size here yet")
    if s.loader == "torch":
        from mixpipe.torch import MixedLoader

        return MixedLoader(train, service, s.batch_size, size=(s.image_size, s.image_size),
                           stride=s.stride, num_workers=s.workers, seed=seed,
                           constituent_transform=constituent_transform(s),
                           persistent_workers=s.workers > 0, rank=rank,
                           world_size=world_size)
    if s.loader == "ffcv":
        return _ffcv_loader(s, train, service)
    try:
        module = __import__(f"mixpipe.{s.loader}", fromlist=["speedup_loader"])
    except ImportError as err:
        raise SystemExit(f"--loader {s.loader}: mixpipe.{s.loader} cannot be imported ({err}); "
                         "use --loader torch, or install the loader's extra") from err
    factory = getattr(module, "speedup_loader", None)
    if factory is None:
        raise SystemExit(f"--loader {s.loader}: mixpipe.{s.loader} has no speedup_loader(settings,"
                         " dataset, service, seed) entry point yet; use --loader torch or ffcv")
    return factory(s, train, service, seed)


class _FfcvEpochs:
    """A :class:`mixpipe.ffcv.MixLoader` seen through the ``set_epoch`` / ``len`` / iterate
    protocol of :func:`mixpipe.train.fit` (FFCV counts epochs itself, one per iteration)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.batches = loader.mixed()

    def set_epoch(self, epoch: int):
        if epoch != self.loader.next_epoch:
            raise RuntimeError(f"the FFCV loader is at epoch {self.loader.next_epoch}, fit asked "
                               f"for {epoch}: epochs must run in order")
        return self.loader.plan(epoch)

    @property
    def plan(self):
        return self.loader.plan()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.batches)


def _ffcv_loader(s: SpeedupSettings, train, service):
    try:
        from ffcv.transforms import ToTensor, ToTorchImage

        from mixpipe.ffcv import MixLabelDecoder, MixLoader, SimpleMixDecoder
    except ImportError as err:
        raise SystemExit(f"--loader ffcv: cannot import ffcv / mixpipe.ffcv ({err})") from err
    from mixpipe.data import find_prepared

    if s.limit is not None and s.limit < len(train.base):
        raise SystemExit("--loader ffcv reads the whole .beton: --limit subsets are "
                         "for the torch loader")
    beton = find_prepared(s.prepared_root).path("train", "beton")
    pipelines = {
        "image": [SimpleMixDecoder((s.image_size, s.image_size), stride=s.stride,
                                   flip_prob=0.5 if s.augment != "none" else 0.0),
                  ToTensor(), ToTorchImage()],
        "label": [MixLabelDecoder(), ToTensor()],
    }
    loader = MixLoader(beton, s.batch_size, service, pipelines=pipelines,
                       num_workers=max(1, s.workers))
    return _FfcvEpochs(loader)


# ------------------------------------------------------------------------------------- runs
def _build(name: str, num_classes: int):
    if name.startswith("tv:"):
        try:
            import torchvision
        except ImportError as err:
            raise SystemExit(f"--model {name}: torchvision is not installed ({err})") from err
        return getattr(torchvision.models, name[3:])(num_classes=num_classes)
    from mixpipe.train import build_model

    return build_model(name, num_classes)


def train_arm(s: SpeedupSettings, policy: str, seed: int, train, val_batches, num_classes: int,
              log=print) -> Dict[str, Any]:
    """One (policy, seed) run; returns its history with the arm's identity."""
    import torch

    from mixpipe.train.distributed import barrier, job_service
    from mixpipe.train import Normalize, Schedule, fit

    torch.manual_seed(seed)
    model = _build(s.model, num_classes)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": s.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=s.lr,
                                momentum=s.momentum, nesterov=s.momentum > 0)
    settings = policy_settings(policy, s)
    # one process: the embedded service; under torchrun: rank 0 serves it to every rank
    service, owned = job_service(len(train), settings, seed, server=s.server)
    labels = getattr(train, "labels", None)
    if labels is not None and hasattr(service, "set_labels"):
        # per-class policies (mixtrain's per_class, assist's class floors) read them
        service.set_labels(np.asarray(labels))
    loader = make_loader(s, train, service, seed)
    local = None
    if s.local:
        from mixpipe.train.local import from_kind

        local = from_kind(s.local, model, optimizer, s.epochs)
    history = fit(model, loader, optimizer, s.epochs, Schedule(s.schedule, s.warmup),
                  on_epoch=local.on_epoch if local is not None else None,
                  eval_loader=val_batches, service=service, stride=s.stride, device=s.device,
                  prepare=Normalize(channels_last=s.channels_last), progress=s.progress,
                  desc=f"{policy} seed {seed}", loss_per=s.loss_per)
    barrier()  # every rank is done with this arm's server before rank 0 stops it
    if owned is not None:
        owned.stop()
    history.update(policy=policy, seed=seed, policy_settings=settings.to_dict(),
                   local=local.history if local is not None else None)
    return history


def _mean_std(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def time_to_reach(history: Dict[str, Any], target: float) -> Optional[float]:
    """Training seconds until the first epoch whose top-1 is at least ``target``."""
    elapsed = 0.0
    for record in history["epochs"]:
        elapsed += record["train_seconds"]
        if record.get("top1") is not None and record["top1"] >= target - 1e-12:
            return elapsed
    return None


def summarise(s: SpeedupSettings, runs: List[Dict[str, Any]], num_samples: int) -> Dict[str, Any]:
    """Per-arm means and spreads over seeds; speed-ups against 'none' seed by seed."""
    by = {(r["policy"], r["seed"]): r for r in runs}
    baseline = "none" if "none" in s.policies else None
    summary: Dict[str, Any] = {}
    for policy in s.policies:
        arm = [by[(policy, seed)] for seed in s.seeds if (policy, seed) in by]
        if not arm:
            continue
        row: Dict[str, Any] = {"runs": len(arm)}
        for key, values in (
                ("train_seconds", [r["train_seconds"] for r in arm]),
                ("final_top1", [r["final_top1"] for r in arm]),
                ("best_top1", [max(e["top1"] for e in r["epochs"]) for r in arm]),
                ("data_wait_seconds", [sum(e["data_wait_seconds"] for e in r["epochs"])
                                       for r in arm]),
                ("forward_inputs", [r["forward_inputs"] for r in arm])):
            row[key], row[key + "_std"] = _mean_std(values)
        row["forward_inputs_per_epoch"] = [
            statistics.fmean(r["epochs"][e]["forward_inputs"] for r in arm)
            for e in range(s.epochs)]
        row["top1_per_epoch"] = [statistics.fmean(r["epochs"][e]["top1"] for r in arm)
                                 for e in range(s.epochs)]
        row["bound"] = num_samples * s.epochs / row["forward_inputs"]
        if baseline is not None:
            pairs = [(by[(baseline, r["seed"])], r) for r in arm if (baseline, r["seed"]) in by]
            speedups = [b["train_seconds"] / r["train_seconds"] for b, r in pairs]
            bounds = [b["forward_inputs"] / r["forward_inputs"] for b, r in pairs]
            row["speedup"], row["speedup_std"] = _mean_std(speedups)
            row["bound"] = statistics.fmean(bounds)
            row["bound_efficiency"] = row["speedup"] / row["bound"] if row["bound"] else None
            row["top1_delta_pts"], row["top1_delta_pts_std"] = _mean_std(
                [100 * (r["final_top1"] - b["final_top1"]) for b, r in pairs])
            reach = [time_to_reach(r, b["final_top1"]) for b, r in pairs]
            row["reached_baseline"] = sum(t is not None for t in reach)
            row["time_to_baseline_top1"], _ = _mean_std(reach)
        summary[policy] = row
    return summary


def format_table(s: SpeedupSettings, summary: Dict[str, Any]) -> str:
    def pct(v, sd=None):
        return "-" if v is None else (f"{100 * v:.2f}" + (f" ±{100 * sd:.2f}" if sd else ""))

    head = (f"{'arm':<15} {'train s':>14} {'speed-up':>13} {'bound':>6} {'of bound':>8} "
            f"{'inputs/epoch':>12} {'final top-1 %':>15} {'Δ pts':>13} {'to base s':>10}")
    lines = [head, "-" * len(head)]
    for policy, row in summary.items():
        sp = row.get("speedup")
        sp_txt = "-" if sp is None else f"{sp:.2f}x ±{row['speedup_std']:.2f}"
        eff = row.get("bound_efficiency")
        delta = row.get("top1_delta_pts")
        delta_txt = "-" if delta is None else f"{delta:+.2f} ±{row['top1_delta_pts_std']:.2f}"
        reach = row.get("time_to_baseline_top1")
        reach_txt = "-" if reach is None else \
            f"{reach:.0f} ({row['reached_baseline']}/{row['runs']})"
        inputs = statistics.fmean(row["forward_inputs_per_epoch"])
        lines.append(
            f"{policy:<15} {row['train_seconds']:>8.1f} ±{row['train_seconds_std']:<4.1f} "
            f"{sp_txt:>13} {row['bound']:>5.2f}x {'-' if eff is None else f'{100 * eff:.0f}%':>8}"
            f" {inputs:>12.0f} {pct(row['final_top1'], row['final_top1_std']):>15} "
            f"{delta_txt:>13} {reach_txt:>10}")
    lines.append(f"({len(s.seeds)} seed(s), {s.epochs} epochs, model {s.model}, loader "
                 f"{s.loader}, layout {s.layout}, fraction "
                 f"{s.fraction if s.fraction_start is None else f'{s.fraction_start}->{s.fraction}'}"
                 f", loss per {s.loss_per}, local {s.local or 'off'}; speed-up and Δ are "
                 "against 'none', seed by seed; ± is the spread over seeds)")
    return "\n".join(lines)


def plot(runs: List[Dict[str, Any]], s: SpeedupSettings, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for policy in s.policies:
        arm = [r for r in runs if r["policy"] == policy]
        if not arm:
            continue
        t = np.mean([np.cumsum([e["train_seconds"] for e in r["epochs"]]) for r in arm], axis=0)
        acc = np.mean([[100 * e["top1"] for e in r["epochs"]] for r in arm], axis=0)
        ax.plot(t, acc, marker="o", label=policy)
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{s.data}, {s.model}, {s.epochs} epochs, mean of {len(s.seeds)} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_benchmark(s: SpeedupSettings, out: Optional[str] = None, log=print) -> Dict[str, Any]:
    """Run every (seed, arm), write JSON and PNG next to ``out``, return the payload."""
    import torch

    from mixpipe.bench.common import machine_info, write_json
    from mixpipe.train import EvalBatches

    if s.threads:
        torch.set_num_threads(s.threads)
    from mixpipe.train.distributed import barrier, init_distributed

    env = init_distributed()  # torchrun: join the job; plain python: one process
    if not env.is_main:
        log = lambda *args, **kwargs: None  # noqa: E731 - rank 0 alone reports
        barrier()  # rank 0 prepares the data first
    train, val, num_classes = load_data(s, log)
    if env.is_main:
        barrier()
    val_batches = EvalBatches(val, batch_size=512)
    log(f"speedup: {len(train)} train / {len(val)} val samples, {num_classes} classes; arms "
        f"{', '.join(s.policies)}; seeds {list(s.seeds)}; torch threads {torch.get_num_threads()}")
    runs: List[Dict[str, Any]] = []
    started = time.time()
    for seed in s.seeds:
        for policy in s.policies:
            history = train_arm(s, policy, seed, train, val_batches, num_classes, log)
            runs.append(history)
            log(f"  {policy:<9} seed {seed}: {history['train_seconds']:.1f}s, "
                f"{history['forward_inputs']} inputs, final top-1 "
                f"{100 * history['final_top1']:.2f}%")
    summary = summarise(s, runs, -(-len(train) // env.world_size))  # inputs are per rank
    payload = {
        "benchmark": "speedup",
        "machine_info": machine_info(),
        "settings": dataclasses.asdict(s),
        "num_train": len(train),
        "num_val": len(val),
        "world_size": env.world_size,
        "wall_seconds": time.time() - started,
        "summary": summary,
        "runs": runs,
    }
    table = format_table(s, summary)
    payload["table"] = table
    if out and env.is_main:
        write_json(out, payload)
        png = os.path.splitext(out)[0] + ".png"
        plot(runs, s, png)
        log(f"wrote {out} and {png}")
    if env.is_main:
        print(table, flush=True)
    return payload


# ------------------------------------------------------------------------------------- CLI
#: the quick run: the whole training set for a few epochs. An 8k subset for more epochs was
#: tried first: that little data leaves every mixing arm 12-22 points behind, which says
#: nothing about full training (benchmarks/README.md).
QUICK = dict(epochs=4, seeds=(0,))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SpeedupSettings()
    parser.add_argument("--data", default=d.data,
                        help="'fashion-mnist' (prepared on first use) or a directory written by "
                             "`mixpipe data prepare tree`")
    parser.add_argument("--data-root", default=d.data_root,
                        help="where Fashion-MNIST is prepared (default %(default)s)")
    parser.add_argument("--loader", choices=LOADERS, default=d.loader)
    parser.add_argument("--model", default=d.model,
                        help="resnet-tiny | resnet-small | resnet-wide | vit-small, or tv:NAME "
                             "for torchvision.models.NAME (e.g. tv:resnet50) when installed")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--policies", default=",".join(d.policies),
                        help="comma list of arms from none,random,mixtrain,shrink")
    parser.add_argument("--seeds", default=None,
                        help="comma list of seeds (default 0,1)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--schedule", choices=("cosine", "linear"), default=d.schedule)
    parser.add_argument("--layout", choices=LAYOUTS, default=d.layout)
    parser.add_argument("--fraction", type=float, default=d.fraction,
                        help="share of the dataset mixtrain mixes per epoch after warm-up (with "
                             "a ramp: in its last mixed epoch)")
    parser.add_argument("--mix-schedule", choices=MIX_SCHEDULES, default=d.mix_schedule,
                        help="mixtrain's fraction per epoch: constant, or a linear ramp over the "
                             "mixed epochs from --fraction-start to --fraction (start above the "
                             "end: mix most while the learning rate is high)")
    parser.add_argument("--fraction-start", type=float, default=None,
                        help=f"the ramp's first mixed epoch (with --mix-schedule ramp; default "
                             f"{d.fraction_start})")
    parser.add_argument("--loss-per", choices=NORMALISATIONS, default=d.loss_per,
                        help="divide the summed loss by real constituents or by composites "
                             "(mixpipe.train.loss)")
    parser.add_argument("--statistic", choices=STATISTICS, default=d.statistic,
                        help="mixtrain ranks samples by their loss EMA or their last loss")
    parser.add_argument("--gamma", type=float, default=d.gamma)
    parser.add_argument("--per-class", action="store_true",
                        help="mixtrain mixes the same share of every class (off by default: on "
                             "full Fashion-MNIST it cost 1.5 points more, see benchmarks/README)")
    parser.add_argument("--w-min", type=float, default=d.w_min,
                        help="smallest share a constituent gets (0.5 halves: always equal)")
    parser.add_argument("--local", choices=("static", "dynamic"), default=None,
                        help="LoCal+SGD: early blocks learn by a local rule, the boundary moving "
                             "deeper by a static ramp or when updates settle")
    parser.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    parser.add_argument("--final-full-epochs", type=int, default=d.final_full_epochs)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N samples")
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--workers", type=int, default=d.workers, help="loader worker processes")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="torch intra-op threads (default 1: on a shared 2-core machine two "
                             "threads stall on each other and make timings noise; 0 = torch's "
                             "default)")
    parser.add_argument("--augment", choices=AUGMENTS, default=d.augment)
    parser.add_argument("--image-size", type=int, default=d.image_size,
                        help="composite side in px (224 for ImageNet-style models)")
    parser.add_argument("--stride", type=int, default=d.stride,
                        help="the network's total stride: region boundaries snap to it")
    parser.add_argument("--quick", action="store_true",
                        help=f"a subset in a few minutes: {QUICK} unless given explicitly")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--server", default=None,
                        help="tcp://host:port of a running `mixpipe serve` (one policy and "
                             "seed); default: an embedded server (rank 0's under torchrun)")
    parser.add_argument("--out", default=None,
                        help="JSON path (PNG beside it); default benchmarks/results/"
                             "speedup[-quick].json")


def settings_from_args(args: argparse.Namespace) -> SpeedupSettings:
    quick = dict(QUICK) if args.quick else {}
    seeds: Tuple[int, ...]
    if args.seeds is None:
        seeds = quick.get("seeds", SpeedupSettings().seeds)
    else:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    return SpeedupSettings(
        data=args.data, data_root=args.data_root, loader=args.loader, model=args.model,
        epochs=args.epochs if args.epochs is not None else quick.get("epochs", 10),
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()), seeds=seeds,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        schedule=args.schedule, layout=args.layout, fraction=args.fraction,
        mix_schedule=args.mix_schedule,
        fraction_start=(args.fraction_start if args.fraction_start is not None else
                        SpeedupSettings.fraction_start if args.mix_schedule == "ramp" else None),
        loss_per=args.loss_per, statistic=args.statistic, gamma=args.gamma, w_min=args.w_min,
        per_class=args.per_class,
        warmup_epochs=args.warmup_epochs, final_full_epochs=args.final_full_epochs,
        limit=args.limit if args.limit is not None else quick.get("limit"),
        val_limit=args.val_limit if args.val_limit is not None else quick.get("val_limit"),
        workers=args.workers, threads=args.threads, augment=args.augment,
        image_size=args.image_size, stride=args.stride, device=args.device,
        progress=not args.no_progress, server=args.server, local=args.local)


def run(args: argparse.Namespace) -> int:
    try:
        s = settings_from_args(args)
    except ValueError as err:
        print(f"mixpipe bench speedup: {err}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("benchmarks", "results",
                                   "speedup-quick.json" if args.quick else "speedup.json")
    run_benchmark(s, out)
    return 0
