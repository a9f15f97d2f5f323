"""The loss reporter: everything real delivered once, padding never, errors surfaced at flush."""
import threading

import numpy as np
import pytest
import torch

from mixpipe.train import LossReporter, ReportError


class FakeService:
    """Records reports; optionally refuses one, or blocks until released."""

    def __init__(self, fail_on_call=None, gate=None):
        self.reports = []
        self.commits = []
        self.fail_on_call = fail_on_call
        self.gate = gate
        self.threads = set()

    def report(self, epoch, ids, losses, rank=0):
        self.threads.add(threading.get_ident())
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if self.fail_on_call is not None and len(self.reports) == self.fail_on_call:
            self.reports.append(None)
            raise ValueError("id 99 out of range [0, 10)")
        assert ids.dtype == np.int64 and losses.dtype == np.float32
        self.reports.append((epoch, ids.copy(), losses.copy(), rank))

    def commit(self, epoch):
        self.commits.append(epoch)


def _batches(rng, n_batches, b=5):
    for _ in range(n_batches):
        ids = torch.from_numpy(rng.integers(0, 1000, size=(b, 2)))
        losses = torch.from_numpy(rng.random((b, 2)).astype(np.float32))
        scale = torch.from_numpy(rng.choice([0.0, 1.0, 2.0], size=(b, 2)).astype(np.float32))
        ids[0, 1] = -1  # a slot with one constituent
        yield ids, losses, scale


def test_reports_every_real_constituent_once_and_no_padding():
    rng = np.random.default_rng(0)
    service = FakeService()
    want_ids, want_losses = [], []
    with LossReporter(service, rank=3, chunk=7) as reporter:
        for ids, losses, scale in _batches(rng, 9):
            keep = (ids >= 0) & (scale > 0)
            want_ids.append(ids[keep].numpy())
            want_losses.append(losses[keep].numpy())
            reporter.add(4, ids, losses, scale)
        reporter.end_epoch(4)
    assert service.commits == [4]
    assert threading.get_ident() not in service.threads  # reports ran off the training thread
    assert len(service.reports) > 1  # chunked, not one report per epoch
    got_ids = np.concatenate([r[1] for r in service.reports])
    got_losses = np.concatenate([r[2] for r in service.reports])
    np.testing.assert_array_equal(got_ids, np.concatenate(want_ids))
    np.testing.assert_array_equal(got_losses, np.concatenate(want_losses))
    assert {r[0] for r in service.reports} == {4} and {r[3] for r in service.reports} == {3}


def test_caller_may_reuse_its_buffers():
    gate = threading.Event()
    service = FakeService(gate=gate)
    reporter = LossReporter(service, chunk=1)
    ids = torch.tensor([[1, 2]])
    losses = torch.tensor([[0.5, 0.25]])
    reporter.add(0, ids, losses)
    ids.fill_(7)  # the trainer overwrites its buffer while the report is still queued
    losses.fill_(9.0)
    gate.set()
    reporter.end_epoch(0)
    reporter.close()
    np.testing.assert_array_equal(service.reports[0][1], [1, 2])
    np.testing.assert_array_equal(service.reports[0][2], [0.5, 0.25])


def test_a_refused_report_surfaces_at_flush_not_in_the_step():
    service = FakeService(fail_on_call=0)
    reporter = LossReporter(service, chunk=1)
    reporter.add(0, torch.tensor([[99]]), torch.tensor([[1.0]]))  # the step itself does not raise
    with pytest.raises(ReportError, match="out of range") as info:
        reporter.end_epoch(0)
    assert isinstance(info.value.__cause__, ValueError)
    assert service.commits == []  # a failed epoch is not committed
    reporter.add(1, torch.tensor([[1]]), torch.tensor([[1.0]]))
    reporter.end_epoch(1)  # the error was raised once; later reports go through
    assert service.commits == [1]
    reporter.close()


def test_mixing_epochs_and_bad_arguments_are_refused():
    reporter = LossReporter(FakeService())
    reporter.add(0, torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="end_epoch"):
        reporter.add(1, torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same shape"):
        reporter.add(0, torch.tensor([1, 2]), torch.tensor([1.0]))
    reporter.close()
    with pytest.raises(ValueError, match="chunk"):
        LossReporter(FakeService(), chunk=0)
