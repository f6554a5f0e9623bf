"""Every case of the PyTorch float64 fixtures, against bnrs and against the references.

The fixtures (``tests/fixtures/torch_fixtures.npz``, written by ``make_torch_fixtures.py`` and
described in the README beside it) store inputs, outputs and the gradients of loss = Σ(y · gy) for a random ``gy``.
Each case runs twice: through ``bnrs.functional`` with float32 tolerances, and through the
float64 references in ``reference.py`` with tight ones, which shows that the references the
other tests trust agree with PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import reference as ref
from bnrs import functional as F
from bnrs import nn

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "torch_fixtures.npz"


with np.load(FIXTURES) as _archive:
    DATA = {key: _archive[key] for key in _archive.files}

IMPLEMENTATIONS = ["bnrs", "reference"]
# float64 reference against float64 PyTorch: only summation order differs.
REFERENCE_TOLERANCE = {"rtol": 1e-9, "atol": 1e-10, "dtype": None}


def _cases(selects, depth):
    """Case prefixes (the first ``depth`` dotted parts of the keys ``selects`` accepts)."""
    return sorted({".".join(key.split(".")[:depth]) for key in DATA if selects(key)})


CONV_CASES = _cases(lambda key: key.startswith("conv2d."), 2)
BN_TRAIN_CASES = _cases(lambda key: key.startswith("bn") and key.split(".")[1] == "train", 2)
BN_EVAL_CASES = _cases(lambda key: key.startswith("bn") and key.split(".")[1] == "eval", 2)
MAX_POOL_CASES = _cases(lambda key: key.startswith("pool.max."), 3)
AVG_POOL_CASES = _cases(lambda key: key.startswith("pool.avg."), 3)
GROUP_NORM_CASES = _cases(lambda key: key.startswith("group_norm."), 2)
LAYER_NORM_CASES = _cases(lambda key: key.startswith("layer_norm."), 2)
INSTANCE_NORM_CASES = _cases(lambda key: key.startswith("instance_norm."), 2)
BLOCK_CASES = _cases(lambda key: key.startswith("block."), 2)
SINGLE_CASES = ["linear", "cross_entropy", "dropout", "adam", "meta"]
# Tested in test_lr_scheduler.py.
LR_SCHEDULER_CASES = _cases(lambda key: key.startswith("lr_scheduler."), 2)


def _get(case):
    """A getter for the arrays of one case: ``get("x")`` is ``DATA[case + ".x"]``."""
    return lambda name: DATA[f"{case}.{name}"]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request, assert_close):
    """(name, comparison helper with this implementation's tolerance)."""
    if request.param == "bnrs":
        return "bnrs", assert_close

    def close(actual, expected, *, terms=1, name="result"):
        assert_close(actual, expected, terms=terms, name=name, **REFERENCE_TOLERANCE)

    return "reference", close


def test_every_fixture_key_belongs_to_a_tested_case():
    tested = (CONV_CASES + BN_TRAIN_CASES + BN_EVAL_CASES + MAX_POOL_CASES + AVG_POOL_CASES
              + GROUP_NORM_CASES + LAYER_NORM_CASES + INSTANCE_NORM_CASES + SINGLE_CASES
              + LR_SCHEDULER_CASES + BLOCK_CASES)
    untested = [key for key in DATA if not any(key.startswith(case + ".") for case in tested)]
    assert not untested
    assert len(CONV_CASES) == 9 and len(BN_TRAIN_CASES) == len(BN_EVAL_CASES) == 4
    assert len(MAX_POOL_CASES) == 4 and len(AVG_POOL_CASES) == 5
    assert len(GROUP_NORM_CASES) == 6 and len(LAYER_NORM_CASES) == 4
    assert len(INSTANCE_NORM_CASES) == 3 and len(LR_SCHEDULER_CASES) == 14
    assert len(BLOCK_CASES) == 4
    assert str(DATA["meta.dtype"]) == "float64"


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(implementation, case):
    kind, close = implementation
    get = _get(case)
    x, w, b, gy = get("x"), get("w"), get("b"), get("gy")
    geometry = {"stride": int(get("stride")), "padding": int(get("padding"))}
    if kind == "bnrs":
        y = F.conv2d(x, w, b, **geometry)
        grads = F.conv2d_backward(gy, x, w, **geometry)
    else:
        y = ref.conv2d(x, w, b, **geometry)
        grads = ref.conv2d_backward(gy, x, w, **geometry)
    c_out, c_in, kh, kw = w.shape
    sum_lengths = [c_out * kh * kw, gy[:, 0].size, gy[:, 0].size]
    close(y, get("y"), terms=c_in * kh * kw, name="y")
    for name, grad, terms in zip(["gx", "gw", "gb"], grads, sum_lengths):
        close(grad, get(name), terms=terms, name=name)


@pytest.mark.parametrize("case", BN_TRAIN_CASES)
def test_batch_norm_train(implementation, case):
    kind, close = implementation
    get = _get(case)
    x, gamma, beta, gy = get("x"), get("gamma"), get("beta"), get("gy")
    momentum, eps = float(get("momentum")), float(get("eps"))
    if kind == "bnrs":
        running_mean = get("running_mean0").astype(np.float32)
        running_var = get("running_var0").astype(np.float32)
        y, save_mean, save_invstd = F.native_batch_norm(x, gamma, beta, running_mean,
                                                        running_var, True, momentum, eps)
        grads = F.batch_norm_backward(gy, x, gamma, save_mean, save_invstd, True)
    else:
        y, save_mean, save_invstd, running_mean, running_var = ref.batch_norm(
            x, gamma, beta, get("running_mean0"), get("running_var0"), True, momentum, eps)
        grads = ref.batch_norm_backward(gy, x, gamma, save_mean, save_invstd, True)
    count = x.size // x.shape[1]
    close(y, get("y"), terms=count, name="y")
    close(save_mean, get("batch_mean"), terms=count, name="save_mean")
    close(save_invstd, 1 / np.sqrt(get("batch_var_biased") + eps), terms=count,
          name="save_invstd")
    close(running_mean, get("running_mean1"), terms=count, name="running_mean")
    close(running_var, get("running_var1"), terms=count, name="running_var")
    # The running update used the unbiased variance.
    implied_unbiased = (np.asarray(running_var, np.float64)
                        - (1 - momentum) * get("running_var0")) / momentum
    close(implied_unbiased.astype(np.asarray(running_var).dtype), get("batch_var_unbiased"),
          terms=count, name="unbiased variance")
    for name, grad in zip(["gx", "ggamma", "gbeta"], grads):
        close(grad, get(name), terms=count, name=name)


@pytest.mark.parametrize("case", BN_EVAL_CASES)
def test_batch_norm_eval(implementation, case):
    kind, close = implementation
    get = _get(case)
    x, gamma, beta, gy, eps = get("x"), get("gamma"), get("beta"), get("gy"), float(get("eps"))
    if kind == "bnrs":
        running_mean = get("running_mean").astype(np.float32)
        running_var = get("running_var").astype(np.float32)
        mean_before, var_before = running_mean.copy(), running_var.copy()
        y, save_mean, save_invstd = F.native_batch_norm(x, gamma, beta, running_mean,
                                                        running_var, False, 0.1, eps)
        np.testing.assert_array_equal(running_mean, mean_before)
        np.testing.assert_array_equal(running_var, var_before)
        grads = F.batch_norm_backward(gy, x, gamma, save_mean, save_invstd, False)
    else:
        y, save_mean, save_invstd, running_mean, running_var = ref.batch_norm(
            x, gamma, beta, get("running_mean"), get("running_var"), False, 0.1, eps)
        np.testing.assert_array_equal(running_mean, get("running_mean"))
        grads = ref.batch_norm_backward(gy, x, gamma, save_mean, save_invstd, False)
    count = x.size // x.shape[1]
    close(y, get("y"), name="y")
    for name, grad in zip(["gx", "ggamma", "gbeta"], grads):
        close(grad, get(name), terms=count, name=name)


def _check_norm(close, get, y, mean, rstd, grads, terms, affine=True):
    """Output, statistics and gradients of a group/layer/instance norm case; ``terms`` is
    the number of values each statistic sums."""
    close(y, get("y"), terms=terms, name="y")
    close(mean, get("mean"), terms=terms, name="mean")
    close(rstd, get("rstd"), terms=terms, name="rstd")
    close(grads[0], get("gx"), terms=terms, name="gx")
    if affine:
        parameter_terms = get("x").size // get("gamma").size
        close(grads[1], get("ggamma"), terms=parameter_terms, name="ggamma")
        close(grads[2], get("gbeta"), terms=parameter_terms, name="gbeta")
    else:
        assert grads[1] is None and grads[2] is None


@pytest.mark.parametrize("case", GROUP_NORM_CASES)
def test_group_norm(implementation, case):
    kind, close = implementation
    get = _get(case)
    x, gamma, beta, gy = get("x"), get("gamma"), get("beta"), get("gy")
    groups, eps = int(get("num_groups")), float(get("eps"))
    if kind == "bnrs":
        y, mean, rstd = F.native_group_norm(x, groups, gamma, beta, eps)
        grads = F.group_norm_backward(gy, x, groups, gamma, mean, rstd)
    else:
        y, mean, rstd = ref.group_norm(x, groups, gamma, beta, eps)
        grads = ref.group_norm_backward(gy, x, groups, gamma, mean, rstd)
    _check_norm(close, get, y, mean, rstd, grads, x.size // x.shape[0] // groups)


@pytest.mark.parametrize("case", LAYER_NORM_CASES)
def test_layer_norm(implementation, case):
    kind, close = implementation
    get = _get(case)
    x, gamma, beta, gy = get("x"), get("gamma"), get("beta"), get("gy")
    normalized_shape, eps = tuple(int(d) for d in get("normalized_shape")), float(get("eps"))
    if kind == "bnrs":
        y, mean, rstd = F.native_layer_norm(x, normalized_shape, gamma, beta, eps)
        grads = F.layer_norm_backward(gy, x, normalized_shape, gamma, mean, rstd)
    else:
        y, mean, rstd = ref.layer_norm(x, normalized_shape, gamma, beta, eps)
        grads = ref.layer_norm_backward(gy, x, normalized_shape, gamma, mean, rstd)
    _check_norm(close, get, y, mean, rstd, grads, gamma.size)


@pytest.mark.parametrize("case", INSTANCE_NORM_CASES)
def test_instance_norm(implementation, case):
    kind, close = implementation
    get = _get(case)
    x, gy, eps, affine = get("x"), get("gy"), float(get("eps")), bool(get("affine"))
    gamma, beta = (get("gamma"), get("beta")) if affine else (None, None)
    if kind == "bnrs":
        y, mean, rstd = F.native_instance_norm(x, gamma, beta, eps)
        np.testing.assert_array_equal(F.instance_norm(x, weight=gamma, bias=beta, eps=eps), y)
        grads = F.instance_norm_backward(gy, x, gamma, mean, rstd)
    else:
        y, mean, rstd = ref.instance_norm(x, gamma, beta, eps)
        grads = ref.instance_norm_backward(gy, x, gamma, mean, rstd)
    _check_norm(close, get, y, mean, rstd, grads, x[0, 0].size, affine)


def _pool_geometry(get):
    return {"kernel_size": int(get("kernel")), "stride": int(get("stride")),
            "padding": int(get("padding"))}


@pytest.mark.parametrize("case", MAX_POOL_CASES)
def test_max_pool2d(implementation, case):
    kind, close = implementation
    get = _get(case)
    x, gy, geometry = get("x"), get("gy"), _pool_geometry(get)
    if kind == "bnrs":
        y, indices = F.max_pool2d(x, **geometry, return_indices=True)
        grad_input = F.max_pool2d_backward(gy, indices, x.shape)
    else:
        y, indices = ref.max_pool2d(x, **geometry)
        grad_input = ref.max_pool2d_backward(gy, indices, x.shape)
    close(y, get("y"), name="y")
    np.testing.assert_array_equal(indices, get("indices"))
    close(grad_input, get("gx"), terms=geometry["kernel_size"] ** 2, name="gx")


@pytest.mark.parametrize("case", AVG_POOL_CASES)
def test_avg_pool2d(implementation, case):
    kind, close = implementation
    get = _get(case)
    x, gy, geometry = get("x"), get("gy"), _pool_geometry(get)
    geometry["count_include_pad"] = bool(get("count_include_pad"))
    module = F if kind == "bnrs" else ref
    y = module.avg_pool2d(x, **geometry)
    grad_input = module.avg_pool2d_backward(gy, x.shape, **geometry)
    terms = geometry["kernel_size"] ** 2
    close(y, get("y"), terms=terms, name="y")
    close(grad_input, get("gx"), terms=terms, name="gx")


def test_linear(implementation):
    kind, close = implementation
    get = _get("linear")
    x, w, b, gy = get("x"), get("w"), get("b"), get("gy")
    if kind == "bnrs":
        y, grads = F.linear(x, w, b), F.linear_backward(gy, x, w)
    else:
        y, grads = ref.linear(x, w, b), ref.linear_backward(gy, x, w)
    close(y, get("y"), terms=x.shape[1], name="y")
    for name, grad, terms in zip(["gx", "gw", "gb"], grads, [w.shape[0], x.shape[0],
                                                             x.shape[0]]):
        close(grad, get(name), terms=terms, name=name)


def test_cross_entropy(implementation):
    kind, close = implementation
    get = _get("cross_entropy")
    logits, target = get("logits"), get("target")
    assert np.ptp(logits.max(axis=1)) > 500  # the +1000 row is there
    module = F if kind == "bnrs" else ref
    log_probs = module.log_softmax(logits)
    loss = module.cross_entropy(logits, target)
    grad = module.cross_entropy_backward(logits, target)
    assert np.isfinite(log_probs).all() and np.isfinite(loss) and np.isfinite(grad).all()
    classes = logits.shape[1]
    close(log_probs, get("log_softmax"), terms=classes, name="log_softmax")
    close(loss, get("loss"), terms=logits.size, name="loss")
    close(grad, get("glogits"), terms=classes, name="glogits")


def test_dropout(implementation):
    """Inverted-dropout scaling with PyTorch's own mask (recovered as y != 0).

    bnrs's generator cannot reproduce PyTorch's draw, so bnrs is checked on its own mask,
    and against PyTorch's values wherever both kept an element.
    """
    kind, close = implementation
    get = _get("dropout")
    x, gy, p = get("x"), get("gy"), float(get("p"))
    torch_keep = get("y") != 0
    np.testing.assert_array_equal(torch_keep, get("mask"))
    if kind == "reference":
        close(ref.dropout(x, torch_keep, p), get("y"), name="y")
        close(ref.dropout(gy, torch_keep, p), get("gx"), name="gx")
        return
    seed = 2024
    keep = ref.dropout_mask(x.size, p, seed).reshape(x.shape)
    y, grad_input = F.dropout(x, p, seed=seed), F.dropout_backward(gy, p, seed)
    close(y, ref.dropout(x, keep, p), name="y with bnrs's mask")
    close(grad_input, ref.dropout(gy, keep, p), name="gx with bnrs's mask")
    both = keep & torch_keep
    assert both.sum() > x.size // 8
    close(y[both], get("y")[both], name="y where both kept")
    close(grad_input[both], get("gx")[both], name="gx where both kept")


def test_adam(implementation):
    kind, close = implementation
    get = _get("adam")
    hyper = {"lr": float(get("lr")), "beta1": float(get("beta1")),
             "beta2": float(get("beta2")), "eps": float(get("eps"))}
    if kind == "bnrs":
        param = get("p0").astype(np.float32)
        exp_avg, exp_avg_sq = np.zeros_like(param), np.zeros_like(param)
    else:
        param, exp_avg, exp_avg_sq = get("p0"), np.zeros(get("p0").shape), np.zeros(
            get("p0").shape)
    for step, grad in enumerate(get("grads"), start=1):
        if kind == "bnrs":
            F.adam_step(param, grad, exp_avg, exp_avg_sq, step, **hyper)
        else:
            param, exp_avg, exp_avg_sq = ref.adam_step(param, grad, exp_avg, exp_avg_sq, step,
                                                       **hyper)
        close(param, get("params")[step - 1], name=f"params after step {step}")


def _state(case, which):
    """The state dict stored under ``<case>.<which>.`` (``state0``, ``state1``, ``grad``)."""
    prefix = f"{case}.{which}."
    return {key[len(prefix):]: value for key, value in DATA.items() if key.startswith(prefix)}


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block(implementation, case):
    """An Inception or residual block from the grammar, loaded with PyTorch's state dict
    (the keys of the mirror modules in bnrs.nn.branches), in training mode."""
    kind, close = implementation
    get = _get(case)
    x, gy = get("x"), get("gy")
    block = nn.from_spec(str(get("token")), x.shape[1:], 1, random_state=0)[0]
    block.load_state_dict(_state(case, "state0"))
    fan_in = max(p.data[0].size for p in block.parameters())
    if kind == "reference":
        params = {key: value for key, value in _state(case, "state0").items()
                  if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        close(ref.network_forward(block, x, params), get("y"), terms=fan_in, name="y")
        return
    y = block(x)
    close(y, get("y"), terms=fan_in, name="y")
    grad_input = block.backward(gy)
    terms = gy[0].size
    close(grad_input, get("gx"), terms=terms, name="gx")
    grads = _state(case, "grad")
    assert set(grads) == {name for name, _ in block.named_parameters()}
    for name, param in block.named_parameters():
        close(param.grad, grads[name], terms=terms, name=f"grad {name}")
    after = _state(case, "state1")
    for key, value in block.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(after[key]), key
        else:
            close(value, after[key], terms=terms, name=f"state1 {key}")
