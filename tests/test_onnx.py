"""Tests of the ONNX export (bnrs.onnx): the file runs in ONNX Runtime with bnrs's outputs.

Run where the ``onnx`` extra and ONNX Runtime are installed (``pip install "bnrs[onnx]"
onnxruntime``); elsewhere only the import-error test runs.
"""

import json
import sys

import numpy as np
import pytest
from bnrs import nn
from bnrs import onnx as bnrs_onnx

#: A network of every exported layer kind, the per-sample norms after conv and dense layers.
SPEC = ("c4k3p1-bn-relu-mp2-gn2-sd0.1-c6k3s1p0-in-ap2s1-d0.5-brn-fc10-ln-lrelu-fc8-bn"
        "-sigmoid-gn2-tanh")
INPUT_SHAPE = (3, 10, 10)


@pytest.fixture
def ort():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


def run(ort, model_proto, x):
    session = ort.InferenceSession(model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


def trained(model, input_shape, steps=3, seed=1):
    """``model`` after a few training forwards (running statistics away from 0 and 1),
    then in evaluation mode."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        model(rng.standard_normal((16, *input_shape)).astype(np.float32) * 2 + 0.5)
    return model.eval()


def assert_float32_close(actual, expected):
    # Different summation orders in float32: a few ulps of the values' scale.
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=4e-6 * scale)


@pytest.mark.parametrize("batch", [1, 7])
def test_network_matches_in_onnx_runtime(ort, tmp_path, batch):
    model = trained(nn.from_spec(SPEC, INPUT_SHAPE, 5, random_state=0), INPUT_SHAPE)
    path = tmp_path / "model.onnx"
    proto = bnrs_onnx.export(model, path, input_shape=INPUT_SHAPE)
    x = np.random.default_rng(2).standard_normal((batch, *INPUT_SHAPE)).astype(np.float32)
    (output,) = run(ort, proto, x)
    assert output.shape == (batch, 5) and output.dtype == np.float32
    assert_float32_close(output, model(x))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["N", *INPUT_SHAPE]
    assert [o.name for o in session.get_outputs()] == ["output"]
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], output)


def test_operators_of_the_default_opset(ort):
    import onnx

    model = trained(nn.from_spec(SPEC, INPUT_SHAPE, 5, random_state=0), INPUT_SHAPE)
    proto = bnrs_onnx.export(model, None, input_shape=INPUT_SHAPE)
    ops = [node.op_type for node in proto.graph.node]
    assert ops == [
        "Conv", "BatchNormalization", "Relu", "MaxPool",
        "Reshape", "LayerNormalization", "Reshape", "Mul", "Add",   # gn2 below opset 21
        "Conv", "InstanceNormalization", "AveragePool", "BatchNormalization", "Flatten",
        "Gemm", "LayerNormalization", "LeakyRelu", "Gemm", "BatchNormalization", "Sigmoid",
        "Reshape", "LayerNormalization", "Reshape", "Mul", "Add", "Tanh", "Gemm",
        "Identity"]
    assert proto.opset_import[0].version == bnrs_onnx.DEFAULT_OPSET == 17
    assert proto.ir_version == onnx.helper.find_min_ir_version_for(list(proto.opset_import))
    pool = next(n for n in proto.graph.node if n.op_type == "AveragePool")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in pool.attribute}
    assert attributes["count_include_pad"] == 1 and attributes["kernel_shape"] == [2, 2]
    assert proto.producer_name == "bnrs"


@pytest.mark.parametrize("opset", [18, 19, 20, 21])
def test_other_opsets(ort, opset):
    model = trained(nn.from_spec(SPEC, INPUT_SHAPE, 5, random_state=0), INPUT_SHAPE)
    proto = bnrs_onnx.export(model, None, input_shape=INPUT_SHAPE, opset=opset)
    ops = [node.op_type for node in proto.graph.node]
    assert ("GroupNormalization" in ops) == (opset >= 21)
    x = np.random.default_rng(2).standard_normal((6, *INPUT_SHAPE)).astype(np.float32)
    (output,) = run(ort, proto, x)
    if opset < 21:
        assert_float32_close(output, model(x))
    else:
        # ONNX Runtime's GroupNormalization is less accurate than the layer-norm form
        # (see the module docstring); on these inputs it stays within 2e-5.
        np.testing.assert_allclose(output, model(x), rtol=0, atol=2e-5)


def test_layer_options_and_the_other_forms(ort):
    """Padding, dilation, no bias, count_include_pad=False, a partial Flatten, Linear on
    3-D input (MatMul), 3-D batch norm, multi-axis layer norm, affine instance norm."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2, bias=False, random_state=0),
        nn.InstanceNorm2d(3, affine=True),
        nn.MaxPool2d(3, 2, padding=1),
        nn.AvgPool2d(3, 1, padding=1, count_include_pad=False),
        nn.AvgPool2d(2, 1, padding=1),
        nn.Flatten(2),                         # (N, 3, H*W)
        nn.Linear(20, 4, bias=False, random_state=1),
        nn.Linear(4, 2, random_state=2),       # (N, 3, 2)
        nn.BatchNorm1d(3),
        nn.LayerNorm([3, 2]),
        # Over all 6 values of the layer-normalised sample: groups of 2 of them can have a
        # variance near eps, where float32 rounding of the input is amplified 100-fold.
        nn.GroupNorm(1, 3),
        nn.Flatten(),
        nn.ReLU(),
    )
    for module in model:
        if getattr(module, "weight", None) is not None and isinstance(
                module, (nn.InstanceNorm2d, nn.LayerNorm, nn.GroupNorm)):
            rng = np.random.default_rng(3)
            module.weight.data[...] = rng.uniform(0.5, 2, module.weight.shape)
            module.bias.data[...] = rng.uniform(-1, 1, module.bias.shape)
    model = trained(model, (2, 13, 11))
    assert model.output_shape((2, 13, 11)) == (6,)
    proto = bnrs_onnx.export(model, None, input_shape=(2, 13, 11))
    ops = [node.op_type for node in proto.graph.node]
    assert ops[:6] == ["Conv", "InstanceNormalization", "MaxPool", "AveragePool",
                       "AveragePool", "Reshape"]
    assert ops[6:10] == ["MatMul", "MatMul", "Add", "BatchNormalization"]
    x = np.random.default_rng(4).standard_normal((5, 2, 13, 11)).astype(np.float32)
    (output,) = run(ort, proto, x)
    assert_float32_close(output, model(x))


