"""The mixed loss: per-constituent terms, BLEND weighting, padding, and label independence."""
import numpy as np
import pytest
import torch

from mixpipe.core.plan import Layout
from mixpipe.train import adapt, mixed_loss
from mixpipe.train.models import SmallResNet, SmallResNetSettings

SINGLE, BLEND, HALVES, QUADS = (int(v) for v in Layout)


def _ce(logits, target):
    z = logits - logits.max()
    return float(np.log(np.exp(z).sum()) - z[target])


def test_matches_a_plain_numpy_computation():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 2, 5)).astype(np.float32)
    targets = np.array([[1, -1], [2, 3], [4, 0], [0, 1]])
    weights = np.array([[1, 0], [0.5, 0.5], [0.7, 0.3], [0.25, 0.75]], np.float32)
    layout = np.array([SINGLE, HALVES, BLEND, HALVES], np.uint8)
    scale = np.array([[1, 0], [2, 1], [1, 1], [0, 0]], np.float32)  # row 3: a padding copy
    out = mixed_loss(torch.from_numpy(logits), torch.from_numpy(targets), torch.from_numpy(weights),
                     torch.from_numpy(layout), torch.from_numpy(scale), per="constituent")
    total, count = 0.0, 0
    per = np.zeros((4, 2))
    for b in range(4):
        for k in range(2):
            if targets[b, k] < 0 or scale[b, k] == 0:
                continue
            ce = _ce(logits[b, k], targets[b, k])
            per[b, k] = ce
            w = weights[b, k] if layout[b] == BLEND else 1.0
            total += ce * w * scale[b, k]
            count += 1
    assert out.real.tolist() == [[True, False], [True, True], [True, True], [False, False]]
    np.testing.assert_allclose(out.per_constituent.numpy(), per, rtol=1e-5, atol=1e-6)
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)
    assert not out.per_constituent.requires_grad


def test_per_slot_divides_by_the_composites_that_hold_a_real_constituent():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(5, 4, 3)).astype(np.float32)
    targets = np.array([[0, -1, -1, -1], [1, 2, 0, 1], [2, 0, -1, -1], [1, 1, 1, 1],
                        [0, -1, -1, -1]])
    layout = np.array([SINGLE, QUADS, HALVES, QUADS, SINGLE], np.uint8)
    weights = np.where(targets >= 0, 1.0 / np.maximum((targets >= 0).sum(1, keepdims=True), 1),
                       0.0).astype(np.float32)
    scale = np.ones((5, 4), np.float32)
    scale[3] = 0  # a padding copy: not a slot that counts
    scale[1, 0] = 2.0
    args = [torch.from_numpy(a) for a in (logits, targets, weights, layout, scale)]
    total = sum(_ce(logits[b, k], targets[b, k]) * scale[b, k]
                for b in range(5) for k in range(4) if targets[b, k] >= 0 and scale[b, k] > 0)
    per_slot = mixed_loss(*args, per="slot")
    per_constituent = mixed_loss(*args, per="constituent")
    assert per_slot.loss.item() == pytest.approx(total / 4, rel=1e-5)  # rows 0, 1, 2, 4
    assert per_constituent.loss.item() == pytest.approx(total / 8, rel=1e-5)
    torch.testing.assert_close(per_slot.per_constituent, per_constituent.per_constituent)
    with pytest.raises(ValueError, match="per must be one of"):
        mixed_loss(*args, per="sample")


def test_padding_contributes_no_gradient():
    logits = torch.randn(2, 2, 3, requires_grad=True)
    out = mixed_loss(logits, torch.tensor([[0, 1], [2, 0]]), torch.tensor([[0.5, 0.5]] * 2),
                     torch.tensor([HALVES, HALVES], dtype=torch.uint8),
                     torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    out.loss.backward()
    assert torch.count_nonzero(logits.grad[1]) == 0
    assert torch.count_nonzero(logits.grad[0]) > 0


def test_a_constituents_loss_and_gradient_ignore_the_other_label():
    torch.manual_seed(0)
    net = adapt(SmallResNet(SmallResNetSettings(num_classes=6, width=4)), stride=8)
    x = torch.randn(3, 3, 32, 32)
    weights = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.75, 0.25]])
    scale = torch.ones(3, 2)

    def own_term(other_labels, kind):
        net.zero_grad()
        layout = torch.full((3,), kind, dtype=torch.uint8)
        logits = net(x, layout, weights)
        logits.retain_grad()
        targets = torch.stack([torch.tensor([0, 1, 2]), other_labels], dim=1)
        out = mixed_loss(logits, targets, weights, layout, scale)
        out.loss.backward()
        return out.per_constituent[:, 0].clone(), logits.grad.clone()

    loss_a, grad_a = own_term(torch.tensor([3, 4, 5]), HALVES)
    loss_b, grad_b = own_term(torch.tensor([5, 0, 1]), HALVES)
    assert torch.equal(loss_a, loss_b)
    # d loss / d (constituent 0's own logits) has no term from label 1
    assert torch.equal(grad_a[:, 0], grad_b[:, 0])
    assert not torch.allclose(grad_a[:, 1], grad_b[:, 1])
    # the check can fail: BLEND logits are shared, and their gradient (summed over the
    # constituents) does move with the other label
    _, blend_a = own_term(torch.tensor([3, 4, 5]), BLEND)
    _, blend_b = own_term(torch.tensor([5, 0, 1]), BLEND)
    assert not torch.allclose(blend_a.sum(1), blend_b.sum(1))


def test_bad_shapes_are_refused():
    logits = torch.zeros(2, 2, 3)
    ok = dict(targets=torch.zeros(2, 2, dtype=torch.int64), weights=torch.ones(2, 2) / 2,
              layout=torch.zeros(2, dtype=torch.uint8), loss_scale=torch.ones(2, 2))
    with pytest.raises(ValueError, match="logits"):
        mixed_loss(torch.zeros(2, 3), **ok)
    with pytest.raises(ValueError, match="weights"):
        mixed_loss(logits, **{**ok, "weights": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="out of range"):
        mixed_loss(logits, **{**ok, "targets": torch.full((2, 2), 3)})
