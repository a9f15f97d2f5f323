"""Writers (and structural checks) for the four forms the loaders read.

- JPEG tree: ``<class>/<index:06d>.jpg`` under a split folder, encoded by pillow.
- File list: ``relpath label`` per line, line i = sample i (DALI's ``file_list`` format).
- Arrays: an uncompressed ``.npz`` with ``images`` uint8[N, H, W, 3] and ``labels`` int64[N];
  uncompressed because loading speed matters more than disk for the torch loader.
- FFCV ``.beton``: fields ``image`` (RGBImageField, JPEG) and ``label`` (IntField).
"""
from __future__ import annotations

import _thread
import concurrent.futures
import importlib.util
import multiprocessing
import os
import threading
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
from PIL import Image

from ..progress import progress_bar
from .errors import DataError

__all__ = ["write_jpegs", "write_file_list", "read_file_list", "write_arrays", "check_arrays",
           "write_beton", "check_beton", "ffcv_available", "parallel_map", "load_rgb",
           "decode_problem", "find_bad_images", "foreign_beton"]

#: Below this many items a process pool costs more than it saves.
_POOL_MIN_ITEMS = 2000
_CHUNK = 500


def parallel_map(fn: Callable[[Any], List[Any]], chunks: Sequence[Any], workers: int,
                 total: int, desc: str, sizes: Optional[Sequence[int]] = None) -> List[Any]:
    """``fn`` over ``chunks`` (in order) in a process pool, with a progress bar counting items.

    A ``ProcessPoolExecutor``, not a ``multiprocessing.Pool``: when a worker dies (killed, out of
    memory, a crash in a decoder) the executor fails the run at once, where a ``Pool`` would
    leave the parent waiting for the lost chunk forever.
    """
    sizes = sizes if sizes is not None else [len(c) for c in chunks]
    results: List[Any] = []
    with progress_bar(total=total, desc=desc, unit="img", leave=False) as bar:
        if workers <= 1 or total < _POOL_MIN_ITEMS:
            for chunk, size in zip(chunks, sizes):
                results.append(fn(chunk))
                bar.update(size)
        else:
            context = multiprocessing.get_context("fork")
            others = set(multiprocessing.active_children())
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                # submit, not map: when a worker dies, map's clean-up cancels the pending
                # futures while the executor's manager thread marks them broken, and 3.11's
                # manager then dies on InvalidStateError (a warning in the test log)
                futures: List[Any] = []
                try:  # the pool can break while chunks are still being submitted, too
                    futures.extend(pool.submit(fn, chunk) for chunk in chunks)
                    for future, size in zip(futures, sizes):
                        results.append(future.result())
                        bar.update(size)
                except concurrent.futures.process.BrokenProcessPool as err:
                    _end_workers(others)
                    raise DataError(f"a {desc} worker process died ({err}); re-run with "
                                    "--workers 1 to see which file it was reading") from None
                except BaseException:
                    # a chunk failed (or Ctrl-C) in a healthy pool: drop the chunks not started,
                    # or leaving the pool would wait for all of them before the error shows
                    for future in futures:
                        future.cancel()
                    raise
    return results


def _end_workers(others: Set[Any]) -> None:
    """Terminate every child process but ``others`` (those that existed before the pool).

    When one worker dies, CPython 3.11's executor can leave another blocked on its call queue
    (seen once here: a test run printed its summary and then never ended, because
    ``multiprocessing`` joins its children at exit). The executor has no public handle on its
    workers, so the pool's children are found as the ones that were not there before it.
    """
    for process in set(multiprocessing.active_children()) - others:
        process.terminate()
        process.join(timeout=5)


def _encode_chunk(job: Tuple[str, np.ndarray, List[str], int]) -> None:
    root, images, names, quality = job
    for image, name in zip(images, names):
        Image.fromarray(image).save(os.path.join(root, name), format="JPEG", quality=quality)


def write_jpegs(root: str, images: np.ndarray, names: Sequence[str], quality: int,
                workers: int = 1) -> None:
    """Encode ``images[i]`` (uint8 HWC RGB) to ``root/names[i]``; folders are created first."""
    for folder in sorted({os.path.dirname(n) for n in names}):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    jobs = [(root, images[a:a + _CHUNK], list(names[a:a + _CHUNK]), quality)
            for a in range(0, len(names), _CHUNK)]
    parallel_map(_encode_chunk, jobs, workers, len(names), "jpeg",
                 sizes=[len(j[2]) for j in jobs])


