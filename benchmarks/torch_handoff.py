"""Where the torch mixing loader's extra CPU sits with workers: the training process or them.

    PYTHONPATH=. python benchmarks/torch_handoff.py \
        --out benchmarks/results/overhead/torch-handoff-224.txt

One epoch at a time, the plain torch loader and ``MixedLoader`` on the no-mixing plan,
interleaved over ``--repeats``, each over the same generated 224 px JPEGs (the overhead
benchmark's tree) with the same workers and batch size. Per arm, the medians of CPU per image
in this process (``RUSAGE_SELF``: sampling, sending indices, receiving batches) and in its
workers (``RUSAGE_CHILDREN``, reaped at the end of each epoch). ``mixpipe bench overhead``
reports their sum; this splits it.
"""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from torch.utils.data import DataLoader

    from mixpipe.bench.overhead_dali import generate_tree
    from mixpipe.bench.overhead_torch import Files, PlainImages
    from mixpipe.core.augment import RandomResizedCropFlip
    from mixpipe.core.source import UnmixedPlans
    from mixpipe.torch import MixedLoader

    lines = [f"command: python benchmarks/torch_handoff.py {shlex.join(argv or sys.argv[1:])}",
             f"load average before: {os.getloadavg()}"]
    with tempfile.TemporaryDirectory(prefix="mixpipe-handoff-") as work:
        files = Files(generate_tree(work, args.images, progress=False))
        crop = RandomResizedCropFlip(scale=(0.08, 1.0))
        runs = {"plain": [], "mix 0%": []}
        for rep in range(args.repeats):
            arms = list(runs) if rep % 2 == 0 else list(runs)[::-1]
            for arm in arms:
                if arm == "plain":
                    loader = DataLoader(PlainImages(files, 224, crop.scale, crop.ratio, rep),
                                        args.batch_size, shuffle=True,
                                        num_workers=args.workers)
                else:
                    loader = MixedLoader(files, UnmixedPlans(len(files)), args.batch_size,
                                         (224, 224), 32, num_workers=args.workers, seed=rep,
                                         constituent_transform=crop)
                    loader.set_epoch(0)
                own, workers, n = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), 0
                for batch in loader:
                    n += (batch.image if hasattr(batch, "image") else batch[0]).shape[0]
                runs[arm].append(((_cpu(resource.RUSAGE_SELF) - own) / n * 1e3,
                                  (_cpu(resource.RUSAGE_CHILDREN) - workers) / n * 1e3))
    lines.append(f"{args.images} images, {args.workers} workers, batch {args.batch_size}, "
                 f"{args.repeats} interleaved repeats; CPU ms per image, medians")
    for arm, values in runs.items():
        own = statistics.median(v[0] for v in values)
        workers = statistics.median(v[1] for v in values)
        lines.append(f"{arm:7s} training process {own:.3f}  workers {workers:.3f}  "
                     f"total {own + workers:.3f}   per repeat (process, workers): "
                     + ", ".join(f"({a:.3f}, {b:.3f})" for a, b in values))
    lines.append(f"load average after: {os.getloadavg()}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
