"""Accuracy against training compute, across runs whose inputs differ in size.

Forward inputs count compute only while every input costs the same. A 64 px composite costs a
convolutional network four times a 32 px image, so a mixing run at 64 px can match a 32 px
run's forward inputs while spending four times its arithmetic. This tool prices each arm of
each run in floating-point operations: its forward inputs times what one forward and backward
pass costs the model at the run's input size (counted by torch's FLOP counter on the model
itself), and draws final top-1 against that. An arm is worth its compute only if no arm of any
run given reaches its accuracy for less. An arm whose epochs trained at sizes of their own (the
``progressive`` arm) is priced epoch by epoch: each epoch's inputs times a pass at its size.

Region pooling (a masked mean per constituent) is not counted: it is a few multiply-adds per
feature cell against the convolutions' hundreds.

``python -m mixpipe.bench.speedup.compute RUN.json [RUN.json ...] --out COMPUTE.json`` (PNG
beside)
"""
from __future__ import annotations

import argparse
import functools
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .combine import results_settings
from .trend import compared_settings

__all__ = ["pass_flops", "compute", "dominates", "plot_compute", "format_compute", "main"]


@functools.lru_cache(maxsize=None)
def pass_flops(model: str, image_size: int, num_classes: int) -> int:
    """FLOPs of one forward and backward pass of one input (batch of one, square image).

    torch's counter counts convolutions and matrix products, which are nearly all of a
    network's arithmetic, and not element-wise work. The model is put in eval mode so that a
    batch norm over a 1x1 map of one image does not refuse to run; the counted products are the
    same in both modes. Building the model leaves torch's random stream as it was: a run that
    prices its passes must train as one that does not."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .arms import build_model

    with torch.random.fork_rng(devices=[]):
        net = build_model(model, num_classes).eval()
    first_conv = next((m for m in net.modules() if isinstance(m, torch.nn.Conv2d)), None)
    channels = 3 if first_conv is None else first_conv.in_channels
    x = torch.zeros(1, channels, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return int(counter.get_total_flops())


def _num_classes(payload: Dict[str, Any], s: Any, source: str) -> int:
    """The class count the run trained with; records from before it was kept are all
    Fashion-MNIST's, whose ten classes are known."""
    if "num_classes" in payload:
        return int(payload["num_classes"])
    if s.data == "fashion-mnist":
        return 10
    raise ValueError(f"{source} does not record its number of classes: re-run it with this "
                     "mixpipe, which keeps num_classes in the JSON")


def compute(payloads: Sequence[Dict[str, Any]], sources: Sequence[str]) -> Dict[str, Any]:
    """One row per arm, composite size and run length, its seeds gathered across the files
    (one seed per file is how runs are spread over cores): forward inputs, training FLOPs and
    final top-1, mean and per seed. The runs must score one split with one model; an arm given
    by two files for one size and length must have trained the same way, and no seed twice."""
    settings = results_settings(payloads, sources)
    first = (settings[0], sources[0])
    groups: Dict[Tuple[str, int, int], Dict[str, Any]] = {}
    for payload, s, source in zip(payloads, settings, sources):
        for name in ("eval_split", "data", "model"):
            if getattr(s, name) != getattr(first[0], name):
                raise ValueError(f"{source} differs from {first[1]} in {name} "
                                 f"({getattr(first[0], name)!r} vs {getattr(s, name)!r}): "
                                 "compare runs of one model scored on one split")
        per_pass = pass_flops(s.model, s.image_size, _num_classes(payload, s, source))
        ranks = int(payload.get("world_size", 1))  # a run's inputs are counted per rank
        trained = dict(compared_settings(s), channels_last=s.uses_channels_last())
        for run in payload["runs"]:
            arm = run["policy"]
            group = groups.setdefault((arm, s.image_size, s.epochs), {
                "trained": trained, "source": source, "pass_flops": per_pass, "runs": {}})
            differ = sorted(k for k in trained if trained[k] != group["trained"][k])
            if differ:
                raise ValueError(f"{source} and {group['source']} both give {arm} at "
                                 f"{s.image_size} px and {s.epochs} epochs, trained differently "
                                 f"in {', '.join(differ)}: compare them in separate calls")
            if run["seed"] in group["runs"]:
                raise ValueError(f"seed {run['seed']} of {arm} at {s.image_size} px and "
                                 f"{s.epochs} epochs is in both {group['runs'][run['seed']][3]}"
                                 f" and {source}: pass one of them")
            group["runs"][run["seed"]] = (ranks * run["forward_inputs"],
                                          run.get("epochs_of_data", s.epochs),
                                          100.0 * run["final_top1"], source,
                                          ranks * _run_flops(run, s, per_pass,
                                                             _num_classes(payload, s, source)))
    rows: List[Dict[str, Any]] = []
    for (arm, size, run_epochs), group in groups.items():
        seeds = sorted(group["runs"])
        inputs = statistics.fmean(group["runs"][seed][0] for seed in seeds)
        rows.append({
            "arm": arm, "image_size": size, "run_epochs": run_epochs,
            "name": f"{arm} ({size} px, {run_epochs}-epoch run)",
            "epochs": statistics.fmean(group["runs"][seed][1] for seed in seeds),
            "seeds": seeds, "sources": sorted({group["runs"][seed][3] for seed in seeds}),
            "forward_inputs": inputs, "pass_flops": group["pass_flops"],
            "train_tflops": statistics.fmean(group["runs"][seed][4] for seed in seeds) / 1e12,
            "final_top1": statistics.fmean(group["runs"][seed][2] for seed in seeds),
            "final_top1_per_seed": {seed: group["runs"][seed][2] for seed in seeds},
        })
    cheapest = min(row["train_tflops"] for row in rows)
    for row in rows:
        row["compute_vs_cheapest"] = row["train_tflops"] / cheapest
        row["dominated_by"] = sorted(o["name"] for o in rows
                                     if o is not row and dominates(o, row))
    rows.sort(key=lambda r: (r["train_tflops"], r["arm"]))
    return {"benchmark": "speedup-compute", "sources": list(sources),
            "model": first[0].model, "eval_split": first[0].eval_split, "rows": rows}


