"""Grouped and depthwise conv2d (``groups=``) against the NumPy reference, at every SIMD
level and thread count, and the layer's arguments."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from bnrs import _core, nn
from bnrs import functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# name: (input shape, weight shape, stride, padding, dilation, groups, bias)
CASES = {
    # Depthwise (groups == C_in): the per-channel stencil.
    "depthwise_k3s1p1": ((2, 5, 9, 11), (5, 1, 3, 3), 1, 1, 1, 5, True),
    "depthwise_batch1_no_padding": ((1, 3, 7, 9), (3, 1, 3, 3), 1, 0, 1, 3, True),
    "depthwise_k3s2p1": ((3, 4, 9, 7), (4, 1, 3, 3), 2, 1, 1, 4, True),
    "depthwise_k5s2p2_odd": ((2, 3, 13, 11), (3, 1, 5, 5), 2, 2, 1, 3, False),
    "depthwise_dilated_rect": ((2, 4, 10, 9), (4, 1, 3, 2), (1, 2), (2, 1), (2, 1), 4, True),
    "depthwise_multiplier2": ((2, 3, 8, 9), (6, 1, 3, 3), 1, 1, 1, 3, True),
    "depthwise_multiplier2_strided": ((1, 4, 11, 10), (8, 1, 3, 3), (2, 1), (0, 2), 1, 4,
                                      False),
    # 28x28 planes in a batch of 9: the sizes of the measured networks.
    "depthwise_28x28_batch9": ((9, 8, 28, 28), (8, 1, 3, 3), 1, 1, 1, 8, True),
    # General groups: one ordinary convolution per group.
    "groups2": ((2, 4, 9, 7), (6, 2, 3, 3), 1, 1, 1, 2, True),
    "groups2_strided_dilated": ((3, 6, 11, 9), (4, 3, 3, 2), 2, (1, 2), (2, 1), 2, False),
    "groups3_pointwise": ((2, 6, 5, 7), (9, 2, 1, 1), 1, 0, 1, 3, True),
    "groups1_unchanged": ((2, 3, 7, 6), (4, 3, 3, 3), 1, 1, 1, 1, True),
}


def _case(rng, name):
    input_shape, weight_shape, stride, padding, dilation, groups, has_bias = CASES[name]
    x = rng.standard_normal(input_shape).astype(np.float32)
    w = rng.standard_normal(weight_shape).astype(np.float32)
    b = rng.standard_normal(weight_shape[0]).astype(np.float32) if has_bias else None
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    return x, w, b, geometry


def _terms(x, w, y):
    """Products summed per element of (output, grad_input, grad_weight)."""
    c_out, c_in_group, kh, kw = w.shape
    groups = x.shape[1] // c_in_group
    n, _, h_out, w_out = y.shape
    return c_in_group * kh * kw, c_out // groups * kh * kw, n * h_out * w_out


def _all(rng, name):
    """Output and the three gradients of a case, as a dict."""
    x, w, b, geometry = _case(rng, name)
    y = F.conv2d(x, w, b, **geometry)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx, gw, gb = F.conv2d_backward(gy, x, w, **geometry, bias=b is not None)
    return {"output": y, "grad_input": gx, "grad_weight": gw, "grad_bias": gb}


@pytest.fixture
def restore_runtime():
    level, threads = _core.simd_backend(), _core.get_num_threads()
    yield
    _core.set_simd(level)
    _core.set_num_threads(threads)


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("name", CASES)
def test_matches_reference_at_every_level(rng, assert_close, restore_runtime, name, level):
    if level not in _core.simd_levels():
        pytest.skip(f"this CPU has no {level}")
    _core.set_simd(level)
    x, w, b, geometry = _case(rng, name)
    expected = ref.conv2d(x, w, b, **geometry)
    terms_y, terms_x, terms_w = _terms(x, w, expected)
    assert_close(F.conv2d(x, w, b, **geometry), expected, terms=terms_y, name="output")
    gy = rng.standard_normal(expected.shape).astype(np.float32)
    grads = F.conv2d_backward(gy, x, w, **geometry, bias=b is not None)
    wanted = ref.conv2d_backward(gy, x, w, **geometry)
    for what, got, want, terms in zip(["grad_input", "grad_weight", "grad_bias"], grads,
                                      wanted, [terms_x, terms_w, terms_w]):
        if what == "grad_bias" and b is None:
            assert got is None
            continue
        assert_close(got, want, terms=terms, name=what)


@pytest.mark.parametrize("name", CASES)
def test_one_and_two_threads_and_every_level_give_the_same_bits(restore_runtime, name):
    results = {}
    for level in _core.simd_levels():
        _core.set_simd(level)
        for threads in (1, 2):
            _core.set_num_threads(threads)
            results[level, threads] = _all(np.random.default_rng(3), name)
    depthwise = CASES[name][1][1] == 1 and CASES[name][5] > 1
    first = next(iter(results.values()))
    for (level, threads), outputs in results.items():
        # The GEMM of other groupings rounds by its register width: threads only there.
        if not depthwise and threads == 1:
            continue
        reference_run = first if depthwise else results[level, 1]
        for key, value in outputs.items():
            if value is None:
                assert reference_run[key] is None
                continue
            assert np.array_equal(value, reference_run[key]), (
                f"{key} at {level}, {threads} thread(s) differs in "
                f"{np.count_nonzero(value != reference_run[key])} elements")


def test_input_grad_skipped(rng, assert_close):
    x, w, b, geometry = _case(rng, "depthwise_multiplier2")
    gy = rng.standard_normal(ref.conv2d(x, w, b, **geometry).shape).astype(np.float32)
    grad_input, grad_weight, _ = F.conv2d_backward(gy, x, w, **geometry, input_grad=False)
    assert grad_input is None
    _, expected_weight, _ = ref.conv2d_backward(gy, x, w, **geometry)
    assert_close(grad_weight, expected_weight, terms=gy[:, 0].size, name="grad_weight")


# Depthwise, multiplier 2, with every per-axis feature, for the finite differences.
FD_GEOMETRY = {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2), "groups": 2}


def test_backward_matches_finite_differences(rng, assert_close):
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((4, 1, 3, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    gy = rng.standard_normal(ref.conv2d(x, w, b, **FD_GEOMETRY).shape)

    def loss(x, w, b):
        return ref.weighted_sum(ref.conv2d(x, w, b, **FD_GEOMETRY), gy)

    numerical = ref.numerical_gradients(loss, x, w, b)
    exact = ref.conv2d_backward(gy, x, w, **FD_GEOMETRY)
    actual = F.conv2d_backward(gy, x, w, **FD_GEOMETRY)
    for name, want, ours, approx in zip(["grad_input", "grad_weight", "grad_bias"], exact,
                                        actual, numerical):
        assert_close(want, approx, **ref.FD_TOLERANCE, name=f"reference {name}")
        assert_close(ours, approx, terms=gy[:, 0].size, name=name)


def test_fused_activation_and_pool_give_the_bits_of_separate_passes(rng):
    x, w, b, geometry = _case(rng, "depthwise_multiplier2")
    plain = F.conv2d(x, w, b, **geometry)
    fused = F._conv2d_fused(x, w, b, geometry["stride"], geometry["padding"],
                            geometry["dilation"], "relu", 0.0, "max", geometry["groups"])
    assert np.array_equal(fused, F.max_pool2d(F.relu(plain), 2))


@pytest.mark.parametrize("groups, error, match", [
    (True, TypeError, "groups"), (2.0, TypeError, "groups"), (0, ValueError, "groups"),
    (3, ValueError, r"groups: .*divides.*got 3"),
])
def test_bad_groups(rng, groups, error, match):
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    with pytest.raises(error, match=match):
        F.conv2d(x, w, groups=groups)
    with pytest.raises(error, match=match):
        nn.Conv2d(4, 8, 3, groups=groups)


def test_weight_channels_must_match_the_groups(rng):
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"weight: expected 1 input channels per group"):
        F.conv2d(x, w, groups=4)
    with pytest.raises(ValueError, match="groups"):
        F.conv2d_backward(np.ones((1, 6, 3, 3), np.float32), x,
                          np.ones((6, 1, 3, 3), np.float32), groups=3)


def test_layer_shapes_init_and_state_dict():
    layer = nn.Conv2d(4, 8, 3, padding=1, groups=4, random_state=0)
    assert layer.weight.data.shape == (8, 1, 3, 3)
    # PyTorch's bound: 1/sqrt(fan_in), fan_in = in_channels / groups * kH * kW = 9.
    assert np.abs(layer.weight.data).max() <= 1 / 3
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert "groups=4" in repr(layer)
    assert layer.output_shape((4, 6, 6)) == (8, 6, 6)
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32)
    y = layer(x)
    assert y.shape == (2, 8, 6, 6)
    assert layer.backward(np.ones_like(y)).shape == x.shape
    # groups=1 draws the weights it always drew.
    plain, default = nn.Conv2d(3, 4, 3, groups=1, random_state=5), nn.Conv2d(3, 4, 3,
                                                                           random_state=5)
    assert np.array_equal(plain.weight.data, default.weight.data)
    assert "groups" not in repr(plain)
    # The seventh positional argument is still bias (groups comes after it).
    assert nn.Conv2d(3, 4, 3, 1, 0, 1, False).bias is None


@st.composite
def _grouped_geometries(draw):
    groups = draw(st.integers(1, 4))
    in_per_group = draw(st.sampled_from([1, 1, 2]))   # depthwise more often
    out_per_group = draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    size = []
    for axis in range(2):
        reach = dilation[axis] * (kernel[axis] - 1) + 1 - 2 * padding[axis]
        size.append(draw(st.integers(max(reach, 1), max(reach, 1) + 20)))
    shape = (draw(st.integers(1, 3)), groups * in_per_group, *size)
    weight_shape = (groups * out_per_group, in_per_group) + kernel
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    return shape, weight_shape, geometry, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_grouped_geometries())
def test_random_grouped_geometries_match_reference(assert_close, case):
    input_shape, weight_shape, geometry, seed = case
    generator = np.random.default_rng(seed)
    x = generator.standard_normal(input_shape).astype(np.float32)
    w = generator.standard_normal(weight_shape).astype(np.float32)
    b = generator.standard_normal(weight_shape[0]).astype(np.float32)
    expected = ref.conv2d(x, w, b, **geometry)
    terms_y, terms_x, terms_w = _terms(x, w, expected)
    assert_close(F.conv2d(x, w, b, **geometry), expected, terms=terms_y, name="output")
    gy = generator.standard_normal(expected.shape).astype(np.float32)
    for name, got, want, terms in zip(["grad_input", "grad_weight", "grad_bias"],
                                      F.conv2d_backward(gy, x, w, **geometry),
                                      ref.conv2d_backward(gy, x, w, **geometry),
                                      [terms_x, terms_w, terms_w]):
        assert_close(got, want, terms=terms, name=name)
