"""The evaluation forward in one call (bnrs.executor.run_forward, bnrs._core.EvalStep)
against the Python path of a Sequential in evaluation (BNRS_FUSED_STEP=0).

- Networks of every layer type it runs, on odd shapes, strides, paddings, dilations and
  groups, at 1 and 2 threads and several batch sizes: the output is the Python path's
  bits (its folded convolution blocks included, so the Rust fold is checked against
  ``FusedBlock._fold``'s NumPy), and the plan was made (no silent fallback).
- The arrays are read at every call: weights, running statistics and eps changed in
  place or replaced give the Python path's new output.
- Networks, inputs and arrays it does not take fall back to the Python path, with its
  results and errors; a backward after it is the unfused network's gradient.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from bnrs import _core, executor, nn, optim
from bnrs.nn.fusion import FUSE_ENV
from bnrs.training import num_threads, train_step


def _forward(monkeypatch, model, x, one_call: bool, threads: int = 1):
    monkeypatch.setenv(executor.STEP_ENV, "1" if one_call else "0")
    with num_threads(threads):
        return model(x)


_RAN: list = []   # one entry per call of run_forward: whether it gave the output


@pytest.fixture(autouse=True)
def _count_one_calls(monkeypatch):
    """Record whether each run_forward gave the output (or left it to the Python path)."""
    original = executor.run_forward

    def spy(model, input):
        output = original(model, input)
        _RAN.append(output is not None)
        return output

    monkeypatch.setattr(executor, "run_forward", spy)
    _RAN.clear()


def _planned(model) -> bool:
    """Whether the last forward was the one call (a plan made, and the call not refused)."""
    entry = executor._EVAL_EXECUTORS.get(model)
    return entry is not None and entry.plan is not None and bool(_RAN) and _RAN[-1]


def _randomise_statistics(model, rng) -> None:
    """Running statistics and affine parameters far from their initial values, so that a
    fold or a norm applied wrongly shows."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean[:] = rng.standard_normal(n).astype(np.float32)
            module.running_var[:] = rng.uniform(0.2, 3.0, n).astype(np.float32)
            if module.weight is not None:
                module.weight.data[:] = rng.uniform(-2, 2, n).astype(np.float32)
                module.bias.data[:] = rng.standard_normal(n).astype(np.float32)


def _check_same_bits(monkeypatch, model, x, threads=(1, 2)):
    expected = _forward(monkeypatch, model, x, one_call=False)
    for t in threads:
        got = _forward(monkeypatch, model, x, one_call=True, threads=t)
        assert _planned(model), "the one-call path fell back"
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes(), f"{t} threads"
    return expected


SPECS = [
    # (architecture, input shape): conv blocks chained, alone, unpooled, post-BN, others.
    ("c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5", (1, 28, 28)),
    ("c5k5p1-bn-relu-mp2-c7k3s2-bn-lrelu-ap2-sd0.2-fc9-bn-tanh-fc3", (3, 21, 19)),
    ("c6-relu-bn-mp2-c4-sigmoid-mp2-fc5-relu-bn-fc4", (2, 13, 11)),
    ("c8k5p2-bn-relu-c8-bn-relu-mp3s2-fc6", (1, 15, 15)),
    ("bn-c4-tanh-ap3s2-c6k1-bn-mp2-fc10-d0.5-fc2", (3, 9, 10)),
    ("dsc12-bn-relu-mp2-dsc8_bn-bn-relu-fc7", (4, 10, 12)),
    ("fc32-bn-relu-d0.5-fc16-bn-sigmoid-fc3", (20,)),
    ("fc8-relu-bn-bn-lrelu-fc3", (7,)),
]


@pytest.mark.parametrize("spec, shape", SPECS)
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_every_stage_gives_the_bits_of_the_python_path(monkeypatch, spec, shape, batch):
    rng = np.random.default_rng(len(spec) * 31 + batch)
    model = nn.from_spec(spec, shape, 4, random_state=batch)
    _randomise_statistics(model, rng)
    model.eval()
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    _check_same_bits(monkeypatch, model, x)


