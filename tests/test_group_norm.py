"""Group, layer and instance normalisation: the one group-norm kernel, its wrappers and layers.

Forward and gradients against the float64 references (``reference.py``), the references
against central differences, bit-identical results at 1 and 2 threads, bad input, the layers
(``bnrs.nn.GroupNorm``, ``LayerNorm``, ``InstanceNorm2d``) and the grammar's ``gn``/``ln``/
``in`` tokens. PyTorch's own values are in test_fixtures.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from bnrs import _core, nn, optim
from bnrs import functional as F

# name: (input shape, num_groups): C = 6 with every divisor, N = 1 and 2, odd 5x7 maps.
GROUP_CASES = {
    "n2_g1": ((2, 6, 5, 7), 1),
    "n2_g2": ((2, 6, 5, 7), 2),
    "n2_g3": ((2, 6, 5, 7), 3),
    "n2_g6": ((2, 6, 5, 7), 6),
    "n1_g3": ((1, 6, 5, 7), 3),
    "n1_g6": ((1, 6, 5, 7), 6),
    "2d_g2": ((3, 6), 2),
    "3d_g3": ((2, 6, 5), 3),
}
# name: (input shape, normalized_shape)
LAYER_CASES = {
    "features": ((4, 9), (9,)),
    "features_n1": ((1, 9), (9,)),
    "chw": ((2, 6, 5, 7), (6, 5, 7)),
    "hw": ((2, 3, 5, 7), (5, 7)),
    "last_of_3d": ((2, 3, 8), (8,)),
}


def _input(rng, shape):
    """An offset and a scale per sample, so the statistics are far from (0, 1)."""
    broadcast = (shape[0],) + (1,) * (len(shape) - 1)
    offset = rng.uniform(-3, 3, shape[0]).reshape(broadcast)
    scale = rng.uniform(0.5, 3, shape[0]).reshape(broadcast)
    return (rng.standard_normal(shape) * scale + offset).astype(np.float32)


def _params(rng, shape):
    return (rng.uniform(0.5, 2, shape).astype(np.float32),
            rng.standard_normal(shape).astype(np.float32))


def _group_terms(shape, groups):
    return int(np.prod(shape)) // shape[0] // groups


# --------------------------------------------------------------------------- group norm


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("case", GROUP_CASES.values(), ids=GROUP_CASES.keys())
def test_group_norm_matches_reference(rng, assert_close, case, affine):
    shape, groups = case
    x = _input(rng, shape)
    weight, bias = _params(rng, shape[1]) if affine else (None, None)
    gy = rng.standard_normal(shape).astype(np.float32)
    y, mean, rstd = F.native_group_norm(x, groups, weight, bias)
    expected = ref.group_norm(x, groups, weight, bias)
    terms = _group_terms(shape, groups)
    assert mean.shape == rstd.shape == (shape[0], groups)
    for name, got, want in zip(["output", "mean", "rstd"], (y, mean, rstd), expected):
        assert_close(got, want, terms=terms, name=name)
    np.testing.assert_array_equal(F.group_norm(x, groups, weight, bias), y)
    grads = F.group_norm_backward(gy, x, groups, weight, mean, rstd)
    want = ref.group_norm_backward(gy, x, groups, weight, expected[1], expected[2])
    assert_close(grads[0], want[0], terms=terms, name="grad_input")
    if affine:
        terms_per_channel = int(np.prod(shape)) // shape[1]
        assert_close(grads[1], want[1], terms=terms_per_channel, name="grad_weight")
        assert_close(grads[2], want[2], terms=terms_per_channel, name="grad_bias")
    else:
        assert grads[1] is None and grads[2] is None


def test_group_norm_eps_and_constant_groups(assert_close):
    """A constant group has variance 0: rstd = 1/sqrt(eps), the output is the bias."""
    x = np.ones((2, 4, 3, 3), np.float32) * np.float32(7.5)
    bias = np.arange(4, dtype=np.float32)
    y, mean, rstd = F.native_group_norm(x, 2, np.full(4, 2.0, np.float32), bias, eps=0.25)
    np.testing.assert_array_equal(mean, np.full((2, 2), 7.5, np.float32))
    np.testing.assert_array_equal(rstd, np.full((2, 2), 2.0, np.float32))
    np.testing.assert_array_equal(y, np.broadcast_to(bias[None, :, None, None], x.shape))


def test_group_norm_far_from_zero_mean(rng, assert_close):
    """Shifted sums keep the variance of a group whose mean is 1e4 times its std."""
    x = (1e4 + rng.standard_normal((2, 4, 6, 6))).astype(np.float32)
    _, _, rstd = F.native_group_norm(x, 2)
    assert_close(rstd, ref.group_norm(x, 2)[2], rtol=1e-3, name="rstd")


# --------------------------------------------------------------------------- layer norm


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("case", LAYER_CASES.values(), ids=LAYER_CASES.keys())
def test_layer_norm_matches_reference(rng, assert_close, case, affine):
    shape, normalized_shape = case
    x = _input(rng, shape)
    weight, bias = _params(rng, normalized_shape) if affine else (None, None)
    gy = rng.standard_normal(shape).astype(np.float32)
    y, mean, rstd = F.native_layer_norm(x, normalized_shape, weight, bias)
    expected = ref.layer_norm(x, normalized_shape, weight, bias)
    terms = int(np.prod(normalized_shape))
    assert mean.shape == rstd.shape == expected[1].shape
    for name, got, want in zip(["output", "mean", "rstd"], (y, mean, rstd), expected):
        assert_close(got, want, terms=terms, name=name)
    np.testing.assert_array_equal(F.layer_norm(x, list(normalized_shape), weight, bias), y)
    grads = F.layer_norm_backward(gy, x, normalized_shape, weight, mean, rstd)
    want = ref.layer_norm_backward(gy, x, normalized_shape, weight, expected[1], expected[2])
    assert_close(grads[0], want[0], terms=terms, name="grad_input")
    if affine:
        rows = int(np.prod(shape)) // terms
        assert grads[1].shape == grads[2].shape == normalized_shape
        assert_close(grads[1], want[1], terms=rows, name="grad_weight")
        assert_close(grads[2], want[2], terms=rows, name="grad_bias")
    else:
        assert grads[1] is None and grads[2] is None


def test_layer_norm_takes_an_int_normalized_shape_and_an_unbatched_input(rng, assert_close):
    x = _input(rng, (1, 7))[0]
    y = F.layer_norm(x, 7)
    assert_close(y, ref.layer_norm(x, (7,))[0], terms=7, name="output")


def test_layer_norm_over_chw_is_group_norm_with_one_group(rng):
    x = _input(rng, (2, 6, 5, 7))
    layer = F.layer_norm(x, x.shape[1:])
    group = F.group_norm(x, 1)
    np.testing.assert_array_equal(layer, group)


# --------------------------------------------------------------------------- instance norm


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 3, 4, 4), (3, 2, 1, 2), (2, 3, 9)])
def test_instance_norm_matches_reference(rng, assert_close, shape, affine):
    x = _input(rng, shape)
    weight, bias = _params(rng, shape[1]) if affine else (None, None)
    gy = rng.standard_normal(shape).astype(np.float32)
    y, mean, rstd = F.native_instance_norm(x, weight, bias)
    expected = ref.instance_norm(x, weight, bias)
    terms = int(np.prod(shape[2:]))
    for name, got, want in zip(["output", "mean", "rstd"], (y, mean, rstd), expected):
        assert_close(got, want, terms=terms, name=name)
    np.testing.assert_array_equal(F.instance_norm(x, weight=weight, bias=bias), y)
    grads = F.instance_norm_backward(gy, x, weight, mean, rstd)
    want = ref.instance_norm_backward(gy, x, weight, expected[1], expected[2])
    assert_close(grads[0], want[0], terms=terms, name="grad_input")
    if affine:
        assert_close(grads[1], want[1], terms=x.size // shape[1], name="grad_weight")
        assert_close(grads[2], want[2], terms=x.size // shape[1], name="grad_bias")


def test_instance_norm_refuses_running_statistics_and_single_values():
    x = np.ones((2, 3, 4, 4), np.float32)
    with pytest.raises(NotImplementedError, match="running_mean"):
        F.instance_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(NotImplementedError, match="use_input_stats"):
        F.instance_norm(x, use_input_stats=False)
    with pytest.raises(ValueError, match="^input: expected more than 1 spatial element"):
        F.instance_norm(np.ones((2, 3, 1, 1), np.float32))
    with pytest.raises(ValueError, match="^input"):
        F.instance_norm(np.ones((2, 3), np.float32))


# --------------------------------------------------------------------------- finite differences


FD_CASES = {
    "group_4d": ("group", (2, 6, 2, 3), 3),
    "group_2d": ("group", (2, 6), 2),
    "instance": ("group", (2, 3, 2, 2), 3),
    "layer_2d": ("layer", (3, 5), (5,)),
    "layer_chw": ("layer", (2, 2, 2, 3), (2, 2, 3)),
}


@pytest.fixture(params=FD_CASES.values(), ids=FD_CASES.keys())
def fd_case(request, rng):
    """A tiny case with the float64 reference's central-difference gradients."""
    kind, shape, arg = request.param
    x = _input(rng, shape).astype(np.float64)
    param_shape = (shape[1],) if kind == "group" else arg
    weight, bias = (p.astype(np.float64) for p in _params(rng, param_shape))
    gy = rng.standard_normal(shape)
    forward = ref.group_norm if kind == "group" else ref.layer_norm

    def loss(x, weight, bias):
        return ref.weighted_sum(forward(x, arg, weight, bias)[0], gy)

    return kind, arg, x, weight, bias, gy, ref.numerical_gradients(loss, x, weight, bias)


