"""Tests of the architecture grammar (bnrs.nn.spec): parsing, building, errors."""

import numpy as np
import pytest
from bnrs import nn
from bnrs.nn.spec import DEFAULT_ARCHITECTURE, SpecError, from_spec, parse


def kinds(model):
    return [type(m).__name__ for m in model]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,kind,args", [
    ("c16", "conv", {"out_channels": 16, "kernel_size": 3, "stride": 1, "padding": 1}),
    ("c8k5", "conv", {"out_channels": 8, "kernel_size": 5, "stride": 1, "padding": 2}),
    ("c8k4", "conv", {"out_channels": 8, "kernel_size": 4, "stride": 1, "padding": 2}),
    ("c8s2", "conv", {"out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1}),
    ("c8p0", "conv", {"out_channels": 8, "kernel_size": 3, "stride": 1, "padding": 0}),
    ("c32k1s1p0", "conv", {"out_channels": 32, "kernel_size": 1, "stride": 1, "padding": 0}),
    ("fc128", "fc", {"units": 128}),
    ("bn", "bn", {}),
    ("d0.25", "dropout", {"p": 0.25}),
    ("d.5", "dropout", {"p": 0.5}),
    ("d0", "dropout", {"p": 0.0}),
    ("sd0.1", "spatial_dropout", {"p": 0.1}),
    ("mp2", "maxpool", {"kernel_size": 2, "stride": 2}),
    ("mp3s2", "maxpool", {"kernel_size": 3, "stride": 2}),
    ("ap2", "avgpool", {"kernel_size": 2, "stride": 2}),
    ("ap3s1", "avgpool", {"kernel_size": 3, "stride": 1}),
    ("relu", "relu", {}),
    ("lrelu", "lrelu", {}),
    ("sigmoid", "sigmoid", {}),
    ("tanh", "tanh", {}),
])
def test_every_token_kind_and_its_defaults(text, kind, args):
    (token,) = parse(text)
    assert (token.kind, token.text, token.args, token.index, token.offset) == (
        kind, text, args, 0, 0)


@pytest.mark.parametrize("text,kind,args", [
    ("bnm0.01", "bn", {"momentum": 0.01}),
    ("bnm0", "bn", {"momentum": 0.0}),
    ("bnm1", "bn", {"momentum": 1.0}),
    ("bne1e-3", "bn", {"eps": 1e-3}),
    ("bne0.001", "bn", {"eps": 1e-3}),
    ("bnm.5e.5e-4", "bn", {"momentum": 0.5, "eps": 5e-5}),
    ("bnm0.01e1e-3", "bn", {"momentum": 0.01, "eps": 1e-3}),
    ("bnm1e-2e1e-5", "bn", {"momentum": 0.01, "eps": 1e-5}),
    ("brn", "brn", {}),
    ("brnr2d1", "brn", {"r_max": 2.0, "d_max": 1.0}),
    ("brnr1d0", "brn", {"r_max": 1.0, "d_max": 0.0}),
    ("brnd0", "brn", {"d_max": 0.0}),
    ("brnm0.05e1e-4r3d5", "brn", {"momentum": 0.05, "eps": 1e-4, "r_max": 3.0,
                                  "d_max": 5.0}),
])
def test_batch_norm_options(text, kind, args):
    (token,) = parse(text)
    assert (token.kind, token.text, token.args) == (kind, text, args)


def test_an_exponent_minus_is_not_a_separator():
    spec = "c8-bnm0.01e1e-3-relu-fc4-brne1e-4r2-d0.5"
    tokens = parse(spec)
    assert [t.text for t in tokens] == ["c8", "bnm0.01e1e-3", "relu", "fc4", "brne1e-4r2",
                                        "d0.5"]
    assert [t.index for t in tokens] == list(range(6))
    assert [spec[t.offset:t.offset + len(t.text)] for t in tokens] == [t.text for t in tokens]
    assert "-".join(t.text for t in tokens) == spec


