"""Accuracy against training compute, across runs whose inputs differ in size.

Forward inputs count compute only while every input costs the same. A 64 px composite costs a
convolutional network four times a 32 px image, so a mixing run at 64 px can match a 32 px
run's forward inputs while spending four times its arithmetic. This tool prices each arm of
each run in floating-point operations: its forward inputs times what one forward and backward
pass costs the model at the run's input size (counted by torch's FLOP counter on the model
itself), and draws final top-1 against that. An arm is worth its compute only if no arm of any
run given reaches its accuracy for less. An arm whose epochs trained at sizes of their own (the
``progressive`` arm) is priced epoch by epoch: each epoch's inputs times a pass at its size. A
LoCal+SGD arm is priced epoch by epoch too, by what its pass really runs at that epoch's
boundary: the full forward, the local rule's products in the early blocks and backpropagation
in the rest only (:func:`local_pass_flops`).

Each arm that is not itself a point of the plain model's curve (none, budget, the frontier
points) is also set against that curve at its own compute: the plain model's top-1 interpolated
linearly in FLOPs between the two curve points around it, seed by seed. That is the equal-FLOP
``budget`` of every arm of a run at once, where a run holds enough curve points.

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
from .settings import traces_frontier
from .trend import compared_settings

__all__ = ["pass_flops", "local_pass_flops", "count_local_pass", "epoch_pass_flops", "compute",
           "dominates", "against_frontier", "plot_compute", "format_compute", "main"]


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


#: the batch a LoCal pass is priced at: the local rule's ⟨y yᵀ⟩ W product is paid once per batch,
#: so its share of a pass falls with the batch (the benchmark's default batch)
LOCAL_PRICE_BATCH = 128


@functools.lru_cache(maxsize=None)
def local_pass_flops(model: str, image_size: int, num_classes: int, transition: int,
                     batch: int = LOCAL_PRICE_BATCH) -> float:
    """FLOPs of one training pass of one input of the named model under LoCal+SGD with the
    boundary at block ``transition`` (:func:`count_local_pass` on a batch of ``batch`` square
    images). At boundary 0 this is :func:`pass_flops`. Building the model leaves torch's random
    stream as it was."""
    import torch

    from .arms import build_model

    with torch.random.fork_rng(devices=[]):
        net = build_model(model, num_classes)
        first_conv = next((m for m in net.modules() if isinstance(m, torch.nn.Conv2d)), None)
        channels = 3 if first_conv is None else first_conv.in_channels
        return count_local_pass(net, torch.randn(batch, channels, image_size, image_size),
                                transition)


def count_local_pass(net: Any, x: Any, transition: int) -> float:
    """FLOPs per input of one training step of ``net`` on the batch ``x`` under LoCal+SGD with
    the boundary at block ``transition``, counted by torch's counter on what runs: every
    block's forward, the local rule's products (Hebbian and decay, :mod:`mixpipe.train.
    local_rule`) in the blocks before the boundary, for which autograd records nothing, and
    forward and backward from the boundary on. The rule's ⟨y yᵀ⟩ W product is paid once per
    batch, so the batch matters a little. ``net`` is left trained by one step and unwrapped."""
    from torch.utils.flop_counter import FlopCounterMode

    from mixpipe.train.local import LocalSGD

    net.train()
    local = LocalSGD(net, transition=int(transition))
    try:
        net(x)  # the rule caches its window coverage on a first call: not a step's work
        with FlopCounterMode(display=False) as counter:
            net(x).sum().backward()
    finally:
        local.remove()
    return counter.get_total_flops() / x.shape[0]


def epoch_pass_flops(model: str, image_size: int, num_classes: int,
                     record: Dict[str, Any]) -> float:
    """What one input's pass cost in the epoch ``record`` describes: at the side it trained at
    (``resolution``, progressive resizing) and, under LoCal+SGD, at its boundary
    (``local_transition``)."""
    size = int(record.get("resolution", image_size))
    if record.get("local_transition") is not None:
        return local_pass_flops(model, size, num_classes, int(record["local_transition"]))
    return float(pass_flops(model, size, num_classes))


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
            "train_tflops_per_seed": {seed: group["runs"][seed][4] / 1e12 for seed in seeds},
            "final_top1": statistics.fmean(group["runs"][seed][2] for seed in seeds),
            "final_top1_per_seed": {seed: group["runs"][seed][2] for seed in seeds},
        })
    cheapest = min(row["train_tflops"] for row in rows)
    for row in rows:
        row["compute_vs_cheapest"] = row["train_tflops"] / cheapest
        row["dominated_by"] = sorted(o["name"] for o in rows
                                     if o is not row and dominates(o, row))
    rows.sort(key=lambda r: (r["train_tflops"], r["arm"]))
    against_frontier(rows)
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


def against_frontier(rows: List[Dict[str, Any]]) -> None:
    """Set each row that is not a point of the plain model's curve against that curve at its
    own compute, seed by seed: the curve's top-1 at the row's TFLOPs, linear between the two
    curve points (of that seed, at that input size) around it, and the row's difference from it.
    A row outside the curve's span gets None for that seed: the curve is not extrapolated."""
    for row in rows:
        if traces_frontier(row["arm"]):
            continue
        curve = [r for r in rows if traces_frontier(r["arm"])
                 and r["image_size"] == row["image_size"]]
        reference: Dict[Any, Optional[float]] = {}
        for seed, flops in row["train_tflops_per_seed"].items():
            points = sorted((r["train_tflops_per_seed"][seed], r["final_top1_per_seed"][seed])
                            for r in curve if seed in r["train_tflops_per_seed"])
            reference[seed] = _interpolate(points, flops)
        deltas = {seed: None if ref is None else row["final_top1_per_seed"][seed] - ref
                  for seed, ref in reference.items()}
        kept = [d for d in deltas.values() if d is not None]
        row["frontier_top1_per_seed"] = reference
        row["delta_vs_frontier_per_seed"] = deltas
        row["delta_vs_frontier"] = statistics.fmean(kept) if kept else None
        row["delta_vs_frontier_std"] = statistics.stdev(kept) if len(kept) > 1 else None
        row["seeds_at_or_above_frontier"] = sum(d >= 0 for d in kept)


