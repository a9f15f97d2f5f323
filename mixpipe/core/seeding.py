"""The generator each composite's augmentation draws from, shared by every adapter.

A slot's views are seeded by (seed, epoch, constituent ids), never by its position in a batch or
a worker, so the same plan gives the same crops however the epoch is batched, in whichever loader.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["slot_rng", "SlotGenerators"]


def slot_rng(entropy: Sequence[int]) -> np.random.Generator:
    """``np.random.default_rng(list(entropy))``, three times cheaper when every entry fits in
    uint32.

    SeedSequence reads a uint32 array word for word as it reads a list of such ints, but the list
    goes through a Python-level conversion per entry (~15 of the ~20 us per slot it cost here).
    """
    try:
        words = np.array(entropy, np.uint32)
    except OverflowError:  # negative or wider than 32 bits: let numpy split or refuse it
        return np.random.default_rng(list(entropy))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


# numpy's SeedSequence constants (bit_generator.pyx) and PCG64's 128-bit multiplier (pcg64.h)
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _XSHIFT = 0xCA01F9DD, 0x4973F715, 16
_POOL = 4
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645
_M128 = (1 << 128) - 1


def _hashmix(values: np.ndarray, const: np.ndarray) -> np.ndarray:
    """SeedSequence's hashmix on uint32 columns; advances ``const`` in place (uint32 wraps)."""
    values = values ^ const
    const *= np.uint32(_MULT_A)
    values = values * const
    return values ^ (values >> np.uint32(_XSHIFT))


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.uint32(_MIX_L) * x - np.uint32(_MIX_R) * y
    return out ^ (out >> np.uint32(_XSHIFT))


def _seed_words(entropy: np.ndarray) -> np.ndarray:
    """uint64[n, 4]: ``SeedSequence(row).generate_state(4, np.uint64)`` for each uint32 row."""
    n, length = entropy.shape
    const = np.full(n, _INIT_A, np.uint32)
    pool = [_hashmix(entropy[:, i] if i < length else np.zeros(n, np.uint32), const)
            for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = _mix(pool[dst], _hashmix(pool[src], const))
    for src in range(_POOL, length):
        for dst in range(_POOL):
            pool[dst] = _mix(pool[dst], _hashmix(entropy[:, src], const))
    const = np.full(n, _INIT_B, np.uint32)
    words = np.empty((n, 2 * _POOL), np.uint32)
    for i in range(2 * _POOL):
        value = pool[i % _POOL] ^ const
        const *= np.uint32(_MULT_B)
        value = value * const
        words[:, i] = value ^ (value >> np.uint32(_XSHIFT))
    return words.astype(np.uint64)[:, 0::2] | (words.astype(np.uint64)[:, 1::2] << np.uint64(32))


class SlotGenerators:
    """The generators ``slot_rng`` gives for many slots, seeded in one vectorised pass.

    ``at(i)`` returns one shared generator set to where ``slot_rng(entropies[i])`` starts, so it
    is valid until the next ``at``: for callers that use each slot's generator at once (the DALI
    source, which draws every view of a batch in one call). Seeding a generator costs ~6 us in
    numpy, most of it SeedSequence's hashing; here the hashing runs over the batch as uint32
    columns, which leaves ~2 us per slot (the 128-bit state set-up and the state assignment).
    Entropies with a value outside uint32 fall back to ``slot_rng``.
    """

    def __init__(self, entropies: Sequence[Sequence[int]]) -> None:
        self._entropies = [list(e) for e in entropies]
        self._states: list = [None] * len(self._entropies)
        by_length: dict = {}
        for i, entropy in enumerate(self._entropies):
            if all(0 <= int(x) <= 0xFFFFFFFF for x in entropy):
                by_length.setdefault(len(entropy), []).append(i)
        for rows in by_length.values():
            words = _seed_words(np.array([self._entropies[i] for i in rows], np.uint32))
            for i, (s0, s1, s2, s3) in zip(rows, words.tolist()):
                self._states[i] = _pcg_start((s0 << 64) | s1, (s2 << 64) | s3)
        self._bits = np.random.PCG64()
        self._generator = np.random.Generator(self._bits)

    def __len__(self) -> int:
        return len(self._entropies)

    def at(self, index: int) -> np.random.Generator:
        state = self._states[index]
        if state is None:
            return slot_rng(self._entropies[index])
        self._bits.state = {"bit_generator": "PCG64", "state": {"state": state[0],
                                                                 "inc": state[1]},
                            "has_uint32": 0, "uinteger": 0}
        return self._generator


def _pcg_start(initstate: int, initseq: int) -> tuple:
    """(state, inc) after PCG64's seeding (pcg_setseq_128_srandom_r) with these two values."""
    inc = ((initseq << 1) | 1) & _M128
    state = (inc + initstate) & _M128  # the first step from state 0 gives inc
    return (state * _PCG_MULT + inc) & _M128, inc
