"""Decoded pillow images go to RandomResizedCropFlip as they are, with the numpy path's result."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mixpipe.core.augment import RandomResizedCropFlip
from mixpipe.core.plan import MixPlan
from mixpipe.torch import FixedPlans, MixedLoader


def noise(h, w, channels, seed):
    shape = (h, w) if channels == 0 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 0)])
def test_pil_and_numpy_inputs_give_the_same_constituent(mode, channels):
    view = RandomResizedCropFlip((0.1, 1.0))
    for t in range(40):
        array = noise(int(40 + 7 * t % 90), int(30 + 11 * t % 120), channels, t)
        region = [(32, 32), (32, 16), (64, 48), (20, 90)][t % 4]
        got = view(Image.fromarray(array, mode), region, np.random.default_rng(t))
        want = view(array if channels else array[:, :, None], region, np.random.default_rng(t))
        assert got.dtype == np.uint8 and got.flags.writeable
        np.testing.assert_array_equal(got, want)


def test_other_modes_go_through_numpy_as_before():
    palette = Image.fromarray(noise(50, 60, 0, 1), "L").convert("P")
    view = RandomResizedCropFlip()
    got = view(palette, (24, 24), np.random.default_rng(3))
    want = view(np.asarray(palette)[:, :, None], (24, 24), np.random.default_rng(3))
    np.testing.assert_array_equal(got, want)


class Decoded:
    """A torchvision-style dataset: decoded RGB pillow images (or their numpy arrays)."""

    def __init__(self, n, as_pil):
        self.arrays = [noise(30 + i, 50 - i, 3, i) for i in range(n)]
        self.as_pil = as_pil

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        image = self.arrays[i]
        return (Image.fromarray(image) if self.as_pil else image), i % 5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_are_the_same_from_pil_and_numpy_bases(num_workers):
    n = 20
    slots = [([0, 1], [0.25, 0.75], 2), ([2], [1.0], 0), ([3, 4, 5, 6], [0.25] * 4, 3),
             ([7, 8], [0.5, 0.5], 1)] + [([i], [1.0], 0) for i in range(9, n)]
    plan = MixPlan.from_slots(slots, n)
    batches = {}
    for as_pil in (True, False):
        loader = MixedLoader(Decoded(n, as_pil), FixedPlans(plan), batch_size=4, size=(32, 32),
                             stride=8, num_workers=num_workers, shuffle=False,
                             constituent_transform=RandomResizedCropFlip())
        loader.set_epoch(0)
        batches[as_pil] = list(loader)
    assert len(batches[True]) == len(batches[False]) == -(-plan.num_slots // 4)
    for a, b in zip(batches[True], batches[False]):
        for field in ("image", "targets", "weights", "ids", "layout", "loss_scale"):
            assert torch_equal(getattr(a, field), getattr(b, field)), field


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())
