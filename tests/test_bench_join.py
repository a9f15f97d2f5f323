"""Joining the seeds of one run split across processes (bench/speedup/join.py)."""
import dataclasses
import json

import pytest

from mixpipe.bench.speedup.join import join, main
from mixpipe.bench.speedup.settings import SpeedupSettings

N = 100


def _run(policy, seed, top1, seconds=10.0, inputs=100):
    return {"policy": policy, "seed": seed, "train_seconds": seconds, "forward_inputs": inputs,
            "final_top1": top1, "epochs": [{"train_seconds": seconds, "forward_inputs": inputs,
                                            "top1": top1, "data_wait_seconds": 0.0}]}


def _part(seeds, **changes):
    s = SpeedupSettings(epochs=4, policies=("none", "mixtrain"), seeds=seeds, **changes)
    runs = [r for seed in seeds for r in (_run("none", seed, 0.90 + seed / 100, 40),
                                          _run("mixtrain", seed, 0.89 + seed / 50, 20, 60))]
    return {"settings": json.loads(json.dumps(dataclasses.asdict(s))), "runs": runs,
            "num_train": N, "num_eval": 50, "command": f"part {seeds}", "wall_seconds": 5.0}


def test_parts_join_into_one_run_of_every_seed(tmp_path):
    a, b = _part((0, 2)), _part((1,), progress=False)
    joined = join([a, b], ["a.json", "b.json"])
    assert list(joined["settings"]["seeds"]) == [0, 1, 2]
    assert [r["seed"] for r in joined["runs"]] == [0, 0, 1, 1, 2, 2]
    assert joined["wall_seconds"] == 10.0 and joined["commands"] == ["part (0, 2)", "part (1,)"]
    # the summary is over all three seeds: mixtrain - none, seed by seed, averaged
    deltas = [(0.89 + s / 50) - (0.90 + s / 100) for s in (0, 1, 2)]
    row = joined["summary"]["mixtrain"]
    got = row.get("delta_vs_none_mean", row.get("delta_vs_none"))
    assert got == pytest.approx(100 * sum(deltas) / 3, abs=1e-6)
    paths = []
    for name, payload in (("a", a), ("b", b)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(payload, f)
    out = str(tmp_path / "joined.json")
    assert main(paths + ["--out", out]) == 0
    assert (tmp_path / "joined.png").exists()


def test_parts_that_trained_differently_or_repeat_a_seed_are_refused():
    with pytest.raises(ValueError, match="trained differently.*lr"):
        join([_part((0,)), _part((1,), lr=0.05)], ["a", "b"])
    with pytest.raises(ValueError, match="seed 1 is in both"):
        join([_part((0, 1)), _part((1,))], ["a", "b"])
