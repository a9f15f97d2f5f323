"""fit's per-epoch metrics for the user's logger: the maths by hand, the numbers of a real run
against the plans and reports its service saw, and the TensorBoard writer."""
import glob
import math
import os
import sys

import numpy as np
import pytest
import torch

from mixpipe.core.batch import MixedBatch
from mixpipe.core.plan import Layout, MixPlan
from mixpipe.core.policies.mixtrain import MixTrainSettings
from mixpipe.server import InProcessService
from mixpipe.torch import MixedLoader
from mixpipe.train import Schedule, fit
from mixpipe.train.loss import MixedLoss
from mixpipe.train.metrics import EpochLosses, epoch_metrics, loss_quantiles, plan_counts
from mixpipe.train.models import SmallResNet, SmallResNetSettings
from test_train_fit import StripeDataset  # learnable in a few steps

QUANTILE_KEYS = [f"loss_{kind}_q{q}" for kind in ("mixed", "single") for q in ("10", "50", "90")]
KEYS = {"epoch", "samples", "forward_inputs", "mixed", "single", "skipped", "mixed_share",
        "single_share", "skipped_share", "speedup_bound", "plan_seconds", "data_wait_seconds",
        "report_seconds", "compute_seconds", "train_seconds", "train_loss", "lr", *QUANTILE_KEYS}


def _hand_plan():
    """10 samples: halves {0, 1}, quads {2..5}, singles 6 and 7, skipped 8 and 9."""
    return MixPlan.from_slots([([0, 1], [0.5, 0.5], Layout.HALVES),
                               ([2, 3, 4, 5], [0.25] * 4, Layout.QUADS),
                               ([6], [1.0], Layout.SINGLE), ([7], [1.0], Layout.SINGLE)],
                              num_samples=10, skipped=[8, 9]).validate()


def test_metrics_of_a_hand_plan_and_hand_losses():
    record = {"epoch": 3, "plan_seconds": 0.5, "data_wait_seconds": 1.25, "report_seconds": 0.125,
              "compute_seconds": 2.0, "train_seconds": 4.0, "train_loss": 0.75, "lr_end": 0.01,
              "top1": 0.5, "layouts": {"HALVES": 1}}
    losses = np.array([1, 2, 3, 4, 5, 6, 0.2, 0.4], np.float32)
    mixed = np.array([True] * 6 + [False] * 2)
    m = epoch_metrics(record, _hand_plan(), losses, mixed)
    assert set(m) == KEYS | {"top1"}
    assert (m["epoch"], m["samples"], m["forward_inputs"]) == (3, 10, 4)
    assert (m["mixed"], m["single"], m["skipped"]) == (6, 2, 2)
    assert (m["mixed_share"], m["single_share"], m["skipped_share"]) == pytest.approx((0.6, 0.2,
                                                                                      0.2))
    assert m["speedup_bound"] == 2.5  # 10 samples in 4 forward inputs
    assert (m["plan_seconds"], m["data_wait_seconds"], m["report_seconds"]) == (0.5, 1.25, 0.125)
    assert (m["lr"], m["top1"], m["train_loss"]) == (0.01, 0.5, 0.75)
    # linear interpolation: positions 0.5, 2.5, 4.5 of 1..6; 0.1, 0.5, 0.9 of (0.2, 0.4)
    assert [m[k] for k in QUANTILE_KEYS] == pytest.approx([1.5, 3.5, 5.5, 0.22, 0.3, 0.38])
    assert all(isinstance(v, (int, float)) for v in m.values())


