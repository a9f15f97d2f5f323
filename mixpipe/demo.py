"""``mixpipe demo`` (``make demo``): the quick speed-up benchmark on Fashion-MNIST, torch loader.

A real side-by-side comparison on a subset, small enough for a few minutes on two CPU cores:
no mixing, naive random mixing and mixtrain train the same model with the same seed and schedule;
the table shows training time, the speed-up and its bound, and final top-1. The full run is
``mixpipe bench speedup`` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import os

from mixpipe.bench.speedup import SpeedupSettings, run_benchmark

#: The demo's run: 8k training images, the 10k test set cut to 2k, 5 epochs, one seed; QUADS
#: composites of the lowest-loss 71% after one warm-up epoch (a 1.74x forward-pass bound).
DEMO = SpeedupSettings(limit=8000, val_limit=2000, epochs=5, seeds=(0,),
                       policies=("none", "random", "mixtrain"), layout="quads", fraction=0.71,
                       progress=True)


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
    print("mixpipe demo: none vs random vs mixtrain on a Fashion-MNIST subset "
          f"({settings.limit} images, {settings.epochs} epochs, torch loader, CPU)", flush=True)
    run_benchmark(settings, args.out)
    return 0
