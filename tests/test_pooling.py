"""max_pool2d and avg_pool2d, forward and backward, against the window-by-window reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from bnrs import _core
from bnrs import functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# name: (input shape, kernel_size, stride, padding)
MAX_CASES = {
    "k2_default_stride": ((3, 2, 7, 9), 2, None, 0),
    "k3s2p1_overlapping": ((3, 2, 7, 9), 3, 2, 1),
    "k3s1p1_batch1_c1": ((1, 1, 7, 9), 3, 1, 1),
    "k3s2_even_floor": ((3, 2, 8, 8), 3, 2, 0),
    "rect_per_axis": ((2, 3, 7, 9), (2, 3), (1, 2), (1, 1)),
    "rect_k3x1": ((2, 2, 7, 9), (3, 1), (2, 1), (1, 0)),
    "k5s3p2": ((2, 2, 7, 9), 5, 3, 2),
    "k1": ((1, 2, 5, 4), 1, 1, 0),
    "window_is_whole_plane": ((2, 2, 4, 6), (4, 6), 1, 0),
}

AVG_CASES = {
    "k2_default_stride": ((3, 2, 7, 9), 2, None, 0),
    "k3s2p1": ((3, 2, 7, 9), 3, 2, 1),
    "k3s1p1_batch1_c1": ((1, 1, 7, 9), 3, 1, 1),
    "k3s2_even_floor": ((2, 2, 8, 8), 3, 2, 0),
    "rect_per_axis": ((2, 3, 7, 9), (3, 2), (2, 1), (1, 1)),
    "k5s2p2": ((2, 2, 7, 9), 5, 2, 2),
}


def _args(case):
    _, kernel_size, stride, padding = case
    return {"kernel_size": kernel_size, "stride": stride, "padding": padding}


def _input(rng, case):
    return rng.standard_normal(case[0]).astype(np.float32)


# --------------------------------------------------------------------------- max pooling


@pytest.mark.parametrize("name", MAX_CASES)
def test_max_forward_matches_reference(rng, assert_close, name):
    x = _input(rng, MAX_CASES[name])
    expected, expected_indices = ref.max_pool2d(x, **_args(MAX_CASES[name]))
    y, indices = F.max_pool2d(x, **_args(MAX_CASES[name]), return_indices=True)
    assert_close(y, expected, rtol=0, atol=0, name="output")  # a max is exact
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, expected_indices)


@pytest.mark.parametrize("name", MAX_CASES)
def test_max_backward_matches_reference(rng, assert_close, name):
    x = _input(rng, MAX_CASES[name])
    _, indices = F.max_pool2d(x, **_args(MAX_CASES[name]), return_indices=True)
    gy = rng.standard_normal(indices.shape).astype(np.float32)
    grad_input = F.max_pool2d_backward(gy, indices, x.shape)
    _, expected_indices = ref.max_pool2d(x, **_args(MAX_CASES[name]))
    expected = ref.max_pool2d_backward(gy, expected_indices, x.shape)
    kh, kw = ref.pair(MAX_CASES[name][1])
    assert_close(grad_input, expected, terms=kh * kw, name="grad_input")


def test_max_without_indices_returns_the_output_only(rng):
    x = _input(rng, MAX_CASES["k3s2p1_overlapping"])
    y = F.max_pool2d(x, 3, 2, 1)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, F.max_pool2d(x, 3, 2, 1, return_indices=True)[0])


def test_max_ties_keep_the_first_maximum():
    x = np.zeros((1, 2, 5, 6), dtype=np.float32)
    x[0, 1, 1:3, 1:4] = 7.0  # several equal maxima inside each window of channel 1
    y, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    expected, expected_indices = ref.max_pool2d(x, 3, 2, 1)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(indices, expected_indices)
    # On a constant plane the first element of each window clipped to the input wins.
    np.testing.assert_array_equal(indices[0, 0], [[0, 1, 3], [6, 7, 9], [18, 19, 21]])


@pytest.mark.parametrize("mode", ["functional", "layer (train)", "layer (eval)"])
def test_tied_window_gradient_goes_to_the_first_maximum_in_row_major_order(mode):
    """As PyTorch: the whole gradient of a tied window lands on its first maximum (row
    by row, left to right), the others get none. The positions are written out by hand,
    not taken from an argmax, so a backward that split the gradient among the ties, or
    routed it to the last one, fails."""
    from bnrs import nn

    x = np.zeros((1, 1, 4, 4), dtype=np.float32)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = x[0, 0, 1, 1] = 5.0  # window (0, 0): three ties
    x[0, 0, 2, 3] = x[0, 0, 3, 2] = 2.0                  # window (1, 1): two ties
    gy = np.array([[[[1.0, 2.0], [4.0, 8.0]]]], dtype=np.float32)
    if mode == "functional":
        _, indices = F.max_pool2d(x, 2, return_indices=True)
        grad_input = F.max_pool2d_backward(gy, indices, x.shape)
    else:
        layer = nn.MaxPool2d(2)
        if mode == "layer (eval)":
            layer.eval()
        layer(x)
        grad_input = layer.backward(gy)
    expected = np.zeros((1, 1, 4, 4), dtype=np.float32)
    expected[0, 0, 0, 1] = 1.0  # (0, 1) comes before (1, 0) and (1, 1) in row-major order
    expected[0, 0, 0, 2] = 2.0  # window (0, 1) is all zeros: its first element
    expected[0, 0, 2, 0] = 4.0  # window (1, 0) likewise
    expected[0, 0, 2, 3] = 8.0  # (2, 3) before (3, 2)
    np.testing.assert_array_equal(grad_input, expected)


def test_max_padding_is_never_chosen():
    # All inputs negative: a zero-valued padding would win; -inf padding never does.
    x = -1.0 - np.arange(2 * 7 * 9, dtype=np.float32).reshape(1, 2, 7, 9)
    y, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    expected, expected_indices = ref.max_pool2d(x, 3, 2, 1)
    assert (y < 0).all()
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(indices, expected_indices)


def test_max_nan_wins(rng):
    x = rng.standard_normal((1, 1, 4, 4)).astype(np.float32)
    x[0, 0, 2, 1] = np.nan
    y, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    assert np.isnan(y[0, 0, 1, 0])
    assert indices[0, 0, 1, 0] == 2 * 4 + 1
    assert not np.isnan(np.delete(y.ravel(), 2)).any()


@pytest.mark.parametrize("shape", [(2, 3, 47, 58), (1, 2, 6, 1030), (3, 1, 28, 28)])
def test_max_2x2_on_large_planes_with_ties_nans_and_signed_zeros(rng, shape):
    """At each SIMD level the CPU has, the 2x2 path takes a plane's windows in chunks that cross rows (667 windows of 23
    rows of 29, a row of 515 longer than a chunk): each maximum and index as the
    window-order scan gives them, among few distinct values (ties), signed zeros and NaNs."""
    x = rng.integers(-2, 3, size=shape).astype(np.float32)
    x[x == 0] = rng.choice(np.array([0.0, -0.0], dtype=np.float32), size=int((x == 0).sum()))
    x.ravel()[rng.choice(x.size, size=x.size // 50, replace=False)] = np.nan
    expected, expected_indices = ref.max_pool2d(x, 2)
    planes = x.reshape(shape[0] * shape[1], -1)
    before = _core.simd_backend()
    try:
        for level in _core.simd_levels():
            _core.set_simd(level)
            y, indices = F.max_pool2d(x, 2, return_indices=True)
            np.testing.assert_array_equal(indices, expected_indices, err_msg=level)
            np.testing.assert_array_equal(y, expected.astype(np.float32), err_msg=level)
            # The winner's sign too: the first of equal zeros, read back through its index.
            winners = np.take_along_axis(planes, indices.reshape(len(planes), -1), axis=1)
            np.testing.assert_array_equal(np.signbit(y.reshape(len(planes), -1)),
                                          np.signbit(winners), err_msg=level)
    finally:
        _core.set_simd(before)


def test_max_overlapping_windows_accumulate():
    x = np.zeros((1, 1, 3, 3), dtype=np.float32)
    x[0, 0, 1, 1] = 5.0  # the centre is the maximum of all four 2×2 windows
    _, indices = F.max_pool2d(x, 2, 1, return_indices=True)
    grad_input = F.max_pool2d_backward(np.ones((1, 1, 2, 2), np.float32), indices, x.shape)
    expected = np.zeros((1, 1, 3, 3))
    expected[0, 0, 1, 1] = 4.0
    np.testing.assert_array_equal(grad_input, expected)


def test_max_backward_accepts_int32_indices(rng):
    x = _input(rng, MAX_CASES["k3s2p1_overlapping"])
    _, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    gy = rng.standard_normal(indices.shape).astype(np.float32)
    np.testing.assert_array_equal(F.max_pool2d_backward(gy, indices.astype(np.int32), x.shape),
                                  F.max_pool2d_backward(gy, indices, x.shape))


# --------------------------------------------------------------------------- average pooling


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("name", AVG_CASES)
def test_avg_forward_matches_reference(rng, assert_close, name, count_include_pad):
    x = _input(rng, AVG_CASES[name])
    kh, kw = ref.pair(AVG_CASES[name][1])
    expected = ref.avg_pool2d(x, **_args(AVG_CASES[name]), count_include_pad=count_include_pad)
    y = F.avg_pool2d(x, **_args(AVG_CASES[name]), count_include_pad=count_include_pad)
    assert_close(y, expected, terms=kh * kw, name="output")


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("name", AVG_CASES)
def test_avg_backward_matches_reference(rng, assert_close, name, count_include_pad):
    x = _input(rng, AVG_CASES[name])
    args = _args(AVG_CASES[name])
    out_shape = ref.avg_pool2d(x, **args).shape
    gy = rng.standard_normal(out_shape).astype(np.float32)
    kh, kw = ref.pair(AVG_CASES[name][1])
    expected = ref.avg_pool2d_backward(gy, x.shape, **args, count_include_pad=count_include_pad)
    grad_input = F.avg_pool2d_backward(gy, x.shape, **args,
                                       count_include_pad=count_include_pad)
    assert_close(grad_input, expected, terms=kh * kw, name="grad_input")


def test_avg_divisor_at_padded_borders(assert_close):
    x = np.ones((1, 1, 3, 3), dtype=np.float32)
    with_pad = F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
    without_pad = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    # A corner window covers 4 real inputs out of 9, an edge window 6, the centre 9.
    assert_close(with_pad[0, 0], np.array([[4, 6, 4], [6, 9, 6], [4, 6, 4]]) / 9, terms=9)
    assert_close(without_pad[0, 0], np.ones((3, 3)), terms=9)


def test_avg_count_include_pad_is_the_default(rng):
    x = _input(rng, AVG_CASES["k3s2p1"])
    np.testing.assert_array_equal(F.avg_pool2d(x, 3, 2, 1),
                                  F.avg_pool2d(x, 3, 2, 1, count_include_pad=True))
    gy = rng.standard_normal((3, 2, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(
        F.avg_pool2d_backward(gy, x.shape, 3, 2, 1),
        F.avg_pool2d_backward(gy, x.shape, 3, 2, 1, count_include_pad=True))


# --------------------------------------------------------------------------- finite differences

FD_INPUT_SHAPE = (2, 2, 5, 6)
FD_GEOMETRY = {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 1)}


def _max_fd(rng):
    # Distinct, well separated values: no step of the check can change an argmax.
    x = rng.permutation(np.prod(FD_INPUT_SHAPE)).reshape(FD_INPUT_SHAPE).astype(np.float32)
    y, indices = ref.max_pool2d(x, **FD_GEOMETRY)
    gy = rng.standard_normal(y.shape)
    (numerical,) = ref.numerical_gradients(
        lambda v: ref.weighted_sum(ref.max_pool2d(v, **FD_GEOMETRY)[0], gy), x)
    return x, gy, indices, numerical


def _avg_fd(rng, count_include_pad):
    x = rng.standard_normal(FD_INPUT_SHAPE).astype(np.float32)
    gy = rng.standard_normal(ref.avg_pool2d(x, **FD_GEOMETRY).shape)
    (numerical,) = ref.numerical_gradients(
        lambda v: ref.weighted_sum(ref.avg_pool2d(v, **FD_GEOMETRY,
                                                  count_include_pad=count_include_pad), gy), x)
    return x, gy, numerical


def test_max_reference_backward_matches_finite_differences(rng, assert_close):
    x, gy, indices, numerical = _max_fd(rng)
    assert_close(ref.max_pool2d_backward(gy, indices, x.shape), numerical, **ref.FD_TOLERANCE)


def test_max_backward_matches_finite_differences(rng, assert_close):
    x, gy, _, numerical = _max_fd(rng)
    _, indices = F.max_pool2d(x, **FD_GEOMETRY, return_indices=True)
    assert_close(F.max_pool2d_backward(gy, indices, x.shape), numerical, terms=6)


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_reference_backward_matches_finite_differences(rng, assert_close,
                                                           count_include_pad):
    x, gy, numerical = _avg_fd(rng, count_include_pad)
    exact = ref.avg_pool2d_backward(gy, x.shape, **FD_GEOMETRY,
                                    count_include_pad=count_include_pad)
    assert_close(exact, numerical, **ref.FD_TOLERANCE)


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_backward_matches_finite_differences(rng, assert_close, count_include_pad):
    x, gy, numerical = _avg_fd(rng, count_include_pad)
    grad_input = F.avg_pool2d_backward(gy, x.shape, **FD_GEOMETRY,
                                       count_include_pad=count_include_pad)
    assert_close(grad_input, numerical, terms=6)


# --------------------------------------------------------------------------- random geometries


@st.composite
def _pool_geometries(draw):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    size = tuple(draw(st.integers(max(k - 2 * p, 1), max(k - 2 * p, 1) + 6))
                 for k, p in zip(kernel, padding))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3))) + size
    return shape, kernel, stride, padding, draw(st.integers(0, 2**32 - 1))


# assert_close is a stateless function, so sharing it across examples is safe; derandomize
# keeps CI reproducible (the same examples every run).
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry_case=_pool_geometries(), count_include_pad=st.booleans())
def test_random_geometries_match_reference(assert_close, geometry_case, count_include_pad):
    shape, kernel, stride, padding, seed = geometry_case
    generator = np.random.default_rng(seed)
    x = generator.standard_normal(shape).astype(np.float32)
    args = {"kernel_size": kernel, "stride": stride, "padding": padding}
    terms = kernel[0] * kernel[1]
    expected, expected_indices = ref.max_pool2d(x, **args)
    y, indices = F.max_pool2d(x, **args, return_indices=True)
    assert_close(y, expected, rtol=0, atol=0, name="max output")
    np.testing.assert_array_equal(indices, expected_indices)
    gy = generator.standard_normal(expected.shape).astype(np.float32)
    assert_close(F.max_pool2d_backward(gy, indices, shape),
                 ref.max_pool2d_backward(gy, expected_indices, shape), terms=terms,
                 name="max grad_input")
    avg_args = {**args, "count_include_pad": count_include_pad}
    assert_close(F.avg_pool2d(x, **avg_args), ref.avg_pool2d(x, **avg_args), terms=terms,
                 name="avg output")
    assert_close(F.avg_pool2d_backward(gy, shape, **avg_args),
                 ref.avg_pool2d_backward(gy, shape, **avg_args), terms=terms,
                 name="avg grad_input")


# ---------------------------------------------------------------- fast paths, exactly


def _float32_avg_2x2(x):
    """The general loop's order in float32: ((((0 + a) + b) + c) + d) / 4."""
    n, c, h, w = x.shape
    t = x[:, :, : h // 2 * 2, : w // 2 * 2]
    a, b = t[:, :, 0::2, 0::2], t[:, :, 0::2, 1::2]
    cc, d = t[:, :, 1::2, 0::2], t[:, :, 1::2, 1::2]
    zero = np.float32(0.0)
    return ((((zero + a) + b) + cc) + d) / np.float32(4.0)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 9), (3, 1, 2, 2)])