def test_hand_built_layers_with_every_option_give_the_python_paths_bits(monkeypatch):
    """Strides, paddings, dilation, groups, no bias, a norm without affine parameters,
    padded and uneven pools, count_include_pad=False, Flatten with an end dim."""
    rng = np.random.default_rng(3)
    model = nn.Sequential(
        nn.Conv2d(3, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False),
        nn.BatchNorm2d(6, affine=False, eps=1e-3),
        nn.LeakyReLU(0.2),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(6, 9, 3, padding=1, groups=3),
        nn.BatchNorm2d(9),
        nn.Tanh(),
        nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
        nn.Dropout2d(0.3),
        nn.Conv2d(9, 4, 1),
        nn.Sigmoid(),
        nn.Flatten(1, -1),
        nn.Linear(4 * 5 * 6, 11, bias=False),
        nn.BatchNorm1d(11, affine=False),
        nn.Dropout(0.5),
        nn.Linear(11, 2),
    )
    _randomise_statistics(model, rng)
    model.eval()
    x = rng.standard_normal((5, 3, 17, 11)).astype(np.float32)
    _check_same_bits(monkeypatch, model, x)


def test_fusion_turned_off_leaves_the_forward_to_the_layers(monkeypatch):
    """BNRS_FUSE=0 (or fuse=False): the layers run one by one in Python, unfused."""
    rng = np.random.default_rng(4)
    model = nn.from_spec("c4-bn-relu-mp2-fc6-bn-relu", (2, 8, 8), 3, random_state=0)
    _randomise_statistics(model, rng)
    model.eval()
    x = rng.standard_normal((4, 2, 8, 8)).astype(np.float32)
    fused = _forward(monkeypatch, model, x, one_call=True)
    executor._EVAL_EXECUTORS.pop(model)
    monkeypatch.setenv(FUSE_ENV, "0")
    unfused = _forward(monkeypatch, model, x, one_call=True)
    assert model not in executor._EVAL_EXECUTORS
    # Folding rounds differently from the norm after the convolution.
    np.testing.assert_allclose(fused, unfused, rtol=1e-5, atol=1e-5)


def test_arrays_changed_between_calls_are_read_at_each_call(monkeypatch):
    rng = np.random.default_rng(5)
    model = nn.from_spec("c4-bn-relu-mp2-c4-bn-relu-mp2-fc6-bn-relu-fc2", (1, 12, 12), 2,
                         random_state=0)
    _randomise_statistics(model, rng)
    model.eval()
    x = rng.standard_normal((3, 1, 12, 12)).astype(np.float32)
    before = _check_same_bits(monkeypatch, model, x, threads=(1,))
    conv, norm, dense, dense_norm = model[0], model[1], model[9], model[10]
    changes = [
        lambda: conv.weight.data.__imul__(np.float32(1.5)),
        lambda: norm.running_var.__imul__(np.float32(2.0)),
        lambda: norm.running_mean.__iadd__(np.float32(0.25)),
        lambda: setattr(norm, "eps", 0.5),
        lambda: setattr(conv.weight, "data", conv.weight.data * np.float32(-1)),
        lambda: dense_norm.running_var.__imul__(np.float32(3.0)),
        lambda: setattr(dense.weight, "data", dense.weight.data[::-1].copy()),
    ]
    for change in changes:
        change()
        after = _check_same_bits(monkeypatch, model, x, threads=(1,))
        assert after.tobytes() != before.tobytes()
        before = after


def _unsupported_models():
    conv = nn.from_spec("c3-gn1-relu-fc2", (2, 6, 6), 2, random_state=0)
    no_stats = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False),
                             nn.Flatten(), nn.Linear(12, 2))
    mixed = nn.from_spec("c3-bn-relu-fc2", (2, 4, 4), 2, random_state=0)
    mixed.eval()
    mixed[1].train()
    nested = nn.Sequential(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3),
                                         nn.ReLU()),
                           nn.Flatten(), nn.Linear(48, 2))
    return [("group norm", conv, (2, 6, 6)), ("norm without statistics", no_stats, (2, 4, 4)),
            ("a layer in training", mixed, (2, 4, 4)), ("nested", nested, (2, 4, 4))]


@pytest.mark.parametrize("what, model, shape", _unsupported_models(),
                         ids=[case[0] for case in _unsupported_models()])
def test_networks_it_does_not_run_fall_back_to_the_python_path(monkeypatch, what, model,
                                                               shape):
    rng = np.random.default_rng(6)
    if what != "a layer in training":
        model.eval()
    x = rng.standard_normal((4,) + shape).astype(np.float32)
    twin = copy.deepcopy(model)
    got = _forward(monkeypatch, model, x, one_call=True)
    assert not _planned(model)
    expected = _forward(monkeypatch, twin, x, one_call=False)
    assert got.tobytes() == expected.tobytes()


