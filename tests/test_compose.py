"""The reference composer against a slow per-pixel reference written here.

Resampling is checked against torch's own antialiased interpolate (an independent
implementation); the layout geometry is re-derived in this file from the rules in docs/design.md.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixpipe.core.compose import compose_batch, compose_slot, region_masks_batch, resize
from mixpipe.core.filter import filter_taps, resize_weights
from mixpipe.core.layouts import region_masks, regions, snap_weights, split_position
from mixpipe.core.plan import Layout


def torch_resize_hwc(image: np.ndarray, h: int, w: int) -> np.ndarray:
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).numpy().astype(np.float64)


def expected_split(share: float, length: int, stride: int) -> int:
    cells = math.floor(share * length / stride + 0.5)
    return max(1, min(cells, length // stride - 1 if length % stride == 0 else
                      (length - stride) // stride)) * stride


def slow_reference(images, weights, layout, height, width, stride) -> np.ndarray:
    """Pixel by pixel: find the owner of each pixel, read its resized constituent there."""
    channels = images[0].shape[2]
    out = np.zeros((height, width, channels), np.float64)
    if layout == Layout.BLEND:
        resized = [torch_resize_hwc(im, height, width) for im in images]
        for y in range(height):
            for x in range(width):
                out[y, x] = sum(w * r[y, x] for w, r in zip(weights, resized))
        return out
    if layout == Layout.SINGLE:
        return torch_resize_hwc(images[0], height, width)
    if layout == Layout.HALVES:
        sx = expected_split(weights[0], width, stride)
        boxes = [(0, 0, height, sx), (0, sx, height, width - sx)]
    else:
        sx = expected_split(weights[0] + weights[2], width, stride)
        sy = expected_split(weights[0] + weights[1], height, stride)
        boxes = [(0, 0, sy, sx), (0, sx, sy, width - sx), (sy, 0, height - sy, sx),
                 (sy, sx, height - sy, width - sx)]
    resized = [torch_resize_hwc(im, b[2], b[3]) for im, b in zip(images, boxes)]
    for y in range(height):
        for x in range(width):
            owners = [i for i, (t, l, h, w) in enumerate(boxes) if t <= y < t + h and
                      l <= x < l + w]
            assert len(owners) == 1, "reference boxes must tile the image"
            i = owners[0]
            out[y, x] = resized[i][y - boxes[i][0], x - boxes[i][1]]
    return out


CASES = [
    (Layout.SINGLE, [1.0], (32, 32), 8),
    (Layout.BLEND, [0.3, 0.7], (32, 32), 8),
    (Layout.BLEND, [0.2, 0.3, 0.5], (17, 23), 1),
    (Layout.HALVES, [0.5, 0.5], (32, 32), 8),
    (Layout.HALVES, [0.75, 0.25], (32, 32), 8),
    (Layout.HALVES, [0.4, 0.6], (33, 41), 8),
    (Layout.HALVES, [0.9, 0.1], (21, 19), 1),
    (Layout.QUADS, [0.25, 0.25, 0.25, 0.25], (32, 32), 8),
    (Layout.QUADS, [0.1, 0.2, 0.3, 0.4], (37, 29), 4),
    (Layout.HALVES, [0.5, 0.5], (224, 224), 32),
]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("layout, weights, size, stride", CASES)
def test_compose_matches_slow_reference(layout, weights, size, stride, dtype) -> None:
    rng = np.random.default_rng(hash((layout, size, stride)) % 2**32)
    shapes = [(int(rng.integers(9, 48)), int(rng.integers(9, 48))) for _ in weights]
    images = [(rng.random(s + (3,)) * 255).astype(dtype) for s in shapes]
    if size[0] > 100:  # keep the per-pixel loop short for the large case
        images = [im[:40, :40] for im in images]
    got = compose_slot(images, weights, layout, size, stride)
    want = slow_reference(images, weights, layout, *size, stride)
    assert got.dtype == dtype and got.shape == size + (3,)
    if dtype == np.uint8:
        want = np.clip(np.floor(want + 0.5), 0, 255)
        assert np.abs(got.astype(np.int64) - want).max() <= 1
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)


def test_constituent_at_region_size_is_pasted_untouched() -> None:
    rng = np.random.default_rng(1)
    left = rng.integers(0, 256, (32, 8, 3), dtype=np.uint8)
    right = rng.integers(0, 256, (32, 24, 3), dtype=np.uint8)
    out = compose_slot([left, right], [0.25, 0.75], Layout.HALVES, (32, 32), 8)
    np.testing.assert_array_equal(out[:, :8], left)
    np.testing.assert_array_equal(out[:, 8:], right)


def test_grayscale_and_channel_mismatch() -> None:
    a = np.zeros((8, 8), np.uint8)
    b = np.full((8, 8), 200, np.uint8)
    out = compose_slot([a, b], [0.5, 0.5], Layout.BLEND)
    assert out.shape == (8, 8) and int(out[0, 0]) == 100
    with pytest.raises(ValueError, match="channels must match"):
        compose_slot([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 1), np.uint8)], [0.5, 0.5],
                     Layout.BLEND)
    with pytest.raises(ValueError, match="HALVES takes 2 constituents, got 3"):
        compose_slot([a, a, a], [0.3, 0.3, 0.4], Layout.HALVES)
    with pytest.raises(ValueError, match="too small to split at stride 8"):
        compose_slot([a, b], [0.5, 0.5], Layout.HALVES, (8, 8), 8)


def test_resize_rows_are_a_partition_of_unity() -> None:
    for src, dst in [(32, 16), (16, 32), (7, 3), (224, 96)]:
        image = np.ones((src, src, 1), np.float32)
        np.testing.assert_allclose(resize(image, dst, dst), 1.0, atol=1e-5)


def test_the_resize_matrix_is_the_filter_taps_spread_out() -> None:
    for src, dst in [(28, 16), (16, 32), (7, 3), (512, 112), (1000, 7)]:
        first, count, taps = filter_taps(src, dst)
        matrix = resize_weights(src, dst)
        for i in range(dst):
            lo, hi = first[i], first[i] + count[i]
            np.testing.assert_array_equal(matrix[i, lo:hi], taps[i, :count[i]])
            assert not matrix[i, :lo].any() and not matrix[i, hi:].any()
            assert math.isclose(float(taps[i].sum(dtype=np.float64)), 1.0, abs_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_torch_batch_matches_numpy(dtype) -> None:
    rng = np.random.default_rng(2)
    layouts = [Layout.SINGLE, Layout.BLEND, Layout.HALVES, Layout.QUADS, Layout.HALVES]
    weights = np.array([[1, 0, 0, 0], [0.3, 0.7, 0, 0], [0.75, 0.25, 0, 0],
                        [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0, 0]], np.float32)
    counts = [1, 2, 2, 4, 2]
    x = (rng.random((5, 4, 3, 24, 20)) * 255).astype(np.float32)
    xt = torch.from_numpy(x).to(dtype) if dtype == torch.float32 else \
        torch.from_numpy(x.round().astype(np.uint8))
    got = compose_batch(xt, torch.from_numpy(weights), torch.tensor(layouts, dtype=torch.uint8),
                        size=(32, 32), stride=8)
    assert got.dtype == dtype and got.shape == (5, 3, 32, 32)
    for b in range(5):
        images = [np.moveaxis(xt[b, i].numpy(), 0, 2) for i in range(counts[b])]
        want = compose_slot(images, weights[b, :counts[b]].tolist(), layouts[b], (32, 32), 8)
        diff = np.abs(np.moveaxis(got[b].numpy(), 0, 2).astype(np.float64) - want)
        assert diff.max() <= (1 if dtype == torch.uint8 else 1e-3), (b, diff.max())


@pytest.mark.parametrize("layout, weights, size, stride", CASES)
@pytest.mark.parametrize("feature", [None, (3, 5), (7, 7)])
def test_masks_cover_every_cell_once_and_match_pixels(layout, weights, size, stride,
                                                      feature) -> None:
    h, w = size
    fh, fw = feature or (math.ceil(h / stride), math.ceil(w / stride))
    masks = region_masks(layout, weights, h, w, stride, fh, fw)
    assert masks.shape == (len(weights), fh, fw)
    if layout in (Layout.SINGLE, Layout.BLEND):
        assert masks.all()
        return
    np.testing.assert_array_equal(masks.sum(axis=0), 1)
    if feature is None and h % stride == 0 and w % stride == 0:
        # at the stride resolution a cell is owned by whoever owns its pixels
        for i, reg in enumerate(regions(layout, weights, h, w, stride)):
            pix = np.zeros((h, w), bool)
            pix[reg.slices] = True
            cells = pix.reshape(fh, stride, fw, stride).all(axis=(1, 3))
            np.testing.assert_array_equal(masks[i], cells)


def test_batch_masks_equal_per_slot_masks() -> None:
    layouts = torch.tensor([Layout.SINGLE, Layout.HALVES, Layout.QUADS], dtype=torch.uint8)
    weights = torch.tensor([[1, 0, 0, 0], [0.25, 0.75, 0, 0], [0.4, 0.1, 0.4, 0.1]])
    masks = region_masks_batch(layouts, weights, (32, 32), (4, 4), 8)
    assert masks.shape == (3, 4, 4, 4)
    assert masks[0, 0].all() and not masks[0, 1:].any()
    np.testing.assert_array_equal(masks[1, :2].numpy(),
                                  region_masks(Layout.HALVES, [0.25, 0.75], 32, 32, 8, 4, 4))
    assert masks[2].sum().item() == 16


@pytest.mark.parametrize("share, length, stride", [(0.5, 32, 8), (0.01, 32, 8), (0.99, 224, 32),
                                                   (0.6, 33, 8), (0.5, 9, 1)])
def test_split_position_rules(share, length, stride) -> None:
    x = split_position(share, length, stride)
    assert x == expected_split(share, length, stride)
    assert x % stride == 0 and stride <= x <= length - stride


def test_split_position_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="share must lie in"):
        split_position(1.5, 32, 8)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        split_position(0.5, 32, 0)


def test_snapped_weights_are_the_real_area_shares() -> None:
    for layout, w in [(Layout.HALVES, [0.6, 0.4]), (Layout.QUADS, [0.4, 0.3, 0.2, 0.1])]:
        snapped = snap_weights(layout, w, 4)
        assert abs(float(snapped.sum()) - 1) < 1e-6
        regs = regions(layout, snapped, 32, 32, 8)
        areas = np.array([r.height * r.width for r in regs]) / (32 * 32)
        np.testing.assert_allclose(snapped, areas, atol=1e-6)


def test_infer_counts_from_layout_and_weights() -> None:
    from mixpipe.core.compose import infer_counts

    layout = [Layout.SINGLE, Layout.HALVES, Layout.QUADS, Layout.BLEND, Layout.BLEND]
    weights = [[1, 0, 0, 0], [0.25, 0.75, 0, 0], [0.25] * 4, [0.2, 0.3, 0.5, 0],
               [0.5, 0.5, 0, 0]]
    assert infer_counts(layout, weights).tolist() == [1, 2, 4, 3, 2]
