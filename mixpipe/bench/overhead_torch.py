"""``mixpipe bench overhead --loader torch``: what mixing costs a torch DataLoader.

Arms, interleaved and rotated over repeats in one process, each over the same images with the
same workers and batch size:

* ``plain``: what a user's torch loader does without mixpipe (torchvision's ImageFolder with
  RandomResizedCrop and RandomHorizontalFlip): pillow decode, one pillow crop-and-resize to the
  output size, mirror; the crop drawn by the mixing loader's own rule, so only the machinery
  differs;
* ``mix 0%``: :class:`mixpipe.torch.MixedLoader` with :class:`RandomResizedCropFlip` on the
  no-mixing plan;
* ``mix 50%`` / ``mix 90%``: the same with plans of the ``random`` policy mixing that fraction
  of the samples (HALVES by default).

Per arm: source images per second, composites per second, and CPU seconds per source image:
this process's CPU time plus that of its reaped children. The workers are not persistent, so
each epoch's workers are joined (reaped) when the epoch ends and their whole share lands in
``RUSAGE_CHILDREN``. Medians over repeats; ratios against ``plain`` and ``mix 0%``; each run
records the load average it ended at.

Datasets: generated JPEGs of varied size (shorter side 256-500 px, output 224) and, when
prepared, the first Fashion-MNIST training images (output 32).
"""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .common import (SOURCE_COLUMNS, add_overhead_arguments, add_ratios, interleaved_runs,
                     overhead_table, parse_fractions, plain_ratio_target, stat,
                     summarize_arms, write_overhead)