def test_a_linear_layer_on_more_axes_and_a_sample_without_batch_fall_back(monkeypatch):
    rng = np.random.default_rng(7)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU()).eval()
    for shape in [(2, 4, 5), (5,)]:
        executor._EVAL_EXECUTORS.pop(model, None)
        x = rng.standard_normal(shape).astype(np.float32)
        got = _forward(monkeypatch, model, x, one_call=True)
        assert not _planned(model)
        assert got.tobytes() == _forward(monkeypatch, model, x, one_call=False).tobytes()


def test_arrays_the_binding_cannot_read_leave_the_call_to_the_python_path(monkeypatch):
    """A running statistic replaced by float64 or a strided view: the Python path runs
    (and converts it as it always did)."""
    rng = np.random.default_rng(8)
    model = nn.from_spec("c3-bn-relu-mp2-fc4-bn-relu-fc2", (2, 6, 6), 2, random_state=0)
    _randomise_statistics(model, rng)
    model.eval()
    x = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    _check_same_bits(monkeypatch, model, x, threads=(1,))
    plan = executor._EVAL_EXECUTORS[model].plan
    arrays = [getter(module) for getter, module in plan.sources]
    assert plan.core.forward(x, arrays) is not None
    model[1].running_var = model[1].running_var.astype(np.float64)
    arrays = [getter(module) for getter, module in plan.sources]
    assert plan.core.forward(x, arrays) is None
    expected = _forward(monkeypatch, model, x, one_call=False)
    assert _forward(monkeypatch, model, x, one_call=True).tobytes() == expected.tobytes()
    assert _RAN[-1] is False   # refused by the binding, run by the Python path
    model[1].running_var = np.repeat(model[1].running_var.astype(np.float32), 2)[::2]
    expected = _forward(monkeypatch, model, x, one_call=False)
    assert _forward(monkeypatch, model, x, one_call=True).tobytes() == expected.tobytes()


@pytest.mark.parametrize("bad", ["channels", "size", "dtype"])
def test_a_bad_input_raises_the_python_paths_error(monkeypatch, bad):
    model = nn.from_spec("c3-bn-relu-mp2-fc4", (2, 6, 6), 2, random_state=0).eval()
    x = {"channels": np.zeros((2, 3, 6, 6), np.float32),
         "size": np.zeros((2, 2, 1, 1), np.float32),
         "dtype": np.zeros((2, 2, 6, 6), np.complex64)}[bad]
    errors = []
    for one_call in (False, True):
        with pytest.raises((ValueError, TypeError)) as info:
            _forward(monkeypatch, model, x, one_call)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def test_other_inputs_give_the_bits_of_the_python_path(monkeypatch):
    """float64, non-contiguous and list inputs, converted as the layers convert them; the
    caller's array is not modified."""
    rng = np.random.default_rng(9)
    model = nn.from_spec("c3-bn-relu-mp2-fc4-bn-relu", (2, 6, 6), 2, random_state=0).eval()
    base = rng.standard_normal((3, 2, 6, 12))
    for x in [base[..., ::2], base[..., :6].astype(np.float32).copy(), base[..., :6].tolist()]:
        kept = copy.deepcopy(x)
        got = _forward(monkeypatch, model, x, one_call=True)
        assert _planned(model)
        assert got.tobytes() == _forward(monkeypatch, model, x, one_call=False).tobytes()
        np.testing.assert_array_equal(np.asarray(x), np.asarray(kept))


def test_a_backward_after_the_one_call_forward_is_the_unfused_gradient(monkeypatch):
    rng = np.random.default_rng(10)
    model = nn.from_spec("c4-bn-relu-mp2-fc6-bn-relu-fc3", (2, 8, 8), 3, random_state=0)
    _randomise_statistics(model, rng)
    model.eval()
    twin = copy.deepcopy(model)
    x = rng.standard_normal((5, 2, 8, 8)).astype(np.float32)
    grad = rng.standard_normal((5, 3)).astype(np.float32)
    _forward(monkeypatch, model, x, one_call=True)
    assert _planned(model)
    got = model.backward(grad)
    monkeypatch.setenv(FUSE_ENV, "0")
    _forward(monkeypatch, twin, x, one_call=False)
    expected = twin.backward(grad)
    assert got.tobytes() == expected.tobytes()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert a.grad.tobytes() == b.grad.tobytes()


