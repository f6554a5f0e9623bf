"""Tests of the model summary (bnrs.nn.summary, Module.summary, estimator.summary)."""

import numpy as np
import pytest
from bnrs import nn

# A network with every counted kind of layer; its numbers are counted by hand below.
SPEC = "c4k3p1-bn-relu-mp2-gn2-sd0.1-c6k3s1p0-in-ap2-d0.5-fc10-ln-lrelu"
INPUT_SHAPE = (3, 10, 10)

#: (type, output shape, params, buffers, mult-adds) per layer, for SPEC on 3x10x10 with 5
#: classes.
HAND_COUNTS = [
    ("Conv2d", (4, 10, 10), 4 * 3 * 3 * 3 + 4, 0, (4 * 10 * 10) * (3 * 3 * 3)),
    ("BatchNorm2d", (4, 10, 10), 4 + 4, 4 + 4 + 1, 4 * 10 * 10),
    ("ReLU", (4, 10, 10), 0, 0, 0),
    ("MaxPool2d", (4, 5, 5), 0, 0, 0),
    ("GroupNorm", (4, 5, 5), 4 + 4, 0, 2 * 4 * 5 * 5),
    ("Dropout2d", (4, 5, 5), 0, 0, 0),
    ("Conv2d", (6, 3, 3), 6 * 4 * 3 * 3 + 6, 0, (6 * 3 * 3) * (4 * 3 * 3)),
    ("InstanceNorm2d", (6, 3, 3), 0, 0, 2 * 6 * 3 * 3),
    ("AvgPool2d", (6, 1, 1), 0, 0, 0),
    ("Dropout", (6, 1, 1), 0, 0, 0),
    ("Flatten", (6,), 0, 0, 0),
    ("Linear", (10,), 6 * 10 + 10, 0, 6 * 10),
    ("LayerNorm", (10,), 10 + 10, 0, 2 * 10),
    ("LeakyReLU", (10,), 0, 0, 0),
    ("Linear", (5,), 10 * 5 + 5, 0, 10 * 5),
]


@pytest.fixture
def model():
    return nn.from_spec(SPEC, INPUT_SHAPE, 5, random_state=0)


def test_rows_match_hand_counts(model):
    info = model.summary(INPUT_SHAPE)
    assert [(row.kind, row.output_shape, row.params, row.buffers, row.mult_adds)
            for row in info.layers] == HAND_COUNTS
    assert [row.name for row in info.layers] == [str(i) for i in range(len(HAND_COUNTS))]


def test_totals_match_hand_counts_and_the_model(model):
    info = nn.summary(model, INPUT_SHAPE)
    assert info.total_params == 112 + 8 + 8 + 222 + 70 + 20 + 55 == 495
    assert info.total_params == sum(p.data.size for p in model.parameters())
    assert info.total_buffers == 9 == sum(b.size for b in model.buffers())
    assert info.total_mult_adds == 10800 + 400 + 200 + 1944 + 108 + 60 + 20 + 50 == 13582
    assert info.input_shape == INPUT_SHAPE and info.output_shape == (5,)


def test_the_table_is_a_printable_string(model, capsys):
    info = model.summary(INPUT_SHAPE)
    assert isinstance(info, str)
    lines = info.splitlines()
    assert lines[0].split() == ["Layer", "Type", "Output", "shape", "Params", "Mult-adds"]
    assert lines[2].split() == ["input", "(N,", "3,", "10,", "10)"]
    assert lines[3].split() == ["0", "Conv2d", "(N,", "4,", "10,", "10)", "112", "10,800"]
    assert lines[7].split() == ["4", "GroupNorm", "(N,", "4,", "5,", "5)", "8", "200"]
    assert "Total params: 495 (1,980 bytes as float32)" in lines
    assert "Buffers (running statistics, not trained): 9" in lines
    assert "Mult-adds per sample: 13,582" in lines
    assert lines[-1] == "Output shape: (N, 5)"
    print(info)
    assert capsys.readouterr().out == info + "\n"


def test_summary_does_not_run_or_change_the_model(model):
    before = model.state_dict()
    model.summary(INPUT_SHAPE)
    assert model.training
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())


def test_nested_sequential_and_a_single_layer():
    inner = nn.Sequential(nn.Linear(4, 3, random_state=0), nn.ReLU())
    model = nn.Sequential(inner, nn.Linear(3, 2, random_state=1))
    info = model.summary((4,))
    assert [(row.name, row.kind, row.params, row.mult_adds) for row in info.layers] == [
        ("0.0", "Linear", 15, 12), ("0.1", "ReLU", 0, 0), ("1", "Linear", 8, 6)]
    single = nn.Conv2d(2, 3, 3, random_state=0).summary((2, 5, 5))
    assert [(row.name, row.output_shape, row.mult_adds) for row in single.layers] == [
        ("Conv2d", (3, 3, 3), 27 * 18)]


def test_bad_input_shape_is_the_layers_error(model):
    with pytest.raises(ValueError, match="Conv2d"):
        model.summary((1, 10, 10))
    with pytest.raises(TypeError, match="input_shape"):
        model.summary(None)


def test_a_container_other_than_sequential_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("conv", nn.Conv2d(1, 1, 1, random_state=0))

    with pytest.raises(TypeError, match="only Sequential"):
        nn.summary(Block(), (1, 4, 4))


def test_fitted_estimator_summary():
    from bnrs import CNNClassifier
    from sklearn.exceptions import NotFittedError

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 1, 6, 6)).astype(np.float32)
    y = np.arange(40) % 3
    clf = CNNClassifier("c4-bn-relu-mp2-fc8", max_epochs=1, random_state=0)
    with pytest.raises(NotFittedError):
        clf.summary()
    info = clf.fit(X, y).summary()
    assert info == clf.model_.summary((1, 6, 6))
    assert info.total_params == (4 * 9 + 4) + 8 + (36 * 8 + 8) + (8 * 3 + 3)
    assert info.output_shape == (3,)
