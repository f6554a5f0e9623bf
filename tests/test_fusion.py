"""Fusion in Sequential: conv/linear → batch norm → activation blocks in evaluation, batch
norm → activation → pool → dropout blocks in training.

A convolution's fused and unfused outputs differ by float32 rounding only: folding the
batch norm into the weights rounds ``w·γ/√(σ²+ε)`` to float32 before the convolution,
whose sums then round differently from the unfused ones followed by the normalisation.
The tolerance below is that rounding bounded term by term, not a loosened comparison. A
linear layer's batch norm is not folded but applied to the layer's output by the kernel,
in the normalisation's own arithmetic, and an activation without a batch norm changes
nothing in the arithmetic: both must give the unfused bits.

Training blocks do each unfused kernel's arithmetic in the unfused order (statistics,
normalisation, activation, pool, dropout mask; backward likewise), so outputs, gradients
and running statistics must be the unfused bits; against the float64 NumPy reference they
agree within float32 rounding.
"""

from __future__ import annotations

import pickle

import bnrs
import numpy as np
import pytest
import reference as ref
from bnrs import CNNClassifier, _core, executor, nn, optim
from bnrs import functional as F
from bnrs.nn import fusion
from bnrs.nn.fusion import TrainBlock
from bnrs.nn.spec import DEFAULT_ARCHITECTURE, from_spec
from bnrs.training import num_threads

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
    """Per output element, a bound on |fused - unfused| for a one-block convolution
    ``model``.

    With s = γ/√(σ²+ε) and A = Σ|w||x| over the K = C_in·kH·kW terms of an output, each
    sum errs by at most K·u·A (u = 2⁻²⁴), the folded weights by u each, and the
    normalisation and the folded bias by a few u of |s|(|z| + |b| + |μ|) + |β|:
    (2K + 8)·u·(|s|(A + |b| + |μ|) + |β|). Every activation here is 1-Lipschitz, so the
    bound holds after it too.
    """
    layer = model[0]
    norm = model[1] if len(model) > 1 and isinstance(model[1], NORMS) else None
    absolute_weight = np.abs(layer.weight.data)
    magnitude = F.conv2d(np.abs(x), absolute_weight, None, layer.stride, layer.padding,
                         layer.dilation).astype(np.float64)
    terms = absolute_weight[0].size
    channel_shape = (1, -1, 1, 1)
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


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("norm_kind", [None, "affine", "plain"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("batch, in_features, out_features, bias",
                         [(1, 1, 5, True), (7, 3, 16, False), (7, 37, 16, True),
                          (40, 16, 3, True), (700, 300, 33, True)])
def test_linear_blocks_give_the_unfused_bits(
        batch, in_features, out_features, bias, activation, norm_kind, threads, rng):
    # The last shape is blocks of rows on both threads, each normalised as its product
    # ends; the unfused batch norm normalises the whole output after it.
    if activation is None and norm_kind is None:
        pytest.skip("a lone linear layer is no block")
    linear = nn.Linear(in_features, out_features, bias=bias, random_state=2)
    model = _block(linear, norm_kind, activation, rng)
    x = (3.0 * rng.standard_normal((batch, in_features))).astype(np.float32)
    with num_threads(threads):
        steps = fusion.fusion_plan(list(model), {})
        assert len(steps) == 1 and isinstance(steps[0], fusion.FusedBlock)
        fused, unfused = _outputs(model, x)
    assert fused.dtype == np.float32 and fused.shape == unfused.shape
    np.testing.assert_array_equal(fused, unfused)


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


def test_functional_fused_linear_norm_is_linear_then_batch_norm(rng):
    x = rng.standard_normal((9, 12)).astype(np.float32)
    weight = rng.standard_normal((5, 12)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    gamma, beta, mean = (rng.standard_normal(5).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.2, 2.0, 5).astype(np.float32)
    expected = F.batch_norm(F.linear(x, weight, bias), mean, var, gamma, beta,
                            training=False, eps=1e-3)
    got = F._linear_fused(x, weight, bias, None, 0.0, (gamma, beta, mean, var, 1e-3))
    np.testing.assert_array_equal(got, expected)
    for norm, name in [((gamma[:4], beta, mean, var, 1e-3), "norm weight"),
                       ((gamma, beta, mean, var[:4], 1e-3), "running_var"),
                       ((None, None, mean[:3], var, 1e-3), "running_mean"),
                       ((None, None, mean, var, -1.0), "eps")]:
        with pytest.raises(ValueError, match=name):
            F._linear_fused(x, weight, bias, "relu", 0.0, norm)


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


def test_training_step_fused_gives_the_unfused_bits(rng):
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
@pytest.mark.parametrize("one_call", [True, False], ids=["executor", "python"])
def test_folded_weights_never_go_stale(change, one_call, rng, assert_close, monkeypatch):
    # The executor folds at every call; the Python path keeps its fold while the sources
    # hold the same bits.
    monkeypatch.setenv(executor.STEP_ENV, "1" if one_call else "0")
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


# Compared as bytes; in Rust (float32, contiguous: whole chunks of 64 and a partial last
# one); and as unsigned integers (strided).
@pytest.mark.parametrize("size, strided", [(10, False), (40_000, False), (40_003, False),
                                           (40_003, True)])
def test_fold_cache_compares_bits(size, strided):
    def _same(x, y):
        if strided:   # every other value of an array twice as long
            x, y = (None if v is None else np.repeat(v, 2)[::2] for v in (x, y))
        return fusion._same(x, y)

    a = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    a[0], a[-1] = 0.0, np.nan
    assert _same(a, a.copy())
    signed = a.copy()
    signed[0] = -0.0                       # equal in value, another sign
    other_nan = a.copy()
    other_nan.view(np.uint32)[-1] ^= 1     # another NaN payload
    moved = a.copy()
    moved[size // 2] = np.nextafter(moved[size // 2], np.float32(2.0))
    for changed in (signed, other_nan, moved):
        assert not _same(a, changed)
    assert not _same(a, a.astype(np.float64))
    assert not _same(a, a[:-1])
    assert _same(None, None) and not _same(a, None)


def test_same_bits_compares_contiguous_float32_arrays_bit_for_bit():
    a = np.arange(130, dtype=np.float32)
    assert bnrs._core.same_bits(a, a.copy())
    assert not bnrs._core.same_bits(a, a[:-1].copy())     # another length
    b = a.copy()
    b[129] = np.float32(129.0) + np.float32(2.0 ** -16)    # in the last, partial chunk
    assert not bnrs._core.same_bits(a, b)
    assert bnrs._core.same_bits(a.reshape(13, 10), a)      # lengths, not shapes
    with pytest.raises(ValueError, match="b: expected a C-contiguous array"):
        bnrs._core.same_bits(a[::2].copy(), a[::2])


def test_folded_weights_follow_the_sign_of_a_zero(rng, monkeypatch):
    # -0.0 == +0.0 in value, but the folded weights of that channel change sign. The
    # Python path's fold cache (the executor keeps no fold).
    monkeypatch.setenv(executor.STEP_ENV, "0")
    model = _conv_bn_relu(rng)
    x = rng.standard_normal((4, 3, 6, 6)).astype(np.float32)
    model[1].weight.data[3] = 0.0
    model(x)   # fills the fusion cache
    model[1].weight.data[3] = -0.0
    model(x)
    block = next(iter(model._fusion_blocks.values()))
    fresh = fusion.FusedBlock(block.layer, block.norm, block.activation, block.modules)
    for cached, expected in zip(block.folded(), fresh.folded()):
        np.testing.assert_array_equal(cached.view(np.uint32), expected.view(np.uint32))
    assert np.signbit(block.folded()[0][3]).any()


@pytest.mark.parametrize("one_call", [False, True])
def test_a_slope_changed_to_minus_zero_is_a_new_block(one_call, rng, monkeypatch):
    # 0.0 == -0.0, but a leaky ReLU of slope -0.0 gives negative inputs +0.0, not -0.0:
    # the block kept for slope 0.0 must not serve.
    monkeypatch.setenv(executor.STEP_ENV, "1" if one_call else "0")
    model = nn.Sequential(nn.Conv2d(2, 3, 3, random_state=0), nn.LeakyReLU(0.0)).eval()
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    for slope in (0.0, -0.0, 0.0):
        model[1].negative_slope = slope
        fused, unfused = _outputs(model, x)
        np.testing.assert_array_equal(fused.view(np.uint32), unfused.view(np.uint32))
        zeros = fused[fused == 0]
        # A negative input times the slope: -0.0 for slope 0.0, +0.0 for -0.0.
        assert zeros.size and (np.signbit(zeros) != np.signbit(slope)).all()


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


# --------------------------------------------------------------------------- training

#: (input shape, out channels): odd H and W (a pool remainder), batch 1 and 3, channel
#: counts that are not multiples of 8 or 16, and (N, C) / (N, C, L) for BatchNorm1d.
TRAIN_SHAPES = [
    ((3, 2, 7, 9), 5),
    ((1, 3, 5, 6), 17),
    ((3, 1, 6, 5), 3),
    ((3, 7), 9),
    ((1, 4, 7), 3),
]
TRAIN_STAGES = [
    ("relu", "max", "dropout"),
    ("leaky_relu", "avg", "dropout2d"),
    ("sigmoid", "max", None),
    ("tanh", None, "dropout"),
    (None, "avg", None),
    ("relu", None, None),
]
_POOL_LAYERS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
_DROPOUT_LAYERS = {"dropout": nn.Dropout, "dropout2d": nn.Dropout2d}


def _train_model(shape, width, stages, seed=3, **norm_args):
    """A training-mode Sequential: a conv (4-D) or linear layer, then batch norm and the
    stages that apply to the shape."""
    activation, pool, dropout = stages
    if len(shape) == 4:
        modules = [nn.Conv2d(shape[1], width, 3, padding=1, random_state=seed),
                   nn.BatchNorm2d(width, **norm_args)]
    else:
        modules = [nn.Linear(shape[-1], width, random_state=seed),
                   nn.BatchNorm1d(width if len(shape) == 2 else shape[1], **norm_args)]
        if len(shape) == 3:   # a linear layer on (N, C, L) maps L; the norm sees C
            modules[1] = nn.BatchNorm1d(shape[1], **norm_args)
    if activation is not None:
        modules.append(ACTIVATIONS[activation]())
    if pool is not None and len(shape) == 4:
        modules.append(_POOL_LAYERS[pool](2))
    if dropout is not None and (dropout == "dropout" or len(shape) == 4):
        modules.append(_DROPOUT_LAYERS[dropout](0.3, random_state=seed + 1))
    model = nn.Sequential(*modules).train()
    norm = model[1]
    if norm.affine:   # γ of both signs, β not zero
        norm.weight.data[:] = np.linspace(-1.5, 2.0, norm.num_features)
        norm.bias.data[:] = np.linspace(0.5, -0.5, norm.num_features)
    return model


def _train_steps(model, x, grads, fuse):
    """Forward and backward of each gradient in ``grads``: per step the output, input
    gradient, parameter gradients and buffers."""
    model.fuse = fuse
    results = []
    for grad in grads:
        model.zero_grad()
        output = model(x)
        grad_input = model.backward(grad.reshape(output.shape))
        results.append([output, grad_input] + [p.grad.copy() for p in model.parameters()]
                       + [np.array(b, copy=True) for b in model.buffers()])
    return results


def _assert_same_bits(actual, expected, what):
    assert len(actual) == len(expected)
    for step, (a_step, e_step) in enumerate(zip(actual, expected)):
        for index, (a, e) in enumerate(zip(a_step, e_step)):
            assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: step {step} item {index}"
            np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8),
                                          np.atleast_1d(e).view(np.uint8),
                                          err_msg=f"{what}: step {step} item {index}")


def _inputs(model, shape, rng, steps=2):
    x = rng.standard_normal(shape).astype(np.float32)
    out_size = model(x).size
    model.clear_saved()
    grads = [rng.standard_normal(out_size).astype(np.float32) for _ in range(steps)]
    return x, grads


@pytest.mark.parametrize("stages", TRAIN_STAGES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("shape, width", TRAIN_SHAPES, ids=lambda v: str(v))
def test_training_blocks_give_the_unfused_bits(shape, width, stages, rng):
    x, grads = _inputs(_train_model(shape, width, stages), shape, rng)
    fused_model = _train_model(shape, width, stages)
    fused = _train_steps(fused_model, x, grads, True)
    has_stages = len(fused_model) > 2   # not (N, C) with only a pool asked for
    assert has_stages == any(isinstance(step, TrainBlock) for step in
                             nn.fusion.fusion_plan(list(fused_model), {}, training=True))
    unfused = _train_steps(_train_model(shape, width, stages), x, grads, False)
    _assert_same_bits(fused, unfused, f"{shape} {stages}")


@pytest.mark.parametrize("norm_args", [{"momentum": None}, {"track_running_stats": False},
                                       {"affine": False}])
def test_training_blocks_keep_the_batch_norm_options(norm_args, rng):
    shape, width, stages = (3, 2, 7, 9), 5, ("relu", "max", "dropout")
    x, grads = _inputs(_train_model(shape, width, stages, **norm_args), shape, rng, steps=3)
    fused = _train_steps(_train_model(shape, width, stages, **norm_args), x, grads, True)
    unfused = _train_steps(_train_model(shape, width, stages, **norm_args), x, grads, False)
    _assert_same_bits(fused, unfused, str(norm_args))


def test_lenet_training_epoch_fused_gives_the_unfused_bits():
    def train(fuse):
        model = from_spec(DEFAULT_ARCHITECTURE, (1, 28, 28), 10, random_state=0)
        model.fuse = fuse
        optimizer = optim.Adam(model.parameters(), lr=1e-3)
        data = np.random.default_rng(1)
        for _ in range(3):
            x = data.random((7, 1, 28, 28), dtype=np.float32)
            target = data.integers(0, 10, 7)
            optimizer.zero_grad()
            logits = model(x)
            model.backward(F.cross_entropy_backward(logits, target), input_grad=False)
            optimizer.step()
        return [np.array(v, copy=True) for v in model.state_dict().values()]
    for fused, unfused in zip(train(True), train(False)):
        np.testing.assert_array_equal(fused, unfused)


@pytest.fixture
def restore_threads_and_simd():
    threads, level = _core.get_num_threads(), _core.simd_backend()
    yield
    _core.set_num_threads(threads)
    _core.set_simd(level)


#: Max pool after (leaky) ReLU on planes of 4 to 7 windows a row, of 8 or more (a row's
#: last step moved back), and too narrow for the register-blocked plane kernel.
@pytest.mark.parametrize("stages", [("relu", "max", "dropout"), ("leaky_relu", "max", None)],
                         ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("shape, width", [((3, 2, 7, 9), 5), ((2, 3, 10, 19), 4),
                                          ((1, 2, 5, 6), 3)], ids=lambda v: str(v))
def test_training_blocks_give_the_unfused_bits_at_each_simd_level(
        shape, width, stages, rng, restore_threads_and_simd):
    x, grads = _inputs(_train_model(shape, width, stages), shape, rng)
    for level in _core.simd_levels():
        _core.set_simd(level)
        fused = _train_steps(_train_model(shape, width, stages), x, grads, True)
        unfused = _train_steps(_train_model(shape, width, stages), x, grads, False)
        _assert_same_bits(fused, unfused, f"{level} {shape} {stages}")


def test_training_blocks_same_bits_at_any_thread_count_and_simd_level(
        rng, restore_threads_and_simd):
    shape, width, stages = (3, 5, 13, 11), 17, ("relu", "max", "dropout")
    x, grads = _inputs(_train_model(shape, width, stages), shape, rng)
    results = {}
    for level in _core.simd_levels():
        _core.set_simd(level)
        for threads in (1, 2):
            _core.set_num_threads(threads)
            results[level, threads] = _train_steps(_train_model(shape, width, stages), x,
                                                   grads, True)
    (first_key, first), *rest = results.items()
    for key, result in rest:
        # Only the convolution's GEMM may round differently between levels (its blocking
        # follows the register width); the block's bits follow from its input.
        if key[0] != first_key[0]:
            continue
        _assert_same_bits(result, first, f"{key} against {first_key}")
    levels = sorted({key[0] for key in results})
    assert len(results) == 2 * len(levels)


@pytest.mark.parametrize("shape, pool", [((8, 17, 33, 31), "max"), ((5, 3, 9, 7), "avg"),
                                         ((4001, 10), None)])
def test_training_block_kernel_same_bits_at_each_simd_level(shape, pool, rng,
                                                            restore_threads_and_simd):
    # Many planes (split between threads), and (N, C) of several row chunks.
    x = rng.standard_normal(shape).astype(np.float32)
    channels = shape[1]
    weight = rng.standard_normal(channels).astype(np.float32)
    bias = rng.random(channels, np.float32)
    grad_shape = shape if pool is None else shape[:2] + (shape[2] // 2, shape[3] // 2)
    grad = rng.standard_normal(grad_shape).astype(np.float32)
    results = []
    for level in _core.simd_levels():
        _core.set_simd(level)
        for threads in (1, 2):
            _core.set_num_threads(threads)
            out, mean, invstd = F._bn_block_forward(x, weight, bias, None, None, 0.1, 1e-5,
                                                    "relu", 0.0, pool, 0.3, 99, False)
            grads = F._bn_block_backward(grad, x, weight, bias, mean, invstd, "relu", 0.0,
                                         pool, 0.3, 99, False)
            results.append([out, mean, invstd, *grads])
    for result in results[1:]:
        for a, e in zip(result, results[0]):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("pool, channel_wise", [("max", False), ("avg", True),
                                                (None, False)])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (1, 3, 5, 4)])
def test_training_block_matches_the_numpy_reference(shape, pool, channel_wise, rng,
                                                    assert_close):
    x = rng.standard_normal(shape).astype(np.float32)
    channels = shape[1]
    weight = rng.normal(0.0, 1.5, channels).astype(np.float32)
    bias = rng.normal(0.0, 0.5, channels).astype(np.float32)
    running_mean, running_var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    p, seed = 0.3, 12345
    output, mean, invstd = F._bn_block_forward(
        x, weight, bias, running_mean, running_var, 0.1, 1e-5, "relu", 0.0, pool, p, seed,
        channel_wise)
    z, ref_mean, ref_invstd, ref_rm, ref_rv = ref.batch_norm(
        x, weight, bias, np.zeros(channels), np.ones(channels), training=True)
    a = ref.relu(z)
    if pool == "max":
        pooled, indices = ref.max_pool2d(a, 2)
    elif pool == "avg":
        pooled = ref.avg_pool2d(a, 2)
    else:
        pooled = a
    if channel_wise:
        keep = ref.dropout2d_keep(ref.dropout_mask(shape[0] * channels, p, seed), pooled.shape)
    else:
        keep = ref.dropout_mask(pooled.size, p, seed).reshape(pooled.shape)
    count = x.size // channels
    assert_close(output, ref.dropout(pooled, keep, p), terms=count, name="output")
    assert_close(mean, ref_mean, terms=count, dtype=None, name="mean")
    assert_close(invstd, ref_invstd, terms=count, dtype=None, name="invstd")
    assert_close(running_mean, ref_rm, terms=count, dtype=None, name="running_mean")
    assert_close(running_var, ref_rv, terms=count, dtype=None, name="running_var")

    grad = rng.standard_normal(output.shape).astype(np.float32)
    grad_input, grad_weight, grad_bias = F._bn_block_backward(
        grad, x, weight, bias, mean, invstd, "relu", 0.0, pool, p, seed, channel_wise)
    g = ref.dropout(grad, keep, p)
    if pool == "max":
        g = ref.max_pool2d_backward(g, indices, shape)
    elif pool == "avg":
        g = ref.avg_pool2d_backward(g, shape, 2)
    g = ref.relu_backward(g, z)
    ref_gx, ref_gw, ref_gb = ref.batch_norm_backward(g, x, weight, ref_mean, ref_invstd)
    assert_close(grad_input, ref_gx, terms=count, name="grad_input")
    assert_close(grad_weight, ref_gw, terms=count, name="grad_weight")
    assert_close(grad_bias, ref_gb, terms=count, name="grad_bias")


def test_training_block_argument_errors_name_the_argument(rng):
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="pool"):
        F._bn_block_forward(x, None, None, None, None, 0.1, 1e-5, pool="min")
    with pytest.raises(ValueError, match="dropout_p"):
        F._bn_block_forward(x, None, None, None, None, 0.1, 1e-5, dropout_p=1.0)
    with pytest.raises(ValueError, match="weight"):
        F._bn_block_forward(x, np.ones(4, np.float32), None, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="input"):
        F._bn_block_forward(x[:, :, :1], None, None, None, None, 0.1, 1e-5, pool="max")
    _output, mean, invstd = F._bn_block_forward(x, None, None, None, None, 0.1, 1e-5, pool="max")
    with pytest.raises(ValueError, match="grad_output"):
        F._bn_block_backward(x, x, None, None, mean, invstd, pool="max")


@pytest.mark.parametrize("fuse", [True, False])
def test_training_block_falls_back_for_inputs_it_does_not_take(fuse, rng):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), fuse=fuse).train()
    with pytest.raises(ValueError, match="kernel_size"):   # the pool's own error
        model(rng.standard_normal((2, 3, 1, 5)).astype(np.float32))
    assert int(model[0].num_batches_tracked) == 1   # the norm ran, as unfused
    with pytest.raises(ValueError, match="BatchNorm2d"):   # the norm's own error
        model(rng.standard_normal((2, 4, 6, 6)).astype(np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(rng.standard_normal((1, 3, 1, 1)).astype(np.float32))
    assert int(model[0].num_batches_tracked) == 1


def test_environment_variable_turns_training_fusion_off(rng, monkeypatch):
    model = _train_model((3, 2, 7, 9), 5, ("relu", "max", "dropout"))
    x = rng.standard_normal((3, 2, 7, 9)).astype(np.float32)
    model(x)
    assert len(model._train_blocks) == 1
    monkeypatch.setenv("BNRS_FUSE", "0")
    model(x)
    assert model._train_blocks == {}


def test_children_called_alone_after_a_fused_training_forward(rng):
    model = _train_model((3, 2, 7, 9), 5, ("relu", "max", None))
    x = rng.standard_normal((3, 2, 7, 9)).astype(np.float32)
    output = model(x)
    with pytest.raises(RuntimeError, match="no saved forward state"):
        model[1].backward(np.ones((3, 5, 7, 9), np.float32))
    model[1](model[0](x))   # a child ran since: the block's state is not used
    with pytest.raises(RuntimeError, match="no saved forward state"):
        model.backward(np.ones_like(output))


#: Convolutions for the fused pool: every forward path (small-K and images sharing a GEMM
#: at the scalar level, pointwise, row tiles, and the direct kernels with AVX2 and
#: AVX-512, 17 channels by the channels-in-lanes one), odd output sizes, batch 1 and 3,
#: channels not a multiple of 16.
POOLED_CONV_CASES = [
    (3, 1, (11, 9), 6, 5, 1, 2, True),
    (1, 3, (11, 10), 7, 3, 2, 0, False),
    (3, 6, (12, 13), 17, 5, 1, 0, True),
    (3, 16, (7, 7), 10, 3, 1, 1, True),
    (1, 16, (6, 5), 5, 1, 1, 0, True),
    (1, 64, (41, 39), 9, 3, 1, 1, False),
]


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_fused_pool_gives_the_bits_of_conv_then_pool_at_each_level_and_thread_count(
        pool, rng, restore_threads_and_simd):
    pool_function = F.max_pool2d if pool == "max" else F.avg_pool2d
    for case in POOLED_CONV_CASES:
        batch, channels, size, out_channels, kernel, stride, padding, bias = case
        x = rng.standard_normal((batch, channels) + size).astype(np.float32)
        kernel = (kernel, kernel)
        weight = rng.standard_normal((out_channels, channels) + kernel).astype(np.float32)
        b = rng.standard_normal(out_channels).astype(np.float32) if bias else None
        fma_results = {}
        for level in _core.simd_levels():
            _core.set_simd(level)
            for threads in (1, 2):
                _core.set_num_threads(threads)
                for activation in (None, "relu", "tanh"):
                    expected = pool_function(F._conv2d_fused(
                        x, weight, b, stride, padding, 1, activation), 2)
                    fused = F._conv2d_fused(x, weight, b, stride, padding, 1, activation,
                                            0.0, pool)
                    assert fused.shape == expected.shape
                    np.testing.assert_array_equal(fused, expected,
                                                  err_msg=f"{case} {level} {threads}")
                    if stride == 1 and kernel != (1, 1) and level != "scalar":
                        # The direct kernels: the same sums at every FMA level.
                        first = fma_results.setdefault(activation, fused)
                        np.testing.assert_array_equal(fused.view(np.uint32),
                                                      first.view(np.uint32),
                                                      err_msg=f"{case} {level} {threads}")


#: First layers (at most 32 unfolded rows, stride 1), which AVX2 and AVX-512 run by the
#: direct kernel summing in the small-K product's order (the scalar level by that
#: product): LeNet's first
#: conv, batch 1, one and three channels, no padding, rectangular padding, 5x5, dilation,
#: odd sizes, channel counts off the register tiles.
FIRST_LAYER_CASES = [
    ((1, 1, 28, 28), (16, 1, 3, 3), 1, 1, True),
    ((3, 1, 9, 7), (5, 1, 3, 3), 0, 1, False),
    ((2, 3, 11, 13), (7, 3, 3, 3), (1, 2), 1, True),
    ((1, 1, 10, 9), (9, 1, 5, 5), 2, 1, True),
    ((2, 2, 12, 12), (3, 2, 3, 3), (2, 1), 2, True),
]


def test_first_layers_same_bits_at_each_fma_level_and_thread_count(
        rng, assert_close, restore_threads_and_simd):
    for case in FIRST_LAYER_CASES:
        input_shape, weight_shape, padding, dilation, has_bias = case
        x = rng.standard_normal(input_shape).astype(np.float32)
        weight = rng.standard_normal(weight_shape).astype(np.float32)
        bias = rng.standard_normal(weight_shape[0]).astype(np.float32) if has_bias else None
        expected = ref.conv2d(x, weight, bias, 1, padding, dilation)
        expected_max, _ = ref.max_pool2d(np.maximum(expected, 0.0), 2)
        expected_avg = ref.avg_pool2d(np.tanh(expected), 2)
        terms = int(np.prod(weight_shape[1:]))
        results = {}
        for level in _core.simd_levels():
            _core.set_simd(level)
            for threads in (1, 2):
                _core.set_num_threads(threads)
                outputs = (F.conv2d(x, weight, bias, 1, padding, dilation),
                           F._conv2d_fused(x, weight, bias, 1, padding, dilation, "relu",
                                           0.0, "max"),
                           F._conv2d_fused(x, weight, bias, 1, padding, dilation, "tanh",
                                           0.0, "avg"))
                for output, reference in zip(outputs, (expected, expected_max, expected_avg)):
                    assert_close(output, reference, terms=terms, name=f"{case} {level}")
                results[level, threads] = outputs
        fma_levels = [level for level in _core.simd_levels() if level != "scalar"]
        for (level, threads), outputs in results.items():
            # The scalar level adds its products unfused (within rounding, checked above).
            first = ("scalar", 1) if level == "scalar" else (fma_levels[0], 1)
            for got, want in zip(outputs, results[first]):
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32),
                                              err_msg=f"{case} {level} {threads}")


