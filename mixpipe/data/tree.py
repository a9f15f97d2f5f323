"""Scanning a user's ImageNet-style class-folder tree: ``SRC/<split>/<class>/<image>``.

The held-out folder is ``val/`` in ImageNet's layout but ``test/`` in CIFAR-10 copies and Kaggle
sets; either is accepted, so such a tree does not silently lose its test split. Both at once is
refused: which one is the test split would be a guess.

Labels come from the sorted class folder names of the first split found (``train`` normally), so
the same tree always gives the same labels; every other split must use a subset of those classes.
Files within a class are sorted by name, which fixes the dataset index of every image.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "TREE_SPLITS", "HELDOUT_FOLDERS", "SplitListing", "TreeListing",
           "scan_tree"]

#: Formats both pillow and DALI's decoder read; anything else in a class folder is ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".pnm")
#: The folder names of a held-out set (prepared as ``test``); a tree may hold at most one.
HELDOUT_FOLDERS = ("val", "test")
TREE_SPLITS = ("train",) + HELDOUT_FOLDERS


@dataclasses.dataclass(frozen=True)
class SplitListing:
    """One split of the tree in dataset-index order."""

    split: str
    relpaths: Tuple[str, ...]  # relative to SRC/<split>, e.g. "dog/001.jpg"
    labels: Tuple[int, ...]
    fingerprint: str  # changes when any listed file is added, removed, resized or touched
    ignored: int  # files in class folders that are not images


@dataclasses.dataclass(frozen=True)
class TreeListing:
    root: str
    classes: Tuple[str, ...]
    splits: Dict[str, SplitListing]  # keyed by source folder: train, and val or test

    @property
    def heldout(self) -> Optional[str]:
        """The held-out folder's name (``val`` or ``test``), or None when the tree has none."""
        return next((s for s in HELDOUT_FOLDERS if s in self.splits), None)


def _class_dirs(split_dir: str) -> List[str]:
    return sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))


def _scan_split(root: str, split: str, classes: Sequence[str], class_split: str,
                allow_empty_classes: bool = False) -> SplitListing:
    split_dir = os.path.join(root, split)
    index = {name: i for i, name in enumerate(classes)}
    relpaths, labels, digest, ignored = [], [], hashlib.sha256(), 0
    empty: List[str] = []
    for name in _class_dirs(split_dir):
        if name not in index:
            raise DataError(f"{os.path.join(split_dir, name)}: class {name!r} is not among the "
                            f"classes of {os.path.join(root, class_split)} "
                            f"({len(classes)} classes); every split must use the same classes")
        entries = sorted((e for e in os.scandir(os.path.join(split_dir, name))
                          if not e.name.startswith(".")), key=lambda e: e.name)
        before = len(relpaths)
        for entry in entries:
            if not entry.name.lower().endswith(IMAGE_EXTENSIONS) or not entry.is_file():
                ignored += 1
                continue
            if "\n" in entry.name or "\r" in entry.name:
                raise DataError(f"{entry.path}: a line break in a file name cannot be written to "
                                "a file list; rename the file")
            rel = f"{name}/{entry.name}"
            st = entry.stat()
            relpaths.append(rel)
            labels.append(index[name])
            digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        if len(relpaths) == before:
            empty.append(name)
    if empty and not allow_empty_classes:
        # An empty folder would still take a label: a class the model can never see.
        shown = ", ".join(os.path.join(split_dir, n) for n in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise DataError(f"{len(empty)} class folder(s) with no images: {shown}{more}; remove "
                        "them, or pass --allow-empty-classes (allow_empty_classes=True) to keep "
                        "them as classes with no samples")
    if not relpaths:
        raise DataError(f"{split_dir}: no images (extensions {', '.join(IMAGE_EXTENSIONS)}) in "
                        "its class folders")
    return SplitListing(split, tuple(relpaths), tuple(labels), digest.hexdigest(), ignored)


def scan_tree(root: str, allow_empty_classes: bool = False) -> TreeListing:
    """List every image of ``root``'s splits; a clear error for anything that is not a tree.

    A class folder with no image is refused unless ``allow_empty_classes``: it usually means a
    copy went wrong, and it would silently become a label no sample carries.
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DataError(f"source tree {root} does not exist or is not a directory")
    present = [s for s in TREE_SPLITS if os.path.isdir(os.path.join(root, s))]
    if not present:
        raise DataError(f"{root}: no split folders; expected train/ and val/ or test/, each "
                        "holding one folder per class (ImageNet layout)")
    if all(s in present for s in HELDOUT_FOLDERS):
        raise DataError(f"{root} has both val/ and test/, and either would become the test "
                        "split; remove or rename one of them")
    classes = tuple(_class_dirs(os.path.join(root, present[0])))
    if not classes:
        raise DataError(f"{os.path.join(root, present[0])}: no class folders; expected "
                        f"{present[0]}/<class>/<image> (ImageNet layout)")
    splits = {s: _scan_split(root, s, classes, present[0], allow_empty_classes)
              for s in present}
    return TreeListing(root, classes, splits)