def test_the_plan_is_made_again_for_a_new_sample_shape_or_layer(monkeypatch):
    rng = np.random.default_rng(11)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()).eval()
    for shape in [(1, 8, 8), (1, 10, 6), (1, 8, 8)]:
        x = rng.standard_normal((2,) + shape).astype(np.float32)
        _check_same_bits(monkeypatch, model, x, threads=(1,))
        assert executor._EVAL_EXECUTORS[model].sample_shape == shape
    model.add_module("2", nn.Tanh().eval())   # replaces the ReLU
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    _check_same_bits(monkeypatch, model, x, threads=(1,))
    assert type(executor._EVAL_EXECUTORS[model].signature[0][2]) is nn.Tanh


def test_the_binding_refuses_a_plan_whose_stages_do_not_chain():
    conv = ("conv", [1, 4, 4], [2, 2, 2], (0, None, (1, 1), (0, 0), (1, 1), 1, None, None,
                                           None))
    with pytest.raises(ValueError, match="stage"):
        _core.EvalStep([conv, ("activation", [2, 3, 3], [2, 3, 3], ("relu", 0.0))],
                       [[2, 1, 3, 3]])
    with pytest.raises(ValueError, match="slot"):
        _core.EvalStep([conv], [])
    with pytest.raises(ValueError, match="kernel"):
        _core.EvalStep([("view", [4], [4], ())], [])
    step = _core.EvalStep([conv], [[2, 1, 3, 3]])
    with pytest.raises(ValueError, match="input"):
        step.forward(np.zeros((0, 1, 4, 4), np.float32), [np.zeros((2, 1, 3, 3), np.float32)])
    assert step.forward(np.zeros((1, 1, 4, 4), np.float32),
                        [np.zeros((2, 1, 3, 4), np.float32)]) is None


@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_the_fold_keeps_the_sign_of_a_zero_as_the_python_path(monkeypatch, zero):
    """A channel whose gamma, mean and bias are zeros of either sign: the folded weights
    and bias carry the signs NumPy's fold gives them, to the output's bits."""
    rng = np.random.default_rng(12)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).eval()
    _randomise_statistics(model, rng)
    model[0].bias.data[1] = -zero
    model[1].weight.data[1] = zero
    model[1].bias.data[1] = -0.0
    model[1].running_mean[1] = zero
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    out = _check_same_bits(monkeypatch, model, x, threads=(1,))
    assert (out[:, 1] == 0).all()


def _attribute_changes():
    """(what, a model, a change of one of its layers' attributes after a first forward)."""
    def conv_relu():
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.LeakyReLU(0.1), nn.MaxPool2d(2)).eval()

    def conv_flat_relu():
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.LeakyReLU(0.0)).eval()

    def conv_flat_relu32():   # a slope set as a NumPy scalar after construction
        model = conv_flat_relu()
        model[1].negative_slope = np.float32(0.0)
        return model

    def conv_flat_relu_array():
        model = conv_flat_relu()
        model[1].negative_slope = np.array(0.0)
        return model

    return [
        ("slope", conv_relu, lambda m: setattr(m[1], "negative_slope", 0.3)),
        # Equal slopes, but the negative outputs' zeros change sign.
        ("slope's sign", conv_flat_relu, lambda m: setattr(m[1], "negative_slope", -0.0)),
        ("float32 slope's sign", conv_flat_relu32,
         lambda m: setattr(m[1], "negative_slope", np.float32(-0.0))),
        ("0-d array slope changed in place", conv_flat_relu_array,
         lambda m: m[1].negative_slope.fill(0.25)),
        ("padding", conv_relu, lambda m: setattr(m[0], "padding", (1, 1))),
        ("stride", conv_relu, lambda m: setattr(m[0], "stride", (2, 1))),
        ("pool stride", conv_relu, lambda m: setattr(m[2], "stride", (1, 1))),
        ("training flag", conv_relu, lambda m: m[1].train()),
        ("activation replaced", conv_relu, lambda m: m.add_module("1", nn.Tanh().eval())),
        ("weight replaced", conv_relu,
         lambda m: setattr(m[0], "weight", nn.Parameter(m[0].weight.data * 2))),
    ]


@pytest.mark.parametrize("what, make, change", _attribute_changes(),
                         ids=[case[0] for case in _attribute_changes()])
