"""Generated class-folder trees that look like a real photo dataset, for tests and benchmarks.

Real ImageNet-style trees are what break loaders: images of many sizes and aspect ratios, a few
greyscale or CMYK JPEGs, a PNG saved under a ``.jpg`` name, the odd file that is not an image at
all and a class folder left empty. :func:`make_tree` writes such a tree on demand, so every test
and benchmark can be run on the same kind of data without shipping any.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["TreeSpec", "GeneratedTree", "make_tree", "photo_like"]


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """What :func:`make_tree` writes.

    ``sides``: the range of the shorter side in px (the longer one is up to 1.5x that).
    ``greyscale``/``cmyk``/``png_as_jpg``: how many train images get that oddity (all decodable).
    ``corrupt``: train files named ``.jpg`` that are not images (what ``prepare`` must name).
    ``empty_classes``: extra class folders with no image in them.
    """

    classes: int = 3
    train_per_class: int = 4
    val_per_class: int = 2
    sides: Tuple[int, int] = (60, 500)
    greyscale: int = 1
    cmyk: int = 1
    png_as_jpg: int = 1
    corrupt: int = 0
    empty_classes: int = 0
    quality: int = 90
    seed: int = 0

    def __post_init__(self) -> None:
        if self.classes < 1 or self.train_per_class < 1 or self.val_per_class < 0:
            raise ValueError("TreeSpec needs classes >= 1, train_per_class >= 1 and "
                             f"val_per_class >= 0, got {self}")
        if not 8 <= self.sides[0] <= self.sides[1]:
            raise ValueError(f"TreeSpec.sides must be (lo, hi) with 8 <= lo <= hi, got "
                             f"{self.sides}")
        odd = self.greyscale + self.cmyk + self.png_as_jpg + self.corrupt
        if odd > self.classes * self.train_per_class:
            raise ValueError(f"TreeSpec asks for {odd} special train images but the tree has "
                             f"only {self.classes * self.train_per_class}")


@dataclasses.dataclass(frozen=True)
class GeneratedTree:
    """Where things went: ``root/{train,val}/<class>/<file>``; paths relative to ``root``."""

    root: str
    classes: Tuple[str, ...]
    corrupt: Tuple[str, ...]
    empty: Tuple[str, ...]
    sizes: Dict[str, Tuple[int, int]]  # relpath -> (height, width) of every decodable image


def photo_like(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3]: smooth colour waves plus noise, so JPEG sizes resemble photos'."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= max(height, 1)
    x /= max(width, 1)
    f = rng.uniform(1, 12, 6).astype(np.float32)
    image = np.stack([np.sin(f[0] * x + f[1] * y), np.cos(3 * f[2] * x * y + f[3]),
                      np.sin(f[4] * (x - y) + f[5])], -1) * 100 + 128
    image += rng.normal(0, 12, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape(rng: np.random.Generator, sides: Tuple[int, int]) -> Tuple[int, int]:
    short = int(rng.integers(sides[0], sides[1] + 1))
    long = int(short * rng.uniform(1.0, 1.5))
    return (short, long) if rng.random() < 0.5 else (long, short)


def make_tree(root: str, spec: TreeSpec = TreeSpec()) -> GeneratedTree:
    """Write a class-folder tree under ``root`` (which must not exist yet or be empty)."""
    from PIL import Image

    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root} is not empty; make_tree writes a fresh tree")
    rng = np.random.default_rng(spec.seed)
    classes = tuple(f"class{c:02d}" for c in range(spec.classes))
    kinds: List[str] = (["grey"] * spec.greyscale + ["cmyk"] * spec.cmyk
                        + ["png"] * spec.png_as_jpg + ["corrupt"] * spec.corrupt)
    slots = spec.classes * spec.train_per_class
    special = dict(zip(rng.permutation(slots)[:len(kinds)].tolist(), kinds))
    sizes: Dict[str, Tuple[int, int]] = {}
    corrupt: List[str] = []
    for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                rel = f"{split}/{name}/img{i:04d}.jpg"
                path = os.path.join(root, rel)
                kind = special.get(c * per_class + i) if split == "train" else None
                if kind == "corrupt":
                    with open(path, "wb") as f:
                        f.write(b"this is not an image " * 8)
                    corrupt.append(rel)
                    continue
                h, w = _shape(rng, spec.sides)
                image = Image.fromarray(photo_like(h, w, rng))
                if kind == "grey":
                    image.convert("L").save(path, format="JPEG", quality=spec.quality)
                elif kind == "cmyk":
                    image.convert("CMYK").save(path, format="JPEG", quality=spec.quality)
                elif kind == "png":
                    image.save(path, format="PNG")
                else:
                    image.save(path, format="JPEG", quality=spec.quality)
                sizes[rel] = (h, w)
    empty = []
    for e in range(spec.empty_classes):
        rel = f"train/zz_empty{e:02d}"
        os.makedirs(os.path.join(root, rel))
        empty.append(rel)
    return GeneratedTree(os.path.abspath(root), classes, tuple(corrupt), tuple(empty), sizes)


def list_split(tree: GeneratedTree, split: str,
               skip: Optional[Sequence[str]] = None) -> List[Tuple[str, int]]:
    """``(relpath, label)`` of a split's decodable images in dataset order (sorted class and
    file names), i.e. what ``prepare`` with ``--on-bad skip`` must list."""
    bad = set(tree.corrupt) | set(skip or ())
    rows = []
    for label, name in enumerate(tree.classes):
        folder = os.path.join(tree.root, split, name)
        for f in sorted(os.listdir(folder)):
            rel = f"{split}/{name}/{f}"
            if rel not in bad:
                rows.append((rel, label))
    return rows
