"""Map-style datasets over a prepared directory, for the torch loader and for tests.

Both refuse an artifact whose manifest is missing or whose content no longer matches it, so a
directory left half-written by an interrupted ``mixpipe data prepare`` is never read.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Tuple

import numpy as np

from .artifacts import check_artifact, read_manifest
from .errors import DataError
from .prepare import artifact_paths
from .writers import check_arrays, foreign_beton, load_rgb, read_file_list

__all__ = ["ArrayDataset", "FileListDataset", "Prepared", "find_prepared", "require_artifact",
           "read_classes"]

_KINDS = ("images", "files", "arrays", "beton")


def read_classes(root: str) -> List[str]:
    """Class names by label. A ``classes.txt`` written by hand (no manifest) is read as well, so
    .beton files written with FFCV's own ``DatasetWriter`` only need that one file beside them."""
    plain = os.path.join(os.path.abspath(root), "classes.txt")
    if read_manifest(os.path.abspath(root), "classes") is None and os.path.isfile(plain):
        path = plain
    else:
        path = require_artifact(root, "classes", "classes.txt")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def require_artifact(root: str, name: str, relpath: str, check=None) -> str:
    """Path of a complete artifact, or a :class:`DataError` saying how to make it."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root} does not exist; create it with `mixpipe data prepare`")
    reason = check_artifact(root, name, relpath, check=check)
    if reason is not None:
        raise DataError(f"{os.path.join(root, relpath)} cannot be used: {reason}; run "
                        "`mixpipe data prepare` again on this directory")
    return os.path.join(root, relpath)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a prepared directory holds: complete artifacts only, by split and kind."""

    root: str
    classes: Tuple[str, ...]
    splits: Dict[str, Dict[str, str]]  # split -> kind (images/files/arrays/beton) -> path
    samples: Dict[str, int]

    def path(self, split: str, kind: str) -> str:
        try:
            return self.splits[split][kind]
        except KeyError:
            raise DataError(f"{self.root} has no complete {kind!r} for split {split!r} "
                            f"(has: {self.splits.get(split, {})}); run `mixpipe data prepare`"
                            ) from None


def find_prepared(root: str, splits: Tuple[str, ...] = ("train", "val")) -> Prepared:
    """Inventory of ``root``; artifacts of one split must agree on the sample count."""
    root = os.path.abspath(root)
    classes = tuple(read_classes(root))
    found: Dict[str, Dict[str, str]] = {}
    samples: Dict[str, int] = {}
    for split in splits:
        for kind, rel in artifact_paths(root, split).items():
            name = f"{split}.{kind}"
            if kind == "beton" and read_manifest(root, name) is None:
                # a .beton from FFCV's own DatasetWriter: no manifest, checked by structure
                count, _ = foreign_beton(os.path.join(root, rel))
                if count is None or any(e.startswith(f".tmp-{name}-") for e in os.listdir(root)):
                    continue
            elif read_manifest(root, name) is None or check_artifact(root, name,
                                                                     rel) is not None:
                continue
            else:
                count = read_manifest(root, name)["info"]["samples"]
            if samples.setdefault(split, count) != count:
                raise DataError(f"{root}: the {split} artifacts disagree on the sample count "
                                f"({count} vs {samples[split]}); run `mixpipe data prepare` "
                                "again")
            found.setdefault(split, {})[kind] = os.path.join(root, rel)
    return Prepared(root, classes, found, samples)


class ArrayDataset:
    """``OUT/<split>_arrays.npz`` in memory: ``ds[i] -> (uint8 HWC image, int label)``."""

    def __init__(self, root: str, split: str) -> None:
        path = require_artifact(root, f"{split}.arrays", f"{split}_arrays.npz", check_arrays)
        with np.load(path) as data:
            self.images: np.ndarray = data["images"]
            self.labels: np.ndarray = data["labels"]
        self.classes = read_classes(root)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class FileListDataset:
    """``OUT/<split>_files.txt``: ``ds[i]`` decodes line i's image with pillow (RGB, HWC)."""

    def __init__(self, root: str, split: str) -> None:
        self.root = os.path.abspath(root)
        path = require_artifact(root, f"{split}.files", f"{split}_files.txt")
        require_artifact(root, f"{split}.images", split)
        self.relpaths, self.labels = read_file_list(path)
        self.classes = read_classes(root)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.relpaths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relpaths[i])

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int]:
        return load_rgb(self.path(i)), int(self.labels[i])