def test_export_uses_running_statistics_and_leaves_the_model_alone(ort):
    model = trained(nn.from_spec("c4-bn-relu-d0.5-fc6-brn", (1, 6, 6), 3, random_state=0),
                    (1, 6, 6))
    model.train()
    before = model.state_dict()
    proto = bnrs_onnx.export(model, None, input_shape=(1, 6, 6))
    assert model.training
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    x = np.random.default_rng(5).standard_normal((4, 1, 6, 6)).astype(np.float32)
    (output,) = run(ort, proto, x)
    assert_float32_close(output, model.eval()(x))


def test_classifier_gives_logits_and_probabilities(ort, tmp_path):
    from bnrs import CNNClassifier

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 1, 8, 8)).astype(np.float32)
    y = np.array(["cat", "dog", "emu"])[np.arange(60) % 3]
    X[y == "dog", :, :4] += 1.0
    clf = CNNClassifier("c4-bn-relu-mp2-gn2-fc8-bn-relu-d0.2", max_epochs=3,
                        random_state=0).fit(X, y)
    proto = bnrs_onnx.export(clf, tmp_path / "clf.onnx")
    logits, probabilities = run(ort, proto, X[:9])
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    np.testing.assert_allclose(probabilities, clf.predict_proba(X[:9]), rtol=0, atol=1e-6)
    metadata = {p.key: p.value for p in proto.metadata_props}
    classes = np.array(json.loads(metadata["classes"]))
    np.testing.assert_array_equal(classes, clf.classes_)
    np.testing.assert_array_equal(classes[logits.argmax(axis=1)], clf.predict(X[:9]))
    assert metadata["architecture"] == clf.architecture
    assert metadata["data_format"] == "channels_first"


def test_regressor_gives_predictions(ort):
    from bnrs import CNNRegressor

    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 12)).astype(np.float32)
    y = X[:, :3].sum(axis=1)
    reg = CNNRegressor("fc16-ln-relu-fc8-bn-tanh", max_epochs=3, random_state=0).fit(X, y)
    proto = bnrs_onnx.export(reg, None)
    (predictions,) = run(ort, proto, X[:7])
    assert predictions.shape == (7, 1)
    np.testing.assert_allclose(predictions.ravel(), reg.predict(X[:7]), rtol=0, atol=1e-5)


