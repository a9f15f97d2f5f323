"""Separate batch-norm statistics for composites: single images are normalised only by singles.

A composite (four downscaled images in a 2x2 grid, or a blend) is a different input distribution
from the single images the model is scored on. With one set of batch norms, every single image
in a mixed batch is normalised by statistics the composites pull around, and the running
statistics used at test time are those of the mixture. Earlier measurements show how strongly
the weights fit that coupling: replacing the mixture's statistics by single-image ones after
training costs about a point (benchmarks/README.md). Here each batch-norm layer gets an
auxiliary twin (the "auxiliary batch norm" that AdvProp uses for its adversarial inputs):
composite rows go through the twin, single rows through the layer itself, so the statistics a
single image sees in training and at test time are singles' only. The convolutions and the
classifier stay shared; only the normalisation is split.

A split model's checkpoint names each layer's two halves ``<layer>.main.*`` and ``<layer>.aux.*``:
split a fresh model before loading one. :func:`merge_norms` gives back the original
architecture, and with it the original checkpoint keys, for deployment.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["SplitBatchNorm", "split_norms", "merge_norms", "split_norm_layers", "composite_batch"]


class SplitBatchNorm(nn.Module):
    """A batch-norm layer (``main``, the one scored at test time) and its twin for composites
    (``aux``, a copy of it at the time of splitting).

    A forward pass runs through one of the two: ``aux`` while ``composites`` is set (by
    :func:`composite_batch`), else ``main``. The caller runs composites and single images as two
    sub-batches, so neither layer ever sees the other's rows. Two sub-batches rather than one
    batch with two groups inside every layer: splitting and re-joining the rows at each layer
    costs a copy per layer (a sixth of a CPU step for the small ResNet). Two passes cost the
    same as one at a fixed split, but the split moves from batch to batch, and on the CPU
    convolutions over ever-new batch sizes run about a sixth slower (measured in
    benchmarks/README.md): the price of this layer today.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.main = norm
        self.aux = copy.deepcopy(norm)
        self.composites = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux(x) if self.composites else self.main(x)


def _replace(module: nn.Module, make: Callable[[nn.Module], Optional[nn.Module]]) -> int:
    """Replace every child for which ``make(child)`` is not None, looking inside the others
    but never inside a split layer; returns how many were replaced."""
    count = 0
    for name, child in module.named_children():
        new = make(child)
        if new is not None:
            setattr(module, name, new)
            count += 1
        elif not isinstance(child, SplitBatchNorm):
            count += _replace(child, make)
    return count


def split_norms(model: nn.Module) -> int:
    """Give every batch-norm layer of ``model`` a twin for composites, in place; returns how many
    layers were split. Call it before the optimizer is built (the twins' parameters are new).
    A model without batch norm is left alone (0); splitting twice changes nothing."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise TypeError("split_norms takes a model holding batch-norm layers, not the layer "
                        "itself: wrap it in a module first")
    return _replace(model, lambda c: SplitBatchNorm(c)
                    if isinstance(c, nn.modules.batchnorm._BatchNorm) else None)


def merge_norms(model: nn.Module) -> int:
    """Undo :func:`split_norms` in place, keeping the single images' layers (the ones scored);
    returns how many layers were merged. The model is then the original architecture."""
    return _replace(model, lambda c: c.main if isinstance(c, SplitBatchNorm) else None)


def split_norm_layers(model: nn.Module) -> List[SplitBatchNorm]:
    """The model's split layers (empty when it was never split)."""
    return [m for m in model.modules() if isinstance(m, SplitBatchNorm)]


@contextlib.contextmanager
def composite_batch(layers: List[SplitBatchNorm]) -> Iterator[None]:
    """Route the forward passes run inside the block through the composites' norms."""
    for layer in layers:
        layer.composites = True
    try:
        yield
    finally:
        for layer in layers:
            layer.composites = False
