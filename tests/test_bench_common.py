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