NAMES = ["grad_input", "grad_weight", "grad_bias"]


def test_reference_backward_matches_finite_differences(assert_close, fd_case):
    kind, arg, x, weight, bias, gy, numerical = fd_case
    if kind == "group":
        _, mean, rstd = ref.group_norm(x, arg, weight, bias)
        exact = ref.group_norm_backward(gy, x, arg, weight, mean, rstd)
    else:
        _, mean, rstd = ref.layer_norm(x, arg, weight, bias)
        exact = ref.layer_norm_backward(gy, x, arg, weight, mean, rstd)
    for name, got, want in zip(NAMES, exact, numerical):
        assert_close(got, want, **ref.FD_TOLERANCE, name=name)


def test_backward_matches_finite_differences(assert_close, fd_case):
    kind, arg, x, weight, bias, gy, numerical = fd_case
    if kind == "group":
        _, mean, rstd = F.native_group_norm(x, arg, weight, bias)
        actual = F.group_norm_backward(gy, x, arg, weight, mean, rstd)
    else:
        _, mean, rstd = F.native_layer_norm(x, arg, weight, bias)
        actual = F.layer_norm_backward(gy, x, arg, weight, mean, rstd)
    for name, got, want in zip(NAMES, actual, numerical):
        assert_close(got, want, terms=x.size, name=name)


