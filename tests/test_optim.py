"""Tests of bnrs.optim against NumPy implementations of PyTorch's update formulas."""

import pickle

import numpy as np
import pytest
from bnrs import nn, optim
from bnrs.nn import Parameter

SHAPES = [(3, 4), (5,)]
STEPS = 5

# --------------------------------------------------------------------------- references
# float64 transcriptions of torch/optim/sgd.py and adam.py (single-tensor code paths).


def reference_sgd(params, grads_per_step, lr, momentum=0.0, dampening=0.0,
                  weight_decay=0.0, nesterov=False):
    params = [p.astype(np.float64) for p in params]
    buffers = [None] * len(params)
    for grads in grads_per_step:
        for i, (param, grad) in enumerate(zip(params, grads)):
            d_p = grad + weight_decay * param
            if momentum != 0:
                if buffers[i] is None:
                    buffers[i] = d_p.copy()
                else:
                    buffers[i] = momentum * buffers[i] + (1 - dampening) * d_p
                d_p = d_p + momentum * buffers[i] if nesterov else buffers[i]
            params[i] = param - lr * d_p
    return params


def reference_adam(params, grads_per_step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                   weight_decay=0.0, decoupled=False):
    beta1, beta2 = betas
    params = [p.astype(np.float64) for p in params]
    exp_avg = [np.zeros_like(p) for p in params]
    exp_avg_sq = [np.zeros_like(p) for p in params]
    for step, grads in enumerate(grads_per_step, start=1):
        for i, grad in enumerate(grads):
            if decoupled:
                params[i] = params[i] * (1 - lr * weight_decay)
            elif weight_decay != 0:
                grad = grad + weight_decay * params[i]
            exp_avg[i] = beta1 * exp_avg[i] + (1 - beta1) * grad
            exp_avg_sq[i] = beta2 * exp_avg_sq[i] + (1 - beta2) * grad * grad
            step_size = lr / (1 - beta1 ** step)
            denom = np.sqrt(exp_avg_sq[i]) / np.sqrt(1 - beta2 ** step) + eps
            params[i] = params[i] - step_size * exp_avg[i] / denom
    return params


# --------------------------------------------------------------------------- helpers


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(shape)) for shape in SHAPES]


def make_grads(seed=1, steps=STEPS):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
            for _ in range(steps)]


def run(optimizer, params, grads_per_step):
    for grads in grads_per_step:
        for param, grad in zip(params, grads):
            param.grad[...] = grad
        optimizer.step()


def assert_matches(params, expected):
    for param, want in zip(params, expected):
        assert param.data.dtype == np.float32
        np.testing.assert_allclose(param.data, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- update rules


@pytest.mark.parametrize("hyper", [
    {"lr": 0.1},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.3},
    {"lr": 0.05, "momentum": 0.8, "nesterov": True},
    {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    {"lr": 0.1, "weight_decay": 0.1},
])
def test_sgd_matches_pytorch_formulas(hyper):
    params, grads = make_params(), make_grads()
    initial = [p.data.copy() for p in params]
    run(optim.SGD(params, **hyper), params, grads)
    assert_matches(params, reference_sgd(initial, grads, **hyper))


@pytest.mark.parametrize("hyper", [
    {},
    {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6},
    {"lr": 0.01, "weight_decay": 0.1},
])
def test_adam_matches_pytorch_formulas(hyper):
    params, grads = make_params(), make_grads()
    initial = [p.data.copy() for p in params]
    run(optim.Adam(params, **hyper), params, grads)
    assert_matches(params, reference_adam(initial, grads, **hyper))


@pytest.mark.parametrize("hyper", [{}, {"lr": 0.01, "weight_decay": 0.3}])
def test_adamw_matches_pytorch_formulas(hyper):
    params, grads = make_params(), make_grads()
    initial = [p.data.copy() for p in params]
    run(optim.AdamW(params, **hyper), params, grads)
    expected = reference_adam(initial, grads, decoupled=True,
                              **{"weight_decay": 1e-2, **hyper})
    assert_matches(params, expected)


def test_defaults_are_pytorchs():
    params = make_params()
    assert optim.SGD(params).defaults == {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0,
                                          "weight_decay": 0.0, "nesterov": False}
    assert optim.Adam(params).defaults == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                           "weight_decay": 0.0}
    assert optim.AdamW(params).defaults["weight_decay"] == 1e-2


def test_updates_are_in_place():
    params = make_params()
    arrays = [p.data for p in params]
    run(optim.Adam(params), params, make_grads(steps=1))
    assert all(p.data is a for p, a in zip(params, arrays))


def test_param_groups_have_their_own_hyper_parameters():
    params, grads = make_params(), make_grads()
    initial = [p.data.copy() for p in params]
    opt = optim.SGD([{"params": [params[0]]}, {"params": params[1], "lr": 0.5}], lr=0.1,
                    momentum=0.5)
    run(opt, params, grads)
    assert_matches(params[:1], reference_sgd(initial[:1], [g[:1] for g in grads], 0.1, 0.5))
    assert_matches(params[1:], reference_sgd(initial[1:], [g[1:] for g in grads], 0.5, 0.5))


