"""Ready FFCV train/val loaders with mixing, parameterised by one frozen settings object.

``pipelines/ffcv_imagenet.py`` and ``pipelines/ffcv_small.py`` are these with ImageNet-style and
Fashion-MNIST settings. On the CPU the image is normalised in FFCV's compiled stage (NormalizeImage
must precede ToTensor there); with a CUDA device it is moved first and normalised on the GPU, the
order FFCV's own ImageNet example uses.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

from ..core.source import UnmixedPlans

__all__ = ["FFCVSettings", "UnmixedPlans", "train_loader", "val_loader", "image_pipeline",
           "write_beton_from_tree"]


@dataclasses.dataclass(frozen=True)
class FFCVSettings:
    """What a ready pipeline fixes.

    size: composite (height, width); stride: the network's total stride (region boundaries);
    scale, ratio: random resized crop per constituent; flip_prob: per-constituent mirror;
    mean, std: per-channel normalisation in 0..255 units; val_ratio: centre-crop share at
    validation; max_constituents: the largest K a plan may use; resize: "reference" (equal to the
    core composer) or "fast" (FFCV's OpenCV resize; see MixImageDecoder).
    """

    size: Tuple[int, int] = (224, 224)
    stride: int = 32
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: Tuple[float, float, float] = (58.395, 57.12, 57.375)
    val_ratio: float = 224 / 256
    max_constituents: int = 4
    resize: str = "reference"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"FFCVSettings.size must be (height, width) >= 1, got {self.size}")
        if self.stride < 1 or min(self.size) < 2 * self.stride:
            raise ValueError(f"FFCVSettings.stride must be >= 1 and fit twice in size "
                             f"{self.size}, got {self.stride}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"FFCVSettings.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"FFCVSettings.ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"FFCVSettings.flip_prob must lie in [0, 1], got {self.flip_prob}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("FFCVSettings.mean and std need 3 values each, std > 0")
        if not 0 < self.val_ratio <= 1:
            raise ValueError(f"FFCVSettings.val_ratio must lie in (0, 1], got {self.val_ratio}")
        if self.resize not in ("reference", "fast"):
            raise ValueError(f"FFCVSettings.resize must be 'reference' or 'fast', "
                             f"got {self.resize!r}")
        if self.max_constituents < 1:
            raise ValueError(f"FFCVSettings.max_constituents must be >= 1, "
                             f"got {self.max_constituents}")


def image_pipeline(decoder, settings: FFCVSettings, device=None) -> list:
    """The decoder followed by FFCV's normalisation and tensor conversion ([B, C, H, W])."""
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    mean, std = np.array(settings.mean), np.array(settings.std)
    if device is None or str(device) == "cpu":
        return [decoder, NormalizeImage(mean, std, np.float32), ToTensor(),
                ToTorchImage(channels_last=False)]
    import torch

    return [decoder, ToTensor(), ToDevice(torch.device(device), non_blocking=True),
            ToTorchImage(), NormalizeImage(mean, std, np.float16)]


def _label_pipeline(device=None) -> list:
    from ffcv.transforms import ToDevice, ToTensor

    from .decoders import MixLabelDecoder

    ops = [MixLabelDecoder(), ToTensor()]
    if device is not None and str(device) != "cpu":
        import torch

        ops.append(ToDevice(torch.device(device), non_blocking=True))
    return ops


def train_loader(beton: str, settings: FFCVSettings, batch_size: int, plans, *, rank: int = 0,
                 world_size: int = 1, num_workers: int = -1, device=None, **kwargs):
    """:class:`MixLoader` over ``beton`` with random resized crops per constituent.

    ``plans`` None trains unmixed (every sample alone, index order)."""
    from ffcv.reader import Reader

    from .decoders import RandomResizedCropMixDecoder
    from .loader import MixLoader

    if plans is None:
        plans = UnmixedPlans(int(Reader(beton).num_samples))
    decoder = RandomResizedCropMixDecoder(settings.size, settings.scale, settings.ratio,
                                          settings.stride, settings.flip_prob, settings.resize)
    return MixLoader(beton, batch_size, plans, rank=rank, world_size=world_size,
                     num_workers=num_workers, max_constituents=settings.max_constituents,
                     pipelines={"image": image_pipeline(decoder, settings, device),
                                "label": _label_pipeline(device)}, **kwargs)


def val_loader(beton: str, settings: FFCVSettings, batch_size: int, *, rank: int = 0,
               world_size: int = 1, num_workers: int = -1, device=None, **kwargs):
    """Unmixed, centre-cropped :class:`MixLoader` (same batch type as training)."""
    from ffcv.reader import Reader

    from .decoders import CenterCropMixDecoder
    from .loader import MixLoader

    plans = UnmixedPlans(int(Reader(beton).num_samples))
    decoder = CenterCropMixDecoder(settings.size, settings.val_ratio, settings.stride,
                                   settings.resize)
    return MixLoader(beton, batch_size, plans, rank=rank, world_size=world_size,
                     num_workers=num_workers, max_constituents=1,
                     pipelines={"image": image_pipeline(decoder, settings, device),
                                "label": _label_pipeline(device)}, **kwargs)


class _TreeImages:
    """``ds[i] -> (RGB HWC uint8, label)`` over a class-folder JPEG tree, ids in a fixed order.

    With ``ROOT/<split>_files.txt`` (what ``mixpipe data prepare`` writes) line i is sample i;
    without it, classes are the sorted sub-folders of ``ROOT/<split>`` and files are sorted.
    """

    _EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

    def __init__(self, root: str, split: str):
        import os

        from ..data.writers import read_file_list

        listing = os.path.join(root, f"{split}_files.txt")
        if os.path.isfile(listing):
            relpaths, labels = read_file_list(listing)
        else:
            base = os.path.join(root, split)
            if not os.path.isdir(base):
                raise FileNotFoundError(f"neither {listing} nor the class folders {base}/ exist")
            classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
            relpaths, labels = [], []
            for label, name in enumerate(classes):
                for f in sorted(os.listdir(os.path.join(base, name))):
                    if f.lower().endswith(self._EXTS):
                        relpaths.append(os.path.join(split, name, f))
                        labels.append(label)
            if not relpaths:
                raise FileNotFoundError(f"no images under {base}/<class>/")
        self.paths = [os.path.join(root, p) for p in relpaths]
        self.labels = np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ..data.writers import load_rgb

        return load_rgb(self.paths[i]), int(self.labels[i])


def write_beton_from_tree(root: str, split: str, out: str, max_side: Optional[int] = 512,
                          quality: int = 90, workers: int = 1) -> str:
    """Write a class-folder JPEG tree (``ROOT/<split>/<class>/*``) as an FFCV .beton.

    Sample ids follow ``ROOT/<split>_files.txt`` when present, else sorted class folders and
    files. Images are shrunk so the longer side is at most ``max_side`` (None: kept).
    """
    from ..data.writers import write_beton

    write_beton(out, _TreeImages(root, split), quality, max_side=max_side, workers=workers)
    return out


# ----------------------------------------------------------------------------- command line
def _plans_from_args(args, num_samples: int, settings: FFCVSettings):
    if args.server:
        from ..server.client import connect

        return connect(args.server)
    if args.mix > 0:
        from ..server import InProcessService

        cells = settings.size[1] // settings.stride
        return InProcessService(num_samples, {"policy": "random", "fraction": args.mix,
                                              "layout": args.layout, "grid_cells": cells},
                                seed=args.seed)
    return UnmixedPlans(num_samples)


def cli_main(settings: FFCVSettings, description: str, argv=None, write_tree: bool = False) -> int:
    """Smoke-run a ready pipeline: time ``--batches`` batches (not a benchmark)."""
    import argparse
    import os
    import time

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, help="prepared directory holding <split>.beton")
    parser.add_argument("--split", default=None, help="default: train, or val with --val")
    parser.add_argument("--val", action="store_true", help="the validation loader")
    if write_tree:
        parser.add_argument("--write-beton", action="store_true",
                            help="first write <split>.beton from <split>_files.txt (JPEG tree)")
        parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--workers", type=int, default=-1, help="FFCV threads (-1: all cores)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--mix", type=float, default=0.0,
                       help="fraction mixed by the `random` policy (in-process service)")
    group.add_argument("--server", default=None, help="selection server URL (mixpipe serve)")
    parser.add_argument("--layout", default="halves", choices=("halves", "quads", "blend"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    split = args.split or ("val" if args.val else "train")
    beton = os.path.join(args.data, f"{split}.beton")
    if write_tree and args.write_beton:
        write_beton_from_tree(args.data, split, beton, max_side=args.max_side)
    if not os.path.isfile(beton):
        raise SystemExit(f"{beton} not found: run `mixpipe data prepare` (or --write-beton)")
    if args.val:
        loader = val_loader(beton, settings, args.batch_size, num_workers=args.workers)
    else:
        from ffcv.reader import Reader

        plans = _plans_from_args(args, int(Reader(beton).num_samples), settings)
        loader = train_loader(beton, settings, args.batch_size, plans, num_workers=args.workers)
    done, sources, slots = 0, 0, 0
    start = time.perf_counter()
    while done < args.batches:
        for batch in loader:
            done += 1
            if done == 1:
                print(f"epoch plan: {loader.plan.num_slots} slots; batch: image "
                      f"{tuple(batch.image.shape)} {batch.image.dtype}, targets "
                      f"{tuple(batch.targets.shape)}")
                start = time.perf_counter()  # skip the compile / warm-up batch
                continue
            real = batch.loss_scale > 0
            sources += int(real.sum())
            slots += int(real.any(dim=1).sum())
            if done >= args.batches:
                break
    elapsed = max(time.perf_counter() - start, 1e-9)
    print(f"{done - 1} timed batches: {sources} source images in {slots} composites, "
          f"{sources / elapsed:.1f} source images/s, {slots / elapsed:.1f} composites/s")
    return 0
