"""The figures that tell why a mixing policy helps or hurts, from what a watched run recorded.

A top-1 figure says that a policy lost; these say where. Each answers one hypothesis about a
loss-driven choice of the samples to mix:

* :func:`class_mixed_share`: whether "mixed" became a class cue (easy classes always shrunk, so
  at test time a full-size image looks like a hard class);
* :func:`stickiness`: whether the same samples stay mixed epoch after epoch and are never seen
  whole again;
* :func:`view_gap`: whether the loss a sample reports as a constituent can be ranked against
  one reported as a single image (a shrunk view costs loss by itself);
* :func:`per_class_top1` and :func:`prediction_share`: which classes the model gets wrong, and
  whether it over-predicts the classes that were kept whole.

Plain numpy over boolean and float arrays indexed by sample id, so a test can check each figure
against a hand count.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

__all__ = ["class_mixed_share", "stickiness", "view_gap", "per_class_top1",
           "prediction_share"]


def class_mixed_share(mixed: np.ndarray, labels: np.ndarray, num_classes: int) -> List[float]:
    """Share of each class's samples that sat in a composite (``mixed``: bool[N])."""
    labels = np.asarray(labels, np.int64)
    total = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels[np.asarray(mixed, bool)], minlength=num_classes)
    return [float(h / t) if t else float("nan") for h, t in zip(hits, total)]


def stickiness(mixed_before: np.ndarray, mixed_now: np.ndarray) -> Dict[str, Optional[float]]:
    """``P(mixed now | mixed before)`` against ``P(mixed now)``: equal for a choice made afresh
    at random each epoch, near 1 for a choice that never lets a mixed sample go."""
    before = np.asarray(mixed_before, bool)
    now = np.asarray(mixed_now, bool)
    stay = float(now[before].mean()) if before.any() else None
    return {"stay_mixed": stay, "mixed": float(now.mean())}


def view_gap(reported: np.ndarray, single_view: np.ndarray,
             mixed: np.ndarray) -> Dict[str, Optional[float]]:
    """Median of a sample's last reported loss over its single-view loss (the same model, the
    image alone, unaugmented), for the samples reported as constituents and as singles.

    If both medians are near 1 the two kinds of report rank alike; a constituent ratio well
    above the single one means a shrunk view inflates the loss, so constituents look harder
    than they are and a ranking that mixes the two kinds is biased by the view.
    """
    reported = np.asarray(reported, np.float64)
    single_view = np.asarray(single_view, np.float64)
    mixed = np.asarray(mixed, bool)
    ok = np.isfinite(reported) & np.isfinite(single_view)
    # a floor keeps a perfectly fitted image (loss ~ 0) from making the ratio infinite
    ratio = reported / np.maximum(single_view, 1e-3)

    def median(mask: np.ndarray) -> Optional[float]:
        m = mask & ok
        return float(np.median(ratio[m])) if m.any() else None

    def loss(values: np.ndarray, mask: np.ndarray) -> Optional[float]:
        m = mask & ok
        return float(np.median(values[m])) if m.any() else None

    return {"constituent_ratio": median(mixed), "single_ratio": median(~mixed),
            "constituent_reported": loss(reported, mixed),
            "constituent_single_view": loss(single_view, mixed),
            "single_reported": loss(reported, ~mixed),
            "single_single_view": loss(single_view, ~mixed)}


def per_class_top1(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> List[float]:
    """Top-1 within each class (recall)."""
    labels = np.asarray(labels, np.int64)
    total = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels[np.asarray(correct, bool)], minlength=num_classes)
    return [float(h / t) if t else float("nan") for h, t in zip(hits, total)]


def prediction_share(predicted: np.ndarray, num_classes: int) -> List[float]:
    """Share of all predictions that name each class (1 / num_classes each for a balanced,
    unbiased model on balanced data)."""
    predicted = np.asarray(predicted, np.int64)
    counts = np.bincount(predicted, minlength=num_classes)
    return [float(c / max(predicted.size, 1)) for c in counts]
