"""The validation hold-out carved from a training split.

Every setting of a benchmark is chosen on a split the reported figure never sees; the official
test split is scored once, for the record. The hold-out is stratified (each class keeps its
share, so a rare class cannot vanish from either side) and seeded (the same data, fraction and
seed always give the same split, on every machine).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .errors import DataError

__all__ = ["DEFAULT_FRACTION", "DEFAULT_SEED", "stratified_holdout"]

DEFAULT_FRACTION = 0.1
DEFAULT_SEED = 0


def stratified_holdout(labels: np.ndarray, fraction: float = DEFAULT_FRACTION,
                       seed: int = DEFAULT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """``(keep, held)``: sorted row indices of the rows that stay in training and of the hold-out.

    Per class ``round(fraction * n)`` rows are held out, but at least one and at most ``n - 1``,
    so every class with two or more rows is present on both sides; a class with a single row
    keeps it for training. ``fraction == 0`` holds out nothing.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-d, got shape {labels.shape}")
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"the hold-out fraction must be in [0, 1), got {fraction!r}; "
                        "give e.g. --holdout 0.1")
    if fraction == 0.0:
        return np.arange(labels.size, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 0x401D])
    held = []
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        if rows.size < 2:
            continue
        take = min(max(int(round(fraction * rows.size)), 1), rows.size - 1)
        held.append(rng.permutation(rows)[:take])
    held_rows = np.sort(np.concatenate(held)).astype(np.int64) if held else \
        np.zeros(0, np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[held_rows] = False
    return np.flatnonzero(mask).astype(np.int64), held_rows
