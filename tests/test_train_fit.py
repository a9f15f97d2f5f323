"""fit() end to end through the torch loader and the in-process selection service."""
import numpy as np
import pytest
import torch

from mixpipe.core.policies.mixtrain import MixTrainSettings
from mixpipe.server import InProcessService
from mixpipe.torch import MixedLoader
from mixpipe.train import EvalBatches, Schedule, fit
from mixpipe.train.models import SmallResNet, SmallResNetSettings


class StripeDataset:
    """Class c: a bright vertical stripe at column band c, plus noise (learnable in a few steps)."""

    def __init__(self, n, classes=4, seed=0):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, classes, size=n)
        self.images = rng.integers(0, 60, size=(n, 32, 32, 3), dtype=np.uint8)
        band = 32 // classes
        for i, c in enumerate(self.labels):
            self.images[i, :, c * band:(c + 1) * band] += 150

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class Recording:
    """Wraps a service and keeps every report it forwards."""

    def __init__(self, inner):
        self.inner = inner
        self.num_samples = inner.num_samples
        self.reports = {}
        self.plans = {}

    def report(self, epoch, ids, losses, rank=0):
        self.inner.report(epoch, ids, losses, rank)
        self.reports.setdefault(epoch, []).append(ids.copy())

    def commit(self, epoch):
        self.inner.commit(epoch)

    def plan(self, epoch, rank=0, world_size=1):
        plan = self.inner.plan(epoch, rank, world_size)
        self.plans[epoch] = plan
        return plan


def test_short_run_reports_every_sample_each_epoch_and_the_plan_mixes_after_warmup():
    n = 160
    data = StripeDataset(n)
    settings = MixTrainSettings(warmup_epochs=1, schedule="constant", fraction=0.5,
                                layout="halves", grid_cells=4)
    service = Recording(InProcessService(n, policy=settings, seed=5))
    loader = MixedLoader(data, service, batch_size=32, size=(32, 32), stride=8, seed=5)
    torch.manual_seed(0)
    model = SmallResNet(SmallResNetSettings(num_classes=4, width=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = fit(model, loader, opt, epochs=3, schedule=Schedule("linear"),
                  eval_loader=EvalBatches(StripeDataset(64, seed=1), batch_size=32),
                  progress=False)
    records = history["epochs"]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for epoch in range(3):
        ids = np.concatenate(service.reports[epoch])
        np.testing.assert_array_equal(np.sort(ids), np.arange(n))  # each sample once per epoch
    assert records[0]["forward_inputs"] == n and records[0]["layouts"] == {"SINGLE": n}
    assert records[1]["forward_inputs"] < n and records[1]["layouts"].get("HALVES", 0) > 0
    assert records[2]["speedup_bound"] > 1.0
    assert history["forward_inputs"] == sum(r["forward_inputs"] for r in records)
    for r in records:
        assert r["train_seconds"] >= r["data_wait_seconds"] + r["compute_seconds"]
        assert 0.0 <= r["top1"] <= 1.0
    assert records[-1]["lr_end"] == 0.0  # the schedule decays to zero
    assert records[-1]["top1"] > 0.5  # the stripes are learned (chance is 0.25)
    assert service.inner.stats()["seen"] == n


def test_skip_hardest_leaves_out_a_fresh_share_each_epoch_and_never_the_same_twice():
    """Through the real loop: the left-out samples are the highest last losses of those reported
    the epoch before, so none is left out two epochs running (it comes back, is measured again)
    and every epoch's forward inputs are what the budget arm is told."""
    from mixpipe.core.policies.mixtrain import epoch_forward_inputs

    n = 160
    settings = MixTrainSettings(warmup_epochs=1, schedule="constant", fraction=0.5,
                                grid_cells=4, skip_hardest=0.1)
    service = Recording(InProcessService(n, policy=settings, seed=3))
    loader = MixedLoader(StripeDataset(n), service, batch_size=32, size=(32, 32), stride=8,
                         seed=3)
    torch.manual_seed(0)
    model = SmallResNet(SmallResNetSettings(num_classes=4, width=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = fit(model, loader, opt, epochs=5, schedule=Schedule("linear"), progress=False)
    reported = [np.concatenate(service.reports[e]) for e in range(5)]
    assert reported[0].size == n
    left_out = []
    for epoch in range(1, 5):
        plan = service.plans[epoch]
        skipped = set(plan.skipped.tolist())
        assert len(skipped) == 16
        assert skipped.isdisjoint(reported[epoch].tolist())  # left out: not trained, not reported
        assert len(reported[epoch]) == n - 16
        left_out.append(skipped)
        assert history["epochs"][epoch]["forward_inputs"] == epoch_forward_inputs(settings, epoch, n)
    for before, after in zip(left_out, left_out[1:]):
        assert before.isdisjoint(after)


def test_schedule_reaches_zero_and_validates():
    for kind in ("cosine", "linear"):
        s = Schedule(kind, warmup=0.1)
        assert s.factor(0.0) == 0.0 and s.factor(0.1) == pytest.approx(1.0)
        assert s.factor(1.0) == pytest.approx(0.0, abs=1e-12)
        values = [s.factor(t) for t in np.linspace(0.1, 1.0, 50)]
        assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warm-up
    with pytest.raises(ValueError, match="kind"):
        Schedule("step")
    with pytest.raises(ValueError, match="warmup"):
        Schedule(warmup=1.0)


def test_fit_refuses_a_loader_without_epochs():
    with pytest.raises(TypeError, match="set_epoch"):
        fit(torch.nn.Linear(2, 2), [1, 2], torch.optim.SGD([torch.zeros(1)], lr=0.1), epochs=1)


def test_fit_trains_a_split_models_twins_on_composites_and_its_norms_on_singles():
    from mixpipe.train import split_norms
    from mixpipe.train.splitnorm import split_norm_layers

    n = 96
    settings = MixTrainSettings(warmup_epochs=1, schedule="constant", fraction=0.5,
                                layout="quads")
    loader = MixedLoader(StripeDataset(n), InProcessService(n, policy=settings, seed=2),
                         batch_size=32, size=(32, 32), stride=8, seed=2)
    torch.manual_seed(0)
    model = SmallResNet(SmallResNetSettings(num_classes=4, width=4))
    split_norms(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fit(model, loader, opt, epochs=3, progress=False)
    first = split_norm_layers(model)[0]
    # epoch 0: 96 singles, 3 batches, main layers only; epochs 1-2: 48 singles and 12
    # composites, 2 batches each, every batch through main or twin or both
    main, aux = int(first.main.num_batches_tracked), int(first.aux.num_batches_tracked)
    assert 3 < main <= 3 + 4 and 0 < aux <= 4 and main + aux >= 3 + 4
    assert not torch.equal(first.aux.weight, first.main.weight)