# --------------------------------------------------------------------------- threads


@pytest.fixture
def restore_threads():
    before = _core.get_num_threads()
    yield
    _core.set_num_threads(before)


def _run_all(shape, groups):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    weight, bias = _params(rng, shape[1])
    gy = rng.standard_normal(shape).astype(np.float32)
    y, mean, rstd = F.native_group_norm(x, groups, weight, bias)
    grads = F.group_norm_backward(gy, x, groups, weight, mean, rstd)
    return [y, mean, rstd, *grads]


@pytest.mark.parametrize("shape, groups", [((16, 32, 20, 20), 8), ((16, 32, 20, 20), 1),
                                           ((16, 32, 20, 20), 32), ((256, 300), 1),
                                           ((1, 8, 64, 64), 1)])
def test_bit_identical_at_one_and_two_threads(restore_threads, shape, groups):
    _core.set_num_threads(1)
    one = _run_all(shape, groups)
    _core.set_num_threads(2)
    two = _run_all(shape, groups)
    for index, (a, b) in enumerate(zip(one, two)):
        assert np.array_equal(a, b), f"output {index} differs between 1 and 2 threads"


# --------------------------------------------------------------------------- bad input


def test_num_groups_must_divide_the_channels():
    x = np.ones((2, 6, 3, 3), np.float32)
    for groups in (4, 0, -2, 12):
        with pytest.raises(ValueError, match="^num_groups"):
            F.group_norm(x, groups)
    with pytest.raises(TypeError, match="^num_groups"):
        F.group_norm(x, 2.0)
    with pytest.raises(ValueError, match="^num_groups"):
        F.group_norm_backward(x, x, 4, None, np.ones((2, 4), np.float32),
                              np.ones((2, 4), np.float32))


