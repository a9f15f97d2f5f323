"""``mixpipe bench server``: how fast the selection server plans and ingests, and its memory.

For each dataset size N it measures, side by side in one run:

* ledger memory per sample (ledger bytes / N);
* plan time: the policy alone (``make_plan`` on a snapshot, validation included) and a cold
  ``service.plan(e)`` (snapshot + policy), then a cached repeat and a shard for rank 3 of 8;
* commit time of one epoch's N losses (not a target; it runs once per epoch);
* report ingest in-process, crash-safe logging on and off, in reports of ``--chunk`` losses;
* report ingest over loopback ZeroMQ into a ``mixpipe serve`` process (logging on) from 1, 2
  and 8 concurrent client processes, each sending its share of max(N, ``--min-volume``) losses;
  all clients connect first, then start on one signal; throughput is all losses over the time
  from the first client's start to the last one's end.

The plan is the ``mixtrain`` policy when it is installed (else ``none``) on a ledger in which
every sample has a loss, past the warm-up, so the policy does its full work.

Two scale checks with targets (issue 17), written into the JSON with whether they were met:

* ``--matrix-size`` (default 10M; quick 200k): the policy's plan time for **every policy and
  layout** (none, random, mixtrain halves / quads / blend, shrink, shrink + mixtrain, assist with
  100 classes and a fitted assistant, assist + mixtrain), target <= 2 s each at 10M;
* ``--large`` (default 100M; skipped in quick mode): a ledger of that many samples, its bytes
  per sample (target <= 16) and a cold mixtrain plan through the service (target <= 20 s).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any, Dict, List

import numpy as np

from ..progress import progress_bar
from .common import machine_info, write_json

__all__ = ["add_arguments", "run"]

TARGETS = {"plan_1.28M_s": 0.2, "plan_10M_s": 2.0, "ingest_inprocess_losses_per_s": 20e6,
           "ingest_loopback_8_clients_losses_per_s": 2e6, "bytes_per_sample": 24,
           "plan_10M_every_policy_s": 2.0, "large_bytes_per_sample": 16,
           "large_100M_mixtrain_plan_s": 20.0}

_MIX = {"policy": "mixtrain", "warmup_epochs": 1, "fraction": 0.5}
#: every policy and layout the matrix times: name -> settings dict
MATRIX = {
    "none": {"policy": "none"},
    "random": {"policy": "random"},
    "mixtrain_halves": _MIX,
    "mixtrain_quads": {**_MIX, "layout": "quads"},
    "mixtrain_blend": {**_MIX, "layout": "blend"},
    "shrink": {"policy": "shrink"},
    "shrink_mixtrain": {"policy": "shrink", "mix": _MIX},
    "assist": {"policy": "assist", "warmup_epochs": 1},
    "assist_mixtrain": {"policy": "assist", "warmup_epochs": 1, "mix": _MIX},
}

_CLIENT = textwrap.dedent("""
    import sys, time, numpy as np
    from mixpipe.server import connect
    url, epoch, rank, world, n, volume, chunk = sys.argv[1:8]
    epoch, rank, world, n, volume, chunk = map(int, (epoch, rank, world, n, volume, chunk))
    ids = np.arange(rank, volume, world, dtype=np.int64) % n
    losses = np.random.default_rng(rank).random(ids.size).astype(np.float32)
    client = connect(url, timeout=60, retries=0)
    client.hello()  # connected before the clock starts
    print("ready", flush=True)
    sys.stdin.readline()  # all clients start together
    t0 = time.time()
    for lo in range(0, ids.size, chunk):
        client.report(epoch, ids[lo:lo + chunk], losses[lo:lo + chunk], rank=rank)
    t1 = time.time()
    print(t0, t1, ids.size, flush=True)
