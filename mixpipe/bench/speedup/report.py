"""Summaries, targets, the table and the plot of a speed-up run.

Ratios are taken seed by seed (an arm against the baseline of its own seed, run beside it), then
averaged; per-seed values are kept, because a mean over three to five seeds hides whether a
method wins on most seeds or on one.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .settings import (FRONTIER_PREFIX, PLAIN_ARMS, SpeedupSettings, arm_names,
                       traces_frontier)

__all__ = ["summarise", "targets", "format_table", "plot", "time_to_reach", "reach",
           "PLAIN_ARMS"]



def _mean_std(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else 0.0)


def time_to_reach(history: Dict[str, Any], target: float) -> Optional[float]:
    """Training seconds until the first epoch whose top-1 is at least ``target``."""
    found = reach(history, target, 1)
    return None if found is None else found["seconds"]


def reach(history: Dict[str, Any], target: float, num_samples: int) -> Optional[Dict[str, float]]:
    """AutoAssist's measure: what the run spent until the end of the first epoch whose top-1 is
    at least ``target`` (None if none is): loop ``epochs``, training ``seconds``, and ``compute``
    in epochs of the plain model (passes of the plain model at full size over ``num_samples``:
    forward inputs, or a priced epoch's ``plain_passes``), so that skipping or cheapened passes
    count as the compute they saved."""
    seconds = passes = 0.0
    for index, record in enumerate(history["epochs"]):
        seconds += record["train_seconds"]
        passes += record.get("plain_passes", record["forward_inputs"])
        if record.get("top1") is not None and record["top1"] >= target - 1e-12:
            return {"epochs": float(index + 1), "seconds": seconds,
                    "compute": passes / num_samples}
    return None


def _passes(history: Dict[str, Any]) -> float:
    """The run's compute in passes of the plain model at full size: its forward inputs, or what
    a priced run (LoCal, progressive resizing) spent over one plain pass."""
    return float(history.get("plain_passes", history["forward_inputs"]))


def _against(row: Dict[str, Any], name: str, pairs: List[Tuple[Dict[str, Any], Dict[str, Any]]],
             ) -> None:
    """Per-seed differences of final top-1 (points) against the reference arm ``name``."""
    deltas = {r["seed"]: 100 * (r["final_top1"] - b["final_top1"]) for b, r in pairs}
    row[f"delta_vs_{name}"], row[f"delta_vs_{name}_std"] = _mean_std(list(deltas.values()))
    row[f"delta_vs_{name}_per_seed"] = deltas


def summarise(s: SpeedupSettings, runs: List[Dict[str, Any]], num_samples: int) -> Dict[str, Any]:
    """Per arm: means, spreads and per-seed values; speed-ups and deltas seed by seed against
    ``none`` (full length) and ``budget`` (equal forward inputs) when they ran."""
    by = {(r["policy"], r["seed"]): r for r in runs}
    summary: Dict[str, Any] = {}
    for arm in arm_names(s):
        done = [by[(arm, seed)] for seed in s.seeds if (arm, seed) in by]
        if not done:
            continue
        row: Dict[str, Any] = {"runs": len(done),
                               "epochs_of_data": done[0].get("epochs_of_data", s.epochs)}
        for key, values in (
                ("train_seconds", [r["train_seconds"] for r in done]),
                ("final_top1", [r["final_top1"] for r in done]),
                ("best_top1", [max(e["top1"] for e in r["epochs"]) for r in done]),
                ("data_wait_seconds", [sum(e["data_wait_seconds"] for e in r["epochs"])
                                       for r in done]),
                ("forward_inputs", [r["forward_inputs"] for r in done])):
            row[key], row[key + "_std"] = _mean_std(values)
        row["final_top1_per_seed"] = {r["seed"]: r["final_top1"] for r in done}
        length = min(len(r["epochs"]) for r in done)
        row["forward_inputs_per_epoch"] = [
            statistics.fmean(r["epochs"][e]["forward_inputs"] for r in done)
            for e in range(length)]
        row["top1_per_epoch"] = [statistics.fmean(r["epochs"][e]["top1"] for r in done)
                                 for e in range(length)]
        # the bound in passes of the plain model: forward inputs, or a priced arm's FLOPs
        passes = statistics.fmean(_passes(r) for r in done)
        row["speedup_bound"] = num_samples * s.epochs / passes
        if "none" in s.policies:
            pairs = [(by[("none", r["seed"])], r) for r in done if ("none", r["seed"]) in by]
            speedups = {r["seed"]: b["train_seconds"] / r["train_seconds"] for b, r in pairs}
            bounds = {r["seed"]: _passes(b) / _passes(r) for b, r in pairs}
            row["speedup"], row["speedup_std"] = _mean_std(list(speedups.values()))
            row["speedup_per_seed"] = speedups
            row["speedup_bound"] = statistics.fmean(bounds.values())
            row["speedup_bound_per_seed"] = bounds
            row["bound_efficiency"] = (row["speedup"] / row["speedup_bound"]
                                       if row["speedup_bound"] else None)
            _against(row, "none", pairs)
            reached = {r["seed"]: (b, reach(r, b["final_top1"], num_samples)) for b, r in pairs}
            row["reached_baseline"] = sum(v is not None for _, v in reached.values())
            row["time_to_baseline_top1"], _ = _mean_std(
                [None if v is None else v["seconds"] for _, v in reached.values()])
            # as shares of the full-length plain run's own epochs, compute and wall-clock
            for key, whole in (("epochs", lambda b: len(b["epochs"])),
                               ("compute", lambda b: b["forward_inputs"] / num_samples),
                               ("seconds", lambda b: b["train_seconds"])):
                shares = {seed: None if v is None else v[key] / whole(b)
                          for seed, (b, v) in reached.items()}
                row[f"{key}_to_baseline_share"], _ = _mean_std(list(shares.values()))
                row[f"{key}_to_baseline_share_per_seed"] = shares
        if "budget" in s.policies:
            pairs = [(by[("budget", r["seed"])], r) for r in done if ("budget", r["seed"]) in by]
            _against(row, "budget", pairs)
            row["seeds_at_or_above_budget"] = sum(
                d >= 0 for d in row["delta_vs_budget_per_seed"].values())
        summary[arm] = row
    return summary


def targets(s: SpeedupSettings, summary: Dict[str, Any]) -> Dict[str, Any]:
    """The equal-compute targets, each with its figure and whether it is met (None: the arms it
    needs did not run)."""
    mix = summary.get("mixtrain")
    out: Dict[str, Any] = {}
    if mix is None:
        return out
    seeds = mix["runs"]
    if "delta_vs_budget" in mix:
        out["mixtrain_vs_budget"] = {
            "target": "mean >= +0.3 points and >= 0 on all seeds but one",
            "mean": mix["delta_vs_budget"], "seeds_at_or_above": mix["seeds_at_or_above_budget"],
            "met": bool(mix["delta_vs_budget"] >= 0.3
                        and mix["seeds_at_or_above_budget"] >= seeds - 1)}
    if "delta_vs_none" in mix:
        out["mixtrain_vs_none"] = {
            "target": "mean >= -0.3 points at a bound >= 1.6x with >= 90% of it achieved",
            "mean": mix["delta_vs_none"], "bound": mix["speedup_bound"],
            "bound_efficiency": mix["bound_efficiency"],
            "met": bool(mix["delta_vs_none"] >= -0.3 and mix["speedup_bound"] >= 1.6
                        and (mix["bound_efficiency"] or 0) >= 0.9)}
    rand = summary.get("random")
    if rand is not None:
        wins = [mix["final_top1_per_seed"][k] > v
                for k, v in rand["final_top1_per_seed"].items() if k in mix["final_top1_per_seed"]]
        out["mixtrain_beats_random"] = {"target": "higher final top-1 on every seed",
                                        "seeds_won": sum(wins), "seeds": len(wins),
                                        "met": bool(wins) and all(wins)}
    return out


def format_table(s: SpeedupSettings, summary: Dict[str, Any]) -> str:
    def pct(v: Optional[float], sd: Optional[float] = None) -> str:
        return "-" if v is None else (f"{100 * v:.2f}" + (f" ±{100 * sd:.2f}" if sd else ""))

    def delta(row: Dict[str, Any], name: str) -> str:
        d = row.get(f"delta_vs_{name}")
        return "-" if d is None else f"{d:+.2f} ±{row[f'delta_vs_{name}_std']:.2f}"

    def reached(row: Dict[str, Any]) -> str:
        share = row.get("compute_to_baseline_share")
        if "reached_baseline" not in row:
            return "-"
        return (f"{'-' if share is None else f'{share:.2f}x'}"
                f" ({row['reached_baseline']}/{len(row['final_top1_per_seed'])})")

    head = (f"{'arm':<15} {'epochs':>6} {'train s':>14} {'speed-up':>13} {'bound':>6} "
            f"{'of bound':>8} {'inputs':>9} {'final top-1 %':>15} {'Δ vs none':>13} "
            f"{'Δ vs budget':>13} {'reach none':>12}")
    lines = [head, "-" * len(head)]
    for arm, row in summary.items():
        sp = row.get("speedup")
        sp_txt = "-" if sp is None else f"{sp:.2f}x ±{row['speedup_std']:.2f}"
        eff = row.get("bound_efficiency")
        lines.append(
            f"{arm:<15} {row['epochs_of_data']:>6.2f} {row['train_seconds']:>8.1f} "
            f"±{row['train_seconds_std']:<4.1f} {sp_txt:>13} {row['speedup_bound']:>5.2f}x "
            f"{'-' if eff is None else f'{100 * eff:.0f}%':>8} {row['forward_inputs']:>9.0f} "
            f"{pct(row['final_top1'], row['final_top1_std']):>15} {delta(row, 'none'):>13} "
            f"{delta(row, 'budget'):>13} {reached(row):>12}")
    per_seed = [f"{arm}: " + " ".join(f"{100 * v:.2f}" for v in row["final_top1_per_seed"]
                                     .values()) for arm, row in summary.items()]
    lines.append("final top-1 per seed (" + ", ".join(str(x) for x in s.seeds) + ") | " +
                 " | ".join(per_seed))
    lines.append(f"({len(s.seeds)} seed(s), {s.epochs} epochs, scored on {s.eval_split}, model "
                 f"{s.model}, loader {s.loader}, layout {s.layout}, fraction "
                 f"{s.fraction if s.fraction_start is None else f'{s.fraction_start}->{s.fraction}'}"
                 f", loss per {s.loss_per}; speed-up and Δ seed by seed; ± is the spread over "
                 f"seeds; reach none = compute, in plain epochs, until top-1 first reached "
                 f"none's final, as a share of none's (seeds that reached it); budget = the "
                 f"plain model on {s.budget_match}'s compute"
                 + (f"; progressive = the plain model resized progressively, on "
                    f"{s.budget_match}'s FLOPs" if "progressive" in s.policies else "") + ")")
    return "\n".join(lines)


def plot(runs: List[Dict[str, Any]], s: SpeedupSettings, summary: Dict[str, Any],
         path: str) -> None:
    """Top-1 against training wall-clock: each arm's curve (mean over seeds), the plain model's
    frontier (none, budget and the frontier arms' final points) and each mixing arm's final
    point against it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
    frontier = []
    for arm, row in summary.items():
        done = [r for r in runs if r["policy"] == arm]
        length = min(len(r["epochs"]) for r in done)
        t = np.mean([np.cumsum([e["train_seconds"] for e in r["epochs"][:length]])
                     for r in done], axis=0)
        acc = np.mean([[100 * e["top1"] for e in r["epochs"][:length]] for r in done], axis=0)
        plain = traces_frontier(arm)
        if plain:
            frontier.append((row["train_seconds"], 100 * row["final_top1"]))
        if not arm.startswith(FRONTIER_PREFIX):
            line, = ax.plot(t, acc, marker="o", ms=3, alpha=0.6, label=arm)
            if not plain:
                ax.plot([row["train_seconds"]], [100 * row["final_top1"]], marker="*", ms=14,
                        color=line.get_color(), markeredgecolor="black")
    if len(frontier) >= 2:
        xs, ys = zip(*sorted(frontier))
        ax.plot(xs, ys, "k--", marker="s", ms=5, label="plain model, final (frontier)")
    finals = [100 * row["final_top1"] for row in summary.values()]
    ax.set_ylim(min(finals) - 2.0, max(finals) + 0.8)
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel(f"top-1 on {s.eval_split} (%)")
    ax.set_title(f"{s.data}, {s.model}, {s.epochs} epochs, mean of {len(s.seeds)} seed(s)\n"
                 "stars: mixing arms' final top-1; above the dashed frontier = worth using",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
