"""Joining a later run's mixing arms with an earlier run's plain arms (bench/speedup/combine.py)."""
import dataclasses
import json

import pytest

from mixpipe.bench.speedup.combine import combine, main
from mixpipe.bench.speedup.settings import SpeedupSettings, budget_epochs

N = 100


def _run(policy, seed, top1, seconds=10.0, inputs=100, epochs_of_data=None):
    run = {"policy": policy, "seed": seed, "train_seconds": seconds, "forward_inputs": inputs,
           "final_top1": top1, "epochs": [
               {"train_seconds": seconds, "forward_inputs": inputs, "top1": top1,
                "data_wait_seconds": 0.0}]}
    if epochs_of_data is not None:
        run["epochs_of_data"] = epochs_of_data
    return run


def _payload(s, runs):
    return {"settings": json.loads(json.dumps(dataclasses.asdict(s))), "runs": runs,
            "num_train": N, "num_eval": 50, "command": "x"}


def _pair(**mixing_changes):
    old = SpeedupSettings(epochs=4, policies=("none", "budget", "mixtrain"), seeds=(0, 1),
                          split_norms=False)
    new = dataclasses.replace(old, policies=("random", "mixtrain"), split_norms=True,
                              **mixing_changes)
    inputs = round(budget_epochs(old, N) * N)  # mixtrain's, so budget's too
    b = inputs / N
    plain = _payload(old, [_run("none", 0, 0.90, 40), _run("budget", 0, 0.88, 25, inputs, b),
                           _run("mixtrain", 0, 0.10),  # the old method: must be dropped
                           _run("none", 1, 0.91, 40), _run("budget", 1, 0.87, 25, inputs, b)])
    mixing = _payload(new, [_run("random", 0, 0.85, 20, inputs), _run("mixtrain", 0, 0.89, 20, inputs),
                            _run("random", 1, 0.84, 20, inputs), _run("mixtrain", 1, 0.86, 20, inputs)])
    return plain, mixing


def test_new_mixing_arms_are_scored_seed_by_seed_against_the_old_plain_arms():
    joined = combine(*_pair(), sources=["a.json", "b.json"])
    mix = joined["summary"]["mixtrain"]
    assert mix["final_top1_per_seed"] == {0: 0.89, 1: 0.86}  # the new run's, not the old 0.10
    assert mix["delta_vs_budget_per_seed"] == pytest.approx({0: 1.0, 1: -1.0})
    assert mix["delta_vs_none_per_seed"] == pytest.approx({0: -1.0, 1: -5.0})
    assert mix["speedup_per_seed"] == pytest.approx({0: 2.0, 1: 2.0})
    assert joined["targets"]["mixtrain_beats_random"]["seeds_won"] == 2
    assert list(joined["settings"]["policies"]) == ["none", "budget", "random", "mixtrain"]
    assert joined["joined_from"] == ["a.json", "b.json"] and "across runs" in joined["timing_note"]


def test_runs_that_trained_differently_are_refused_with_the_fix():
    plain, mixing = _pair(lr=0.05)
    with pytest.raises(ValueError, match=r"lr \(0.1 vs 0.05\).*re-run the plain arms"):
        combine(plain, mixing)


def test_a_budget_matched_to_another_schedule_is_refused():
    plain, mixing = _pair()
    for r in plain["runs"]:
        if r["policy"] == "budget":
            r["epochs_of_data"] += 0.5
    with pytest.raises(ValueError, match="re-run budget"):
        combine(plain, mixing)


def test_a_budget_matched_to_another_arm_needs_that_arm_in_the_mixing_run():
    plain, mixing = _pair(budget_match="random")
    plain["settings"]["budget_match"] = "random"
    joined = combine(plain, mixing)  # random trained the budget's inputs in both seeds
    assert joined["summary"]["random"]["delta_vs_budget_per_seed"] == pytest.approx(
        {0: -3.0, 1: -3.0})
    mixing["runs"] = [r for r in mixing["runs"] if r["policy"] != "random"]
    with pytest.raises(ValueError, match="did not train in seed 0"):
        combine(plain, mixing)


def test_mixing_seeds_without_plain_arms_are_refused():
    plain, mixing = _pair()
    mixing["runs"].append(_run("mixtrain", 7, 0.9))  # no plain arms in seed 7
    with pytest.raises(ValueError, match=r"seeds \[7\]"):
        combine(plain, mixing)


def test_the_command_writes_json_and_png_and_refuses_in_one_line(tmp_path, capsys):
    plain, mixing = _pair()
    paths = []
    for name, payload in (("p.json", plain), ("m.json", mixing)):
        (tmp_path / name).write_text(json.dumps(payload))
        paths.append(str(tmp_path / name))
    out = tmp_path / "j.json"
    assert main(paths + ["--out", str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["mixtrain"]["runs"] == 2
    assert (tmp_path / "j.png").stat().st_size > 0
    with pytest.raises(SystemExit) as done:
        main([paths[1], paths[0], "--out", str(out)])  # swapped: no plain arms first
    assert done.value.code == 2
    assert "must hold plain arms" in capsys.readouterr().err
    (tmp_path / "cut.json").write_text(json.dumps(plain)[:100])  # a run killed while writing
    with pytest.raises(SystemExit) as done:
        main([str(tmp_path / "cut.json"), paths[1], "--out", str(out)])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read" in err and "cut.json" in err and "\n" not in err


def test_an_older_record_without_newer_settings_joins_with_their_defaults():
    plain, mixing = _pair()
    for key in ("recalibrate", "budget_match", "split_norms"):  # not recorded back then
        del plain["settings"][key]
    plain["settings"]["channels_last"] = mixing["settings"]["channels_last"] == "auto"
    mixing["settings"]["channels_last"] = "auto"
    joined = combine(plain, mixing)
    assert joined["summary"]["mixtrain"]["runs"] == 2
    plain["settings"]["recalibrate"] = 64  # but a recorded difference still counts
    with pytest.raises(ValueError, match="recalibrate"):
        combine(plain, mixing)
