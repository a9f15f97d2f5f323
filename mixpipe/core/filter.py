"""The resize filter, defined once for every composer (numpy, torch, numba).

The filter is the triangle (bilinear) kernel widened by the downscale factor, as PIL and
``torch.nn.functional.interpolate(antialias=True)`` do. :func:`filter_taps` is written in the
subset of Python that numba compiles, so the FFCV kernels compile this very function instead of
re-deriving it; :func:`resize_weights` spreads its taps into the dense matrix numpy multiplies
with. The normaliser is a plain left-to-right float64 sum, which plain Python, numpy loops and
numba all evaluate in the same order, so the weights agree bit for bit wherever they are made.
"""
from __future__ import annotations

import functools
import math
from typing import Tuple

import numpy as np

__all__ = ["filter_taps", "resize_weights"]


def filter_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first tap int64[out], tap count int64[out], weights float32[out, max taps]).

    Output pixel ``i`` reads input pixels ``first[i] .. first[i] + count[i] - 1`` with weights
    ``weights[i, :count[i]]``, which sum to 1.
    """
    scale = in_size / out_size
    support = max(scale, 1.0)  # the triangle's half-width in input pixels
    max_taps = int(math.ceil(2.0 * support)) + 2
    first = np.zeros(out_size, np.int64)
    count = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, max_taps), np.float32)
    raw = np.zeros(max_taps, np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        total = 0.0
        for t in range(hi - lo):
            w = 1.0 - abs(((lo + t) - center + 0.5) / support)
            raw[t] = w if w > 0.0 else 0.0
            total += raw[t]
        first[i] = lo
        count[i] = hi - lo
        for t in range(hi - lo):
            weights[i, t] = np.float32(raw[t] / total) if total > 0.0 else np.float32(0.0)
    return first, count, weights


@functools.lru_cache(maxsize=256)
def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """float32[out, in]: the 1-D resampling matrix of :func:`filter_taps` (rows sum to 1)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be >= 1, got {in_size} -> {out_size}")
    first, count, weights = filter_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        matrix[i, first[i]:first[i] + count[i]] = weights[i, :count[i]]
    matrix.setflags(write=False)
    return matrix
