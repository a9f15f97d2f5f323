"""``python -m mixpipe.bench.local``: LoCal+SGD against plain SGD, side by side in one run.

Arms: ``sgd`` (plain), ``static`` and ``dynamic`` (:func:`mixpipe.train.local.from_kind`), all
through :func:`mixpipe.train.fit` with the torch loader and no input mixing, the same initial
weights, optimiser, schedule and data order per seed; seeds are the outer loop.

Recorded:
* per arm and epoch: training wall-clock (evaluation excluded) and its compute part (fit's
  ``compute_seconds``: the loader's data wait taken out, since LoCal speeds up only the model),
  top-1, the transition index. The arms of a seed train in threads that take turns epoch by
  epoch (one computes at a time), so a drift in the load of a shared machine falls on all alike;
* per transition index, on one fixed batch: the median time of a full training step (forward,
  loss, backward, optimiser step; the local updates included) over ``step_repeats`` steps taken
  round robin over the positions, so the saving of each boundary position is seen without the
  noise of whole epochs on a shared machine;
* activation memory: the bytes autograd saves for the backward pass during one training forward
  (``torch.autograd.graph.saved_tensors_hooks`` sees every tensor an op keeps; counted once per
  storage, parameters excluded). That is the memory that training holds between forward and
  backward and that LoCal removes for the local blocks; it leaves out transient workspace (which
  backprop and the local rule both free at once) and is exact and repeatable, unlike process RSS.
  Per arm: the mean over epochs (each epoch at its own boundary) and the peak.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from mixpipe.bench.flags import add_benchmark_arguments, field, run_benchmark_cli

__all__ = ["LocalBenchSettings", "saved_activation_bytes", "run_benchmark", "add_arguments",
           "run"]

ARMS = ("sgd", "static", "dynamic")


@dataclasses.dataclass(frozen=True)
class LocalBenchSettings:
    """What defines a run; recorded in the JSON beside the results. Every field is a flag
    (:mod:`mixpipe.bench.flags`)."""

    data_root: str = field("data/fashion-mnist", "where Fashion-MNIST is (or will be) prepared")
    model: str = field("resnet-tiny", "model (mixpipe.train.build_model names)")
    epochs: int = field(6, "epochs per arm")
    arms: Tuple[str, ...] = field(ARMS, "arms: plain SGD, LoCal with a static or a dynamic "
                                        "boundary", choices=ARMS)
    seeds: Tuple[int, ...] = field((0,), "seeds")
    limit: Optional[int] = field(12000, "train on the first N samples (none: all)")
    val_limit: Optional[int] = field(2000, "score the first N validation samples (none: all)")
    batch_size: int = field(128, "batch size")
    lr: float = field(0.1, "base learning rate (SGD)")
    momentum: float = field(0.9, "SGD momentum")
    weight_decay: float = field(5e-4, "weight decay")
    local_lr: float = field(0.01, "learning rate of the local rule")
    threads: Optional[int] = field(None, "torch intra-op threads (none: torch's default)")
    step_repeats: int = field(15, "timed repeats of one training step per transition")
    progress: bool = field(True, "progress bars")

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, allowed: str) -> None:
            if not cond:
                raise ValueError(f"local bench setting {field}={getattr(self, field)!r}: must be "
                                 f"{allowed}")
        need(self.epochs >= 2, "epochs", ">= 2")
        need(len(self.arms) >= 1 and all(a in ARMS for a in self.arms), "arms",
             f"a non-empty list drawn from {ARMS}")
        need(len(self.seeds) >= 1, "seeds", "at least one seed")
        need(self.limit is None or self.limit >= self.batch_size, "limit", ">= batch_size or None")
        need(self.batch_size >= 2, "batch_size", ">= 2")
        need(self.lr > 0, "lr", "> 0")
        need(0 <= self.local_lr <= 1, "local_lr", "in [0, 1]")
        need(self.step_repeats >= 3, "step_repeats", ">= 3")


def saved_activation_bytes(step: Callable[[], Any], exclude=()) -> int:
    """Bytes of the tensors autograd saves while ``step()`` runs (each storage once), leaving out
    the storages of ``exclude`` (the parameters: weights saved for backward are not activations)."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return int(sum(seen.values()))


