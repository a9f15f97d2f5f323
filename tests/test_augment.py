"""The one random-resized-crop rule every adapter draws from (core.augment)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixpipe.core.augment import (RandomResizedCropFlip, fit_aspect, random_resized_crop_box,
                                  random_resized_crop_boxes)


@settings(max_examples=80, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), aspect=st.floats(0.1, 10.0),
       lo=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_crops_stay_inside_the_image(h, w, aspect, lo, seed):
    n = 16
    boxes = random_resized_crop_boxes(np.full(n, h), np.full(n, w), np.full(n, aspect),
                                      np.random.default_rng(seed), (lo, 1.0), (3 / 4, 4 / 3))
    top, left, ch, cw = boxes.T
    assert boxes.dtype == np.int64 and boxes.shape == (n, 4)
    assert (top >= 0).all() and (left >= 0).all() and (ch >= 1).all() and (cw >= 1).all()
    assert (top + ch <= h).all() and (left + cw <= w).all()


@settings(max_examples=60, deadline=None)
@given(h=st.integers(50, 300), w=st.integers(50, 300), aspect=st.floats(0.5, 2.0),
       lo=st.floats(0.1, 1.0), seed=st.integers(0, 2**16))
def test_each_crop_is_a_drawn_one_or_the_centred_fallback(h, w, aspect, lo, seed):
    ratio = (3 / 4, 4 / 3)
    boxes = random_resized_crop_boxes(np.full(32, h), np.full(32, w), np.full(32, aspect),
                                      np.random.default_rng(seed), (lo, 1.0), ratio)
    for top, left, ch, cw in boxes.tolist():
        share, got = ch * cw / (h * w), cw / ch
        drawn = (lo * 0.9 <= share <= 1.0
                 and ratio[0] * aspect * 0.9 <= got <= ratio[1] * aspect * 1.1)
        fallback = (top == (h - ch) // 2 and left == (w - cw) // 2 and (ch == h or cw == w))
        assert drawn or fallback, (top, left, ch, cw)


def test_fallback_is_the_centred_window_with_the_aspect_clamped():
    # a 10x100 strip cannot hold a square-ish crop of 90 % of its area: every draw fails
    boxes = random_resized_crop_boxes(np.array([10]), np.array([100]), np.ones(1),
                                      np.random.default_rng(0), (0.9, 1.0), (3 / 4, 4 / 3))
    h, w = fit_aspect(np.array([10]), np.array([100]), np.array([4 / 3]))
    assert boxes.tolist() == [[0, (100 - int(w[0])) // 2, int(h[0]), int(w[0])]]
    assert (int(h[0]), int(w[0])) == (10, 13)


@settings(max_examples=150, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), lo=st.floats(0.01, 1.0),
       r0=st.floats(0.2, 1.0), spread=st.floats(1.0, 4.0), seed=st.integers(0, 2**16))
def test_the_single_crop_is_the_first_row_of_the_same_draw(h, w, lo, r0, spread, seed):
    # the scalar path is a plain-Python twin of the vectorised rule; fallbacks included
    ratio = (r0, r0 * spread)
    one = random_resized_crop_box(h, w, (lo, 1.0), ratio, np.random.default_rng(seed))
    many = random_resized_crop_boxes(np.array([h]), np.array([w]), np.ones(1),
                                     np.random.default_rng(seed), (lo, 1.0), ratio)
    assert one == tuple(int(v) for v in many[0])


def test_window_centres_the_ratio_on_the_region_aspect():
    transform = RandomResizedCropFlip(scale=(0.5, 1.0), ratio=(0.9, 1.1))
    rng = np.random.default_rng(1)
    aspects = []
    for _ in range(200):
        top, left, h, w, flip = transform.window(200, 200, (64, 16), rng)  # region 4:1 tall
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 200
        aspects.append(w / h)
    assert math.isclose(float(np.median(aspects)), 0.25, rel_tol=0.15)
    with pytest.raises(ValueError, match="ratio"):
        RandomResizedCropFlip(ratio=(2.0, 1.0))
