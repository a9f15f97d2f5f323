"""``mixpipe bench overhead --loader dali|ffcv|torch``: what mixing costs the loader.

Each loader's measurement lives in ``overhead_<loader>.py``; this module only dispatches, so the
DALI benchmark never imports FFCV and the other way round.
"""
from __future__ import annotations

import argparse
import importlib
import sys

LOADERS = ("dali", "ffcv", "torch")


def _loader_from_argv() -> str:
    argv = sys.argv
    for i, tok in enumerate(argv):
        if tok == "--loader" and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith("--loader="):
            return tok.split("=", 1)[1]
    return LOADERS[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loader", choices=LOADERS, default=LOADERS[0],
                        help="which loader's mixing overhead to measure")
    loader = _loader_from_argv()
    if loader in LOADERS:
        importlib.import_module(f"mixpipe.bench.overhead_{loader}").add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(f"mixpipe.bench.overhead_{args.loader}").run(args)
