"""fit's named steps, each alone: epoch start, step, loss report, commit, evaluation, record."""
import numpy as np
import pytest
import torch

from mixpipe.core.plan import Layout, MixPlan
from mixpipe.core.source import FixedPlans
from mixpipe.server import InProcessService
from mixpipe.torch import MixedLoader
from mixpipe.train import EvalBatches, Normalize, adapt
from mixpipe.train.models import SmallResNet, SmallResNetSettings
from mixpipe.train.steps import (EpochStart, EpochTally, begin_epoch, close_epoch, epoch_record,
                                 history_totals, report_losses, reporting_service, set_lr,
                                 timed_evaluation, train_step)

N = 8


class Items:
    def __len__(self):
        return N

    def __getitem__(self, i):
        return np.full((16, 16, 3), 20 * i, np.uint8), i % 2


def halves_plan() -> MixPlan:
    return MixPlan.from_slots([([0, 1], [0.5, 0.5], Layout.HALVES)] +
                              [([i], [1.0], Layout.SINGLE) for i in range(2, N)], N).validate()


def loader(source=None) -> MixedLoader:
    return MixedLoader(Items(), source or FixedPlans(halves_plan()), 4, (16, 16), stride=8)


class CallLog:
    """A reporter stand-in that records what was called, in order."""

    def __init__(self):
        self.calls = []

    def add(self, epoch, ids, losses, scale):
        self.calls.append(("add", epoch, ids.tolist()))

    def flush(self):
        self.calls.append(("flush",))

    def end_epoch(self, epoch, commit=True):
        self.calls.append(("end_epoch", epoch, commit))


def net_and_optimizer():
    torch.manual_seed(0)
    net = adapt(SmallResNet(SmallResNetSettings(num_classes=2, width=4)), stride=8)
    return net, torch.optim.SGD(net.parameters(), lr=0.1)


EPOCH_KEYS = {"epoch", "steps", "train_seconds", "plan_seconds", "data_wait_seconds",
              "compute_seconds", "report_seconds", "forward_inputs", "constituents", "skipped",
              "speedup_bound", "layouts", "train_loss", "lr_end"}


def test_begin_epoch_fetches_the_plan_and_counts_its_batches():
    begun = begin_epoch(loader(), 3)
    assert begun.plan.epoch == 3 and begun.plan.num_slots == N - 1
    assert begun.steps == 2 and begun.plan_seconds >= 0.0


def test_set_lr_scales_every_group_from_its_base():
    params = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 1.0}])
    set_lr(opt, [0.1, 1.0], 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.5]


def test_train_step_moves_the_weights_and_returns_per_constituent_losses():
    net, opt = net_and_optimizer()
    batch = next(iter(loader()))
    before = [p.detach().clone() for p in net.parameters()]
    out = train_step(net, opt, batch, Normalize(), "cpu", "constituent")
    assert out.per_constituent.shape == batch.ids.shape
    assert bool(out.real[batch.ids >= 0].all()) and not bool(out.real[batch.ids < 0].any())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_report_losses_sends_the_batch_ids_and_does_nothing_without_a_reporter():
    net, opt = net_and_optimizer()
    batch = next(iter(loader()))
    out = train_step(net, opt, batch, Normalize(), "cpu", "constituent")
    log = CallLog()
    report_losses(log, 5, batch, out)
    assert log.calls == [("add", 5, batch.ids.tolist())]
    report_losses(None, 5, batch, out)  # no service: nothing to do, nothing raised


def test_close_epoch_flushes_before_it_commits():
    log = CallLog()
    seconds = close_epoch(log, 2, commit=False)
    assert log.calls == [("flush",), ("end_epoch", 2, False)] and seconds >= 0.0
    assert close_epoch(None, 2, commit=True) >= 0.0


def test_timed_evaluation_is_empty_without_batches_and_a_share_with_them():
    net, _ = net_and_optimizer()
    assert timed_evaluation(net, None, Normalize(), "cpu") == {}
    got = timed_evaluation(net, EvalBatches(Items(), batch_size=4), Normalize(), "cpu")
    assert set(got) == {"top1", "eval_seconds"} and 0.0 <= got["top1"] <= 1.0


def test_epoch_record_has_the_history_keys_and_the_plan_figures():
    plan = halves_plan()
    tally = EpochTally(steps=2, data_wait_seconds=0.25, compute_seconds=0.5, loss_sum=3.0,
                       loss_count=6)
    record = epoch_record(1, EpochStart(plan, 2, 0.125, 0.0), tally, 0.0625, 0.01)
    assert set(record) == EPOCH_KEYS
    assert record["forward_inputs"] == N - 1 and record["constituents"] == N
    assert record["layouts"] == {"SINGLE": N - 2, "HALVES": 1}
    assert record["train_loss"] == 0.5 and record["lr_end"] == 0.01
    assert record["speedup_bound"] == pytest.approx(N / (N - 1))
    totals = history_totals([record, dict(record, top1=0.75)])
    assert totals["forward_inputs"] == 2 * (N - 1) and totals["final_top1"] == 0.75


def test_the_reporting_service_is_the_loaders_source_only_when_it_takes_reports():
    service = InProcessService(N, policy="none", seed=0)
    assert reporting_service(loader(service)) is service
    assert reporting_service(loader(FixedPlans(halves_plan()))) is None


def test_normalize_gives_nchw_memory_for_a_loaders_nhwc_view():
    """FFCV's ToTorchImage() and MixLoader hand [B, C, H, W] views of NHWC memory; off
    channels_last, Normalize must not pass that layout on (torch 2.13's CPU conv backward
    crashes on it with 2+ threads and an odd batch)."""
    nhwc = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    view = nhwc.permute(0, 3, 1, 2)
    assert view.is_contiguous(memory_format=torch.channels_last) and not view.is_contiguous()
    out = Normalize()(view)
    assert out.is_contiguous()
    assert torch.equal(out, Normalize()(view.contiguous()))
    last = Normalize(channels_last=True)(view.contiguous())
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, out)
