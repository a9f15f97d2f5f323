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
