"""Per-epoch mixing statistics as a flat dict of numbers, for whatever logger the user runs.

The epoch record of :func:`mixpipe.train.fit` is written for the history file (nested layout
counts, ``None`` where something did not run); loggers such as TensorBoard, MLflow or wandb want
flat name -> number pairs with the same keys every epoch. :func:`epoch_metrics` turns a record,
the epoch's plan and the losses its steps produced into such a dict; :class:`EpochLosses` keeps
those losses during the epoch without making a GPU step wait for them; :class:`TensorBoardMetrics`
writes the dicts as scalars.

Shares are taken over the samples the plan covers (its constituents plus its skipped samples),
which is the whole dataset for a single process. Under ``torch.distributed`` each rank sees its
own shard of the plan, and its numbers describe that shard (rank 0's shard lists every skipped
sample).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.plan import Layout, MixPlan

__all__ = ["QUANTILES", "EpochLosses", "plan_counts", "loss_quantiles", "epoch_metrics",
           "TensorBoardMetrics"]

#: the loss quantiles reported for mixed constituents and for single samples
QUANTILES: Tuple[float, ...] = (0.1, 0.5, 0.9)

#: record fields copied as they are: the loop's timings (seconds) and the epoch's outcome
_FROM_RECORD = ("plan_seconds", "data_wait_seconds", "report_seconds", "compute_seconds",
                "train_seconds", "train_loss")


def plan_counts(plan: MixPlan) -> Dict[str, int]:
    """How the plan's samples split into mixed (inside a composite), single and skipped.

    Padding copies (``loss_scale`` 0) are not counted: they train nothing, so counting them
    would make a sharded epoch look more mixed than it was.
    """
    real = (plan.ids >= 0) & (plan.loss_scale > 0)
    in_composite = (plan.layout != int(Layout.SINGLE))[:, None]
    mixed = int(np.count_nonzero(real & in_composite))
    single = int(np.count_nonzero(real & ~in_composite))
    skipped = int(plan.skipped.size)
    return {"samples": mixed + single + skipped, "mixed": mixed, "single": single,
            "skipped": skipped}


def _quantile_key(prefix: str, q: float) -> str:
    return f"{prefix}_q{round(q * 100):02d}"


def loss_quantiles(losses: np.ndarray, prefix: str,
                   quantiles: Sequence[float] = QUANTILES) -> Dict[str, float]:
    """``{prefix}_q10`` ... of ``losses``; NaN when there are none, so every epoch carries the
    same keys (a warm-up epoch has no mixed constituents)."""
    values = np.asarray(losses, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return {_quantile_key(prefix, q): math.nan for q in quantiles}
    found = np.quantile(values, list(quantiles))
    return {_quantile_key(prefix, q): float(v) for q, v in zip(quantiles, found)}


def epoch_metrics(record: Mapping[str, Any], plan: MixPlan,
                  losses: Optional[np.ndarray] = None, mixed: Optional[np.ndarray] = None,
                  quantiles: Sequence[float] = QUANTILES) -> Dict[str, float]:
    """The flat metrics of one epoch (keys listed in :func:`mixpipe.train.fit`'s
    ``on_metrics``).

    ``record``: the epoch's record (:func:`mixpipe.train.steps.epoch_record`); ``plan``: the
    plan it trained on; ``losses`` / ``mixed``: the plain losses of the constituents it trained
    and whether each sat in a composite (:meth:`EpochLosses.arrays`), or None to leave the
    quantiles out.
    """
    counts = plan_counts(plan)
    samples = counts["samples"]
    share = (lambda n: n / samples) if samples else (lambda n: 0.0)
    out: Dict[str, float] = {
        "epoch": int(record["epoch"]),
        "samples": samples,
        "forward_inputs": int(plan.num_forward_inputs),
        "mixed": counts["mixed"],
        "single": counts["single"],
        "skipped": counts["skipped"],
        "mixed_share": share(counts["mixed"]),
        "single_share": share(counts["single"]),
        "skipped_share": share(counts["skipped"]),
        "speedup_bound": float(plan.speedup_bound),
    }
    out.update({key: float(record[key]) for key in _FROM_RECORD if key in record})
    if "lr_end" in record:
        out["lr"] = float(record["lr_end"])
    if record.get("top1") is not None:
        out["top1"] = float(record["top1"])
    if losses is not None:
        if mixed is None:
            raise ValueError("losses need their mixed flags (EpochLosses.arrays gives both)")
        losses = np.asarray(losses).reshape(-1)
        in_composite = np.asarray(mixed, dtype=bool).reshape(-1)
        if in_composite.shape != losses.shape:
            raise ValueError(f"mixed has shape {in_composite.shape}, losses {losses.shape}: "
                             "one flag per loss")
        out.update(loss_quantiles(losses[in_composite], "loss_mixed", quantiles))
        out.update(loss_quantiles(losses[~in_composite], "loss_single", quantiles))
    return out


class EpochLosses:
    """The losses one epoch's steps produced, split into mixed and single constituents.

    Each step's tensors are kept where they are (on the GPU, for a GPU step) and copied to the
    host once, when the epoch ends: a per-step copy would make every step wait for its own
    backward pass. It holds one float and two flags per constituent of the epoch.
    """

    def __init__(self) -> None:
        self._losses: List[torch.Tensor] = []
        self._real: List[torch.Tensor] = []
        self._mixed: List[torch.Tensor] = []

    def add(self, batch: Any, out: Any) -> None:
        """One step's :class:`~mixpipe.train.loss.MixedLoss` on its
        :class:`~mixpipe.core.batch.MixedBatch`."""
        per = out.per_constituent.detach()
        self._losses.append(per.reshape(-1))
        self._real.append(out.real.reshape(-1))
        composite = batch.layout != int(Layout.SINGLE)
        self._mixed.append(composite[:, None].expand(per.shape[0], per.shape[1]).reshape(-1))

    def arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        """(float32 losses, bool in-composite) of the real constituents, then start afresh."""
        if not self._losses:
            return np.empty(0, np.float32), np.empty(0, bool)
        losses = torch.cat(self._losses).float().cpu().numpy()
        real = torch.cat(self._real).cpu().numpy().astype(bool)
        mixed = torch.cat([m.cpu() for m in self._mixed]).numpy().astype(bool)
        self._losses, self._real, self._mixed = [], [], []
        return losses[real], mixed[real]


class TensorBoardMetrics:
    """An ``on_metrics`` callback writing each epoch's metrics as TensorBoard scalars, at the
    epoch as the step.

    NaN values (no mixed constituents in a warm-up epoch) are left out rather than drawn as a
    point. It flushes after every epoch, so a running job can be watched. TensorBoard is an
    optional dependency: ``pip install 'mixpipe[tensorboard]'``.
    """

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises a plain ImportError when tensorboard is missing
            raise ModuleNotFoundError("TensorBoard is not installed: pip install "
                                      "'mixpipe[tensorboard]'", name="tensorboard") from None
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=log_dir)

    def __call__(self, metrics: Mapping[str, float]) -> None:
        step = int(metrics["epoch"])
        for key, value in metrics.items():
            if key != "epoch" and math.isfinite(float(value)):
                self._writer.add_scalar(key, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "TensorBoardMetrics":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
