"""Turn a source dataset into the prepared layout every mixpipe loader reads.

Splits: ``train``, ``val`` (a stratified, seeded hold-out carved from the training images, where
every setting is chosen) and ``test`` (the source's own test / validation set, scored once for the
record). Layout (``OUT`` is the output directory; line / row / record i is sample id i
everywhere):

- ``OUT/classes.txt``: class name of label i on line i.
- ``OUT/<split>/<class>/<file>``: the images. Fashion-MNIST and CIFAR-10's pickled batches:
  ``<source row:06d>.jpg`` written here. A user tree: ``OUT/train`` and ``OUT/val`` link to
  ``SRC/train``, ``OUT/test`` to ``SRC/val`` or ``SRC/test`` (nothing copied; the user's files
  keep their names), so one ``file_root=OUT`` serves every split.
- ``OUT/<split>_files.txt``: ``<split>/<class>/<file> <label>``, relative to ``OUT``: DALI's
  ``fn.readers.file(file_root=OUT, file_list=OUT/<split>_files.txt)`` reads it as is.
- ``OUT/<split>_arrays.npz``: ``images`` uint8[N, H, W, 3], ``labels`` int64[N]. For
  Fashion-MNIST these are the padded RGB pixels *before* JPEG encoding (lossless originals), for
  CIFAR-10's batches the source pixels themselves.
- ``OUT/<split>.beton``: FFCV fields ``image`` (RGBImageField, JPEG) and ``label`` (IntField).
- ``OUT/<split>_bad.txt`` (user trees): ``relpath<TAB>reason`` for every file pillow could not
  decode; with ``on_bad="skip"`` these are left out of every other artifact.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import fashion_mnist as fm
from .artifacts import Artifact, OutputDir
from .errors import DataError
from .holdout import DEFAULT_FRACTION, DEFAULT_SEED, stratified_holdout
from .tree import SplitListing, scan_tree
from .writers import (check_arrays, check_beton, ffcv_available, find_bad_images, iter_chunks,
                      load_rgb, parallel_map, write_arrays, write_beton, write_file_list,
                      write_jpegs)

__all__ = ["prepare_fashion_mnist", "prepare_from_arrays", "prepare_tree", "artifact_paths",
           "split_rows", "beton_wanted"]

Log = Callable[[str], None]
#: ``images(source_split, rows)`` -> uint8[len(rows), H, W, 3], the RGB images of those rows.
ImagesOf = Callable[[str, np.ndarray], np.ndarray]
#: FFCV page sizes: 2 MiB (its minimum) for 32x32 images, 8 MiB (its default) for photos.
_SMALL_PAGE, _LARGE_PAGE = 1 << 21, 1 << 23


def _positive(name: str, value: Optional[int], low: int = 1, high: Optional[int] = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise DataError(f"{name} must be an integer {span}, got {value!r}")


def _workers(workers: Optional[int]) -> int:
    _positive("workers", workers)
    return workers if workers is not None else max(1, os.cpu_count() or 1)


def _classes_artifact(classes: Sequence[str]) -> Artifact:
    def build(path: str) -> Dict[str, Any]:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{name}\n" for name in classes)
        return {"classes": len(classes)}

    return Artifact("classes", "classes.txt", {"classes": list(classes)}, build)


def artifact_paths(out: str, split: str) -> Dict[str, str]:
    """Where each artifact of ``split`` lives (relative paths, the manifest names' suffixes)."""
    return {"images": split, "files": f"{split}_files.txt", "arrays": f"{split}_arrays.npz",
            "beton": f"{split}.beton"}


def _result(out: str, splits: Sequence[str]) -> Dict[str, str]:
    result = {"root": out, "classes": os.path.join(out, "classes.txt")}
    for split in splits:
        for kind, rel in artifact_paths(out, split).items():
            path = os.path.join(out, rel)
            if os.path.exists(path):
                result[split if kind == "images" else f"{split}_{kind}"] = path
    return result


class _ArraySource:
    """Index -> (image, label) over in-memory arrays; what the FFCV writer's workers read."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class _FileSource:
    """Index -> (decoded image, label) over image files.

    FFCV's writer waits for a count of finished samples, so a worker that raises leaves it
    waiting forever. A file that fails to decode here (it changed after the decode check) is
    therefore recorded in ``failures`` (one ``path<TAB>reason`` line) and replaced by a black
    placeholder; the caller reads the record and fails the build naming the file.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int],
                 failures: Optional[str] = None) -> None:
        self.paths, self.labels = list(paths), list(labels)
        self.failures = failures

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int]:
        try:
            return load_rgb(self.paths[i]), int(self.labels[i])
        except Exception as err:  # noqa: BLE001 - reported by the parent, see the docstring
            if self.failures is None:
                raise DataError(f"{self.paths[i]}: cannot decode ({err})") from err
            with open(self.failures, "a", encoding="utf-8") as f:
                f.write(f"{self.paths[i]}\t{type(err).__name__}: {err}\n".replace("\n", " ")
                        .rstrip() + "\n")
            return np.zeros((8, 8, 3), np.uint8), int(self.labels[i])


