"""The progressive arm: the plain model with progressive resizing, priced to equal FLOPs with the
arm it matches, and trained at each epoch's side whatever the loader."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mixpipe.bench.speedup import arms
from mixpipe.bench.speedup.compute import compute, pass_flops
from mixpipe.bench.speedup.progressive import plan_progressive
from mixpipe.bench.speedup.settings import (MIXING, SpeedupSettings, arm_epochs, arm_policy,
                                            budget_epochs, run_order, trains_plain_model)
from mixpipe.core.plan import Layout, MixPlan
from mixpipe.core.policies.budget import BudgetSettings
from mixpipe.core.source import FixedPlans
from mixpipe.torch import MixedLoader
from mixpipe.train import EvalBatches, Normalize, Schedule, adapt, fit
from mixpipe.train.resolution import ProgressiveResize, snap_size
from mixpipe.train.steps import train_step

N = 5000  # samples: the sizes of the run, not of any data set (nothing trains on them)


class ShapeRecorder(nn.Module):
    """A ResNet-shaped stub (.avgpool, .fc) that records the side of every batch it sees."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=8, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)
        self.sides: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sides.append((self.training, x.shape[-1]))
        return self.fc(torch.flatten(self.avgpool(self.conv(x)), 1))


class Images:
    """Square 32 px images, label i % 2."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
        self.labels = np.arange(n) % 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def _independent_flops(s: SpeedupSettings, length: float, num_classes: int) -> float:
    """The run's FLOPs summed here, epoch by epoch, from the settings alone."""
    lo = s.progressive_min or max(2 * s.stride, s.image_size // 2 // s.stride * s.stride)
    start, end = (f * length for f in s.progressive_ramp)
    total = 0.0
    for e in range(math.ceil(length)):
        samples = N if length - e >= 1 else round((length - e) * N)
        share = min(max((e - start) / (end - start), 0.0), 1.0)
        side = int(lo + share * (s.image_size - lo)) // s.stride * s.stride
        total += samples * pass_flops(s.model, side, num_classes)
    return total


@pytest.mark.parametrize("epochs,matched", [(10, None), (4, None), (20, 7 * N + 13)])
def test_flops_match_the_matched_arm(epochs, matched):
    s = SpeedupSettings(epochs=epochs)
    target = (matched if matched is not None else budget_epochs(s, N) * N) \
        * pass_flops(s.model, s.image_size, 10)
    length = arm_epochs("progressive", s, N, matched, num_classes=10)
    assert _independent_flops(s, length, 10) == pytest.approx(target, rel=0.02)
    # smaller passes buy more data than budget's run of the same compute
    assert length > arm_epochs("budget", s, N, matched)
    assert arm_policy("progressive", s, N, matched, num_classes=10) == BudgetSettings(length)


@pytest.mark.parametrize("settings", [
    dict(epochs=10), dict(epochs=20, image_size=64, progressive_ramp=(0.1, 0.6)),
    dict(epochs=16, image_size=224, stride=32, progressive_min=128),
    dict(epochs=6, image_size=96, progressive_min=16, progressive_ramp=(0.0, 0.5))])
def test_sides_are_stride_multiples_rising_from_the_start_size_to_full(settings):
    s = SpeedupSettings(**settings)
    plan = plan_progressive(s, N, 10, flops_at=lambda side: side * side)  # area-priced
    sides = list(plan.sizes)
    assert all(side % s.stride == 0 and side >= 2 * s.stride for side in sides)
    assert sides == sorted(sides)
    assert sides[0] == (s.progressive_min or s.image_size // 2 // s.stride * s.stride)
    assert sides[-1] == s.image_size
    assert plan.flops == pytest.approx(plan.target_flops, rel=0.01)


def test_snapping_rounds_down_to_the_stride_and_keeps_two_strides():
    assert [snap_size(x, 8) for x in (31.9, 32, 24.5, 9, 0)] == [24, 32, 24, 16, 16]
    resize = ProgressiveResize(16, 32, (0.0, 4.0), 8)
    assert [resize(e) for e in range(6)] == [16, 16, 24, 24, 32, 32]
    with pytest.raises(ValueError, match="multiples of the stride"):
        ProgressiveResize(20, 32, (0.0, 4.0), 8)


def test_fit_feeds_the_model_each_epochs_side_and_scores_at_full_size():
    data = Images(12)
    loader = MixedLoader(data, FixedPlans(MixPlan.singles(len(data))), 4, (32, 32), stride=8)
    torch.manual_seed(0)
    model = ShapeRecorder()
    resize = ProgressiveResize(16, 32, (0.0, 2.0), 8)
    history = fit(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), 3,
                  Schedule("constant"), eval_loader=EvalBatches(data, batch_size=6), stride=8,
                  progress=False, resolution=resize)
    assert [r["resolution"] for r in history["epochs"]] == [16, 24, 32]
    trained = [side for training, side in model.sides if training]
    assert trained == [16] * 3 + [24] * 3 + [32] * 3  # three batches an epoch
    assert {side for training, side in model.sides if not training} == {32}


def test_a_step_refuses_to_resize_composites():
    plan = MixPlan.from_slots([([0, 1], [0.5, 0.5], Layout.HALVES), ([2], [1.0], Layout.SINGLE)],
                              3).validate()
    batch = next(iter(MixedLoader(Images(3), FixedPlans(plan), 4, (32, 32), stride=8)))
    net = adapt(ShapeRecorder(), stride=8)
    with pytest.raises(ValueError, match="single images"):
        train_step(net, torch.optim.SGD(net.parameters(), lr=0.1), batch, Normalize(), "cpu",
                   "slot", size=16)


@pytest.fixture
def stub_model(monkeypatch):
    """The benchmark builds (and prices) the shape-recording stub instead of a ResNet."""
    built = []

    def build(name, num_classes):
        built.append(ShapeRecorder(num_classes))
        return built[-1]

    monkeypatch.setattr(arms, "build_model", build)
    pass_flops.cache_clear()
    yield built
    pass_flops.cache_clear()


def test_the_arm_trains_each_epoch_at_its_side_and_records_its_flops(stub_model):
    n, matched = 200, 500  # the matched arm's measured forward inputs: 2.5 epochs of data
    s = SpeedupSettings(epochs=3, image_size=32, batch_size=50, policies=("progressive",),
                        progress=False, threads=None)
    history = arms.train_arm(s, "progressive", 0, Images(n), None, 2, log=lambda *a, **k: None,
                             matched_inputs=matched)
    records = history["epochs"]
    sides = [r["resolution"] for r in records]
    assert sides == history["progressive"]["sizes"] and sides[0] == 16 and sides[-1] == 32
    # the sides trained at (the models priced for FLOPs ran once each, in eval mode)
    trained = [side for m in stub_model for training, side in m.sides if training]
    steps = [r["steps"] for r in records]
    assert trained == [side for side, k in zip(sides, steps) for _ in range(k)]
    spent = sum(r["forward_inputs"] * pass_flops(s.model, r["resolution"], 2) for r in records)
    target = matched * pass_flops(s.model, 32, 2)
    assert spent == pytest.approx(target, rel=0.02)
    assert history["train_flops"] == pytest.approx(spent)
    assert [r["train_flops"] for r in records] == [
        r["forward_inputs"] * pass_flops(s.model, r["resolution"], 2) for r in records]
    assert history["epochs_of_data"] == pytest.approx(history["progressive"]["epochs"])


def test_compute_prices_the_arm_by_each_epochs_side(stub_model):
    s = SpeedupSettings(policies=("none", "progressive"), seeds=(0,))
    epochs = [{"forward_inputs": 100, "resolution": 16}, {"forward_inputs": 100,
                                                           "resolution": 32}]
    payload = {"settings": {"policies": list(s.policies), "seeds": [0]}, "num_classes": 2,
               "runs": [{"policy": "none", "seed": 0, "forward_inputs": 200, "final_top1": 0.9},
                        {"policy": "progressive", "seed": 0, "forward_inputs": 200,
                         "final_top1": 0.9, "epochs": epochs}]}
    rows = {r["arm"]: r for r in compute([payload], ["run"])["rows"]}
    full, half = pass_flops(s.model, 32, 2), pass_flops(s.model, 16, 2)
    assert rows["none"]["train_tflops"] == pytest.approx(200 * full / 1e12)
    assert rows["progressive"]["train_tflops"] == pytest.approx(100 * (half + full) / 1e12)
    assert rows["none"]["dominated_by"] == ["progressive (32 px, 10-epoch run)"]


def test_it_is_a_plain_model_arm_run_after_an_arm_whose_inputs_come_from_its_run():
    assert trains_plain_model("progressive") and "progressive" not in MIXING
    s = SpeedupSettings(policies=("progressive", "none", "budget", "shrink"),
                        budget_match="shrink")
    assert run_order(s) == ["none", "shrink", "progressive", "budget"]
    assert run_order(SpeedupSettings(policies=("progressive", "mixtrain"))) == [
        "progressive", "mixtrain"]  # mixtrain's inputs follow from its schedule
    with pytest.raises(ValueError, match="must run too"):
        run_order(SpeedupSettings(policies=("progressive", "none"), budget_match="shrink"))
    with pytest.raises(ValueError, match="num_classes"):
        arm_epochs("progressive", SpeedupSettings(), N)


@pytest.mark.parametrize("bad", [dict(progressive_min=20), dict(progressive_min=8),
                                 dict(progressive_min=40), dict(progressive_ramp=(0.5, 0.5)),
                                 dict(progressive_ramp=(0.0,))])
def test_bad_ramps_are_refused_with_the_field_named(bad):
    with pytest.raises(ValueError, match=f"progressive_{next(iter(bad))[12:]}"):
        SpeedupSettings(**bad)
