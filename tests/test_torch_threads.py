"""MixedLoader's workers run numpy's BLAS on one thread, and a user's worker_init_fn still runs.

The probe asks OpenBLAS itself (its ``get_num_threads``) inside a forked worker; before the
limit, a worker inherited one BLAS thread per core from the parent (issue 32).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mixpipe.core.compose import compose_slot
from mixpipe.core.plan import Layout
from mixpipe.torch import FixedPlans, MixedLoader, blas_threads
from mixpipe.torch.threads import WorkerInit

from test_torch_loader import IdColouredImages, random_plan

pytestmark = pytest.mark.skipif(not blas_threads(), reason="no OpenBLAS loaded with numpy")


class ProbedImages(IdColouredImages):
    """Each image's label is the BLAS thread count of the worker that fetched it, and (when
    the user's worker_init_fn ran there) its marker is added as 1000."""

    def __getitem__(self, i: int):
        image, _ = super().__getitem__(i)
        threads = max(blas_threads().values())
        marked = 1000 if os.environ.get("MIXPIPE_TEST_USER_INIT") == "ran" else 0
        return image, threads + marked


def _user_init(worker_id: int) -> None:
    os.environ["MIXPIPE_TEST_USER_INIT"] = "ran"


def _worker_labels(worker_init_fn=None) -> set:
    n = 24
    loader = MixedLoader(ProbedImages(n), FixedPlans(random_plan(n, 0)), batch_size=4,
                         size=(16, 16), num_workers=2,
                         **({} if worker_init_fn is None else {"worker_init_fn": worker_init_fn}))
    loader.set_epoch(0)
    labels = torch.cat([b.targets[b.targets >= 0] for b in loader])
    return set(labels.tolist())


def test_workers_run_one_blas_thread() -> None:
    assert _worker_labels() == {1}


def test_user_worker_init_fn_still_runs_after_the_limit() -> None:
    assert _worker_labels(_user_init) == {1001}


def test_limit_in_a_forked_process_leaves_the_parent_alone() -> None:
    before = blas_threads()
    pid = os.fork()
    if pid == 0:  # child: limit, then report through the exit status
        WorkerInit()(0)
        os._exit(max(blas_threads().values()))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    assert blas_threads() == before


def test_composites_unchanged_with_workers() -> None:
    """Bit-exact against the core composer through two limited workers."""
    n = 24
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (int(rng.integers(18, 40)), int(rng.integers(18, 40)), 3),
                           dtype=np.uint8) for _ in range(n)]
    base = [(image, i) for i, image in enumerate(images)]
    plan = random_plan(n, 3)
    loader = MixedLoader(base, FixedPlans(plan), batch_size=5, size=(16, 16), stride=4,
                         num_workers=2, shuffle=False)
    loader.set_epoch(0)
    for batch in loader:
        for b in range(batch.image.shape[0]):
            ids = [int(i) for i in batch.ids[b] if i >= 0]
            weights = [float(w) for w in batch.weights[b][:len(ids)]]
            ref = compose_slot([base[i][0] for i in ids], weights,
                               Layout(int(batch.layout[b])), (16, 16), 4)
            assert np.array_equal(batch.image[b].numpy(), np.moveaxis(ref, 2, 0))


def test_limited_blas_caps_inside_the_block_and_restores_after() -> None:
    from mixpipe.torch.threads import limited_blas

    before = blas_threads()
    env_before = os.environ.get("OPENBLAS_NUM_THREADS")
    with limited_blas(1):
        assert set(blas_threads().values()) == {1}
        assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
        pid = os.fork()
        if pid == 0:  # a worker forked in the block inherits the cap; WorkerInit keeps it
            WorkerInit()(0)
            os._exit(max(blas_threads().values()))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 1
    assert blas_threads() == before
    assert os.environ.get("OPENBLAS_NUM_THREADS") == env_before