def test_batch_norm_options_reach_the_layers():
    model = from_spec("c4-bnm0.01e1e-3-relu-brnm0.05e1e-4r2d1-fc8-bne0.01-brnd0",
                      (1, 6, 6), 2, random_state=0)
    bn2d, brn2d, bn1d, brn1d = (m for m in model
                                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)))
    assert type(bn2d) is nn.BatchNorm2d and (bn2d.momentum, bn2d.eps) == (0.01, 1e-3)
    assert type(brn2d) is nn.BatchRenorm2d
    assert (brn2d.momentum, brn2d.eps, brn2d.r_max, brn2d.d_max) == (0.05, 1e-4, 2.0, 1.0)
    assert type(bn1d) is nn.BatchNorm1d and (bn1d.momentum, bn1d.eps) == (0.1, 0.01)
    assert type(brn1d) is nn.BatchRenorm1d
    assert (brn1d.momentum, brn1d.eps, brn1d.r_max, brn1d.d_max) == (0.01, 1e-5, 3.0, 0.0)


def test_written_defaults_build_the_same_network():
    plain = from_spec("c4-bn-relu-fc8-brn", (1, 6, 6), 2, random_state=3)
    explicit = from_spec("c4-bnm0.1e1e-5-relu-fc8-brnm0.01e1e-5r3d5", (1, 6, 6), 2,
                         random_state=3)
    assert [repr(m) for m in plain] == [repr(m) for m in explicit]
    x = np.random.default_rng(0).standard_normal((5, 1, 6, 6)).astype(np.float32)
    for model in (plain, explicit):
        model(x)
    for (key, a), (_, b) in zip(plain.state_dict().items(), explicit.state_dict().items()):
        assert np.array_equal(a, b), key


def test_parse_gives_positions():
    tokens = parse("c16-bn-relu-mp2")
    assert [t.text for t in tokens] == ["c16", "bn", "relu", "mp2"]
    assert [t.index for t in tokens] == [0, 1, 2, 3]
    assert [t.offset for t in tokens] == [0, 4, 7, 12]
    assert parse("") == []


def test_default_architecture_constant():
    assert DEFAULT_ARCHITECTURE == "c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5"
    assert nn.DEFAULT_ARCHITECTURE == DEFAULT_ARCHITECTURE
    assert len(parse(DEFAULT_ARCHITECTURE)) == 13


# --------------------------------------------------------------------------- building


def test_default_architecture_builds_and_runs():
    model = from_spec(DEFAULT_ARCHITECTURE, (3, 32, 32), 10, random_state=0)
    assert kinds(model) == [
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU",
        "MaxPool2d", "Dropout", "Flatten", "Linear", "BatchNorm1d", "ReLU", "Dropout",
        "Linear"]
    assert (model[0].in_channels, model[0].out_channels, model[0].padding) == (3, 16, (1, 1))
    assert model[4].in_channels == 16
    assert (model[10].in_features, model[10].out_features) == (32 * 8 * 8, 128)
    assert model[11].num_features == 128
    assert (model[14].in_features, model[14].out_features) == (128, 10)
    assert (model[8].p, model[13].p) == (0.25, 0.5)
    x = np.zeros((2, 3, 32, 32), np.float32)
    assert model(x).shape == (2, 10)
    assert model.training


def test_shapes_are_tracked_through_every_layer_kind():
    spec = "c6k5s2p0-lrelu-sd0.2-ap2s1-c4k1-tanh-mp2-bn-fc7-sigmoid-d0.1-bn-fc5-relu"
    model = from_spec(spec, (2, 17, 15), 3, random_state=0)
    assert kinds(model) == [
        "Conv2d", "LeakyReLU", "Dropout2d", "AvgPool2d", "Conv2d", "Tanh", "MaxPool2d",
        "BatchNorm2d", "Flatten", "Linear", "Sigmoid", "Dropout", "BatchNorm1d", "Linear",
        "ReLU", "Linear"]
    # 17x15 -> conv k5 s2: 7x6 -> ap2 s1: 6x5 -> c4k1: 6x5 -> mp2: 3x2
    assert model[7].num_features == 4
    assert model[9].in_features == 4 * 3 * 2
    assert model.output_shape((2, 17, 15)) == (3,)
    assert model(np.ones((3, 2, 17, 15), np.float32)).shape == (3, 3)