def _build(write: Callable[[str], Any], samples: int) -> Callable[[str], Dict[str, Any]]:
    def build(path: str) -> Dict[str, Any]:
        write(path)
        return {"samples": samples}

    return build


def _beton_step(name: str, relpath: str, recipe: Dict[str, Any], samples: int,
                dataset: Callable[[], Any], quality: int, max_side: Optional[int],
                workers: int, page_size: int) -> Artifact:
    def build(path: str) -> Dict[str, Any]:
        data = dataset()
        if isinstance(data, _FileSource):
            data.failures = path + ".failed"
        write_beton(path, data, quality, max_side, workers, page_size)
        if isinstance(data, _FileSource) and os.path.exists(data.failures):
            with open(data.failures, encoding="utf-8") as f:
                lines = f.read().splitlines()
            raise DataError(f"{len(lines)} image(s) failed to decode while writing the .beton, "
                            f"first {lines[0]!r}; they decoded in the check before, so they "
                            "changed meanwhile: re-run `mixpipe data prepare`")
        return {"samples": samples}

    return Artifact(name, relpath, recipe, build, check_beton)


def beton_wanted(beton: bool, log: Log) -> bool:
    """Whether to write a .beton that is on by default: asked for and ffcv installed. A missing
    ffcv is a note, not an error, so the other artifacts still get written."""
    if beton and not ffcv_available():
        log("note: ffcv is not importable, so no .beton is written "
            "(pip install --no-build-isolation ffcv==1.0.2)")
        return False
    return beton


def _optional(target: OutputDir, wanted: bool, art: Artifact) -> None:
    """Build a requested artifact; drop an unrequested one only if it went stale."""
    if wanted:
        target.ensure(art)
    else:
        target.discard(art.name, art.relpath, art.recipe)


def split_rows(source_split: str, labels: np.ndarray, holdout: float, holdout_seed: int
               ) -> List[Tuple[str, np.ndarray, Dict[str, Any]]]:
    """``[(prepared split, source rows, hold-out recipe)]`` of one source split.

    ``train`` gives ``train`` and the ``val`` hold-out (none when ``holdout`` holds nothing
    out); any other source split is a held-out set of the source's own and becomes ``test``,
    whole. Every preparation carves the same way, so ``val`` means the same thing everywhere.
    """
    if source_split != "train":
        return [("test", np.arange(len(labels)), {})]
    keep, held = stratified_holdout(np.asarray(labels), holdout, holdout_seed)
    carve = {"holdout": holdout, "holdout_seed": holdout_seed}
    return [("train", keep, carve)] + ([("val", held, carve)] if held.size else [])


def _array_split(target: OutputDir, classes: Sequence[str], source_split: str, split: str,
                 rows: np.ndarray, labels: np.ndarray, images: ImagesOf,
                 source: Dict[str, Any], image_recipe: Dict[str, Any], quality: int,
                 beton: bool, workers: int) -> None:
    """Write prepared ``split``: the ``rows`` of in-memory source ``source_split`` (files keep
    the source row in their name, so a hold-out image can be traced back)."""
    n = len(rows)
    labels = labels[rows]
    cache: Dict[str, np.ndarray] = {}

    def rgb() -> np.ndarray:
        """The split's RGB images, read from the source only if some artifact needs them."""
        if "rgb" not in cache:
            cache["rgb"] = images(source_split, rows)
        return cache["rgb"]

    names = [f"{classes[label]}/{int(i):06d}.jpg" for i, label in zip(rows, labels)]
    rel = artifact_paths(target.root, split)
    target.ensure(Artifact(
        f"{split}.images", rel["images"], {**source, "quality": quality, **image_recipe},
        _build(lambda p: write_jpegs(p, rgb(), names, quality, workers), n)))
    target.ensure(Artifact(
        f"{split}.files", rel["files"], source,
        _build(lambda p: write_file_list(p, [f"{split}/{x}" for x in names], labels), n)))
    target.ensure(Artifact(
        f"{split}.arrays", rel["arrays"], source,
        _build(lambda p: write_arrays(p, rgb(), labels), n), check_arrays))
    _optional(target, beton, _beton_step(
        f"{split}.beton", rel["beton"], {**source, "quality": quality, "write_mode": "jpg"}, n,
        lambda: _ArraySource(rgb(), labels), quality, None, workers, _SMALL_PAGE))


