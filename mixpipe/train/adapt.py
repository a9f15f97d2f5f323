"""``adapt(model)``: give an ordinary classifier per-constituent logits for mixed composites.

The model is run exactly as written (its own ``forward``), and a hook captures the final feature
map on the way. Unmixed (SINGLE) and BLEND rows keep the model's own output, bit for bit; only
HALVES / QUADS rows get extra work: each region of the captured map is pooled separately and sent
through the model's own classifier. So an adapted model is the original model plus a cheap head,
and a checkpoint of it is a checkpoint of the original.

A model whose batch norms were split (:func:`mixpipe.train.splitnorm.split_norms`) runs its
composites and its single images as two sub-batches, each through its own norms; the outputs
come back in the batch's order.

Families, recognised by attributes (the torchvision names):

* ResNet-like: ``.avgpool`` and ``.fc`` (torchvision ResNets of any depth, :class:`SmallResNet`);
  the map is the input of ``avgpool``.
* MobileNetV2-like: ``.features`` and ``.classifier``; the map is the output of ``features``.
* ViT-like: ``.encoder`` and ``.heads`` with ``.image_size`` / ``.patch_size``; the "map" is the
  encoder's patch tokens (any leading class token is dropped), and a region is the set of tokens
  whose patch centre lies in it. A region's tokens are mean-pooled before ``heads``: for
  torchvision ViTs, trained on the class token, that is a second readout the head learns while
  training on composites.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from mixpipe.core.plan import Layout

from .pooling import RegionMasks, region_pool, spatial_rows, token_region_pool
from .splitnorm import composite_batch, split_norm_layers

__all__ = ["RegionPooledModel", "adapt", "model_family"]


def model_family(model: nn.Module) -> str:
    """'vit', 'resnet' or 'mobilenet', from the attributes the model has."""
    if hasattr(model, "encoder") and hasattr(model, "heads"):
        if not (hasattr(model, "image_size") and hasattr(model, "patch_size")):
            raise TypeError("a ViT-like model (.encoder, .heads) also needs .image_size and "
                            ".patch_size to place its patch tokens")
        return "vit"
    if hasattr(model, "avgpool") and hasattr(model, "fc"):
        return "resnet"
    if hasattr(model, "features") and hasattr(model, "classifier"):
        return "mobilenet"
    raise TypeError(f"cannot adapt {type(model).__name__}: expected a ResNet-like model (.avgpool "
                    "and .fc), a MobileNetV2-like model (.features and .classifier) or a ViT-like "
                    "model (.encoder, .heads, .image_size, .patch_size)")


class RegionPooledModel(nn.Module):
    """The adapted model. ``forward(images)`` is the original model; ``forward(images, layout,
    weights)`` returns logits ``[B, K, classes]`` (K = weights.shape[1]).

    ``stride`` is the stride the loader snapped region boundaries to; by default the image size
    divided by the feature-map size (8 for :class:`SmallResNet` at 32 px, 32 for ResNets at 224).
    """

    def __init__(self, model: nn.Module, stride: Optional[int] = None) -> None:
        super().__init__()
        self.model = model
        self.family = model_family(model)
        self.stride = stride
        self._masks: Optional[RegionMasks] = None
        self._captured: List[torch.Tensor] = []
        self._capturing = False
        if self.family == "resnet":
            model.avgpool.register_forward_pre_hook(self._capture_input)
        elif self.family == "mobilenet":
            model.features.register_forward_hook(self._capture_output)
        else:
            model.encoder.register_forward_hook(self._capture_output)

    def _classifier(self, pooled: torch.Tensor) -> torch.Tensor:
        head = {"resnet": "fc", "mobilenet": "classifier", "vit": "heads"}[self.family]
        return getattr(self.model, head)(pooled)

    # hooks: record the final feature map only while an adapted forward is running
    def _capture_input(self, module: nn.Module, args: tuple) -> None:
        if self._capturing:
            self._captured.append(args[0])

    def _capture_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._capturing:
            self._captured.append(output)

    def _run_capturing(self, images: torch.Tensor):
        self._captured = []
        self._capturing = True
        try:
            logits = self.model(images)
        finally:
            self._capturing = False
        captured, self._captured = self._captured, []
        if len(captured) != 1:
            raise RuntimeError(f"expected the {self.family} feature hook to fire once per forward, "
                               f"it fired {len(captured)} times: is the model's forward standard?")
        return logits, captured[0]

    def _mask_maker(self, image_size, feature_size) -> RegionMasks:
        stride = self.stride
        if stride is None:
            stride = max(1, image_size[1] // feature_size[1])
        if self._masks is None or self._masks.stride != stride:
            self._masks = RegionMasks(stride)
        return self._masks

    def _feature_grid(self, feature: torch.Tensor, image_size) -> tuple:
        """(map as [B, C, h, w] or tokens [B, T, D], (h, w)) for the captured feature."""
        if self.family == "vit":
            size = self.model.image_size
            patch = self.model.patch_size
            side_h, side_w = (size // patch, size // patch) if isinstance(size, int) else \
                (size[0] // patch, size[1] // patch)
            patches = side_h * side_w
            if feature.dim() != 3 or feature.shape[1] < patches:
                raise RuntimeError(f"ViT encoder output {tuple(feature.shape)} does not hold "
                                   f"{patches} patch tokens")
            return feature[:, feature.shape[1] - patches:], (side_h, side_w)
        return feature, tuple(feature.shape[-2:])

    def forward(self, images: torch.Tensor, layout: Optional[torch.Tensor] = None,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if layout is None:
            if weights is not None:
                raise ValueError("weights given without layout: pass both or neither")
            return self.model(images)
        if weights is None or weights.dim() != 2 or weights.shape[0] != images.shape[0]:
            raise ValueError(f"weights must be [B, K] with B={images.shape[0]}, got "
                             f"{None if weights is None else tuple(weights.shape)}")
        layout = torch.as_tensor(layout)
        composite = layout.to("cpu") != int(Layout.SINGLE)
        # the module walk only for batches that hold composites: unmixed steps stay as they were
        split = split_norm_layers(self.model) if bool(composite.any()) else []
        if not split:
            return self._mixed_forward(images, layout, weights)
        # composites (any layout but SINGLE) go through their own norms (splitnorm.py), as a
        # sub-batch of their own; the single images as another
        groups = (torch.nonzero(composite).flatten(), torch.nonzero(~composite).flatten())
        with composite_batch(split):
            mixed = self._mixed_forward(*(_rows(t, groups[0]) for t in (images, layout, weights)))
        if groups[1].numel() == 0:
            return mixed
        singles = self._mixed_forward(*(_rows(t, groups[1]) for t in (images, layout, weights)))
        out = mixed.new_empty((images.shape[0],) + tuple(mixed.shape[1:]))
        out[groups[0].to(out.device)] = mixed
        out[groups[1].to(out.device)] = singles.to(out.dtype)
        return out

    def _mixed_forward(self, images: torch.Tensor, layout: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
        k = weights.shape[1]
        spatial = spatial_rows(layout.to("cpu"))
        if not bool(spatial.any()):
            return self.model(images).unsqueeze(1).expand(-1, k, -1)
        logits, feature = self._run_capturing(images)
        out = logits.unsqueeze(1).repeat(1, k, 1)
        rows = torch.nonzero(spatial).flatten()
        grid, feature_size = self._feature_grid(feature, images.shape[-2:])
        masks = self._mask_maker(images.shape[-2:], feature_size)(
            layout.to("cpu")[rows], weights.to("cpu")[rows], tuple(images.shape[-2:]),
            feature_size, device=images.device)
        rows_dev = rows.to(images.device)
        if self.family == "vit":
            pooled = token_region_pool(grid[rows_dev], masks.flatten(2))
        else:
            pooled = region_pool(grid[rows_dev], masks)
        region_logits = self._classifier(pooled.reshape(-1, pooled.shape[-1]))
        out[rows_dev] = region_logits.reshape(rows.numel(), k, -1).to(out.dtype)
        return out


def _rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return t[rows.to(t.device)]


def adapt(model: nn.Module, stride: Optional[int] = None) -> RegionPooledModel:
    """Wrap ``model`` for mixed training; see :class:`RegionPooledModel`.

    >>> from mixpipe.train.models import SmallResNet
    >>> net = adapt(SmallResNet())
    >>> images = torch.zeros(2, 3, 32, 32)
    >>> layout = torch.tensor([0, 2], dtype=torch.uint8)     # SINGLE, HALVES
    >>> weights = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    >>> net.eval()(images, layout, weights).shape
    torch.Size([2, 2, 10])
    """
    if isinstance(model, RegionPooledModel):
        return model
    return RegionPooledModel(model, stride)

