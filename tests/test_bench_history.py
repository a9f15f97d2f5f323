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
    top1 = evaluate(model, EvalBatches(train, batch_size=16, size=32, crop_ratio=s.crop_ratio),
                    Normalize(channels_last=s.uses_channels_last()))
    assert summary["train_top1_single_view"] == pytest.approx(top1)
    assert np.isfinite(arrays["loss"]).all() and (arrays["loss"] >= 0).all()
    # the diagnosis: class shares per epoch (warm-up mixes nothing), stickiness between
    # consecutive epochs, and the eval split scored class by class
    shares = summary["class_mixed_share_per_epoch"]
    assert len(shares) == 4 and shares[0] == [0.0, 0.0]
    assert len(summary["stickiness_per_epoch"]) == 3
    assert summary["stickiness_per_epoch"][0]["stay_mixed"] is None  # nothing mixed before
    mixed_share = [1 - x for x in summary["single_share_per_epoch"]]
    assert [st["mixed"] for st in summary["stickiness_per_epoch"]] == pytest.approx(
        mixed_share[1:])
    _, scored, _ = load_data(s, log=lambda *a, **k: None)
    eval_top1 = evaluate(model, EvalBatches(scored, batch_size=16, size=32, crop_ratio=s.crop_ratio),
                         Normalize(channels_last=s.uses_channels_last()))
    assert summary["eval_top1"] == pytest.approx(eval_top1)
    assert np.mean(summary["eval_top1_per_class"]) == pytest.approx(eval_top1)  # 4 per class
    assert sum(summary["eval_prediction_share"]) == pytest.approx(1.0)
    gap = summary["view_gap"]
    assert gap is not None and gap["constituent_ratio"] is not None
    # grouping by another run's counts: the bands follow those counts, not this run's
    other = np.full(n, 4, np.int64)
    again, _, _ = watch_run(s, "none", 0, groups_from=other)
    assert again["groups"]["always_single"]["n"] == n
    assert again["epochs_single_histogram"][4] == n  # none: every sample single every epoch
