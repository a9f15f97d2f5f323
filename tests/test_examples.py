"""The training-loop examples in examples/ run as scripts on a prepared directory and really mix.

Each example is run the way its docstring tells a user to, as a subprocess, on a tiny tree of
photo-like images prepared by ``prepare_tree``: an example that only imports, or whose loop
never composes a mixed input or never reports its losses, must fail here, not in a user's hands.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from typing import List, Tuple

import pytest

from mixpipe.data import find_prepared, prepare_tree
from mixpipe.data.synthetic import TreeSpec, make_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 2  # one warm-up epoch (every image alone), then one mixed epoch

#: "epoch 2/2: 15 forward inputs, 7 composites holding 28 samples; val top-1 0.3333"
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): (\d+) forward inputs, (\d+) composites holding "
                        r"(\d+) samples; (\w+) top-1 ([0-9.]+)$", re.M)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    """Three classes of a dozen training images each, 32-48 px (so every loader must resize),
    with the default validation hold-out; a .beton only where FFCV can write one."""
    base = tmp_path_factory.mktemp("examples")
    tree = make_tree(str(base / "src"), TreeSpec(classes=3, train_per_class=12, val_per_class=4,
                                                 sides=(32, 48), seed=1))
    beton = importlib.util.find_spec("ffcv") is not None
    prepare_tree(tree.root, str(base / "out"), beton=beton, workers=1, log=lambda _: None)
    return str(base / "out")


def run_example(name: str, data: str, workers: int) -> str:
    """The example's stdout after a short CPU run; any non-zero exit fails with its stderr."""
    script = os.path.join(REPO, "examples", f"train_{name}.py")
    cmd = [sys.executable, script, "--data", data, "--epochs", str(EPOCHS), "--batch-size", "8",
           "--device", "cpu", "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, f"{name} example failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def epochs_of(stdout: str) -> List[Tuple[int, int, int, str, float]]:
    """(forward inputs, composites, samples in composites, split, top-1) per epoch line."""
    rows = [(int(m[3]), int(m[4]), int(m[5]), m[6], float(m[7]))
            for m in EPOCH_LINE.finditer(stdout)]
    assert len(rows) == EPOCHS, stdout
    return rows


def check_mixed_run(stdout: str, data: str) -> None:
    n = find_prepared(data).samples["train"]
    (warm_inputs, warm_mixed, _, _, _), (inputs, composites, held, split, top1) = \
        epochs_of(stdout)
    assert warm_inputs == n and warm_mixed == 0  # nothing reported yet: every image alone
    # after the warm-up the service composes the easy samples, K > 1 per composite, so the
    # epoch covers all n samples with fewer forward inputs
    assert composites > 0 and held >= 2 * composites
    assert inputs == n - held + composites < n
    assert split == "val" and 0.0 <= top1 <= 1.0  # scored on the held-out images
    # every training sample's loss reached the service's ledger
    assert f"service: losses of {n} of {n} samples reported" in stdout


def test_torch_example_mixes_reports_and_evaluates(prepared):
    check_mixed_run(run_example("torch", prepared, workers=0), prepared)


def test_dali_example_mixes_reports_and_evaluates(prepared):
    pytest.importorskip("nvidia.dali")
    check_mixed_run(run_example("dali", prepared, workers=0), prepared)


def test_ffcv_example_mixes_reports_and_evaluates(prepared):
    pytest.importorskip("ffcv")
    check_mixed_run(run_example("ffcv", prepared, workers=1), prepared)