#: arms matched in FLOPs differ by rounding (a partial epoch, a ramp solved to 1 %): within this
#: share of each other their compute counts as equal
EQUAL_COMPUTE = 0.01


def dominates(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether arm ``a`` makes ``b`` not worth its compute: more accuracy (mean) for no more
    compute, or as much for less. At equal compute the more accurate arm wins, so an arm
    matched in FLOPs to a better one is dominated, and two equal arms dominate neither."""
    same = abs(a["train_tflops"] - b["train_tflops"]) <= EQUAL_COMPUTE * b["train_tflops"]
    if same:
        return a["final_top1"] > b["final_top1"]
    return a["train_tflops"] < b["train_tflops"] and a["final_top1"] >= b["final_top1"]


def _run_flops(run: Dict[str, Any], s: Any, per_pass: int, num_classes: int) -> float:
    """One rank's training FLOPs: epoch by epoch at the side each trained at where the run
    records one (progressive resizing), else its forward inputs at the run's size."""
    epochs = run.get("epochs") or []
    if not any("resolution" in e for e in epochs):
        return float(run["forward_inputs"] * per_pass)
    return float(sum(e["forward_inputs"] * pass_flops(s.model, e.get("resolution", s.image_size),
                                                      num_classes) for e in epochs))


def plot_compute(result: Dict[str, Any], path: str) -> None:
    """Final top-1 against training TFLOPs: each arm's mean as a marker (shape by composite
    size), its seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(10.5, 4.8), dpi=120)
    arms = sorted({row["arm"] for row in result["rows"]})
    colours = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    markers = {size: m for size, m in zip(sorted({r["image_size"] for r in result["rows"]}),
                                          "os^Dv")}
    for row in result["rows"]:
        x = row["train_tflops"]
        seeds = list(row["final_top1_per_seed"].values())
        ax.scatter([x] * len(seeds), seeds, s=10, alpha=0.4, color=colours[row["arm"]])
        ax.scatter([x], [row["final_top1"]], s=60, color=colours[row["arm"]],
                   marker=markers.get(row["image_size"], "o"), edgecolor="black",
                   label=f"{row['name']}: {row['epochs']:.1f} epochs of data")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training compute (TFLOPs: forward inputs × one forward+backward pass at "
                  "the size each trained at)")
    ax.set_ylabel(f"final top-1 on {result['eval_split']} (%)")
    ax.set_title(f"{result['model']}: accuracy against compute\n"
                 "up and left is better; dots: seeds", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_compute(result: Dict[str, Any]) -> str:
    lines = [f"{result['model']}: final top-1 on {result['eval_split']} against training compute",
             f"{'arm':<12}{'px':>5}{'run':>5}{'epochs':>8}{'seeds':>6}{'inputs':>10}{'TFLOPs':>9}"
             f"{'x min':>7}{'top-1':>8}  dominated by"]
    for row in result["rows"]:
        lines.append(f"{row['arm']:<12}{row['image_size']:>5}{row['run_epochs']:>5}"
                     f"{row['epochs']:>8.2f}"
                     f"{len(row['seeds']):>6}{row['forward_inputs']:>10.0f}"
                     f"{row['train_tflops']:>9.2f}{row['compute_vs_cheapest']:>7.2f}"
                     f"{row['final_top1']:>8.2f}  {', '.join(row['dominated_by']) or '-'}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mixpipe.bench.common import finish_result, read_results

    parser = argparse.ArgumentParser(prog="python -m mixpipe.bench.speedup.compute",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON of speed-up runs (or combine's output)")
    parser.add_argument("--out", required=True, help="compute JSON (PNG beside it)")
    args = parser.parse_args(argv)
    payloads = read_results(parser, args.runs)
    return finish_result(parser, args.out, lambda: compute(payloads, args.runs), plot_compute,
                         format_compute)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
