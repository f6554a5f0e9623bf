"""Branching networks: AdaptiveAvgPool2d, Concat, Residual and the grammar's blocks.

Forward outputs are compared with a float64 NumPy interpreter of the same module tree
(tests/reference.py's layers), gradients with central differences of that interpreter, on
odd shapes; then state-dict keys, modes, determinism across thread counts and training on
digits.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from bnrs import CNNClassifier, _core, nn
from bnrs.nn.branches import ModuleList

# --------------------------------------------------------------------------- reference


def _check_against_reference(module, x, rng, assert_close, finite_differences=True):
    """Forward against the reference; input and parameter gradients against central
    differences of the reference (float64)."""
    params = {name: p.data.astype(np.float64) for name, p in module.named_parameters()}
    expected = ref.network_forward(module, x.astype(np.float64), params)
    output = module(x)
    fan_in = max(p.data[0].size for p in module.parameters()) if params else 1
    assert_close(output, expected, terms=fan_in, name="output")
    gy = rng.standard_normal(output.shape).astype(np.float32)
    module.zero_grad()
    grad_input = module.backward(gy)
    if not finite_differences:
        return
    names = list(params)

    def loss(x64, *values):
        return ref.weighted_sum(ref.network_forward(module, x64, dict(zip(names, values))), gy)

    numerical = ref.numerical_gradients(loss, x, *params.values())
    terms = gy[0].size
    assert_close(grad_input, numerical[0], terms=terms, rtol=1e-3, name="grad_input")
    for (name, param), approx in zip(module.named_parameters(), numerical[1:]):
        assert_close(param.grad, approx, terms=terms, rtol=1e-3, name=f"grad {name}")


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (3, 2, 1, 9)])
def test_adaptive_avg_pool_matches_reference(rng, assert_close, shape):
    pool = nn.AdaptiveAvgPool2d(1)
    x = rng.standard_normal(shape).astype(np.float32)
    output = pool(x)
    assert_close(output, ref.adaptive_avg_pool2d(x), terms=shape[2] * shape[3], name="output")
    gy = rng.standard_normal(output.shape).astype(np.float32)
    grad = pool.backward(gy)
    assert_close(grad, ref.adaptive_avg_pool2d_backward(gy, shape), name="grad_input")
    numerical = ref.numerical_gradients(
        lambda x64: ref.weighted_sum(ref.adaptive_avg_pool2d(x64), gy), x)[0]
    assert_close(grad, numerical, rtol=1e-5, atol=1e-6, name="fd")
    assert pool.output_shape(shape[1:]) == (shape[1], 1, 1)


def test_adaptive_avg_pool_rejects_other_sizes_and_layouts():
    with pytest.raises(ValueError, match="output_size"):
        nn.AdaptiveAvgPool2d(2)
    with pytest.raises(ValueError, match="4-D"):
        nn.AdaptiveAvgPool2d(1)(np.zeros((2, 3), np.float32))


def _small_inception(seed=0):
    rng = {"random_state": seed}
    return nn.Concat(
        nn.Sequential(nn.Conv2d(3, 2, 1, **rng), nn.BatchNorm2d(2), nn.ReLU()),
        nn.Sequential(nn.Conv2d(3, 2, 1, **rng), nn.ReLU(),
                      nn.Conv2d(2, 3, 3, padding=1, bias=False, **rng), nn.BatchNorm2d(3)),
        nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(3, 1, 1, **rng)),
        nn.Sequential())   # an identity branch: the input itself is concatenated


def test_concat_matches_reference_and_finite_differences(rng, assert_close):
    block = _small_inception()
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    _check_against_reference(block, x, rng, assert_close)
    assert block.output_shape((3, 5, 7)) == (9, 5, 7)


@pytest.mark.parametrize("projection", [False, True])
def test_residual_matches_reference_and_finite_differences(rng, assert_close, projection):
    out, stride = (4, 2) if projection else (3, 1)
    body = nn.Sequential(nn.Conv2d(3, out, 3, stride, 1, bias=False, random_state=1),
                         nn.BatchNorm2d(out), nn.ReLU(),
                         nn.Conv2d(out, out, 3, 1, 1, random_state=2))
    shortcut = (nn.Sequential(nn.Conv2d(3, out, 1, stride, random_state=3), nn.BatchNorm2d(out))
                if projection else None)
    block = nn.Residual(body, shortcut, nn.ReLU())
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    _check_against_reference(block, x, rng, assert_close)
    assert block.output_shape((3, 5, 7)) == ((4, 3, 4) if projection else (3, 5, 7))


@pytest.mark.parametrize("spec", ["inc2_1_2_1_2_1", "inc2_1_2_1_2_1_nobn",
                                  "inc1_2_1_1_1_2_postbn", "res3", "res4s2", "res4_nobn",
                                  "res3s2_postbn", "c3-res3-gap"])
def test_grammar_blocks_match_reference(rng, assert_close, spec):
    model = nn.from_spec(spec, (3, 5, 7), 2, random_state=0)
    x = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
    _check_against_reference(model, x, rng, assert_close)


def test_branches_read_the_same_input_array():
    seen = []

    class Spy(nn.Module):
        def forward(self, input):
            seen.append(input)
            return input

        def output_shape(self, input_shape):
            return tuple(input_shape)

    block = nn.Concat(nn.Sequential(Spy()), nn.Sequential(Spy()))
    x = np.ones((1, 2, 3, 3), np.float32)
    block(x)
    assert seen[0] is x and seen[1] is x
    residual = nn.Residual(nn.Sequential(Spy()))
    residual(x)
    assert seen[2] is x


def test_identity_paths_leave_grad_output_unchanged(rng):
    gy = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    before = gy.copy()
    block = nn.Concat(nn.Sequential(), nn.Sequential())
    block(rng.standard_normal((2, 2, 3, 3)).astype(np.float32))
    grad = block.backward(gy)
    np.testing.assert_array_equal(grad, gy[:, :2] + gy[:, 2:])
    residual = nn.Residual(nn.Sequential())
    residual(rng.standard_normal((2, 4, 3, 3)).astype(np.float32))
    np.testing.assert_array_equal(residual.backward(gy), gy + gy)
    np.testing.assert_array_equal(gy, before)


def test_input_grad_false_returns_none_and_still_fills_parameter_grads(rng):
    model = nn.from_spec("inc2_1_2_1_2_1-res5s2-gap", (3, 6, 6), 2, random_state=0)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    y = model(x)
    assert model.backward(np.ones_like(y), input_grad=False) is None
    assert all(np.any(p.grad != 0) for p in model.parameters())
    assert all(m._ctx is None for m in model.modules())


def test_state_dict_keys_follow_pytorch_nesting():
    model = nn.from_spec("c4-bn-relu-inc2_1_2_1_2_1-res8s2-gap", (1, 8, 8), 3, random_state=0)
    keys = list(model.state_dict())
    assert "3.branches.0.0.weight" in keys
    assert "3.branches.0.1.running_mean" in keys
    assert "3.branches.1.3.weight" in keys        # the 3x3 conv after 1x1-bn-relu
    assert "3.branches.3.1.weight" in keys        # the conv after the pool
    assert "4.body.0.weight" in keys and "4.body.4.weight" in keys
    assert "4.shortcut.0.weight" in keys and "4.shortcut.1.num_batches_tracked" in keys
    assert "3.branches.0.0.bias" not in keys     # a conv followed by BN has no bias
    twin = nn.from_spec("c4-bn-relu-inc2_1_2_1_2_1-res8s2-gap", (1, 8, 8), 3,
                        random_state=1)
    twin.load_state_dict(model.state_dict())
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=key)


def test_train_eval_and_clear_saved_reach_every_branch(rng):
    model = nn.from_spec("inc2_1_2_1_2_1-res4", (3, 5, 5), 2, random_state=0)
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    model(rng.standard_normal((2, 3, 5, 5)).astype(np.float32))
    model.clear_saved()
    assert all(m._ctx is None for m in model.modules())


def test_eval_uses_running_statistics_inside_blocks(rng):
    model = nn.from_spec("res3-gap", (3, 4, 4), 2, random_state=0).eval()
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)   # one sample is fine in eval
    assert model(x).shape == (1, 2)


def test_containers_reject_mismatched_branches():
    with pytest.raises(ValueError, match="at least one branch"):
        nn.Concat()
    block = nn.Concat(nn.Sequential(nn.MaxPool2d(2)), nn.Sequential())
    with pytest.raises(ValueError, match="other than"):
        block.output_shape((2, 4, 4))
    with pytest.raises(ValueError, match="other than"):
        block(np.zeros((1, 2, 4, 4), np.float32))
    residual = nn.Residual(nn.Sequential(nn.Conv2d(2, 3, 1, random_state=0)))
    with pytest.raises(ValueError, match="shortcut"):
        residual.output_shape((2, 4, 4))
    with pytest.raises(ValueError, match="shortcut"):
        residual(np.zeros((1, 2, 4, 4), np.float32))


def test_module_list_names_its_children():
    holder = ModuleList([nn.ReLU(), nn.Tanh()])
    assert [name for name, _ in holder.named_children()] == ["0", "1"]
    assert len(holder) == 2 and isinstance(holder[1], nn.Tanh)


# --------------------------------------------------------------------------- grammar


def test_parse_block_tokens():
    tokens = nn.parse("inc8_4_8_2_4_4-res16s2_postbn-gap")
    assert [t.kind for t in tokens] == ["inception", "residual", "gap"]
    assert tokens[0].args == {"branches": (8, 4, 8, 2, 4, 4), "norm": "bn",
                              "separable": False}
    assert tokens[1].args == {"out_channels": 16, "stride": 2, "norm": "postbn",
                              "separable": False}
    tokens = nn.parse("inc8_4_8_2_4_4_dsc-res16s2_postbn_dsc-dsc8-dsc16k5s2p1_bn")
    assert [t.kind for t in tokens] == ["inception", "residual", "separable", "separable"]
    assert tokens[0].args["separable"] and tokens[1].args["separable"]
    assert tokens[1].args["norm"] == "postbn"
    assert tokens[2].args == {"out_channels": 8, "kernel_size": 3, "stride": 1,
                              "padding": 1, "norm": None}
    assert tokens[3].args == {"out_channels": 16, "kernel_size": 5, "stride": 2,
                              "padding": 1, "norm": "bn"}
    for bad in ("dsc", "dsc8_nobn", "dsc0", "res8_dsc_nobn"):
        with pytest.raises(nn.SpecError):
            nn.parse(bad)


def test_separable_layouts_and_parameter_counts():
    model = nn.from_spec("c8-dsc16-bn-relu-dsc16s2_bn-res16_dsc-inc4_4_8_2_4_4_dsc",
                         (1, 9, 9), 3, random_state=0)
    depthwise, pointwise = model[1], model[2]
    assert (depthwise.groups, depthwise.weight.data.shape, depthwise.bias) == (
        8, (8, 1, 3, 3), None)
    assert pointwise.weight.data.shape == (16, 8, 1, 1) and pointwise.bias is not None
    assert [type(m).__name__ for m in model[5:8]] == ["Conv2d", "BatchNorm2d", "Conv2d"]
    assert model[5].stride == (2, 2) and model[5].groups == 16
    body = [type(m).__name__ for m in model[8].body]
    assert body == ["Conv2d", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "Conv2d",
                    "BatchNorm2d"]
    assert [m.groups for m in model[8].body if isinstance(m, nn.Conv2d)] == [16, 1, 16, 1]
    branch3 = model[9].branches[1]
    assert [getattr(m, "groups", None) for m in branch3] == [1, None, None, 4, 1, None, None]
    # Separable 3x3 from 16 to 16 channels: 16*9 + 16*16 weights, against 16*16*9.
    summary = model.summary((1, 9, 9))
    residual_params = 2 * (16 * 9 + 16 * 16) + 2 * 2 * 16
    assert summary.layers[8].params == residual_params
    # Per output pixel (5x5 after the stride 2): 16*9 (depthwise) + 16*16 (pointwise),
    # twice, and the two batch norms.
    assert summary.layers[8].mult_adds == 2 * 25 * (16 * 9 + 16 * 16) + 2 * 25 * 16


def test_block_layouts():
    model = nn.from_spec("inc1_2_3_4_5_6_postbn-res8_nobn-res8", (2, 9, 9), 3,
                         random_state=0)
    inception, res_nobn, res = model[0], model[1], model[2]
    kinds = [[type(m).__name__ for m in branch] for branch in inception.branches]
    assert kinds == [["Conv2d", "ReLU", "BatchNorm2d"],
                     ["Conv2d", "ReLU", "BatchNorm2d"] * 2,
                     ["Conv2d", "ReLU", "BatchNorm2d"] * 2,
                     ["MaxPool2d", "Conv2d", "ReLU", "BatchNorm2d"]]
    assert inception.branches[2][3].kernel_size == (5, 5)
    assert inception.output_shape((2, 9, 9)) == (1 + 3 + 5 + 6, 9, 9)
    assert [type(m).__name__ for m in res_nobn.body] == ["Conv2d", "ReLU", "Conv2d"]
    assert res_nobn.shortcut is not None                       # 15 -> 8 channels
    assert [type(m).__name__ for m in res_nobn.shortcut] == ["Conv2d"]
    assert res.shortcut is None and isinstance(res.activation, nn.ReLU)   # 8 -> 8
    assert [type(m).__name__ for m in res.body] == ["Conv2d", "BatchNorm2d", "ReLU",
                                                     "Conv2d", "BatchNorm2d"]
    assert type(model[3]).__name__ == "Flatten"


@pytest.mark.parametrize("spec, message", [
    ("inc8_4_8_2_4", "inc<b1>_<b3r>_<b3>_<b5r>_<b5>_<bp>"),
    ("inc8_0_8_2_4_4", "at least 1"),
    ("res0", "at least 1"),
    ("res16s0", "at least 1"),
    ("res16_bn", "res<c>"),
    ("fc8-res16", "flat"),
    ("fc8-gap", "flat"),
    ("gap-inc1_1_1_1_1_1", "flat"),
])
def test_bad_block_tokens(spec, message):
    with pytest.raises(nn.SpecError, match=message):
        nn.from_spec(spec, (1, 8, 8), 3)


def test_summary_counts_block_parameters_and_mult_adds():
    model = nn.from_spec("inc2_1_2_1_2_1-res4s2-gap", (3, 6, 6), 2, random_state=0)
    info = nn.summary(model, (3, 6, 6))
    assert info.total_params == sum(p.data.size for p in model.parameters())
    inception, residual = info.layers[0], info.layers[1]
    assert inception.kind == "Concat" and inception.output_shape == (7, 6, 6)
    assert residual.kind == "Residual" and residual.output_shape == (4, 3, 3)
    # conv mult-adds by hand: output elements * fan-in; BN one per element.
    inception_convs = 36 * (2 * 3 + 1 * 3 + 2 * 9 + 1 * 3 + 2 * 25 + 1 * 3)
    inception_bn = 36 * (2 + 1 + 2 + 1 + 2 + 1)
    assert inception.mult_adds == inception_convs + inception_bn
    residual_convs = 9 * 4 * (7 * 9 + 4 * 9 + 7)   # 7 channels in, so a projection
    residual_bn = 9 * 4 * 3
    assert residual.mult_adds == residual_convs + residual_bn
    assert info.layers[2].kind == "AdaptiveAvgPool2d" and info.layers[2].mult_adds == 0


# --------------------------------------------------------------------------- determinism
# and training


def _train_steps(spec, n_threads):
    before = _core.get_num_threads()
    _core.set_num_threads(n_threads)
    try:
        model = nn.from_spec(spec, (3, 9, 9), 4, random_state=0)
        crit = nn.CrossEntropyLoss()
        optimizer = __import__("bnrs").optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        data = np.random.default_rng(1)
        for _ in range(3):
            x = data.standard_normal((6, 3, 9, 9)).astype(np.float32)
            target = data.integers(0, 4, 6)
            optimizer.zero_grad()
            crit(model(x), target)
            grad_input = model.backward(crit.backward())
            optimizer.step()
        return model.state_dict(), grad_input
    finally:
        _core.set_num_threads(before)


@pytest.mark.parametrize("spec", ["inc4_2_4_2_4_4-gap", "c4-res4-res8s2-gap"])
def test_same_bits_at_one_and_two_threads(spec):
    state_1, grad_1 = _train_steps(spec, 1)
    state_2, grad_2 = _train_steps(spec, 2)
    np.testing.assert_array_equal(grad_1, grad_2)
    for key in state_1:
        np.testing.assert_array_equal(state_1[key], state_2[key], err_msg=key)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return (X / 16.0).reshape(-1, 8, 8).astype(np.float32), y


@pytest.mark.parametrize("architecture", ["c8-bn-relu-inc4_4_8_2_4_4-mp2-gap",
                                          "c8-bn-relu-res8-res16s2-gap"])
def test_branching_networks_learn_digits(digits, architecture):
    X, y = digits
    clf = CNNClassifier(architecture, max_epochs=4, batch_size=32, learning_rate=3e-3,
                        random_state=0).fit(X[:1000], y[:1000])
    accuracy = clf.score(X[1000:1400], y[1000:1400])
    assert accuracy > 0.6, accuracy   # chance is 0.1


@pytest.mark.parametrize("architecture", ["c4-mp2-mp2-mp2-res4", "c4-mp2-mp2-mp2-inc1_1_1_1_1_1"])
def test_batch_norm_inside_a_block_on_1x1_maps_needs_two_samples(architecture):
    X = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="at least 2 samples per mini-batch"):
        CNNClassifier(architecture, max_epochs=1, batch_size=1).fit(X, [0, 1, 0])
    CNNClassifier(architecture, max_epochs=1, batch_size=2).fit(X, [0, 1, 0])


def test_study_scales_the_initial_weights_inside_blocks():
    from bnrs.study import train

    def build(scale):
        config = train.RunConfig("digits", "", 100, 50, "c4-res4-inc1_1_1_1_1_1-gap",
                                 init_scale=scale)
        return train.build_network(config, (1, 8, 8), 10, seed=3)

    plain, scaled = build(1.0), build(10.0)
    convs = [(name, p) for name, p in plain.named_parameters() if p.data.ndim == 4]
    assert any(".body." in name for name, _ in convs)
    assert any(".branches." in name for name, _ in convs)
    scaled_params = dict(scaled.named_parameters())
    for name, param in convs:
        np.testing.assert_allclose(scaled_params[name].data, 10 * param.data, rtol=1e-6,
                                   err_msg=name)
