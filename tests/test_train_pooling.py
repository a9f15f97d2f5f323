"""Region pooling: exactness on unmixed rows, per-region features against masks built here."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixpipe.core.plan import Layout
from mixpipe.train import adapt, model_family
from mixpipe.train.models import (SmallResNet, SmallResNetSettings, SmallViT, SmallViTSettings,
                                  build_model)
from mixpipe.train.pooling import RegionMasks, region_pool

SINGLE, BLEND, HALVES, QUADS = (int(v) for v in Layout)


def _resnet(seed=0, width=4):
    torch.manual_seed(seed)
    model = SmallResNet(SmallResNetSettings(num_classes=5, width=width))
    for m in model.modules():  # non-trivial BN statistics, so eval mode is not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def _resnet_map(model, x):
    """The final feature map, computed here layer by layer (not through any hook)."""
    x = model.relu(model.bn1(model.conv1(x)))
    return model.layer3(model.layer2(model.layer1(x)))


def _split_cells(share, cells):
    """Cells owned by the first part of a split: round half up, at least one cell per side."""
    return int(min(max(np.floor(share * cells + 0.5), 1), cells - 1))


def _masks_numpy(layout, weights, cells_h, cells_w):
    """Independent reference: bool[K, h, w] from the layout rules (cells = stride cells)."""
    k = len(weights)
    out = np.zeros((k, cells_h, cells_w), bool)
    if layout == HALVES:
        x = _split_cells(weights[0], cells_w)
        out[0, :, :x] = True
        out[1, :, x:] = True
    elif layout == QUADS:
        x = _split_cells(weights[0] + weights[2], cells_w)
        y = _split_cells(weights[0] + weights[1], cells_h)
        out[0, :y, :x] = out[1, :y, x:] = out[2, y:, :x] = out[3, y:, x:] = True
    else:
        out[:] = True
    return out


def test_unmixed_batch_is_bitwise_the_original_model():
    model = _resnet()
    net = adapt(model)
    x = torch.randn(6, 3, 32, 32)
    want = model(x)
    layout = torch.full((6,), SINGLE, dtype=torch.uint8)
    weights = torch.zeros(6, 2)
    weights[:, 0] = 1
    got = net(x, layout, weights)
    assert got.shape == (6, 2, 5)
    assert torch.equal(got[:, 0], want)
    assert torch.equal(net(x), want)


def test_single_and_blend_rows_of_a_mixed_batch_keep_the_original_output():
    model = _resnet(1)
    net = adapt(model)
    x = torch.randn(4, 3, 32, 32)
    layout = torch.tensor([SINGLE, HALVES, BLEND, QUADS], dtype=torch.uint8)
    weights = torch.tensor([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.7, 0.3, 0, 0],
                            [0.25, 0.25, 0.25, 0.25]], dtype=torch.float32)
    want = model(x)
    got = net(x, layout, weights)
    assert torch.equal(got[0, 0], want[0])
    assert torch.equal(got[2, 0], want[2]) and torch.equal(got[2, 1], want[2])  # shared logits
    assert not torch.allclose(got[1, 0], got[1, 1])  # spatial rows do get their own logits


@settings(max_examples=10, deadline=None)
@given(w0=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_halves_features_equal_pooling_over_independent_masks(w0, seed):
    model = _resnet(seed % 7)
    net = adapt(model, stride=8)
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 32, 32)
    weights = torch.tensor([[w0, 1 - w0], [1 - w0, w0]], dtype=torch.float32)
    layout = torch.tensor([HALVES, HALVES], dtype=torch.uint8)
    got = net(x, layout, weights)
    with torch.no_grad():
        fmap = _resnet_map(model, x).numpy().astype(np.float64)
        for b in range(2):
            masks = _masks_numpy(HALVES, weights[b].tolist(), 4, 4)
            for k in range(2):
                feat = fmap[b][:, masks[k]].mean(axis=1)
                want = model.fc(torch.from_numpy(feat).float())
                torch.testing.assert_close(got[b, k], want, rtol=1e-4, atol=1e-5)


def test_quads_and_masks_match_independent_reference():
    maker = RegionMasks(stride=8)
    layout = torch.tensor([QUADS, HALVES, SINGLE, BLEND], dtype=torch.uint8)
    weights = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.75, 0.25, 0, 0], [1, 0, 0, 0],
                            [0.6, 0.4, 0, 0]], dtype=torch.float32)
    masks = maker(layout, weights, (32, 32), (4, 4)).numpy()
    assert masks.shape == (4, 4, 4, 4)
    for b in range(4):
        n = {QUADS: 4, HALVES: 2, SINGLE: 1, BLEND: 2}[int(layout[b])]
        want = _masks_numpy(int(layout[b]), weights[b, :n].tolist(), 4, 4)
        np.testing.assert_array_equal(masks[b, :n].astype(bool), want)
        assert not masks[b, n:].any()  # no constituent, no cells


def test_region_pool_against_numpy_and_empty_regions():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(3, 5, 4, 4)).astype(np.float32)
    masks = rng.random((3, 2, 4, 4)) < 0.5
    masks[0, 1] = False
    got = region_pool(torch.from_numpy(feats), torch.from_numpy(masks.astype(np.float32))).numpy()
    for b in range(3):
        for k in range(2):
            want = feats[b][:, masks[b, k]].mean(axis=1) if masks[b, k].any() else np.zeros(5)
            np.testing.assert_allclose(got[b, k], want, rtol=1e-5, atol=1e-6)


def test_small_vit_tokens_pool_by_patch_centre():
    torch.manual_seed(0)
    model = SmallViT(SmallViTSettings(num_classes=4, dim=32, depth=1, heads=2)).eval()
    net = adapt(model, stride=8)
    assert model_family(model) == "vit"
    x = torch.randn(3, 3, 32, 32)
    layout = torch.tensor([SINGLE, HALVES, QUADS], dtype=torch.uint8)
    weights = torch.tensor([[1, 0, 0, 0], [0.25, 0.75, 0, 0], [0.375, 0.125, 0.375, 0.125]])
    got = net(x, layout, weights)
    assert torch.equal(got[0, 0], model(x)[0])
    with torch.no_grad():
        tokens = model.conv_proj(x).flatten(2).transpose(1, 2) + model.pos_embedding
        tokens = model.encoder(tokens).numpy().reshape(3, 8, 8, -1)
    centres = (np.arange(8) + 0.5) * 4  # patch centres in pixels
    for b, n in ((1, 2), (2, 4)):
        w = weights[b, :n].tolist()
        # the split on the grid of 8-px cells, blown up to pixels; a patch belongs to the region
        # holding its centre pixel
        px = _masks_numpy(int(layout[b]), w, 4, 4).repeat(8, axis=1).repeat(8, axis=2)
        for k in range(n):
            inside = px[k][np.floor(centres).astype(int)][:, np.floor(centres).astype(int)]
            want = model.heads(torch.from_numpy(tokens[b][inside].mean(axis=0)))
            torch.testing.assert_close(got[b, k], want, rtol=1e-4, atol=1e-5)


def test_adapt_refuses_unknown_models_and_bad_inputs():
    with pytest.raises(TypeError, match="avgpool"):
        adapt(torch.nn.Linear(3, 3))
    net = adapt(build_model("resnet-tiny", 3))
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="weights"):
        net(x, torch.zeros(2, dtype=torch.uint8), None)
    with pytest.raises(ValueError, match="layout"):
        net(x, None, torch.ones(2, 1))
    with pytest.raises(ValueError, match="width"):
        SmallResNetSettings(width=0)
    with pytest.raises(ValueError, match="patch_size"):
        SmallViTSettings(patch_size=5)


def test_torchvision_models_when_available():
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 64, 64)
    layout = torch.tensor([SINGLE, HALVES], dtype=torch.uint8)
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    for ctor in (tv.models.resnet18, tv.models.mobilenet_v2):
        model = ctor(num_classes=3).eval()
        out = adapt(model, stride=32)(x, layout, weights)
        assert torch.equal(out[0, 0], model(x)[0])
        assert out.shape == (2, 2, 3)
    vit = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                      hidden_dim=16, mlp_dim=32, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    out = adapt(vit, stride=8)(x, layout, weights)
    assert torch.equal(out[0, 0], vit(x)[0]) and out.shape == (2, 2, 3)