def _fsync_close(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def write_file_list(path: str, relpaths: Sequence[str], labels: Sequence[int]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rel, label in zip(relpaths, labels):
            f.write(f"{rel} {int(label)}\n")
        _fsync_close(f)


def read_file_list(path: str) -> Tuple[List[str], np.ndarray]:
    """``(relpaths, labels int64)``; the label is the last field, so paths may hold spaces."""
    relpaths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            rel, _, label = line.rpartition(" ")
            if not rel or not label.lstrip("-").isdigit():
                raise DataError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}")
            relpaths.append(rel)
            labels.append(int(label))
    return relpaths, np.asarray(labels, dtype=np.int64)


def write_arrays(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"arrays need uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    with open(path, "wb") as f:
        np.savez(f, images=images, labels=np.asarray(labels, dtype=np.int64))
        _fsync_close(f)


def _npy_header(archive: zipfile.ZipFile, member: str) -> Tuple[tuple, np.dtype]:
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
    return shape, dtype


def check_arrays(path: str, manifest: Dict[str, Any]) -> Optional[str]:
    """Shapes and dtypes from the npz headers (no image data read) against the manifest."""
    n = manifest.get("info", {}).get("samples")
    try:
        with zipfile.ZipFile(path) as archive:
            images, idtype = _npy_header(archive, "images.npy")
            labels, ldtype = _npy_header(archive, "labels.npy")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        return f"the array file is unreadable ({err})"
    if idtype != np.uint8 or len(images) != 4 or images[0] != n or images[3] != 3:
        return f"images are {idtype} {images}, expected uint8 [{n}, H, W, 3]"
    if ldtype != np.int64 or labels != (n,):
        return f"labels are {ldtype} {labels}, expected int64 [{n}]"
    return None


def ffcv_available() -> bool:
    """Installed or not, without importing it (importing ffcv costs seconds: numba, OpenCV)."""
    return importlib.util.find_spec("ffcv") is not None


def write_beton(path: str, dataset: Any, quality: int, max_side: Optional[int] = None,
                workers: int = 1, page_size: int = 1 << 23) -> None:
    """``dataset[i] -> (uint8 HWC RGB, int label)`` into an FFCV file, in index order.

    FFCV re-encodes every image itself (OpenCV, ``jpeg_quality``), after shrinking it so its
    longer side is at most ``max_side``. ``page_size`` (a power of two >= 2 MiB) must hold the
    largest encoded image; FFCV reads whole pages, so small images want small pages.
    """
    try:
        from ffcv import writer as ffcv_writer
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
    except ImportError as err:
        raise DataError(f"cannot write a .beton: ffcv does not import ({err}); install it with "
                        "`pip install --no-build-isolation ffcv==1.0.2`") from None

    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=quality,
                                     max_resolution=max_side),
              "label": IntField()}
    writer = DatasetWriter(path, fields, page_size=page_size, num_workers=max(1, workers))
    chunksize = max(1, min(1000, len(dataset) // (4 * workers) or 1))
    with _ChildWatch(ffcv_writer) as watch:
        try:
            writer.from_indexed_dataset(dataset, chunksize=chunksize)
        except KeyboardInterrupt:
            if watch.died is None:
                raise
            pid, code = watch.died
            raise DataError(f"a .beton writer process (pid {pid}) died with exit code {code}; "
                            f"{path} is incomplete. Re-run with --workers 1 to see the file it "
                            "failed on") from None


class _ChildWatch:
    """Ends FFCV's ``DatasetWriter`` when one of its worker processes dies.

    The writer's parent polls a shared count of finished samples until it reaches the total;
    a dead worker never adds its share, so the parent would wait forever. This watcher thread
    polls the workers' exit codes and interrupts the main thread on a non-zero one; the
    surviving workers are terminated on the way out.

    The workers are caught as they start, by swapping the ``Process`` class the writer's module
    uses for one that registers itself. Asking ``multiprocessing.active_children()`` instead
    misses a worker that dies between two polls: that call reaps the dead and lists only the
    living, so a worker failing on its first image was never seen and the run hung.
    """

    def __init__(self, module: Any, interval: float = 0.2) -> None:
        self.interval = interval
        self.died: Optional[Tuple[int, int]] = None
        self.workers: List[Any] = []
        self._module = module
        self._original = module.Process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mixpipe-childwatch")

    def _registering(self) -> type:
        workers = self.workers

        class Registered(self._original):  # type: ignore[misc, valid-type]
            def start(self) -> None:
                super().start()
                workers.append(self)

        return Registered

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for worker in list(self.workers):  # exitcode stays readable once reaped
                if worker.exitcode not in (None, 0):
                    self.died = (worker.pid, worker.exitcode)
                    _thread.interrupt_main()
                    return

    def __enter__(self) -> "_ChildWatch":
        self._module.Process = self._registering()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._module.Process = self._original
        self._stop.set()
        self._thread.join()
        if self.died is not None:
            for worker in self.workers:
                if worker.is_alive():
                    worker.terminate()
                    worker.join(5)


# The .beton header and allocation-table record as FFCV 1.0.2 lays them out (ffcv/types.py);
# parsed here so that checking a finished file does not pay for importing ffcv.
_BETON_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                          ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
_BETON_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_BETON_VERSION = 2


_BETON_FIELD = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)),
                         ("arguments", ("<u1", (1024,)))], align=True)
