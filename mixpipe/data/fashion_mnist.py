"""Fashion-MNIST as shipped by the Debian package ``dataset-fashion-mnist``.

Nothing is downloaded: the package installs the four original IDX files, and this module reads
them, checks they agree with each other, and pads each 28x28 gray image to the 32x32 RGB form the
small-image pipelines expect.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import numpy as np

from .errors import DataError
from .idx import read_idx

__all__ = ["DEFAULT_ROOT", "CLASSES", "SPLIT_FILES", "source_files", "load_labels", "load_split",
           "pad_to_rgb"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
#: Label i is CLASSES[i]; names are safe as folder names (no spaces or slashes).
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle_boot")
#: The package's two IDX sources -> their file prefix. The prepared ``val`` split is carved from
#: ``train`` (:mod:`mixpipe.data.holdout`); ``test`` is the official test set, kept for the record.
SPLIT_FILES = {"train": "train", "test": "t10k"}
PAD = 2


def source_files(root: str, split: str) -> Dict[str, str]:
    """Paths of the split's images and labels files; a clear error if the package is missing."""
    if split not in SPLIT_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; choose one of {list(SPLIT_FILES)}")
    if not os.path.isdir(root):
        raise DataError(f"Fashion-MNIST directory {root} does not exist; install the Debian "
                        "package with `apt-get install dataset-fashion-mnist` (or pass --src DIR "
                        "holding the four *-ubyte.gz files)")
    prefix = SPLIT_FILES[split]
    paths = {"images": os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"),
             "labels": os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing; reinstall it with "
                            "`apt-get install --reinstall dataset-fashion-mnist`")
    return paths


def load_labels(root: str, split: str) -> np.ndarray:
    """All labels of the split (int64[N]); cheap, so a re-run can name files without images."""
    path = source_files(root, split)["labels"]
    labels = read_idx(path)
    if labels.ndim != 1:
        raise DataError(f"{path}: expected a 1-d label file, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{path}: labels outside 0..{len(CLASSES) - 1}")
    return labels.astype(np.int64)


def load_split(root: str, split: str, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(images uint8[N, 28, 28], labels int64[N])``, the first ``limit`` samples if given.

    The whole file is always read and checked, so a damaged file is caught even with a limit.
    """
    paths = source_files(root, split)
    images = read_idx(paths["images"])
    labels = load_labels(root, split)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{paths['images']}: expected uint8 images of shape (N, 28, 28), got "
                        f"{images.dtype} {images.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{paths['labels']}: {labels.shape[0]} labels for {images.shape[0]} "
                        "images")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return np.ascontiguousarray(images), labels


def pad_to_rgb(images: np.ndarray, pad: int = PAD) -> np.ndarray:
    """uint8[N, h, w] gray -> uint8[N, h+2p, w+2p, 3]: zero border, gray copied to R, G and B."""
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)), mode="constant", constant_values=0)
    return np.repeat(padded[..., None], 3, axis=-1)
