"""Ready-made DALI pipelines: mixed training, plain (unmixed) training, validation.

``pipelines/dali_imagenet.py`` and ``pipelines/dali_small.py`` are these with dataset settings;
the overhead benchmark runs them side by side. One builder per job so that the mixed and the
plain pipeline share every operator after the constituent view (normalise, layout, dtype).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple, Union

from nvidia.dali import fn, pipeline_def, types

from ..core.augment import RandomResizedCropFlip
from .files import EncodedImages, FileList, ListedFiles
from .iterator import MixIterator
from .ops import mix, plan_inputs
from .plans import PlanBoard
from .source import FixedView, SlotSource, RandomView, ViewFn

__all__ = ["PipelineSettings", "open_images", "mixed_train_pipeline", "plain_train_pipeline",
           "val_pipeline", "make_train_loader", "Preset"]

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """What a dataset's pipeline needs to know (frozen; checked on construction).

    size: composite (height, width); stride: the network's total stride (splits snap to it);
    scale/ratio: random resized crop area share and aspect range; mean/std: per channel, 0-255.
    """

    size: Tuple[int, int] = (224, 224)
    stride: int = 32
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    max_constituents: int = 4
    val_resize_shorter: int = 256

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"PipelineSettings.size must be (height, width) >= 1, got "
                             f"{self.size}")
        if self.stride < 1 or min(self.size) < 2 * self.stride:
            raise ValueError(f"PipelineSettings.stride must be >= 1 and leave two cells per "
                             f"side; got stride {self.stride} at size {self.size}")
        RandomResizedCropFlip(self.scale, self.ratio, self.flip)  # validates scale and ratio
        if any(s <= 0 for s in self.std) or len(self.std) != 3 or len(self.mean) != 3:
            raise ValueError(f"PipelineSettings.mean/std need 3 values each, std > 0; got "
                             f"{self.mean}, {self.std}")
        if not 1 <= self.max_constituents <= 64:
            raise ValueError(f"PipelineSettings.max_constituents must be in [1, 64], got "
                             f"{self.max_constituents}")

    def view(self, train: bool = True):
        return RandomView(RandomResizedCropFlip(self.scale, self.ratio, self.flip)) if train \
            else FixedView()


def open_images(data: str, split: str = "train") -> EncodedImages:
    """A prepared directory (``OUT/<split>_files.txt``) or a class-folder tree
    (``data/<split>/<class>/...``)."""
    if os.path.isfile(os.path.join(data, f"{split}_files.txt")):
        return FileList.for_split(data, split)
    if os.path.isfile(data):
        return FileList(data)
    return ListedFiles.from_tree(data, split)


def _normalize(images, settings: PipelineSettings):
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    mean=list(settings.mean), std=list(settings.std))


def _device_of(device_id: Optional[int]) -> str:
    return "cpu" if device_id is None else "mixed"


def mixed_train_pipeline(slots: SlotSource, settings: PipelineSettings, batch_size: int,
                         device_id: Optional[int] = 0, num_threads: int = 4,
                         py_num_workers: int = 4, py_start_method: str = "spawn",
                         parallel: bool = True, prefetch_queue_depth: int = 2,
                         seed: Optional[int] = None):
    """The mixing training pipeline: slot source -> per-constituent view -> mix -> normalise."""

    @pipeline_def(enable_conditionals=True, batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id, py_num_workers=py_num_workers,
                  py_start_method=py_start_method, prefetch_queue_depth=prefetch_queue_depth,
                  seed=seed)
    def build():
        inputs = plan_inputs(slots, parallel=parallel, prefetch_queue_depth=prefetch_queue_depth)
        images = _normalize(mix(inputs, device=_device_of(device_id)), settings)
        return (images, inputs.targets, inputs.weights, inputs.ids, inputs.layout,
                inputs.loss_scale)

    return build()


def plain_train_pipeline(file_root: str, file_list: str, settings: PipelineSettings,
                         batch_size: int, device_id: Optional[int] = 0, num_threads: int = 4,
                         seed: Optional[int] = None, shard_id: int = 0,
                         num_shards: int = 1):
    """The standard DALI training pipeline without mixpipe (the reference in benchmarks).

    File reader, ROI random-crop decode, resize to ``size``, random mirror, normalise; outputs
    ``(images, labels)``.
    """

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def build():
        encoded, labels = fn.readers.file(file_root=file_root, file_list=file_list,
                                          random_shuffle=True, shard_id=shard_id,
                                          num_shards=num_shards, name="reader")
        images = fn.decoders.image_random_crop(encoded, device=_device_of(device_id),
                                               output_type=types.RGB,
                                               random_area=list(settings.scale),
                                               random_aspect_ratio=list(settings.ratio))
        images = fn.resize(images, size=list(map(float, settings.size)), antialias=True,
                           interp_type=types.INTERP_LINEAR)
        if settings.flip:
            images = fn.flip(images, horizontal=fn.random.coin_flip())
        return _normalize(images, settings), labels

    return build()


def val_pipeline(file_root: str, file_list: str, settings: PipelineSettings, batch_size: int,
                 device_id: Optional[int] = 0, num_threads: int = 4, shard_id: int = 0,
                 num_shards: int = 1):
    """Validation: decode, resize the shorter side, centre crop ``size``, normalise; in order."""

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id)
    def build():
        encoded, labels = fn.readers.file(file_root=file_root, file_list=file_list,
                                          random_shuffle=False, shard_id=shard_id,
                                          num_shards=num_shards, name="reader")
        images = fn.decoders.image(encoded, device=_device_of(device_id), output_type=types.RGB)
        if settings.val_resize_shorter > min(settings.size):
            images = fn.resize(images, resize_shorter=float(settings.val_resize_shorter),
                               antialias=True, interp_type=types.INTERP_LINEAR)
        else:
            images = fn.resize(images, size=list(map(float, settings.size)), antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          crop=list(settings.size), mean=list(settings.mean),
                                          std=list(settings.std))
        return images, labels

    return build()


def make_train_loader(data: Union[str, EncodedImages], settings: PipelineSettings,
                      batch_size: int, plans=None,
                      device_id: Optional[int] = 0, num_threads: int = 4, py_num_workers: int = 4,
                      py_start_method: str = "spawn", rank: int = 0, world_size: int = 1,
                      seed: int = 0, split: str = "train",
                      board: Optional[PlanBoard] = None, *,
                      view: Optional[ViewFn] = None) -> MixIterator:
    """A :class:`MixIterator` over ``data`` (prepared directory or class-folder tree, or an
    :class:`EncodedImages` already opened, e.g. a subset).

    ``plans``: a SelectionService, a server URL, anything with ``plan(epoch, rank, world)``, or
    None for no mixing. ``view``: each constituent's crop and flip (default: ``settings.view()``).
    """
    images = data if isinstance(data, EncodedImages) else open_images(data, split)
    slots = SlotSource(images, board or PlanBoard.temporary(), settings.size, settings.stride,
                       settings.max_constituents,
                       view if view is not None else settings.view(train=True), seed)
    pipe = mixed_train_pipeline(slots, settings, batch_size, device_id, num_threads,
                                max(1, py_num_workers), py_start_method,
                                parallel=py_num_workers > 0,
                                seed=seed)
    return MixIterator(pipe, slots, plans, rank, world_size, shuffle=True, seed=seed)


def file_list_args(data: str, split: str) -> Tuple[str, str]:
    """(file_root, file_list) for ``fn.readers.file`` from a prepared directory."""
    file_list = os.path.join(data, f"{split}_files.txt")
    if not os.path.isfile(file_list):
        raise FileNotFoundError(f"{file_list} not found: run `mixpipe data prepare` first (the "
                                "plain and validation pipelines read its file list)")
    images = FileList.for_split(data, split)
    return images.root, file_list


class Preset:
    """A dataset's ready pipelines: the loaders above with its :class:`PipelineSettings` bound.

    The files in ``pipelines/`` differ only in their settings; each is one ``Preset``, so a fix to
    how a preset builds its loaders lands in every dataset's pipeline at once.
    """

    def __init__(self, settings: PipelineSettings, py_num_workers: int = 4) -> None:
        self.settings = settings
        #: source worker processes by default; 0 runs the plan source in the pipeline's process
        self.py_num_workers = int(py_num_workers)

    def train_loader(self, data: str, batch_size: int = 256, plans=None,
                     device_id: Optional[int] = 0, **kwargs) -> MixIterator:
        """:class:`MixIterator` over the training split (keywords: :func:`make_train_loader`)."""
        kwargs.setdefault("py_num_workers", self.py_num_workers)
        return make_train_loader(data, self.settings, batch_size, plans, device_id, **kwargs)

    def val(self, data: str, batch_size: int = 256, device_id: Optional[int] = 0, **kwargs):
        """The validation pipeline (outputs ``images, labels``) over ``OUT/val_files.txt``."""
        root, file_list = file_list_args(data, "val")
        return val_pipeline(root, file_list, self.settings, batch_size, device_id, **kwargs)

    def main(self, description: str, argv=None) -> int:
        """The preset's command line (:func:`cli_main`)."""
        return cli_main(self.settings, description, argv)