def test_learning_rate_can_change_between_steps():
    params, grads = make_params(), make_grads(steps=2)
    initial = [p.data.copy() for p in params]
    opt = optim.SGD(params, lr=0.1)
    run(opt, params, grads[:1])
    for group in opt.param_groups:
        group["lr"] = 0.01
    run(opt, params, grads[1:])
    step_one = reference_sgd(initial, grads[:1], 0.1)
    assert_matches(params, reference_sgd(step_one, grads[1:], 0.01))


def test_zero_grad_and_closure():
    model = nn.Linear(3, 2, random_state=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()

    def closure():
        opt.zero_grad()
        loss = crit(model(np.ones((2, 3), np.float32)), np.array([0, 1]))
        model.backward(crit.backward())
        return loss

    assert isinstance(opt.step(closure), float)
    assert any(p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert not any(p.grad.any() for p in model.parameters())


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("make,message", [
    (lambda p: optim.SGD(p, lr=-0.1), "learning rate"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=-0.5), "momentum"),
    (lambda p: optim.SGD(p, lr=0.1, weight_decay=-1), "weight_decay"),
    (lambda p: optim.SGD(p, lr=0.1, nesterov=True), "Nesterov"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov"),
    (lambda p: optim.Adam(p, lr=-1e-3), "learning rate"),
    (lambda p: optim.Adam(p, eps=-1.0), "epsilon"),
    (lambda p: optim.Adam(p, betas=(1.0, 0.999)), "beta parameter at index 0"),
    (lambda p: optim.Adam(p, betas=(0.9, -0.1)), "beta parameter at index 1"),
    (lambda p: optim.AdamW(p, weight_decay=-0.1), "weight_decay"),
    (lambda p: optim.SGD(p, lr=float("nan")), "learning rate"),
])
def test_invalid_hyper_parameters_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make(make_params())


def test_invalid_parameter_lists():
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match=r"^params: .*got a single Parameter"):
        optim.SGD(make_params()[0], lr=0.1)
    for not_iterable in (None, 3):
        with pytest.raises(TypeError, match=r"^params: .*got (NoneType|int)$"):
            optim.SGD(not_iterable, lr=0.1)
    with pytest.raises(TypeError, match="can only optimize bnrs.nn.Parameter objects"):
        optim.SGD([np.zeros(3, np.float32)], lr=0.1)
    params = make_params()
    with pytest.raises(ValueError, match="more than one parameter group"):
        optim.SGD([{"params": params}, {"params": params[:1]}], lr=0.1)
    with pytest.raises(TypeError, match="unknown hyper-parameter"):
        optim.SGD([{"params": params, "betas": (0.9, 0.9)}], lr=0.1)


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize("make", [
    lambda p: optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: optim.Adam(p, lr=0.01),
    lambda p: optim.AdamW(p, lr=0.01),
])
def test_state_dict_resumes_training_exactly(make):
    grads = make_grads(steps=6)
    params = make_params()
    opt = make(params)
    run(opt, params, grads[:3])
    saved_params = [p.data.copy() for p in params]
    saved = opt.state_dict()
    assert saved["param_groups"][0]["params"] == [0, 1]
    run(opt, params, grads[3:])

    resumed = [Parameter(a) for a in saved_params]
    other = make(resumed)
    other.load_state_dict(saved)
    run(other, resumed, grads[3:])
    for a, b in zip(params, resumed):
        assert np.array_equal(a.data, b.data)


def test_state_dict_is_a_snapshot_and_mismatches_raise():
    params = make_params()
    opt = optim.Adam(params)
    run(opt, params, make_grads(steps=1))
    saved = opt.state_dict()
    run(opt, params, make_grads(steps=1))
    assert saved["state"][0]["step"] == 1
    assert not np.array_equal(saved["state"][0]["exp_avg"], opt.state[params[0]]["exp_avg"])
    with pytest.raises(ValueError, match="parameter group"):
        optim.Adam(params[:1]).load_state_dict(saved)
    with pytest.raises(ValueError, match="parameter groups"):
        optim.Adam([{"params": params[:1]}, {"params": params[1:]}]).load_state_dict(saved)


def test_optimizer_pickles_with_its_model():
    model = nn.Sequential(nn.Linear(4, 3, random_state=0))
    opt = optim.Adam(model.parameters(), lr=0.1)
    x, target = np.ones((2, 4), np.float32), np.array([0, 2])
    crit = nn.CrossEntropyLoss()

    def train_step(model, opt):
        opt.zero_grad()
        loss = crit(model(x), target)
        model.backward(crit.backward())
        opt.step()
        return loss

    train_step(model, opt)
    model_copy, opt_copy = pickle.loads(pickle.dumps((model, opt)))
    assert opt_copy.param_groups[0]["params"][0] is model_copy[0].weight
    assert [train_step(model, opt) for _ in range(2)] == [
        train_step(model_copy, opt_copy) for _ in range(2)]
