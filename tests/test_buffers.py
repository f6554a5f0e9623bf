"""Large kernel outputs reuse cached memory: correct, independent, and released on request."""

from __future__ import annotations

import pickle

import bnrs
import numpy as np
from bnrs import functional as F

LARGE = (64, 16, 28, 28)  # 3.2 MB: cached (from 256 KiB)


def test_large_outputs_are_ordinary_writeable_arrays():
    x = np.linspace(-1, 1, np.prod(LARGE), dtype=np.float32).reshape(LARGE)
    y = F.relu(x)
    assert y.flags.c_contiguous and y.flags.writeable and y.flags.aligned
    assert y.dtype == np.float32 and y.shape == LARGE
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    y[0, 0, 0, 0] = 5.0  # writeable, and the caller's input is untouched
    assert x[0, 0, 0, 0] == -1.0
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(y)), y)


def test_a_freed_output_is_reused_and_live_outputs_never_share_memory():
    bnrs.release_memory()
    x = np.ones(LARGE, np.float32)
    first = F.relu(x)
    address = first.__array_interface__["data"][0]
    assert bnrs.cached_memory() == 0
    del first
    assert bnrs.cached_memory() == x.nbytes
    second = F.relu(x)                      # the same size: the cached block
    assert second.__array_interface__["data"][0] == address
    third = F.relu(-x)                      # while `second` lives: new memory
    assert not np.shares_memory(second, third)
    np.testing.assert_array_equal(second, 1.0)
    np.testing.assert_array_equal(third, 0.0)
    del second, third
    assert bnrs.cached_memory() == 2 * x.nbytes
    assert bnrs.release_memory() == 2 * x.nbytes
    assert bnrs.cached_memory() == 0


def test_small_outputs_are_not_cached():
    bnrs.release_memory()
    y = F.relu(np.ones((4, 4), np.float32))
    del y
    assert bnrs.cached_memory() == 0
