"""Batch-norm recalibration on single images (mixpipe.train.norms) and its place in fit."""
import numpy as np
import pytest
import torch
from torch import nn

from mixpipe.data.subset import Chosen
from mixpipe.train import EvalBatches, Normalize, recalibrate_norms


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, bias=False), nn.BatchNorm2d(5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))


def _batches(count=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(torch.from_numpy(rng.integers(0, 256, (size, 3, 12, 12), dtype=np.uint8)),
             torch.zeros(size, dtype=torch.int64)) for _ in range(count)]


def _stale(net):
    """Statistics far from any the batches give, as composites' would be."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(9.0)
            m.momentum = 0.3


def test_statistics_become_the_plain_average_over_the_batches_of_each_layers_input():
    net, batches, prepare = _net(), _batches(), Normalize()
    _stale(net)
    weights = [p.clone() for p in net.parameters()]
    net.eval()
    # independent reference: the first norm's input is conv1(x); average the per-batch mean and
    # unbiased variance over the (equal-sized) batches
    conv1, bn1 = net[0], net[1]
    with torch.no_grad():
        feats = [conv1(prepare(x)) for x, _ in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    used = recalibrate_norms(net, batches, prepare)
    assert used == 24
    torch.testing.assert_close(bn1.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn1.running_var, var, rtol=1e-5, atol=1e-5)
    assert not net.training and bn1.momentum == 0.3  # mode and momentum restored
    for before, after in zip(weights, net.parameters()):
        assert torch.equal(before, after)  # forward only: the weights are untouched


def test_max_images_stops_after_that_many_and_a_model_without_norms_is_left_alone():
    net = _net()
    assert recalibrate_norms(net, _batches(count=4), max_images=12) == 12
    first_only = _net()
    recalibrate_norms(first_only, _batches(count=1), max_images=8)
    truncated = _net()
    recalibrate_norms(truncated, [(_batches(count=1)[0][0][:8], None)])
    torch.testing.assert_close(first_only[1].running_mean, truncated[1].running_mean)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 2))
    assert recalibrate_norms(plain, _batches()) == 0


def test_no_images_or_a_failing_batch_leave_the_old_statistics():
    net = _net()
    _stale(net)
    with pytest.raises(ValueError, match="no images"):
        recalibrate_norms(net, [])
    bad = _batches(count=1) + [(torch.zeros(2, 3, 12, 12, dtype=torch.uint8)[:, :1], None)]
    with pytest.raises(Exception):
        recalibrate_norms(net, bad)  # the second batch has one channel: the pass fails
    for m in (net[1], net[4]):
        assert torch.all(m.running_mean == 5.0) and torch.all(m.running_var == 9.0)
        assert m.momentum == 0.3


def test_chosen_views_the_given_ids_and_refuses_ids_outside_the_base():
    base = [(np.full((2, 2, 3), i, np.uint8), i % 3) for i in range(10)]
    view = Chosen(base, [7, 2, 9])
    assert len(view) == 3 and [view[i][1] for i in range(3)] == [1, 2, 0]
    assert int(view[0][0][0, 0, 0]) == 7
    batches = list(EvalBatches(view, batch_size=2))
    assert [len(x) for x, _ in batches] == [2, 1]
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        Chosen(base, [3, 10])


def test_fit_recalibrates_after_the_last_epoch_and_charges_its_images_to_it():
    from mixpipe.core.policies.mixtrain import MixTrainSettings
    from mixpipe.server import InProcessService
    from mixpipe.torch import MixedLoader
    from mixpipe.train import fit
    from mixpipe.train.models import SmallResNet, SmallResNetSettings
    from tests.test_train_fit import StripeDataset

    n, data = 96, StripeDataset(96)
    settings = MixTrainSettings(warmup_epochs=1, schedule="constant", fraction=0.5,
                                layout="quads")
    service = InProcessService(n, policy=settings, seed=1)
    loader = MixedLoader(data, service, batch_size=32, size=(32, 32), stride=8, seed=1)
    torch.manual_seed(0)
    model = SmallResNet(SmallResNetSettings(num_classes=4, width=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    singles = EvalBatches(Chosen(data, np.arange(40)), batch_size=16)
    history = fit(model, loader, opt, epochs=2, progress=False, recalibrate=singles,
                  eval_loader=EvalBatches(StripeDataset(32, seed=3), batch_size=32))
    first, last = history["epochs"]
    assert "recalibration_images" not in first
    assert last["recalibration_images"] == 40
    plan_inputs = service.plan(1).num_forward_inputs
    assert last["forward_inputs"] == plan_inputs + 40
    assert history["forward_inputs"] == n + plan_inputs + 40
    # the statistics the model is scored with are those of the single images
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    prepare = Normalize()
    with torch.no_grad():
        means = torch.stack([stem(prepare(x)).mean(dim=(0, 2, 3)) for x, _ in singles]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-4, atol=1e-4)
