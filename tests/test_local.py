"""LoCal+SGD: local blocks get no autograd gradients and change only by the Oja rule (checked
against a numpy reference), the boundary follows the static schedule and the dynamic rule, the
weak supervision scales the local rate as documented, and the model's forward is unchanged."""
import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mixpipe.train.local import Block, LocalSGD, from_kind, split_blocks
from mixpipe.train.local_rule import OjaRule, clip_relative
from mixpipe.train.local_select import (DynamicTransition, StaticTransition, WeakSupervision,
                                        next_multiplier, settled)
from mixpipe.train.models import SmallResNet, SmallResNetSettings

NO_CLIP = OjaRule(lr=0.05, max_relative_update=1.0)


# ----------------------------------------------------------------------------- numpy reference
def np_patches(x, kh, kw, stride, pad, dilation=1):
    """x [B, C, H, W] -> patches [B, H', W', C, kh, kw] (zero padding), written out by loops."""
    b, c, h, w = x.shape
    xp = np.zeros((b, c, h + 2 * pad, w + 2 * pad), dtype=np.float64)
    xp[:, :, pad:pad + h, pad:pad + w] = x
    ho = (h + 2 * pad - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((b, ho, wo, c, kh, kw))
    for i in range(ho):
        for j in range(wo):
            for u in range(kh):
                for v in range(kw):
                    out[:, i, j, :, u, v] = xp[:, :, i * stride + u * dilation,
                                               j * stride + v * dilation]
    return out


def np_oja(xs, ys, w, lr, eps, rho):
    """Normalised Oja step for rows y = W x: xs [P, D], ys [P, C], w [C, D]."""
    p = xs.shape[0]
    hebb = ys.T @ xs / p
    decay = (ys.T @ ys / p) @ w
    power = (xs ** 2).sum(axis=1).mean()
    delta = lr / (eps + power) * (hebb - decay)
    limit = rho * np.linalg.norm(w)
    if np.linalg.norm(delta) > limit:
        delta *= limit / np.linalg.norm(delta)
    return delta


def np_conv_delta(x, conv, lr, eps, rho):
    w = conv.weight.detach().double().numpy()
    cout, cin_g, kh, kw = w.shape
    g = conv.groups
    pat = np_patches(x, kh, kw, conv.stride[0], conv.padding[0], conv.dilation[0])
    bsz, ho, wo = pat.shape[:3]
    delta = np.zeros_like(w)
    # the rows of group j see input channels of group j only; power is averaged over groups
    powers, hebbs, decays = [], [], []
    for j in range(g):
        rows = slice(j * cout // g, (j + 1) * cout // g)
        xs = pat[:, :, :, j * cin_g:(j + 1) * cin_g].reshape(bsz * ho * wo, -1)
        wj = w[rows].reshape(cout // g, -1)
        ys = xs @ wj.T
        p = xs.shape[0]
        hebbs.append(ys.T @ xs / p)
        decays.append((ys.T @ ys / p) @ wj)
        powers.append((xs ** 2).sum(axis=1).mean())
    power = np.mean(powers)
    for j in range(g):
        rows = slice(j * cout // g, (j + 1) * cout // g)
        delta[rows] = (lr / (eps + power) * (hebbs[j] - decays[j])).reshape(-1, cin_g, kh, kw)
    limit = rho * np.linalg.norm(w)
    if np.linalg.norm(delta) > limit:
        delta *= limit / np.linalg.norm(delta)
    return delta


# ----------------------------------------------------------------------------- the rule
def test_linear_local_layer_changes_exactly_by_oja_and_gets_no_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    before = copy.deepcopy(model)
    local = LocalSGD(model, transition=1, rule=NO_CLIP, weak=WeakSupervision(enabled=False))
    x = torch.randn(10, 6)
    out = model.train()(x)
    np.testing.assert_allclose(out.detach().numpy(), before(x).detach().numpy(), rtol=0,
                               atol=1e-6)  # the forward used the weights it had
    out.square().mean().backward()
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert model[2].weight.grad is not None
    w = before[0].weight.detach().double().numpy()
    xs = x.double().numpy()
    expected = w + np_oja(xs, xs @ w.T, w, 0.05, NO_CLIP.eps, 1.0)
    np.testing.assert_allclose(model[0].weight.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(model[0].bias, before[0].bias)  # only the weight learns locally
    assert torch.equal(model[2].weight, before[2].weight)  # SGD part: only the optimiser moves it
    assert [b.name for b in local.local_blocks()] == ["0"]


@pytest.mark.parametrize("cin,cout,k,stride,pad,groups,bias,dil", [
    (2, 3, 3, 2, 1, 1, True, 1),
    (4, 4, 3, 1, 1, 2, False, 1),
    (3, 3, 3, 1, 1, 3, False, 1),    # depthwise, as in MobileNetV2
    (3, 5, 1, 1, 0, 1, False, 1),
    (3, 2, 3, 2, 0, 1, False, 1),    # the last input column is in no window
    (2, 3, 3, 1, 2, 1, False, 2),    # dilated
])
def test_conv_local_update_matches_numpy_reference(cin, cout, k, stride, pad, groups, bias, dil):
    torch.manual_seed(1)
    conv = nn.Conv2d(cin, cout, k, stride, pad, dilation=dil, groups=groups, bias=bias)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(cout, 2, 1))
    w0 = conv.weight.detach().clone()
    LocalSGD(model, transition=1, rule=NO_CLIP, weak=WeakSupervision(enabled=False))
    x = torch.randn(3, cin, 7, 6)
    model.train()(x)
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.copy_(w0)
    expected = w0.double().numpy() + np_conv_delta(x.double().numpy(), ref, 0.05, NO_CLIP.eps, 1.0)
    np.testing.assert_allclose(conv.weight.detach().numpy(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.equal(conv.weight, w0)


def test_clip_bounds_the_relative_step():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 2, 1))
    w0 = conv.weight.detach().clone()
    rule = OjaRule(lr=1.0, max_relative_update=0.003)
    LocalSGD(model, transition=1, rule=rule, weak=WeakSupervision(enabled=False))
    model.train()(torch.randn(4, 3, 8, 8) * 50)
    ratio = float((conv.weight - w0).norm() / w0.norm())
    assert ratio == pytest.approx(0.003, rel=1e-4)
    d = torch.ones(2, 2)
    assert torch.equal(clip_relative(d, torch.ones(2, 2), 1.0), d)  # within the bound: untouched


def test_local_rule_runs_only_in_train_mode():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    w0 = model[0].weight.detach().clone()
    LocalSGD(model, transition=1, rule=NO_CLIP)
    model.eval()(torch.randn(8, 5))
    assert torch.equal(model[0].weight, w0)


# ----------------------------------------------------------------------------- the wrapper
def tiny_resnet():
    torch.manual_seed(3)
    return SmallResNet(SmallResNetSettings(num_classes=5, width=4))


def test_small_resnet_blocks_and_forward_equals_unwrapped():
    model = tiny_resnet()
    assert [b.name for b in split_blocks(model)] == ["stem", "layer1.0", "layer2.0", "layer3.0"]
    plain = copy.deepcopy(model)
    LocalSGD(model, transition=3)
    x = torch.randn(6, 3, 32, 32)
    assert torch.equal(model.eval()(x), plain.eval()(x))
    assert torch.equal(model.train()(x), plain.train()(x))  # updates land after the output
    assert sorted(model.state_dict()) == sorted(plain.state_dict())


def test_local_blocks_build_no_graph_get_no_grad_and_ignore_the_optimizer():
    model = tiny_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    # local rate 0: local blocks must not move at all, whatever SGD (momentum, decay) does
    local = LocalSGD(model, transition=2, rule=OjaRule(lr=0.0), optimizer=opt)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if n.startswith(("conv1", "bn1", "layer1"))}
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    seen = {}
    model.layer1.register_forward_hook(lambda m, a, out: seen.update(out=out))
    stats0 = model.layer1[0].bn1.running_mean.clone()
    for _ in range(3):
        loss = nn.functional.cross_entropy(model.train()(torch.randn(8, 3, 32, 32)),
                                           torch.randint(0, 5, (8,)))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        assert seen["out"].grad_fn is None and not seen["out"].requires_grad  # no graph kept
        for n, p in model.named_parameters():
            assert (p.grad is None) == (n in frozen), n
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.equal(model.layer1[0].bn1.running_mean, stats0)  # BN stats keep updating
    assert not torch.equal(model.fc.weight, torch.zeros_like(model.fc.weight))
    ids = {id(p) for p in local.trainable_parameters()}
    assert ids == {id(p) for n, p in model.named_parameters() if n not in frozen}


def test_local_blocks_move_only_by_the_rule_during_sgd_training():
    model = tiny_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    LocalSGD(model, transition=1, rule=NO_CLIP, optimizer=opt)
    captured = {}
    model.conv1.register_forward_pre_hook(lambda m, a: captured.update(x=a[0].detach().clone()))
    w0 = model.conv1.weight.detach().clone()
    x = torch.randn(4, 3, 32, 32)
    loss = model.train()(x).sum()
    loss.backward()
    opt.step()
    ref = copy.deepcopy(model.conv1)
    with torch.no_grad():
        ref.weight.copy_(w0)
    expected = w0.double().numpy() + np_conv_delta(captured["x"].double().numpy(), ref, 0.05,
                                                   NO_CLIP.eps, 1.0)
    np.testing.assert_allclose(model.conv1.weight.detach().numpy(), expected, rtol=1e-4,
                               atol=1e-6)


def test_static_schedule_moves_the_boundary_and_restores_flags():
    model = tiny_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plan = [0, 1, 1, 3, 2, 9]
    local = LocalSGD(model, transition=StaticTransition(lambda e: plan[e]), optimizer=opt)
    assert local.transition == 0
    blocks = split_blocks(model)
    for epoch in range(5):
        # one SGD step so that momentum state exists for every trainable parameter
        model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        before = local.transition
        nxt = local.end_epoch(epoch)
        want = min(plan[epoch + 1], local.max_transition)
        assert nxt == want == local.transition
        for block in blocks[want:before]:  # back to SGD: stale momentum must not be replayed
            assert all(p not in opt.state for p in block.parameters())
        for i, block in enumerate(blocks):
            for p in block.parameters():
                assert p.requires_grad == (i >= want)
                if i < want:
                    assert p.grad is None
    assert [r["transition"] for r in local.history] == [0, 1, 1, 3, 2]
    local.remove()
    assert all(p.requires_grad for p in model.parameters())


@given(epochs=st.integers(1, 40), top=st.integers(0, 6), start=st.integers(0, 5),
       frac=st.floats(0.05, 1.0))
@settings(max_examples=60, deadline=None)
def test_linear_ramp_is_monotone_from_zero_to_the_top(epochs, top, start, frac):
    ramp = StaticTransition.linear(epochs, top, start, frac)
    values = [ramp(e) for e in range(epochs + 3)]
    assert all(0 <= v <= top for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert all(v == 0 for v in values[:start])
    assert ramp(max(start, math.ceil(frac * epochs))) == top


def test_settled_rule_on_synthetic_update_norms():
    s = DynamicTransition(window=3, threshold=0.01, min_drop=0.1)
    falling = [0.8, 0.4, 0.2, 0.1, 0.05]            # halving each epoch: still learning
    assert not any(settled(falling[:k], s) for k in range(1, 6))
    assert not settled([0.3, 0.3], s)               # fewer than `window` epochs on record
    assert settled([0.8, 0.4, 0.30, 0.29, 0.28], s)  # fell 7% over the window: stopped falling
    assert settled([0.5, 0.009, 0.008, 0.0085], s)   # all below the threshold
    assert not settled([0.5, 0.009, 0.02, 0.001], s)  # one recent value above, and still falling
    assert not settled([0.3, float("nan"), 0.3], s)


def _push(local, rel):
    """Move the transition block's weights so that ‖W − W_snap‖ / ‖W_snap‖ = rel."""
    weights = local._transition_weights()
    norm = math.sqrt(sum(float(w.detach().pow(2).sum()) for w in weights))
    with torch.no_grad():
        for w in weights:
            w.add_(torch.ones_like(w) * rel * norm / math.sqrt(sum(x.numel() for x in weights)))


def test_dynamic_rule_moves_when_updates_settle_and_not_before():
    model = tiny_resnet()
    dyn = DynamicTransition(window=2, threshold=0.001, min_drop=0.2)
    local = LocalSGD(model, transition=dyn, max_transition=2)
    moves = []
    for epoch, rel in enumerate([0.4, 0.2, 0.1, 0.09, 0.5, 0.2, 0.19, 0.18, 0.17]):
        _push(local, rel)
        moves.append(local.end_epoch(epoch))
    assert [r["update_norm"] for r in local.history] == pytest.approx(
        [0.4, 0.2, 0.1, 0.09, 0.5, 0.2, 0.19, 0.18, 0.17], rel=1e-4)
    # 0.1 -> 0.09 fell 10% < 20%: move after epoch 3; then a fresh record at block 1:
    # 0.5 -> 0.2 falls, 0.2 -> 0.19 settles: move after epoch 6; capped at max_transition = 2
    assert moves == [0, 0, 0, 1, 1, 1, 2, 2, 2]


# ----------------------------------------------------------------------------- weak supervision
@given(m=st.floats(0.0, 1.0), prev=st.floats(0.01, 10.0), loss=st.floats(0.01, 10.0))
@settings(max_examples=100, deadline=None)
def test_weak_supervision_follows_the_documented_formula(m, prev, loss):
    w = WeakSupervision(down=0.5, up=1.25, floor=0.05, ceiling=1.0)
    got = next_multiplier(m, prev, loss, w)
    want = float(np.clip(m * np.clip(prev / loss, 0.5, 1.25), 0.05, 1.0))
    assert got == pytest.approx(want, rel=1e-12)
    if loss > prev:
        assert got <= max(m, 0.05)  # a rising loss never speeds local learning up


def test_local_rate_is_scaled_by_schedule_and_loss_trend():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    local = LocalSGD(model, transition=1, rule=OjaRule(lr=0.01), optimizer=opt,
                     weak=WeakSupervision(down=0.5, up=2.0, floor=0.1, ceiling=1.0))
    assert local.local_lr() == pytest.approx(0.01)
    opt.param_groups[0]["lr"] = 0.05                     # the schedule quartered the rate
    assert local.local_lr() == pytest.approx(0.0025)
    assert local.observe_loss(2.0) == 1.0                # first observation: nothing to compare
    assert local.observe_loss(2.5) == pytest.approx(0.8)  # loss rose 25%: rate x 2.0/2.5
    assert local.observe_loss(10.0) == pytest.approx(0.4)  # rose 4x: factor clipped at down
    assert local.observe_loss(5.0) == pytest.approx(0.8)   # halved: x 2 (the up bound)
    assert local.observe_loss(1.0) == pytest.approx(1.0)   # capped by the ceiling
    assert local.local_lr() == pytest.approx(0.0025)
    local.end_epoch(0, train_loss=4.0)
    assert local.multiplier == pytest.approx(0.5) and local.history[-1]["lr_multiplier"] == 0.5


# ----------------------------------------------------------------------------- models, errors
class MobileLike(nn.Module):
    """The MobileNetV2 attribute shape: features (Sequential) + classifier, depthwise convs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),
            nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU6(), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)),
            nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)))
        self.classifier = nn.Linear(16, 4)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def test_mobilenet_like_model_trains_with_local_features():
    torch.manual_seed(4)
    model = MobileLike()
    assert [b.name for b in split_blocks(model)] == ["features.0", "features.1", "features.2"]
    local = LocalSGD(model, transition=2, rule=OjaRule(lr=0.05))
    dw = model.features[1][0].weight.detach().clone()
    model.train()(torch.randn(4, 3, 16, 16)).sum().backward()
    assert model.features[1][0].weight.grad is None and not torch.equal(
        model.features[1][0].weight, dw)
    assert model.features[2][0].weight.grad is not None
    assert local.history == []


def test_torchvision_resnet_and_mobilenet_paths():
    tv = pytest.importorskip("torchvision")
    resnet = tv.models.resnet18(num_classes=3)
    names = [b.name for b in split_blocks(resnet)]
    assert names[0] == "stem" and names[1] == "layer1.0" and names[-1] == "layer4.1"
    mobile = tv.models.mobilenet_v2(num_classes=3)
    assert len(split_blocks(mobile)) == len(mobile.features)
    local = LocalSGD(mobile, transition=4, rule=OjaRule(lr=0.01))
    mobile.train()(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for b in local.local_blocks() for p in b.parameters())


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(TypeError, match="blocks="):
        split_blocks(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least 2 blocks"):
        LocalSGD(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="max_transition"):
        LocalSGD(tiny_resnet(), max_transition=9)
    with pytest.raises(ValueError, match="padding"):
        LocalSGD(nn.Sequential(nn.Conv2d(2, 2, 3, padding="same"), nn.Conv2d(2, 2, 1)))
    with pytest.raises(ValueError, match="OjaRule.lr"):
        OjaRule(lr=2.0)
    with pytest.raises(ValueError, match="DynamicTransition.window"):
        DynamicTransition(window=0)
    with pytest.raises(ValueError, match="WeakSupervision.down"):
        WeakSupervision(down=0.0)
    with pytest.raises(ValueError, match="local kind"):
        from_kind("sometimes", tiny_resnet(), None, 3)
    with pytest.raises(TypeError, match="not an int"):
        StaticTransition(lambda e: 1.5)(0)
    with pytest.raises(TypeError, match="Block"):
        LocalSGD(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), blocks=[1, 2])


def test_explicit_blocks_and_state_round_trip():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    blocks = [Block("a", (model[0], model[1])), Block("b", (model[2],)), Block("c", (model[3],))]
    local = LocalSGD(model, blocks, transition=StaticTransition(lambda e: e))
    local.observe_loss(1.0)
    local.end_epoch(0, train_loss=2.0)
    state = local.state_dict()
    other = copy.deepcopy(model)
    twin = LocalSGD(other, [Block("a", (other[0], other[1])), Block("b", (other[2],)),
                            Block("c", (other[3],))], transition=StaticTransition(lambda e: e))
    twin.load_state_dict(state)
    assert twin.transition == local.transition == 1 and twin.multiplier == local.multiplier
    assert not other[0].weight.requires_grad and other[2].weight.requires_grad


# ----------------------------------------------------------------------------- with fit()
class Stripes:
    def __init__(self, n, seed=0):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 4, size=n)
        self.images = rng.integers(0, 60, size=(n, 32, 32, 3), dtype=np.uint8)
        for i, c in enumerate(self.labels):
            self.images[i, :, c * 8:(c + 1) * 8] += 150

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def test_fit_takes_the_wrapper_through_on_epoch():
    from mixpipe.server import InProcessService
    from mixpipe.torch import MixedLoader
    from mixpipe.train import EvalBatches, fit

    torch.manual_seed(0)
    model = SmallResNet(SmallResNetSettings(num_classes=4, width=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    local = from_kind("static", model, opt, epochs=3)
    service = InProcessService(64, policy="none", seed=0)
    loader = MixedLoader(Stripes(64), service, batch_size=32, size=(32, 32), stride=8, seed=0)
    history = fit(model, loader, opt, epochs=3, eval_loader=EvalBatches(Stripes(32, 1), 32),
                  progress=False, on_epoch=local.on_epoch)
    want = [StaticTransition.linear(3, 3)(e) for e in range(3)]
    assert [r["local_transition"] for r in history["epochs"]] == want
    assert [r["transition"] for r in local.history] == want
    assert all(r["train_steps"] == 2 for r in local.history)
    assert local.history[-1]["local_updates"] > 0  # the last epoch had local blocks


def test_docstring_examples_run():
    import doctest

    import mixpipe.train.local as module

    result = doctest.testmod(module)
    assert result.attempted >= 5 and result.failed == 0
