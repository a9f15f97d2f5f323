"""``mixpipe demo`` (``make demo``): the quick speed-up benchmark on Fashion-MNIST, torch loader.

A real side-by-side comparison on the whole training set, short enough for a few minutes on two
CPU cores: no mixing, the plain model trained on mixtrain's forward inputs (``budget``: the
equal-compute baseline), naive random mixing and mixtrain train the same model with the same seed;
the table shows training time, the speed-up and its bound, final top-1 on the validation hold-out
and the differences against ``none`` and ``budget``. Four epochs leave one warm-up and three mixed
epochs, so the bound is lower than in the full run, ``mixpipe bench speedup`` (see
benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import os

from mixpipe.bench.speedup import QUICK, SpeedupSettings, run_benchmark

#: The demo's run: the benchmark's quick mode (54k training images, scored on the 6k validation
#: hold-out, 4 epochs, one seed) with its mixtrain settings: QUADS composites of 45%, 62.5%, 80%
#: of the data, drawn easiest-likeliest, in the three epochs after the warm-up (a 1.54x
#: forward-pass bound).
DEMO = SpeedupSettings(**QUICK, policies=("none", "budget", "random", "mixtrain"), progress=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=DEMO.data_root,
                        help="where Fashion-MNIST is (or will be) prepared")
    parser.add_argument("--out", default=os.path.join("results", "demo.json"),
                        help="JSON written here, PNG beside it")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    settings = dataclasses.replace(DEMO, data_root=args.data_root,
                                   progress=not args.no_progress)
    print("mixpipe demo: none vs budget (equal compute) vs random vs mixtrain on Fashion-MNIST "
          f"(the whole training set, {settings.epochs} epochs, torch loader, CPU)", flush=True)
    run_benchmark(settings, args.out)
    return 0
