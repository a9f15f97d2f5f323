"""Training at the image sizes a model accepts, not just 32 px.

torch 2.13's CPU backward of a 1x1 stride-2 convolution in channels_last kills the process
(exit 139) from 48 px up, so the memory format is chosen per device and size. The runs go in a
subprocess: a crash there fails the test instead of taking pytest down with it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mixpipe.train.evaluate import channels_last_runs


def test_channels_last_is_chosen_only_where_it_runs():
    assert channels_last_runs("cpu", 32) is True  # 1.3-1.6x faster there
    assert channels_last_runs("cpu", 48) is False
    assert channels_last_runs(torch.device("cpu"), 224) is False
    assert channels_last_runs(None, 64) is False
    assert channels_last_runs("cuda", 224) is True
    assert channels_last_runs("cuda:1", 32) is True


_FIT_ON_A_TREE = textwrap.dedent("""
    import sys
    import torch
    from mixpipe.data import FileListDataset, prepare_tree
    from mixpipe.data.synthetic import TreeSpec, make_tree
    from mixpipe.server import InProcessService
    from mixpipe.torch import MixedLoader
    from mixpipe.train import EvalBatches, Normalize, build_model, fit
    from mixpipe.train.evaluate import channels_last_runs

    size, workdir = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    tree = make_tree(workdir + "/src", TreeSpec(classes=2, train_per_class=4, val_per_class=2,
                                                sides=(60, 300), seed=size))
    prepare_tree(tree.root, workdir + "/out", workers=1, log=lambda _: None)
    train = FileListDataset(workdir + "/out", "train")
    val = FileListDataset(workdir + "/out", "val")
    service = InProcessService(len(train), {"policy": "random", "fraction": 0.5,
                                            "layout": "halves", "grid_cells": size // 16}, seed=0)
    loader = MixedLoader(train, service, 4, size=(size, size), stride=16, seed=0)
    model = build_model("resnet-tiny", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    prepare = Normalize(channels_last=channels_last_runs("cpu", size))
    history = fit(model, loader, opt, epochs=2, eval_loader=EvalBatches(val, 4, size=size),
                  prepare=prepare, stride=16, progress=False)
    print("top1", [e["top1"] for e in history["epochs"]])
""")


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 128])
def test_fit_on_a_tree_at(size, tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(_FIT_ON_A_TREE)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, str(script), str(size), str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": repo})
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("top1")
