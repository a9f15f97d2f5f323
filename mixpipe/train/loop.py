"""``fit``: the compact training loop the benchmarks and users share.

It is the three trainer pieces (region pooling, the mixed loss, the loss reporter) put in order,
plus what a fair comparison needs: a learning rate set by progress through the data, an
evaluation after every epoch that is not charged to training time, and the training wall-clock
split into waiting for data and computing, so a loader that eats the saving shows up as data wait.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from mixpipe.core.loader import PlanLoader
from mixpipe.progress import progress_bar

from .adapt import adapt
from .distributed import wrap_model, world
from .evaluate import Normalize
from .loss import NORMALISATIONS
from .metrics import EpochLosses, epoch_metrics
from .reporter import LossReporter
from .schedule import Schedule
from .steps import (EpochStart, EpochTally, begin_epoch, close_epoch, epoch_record,
                    history_totals, recalibration_step, report_losses, reporting_service, set_lr,
                    timed_evaluation, train_step)

__all__ = ["fit"]


def fit(model: nn.Module, loader: PlanLoader, optimizer: torch.optim.Optimizer, epochs: int,
        schedule: Union[Schedule, str] = "cosine", eval_loader: Optional[Iterable] = None,
        service=None, *, device: Union[str, torch.device] = "cpu",
        prepare: Normalize = Normalize(), stride: Optional[int] = None,
        rank: Optional[int] = None, commit: Optional[bool] = None, start_epoch: int = 0,
        progress: bool = True, reporter_chunk: int = 8192,
        on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None,
        desc: str = "train", loss_per: str = "slot",
        recalibrate: Optional[Iterable] = None,
        resolution: Optional[Callable[[int], int]] = None,
        on_metrics: Optional[Callable[[Dict[str, float]], None]] = None) -> Dict[str, Any]:
    """Train ``model`` for ``epochs`` epochs of ``loader`` (a :class:`~mixpipe.core.loader
    .PlanLoader`, left open); return the history.

    ``service`` receives the losses (default: ``loader.source`` when it takes reports; with
    none, training runs without feedback). The optimizer's rates are base rates that
    ``schedule`` scales every step by progress through the run. ``stride``: the model's total
    stride for region pooling (None: read off the feature map). ``commit`` defaults to rank 0.
    Under ``torch.distributed`` (:mod:`mixpipe.train.distributed`) ``rank`` defaults to the
    process rank, the model is wrapped in DDP, every rank takes the same number of steps and all
    ranks meet at a barrier after flushing their losses, before anyone commits or asks for the
    next plan; only rank 0 prints. ``loss_per``: :func:`mixpipe.train.loss.mixed_loss`'s
    normalisation. ``start_epoch`` resumes there (restore model, optimizer and service first).
    ``recalibrate``: batches of single training images (``(images, labels)``, e.g.
    :class:`~mixpipe.train.EvalBatches` over a slice of the training set) on which the batch-norm
    statistics are re-estimated after the last epoch, before it is scored
    (:func:`mixpipe.train.recalibrate_norms`); its images and seconds count as that epoch's
    forward inputs and training time.
    ``resolution(epoch)``: the side in px each epoch trains at, the loader's batches resized to
    it before the forward pass (progressive resizing, :class:`mixpipe.train.resolution
    .ProgressiveResize`; plans of single images only); the record keeps it as ``resolution``.
    Composites and single images share the model's batch norms unless the model was split
    first (:func:`mixpipe.train.split_norms`, before the optimizer is built).

    ``on_metrics(metrics)`` gets, after each epoch (and after ``on_epoch``), a flat dict of
    numbers for the user's own logger (:func:`mixpipe.train.metrics.epoch_metrics`; e.g.
    :class:`mixpipe.train.TensorBoardMetrics`): ``epoch``; the plan's split of its ``samples``
    into ``mixed`` (inside composites), ``single`` and ``skipped``, with ``mixed_share``,
    ``single_share`` and ``skipped_share`` of ``samples``; the plan's ``forward_inputs``
    (recalibration images not counted) and ``speedup_bound`` (samples / forward inputs); the loop's ``plan_seconds`` (fetching the
    plan), ``data_wait_seconds``, ``report_seconds`` (flushing the losses and committing),
    ``compute_seconds``, ``train_seconds``; ``train_loss``, ``lr`` (at the epoch's end),
    ``top1`` with an ``eval_loader``; and the quantiles ``loss_mixed_q10``, ``_q50``, ``_q90``
    and ``loss_single_q10`` ... of the plain losses the epoch's steps reported (NaN where the
    epoch had none of the kind). Without it, no losses are kept.

    The history holds per-epoch records (:func:`mixpipe.train.steps.epoch_record`, with ``top1``
    and ``eval_seconds`` when there is an ``eval_loader``) and the totals.
    """
    _check(loader, epochs, start_epoch, loss_per)
    rank = world()[0] if rank is None else rank
    schedule = Schedule(schedule) if isinstance(schedule, str) else schedule
    net = _prepared_net(model, stride, prepare, device)
    service = reporting_service(loader) if service is None else service
    reporter = LossReporter(service, rank=rank, chunk=reporter_chunk) \
        if service is not None else None
    # "initial_lr" (the torch schedulers' key) travels in the optimizer's state_dict, so a
    # resumed run scales the base rates, not the last scheduled ones
    base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
    run = _Run(net, optimizer, schedule, epochs, base_lrs, reporter, prepare, device, loss_per)
    commit = (rank == 0) if commit is None else commit
    show = progress and rank == 0
    history: Dict[str, Any] = {"epochs": [], "schedule": schedule.kind, "epochs_total": epochs}
    failed = True
    try:
        for epoch in range(start_epoch, epochs):
            run.net.train()
            begun = begin_epoch(loader, epoch)
            size = resolution(epoch) if resolution is not None else None
            kept = EpochLosses() if on_metrics is not None else None
            tally = _train_epoch(run, loader, epoch, begun, f"{desc} {epoch + 1}/{epochs}", show,
                                 size, kept)
            record = epoch_record(epoch, begun, tally, close_epoch(run.reporter, epoch, commit),
                                  run.lr(epoch + 1))
            if size is not None:
                record["resolution"] = size
            if recalibrate is not None and epoch == epochs - 1:
                recalibration_step(run.net, recalibrate, prepare, device, record)
            record.update(timed_evaluation(run.net, eval_loader, prepare, device))
            history["epochs"].append(record)
            if show:
                _print_epoch(record, desc, epochs)
            if on_epoch is not None:
                on_epoch(record)
            if on_metrics is not None:
                on_metrics(epoch_metrics(record, begun.plan, *kept.arrays()))
        failed = False
    finally:
        if run.reporter is not None:
            run.reporter.close(raise_errors=not failed)
    history.update(history_totals(history["epochs"]))
    return history


def _check(loader: Any, epochs: int, start_epoch: int, loss_per: str) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 <= start_epoch < epochs:
        raise ValueError(f"start_epoch must be in [0, epochs={epochs}), got {start_epoch}")
    if not all(hasattr(loader, name) for name in ("set_epoch", "__len__", "__iter__")):
        raise TypeError("loader must be a mixpipe.core.loader.PlanLoader, with set_epoch(epoch), "
                        "len() and iteration (e.g. mixpipe.torch.MixedLoader)")
    if loss_per not in NORMALISATIONS:
        raise ValueError(f"loss_per must be one of {NORMALISATIONS}, got {loss_per!r}")


def _prepared_net(model: nn.Module, stride: Optional[int], prepare: Normalize,
                  device: Any) -> nn.Module:
    net = adapt(model, stride=stride).to(device)
    if prepare.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return wrap_model(net, device)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays fixed over a run's steps."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    epochs: int
    base_lrs: List[float]
    reporter: Optional[LossReporter]
    prepare: Normalize
    device: Any
    loss_per: str

    def factor(self, progress_epochs: float) -> float:
        return self.schedule.factor(progress_epochs / self.epochs)

    def lr(self, progress_epochs: float) -> float:
        return self.base_lrs[0] * self.factor(progress_epochs)


def _train_epoch(run: _Run, loader: PlanLoader, epoch: int, begun: EpochStart, label: str,
                 show: bool, size: Optional[int] = None,
                 kept: Optional[EpochLosses] = None) -> EpochTally:
    """The epoch's steps, timed: waiting for a batch is data wait, the rest is compute (the
    resizing of a progressive epoch, at ``size`` px, included). ``kept`` collects the steps'
    losses for the epoch's metrics."""
    tally = EpochTally()
    with progress_bar(total=begun.steps, desc=label, leave=False, show=show) as bar:
        tick = time.perf_counter()
        for step, batch in enumerate(loader):
            if step >= begun.steps:  # another rank has fewer: all must take the same steps
                break
            got = time.perf_counter()
            factor = run.factor(epoch + step / max(begun.steps, 1))
            set_lr(run.optimizer, run.base_lrs, factor)
            out = train_step(run.net, run.optimizer, batch, run.prepare, run.device,
                             run.loss_per, size)
            report_losses(run.reporter, epoch, batch, out)
            if kept is not None:
                kept.add(batch, out)
            tick, waited = time.perf_counter(), got - tick
            tally.add(out, waited, tick - got)
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{tally.mean_loss:.3f}",
                                lr=f"{run.base_lrs[0] * factor:.3g}")
    if torch.cuda.is_available() and torch.device(run.device).type == "cuda":
        torch.cuda.synchronize()
    return tally


def _print_epoch(record: Dict[str, Any], desc: str, epochs: int) -> None:
    top = f" top-1 {record['top1'] * 100:.2f}%" if "top1" in record else ""
    side = f" at {record['resolution']} px" if "resolution" in record else ""
    print(f"[{desc}] epoch {record['epoch'] + 1}/{epochs}: {record['forward_inputs']} "
          f"inputs{side}, loss {record['train_loss']:.4f}, {record['train_seconds']:.1f}s "
          f"(data wait {record['data_wait_seconds']:.1f}s){top}", flush=True)
