"""The watched run (mixpipe.bench.speedup.history) on a small class-folder tree."""
from __future__ import annotations

import numpy as np
import pytest

from mixpipe.bench.speedup.history import watch_run
from mixpipe.bench.speedup.settings import SpeedupSettings
from mixpipe.cli import main
from mixpipe.data.synthetic import TreeSpec, make_tree
from mixpipe.train import EvalBatches, Normalize
from mixpipe.train.evaluate import evaluate

pytestmark = pytest.mark.slow


def test_watched_run_counts_single_epochs_and_scores_every_training_image(tmp_path):
    tree = make_tree(str(tmp_path / "src"), TreeSpec(classes=2, train_per_class=24,
                                                     val_per_class=4, sides=(40, 40)))
    out = str(tmp_path / "prepared")
    assert main(["data", "prepare", "tree", "--src", tree.root, "--out", out,
                 "--workers", "1"]) == 0
    s = SpeedupSettings(data=out, loader="torch", epochs=4, seeds=(0,), policies=("mixtrain",),
                        image_size=32, batch_size=8, workers=0, progress=False)
    summary, arrays, model = watch_run(s, "mixtrain", 0)
    n = arrays["single_epochs"].size
    assert summary["epochs"] == 4
    assert sum(summary["epochs_single_histogram"]) == n
    assert summary["single_share_per_epoch"][0] == 1.0  # warm-up: all single
    assert min(summary["single_share_per_epoch"][1:]) < 1.0  # then some mixed
    assert sum(g["n"] for g in summary["groups"].values()) == n  # the bands partition the data
    assert (arrays["single_epochs"] >= 1).all() and (arrays["single_epochs"] <= 4).all()
    # the single-view scores: an independent evaluate() of the same model on the same images
    from mixpipe.bench.speedup.data import load_data

    train, _, _ = load_data(s, log=lambda *a, **k: None)
    top1 = evaluate(model, EvalBatches(train, batch_size=16, size=32),
                    Normalize(channels_last=s.uses_channels_last()))
    assert summary["train_top1_single_view"] == pytest.approx(top1)
    assert np.isfinite(arrays["loss"]).all() and (arrays["loss"] >= 0).all()
    # grouping by another run's counts: the bands follow those counts, not this run's
    other = np.full(n, 4, np.int64)
    again, _, _ = watch_run(s, "none", 0, groups_from=other)
    assert again["groups"]["always_single"]["n"] == n
    assert again["epochs_single_histogram"][4] == n  # none: every sample single every epoch
