"""slot_rng: the cheap path draws exactly what numpy's default_rng draws for the same entropy."""
from __future__ import annotations

import numpy as np
import pytest

from mixpipe.core.seeding import slot_rng


@pytest.mark.parametrize("entropy", [[0, 0, 5], [3, 17, 1, 2, 3, 4], [2**32 - 1, 9, 0],
                                     [1, 2**40, 7]])
def test_same_stream_as_default_rng(entropy):
    want = np.random.default_rng(entropy)
    got = slot_rng(entropy)
    np.testing.assert_array_equal(got.random(64), want.random(64))
    assert got.integers(0, 1000, 8).tolist() == want.integers(0, 1000, 8).tolist()


def test_distinct_slots_get_distinct_streams():
    a = slot_rng([0, 1, 2, 3]).random(4)
    b = slot_rng([0, 1, 3, 2]).random(4)  # the same ids in another order is another slot
    assert not np.array_equal(a, b)


def test_negative_entropy_is_refused_like_numpy():
    with pytest.raises(ValueError):
        slot_rng([0, -1])


def test_slot_generators_start_where_slot_rng_starts():
    from mixpipe.core.seeding import SlotGenerators

    cases = np.random.default_rng(9)
    entropies = [[int(x) for x in cases.integers(0, 2**32, 2 + int(cases.integers(0, 6)))]
                 for _ in range(400)]
    entropies += [[0], [0, 0], [2**32 - 1] * 7, [5, 2**33, 1], [0, 1, 2**64 + 3]]  # wide: fallback
    generators = SlotGenerators(entropies)
    assert len(generators) == len(entropies)
    for i, entropy in enumerate(entropies):
        got = generators.at(i)
        want = np.random.default_rng(entropy)
        np.testing.assert_array_equal(got.random(23), want.random(23))
        assert got.integers(0, 2**31, 3).tolist() == want.integers(0, 2**31, 3).tolist()


def test_slot_generators_at_resets_the_shared_generator():
    from mixpipe.core.seeding import SlotGenerators

    generators = SlotGenerators([[1, 2, 3], [4, 5, 6]])
    first = generators.at(0).random(5)
    generators.at(1).random(100)
    np.testing.assert_array_equal(generators.at(0).random(5), first)
