"""The AutoAssist assistant: a logistic regression that predicts which samples still teach.

AutoAssist (Zhang et al., NeurIPS 2019) trains a model far cheaper than the main one beside it to
predict, from cheap features, whether an instance would still improve the main model; the batch
generator then leaves out the instances it rates low. Here the assistant is a logistic regression
in numpy over features the selection server already has, so it costs no forward pass:

========  =====================================================================================
column    feature (computed for every seen sample from one ledger snapshot, for a planned epoch)
========  =====================================================================================
0         1 (bias)
1         ``log(ema / m + 0.01)``: the smoothed loss relative to the mean ``m`` of the seen EMAs,
          so the rule survives the whole run's losses shrinking
2         ``log(last / m + 0.01)``: the last loss, relative in the same way
3         trend ``(last - ema) / (ema + 0.01 m)``, clipped to [-5, 5]: rising or falling
4         ``log1p(times seen)``
5         ``log1p(epochs since last seen)`` (0 for a sample reported in the previous epoch)
6..       one weight per class, when the service has labels (a one-hot block, kept as class
          indices: with 1000 classes a dense block would be 8 kB per sample)
========  =====================================================================================

Target ("still informative"): the loss the sample got next, after the features were taken, lies
above the ``target_quantile`` of the losses reported in that interval (a block of losses tied at
that quantile counts as above it; an interval of equal losses teaches nothing and leaves the
assistant unfitted, see :func:`informative`). The features must come
from before that loss, so the assistant keeps a memory: the ledger columns of the snapshot it
scored last time (16 bytes per sample). At the next plan every sample reported since gives one
training pair (features from the remembered snapshot, target from the current one). Keeping the
columns avoids deriving the old EMA as ``(ema - (1 - d) last) / d``, which divides float32
rounding by ``d`` (and is undefined for ``d = 0``) and cannot recover the old last loss, trend
or gap at all.

Online, warm-started training: each plan takes ``newton_steps`` Newton steps on the mean log-loss
plus ``l2 / 2 * ||w - w_prev||^2``, a proximal term that keeps the new weights near the previous
epoch's (zero at the start). The Hessian is ``D x D`` with ``D = 6 + classes``; its class block
is diagonal and its cross block a per-class sum, so each step is a few passes over at most
``max_train`` examples (a (seed, epoch)-random subset) and one small dense solve.

The state (weights, memory, a few fit figures) is plain bytes (:class:`AssistState`), an input and
an output of every plan, so the plan stays a function of its inputs and a restored service plans
as the original would.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from typing import Optional, Tuple

import numpy as np

from .ledger import LedgerSnapshot

__all__ = ["AssistState", "AssistStateError", "NUM_BASE_FEATURES", "features", "fit_assistant",
           "predict", "training_pairs", "num_classes_of", "informative"]

NUM_BASE_FEATURES = 6
_EPS = 0.01  # relative floor inside logs and ratios: a zero loss stays finite
_TREND_CLIP = 5.0

_MAGIC = b"MIXASST\x00"
_VERSION = 1
_HEADER = struct.Struct("<8sHqqqqq")  # magic, version, n, memory epoch, classes, D, meta bytes


class AssistStateError(ValueError):
    """Assistant state bytes that are foreign, truncated, corrupted or for another dataset."""


def num_classes_of(labels: Optional[np.ndarray]) -> int:
    """Classes the one-hot block has (0 without labels)."""
    return 0 if labels is None or labels.size == 0 else int(labels.max()) + 1


def features(snapshot: LedgerSnapshot, epoch: int,
             num_classes: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids of the seen samples int64[n], float64[n, 6] features, class int64[n]) for ``epoch``.

    The class is -1 without labels and for classes at or above ``num_classes`` (passed, not read
    from the labels, so that the columns of two snapshots match): such rows get no class weight.
    """
    seen = snapshot.count > 0
    ids = np.flatnonzero(seen)
    ema = snapshot.ema[ids].astype(np.float64)
    last = snapshot.last_loss[ids].astype(np.float64)
    x = np.empty((ids.size, NUM_BASE_FEATURES), np.float64)
    m = float(ema.mean()) if ids.size else 1.0
    m = m if m > 0 and np.isfinite(m) else 1.0
    x[:, 0] = 1.0
    x[:, 1] = np.log(ema / m + _EPS)
    x[:, 2] = np.log(last / m + _EPS)
    x[:, 3] = np.clip((last - ema) / (ema + _EPS * m), -_TREND_CLIP, _TREND_CLIP)
    x[:, 4] = np.log1p(snapshot.count[ids].astype(np.float64))
    gap = epoch - 1 - snapshot.last_epoch[ids].astype(np.int64)
    x[:, 5] = np.log1p(np.maximum(gap, 0).astype(np.float64))
    cls = np.full(ids.size, -1, np.int64)
    if num_classes and snapshot.labels is not None:
        got = snapshot.labels[ids].astype(np.int64)
        ok = got < num_classes
        cls[ok] = got[ok]
    return ids, x, cls


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


