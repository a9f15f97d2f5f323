"""Mixtrain against budget by run length (bench/speedup/trend.py)."""
import dataclasses
import json
import statistics

import pytest

from mixpipe.bench.speedup.settings import SpeedupSettings
from mixpipe.bench.speedup.trend import main, trend


def _payload(runs, **settings):
    s = SpeedupSettings(policies=("budget", "mixtrain"), **settings)
    return {"settings": json.loads(json.dumps(dataclasses.asdict(s))), "runs": [
        {"policy": policy, "seed": seed, "final_top1": top1} for policy, seed, top1 in runs]}


def _grid():
    """Two run lengths of one model (one of them split over two files) and a second model."""
    return [
        _payload([("budget", 0, 0.90), ("mixtrain", 0, 0.91), ("budget", 1, 0.92),
                  ("mixtrain", 1, 0.915), ("none", 1, 0.99)], epochs=10, seeds=(0, 1)),
        _payload([("budget", 2, 0.80), ("mixtrain", 2, 0.83)], epochs=10, seeds=(2,)),
        _payload([("budget", 0, 0.93), ("mixtrain", 0, 0.92)], epochs=20, seeds=(0,)),
        _payload([("budget", 0, 0.94), ("mixtrain", 0, 0.95), ("mixtrain", 1, 0.5)],
                 epochs=10, seeds=(0, 1), model="resnet-small"),
    ]


def test_each_seed_is_scored_against_its_own_budget_and_grouped_by_model_and_length():
    result = trend(_grid(), ["a", "b", "c", "d"], target=0.3)
    rows = {(r["model"], r["epochs"]): r for r in result["rows"]}
    assert list(rows) == [("resnet-small", 10), ("resnet-tiny", 10), ("resnet-tiny", 20)]
    tiny10 = rows[("resnet-tiny", 10)]
    want = {0: 1.0, 1: -0.5, 2: 3.0}  # points, from the files by hand
    assert tiny10["delta_vs_budget_per_seed"] == pytest.approx(want)
    assert tiny10["delta_vs_budget"] == pytest.approx(statistics.fmean(want.values()))
    assert tiny10["delta_vs_budget_std"] == pytest.approx(statistics.stdev(want.values()))
    assert tiny10["seeds_at_or_above_budget"] == 2 and tiny10["sources"] == ["a", "b"]
    assert rows[("resnet-tiny", 20)]["delta_vs_budget_per_seed"] == pytest.approx({0: -1.0})
    assert rows[("resnet-tiny", 20)]["delta_vs_budget_std"] is None
    # seed 1 of resnet-small has no budget: left out, not paired with another file's
    assert rows[("resnet-small", 10)]["seeds"] == [0]
    assert result["target_delta_vs_budget"] == 0.3 and result["eval_split"] == "val"


def test_runs_that_trained_differently_are_refused_naming_the_setting():
    runs = _grid()
    runs[2] = _payload([("budget", 0, 0.93), ("mixtrain", 0, 0.92)], epochs=20, seeds=(0,),
                       fraction=0.85)
    with pytest.raises(ValueError, match=r"c trained differently from a in fraction "
                                         r"\(0.8 vs 0.85\)"):
        trend(runs, ["a", "b", "c", "d"])


def test_a_seed_given_twice_for_one_model_and_length_is_refused():
    runs = _grid() + [_payload([("budget", 2, 0.7), ("mixtrain", 2, 0.7)], epochs=10,
                               seeds=(2,))]
    with pytest.raises(ValueError, match="seed 2 of resnet-tiny at 32 px and 10 "
                                              "epochs is in both b and e"):
        trend(runs, ["a", "b", "c", "d", "e"])


def test_a_run_without_a_mixtrain_and_budget_pair_is_refused_with_the_fix():
    runs = [_payload([("budget", 0, 0.9), ("none", 0, 0.9)], epochs=10, seeds=(0,))]
    with pytest.raises(ValueError, match="no seed with both.*--policies budget,mixtrain"):
        trend(runs, ["a"])


def test_channels_last_is_compared_as_it_resolved():
    on = _payload([("budget", 0, 0.9), ("mixtrain", 0, 0.9)], epochs=10, seeds=(0,),
                  channels_last="auto")
    resolved = "on" if SpeedupSettings(channels_last="auto").uses_channels_last() else "off"
    other = _payload([("budget", 0, 0.9), ("mixtrain", 0, 0.9)], epochs=20, seeds=(0,),
                     channels_last=resolved)
    flipped = _payload([("budget", 0, 0.9), ("mixtrain", 0, 0.9)], epochs=20, seeds=(0,),
                       channels_last="off" if resolved == "on" else "on")
    assert len(trend([on, other], ["a", "b"])["rows"]) == 2
    with pytest.raises(ValueError, match="channels_last"):
        trend([on, flipped], ["a", "b"])


def test_composite_sizes_are_separate_lines_each_in_one_memory_format():
    """A quadrant of a 32 px composite is 16 px, of a 64 px one 32 px: the gain over budget
    depends on it, so sizes are kept apart; auto's memory format differs between them by
    design, and must agree within one size."""
    small = _payload([("budget", 0, 0.90), ("mixtrain", 0, 0.89)], epochs=20, seeds=(0,))
    large = _payload([("budget", 0, 0.90), ("mixtrain", 0, 0.93), ("budget", 1, 0.91),
                      ("mixtrain", 1, 0.92)], epochs=20, seeds=(0, 1), image_size=64)
    assert SpeedupSettings(image_size=32).uses_channels_last() != \
        SpeedupSettings(image_size=64).uses_channels_last()  # else this test checks nothing
    result = trend([small, large], ["a", "b"])
    rows = {(r["model"], r["image_size"], r["epochs"]): r for r in result["rows"]}
    assert list(rows) == [("resnet-tiny", 32, 20), ("resnet-tiny", 64, 20)]
    assert rows[("resnet-tiny", 32, 20)]["delta_vs_budget_per_seed"] == pytest.approx({0: -1.0})
    assert rows[("resnet-tiny", 64, 20)]["delta_vs_budget_per_seed"] == pytest.approx(
        {0: 3.0, 1: 1.0})
    assert "image_size" not in result["settings"]
    forced = "on" if not SpeedupSettings(image_size=64).uses_channels_last() else "off"
    odd = _payload([("budget", 2, 0.9), ("mixtrain", 2, 0.9)], epochs=10, seeds=(2,),
                   image_size=64, channels_last=forced)
    with pytest.raises(ValueError, match=r"c trained differently from b in channels_last "
                                         r".* at 64 px"):
        trend([small, large, odd], ["a", "b", "c"])


def test_the_command_writes_json_and_png_and_names_a_bad_file(tmp_path, capsys):
    paths = []
    for i, payload in enumerate(_grid()):
        paths.append(str(tmp_path / f"r{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(payload, f)
    out = tmp_path / "trend.json"
    assert main(paths + ["--out", str(out), "--target", "0.3"]) == 0
    assert len(json.loads(out.read_text())["rows"]) == 3
    assert (tmp_path / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "resnet-tiny" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps({"runs": []}))
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "bad.json"), "--out", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "bad.json is not a speed-up result (no settings)" in err and "\n" not in err
