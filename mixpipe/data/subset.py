"""The first ``n`` samples of a dataset: the benchmarks' ``--limit`` subset, for every loader.

Prepared splits are written in dataset-index order in every form (arrays, file list, .beton), so
"the first n" names the same samples whichever form a loader reads; plans index ``0 .. n-1``.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

__all__ = ["FirstN", "Chosen"]


class FirstN:
    """A view of ``base``'s first ``n`` samples (all of them when ``n`` is None).

    It forwards the access methods a loader uses — ``ds[i]`` for map-style datasets,
    ``encoded(i)`` / ``label(i)`` / ``path(i)`` for encoded-image sources — after checking the
    index against the subset, and exposes the subset's ``labels`` when the base has them.
    """

    def __init__(self, base: Any, n: Optional[int] = None) -> None:
        size = len(base)
        if n is not None and not 1 <= int(n):
            raise ValueError(f"a subset needs n >= 1, got {n}")
        self.base = base
        self.n = size if n is None else min(int(n), size)

    def __len__(self) -> int:
        return self.n

    def _check(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range [0, {self.n})")
        return int(index)

    @property
    def labels(self) -> Optional[np.ndarray]:
        labels = getattr(self.base, "labels", None)
        if labels is None and hasattr(self.base, "label"):
            return np.asarray([self.base.label(i) for i in range(self.n)], np.int64)
        return None if labels is None else np.asarray(labels)[:self.n]

    def __getitem__(self, index: int) -> Any:
        return self.base[self._check(index)]

    def encoded(self, index: int) -> np.ndarray:
        return self.base.encoded(self._check(index))

    def label(self, index: int) -> int:
        return self.base.label(self._check(index))

    def path(self, index: int) -> str:
        return self.base.path(self._check(index))


class Chosen:
    """A map-style view of ``base`` at the given ``ids`` (``view[i] = base[ids[i]]``): e.g. a
    seeded random slice of the training set for a forward-only pass."""

    def __init__(self, base: Any, ids: Any) -> None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= len(base)):
            raise IndexError(f"ids must lie in [0, {len(base)}), got {ids.min()}..{ids.max()}")
        self.base = base
        self.ids = ids

    def __len__(self) -> int:
        return int(self.ids.size)

    def __getitem__(self, index: int) -> Any:
        return self.base[int(self.ids[index])]
