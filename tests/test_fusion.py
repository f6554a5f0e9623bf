"""Evaluation-mode fusion in Sequential: conv/linear → batch norm → activation blocks.

Fused and unfused outputs differ by float32 rounding only: folding the batch norm into
the weights rounds ``w·γ/√(σ²+ε)`` to float32 before the GEMM, whose sums then round
differently from the unfused GEMM's followed by the normalisation. The tolerance below is
that rounding bounded term by term, not a loosened comparison. An activation without a
batch norm changes nothing in the arithmetic, so it must give the unfused bits.
"""

from __future__ import annotations

import pickle

import bnrs
import numpy as np
import pytest
from bnrs import CNNClassifier, nn, optim
from bnrs import functional as F
from bnrs.nn.spec import DEFAULT_ARCHITECTURE, from_spec

UNIT_ROUNDOFF = 2.0 ** -24
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)

ACTIVATIONS = {
    None: lambda: None,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}

#: (batch, in_channels, (H, W), out_channels, kernel, stride, padding, bias): every
#: convolution algorithm (small-K, images sharing a GEMM, pointwise, row tiles).
CONV_CASES = [
    (7, 1, (9, 9), 3, 3, 1, 1, True),
    (1, 3, (11, 10), 16, 3, 2, 0, False),
    (7, 16, (13, 12), 3, (3, 5), (2, 1), (1, 2), True),
    (16, 16, (7, 7), 8, 3, 1, 1, True),
    (1, 16, (6, 5), 16, 1, 1, 0, True),
    (2, 64, (40, 40), 8, 3, 1, 1, False),
]


def _randomise_norm(norm, rng) -> None:
    """Running statistics and affine parameters far from the identity, γ of both signs."""
    norm.running_mean[:] = rng.normal(0.0, 0.5, norm.num_features)
    norm.running_var[:] = rng.uniform(0.3, 3.0, norm.num_features)
    if norm.affine:
        norm.weight.data[:] = rng.normal(0.0, 1.5, norm.num_features)
        norm.bias.data[:] = rng.normal(0.0, 0.5, norm.num_features)


def _block(layer, norm_kind, activation, rng):
    """A Sequential of ``layer``, an optional batch norm and an optional activation."""
    width = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    norm_class = nn.BatchNorm2d if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d
    modules = [layer]
    if norm_kind is not None:
        norm = norm_class(width, affine=norm_kind == "affine")
        _randomise_norm(norm, rng)
        modules.append(norm)
    act = ACTIVATIONS[activation]()
    if act is not None:
        modules.append(act)
    return nn.Sequential(*modules).eval()


def _outputs(model, x):
    """(fused, unfused) outputs of ``model`` on ``x``."""
    model.fuse = True
    fused = model(x)
    model.fuse = False
    unfused = model(x)
    model.fuse = True
    return fused, unfused


def _folding_bound(model, x) -> np.ndarray:
    """Per output element, a bound on |fused - unfused| for a one-block ``model``.

    With s = γ/√(σ²+ε) and A = Σ|w||x| over the K = C_in·kH·kW (or in_features) terms of
    an output, each GEMM's sum errs by at most K·u·A (u = 2⁻²⁴), the folded weights by u
    each, and the normalisation and the folded bias by a few u of |s|(|z| + |b| + |μ|) +
    |β|: (2K + 8)·u·(|s|(A + |b| + |μ|) + |β|). Every activation here is 1-Lipschitz, so
    the bound holds after it too.
    """
    layer = model[0]
    norm = model[1] if len(model) > 1 and isinstance(model[1], NORMS) else None
    absolute_weight = np.abs(layer.weight.data)
    if isinstance(layer, nn.Conv2d):
        magnitude = F.conv2d(np.abs(x), absolute_weight, None, layer.stride, layer.padding,
                             layer.dilation).astype(np.float64)
        terms = absolute_weight[0].size
        channel_shape = (1, -1, 1, 1)
    else:
        magnitude = (np.abs(x).astype(np.float64) @ absolute_weight.T.astype(np.float64))
        terms = layer.in_features
        channel_shape = (1, -1)
    bias = 0.0 if layer.bias is None else np.abs(layer.bias.data).reshape(channel_shape)
    if norm is None:
        return np.zeros_like(magnitude)
    scale = 1.0 / np.sqrt(norm.running_var.astype(np.float64) + norm.eps)
    shift = np.zeros(norm.num_features)
    if norm.affine:
        scale = scale * np.abs(norm.weight.data)
        shift = np.abs(norm.bias.data)
    scale, shift = scale.reshape(channel_shape), shift.reshape(channel_shape)
    mean = np.abs(norm.running_mean).reshape(channel_shape)
    return (2 * terms + 8) * UNIT_ROUNDOFF * (scale * (magnitude + bias + mean) + shift)


