"""``fit``: the compact training loop the benchmarks and users share.

It is the three trainer pieces (region pooling, the mixed loss, the loss reporter) put in order,
plus what a fair comparison needs: a learning rate set by progress through the data, an
evaluation after every epoch that is not charged to training time, and the training wall-clock
split into waiting for data and computing, so a loader that eats the saving shows up as data wait.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterable, Optional, Union

import numpy as np
import torch
from torch import nn

from mixpipe.core.plan import Layout

from .adapt import adapt
from .distributed import agree_steps, wrap_model, world
from .evaluate import Normalize, evaluate
from .loss import NORMALISATIONS, batch_loss
from .reporter import LossReporter
from .schedule import Schedule

__all__ = ["fit"]


def _layout_counts(plan) -> Dict[str, int]:
    if plan is None:
        return {}
    return {Layout(c).name: int((plan.layout == c).sum()) for c in np.unique(plan.layout)}


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def fit(model: nn.Module, loader, optimizer: torch.optim.Optimizer, epochs: int,
        schedule: Union[Schedule, str] = "cosine", eval_loader: Optional[Iterable] = None,
        service=None, *, device: Union[str, torch.device] = "cpu",
        prepare: Normalize = Normalize(), stride: Optional[int] = None,
        rank: Optional[int] = None, commit: Optional[bool] = None, start_epoch: int = 0,
        progress: bool = True, reporter_chunk: int = 8192,
        on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None,
        desc: str = "train", loss_per: str = "constituent") -> Dict[str, Any]:
    """Train ``model`` for ``epochs`` epochs of ``loader``; return the history.

    ``loader`` yields :class:`~mixpipe.core.batch.MixedBatch` es and has ``set_epoch(e)`` and
    ``len()`` (a :class:`mixpipe.torch.MixedLoader`, or the DALI / FFCV adapters). ``service``
    receives the losses (default: the loader's plan source when it takes reports; with none,
    training runs without feedback).
    The optimizer's learning rates are the base rates; ``schedule`` scales them every step by
    progress through the run. ``commit`` defaults to rank 0 (after a barrier when
    ``torch.distributed`` is initialised, so every rank's reports are in).

    Under ``torch.distributed`` (see :mod:`mixpipe.train.distributed`) ``rank`` defaults to the
    process rank, the adapted model is wrapped in DDP, every rank takes the same number of steps
    (the smallest of the ranks' loaders) and all ranks meet at a barrier after flushing their
    losses, before anyone commits or asks for the next plan. Only rank 0 prints.
    ``loss_per`` is the mixed loss's normalisation (:func:`mixpipe.train.loss.mixed_loss`).
    ``start_epoch`` resumes a run at that epoch (restore the model, optimizer and selection
    service from a checkpoint first).

    The history holds per-epoch records (``train_seconds`` = data wait + compute + plan fetch,
    ``eval_seconds`` kept apart, ``forward_inputs``, ``constituents``, ``train_loss``, ``top1``,
    ``speedup_bound``, layout counts) and the totals.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 <= start_epoch < epochs:
        raise ValueError(f"start_epoch must be in [0, epochs={epochs}), got {start_epoch}")
    if rank is None:
        rank = world()[0]
    progress = progress and rank == 0
    if not (hasattr(loader, "set_epoch") and hasattr(loader, "__len__")):
        raise TypeError("loader must have set_epoch(epoch) and len() (e.g. mixpipe.torch."
                        "MixedLoader)")
    schedule = Schedule(schedule) if isinstance(schedule, str) else schedule
    if loss_per not in NORMALISATIONS:
        raise ValueError(f"loss_per must be one of {NORMALISATIONS}, got {loss_per!r}")
    if stride is None:
        stride = getattr(getattr(loader, "dataset", None), "stride", None)
    net = adapt(model, stride=stride).to(device)
    if prepare.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net = wrap_model(net, device)
    if service is None:  # the loader's own plan source, if it takes reports
        source = getattr(loader, "service", None) or \
            getattr(getattr(loader, "sampler", None), "source", None)
        service = source if hasattr(source, "report") and hasattr(source, "commit") else None
    commit = (rank == 0) if commit is None else commit
    # "initial_lr" (the torch schedulers' key) travels in the optimizer's state_dict, so a
    # resumed run scales the base rates, not the last scheduled ones
    base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
    reporter = LossReporter(service, rank=rank, chunk=reporter_chunk) if service is not None \
        else None
    history: Dict[str, Any] = {"epochs": [], "schedule": schedule.kind, "epochs_total": epochs}
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    failed = True
    try:
        for epoch in range(start_epoch, epochs):
            net.train()
            t0 = time.perf_counter()
            plan = loader.set_epoch(epoch)
            plan = plan if plan is not None else getattr(loader, "plan", None)
            steps = agree_steps(len(loader))
            plan_seconds = time.perf_counter() - t0
            wait = compute = 0.0
            loss_sum = 0.0
            loss_count = 0
            bar = tqdm(total=steps, desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
                       disable=not progress or tqdm is None) if tqdm else None
            tick = time.perf_counter()
            step = -1
            for step, batch in enumerate(loader):
                if step >= steps:  # another rank has fewer: all must take the same steps
                    step -= 1
                    break
                got = time.perf_counter()
                wait += got - tick
                factor = schedule.factor((epoch + step / max(steps, 1)) / epochs)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                images = prepare(batch.image, device)
                logits = net(images, batch.layout, batch.weights.to(device))
                out = batch_loss(logits, batch, loss_per)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                if reporter is not None:
                    reporter.add(epoch, batch.ids, out.per_constituent, batch.loss_scale)
                loss_sum += float(out.per_constituent.sum())
                loss_count += int(out.real.sum())
                tick = time.perf_counter()
                compute += tick - got
                if bar is not None:
                    bar.update(1)
                    if step % 20 == 0:
                        bar.set_postfix(loss=f"{loss_sum / max(loss_count, 1):.3f}",
                                        lr=f"{base_lrs[0] * factor:.3g}")
            if bar is not None:
                bar.close()
            if torch.cuda.is_available() and torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            t_report = time.perf_counter()
            if reporter is not None:
                reporter.flush()
                _barrier()  # every rank, so no one asks for the next plan before all reported
                reporter.end_epoch(epoch, commit=commit)
            report_seconds = time.perf_counter() - t_report
            train_seconds = time.perf_counter() - t0
            record: Dict[str, Any] = {
                "epoch": epoch,
                "steps": step + 1,
                "train_seconds": train_seconds,
                "plan_seconds": plan_seconds,
                "data_wait_seconds": wait,
                "compute_seconds": compute,
                "report_seconds": report_seconds,
                "forward_inputs": int(plan.num_forward_inputs) if plan is not None else None,
                "constituents": int(plan.num_constituents) if plan is not None else loss_count,
                "skipped": int(plan.skipped.size) if plan is not None else 0,
                "speedup_bound": float(plan.speedup_bound) if plan is not None else 1.0,
                "layouts": _layout_counts(plan),
                "train_loss": loss_sum / max(loss_count, 1),
                "lr_end": base_lrs[0] * schedule.factor((epoch + 1) / epochs),
            }
            if eval_loader is not None:
                t_eval = time.perf_counter()
                record["top1"] = evaluate(net, eval_loader, prepare, device)
                record["eval_seconds"] = time.perf_counter() - t_eval
            history["epochs"].append(record)
            if progress:
                top = f" top-1 {record['top1'] * 100:.2f}%" if "top1" in record else ""
                print(f"[{desc}] epoch {epoch + 1}/{epochs}: {record['forward_inputs']} inputs, "
                      f"loss {record['train_loss']:.4f}, {train_seconds:.1f}s "
                      f"(data wait {wait:.1f}s){top}", flush=True)
            if on_epoch is not None:
                on_epoch(record)
        failed = False
    finally:
        if reporter is not None:
            reporter.close(raise_errors=not failed)
    history["train_seconds"] = sum(r["train_seconds"] for r in history["epochs"])
    history["forward_inputs"] = sum((r["forward_inputs"] or 0) for r in history["epochs"])
    history["final_top1"] = history["epochs"][-1].get("top1")
    return history
