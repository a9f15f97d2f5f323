"""Join the seeds of one speed-up run that was split across processes.

On a machine with few cores a 5-seed headline runs as several processes, each with its own
seeds and the same settings otherwise; this puts their runs back into one result, as if one
process had run every seed (the per-seed arms were side by side in their own process, so the
comparison inside each seed is untouched). Files that trained differently, or give one seed
twice, are refused.

``python -m mixpipe.bench.speedup.join A.json B.json [...] --out JOINED.json`` (PNG beside)
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, List, Optional, Sequence

from .combine import draw, results_settings
from .report import format_table, summarise, targets

__all__ = ["join", "main"]

#: settings allowed to differ between the parts: which seeds ran, and how it was shown
PER_PART = ("seeds", "frontier_seeds", "progress", "tensorboard")


def join(payloads: Sequence[Dict[str, Any]], sources: Sequence[str]) -> Dict[str, Any]:
    """One payload holding every part's runs, summarised together."""
    settings = results_settings(payloads, sources)
    if len(payloads) < 2:
        raise ValueError("give at least two parts to join")
    first = dataclasses.asdict(settings[0])
    for s, source in zip(settings[1:], sources[1:]):
        other = dataclasses.asdict(s)
        differ = [k for k in first if k not in PER_PART and first[k] != other[k]]
        if differ:
            raise ValueError(f"{source} trained differently from {sources[0]} in "
                             + ", ".join(f"{k} ({first[k]!r} vs {other[k]!r})" for k in differ)
                             + ": only runs split by seed can be joined")
    for key in ("num_train", "num_eval", "world_size"):
        values = {p.get(key) for p in payloads}
        if len(values) > 1:
            raise ValueError(f"the parts differ in {key} ({sorted(map(str, values))}): only "
                             "runs of one data set can be joined")
    seen: Dict[int, str] = {}
    for s, source in zip(settings, sources):
        for seed in s.seeds:
            if seed in seen:
                raise ValueError(f"seed {seed} is in both {seen[seed]} and {source}: give each "
                                 "seed once")
            seen[seed] = source
    seeds = tuple(sorted(seen))
    frontier_seeds = tuple(sorted({x for s in settings for x in s.frontier_seeds}))
    s = dataclasses.replace(settings[0], seeds=seeds, frontier_seeds=frontier_seeds)
    runs: List[Dict[str, Any]] = [r for p in payloads for r in p["runs"]]
    runs.sort(key=lambda r: seeds.index(int(r["seed"])))
    per_rank = -(-int(payloads[0]["num_train"]) // int(payloads[0].get("world_size", 1)))
    summary = summarise(s, runs, per_rank)
    return {
        "benchmark": "speedup",
        "joined_from": list(sources),
        "commands": [p.get("command") for p in payloads],
        "machine_info": payloads[0].get("machine_info"),
        "settings": dataclasses.asdict(s),
        "num_train": payloads[0]["num_train"], "num_eval": payloads[0]["num_eval"],
        "num_classes": payloads[0].get("num_classes"),
        "eval_split": s.eval_split,
        "world_size": payloads[0].get("world_size", 1),
        "budget_epochs": {k: v for p in payloads for k, v in p.get("budget_epochs", {}).items()},
        "wall_seconds": sum(float(p.get("wall_seconds", 0.0)) for p in payloads),
        "summary": summary, "targets": targets(s, summary),
        "table": format_table(s, summary), "runs": runs,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mixpipe.bench.common import finish_result, read_results

    parser = argparse.ArgumentParser(prog="python -m mixpipe.bench.speedup.join",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", help="JSON of each part (one run's seeds each)")
    parser.add_argument("--out", required=True, help="joined JSON (PNG beside it)")
    args = parser.parse_args(argv)
    payloads = read_results(parser, args.parts)
    return finish_result(parser, args.out, lambda: join(payloads, args.parts), draw,
                         lambda joined: joined["table"])


if __name__ == "__main__":
    raise SystemExit(main())
