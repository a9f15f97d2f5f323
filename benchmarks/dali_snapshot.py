"""Freeze what the DALI mixing path delivers, to prove a rework changed no byte of it.

    PYTHONPATH=. python benchmarks/dali_snapshot.py write before.npz        # on the old code
    PYTHONPATH=. python benchmarks/dali_snapshot.py write after.npz         # on the new code
    PYTHONPATH=. python benchmarks/dali_snapshot.py compare before.npz after.npz

A fixed workload: 42 generated JPEGs of assorted sizes, two epochs of plans that hold every
layout (SINGLE, HALVES, QUADS, BLEND of 2 and 3), random resized crops with mirrors
(``RandomView``), CPU-only DALI, the source in-process and in two worker processes, images held
in memory and read from files (``--files``). Every field of every batch is stored; ``compare``
names each array that differs. The tests check composites against the core composer within
DALI's resampling tolerance; this checks that a rework of the adapter itself is bit for bit
neutral.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _jpegs() -> list:
    from PIL import Image

    rng = np.random.default_rng(11)
    out = []
    for i in range(42):
        h, w = (int(x) for x in rng.integers(28, 70, 2))
        y, x = np.mgrid[0:h, 0:w]
        a, b = rng.uniform(0.5, 3.0, 2)
        image = np.stack([127 + 120 * np.sin(x / w * a * 3 + y / h * b),
                          127 + 120 * np.cos(y / h * b * 3), (x * 255 // w + i * 40) % 256], -1)
        buf = io.BytesIO()
        Image.fromarray(image.astype(np.uint8)).save(buf, format="JPEG", quality=95,
                                                     subsampling=0)
        out.append(buf.getvalue())
    return out


def _plans(n: int) -> list:
    from mixpipe.core.plan import Layout, MixPlan

    kinds = [(1, Layout.SINGLE, [1.0]), (2, Layout.HALVES, [0.25, 0.75]),
             (2, Layout.BLEND, [0.4, 0.6]), (4, Layout.QUADS, [0.125, 0.375, 0.125, 0.375]),
             (3, Layout.BLEND, [0.2, 0.3, 0.5])]
    plans = []
    for epoch in (0, 1):
        order = np.random.default_rng(5 + epoch).permutation(n).tolist()
        slots, i, k = [], 0, epoch
        while i < n:
            count, layout, weights = kinds[k % len(kinds)]
            if i + count > n:
                count, layout, weights = 1, Layout.SINGLE, [1.0]
            slots.append((order[i:i + count], weights, layout))
            i, k = i + count, k + 1
        plans.append(MixPlan.from_slots(slots, n, epoch=epoch))
    return plans


def write(out: str, files: bool) -> None:
    from nvidia.dali import pipeline_def

    from mixpipe.dali import (FixedPlans, InMemoryImages, ListedFiles, MixIterator, PlanBoard,
                              RandomView, SlotSource, mix, plan_inputs)

    encoded = _jpegs()
    labels = [i % 5 for i in range(len(encoded))]
    if files:
        root = tempfile.mkdtemp(prefix="mixpipe-snapshot-")
        names = [f"{i}.jpg" for i in range(len(encoded))]
        for name, data in zip(names, encoded):
            with open(os.path.join(root, name), "wb") as handle:
                handle.write(data)
        images = ListedFiles(root, names, labels)
    else:
        images = InMemoryImages(encoded, labels)
    source = SlotSource(images, PlanBoard.temporary(), (48, 64), stride=8, view=RandomView(),
                        seed=3)
    arrays = {}
    for parallel in (False, True):
        @pipeline_def(enable_conditionals=True, batch_size=4, num_threads=1, device_id=None,
                      py_num_workers=2, py_start_method="fork")
        def pipe():
            inputs = plan_inputs(source, parallel=parallel)
            return (mix(inputs), inputs.targets, inputs.weights, inputs.ids, inputs.layout,
                    inputs.loss_scale)

        with MixIterator(pipe(), source, FixedPlans(*_plans(len(encoded))), seed=1) as it:
            for epoch in range(2):
                it.set_epoch(epoch)
                for b, batch in enumerate(it):
                    for key in ("image", "ids", "weights", "targets", "layout", "loss_scale"):
                        arrays[f"p{int(parallel)}-e{epoch}-b{b}-{key}"] = \
                            getattr(batch, key).numpy()
    np.savez_compressed(out, **arrays)
    print(f"{out}: {len(arrays)} arrays ({'files' if files else 'in memory'})")


def compare(a: str, b: str) -> int:
    first, second = np.load(a), np.load(b)
    if sorted(first.files) != sorted(second.files):
        print(f"different batches: {len(first.files)} against {len(second.files)} arrays")
        return 1
    differing = [k for k in first.files if not np.array_equal(first[k], second[k])]
    print(f"{len(first.files)} arrays, {len(differing)} differ" +
          (": " + ", ".join(differing[:10]) if differing else " (bit-identical)"))
    return 1 if differing else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("out")
    w.add_argument("--files", action="store_true", help="read the images from files")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.out, args.files)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
