"""The mix plan: the contract between the selection server and every loader.

A plan lists the composites ("slots") of one epoch. Loaders only ever see a plan; they never see
losses or policies, so every loader (torch, DALI, FFCV) produces the same epoch from the same plan.
The arrays are plain numpy so that a plan crosses process and network boundaries as raw bytes.
"""
from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from typing import Optional

import numpy as np

__all__ = ["Layout", "MixPlan", "PlanFormatError", "WEIGHT_SUM_TOLERANCE"]


class Layout(enum.IntEnum):
    """How a slot's constituents are combined into one composite input."""

    SINGLE = 0  #: one constituent, unmixed
    BLEND = 1  #: interpolation: pixel-wise weighted sum of 2..K constituents
    HALVES = 2  #: two constituents side by side; the split column follows the weights
    QUADS = 3  #: four constituents in a 2x2 grid (top-left, top-right, bottom-left, bottom-right)


#: Allowed constituent counts per layout, as (min, max) inclusive.
_CONSTITUENTS = {
    Layout.SINGLE: (1, 1),
    Layout.BLEND: (2, 1 << 30),
    Layout.HALVES: (2, 2),
    Layout.QUADS: (4, 4),
}

#: Weight rows must sum to 1 within this tolerance (float32 rounding of snapped shares).
WEIGHT_SUM_TOLERANCE = 1e-4

#: Seed stream tag of :meth:`MixPlan.delivery_order` (keeps it apart from other seeded draws).
_SHUFFLE_STREAM = 0x5A

_MAGIC = b"MIXPLAN\x00"
_VERSION = 1
# magic, version, M, K, S, num_samples, epoch, seed, rank, world_size
_HEADER = struct.Struct("<8sHqqqqqqqq")


class PlanFormatError(ValueError):
    """Bytes that are not a complete, intact serialised plan of a version we understand."""


def constituent_range(layout: Layout) -> tuple[int, int]:
    """(min, max) number of constituents a slot of this layout holds."""
    return _CONSTITUENTS[Layout(layout)]


