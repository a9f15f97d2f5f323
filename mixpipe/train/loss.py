"""The mixed loss: one cross-entropy per constituent, normalised per composite by default.

Spatial composites give each constituent its own logits (region pooling), so each constituent's
loss depends on its own label only. BLEND constituents share the composite's logits and weigh
their cross-entropies by their blend coefficients (mixup's loss). ``loss_scale`` multiplies each
term (>1 for samples an unbiased pruning policy kept for others; 0 for padding copies, which must
add nothing).

By default (``per="slot"``) the sum is divided by the number of composites. Then every sample
carries the same weight per step as it would alone in a batch of ``B`` singles: a mixed epoch
takes fewer steps, and dividing by constituents would hand each mixed sample only ``1 / K`` of its
usual share of the update (the large-batch effect at an unchanged learning rate). Per slot is the
linear scaling rule applied to the composite's extra constituents; the benchmark chose it
(benchmarks/README.md), and the library and the benchmark use the same default.
``per="constituent"`` divides by the number of real constituents, so the gradient scale does not
depend on how much of the batch was mixed.

The per-constituent losses handed back for reporting are the plain cross-entropies: how well the
model knows each sample, before any training weight. Reporting the scaled values would let a
policy's own weights feed back into its next decision.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mixpipe.core.plan import Layout

__all__ = ["MixedLoss", "mixed_loss", "batch_loss", "NORMALISATIONS"]

#: what the summed loss is divided by: real constituents, or composites holding any
NORMALISATIONS = ("constituent", "slot")


class MixedLoss(NamedTuple):
    loss: torch.Tensor  #: scalar to backpropagate
    per_constituent: torch.Tensor  #: float32[B, K] plain cross-entropies, detached (0 where not real)
    real: torch.Tensor  #: bool[B, K] constituents that exist and are not padding copies


def mixed_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
               layout: torch.Tensor, loss_scale: torch.Tensor,
               per: str = "slot") -> MixedLoss:
    """logits [B, K, classes] (from an adapted model); targets int64[B, K] with -1 for no
    constituent; weights, loss_scale float[B, K]; layout uint8[B]; ``per``: one of
    :data:`NORMALISATIONS` (see the module docstring)."""
    if per not in NORMALISATIONS:
        raise ValueError(f"per must be one of {NORMALISATIONS}, got {per!r}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, K, classes] (an adapted model's mixed output), got "
                         f"shape {tuple(logits.shape)}")
    b, k, classes = logits.shape
    for name, t in (("targets", targets), ("weights", weights), ("loss_scale", loss_scale)):
        if tuple(t.shape) != (b, k):
            raise ValueError(f"{name} must be [{b}, {k}] like the logits' first two dims, got "
                             f"{tuple(t.shape)}")
    if tuple(layout.shape) != (b,):
        raise ValueError(f"layout must be [{b}], got {tuple(layout.shape)}")
    device = logits.device
    targets = targets.to(device)
    scale = loss_scale.to(device, logits.dtype)
    real = (targets >= 0) & (scale > 0)
    if bool((targets >= classes).any()):
        bad = int(targets.max())
        raise ValueError(f"target {bad} out of range for {classes} classes")
    ce = F.cross_entropy(logits.reshape(b * k, classes), targets.clamp_min(0).reshape(-1),
                         reduction="none").reshape(b, k)
    blend = (layout.to(device) == int(Layout.BLEND))[:, None]
    coeff = torch.where(blend, weights.to(device, logits.dtype), torch.ones_like(scale)) * scale
    coeff = coeff * real
    count = (real.sum() if per == "constituent" else real.any(dim=1).sum()).clamp_min(1)
    loss = (ce * coeff).sum() / count
    per = torch.where(real, ce.detach(), torch.zeros_like(ce)).float()
    return MixedLoss(loss, per, real)


def batch_loss(logits: torch.Tensor, batch, per: str = "slot") -> MixedLoss:
    """:func:`mixed_loss` with the fields of a :class:`mixpipe.core.batch.MixedBatch`."""
    return mixed_loss(logits, batch.targets, batch.weights, batch.layout, batch.loss_scale, per)
