"""Pixel kernels the FFCV mixing decoder calls per constituent, written for numba.

They reproduce :mod:`mixpipe.core.compose` inside FFCV's compiled pipeline, where numpy's
``tensordot`` is not available per pixel. The resize filter is not re-derived here: the core's
:func:`mixpipe.core.filter.filter_taps` is compiled as it is, so the weights are the reference's.

* :func:`paste_window` resizes a crop window of a decoded image to a region (rows first, then
  columns, as the reference does), rounds half up and writes it into the composite;
* :func:`blend_window` adds ``weight * resized window`` to a float32 accumulator and
  :func:`round_into` rounds the accumulator into the composite (BLEND);
* :func:`paste_u8` / :func:`blend_u8` do the same for a patch already resized by FFCV's own
  OpenCV resize (the decoders' ``resize="fast"`` mode);
* :func:`accumulator` / :func:`u8_patch` allocate the decoder's per-slot scratch arrays, which
  must not be allocated in the decoder's own (possibly ``prange``) loop.

A pass whose input and output sizes agree is the identity in the reference (weights exactly 1 and
0), so it is skipped here: a constituent already at its region's size is copied untouched.

Accuracy against the reference: the filter weights are the same; each resize pass sums in
float64 in tap order and rounds to float32, where the reference sums in float32 with BLAS (other
order, fused multiply-adds), so a resized pixel can differ by a few float32 ulps and, where the
exact value sits on a .5 rounding boundary, the uint8 result by 1 (tests allow at most 1 level on
at most 1% of a composite's pixels). Copies, pastes and blends without a resize are bit-exact.

The functions are plain Python first; :func:`compiled` returns numba versions compiled WITHOUT
fastmath (FFCV compiles its own stage code with fastmath, which would reorder these sums), or the
plain functions when FFCV's ``Compiler`` is disabled.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from ..core.filter import filter_taps

__all__ = ["paste_window", "blend_window", "round_into", "paste_u8", "blend_u8", "accumulator",
           "u8_patch", "compiled"]

_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)
_MAX = np.float32(255.0)


def _resample(image, top, left, height, width, flip, out_h, out_w):
    """float32[out_h, out_w, 3]: the window resized, rows first then columns.

    Each product is of two float32 values, hence exact in float64, and the sums are float64,
    rounded to float32 after each pass (the reference keeps float32 between its passes). That
    makes the result independent of whether LLVM fuses multiply-adds, which it does or not
    depending on the calling context (checked: float32 sums gave 1-level differences between the
    kernel called from Python and from FFCV's fastmath stage code).

    Loops run over flat, contiguous rows (the vertical pass vectorises) with the three channels
    unrolled: FFCV's RGB field always has three.
    """
    img_w = image.shape[1]
    flat = image.reshape(-1)
    row_len = width * 3
    rows = np.empty((out_h, row_len), np.float32)
    if out_h == height:
        for y in range(out_h):
            base = ((top + y) * img_w + left) * 3
            for i in range(row_len):
                rows[y, i] = np.float32(flat[base + i])
    else:
        r_first, r_count, r_w = _taps(height, out_h)
        line = np.empty(row_len, np.float64)
        for y in range(out_h):
            for i in range(row_len):
                line[i] = 0.0
            for t in range(r_count[y]):
                w = np.float64(r_w[y, t])
                base = ((top + r_first[y] + t) * img_w + left) * 3
                for i in range(row_len):
                    line[i] += w * np.float64(flat[base + i])
            for i in range(row_len):
                rows[y, i] = np.float32(line[i])
    out = np.empty((out_h, out_w, 3), np.float32)
    if out_w == width:
        for y in range(out_h):
            for x in range(out_w):
                src = 3 * (width - 1 - x if flip else x)
                out[y, x, 0] = rows[y, src]
                out[y, x, 1] = rows[y, src + 1]
                out[y, x, 2] = rows[y, src + 2]
        return out
    c_first, c_count, c_w = _taps(width, out_w)
    for y in range(out_h):
        for x in range(out_w):
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            for t in range(c_count[x]):
                w = np.float64(c_w[x, t])
                src_x = c_first[x] + t
                if flip:
                    src_x = width - 1 - src_x
                src = 3 * src_x
                a0 += w * np.float64(rows[y, src])
                a1 += w * np.float64(rows[y, src + 1])
                a2 += w * np.float64(rows[y, src + 2])
            out[y, x, 0] = np.float32(a0)
            out[y, x, 1] = np.float32(a1)
            out[y, x, 2] = np.float32(a2)
    return out


def _round_u8(value):
    v = math.floor(value + _HALF)
    if v < _ZERO:
        v = _ZERO
    if v > _MAX:
        v = _MAX
    return np.uint8(v)


def paste_window(image, top, left, height, width, flip, dest, r_top, r_left, r_h, r_w):
    """Resize ``image[top:top+height, left:left+width]`` to the region and write it to ``dest``.

    A window already of the region's size is copied untouched (mirrored if ``flip``).
    """
    channels = image.shape[2]
    if height == r_h and width == r_w:
        for y in range(r_h):
            for x in range(r_w):
                src_x = width - 1 - x if flip else x
                for c in range(channels):
                    dest[r_top + y, r_left + x, c] = image[top + y, left + src_x, c]
        return
    resized = _resample(image, top, left, height, width, flip, r_h, r_w)
    for y in range(r_h):
        for x in range(r_w):
            for c in range(channels):
                dest[r_top + y, r_left + x, c] = _round_u8(resized[y, x, c])


def blend_window(image, top, left, height, width, flip, weight, acc):
    """``acc += weight * resize(window, acc size)`` in float32, as the reference BLEND does."""
    out_h, out_w, channels = acc.shape
    resized = _resample(image, top, left, height, width, flip, out_h, out_w)
    w = np.float64(np.float32(weight))
    for y in range(out_h):
        for x in range(out_w):
            for c in range(channels):
                # float32 product (exact in float64, rounded once), then a float32 add: the
                # reference's ``acc += w * image``, immune to multiply-add fusion
                acc[y, x, c] += np.float32(w * np.float64(resized[y, x, c]))


def paste_u8(patch, flip, dest, r_top, r_left):
    """Copy an already-resized uint8 patch into the composite (mirrored if ``flip``)."""
    r_h, r_w = patch.shape[0], patch.shape[1]
    for y in range(r_h):
        for x in range(r_w):
            src_x = r_w - 1 - x if flip else x
            for c in range(3):
                dest[r_top + y, r_left + x, c] = patch[y, src_x, c]


def blend_u8(patch, flip, weight, acc):
    """``acc += weight * patch`` for an already-resized uint8 patch of the composite's size."""
    out_h, out_w = acc.shape[0], acc.shape[1]
    w = np.float64(np.float32(weight))
    for y in range(out_h):
        for x in range(out_w):
            src_x = out_w - 1 - x if flip else x
            for c in range(3):
                acc[y, x, c] += np.float32(w * np.float64(patch[y, src_x, c]))


def accumulator(height, width):
    """A zeroed float32 [height, width, 3] accumulator for one BLEND composite.

    The decoder allocates its per-slot scratch arrays through this function and :func:`u8_patch`
    instead of calling ``np.zeros``/``np.empty`` in its own loop. With several FFCV workers that
    loop is a numba ``prange`` (``parallel=True``), and numba's allocation hoisting moves an
    ``np.empty`` of loop-invariant shape out of the loop. The decoder's accumulator was assigned
    on two paths (a 1x1 placeholder, then the full size for BLEND slots); once both were hoisted
    (numba 0.68) every slot got the 1x1 placeholder, so a BLEND composite had only its top-left
    pixel written and kept the rest of its buffer from an earlier batch. One worker compiles the
    loop serially, without hoisting, which is why only ``num_workers`` > 1 was wrong. A call to a
    compiled function is never hoisted, so each slot gets its own array of its own size.
    """
    return np.zeros((height, width, 3), np.float32)


def u8_patch(height, width):
    """An uninitialised uint8 [height, width, 3] patch (allocated here; see :func:`accumulator`)."""
    return np.empty((height, width, 3), np.uint8)


def round_into(acc, dest):
    """Round a float32 accumulator half up into the uint8 composite."""
    out_h, out_w, channels = acc.shape
    for y in range(out_h):
        for x in range(out_w):
            for c in range(channels):
                dest[y, x, c] = _round_u8(acc[y, x, c])


# ------------------------------------------------------------------------------ compilation
_jit = numba.njit(nogil=True, cache=True)
# Inner helpers are always compiled: with FFCV's Compiler disabled the public kernels below run
# as Python (loops, control flow, table reads) and call these for the arithmetic, which gives the
# same float32 results either way.
_taps = _jit(filter_taps)  # the core's definition, compiled, not a copy of it
_resample = _jit(_resample)
_round_u8 = _jit(_round_u8)

_PUBLIC = {f.__name__: f for f in (paste_window, blend_window, round_into, paste_u8, blend_u8,
                                   accumulator, u8_patch)}
_COMPILED: dict = {}


def compiled(enabled: bool) -> dict:
    """name -> kernel: numba dispatchers when ``enabled``, else the plain Python functions.

    Dispatchers are made once per process (and cached on disk by numba), so building many loaders
    does not recompile them.
    """
    if not enabled:
        return dict(_PUBLIC)
    if not _COMPILED:
        _COMPILED.update({name: _jit(fn) for name, fn in _PUBLIC.items()})
    return dict(_COMPILED)
