"""Command lines generated from the settings dataclasses: every field has a flag, and a flag
sets exactly its field."""
import argparse
import dataclasses

import pytest

from mixpipe.bench.flags import add_flags, flag_name, settings_from_args
from mixpipe.bench.speedup import SpeedupSettings, add_arguments, settings_from
from mixpipe.bench.speedup.settings import QUICK


def _parser():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def _benchmarks():
    """(settings class, add_arguments) of every benchmark whose settings are a dataclass."""
    from mixpipe.bench import load, local

    return [(SpeedupSettings, add_arguments), (local.LocalBenchSettings, local.add_arguments),
            (load.LoadSettings, load.add_arguments)]


@pytest.mark.parametrize("cls,add", _benchmarks(), ids=lambda x: getattr(x, "__name__", "add"))
def test_every_benchmark_setting_has_a_flag_with_help(cls, add):
    parser = argparse.ArgumentParser()
    add(parser)
    options = {o for action in parser._actions for o in action.option_strings}
    for f in dataclasses.fields(cls):
        assert flag_name(f) in options, f"{cls.__name__}.{f.name} has no flag"
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_a_field_without_help_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Bare:
        x: int = 1

    with pytest.raises(TypeError, match="Bare.x has no help"):
        add_flags(argparse.ArgumentParser(), Bare)


@pytest.mark.parametrize("argv,field,value", [
    (["--prune-ratio", "0.3"], "prune_ratio", 0.3),
    (["--momentum", "0.5"], "momentum", 0.5),
    (["--channels-last", "off"], "channels_last", "off"),
    (["--no-per-class"], "per_class", False),
    (["--per-class"], "per_class", True),
    (["--policies", "none,budget"], "policies", ("none", "budget")),
    (["--frontier", "0.4,0.7"], "frontier", (0.4, 0.7)),
    (["--seeds", "3,4,5"], "seeds", (3, 4, 5)),
    (["--limit", "none"], "limit", None),
    (["--eval", "test"], "eval_split", "test"),
    (["--mix-schedule", "constant", "--fraction-start", "none"], "fraction_start", None)])
def test_each_flag_sets_its_field_and_nothing_else(argv, field, value):
    s = settings_from(_parser().parse_args(argv))
    assert getattr(s, field) == value
    default = SpeedupSettings()
    changed = {f.name for f in dataclasses.fields(s) if getattr(s, f.name) != getattr(default,
                                                                                    f.name)}
    assert changed <= {field, "mix_schedule"}


def test_quick_presets_yield_to_explicit_flags():
    s = settings_from(_parser().parse_args(["--quick", "--epochs", "6"]))
    assert s.epochs == 6 and s.seeds == QUICK["seeds"]


@pytest.mark.parametrize("argv,match", [(["--policies", "none,bogus"], "policies"),
                                        (["--loader", "tf"], "loader"),
                                        (["--epochs", "two"], "epochs")])
def test_bad_values_are_refused_naming_the_flag(argv, match, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)
    assert match in capsys.readouterr().err


def test_settings_validation_still_names_the_field():
    args = _parser().parse_args(["--fraction", "1.5"])
    with pytest.raises(ValueError, match="fraction"):
        settings_from_args(args, SpeedupSettings)