__all__ = ["add_arguments", "run", "Files", "PlainImages", "measure_epoch"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_overhead_arguments(parser, "torch")
    parser.add_argument("--sizes", default="224,32",
                        help="output sizes to measure: 224 (generated JPEGs), 32 (Fashion-MNIST)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--num-fashion", type=int, default=None,
                        help="Fashion-MNIST training images used")


# ----------------------------------------------------------------------------- data
class Files:
    """The first ``limit`` lines of ``root/<split>_files.txt``; ``ds[i]`` decodes with pillow.

    Not :class:`mixpipe.data.FileListDataset`: the generated tree has no prepare manifest, and
    both arms need only paths and labels.
    """

    def __init__(self, root: str, split: str = "train", limit: Optional[int] = None) -> None:
        from ..data.writers import read_file_list

        relpaths, labels = read_file_list(os.path.join(root, f"{split}_files.txt"))
        n = len(relpaths) if limit is None else min(int(limit), len(relpaths))
        self.paths = [os.path.join(os.path.abspath(root), rel) for rel in relpaths[:n]]
        self.labels = labels[:n]

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return self.paths[i]

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        """A decoded RGB pillow image, as torchvision's ``ImageFolder`` gives one."""
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return image.convert("RGB"), int(self.labels[i])


class PlainImages:
    """The plain arm's dataset: decode, one pillow crop-and-resize, mirror; CHW uint8."""

    def __init__(self, base: Files, size: int, scale: Tuple[float, float],
                 ratio: Tuple[float, float], seed: int) -> None:
        self.base, self.size, self.scale, self.ratio, self.seed = base, size, scale, ratio, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        import torch
        from PIL import Image

        from ..core.augment import random_resized_crop_box

        rng = np.random.default_rng([self.seed, i])
        with Image.open(self.base.path(i)) as image:
            image = image.convert("RGB")
            top, left, h, w = random_resized_crop_box(image.height, image.width, self.scale,
                                                      self.ratio, rng)
            image = image.resize((self.size, self.size), Image.BILINEAR,
                                 box=(left, top, left + w, top + h))
        array = np.asarray(image)
        if rng.random() < 0.5:
            array = array[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), \
            int(self.base.labels[i])


# ----------------------------------------------------------------------------- measuring
def _cpu_now() -> float:
    """This process's CPU time plus that of its reaped children (the epoch's workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def measure_epoch(batches: Callable[[], Iterable[Any]], mixed: bool) -> Dict[str, float]:
    """One whole epoch, workers started and joined inside the timed span: wall and CPU seconds
    (workers included), source images and composites. ``mixed``: the batches are mixpipe's
    (count constituents by their loss scales), else plain ``(images, labels)`` pairs."""
    sources = composites = 0
    cpu0, t0 = _cpu_now(), time.perf_counter()
    iterator = iter(batches())
    for batch in iterator:
        if mixed:
            real = batch.loss_scale > 0
            sources += int(real.sum())
            composites += int(real.any(dim=1).sum())
        else:
            sources += len(batch[1])
            composites += len(batch[1])
    del iterator  # a non-persistent iterator has joined its workers by now; this makes sure
    return {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_now() - cpu0,
            "source_images": sources, "composites": composites}


def _bench_dataset(name: str, files: Files, size: int, stride: int,
                   scale: Tuple[float, float], args: argparse.Namespace, batch_size: int,
                   repeats: int, fractions: List[float], progress: bool) -> Dict[str, Any]:
    from torch.utils.data import DataLoader

    from ..core.augment import RandomResizedCropFlip
    from ..core.source import UnmixedPlans
    from ..server import InProcessService
    from ..torch import MixedLoader

    crop = RandomResizedCropFlip(scale=scale)
    cells = size // stride
    arms = ["plain"] + [f"mix {int(round(f * 100))}%" for f in fractions]

    def measure(arm: str, rep: int) -> Dict[str, float]:
        if arm == "plain":
            plain = PlainImages(files, size, crop.scale, crop.ratio, rep)
            return measure_epoch(lambda: DataLoader(plain, batch_size, shuffle=True,
                                             num_workers=args.workers), mixed=False)
        f = fractions[arms.index(arm) - 1]
        source = UnmixedPlans(len(files)) if f <= 0 else InProcessService(
            len(files), {"policy": "random", "fraction": f, "layout": args.layout,
                         "grid_cells": cells}, seed=rep)
        loader = MixedLoader(files, source, batch_size, (size, size), stride,
                             num_workers=args.workers, seed=rep, constituent_transform=crop)
        loader.set_epoch(0)
        return measure_epoch(lambda: loader, mixed=True)

    runs = interleaved_runs(arms, repeats, measure, name, progress)
    summary = summarize_arms(runs)
    add_ratios(summary, "plain", "plain")
    add_ratios(summary, "mix 0%", "mix0")
    return {"num_samples": len(files), "settings": {"size": [size, size], "stride": stride,
                                                     "scale": list(scale)},
            "arms": summary}


#: Issue 32's targets: CPU per source image against the plain torch loader at every mix.
TARGETS = {224: 1.05, 32: 1.3}


def _targets(result: Dict[str, Any]) -> Dict[str, object]:
    arms = result["arms"]
    size = result["settings"]["size"][0]
    target = TARGETS.get(size)
    mix_arms = [a for a in arms if a.startswith("mix ")]
    if target is None or "plain" not in arms or not mix_arms:
        return {}
    return {f"cpu_per_source_image_at_most_{target}x_plain_torch":
            plain_ratio_target(arms, mix_arms, target)}


_COLUMNS = SOURCE_COLUMNS + [
    ("CPU/plain", 10, stat("cpu_per_image_vs_plain")),
    ("CPU/mix0", 9, stat("cpu_per_image_vs_mix0")),
    ("thru/plain", 11, stat("throughput_vs_plain")),
    ("load1", 6, stat("load_average_1min_median"))]


def _table(name: str, result: Dict[str, Any]) -> str:
    return overhead_table(f"{name}: {result['num_samples']} images, output "
                          f"{result['settings']['size']}", result["arms"], _COLUMNS,
                          _targets(result))


def _sizes(text: str) -> List[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise SystemExit(f"--sizes must be a comma list of 224 and/or 32, got {text!r}") from err
    if not sizes or any(s not in TARGETS for s in sizes):
        raise SystemExit(f"--sizes must be a comma list of 224 and/or 32, got {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int:
    from .overhead_dali import generate_tree

    quick = args.quick
    batch_size = args.batch_size or 32
    repeats = args.repeats or (3 if quick else 5)
    fractions = parse_fractions(args.fractions)
    sizes = _sizes(args.sizes)
    num_generated = args.num_generated or (256 if quick else 1024)
    num_fashion = args.num_fashion or (4096 if quick else 16384)
    progress = not args.no_progress
    notes: List[str] = []
    load_before = os.getloadavg()
    datasets: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mixpipe-bench-torch-") as work:
        if 224 in sizes:
            generate_tree(work, num_generated, progress=progress, shapes=args.shapes)
            datasets["generated_224px"] = _bench_dataset(
                "generated 224px JPEGs", Files(work), 224, 32, (0.08, 1.0), args, batch_size,
                repeats, fractions, progress)
        if 32 in sizes:
            if os.path.isfile(os.path.join(args.fashion, "train_files.txt")):
                datasets["fashion_mnist_32px"] = _bench_dataset(
                    "Fashion-MNIST 32px", Files(args.fashion, limit=num_fashion), 32, 8,
                    (0.35, 1.0), args, batch_size * 4, repeats, fractions, progress)
            else:
                notes.append(f"Fashion-MNIST skipped: {args.fashion}/train_files.txt not found "
                             "(run `mixpipe data prepare` first)")
    settings = {"quick": quick, "batch_size": batch_size, "repeats": repeats,
                "fractions": fractions, "layout": args.layout, "workers": args.workers,
                "sizes": sizes, "num_generated": num_generated, "shapes": args.shapes,
                "num_fashion": num_fashion, "fashion_batch_size": batch_size * 4,
                "timed_unit": "whole epochs"}
    write_overhead(args.out, "overhead_torch", settings, datasets, _targets, notes, load_before,
                   _table, command=shlex.join(["mixpipe"] + sys.argv[1:]),
                   plain_loader="torch DataLoader: pillow decode + random resized crop (one "
                                "pillow resize) + flip",
                   mixing_loader="mixpipe.torch.MixedLoader + core RandomResizedCropFlip")
    return 0