def test_padding_copies_count_as_nothing_and_an_empty_kind_is_nan():
    plan = MixPlan.from_slots([([0, 1], [0.5, 0.5], Layout.HALVES), ([2], [1.0], Layout.SINGLE),
                               ([0, 1], [0.5, 0.5], Layout.HALVES)], num_samples=3,
                              loss_scale=[[1, 1], [1], [0, 0]])
    assert plan_counts(plan) == {"samples": 3, "mixed": 2, "single": 1, "skipped": 0}
    assert loss_quantiles(np.empty(0), "loss_mixed") == pytest.approx(
        {"loss_mixed_q10": math.nan, "loss_mixed_q50": math.nan, "loss_mixed_q90": math.nan},
        nan_ok=True)
    m = epoch_metrics({"epoch": 0}, MixPlan.singles(4), np.ones(4), np.zeros(4, bool))
    assert m["mixed_share"] == 0.0 and m["speedup_bound"] == 1.0
    assert math.isnan(m["loss_mixed_q50"]) and m["loss_single_q50"] == 1.0
    with pytest.raises(ValueError, match="one flag per loss"):
        epoch_metrics({"epoch": 0}, plan, np.ones(3), np.ones(2, bool))
    with pytest.raises(ValueError, match="mixed flags"):
        epoch_metrics({"epoch": 0}, plan, np.ones(3))


def test_epoch_losses_keep_real_constituents_with_their_slot_kind():
    kept = EpochLosses()
    ids = torch.tensor([[0, 1], [2, -1], [0, 1]])  # the last slot: a padding copy
    scale = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    layout = torch.tensor([Layout.HALVES, Layout.SINGLE, Layout.HALVES], dtype=torch.uint8)
    batch = MixedBatch(torch.zeros(3, 3, 4, 4), ids.clamp_min(-1), scale, ids, layout, scale)
    real = (ids >= 0) & (scale > 0)
    per = torch.tensor([[0.5, 1.5], [2.5, 0.0], [0.0, 0.0]])
    kept.add(batch, MixedLoss(torch.tensor(0.0), per, real))
    kept.add(batch._replace(layout=torch.zeros(3, dtype=torch.uint8)),
             MixedLoss(torch.tensor(0.0), per + 1, real))
    losses, mixed = kept.arrays()
    np.testing.assert_array_equal(losses, [0.5, 1.5, 2.5, 1.5, 2.5, 3.5])
    np.testing.assert_array_equal(mixed, [True, True, False, False, False, False])
    assert kept.arrays()[0].size == 0  # a new epoch starts empty


# ---------------------------------------------------------------------------------- a real run
class Recording:
    """Wraps a service and keeps every plan it hands out and every loss reported to it."""

    def __init__(self, inner):
        self.inner = inner
        self.num_samples = inner.num_samples
        self.reports, self.plans = {}, {}

    def report(self, epoch, ids, losses, rank=0):
        self.inner.report(epoch, ids, losses, rank)
        self.reports.setdefault(epoch, []).append((ids.copy(), losses.copy()))

    def commit(self, epoch):
        self.inner.commit(epoch)

    def plan(self, epoch, rank=0, world_size=1):
        self.plans[epoch] = plan = self.inner.plan(epoch, rank, world_size)
        return plan