def prepare_from_arrays(out: str, classes: Sequence[str],
                        sources: Dict[str, Tuple[np.ndarray, Dict[str, Any]]],
                        images: ImagesOf, *, image_recipe: Optional[Dict[str, Any]] = None,
                        beton: bool = True, quality: int = 95,
                        holdout: float = DEFAULT_FRACTION, holdout_seed: int = DEFAULT_SEED,
                        workers: Optional[int] = None, verify: bool = False,
                        log: Log = print) -> Dict[str, str]:
    """Write a dataset of small images held in memory (Fashion-MNIST, CIFAR-10's batches).

    ``sources`` maps each source split (``train``, ``test``) to its labels and a recipe naming
    the source files, so a changed source rebuilds what came from it; ``images`` is called only
    when an artifact must be (re)built, so a re-run that skips everything stays cheap. Splits as
    :func:`split_rows` carves them; every artifact of the module docstring is written (the
    .beton only when ffcv is installed, with a note otherwise). Returns the paths written.
    """
    _positive("quality", quality, 1, 100)
    workers = _workers(workers)
    out = os.path.abspath(out)
    want_beton = beton_wanted(beton, log)
    # Carve before touching the output, so a bad hold-out setting leaves nothing.
    parts = [(source_split, split, rows, labels, {**recipe, **carve})
             for source_split, (labels, recipe) in sources.items()
             for split, rows, carve in split_rows(source_split, labels, holdout, holdout_seed)]
    with OutputDir(out, verify=verify, log=log) as target:
        target.ensure(_classes_artifact(classes))
        for source_split, split, rows, labels, recipe in parts:
            recipe = {**recipe, "split": split, "samples": len(rows)}
            _array_split(target, classes, source_split, split, rows, labels, images, recipe,
                         image_recipe or {}, quality, want_beton, workers)
    return _result(out, [split for _, split, *_ in parts])


def prepare_fashion_mnist(out: str, limit: Optional[int] = None, beton: bool = True,
                          quality: int = 95, *, src: str = fm.DEFAULT_ROOT,
                          test_limit: Optional[int] = None,
                          holdout: float = DEFAULT_FRACTION, holdout_seed: int = DEFAULT_SEED,
                          workers: Optional[int] = None, verify: bool = False,
                          log: Log = print) -> Dict[str, str]:
    """Write Fashion-MNIST into ``out`` as three splits: ``train`` and ``val`` (a stratified,
    seeded ``holdout`` share of the 60k training images) and ``test`` (the official 10k); see the
    module docstring for the layout. ``limit`` keeps the first N training images before the
    hold-out is carved, ``test_limit`` the first N test images (default: ``limit``). Returns the
    paths written, keyed ``train``, ``train_files``, ... Complete artifacts from an earlier run
    with the same settings are kept as they are."""
    _positive("limit", limit)
    _positive("test_limit", test_limit)
    limits = {"train": limit, "test": test_limit if test_limit is not None else limit}
    # Only the labels are read up front (cheap): the images wait until an artifact needs them.
    sources = {}
    for source_split in fm.SPLIT_FILES:
        files = fm.source_files(src, source_split)
        labels = fm.load_labels(src, source_split)[:limits[source_split]]
        recipe = {"dataset": "fashion-mnist", "source_split": source_split,
                  "files": {os.path.basename(p): [os.path.getsize(p), os.stat(p).st_mtime_ns]
                            for p in files.values()}}
        sources[source_split] = (labels, recipe)

    def images(source_split: str, rows: np.ndarray) -> np.ndarray:
        upto = int(rows[-1]) + 1 if len(rows) else 0
        return fm.pad_to_rgb(fm.load_split(src, source_split, upto)[0][rows])

    return prepare_from_arrays(out, fm.CLASSES, sources, images, image_recipe={"pad": fm.PAD},
                               beton=beton, quality=quality, holdout=holdout,
                               holdout_seed=holdout_seed, workers=workers, verify=verify,
                               log=log)


def _decode_chunk(job: Tuple[List[str], Optional[Tuple[int, int]]]) -> List[np.ndarray]:
    paths, size = job
    return [load_rgb(p, size) for p in paths]