# ----------------------------------------------------------------------------- command line
def add_cli_arguments(parser, settings: PipelineSettings) -> None:
    parser.add_argument("--data", required=True,
                        help="prepared directory (OUT with <split>_files.txt) or class-folder tree")
    parser.add_argument("--split", default=None, help="default: train, or val with --val")
    parser.add_argument("--val", action="store_true", help="run the validation pipeline")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=50, help="batches to time")
    parser.add_argument("--cpu", action="store_true", help="CPU-only DALI (device_id=None)")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--threads", type=int, default=4, help="DALI CPU threads")
    parser.add_argument("--workers", type=int, default=2, help="source worker processes")
    parser.add_argument("--start-method", default="spawn", choices=("spawn", "fork"))
    mix_group = parser.add_mutually_exclusive_group()
    mix_group.add_argument("--mix", type=float, default=0.0,
                           help="fraction of samples mixed by the `random` policy (in-process)")
    mix_group.add_argument("--server", default=None, help="selection server URL (mixpipe serve)")
    parser.add_argument("--layout", default="halves", choices=("halves", "quads", "blend"))
    parser.add_argument("--seed", type=int, default=0)


def run_cli(args, settings: PipelineSettings) -> int:
    """Run ``--batches`` batches and print throughput (a smoke test, not a benchmark)."""
    import time

    from .iterator import close_pipeline

    device_id = None if args.cpu else args.device_id
    if args.val:
        root, file_list = file_list_args(args.data, args.split or "val")
        pipe = val_pipeline(root, file_list, settings, args.batch_size, device_id, args.threads)
        pipe.build()
        start, seen = time.perf_counter(), 0
        for _ in range(args.batches):
            images, _labels = pipe.run()
            seen += len(images)
        elapsed = time.perf_counter() - start
        print(f"val: {seen} images in {elapsed:.2f} s = {seen / elapsed:.1f} images/s")
        close_pipeline(pipe)
        return 0
    images = open_images(args.data, args.split or "train")
    plans = args.server
    if plans is None and args.mix > 0:
        from ..server import InProcessService

        cells = settings.size[1] // settings.stride
        plans = InProcessService(len(images), {"policy": "random", "fraction": args.mix,
                                               "layout": args.layout, "grid_cells": cells},
                                 seed=args.seed)
    loader = make_train_loader(args.data, settings, args.batch_size, plans, device_id,
                               args.threads, args.workers, args.start_method, seed=args.seed,
                               split=args.split or "train")
    def endless():
        while True:  # epoch after epoch; the iterator fetches each epoch's plan
            yield from loader

    with loader:
        start, slots, sources, done = time.perf_counter(), 0, 0, 0
        for done, batch in enumerate(endless(), 1):
            real = batch.loss_scale > 0
            slots += int(real.any(dim=1).sum())
            sources += int(real.sum())
            if done == 1:
                print(f"plan: {loader.walk}")
                print(f"batch: image {tuple(batch.image.shape)} {batch.image.dtype}, "
                      f"targets {tuple(batch.targets.shape)}")
                start, slots, sources = time.perf_counter(), 0, 0  # skip warm-up
            if done >= args.batches:
                break
        elapsed = time.perf_counter() - start
    print(f"train: {done - 1} timed batches, {sources} source images in {slots} composites, "
          f"{elapsed:.2f} s = {sources / max(elapsed, 1e-9):.1f} source images/s, "
          f"{slots / max(elapsed, 1e-9):.1f} composites/s")
    return 0


def cli_main(settings: PipelineSettings, description: str, argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=description)
    add_cli_arguments(parser, settings)
    return run_cli(parser.parse_args(argv), settings)
