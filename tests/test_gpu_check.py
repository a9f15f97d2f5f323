"""The GPU machine has no DALI, no FFCV and no pyzmq: mixpipe must import there, and
``scripts/gpu_check.py`` must run there and say in one line each what it skipped.

Both are proven here by hiding those libraries from import in a child process (a finder at the
front of ``sys.meta_path`` that refuses them), so the hidden state never leaks into other tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.py")
BLOCKED = ("nvidia.dali", "ffcv", "zmq")

#: installs the refusing finder; the code after it runs as if the libraries were not installed
BLOCKER = textwrap.dedent(f"""
    import importlib.abc
    import sys

    class _Hidden(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
                raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)")
            return None

    sys.meta_path.insert(0, _Hidden())
    """)


def _env(**extra: str) -> dict:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def hidden_python(tmp_path):
    """A command prefix: run a script with DALI, FFCV and pyzmq hidden (``PREFIX + [script,
    args...]``)."""
    wrapper = tmp_path / "hidden_run.py"
    wrapper.write_text(BLOCKER + textwrap.dedent("""
        import runpy
        script = sys.argv[1]
        sys.argv = sys.argv[1:]
        runpy.run_path(script, run_name="__main__")
        """))
    return [sys.executable, str(wrapper)]


def test_mixpipe_imports_with_dali_ffcv_and_pyzmq_hidden():
    code = BLOCKER + textwrap.dedent(f"""
        for name in {BLOCKED!r}:
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"{{name}} was not hidden")
        import mixpipe, mixpipe.core, mixpipe.torch, mixpipe.train
        from mixpipe.server import InProcessService
        assert InProcessService(4, "none").plan(0).num_slots == 4
        try:
            from mixpipe.server import connect  # the network client: needs pyzmq, on demand
        except ImportError:
            pass
        else:
            raise SystemExit("mixpipe.server.connect imported without pyzmq")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ffcv", "zmq")
                        or m.startswith("nvidia.dali"))
        assert not loaded, loaded
        print("imports ok")
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "imports ok"


def test_cpu_dry_run_passes_with_dali_ffcv_and_pyzmq_hidden(tmp_path, hidden_python):
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = subprocess.run(hidden_python + [SCRIPT, "--cpu-dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    checks = result["checks"]
    assert set(checks) == {"composites", "pooling_loss", "host_cost", "training", "dali", "ffcv"}
    assert result["passed"] and result["cpu_dry_run"] and not result["failed"]
    for name, check in checks.items():
        assert check["status"] in ("pass", "skip"), (name, check["summary"])
    for name, module in (("dali", "nvidia.dali"), ("ffcv", "ffcv")):
        assert checks[name]["status"] == "skip"
        assert f"{module} does not import" in checks[name]["summary"]
    lines = proc.stdout.splitlines()
    # one line per check, in the summary; a skip says why in that one line
    for name, check in checks.items():
        mine = [line for line in lines if line.startswith(f"gpu-check: {name} ")]
        assert mine == [f"gpu-check: {name} {check['status'].upper()}: {check['summary']}"]
    assert [line for line in lines if " SKIP: " in line] == [
        line for line in lines if line.startswith(("gpu-check: dali ", "gpu-check: ffcv "))]
    log = (out / "gpu_check.log").read_text()
    assert all(f"gpu-check: {name} " in log for name in checks)
    # the figures the GPU run reports are there, computed the same way
    assert checks["composites"]["details"]["loader_bit_exact_slots"] == \
        checks["composites"]["details"]["slots"]
    host = checks["host_cost"]["details"]["arms"]
    assert set(host) == {"plain", "mix 0%", "mix 50%", "mix 90%"}
    assert host["mix 90%"]["source_images_per_composite"] > host["mix 0%"][
        "source_images_per_composite"] == 1.0
    training = checks["training"]["details"]
    assert training["mixed_epochs"] and training["share_of_bound"] > 0
    for arm in ("none", "mixtrain"):
        assert training["arms"][arm]["step_data_wait_share"]["n"] > 0
        assert 0 < training["arms"][arm]["device_busy_share"] <= 1
    assert result["wall_seconds"] <= 60, result["wall_seconds"]  # issue 31: <= 60 s here
    assert elapsed < 120


def test_without_cuda_one_line_and_exit_zero_unless_a_gpu_is_required(tmp_path):
    env = _env(CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "out"
    for flag, code in (([], 0), (["--require-gpu"], 1)):
        proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out)] + flag,
                              capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
        assert proc.returncode == code, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines() == [
            "gpu-check: no GPU (torch.cuda.is_available() is False); nothing to check on this "
            "machine (--cpu-dry-run runs the same checks on the CPU at a tiny size)"]
    assert not out.exists()