""")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer repeats")
    parser.add_argument("--sizes", type=str, default=None,
                        help="comma-separated dataset sizes (default 50000,1280000,10000000; "
                             "quick: 50000,200000)")
    parser.add_argument("--clients", type=str, default="1,2,8", help="loopback client counts")
    parser.add_argument("--chunk", type=int, default=65536, help="losses per report call")
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement "
                                                                  "(default 5; quick 3)")
    parser.add_argument("--policy", default=None, help="policy to time (default mixtrain if "
                                                       "available, else none)")
    parser.add_argument("--min-volume", type=int, default=None,
                        help="losses sent per loopback run at least (ids wrap around N), so "
                             "that small N still measures steady throughput (default 4M; "
                             "quick 1M)")
    parser.add_argument("--no-network", action="store_true", help="skip the loopback runs")
    parser.add_argument("--matrix-size", type=int, default=None,
                        help="samples for the every-policy plan matrix (default 10M; quick 200k; "
                             "0 skips it)")
    parser.add_argument("--large", type=int, default=None,
                        help="samples of the large-ledger run (default 100M; quick: skipped; "
                             "0 skips it)")
    parser.add_argument("--only-scale", action="store_true",
                        help="run only the matrix and the large-ledger run")
    parser.add_argument("--out", default="results/bench_server.json", help="JSON output path")


def _policy_name(requested: Any) -> str:
    from ..core.policies import POLICIES, _load_builtin

    _load_builtin()
    if requested:
        return requested
    return "mixtrain" if "mixtrain" in POLICIES else "none"


def _median_time(fn, repeats: int) -> float:
    return _median_times(fn, repeats)[0]


def _median_times(fn, repeats: int) -> tuple:
    """Median (wall, CPU) seconds. CPU time of this process stays close to the one-core time
    when other work oversubscribes the machine; wall time does not."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _bench_plan(n: int, policy: str, repeats: int, state_root: str) -> Dict[str, Any]:
    from ..core.policies import make_plan
    from ..server import InProcessService

    rng = np.random.default_rng(0)
    svc = InProcessService(n, policy, seed=1)
    ids = np.arange(n, dtype=np.int64)
    for epoch in (0, 1):  # every sample seen, past a one-epoch warm-up
        svc.report(epoch, ids, rng.gamma(2.0, 0.5, n).astype(np.float32))
    start = time.perf_counter()
    svc.commit(1)
    commit_s = (time.perf_counter() - start) / 2  # two epochs folded
    snapshot = svc._ledger.snapshot()
    policy_s, policy_cpu = _median_times(lambda: make_plan(snapshot, svc.settings, 1, 2),
                                         repeats)
    cold, cold_cpu = [], []
    for e in range(repeats):  # a fresh epoch each time: nothing cached
        start, start_cpu = time.perf_counter(), time.process_time()
        plan = svc.plan(2 + e)
        cold.append(time.perf_counter() - start)
        cold_cpu.append(time.process_time() - start_cpu)
    cached_s = _median_time(lambda: svc.plan(2 + repeats - 1), repeats)
    shard_s = _median_time(lambda: svc.plan(2 + repeats - 1, 3, 8), repeats)
    return {"policy": policy, "bytes_per_sample": svc._ledger.nbytes / n,
            "commit_s_per_epoch": commit_s, "plan_policy_s": policy_s,
            "plan_service_cold_s": statistics.median(cold), "plan_cached_s": cached_s,
            "plan_policy_cpu_s": policy_cpu,
            "plan_service_cold_cpu_s": statistics.median(cold_cpu),
            "plan_shard_8_s": shard_s, "plan_slots": plan.num_slots,
            "plan_speedup_bound": plan.speedup_bound}


def _seen_ledger(n: int, classes: int = 100):
    """A snapshot in which every sample was seen twice, with labels (what assist reads)."""
    import dataclasses

    from ..core.ledger import Ledger

    rng = np.random.default_rng(0)
    ledger = Ledger(n)
    ids = np.arange(n, dtype=np.int64)
    for epoch in (0, 1):
        ledger.update(epoch, ids, rng.gamma(2.0, 0.5, n).astype(np.float32))
    ledger.committed_epoch = 1
    labels = (np.arange(n) % classes).astype(np.int64)
    return ledger, lambda lg: dataclasses.replace(lg.snapshot(copy=False), labels=labels)


