"""``mixpipe bench speedup``: training wall-clock and accuracy, arm by arm, in one run.

Every arm trains the same model from the same initial weights, with the same optimiser, schedule
(by progress through the arm's own run, decaying to zero) and data order seed; only the plan
differs. Seeds are the outer loop and arms the inner one, so a change of machine load during the
run falls on every arm alike. The equal-compute arm ``budget`` (the plain model on mixtrain's
forward inputs) and the ``--frontier`` arms answer the question a user asks first: is mixing
better than simply training the plain model for fewer epochs?

Modules, one job each: :mod:`.settings` (what a run is, arm -> policy), :mod:`.data`,
:mod:`.loaders` (one factory per loader), :mod:`.arms` (train one arm), :mod:`.report`
(summary, targets, table, plot). Output: JSON (machine, versions, git hash, settings, per-run
histories, summary, targets), a PNG and a table on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from mixpipe.bench.flags import add_benchmark_arguments, run_benchmark_cli, settings_from_cli

from .arms import train_arm
from .data import load_data
from .loaders import make_loader
from .report import format_table, plot, summarise, targets, time_to_reach
from .settings import (MATCHING_ARMS, QUICK, SpeedupSettings, arm_policy, budget_epochs,
                       run_order, seed_arms)

__all__ = ["SpeedupSettings", "QUICK", "run_benchmark", "add_arguments", "run", "format_table",
           "summarise", "targets", "arm_policy", "budget_epochs", "load_data", "make_loader",
           "time_to_reach", "train_arm"]


def _say(*args: Any, **kwargs: Any) -> None:
    """print, flushed: a run's progress must reach a log file as it happens, not at the end."""
    print(*args, **kwargs, flush=True)


def run_benchmark(s: SpeedupSettings, out: Optional[str] = None,
                  log: Callable[..., None] = _say) -> Dict[str, Any]:
    """Run every (seed, arm), write JSON and PNG next to ``out``, return the payload."""
    import torch

    from mixpipe.bench.common import machine_info, write_json
    from mixpipe.train import EvalBatches
    from mixpipe.train.distributed import barrier, init_distributed

    check_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    env = init_distributed()  # torchrun: join the job; plain python: one process
    if not env.is_main:
        log = lambda *args, **kwargs: None  # noqa: E731 - rank 0 alone reports
        barrier()  # rank 0 prepares the data first
    train, scored, num_classes = load_data(s, log)
    if env.is_main:
        barrier()
    eval_batches = EvalBatches(scored, batch_size=512, size=s.image_size,
                               crop_ratio=s.crop_ratio)
    arms = run_order(s)
    log(f"speedup: {len(train)} train / {len(scored)} {s.eval_split} samples, {num_classes} "
        f"classes; arms {', '.join(arms)}; seeds {list(s.seeds)}; torch threads "
        f"{torch.get_num_threads()}")
    runs: List[Dict[str, Any]] = []
    started = time.time()
    for seed in s.seeds:
        inputs: Dict[str, float] = {}  # each arm's compute, in passes of the plain model
        for arm in seed_arms(s, seed):
            matched = inputs.get(s.budget_match) if arm in MATCHING_ARMS else None
            history = train_arm(s, arm, seed, train, eval_batches, num_classes, log, matched)
            # counted per rank; a priced arm (LoCal) in passes of the plain model
            inputs[arm] = history.get("plain_passes", history["forward_inputs"]) * env.world_size
            runs.append(history)
            log(f"  {arm:<9} seed {seed}: {history['train_seconds']:.1f}s, "
                f"{history['forward_inputs']} inputs, final top-1 "
                f"{100 * history['final_top1']:.2f}%")
    per_rank = -(-len(train) // env.world_size)  # inputs are counted per rank
    summary = summarise(s, runs, per_rank)
    payload = {
        "benchmark": "speedup",
        "machine_info": machine_info(),
        "command": "mixpipe bench speedup " + " ".join(sys.argv[3:]) if sys.argv[1:3] == [
            "bench", "speedup"] else " ".join(sys.argv),
        "settings": dataclasses.asdict(s),
        "num_train": len(train),
        "num_eval": len(scored),
        "num_classes": num_classes,
        "eval_split": s.eval_split,
        "budget_epochs": {r["seed"]: r["epochs_of_data"] for r in runs
                          if r["policy"] == "budget"},
        "world_size": env.world_size,
        "wall_seconds": time.time() - started,
        "summary": summary,
        "targets": targets(s, summary),
        "runs": runs,
    }
    table = format_table(s, summary)
    payload["table"] = table
    if out and env.is_main:
        write_json(out, payload)
        png = os.path.splitext(out)[0] + ".png"
        plot(runs, s, summary, png)
        log(f"wrote {out} and {png}")
    if env.is_main:
        print(table, flush=True)
    return payload


def check_device(device: str) -> None:
    """A one-line error for a device this torch cannot train on (before any data is read)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise SystemExit(f"--device {device!r}: {err}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this torch ({torch.__version__}) has no usable "
                         "CUDA device; use --device cpu, or install a CUDA build of torch on a "
                         "GPU machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    add_benchmark_arguments(parser, SpeedupSettings, QUICK, "JSON path (PNG beside it); default "
                            "benchmarks/results/speedup[-quick].json")


def settings_from(args: argparse.Namespace) -> SpeedupSettings:
    return settings_from_cli(args, SpeedupSettings, QUICK)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ConnectionError, PermissionError) as err:  # the selection server: one line
        print(f"mixpipe bench speedup: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    return run_benchmark_cli(
        args, SpeedupSettings, QUICK, "mixpipe bench speedup",
        lambda quick: os.path.join("benchmarks", "results",
                                   "speedup-quick.json" if quick else "speedup.json"),
        run_benchmark)