def _tree_arrays(paths: Sequence[str], size: Optional[int], workers: int) -> np.ndarray:
    """Decode every image to RGB; one common size is needed for a single array."""
    shape = None if size is None else (size, size)
    jobs = [(list(chunk), shape) for chunk in iter_chunks(list(paths))]
    images = [im for chunk in parallel_map(_decode_chunk, jobs, workers, len(paths), "decode")
              for im in chunk]
    first = images[0].shape
    for path, image in zip(paths, images):
        if image.shape != first:
            raise DataError(f"{path} is {image.shape[1]}x{image.shape[0]} but {paths[0]} is "
                            f"{first[1]}x{first[0]}; arrays need one size: pass --array-size S "
                            "to resize every image to SxS")
    return np.stack(images)


def _check_disjoint(src: str, out: str) -> None:
    src_real, out_real = os.path.realpath(src), os.path.realpath(out)
    if os.path.commonpath([src_real, out_real]) in (src_real, out_real):
        raise DataError(f"the output {out} and the source tree {src} overlap; "
                        "the output must be a separate directory")


ON_BAD = ("fail", "skip")


def _bad_files(target: OutputDir, split_dir: str, part: SplitListing, source: Dict[str, Any],
               workers: int) -> Dict[str, str]:
    """Decode-check every image of the split once (cached as ``OUT/<split>_bad.txt``, rebuilt
    when the tree changes); ``relpath -> reason`` of the files pillow cannot decode."""
    relpath = f"{part.split}_bad.txt"

    def build(path: str) -> Dict[str, Any]:
        bad = find_bad_images([os.path.join(split_dir, r) for r in part.relpaths], workers)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{os.path.relpath(p, split_dir)}\t{reason}\n" for p, reason in bad)
        return {"bad": len(bad)}

    target.ensure(Artifact(f"{part.split}.bad", relpath,
                           {k: v for k, v in source.items() if k != "samples"}, build))
    with open(os.path.join(target.root, relpath), encoding="utf-8") as f:
        return dict(line.rstrip("\n").split("\t", 1) for line in f if line.strip())


def _without_bad(part: SplitListing, split_dir: str, bad: Dict[str, str], on_bad: str,
                 bad_list: str, log: Log) -> SplitListing:
    if not bad:
        return part
    if on_bad == "fail":
        shown = "; ".join(f"{os.path.join(split_dir, r)} ({why})"
                          for r, why in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} file(s) under {split_dir} are not readable images: "
                        f"{shown}{more} (all listed in {bad_list}); remove or replace them, or "
                        "pass --on-bad skip (on_bad='skip') to leave them out")
    keep = [i for i, r in enumerate(part.relpaths) if r not in bad]
    if not keep:
        raise DataError(f"no image under {split_dir} decodes ({len(bad)} bad, listed in "
                        f"{bad_list})")
    log(f"note: skipped {len(bad)} unreadable file(s) under {split_dir}; listed in {bad_list}")
    return dataclasses.replace(part, relpaths=tuple(part.relpaths[i] for i in keep),
                               labels=tuple(part.labels[i] for i in keep))


def _tree_split(target: OutputDir, root: str, classes: Sequence[str], part: SplitListing,
                split: str, rows: np.ndarray, carve: Dict[str, Any], *, beton: bool,
                max_side: Optional[int], quality: int, arrays: bool, array_size: Optional[int],
                workers: int) -> None:
    """Write prepared ``split`` from the ``rows`` of source split ``part``: ``OUT/<split>``
    links to ``SRC/<part.split>`` and the file list names the chosen images through it."""
    relpaths = [part.relpaths[i] for i in rows]
    labels = np.asarray(part.labels, dtype=np.int64)[rows]
    n = len(labels)
    split_dir = os.path.realpath(os.path.join(root, part.split))
    source = {"dataset": "tree", "split": split, "source_split": part.split, "src": split_dir,
              "fingerprint": part.fingerprint, "samples": n, "classes": list(classes), **carve}
    paths = [os.path.join(split_dir, r) for r in relpaths]
    rel = artifact_paths(target.root, split)
    target.ensure(Artifact(f"{split}.images", rel["images"],
                           {k: v for k, v in source.items() if k not in carve},
                           _build(lambda p: os.symlink(split_dir, p), n)))
    target.ensure(Artifact(
        f"{split}.files", rel["files"], source,
        _build(lambda p: write_file_list(p, [f"{split}/{r}" for r in relpaths], labels), n)))
    _optional(target, arrays, Artifact(
        f"{split}.arrays", rel["arrays"], {**source, "size": array_size},
        _build(lambda p: write_arrays(p, _tree_arrays(paths, array_size, workers), labels), n),
        check_arrays))
    _optional(target, beton, _beton_step(
        f"{split}.beton", rel["beton"],
        {**source, "quality": quality, "max_side": max_side, "write_mode": "jpg"}, n,
        lambda: _FileSource(paths, labels), quality, max_side, workers, _LARGE_PAGE))


