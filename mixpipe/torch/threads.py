"""One BLAS thread per DataLoader worker.

The composer resizes with numpy matrix products, and numpy's OpenBLAS keeps a pool of one thread
per core in every process. A DataLoader worker forked from a process that already imported numpy
inherits that setting, so ``num_workers`` workers each spin up to ``cores`` BLAS threads for
products of a few hundred elements: on a 2-core box the mixing loader cost ~41 ms of CPU per
image instead of ~5 ms with one BLAS thread (scripts/gpu_check.py's host_cost, issue 32).
torch's DataLoader already sets torch's own intra-op threads to 1 in its workers; it does not
touch numpy's BLAS.

Environment variables (``OPENBLAS_NUM_THREADS``) are read once, when the library loads: in a
forked worker that happened in the parent long ago, and even a spawned worker has imported numpy
by the time ``worker_init_fn`` runs (unpickling the dataset does it). So the limit is set through
the library's runtime call: threadpoolctl's when it is installed (it also knows MKL, BLIS and
OpenMP runtimes), otherwise OpenBLAS's own ``*_set_num_threads`` found among the loaded shared
objects. The environment variables are set too, for libraries loaded later in the worker and for
its subprocesses.
"""
from __future__ import annotations

import ctypes
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

__all__ = ["limit_blas_threads", "blas_threads", "WorkerInit"]

_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
#: OpenBLAS's thread calls under the names its builds export: plain, 64-bit-integer, and the
#: scipy-openblas wheels numpy ships (prefixed so they cannot clash with a system OpenBLAS).
_PREFIXES = ("openblas_", "scipy_openblas_")
_SUFFIXES = ("", "64_", "_64_")


def _openblas_libraries() -> Iterator[Tuple[str, ctypes.CDLL]]:
    """Each OpenBLAS shared object mapped into this process, opened again (no second copy is
    loaded: dlopen of a mapped path returns the same handle)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f
                     if len(line.split(None, 5)) == 6 and "openblas" in line.lower()}
    except OSError:  # no /proc (macOS): only threadpoolctl can reach the library there
        return
    for path in sorted(paths):
        if not os.path.isfile(path):
            continue
        try:
            yield path, ctypes.CDLL(path)
        except OSError:
            continue


def _symbol(lib: ctypes.CDLL, verb: str) -> Optional[Callable[..., int]]:
    for prefix in _PREFIXES:
        for suffix in _SUFFIXES:
            fn = getattr(lib, f"{prefix}{verb}_num_threads{suffix}", None)
            if fn is not None:
                return fn
    return None


def limit_blas_threads(limit: int = 1) -> None:
    """Cap the BLAS and OpenMP thread pools of this process at ``limit`` threads."""
    for name in _ENV:
        os.environ[name] = str(limit)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        threadpool_limits(limits=limit)  # applies now; kept for the process's life
        return
    for _, lib in _openblas_libraries():
        setter = _symbol(lib, "set")
        if setter is not None:
            setter.argtypes = [ctypes.c_int]
            setter(int(limit))


def blas_threads() -> Dict[str, int]:
    """``{library path: threads}`` of the OpenBLAS libraries loaded here, as the library itself
    reports it (empty where none is loaded or /proc is missing)."""
    out: Dict[str, int] = {}
    for path, lib in _openblas_libraries():
        getter = _symbol(lib, "get")
        if getter is not None:
            getter.restype = ctypes.c_int
            out[path] = int(getter())
    return out


class WorkerInit:
    """A DataLoader ``worker_init_fn``: one BLAS thread, then the user's own function if any.

    A class rather than a closure so a spawn- or forkserver-started worker can unpickle it.
    """

    def __init__(self, user_fn: Optional[Callable[[int], None]] = None,
                 blas_limit: int = 1) -> None:
        self.user_fn = user_fn
        self.blas_limit = int(blas_limit)

    def __call__(self, worker_id: int) -> None:
        limit_blas_threads(self.blas_limit)
        if self.user_fn is not None:
            self.user_fn(worker_id)
