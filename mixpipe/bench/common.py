"""What every benchmark records beside its numbers, so a result can be judged later."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

from ..progress import progress_bar

__all__ = ["machine_info", "write_json", "git_hash", "write_and_print", "interleaved_runs",
           "summarize_arms", "add_ratios", "add_overhead_arguments", "plain_ratio_target"]


def git_hash() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> Dict[str, Any]:
    """CPU, memory, accelerator and library versions of the machine the benchmark ran on."""
    info: Dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_hash(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    for module in ("numpy", "torch", "nvidia.dali", "ffcv", "zmq", "numba"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            info[f"version_{module}"] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - an absent optional library is just recorded as such
            info[f"version_{module}"] = None
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["cuda"] = None
    return info


def write_json(path: str, payload: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_results(parser: argparse.ArgumentParser, paths: Sequence[str]) -> List[Dict[str, Any]]:
    """The JSON of each result file a command was given; one that cannot be read or parsed
    ends the command with one line naming it, not a traceback."""
    payloads = []
    for path in paths:
        try:
            with open(path) as f:
                payloads.append(json.load(f))
        except (OSError, ValueError) as err:
            parser.exit(2, f"{parser.prog}: cannot read {path}: {err}\n")
    return payloads


def finish_result(parser: argparse.ArgumentParser, out: str,
                  build: Callable[[], Dict[str, Any]],
                  draw: Callable[[Dict[str, Any], str], None],
                  text: Callable[[Dict[str, Any]], str]) -> int:
    """Build a tool's result from result files, write it as JSON with its PNG beside, print
    its table; a ValueError (runs that cannot be compared) ends the command with its one
    line."""
    try:
        result = build()
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    write_json(out, result)
    draw(result, os.path.splitext(out)[0] + ".png")
    print(text(result))
    return 0


def write_and_print(out: str, payload: Dict[str, Any], datasets: Dict[str, Any], notes: list,
                    table) -> None:
    """Write the JSON, then print one ``table(name, result)`` per dataset and the notes."""
    write_json(out, payload)
    for key, result in datasets.items():
        print(table(key, result))
        print()
    for note in notes:
        print("note:", note)
    print(f"wrote {out}")


def write_overhead(out: str, benchmark: str, settings: Dict[str, Any],
                   datasets: Dict[str, Any], targets: Callable[[Dict[str, Any]], Any],
                   notes: list, load_before: Tuple[float, float, float], table,
                   **extra: Any) -> None:
    """Write and print one ``bench overhead`` result: the fields every loader's arm records
    (machine, settings, per-dataset results and targets, notes, load averages around the run),
    with ``extra`` fields (a loader's own descriptions) after the settings."""
    payload = {"benchmark": benchmark, "machine_info": machine_info(), "settings": settings,
               **extra, "datasets": datasets,
               "targets": {key: targets(result) for key, result in datasets.items()},
               "notes": notes, "load_average_before_after": [load_before, os.getloadavg()]}
    write_and_print(out, payload, datasets, notes, table)


#: An overhead table column: (header, width, value of an arm's stats dict as a float).
Column = Tuple[str, int, Callable[[Dict[str, Any]], float]]


def stat(key: str, scale: float = 1.0) -> Callable[[Dict[str, Any]], float]:
    """A column's value: ``stats[key] * scale``, NaN where an arm lacks the key."""
    return lambda stats: stats.get(key, float("nan")) * scale


#: The columns both loader overhead tables open with: rates and CPU per source image.
SOURCE_COLUMNS: List[Column] = [("src img/s", 10, stat("source_images_per_s")),
                                ("comp/s", 9, stat("composites_per_s")),
                                ("src/comp", 9, stat("source_images_per_composite")),
                                ("CPU ms/src", 11, stat("cpu_s_per_source_image", 1e3))]


def overhead_table(title: str, arms: Dict[str, Dict[str, Any]], columns: Sequence[Column],
                   targets: Dict[str, Any], arm_width: int = 9, digits: int = 3) -> str:
    """The loader overhead benchmarks' table: one row per arm, then one line per target.

    Both loaders report the same kind of per-arm statistics but compare against different
    references (FFCV also against its own mixup), so they share the layout, not the columns.
    """
    head = f"{'arm':<{arm_width}} " + " ".join(f"{name:>{width}}" for name, width, _ in columns)
    lines = [title, head]
    for arm, stats in arms.items():
        cells = []
        for name, width, value in columns:
            v = value(stats)
            # rates are shown with one decimal, ratios with ``digits``
            cells.append(f"{v:>{width}.1f}" if name.endswith("/s") else f"{v:>{width}.{digits}f}")
        lines.append(f"{arm:<{arm_width}} " + " ".join(cells))
    lines.extend(f"  target {target}: {v}" for target, v in targets.items())
    return "\n".join(lines)


def parse_fractions(text: str) -> List[float]:
    """``--fractions 0,0.5,0.9`` as floats, each checked to lie in [0, 1]."""
    try:
        fractions = [float(f) for f in text.split(",") if f.strip()]
    except ValueError as err:
        raise SystemExit(f"--fractions must be a comma list of numbers, got {text!r}") from err
    if not fractions or any(not 0 <= f <= 1 for f in fractions):
        raise SystemExit(f"--fractions must lie in [0, 1], got {text!r}")
    return fractions


#: One timed run of an arm: wall and CPU seconds, source images and composites delivered.
Run = Dict[str, Any]


def interleaved_runs(arms: Sequence[str], repeats: int, measure: Callable[[str, int], Run],
                     desc: str, progress: bool) -> Dict[str, List[Run]]:
    """``measure(arm, repeat)`` for every arm in every repeat, the order rotated each repeat.

    The loaders share a machine with whatever else runs on it, so no arm is always first (or
    always right after the same neighbour), and each run carries the load average at its end:
    a ratio measured while another job took a core can be told from one measured quietly.
    """
    runs: Dict[str, List[Run]] = {a: [] for a in arms}
    arms = list(arms)
    steps = progress_bar(total=repeats * len(arms), desc=desc, show=progress)
    for rep in range(repeats):
        for arm in arms[rep % len(arms):] + arms[:rep % len(arms)]:
            run = dict(measure(arm, rep))
            run["load_average"] = list(os.getloadavg())
            runs[arm].append(run)
            steps.update(1)
    steps.close()
    return runs


def summarize_arms(runs: Dict[str, List[Run]]) -> Dict[str, Dict[str, Any]]:
    """Per arm, medians over its runs: rates, CPU seconds per source image, sources per
    composite, and the 1-minute load average the runs ended at (where they recorded it)."""
    summary: Dict[str, Dict[str, Any]] = {}
    for arm, rs in runs.items():
        summary[arm] = {
            "source_images_per_s": statistics.median(r["source_images"] / r["wall_s"] for r in rs),
            "composites_per_s": statistics.median(r["composites"] / r["wall_s"] for r in rs),
            "cpu_s_per_source_image": statistics.median(r["cpu_s"] / r["source_images"]
                                                        for r in rs),
            "source_images_per_composite": statistics.median(r["source_images"] / r["composites"]
                                                             for r in rs),
            "runs": rs,
        }
        loads = [r["load_average"][0] for r in rs if "load_average" in r]
        if loads:
            summary[arm]["load_average_1min_median"] = statistics.median(loads)
    return summary


def add_ratios(summary: Dict[str, Dict[str, Any]], base_arm: str, key: str) -> None:
    """``throughput_vs_<key>`` and ``cpu_per_image_vs_<key>`` of every arm against
    ``base_arm``'s medians; nothing when that arm was not measured."""
    base = summary.get(base_arm)
    if base is None:
        return
    for s in summary.values():
        s[f"throughput_vs_{key}"] = s["source_images_per_s"] / base["source_images_per_s"]
        s[f"cpu_per_image_vs_{key}"] = s["cpu_s_per_source_image"] / base["cpu_s_per_source_image"]


def add_overhead_arguments(parser: Any, loader: str) -> None:
    """The flags every loader's ``bench overhead`` arm takes, in one place so that the three
    arms read alike; each loader's module adds its own (workers, threads, resize modes) after."""
    parser.add_argument("--quick", action="store_true", help="small run (a few minutes)")
    parser.add_argument("--out", default=f"results/bench_overhead_{loader}.json")
    parser.add_argument("--fractions", default="0,0.5,0.9",
                        help="mixed fractions to measure (0 = the no-mixing plan)")
    parser.add_argument("--layout", default="halves", choices=("halves", "blend", "quads"))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--fashion", default="data/fashion-mnist",
                        help="prepared Fashion-MNIST directory (skipped with a note if absent)")
    parser.add_argument("--num-generated", type=int, default=None,
                        help="images in the generated 224 px set")
    parser.add_argument("--shapes", default="varied", choices=("varied", "uniform"),
                        help="generated 224 px set: varied sizes (shorter side 256-500 px, "
                             "ImageNet-like) or uniform (all 256x256)")
    parser.add_argument("--no-progress", action="store_true")


def plain_ratio_target(arms: Dict[str, Any], mixing: Sequence[str],
                       target: float) -> Dict[str, Any]:
    """An overhead target: each mixing arm's CPU per source image over the plain pipeline's
    (``cpu_per_image_vs_plain``, from :func:`add_ratios`) at most ``target``, arm by arm."""
    ratios = {a: round(arms[a]["cpu_per_image_vs_plain"], 4) for a in mixing}
    return {"ratios": ratios, "target": target,
            "met_per_arm": {a: r <= target for a, r in ratios.items()},
            "met": all(r <= target for r in ratios.values())}