def _bench_matrix(n: int, repeats: int) -> Dict[str, Any]:
    """Plan time of every policy and layout on an n-sample ledger (policy alone, validated)."""
    from ..core.policies import make_plan_with_state, settings_from_dict

    ledger, snap = _seen_ledger(n)
    out: Dict[str, Any] = {}
    for name, spec in MATRIX.items():
        settings = settings_from_dict(spec)
        state = None
        if name.startswith("assist"):  # fit the assistant first: then the plan does full work
            warm = ledger.copy()
            warm.committed_epoch = 0
            _, state = make_plan_with_state(snap(warm), settings, 1, 1, None)
            _, state = make_plan_with_state(snap(ledger), settings, 1, 2, state)
        wall, cpu = _median_times(lambda: make_plan_with_state(snap(ledger), settings, 1, 3,
                                                               state), repeats)
        plan, _ = make_plan_with_state(snap(ledger), settings, 1, 3, state)
        out[name] = {"plan_s": wall, "plan_cpu_s": cpu, "slots": plan.num_slots,
                     "skipped": int(plan.skipped.size)}
    return out


def _bench_large(n: int) -> Dict[str, Any]:
    """A service holding an n-sample ledger: bytes per sample, commit and a cold mixtrain plan."""
    from ..server import InProcessService

    svc = InProcessService(n, _MIX, seed=1)
    rng = np.random.default_rng(2)
    chunk = 1 << 24
    for epoch in (0, 1):
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            svc.report(epoch, np.arange(lo, hi, dtype=np.int64),
                       rng.gamma(2.0, 0.5, hi - lo).astype(np.float32))
        start = time.perf_counter()
        svc.commit(epoch)
        commit_s = time.perf_counter() - start
    start, start_cpu = time.perf_counter(), time.process_time()
    plan = svc.plan(2)
    out = {"num_samples": n, "bytes_per_sample": svc.stats()["bytes_per_sample"],
           "commit_s": commit_s, "mixtrain_plan_s": time.perf_counter() - start,
           "mixtrain_plan_cpu_s": time.process_time() - start_cpu, "slots": plan.num_slots}
    svc.close()
    return out


def _bench_ingest_inprocess(n: int, chunk: int, repeats: int, state_root: str) -> Dict[str, Any]:
    from ..server import InProcessService

    rng = np.random.default_rng(1)
    ids = rng.permutation(n).astype(np.int64)
    losses = rng.random(n).astype(np.float32)
    out = {}
    for logged in (True, False):
        state_dir = tempfile.mkdtemp(dir=state_root) if logged else None
        svc = InProcessService(n, "none", state_dir=state_dir)
        rates = []
        for epoch in range(repeats):
            start = time.perf_counter()
            for lo in range(0, n, chunk):
                svc.report(epoch, ids[lo:lo + chunk], losses[lo:lo + chunk])
            rates.append(n / (time.perf_counter() - start))
            svc.commit(epoch)  # not timed: keeps pending memory bounded
        svc.close()
        if state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
        out["ingest_inprocess_logged" if logged else "ingest_inprocess_unlogged"] = \
            statistics.median(rates)
    return out


