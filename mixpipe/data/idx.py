"""Reader for the IDX format (MNIST, Fashion-MNIST), plain or gzip-compressed.

Written here rather than borrowed so that a truncated download or a foreign file fails with a
message naming the file and the problem, instead of a reshape error deep inside numpy.

Format: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
dimension, then the values in C order, big-endian.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import Union

import numpy as np

from .errors import DataError

__all__ = ["read_idx", "IDX_TYPES"]

#: IDX type code -> numpy dtype (big-endian, as stored).
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DIMS = 8


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise DataError(f"{path}: the gzip stream ends early; the file is truncated "
                        "(re-install or re-download it)") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: corrupt gzip data ({err})") from None


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """The array stored in an IDX file, in native byte order.

    Raises :class:`DataError` on a foreign header, an unknown type code, or a payload that is
    shorter or longer than the header's dimensions say.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in IDX_TYPES or not 1 <= ndim <= _MAX_DIMS:
        raise DataError(f"{path}: not an IDX file (magic bytes {data[:4].hex()}; expected "
                        f"0000 + a type code in {sorted(hex(c) for c in IDX_TYPES)} + "
                        f"1..{_MAX_DIMS} dimensions)")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(data)} of {header_len} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_TYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise DataError(f"{path}: IDX payload {what}: header says shape {tuple(dims)} "
                        f"({expected} bytes), file holds {payload} bytes")
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)
