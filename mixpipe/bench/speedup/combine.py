"""Score a later run's mixing arms against an earlier run's plain arms.

The plain arms (``none``, ``budget``, the frontier) do not change when only the mixing method
does, and their training is deterministic per seed (``budget`` repeated itself to the hundredth
across runs, benchmarks/README.md). Re-training them for every new mixing method would double a
5-seed headline's cost for identical numbers. Joining keeps the accuracy comparison exact; it
cannot make the timings side by side, so the joined record names both sources and marks its
speed-ups as taken across runs.

``python -m mixpipe.bench.speedup.combine PLAIN.json MIXING.json --out JOINED.json``
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, List, Optional, Sequence

from .report import format_table, plot, summarise, targets
from .settings import SpeedupSettings, budget_epochs, trains_plain_model

__all__ = ["combine", "draw", "main", "SAME_TRAINING", "recorded_settings", "results_settings"]

#: settings that must agree for the plain arms of one run to stand for the other's: the data,
#: the model and its optimisation, and mixtrain's schedule (it sets budget's length);
#: batch_unit is not among them, as it sizes only the mixing arms' batches
SAME_TRAINING = ("data", "eval_split", "limit", "eval_limit", "loader", "model", "epochs",
                 "batch_size", "lr", "momentum", "weight_decay", "schedule", "warmup", "augment",
                 "image_size", "stride", "channels_last", "layout", "fraction", "fraction_start",
                 "mix_schedule", "warmup_epochs", "final_full_epochs", "recalibrate",
                 "budget_match")


def recorded_settings(payload: Dict[str, Any]) -> SpeedupSettings:
    """A result file's settings; one an older run did not record yet takes today's default."""
    fields = {f.name for f in dataclasses.fields(SpeedupSettings)}
    values = {k: tuple(v) if isinstance(v, list) else v
              for k, v in payload["settings"].items() if k in fields}
    # runs from before batch_unit existed fed every arm batch_size slots
    values.setdefault("batch_unit", "slots")
    if isinstance(values.get("channels_last"), bool):  # recorded as a flag before "auto"
        values["channels_last"] = "on" if values["channels_last"] else "off"
    return SpeedupSettings(**values)


def results_settings(payloads: Sequence[Dict[str, Any]],
                     sources: Sequence[str]) -> List[SpeedupSettings]:
    """Each result's settings, after checking that every file is a speed-up result and has a
    name to be called by in errors."""
    if len(payloads) != len(sources) or not payloads:
        raise ValueError("give at least one run, with one source name per run")
    for payload, source in zip(payloads, sources):
        missing = [k for k in ("settings", "runs") if k not in payload]
        if missing:
            raise ValueError(f"{source} is not a speed-up result (no {', '.join(missing)}): "
                             "pass JSON written by mixpipe bench speedup or its combine tool")
    return [recorded_settings(p) for p in payloads]


def _trained(s: SpeedupSettings) -> Dict[str, Any]:
    values = {k: getattr(s, k) for k in SAME_TRAINING}
    values["channels_last"] = s.uses_channels_last()
    return values


def _check_budget(s: SpeedupSettings, kept: List[Dict[str, Any]], new: List[Dict[str, Any]],
                  num_train: int) -> None:
    """Each seed's budget must have trained exactly the forward inputs of the arm it matches in
    the new run (or, for mixtrain when it did not run, what mixtrain's schedule gives)."""
    matched = {r["seed"]: r["forward_inputs"] for r in new if r["policy"] == s.budget_match}
    for r in kept:
        if r["policy"] != "budget" or r["seed"] not in s.seeds:
            continue
        if r["seed"] in matched:
            want = matched[r["seed"]] / num_train
        elif s.budget_match == "mixtrain":
            want = budget_epochs(s, num_train)
        else:
            raise ValueError(f"budget matches {s.budget_match}, which the mixing run did not "
                             f"train in seed {r['seed']}: re-run budget beside it")
        if abs(r["epochs_of_data"] - want) * num_train > 0.5:
            raise ValueError(f"seed {r['seed']}'s budget trained {r['epochs_of_data']} epochs, "
                             f"the {s.budget_match} arm it matches {want}: re-run budget")


def combine(plain: Dict[str, Any], mixing: Dict[str, Any],
            sources: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The payload of ``mixing``'s mixing arms scored against ``plain``'s plain arms, seed by
    seed; refuses runs that did not train the same way, or whose budget was matched to another
    schedule."""
    # a setting an older run did not record yet had its default then; channels_last compares
    # as resolved ("auto" is the memory format the run actually used)
    a, b = (_trained(recorded_settings(p)) for p in (plain, mixing))
    differ = [k for k in SAME_TRAINING if a[k] != b[k]]
    if differ:
        raise ValueError("the runs trained differently in " + ", ".join(
            f"{k} ({a[k]!r} vs {b[k]!r})" for k in differ)
            + ": re-run the plain arms with the mixing run's settings")
    if plain["num_train"] != mixing["num_train"] or plain["num_eval"] != mixing["num_eval"]:
        raise ValueError("the runs used different amounts of data: re-run the plain arms")
    kept = [r for r in plain["runs"] if trains_plain_model(r["policy"])]
    new = [r for r in mixing["runs"] if not trains_plain_model(r["policy"])]
    if not kept or not new:
        raise ValueError("the first run must hold plain arms (none, budget, frontier) and the "
                         "second mixing arms")
    missing = sorted({r["seed"] for r in new} - {r["seed"] for r in kept})
    if missing:
        raise ValueError(f"seeds {missing} have mixing arms but no plain arms to score against")
    base = recorded_settings(plain)
    policies = tuple(p for p in base.policies if trains_plain_model(p)) + tuple(
        dict.fromkeys(r["policy"] for r in new))
    s = dataclasses.replace(recorded_settings(mixing), policies=policies,
                            frontier=base.frontier, frontier_seeds=base.frontier_seeds,
                            seeds=tuple(sorted({r["seed"] for r in new})))
    if "budget" in policies:
        _check_budget(s, kept, new, plain["num_train"])
    runs: List[Dict[str, Any]] = [r for r in kept if r["seed"] in s.seeds] + new
    summary = summarise(s, runs, plain["num_train"])
    return {
        "benchmark": "speedup",
        "joined_from": list(sources or ()),
        "commands": [plain.get("command"), mixing.get("command")],
        "timing_note": "plain and mixing arms ran in different runs: speed-ups are taken "
                       "across runs, not side by side",
        "machine_info": mixing.get("machine_info"),
        "settings": dataclasses.asdict(s),
        "num_train": plain["num_train"], "num_eval": plain["num_eval"],
        "eval_split": s.eval_split,
        "budget_epochs": plain.get("budget_epochs"),
        "summary": summary, "targets": targets(s, summary),
        "table": format_table(s, summary), "runs": runs,
    }


def draw(result: Dict[str, Any], png: str) -> None:
    """The speed-up plot of a result built from other results (joined or combined)."""
    plot(result["runs"], recorded_settings(result), result["summary"], png)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mixpipe.bench.common import finish_result, read_results

    parser = argparse.ArgumentParser(prog="python -m mixpipe.bench.speedup.combine",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("plain", help="JSON of a run with the plain arms")
    parser.add_argument("mixing", help="JSON of a run with the mixing arms")
    parser.add_argument("--out", required=True, help="joined JSON (PNG beside it)")
    args = parser.parse_args(argv)
    plain, mixing = read_results(parser, [args.plain, args.mixing])
    return finish_result(parser, args.out,
                         lambda: combine(plain, mixing, sources=[args.plain, args.mixing]),
                         draw, lambda joined: joined["table"])


if __name__ == "__main__":
    raise SystemExit(main())
