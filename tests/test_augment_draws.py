"""One draw of all a crop's uniforms gives the crop that separate Generator.uniform calls give."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mixpipe.core.augment import (CROP_DRAWS, RandomResizedCropFlip, crop_box_from_uniforms,
                                  random_resized_crop_box)


def reference_box(height, width, scale, ratio, rng):
    """The crop drawn with three ``uniform`` calls (shares, log aspects, position)."""
    shares = rng.uniform(scale[0], scale[1], 10)
    logs = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), 10)
    pos = rng.uniform(0.0, 1.0, 2)
    for share, log_aspect in zip(shares, logs):
        aspect = math.exp(log_aspect)
        w = round(math.sqrt(height * width * share * aspect))
        h = round(math.sqrt(height * width * share / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(pos[0] * (height - h + 1)), int(pos[1] * (width - w + 1)), h, w
    return None  # the fallback window: not compared here


@pytest.mark.parametrize("seed", range(4))
def test_one_draw_equals_separate_uniform_calls(seed):
    cases = np.random.default_rng(seed)
    compared = 0
    for t in range(2000):
        height, width = (int(x) for x in cases.integers(1, 500, 2))
        scale = tuple(sorted(cases.uniform(0.02, 1.0, 2).tolist()))
        ratio = tuple(sorted(cases.uniform(0.3, 3.0, 2).tolist()))
        want = reference_box(height, width, scale, ratio, np.random.default_rng([seed, t]))
        a, b = np.random.default_rng([seed, t]), np.random.default_rng([seed, t])
        got = random_resized_crop_box(height, width, scale, ratio, a)
        assert got == crop_box_from_uniforms(height, width, scale, ratio,
                                             b.random(CROP_DRAWS).tolist())
        if want is not None:
            assert got == want, (height, width, scale, ratio)
            compared += 1
        assert a.random() == b.random()  # the same number of draws taken
    assert compared > 1000  # most cases fit within ten attempts


def test_window_takes_the_mirror_coin_after_the_crop_and_only_when_flipping():
    for flip in (False, True):
        view = RandomResizedCropFlip((0.2, 1.0), (0.75, 1.33), flip)
        for t in range(200):
            rng, ref = np.random.default_rng(t), np.random.default_rng(t)
            top, left, h, w, mirrored = view.window(90, 120, (32, 16), rng)
            u = ref.random(CROP_DRAWS + flip).tolist()
            assert (top, left, h, w) == crop_box_from_uniforms(90, 120, view.scale,
                                                               (0.75 * 0.5, 1.33 * 0.5), u)
            assert mirrored == (flip and u[CROP_DRAWS] < 0.5)
            assert rng.random() == ref.random()
