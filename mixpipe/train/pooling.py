"""Region pooling, the functional core: masks per constituent and masked means.

Geometry is never re-derived here: masks come from :func:`mixpipe.core.layouts.region_masks`, the
same function the composer's boundaries come from, so a constituent's features are exactly the
cells of its own region. A batch holds few distinct ``(layout, weights)`` patterns (weights are
snapped to the stride grid), so masks are built once per pattern and gathered, and the pooling
itself is one einsum over the whole batch.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from mixpipe.core.layouts import region_masks
from mixpipe.core.compose import infer_counts
from mixpipe.core.plan import Layout

__all__ = ["SPATIAL_LAYOUTS", "RegionMasks", "region_pool", "token_region_pool",
           "spatial_rows"]

#: Layouts whose constituents own separate regions (the others share the whole composite).
SPATIAL_LAYOUTS = (int(Layout.HALVES), int(Layout.QUADS))


def spatial_rows(layout: torch.Tensor) -> torch.Tensor:
    """bool[B]: which composites need region pooling."""
    layout = layout.to(torch.int64)
    out = torch.zeros_like(layout, dtype=torch.bool)
    for code in SPATIAL_LAYOUTS:
        out |= layout == code
    return out


class RegionMasks:
    """Cached float masks ``[B, K, fh, fw]`` for batches of spatial composites.

    ``stride`` must be the stride the loader snapped its boundaries to (the network's total
    stride); the cache is keyed by the pattern's bytes and the image and feature sizes.
    """

    def __init__(self, stride: int, max_patterns: int = 4096) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride = int(stride)
        self.max_patterns = int(max_patterns)
        self._cache: Dict[Tuple, np.ndarray] = {}

    def _pattern(self, code: int, weights: np.ndarray, image_size: Tuple[int, int],
                 feature_size: Tuple[int, int]) -> np.ndarray:
        key = (code, weights.tobytes(), image_size, feature_size)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        layout = Layout(code)
        n = int(infer_counts([code], weights[None])[0])
        if n > weights.shape[0]:
            raise ValueError(f"a {layout.name} composite needs {n} constituents but the batch has "
                             f"only K={weights.shape[0]} columns")
        out = np.zeros((weights.shape[0],) + feature_size, dtype=np.float32)
        out[:n] = region_masks(layout, weights[:n].astype(np.float64).tolist(), *image_size,
                               self.stride, *feature_size)
        if len(self._cache) >= self.max_patterns:  # an unsnapped policy: do not grow forever
            self._cache.clear()
        self._cache[key] = out
        return out

    def __call__(self, layout: torch.Tensor, weights: torch.Tensor, image_size: Tuple[int, int],
                 feature_size: Tuple[int, int], device=None) -> torch.Tensor:
        """Masks for every row (SINGLE/BLEND rows own every cell of their constituents)."""
        codes = layout.detach().to("cpu", torch.int64).numpy()
        w = weights.detach().to("cpu", torch.float32).numpy()
        if w.ndim != 2 or codes.shape != (w.shape[0],):
            raise ValueError(f"layout must be [B] and weights [B, K], got {tuple(codes.shape)} and "
                             f"{tuple(w.shape)}")
        image_size = (int(image_size[0]), int(image_size[1]))
        feature_size = (int(feature_size[0]), int(feature_size[1]))
        keys = np.concatenate([codes[:, None].astype(np.float32), w], axis=1)
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        patterns = np.stack([self._pattern(int(row[0]), np.ascontiguousarray(row[1:]),
                                           image_size, feature_size) for row in unique])
        masks = torch.from_numpy(patterns[inverse.reshape(-1)])
        return masks.to(device) if device is not None else masks


def region_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of each region: features [B, C, h, w], masks [B, K, h, w] -> [B, K, C].

    A constituent column with an empty mask (no constituent there) pools to zeros.
    """
    if features.dim() != 4 or masks.dim() != 4 or masks.shape[0] != features.shape[0] \
            or masks.shape[2:] != features.shape[2:]:
        raise ValueError(f"features must be [B, C, h, w] and masks [B, K, h, w] over the same "
                         f"cells, got {tuple(features.shape)} and {tuple(masks.shape)}")
    masks = masks.to(features.dtype)
    area = masks.sum(dim=(2, 3)).clamp_min(1.0)
    return torch.einsum("bkhw,bchw->bkc", masks, features) / area[..., None]


def token_region_pool(tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of each region's tokens: tokens [B, T, D], masks [B, K, T] -> [B, K, D]."""
    if tokens.dim() != 3 or masks.dim() != 3 or masks.shape[0] != tokens.shape[0] \
            or masks.shape[2] != tokens.shape[1]:
        raise ValueError(f"tokens must be [B, T, D] and masks [B, K, T] over the same tokens, got "
                         f"{tuple(tokens.shape)} and {tuple(masks.shape)}")
    masks = masks.to(tokens.dtype)
    area = masks.sum(dim=2).clamp_min(1.0)
    return torch.einsum("bkt,btd->bkd", masks, tokens) / area[..., None]