def test_output_layer_gets_a_flatten_when_needed():
    assert kinds(from_spec("c4", (1, 5, 5), 2)) == ["Conv2d", "Flatten", "Linear"]
    assert kinds(from_spec("fc4", (1, 5, 5), 2)) == ["Flatten", "Linear", "Linear"]
    assert kinds(from_spec("", (1, 5, 5), 2)) == ["Flatten", "Linear"]
    assert from_spec("", (1, 5, 5), 2)[1].in_features == 25


def test_feature_vector_input():
    model = from_spec("fc8-bn-relu-d0.5", (6,), 3, random_state=0)
    assert kinds(model) == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert model(np.ones((4, 6), np.float32)).shape == (4, 3)


def test_same_random_state_builds_the_same_network():
    a = from_spec(DEFAULT_ARCHITECTURE, (1, 12, 12), 4, random_state=7)
    b = from_spec(DEFAULT_ARCHITECTURE, (1, 12, 12), 4, random_state=np.random.default_rng(7))
    c = from_spec(DEFAULT_ARCHITECTURE, (1, 12, 12), 4, random_state=8)
    for key, value in a.state_dict().items():
        assert np.array_equal(value, b.state_dict()[key])
    assert not np.array_equal(a[0].weight.data, c[0].weight.data)
    # Layers draw from one generator in order: the two convolutions differ.
    assert not np.array_equal(a[0].weight.data[:, :1].ravel()[:8],
                              a[4].weight.data[:8, :1].ravel())


