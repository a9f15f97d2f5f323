"""Write-ahead log of accepted loss reports: what makes an acknowledged report survive a crash.

A report is appended here *before* the service acknowledges it, and the log of an epoch is
deleted only after that epoch has been folded into the ledger and the ledger file replaced
atomically. A restarted server therefore rebuilds exactly the acknowledged state: the ledger file
plus every logged record of a later epoch.

One file per epoch (``epoch-00000007.wal``), so a commit drops whole files instead of rewriting
one. Each record is framed so that a torn tail (the process died inside a write, or the machine
lost power) is recognised and dropped instead of poisoning the replay::

    magic "MXRC" | crc32 u32 | epoch i64 | rank i64 | n i64 | ids <i8[n] | losses <f4[n]

The CRC covers everything after itself. Records are written with one ``writev`` of the raw numpy
buffers (no per-element Python), which is what keeps logging ingest in the tens of millions of
losses per second.

Durability: a ``write`` that has returned is in the kernel's page cache and survives the death
of the process (SIGKILL, an exception, OOM kill). Surviving a power loss or kernel crash needs
the data on the disk too: ``fsync=True`` syncs every record (and the directory when a file is
created) before the report is acknowledged, at a large cost in throughput.
"""
from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import numpy as np

from ..core.ledger import fsync_dir

__all__ = ["WriteAheadLog", "ReplayedRecord", "RECORD_HEADER"]

log = logging.getLogger(__name__)

_MAGIC = b"MXRC"
#: magic, crc32, epoch, rank, n
RECORD_HEADER = struct.Struct("<4sIqqq")
_CRC_FROM = 8  # the CRC covers the header from the epoch field on, then the payload
_BYTES_PER_LOSS = 12  # int64 id + float32 loss
_NAME = re.compile(r"^epoch-(\d{8,})\.wal$")


@dataclass(frozen=True)
class ReplayedRecord:
    epoch: int
    rank: int
    ids: np.ndarray  # int64[n]
    losses: np.ndarray  # float32[n]


