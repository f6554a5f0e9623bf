"""Tests of bnrs.nn: layers and whole networks against a float64 NumPy reference.

The reference below is written independently of bnrs (plain NumPy, float64): each op
returns its output and a closure giving the input gradient and the parameter gradients.
"""

import copy
import pickle

import bnrs
import numpy as np
import pytest
import reference as ref
from bnrs import nn, optim

# --------------------------------------------------------------------------- reference


def _windows(size_h, size_w, kernel, stride, dilation, out_h, out_w):
    """Yield (i, j, rows, cols) slices of the padded input seen by kernel tap (i, j)."""
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (out_h - 1) + 1,
                         stride[0])
            cols = slice(j * dilation[1], j * dilation[1] + stride[1] * (out_w - 1) + 1,
                         stride[1])
            yield i, j, rows, cols


def _out_size(size, kernel, stride, padding, dilation=1):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def ref_conv2d(x, w, b, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    n, _c, h, wd = x.shape
    kh, kw = w.shape[2:]
    ph, pw = padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh = _out_size(h, kh, stride[0], ph, dilation[0])
    ow = _out_size(wd, kw, stride[1], pw, dilation[1])
    taps = list(_windows(h, wd, (kh, kw), stride, dilation, oh, ow))
    y = np.zeros((n, w.shape[0], oh, ow))
    for i, j, rows, cols in taps:
        y += np.einsum("nchw,oc->nohw", xp[:, :, rows, cols], w[:, :, i, j])
    if b is not None:
        y += b[None, :, None, None]

    def backward(g):
        gxp, gw = np.zeros_like(xp), np.zeros_like(w)
        for i, j, rows, cols in taps:
            gw[:, :, i, j] = np.einsum("nohw,nchw->oc", g, xp[:, :, rows, cols])
            gxp[:, :, rows, cols] += np.einsum("nohw,oc->nchw", g, w[:, :, i, j])
        grads = [gw] + ([g.sum((0, 2, 3))] if b is not None else [])
        return gxp[:, :, ph:ph + h, pw:pw + wd], grads

    return y, backward


def ref_linear(x, w, b):
    y = x @ w.T + (0 if b is None else b)

    def backward(g):
        return g @ w, [g.T @ x] + ([g.sum(0)] if b is not None else [])

    return y, backward


def ref_batch_norm(x, gamma, beta, running_mean, running_var, training, momentum=0.1,
                   eps=1e-5):
    """Returns y, backward and the updated running statistics (training)."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    count = x.size // x.shape[1]
    if training:
        mean, var = x.mean(axes), x.var(axes)
        new_mean = (1 - momentum) * running_mean + momentum * mean
        new_var = (1 - momentum) * running_var + momentum * var * count / (count - 1)
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    invstd = 1 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    y = xhat * gamma.reshape(shape) + beta.reshape(shape)

    def backward(g):
        gbeta, ggamma = g.sum(axes), (g * xhat).sum(axes)
        scale = (gamma * invstd).reshape(shape)
        if training:
            gx = scale / count * (count * g - gbeta.reshape(shape)
                                  - xhat * ggamma.reshape(shape))
        else:
            gx = g * scale
        return gx, [ggamma, gbeta]

    return y, backward, new_mean, new_var


def ref_max_pool2d(x, kernel, stride, padding=0):
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
                constant_values=-np.inf)
    oh, ow = _out_size(h, kernel, stride, padding), _out_size(w, kernel, stride, padding)
    y = np.empty((n, c, oh, ow))
    where = np.empty((n, c, oh, ow), dtype=np.int64)
    for r in range(oh):
        for s in range(ow):
            window = xp[:, :, r * stride:r * stride + kernel, s * stride:s * stride + kernel]
            flat = window.reshape(n, c, -1)
            where[:, :, r, s] = flat.argmax(-1)  # the first maximum
            y[:, :, r, s] = flat.max(-1)

    def backward(g):
        gxp = np.zeros_like(xp)
        for r in range(oh):
            for s in range(ow):
                di, dj = np.divmod(where[:, :, r, s], kernel)
                ni, ci = np.indices((n, c))
                np.add.at(gxp, (ni, ci, r * stride + di, s * stride + dj), g[:, :, r, s])
        return gxp[:, :, padding:padding + h, padding:padding + w], []

    return y, backward


def ref_avg_pool2d(x, kernel, stride, padding=0, count_include_pad=True):
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    inside = np.pad(np.ones((h, w)), padding)
    oh, ow = _out_size(h, kernel, stride, padding), _out_size(w, kernel, stride, padding)
    y = np.empty((n, c, oh, ow))
    divisor = np.empty((oh, ow))
    for r in range(oh):
        for s in range(ow):
            rows, cols = slice(r * stride, r * stride + kernel), slice(s * stride,
                                                                     s * stride + kernel)
            divisor[r, s] = kernel * kernel if count_include_pad else inside[rows, cols].sum()
            y[:, :, r, s] = xp[:, :, rows, cols].sum((2, 3)) / divisor[r, s]

    def backward(g):
        gxp = np.zeros_like(xp)
        for r in range(oh):
            for s in range(ow):
                gxp[:, :, r * stride:r * stride + kernel, s * stride:s * stride + kernel] += (
                    g[:, :, r, s, None, None] / divisor[r, s])
        return gxp[:, :, padding:padding + h, padding:padding + w], []

    return y, backward


def ref_elementwise(x, kind, slope=0.01):
    if kind == "relu":
        return np.maximum(x, 0), lambda g: (g * (x > 0), [])
    if kind == "leaky_relu":
        return np.where(x > 0, x, slope * x), lambda g: (np.where(x > 0, g, slope * g), [])
    if kind == "sigmoid":
        y = 1 / (1 + np.exp(-x))
        return y, lambda g: (g * y * (1 - y), [])
    y = np.tanh(x)
    return y, lambda g: (g * (1 - y * y), [])


def ref_dropout(x, p, seed, per_channel=False):
    """Inverted dropout with the documented mask (``ref.dropout_mask``, the reference's own
    Philox) of the same seed."""
    group = x.shape[2] * x.shape[3] if per_channel else 1
    keep = ref.dropout_mask(x.size // group, p, seed)
    scale = np.repeat(keep, group).reshape(x.shape) / (1 - p)
    return x * scale, lambda g: (g * scale, [])


def ref_cross_entropy(logits, target):
    shifted = logits - logits.max(1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    rows = np.arange(len(target))
    grad = np.exp(log_prob)
    grad[rows, target] -= 1
    return -log_prob[rows, target].mean(), grad / len(target)


def first_dropout_seed(random_state):
    """The seed a Dropout built with an int ``random_state`` uses in its first forward."""
    return int(np.random.default_rng(random_state).integers(0, 2**64, dtype=np.uint64))


# --------------------------------------------------------------------------- helpers


def assert_close(actual, expected, rtol=2e-4, atol=2e-5, what=""):
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol,
                               atol=atol * scale, err_msg=what)


def data(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def f64(param):
    return None if param is None else param.data.astype(np.float64)


def check_layer(layer, x, reference, grad_seed=1):
    """Forward, input gradient and parameter gradients of ``layer`` vs ``reference``."""
    y = layer(x)
    y_ref, backward = reference(x.astype(np.float64))
    assert y.dtype == np.float32 and y.shape == y_ref.shape
    assert_close(y, y_ref, what="forward")
    g = data(*y.shape, seed=grad_seed)
    grad_x = layer.backward(g)
    grad_x_ref, grads_ref = backward(g.astype(np.float64))
    assert_close(grad_x, grad_x_ref, what="grad_input")
    params = list(layer.parameters())
    assert len(params) == len(grads_ref)
    for param, grad_ref in zip(params, grads_ref):
        assert param.grad.dtype == np.float32
        assert_close(param.grad, grad_ref, what="param grad")


# --------------------------------------------------------------------------- single layers


@pytest.mark.parametrize("stride,padding,dilation,bias", [
    (1, 0, 1, True), (1, 1, 1, True), (2, 1, 1, False), ((1, 2), (2, 0), (2, 1), True)])
def test_conv2d_matches_reference(stride, padding, dilation, bias):
    layer = nn.Conv2d(3, 4, (3, 2), stride, padding, dilation, bias=bias, random_state=0)
    pair = nn.layers.int_pair
    check_layer(layer, data(2, 3, 7, 6), lambda x: ref_conv2d(
        x, f64(layer.weight), f64(layer.bias), pair(stride, "s", 1), pair(padding, "p", 0),
        pair(dilation, "d", 1)))


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7)])
def test_linear_matches_reference(shape):
    layer = nn.Linear(7, 4, random_state=0)
    x = data(*shape)

    def reference(x64):
        y, backward = ref_linear(x64.reshape(-1, 7), f64(layer.weight), f64(layer.bias))

        def back(g):
            gx, grads = backward(g.reshape(-1, 4))
            return gx.reshape(shape), grads

        return y.reshape(shape[:-1] + (4,)), back

    check_layer(layer, x, reference)


def test_linear_without_bias():
    layer = nn.Linear(5, 3, bias=False, random_state=0)
    assert layer.bias is None
    check_layer(layer, data(4, 5), lambda x: ref_linear(x, f64(layer.weight), None))


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 0)])
def test_max_pool2d_matches_reference(kernel, stride, padding):
    check_layer(nn.MaxPool2d(kernel, stride, padding), data(2, 3, 7, 6),
                lambda x: ref_max_pool2d(x, kernel, stride, padding))


def test_max_pool2d_stride_defaults_to_kernel():
    assert nn.MaxPool2d(3).stride == (3, 3)
    assert nn.AvgPool2d((2, 3)).stride == (2, 3)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1)])
def test_avg_pool2d_matches_reference(kernel, stride, padding, count_include_pad):
    check_layer(nn.AvgPool2d(kernel, stride, padding, count_include_pad), data(2, 3, 7, 6),
                lambda x: ref_avg_pool2d(x, kernel, stride, padding, count_include_pad))


def test_pool_padding_over_half_the_kernel_is_rejected():
    with pytest.raises(ValueError, match="padding"):
        nn.MaxPool2d(2, padding=2)


@pytest.mark.parametrize("layer,kind", [
    (nn.ReLU(), "relu"), (nn.LeakyReLU(), "leaky_relu"), (nn.Sigmoid(), "sigmoid"),
    (nn.Tanh(), "tanh")])
def test_activations_match_reference(layer, kind):
    check_layer(layer, data(3, 4, 5), lambda x: ref_elementwise(x, kind))


def test_leaky_relu_slope():
    layer = nn.LeakyReLU(negative_slope=0.2)
    check_layer(layer, data(3, 4), lambda x: ref_elementwise(x, "leaky_relu", 0.2))


def test_flatten_round_trip():
    x = data(2, 3, 4, 5)
    layer = nn.Flatten()
    y = layer(x)
    assert y.shape == (2, 60) and np.shares_memory(y, x)
    assert layer.backward(y).shape == x.shape
    assert nn.Flatten(1, 2)(x).shape == (2, 12, 5)


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5)])
def test_batchnorm1d_training_matches_reference(shape):
    layer = nn.BatchNorm1d(4)
    layer.weight.data[...] = data(4, seed=3)
    layer.bias.data[...] = data(4, seed=4)
    check_layer(layer, data(*shape), lambda x: ref_batch_norm(
        x, f64(layer.weight), f64(layer.bias), np.zeros(4), np.ones(4), True)[:2])


def test_batchnorm2d_train_then_eval_match_reference():
    layer = nn.BatchNorm2d(3, momentum=0.3, eps=1e-3)
    layer.weight.data[...] = [0.5, 1.5, -1.0]
    layer.bias.data[...] = [0.1, 0.0, -0.2]
    x = data(4, 3, 5, 5) * 2 + 1
    gamma, beta = f64(layer.weight), f64(layer.bias)
    _, _, mean, var = ref_batch_norm(x.astype(np.float64), gamma, beta, np.zeros(3),
                                     np.ones(3), True, 0.3, 1e-3)
    check_layer(layer, x, lambda x64: ref_batch_norm(x64, gamma, beta, np.zeros(3),
                                                     np.ones(3), True, 0.3, 1e-3)[:2])
    assert_close(layer.running_mean, mean)
    assert_close(layer.running_var, var)
    assert int(layer.num_batches_tracked) == 1
    layer.zero_grad()
    layer.eval()
    x2 = data(2, 3, 5, 5, seed=9)
    check_layer(layer, x2, lambda x64: ref_batch_norm(x64, gamma, beta, mean, var, False,
                                                      eps=1e-3)[:2])
    assert int(layer.num_batches_tracked) == 1


def test_batchnorm_affine_false_has_no_parameters():
    layer = nn.BatchNorm2d(3, affine=False)
    assert list(layer.parameters()) == [] and layer.weight is None

    def reference(x):
        y, backward, _, _ = ref_batch_norm(x, np.ones(3), np.zeros(3), np.zeros(3),
                                           np.ones(3), True)
        return y, lambda g: (backward(g)[0], [])

    check_layer(layer, data(2, 3, 4, 4), reference)


def test_batchnorm_cumulative_average_when_momentum_is_none():
    layer = nn.BatchNorm1d(3, momentum=None)
    batches = [data(5, 3, seed=s) + s for s in range(3)]
    for batch in batches:
        layer(batch)
    assert_close(layer.running_mean, np.mean([b.mean(0) for b in batches], axis=0))
    assert_close(layer.running_var, np.mean([b.var(0, ddof=1) for b in batches], axis=0))
    assert int(layer.num_batches_tracked) == 3


def test_batchnorm_without_running_stats_always_uses_batch_stats():
    layer = nn.BatchNorm2d(2, track_running_stats=False)
    assert layer.running_mean is None and layer.running_var is None
    assert layer.num_batches_tracked is None
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = data(3, 2, 4, 4) * 3 + 2
    layer.eval()
    axes = (0, 2, 3)
    expected = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + 1e-5)
    assert_close(layer(x), expected)


@pytest.mark.parametrize("layer,shape,expected", [
    (nn.BatchNorm2d(4), (2, 4, 3), r"\(N, 4, H, W\)"),
    (nn.BatchNorm2d(4), (2, 3, 5, 5), r"\(N, 4, H, W\)"),
    (nn.BatchNorm1d(4), (2, 4, 3, 3), r"\(N, 4\) or \(N, 4, L\)"),
    (nn.BatchNorm1d(4), (2, 5), r"\(N, 4\)"),
])
def test_batchnorm_rejects_wrong_input_shapes(layer, shape, expected):
    with pytest.raises(ValueError, match=expected):
        layer(np.zeros(shape, np.float32))


def test_batchnorm_rejects_a_single_value_per_channel_without_counting_it():
    layer = nn.BatchNorm1d(3)
    with pytest.raises(ValueError):
        layer(np.ones((1, 3), np.float32))
    assert int(layer.num_batches_tracked) == 0


def test_conv2d_and_linear_reject_wrong_channels():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        nn.Conv2d(3, 4, 3)(np.zeros((1, 2, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(\*, 6\)"):
        nn.Linear(6, 2)(np.zeros((3, 5), np.float32))


# --------------------------------------------------------------------------- dropout


def test_dropout_training_uses_a_seeded_mask_and_eval_is_identity():
    x = data(40, 50) + 3.0
    layer = nn.Dropout(0.3, random_state=11)
    y = layer(x)
    y_ref, backward = ref_dropout(x.astype(np.float64), 0.3, first_dropout_seed(11))
    assert_close(y, y_ref)
    zero_fraction = float(np.mean(y == 0))
    assert 0.25 < zero_fraction < 0.35
    kept = y != 0
    assert_close(y[kept], x[kept] / 0.7)
    g = data(40, 50, seed=5)
    assert_close(layer.backward(g), backward(g.astype(np.float64))[0])
    assert not np.array_equal(layer(x) == 0, kept)  # a new mask each forward
    layer.eval()
    assert np.array_equal(layer(x), x)
    assert np.array_equal(layer.backward(g), g)


def test_dropout2d_zeroes_whole_channels():
    x = data(8, 16, 3, 3) + 5.0
    layer = nn.Dropout2d(0.5, rng=3)
    y = layer(x)
    y_ref, backward = ref_dropout(x.astype(np.float64), 0.5, first_dropout_seed(3), True)
    assert_close(y, y_ref)
    zero_maps = (y == 0).all(axis=(2, 3))
    assert np.array_equal(zero_maps, (y == 0).any(axis=(2, 3)))
    assert 0.3 < zero_maps.mean() < 0.7
    g = data(*x.shape, seed=2)
    assert_close(layer.backward(g), backward(g.astype(np.float64))[0])
    with pytest.raises(ValueError, match="4-D"):
        layer(np.zeros((2, 3), np.float32))


def test_dropout_edge_probabilities():
    x = data(4, 5)
    assert np.array_equal(nn.Dropout(0.0)(x), x)
    full = nn.Dropout(1.0)
    assert not full(x).any()
    assert not full.backward(x).any()
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError):
            nn.Dropout(p)


def test_dropout_given_a_generator_keeps_its_own():
    generator = np.random.default_rng(0)
    a = nn.Dropout(0.5, random_state=generator)
    b = nn.Dropout(0.5, random_state=generator)
    x = np.ones((10, 10), np.float32)
    assert not np.array_equal(a(x), b(x))


# --------------------------------------------------------------------------- whole network


def small_network(seed=0):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, random_state=seed),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.3, random_state=seed + 5),
        nn.Flatten(),
        nn.Linear(36, 6, random_state=seed + 1),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Dropout(0.5, random_state=seed + 7),
        nn.Linear(6, 3, random_state=seed + 2),
    )


def reference_network(model, x, target, training, dropout_seeds=(None, None),
                      params=None):
    """Float64 loss, logits, input grad, param grads and new running stats of small_network."""
    p = [f64(q) for q in model.parameters()] if params is None else params
    running = [b.astype(np.float64) for b in model.buffers() if b.dtype == np.float32]
    backs, new_running = [], []

    def run(op):
        out, back = op[0], op[1]
        backs.append(back)
        return out

    h = run(ref_conv2d(x, p[0], p[1], (1, 1), (1, 1)))
    y, back, rm, rv = ref_batch_norm(h, p[2], p[3], running[0], running[1], training)
    h = run((y, back))
    new_running += [rm, rv]
    h = run(ref_elementwise(h, "relu"))
    h = run(ref_max_pool2d(h, 2, 2))
    if training:
        h = run(ref_dropout(h, 0.3, dropout_seeds[0]))
    shape = h.shape
    h = h.reshape(len(h), -1)
    backs.append(lambda g: (g.reshape(shape), []))
    h = run(ref_linear(h, p[4], p[5]))
    y, back, rm, rv = ref_batch_norm(h, p[6], p[7], running[2], running[3], training)
    h = run((y, back))
    new_running += [rm, rv]
    h = run(ref_elementwise(h, "relu"))
    if training:
        h = run(ref_dropout(h, 0.5, dropout_seeds[1]))
    logits = run(ref_linear(h, p[8], p[9]))
    loss, grad = ref_cross_entropy(logits, target)
    grads = []
    for back in reversed(backs):
        grad, param_grads = back(grad)
        grads = param_grads + grads
    return loss, logits, grad, grads, new_running


@pytest.fixture
def batch():
    x = data(5, 2, 6, 6, seed=42)
    target = np.array([0, 2, 1, 1, 0])
    return x, target


def test_network_matches_reference_in_training(batch):
    x, target = batch
    model = small_network()
    expected = reference_network(model, x.astype(np.float64), target, True,
                                 (first_dropout_seed(5), first_dropout_seed(7)))
    crit = nn.CrossEntropyLoss()
    logits = model(x)
    loss = crit(logits, target)
    assert isinstance(loss, float)
    grad_x = model.backward(crit.backward())
    exp_loss, exp_logits, exp_grad_x, exp_grads, exp_running = expected
    assert loss == pytest.approx(exp_loss, rel=1e-5)
    assert_close(logits, exp_logits, what="logits")
    assert_close(grad_x, exp_grad_x, what="grad_input")
    names = [name for name, _ in model.named_parameters()]
    for name, param, grad in zip(names, model.parameters(), exp_grads):
        assert_close(param.grad, grad, what=name)
    running = [b for b in model.buffers() if b.dtype == np.float32]
    for actual, wanted in zip(running, exp_running):
        assert_close(actual, wanted, what="running stats")
    assert [int(b) for b in model.buffers() if b.dtype == np.int64] == [1, 1]


def test_network_matches_reference_in_eval(batch):
    x, target = batch
    model = small_network()
    model(x)  # one training forward moves the running statistics
    model.eval()
    exp_loss, exp_logits, exp_grad_x, exp_grads, _ = reference_network(
        model, x.astype(np.float64), target, False)
    crit = nn.CrossEntropyLoss()
    logits = model(x)
    assert np.array_equal(model(x), logits)  # deterministic
    assert crit(logits, target) == pytest.approx(exp_loss, rel=1e-5)
    assert_close(logits, exp_logits)
    model.zero_grad()
    assert_close(model.backward(crit.backward()), exp_grad_x)
    for param, grad in zip(model.parameters(), exp_grads):
        assert_close(param.grad, grad)


def _loss_and_grads(model, x, target):
    crit = nn.CrossEntropyLoss()
    model.zero_grad()
    loss = crit(model(x), target)
    model.backward(crit.backward(), input_grad=False)
    return loss, [p.grad.copy() for p in model.parameters()]


def tiny_network():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, random_state=0), nn.BatchNorm2d(3),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(12, 3, random_state=1))


def test_reference_gradients_agree_with_finite_differences():
    # The float64 reference is itself checked, so that matching it means being right.
    model = tiny_network()
    x = data(4, 2, 4, 4, seed=7).astype(np.float64)
    target = np.array([0, 1, 2, 1])

    def ref_loss(params):
        return _ref_tiny(params, x, target)[0]

    params = [f64(p) for p in model.parameters()]
    grads = _ref_tiny(params, x, target)[1]
    rng = np.random.default_rng(0)
    for index, param in enumerate(params):
        for flat in rng.choice(param.size, size=min(4, param.size), replace=False):
            step = np.zeros(param.size)
            step[flat] = 1e-6
            plus = [q + step.reshape(q.shape) if i == index else q for i, q in enumerate(params)]
            minus = [q - step.reshape(q.shape) if i == index else q
                     for i, q in enumerate(params)]
            numeric = (ref_loss(plus) - ref_loss(minus)) / 2e-6
            assert numeric == pytest.approx(grads[index].flat[flat], rel=1e-4, abs=1e-8)


def _ref_tiny(params, x, target):
    w0, b0, gamma, beta, w1, b1 = params
    h, back_conv = ref_conv2d(x, w0, b0, (1, 1), (1, 1))
    h, back_bn, _, _ = ref_batch_norm(h, gamma, beta, np.zeros(3), np.ones(3), True)
    h, back_relu = ref_elementwise(h, "relu")
    h, back_pool = ref_max_pool2d(h, 2, 2)
    shape = h.shape
    logits, back_fc = ref_linear(h.reshape(len(h), -1), w1, b1)
    loss, g = ref_cross_entropy(logits, target)
    g, (gw1, gb1) = back_fc(g)
    g, _ = back_pool(g.reshape(shape))
    g, _ = back_relu(g)
    g, (ggamma, gbeta) = back_bn(g)
    _, (gw0, gb0) = back_conv(g)
    return loss, [gw0, gb0, ggamma, gbeta, gw1, gb1]


def _central_difference(loss_fn, array, flat, step):
    original = array.flat[flat]
    array.flat[flat] = original + step
    plus = loss_fn()
    array.flat[flat] = original - step
    minus = loss_fn()
    array.flat[flat] = original
    return (plus - minus) / (2 * step)


def test_network_gradients_match_float64_reference_and_finite_differences():
    model = tiny_network()
    x = data(4, 2, 4, 4, seed=7)
    target = np.array([0, 1, 2, 1])
    loss, grads = _loss_and_grads(model, x, target)
    params64 = [f64(p) for p in model.parameters()]
    ref_loss, ref_grads = _ref_tiny(params64, x.astype(np.float64), target)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad)
    # bnrs's float32 loss, as a function of each parameter entry, is the reference's:
    # their central differences agree (ReLU and max-pool kinks included).
    crit = nn.CrossEntropyLoss()
    rng = np.random.default_rng(1)
    step = 1e-2
    for param, param64 in zip(model.parameters(), params64):
        for flat in rng.choice(param.data.size, size=min(3, param.data.size), replace=False):
            numeric = _central_difference(lambda: crit(model(x), target), param.data, flat,
                                          step)
            expected = _central_difference(
                lambda: _ref_tiny(params64, x.astype(np.float64), target)[0], param64, flat,
                step)
            assert numeric == pytest.approx(expected, abs=1e-3)


def test_smooth_network_gradients_match_finite_differences():
    # Without kinks (tanh, average pooling, sigmoid) bnrs's analytic gradients can be
    # checked against central differences of bnrs's own float32 loss.
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, random_state=0), nn.BatchNorm2d(3),
                          nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(12, 5, random_state=1), nn.BatchNorm1d(5), nn.Sigmoid(),
                          nn.Linear(5, 3, random_state=2))
    x = data(4, 2, 4, 4, seed=7)
    target = np.array([0, 1, 2, 1])
    crit = nn.CrossEntropyLoss()
    crit(model(x), target)
    grad_x = model.backward(crit.backward())
    rng = np.random.default_rng(2)
    step = 1e-2
    for array, grad in [(p.data, p.grad) for p in model.parameters()] + [(x, grad_x)]:
        for flat in rng.choice(array.size, size=min(4, array.size), replace=False):
            numeric = _central_difference(lambda: crit(model(x), target), array, flat, step)
            assert numeric == pytest.approx(float(grad.flat[flat]), rel=2e-2, abs=5e-4)


def test_gradients_accumulate_until_zero_grad(batch):
    x, target = batch
    model = tiny_network()
    x = x[:, :, :4, :4]
    _, grads = _loss_and_grads(model, x, target)
    crit = nn.CrossEntropyLoss()
    crit(model(x), target)
    model.backward(crit.backward())
    for param, grad in zip(model.parameters(), grads):
        assert_close(param.grad, 2 * grad)
    model.zero_grad()
    assert all(not p.grad.any() for p in model.parameters())


def test_backward_without_input_grad_skips_the_first_layer(batch):
    x, target = batch
    x = x[:, :, :4, :4]
    with_input, without = tiny_network(), tiny_network()
    crit = nn.CrossEntropyLoss()
    crit(with_input(x), target)
    grad_x = with_input.backward(crit.backward())
    assert grad_x.shape == x.shape
    crit(without(x), target)
    assert without.backward(crit.backward(), input_grad=False) is None
    for a, b in zip(with_input.parameters(), without.parameters()):
        assert np.array_equal(a.grad, b.grad)
    assert all(m._ctx is None for m in without.modules())


def test_backward_without_input_grad_stops_at_the_first_parameter():
    model = nn.Sequential(nn.Dropout(0.5, random_state=0), nn.Linear(4, 2, random_state=0))
    model(data(3, 4))
    assert model.backward(np.ones((3, 2), np.float32), input_grad=False) is None
    assert model[1].bias.grad.tolist() == [3.0, 3.0]
    assert model[0]._ctx is None


def test_backward_needs_a_forward():
    layer = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.zeros((1, 2), np.float32))
    layer(data(1, 3))
    layer.backward(np.zeros((1, 2), np.float32))
    with pytest.raises(RuntimeError):
        layer.backward(np.zeros((1, 2), np.float32))


# --------------------------------------------------------------------------- modes


def test_train_and_eval_switch_all_children():
    model = small_network()
    assert model.training and all(m.training for m in model.modules())
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    assert model.train() is model
    assert all(m.training for m in model.modules())
    model.train(False)
    assert not model[1].training


def test_eval_mode_uses_running_statistics_and_no_dropout(batch):
    x, _ = batch
    model = small_network()
    model(x)
    before = [b.copy() for b in model.buffers()]
    model.eval()
    first, second = model(x), model(x)
    assert np.array_equal(first, second)
    for old, new in zip(before, model.buffers()):
        assert np.array_equal(old, new)
    model.train()
    assert not np.array_equal(model(x), model(x))  # dropout and batch stats
    assert int(model[1].num_batches_tracked) == 3


# --------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("make,fan_in", [
    (lambda **kw: nn.Conv2d(4, 8, 3, **kw), 36),
    (lambda **kw: nn.Linear(50, 30, **kw), 50)])
def test_default_initialisation_is_pytorchs(make, fan_in):
    layer = make(random_state=0)
    bound = 1 / np.sqrt(fan_in)
    for param in (layer.weight, layer.bias):
        assert param.data.dtype == np.float32 and param.data.flags.c_contiguous
        assert np.abs(param.data).max() <= bound
    assert np.abs(layer.weight.data).max() > 0.9 * bound
    assert np.array_equal(make(random_state=0).weight.data, layer.weight.data)
    assert np.array_equal(make(rng=0).weight.data, layer.weight.data)
    assert np.array_equal(make(rng=np.random.default_rng(0)).weight.data, layer.weight.data)
    assert not np.array_equal(make(random_state=1).weight.data, layer.weight.data)
    with pytest.raises(TypeError):
        make(rng=0, random_state=0)


def test_batchnorm_initialisation():
    layer = nn.BatchNorm2d(5)
    assert layer.weight.data.tolist() == [1.0] * 5 and layer.bias.data.tolist() == [0.0] * 5
    assert layer.running_mean.tolist() == [0.0] * 5
    assert layer.running_var.tolist() == [1.0] * 5
    assert layer.num_batches_tracked.dtype == np.int64 and layer.num_batches_tracked.shape == ()


def test_every_layer_accepts_a_random_state():
    x = np.random.default_rng(3).standard_normal((4, 3, 4, 4)).astype(np.float32)
    for make in (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Flatten,
                 lambda **kw: nn.MaxPool2d(2, **kw), lambda **kw: nn.AvgPool2d(2, **kw),
                 lambda **kw: nn.BatchNorm2d(3, **kw)):
        # A layer without randomness computes the same whatever seed it was given.
        expected = make()(x)
        for layer in (make(random_state=0), make(rng=np.random.default_rng(0))):
            np.testing.assert_array_equal(layer(x), expected)
    # Dropout2d draws its masks from it: the same seed, the same masks; another, others.
    first = nn.Dropout2d(random_state=0)(x)
    np.testing.assert_array_equal(nn.Dropout2d(random_state=0)(x), first)
    np.testing.assert_array_equal(nn.Dropout2d(rng=0)(x), first)
    assert not np.array_equal(nn.Dropout2d(random_state=1)(x), first)
    with pytest.raises(TypeError, match="rng or random_state"):
        nn.Dropout2d(rng=0, random_state=0)


# --------------------------------------------------------------------------- state dicts


def test_state_dict_keys_match_pytorch():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(2, 3))
    state = model.state_dict()
    # list(torch.nn.Sequential(Conv2d, BatchNorm2d, ReLU, MaxPool2d, Flatten, Linear)
    #      .state_dict())
    assert list(state) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                           "1.running_var", "1.num_batches_tracked", "5.weight", "5.bias"]
    assert state["1.num_batches_tracked"].dtype == np.int64
    assert state["1.num_batches_tracked"].shape == ()
    assert all(v.dtype == np.float32 for k, v in state.items() if "num_batches" not in k)
    assert [name for name, _ in model.named_parameters()] == [
        "0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias"]


def test_state_dict_is_a_snapshot_and_loads_into_a_fresh_model(batch):
    x, _target = batch
    model = small_network(seed=0)
    model(x)
    state = model.state_dict()
    model[0].weight.data += 1
    assert not np.array_equal(state["0.weight"], model[0].weight.data)
    model.load_state_dict(state)
    other = small_network(seed=10)
    weight_array = other[0].weight.data
    other.load_state_dict({k: v.astype(np.float64) if v.dtype == np.float32 else v
                           for k, v in state.items()})
    assert other[0].weight.data is weight_array  # copied in place (optimizers keep refs)
    assert other[0].weight.data.dtype == np.float32
    assert int(other[1].num_batches_tracked) == 1
    model.eval()
    other.eval()
    assert np.array_equal(model(x), other(x))


def test_load_state_dict_errors_name_the_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    state = model.state_dict()
    original = model[0].weight.data.copy()
    missing = {k: v for k, v in state.items() if k != "1.running_var"}
    with pytest.raises(ValueError, match="missing keys: 1.running_var"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match="unexpected keys: 2.weight"):
        model.load_state_dict({**state, "2.weight": np.zeros(3)})
    bad = {**state, "0.weight": np.zeros((4, 2)) + 5}
    with pytest.raises(ValueError, match=r"0.weight: expected shape \(4, 3\), got \(4, 2\)"):
        model.load_state_dict(bad)
    assert np.array_equal(model[0].weight.data, original)
    with pytest.raises(ValueError, match=r"0.weight: expected shape"):
        model.load_state_dict(bad, strict=False)
    result = model.load_state_dict({**missing, "extra": np.zeros(1)}, strict=False)
    assert result.missing_keys == ["1.running_var"] and result.unexpected_keys == ["extra"]
    with pytest.raises(TypeError):
        model.load_state_dict({**state, "0.bias": np.array(["a"] * 4)})


# --------------------------------------------------------------------------- pickle, seeds


def _train(model, x, target, steps):
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(crit(model(x), target))
        model.backward(crit.backward(), input_grad=False)
        opt.step()
    return losses


def test_pickle_round_trip_gives_identical_predictions(batch):
    x, target = batch
    model = small_network()
    _train(model, x, target, 2)
    model(x)  # leaves saved forward state, which must not be pickled
    blob = pickle.dumps(model)
    assert len(blob) == len(pickle.dumps(copy.deepcopy(model)))
    model.clear_saved()
    assert len(blob) == len(pickle.dumps(model))
    clone = pickle.loads(blob)
    model.eval()
    clone.eval()
    assert np.array_equal(model(x), clone(x))
    model.train()
    clone.train()
    # The dropout generators were pickled too: training continues identically.
    assert _train(model, x, target, 2) == _train(clone, x, target, 2)
    assert all(p.grad.dtype == np.float32 for p in clone.parameters())


def test_same_seed_trains_bit_identically(batch):
    x, target = batch
    runs = []
    for _ in range(2):
        model = nn.from_spec("c4-bn-relu-mp2-d0.3-fc8-bn-relu-d0.5", (2, 6, 6), 3,
                             random_state=123)
        losses = _train(model, x, target, 3)
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for key, value in runs[0][1].items():
        assert np.array_equal(value, runs[1][1][key]), key
    other = nn.from_spec("c4-bn-relu-mp2-d0.3-fc8-bn-relu-d0.5", (2, 6, 6), 3,
                         random_state=124)
    assert not np.array_equal(other[0].weight.data, runs[0][1]["0.weight"])


# --------------------------------------------------------------------------- misc


def test_sequential_container_protocol():
    model = small_network()
    assert len(model) == 11
    assert isinstance(model[0], nn.Conv2d)
    assert isinstance(model[-1], nn.Linear)
    head = model[:4]
    assert isinstance(head, nn.Sequential) and len(head) == 4
    assert head(data(2, 2, 6, 6)).shape == (2, 4, 3, 3)
    assert list(model[6:7].state_dict()) == ["6.weight", "6.bias"]  # names kept, as PyTorch
    relu = nn.ReLU()
    with pytest.raises(ValueError, match="already in the network"):
        nn.Sequential(nn.Linear(2, 2), relu, nn.Linear(2, 2), relu)
    assert model.output_shape((2, 6, 6)) == (3,)
    assert "Conv2d(2, 4, kernel_size=(3, 3)" in repr(model)


def test_cross_entropy_loss():
    crit = nn.CrossEntropyLoss()
    logits = data(4, 5)
    target = np.array([0, 4, 2, 2])
    expected_loss, expected_grad = ref_cross_entropy(logits.astype(np.float64), target)
    assert crit(logits, target) == pytest.approx(expected_loss, rel=1e-5)
    assert_close(crit.backward(), expected_grad)
    crit(logits, target)
    assert_close(crit.backward(0.5), expected_grad * 0.5)
    with pytest.raises(ValueError, match="target"):
        crit(logits, target[:3])


def test_training_is_bit_identical_at_any_thread_count():
    x = data(32, 3, 12, 12, seed=3)
    target = np.arange(32) % 4
    before = bnrs.get_num_threads()
    runs = []
    try:
        for threads in (1, 3):
            bnrs.set_num_threads(threads)
            model = nn.from_spec("c8-bn-relu-mp2-sd0.1-c8-bn-relu-d0.3-fc16-bn-relu-d0.5",
                                 (3, 12, 12), 4, random_state=5)
            runs.append((_train(model, x, target, 2), model.state_dict()))
    finally:
        bnrs.set_num_threads(before)
    assert runs[0][0] == runs[1][0]
    for key, value in runs[0][1].items():
        assert np.array_equal(value, runs[1][1][key]), key


def test_parameter_data_stays_float32_and_writeable():
    param = nn.Parameter(np.arange(6).reshape(2, 3))
    assert param.data.dtype == np.float32 and param.grad.shape == (2, 3)
    shared = np.ones((2, 3), np.float32)
    param.data = shared
    assert param.data is shared
    param.data = np.ones((3, 3), np.float64).T[:2]
    assert param.data.dtype == np.float32 and param.data.flags.c_contiguous
    assert param.grad.shape == (2, 3)
    param.data = np.zeros(4)
    assert param.grad.shape == (4,)
    with pytest.raises(TypeError):
        nn.Parameter(np.array(["x"]))


def test_random_state_kinds():
    legacy = nn.Linear(3, 2, random_state=np.random.RandomState(0)).weight.data
    assert np.array_equal(legacy, nn.Linear(3, 2, rng=np.random.RandomState(0)).weight.data)
    with pytest.raises(TypeError):
        nn.Linear(3, 2, random_state="seed")
    with pytest.raises(ValueError):
        nn.Linear(3, 2, random_state=-1)
    with pytest.raises(TypeError, match="boolean"):
        nn.Linear(3, 2).train("yes")