@dataclasses.dataclass(eq=False)
class MixPlan:
    """One epoch's composites, one row per slot.

    Attributes:
        ids: int64[M, K] dataset indices, -1 after a slot's last constituent.
        weights: float32[M, K] blend coefficients (BLEND) or area shares (HALVES, QUADS); each row
            sums to 1 over its constituents and is 0 where ids is -1.
        loss_scale: float32[M, K] multiplier on each constituent's loss. 0 marks a padding copy
            (see :meth:`shard`): it must neither produce gradient nor be reported.
        layout: uint8[M] a :class:`Layout` per slot.
        skipped: int64[S] dataset indices the policy left out of this epoch.
        num_samples: size of the dataset the plan covers.
        epoch, seed: what the plan was derived from (with the ledger and the policy settings).
        rank, world_size: which shard of the global plan this is (0, 1 for a global plan).
    """

    ids: np.ndarray
    weights: np.ndarray
    loss_scale: np.ndarray
    layout: np.ndarray
    skipped: np.ndarray
    num_samples: int
    epoch: int = 0
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        self.weights = np.ascontiguousarray(self.weights, dtype=np.float32)
        self.loss_scale = np.ascontiguousarray(self.loss_scale, dtype=np.float32)
        self.layout = np.ascontiguousarray(self.layout, dtype=np.uint8)
        self.skipped = np.ascontiguousarray(self.skipped, dtype=np.int64).reshape(-1)
        self.num_samples = int(self.num_samples)
        self.epoch, self.seed = int(self.epoch), int(self.seed)
        self.rank, self.world_size = int(self.rank), int(self.world_size)
        if self.ids.ndim != 2:
            raise ValueError(f"ids must be 2-D [slots, K], got shape {self.ids.shape}")
        for name in ("weights", "loss_scale"):
            if getattr(self, name).shape != self.ids.shape:
                raise ValueError(
                    f"{name} has shape {getattr(self, name).shape}, ids has {self.ids.shape}: "
                    "they must match"
                )
        if self.layout.shape != (self.ids.shape[0],):
            raise ValueError(
                f"layout has shape {self.layout.shape}, expected ({self.ids.shape[0]},) "
                "(one per slot)"
            )

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_slots(
        cls,
        slots: list[tuple[list[int], list[float], int]],
        num_samples: int,
        skipped: Optional[list[int]] = None,
        loss_scale: Optional[list[list[float]]] = None,
        epoch: int = 0,
        seed: int = 0,
    ) -> "MixPlan":
        """Build a plan from ``(ids, weights, layout)`` tuples; handy in tests and small tools."""
        k = max([len(s[0]) for s in slots], default=1)
        m = len(slots)
        ids = np.full((m, k), -1, np.int64)
        weights = np.zeros((m, k), np.float32)
        scale = np.zeros((m, k), np.float32)
        layout = np.zeros(m, np.uint8)
        for row, (slot_ids, slot_weights, slot_layout) in enumerate(slots):
            n = len(slot_ids)
            ids[row, :n] = slot_ids
            weights[row, :n] = slot_weights
            scale[row, :n] = 1.0 if loss_scale is None else loss_scale[row]
            layout[row] = int(slot_layout)
        return cls(ids, weights, scale, layout, np.asarray(skipped or [], np.int64), num_samples,
                   epoch, seed)

    @classmethod
    def singles(cls, num_samples: int, epoch: int = 0, seed: int = 0,
                order: Optional[np.ndarray] = None) -> "MixPlan":
        """The no-mixing plan: every sample alone, in ``order`` (default: index order)."""
        ids = np.arange(num_samples, dtype=np.int64) if order is None else np.asarray(order)
        ids = ids.reshape(-1, 1)
        ones = np.ones(ids.shape, np.float32)
        return cls(ids, ones, ones.copy(), np.full(len(ids), Layout.SINGLE, np.uint8),
                   np.empty(0, np.int64), num_samples, epoch, seed)

    # ----------------------------------------------------------------------------- properties
    @property
    def num_slots(self) -> int:
        return int(self.ids.shape[0])

    @property
    def max_constituents(self) -> int:
        return int(self.ids.shape[1])

    @property
    def counts(self) -> np.ndarray:
        """Constituents per slot, int64[M]."""
        return self._row_sum((self.ids >= 0).view(np.uint8), np.int64)

    @property
    def num_forward_inputs(self) -> int:
        """Forward passes this (shard of the) plan costs: one per slot, padding included."""
        return self.num_slots

    @property
    def num_constituents(self) -> int:
        """Sample visits this plan delivers (padding copies excluded)."""
        return int(((self.ids >= 0) & (self.loss_scale > 0)).sum())

    @property
    def speedup_bound(self) -> float:
        """Upper bound on the epoch speed-up against one forward pass per sample.

        It counts forward passes only: the saving a perfect loader and a compute-bound trainer
        would see. Measured speed-ups are quoted against it.
        """
        total_slots = self.num_slots * self.world_size
        return float(self.num_samples) / total_slots if total_slots else float("inf")

    def slot(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, Layout]:
        """(ids, weights, loss_scale, layout) of one slot, trimmed to its constituents."""
        n = int(np.count_nonzero(self.ids[index] >= 0))
        return (self.ids[index, :n], self.weights[index, :n], self.loss_scale[index, :n],
                Layout(int(self.layout[index])))

    def delivery_order(self, seed: int, shuffle: bool = True) -> np.ndarray:
        """int64[M]: the order a loader walks this plan's slots in, fixed by (seed, epoch, rank).

        Every adapter takes its order from here, so the torch and DALI loaders deliver one plan
        in the same order.
        """
        if not shuffle:
            return np.arange(self.num_slots)
        rng = np.random.default_rng([int(seed), self.epoch, self.rank, _SHUFFLE_STREAM])
        return rng.permutation(self.num_slots)

    # ----------------------------------------------------------------------------- validation
    def validate(self) -> "MixPlan":
        """Check every invariant; raise ValueError naming the first slot and rule broken.

        A global plan (world_size 1) must cover each dataset index exactly once, in a slot or in
        ``skipped``. A shard only needs its own slots to be well formed.

        Every rule is first checked with one whole-array reduction; the slot that breaks it is
        looked up only on failure. The server validates each plan it computes, so this runs on
        every epoch of a 10M-sample dataset and must stay a small fraction of the policy's time.
        """
        m, k = self.ids.shape
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        if self.epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {self.epoch}")
        if not (0 <= self.rank < self.world_size):
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")

        def first_row(bad: np.ndarray) -> int:
            return int(np.flatnonzero(bad.reshape(m, -1).any(axis=1))[0])

        layout_max = max(int(v) for v in Layout)
        if m and int(self.layout.max()) > layout_max:
            s = int(np.flatnonzero(self.layout > layout_max)[0])
            raise ValueError(f"slot {s}: unknown layout code {int(self.layout[s])} "
                             f"(known: {[int(v) for v in Layout]})")
        if m and int(self.ids.min()) < -1:
            s = first_row(self.ids < -1)
            raise ValueError(f"slot {s}: id out of range (negative): {self.ids[s].tolist()}")
        if m and int(self.ids.max()) >= self.num_samples:
            s = first_row(self.ids >= self.num_samples)
            raise ValueError(f"slot {s}: id out of range [0, {self.num_samples}): "
                             f"{self.ids[s].tolist()}")
        present = self.ids >= 0
        if k > 1:
            gaps = ~present[:, :-1] & present[:, 1:]
            if gaps.any():
                s = first_row(gaps)
                raise ValueError(f"slot {s}: ids must be packed left, -1 only at the end "
                                 f"(got {self.ids[s].tolist()})")
        # packed left: the count is the index of the first -1 (K when there is none)
        counts = self._row_sum(present.view(np.uint8), np.int32)
        lo_hi = np.array([_CONSTITUENTS[Layout(c)] for c in range(layout_max + 1)], np.int64)
        lo, hi = lo_hi[self.layout, 0], lo_hi[self.layout, 1]
        wrong = (counts < lo) | (counts > hi)
        if wrong.any():
            s = int(np.flatnonzero(wrong)[0])
            code = Layout(int(self.layout[s]))
            want = f"{lo[s]}" if lo[s] == hi[s] else f"at least {lo[s]}"
            raise ValueError(f"slot {s}: layout {code.name} needs {want} constituents, has "
                             f"{int(counts[s])}")
        for name, arr in (("weights", self.weights), ("loss_scale", self.loss_scale)):
            if not np.isfinite(arr).all():
                s = first_row(~np.isfinite(arr))
                raise ValueError(f"slot {s}: {name} not finite: {arr[s].tolist()}")
        if m and (float(self.weights.min()) < 0 or float(self.weights.max()) > 1):
            s = first_row((self.weights < 0) | (self.weights > 1))
            raise ValueError(f"slot {s}: weights must lie in [0, 1], got {self.weights[s].tolist()}")
        if k > 1:
            stray = (self.weights != 0) & ~present
            if stray.any():
                s = first_row(stray)
                raise ValueError(f"slot {s}: weight set where there is no constituent (id -1): "
                                 f"{self.weights[s].tolist()}")
        sums = self._row_sum(self.weights, np.float64)
        off = np.abs(sums - 1.0) > WEIGHT_SUM_TOLERANCE
        if off.any():
            s = int(np.flatnonzero(off)[0])
            raise ValueError(f"slot {s}: weights must sum to 1, sum to {sums[s]:.6g} "
                             f"({self.weights[s].tolist()})")
        if m and float(self.loss_scale.min()) < 0:
            s = first_row(self.loss_scale < 0)
            raise ValueError(f"slot {s}: loss_scale must be >= 0, got {self.loss_scale[s].tolist()}")
        if self.skipped.size and (self.skipped.min() < 0 or self.skipped.max() >= self.num_samples):
            raise ValueError(f"skipped holds ids outside [0, {self.num_samples})")
        self._validate_coverage(present)
        return self

    @staticmethod
    def _row_sum(arr: np.ndarray, dtype) -> np.ndarray:
        """Sum over the (short) K axis column by column: numpy's axis=1 reduction over 2-4
        columns is several times slower than adding the columns."""
        total = arr[:, 0].astype(dtype)
        for col in range(1, arr.shape[1]):
            total += arr[:, col]
        return total

    def _validate_coverage(self, present: np.ndarray) -> None:
        real = present & (self.loss_scale > 0) if self.world_size > 1 else present
        used = self.ids[real]
        if self.skipped.size:
            used = np.concatenate([used, self.skipped])
        # Fast path: marking a bool per id is cheaper than counting. No id repeats exactly when
        # the number of marked ids equals the number of uses; full coverage additionally needs
        # every id marked. Counts are computed only to name the offender.
        marked = np.zeros(self.num_samples, bool)
        marked[used] = True
        distinct = int(np.count_nonzero(marked))
        if distinct != used.size:
            seen = np.bincount(used, minlength=self.num_samples)
            sample = int(np.flatnonzero(seen > 1)[0])
            where = "skipped and in a slot" if sample in set(self.skipped.tolist()) else \
                f"in slots {np.flatnonzero((self.ids == sample).any(axis=1))[:4].tolist()}"
            raise ValueError(f"id {sample} appears more than once ({where})")
        if self.world_size == 1 and distinct != self.num_samples:
            missing = np.flatnonzero(~marked)
            raise ValueError(f"{missing.size} dataset ids appear neither in a slot nor in "
                             f"skipped, e.g. {missing[:5].tolist()}")

    # ----------------------------------------------------------------------------- sharding
    def shard(self, rank: int, world_size: int) -> "MixPlan":
        """This rank's share of a global plan, with the same slot count on every rank.

        Slot ``i`` goes to rank ``i % world_size``. When the slot count does not divide evenly,
        the last ranks get copies of the plan's first slots with ``loss_scale`` 0: every rank takes
        the same number of steps (so none waits at an all-reduce), yet the copies add neither
        gradient nor loss reports. ``skipped`` stays on rank 0 only, so the shards together list
        every id exactly once.
        """
        if self.world_size != 1:
            raise ValueError("shard() takes a global plan (world_size 1), this is already a shard "
                             f"({self.rank}/{self.world_size})")
        if world_size < 1 or not (0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} "
                             f"world_size={world_size}")
        m = self.num_slots
        per_rank = -(-m // world_size) if m else 0
        rows = np.arange(rank, per_rank * world_size, world_size)
        is_pad = rows >= m
        rows_src = np.where(is_pad, rows - m, rows) % max(m, 1)
        scale = self.loss_scale[rows_src].copy()
        scale[is_pad] = 0.0
        return MixPlan(self.ids[rows_src], self.weights[rows_src], scale, self.layout[rows_src],
                       self.skipped if rank == 0 else np.empty(0, np.int64), self.num_samples,
                       self.epoch, self.seed, rank, world_size)

    # ----------------------------------------------------------------------------- bytes
    def to_bytes(self) -> bytes:
        """Versioned little-endian encoding with a CRC32 trailer; see :meth:`from_bytes`."""
        m, k = self.ids.shape
        header = _HEADER.pack(_MAGIC, _VERSION, m, k, self.skipped.size, self.num_samples,
                              self.epoch, self.seed, self.rank, self.world_size)
        body = b"".join([
            header,
            self.ids.astype("<i8").tobytes(),
            self.weights.astype("<f4").tobytes(),
            self.loss_scale.astype("<f4").tobytes(),
            self.layout.tobytes(),
            self.skipped.astype("<i8").tobytes(),
        ])
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> "MixPlan":
        """Decode :meth:`to_bytes` output; refuse foreign, truncated or corrupted bytes."""
        data = memoryview(data).cast("B")
        if len(data) < _HEADER.size + 4:
            raise PlanFormatError(f"plan bytes truncated: {len(data)} bytes is shorter than the "
                                  f"{_HEADER.size + 4}-byte header and checksum")
        magic, version, m, k, s, n, epoch, seed, rank, world = _HEADER.unpack_from(data, 0)
        if magic != _MAGIC:
            raise PlanFormatError(f"not a mix plan: magic {bytes(magic)!r} != {_MAGIC!r}")
        if version != _VERSION:
            raise PlanFormatError(f"mix plan format version {version} not supported "
                                  f"(this mixpipe reads version {_VERSION})")
        if min(m, k, s) < 0:
            raise PlanFormatError(f"corrupt plan header: negative sizes M={m} K={k} S={s}")
        expected = _HEADER.size + m * k * (8 + 4 + 4) + m + s * 8 + 4
        if len(data) != expected:
            kind = "truncated" if len(data) < expected else "has trailing bytes"
            raise PlanFormatError(f"plan bytes {kind}: {len(data)} bytes, header promises "
                                  f"{expected}")
        (crc,) = struct.unpack_from("<I", data, expected - 4)
        if zlib.crc32(data[: expected - 4]) != crc:
            raise PlanFormatError("plan bytes corrupted: checksum mismatch")
        off = _HEADER.size

        def take(dtype: str, count: int, shape: tuple) -> np.ndarray:
            nonlocal off
            arr = np.frombuffer(data, dtype=dtype, count=count, offset=off).reshape(shape)
            off += arr.nbytes
            return arr.copy()

        ids = take("<i8", m * k, (m, k))
        weights = take("<f4", m * k, (m, k))
        scale = take("<f4", m * k, (m, k))
        layout = take("u1", m, (m,))
        skipped = take("<i8", s, (s,))
        return cls(ids, weights, scale, layout, skipped, n, epoch, seed, rank, world)

    # ----------------------------------------------------------------------------- comparison
    def equals(self, other: "MixPlan") -> bool:
        """Bitwise equality of every array and field (plans are compared in determinism tests)."""
        return self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        kinds = {Layout(c).name: int((self.layout == c).sum()) for c in np.unique(self.layout)}
        return (f"MixPlan(epoch={self.epoch}, slots={self.num_slots}, K={self.max_constituents}, "
                f"samples={self.num_samples}, skipped={self.skipped.size}, layouts={kinds}, "
                f"shard={self.rank}/{self.world_size})")