def _tree_parts(splits: Dict[str, SplitListing], holdout: float, holdout_seed: int
                ) -> List[Tuple[SplitListing, str, np.ndarray, Dict[str, Any]]]:
    """Prepared splits of a tree: ``SRC/train`` gives ``train`` and the ``val`` hold-out,
    ``SRC/val`` or ``SRC/test`` (the source's own held-out set, scored once for the record)
    gives ``test``."""
    return [(part, split, rows, carve) for source_split, part in splits.items()
            for split, rows, carve in split_rows(source_split, part.labels, holdout,
                                                 holdout_seed)]


def prepare_tree(src: str, out: str, *, beton: bool = False, max_side: Optional[int] = None,
                 quality: int = 95, arrays: bool = False, array_size: Optional[int] = None,
                 holdout: float = DEFAULT_FRACTION, holdout_seed: int = DEFAULT_SEED,
                 workers: Optional[int] = None, verify: bool = False,
                 on_bad: str = "fail", allow_empty_classes: bool = False,
                 log: Log = print) -> Dict[str, str]:
    """Prepare a user's class-folder tree ``SRC/{train,val|test}/<class>/<image>`` in ``out``.

    Splits: ``train`` and ``val`` (a stratified, seeded ``holdout`` share of ``SRC/train``, where
    settings are chosen) and ``test`` (``SRC/val`` or ``SRC/test``, whichever the tree has,
    scored once for the record). A tree with neither is prepared with a warning: its figures
    can then only be the hold-out's.

    Every image is decode-checked first (real trees hold truncated downloads and HTML pages
    saved as ``.jpg``): ``on_bad="fail"`` stops naming the bad files, ``"skip"`` leaves them out
    of every artifact (and out of the hold-out draw); either way they are listed in
    ``OUT/<source split>_bad.txt``. A class folder with no image is an error unless
    ``allow_empty_classes``.

    The images are not copied: ``OUT/<split>`` links to ``SRC/<split>`` and the file lists name
    them relative to ``OUT``. Arrays (``arrays=True``; all images one size, or ``array_size``
    to resize to a square) and a .beton (``beton=True``; images shrunk so the longer side is at
    most ``max_side``, re-encoded at ``quality``) are optional."""
    _positive("max_side", max_side)
    _positive("array_size", array_size)
    _positive("quality", quality, 1, 100)
    workers = _workers(workers)
    if max_side is not None and not beton:
        raise DataError("max_side (--max-side) only applies to the .beton; add --beton")
    if array_size is not None and not arrays:
        raise DataError("array_size (--array-size) only applies to arrays; add --arrays")
    if on_bad not in ON_BAD:
        raise DataError(f"on_bad (--on-bad) must be one of {', '.join(ON_BAD)}, got {on_bad!r}")
    if beton and not ffcv_available():
        raise DataError("--beton needs ffcv: pip install --no-build-isolation ffcv==1.0.2")
    out = os.path.abspath(out)
    _check_disjoint(src, out)
    listing = scan_tree(src, allow_empty_classes)
    if listing.heldout is None:
        log(f"warning: {listing.root} has no val/ or test/ folder, so there is no test split; "
            "only train and its val hold-out are prepared")
    with OutputDir(out, verify=verify, log=log) as target:
        target.ensure(_classes_artifact(listing.classes))
        readable: Dict[str, SplitListing] = {}
        for source_split, part in listing.splits.items():
            if part.ignored:
                log(f"note: {part.ignored} non-image file(s) under {listing.root}/"
                    f"{source_split} ignored")
            split_dir = os.path.realpath(os.path.join(listing.root, source_split))
            scanned = {"dataset": "tree", "split": source_split, "src": split_dir,
                       "fingerprint": part.fingerprint, "classes": list(listing.classes)}
            bad = _bad_files(target, split_dir, part, scanned, workers)
            readable[source_split] = _without_bad(
                part, split_dir, bad, on_bad, os.path.join(target.root, f"{source_split}_bad.txt"),
                log)
        parts = _tree_parts(readable, holdout, holdout_seed)
        for part, split, rows, carve in parts:
            _tree_split(target, listing.root, listing.classes, part, split, rows, carve,
                        beton=beton, max_side=max_side, quality=quality, arrays=arrays,
                        array_size=array_size, workers=workers)
    return _result(out, [split for _, split, _, _ in parts])
