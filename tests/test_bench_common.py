"""Shared benchmark helpers: the overhead table layout and the --fractions parser."""
import math

import pytest

from mixpipe.bench.common import overhead_table, parse_fractions, stat


def test_overhead_table_rows_follow_the_columns_and_mark_missing_values():
    arms = {"plain": {"rate": 1234.56, "ratio": 1.0},
            "mix 50%": {"rate": 99.94, "ratio": 0.8766, "extra": 2.0}}
    columns = [("img/s", 8, stat("rate")), ("ratio", 7, stat("ratio")),
               ("ms", 6, stat("extra", 1e3))]
    text = overhead_table("title", arms, columns, {"x >= 1": True}, arm_width=8)
    lines = text.splitlines()
    assert lines[0] == "title"
    assert lines[1].split() == ["arm", "img/s", "ratio", "ms"]
    plain, mixed = lines[2].split(), lines[3].split()
    assert plain[:3] == ["plain", "1234.6", "1.000"] and math.isnan(float(plain[3]))
    assert mixed[2:] == ["99.9", "0.877", "2000.000"]
    assert lines[4] == "  target x >= 1: True"


def test_parse_fractions_accepts_a_list_and_names_bad_input():
    assert parse_fractions("0, 0.5,0.9") == [0.0, 0.5, 0.9]
    for bad in ("0,1.5", "a,b", ""):
        with pytest.raises(SystemExit, match="--fractions"):
            parse_fractions(bad)


def test_interleaved_runs_rotate_and_ratios_come_from_medians():
    from mixpipe.bench.common import add_ratios, interleaved_runs, summarize_arms

    order = []

    def measure(arm, rep):
        order.append(arm)
        cpu = {"a": 1.0, "b": 3.0}[arm] * (rep + 1)
        return {"wall_s": 1.0, "cpu_s": cpu, "source_images": 2, "composites": 1}

    runs = interleaved_runs(["a", "b"], 3, measure, "t", progress=False)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert all(len(r["load_average"]) == 3 for rs in runs.values() for r in rs)
    summary = summarize_arms(runs)
    assert summary["b"]["cpu_s_per_source_image"] == 3.0  # median of 1.5, 3, 4.5
    add_ratios(summary, "a", "a")
    add_ratios(summary, "missing", "m")
    assert summary["b"]["cpu_per_image_vs_a"] == 3.0 and summary["a"]["throughput_vs_a"] == 1.0
    assert "cpu_per_image_vs_m" not in summary["a"]
    assert summary["a"]["load_average_1min_median"] >= 0