def _assert_within_folding(model, x) -> None:
    fused, unfused = _outputs(model, x)
    assert fused.dtype == np.float32 and fused.shape == unfused.shape
    error = np.abs(fused.astype(np.float64) - unfused)
    bound = _folding_bound(model, x)
    worst = np.argmax(error - bound)
    assert (error <= bound).all(), (
        f"{int((error > bound).sum())} elements beyond the folding bound; worst "
        f"{error.flat[worst]:.3g} > {bound.flat[worst]:.3g}")
    if len(model) > 1 and not isinstance(model[1], NORMS):
        np.testing.assert_array_equal(fused, unfused)


@pytest.mark.parametrize("norm_kind", [None, "affine", "plain"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[1]}ch-{c[3]}out-k{c[4]}")
def test_conv_blocks_match_unfused_within_folding_rounding(case, activation, norm_kind, rng):
    if activation is None and norm_kind is None:
        pytest.skip("a lone convolution is no block")
    batch, channels, size, out_channels, kernel, stride, padding, bias = case
    conv = nn.Conv2d(channels, out_channels, kernel, stride, padding, bias=bias,
                     random_state=1)
    model = _block(conv, norm_kind, activation, rng)
    x = rng.standard_normal((batch, channels) + size).astype(np.float32)
    _assert_within_folding(model, x)


@pytest.mark.parametrize("norm_kind", [None, "affine", "plain"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("batch, in_features, out_features, bias",
                         [(1, 1, 5, True), (7, 3, 16, False), (7, 37, 16, True),
                          (40, 16, 3, True)])
def test_linear_blocks_match_unfused_within_folding_rounding(
        batch, in_features, out_features, bias, activation, norm_kind, rng):
    if activation is None and norm_kind is None:
        pytest.skip("a lone linear layer is no block")
    linear = nn.Linear(in_features, out_features, bias=bias, random_state=2)
    model = _block(linear, norm_kind, activation, rng)
    x = rng.standard_normal((batch, in_features)).astype(np.float32)
    _assert_within_folding(model, x)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_activation_epilogue_alone_gives_the_unfused_bits(activation, rng):
    for case in CONV_CASES:
        batch, channels, size, out_channels, kernel, stride, padding, bias = case
        conv = nn.Conv2d(channels, out_channels, kernel, stride, padding, bias=bias,
                         random_state=3)
        x = rng.standard_normal((batch, channels) + size).astype(np.float32)
        fused, unfused = _outputs(_block(conv, None, activation, rng), x)
        np.testing.assert_array_equal(fused, unfused)
    x = rng.standard_normal((33, 20)).astype(np.float32)
    fused, unfused = _outputs(_block(nn.Linear(20, 9, random_state=4), None, activation, rng),
                              x)
    np.testing.assert_array_equal(fused, unfused)


def test_functional_fused_relu_is_conv_then_relu(rng):
    x = rng.standard_normal((7, 3, 12, 11)).astype(np.float32)
    weight = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    expected = F.relu(F.conv2d(x, weight, bias, 1, 1))
    np.testing.assert_array_equal(F._conv2d_fused(x, weight, bias, 1, 1, 1, "relu"), expected)
    np.testing.assert_array_equal(F._conv2d_fused(x, weight, None, 2, 0, 1, None),
                                  F.conv2d(x, weight, None, 2, 0))
    with pytest.raises(ValueError, match="activation"):
        F._conv2d_fused(x, weight, bias, 1, 1, 1, "gelu")


def _lenet(rng, n_classes=10):
    model = from_spec(DEFAULT_ARCHITECTURE, (1, 28, 28), n_classes, random_state=0)
    for module in model.modules():
        if isinstance(module, NORMS):
            _randomise_norm(module, rng)
    return model.eval()


def test_lenet_fused_matches_unfused_and_dropout_is_identity(rng, assert_close):
    model = _lenet(rng)
    x = rng.random((9, 1, 28, 28), dtype=np.float32)
    fused, unfused = _outputs(model, x)
    assert_close(fused, unfused, terms=1568)


def test_same_bits_at_one_and_two_threads(rng):
    model = _lenet(rng)
    x = rng.random((64, 1, 28, 28), dtype=np.float32)
    before = bnrs.get_num_threads()
    try:
        bnrs.set_num_threads(1)
        one = model(x)
        bnrs.set_num_threads(2)
        two = model(x)
    finally:
        bnrs.set_num_threads(before)
    np.testing.assert_array_equal(one, two)


def test_environment_variable_turns_fusion_off(rng, monkeypatch):
    model = _lenet(rng)
    x = rng.random((5, 1, 28, 28), dtype=np.float32)
    model.fuse = False
    unfused = model(x)
    model.fuse = True
    assert not np.array_equal(model(x), unfused)   # folding changes the last bits here
    monkeypatch.setenv("BNRS_FUSE", "0")
    np.testing.assert_array_equal(model(x), unfused)


def test_training_mode_is_never_fused(rng):
    def train_step(fuse):
        model = from_spec(DEFAULT_ARCHITECTURE, (1, 28, 28), 10, random_state=0)
        model.fuse = fuse
        x = np.random.default_rng(1).random((8, 1, 28, 28), dtype=np.float32)
        output = model(x)
        model.backward(np.ones_like(output), input_grad=False)
        return output, [p.grad.copy() for p in model.parameters()]
    (fused_out, fused_grads), (plain_out, plain_grads) = train_step(True), train_step(False)
    np.testing.assert_array_equal(fused_out, plain_out)
    for a, b in zip(fused_grads, plain_grads):
        np.testing.assert_array_equal(a, b)


def test_backward_after_fused_forward_is_the_unfused_gradient(rng):
    model = _lenet(rng)
    x = rng.random((3, 1, 28, 28), dtype=np.float32)
    grad = rng.standard_normal((3, 10)).astype(np.float32)
    model.fuse = False
    model(x)
    expected = model.backward(grad)
    model.zero_grad()
    model.fuse = True
    model(x)
    np.testing.assert_array_equal(model.backward(grad), expected)


def test_a_norm_in_training_or_without_running_stats_is_not_folded(rng):
    conv = nn.Conv2d(3, 4, 3, random_state=5)
    model = nn.Sequential(conv, nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    x = rng.standard_normal((6, 3, 7, 7)).astype(np.float32)
    fused, unfused = _outputs(model, x)
    np.testing.assert_array_equal(fused, unfused)   # batch statistics: conv alone, unfused norm
    model = nn.Sequential(nn.Conv2d(3, 4, 3, random_state=5), nn.BatchNorm2d(4), nn.ReLU())
    model.eval()
    model[1].train()
    fused = model(x)
    model.fuse = False
    model[1].running_mean[:] = 0.0   # undo the running update of the fused call
    model[1].running_var[:] = 1.0
    model[1].num_batches_tracked[...] = 0
    np.testing.assert_array_equal(fused, model(x))


def test_linear_with_leading_axes_and_a_norm_runs_unfused(rng):
    model = nn.Sequential(nn.Linear(6, 4, random_state=6), nn.BatchNorm1d(5), nn.ReLU()).eval()
    _randomise_norm(model[1], rng)
    x = rng.standard_normal((3, 5, 6)).astype(np.float32)   # BatchNorm1d's channels: axis 1
    fused, unfused = _outputs(model, x)
    np.testing.assert_array_equal(fused, unfused)


# --------------------------------------------------------------------------- staleness


def _conv_bn_relu(rng):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, random_state=7), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5, random_state=8),
                          nn.BatchNorm1d(5), nn.Tanh())
    for norm in (model[1], model[5]):
        _randomise_norm(norm, rng)
    return model.eval()


def _assert_fresh(model, x, assert_close):
    """The fused output is that of the current parameters, not of older ones."""
    fused, unfused = _outputs(model, x)
    assert_close(fused, unfused, terms=288)


@pytest.mark.parametrize("change", [
    "load_state_dict", "optimizer_step", "in_place_weight", "in_place_running_var",
    "in_place_gamma", "assigned_data", "eps", "pickle"])
def test_folded_weights_never_go_stale(change, rng, assert_close):
    model = _conv_bn_relu(rng)
    x = rng.standard_normal((4, 3, 6, 6)).astype(np.float32)
    before = model(x)   # fills the fusion cache
    if change == "load_state_dict":
        other = _conv_bn_relu(np.random.default_rng(99))
        for module in other.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.data *= -1.5
        model.load_state_dict(other.state_dict())
    elif change == "optimizer_step":
        model.train()
        optimizer = optim.SGD(model.parameters(), lr=0.5)
        output = model(x)
        model.backward(np.ones_like(output))
        optimizer.step()
        model.eval()
    elif change == "in_place_weight":
        model[0].weight.data[0, 0, 1, 1] += 3.0
    elif change == "in_place_running_var":
        model[1].running_var[2] *= 9.0
        model[5].running_mean[:] += 1.0
    elif change == "in_place_gamma":
        model[1].weight.data[:] *= -2.0
    elif change == "assigned_data":
        model[4].weight.data = model[4].weight.data * 0.5
    elif change == "eps":
        model[1].eps = 5.0
    elif change == "pickle":
        model = pickle.loads(pickle.dumps(model))
        model[0].bias.data[:] += 1.0
    after = model(x)
    assert not np.allclose(after, before), "the change should move the output"
    _assert_fresh(model, x, assert_close)


def test_pickled_fused_model_predicts_the_same_bits(rng):
    model = _lenet(rng)
    x = rng.random((4, 1, 28, 28), dtype=np.float32)
    expected = model(x)
    copy = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(copy(x), expected)
    assert copy.fuse


def test_sequential_fuse_argument_and_slices():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), fuse=False)
    assert model.fuse is False and model[:1].fuse is False
    assert nn.Sequential(nn.Linear(3, 4)).fuse is True


# --------------------------------------------------------------------------- estimator


def test_predict_proba_fused_matches_unfused_on_digits(monkeypatch):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).reshape(-1, 8, 8).astype(np.float32)
    model = CNNClassifier(max_epochs=3, random_state=0).fit(X[:600], y[:600])
    fused = model.predict_proba(X[600:])
    monkeypatch.setenv("BNRS_FUSE", "0")
    unfused = model.predict_proba(X[600:])
    assert not np.array_equal(fused, unfused)   # the fused path did run
    np.testing.assert_allclose(fused, unfused, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(fused.argmax(axis=1), unfused.argmax(axis=1))


def test_backward_ignores_an_older_fused_forward(rng):
    """After a fused evaluation forward, a training forward through the children (as
    bnrs.diagnostics runs them) is what the backward differentiates."""
    model = _lenet(rng)
    model(rng.random((3, 1, 28, 28), dtype=np.float32))
    model.train()
    x = rng.random((5, 1, 28, 28), dtype=np.float32)
    output = x
    for child in model:
        output = child(output)
    grad = model.backward(np.ones_like(output))
    assert grad.shape == x.shape
