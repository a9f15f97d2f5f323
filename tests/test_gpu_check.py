"""``make gpu-check`` on a machine without CUDA exits at once with a clear line, and its steps
run (CPU-only, small) so the script is known to work before the first GPU machine tries it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.py")


@pytest.mark.slow
def test_no_gpu_exits_at_once_with_one_line(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "g.json")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [
        "gpu-check: no GPU (torch.cuda.is_available() is False); nothing to check on this "
        "machine"]
    assert time.perf_counter() - start < 60 and not (tmp_path / "g.json").exists()


@pytest.mark.slow
def test_cpu_dry_run_writes_the_json(tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "g.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu-dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] and result["cpu_dry_run"]
    assert result["reference"]["met"] and result["reference"]["mean_abs_diff_worst_slot"] < 1
    assert result["throughput"]["composites_per_s"] > 0
    assert result["throughput"]["cpu_s_per_source_image"]["plain"] > 0
    assert result["training"]["steps"] == 2 and result["training"]["finite"]