def test_from_spec_accepts_parsed_tokens():
    tokens = parse("c4-relu")
    assert kinds(from_spec(tokens, (1, 4, 4), 2)) == ["Conv2d", "ReLU", "Flatten", "Linear"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("spec,bad,number,expected", [
    ("c16-bx-relu", "bx", 2, "unknown token; expected one of c<out>"),
    ("c16-conv3", "conv3", 2, r"expected c<out>\[k<size>\]\[s<stride>\]\[p<pad>\]"),
    ("c16k-relu", "c16k", 1, r"expected c<out>\[k<size>\]"),
    ("c16p1k3", "c16p1k3", 1, r"expected c<out>\[k<size>\]"),
    ("fc", "fc", 1, "expected fc<units>"),
    ("fc12.5", "fc12.5", 1, "expected fc<units>"),
    ("relu-d", "d", 2, "expected d<p>"),
    ("sdx", "sdx", 1, "expected sd<p>"),
    ("mp2x2", "mp2x2", 1, r"expected mp<k>\[s<s>\]"),
    ("ap", "ap", 1, r"expected ap<k>\[s<s>\]"),
    ("RELU", "RELU", 1, "unknown token"),
    ("c0", "c0", 1, "at least 1"),
    ("c8k0", "c8k0", 1, "at least 1"),
    ("c8s0", "c8s0", 1, "at least 1"),
    ("fc0", "fc0", 1, "at least 1"),
    ("mp0", "mp0", 1, "at least 1"),
    ("mp2s0", "mp2s0", 1, "at least 1"),
    ("d1", "d1", 1, r"dropout probability must be in \[0, 1\)"),
    ("sd1.5", "sd1.5", 1, r"dropout probability must be in \[0, 1\)"),
    ("c16--relu", "", 2, "empty token"),
    ("c16-", "", 2, "empty token"),
    ("c8-bnm1.5-relu", "bnm1.5", 2,
     r"momentum \(m\) must be a finite real number in \[0, 1\], got 1.5"),
    ("bne0", "bne0", 1, r"eps \(e\) must be a finite real number in \(0, inf\), got 0"),
    ("c8-bne0e-3-relu", "bne0e-3", 2, r"eps \(e\) must be .* got 0e-3"),
    ("bne1e-400", "bne1e-400", 1, r"eps \(e\) must be .* got 1e-400"),
    ("brnm0", "brnm0", 1, r"momentum \(m\) must be a finite real number in \(0, 1\]"),
    ("c8-brnr0.5", "brnr0.5", 2, r"r_max \(r\) must be a finite real number in \[1, inf\)"),
    ("brnm0.1e1e-5r9" + "9" * 400, "brnm0.1e1e-5r9" + "9" * 400, 1,
     r"r_max \(r\) must be a finite real number"),
    ("bnx", "bnx", 1, r"expected bn\[m<momentum>\]\[e<eps>\] \(e.g. bn, bnm0.01"),
    ("bnm", "bnm", 1, r"expected bn\[m<momentum>\]\[e<eps>\]"),
    ("bne1e5", "bne1e5", 1, r"expected bn\[m<momentum>\]\[e<eps>\]"),
    ("bne1e+5", "bne1e+5", 1, r"expected bn\[m<momentum>\]\[e<eps>\]"),
    ("bnm0.1m0.2", "bnm0.1m0.2", 1, r"expected bn\[m<momentum>\]"),
    ("bnr3", "bnr3", 1, r"expected bn\[m<momentum>\]\[e<eps>\]"),
    ("brnd5r3", "brnd5r3", 1,
     r"expected brn\[m<momentum>\]\[e<eps>\]\[r<r_max>\]\[d<d_max>\]"),
    ("c8-bne1e-3-", "", 3, "empty token"),
    ("relu-d1e-3", "d1e-3", 2, "expected d<p>"),
])
def test_bad_tokens_are_pointed_at(spec, bad, number, expected):
    with pytest.raises(SpecError, match=expected) as info:
        parse(spec)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.text == bad and error.token_index == number - 1
    assert spec[error.offset:error.offset + len(bad)] == bad
    message = str(error)
    assert f"bad token {bad!r} (token {number}, character {error.offset + 1})" in message
    assert repr(spec) in message
    assert " " * error.offset + "^" in message.splitlines()[-1]
    with pytest.raises(SpecError):
        from_spec(spec, (1, 8, 8), 2)


@pytest.mark.parametrize("spec,bad,expected", [
    ("c4-mp2-mp2-mp2", "mp2", "spatial size shrinks below 1"),
    ("c4k9p0", "c4k9p0", "spatial size shrinks below 1"),
    ("fc8-c4", "c4", r"needs a \(C, H, W\) feature map"),
    ("fc8-mp2", "mp2", "feature map"),
    ("fc8-ap2", "ap2", "feature map"),
    ("fc8-sd0.1", "sd0.1", "feature map"),
])
def test_shape_errors_point_at_the_token(spec, bad, expected):
    with pytest.raises(SpecError, match=expected) as info:
        from_spec(spec, (1, 4, 4), 2)
    error = info.value
    assert error.text == bad
    assert error.token_index == len(spec.split("-")) - 1
    assert error.offset == spec.rindex(bad)


def test_spatial_dropout_needs_a_feature_map_even_at_the_start():
    with pytest.raises(SpecError, match="feature map"):
        from_spec("sd0.1", (6,), 2)


@pytest.mark.parametrize("kwargs", [
    {"input_shape": (3, 8)}, {"input_shape": (0, 8, 8)}, {"n_classes": 0},
    {"n_classes": 2.5}])
def test_bad_arguments(kwargs):
    arguments = {"spec": "c4", "input_shape": (1, 8, 8), "n_classes": 2, **kwargs}
    with pytest.raises(ValueError):
        from_spec(**arguments)


def test_non_string_spec_is_a_type_error():
    with pytest.raises(TypeError):
        parse(42)
