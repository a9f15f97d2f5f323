"""Re-estimate batch-norm statistics on single images after mixed training.

The idea it tests: a mixed epoch trains the normalisation layers on composites, whose
constituents are scaled down into their regions, so the running statistics describe composites
while the model is scored on single, full-size images (the kind of train/test discrepancy FixRes
describes for resolution). It does not pay for mixtrain, and is off by default: during training
a single image is normalised by the statistics of its batch, which are mostly composites' too,
and the weights are fitted to that normalisation; the composites' running statistics are
therefore the consistent ones at test time (measured in benchmarks/README.md). It stays as a
tool for models whose batches at training time do look like the images they are scored on.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional

import torch
from torch import nn

from .evaluate import Normalize

__all__ = ["recalibrate_norms", "batch_norms"]


def batch_norms(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """The model's batch-norm layers that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_norms(model: nn.Module, batches: Iterable, prepare: Normalize = Normalize(),
                      device: Any = None, max_images: Optional[int] = None) -> int:
    """Reset every batch-norm layer's running statistics and re-estimate them as the plain
    average over ``batches`` of single images (``(images uint8 [B, C, H, W], labels)``, e.g.
    :class:`mixpipe.train.EvalBatches` over training images); returns the images used.

    Forward only, without gradients; the model's training/eval mode and the layers' momentum are
    restored afterwards, and so are the old statistics if the pass fails or sees no image.
    ``max_images`` stops early. A model without batch norm is left alone (0 images).
    """
    norms = batch_norms(model)
    if not norms:
        return 0
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    momenta = [m.momentum for m in norms]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    was_training = model.training
    used = 0
    done = False
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts alike
        model.train()
        with torch.no_grad():
            for images, _ in batches:
                if max_images is not None and used + len(images) > max_images:
                    images = images[:max_images - used]
                if len(images) == 0:
                    break
                model(prepare(images, device))
                used += len(images)
                if max_images is not None and used >= max_images:
                    break
        done = used > 0
    finally:
        for m, momentum, state in zip(norms, momenta, saved):
            m.momentum = momentum
            if not done:  # failed or saw nothing: the old statistics, not reset ones
                m.load_state_dict(state)
        model.train(was_training)
    if used == 0:
        raise ValueError("recalibrate_norms got no images (the statistics are left as they "
                         "were): pass at least one batch of single images")
    return used
