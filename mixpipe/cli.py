"""The ``mixpipe`` command line.

Each subcommand lives beside the code it drives and is imported only when used, so ``mixpipe data``
works without DALI and ``mixpipe serve`` without torch loaders. A subcommand module provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
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


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixpipe", description=__doc__.splitlines()[0])
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
