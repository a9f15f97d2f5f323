"""RandomResizedCropFlip's pillow path (uint8 grey/RGB) against the numpy float reference.

The reference is what the transform computed before it used pillow: the numpy crop of the drawn
window, mirrored before the resize when the draw says flip, resized by ``compose.resize`` (float32)
and rounded half up. Pillow rounds its intermediate pass to uint8, so the two may differ by one
grey level; measured on uniform noise with these cases the mean is 0.16-0.18 (0 for crops
already at the region's size).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import pytest

from mixpipe.core.augment import RandomResizedCropFlip
from mixpipe.core.compose import resize

SEEDS = range(24)

WHOLE = RandomResizedCropFlip(scale=(1.0, 1.0), ratio=(1.0, 1.0))  # largest region-aspect crop
RANDOM = RandomResizedCropFlip()

# (image h, w), region, transform, regime every drawn crop is in
CASES = {
    "down 300x200->224x112": ((300, 200), (224, 112), WHOLE, "down"),  # a 300x150 crop
    "down 375x500->224x224": ((375, 500), (224, 224), RANDOM, "down"),
    "up 28x28->32x32": ((28, 28), (32, 32), RANDOM, "up"),
    "up 28x28->32x16": ((28, 28), (32, 16), RANDOM, "up"),
    "same 224x112->224x112": ((224, 112), (224, 112), WHOLE, "same"),
}

CHANNELS = {"HW": (), "HW1": (1,), "HW3": (3,)}


def noise(shape: Tuple[int, ...], seed: int, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(1000 + seed).integers(0, 256, shape).astype(dtype)


def reference(image: np.ndarray, window, region: Tuple[int, int]) -> np.ndarray:
    """The numpy float path: crop, mirror first, resize, round half up, clip."""
    top, left, h, w, flip = window
    crop = image[top:top + h, left:left + w]
    if flip:
        crop = crop[:, ::-1]
    return np.clip(np.floor(resize(crop, *region) + 0.5), 0, 255).astype(np.uint8)


def run_both(transform: RandomResizedCropFlip, image: np.ndarray, region, seed: int):
    """(transform output, reference output, window): the reference rebuilt from ``window`` drawn
    by a second generator seeded like the transform's, so a changed draw shows as a mismatch."""
    out = transform(image, region, np.random.default_rng(seed))
    window = transform.window(image.shape[0], image.shape[1], region,
                              np.random.default_rng(seed))
    return out, reference(image, window, region), window


def check_regime(window, region, regime: str) -> None:
    _, _, h, w, _ = window
    if regime == "down":
        assert h > region[0] and w > region[1], (window, region)
    elif regime == "up":
        assert h < region[0], (window, region)
    else:
        assert (h, w) == region, (window, region)


@pytest.mark.parametrize("channels", CHANNELS.values(), ids=CHANNELS.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_pillow_path_is_within_one_grey_level_of_the_numpy_reference(case, channels) -> None:
    size, region, transform, regime = case
    diffs, flips = [], set()
    for seed in SEEDS:
        image = noise(size + channels, seed)
        out, want, window = run_both(transform, image, region, seed)
        check_regime(window, region, regime)
        flips.add(window[4])
        assert out.shape == want.shape and out.dtype == np.uint8
        diffs.append(np.abs(out.astype(np.int16) - want.astype(np.int16)))
    diff = np.concatenate([d.ravel() for d in diffs])
    assert flips == {False, True}  # both sides of the mirror were exercised
    if regime == "same":
        assert diff.max() == 0  # a crop at the region's size is copied, not filtered
    else:
        assert diff.max() <= 1
        assert 0 < diff.mean() < 0.25  # pillow does round its intermediate: not the numpy path


def pillow_resize(crop: np.ndarray, region: Tuple[int, int]) -> np.ndarray:
    from PIL import Image

    resized = Image.fromarray(np.ascontiguousarray(crop)).resize(region[::-1], Image.BILINEAR)
    return np.asarray(resized)


@pytest.mark.parametrize("region", [(224, 112), (32, 32)])
@pytest.mark.parametrize("channels", [(), (3,)], ids=["HW", "HW3"])
def test_mirroring_after_the_resize_equals_resizing_the_mirrored_crop(channels, region) -> None:
    """Straight on the flip, pillow against pillow: the transform mirrors its resized crop; here
    the crop is mirrored first and then resized."""
    transform = RANDOM
    image = noise((300, 200) + channels, 0)
    mirrored = 0
    for seed in SEEDS:
        top, left, h, w, flip = transform.window(300, 200, region, np.random.default_rng(seed))
        if not flip:
            continue
        mirrored += 1
        out = transform(image, region, np.random.default_rng(seed))
        want = pillow_resize(image[top:top + h, left:left + w][:, ::-1], region)
        np.testing.assert_array_equal(out, want)  # measured: exact, pillow's filter is symmetric
    assert mirrored >= 5


def test_transform_draws_exactly_the_window_and_nothing_more() -> None:
    """The loader shares one generator across a slot's constituents: the next draw after the
    transform must be the one after ``window``."""
    transform = RANDOM
    image = noise((375, 500, 3), 1)
    for seed in SEEDS:
        used, alone = np.random.default_rng(seed), np.random.default_rng(seed)
        transform(image, (224, 224), used)
        transform.window(375, 500, (224, 224), alone)
        assert used.random() == alone.random()


@pytest.mark.parametrize("channels", CHANNELS.values(), ids=CHANNELS.keys())
def test_shape_dtype_and_layout_contract(channels) -> None:
    """As the numpy path: HW stays HW, HW1 stays HW1; and a fresh contiguous writable array."""
    transform = RANDOM
    for seed in range(8):
        out = transform(noise((40, 30) + channels, seed), (32, 16), np.random.default_rng(seed))
        assert out.shape == (32, 16) + channels and out.dtype == np.uint8
        assert out.flags.c_contiguous and out.flags.writeable


@pytest.mark.parametrize("shape, dtype", [((40, 30, 4), np.uint8), ((40, 30, 3), np.float32),
                                          ((40, 30), np.uint16)],
                         ids=["uint8 HW4", "float32 HW3", "uint16 HW"])
def test_other_channel_counts_and_dtypes_keep_the_numpy_path(shape, dtype) -> None:
    transform = RANDOM
    for seed in range(8):
        out, want, _ = run_both(transform, noise(shape, seed, dtype), (32, 16), seed)
        assert out.shape == (32, 16) + shape[2:] and out.dtype == np.uint8
        np.testing.assert_array_equal(out, want)  # bit for bit: still the float path