def _conv_bn_relu_pool(pool_class, rng, **pool_args):
    conv = nn.Conv2d(5, 11, 3, padding=1, random_state=2)
    norm = nn.BatchNorm2d(11)
    _randomise_norm(norm, rng)
    return nn.Sequential(conv, norm, nn.ReLU(), pool_class(2, **pool_args)).eval()


@pytest.mark.parametrize("pool_class", [nn.MaxPool2d, nn.AvgPool2d])
def test_sequential_runs_conv_bn_relu_pool_as_one_block(pool_class, rng):
    model = _conv_bn_relu_pool(pool_class, rng)
    steps = fusion.fusion_plan(list(model.children()), {})
    assert len(steps) == 1 and steps[0].pool is not None
    pool_function = F.max_pool2d if pool_class is nn.MaxPool2d else F.avg_pool2d
    for shape in ((1, 5, 9, 7), (3, 5, 8, 11)):
        x = rng.standard_normal(shape).astype(np.float32)
        weight, bias = steps[0].folded()
        expected = pool_function(F._conv2d_fused(x, weight, bias, 1, 1, 1, "relu"), 2)
        np.testing.assert_array_equal(model(x), expected)


def test_pools_the_fused_kernel_does_not_take_run_as_themselves(rng):
    for pool in (nn.MaxPool2d(2, padding=1), nn.MaxPool2d(3, 2), nn.AvgPool2d(2, 1)):
        model = nn.Sequential(nn.Conv2d(2, 3, 3, random_state=1), nn.ReLU(), pool).eval()
        steps = fusion.fusion_plan(list(model.children()), {})
        assert steps[-1] is pool
    model = _conv_bn_relu_pool(nn.MaxPool2d, rng)
    x = rng.standard_normal((2, 5, 1, 6)).astype(np.float32)   # a 1-row output
    with pytest.raises(ValueError):
        model(x)