def test_a_layer_changed_after_the_plan_gives_the_python_paths_new_bits(monkeypatch, what,
                                                                        make, change):
    rng = np.random.default_rng(13)
    model = make()
    x = rng.standard_normal((3, 2, 9, 8)).astype(np.float32)
    before = _check_same_bits(monkeypatch, model, x, threads=(1,))
    change(model)
    expected = _forward(monkeypatch, model, x, one_call=False)
    got = _forward(monkeypatch, model, x, one_call=True)
    assert got.shape == expected.shape and got.tobytes() == expected.tobytes()
    if what == "training flag":   # the same output, by the Python path
        assert _RAN[-1] is False
    else:
        assert got.shape != before.shape or got.tobytes() != before.tobytes()
        assert _RAN[-1] is True


@pytest.mark.parametrize("attribute, value", [("padding", 1), ("dilation", [1, 1]),
                                              ("stride", [1, 1])])
def test_attributes_the_layers_convert_leave_the_forward_to_them(monkeypatch, attribute,
                                                                  value):
    """An int padding or a list stride, which the layers accept, is not a plan's
    description: the Python path runs, in evaluation and in a training step."""
    rng = np.random.default_rng(14)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.AvgPool2d(3, 1, 1),
                          nn.Flatten(), nn.Linear(3 * 6 * 6 if attribute == "padding"
                                                  else 3 * 4 * 4, 2))
    setattr(model[0], attribute, value)
    model.eval()
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    expected = _forward(monkeypatch, model, x, one_call=False)
    assert _forward(monkeypatch, model, x, one_call=True).tobytes() == expected.tobytes()
    assert _RAN[-1] is False
    model.train()
    monkeypatch.setenv(executor.STEP_ENV, "1")
    loss = train_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1), x,
                      np.array([0, 1]))
    assert np.isfinite(loss)


def test_a_sequential_subclass_that_is_not_hashable_runs_the_python_path(monkeypatch):
    class Unhashable(nn.Sequential):
        def __eq__(self, other):
            return self is other

    model = Unhashable(nn.Linear(5, 3), nn.ReLU()).eval()
    x = np.ones((2, 5), np.float32)
    expected = _forward(monkeypatch, model, x, one_call=False)
    assert _forward(monkeypatch, model, x, one_call=True).tobytes() == expected.tobytes()
    assert _RAN[-1] is False


def test_an_empty_batch_is_left_to_the_python_path(monkeypatch):
    model = nn.from_spec("c3-bn-relu-mp2-fc4", (2, 6, 6), 2, random_state=0).eval()
    x = np.zeros((0, 2, 6, 6), np.float32)
    outcomes = []
    for one_call in (False, True):
        try:
            outcomes.append(("output", _forward(monkeypatch, model, x, one_call).shape))
        except (ValueError, TypeError) as error:
            outcomes.append((type(error), str(error)))
    assert outcomes[0] == outcomes[1]
    assert _RAN[-1] is False


def test_forwards_from_several_threads_at_once_give_the_same_bits(monkeypatch):
    rng = np.random.default_rng(15)
    model = nn.from_spec("c4-bn-relu-mp2-c8-bn-relu-mp2-fc16-bn-relu-fc3", (1, 12, 12), 3,
                         random_state=0)
    _randomise_statistics(model, rng)
    model.eval()
    inputs = [rng.standard_normal((n, 1, 12, 12)).astype(np.float32) for n in (1, 5, 9)]
    expected = [_forward(monkeypatch, model, x, one_call=False).tobytes() for x in inputs]
    monkeypatch.setenv(executor.STEP_ENV, "1")
    _RAN.clear()
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda i: model(inputs[i % 3]).tobytes(), range(60)))
    assert all(got == expected[i % 3] for i, got in enumerate(results))
    assert all(_RAN)


LONG_FORWARD_SETUP = """
    from bnrs import executor
    model = nn.from_spec("c64-bn-relu-c64-bn-relu-mp2-fc10", (8, 32, 32), 10,
                         random_state=0).eval()
    probe = rng.standard_normal((2, 8, 32, 32), dtype=np.float32)
    model(probe)
    assert executor._EVAL_EXECUTORS[model].plan is not None
    start = time.monotonic()
    model(probe)
    per_sample = (time.monotonic() - start) / 2
    x = rng.standard_normal((max(4, int(1.5 / per_sample)), 8, 32, 32), dtype=np.float32)
"""
LONG_FORWARD_BODY = """
        while True:
            model(x)
"""


def test_sigint_during_one_long_forward_is_honoured_within_a_second():
    from test_interrupts import sigint_latency

    latency = sigint_latency(LONG_FORWARD_SETUP, LONG_FORWARD_BODY, delay=0.3)
    assert latency < 1.0, f"SIGINT took {latency:.3f} s to be honoured"
