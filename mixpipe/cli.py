"""The ``mixpipe`` command line.

Each subcommand lives beside the code it drives and is imported only when used, so ``mixpipe data``
works without DALI and ``mixpipe serve`` without torch loaders. A subcommand module provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import sys
from typing import Optional, Sequence

#: command path -> (module, one-line help). Nested names ("bench server") become sub-subcommands.
COMMANDS = {
    ("data", "prepare"): ("mixpipe.data.cli", "write a dataset out as a JPEG tree, arrays and "
                                              "an FFCV .beton"),
    ("serve",): ("mixpipe.server.cli", "run the selection server (ZeroMQ)"),
    ("demo",): ("mixpipe.demo", "the speed-up demo on the shipped Fashion-MNIST"),
    ("bench", "server"): ("mixpipe.bench.server", "selection server: plan time, report throughput"),
    ("bench", "overhead"): ("mixpipe.bench.overhead", "loader overhead of mixing (DALI / FFCV / "
                                                   "torch)"),
    ("bench", "speedup"): ("mixpipe.bench.speedup", "training speed-up and accuracy, arm by arm"),
    ("bench", "load"): ("mixpipe.bench.load", "selection server under 16 concurrent clients"),
    ("bench", "local"): ("mixpipe.bench.local", "LoCal+SGD against plain SGD"),
}


#: :role:`target` (Sphinx cross-references), ``literal`` and **strong**: the markup the
#: docstrings that help texts are taken from are written in
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_STRONG = re.compile(r"(?<![\w*])\*\*(?=\S)([^*\n]+?)(?<=\S)\*\*(?![\w*])")  # not 2**40
_LITERAL_BLOCK = re.compile(r"::$", re.MULTILINE)


def package_version() -> str:
    """The installed distribution's version, which is what a bug report needs; a source tree
    used without installing has no metadata, so then the package's own ``__version__``."""
    try:
        return importlib.metadata.version("mixpipe")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def plain_text(text: str) -> str:
    """``text`` without reStructuredText markup, for a terminal.

    Help texts are often a module's docstring, written for Sphinx; ``--help`` would show its
    backticks and roles verbatim. A role becomes its target (shortened to the last name where
    a tilde asks Sphinx to), a literal or strong text its words, a closing double colon one.
    """
    def role(match: "re.Match[str]") -> str:
        short, target = match.group(1), match.group(2)
        return target.rsplit(".", 1)[-1] if short else target

    text = _ROLE.sub(role, text)
    text = _LITERAL.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    return _LITERAL_BLOCK.sub(":", text)


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Strip markup from every text ``--help`` shows, in ``parser`` and its subcommands: done
    here, once, so no docstring has to be written twice (for Sphinx and for the terminal)."""
    for attr in ("description", "epilog"):
        if getattr(parser, attr):
            setattr(parser, attr, plain_text(getattr(parser, attr)))
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = plain_text(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # the one-line help of each subcommand
                if isinstance(choice.help, str):
                    choice.help = plain_text(choice.help)
            for sub in action.choices.values():
                _plain_help(sub)


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    groups: dict = {}
    root = parser.add_subparsers(dest="command", metavar="COMMAND")
    root.required = True
    for path, (module, help_text) in COMMANDS.items():
        parent = root
        for depth, name in enumerate(path[:-1]):
            key = path[: depth + 1]
            if key not in groups:
                group_parser = parent.add_parser(name, help=f"{name} subcommands")
                groups[key] = group_parser.add_subparsers(dest=f"sub{depth}", metavar="SUBCOMMAND")
                groups[key].required = True
            parent = groups[key]
        sub = parent.add_parser(path[-1], help=help_text)
        sub.set_defaults(_module=module)
        # Only the chosen command's module is imported to declare its arguments.
        if all(tok in argv for tok in path):
            importlib.import_module(module).add_arguments(sub)
    _plain_help(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _build_parser(argv).parse_args(argv)
        return int(importlib.import_module(args._module).run(args) or 0)
    except ModuleNotFoundError as err:
        from .extras import install_hint

        hint = install_hint(err)
        if hint is None:
            raise
        print(f"mixpipe: error: {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
