"""The validation hold-out: stratified, disjoint, deterministic, and refused where impossible."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixpipe.data import DataError
from mixpipe.data.holdout import stratified_holdout


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(2, 60), min_size=1, max_size=8),
       fraction=st.floats(0.01, 0.9), seed=st.integers(0, 2**31))
def test_split_is_disjoint_complete_and_keeps_every_class_on_both_sides(counts, fraction, seed):
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    keep, held = stratified_holdout(labels, fraction, seed)
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(labels.size))
    assert np.intersect1d(keep, held).size == 0
    for cls, n in enumerate(counts):
        k = int(np.count_nonzero(labels[held] == cls))
        assert 1 <= k <= n - 1  # present on both sides
        assert abs(k - fraction * n) <= 1 or k in (1, n - 1)  # rounded, then clipped
    again = stratified_holdout(labels, fraction, seed)
    assert np.array_equal(again[0], keep) and np.array_equal(again[1], held)


def test_a_class_with_one_sample_stays_in_training():
    labels = np.array([0, 0, 1, 0, 2, 2])
    keep, held = stratified_holdout(labels, 0.5, 0)
    assert 2 in keep and 2 not in held  # row 2 is class 1's only sample
    # class 0: round(0.5 * 3) = 2 held (half to even), class 2: one of two
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 0, 1]


def test_seed_changes_the_choice_and_zero_holds_out_nothing():
    labels = np.arange(1000) % 10
    a = stratified_holdout(labels, 0.1, 0)[1]
    b = stratified_holdout(labels, 0.1, 1)[1]
    assert a.size == b.size == 100 and not np.array_equal(a, b)
    keep, held = stratified_holdout(labels, 0.0, 0)
    assert held.size == 0 and np.array_equal(keep, np.arange(1000))


@pytest.mark.parametrize("labels,fraction,match", [
    (np.arange(10) % 2, 1.0, r"\[0, 1\)"),
    (np.arange(10) % 2, -0.1, r"\[0, 1\)"),
    (np.zeros((2, 2)), 0.1, "1-d")])
def test_impossible_hold_outs_are_refused_with_the_fix(labels, fraction, match):
    with pytest.raises(DataError, match=match):
        stratified_holdout(labels, fraction, 0)
