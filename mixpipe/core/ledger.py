"""Per-sample loss table: what the selection policies read to decide the next epoch.

Columns, not objects: tens of millions of samples must fit in memory and be snapshotted in
milliseconds. Four columns of 4 bytes (16 bytes per sample, under the 24-byte budget):
last loss and EMA (float32), epoch last seen and times seen (int32).
"""
from __future__ import annotations

import dataclasses
import os
import struct
import tempfile
import zlib
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

__all__ = ["Ledger", "LedgerSnapshot", "LedgerFormatError", "check_report", "atomic_write",
           "fsync_dir", "MAX_EPOCH"]

#: the last epoch a ledger can record: ``last_epoch`` is an int32 column (4 bytes of the 16 per
#: sample); the service refuses later epochs before they are accepted anywhere
MAX_EPOCH = 2**31 - 1

_MAGIC = b"MIXLEDG\x00"
_VERSION = 1
_HEADER = struct.Struct("<8sHqdq")  # magic, version, num_samples, ema_decay, committed_epoch


class LedgerFormatError(ValueError):
    """A ledger file that is foreign, truncated, corrupted or of an unknown version."""


@dataclasses.dataclass(frozen=True)
class LedgerSnapshot:
    """Read-only view of the ledger at one moment; policies are pure functions of it.

    ``last_epoch`` is -1 and ``count`` 0 for samples never reported; their losses are NaN.
    ``labels`` is None unless the service attached the dataset's labels (read by ``assist``).
    """

    last_loss: np.ndarray  # float32[N]
    ema: np.ndarray  # float32[N]
    last_epoch: np.ndarray  # int32[N]
    count: np.ndarray  # int32[N]
    committed_epoch: int  # last committed epoch, -1 before the first commit
    #: int64[N] class of every sample, when the service was given labels (``set_labels``); the
    #: ledger itself never stores them (they are dataset facts, not loss history)
    labels: Optional[np.ndarray] = None

    @property
    def num_samples(self) -> int:
        return int(self.last_loss.shape[0])

    @property
    def seen(self) -> np.ndarray:
        return self.count > 0


def check_report(num_samples: int, ids: np.ndarray, losses: np.ndarray) -> None:
    """Refuse a malformed report before it touches anything (a report is all or nothing)."""
    if not isinstance(ids, np.ndarray) or not isinstance(losses, np.ndarray):
        raise TypeError("ids and losses must be numpy arrays")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be an integer array, got dtype {ids.dtype}")
    if losses.dtype.kind != "f":
        raise TypeError(f"losses must be a float array, got dtype {losses.dtype}")
    if ids.ndim != 1 or losses.ndim != 1:
        raise ValueError(f"ids and losses must be 1-D, got shapes {ids.shape} and {losses.shape}")
    if ids.shape != losses.shape:
        raise ValueError(f"length mismatch: {ids.size} ids but {losses.size} losses")
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_samples:
        bad = lo if lo < 0 else hi
        raise ValueError(f"id {bad} out of range [0, {num_samples})")
    finite = np.isfinite(losses)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"loss for id {int(ids[first])} is not finite ({losses[first]})")
    if float(losses.min()) < 0:
        first = int(np.argmin(losses))
        raise ValueError(f"loss for id {int(ids[first])} is negative ({losses[first]})")


