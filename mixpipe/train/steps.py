"""The named steps :func:`mixpipe.train.fit` is made of, each usable and testable on its own.

An epoch is: start it (fetch the plan, agree on the step count), take the steps (learning rate,
forward, backward, report the losses), close it (flush the reports, meet the other ranks, commit),
evaluate, and write its record. Users with their own loop can take any of these in isolation.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..core.batch import MixedBatch
from ..core.loader import PlanLoader
from ..core.plan import Layout, MixPlan
from .distributed import agree_steps, barrier
from .evaluate import Normalize, evaluate
from .loss import MixedLoss, batch_loss
from .reporter import LossReporter
from .resolution import check_singles, resize_images

__all__ = ["EpochStart", "EpochTally", "begin_epoch", "set_lr", "train_step", "report_losses",
           "close_epoch", "timed_evaluation", "epoch_record", "history_totals", "reporting_service"]


@dataclasses.dataclass(frozen=True)
class EpochStart:
    """What starting an epoch settled: its plan, the steps every rank takes, and the time the
    plan took to arrive (charged to training)."""

    plan: MixPlan
    steps: int
    plan_seconds: float
    started: float  #: ``time.perf_counter()`` when the epoch began


def begin_epoch(loader: PlanLoader, epoch: int) -> EpochStart:
    """Fetch the epoch's plan; under ``torch.distributed`` every rank takes the fewest steps
    any rank has (a rank on a fallback plan may have more, and DDP hangs on unequal steps)."""
    started = time.perf_counter()
    plan = loader.set_epoch(epoch)
    steps = agree_steps(len(loader))
    return EpochStart(plan, steps, time.perf_counter() - started, started)


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], factor: float) -> None:
    """Scale every parameter group's base rate by the schedule's factor."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, batch: MixedBatch,
               prepare: Normalize, device: Any, loss_per: str,
               size: Optional[int] = None) -> MixedLoss:
    """One optimiser step on one batch of composites; returns its losses. ``size``: train at
    that side instead of the loader's (progressive resizing, :mod:`mixpipe.train.resolution`;
    single images only)."""
    images = prepare(batch.image, device)
    if size is not None:
        check_singles(batch.layout)
        images = resize_images(images, size)
    logits = net(images, batch.layout, batch.weights.to(device))
    out = batch_loss(logits, batch, loss_per)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    return out


def report_losses(reporter: Optional[LossReporter], epoch: int, batch: MixedBatch,
                  out: MixedLoss) -> None:
    """Queue the batch's per-constituent losses for the selection service (padding is not)."""
    if reporter is not None:
        reporter.add(epoch, batch.ids, out.per_constituent, batch.loss_scale)


@dataclasses.dataclass
class EpochTally:
    """Running sums of one epoch's steps: time waiting for data, time computing, losses."""

    steps: int = 0
    data_wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0

    def add(self, out: MixedLoss, wait: float, compute: float) -> None:
        self.steps += 1
        self.data_wait_seconds += wait
        self.compute_seconds += compute
        self.loss_sum += float(out.per_constituent.sum())
        self.loss_count += int(out.real.sum())

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.loss_count, 1)


def close_epoch(reporter: Optional[LossReporter], epoch: int, commit: bool) -> float:
    """Flush this rank's reports, wait for every rank, then commit (on the committing rank).

    The barrier comes before the commit: the server closes an epoch's reporting as soon as
    anyone asks for the next plan. Returns the seconds it took.
    """
    started = time.perf_counter()
    if reporter is not None:
        reporter.flush()
        barrier()
        reporter.end_epoch(epoch, commit=commit)
    return time.perf_counter() - started


def timed_evaluation(net: nn.Module, batches: Optional[Iterable], prepare: Normalize,
                     device: Any) -> Dict[str, float]:
    """``{"top1", "eval_seconds"}`` on ``batches``, or nothing without them; kept out of the
    training time."""
    if batches is None:
        return {}
    started = time.perf_counter()
    top1 = evaluate(net, batches, prepare, device)
    return {"top1": top1, "eval_seconds": time.perf_counter() - started}


def recalibration_step(net: nn.Module, batches: Iterable, prepare: Normalize, device: Any,
                       record: Dict[str, Any]) -> None:
    """Re-estimate the norms on single images after the last epoch; its cost is charged to the
    epoch (``forward_inputs``, ``train_seconds``), so equal-compute comparisons include it."""
    from .norms import recalibrate_norms

    started = time.perf_counter()
    images = recalibrate_norms(net, batches, prepare, device)
    seconds = time.perf_counter() - started
    record.update(recalibration_images=images, recalibration_seconds=seconds,
                  forward_inputs=record["forward_inputs"] + images,
                  train_seconds=record["train_seconds"] + seconds)


def _layout_counts(plan: MixPlan) -> Dict[str, int]:
    return {Layout(c).name: int((plan.layout == c).sum()) for c in np.unique(plan.layout)}


def epoch_record(epoch: int, start: EpochStart, tally: EpochTally, report_seconds: float,
                 lr_end: float) -> Dict[str, Any]:
    """The history entry of one epoch; ``train_seconds`` runs from the plan fetch to the end of
    the commit."""
    plan = start.plan
    return {
        "epoch": epoch,
        "steps": tally.steps,
        "train_seconds": time.perf_counter() - start.started,
        "plan_seconds": start.plan_seconds,
        "data_wait_seconds": tally.data_wait_seconds,
        "compute_seconds": tally.compute_seconds,
        "report_seconds": report_seconds,
        "forward_inputs": int(plan.num_forward_inputs),
        "constituents": int(plan.num_constituents),
        "skipped": int(plan.skipped.size),
        "speedup_bound": float(plan.speedup_bound),
        "layouts": _layout_counts(plan),
        "train_loss": tally.mean_loss,
        "lr_end": lr_end,
    }


def history_totals(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The run's totals over its epoch records."""
    return {"train_seconds": sum(r["train_seconds"] for r in records),
            "forward_inputs": sum(r["forward_inputs"] for r in records),
            "final_top1": records[-1].get("top1")}


def reporting_service(loader: PlanLoader) -> Any:
    """The loader's plan source when it takes reports (a selection service), else None."""
    source = loader.source
    return source if hasattr(source, "report") and hasattr(source, "commit") else None