def _speedup_settings(s: LocalBenchSettings):
    from mixpipe.bench.speedup import SpeedupSettings

    return SpeedupSettings(model=s.model, epochs=s.epochs, policies=("none",), seeds=s.seeds,
                           batch_size=s.batch_size, lr=s.lr, momentum=s.momentum,
                           weight_decay=s.weight_decay, limit=s.limit, eval_limit=s.val_limit,
                           data_root=s.data_root, augment="flip", channels_last="on",
                           warmup_epochs=0, progress=s.progress)


def _optimizer(model, s: LocalBenchSettings):
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": s.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=s.lr,
                           momentum=s.momentum, nesterov=s.momentum > 0)


def _local(arm: str, model, optimizer, s: LocalBenchSettings):
    from mixpipe.train.local import from_kind
    from mixpipe.train.local_rule import OjaRule

    if arm == "sgd":
        return None
    return from_kind(arm, model, optimizer, s.epochs, rule=OjaRule(lr=s.local_lr))


def per_transition(s: LocalBenchSettings, num_classes: int, images, labels) -> List[Dict]:
    """Step time and saved activation bytes for each boundary position, on one fixed batch."""
    import torch
    import torch.nn.functional as F

    from mixpipe.train import Normalize, build_model
    from mixpipe.train.local import LocalSGD, split_blocks
    from mixpipe.train.local_rule import OjaRule

    torch.manual_seed(0)
    base = build_model(s.model, num_classes)
    x = Normalize(channels_last=True)(images)
    arms = []
    for t in range(len(split_blocks(base))):
        model = copy.deepcopy(base).to(memory_format=torch.channels_last).train()
        opt = _optimizer(model, s)
        local = LocalSGD(model, transition=t, rule=OjaRule(lr=s.local_lr), optimizer=opt)

        def step(model=model, opt=opt):
            loss = F.cross_entropy(model(x), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        saved = saved_activation_bytes(lambda: F.cross_entropy(model(x), labels),
                                       exclude=list(model.parameters()))
        for _ in range(3):
            step()
        arms.append((t, local, step, saved, []))
    # round robin: a change of machine load falls on every boundary position alike
    for _ in range(s.step_repeats):
        for t, local, step, saved, times in arms:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    rows = []
    for t, local, step, saved, times in arms:
        rows.append({"transition": t, "local_blocks": [b.name for b in local.local_blocks()],
                     "step_seconds_median": statistics.median(times),
                     "saved_activation_bytes": saved})
        local.remove()
    base_time = rows[0]["step_seconds_median"]
    base_bytes = rows[0]["saved_activation_bytes"]
    for row in rows:
        row["step_speedup"] = base_time / row["step_seconds_median"]
        row["activation_ratio"] = row["saved_activation_bytes"] / base_bytes
    return rows


class _Turns:
    """Epoch-level round robin over arms trained in threads: one arm computes at a time and the
    arms take turns epoch by epoch, so a drift in machine load falls on every arm alike."""

    def __init__(self, n: int) -> None:
        self._cond = threading.Condition()
        self._active = list(range(n))
        self._pos = 0

    def wait(self, i: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._active or self._active[self._pos] == i)

    def done(self, i: int, finished: bool) -> None:
        with self._cond:
            if i in self._active:
                k = self._active.index(i)
                if finished:
                    self._active.pop(k)
                    self._pos = k % len(self._active) if self._active else 0
                else:
                    self._pos = (k + 1) % len(self._active)
            self._cond.notify_all()


def make_arm(s: LocalBenchSettings, arm: str, seed: int, train, num_classes: int):
    """Model, optimiser, LoCal wrapper and loader of one (arm, seed), built in the main thread so
    the seeded initial weights do not depend on thread timing."""
    import torch

    from mixpipe.bench.speedup import arm_policy, make_loader
    from mixpipe.server import InProcessService
    from mixpipe.train import build_model

    ss = _speedup_settings(s)
    torch.manual_seed(seed)
    model = build_model(s.model, num_classes)
    optimizer = _optimizer(model, s)
    local = _local(arm, model, optimizer, s)
    service = InProcessService(len(train), policy=arm_policy("none", ss), seed=seed)
    return {"arm": arm, "seed": seed, "model": model, "optimizer": optimizer, "local": local,
            "service": service, "loader": make_loader(ss, train, service, seed)}


def train_arms(s: LocalBenchSettings, parts: List[Dict[str, Any]], val_batches) -> List[Dict]:
    """Train the arms of one seed in threads that take turns epoch by epoch."""
    from mixpipe.train import Normalize, Schedule, fit

    turns = _Turns(len(parts))
    histories: List[Optional[Dict[str, Any]]] = [None] * len(parts)
    errors: List[BaseException] = []

    def work(i: int, part: Dict[str, Any]) -> None:
        local = part["local"]

        def on_epoch(record: Dict[str, Any]) -> None:
            if local is not None:
                local.on_epoch(record)
            last = record["epoch"] == s.epochs - 1
            turns.done(i, finished=last)
            if not last:
                turns.wait(i)

        try:
            turns.wait(i)
            history = fit(part["model"], part["loader"], part["optimizer"], s.epochs,
                          Schedule("cosine"), eval_loader=val_batches, service=part["service"],
                          stride=8, prepare=Normalize(channels_last=True), progress=s.progress,
                          desc=f"{part['arm']} seed {part['seed']}", on_epoch=on_epoch)
            history.update(arm=part["arm"], seed=part["seed"],
                           local=local.history if local is not None else None)
            histories[i] = history
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)
        finally:
            turns.done(i, finished=True)

    threads = [threading.Thread(target=work, args=(i, part), daemon=True)
               for i, part in enumerate(parts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [h for h in histories if h is not None]


def summarise(s: LocalBenchSettings, runs: List[Dict], rows: List[Dict]) -> Dict[str, Any]:
    by = {(r["arm"], r["seed"]): r for r in runs}
    saved = {row["transition"]: row["saved_activation_bytes"] for row in rows}
    summary: Dict[str, Any] = {}
    for arm in s.arms:
        mine = [by[(arm, seed)] for seed in s.seeds if (arm, seed) in by]
        transitions = [[e.get("local_transition", 0) for e in r["epochs"]] for r in mine]
        per_epoch_bytes = [[saved[t] for t in ts] for ts in transitions]
        row: Dict[str, Any] = {
            "train_seconds": statistics.fmean(r["train_seconds"] for r in mine),
            "seconds_per_epoch": statistics.fmean(r["train_seconds"] / s.epochs for r in mine),
            "compute_seconds": statistics.fmean(sum(e["compute_seconds"] for e in r["epochs"])
                                                for r in mine),
            "data_wait_seconds": statistics.fmean(
                sum(e["data_wait_seconds"] for e in r["epochs"]) for r in mine),
            "final_top1": statistics.fmean(r["final_top1"] for r in mine),
            "transitions_per_epoch": transitions,
            "activation_bytes_mean": statistics.fmean(statistics.fmean(b)
                                                      for b in per_epoch_bytes),
            "activation_bytes_peak": max(max(b) for b in per_epoch_bytes),
            "activation_bytes_last_epoch": statistics.fmean(b[-1] for b in per_epoch_bytes),
        }
        if "sgd" in s.arms and arm != "sgd":
            pairs = [(by[("sgd", r["seed"])], r) for r in mine if ("sgd", r["seed"]) in by]
            row["speedup"] = statistics.fmean(b["train_seconds"] / r["train_seconds"]
                                              for b, r in pairs)
            row["compute_speedup"] = statistics.fmean(
                sum(e["compute_seconds"] for e in b["epochs"]) /
                sum(e["compute_seconds"] for e in r["epochs"]) for b, r in pairs)
            row["top1_delta_pts"] = statistics.fmean(100 * (r["final_top1"] - b["final_top1"])
                                                     for b, r in pairs)
        summary[arm] = row
    base = summary.get("sgd")
    if base is not None:
        for row in summary.values():
            row["activation_mean_ratio"] = row["activation_bytes_mean"] / \
                base["activation_bytes_mean"]
    return summary


def format_table(s: LocalBenchSettings, summary: Dict[str, Any], rows: List[Dict]) -> str:
    lines = [f"{'t':>2} {'local blocks':<28} {'step ms':>8} {'step x':>7} {'saved act KiB':>14} "
             f"{'ratio':>6}"]
    for r in rows:
        lines.append(f"{r['transition']:>2} {','.join(r['local_blocks']) or '-':<28} "
                     f"{1000 * r['step_seconds_median']:>8.1f} {r['step_speedup']:>6.2f}x "
                     f"{r['saved_activation_bytes'] / 1024:>14.0f} {r['activation_ratio']:>6.2f}")
    lines.append("")
    head = (f"{'arm':<8} {'s/epoch':>8} {'speed-up':>9} {'compute s':>9} {'speed-up':>9} "
            f"{'top-1 %':>8} {'Δ pts':>7} "
            f"{'act mean KiB':>13} {'act ratio':>9}  transitions")
    lines += [head, "-" * len(head)]
    for arm, row in summary.items():
        sp = row.get("speedup")
        delta = row.get("top1_delta_pts")
        csp = row.get("compute_speedup")
        lines.append(f"{arm:<8} {row['seconds_per_epoch']:>8.1f} "
                     f"{'-' if sp is None else f'{sp:.2f}x':>9} {row['compute_seconds']:>9.1f} "
                     f"{'-' if csp is None else f'{csp:.2f}x':>9} {100 * row['final_top1']:>8.2f} "
                     f"{'-' if delta is None else f'{delta:+.2f}':>7} "
                     f"{row['activation_bytes_mean'] / 1024:>13.0f} "
                     f"{row.get('activation_mean_ratio', 1.0):>9.2f}  "
                     f"{row['transitions_per_epoch'][0]}")
    lines.append(f"({len(s.seeds)} seed(s), {s.epochs} epochs, {s.model}, batch {s.batch_size}; "
                 "speed-up and Δ against sgd seed by seed; compute = training time less data "
                 "wait; act = bytes saved for backward per training forward at the epoch's "
                 "boundary, batch as above)")
    return "\n".join(lines)


def run_benchmark(s: LocalBenchSettings, out: Optional[str] = None, log=print) -> Dict[str, Any]:
    import torch

    from mixpipe.bench.common import machine_info, write_json
    from mixpipe.bench.speedup import load_data
    from mixpipe.train import EvalBatches

    if s.threads:
        torch.set_num_threads(s.threads)
    train, val, num_classes = load_data(_speedup_settings(s), log)
    val_batches = EvalBatches(val, batch_size=512, size=32, crop_ratio=1.0)
    n = min(s.batch_size, len(train))
    images = torch.stack([torch.from_numpy(train[i][0].copy()).permute(2, 0, 1)
                          for i in range(n)])
    labels = torch.tensor([int(train[i][1]) for i in range(n)])
    started = time.time()
    rows = per_transition(s, num_classes, images, labels)
    runs = []
    for seed in s.seeds:
        parts = [make_arm(s, arm, seed, train, num_classes) for arm in s.arms]
        for history in train_arms(s, parts, val_batches):
            runs.append(history)
            log(f"  {history['arm']:<8} seed {seed}: {history['train_seconds']:.1f}s, final "
                f"top-1 {100 * history['final_top1']:.2f}%")
    summary = summarise(s, runs, rows)
    table = format_table(s, summary, rows)
    payload = {"benchmark": "local", "machine_info": machine_info(),
               "settings": dataclasses.asdict(s), "num_train": len(train), "num_val": len(val),
               "wall_seconds": time.time() - started, "per_transition": rows,
               "summary": summary, "runs": runs, "table": table,
               "memory_method": "bytes of tensors saved for backward during one training forward "
                                "(saved_tensors_hooks), one count per storage, parameters "
                                "excluded"}
    if out:
        write_json(out, payload)
        log(f"wrote {out}")
    print(table, flush=True)
    return payload


QUICK = dict(limit=3000, val_limit=1000, epochs=3, step_repeats=5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_benchmark_arguments(parser, LocalBenchSettings, QUICK, "JSON path (default "
                            "results/bench_local.json or results/bench_local-quick.json)")


def run(args: argparse.Namespace) -> int:
    return run_benchmark_cli(
        args, LocalBenchSettings, QUICK, "local bench",
        lambda quick: os.path.join("results", "bench_local-quick.json" if quick
                                   else "bench_local.json"),
        run_benchmark)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixpipe.bench.local",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
