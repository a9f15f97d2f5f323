"""The ImageNet path, scaled down: a class-folder tree of varied-size JPEGs with a few bad files
and an empty class folder goes through ``prepare`` (refused, then accepted with ``--on-bad
skip``) and through ``bench speedup --image-size 64`` on each of the three loaders."""
from __future__ import annotations

import json

import pytest

from mixpipe.cli import main
from mixpipe.data.synthetic import TreeSpec, make_tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    work = tmp_path_factory.mktemp("tree")
    tree = make_tree(str(work / "src"), TreeSpec(classes=2, train_per_class=12, val_per_class=3,
                                                 sides=(60, 200), corrupt=2, empty_classes=1))
    out = str(work / "out")
    base = ["data", "prepare", "tree", "--src", tree.root, "--out", out, "--beton",
            "--workers", "1", "--allow-empty-classes"]
    assert main(base) == 2  # the bad files are named and nothing usable is left
    assert main(base + ["--on-bad", "skip"]) == 0
    return out


@pytest.mark.parametrize("loader", ["torch", "dali", "ffcv"])
def test_speedup_runs_at_64_px_on_every_loader(prepared, loader, tmp_path):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    if loader == "ffcv":
        pytest.importorskip("ffcv")
    out = tmp_path / "s.json"
    assert main(["bench", "speedup", "--data", prepared, "--loader", loader, "--epochs", "2",
                 "--policies", "none,budget,mixtrain", "--seeds", "0", "--image-size", "64",
                 "--batch-size", "8", "--workers", "0" if loader == "dali" else "1",
                 "--no-progress", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    summary = payload["summary"]
    assert set(summary) == {"none", "budget", "mixtrain"}
    n = payload["num_train"]
    assert summary["none"]["forward_inputs"] == 2 * n
    # budget trains mixtrain's forward inputs, to the sample
    assert summary["budget"]["forward_inputs"] == summary["mixtrain"]["forward_inputs"] < 2 * n
    assert payload["eval_split"] == "val" and payload["num_eval"] >= 2
    assert payload["settings"]["channels_last"] == "auto"  # off on the CPU at 64 px