def predict(weights: np.ndarray, x: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """P(still informative) for each row of ``x`` (class ``cls``, -1 for none)."""
    z = x @ weights[:x.shape[1]]
    if weights.size > x.shape[1]:
        has = cls >= 0
        z[has] += weights[x.shape[1]:][cls[has]]
    return _sigmoid(z)


def fit_assistant(x: np.ndarray, cls: np.ndarray, y: np.ndarray, w0: np.ndarray, l2: float,
                  steps: int) -> np.ndarray:
    """Weights after ``steps`` Newton steps from ``w0`` on log-loss + ``l2/2 ||w - w0||^2``.

    ``w0`` holds the feature weights, then one weight per class (``w0.size - x.shape[1]``
    classes). The proximal term makes the Hessian positive definite (a plain solve is safe even
    though the class indicators sum to the bias column) and is what makes the training online:
    the new weights are the previous ones, moved as far as this epoch's evidence warrants.
    """
    w = w0.astype(np.float64, copy=True)
    nb, d = x.shape[1], w0.size
    c = d - nb
    n = max(x.shape[0], 1)
    y = y.astype(np.float64)
    has = cls >= 0
    hcls, hx = cls[has], x[has]
    diag = np.arange(nb, d)
    for _ in range(steps):
        p = predict(w, x, cls)
        r, s = p - y, p * (1.0 - p)
        grad = np.empty(d)
        grad[:nb] = x.T @ r
        hess = np.zeros((d, d))
        hess[:nb, :nb] = (x.T * s) @ x
        if c:
            grad[nb:] = np.bincount(hcls, r[has], c)
            hs = s[has]
            for j in range(nb):  # cross block: per-class sums of s * x_j
                hess[nb:, j] = hess[j, nb:] = np.bincount(hcls, hs * hx[:, j], c)
            hess[diag, diag] = np.bincount(hcls, hs, c)
        grad = grad / n + l2 * (w - w0)
        hess = hess / n + l2 * np.eye(d)
        w = w - np.linalg.solve(hess, grad)
    return w


def training_pairs(memory: LedgerSnapshot, memory_epoch: int, current: LedgerSnapshot,
                   num_classes: int, quantile: float) -> Tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
    """(features, classes, from ``memory``; bool targets from ``current``) of every sample
    reported since.

    A sample is informative when its newest loss lies above the ``quantile`` of the newest
    losses of all such samples (ties: :func:`informative`); an interval whose losses are all
    equal yields no pairs.
    """
    ids, x, cls = features(memory, memory_epoch, num_classes)
    fresh = current.count[ids] > memory.count[ids]
    ids, x, cls = ids[fresh], x[fresh], cls[fresh]
    if ids.size == 0:
        return x, cls, np.zeros(0, bool)
    y = informative(current.last_loss[ids].astype(np.float64), quantile)
    if y is None:  # no contrast: nothing to learn from this interval
        return x[:0], cls[:0], np.zeros(0, bool)
    return x, cls, y


def informative(loss: np.ndarray, quantile: float) -> Optional[np.ndarray]:
    """Targets: losses above the ``quantile``, or None when the losses tell nothing apart.

    Ties decide this. A strict ``>`` alone makes a block of tied top losses (half or more of
    the interval at the same value, e.g. a saturated loss) all negative, and the assistant then
    rates every sample uninformative and skips at random, the hardest included. So when nothing
    lies strictly above the quantile, the tied block at the quantile counts as informative; when
    every loss is the same (or every one would be positive) there is no contrast and no target,
    which leaves the assistant unfitted and the plan skipping nothing, as ``shrink`` does.
    """
    if loss.size == 0:
        return None
    q = np.quantile(loss, quantile)
    y = loss > q
    if not y.any():
        y = loss >= q
    if y.all() or not y.any():
        return None
    return y


@dataclasses.dataclass(frozen=True)
class AssistState:
    """What the assistant carries from one plan to the next.

    ``weights`` is None before the first fit; ``memory`` (the snapshot scored last, labels
    dropped) and ``memory_epoch`` (the epoch it was scored for) are None/-1 before the first
    plan. ``info`` holds figures of the last fit, for monitoring (JSON-serialisable).
    """

    num_samples: int
    weights: Optional[np.ndarray] = None
    num_classes: int = 0
    memory: Optional[LedgerSnapshot] = None
    memory_epoch: int = -1
    info: Optional[dict] = None

    def check(self) -> None:
        """Refuse a state with a valid checksum but impossible contents (AssistStateError).

        A restored state feeds every later fit: non-finite weights, a weight vector that fits
        no feature layout, or a memory no ledger could hold would make every plan fail or skip
        by garbage.
        """
        if self.num_classes < 0:
            raise AssistStateError(f"assistant state has {self.num_classes} classes")
        if self.weights is not None:
            if self.weights.size != NUM_BASE_FEATURES + self.num_classes:
                raise AssistStateError(f"assistant state holds {self.weights.size} weights, "
                                       f"expected {NUM_BASE_FEATURES} + {self.num_classes} "
                                       "classes")
            if not np.isfinite(self.weights).all():
                raise AssistStateError("assistant state weights are not all finite")
        if self.memory is not None:
            from .ledger import Ledger, LedgerFormatError

            m = self.memory
            table = Ledger(0)
            table.num_samples = self.num_samples
            table.last_loss, table.ema, table.last_epoch, table.count = \
                m.last_loss, m.ema, m.last_epoch, m.count
            table.committed_epoch = m.committed_epoch
            try:
                table.check_meaning()
            except LedgerFormatError as err:
                raise AssistStateError(f"assistant state memory: {err}") from None
            if self.memory_epoch < m.committed_epoch + 1:
                raise AssistStateError(f"assistant state memory was scored for epoch "
                                       f"{self.memory_epoch}, before its own ledger "
                                       f"(committed epoch {m.committed_epoch})")

    def to_bytes(self) -> bytes:
        w = np.zeros(0) if self.weights is None else self.weights
        meta = json.dumps(self.info or {}, sort_keys=True).encode()
        has_memory = self.memory is not None
        parts = [_HEADER.pack(_MAGIC, _VERSION, self.num_samples,
                              self.memory_epoch if has_memory else -1, self.num_classes,
                              -1 if self.weights is None else w.size, len(meta)),
                 np.asarray(w, "<f8").tobytes()]
        if has_memory:
            m = self.memory
            parts += [m.last_loss.astype("<f4").tobytes(), m.ema.astype("<f4").tobytes(),
                      m.last_epoch.astype("<i4").tobytes(), m.count.astype("<i4").tobytes(),
                      struct.pack("<q", m.committed_epoch)]
        parts.append(meta)
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes, num_samples: int) -> "AssistState":
        view = memoryview(data).cast("B")
        if len(view) < _HEADER.size + 4:
            raise AssistStateError(f"assistant state truncated: {len(view)} bytes")
        magic, version, n, mem_epoch, classes, d, meta_len = _HEADER.unpack_from(view, 0)
        if magic != _MAGIC:
            raise AssistStateError(f"not an assistant state (magic {bytes(magic)!r})")
        if version != _VERSION:
            raise AssistStateError(f"assistant state version {version} not supported "
                                   f"(reads {_VERSION})")
        if n != num_samples:
            raise AssistStateError(f"assistant state is for {n} samples, the policy has "
                                   f"{num_samples}")
        size = _HEADER.size + 8 * max(d, 0) + (16 * n + 8 if mem_epoch >= 0 else 0) + meta_len
        if len(view) != size + 4:
            raise AssistStateError(f"assistant state truncated or padded: {len(view)} bytes, "
                                   f"expected {size + 4}")
        (crc,) = struct.unpack_from("<I", view, size)
        if zlib.crc32(view[:size]) != crc:
            raise AssistStateError("assistant state corrupted: checksum mismatch")
        off = _HEADER.size
        weights = None
        if d >= 0:
            weights = np.frombuffer(view, "<f8", d, off).astype(np.float64)
            off += 8 * d
        memory = None
        if mem_epoch >= 0:
            cols = []
            for wire, native in (("<f4", np.float32), ("<f4", np.float32), ("<i4", np.int32),
                                 ("<i4", np.int32)):
                cols.append(np.frombuffer(view, wire, n, off).astype(native))
                off += 4 * n
            (committed,) = struct.unpack_from("<q", view, off)
            off += 8
            memory = LedgerSnapshot(*cols, committed_epoch=int(committed))
        info = json.loads(bytes(view[off:off + meta_len]).decode()) if meta_len else None
        return cls(int(n), weights, int(classes), memory, int(mem_epoch), info)