#: Two pooled conv blocks in a row: (input shape, channels of the two convs, kernel,
#: padding, stride of the second, pool, activation). LeNet's, odd sizes, channel counts
#: off the vectors (the direct kernels with AVX2 and AVX-512), a strided second conv (the GEMM,
#: through the whole intermediate).
CHAIN_CASES = [
    ((5, 1, 28, 28), (16, 32), 3, 1, 1, nn.MaxPool2d, nn.ReLU),
    ((2, 3, 19, 23), (20, 17), 3, 1, 1, nn.AvgPool2d, nn.Tanh),
    ((3, 2, 13, 12), (6, 9), 3, (1, 0), 1, nn.MaxPool2d, nn.ReLU),
    ((2, 4, 22, 21), (5, 6), 3, 1, 2, nn.MaxPool2d, nn.ReLU),
]


def _chain_model(case, rng):
    shape, (width1, width2), kernel, padding, stride, pool, activation = case
    conv1 = nn.Conv2d(shape[1], width1, kernel, padding=padding, random_state=3)
    conv2 = nn.Conv2d(width1, width2, kernel, stride=stride, padding=padding, random_state=4)
    norm1, norm2 = nn.BatchNorm2d(width1), nn.BatchNorm2d(width2)
    _randomise_norm(norm1, rng)
    _randomise_norm(norm2, rng)
    return nn.Sequential(conv1, norm1, activation(), pool(2),
                         conv2, norm2, activation(), pool(2)).eval()


