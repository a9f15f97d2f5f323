"""The IDX reader against an encoder written here, and its errors on damaged or foreign files."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mixpipe.data.errors import DataError
from mixpipe.data.idx import read_idx

_CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def encode_idx(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(_CODES[code]).tobytes()


@settings(max_examples=40, deadline=None)
@given(code=st.sampled_from(sorted(_CODES)),
       shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
       compress=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_round_trip(tmp_path_factory, code, shape, compress, seed):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(_CODES[code]).newbyteorder("=")
    if dtype.kind == "f":
        array = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    raw = encode_idx(array, code)
    path = tmp_path_factory.mktemp("idx") / "x.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = read_idx(path)
    assert out.dtype == dtype and out.dtype.isnative
    assert out.shape == tuple(shape)
    np.testing.assert_array_equal(out, array)


@pytest.fixture
def good_bytes():
    return encode_idx(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), 0x08)


def _expect(tmp_path, data: bytes, match: str):
    path = tmp_path / "bad.gz"
    path.write_bytes(data)
    with pytest.raises(DataError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip(tmp_path, good_bytes):
    data = gzip.compress(good_bytes)
    _expect(tmp_path, data[: len(data) - 9], "truncated")


def test_truncated_payload(tmp_path, good_bytes):
    _expect(tmp_path, gzip.compress(good_bytes[:-1]), r"truncated.*\(2, 3, 4\)")


def test_trailing_bytes(tmp_path, good_bytes):
    _expect(tmp_path, good_bytes + b"\0", "trailing bytes")


def test_truncated_header(tmp_path, good_bytes):
    _expect(tmp_path, good_bytes[:9], "truncated IDX header")


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
                                  bytes([0, 0, 0x07, 1, 0, 0, 0, 0]),  # unknown type code
                                  bytes([0, 0, 0x08, 0]),  # zero dimensions
                                  b"ab"])
def test_foreign_files(tmp_path, data):
    _expect(tmp_path, data, "not an IDX file|too short")


def test_corrupt_gzip(tmp_path):
    _expect(tmp_path, b"\x1f\x8b" + b"\x00" * 30, "gzip")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope.gz")