def test_refusals(ort):
    from bnrs import CNNClassifier
    from sklearn.exceptions import NotFittedError

    model = nn.from_spec("c4-bn-relu", (1, 6, 6), 2, random_state=0)
    with pytest.raises(TypeError, match="input_shape"):
        bnrs_onnx.export(model, None)
    with pytest.raises(ValueError, match="Conv2d"):
        bnrs_onnx.export(model, None, input_shape=(2, 6, 6))
    for opset in (16, 22, 17.0, True):
        with pytest.raises(ValueError, match="opset"):
            bnrs_onnx.export(model, None, input_shape=(1, 6, 6), opset=opset)
    batch_stats = nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(NotImplementedError, match="running statistics"):
        bnrs_onnx.export(batch_stats, None, input_shape=(4,))

    class Square(nn.Module):
        def output_shape(self, input_shape):
            return tuple(input_shape)

    with pytest.raises(NotImplementedError, match="1: Square has no ONNX export"):
        bnrs_onnx.export(nn.Sequential(nn.ReLU(), Square()), None, input_shape=(4,))
    block = nn.Module()
    block.add_module("conv", nn.Conv2d(1, 1, 1, random_state=0))
    with pytest.raises(TypeError, match="only Sequential"):
        bnrs_onnx.export(block, None, input_shape=(1, 4, 4))
    with pytest.raises(NotImplementedError, match="batch axis"):
        bnrs_onnx.export(nn.Sequential(nn.Flatten(0)), None, input_shape=(4,))
    with pytest.raises(NotFittedError):
        bnrs_onnx.export(CNNClassifier(), None)
    X = np.random.default_rng(0).standard_normal((20, 1, 6, 6)).astype(np.float32)
    clf = CNNClassifier("c2-relu", max_epochs=1, random_state=0).fit(X, np.arange(20) % 2)
    with pytest.raises(ValueError, match=r"fitted on samples of shape \(1, 6, 6\)"):
        bnrs_onnx.export(clf, None, input_shape=(36,))
    with pytest.raises(TypeError, match="model_or_estimator"):
        bnrs_onnx.export("model", None, input_shape=(4,))


def test_without_onnx_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)   # makes `import onnx` fail
    model = nn.Sequential(nn.ReLU())
    with pytest.raises(ImportError, match=r'pip install "bnrs\[onnx\]"'):
        bnrs_onnx.export(model, None, input_shape=(4,))


#: Inception and residual blocks, with BN before the ReLU, none, or after it.
BRANCHING_SPECS = [f"c8-bn-relu-inc4_4_8_2_4_4{norm}-mp2-gap" for norm in
                   ("", "_nobn", "_postbn")] + [f"c8-bn-relu-res8{norm}-res16s2{norm}-gap"
                                                for norm in ("", "_nobn", "_postbn")]
BRANCHING_INPUT_SHAPE = (3, 9, 9)


@pytest.mark.parametrize("opset", range(bnrs_onnx.DEFAULT_OPSET, 22))
@pytest.mark.parametrize("spec", BRANCHING_SPECS)
def test_branching_networks_match_in_onnx_runtime(ort, spec, opset):
    model = trained(nn.from_spec(spec, BRANCHING_INPUT_SHAPE, 5, random_state=0),
                    BRANCHING_INPUT_SHAPE)
    proto = bnrs_onnx.export(model, None, input_shape=BRANCHING_INPUT_SHAPE, opset=opset)
    ops = [node.op_type for node in proto.graph.node]
    assert "GlobalAveragePool" in ops
    assert ("Concat" in ops) == ("inc" in spec) and ("Add" in ops) == ("res" in spec)
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal(
            (batch, *BRANCHING_INPUT_SHAPE)).astype(np.float32)
        (output,) = run(ort, proto, x)
        assert output.shape == (batch, 5)
        # The model's own evaluation output, fused or not: what its user gets.
        assert_float32_close(output, model(x))


#: Depthwise-separable convolutions (Conv with group = C), plain and inside the blocks.
SEPARABLE_SPECS = ["dsc8-bn-relu-dsc12s2_bn-relu-dsc6k5p1-gap",
                   "c8-bn-relu-inc4_4_8_2_4_4_dsc-res8_dsc-res12s2_postbn_dsc-gap"]


@pytest.mark.parametrize("spec", SEPARABLE_SPECS)
def test_separable_networks_match_in_onnx_runtime(ort, spec):
    model = trained(nn.from_spec(spec, BRANCHING_INPUT_SHAPE, 5, random_state=0),
                    BRANCHING_INPUT_SHAPE)
    proto = bnrs_onnx.export(model, None, input_shape=BRANCHING_INPUT_SHAPE)
    groups = sorted({attribute.i for node in proto.graph.node if node.op_type == "Conv"
                     for attribute in node.attribute if attribute.name == "group"})
    assert groups[0] == 1 and len(groups) > 1
    x = np.random.default_rng(3).standard_normal((4, *BRANCHING_INPUT_SHAPE)).astype(
        np.float32)
    (output,) = run(ort, proto, x)
    assert_float32_close(output, model(x))


