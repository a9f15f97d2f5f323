"""Split batch norms (mixpipe.train.splitnorm): composites normalised apart from single images."""
import copy

import pytest
import torch
from torch import nn

from mixpipe.core.plan import Layout
from mixpipe.train import adapt
from mixpipe.train.models import SmallResNet
from mixpipe.train.splitnorm import (SplitBatchNorm, composite_batch, merge_norms,
                                     split_norm_layers, split_norms)


def _manual_bn(x, eps=1e-5):
    """Training-mode batch norm with unit weight and zero bias, by hand: the reference."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def test_composite_batches_use_the_twin_and_its_statistics_only():
    torch.manual_seed(0)
    layer = SplitBatchNorm(nn.BatchNorm2d(3, momentum=0.5))
    singles = torch.randn(5, 3, 4, 4)
    composites = 3.0 + 2.0 * torch.randn(4, 3, 4, 4)  # another distribution
    with composite_batch([layer]):
        torch.testing.assert_close(layer(composites), _manual_bn(composites))
    torch.testing.assert_close(layer(singles), _manual_bn(singles))
    # running statistics: 0.5 * old (0 / 1) + 0.5 * the group's mean / unbiased variance
    torch.testing.assert_close(layer.main.running_mean, 0.5 * singles.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(layer.aux.running_mean, 0.5 * composites.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(layer.main.running_var,
                               0.5 + 0.5 * singles.var(dim=(0, 2, 3), unbiased=True))


def test_composite_batch_routes_the_block_only_even_on_error():
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    split_norms(net)
    layers = split_norm_layers(net)
    with pytest.raises(RuntimeError):
        with composite_batch(layers):
            assert [m.composites for m in layers] == [True]
            raise RuntimeError("boom")
    assert [m.composites for m in layers] == [False]


def _batch():
    torch.manual_seed(3)
    images = torch.randn(6, 3, 32, 32)
    layout = torch.tensor([0, 3, 0, 2, 0, 0], dtype=torch.uint8)  # SINGLE, QUADS, HALVES
    assert int(Layout.HALVES) == 2 and int(Layout.QUADS) == 3
    weights = torch.zeros(6, 4)
    weights[:, 0] = 1.0
    weights[1] = 0.25
    weights[3, :2] = 0.5
    return images, layout, weights


def test_a_single_in_a_mixed_batch_gets_what_a_batch_of_singles_alone_gives_it():
    """The point of splitting: composites no longer move a single image's normalisation."""
    torch.manual_seed(2)
    model = SmallResNet()
    plain = copy.deepcopy(model).train()
    split_norms(model)
    net = adapt(model).train()
    images, layout, weights = _batch()
    out = net(images, layout, weights)
    singles = layout == 0
    # reference: the original model, trained mode, on the single images alone
    torch.testing.assert_close(out[singles, 0], plain(images[singles]), rtol=1e-4, atol=1e-5)
    # and the composites' rows: the original model adapted, on the composites alone
    alone = adapt(copy.deepcopy(plain)).train()(images[~singles], layout[~singles],
                                                 weights[~singles])
    torch.testing.assert_close(out[~singles], alone, rtol=1e-4, atol=1e-5)
    # an unsplit model mixes the groups' statistics: the same single rows come out different
    coupled = adapt(copy.deepcopy(plain)).train()(images, layout, weights)
    assert not torch.allclose(coupled[singles, 0], out[singles, 0], atol=1e-3)


def test_gradients_reach_each_groups_own_norm_only():
    model = SmallResNet()
    split_norms(model)
    net = adapt(model).train()
    images, layout, weights = _batch()
    net(images[layout == 0], layout[layout == 0], weights[layout == 0]).sum().backward()
    first = split_norm_layers(model)[0]
    assert first.main.weight.grad is not None and first.main.weight.grad.abs().sum() > 0
    assert first.aux.weight.grad is None


def test_scored_model_is_the_main_norms_and_merging_restores_the_original_checkpoint():
    torch.manual_seed(4)
    model = SmallResNet()
    original_keys = set(model.state_dict())
    split = split_norms(model)
    assert split == sum(isinstance(m, nn.BatchNorm2d) for m in SmallResNet().modules())
    assert split_norms(model) == 0  # already split
    net = adapt(model).train()
    images, layout, weights = _batch()
    for _ in range(3):  # move both groups' running statistics
        net(images, layout, weights)
    net.eval()
    x = torch.randn(4, 3, 32, 32)
    scored = net(x)
    assert merge_norms(model) == split
    assert not split_norm_layers(model)
    assert set(model.state_dict()) == original_keys
    fresh = SmallResNet()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), scored)


def test_a_bare_norm_layer_is_refused_with_the_fix():
    with pytest.raises(TypeError, match="wrap it in a module"):
        split_norms(nn.BatchNorm2d(3))


@pytest.mark.parametrize("rows", ["composites", "singles"])
def test_a_batch_of_one_kind_runs_once_through_that_kinds_norms(rows):
    torch.manual_seed(5)
    model = SmallResNet()
    plain = adapt(copy.deepcopy(model)).train()
    split_norms(model)
    images, layout, weights = _batch()
    keep = layout != 0 if rows == "composites" else layout == 0
    out = adapt(model).train()(images[keep], layout[keep], weights[keep])
    torch.testing.assert_close(out, plain(images[keep], layout[keep], weights[keep]))
    used, idle = split_norm_layers(model)[0].aux, split_norm_layers(model)[0].main
    if rows == "singles":
        used, idle = idle, used
    assert int(used.num_batches_tracked) == 1 and int(idle.num_batches_tracked) == 0
