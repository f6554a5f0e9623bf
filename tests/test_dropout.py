"""Inverted dropout and dropout2d: the formula with the reference's independent Philox mask,
statistics, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from bnrs import functional as F

SEED = 1234
SHAPE = (3, 4, 7, 9)


def _input(rng, shape=SHAPE):
    # No exact zeros in x, so a zero in y always means a dropped element.
    x = rng.standard_normal(shape).astype(np.float32)
    return np.where(x == 0, np.float32(1), x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_is_x_times_mask_over_keep_probability(rng, assert_close, p):
    x = _input(rng)
    y = F.dropout(x, p, training=True, seed=SEED)
    keep = ref.dropout_mask(x.size, p, SEED).reshape(x.shape)
    assert_close(y, ref.dropout(x, keep, p), name="output")
    assert (y[~keep] == 0).all() and (y[keep] != 0).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_backward_uses_the_same_mask(rng, assert_close, p):
    gy = _input(rng)
    keep = ref.dropout_mask(gy.size, p, SEED).reshape(gy.shape)
    assert_close(F.dropout_backward(gy, p, SEED), ref.dropout(gy, keep, p), name="grad_input")
    # Forward and backward of the same (p, seed) zero the same elements.
    x = _input(rng)
    np.testing.assert_array_equal(F.dropout(x, p, seed=SEED) == 0,
                                  F.dropout_backward(gy, p, SEED) == 0)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout2d_drops_whole_maps(rng, assert_close, p):
    x = _input(rng)
    n, c = x.shape[:2]
    keep = ref.dropout2d_keep(ref.dropout_mask(n * c, p, SEED), x.shape)
    y = F.dropout2d(x, p, training=True, seed=SEED)
    assert_close(y, ref.dropout(x, keep, p), name="output")
    zero_maps = (y == 0).all(axis=(2, 3))
    np.testing.assert_array_equal(zero_maps, ~keep[:, :, 0, 0])
    assert_close(F.dropout2d_backward(x, p, SEED), ref.dropout(x, keep, p), name="grad_input")


def test_reference_philox_gives_the_random123_known_answers():
    # kat_vectors of the Random123 distribution, philox4x32_10: the reference mask's
    # generator is right on its own, before it is compared with bnrs.
    for counter, key, expected in [
            ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
            ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2,
             (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
            ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
             (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]:
        words = ref.philox4x32_10([np.array([c], np.uint32) for c in counter], key)
        assert [int(w[0]) for w in words] == list(expected)


@pytest.mark.parametrize("n, p, seed", [(1000, 0.5, SEED), (77, 0.9, 2**64 - 1),
                                        (100_003, 0.3, 42), (64, 1e-6, 0), (33, 0.999, 5),
                                        (5, 0.0, 1)])
def test_dropout_mask_is_the_documented_philox_draw(n, p, seed):
    keep = F.dropout_mask(n, p, seed)
    assert keep.dtype == np.bool_ and keep.shape == (n,)
    np.testing.assert_array_equal(keep, ref.dropout_mask(n, p, seed))


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.9])
def test_kept_fraction_is_one_minus_p(p):
    n = 200_000
    keep = F.dropout_mask(n, p, SEED)
    y = F.dropout(np.ones(n, np.float32), p, seed=SEED)
    # Five standard deviations of a binomial proportion.
    assert abs(keep.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    assert np.count_nonzero(y) == np.count_nonzero(keep)
    # The kept elements are spread out, not bunched at one end of the array.
    halves = keep.reshape(2, -1).mean(axis=1)
    assert abs(halves[0] - halves[1]) < 10 * np.sqrt(p * (1 - p) / n)


def test_kept_fraction_of_maps_is_one_minus_p():
    p = 0.3
    y = F.dropout2d(np.ones((400, 250, 1, 2), np.float32), p, seed=SEED)
    kept_maps = (y != 0).all(axis=(2, 3)).mean()
    assert abs(kept_maps - (1 - p)) < 5 * np.sqrt(p * (1 - p) / 100_000)


def test_same_seed_same_result_different_seed_different(rng):
    x = _input(rng)
    first = F.dropout(x, 0.5, seed=SEED)
    np.testing.assert_array_equal(first, F.dropout(x, 0.5, seed=SEED))
    assert not np.array_equal(first, F.dropout(x, 0.5, seed=SEED + 1))
    np.testing.assert_array_equal(F.dropout_mask(1000, 0.5, 7), F.dropout_mask(1000, 0.5, 7))
    assert not np.array_equal(F.dropout_mask(1000, 0.5, 7), F.dropout_mask(1000, 0.5, 8))
    np.testing.assert_array_equal(F.dropout2d(x, 0.5, seed=SEED), F.dropout2d(x, 0.5, seed=SEED))
    assert not np.array_equal(F.dropout2d(x, 0.5, seed=SEED), F.dropout2d(x, 0.5, seed=99))


def test_seed_none_draws_a_fresh_seed():
    x = np.ones(10_000, np.float32)
    assert not np.array_equal(F.dropout(x, 0.5), F.dropout(x, 0.5))


def test_mask_element_depends_only_on_seed_and_index():
    long = F.dropout_mask(1000, 0.5, SEED)
    np.testing.assert_array_equal(F.dropout_mask(300, 0.5, SEED), long[:300])
    # The same draw serves any shape: element i of the flattened (C-order) input.
    x = np.ones((10, 100), np.float32)
    np.testing.assert_array_equal(F.dropout(x, 0.5, seed=SEED).ravel() != 0, long)


def test_large_seeds_are_accepted():
    keep = F.dropout_mask(1000, 0.5, 2**64 - 1)
    assert 0 < keep.sum() < 1000
    assert not np.array_equal(keep, F.dropout_mask(1000, 0.5, 2**63 - 1))


@pytest.mark.parametrize("function", [F.dropout, F.dropout2d])
@pytest.mark.parametrize("p, training", [(0.0, True), (0.5, False), (0.0, False)])
def test_identity_copy_when_not_dropping(rng, function, p, training):
    x = _input(rng)
    y = function(x, p, training=training, seed=SEED)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x)
    assert not np.shares_memory(y, x)


def test_backward_with_p_zero_is_a_copy(rng):
    gy = _input(rng)
    for backward in (F.dropout_backward, F.dropout2d_backward):
        grad_input = backward(gy, 0.0, SEED)
        np.testing.assert_array_equal(grad_input, gy)
        assert not np.shares_memory(grad_input, gy)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("call", [
    lambda x, p: F.dropout(x, p, seed=SEED),
    lambda x, p: F.dropout2d(x, p, seed=SEED),
    lambda x, p: F.dropout_backward(x, p, SEED),
    lambda x, p: F.dropout2d_backward(x, p, SEED),
    lambda x, p: F.dropout_mask(x.size, p, SEED),
], ids=["dropout", "dropout2d", "dropout_backward", "dropout2d_backward", "dropout_mask"])
def test_p_outside_unit_interval_raises(rng, call, p):
    with pytest.raises(ValueError, match=r"\bp\b"):
        call(_input(rng), p)


def test_p_just_below_one_keeps_few_and_scales_up(assert_close):
    p = 0.99
    x = np.ones(100_000, np.float32)
    y = F.dropout(x, p, seed=SEED)
    kept = y[y != 0]
    assert 0 < kept.size < 2 * 0.01 * x.size
    assert_close(kept, np.full(kept.size, 100.0), name="kept values")
