"""CIFAR-10 from a copy the user already has: torchvision's ``cifar-10-batches-py/`` folder, or a
class-folder tree ``SRC/{train,test}/<class>/<image>``.

Nothing is downloaded. The batches are Python pickles, and unpickling a file can run any code it
names, so the reader lets through only the numpy constructors an array needs (the real batches
use nothing else) and refuses anything more as "not a CIFAR-10 batch"; it opens only the seven
fixed file names inside the folder the user pointed to.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError
from .holdout import DEFAULT_FRACTION, DEFAULT_SEED
from .prepare import Log, beton_wanted, prepare_from_arrays, prepare_tree

__all__ = ["BATCHES_DIR", "SPLIT_FILES", "META_FILE", "find_batches", "load_classes",
           "load_split", "prepare_cifar10"]

BATCHES_DIR = "cifar-10-batches-py"
META_FILE = "batches.meta"
#: Source split -> its batch files, in the order their rows are numbered.
SPLIT_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
SIDE = 32
FIX = ("extract cifar-10-python.tar.gz again, or download it with "
       "torchvision.datasets.CIFAR10(ROOT, download=True) and pass --src ROOT/" + BATCHES_DIR)

#: (module, name) a CIFAR-10 pickle may name: what numpy needs to rebuild an array (numpy 2
#: writes ``numpy._core``, numpy 1 and the original files ``numpy.core``; protocol 2 spells
#: bytes via ``_codecs.encode``, protocol 5 arrays via ``_frombuffer``).
_ALLOWED = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch "
                                         "never does, so it was not loaded")
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):  # the other numpy major version's module name
            other = module.replace("numpy._core", "numpy.core") if "._core" in module else \
                module.replace("numpy.core", "numpy._core")
            return super().find_class(other, name)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _read(path: str) -> Dict[str, Any]:
    """The pickled dict at ``path`` with str keys (the original files were written by Python 2,
    so their keys load as bytes; a copy re-pickled by Python 3 may hold str keys)."""
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="bytes").load()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({_one_line(err)}); {FIX}") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(err).__name__}: "
                        f"{_one_line(err)}); the file is truncated or damaged: {FIX}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a {type(data).__name__}, not a CIFAR-10 batch (a dict); "
                        f"{FIX}")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in data.items()}


def _entry(path: str, data: Dict[str, Any], key: str) -> Any:
    if key not in data:
        raise DataError(f"{path}: no {key!r} entry (has {sorted(map(str, data))}), so it is not "
                        f"a CIFAR-10 batch; {FIX}")
    return data[key]


def find_batches(src: str) -> Optional[str]:
    """The batches folder at ``src`` (the folder itself, or torchvision's root above it), or
    None when ``src`` holds neither, e.g. a class-folder tree."""
    for folder in (src, os.path.join(src, BATCHES_DIR)):
        if any(os.path.exists(os.path.join(folder, name))
               for name in (META_FILE, *SPLIT_FILES["train"], *SPLIT_FILES["test"])):
            return folder
    return None


def _check_complete(folder: str) -> None:
    names = (*SPLIT_FILES["train"], *SPLIT_FILES["test"], META_FILE)
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (a complete {BATCHES_DIR} "
                        f"holds data_batch_1..5, test_batch and {META_FILE}); {FIX}")


def load_classes(folder: str) -> Tuple[str, ...]:
    """Class names by label, from ``batches.meta``; they become folder names, so they are
    checked to be usable as such."""
    path = os.path.join(folder, META_FILE)
    names = _entry(path, _read(path), "label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{path}: 'label_names' is not a non-empty list of names; {FIX}")
    classes = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)
                    for n in names)
    for name in classes:
        if name in ("", ".", "..") or any(c in name for c in "/\\\0\n\r"):
            raise DataError(f"{path}: class name {name!r} cannot be a folder name; {FIX}")
    if len(set(classes)) != len(classes):
        raise DataError(f"{path}: class names repeat ({list(classes)}); {FIX}")
    return classes


def _load_batch(path: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    data = _read(path)
    pixels, labels = _entry(path, data, "data"), _entry(path, data, "labels")
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or \
            pixels.shape[1] != 3 * SIDE * SIDE:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else \
            type(pixels).__name__
        raise DataError(f"{path}: 'data' is {got}, expected uint8 [N, {3 * SIDE * SIDE}] "
                        f"(the R, G and B planes of 32x32 images); {FIX}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        labels = np.zeros((0, 0))  # reported just below as not a list of labels
    if labels.shape != (len(pixels),):
        raise DataError(f"{path}: 'labels' is not a list of {len(pixels)} integers, one per "
                        f"image; {FIX}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1} (the classes of "
                        f"{META_FILE}); {FIX}")
    # Row-major CHW planes -> HWC, the layout every loader reads.
    images = pixels.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_split(folder: str, split: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(images uint8[N, 32, 32, 3], labels int64[N])`` of a source split, its batches in
    order (row i of the training split is image i of data_batch_1..5 read one after another)."""
    if split not in SPLIT_FILES:
        raise DataError(f"unknown CIFAR-10 split {split!r}; choose one of {list(SPLIT_FILES)}")
    parts = [_load_batch(os.path.join(folder, name), num_classes) for name in SPLIT_FILES[split]]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _recipe(folder: str, split: str) -> Dict[str, Any]:
    """What identifies the source of a split, so a replaced batch file rebuilds its artifacts."""
    names: Sequence[str] = (*SPLIT_FILES[split], META_FILE)
    stats = {n: os.stat(os.path.join(folder, n)) for n in names}
    return {"dataset": "cifar10", "source_split": split,
            "files": {n: [st.st_size, st.st_mtime_ns] for n, st in stats.items()}}


def prepare_cifar10(src: str, out: str, *, beton: bool = True, quality: int = 95,
                    holdout: float = DEFAULT_FRACTION, holdout_seed: int = DEFAULT_SEED,
                    workers: Optional[int] = None, verify: bool = False,
                    log: Log = print) -> Dict[str, str]:
    """Write CIFAR-10 into ``out`` with the splits and artifacts of Fashion-MNIST's preparation
    (:mod:`mixpipe.data.prepare`), so every loader and benchmark reads either the same way.

    ``src`` is torchvision's ``cifar-10-batches-py`` folder (or the root above it): ``train``
    and ``val`` (a stratified, seeded ``holdout`` share of the 50k training images) and ``test``
    (the 10k test batch). Or ``src`` is a class-folder tree with ``train/`` and ``test/`` (or
    ``val/``): prepared as :func:`~mixpipe.data.prepare.prepare_tree` does, images linked, with
    32x32 arrays (a copy saved at another size is resized, so the arrays keep CIFAR-10's shape)
    and the .beton unless ``beton`` is False. Every batch is read and checked before the output
    is touched, so bad input leaves nothing behind. Returns the paths written, keyed ``train``,
    ``train_files``, ...
    """
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise DataError(f"CIFAR-10 source {src} does not exist or is not a directory; {FIX}")
    folder = find_batches(src)
    if folder is None:
        if os.path.isdir(os.path.join(src, "train")):
            return prepare_tree(src, out, beton=beton_wanted(beton, log), quality=quality,
                                arrays=True, array_size=SIDE, holdout=holdout,
                                holdout_seed=holdout_seed, workers=workers, verify=verify,
                                log=log)
        raise DataError(f"{src}: neither a {BATCHES_DIR} folder (data_batch_1..5, test_batch, "
                        f"{META_FILE}) nor a class-folder tree with train/ and test/; {FIX}")
    _check_complete(folder)
    classes = load_classes(folder)
    loaded = {split: load_split(folder, split, len(classes)) for split in SPLIT_FILES}
    sources = {split: (labels, _recipe(folder, split)) for split, (_, labels) in loaded.items()}

    def images(split: str, rows: np.ndarray) -> np.ndarray:
        return loaded[split][0][rows]

    return prepare_from_arrays(out, classes, sources, images, beton=beton, quality=quality,
                               holdout=holdout, holdout_seed=holdout_seed, workers=workers,
                               verify=verify, log=log)