def _run(n, epochs, on_metrics):
    settings = MixTrainSettings(warmup_epochs=1, schedule="constant", fraction=0.5,
                                layout="halves", grid_cells=4, skip_hardest=0.125)
    service = Recording(InProcessService(n, policy=settings, seed=7))
    loader = MixedLoader(StripeDataset(n), service, batch_size=16, size=(32, 32), stride=8,
                         seed=7)
    torch.manual_seed(0)
    model = SmallResNet(SmallResNetSettings(num_classes=4, width=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = fit(model, loader, opt, epochs=epochs, schedule=Schedule("linear"),
                  progress=False, on_metrics=on_metrics)
    return service, history


def test_fit_metrics_agree_with_the_plans_and_reports_the_service_saw():
    n, got = 48, []
    service, history = _run(n, 3, got.append)
    assert [m["epoch"] for m in got] == [0, 1, 2]
    for m, record in zip(got, history["epochs"]):
        assert set(m) == KEYS
        plan = service.plans[m["epoch"]]
        in_composite = plan.layout != Layout.SINGLE
        mixed_ids = set(plan.ids[in_composite][plan.ids[in_composite] >= 0].tolist())
        assert m["mixed_share"] == pytest.approx(len(mixed_ids) / n)
        assert m["skipped"] == plan.skipped.size and m["skipped_share"] == plan.skipped.size / n
        assert m["single_share"] == pytest.approx(1 - (len(mixed_ids) + plan.skipped.size) / n)
        assert m["speedup_bound"] == pytest.approx(n / plan.num_slots)
        assert m["forward_inputs"] == plan.num_slots == record["forward_inputs"]
        for key in ("plan_seconds", "data_wait_seconds", "report_seconds", "train_seconds"):
            assert m[key] == record[key] >= 0
        ids = np.concatenate([i for i, _ in service.reports[m["epoch"]]])
        losses = np.concatenate([l for _, l in service.reports[m["epoch"]]]).astype(np.float64)
        mixed = np.isin(ids, list(mixed_ids))
        for kind, chosen in (("mixed", losses[mixed]), ("single", losses[~mixed])):
            want = np.quantile(chosen, [0.1, 0.5, 0.9]) if chosen.size else [math.nan] * 3
            assert [m[f"loss_{kind}_q{q}"] for q in ("10", "50", "90")] == pytest.approx(
                list(want), rel=1e-6, nan_ok=True)
    assert got[0]["mixed_share"] == 0 and math.isnan(got[0]["loss_mixed_q50"])  # warm-up
    assert got[1]["mixed_share"] > 0 and got[1]["skipped"] == n // 8
    assert got[2]["speedup_bound"] > 1


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_writer_holds_every_finite_metric_by_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from mixpipe.train import TensorBoardMetrics

    got = []
    with TensorBoardMetrics(str(tmp_path / "run")) as board:
        _run(32, 2, lambda m: (got.append(m), board(m)))
    assert glob.glob(str(tmp_path / "run" / "events.out.tfevents.*"))
    scalars = _scalars(str(tmp_path / "run"))
    assert set(scalars) == KEYS - {"epoch"}
    assert [step for step, _ in scalars["mixed_share"]] == [0, 1]
    assert [v for _, v in scalars["speedup_bound"]] == pytest.approx(
        [m["speedup_bound"] for m in got])
    assert [step for step, _ in scalars["loss_mixed_q50"]] == [1]  # epoch 0 mixed nothing


def test_a_missing_tensorboard_is_one_line_naming_the_extra(monkeypatch):
    from mixpipe.bench.speedup import SpeedupSettings, arms
    from mixpipe.train import TensorBoardMetrics

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'mixpipe\[tensorboard\]'"):
        TensorBoardMetrics("unused")
    with pytest.raises(SystemExit) as info:
        arms._board(SpeedupSettings(tensorboard="unused"), "mixtrain", 0)
    assert "\n" not in str(info.value) and "mixpipe[tensorboard]" in str(info.value)
    assert arms._board(SpeedupSettings(), "mixtrain", 0) is None  # no flag, no import
    assert not os.path.exists("unused")


def test_bench_flag_writes_one_folder_per_arm_and_seed(tmp_path):
    pytest.importorskip("tensorboard")
    import argparse

    from mixpipe.bench.speedup import add_arguments, arms, settings_from

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = settings_from(parser.parse_args(["--tensorboard", str(tmp_path), "--epochs", "2",
                                         "--warmup-epochs", "1", "--image-size", "16",
                                         "--batch-size", "8", "--workers", "0",
                                         "--no-progress", "--channels-last", "off"]))
    assert s.tensorboard == str(tmp_path)
    train = [(np.full((16, 16, 3), 40 * (i % 2), np.uint8), i % 2) for i in range(16)]
    for arm in ("none", "mixtrain"):
        arms.train_arm(s, arm, 3, train, None, 2, log=lambda *a, **k: None)
    assert sorted(os.listdir(tmp_path)) == ["mixtrain-seed3", "none-seed3"]
    mixed = _scalars(str(tmp_path / "mixtrain-seed3"))
    assert {"mixed_share", "speedup_bound", "plan_seconds", "loss_single_q50"} <= set(mixed)
    assert mixed["mixed_share"][-1][1] > 0
    assert _scalars(str(tmp_path / "none-seed3"))["mixed_share"] == [(0, 0.0), (1, 0.0)]
