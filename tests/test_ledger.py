"""The loss ledger: update rules against a plain-Python model, refusals, persistence."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixpipe.core.ledger import Ledger, LedgerFormatError


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 19), st.floats(0, 50, width=32)), max_size=30),
                max_size=5),
       st.sampled_from([0.0, 0.5, 0.9]))
def test_update_matches_a_plain_python_model(epochs, decay) -> None:
    ledger = Ledger(20, ema_decay=decay)
    model = {}  # id -> [last, ema, last_epoch, count]
    for epoch, reports in enumerate(epochs):
        ids = np.array([i for i, _ in reports], np.int64)
        losses = np.array([l for _, l in reports], np.float32)
        ledger.update(epoch, ids, losses)
        final = {}
        for i, l in reports:  # last occurrence in a report wins
            final[i] = float(np.float32(l))
        for i, l in final.items():
            if i in model:
                last, ema, _, count = model[i]
                model[i] = [l, decay * ema + (1 - decay) * l, epoch, count + 1]
            else:
                model[i] = [l, l, epoch, 1]
    for i in range(20):
        if i not in model:
            assert ledger.count[i] == 0 and ledger.last_epoch[i] == -1
            assert np.isnan(ledger.last_loss[i]) and np.isnan(ledger.ema[i])
        else:
            last, ema, epoch, count = model[i]
            assert ledger.last_loss[i] == np.float32(last)
            assert ledger.ema[i] == pytest.approx(ema, rel=1e-5, abs=1e-5)
            assert (ledger.last_epoch[i], ledger.count[i]) == (epoch, count)


@pytest.mark.parametrize("ids, losses, error, message", [
    (np.array([0, 5]), np.array([1.0, 2.0], np.float32), ValueError, r"id 5 out of range \[0, 5\)"),
    (np.array([-1]), np.array([1.0], np.float32), ValueError, r"id -1 out of range"),
    (np.array([0, 1]), np.array([1.0, np.nan], np.float32), ValueError, "id 1 is not finite"),
    (np.array([0, 1]), np.array([np.inf, 1.0], np.float32), ValueError, "id 0 is not finite"),
    (np.array([0, 1]), np.array([1.0], np.float32), ValueError, "length mismatch"),
    (np.array([0.0, 1.0]), np.array([1.0, 1.0], np.float32), TypeError, "integer array"),
    (np.array([0, 1]), np.array([1, 1]), TypeError, "float array"),
    (np.array([[0, 1]]), np.array([[1.0, 1.0]], np.float32), ValueError, "1-D"),
    (np.array([0, 1]), np.array([1.0, -2.0], np.float32), ValueError, "negative"),
])
def test_bad_reports_are_refused_and_change_nothing(ids, losses, error, message) -> None:
    ledger = Ledger(5)
    ledger.update(0, np.array([0, 1, 2]), np.array([0.1, 0.2, 0.3], np.float32))
    before = ledger.to_bytes()
    with pytest.raises(error, match=message):
        ledger.update(1, ids, losses)
    assert ledger.to_bytes() == before


def test_save_load_round_trip_and_atomic_replace(tmp_path) -> None:
    path = tmp_path / "ledger.bin"
    ledger = Ledger(1000, ema_decay=0.8)
    rng = np.random.default_rng(0)
    ledger.update(0, rng.permutation(1000)[:600], rng.random(600).astype(np.float32))
    ledger.committed_epoch = 0
    ledger.save(path)
    back = Ledger.load(path)
    assert back.to_bytes() == ledger.to_bytes() and back.committed_epoch == 0
    ledger.update(1, np.arange(10), np.ones(10, np.float32))
    ledger.save(path)
    assert Ledger.load(path).to_bytes() == ledger.to_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.bin"]  # no temp file left


def test_corrupt_files_are_refused(tmp_path) -> None:
    data = Ledger(50).to_bytes()
    with pytest.raises(LedgerFormatError, match="truncated"):
        Ledger.from_bytes(data[:-3])
    with pytest.raises(LedgerFormatError, match="not a mixpipe ledger"):
        Ledger.from_bytes(b"X" * len(data))
    bad = bytearray(data)
    bad[-10] ^= 1
    with pytest.raises(LedgerFormatError, match="checksum"):
        Ledger.from_bytes(bytes(bad))


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ledger.bin"
    Ledger(10).save(path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        Ledger(20).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.bin"]


def test_memory_per_sample_and_snapshot_is_frozen() -> None:
    ledger = Ledger(100_000)
    assert ledger.nbytes / ledger.num_samples <= 24
    snap = ledger.snapshot()
    with pytest.raises(ValueError):
        snap.ema[0] = 1.0
    ledger.update(0, np.array([3]), np.array([2.0], np.float32))
    assert snap.count[3] == 0 and ledger.snapshot().count[3] == 1


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        Ledger(3, ema_decay=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        Ledger(-1)


def test_copy_is_equal_and_independent() -> None:
    ledger = Ledger(50, ema_decay=0.6)
    ledger.update(0, np.arange(10), np.linspace(0, 1, 10, dtype=np.float32))
    ledger.committed_epoch = 0
    clone = ledger.copy()
    assert clone.to_bytes() == ledger.to_bytes()
    clone.update(1, np.arange(5), np.ones(5, np.float32))
    clone.committed_epoch = 1
    assert ledger.count[:5].tolist() == [1] * 5 and ledger.committed_epoch == 0
