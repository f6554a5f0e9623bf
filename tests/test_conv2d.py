"""conv2d forward and backward against the tap-by-tap NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from bnrs import functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# name: (input shape, weight shape, stride, padding, dilation, bias)
CASES = {
    "batch1_cin1_k3s1p1": ((1, 1, 7, 9), (2, 1, 3, 3), 1, 1, 1, True),
    "k1x1": ((3, 2, 7, 9), (4, 2, 1, 1), 1, 0, 1, True),
    "k5x5_p2": ((3, 2, 7, 9), (3, 2, 5, 5), 1, 2, 1, True),
    "k3s2p1": ((3, 3, 7, 9), (4, 3, 3, 3), 2, 1, 1, True),
    "k5s2p1": ((3, 4, 7, 9), (5, 4, 5, 5), 2, 1, 1, True),
    "even_input_floor_drops_last": ((1, 3, 8, 8), (2, 3, 3, 3), 2, 0, 1, True),
    "dilation2": ((2, 2, 7, 9), (3, 2, 3, 3), 1, 2, 2, True),
    "rect_kernel_per_axis_no_bias": ((3, 2, 7, 9), (3, 2, 3, 2), (2, 1), (1, 0), (1, 2), False),
    "per_axis_everything": ((2, 2, 5, 6), (3, 2, 2, 4), (1, 3), (0, 2), (2, 1), True),
    "dilated_strided_rect": ((1, 2, 9, 7), (3, 2, 3, 2), 2, (2, 1), (2, 3), False),
    "kernel_fills_padded_input": ((1, 2, 3, 4), (2, 2, 5, 6), 1, 1, 1, True),
    "k1x1_s2_p1_border_is_bias": ((2, 3, 7, 9), (2, 3, 1, 1), 2, 1, 1, True),
    "stride_above_kernel_skips_pixels": ((3, 2, 7, 9), (1, 2, 2, 2), 3, 0, 1, True),
    "k5p2_on_1x1_maps": ((2, 3, 1, 1), (4, 3, 5, 5), 1, 2, 1, True),
    "output_column_in_padding_only": ((2, 2, 3, 1), (2, 2, 1, 1), (1, 3), (0, 1), 1, True),
    # 576 unfolded rows by 30 columns: the GEMM path unfolds each image in several tiles.
    "wide_cin64_several_im2col_tiles": ((2, 64, 11, 30), (3, 64, 3, 3), 1, 1, 1, True),
    "cin64_strided_several_tiles": ((1, 64, 13, 30), (2, 64, 3, 3), (2, 1), (0, 1), 1, False),
    # Small images in a larger batch: blocks of images share one GEMM (19 = 6 blocks of 3
    # and one of 1), with stride, padding and dilation.
    "batch19_image_blocks": ((19, 4, 5, 7), (3, 4, 3, 3), 1, 1, 1, True),
    "batch21_image_blocks_strided_dilated": ((21, 6, 9, 8), (4, 6, 3, 2), (2, 1), (1, 2),
                                             (2, 1), False),
    # 780 pixels: blocks of 2 images inside each backward group of 5 (2 + 2 + 1).
    "batch40_blocks_inside_groups": ((40, 4, 26, 30), (2, 4, 3, 3), 1, 1, 1, True),
    # Stride 1 with padding beyond the kernel's extent: the input gradient is not a
    # convolution of the output gradient (it would need negative padding), so it folds.
    "k1x1_stride1_padding_beyond_kernel": ((2, 3, 5, 6), (4, 3, 1, 1), 1, 1, 1, True),
    "k3_stride1_padding3_rect_dilated": ((2, 3, 6, 7), (2, 3, 3, 2), 1, (3, 1), (1, 2), True),
    # The padded image is larger than its unfolded matrix: rows test their bounds.
    "large_padding_strided_bounds_path": ((2, 8, 9, 9), (3, 8, 3, 3), 4, 3, 1, True),
    # Stride 1 with more than 32 unfolded rows: the direct kernels on the zero-padded frame
    # with AVX-512; from 14x14 outputs the weight gradient too. Odd sizes, channels that
    # leave partial register tiles, rectangular dilated kernels.
    "direct_frame_odd_sizes": ((3, 5, 29, 31), (7, 5, 3, 3), 1, 1, 1, True),
    "direct_frame_rect_dilated": ((2, 6, 30, 28), (9, 6, 3, 2), 1, (2, 1), (2, 1), False),
    "direct_frame_k5_small_image": ((4, 3, 5, 6), (19, 3, 5, 5), 1, 2, 1, True),
    # Few unfolded rows: the direct (no GEMM) path, with dilation and vertical stride.
    "direct_path_cin3_dilated": ((2, 3, 9, 8), (4, 3, 3, 3), (2, 1), 2, 2, True),
}


def _case(rng, name):
    input_shape, weight_shape, stride, padding, dilation, has_bias = CASES[name]
    x = rng.standard_normal(input_shape).astype(np.float32)
    w = rng.standard_normal(weight_shape).astype(np.float32)
    b = rng.standard_normal(weight_shape[0]).astype(np.float32) if has_bias else None
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    return x, w, b, geometry


def _terms(x, w, y):
    """Products summed per element of (output, grad_input, grad_weight)."""
    c_out, c_in, kh, kw = w.shape
    n, _, h_out, w_out = y.shape
    return c_in * kh * kw, c_out * kh * kw, n * h_out * w_out


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_reference(rng, assert_close, name):
    x, w, b, geometry = _case(rng, name)
    expected = ref.conv2d(x, w, b, **geometry)
    actual = F.conv2d(x, w, b, **geometry)
    assert_close(actual, expected, terms=_terms(x, w, expected)[0], name="output")


@pytest.mark.parametrize("name", CASES)
def test_backward_matches_reference(rng, assert_close, name):
    x, w, b, geometry = _case(rng, name)
    y = ref.conv2d(x, w, b, **geometry)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    _, terms_x, terms_w = _terms(x, w, y)
    grad_input, grad_weight, grad_bias = F.conv2d_backward(gy, x, w, **geometry,
                                                           bias=b is not None)
    expected_input, expected_weight, expected_bias = ref.conv2d_backward(gy, x, w, **geometry)
    assert_close(grad_input, expected_input, terms=terms_x, name="grad_input")
    assert_close(grad_weight, expected_weight, terms=terms_w, name="grad_weight")
    if b is None:
        assert grad_bias is None
    else:
        assert_close(grad_bias, expected_bias, terms=terms_w, name="grad_bias")


#: Stride-1 convolutions of at least 14x14 outputs and more than 32 unfolded rows, whose
#: weight gradient both FMA levels run by the direct kernel: output channels not a multiple
#: of AVX-512's tile of 4 or AVX2's of 2, rows not a multiple of 16, a rectangular dilated
#: kernel, and groups of two images. Each: input shape, weight shape, padding, dilation.
DIRECT_WEIGHT_GRAD_CASES = [
    ((3, 5, 14, 15), (9, 5, 3, 3), 1, 1),
    ((2, 6, 16, 17), (6, 6, 3, 2), (2, 1), (2, 1)),
    ((10, 4, 14, 14), (7, 4, 3, 3), 1, 1),
]


@pytest.mark.parametrize("case", DIRECT_WEIGHT_GRAD_CASES)
def test_backward_at_each_level_and_thread_count(rng, assert_close, case):
    from bnrs import _core

    input_shape, weight_shape, padding, dilation = case
    x = rng.standard_normal(input_shape).astype(np.float32)
    w = rng.standard_normal(weight_shape).astype(np.float32)
    geometry = {"padding": padding, "dilation": dilation}
    y = ref.conv2d(x, w, None, **geometry)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    _, terms_x, terms_w = _terms(x, w, y)
    expected = ref.conv2d_backward(gy, x, w, **geometry)
    threads, level = _core.get_num_threads(), _core.simd_backend()
    bias_bits = weight_bits = None
    try:
        for simd in _core.simd_levels():
            _core.set_simd(simd)
            first = None
            for n_threads in (1, 2):
                _core.set_num_threads(n_threads)
                actual = F.conv2d_backward(gy, x, w, **geometry)
                for name, got, want, terms in zip(
                        ["grad_input", "grad_weight", "grad_bias"], actual, expected,
                        [terms_x, terms_w, terms_w]):
                    assert_close(got, want, terms=terms, name=f"{name} {simd}")
                first = first or actual
                for got, want in zip(actual, first):
                    np.testing.assert_array_equal(got, want, err_msg=f"{simd} {n_threads}")
            # The bias gradient adds the same plane sums in the same order on every path
            # (the direct weight gradient's framing, or its own pass).
            bias_bits = actual[2] if bias_bits is None else bias_bits
            np.testing.assert_array_equal(actual[2], bias_bits, err_msg=simd)
            # The direct weight gradient gives the same bits at both FMA levels.
            if simd != "scalar":
                weight_bits = actual[1] if weight_bits is None else weight_bits
                np.testing.assert_array_equal(actual[1], weight_bits, err_msg=simd)
    finally:
        _core.set_num_threads(threads)
        _core.set_simd(level)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_backward_optional_outputs(rng, assert_close, bias, input_grad):
    x, w, _, geometry = _case(rng, "k3s2p1")
    gy = rng.standard_normal(ref.conv2d(x, w, None, **geometry).shape).astype(np.float32)
    grad_input, grad_weight, grad_bias = F.conv2d_backward(
        gy, x, w, **geometry, bias=bias, input_grad=input_grad)
    expected_input, expected_weight, expected_bias = ref.conv2d_backward(gy, x, w, **geometry)
    assert (grad_input is None) == (not input_grad)
    assert (grad_bias is None) == (not bias)
    assert_close(grad_weight, expected_weight, terms=gy[:, 0].size, name="grad_weight")
    if input_grad:
        assert_close(grad_input, expected_input, terms=w[:, 0].size, name="grad_input")
    if bias:
        assert_close(grad_bias, expected_bias, terms=gy[:, 0].size, name="grad_bias")


def test_int_and_pair_arguments_agree(rng):
    x, w, b, _ = _case(rng, "k3s2p1")
    as_ints = F.conv2d(x, w, b, stride=2, padding=1, dilation=1)
    as_pairs = F.conv2d(x, w, b, stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    np.testing.assert_array_equal(as_ints, as_pairs)


def test_no_bias_equals_zero_bias(rng):
    x, w, _, geometry = _case(rng, "k3s2p1")
    np.testing.assert_array_equal(
        F.conv2d(x, w, None, **geometry),
        F.conv2d(x, w, np.zeros(w.shape[0], np.float32), **geometry))


# Tiny geometry with every per-axis feature, for the finite-difference checks.
FD_GEOMETRY = {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}


def _fd_case(rng):
    x = rng.standard_normal((2, 2, 4, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 2)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    gy = rng.standard_normal(ref.conv2d(x, w, b, **FD_GEOMETRY).shape)

    def loss(x, w, b):
        return ref.weighted_sum(ref.conv2d(x, w, b, **FD_GEOMETRY), gy)

    return x, w, b, gy, ref.numerical_gradients(loss, x, w, b)


def test_reference_backward_matches_finite_differences(rng, assert_close):
    x, w, _, gy, numerical = _fd_case(rng)
    for name, exact, approx in zip(["grad_input", "grad_weight", "grad_bias"],
                                   ref.conv2d_backward(gy, x, w, **FD_GEOMETRY), numerical):
        assert_close(exact, approx, **ref.FD_TOLERANCE, name=name)


def test_backward_matches_finite_differences(rng, assert_close):
    x, w, _, gy, numerical = _fd_case(rng)
    for name, actual, approx in zip(["grad_input", "grad_weight", "grad_bias"],
                                    F.conv2d_backward(gy, x, w, **FD_GEOMETRY), numerical):
        assert_close(actual, approx, terms=gy[:, 0].size, name=name)


@st.composite
def _geometries(draw):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    size = []
    for axis in range(2):
        reach = dilation[axis] * (kernel[axis] - 1) + 1 - 2 * padding[axis]
        size.append(draw(st.integers(max(reach, 1), max(reach, 1) + 6)))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), *size)
    weight_shape = (draw(st.integers(1, 4)), shape[1]) + kernel
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, weight_shape, stride, padding, dilation, seed


# assert_close is a stateless function, so sharing it across examples is safe; derandomize
# keeps CI reproducible (the same examples every run).
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry_case=_geometries())
def test_random_geometries_match_reference(assert_close, geometry_case):
    input_shape, weight_shape, stride, padding, dilation, seed = geometry_case
    generator = np.random.default_rng(seed)
    x = generator.standard_normal(input_shape).astype(np.float32)
    w = generator.standard_normal(weight_shape).astype(np.float32)
    b = generator.standard_normal(weight_shape[0]).astype(np.float32)
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    expected = ref.conv2d(x, w, b, **geometry)
    terms_y, terms_x, terms_w = _terms(x, w, expected)
    assert_close(F.conv2d(x, w, b, **geometry), expected, terms=terms_y, name="output")
    gy = generator.standard_normal(expected.shape).astype(np.float32)
    actual = F.conv2d_backward(gy, x, w, **geometry)
    for name, got, want, terms in zip(["grad_input", "grad_weight", "grad_bias"], actual,
                                      ref.conv2d_backward(gy, x, w, **geometry),
                                      [terms_x, terms_w, terms_w]):
        assert_close(got, want, terms=terms, name=name)


#: Stride-1 convolutions of at least 32 output channels, which AVX-512 runs with the
#: output channels across the lanes (AVX2 with pixels across them): LeNet's middle conv,
#: a partial vector of channels, rows of 14-, 4- and 1-pixel tiles, a rectangular dilated
#: kernel, 16 pixels (one whole block of the transposition). Each: input shape, weight
#: shape, padding, dilation, bias.
CHANNELS_IN_LANES_CASES = [
    ((3, 16, 14, 14), (32, 16, 3, 3), 1, 1, True),
    ((2, 4, 6, 31), (33, 4, 3, 2), (0, 1), (1, 2), False),
    ((1, 5, 9, 4), (48, 5, 5, 3), 2, (2, 1), True),
    ((2, 3, 4, 4), (40, 3, 3, 3), 1, 1, True),
]


@pytest.mark.parametrize("case", CHANNELS_IN_LANES_CASES)
def test_forward_same_bits_at_each_fma_level_and_thread_count(rng, assert_close, case):
    from bnrs import _core

    input_shape, weight_shape, padding, dilation, has_bias = case
    x = rng.standard_normal(input_shape).astype(np.float32)
    w = rng.standard_normal(weight_shape).astype(np.float32)
    b = rng.standard_normal(weight_shape[0]).astype(np.float32) if has_bias else None
    geometry = {"padding": padding, "dilation": dilation}
    expected = ref.conv2d(x, w, b, **geometry)
    threads, level = _core.get_num_threads(), _core.simd_backend()
    fused_bits = None
    try:
        for simd in _core.simd_levels():
            _core.set_simd(simd)
            for n_threads in (1, 2):
                _core.set_num_threads(n_threads)
                y = F.conv2d(x, w, b, **geometry)
                assert_close(y, expected, terms=_terms(x, w, y)[0], name=f"{simd}")
                if simd != "scalar":   # with FMA every level sums in the same order
                    if fused_bits is None:
                        fused_bits = y
                    np.testing.assert_array_equal(y, fused_bits, err_msg=f"{simd} {n_threads}")
    finally:
        _core.set_num_threads(threads)
        _core.set_simd(level)
