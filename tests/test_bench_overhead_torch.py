"""``mixpipe bench overhead --loader torch`` at a toy size: the JSON's shape, not its timings."""
from __future__ import annotations

import json
import math
import sys

from mixpipe.bench.overhead_dali import generate_tree
from mixpipe.cli import main


def test_torch_arm_writes_three_mixes_with_positive_ratios(tmp_path, monkeypatch) -> None:
    small = generate_tree(str(tmp_path / "small"), 12, sides=(28, 36), progress=False)
    out = tmp_path / "overhead_torch.json"
    argv = ["bench", "overhead", "--loader", "torch", "--quick", "--sizes", "224,32",
            "--num-generated", "6", "--num-fashion", "12", "--batch-size", "2",
            "--repeats", "1", "--workers", "1", "--fashion", small, "--out", str(out),
            "--no-progress"]
    monkeypatch.setattr(sys, "argv", ["mixpipe"] + argv)  # the dispatcher reads --loader here
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "overhead_torch"
    assert result["command"].startswith("mixpipe bench overhead --loader torch")
    assert set(result["datasets"]) == {"generated_224px", "fashion_mnist_32px"}
    for name, data in result["datasets"].items():
        arms = data["arms"]
        assert set(arms) == {"plain", "mix 0%", "mix 50%", "mix 90%"}
        for arm, stats in arms.items():
            for key in ("cpu_per_image_vs_plain", "cpu_per_image_vs_mix0",
                        "throughput_vs_plain", "cpu_s_per_source_image"):
                assert math.isfinite(stats[key]) and stats[key] > 0, (name, arm, key)
            assert len(stats["runs"]) == 1
            assert len(stats["runs"][0]["load_average"]) == 3
            assert stats["load_average_1min_median"] >= 0
        assert arms["plain"]["source_images_per_composite"] == 1.0
        ratios = result["targets"][name]
        (target,) = ratios.values()
        assert set(target["ratios"]) == {"mix 0%", "mix 50%", "mix 90%"}
    assert len(result["load_average_before_after"]) == 2