@pytest.mark.parametrize("case", CHAIN_CASES)
def test_two_pooled_conv_blocks_chain_with_the_bits_of_each_block(
        case, rng, assert_close, restore_threads_and_simd):
    model = _chain_model(case, rng)
    steps = fusion.fusion_plan(list(model.children()), model.__dict__.setdefault(
        "_fusion_blocks", {}))
    chained = fusion.chain_blocks(steps)
    assert len(steps) == 2 and len(chained) == 1
    assert isinstance(chained[0], fusion.FusedChain)
    x = rng.standard_normal(case[0]).astype(np.float32)
    for level in _core.simd_levels():
        _core.set_simd(level)
        for threads in (1, 2):
            _core.set_num_threads(threads)
            expected = fusion.run_block(steps[1], fusion.run_block(steps[0], x))
            np.testing.assert_array_equal(model(x), expected,
                                          err_msg=f"{case} {level} {threads}")
    fused, unfused = _outputs(model, x)
    assert_close(fused, unfused, terms=9 * case[1][0] * 4)


def test_a_chain_whose_blocks_do_not_take_the_input_runs_them_as_blocks(rng):
    model = _chain_model(CHAIN_CASES[0], rng)
    with pytest.raises(ValueError):   # the first conv's channels
        model(rng.standard_normal((2, 3, 28, 28)).astype(np.float32))
    with pytest.raises(ValueError):   # the second pool's input: a 1x1 conv output
        model(rng.standard_normal((2, 1, 3, 3)).astype(np.float32))
    # A second block the fused pool does not take (an output under 2x2 in one axis
    # leaves a 1-row pool, refused as unfused): the same error as unfused.
    model.fuse = False
    with pytest.raises(ValueError):
        model(rng.standard_normal((2, 1, 3, 3)).astype(np.float32))