def _interpolate(points: Sequence[Tuple[float, float]], x: float) -> Optional[float]:
    """y at ``x`` on the polyline through ``points`` (sorted by x); None outside their span,
    where a point within :data:`EQUAL_COMPUTE` of an end counts as on it."""
    if not points:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    for px, py in (points[0], points[-1]):
        if abs(px - x) <= EQUAL_COMPUTE * px:
            return py
    return None


def _run_flops(run: Dict[str, Any], s: Any, per_pass: int, num_classes: int) -> float:
    """One rank's training FLOPs: epoch by epoch where the run records what changes a pass's
    cost (the side of progressive resizing, LoCal's boundary), else its forward inputs at the
    run's size."""
    epochs = run.get("epochs") or []
    if not any("resolution" in e or e.get("local_transition") is not None for e in epochs):
        return float(run["forward_inputs"] * per_pass)
    return float(sum(e["forward_inputs"] * epoch_pass_flops(s.model, s.image_size, num_classes, e)
                     for e in epochs))


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
             f"{'x min':>7}{'top-1':>8}{'Δ curve':>9}  dominated by"]
    for row in result["rows"]:
        lines.append(f"{row['arm']:<12}{row['image_size']:>5}{row['run_epochs']:>5}"
                     f"{row['epochs']:>8.2f}"
                     f"{len(row['seeds']):>6}{row['forward_inputs']:>10.0f}"
                     f"{row['train_tflops']:>9.2f}{row['compute_vs_cheapest']:>7.2f}"
                     f"{row['final_top1']:>8.2f}{_signed(row.get('delta_vs_frontier')):>9}"
                     f"  {', '.join(row['dominated_by']) or '-'}")
    lines.append("(Δ curve: top-1 against the plain model's curve (none, budget, frontier points)"
                 " interpolated at the arm's own compute, mean over its seeds; - where its "
                 "compute lies outside the curve)")
    return "\n".join(lines)


def _signed(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:+.2f}"


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