def test_avg_pool_2x2_is_exactly_the_window_sum_over_four(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[::7] = -0.0
    expected = _float32_avg_2x2(x)
    actual = F.avg_pool2d(x, 2)
    np.testing.assert_array_equal(actual, expected)
    assert np.array_equal(np.signbit(actual), np.signbit(expected))
    gy = rng.standard_normal(actual.shape).astype(np.float32)
    gy.flat[::5] = -0.0
    gx = F.avg_pool2d_backward(gy, shape, 2)
    spread = np.float32(0.0) + gy / np.float32(4.0)
    h2, w2 = shape[2] // 2 * 2, shape[3] // 2 * 2
    for i in (0, 1):
        for j in (0, 1):
            window = gx[:, :, i:h2:2, j:w2:2]
            np.testing.assert_array_equal(window, spread)
            assert np.array_equal(np.signbit(window), np.signbit(spread))
    assert not gx[:, :, h2:, :].any() and not gx[:, :, :, w2:].any()


@pytest.mark.parametrize("geometry", [dict(kernel_size=2),
                                      dict(kernel_size=3, stride=2, padding=1),
                                      dict(kernel_size=(2, 3), stride=1)])
def test_max_pool_without_indices_gives_the_same_values(rng, geometry):
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    x[0, 0, :2, :2] = 1.5          # ties
    x[1, 2, 3, 4] = np.nan         # NaN wins its windows
    with_indices, _ = F.max_pool2d(x, **geometry, return_indices=True)
    np.testing.assert_array_equal(F.max_pool2d(x, **geometry), with_indices)


def test_max_pool_layer_in_eval_mode_still_has_a_backward(rng):
    from bnrs import nn

    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    layer = nn.MaxPool2d(2)
    y_train = layer(x)
    gy = rng.standard_normal(y_train.shape).astype(np.float32)
    gx_train = layer.backward(gy)
    layer.eval()
    np.testing.assert_array_equal(layer(x), y_train)
    np.testing.assert_array_equal(layer.backward(gy), gx_train)
