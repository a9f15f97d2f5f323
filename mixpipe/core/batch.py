"""The batch every mixpipe loader yields (torch, DALI and FFCV alike)."""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["MixedBatch"]


class MixedBatch(NamedTuple):
    """One batch of composites.

    image: [B, C, H, W] composites. targets, ids: int64[B, K], -1 where a slot has fewer
    constituents. weights, loss_scale: float32[B, K] (0 where there is no constituent;
    loss_scale 0 also marks padding copies that must not train or be reported).
    layout: uint8[B] :class:`mixpipe.core.plan.Layout` codes.
    """

    image: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    layout: torch.Tensor
    loss_scale: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "MixedBatch":
        return MixedBatch(*(t.to(device, non_blocking=non_blocking) for t in self))
