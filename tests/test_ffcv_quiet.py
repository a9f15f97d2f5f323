"""Several FFCV loaders in one process (one per benchmark arm) finish without numba's
``Exception ignored ... KeyError`` tracebacks, which used to appear once per finished loader."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RUN = textwrap.dedent("""
    import sys
    from mixpipe.cli import main
    from mixpipe.data import prepare_tree
    from mixpipe.data.synthetic import TreeSpec, make_tree

    work = sys.argv[1]
    tree = make_tree(work + "/src", TreeSpec(classes=2, train_per_class=16, val_per_class=4,
                                             sides=(40, 120)))
    prepare_tree(tree.root, work + "/out", beton=True, workers=1, log=lambda _: None)
    sys.exit(main(["bench", "speedup", "--data", work + "/out", "--loader", "ffcv",
                   "--epochs", "2", "--policies", "none,random,mixtrain", "--seeds", "0",
                   "--image-size", "32", "--batch-size", "8", "--no-progress",
                   "--out", work + "/s.json"]))
""")


@pytest.mark.slow
def test_three_ffcv_arms_print_no_numba_tracebacks(tmp_path):
    pytest.importorskip("ffcv")
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    assert "KeyError" not in proc.stderr
