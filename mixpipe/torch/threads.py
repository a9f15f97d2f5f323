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

import contextlib
import ctypes
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

__all__ = ["limit_blas_threads", "limited_blas", "blas_threads", "WorkerInit"]

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


def _thread_calls() -> Iterator[Tuple[str, Optional[Callable[[], int]],
                                        Optional[Callable[[int], None]]]]:
    """(path, get, set) of each loaded OpenBLAS's thread-count calls, typed for ctypes (either
    call is None where a build lacks it)."""
    for path, lib in _openblas_libraries():
        getter, setter = _symbol(lib, "get"), _symbol(lib, "set")
        if getter is not None:
            getter.restype = ctypes.c_int
        if setter is not None:
            setter.argtypes = [ctypes.c_int]
        yield path, getter, setter


def _threadpoolctl_limits():
    """threadpoolctl's ``threadpool_limits`` when it is installed (it also knows MKL, BLIS and
    OpenMP runtimes), else None."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits


def _set_env(limit: int) -> Dict[str, Optional[str]]:
    """Set the thread variables to ``limit``; returns what they were."""
    saved = {name: os.environ.get(name) for name in _ENV}
    for name in _ENV:
        os.environ[name] = str(limit)
    return saved


def limit_blas_threads(limit: int = 1) -> None:
    """Cap the BLAS and OpenMP thread pools of this process at ``limit`` threads."""
    _set_env(limit)
    threadpool_limits = _threadpoolctl_limits()
    if threadpool_limits is not None:
        threadpool_limits(limits=limit)  # applies now; kept for the process's life
        return
    for _, _, setter in _thread_calls():
        if setter is not None:
            setter(int(limit))


@contextlib.contextmanager
def limited_blas(limit: int = 1) -> Iterator[None]:
    """Cap this process's BLAS threads at ``limit`` inside the block, then restore them.

    Wrap the start of DataLoader workers in it: a forked worker inherits the cap, a spawned one
    the environment variables, so no worker ever has to change its thread count itself. Doing it
    in the worker instead (``openblas_set_num_threads`` after the fork) restarts OpenBLAS's
    thread server there, whose spinning threads cost each worker ~50 ms of CPU (0.2 ms per
    224 px image in a 512-image epoch with 2 workers, measured here).
    """
    saved_env = _set_env(limit)
    try:
        threadpool_limits = _threadpoolctl_limits()
        if threadpool_limits is not None:
            with threadpool_limits(limits=limit):
                yield
            return
        restore = [(setter, int(getter())) for _, getter, setter in _thread_calls()
                   if getter is not None and setter is not None]
        for setter, _ in restore:
            setter(int(limit))
        try:
            yield
        finally:
            for setter, threads in restore:
                setter(threads)
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def blas_threads() -> Dict[str, int]:
    """``{library path: threads}`` of the OpenBLAS libraries loaded here, as the library itself
    reports it (empty where none is loaded or /proc is missing)."""
    return {path: int(getter()) for path, getter, _ in _thread_calls() if getter is not None}


class WorkerInit:
    """A DataLoader ``worker_init_fn``: at most ``blas_limit`` BLAS threads, then the user's own
    function if any.

    Workers started under :func:`limited_blas` already have the limit, and then nothing is
    changed (changing it restarts OpenBLAS's thread server; see there); a worker that was not
    (a forkserver started earlier) is limited here. A class rather than a closure so a spawn- or
    forkserver-started worker can unpickle it.
    """

    def __init__(self, user_fn: Optional[Callable[[int], None]] = None,
                 blas_limit: int = 1) -> None:
        self.user_fn = user_fn
        self.blas_limit = int(blas_limit)

    def __call__(self, worker_id: int) -> None:
        if max(blas_threads().values(), default=0) > self.blas_limit:
            limit_blas_threads(self.blas_limit)
        if self.user_fn is not None:
            self.user_fn(worker_id)
