"""Mixtrain against ``budget`` by the run's length: where equal-compute mixing pays.

The gain over training the plain model for fewer epochs depends on how long the run is (the
plain model's frontier flattens as epochs grow) and on whether a constituent keeps its native
resolution in the composite (a quadrant of a 32 px composite is 16 px, below Fashion-MNIST's
28), so one run cannot tell a user whether mixing pays for theirs. This tool gathers speed-up
runs of different lengths, models and composite sizes, pairs each seed's ``mixtrain`` with its
``budget`` (side by side in one run, or joined by :mod:`.combine`), and draws the difference
against epochs: one line per model and composite size, every seed's point beside the mean.

Only runs that trained the same way but for their model, length and composite size are drawn
together; any other difference (mixing schedule, data, split, optimiser) is refused with the
setting named. The memory format (channels_last) must agree between runs of one composite size;
across sizes its ``auto`` choice differs by design (the CPU backward crashes in it from 48 px).

``python -m mixpipe.bench.speedup.trend RUN.json [RUN.json ...] --out TREND.json`` (PNG beside)
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Any, Dict, Optional, Sequence, Tuple

from .combine import results_settings
from .settings import SpeedupSettings

__all__ = ["trend", "plot_trend", "main", "VARIES", "compared_settings"]

#: what may differ between the runs drawn together: what tells the figure's lines and points
#: apart (model, composite size, run length) and what says which arms and seeds a run trained or
#: how it was driven, not how
VARIES = ("model", "epochs", "image_size", "policies", "frontier", "frontier_seeds", "seeds",
          "progress", "workers", "threads", "data_root", "server", "local")


def compared_settings(s: SpeedupSettings) -> Dict[str, Any]:
    """The settings that must agree across every run (channels_last: per composite size)."""
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s)
            if f.name not in VARIES and f.name != "channels_last"}


def _pairs(payload: Dict[str, Any]) -> Dict[int, Tuple[float, float]]:
    """seed -> (mixtrain's, budget's final top-1) for every seed that trained both."""
    finals: Dict[Tuple[str, int], float] = {}
    for r in payload["runs"]:
        if r["policy"] in ("mixtrain", "budget"):
            finals[(r["policy"], int(r["seed"]))] = float(r["final_top1"])
    seeds = {seed for _, seed in finals}
    return {seed: (finals[("mixtrain", seed)], finals[("budget", seed)]) for seed in sorted(seeds)
            if ("mixtrain", seed) in finals and ("budget", seed) in finals}


def trend(payloads: Sequence[Dict[str, Any]], sources: Sequence[str],
          target: Optional[float] = None) -> Dict[str, Any]:
    """One row per (model, epochs): each seed's mixtrain − budget in points, mean and spread.

    Refuses runs that trained differently in anything but :data:`VARIES`, runs without a
    mixtrain and budget pair, and a seed that two files give for the same model and length
    (which one counts would be a silent choice)."""
    settings = results_settings(payloads, sources)
    reference = compared_settings(settings[0])
    groups: Dict[Tuple[str, int, int], Dict[str, Any]] = {}
    memory_format: Dict[int, Tuple[bool, str]] = {}  # composite px -> (channels_last, source)
    for payload, s, source in zip(payloads, settings, sources):
        other = compared_settings(s)
        differ = [k for k in reference if reference[k] != other[k]]
        if differ:
            raise ValueError(f"{source} trained differently from {sources[0]} in " + ", ".join(
                f"{k} ({reference[k]!r} vs {other[k]!r})" for k in differ)
                + ": draw only runs that differ in model, epochs and image_size")
        resolved = s.uses_channels_last()
        first, first_source = memory_format.setdefault(s.image_size, (resolved, source))
        if resolved != first:
            raise ValueError(f"{source} trained differently from {first_source} in "
                             f"channels_last ({first} vs {resolved}) at {s.image_size} px: draw "
                             "only runs of one composite size in one memory format")
        pairs = _pairs(payload)
        if not pairs:
            raise ValueError(f"{source} has no seed with both a mixtrain and a budget arm: "
                             "run them side by side (--policies budget,mixtrain) or join "
                             "them with python -m mixpipe.bench.speedup.combine")
        group = groups.setdefault((s.model, s.image_size, s.epochs),
                                  {"deltas": {}, "sources": {}})
        for seed, (mix, budget) in pairs.items():
            if seed in group["deltas"]:
                raise ValueError(f"seed {seed} of {s.model} at {s.image_size} px and {s.epochs} "
                                 f"epochs is in both {group['sources'][seed]} and {source}: "
                                 "pass one of them")
            group["deltas"][seed] = 100.0 * (mix - budget)
            group["sources"][seed] = source
    rows = []
    for (model, image_size, epochs), group in sorted(groups.items()):
        deltas = [group["deltas"][seed] for seed in sorted(group["deltas"])]
        rows.append({
            "model": model, "image_size": image_size, "epochs": epochs,
            "seeds": sorted(group["deltas"]),
            "delta_vs_budget_per_seed": {seed: group["deltas"][seed]
                                         for seed in sorted(group["deltas"])},
            "delta_vs_budget": statistics.fmean(deltas),
            "delta_vs_budget_std": statistics.stdev(deltas) if len(deltas) > 1 else None,
            "seeds_at_or_above_budget": sum(d >= 0 for d in deltas),
            "sources": sorted(set(group["sources"].values())),
        })
    return {"benchmark": "speedup-trend", "sources": list(sources),
            "eval_split": settings[0].eval_split, "target_delta_vs_budget": target,
            "settings": {k: v for k, v in dataclasses.asdict(settings[0]).items()
                         if k not in VARIES},
            "rows": rows}


def plot_trend(result: Dict[str, Any], path: str) -> None:
    """Δ vs budget against epochs, one line per model and composite size (means), every seed
    as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    lines = sorted({(row["model"], row["image_size"]) for row in result["rows"]})
    for i, (model, size) in enumerate(lines):
        rows = [row for row in result["rows"] if (row["model"], row["image_size"]) == (model, size)]
        xs = [row["epochs"] + 0.15 * (i - (len(lines) - 1) / 2) for row in rows]
        means = [row["delta_vs_budget"] for row in rows]
        line, = ax.plot(xs, means, marker="o", label=f"{model}, {size} px composites (mean)")
        for x, row in zip(xs, rows):
            seeds = list(row["delta_vs_budget_per_seed"].values())
            ax.scatter([x] * len(seeds), seeds, s=12, alpha=0.5, color=line.get_color())
    ax.axhline(0.0, color="black", lw=0.8)
    if result.get("target_delta_vs_budget") is not None:
        ax.axhline(result["target_delta_vs_budget"], color="grey", ls="--", lw=0.8,
                   label=f"target (+{result['target_delta_vs_budget']:g})")
    ax.set_xlabel("run length (epochs; budget trains the same forward inputs in fewer)")
    ax.set_ylabel(f"mixtrain − budget, top-1 on {result['eval_split']} (points)")
    ax.set_title("equal compute: mixing against training fewer epochs\n"
                 "dots: seeds; above 0 = mixing pays", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_trend(result: Dict[str, Any]) -> str:
    lines = [f"mixtrain − budget on {result['eval_split']} (points)",
             f"{'model':<14}{'px':>5}{'epochs':>7}{'seeds':>7}{'mean':>8}{'sd':>7}{'>= 0':>6}"
             "  per seed"]
    for row in result["rows"]:
        sd = row["delta_vs_budget_std"]
        per = " / ".join(f"{d:+.2f}" for d in row["delta_vs_budget_per_seed"].values())
        lines.append(f"{row['model']:<14}{row['image_size']:>5}{row['epochs']:>7}"
                     f"{len(row['seeds']):>7}"
                     f"{row['delta_vs_budget']:>+8.2f}{'' if sd is None else f'{sd:.2f}':>7}"
                     f"{row['seeds_at_or_above_budget']:>6}  {per}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mixpipe.bench.common import finish_result, read_results

    parser = argparse.ArgumentParser(prog="python -m mixpipe.bench.speedup.trend",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON of speed-up runs with mixtrain and budget")
    parser.add_argument("--out", required=True, help="trend JSON (PNG beside it)")
    parser.add_argument("--target", type=float, default=None,
                        help="draw this Δ vs budget (points) as the target line")
    args = parser.parse_args(argv)
    payloads = read_results(parser, args.runs)
    return finish_result(parser, args.out, lambda: trend(payloads, args.runs, args.target),
                         plot_trend, format_trend)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
