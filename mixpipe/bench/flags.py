"""Command lines generated from frozen settings dataclasses.

A benchmark's settings dataclass is the one description of its knobs: each field carries its help
text (and, where the values are a closed set, its choices) in ``dataclasses.field(metadata=...)``,
and this module turns every field into a flag. Writing flags by hand beside the dataclass let the
two drift (fields without flags, help listing fewer choices than the code accepted); generating
them makes a field without a flag impossible.

Flags default to "not given" (``argparse.SUPPRESS``), so :func:`settings_from_args` can lay the
given values over any base (the defaults, or a quick mode's presets).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Dict, Optional, Tuple, Type, TypeVar

__all__ = ["field", "add_flags", "settings_from_args", "flag_name", "given",
           "add_benchmark_arguments", "settings_from_cli", "run_benchmark_cli"]

T = TypeVar("T")
NONE_WORDS = ("none", "off")


def field(default: Any, help: str, *, choices: Optional[Tuple[Any, ...]] = None,
          flag: Optional[str] = None) -> Any:
    """A settings field whose flag says ``help``; ``choices`` restricts a scalar or each list
    item; ``flag`` overrides the generated name (e.g. ``--eval`` for ``eval_split``)."""
    meta = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("settings fields must be immutable: use a tuple")
    return dataclasses.field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _unwrap(tp: Any) -> Tuple[Any, bool]:
    """(inner type, optional) for ``Optional[X]``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _scalar(kind: Any, name: str, choices: Optional[tuple]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a {kind.__name__}") \
                from None
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not one of "
                                             f"{', '.join(map(str, choices))}")
        return value

    return parse


def _parser_for(f: dataclasses.Field, hints: Dict[str, Any]) -> Tuple[Callable[[str], Any], str]:
    tp, optional = _unwrap(hints[f.name])
    choices = f.metadata.get("choices")
    name = flag_name(f)
    if typing.get_origin(tp) in (tuple, Tuple):
        item = typing.get_args(tp)[0]
        one = _scalar(item, name, choices)

        def parse_list(text: str) -> Any:
            if optional and text.strip().lower() in NONE_WORDS:
                return None
            return tuple(one(x.strip()) for x in text.split(",") if x.strip())

        return parse_list, f"comma list of {item.__name__}"
    if tp not in (int, float, str):
        raise TypeError(f"settings field {f.name}: no flag type for {tp!r}")
    one = _scalar(tp, name, choices)
    if not optional:
        return one, tp.__name__

    def parse_optional(text: str) -> Any:
        return None if text.strip().lower() in NONE_WORDS else one(text)

    return parse_optional, f"{tp.__name__} or none"


def add_flags(parser: argparse.ArgumentParser, cls: Type[Any], *,
              exclude: Tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (all of them unless ``exclude``d), help from the metadata
    with the default shown."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with "
                            "mixpipe.bench.flags.field(default, help=...)")
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        choices = f.metadata.get("choices")
        help_text = f.metadata["help"] + (
            f" (one of: {', '.join(map(str, choices))})" if choices else "") + \
            f" [default: {shown}]"
        if hints[f.name] is bool:
            parser.add_argument(flag_name(f), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        parse, metavar = _parser_for(f, hints)
        parser.add_argument(flag_name(f), dest=f.name, type=parse, default=argparse.SUPPRESS,
                            metavar=metavar.upper().replace(" ", "_"), help=help_text)


def given(args: argparse.Namespace, cls: Type[Any]) -> Dict[str, Any]:
    """The fields of ``cls`` that the command line set explicitly."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def settings_from_args(args: argparse.Namespace, cls: Type[T], base: Optional[T] = None) -> T:
    """``base`` (default: ``cls()``) with every explicitly given flag laid over it; the
    dataclass's own validation names any bad value."""
    start = base if base is not None else cls()
    return dataclasses.replace(start, **given(args, cls))


def add_benchmark_arguments(parser: argparse.ArgumentParser, cls: Type[Any],
                            quick: Dict[str, Any], out_help: str) -> None:
    """A benchmark's whole command line: one flag per settings field, ``--quick`` (presets that
    explicit flags override) and ``--out``."""
    add_flags(parser, cls)
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run: {quick} unless given explicitly")
    parser.add_argument("--out", default=None, help=out_help)


def settings_from_cli(args: argparse.Namespace, cls: Type[T], quick: Dict[str, Any]) -> T:
    """The defaults (or the ``--quick`` presets) with every given flag laid over them."""
    base = cls(**quick) if getattr(args, "quick", False) else cls()
    return settings_from_args(args, cls, base)


def run_benchmark_cli(args: argparse.Namespace, cls: Type[T], quick: Dict[str, Any],
                      name: str, default_out: Callable[[bool], str],
                      run: Callable[[T, str], Any]) -> int:
    """Build the settings (a bad value: one line naming the field, exit 2) and run."""
    import sys

    try:
        settings = settings_from_cli(args, cls, quick)
    except ValueError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    run(settings, args.out or default_out(bool(getattr(args, "quick", False))))
    return 0
