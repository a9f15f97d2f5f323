"""No silent waits (issue 30): a rank whose plan waits for the other ranks says so, at growing
intervals, and the timeout names the missing ranks and what to do."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from mixpipe.server import InProcessService

LOGGER = "mixpipe.server.core"


def _waits(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_timeout_error_names_ranks_epoch_and_the_fix():
    svc = InProcessService(8, policy="none", wait=0.3)
    start = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        svc.plan(1, rank=0, world_size=3)
    assert time.monotonic() - start >= 0.3
    text = str(err.value)
    assert "\n" not in text
    assert "epoch 1" in text and "[1, 2]" in text and "epoch 0" in text
    assert "start the other ranks" in text and "world_size=1" in text


def test_wait_logs_at_growing_intervals_then_fails(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    svc = InProcessService(8, policy="none", wait=0.5, log_after=0.1)
    start = time.time()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1, 2\] of 3"):
        svc.plan(1, rank=0, world_size=3)
    lines = _waits(caplog)
    # the schedule: first at 0.1 s, then each delay doubled (0.2, 0.4); 0.8 is past the timeout
    assert 2 <= len(lines) <= 3, [r.getMessage() for r in lines]
    for k, record in enumerate(lines):
        assert record.created - start >= 0.1 * 2 ** k - 0.005
        message = record.getMessage()
        assert "\n" not in message
        assert "epoch 1" in message and "[1, 2]" in message and "rank 0 of 3" in message


def test_wait_ends_when_the_other_rank_arrives(caplog):
    """The log does not change the barrier: the plan comes once the last rank asks."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    svc = InProcessService(8, policy="none", wait=5.0, log_after=0.05)
    other = threading.Timer(0.3, svc.plan, args=(1,), kwargs={"rank": 1, "world_size": 2})
    other.start()
    try:
        shard = svc.plan(1, rank=0, world_size=2)
    finally:
        other.join()
    assert shard.equals(svc.plan(1).shard(0, 2))
    lines = _waits(caplog)
    assert lines and all("[1]" in r.getMessage() for r in lines)


def test_no_log_when_no_one_is_missing(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    svc = InProcessService(8, policy="none", wait=1.0, log_after=0.01)
    svc.end_epoch(0, 1, 2)
    svc.plan(1, rank=0, world_size=2)
    assert not _waits(caplog)


def test_defaults_are_thirty_minutes_and_ten_seconds():
    svc = InProcessService(4)
    assert svc.wait == 1800.0 and svc.log_after == 10.0