def _start_server(n: int, state_dir: str) -> tuple:
    proc = subprocess.Popen([sys.executable, "-m", "mixpipe", "serve", "--num-samples", str(n),
                             "--state-dir", state_dir, "--bind", "tcp://127.0.0.1:*",
                             "--policy", "none", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"mixpipe serve did not start: {line!r}")
    return proc, line.split("listening on ")[1].split()[0]


def _bench_loopback(n: int, clients: List[int], chunk: int, repeats: int, volume: int,
                    state_root: str) -> Dict[str, Any]:
    from ..server import connect

    state_dir = tempfile.mkdtemp(dir=state_root)
    proc, url = _start_server(n, state_dir)
    out: Dict[str, Any] = {}
    epoch = 0
    try:
        admin = connect(url, timeout=120, retries=0)
        for c in clients:
            rates = []
            for _ in range(repeats):
                procs = [subprocess.Popen([sys.executable, "-c", _CLIENT, url, str(epoch),
                                           str(r), str(c), str(n), str(volume), str(chunk)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True)
                         for r in range(c)]
                for p in procs:  # every client connected and warmed up
                    if p.stdout.readline().strip() != "ready":
                        raise RuntimeError("a benchmark client failed to start")
                for p in procs:
                    p.stdin.write("go\n")
                    p.stdin.flush()
                spans = [p.communicate(timeout=600)[0].split() for p in procs]
                if any(p.returncode for p in procs):
                    raise RuntimeError("a benchmark client failed")
                t0 = min(float(s[0]) for s in spans)
                t1 = max(float(s[1]) for s in spans)
                total = sum(int(s[2]) for s in spans)
                rates.append(total / (t1 - t0))
                admin.commit(epoch)
                epoch += 1
            out[f"ingest_loopback_{c}_clients"] = statistics.median(rates)
        admin.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(state_dir, ignore_errors=True)
    return out


def _fmt_rate(v: Any) -> str:
    return "-" if v is None else f"{v / 1e6:.1f}M/s"


def run(args: argparse.Namespace) -> int:
    quick = args.quick
    sizes = [int(s) for s in (args.sizes or ("50000,200000" if quick else
                                             "50000,1280000,10000000")).split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    repeats = args.repeats or (3 if quick else 5)
    policy = _policy_name(args.policy)
    args.min_volume = args.min_volume or (1_000_000 if quick else 4_000_000)
    state_root = tempfile.mkdtemp(prefix="mixpipe-bench-server-")
    settings = {"quick": quick, "sizes": sizes, "clients": clients, "chunk": args.chunk,
                "repeats": repeats, "policy": policy,
                "loopback_min_volume": args.min_volume, "network": not args.no_network,
                "state_dir": state_root, "logging": "write-ahead log, no fsync",
                "loadavg_start": os.getloadavg()}
    matrix_n = args.matrix_size if args.matrix_size is not None else \
        (200_000 if quick else 10_000_000)
    large_n = args.large if args.large is not None else (0 if quick else 100_000_000)
    settings.update(matrix_size=matrix_n, large_size=large_n, only_scale=args.only_scale)
    if args.only_scale:
        sizes = []
    rows = []
    scale: Dict[str, Any] = {}
    steps = progress_bar(total=len(sizes) * (2 if args.no_network else 3),
                         desc="bench server", unit="step")
    try:
        if matrix_n:
            scale["matrix"] = {"num_samples": matrix_n,
                               "policies": _bench_matrix(matrix_n, 1 if matrix_n >= 5e6 else
                                                         repeats)}
        if large_n:
            scale["large"] = _bench_large(large_n)
        for n in sizes:
            row: Dict[str, Any] = {"num_samples": n}
            row.update(_bench_plan(n, policy, repeats, state_root))
            steps.update()
            row.update(_bench_ingest_inprocess(n, args.chunk, repeats, state_root))
            steps.update()
            if not args.no_network:
                row.update(_bench_loopback(n, clients, args.chunk, repeats,
                                           max(n, args.min_volume), state_root))
                steps.update()
            rows.append(row)
    finally:
        steps.close()
        shutil.rmtree(state_root, ignore_errors=True)

    settings["loadavg_end"] = os.getloadavg()  # other work on the machine skews the figures
    by_n = {r["num_samples"]: r for r in rows}
    checks = {"bytes_per_sample": all(r["bytes_per_sample"] <= TARGETS["bytes_per_sample"]
                                      for r in rows)}
    if 1_280_000 in by_n:
        checks["plan_1.28M"] = by_n[1_280_000]["plan_service_cold_s"] <= TARGETS["plan_1.28M_s"]
    if 10_000_000 in by_n:
        checks["plan_10M"] = by_n[10_000_000]["plan_service_cold_s"] <= TARGETS["plan_10M_s"]
    if rows:
        checks["ingest_inprocess"] = all(r["ingest_inprocess_logged"] >=
                                         TARGETS["ingest_inprocess_losses_per_s"] for r in rows)
    if "matrix" in scale and scale["matrix"]["num_samples"] >= 10_000_000:
        slow = {k: v["plan_s"] for k, v in scale["matrix"]["policies"].items()
                if v["plan_s"] > TARGETS["plan_10M_every_policy_s"]}
        checks["plan_10M_every_policy"] = not slow
        checks["plan_10M_every_policy_missed_by"] = slow
    if "large" in scale and scale["large"]["num_samples"] >= 100_000_000:
        checks["large_bytes_per_sample"] = scale["large"]["bytes_per_sample"] <= \
            TARGETS["large_bytes_per_sample"]
        checks["large_100M_mixtrain_plan"] = scale["large"]["mixtrain_plan_s"] <= \
            TARGETS["large_100M_mixtrain_plan_s"]
    if not args.no_network and 8 in clients and rows:
        checks["ingest_loopback_8"] = all(r["ingest_loopback_8_clients"] >=
                                          TARGETS["ingest_loopback_8_clients_losses_per_s"]
                                          for r in rows)
    payload = {"benchmark": "server", "machine": machine_info(), "settings": settings,
               "targets": TARGETS, "meets_targets": checks, "results": rows, "scale": scale,
               "note": "medians over repeats; plan times are wall-clock on one process "
                       "(numpy single-threaded); clients and server share the machine's cores"}
    write_json(args.out, payload)

    head = ["N", "B/sample", "plan policy", "plan cold", "cold CPU", "cached", "shard/8",
            "commit",
            "in-proc log", "in-proc nolog"] + \
        ([f"loop {c}cl" for c in clients] if not args.no_network else [])
    lines = [head]
    for r in rows:
        lines.append([f"{r['num_samples']:,}", f"{r['bytes_per_sample']:.0f}",
                      f"{r['plan_policy_s']:.3f}s", f"{r['plan_service_cold_s']:.3f}s",
                      f"{r['plan_service_cold_cpu_s']:.3f}s",
                      f"{r['plan_cached_s'] * 1e3:.1f}ms", f"{r['plan_shard_8_s'] * 1e3:.1f}ms",
                      f"{r['commit_s_per_epoch']:.3f}s",
                      _fmt_rate(r["ingest_inprocess_logged"]),
                      _fmt_rate(r["ingest_inprocess_unlogged"])] +
                     ([_fmt_rate(r.get(f"ingest_loopback_{c}_clients")) for c in clients]
                      if not args.no_network else []))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    print(f"\nmixpipe bench server (policy {policy}, reports of {args.chunk} losses, "
          f"median of {repeats})")
    for row in lines:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    if "matrix" in scale:
        print(f"\nplan time at {scale['matrix']['num_samples']:,} samples (policy alone):")
        for k, v in scale["matrix"]["policies"].items():
            print(f"  {k:<18} {v['plan_s']:7.3f}s  (CPU {v['plan_cpu_s']:.3f}s)")
    if "large" in scale:
        g = scale["large"]
        print(f"\n{g['num_samples']:,} samples: {g['bytes_per_sample']:.1f} B/sample, commit "
              f"{g['commit_s']:.1f}s, cold mixtrain plan {g['mixtrain_plan_s']:.1f}s")
    print("targets met: " + ", ".join(f"{k}={'yes' if v is True else 'NO' if v is False else v}"
                                      for k, v in checks.items()))
    print(f"wrote {args.out}")
    return 0
