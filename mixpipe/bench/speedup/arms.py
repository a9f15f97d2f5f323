"""Training one arm of one seed: the same model, initial weights, optimiser and data for every
arm; only the plan source (and, for budget arms, the run's length) differs."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional

import numpy as np

from mixpipe.core.policies.budget import whole_epochs

from .loaders import make_loader
from .progressive import plan_progressive, progressive_resize
from .settings import (SpeedupSettings, arm_batch_size, arm_epochs, arm_local, arm_policy,
                       recalibration_images, splits_norms)

__all__ = ["train_arm", "build_model"]


def build_model(name: str, num_classes: int) -> Any:
    if name.startswith("tv:"):
        try:
            import torchvision
        except ImportError as err:
            raise SystemExit(f"--model {name}: torchvision is not installed ({err}); pip "
                             "install torchvision matching your torch") from err
        return getattr(torchvision.models, name[3:])(num_classes=num_classes)
    from mixpipe.train import build_model as build

    return build(name, num_classes)


def _optimizer(model: Any, s: SpeedupSettings) -> Any:
    import torch

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": s.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=s.lr,
                           momentum=s.momentum, nesterov=s.momentum > 0)


def train_arm(s: SpeedupSettings, arm: str, seed: int, train: Any, eval_batches: Any,
              num_classes: int, log: Callable[..., None] = print,
              matched_inputs: Optional[float] = None,
              observe: Optional[Callable[[Any, Any], Any]] = None) -> Dict[str, Any]:
    """One (arm, seed) run; returns its history with the arm's identity. ``matched_inputs``:
    the forward inputs a budget or progressive arm matches, where they were measured. The
    progressive arm's epoch records also hold each epoch's side and FLOPs. ``observe(service,
    model)`` returns the service the loader and the trainer use (a diagnostic's wrapper, which
    may also keep the model)."""
    import torch

    from mixpipe.train import BudgetSchedule, Normalize, Schedule, fit
    from mixpipe.train.distributed import barrier, job_service, main_process

    n = len(train)
    board = _board(s, arm, seed) if main_process() else None  # first: a missing one fails fast
    # before the seed: pricing passes builds models, which must not draw from the seeded stream
    progressive = _progressive(s, arm, n, num_classes, matched_inputs)
    torch.manual_seed(seed)
    model = build_model(s.model, num_classes)
    if splits_norms(s, arm):  # before the optimizer and LoCal+SGD take the model's parameters
        from mixpipe.train import split_norms

        split_norms(model)
    optimizer = _optimizer(model, s)
    settings = arm_policy(arm, s, n, matched_inputs, num_classes)
    length = arm_epochs(arm, s, n, matched_inputs, num_classes)
    epochs = whole_epochs(length)
    schedule = Schedule(s.schedule, s.warmup)
    if length != s.epochs:
        schedule = BudgetSchedule(schedule, length)
    # one process: the embedded service; under torchrun: rank 0 serves it to every rank
    service, owned = job_service(len(train), settings, seed, server=s.server)
    labels = getattr(train, "labels", None)
    if labels is not None and hasattr(service, "set_labels"):
        service.set_labels(np.asarray(labels))  # per-class policies read them
    if observe is not None:
        service = observe(service, model)
    batch = arm_batch_size(arm, s, n)
    loader = make_loader(dataclasses.replace(s, batch_size=batch), train, service, seed)
    recalibrate = _recalibration_batches(s, arm, train, seed)
    local, kind = None, arm_local(arm, s)
    if kind:
        from mixpipe.train.local import from_kind

        local = from_kind(kind, model, optimizer, epochs)
    try:
        history = fit(model, loader, optimizer, epochs, schedule,
                      on_epoch=local.on_epoch if local is not None else None,
                      eval_loader=eval_batches, service=service, stride=s.stride,
                      device=s.device, prepare=Normalize(channels_last=s.uses_channels_last()),
                      progress=s.progress, desc=f"{arm} seed {seed}", loss_per=s.loss_per,
                      recalibrate=recalibrate,
                      resolution=progressive_resize(s, length) if progressive else None,
                      on_metrics=board)
    finally:
        if board is not None:
            board.close()
        loader.close()  # every protocol loader has it; DALI's workers must not outlive the arm
    barrier()  # every rank is done with this arm's server before rank 0 stops it
    if owned is not None:
        owned.stop()
    # the framing it was scored with: the settings record None where it followed the training
    history.update(policy=arm, seed=seed, batch_slots=batch, policy_settings=settings.to_dict(),
                   epochs_of_data=length, eval_crop_ratio=s.crop_ratio,
                   local=local.history if local is not None else None)
    if progressive is not None or local is not None:
        _price_epochs(history, s, num_classes)
    if progressive is not None:
        history["progressive"] = progressive.to_dict()
    return history


def _board(s: SpeedupSettings, arm: str, seed: int) -> Any:
    """``--tensorboard``'s writer for this arm and seed, None without the flag."""
    if not s.tensorboard:
        return None
    from mixpipe.train import TensorBoardMetrics

    try:
        return TensorBoardMetrics(os.path.join(s.tensorboard, f"{arm}-seed{seed}"))
    except ModuleNotFoundError as err:
        raise SystemExit(f"mixpipe: error: --tensorboard: {err}") from None


def _progressive(s: SpeedupSettings, arm: str, num_samples: int, num_classes: int,
                 matched_inputs: Optional[float]) -> Any:
    """The progressive arm's plan (its length and sides), None for every other arm."""
    if arm != "progressive":
        return None
    return plan_progressive(s, num_samples, num_classes, matched_inputs)


def _price_epochs(history: Dict[str, Any], s: SpeedupSettings, num_classes: int) -> None:
    """Each epoch's FLOPs at the side it trained at and the LoCal boundary it trained with:
    forward inputs count compute only while every input costs the same. ``plain_passes`` is
    the run's compute in passes of the plain model at full size, what a budget arm matches."""
    from .compute import epoch_pass_flops, pass_flops

    full = pass_flops(s.model, s.image_size, num_classes)
    for record in history["epochs"]:
        record["pass_flops"] = epoch_pass_flops(s.model, s.image_size, num_classes, record)
        record["train_flops"] = record["forward_inputs"] * record["pass_flops"]
        record["plain_passes"] = record["train_flops"] / full
    history["train_flops"] = sum(r["train_flops"] for r in history["epochs"])
    history["plain_passes"] = history["train_flops"] / full


def _recalibration_batches(s: SpeedupSettings, arm: str, train: Any, seed: int) -> Any:
    """Single training images (a seeded random slice, shown as at evaluation) for the norms'
    recalibration after the arm's last epoch; None where the arm has none."""
    count = recalibration_images(s, arm, len(train))
    if not count:
        return None
    from mixpipe.data.subset import Chosen
    from mixpipe.train import EvalBatches

    ids = np.sort(np.random.default_rng([seed, 0x4e4f524d]).permutation(len(train))[:count])
    return EvalBatches(Chosen(train, ids), batch_size=256, cache=False, size=s.image_size,
                       crop_ratio=s.crop_ratio)
