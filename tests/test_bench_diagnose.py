"""The watched run's diagnostic figures against hand counts."""
from __future__ import annotations

import numpy as np
import pytest

from mixpipe.bench.speedup.diagnose import (class_mixed_share, per_class_top1, prediction_share,
                                            stickiness, view_gap)


def test_class_mixed_share_counts_within_each_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    mixed = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    share = class_mixed_share(mixed, labels, 4)
    assert share[:3] == [0.5, 1.0, 0.0]
    assert np.isnan(share[3])  # a class with no samples has no share


def test_stickiness_compares_staying_mixed_with_the_base_rate():
    before = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    now = np.array([1, 1, 1, 0, 0, 0, 0, 1], bool)
    got = stickiness(before, now)
    assert got == {"stay_mixed": 0.75, "mixed": 0.5}
    assert stickiness(np.zeros(4, bool), np.ones(4, bool))["stay_mixed"] is None


def test_view_gap_is_the_median_ratio_per_kind_of_report():
    reported = np.array([2.0, 4.0, 6.0, 1.0, 1.0, np.nan])
    single = np.array([1.0, 1.0, 1.0, 1.0, 2.0, 1.0])
    mixed = np.array([1, 1, 1, 0, 0, 0], bool)
    got = view_gap(reported, single, mixed)
    assert got["constituent_ratio"] == pytest.approx(4.0)  # 2, 4, 6
    assert got["single_ratio"] == pytest.approx(0.75)  # 1 and 0.5; the NaN report is left out
    assert got["constituent_reported"] == pytest.approx(4.0)
    assert got["single_single_view"] == pytest.approx(1.5)
    # a loss of zero on its own does not make the ratio infinite
    assert np.isfinite(view_gap(np.ones(2), np.zeros(2), np.ones(2, bool))["constituent_ratio"])


def test_per_class_top1_and_prediction_share():
    labels = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 1])
    assert per_class_top1(pred == labels, labels, 3) == pytest.approx([0.5, 2 / 3, 0.0])
    assert prediction_share(pred, 3) == pytest.approx([2 / 6, 4 / 6, 0.0])