@pytest.mark.parametrize("call, argument", [
    (lambda x: F.group_norm(x, 2, np.ones(5, np.float32)), "weight"),
    (lambda x: F.group_norm(x, 2, None, np.ones((6, 1), np.float32)), "bias"),
    (lambda x: F.group_norm(x[0, 0, 0], 1), "input"),
    (lambda x: F.group_norm(np.ones((0, 6, 3, 3), np.float32), 2), "input"),
    (lambda x: F.group_norm(x, 2, eps=-1.0), "eps"),
    (lambda x: F.group_norm(x, 2, eps=float("nan")), "eps"),
    (lambda x: F.group_norm_backward(x[:1], x, 2, None, np.ones((2, 2), np.float32),
                                     np.ones((2, 2), np.float32)), "grad_output"),
    (lambda x: F.group_norm_backward(x, x, 2, None, np.ones((2, 3), np.float32),
                                     np.ones((2, 2), np.float32)), "mean"),
    (lambda x: F.group_norm_backward(x, x, 2, None, np.ones((2, 2), np.float32),
                                     np.ones(4, np.float32)), "rstd"),
    (lambda x: F.group_norm_backward(x, x, 2, np.ones(3, np.float32),
                                     np.ones((2, 2), np.float32),
                                     np.ones((2, 2), np.float32)), "weight"),
    (lambda x: F.layer_norm(x, (5, 3)), "normalized_shape"),
    (lambda x: F.layer_norm(x, (2, 6, 3, 3, 1)), "normalized_shape"),
    (lambda x: F.layer_norm(x, ()), "normalized_shape"),
    (lambda x: F.layer_norm(x, (3, 3), np.ones(9, np.float32)), "weight"),
    (lambda x: F.layer_norm(x, 3, None, np.ones(4, np.float32)), "bias"),
    (lambda x: F.layer_norm_backward(x, x, 3, None, np.ones(5, np.float32),
                                     np.ones(36, np.float32)), "mean"),
    (lambda x: F.layer_norm_backward(x[:1], x, 3, None, np.ones(36, np.float32),
                                     np.ones(36, np.float32)), "grad_output"),
    (lambda x: F.instance_norm(x, weight=np.ones(2, np.float32)), "weight"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    x = np.ones((2, 6, 3, 3), np.float32)
    with pytest.raises(ValueError, match=f"^{argument}"):
        call(x)


@pytest.mark.parametrize("bad", ["3", 3.0, [3.5], None])
def test_normalized_shape_that_is_not_ints_is_a_type_error(bad):
    with pytest.raises(TypeError, match="^normalized_shape"):
        F.layer_norm(np.ones((2, 3), np.float32), bad)


# --------------------------------------------------------------------------- layers


def _layer_case(rng, layer, shape):
    x = _input(rng, shape)
    gy = rng.standard_normal(shape).astype(np.float32)
    for param in layer.parameters():
        param.data[...] = rng.standard_normal(param.shape)
    return x, gy


def test_group_norm_layer_matches_reference(rng, assert_close):
    layer = nn.GroupNorm(3, 6)
    x, gy = _layer_case(rng, layer, (2, 6, 5, 7))
    y = layer(x)
    expected, mean, rstd = ref.group_norm(x, 3, layer.weight.data, layer.bias.data)
    assert_close(y, expected, terms=70, name="output")
    grad_input = layer.backward(gy)
    want = ref.group_norm_backward(gy, x, 3, layer.weight.data, mean, rstd)
    assert_close(grad_input, want[0], terms=70, name="grad_input")
    assert_close(layer.weight.grad, want[1], terms=70, name="weight.grad")
    assert_close(layer.bias.grad, want[2], terms=70, name="bias.grad")
    layer.eval()
    np.testing.assert_array_equal(layer(x), y)   # no running statistics: same in eval


def test_layer_norm_layer_matches_reference(rng, assert_close):
    layer = nn.LayerNorm(9)
    x, gy = _layer_case(rng, layer, (4, 9))
    y = layer(x)
    expected, mean, rstd = ref.layer_norm(x, (9,), layer.weight.data, layer.bias.data)
    assert_close(y, expected, terms=9, name="output")
    grad_input = layer.backward(gy)
    want = ref.layer_norm_backward(gy, x, (9,), layer.weight.data, mean, rstd)
    assert_close(grad_input, want[0], terms=9, name="grad_input")
    assert_close(layer.weight.grad, want[1], terms=4, name="weight.grad")
    assert_close(layer.bias.grad, want[2], terms=4, name="bias.grad")
    chw = nn.LayerNorm([3, 4, 5])
    assert chw.weight.shape == chw.bias.shape == (3, 4, 5)
    assert nn.LayerNorm(4, bias=False).bias is None
    assert list(nn.LayerNorm(4, elementwise_affine=False).state_dict()) == []


def test_instance_norm_layer_matches_reference(rng, assert_close):
    plain = nn.InstanceNorm2d(4)
    assert plain.weight is None and list(plain.state_dict()) == []
    x, gy = _layer_case(rng, plain, (2, 4, 5, 7))
    assert_close(plain(x), ref.instance_norm(x)[0], terms=35, name="output")
    layer = nn.InstanceNorm2d(4, affine=True)
    x, gy = _layer_case(rng, layer, (2, 4, 5, 7))
    y = layer(x)
    expected, mean, rstd = ref.instance_norm(x, layer.weight.data, layer.bias.data)
    assert_close(y, expected, terms=35, name="output")
    want = ref.instance_norm_backward(gy, x, layer.weight.data, mean, rstd)
    assert_close(layer.backward(gy), want[0], terms=35, name="grad_input")
    assert_close(layer.weight.grad, want[1], terms=70, name="weight.grad")


def test_layer_arguments_are_checked():
    with pytest.raises(ValueError, match="num_groups"):
        nn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="num_channels"):
        nn.GroupNorm(1, 0)
    with pytest.raises(ValueError, match="eps"):
        nn.LayerNorm(3, eps=0.0)
    with pytest.raises(NotImplementedError, match="track_running_stats"):
        nn.InstanceNorm2d(3, track_running_stats=True)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 6, \*\)"):
        nn.GroupNorm(2, 6)(np.ones((2, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, \.\.\., 3, 4\)"):
        nn.LayerNorm([3, 4])(np.ones((2, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        nn.InstanceNorm2d(3)(np.ones((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        nn.InstanceNorm2d(3)(np.ones((2, 3, 1, 1), np.float32))


def test_defaults_and_repr_follow_pytorch():
    group = nn.GroupNorm(2, 4)
    assert (group.eps, group.affine) == (1e-5, True)
    assert group.weight.data.tolist() == [1.0] * 4 and group.bias.data.tolist() == [0.0] * 4
    assert repr(group) == "GroupNorm(2, 4, eps=1e-05, affine=True)"
    assert repr(nn.LayerNorm(5)) == "LayerNorm((5,), eps=1e-05, elementwise_affine=True)"
    instance = nn.InstanceNorm2d(3)
    assert (instance.eps, instance.momentum, instance.affine,
            instance.track_running_stats) == (1e-5, 0.1, False, False)
    assert repr(instance) == ("InstanceNorm2d(3, eps=1e-05, momentum=0.1, affine=False, "
                              "track_running_stats=False)")


# --------------------------------------------------------------------------- the grammar

# Every per-sample norm token, after conv, pool and dense layers.
NORM_SPEC = "c6-gn3-relu-mp2-c6-ln-relu-in-fc12-ln-relu-fc12-gn4-relu"


def test_grammar_builds_the_norm_layers():
    model = nn.from_spec(NORM_SPEC, (1, 8, 8), 3, random_state=0)
    layers = [(type(m).__name__, m.extra_repr()) for m in model]
    assert [name for name, _ in layers] == [
        "Conv2d", "GroupNorm", "ReLU", "MaxPool2d", "Conv2d", "GroupNorm", "ReLU",
        "InstanceNorm2d", "Flatten", "Linear", "LayerNorm", "ReLU", "Linear", "GroupNorm",
        "ReLU", "Linear"]
    assert (model[1].num_groups, model[5].num_groups, model[13].num_groups) == (3, 1, 4)
    assert model[10].normalized_shape == (12,)


def test_state_dict_keys_match_a_pytorch_mirror():
    """Checked against PyTorch 2.15: nn.Sequential(Conv2d(1, 6, 3, padding=1),
    GroupNorm(3, 6), ReLU(), MaxPool2d(2), Conv2d(6, 6, 3, padding=1), GroupNorm(1, 6),
    ReLU(), InstanceNorm2d(6), Flatten(), Linear(96, 12), LayerNorm(12), ReLU(),
    Linear(12, 12), GroupNorm(4, 12), ReLU(), Linear(12, 3)).state_dict()."""
    state = nn.from_spec(NORM_SPEC, (1, 8, 8), 3, random_state=0).state_dict()
    assert {key: value.shape for key, value in state.items()} == {
        "0.weight": (6, 1, 3, 3), "0.bias": (6,), "1.weight": (6,), "1.bias": (6,),
        "4.weight": (6, 6, 3, 3), "4.bias": (6,), "5.weight": (6,), "5.bias": (6,),
        "9.weight": (12, 96), "9.bias": (12,), "10.weight": (12,), "10.bias": (12,),
        "12.weight": (12, 12), "12.bias": (12,), "13.weight": (12,), "13.bias": (12,),
        "15.weight": (3, 12), "15.bias": (3,)}


def test_a_network_with_the_norm_tokens_trains():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
    target = np.arange(16) % 3
    x[np.arange(16), 0, target, target] += 3.0   # a learnable signal
    model = nn.from_spec(NORM_SPEC, (1, 8, 8), 3, random_state=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        losses.append(crit(model(x), target))
        model.backward(crit.backward(), input_grad=False)
        opt.step()
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("spec, message", [
    ("fc8-in", "feature map"),
    ("c6-gn4", "num_groups"),
    ("c6-gn0", "at least 1"),
    ("c6-gnx", r"gn<groups>"),
    ("c6-mp8-in", "more than 1 spatial element"),
])
def test_grammar_rejects_bad_norm_tokens(spec, message):
    with pytest.raises(nn.SpecError, match=message):
        nn.from_spec(spec, (1, 8, 8), 3)
