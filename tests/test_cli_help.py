"""The command line as a person meets it (issue 30): ``--version`` answers, and ``--help`` is
plain text, not the reStructuredText the module docstrings it is built from are written in."""
from __future__ import annotations

import argparse
import importlib.metadata
from typing import Iterator, List, Tuple

import pytest

from mixpipe.cli import COMMANDS, _build_parser, main
from mixpipe.extras import install_hint


def test_version_is_the_installed_metadata_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"mixpipe {importlib.metadata.version('mixpipe')}"


def _parsers(parser: argparse.ArgumentParser, prog: Tuple[str, ...] = ()
             ) -> Iterator[Tuple[Tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser reachable from ``parser`` through its subcommands, with its path."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, prog + (name,))


def _built(path: Tuple[str, ...]) -> argparse.ArgumentParser:
    """The parser with ``path``'s own module asked for its arguments, as ``main`` builds it."""
    try:
        return _build_parser(list(path))
    except ModuleNotFoundError as err:  # an optional extra (pyzmq, DALI, ...) not installed
        if install_hint(err) is None:
            raise
        pytest.skip(f"{' '.join(path)}: {err}")


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_has_no_rst_markup(path):
    seen: List[Tuple[str, ...]] = []
    for sub_path, parser in _parsers(_built(path)):
        text = parser.format_help()
        seen.append(sub_path)
        assert "``" not in text, f"mixpipe {' '.join(sub_path)} --help:\n{text}"
        assert ":class:`" not in text and ":func:`" not in text, text
    assert path in seen  # the walk did reach the command itself


def test_help_keeps_the_words():
    """Stripping markup keeps what it marked: the root's description still names mixpipe."""
    text = _build_parser([]).format_help()
    assert "The mixpipe command line" in text


@pytest.mark.parametrize("rst, shown", [
    ("The ``mixpipe`` command line.", "The mixpipe command line."),
    ("see :class:`~mixpipe.server.base.SelectionService`", "see SelectionService"),
    ("see :func:`mixpipe.data.prepare_tree`", "see mixpipe.data.prepare_tree"),
    ("Examples::", "Examples:"),
    ("**while a plan is in progress**; a, b", "while a plan is in progress; a, b"),
    ("sizes in [1, 2**40) or 2**31", "sizes in [1, 2**40) or 2**31"),  # arithmetic stays
    ("a `tree` as `prepare` writes it", "a `tree` as `prepare` writes it"),
])
def test_plain_text(rst, shown):
    from mixpipe.cli import plain_text

    assert plain_text(rst) == shown
