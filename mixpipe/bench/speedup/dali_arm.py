"""The DALI loader of ``mixpipe bench speedup`` (``--loader dali``).

The benchmark compares arms that differ only in the plan, so this arm must feed
:func:`mixpipe.train.fit` the same images the torch arm would: the same samples (the first
``--limit`` of the prepared JPEG tree, whose file list is in dataset-index order), the same
per-constituent augmentation, and the same value scale. ``fit`` normalises with
:class:`mixpipe.train.Normalize`, which divides uint8 by 255 but takes float as already in 0..1,
so the pipeline's own normalise step is set to map 0..255 to 0..1 (mean 0, std 255) and the two
paths meet on the same numbers.

A DALI pipeline keeps source worker processes: the benchmark closes the iterator after the arm's
last epoch (and the iterator closes itself at interpreter exit if a run stops early).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import numpy as np

from mixpipe.core.augment import RandomResizedCropFlip
from mixpipe.dali.files import EncodedImages, FileList
from mixpipe.dali.iterator import MixIterator
from mixpipe.dali.pipeline import PipelineSettings, make_train_loader
from mixpipe.dali.source import FixedView
from mixpipe.data.subset import FirstN

__all__ = ["speedup_loader", "FirstImages", "WholeImageFlip", "device_id_of",
           "warm_files"]

#: Pipeline mean/std that turn 0..255 into 0..1, the float scale Normalize expects.
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (255.0, 255.0, 255.0)


@dataclasses.dataclass(frozen=True)
class WholeImageFlip:
    """View: the whole image (resized to its region by the graph), mirrored with probability 1/2.

    The torch arm's ``--augment flip`` does exactly this per constituent.
    """

    def __call__(self, height: int, width: int, region: Tuple[int, int],
                 rng: np.random.Generator) -> Tuple[int, int, int, int, bool]:
        return 0, 0, height, width, bool(rng.random() < 0.5)


class FirstImages(FirstN, EncodedImages):
    """The first ``n`` images of an encoded source (the ``--limit`` subset), usable wherever
    the DALI pipeline takes :class:`EncodedImages`."""


def device_id_of(device: str) -> Optional[int]:
    """DALI ``device_id`` for a torch device string: None (CPU-only DALI) for 'cpu', N for
    'cuda:N' ('cuda' = 0)."""
    kind, _, index = str(device).partition(":")
    if kind == "cpu" and not index:
        return None
    if kind == "cuda" and (not index or index.isdigit()):
        return int(index) if index else 0
    raise ValueError(f"--device {device!r}: the DALI arm runs on 'cpu' or 'cuda[:N]'")


def _view(augment: str):
    if augment == "none":
        return FixedView(flip=False)
    if augment == "flip":
        return WholeImageFlip()
    if augment == "crop":
        return None  # PipelineSettings.view(): random resized crop + flip
    raise ValueError(f"augment must be 'none', 'flip' or 'crop', got {augment!r}")


def _train_images(settings, dataset) -> FirstImages:
    """The JPEG file list of the benchmark's training samples, checked against the dataset."""
    root = settings.prepared_root
    file_list = os.path.join(root, "train_files.txt")
    if not os.path.isfile(file_list):
        raise FileNotFoundError(f"--loader dali reads {file_list}, which does not exist: "
                                f"prepare {root} with `mixpipe data prepare` (it writes the JPEG "
                                "tree and its file list beside the arrays)")
    images = FileList.for_split(root, "train")
    n = len(dataset)
    if n > len(images):
        raise ValueError(f"--loader dali: the benchmark trains on {n} samples but {file_list} "
                         f"lists only {len(images)}; re-run `mixpipe data prepare` for {root}")
    subset = FirstImages(images, n)
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        wrong = np.flatnonzero(labels != subset.labels)
        if wrong.size:
            raise ValueError(f"--loader dali: {file_list} and the training arrays disagree on "
                             f"the label of {wrong.size} of the first {n} samples (first: id "
                             f"{int(wrong[0])}); the file list must be in dataset-index order "
                             f"(re-run `mixpipe data prepare` for {root})")
    return subset


#: Largest training set (encoded bytes) :func:`warm_files` reads ahead; beyond it (ImageNet)
#: the files would not stay cached anyway.
WARM_LIMIT_BYTES = 1 << 30


def warm_files(images: FirstImages, limit_bytes: int = WARM_LIMIT_BYTES) -> int:
    """Read every training file once, so the OS has them cached before the first arm's timing.

    The torch arm's arrays are in memory before any arm starts; without this, the first DALI
    arm alone paid the cold reads (measured here on 8000 Fashion-MNIST JPEGs: 2.7 s of data
    wait in the first arm's first epoch against 0.6 s in the next arm's identical epoch, which
    made the second arm look 9% faster than its forward-input bound). Returns the bytes read, or
    0 when the set is larger than ``limit_bytes`` (then nothing is read).
    """
    paths = [images.base.path(i) for i in range(len(images))] \
        if hasattr(images.base, "path") else []
    if not paths:
        return 0
    total = sum(os.path.getsize(p) for p in paths)
    if total > limit_bytes:
        return 0
    for path in paths:
        with open(path, "rb") as f:
            f.read()
    return total


def pipeline_settings(settings) -> PipelineSettings:
    """The DALI pipeline for the benchmark's image size, stride, augmentation and layout."""
    crop = RandomResizedCropFlip()  # the torch arm's --augment crop settings
    return PipelineSettings(size=(settings.image_size, settings.image_size),
                            stride=settings.stride, scale=crop.scale, ratio=crop.ratio,
                            flip=crop.flip, mean=UNIT_MEAN, std=UNIT_STD,
                            max_constituents=settings.group_size)


def speedup_loader(settings, dataset, service, seed: int, rank: int = 0,
                   world_size: int = 1) -> MixIterator:
    """``make_loader``'s DALI arm: ``settings`` is a :class:`mixpipe.bench.speedup
    .SpeedupSettings`, ``dataset`` the benchmark's training subset (its first ``len(dataset)``
    samples), ``service`` the arm's selection service.

    The pipeline and its workers are started here, the files read once (:func:`warm_files`) and
    the image sizes read ahead (:meth:`SlotSource.read_sizes`), so neither start-up nor cold
    disk reads nor header reads are charged to the first arm's training time.
    """
    images = _train_images(settings, dataset)
    warm_files(images)
    threads = settings.threads if settings.threads and settings.threads >= 1 else 1
    device_id = device_id_of(settings.device)
    iterator = make_train_loader(images, pipeline_settings(settings), settings.batch_size,
                                 service, device_id=device_id, num_threads=threads,
                                 py_num_workers=settings.workers, py_start_method="spawn",
                                 rank=rank, world_size=world_size, seed=seed,
                                 view=_view(settings.augment))
    try:
        iterator.slots.read_sizes()  # before the build, so the workers receive the sizes
        iterator.pipeline.build()
    except BaseException:
        iterator.close()
        raise
    return iterator
