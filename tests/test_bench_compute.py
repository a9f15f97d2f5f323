"""Accuracy against training compute across input sizes (bench/speedup/compute.py)."""
import dataclasses
import json

import pytest
import torch.nn as nn

from mixpipe.bench.speedup import arms, compute as compute_module
from mixpipe.bench.speedup.compute import compute, main, pass_flops
from mixpipe.bench.speedup.settings import SpeedupSettings


def _payload(runs, **settings):
    s = SpeedupSettings(**settings)
    return {"settings": json.loads(json.dumps(dataclasses.asdict(s))), "num_classes": 10,
            "runs": [{"policy": policy, "seed": seed, "forward_inputs": inputs,
                      "final_top1": top1} for policy, seed, inputs, top1 in runs]}


def test_a_pass_is_priced_by_counting_the_models_own_operations(monkeypatch):
    """One 3x3 convolution (4 filters on 3 channels, padded) and a 4 -> 5 classifier, counted
    by hand: the convolution's forward and weight gradient (no gradient for the input image),
    2·3·4·9 FLOPs per output pixel each, and the classifier's forward, weight and input
    gradients, 2·4·5 each."""
    def tiny(name, num_classes):
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, num_classes))

    monkeypatch.setattr(arms, "build_model", tiny)
    pass_flops.cache_clear()
    try:
        for size in (8, 16):
            assert pass_flops("hand-counted", size, 5) == 2 * (2 * 3 * 4 * 9) * size * size \
                + 3 * (2 * 4 * 5)
    finally:
        pass_flops.cache_clear()


def test_arms_are_priced_at_their_runs_size_and_seeds_gather_across_files():
    small = _payload([("none", 0, 1000, 0.93), ("budget", 0, 600, 0.92),
                      ("mixtrain", 0, 600, 0.92), ("none", 1, 1000, 0.94),
                      ("budget", 1, 600, 0.925), ("mixtrain", 1, 600, 0.92)],
                     seeds=(0, 1), policies=("none", "budget", "mixtrain"))
    large = [_payload([("budget", seed, 600, 0.92), ("mixtrain", seed, 600, 0.925)],
                      seeds=(seed,), policies=("budget", "mixtrain"), image_size=64)
             for seed in (0, 1)]
    result = compute([small] + large, ["small", "l0", "l1"])
    rows = {(r["arm"], r["image_size"]): r for r in result["rows"]}
    assert set(rows) == {("none", 32), ("budget", 32), ("mixtrain", 32), ("budget", 64),
                         ("mixtrain", 64)}
    at32, at64 = pass_flops("resnet-tiny", 32, 10), pass_flops("resnet-tiny", 64, 10)
    assert at64 / at32 == pytest.approx(4.0, rel=0.01)  # convolutions scale with the area
    mix64 = rows[("mixtrain", 64)]
    assert mix64["seeds"] == [0, 1] and mix64["sources"] == ["l0", "l1"]
    assert mix64["train_tflops"] == pytest.approx(600 * at64 / 1e12)
    assert mix64["final_top1_per_seed"] == pytest.approx({0: 92.5, 1: 92.5})
    assert rows[("budget", 32)]["final_top1"] == pytest.approx(92.25)
    # none at 32 px: more forward inputs than mixtrain at 64 px, less compute, more accuracy
    assert mix64["dominated_by"] == ["none (32 px, 10-epoch run)"]
    assert rows[("none", 32)]["dominated_by"] == []
    assert rows[("budget", 64)]["dominated_by"] == sorted([
        f"{arm} (32 px, 10-epoch run)" for arm in ("budget", "mixtrain", "none")] + [
        "mixtrain (64 px, 10-epoch run)"])  # the last: the same compute, more accuracy
    # at equal compute the more accurate arm dominates, the other way round not
    assert rows[("mixtrain", 32)]["dominated_by"] == ["budget (32 px, 10-epoch run)"]
    assert "mixtrain (32 px, 10-epoch run)" not in rows[("budget", 32)]["dominated_by"]
    assert rows[("budget", 32)]["compute_vs_cheapest"] == pytest.approx(1.0)
    assert [r["train_tflops"] for r in result["rows"]] == sorted(
        r["train_tflops"] for r in result["rows"])


def test_runs_that_cannot_be_priced_together_are_refused_naming_why():
    a = _payload([("mixtrain", 0, 600, 0.92)], seeds=(0,), policies=("mixtrain",))
    with pytest.raises(ValueError, match=r"seed 0 of mixtrain at 32 px and 10 epochs is in "
                                         r"both a and b: pass one of them"):
        compute([a, a], ["a", "b"])
    other = _payload([("mixtrain", 1, 600, 0.92)], seeds=(1,), policies=("mixtrain",),
                     fraction=0.9)
    with pytest.raises(ValueError, match=r"b and a both give mixtrain at 32 px and 10 epochs, "
                                         r"trained differently in fraction"):
        compute([a, other], ["a", "b"])
    test = _payload([("none", 0, 1000, 0.93)], seeds=(0,), policies=("none",),
                    eval_split="test")
    with pytest.raises(ValueError, match=r"b differs from a in eval_split"):
        compute([a, test], ["a", "b"])
    unknown = _payload([("none", 0, 1000, 0.93)], seeds=(0,), policies=("none",),
                       data="/data/imagenet")
    del unknown["num_classes"]
    with pytest.raises(ValueError, match="does not record its number of classes"):
        compute([unknown], ["a"])


def test_the_command_writes_json_and_png_and_names_a_bad_file(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_payload([("none", 0, 1000, 0.93), ("mixtrain", 0, 600, 0.92)],
                                        seeds=(0,), policies=("none", "mixtrain"))))
    out = tmp_path / "compute.json"
    assert main([str(path), "--out", str(out)]) == 0
    assert [r["arm"] for r in json.loads(out.read_text())["rows"]] == ["mixtrain", "none"]
    assert (tmp_path / "compute.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TFLOPs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "missing.json"), "--out", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read" in err and "missing.json" in err and "\n" not in err
    assert compute_module.__doc__  # the command's description comes from it
