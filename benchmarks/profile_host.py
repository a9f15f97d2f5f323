"""Where the host CPU time goes, per loader: cProfile over one epoch of the overhead benchmark's
workloads (issue 32, item 1).

    nice -n 19 .venv/bin/python benchmarks/profile_host.py --loader torch --size 224 \
        --out benchmarks/results/overhead/profile-torch-224.txt
    (--loader torch|dali|ffcv, --size 224|32; --size 32 needs data/fashion-mnist prepared)

Per loader three arms, built the way ``mixpipe bench overhead --loader L --quick`` builds them
(mixpipe/bench/overhead_{torch,dali,ffcv}.py, their quick sizes): the library's plain pipeline
(reference), the mixing loader on the no-mixing plan (0 %) and on a ``random`` plan mixing 90 %
(HALVES). Each arm runs one epoch unprofiled (wall, CPU) and then one epoch under cProfile.

* torch: ``MixedLoader`` and the plain ``DataLoader`` with ``num_workers=0``, so the per-sample
  work happens in this process where cProfile sees it (the benchmark uses 2 workers); this
  process is capped at one BLAS thread, as the loader's workers are.
* DALI (CPU-only): only the Python side is visible. The external_source callback (one call per
  batch, in-process as with ``--workers 0``) runs in Python on this thread before each
  iteration is scheduled; the C++ operators run in DALI's threads and show as the time this
  thread waits inside ``pipeline.run`` / ``Outputs``. Reported: the epoch's wall time split into
  Python callbacks, the native run call, and the rest, plus process CPU against this thread's.
* FFCV: the decode/crop/resize/compose run as numba-compiled code in FFCV's threads; cProfile
  sees only Python, so each of FFCV's Python threads is profiled (threading.setprofile) and
  compiled code shows as the own time of the Python function that calls it.

Buckets are sums of *own* time (``tottime``) of the functions each rule matches; cProfile's
per-call overhead inflates the Python-heavy buckets, which is why the unprofiled epoch is printed
beside the profiled one. Numbers are for the machine it runs on; the load average is printed.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shlex
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# ----------------------------------------------------------------------------- buckets
#: (bucket, predicate on (file, function name)); first match wins. Own time only.
PER_SAMPLE = "per-sample Python (plan lookups, slot bookkeeping, RNG)"
FILE_READ = "file open + read (per sample)"
DECODE = "decode (pillow)"
CROP = "crop/resize"
COMPOSE = "composition"
COPIES = "byte copies / array conversion"
COLLATE = "collation / hand-off (DataLoader, queues)"
DALI_CB = "DALI external_source callback (Python)"
DALI_NATIVE = "DALI native run (C++ threads, waited on)"
DALI_GRAPH = "DALI Python graph/iterator glue"
FFCV_COMPILED = "FFCV compiled pipeline (numba: decode+crop+resize+compose)"
WAIT = "waiting on another thread (lock acquire: wall, no CPU)"
OTHER = "other (builtins: len, isinstance, ...; interpreter glue)"


def _has(file: str, *parts: str) -> bool:
    return any(p in file for p in parts)


RULES: List[Tuple[str, Callable[[str, str], bool]]] = [
    (WAIT, lambda f, n: _has(n, "'acquire' of '_thread.lock'")),
    (FFCV_COMPILED, lambda f, n: (_has(f, "mixpipe/ffcv/decoders.py") and n == "decode")
     or _has(f, "ffcv/fields/", "ffcv/transforms/", "numba/")),
    (DALI_NATIVE, lambda f, n: "backend_impl" in n or (f == "~" and _has(n, "'Outputs'",
                                                                          "'ShareOutputs'",
                                                                          "'RunCPU'", "'Run'"))),
    (FILE_READ, lambda f, n: _has(n, "numpy.fromfile", "method 'read' of", "io.open")),
    (CROP, lambda f, n: _has(n, "'resize' of 'ImagingCore'", "'crop' of 'ImagingCore'",
                             "tensordot", "einsum", "matmul") or n == "dot"
     or (_has(f, "mixpipe/core/compose.py") and _has(n, "resize"))
     or _has(f, "mixpipe/core/filter.py", "mixpipe/core/augment.py")
     or (_has(f, "PIL/") and _has(n, "resize", "crop", "transpose"))),
    (DECODE, lambda f, n: _has(f, "PIL/")  # decode and pillow's Python JPEG header parsing
     or _has(n, "'decode' of 'ImagingDecoder'", "'convert' of 'ImagingCore'",
             "load_rgb", "PIL._imaging")),
    (COMPOSE, lambda f, n: _has(f, "mixpipe/core/compose.py")),
    (DALI_CB, lambda f, n: _has(f, "mixpipe/dali/source.py", "mixpipe/dali/files.py")),
    (PER_SAMPLE, lambda f, n: _has(f, "mixpipe/torch/loader.py") and not _has(n, "collate")
     or _has(f, "mixpipe/core/plan.py", "mixpipe/core/source.py", "mixpipe/ffcv/tables.py",
             "mixpipe/ffcv/decoders.py", "mixpipe/dali/plans.py", "numpy/random",
             "profile_host.py", "mixpipe/bench/")
     or _has(n, "numpy.random", "_generator", "SeedSequence", "default_rng")),
    (COPIES, lambda f, n: _has(n, "ascontiguousarray", "'copy'", "numpy.core.multiarray",
                               "'astype'", "frombuffer", "tobytes", "from_numpy",
                               "numpy.array", "'transpose'", "concatenate", "stack",
                               "'reshape'", "'encode' of 'ImagingEncoder'", "numpy.asarray",
                               "__array_interface__")
     or _has(f, "numpy/core/", "numpy/_core/", "numpy/lib/")),
    (COLLATE, lambda f, n: _has(f, "torch/utils/data", "mixpipe/core/batch.py", "queue.py",
                                "threading.py", "mixpipe/ffcv/loader.py", "ffcv/loader")
     or _has(n, "collate", "torch.stack", "torch.as_tensor", "torch.tensor", "'acquire'",
             "'put'", "'get'")),
    (DALI_GRAPH, lambda f, n: _has(f, "nvidia/dali", "mixpipe/dali/")),
]


def bucket_of(file: str, name: str) -> str:
    for bucket, rule in RULES:
        if rule(file, name):
            return bucket
    return OTHER


def buckets(stats: pstats.Stats) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for (file, _line, name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():
        b = bucket_of(file, name)
        out[b] = out.get(b, 0.0) + tt
    return out


def cumulative_of(stats: pstats.Stats, code: Any) -> float:
    """Cumulative time of the function whose code object is ``code``."""
    key = (code.co_filename, code.co_firstlineno, code.co_name)
    return stats.stats[key][3] if key in stats.stats else 0.0


# ----------------------------------------------------------------------------- profiling
class Profiled:
    """cProfile on this thread and on every Python thread started while it is active."""

    def __init__(self, threads: bool = False) -> None:
        self.main = cProfile.Profile()
        self.others: List[cProfile.Profile] = []
        self.threads = threads

    def _start_in_thread(self, *_args: Any) -> None:
        prof = cProfile.Profile()
        self.others.append(prof)
        prof.enable()  # replaces this hook for the rest of the thread

    def __enter__(self) -> "Profiled":
        if self.threads:
            threading.setprofile(self._start_in_thread)
        self.main.enable()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.main.disable()
        if self.threads:
            threading.setprofile(None)

    def stats(self) -> pstats.Stats:
        s = pstats.Stats(self.main, stream=io.StringIO())
        for p in self.others:
            p.create_stats()
            s.add(p)
        return s


def timed(fn: Callable[[], int], profile: bool, threads: bool = False):
    cpu0, th0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    prof = Profiled(threads) if profile else None
    if prof is not None:
        with prof:
            images = fn()
    else:
        images = fn()
    row = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0,
           "thread_cpu_s": time.thread_time() - th0, "images": images}
    return row, (prof.stats() if prof is not None else None)


# ----------------------------------------------------------------------------- loaders
def torch_arms(size: int, work: str, fashion: str):
    from torch.utils.data import DataLoader

    from mixpipe.bench.overhead_dali import generate_tree
    from mixpipe.bench.overhead_torch import Files, PlainImages
    from mixpipe.core.augment import RandomResizedCropFlip
    from mixpipe.core.source import UnmixedPlans
    from mixpipe.server import InProcessService
    from mixpipe.torch import MixedLoader
    from mixpipe.torch.threads import limit_blas_threads

    limit_blas_threads(1)
    if size == 224:
        files, stride, scale, batch = Files(generate_tree(work, 256, progress=False)), 32, \
            (0.08, 1.0), 32
    else:
        files, stride, scale, batch = Files(fashion, limit=4096), 8, (0.35, 1.0), 128
    crop = RandomResizedCropFlip(scale=scale)

    def plain() -> Callable[[], int]:
        ds = PlainImages(files, size, crop.scale, crop.ratio, 0)
        return lambda: sum(len(b[1]) for b in DataLoader(ds, batch, shuffle=True, num_workers=0))

    def mixing(f: float) -> Callable[[], int]:
        source = UnmixedPlans(len(files)) if f <= 0 else InProcessService(
            len(files), {"policy": "random", "fraction": f, "layout": "halves",
                         "grid_cells": size // stride}, seed=0)
        loader = MixedLoader(files, source, batch, (size, size), stride, num_workers=0, seed=0,
                             constituent_transform=crop)

        def epoch() -> int:
            loader.set_epoch(0)
            return sum(int((b.loss_scale > 0).sum()) for b in loader)
        return epoch

    return [("plain torch DataLoader", plain()), ("mix 0%", mixing(0.0)),
            ("mix 90%", mixing(0.9))], {"images": len(files), "batch": batch}, False


def dali_arms(size: int, work: str, fashion: str, max_batches: int):
    from mixpipe.bench.overhead_dali import generate_tree
    from mixpipe.dali.iterator import close_pipeline
    from mixpipe.dali.pipeline import (PipelineSettings, file_list_args, make_train_loader,
                                       open_images, plain_train_pipeline)
    from mixpipe.server import InProcessService

    if size == 224:
        data, batch = generate_tree(work, 512, progress=False), 32
        settings = PipelineSettings(size=(224, 224), stride=32, scale=(0.08, 1.0))
    else:
        data, batch = fashion, 128
        settings = PipelineSettings(size=(32, 32), stride=8, scale=(0.35, 1.0),
                                    mean=(72.9,) * 3, std=(90.0,) * 3)
    n = len(open_images(data, "train"))
    batches = min(max_batches, -(-n // batch))
    made: List[Any] = []

    def plain() -> Callable[[], int]:
        root, file_list = file_list_args(data, "train")
        pipe = plain_train_pipeline(root, file_list, settings, batch, None, 2)
        pipe.build()
        for _ in range(3):
            pipe.run()
        made.append(lambda: close_pipeline(pipe))

        def epoch() -> int:
            for _ in range(batches):
                images, _labels = pipe.run()
                _ = images.as_tensor() if hasattr(images, "as_tensor") else images
            return batches * batch
        return epoch

    def mixing(f: float) -> Callable[[], int]:
        plans = None if f <= 0 else InProcessService(
            n, {"policy": "random", "fraction": f, "layout": "halves",
                "grid_cells": settings.size[1] // settings.stride}, seed=0)
        loader = make_train_loader(data, settings, batch, plans, None, 2, 0, "fork")
        made.append(loader.close)

        def endless():
            while True:
                yield from loader
        stream = endless()
        for _ in range(3):
            next(stream)

        def epoch() -> int:
            return sum(int((next(stream).loss_scale > 0).sum()) for _ in range(batches))
        return epoch

    arms = [("plain DALI pipeline", plain()), ("mix 0%", mixing(0.0)), ("mix 90%", mixing(0.9))]
    return arms, {"images": n, "batch": batch, "batches_per_epoch_profiled": batches,
                  "close": made}, False


def ffcv_arms(size: int, work: str, fashion: str):
    from mixpipe.bench.overhead_ffcv import (_fashion_beton, _generated_beton, _mix_loader,
                                             _plain_loader)

    if size == 224:
        beton, stride, scale, batch = _generated_beton(work, 512, False), 32, (0.08, 1.0), 64
        n = 512
    else:
        beton, stride, scale, batch = _fashion_beton(fashion, work, 8192), 8, (0.35, 1.0), 256
        n = 8192
    size2 = (size, size)

    def warm(loader, mixed):
        def epoch() -> int:
            count = 0
            for b in loader:
                count += int(((b.ids >= 0) & (b.loss_scale > 0)).sum()) if mixed else \
                    int(b[0].shape[0])
            return count
        epoch()  # numba compiles here
        return epoch

    arms = [("plain FFCV Loader", warm(_plain_loader(beton, size2, scale, batch, 2, False),
                                       False))]
    for label, f in (("mix 0% fast", 0.0), ("mix 90% fast", 0.9)):
        arms.append((label, warm(_mix_loader(beton, size2, scale, stride, batch, 2, f, "halves",
                                             n, "fast"), True)))
    return arms, {"images": n, "batch": batch}, True


# ----------------------------------------------------------------------------- report
def report(name: str, row: Dict[str, float], raw: Dict[str, float], stats: pstats.Stats,
           loader: str, top: int) -> str:
    out = io.StringIO()
    b = buckets(stats)
    total = sum(b.values())
    per = 1e3 / max(row["images"], 1)
    out.write(f"\n=== {name}: {row['images']} source images\n")
    out.write(f"unprofiled epoch: wall {raw['wall_s']:.3f} s, process CPU {raw['cpu_s']:.3f} s "
              f"({raw['cpu_s'] * 1e3 / max(raw['images'], 1):.2f} ms/image), this thread's CPU "
              f"{raw['thread_cpu_s']:.3f} s\n")
    out.write(f"profiled epoch:   wall {row['wall_s']:.3f} s, process CPU {row['cpu_s']:.3f} s "
              f"({row['cpu_s'] * per:.2f} ms/image), this thread's CPU "
              f"{row['thread_cpu_s']:.3f} s; profiled own time (all profiled threads) "
              f"{total:.3f} s\n")
    out.write("bucket                                                        own s   share  "
              "ms/image\n")
    for k, v in sorted(b.items(), key=lambda kv: -kv[1]):
        out.write(f"  {k:58s} {v:8.3f} {100 * v / total:6.1f}% {v * per:8.3f}\n")
    if loader == "dali":
        from mixpipe.dali.source import SlotBatches

        cb = cumulative_of(stats, SlotBatches.__call__.__code__)
        native = b.get(DALI_NATIVE, 0.0)
        out.write(f"DALI split of the profiled epoch's wall {row['wall_s']:.3f} s: Python "
                  f"external_source callbacks (SlotBatches.__call__, cumulative) {cb:.3f} s "
                  f"({100 * cb / row['wall_s']:.1f} %); "
                  f"native C++ calls' own time (waiting on DALI's threads) {native:.3f} s "
                  f"({100 * native / row['wall_s']:.1f} %). Process CPU {row['cpu_s']:.3f} s vs "
                  f"this thread's CPU {row['thread_cpu_s']:.3f} s: DALI's C++ threads used "
                  f"{row['cpu_s'] - row['thread_cpu_s']:.3f} s.\n")
    s = io.StringIO()
    stats.stream = s
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    text = s.getvalue()
    out.write("\n".join(line for line in text.splitlines() if line.strip()) + "\n")
    return out.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loader", required=True, choices=("torch", "dali", "ffcv"))
    p.add_argument("--size", type=int, default=224, choices=(224, 32))
    p.add_argument("--fashion", default=os.path.join(REPO, "data", "fashion-mnist"))
    p.add_argument("--dali-max-batches", type=int, default=32,
                   help="DALI at 32 px reads the whole Fashion-MNIST tree: cap the epoch")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="also write the report here")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    head = (f"command: {shlex.join(['python'] + sys.argv)}\n"
            f"load average before (1, 5, 15 min): {load_before}\n")
    body = []
    with tempfile.TemporaryDirectory(prefix="mixpipe-profile-") as work:
        if args.loader == "torch":
            arms, info, threads = torch_arms(args.size, work, args.fashion)
        elif args.loader == "dali":
            arms, info, threads = dali_arms(args.size, work, args.fashion,
                                            args.dali_max_batches)
        else:
            arms, info, threads = ffcv_arms(args.size, work, args.fashion)
        closers = info.pop("close", [])
        head += f"loader {args.loader}, output {args.size} px, {info}\n"
        for name, epoch in arms:
            raw, _ = timed(epoch, profile=False)
            row, stats = timed(epoch, profile=True, threads=threads)
            body.append(report(name, row, raw, stats, args.loader, args.top))
            print(body[-1], flush=True)
        for close in closers:
            close()
    text = head + "".join(body) + f"\nload average after: {os.getloadavg()}\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
