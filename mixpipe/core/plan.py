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
        return (self.ids >= 0).sum(axis=1)

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
        n = int(self.counts[index])
        return (self.ids[index, :n], self.weights[index, :n], self.loss_scale[index, :n],
                Layout(int(self.layout[index])))

    # ----------------------------------------------------------------------------- validation
    def validate(self) -> "MixPlan":
        """Check every invariant; raise ValueError naming the first slot and rule broken.

        A global plan (world_size 1) must cover each dataset index exactly once, in a slot or in
        ``skipped``. A shard only needs its own slots to be well formed.
        """
        m, k = self.ids.shape
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        if self.epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {self.epoch}")
        if not (0 <= self.rank < self.world_size):
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        known = set(int(v) for v in Layout)
        bad_layout = np.flatnonzero(~np.isin(self.layout, list(known)))
        if bad_layout.size:
            s = int(bad_layout[0])
            raise ValueError(f"slot {s}: unknown layout code {int(self.layout[s])} "
                             f"(known: {sorted(known)})")
        present = self.ids >= 0
        # constituents are packed to the left: no -1 followed by an id
        gaps = np.flatnonzero((~present[:, :-1] & present[:, 1:]).any(axis=1)) if k > 1 else []
        if len(gaps):
            raise ValueError(f"slot {int(gaps[0])}: ids must be packed left, -1 only at the end "
                             f"(got {self.ids[gaps[0]].tolist()})")
        bad_neg = np.flatnonzero((self.ids < -1).any(axis=1))
        if bad_neg.size:
            s = int(bad_neg[0])
            raise ValueError(f"slot {s}: id out of range (negative): {self.ids[s].tolist()}")
        bad_hi = np.flatnonzero((self.ids >= self.num_samples).any(axis=1))
        if bad_hi.size:
            s = int(bad_hi[0])
            raise ValueError(f"slot {s}: id out of range [0, {self.num_samples}): "
                             f"{self.ids[s].tolist()}")
        counts = present.sum(axis=1)
        for code in known:
            lo, hi = _CONSTITUENTS[Layout(code)]
            wrong = np.flatnonzero((self.layout == code) & ((counts < lo) | (counts > hi)))
            if wrong.size:
                s = int(wrong[0])
                want = f"{lo}" if lo == hi else f"at least {lo}"
                raise ValueError(f"slot {s}: layout {Layout(code).name} needs {want} "
                                 f"constituents, has {int(counts[s])}")
        for name, arr in (("weights", self.weights), ("loss_scale", self.loss_scale)):
            bad = np.flatnonzero((~np.isfinite(arr)).any(axis=1))
            if bad.size:
                s = int(bad[0])
                raise ValueError(f"slot {s}: {name} not finite: {arr[s].tolist()}")
        bad = np.flatnonzero(((self.weights < 0) | (self.weights > 1)).any(axis=1))
        if bad.size:
            s = int(bad[0])
            raise ValueError(f"slot {s}: weights must lie in [0, 1], got {self.weights[s].tolist()}")
        bad = np.flatnonzero((self.weights[~present] != 0).reshape(-1)) if (~present).any() else []
        if len(bad):
            rows = np.flatnonzero(((self.weights != 0) & ~present).any(axis=1))
            s = int(rows[0])
            raise ValueError(f"slot {s}: weight set where there is no constituent (id -1): "
                             f"{self.weights[s].tolist()}")
        sums = self.weights.astype(np.float64).sum(axis=1)
        bad = np.flatnonzero(np.abs(sums - 1.0) > WEIGHT_SUM_TOLERANCE)
        if bad.size:
            s = int(bad[0])
            raise ValueError(f"slot {s}: weights must sum to 1, sum to {sums[s]:.6g} "
                             f"({self.weights[s].tolist()})")
        bad = np.flatnonzero((self.loss_scale < 0).any(axis=1))
        if bad.size:
            s = int(bad[0])
            raise ValueError(f"slot {s}: loss_scale must be >= 0, got {self.loss_scale[s].tolist()}")
        if self.skipped.size and (self.skipped.min() < 0 or self.skipped.max() >= self.num_samples):
            raise ValueError(f"skipped holds ids outside [0, {self.num_samples})")
        self._validate_coverage(present)
        return self

    def _validate_coverage(self, present: np.ndarray) -> None:
        real = present & (self.loss_scale > 0) if self.world_size > 1 else present
        used = np.concatenate([self.ids[real], self.skipped])
        seen = np.bincount(used, minlength=self.num_samples) if used.size else \
            np.zeros(self.num_samples, np.int64)
        dup = np.flatnonzero(seen > 1)
        if dup.size:
            sample = int(dup[0])
            where = "skipped and in a slot" if sample in set(self.skipped.tolist()) else \
                f"in slots {np.flatnonzero((self.ids == sample).any(axis=1))[:4].tolist()}"
            raise ValueError(f"id {sample} appears more than once ({where})")
        if self.world_size == 1:
            missing = np.flatnonzero(seen == 0)
            if missing.size:
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