def atomic_write(path: Union[str, os.PathLike], data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never half.

    Write to a temporary file in the same directory, fsync it, rename over the target, then
    fsync the directory so the rename itself is durable.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename or a new file in ``directory`` durable (the entry lives in the directory)."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Ledger:
    """Mutable loss table for ``num_samples`` samples. Not thread-safe: the server serialises.

    ``ema_decay`` d gives ``ema <- d * ema + (1 - d) * loss``; a sample's first loss initialises
    its EMA. Within one :meth:`update` call a repeated id keeps its last occurrence.
    """

    def __init__(self, num_samples: int, ema_decay: float = 0.7) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        self.num_samples = int(num_samples)
        self.ema_decay = float(ema_decay)
        self.last_loss = np.full(num_samples, np.nan, np.float32)
        self.ema = np.full(num_samples, np.nan, np.float32)
        self.last_epoch = np.full(num_samples, -1, np.int32)
        self.count = np.zeros(num_samples, np.int32)
        self.committed_epoch = -1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.last_loss, self.ema, self.last_epoch, self.count))

    def update(self, epoch: int, ids: np.ndarray, losses: np.ndarray) -> None:
        """Fold one epoch's losses in (validated first; on error nothing changes)."""
        ids = np.asarray(ids)
        losses = np.asarray(losses)
        check_report(self.num_samples, ids, losses)
        if ids.size == 0:
            return
        ids = ids.astype(np.int64, copy=False)
        losses = losses.astype(np.float32, copy=False)
        uniq, vals = self._last_per_id(ids, losses)
        old = self.ema[uniq]
        fresh = self.count[uniq] == 0
        d = np.float32(self.ema_decay)
        self.ema[uniq] = np.where(fresh, vals, d * old + (np.float32(1) - d) * vals)
        self.last_loss[uniq] = vals
        self.last_epoch[uniq] = epoch
        self.count[uniq] += 1

    def _last_per_id(self, ids: np.ndarray, losses: np.ndarray) -> tuple:
        """(distinct ids, the loss of each id's last occurrence).

        Reports almost never repeat an id, so first test for repeats without sorting: mark ids
        in a bool table (cheap when the report is a large share of the dataset) and compare the
        count. Only when ids do repeat, or the report is small, sort.
        """
        if ids.size * 8 >= self.num_samples:
            marked = np.zeros(self.num_samples, bool)
            marked[ids] = True
            if int(np.count_nonzero(marked)) == ids.size:
                return ids, losses
        uniq, first_in_rev = np.unique(ids[::-1], return_index=True)
        return uniq, losses[::-1][first_in_rev]

    def copy(self) -> "Ledger":
        """An independent copy: the server folds a commit into one, so a failed save changes
        nothing in memory."""
        clone = Ledger(0, self.ema_decay)
        clone.num_samples = self.num_samples
        for name in ("last_loss", "ema", "last_epoch", "count"):
            setattr(clone, name, getattr(self, name).copy())
        clone.committed_epoch = self.committed_epoch
        return clone

    def snapshot(self, copy: bool = True) -> LedgerSnapshot:
        """A read-only view of the table.

        ``copy=False`` shares the columns instead of copying them (zero cost at 100M samples);
        only safe for a ledger nobody updates any more, which is how the selection server
        treats every ledger it has installed (a commit builds a new one, :meth:`folded`).
        """
        columns = (self.last_loss, self.ema, self.last_epoch, self.count)
        arrays = [a.copy() if copy else a.view() for a in columns]
        for a in arrays:
            a.setflags(write=False)
        return LedgerSnapshot(*arrays, committed_epoch=self.committed_epoch)

    def folded(self, epochs: Dict[int, List[Tuple[np.ndarray, np.ndarray]]],
               through: int) -> "Ledger":
        """A new ledger: this one with ``epochs`` ({epoch: [(ids, losses), ...]}) folded in
        epoch order and ``through`` as its committed epoch; this one is left as it was.

        Building a new table instead of updating in place is what lets the server commit off
        its lock: readers keep using the old table until the new one is installed. With nothing
        to fold the columns are shared, not copied.
        """
        if not any(chunks for chunks in epochs.values()):
            clone = Ledger(0, self.ema_decay)
            clone.num_samples = self.num_samples
            clone.last_loss, clone.ema = self.last_loss, self.ema
            clone.last_epoch, clone.count = self.last_epoch, self.count
        else:
            clone = self.copy()
            for epoch in sorted(epochs):
                chunks = epochs[epoch]
                if not chunks:
                    continue
                ids = np.concatenate([c[0] for c in chunks]) if len(chunks) > 1 else chunks[0][0]
                losses = np.concatenate([c[1] for c in chunks]) if len(chunks) > 1 \
                    else chunks[0][1]
                clone.update(epoch, ids, losses)
        clone.committed_epoch = int(through)
        return clone

    def check_meaning(self, max_epoch: int = MAX_EPOCH) -> None:
        """Refuse a table no sequence of reports could have produced (checksums cannot tell).

        A ledger that arrives from outside (``load_state_dict``, a file) drives every later
        plan, so NaN or negative losses, negative counts, or a sample seen in an epoch after
        the committed one would poison them all.
        """
        c = self.committed_epoch
        if not -1 <= c <= max_epoch:
            raise LedgerFormatError(f"ledger committed epoch {c} outside [-1, {max_epoch}]")
        count, last_epoch = self.count, self.last_epoch
        if count.size == 0:
            return
        if int(count.min()) < 0:
            i = int(np.argmin(count))
            raise LedgerFormatError(f"ledger count of sample {i} is negative ({count[i]})")
        if int(count.max()) > c + 1:
            i = int(np.argmax(count))
            raise LedgerFormatError(f"ledger counts sample {i} {count[i]} times in {c + 1} "
                                    "committed epochs")
        seen = count > 0
        if not np.array_equal(seen, last_epoch >= 0) or int(last_epoch.min()) < -1:
            i = int(np.flatnonzero(seen != (last_epoch >= 0))[0]) if \
                not np.array_equal(seen, last_epoch >= 0) else int(np.argmin(last_epoch))
            raise LedgerFormatError(f"ledger sample {i}: last epoch {last_epoch[i]} disagrees "
                                    f"with its count {count[i]}")
        if int(last_epoch.max()) > c:
            i = int(np.argmax(last_epoch))
            raise LedgerFormatError(f"ledger sample {i} was last seen in epoch {last_epoch[i]}, "
                                    f"after the committed epoch {c}")
        for name in ("last_loss", "ema"):
            col = getattr(self, name)
            bad = seen & ~(np.isfinite(col) & (col >= 0))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise LedgerFormatError(f"ledger {name} of sample {i} is {col[i]}: losses must "
                                        "be finite and >= 0")
            if not np.isnan(col[~seen]).all():
                i = int(np.flatnonzero(~seen & ~np.isnan(col))[0])
                raise LedgerFormatError(f"ledger {name} of never-seen sample {i} is {col[i]}, "
                                        "not NaN")

    # ------------------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        header = _HEADER.pack(_MAGIC, _VERSION, self.num_samples, self.ema_decay,
                              self.committed_epoch)
        columns = (self.last_loss.astype("<f4"), self.ema.astype("<f4"),
                   self.last_epoch.astype("<i4"), self.count.astype("<i4"))
        body = header + b"".join(c.tobytes() for c in columns)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Ledger":
        view = memoryview(data).cast("B")
        if len(view) < _HEADER.size + 4:
            raise LedgerFormatError(f"ledger truncated: {len(view)} bytes")
        magic, version, n, decay, committed = _HEADER.unpack_from(view, 0)
        if magic != _MAGIC:
            raise LedgerFormatError(f"not a mixpipe ledger (magic {bytes(magic)!r})")
        if version != _VERSION:
            raise LedgerFormatError(f"ledger version {version} not supported (reads {_VERSION})")
        expected = _HEADER.size + 16 * n + 4
        if n < 0 or len(view) != expected:
            raise LedgerFormatError(f"ledger truncated or padded: {len(view)} bytes, expected "
                                    f"{expected} for {n} samples")
        (crc,) = struct.unpack_from("<I", view, expected - 4)
        if zlib.crc32(view[: expected - 4]) != crc:
            raise LedgerFormatError("ledger corrupted: checksum mismatch")
        ledger = cls(n, decay)
        ledger.committed_epoch = int(committed)
        off = _HEADER.size
        for name, wire, native in (("last_loss", "<f4", np.float32), ("ema", "<f4", np.float32),
                                   ("last_epoch", "<i4", np.int32), ("count", "<i4", np.int32)):
            arr = np.frombuffer(view, dtype=wire, count=n, offset=off)
            setattr(ledger, name, arr.astype(native, copy=True))
            off += 4 * n
        return ledger

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Atomically replace ``path`` with this ledger (write, fsync, rename)."""
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Ledger":
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())

    def state_dict(self) -> dict:
        return {"ledger": self.to_bytes()}

    def load_state_dict(self, state: dict) -> None:
        other = Ledger.from_bytes(state["ledger"])
        self.__dict__.update(other.__dict__)