def test_branch_graph_structure(ort):
    """Each Concat branch and both Residual paths read the block's input tensor; the
    identity shortcut adds that tensor itself; the activation follows the Add."""
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, random_state=0),
        nn.Concat(nn.Sequential(nn.Conv2d(4, 3, 1, random_state=1), nn.ReLU()),
                  nn.MaxPool2d(3, 1, 1),
                  nn.Sequential(nn.Sequential(nn.Conv2d(4, 2, 3, padding=1,
                                                        random_state=2)))),
        nn.Residual(nn.Sequential(nn.Conv2d(9, 9, 3, padding=1, random_state=3),
                                  nn.BatchNorm2d(9)), activation=nn.ReLU()),
        nn.Residual(nn.Conv2d(9, 6, 1, stride=2, random_state=4),
                    nn.Conv2d(9, 6, 1, stride=2, random_state=5)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    model = trained(model, (2, 6, 6))
    proto = bnrs_onnx.export(model, None, input_shape=(2, 6, 6))
    nodes = list(proto.graph.node)
    assert [n.op_type for n in nodes] == [
        "Conv", "Conv", "Relu", "MaxPool", "Conv", "Concat",
        "Conv", "BatchNormalization", "Add", "Relu",
        "Conv", "Conv", "Add", "GlobalAveragePool", "Flatten", "Identity"]
    conv_out = nodes[0].output[0]
    assert [nodes[i].input[0] for i in (1, 3, 4)] == [conv_out] * 3
    assert list(nodes[5].input) == [nodes[2].output[0], nodes[3].output[0],
                                    nodes[4].output[0]]
    assert nodes[6].input[0] == nodes[5].output[0]
    assert list(nodes[8].input) == [nodes[7].output[0], nodes[5].output[0]]
    assert nodes[9].input[0] == nodes[8].output[0]
    assert nodes[10].input[0] == nodes[11].input[0] == nodes[9].output[0]
    assert list(nodes[12].input) == [nodes[10].output[0], nodes[11].output[0]]
    assert nodes[0].name != nodes[1].name
    x = np.random.default_rng(6).standard_normal((3, 2, 6, 6)).astype(np.float32)
    (output,) = run(ort, proto, x)
    assert output.shape == (3, 6)
    assert_float32_close(output, model(x))


def test_estimators_with_branching_architectures(ort):
    from bnrs import CNNClassifier, CNNRegressor

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 8, 8, 1)).astype(np.float32)   # channels last
    y = np.arange(40) % 3
    clf = CNNClassifier("c4-bn-relu-inc2_2_4_2_2_2-res8s2_postbn-gap", max_epochs=2,
                        random_state=0).fit(X, y)
    proto = bnrs_onnx.export(clf, None)
    logits, probabilities = run(ort, proto, X[:7].transpose(0, 3, 1, 2).copy())
    np.testing.assert_allclose(probabilities, clf.predict_proba(X[:7]), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(clf.classes_[logits.argmax(axis=1)], clf.predict(X[:7]))
    reg = CNNRegressor("c4-relu-res4_nobn-inc2_2_2_2_2_2_nobn-gap", max_epochs=2,
                       random_state=0).fit(X, y.astype(np.float32))
    (predictions,) = run(ort, bnrs_onnx.export(reg, None), X[:7].transpose(0, 3, 1, 2).copy())
    np.testing.assert_allclose(predictions.ravel(), reg.predict(X[:7]), rtol=0, atol=1e-5)


def test_unsupported_layer_in_a_branch_is_named_by_its_path(ort):
    class Square(nn.Module):
        def output_shape(self, input_shape):
            return tuple(input_shape)

    model = nn.Sequential(nn.ReLU(), nn.Residual(nn.Sequential(nn.ReLU(), Square())))
    with pytest.raises(NotImplementedError, match=r"1\.body\.1: Square has no ONNX export"):
        bnrs_onnx.export(model, None, input_shape=(4,))
    model = nn.Sequential(nn.Concat(nn.ReLU(), nn.Sequential(Square())))
    with pytest.raises(NotImplementedError,
                       match=r"0\.branches\.1\.0: Square has no ONNX export"):
        bnrs_onnx.export(model, None, input_shape=(4,))