class WriteAheadLog:
    """Append-only, per-epoch record files under ``directory``. Not thread-safe: callers lock."""

    def __init__(self, directory: str, fsync: bool = False) -> None:
        self.directory = os.fspath(directory)
        self.fsync = bool(fsync)
        os.makedirs(self.directory, exist_ok=True)
        self._fds: Dict[int, int] = {}
        self._sizes: Dict[int, int] = {}
        #: bytes dropped from torn or corrupted tails during the last replay
        self.dropped_bytes = 0

    # ----------------------------------------------------------------------------- files
    def _path(self, epoch: int) -> str:
        return os.path.join(self.directory, f"epoch-{epoch:08d}.wal")

    def epochs(self) -> List[int]:
        """Epochs that have a log file, ascending."""
        found = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def _fd(self, epoch: int) -> int:
        fd = self._fds.get(epoch)
        if fd is None:
            path = self._path(epoch)
            created = not os.path.exists(path)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._fds[epoch] = fd
            self._sizes[epoch] = os.fstat(fd).st_size
            if created and self.fsync:
                fsync_dir(self.directory)
        return fd

    @property
    def nbytes(self) -> int:
        """Bytes currently logged (files opened by this process)."""
        return sum(self._sizes.values())

    # ----------------------------------------------------------------------------- writing
    def append(self, epoch: int, rank: int, ids: np.ndarray, losses: np.ndarray) -> int:
        """Log one validated report; return the bytes written. On error the file is unchanged.

        ``ids`` must be contiguous int64 and ``losses`` contiguous float32 (the caller converts).
        """
        if ids.dtype != np.dtype("<i8") or losses.dtype != np.dtype("<f4"):
            raise TypeError(f"log records hold <i8 ids and <f4 losses, got {ids.dtype} and "
                            f"{losses.dtype}")
        if not (ids.flags.c_contiguous and losses.flags.c_contiguous):
            raise ValueError("log records need contiguous arrays")
        n = int(ids.size)
        tail = struct.pack("<qqq", epoch, rank, n)
        id_buf, loss_buf = memoryview(ids).cast("B"), memoryview(losses).cast("B")
        crc = zlib.crc32(loss_buf, zlib.crc32(id_buf, zlib.crc32(tail)))
        header = _MAGIC + struct.pack("<I", crc) + tail
        buffers = [header, id_buf, loss_buf]
        total = len(header) + len(id_buf) + len(loss_buf)
        fd = self._fd(epoch)
        start = self._sizes[epoch]
        try:
            written = os.writev(fd, buffers)
            while written < total:  # a short write (rare on regular files): finish it
                rest = b"".join(bytes(b) for b in buffers)[written:]
                written += os.write(fd, rest)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            # leave no partial record behind: the report is refused as a whole
            try:
                os.ftruncate(fd, start)
            except OSError:  # pragma: no cover - the replay drops a torn tail anyway
                pass
            raise
        self._sizes[epoch] = start + total
        return total

    def drop_through(self, epoch: int) -> None:
        """Delete the logs of every epoch <= ``epoch`` (they are in the saved ledger now)."""
        for e in self.epochs():
            if e <= epoch:
                fd = self._fds.pop(e, None)
                if fd is not None:
                    os.close(fd)
                self._sizes.pop(e, None)
                os.unlink(self._path(e))
        if self.fsync:
            fsync_dir(self.directory)

    def rewrite(self, records: List[Tuple[int, int, np.ndarray, np.ndarray]]) -> None:
        """Replace every log with ``records`` (epoch, rank, ids, losses); for loading a state."""
        self.drop_through(np.iinfo(np.int64).max)
        for epoch, rank, ids, losses in records:
            self.append(epoch, rank, ids, losses)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._sizes.clear()

    # ----------------------------------------------------------------------------- replay
    def replay(self) -> Iterator[ReplayedRecord]:
        """Yield every intact record, epoch by epoch, in the order written.

        A record that is cut short or fails its checksum ends its file: everything from it on is
        dropped (and truncated away, so later appends start on a record boundary) with a warning.
        Only a tail can be torn by a crash; damage further in means the disk lied, and the same
        rule keeps the intact prefix.
        """
        self.dropped_bytes = 0
        for epoch in self.epochs():
            path = self._path(epoch)
            with open(path, "rb") as f:
                data = f.read()
            good, records = self._parse(data, epoch, path)
            yield from records
            if good < len(data):
                self.dropped_bytes += len(data) - good
                log.warning("write-ahead log %s: dropped a torn or corrupted tail of %d bytes "
                            "(kept %d intact records)", path, len(data) - good, len(records))
                with open(path, "r+b") as f:
                    f.truncate(good)
                    if self.fsync:
                        os.fsync(f.fileno())

    @staticmethod
    def _parse(data: bytes, epoch: int, path: str) -> Tuple[int, List[ReplayedRecord]]:
        view = memoryview(data)
        off, records = 0, []
        while off < len(view):
            if len(view) - off < RECORD_HEADER.size:
                break
            magic, crc, rec_epoch, rank, n = RECORD_HEADER.unpack_from(view, off)
            if magic != _MAGIC or n < 0 or rec_epoch != epoch:
                break
            end = off + RECORD_HEADER.size + _BYTES_PER_LOSS * n
            if end > len(view):
                break
            if zlib.crc32(view[off + _CRC_FROM:end]) != crc:
                break
            body = off + RECORD_HEADER.size
            ids = np.frombuffer(view, "<i8", n, body).astype(np.int64)
            losses = np.frombuffer(view, "<f4", n, body + 8 * n).astype(np.float32)
            records.append(ReplayedRecord(int(rec_epoch), int(rank), ids, losses))
            off = end
        return off, records