#: FFCV's field type ids (ffcv/types.py) of the two fields the loaders read.
_BETON_FIELDS = {"image": 2, "label": 1}  # RGBImageField, IntField


def foreign_beton(path: str) -> Tuple[Optional[int], Optional[str]]:
    """``(samples, None)`` if ``path`` is a complete .beton the loaders can read, whoever wrote it
    (``mixpipe data prepare`` or FFCV's own ``DatasetWriter``), else ``(None, reason)``.

    Readable means: FFCV's format version, an ``image`` RGBImageField and a ``label`` IntField
    (the names the loaders use), and an allocation table that covers every sample.
    """
    try:
        size = os.path.getsize(path)
        if size < _BETON_HEADER.itemsize:
            return None, "shorter than a .beton header"
        header = np.fromfile(path, dtype=_BETON_HEADER, count=1)[0]
        if header["version"] != _BETON_VERSION:
            return None, f"format version {header['version']}, expected {_BETON_VERSION}"
        fields = np.fromfile(path, dtype=_BETON_FIELD, count=int(header["num_fields"]),
                             offset=_BETON_HEADER.itemsize)
    except (OSError, ValueError) as err:
        return None, f"unreadable ({err})"
    found = {bytes(f["name"]).rstrip(b"\0").decode("ascii", "replace"): int(f["type_id"])
             for f in fields}
    if any(found.get(name) != type_id for name, type_id in _BETON_FIELDS.items()) or len(
            found) != len(_BETON_FIELDS):
        return None, (f"fields {found} (name: FFCV type id); the loaders need exactly "
                      "'image' (RGBImageField) and 'label' (IntField)")
    n = int(header["num_samples"])
    reason = check_beton(path, {"info": {"samples": n}})
    return (n, None) if reason is None else (None, reason)


def check_beton(path: str, manifest: Dict[str, Any]) -> Optional[str]:
    """Header, sample count, and exactly one in-bounds allocation (the image) per sample."""
    n = manifest.get("info", {}).get("samples")
    size = os.path.getsize(path)
    if size < _BETON_HEADER.itemsize:
        return "the .beton is shorter than its header"
    header = np.fromfile(path, dtype=_BETON_HEADER, count=1)[0]
    if (header["version"] != _BETON_VERSION or header["num_fields"] != 2
            or header["num_samples"] != n):
        return (f"the .beton header says version {header['version']}, {header['num_fields']} "
                f"fields, {header['num_samples']} samples; expected {_BETON_VERSION}, 2, {n}")
    table_at = int(header["alloc_table_ptr"])
    if table_at + n * _BETON_ALLOC.itemsize != size:
        return "the .beton allocation table is missing or cut short"
    table = np.fromfile(path, dtype=_BETON_ALLOC, count=n, offset=table_at)
    if (not np.array_equal(np.sort(table["sample_id"]), np.arange(n, dtype=np.uint64))
            or np.any(table["ptr"] + table["size"] > table_at)):
        return "the .beton allocation table does not cover every sample"
    return None


def load_rgb(path: str, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Decode any pillow-readable image to uint8 HWC RGB, optionally resized to ``(h, w)``."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def decode_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be used as an image (pillow cannot decode all of it), or None.

    JPEGs are decoded at 1/8 scale (``draft``): the whole entropy-coded stream is still read, so
    truncated or corrupt files are caught, at a fraction of a full decode's cost.
    """
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.convert("RGB").load()
    except Exception as err:  # noqa: BLE001 - any decoder failure makes the file unusable
        text = str(err).replace(f"'{path}'", "").replace(path, "").strip(" :")
        return f"{type(err).__name__}: {text}".replace("\n", " ").replace("\t", " ")
    return None


def _problems_chunk(paths: Sequence[str]) -> List[Tuple[int, str]]:
    return [(i, problem) for i, path in enumerate(paths)
            if (problem := decode_problem(path)) is not None]


def find_bad_images(paths: Sequence[str], workers: int = 1) -> List[Tuple[str, str]]:
    """``(path, reason)`` for every file pillow cannot decode, in input order."""
    chunks = list(iter_chunks(list(paths), 200))
    bad = []
    for c, found in enumerate(parallel_map(_problems_chunk, chunks, workers, len(paths),
                                           "check")):
        bad += [(chunks[c][i], reason) for i, reason in found]
    return bad


def iter_chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for a in range(0, len(items), size):
        yield items[a:a + size]
