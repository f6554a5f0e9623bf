"""Per-layer diagnostics (bnrs.diagnostics), the estimator's record_layer_stats, and
question 10 of the study (bnrs.study.questions) end to end on a tiny budget.

Everything uses scikit-learn's 8x8 digits and a few epochs; the file runs in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from bnrs import CNNClassifier, nn
from bnrs.diagnostics import (
    layer_statistics,
    plot_layer_statistics,
    probe_indices,
    run_recorder,
    stack_statistics,
)
from sklearn.datasets import load_digits

#: BN and both kinds of dropout: every piece of state the probe must leave alone.
ARCHITECTURE = "c6-bn-relu-sd0.1-mp2-c8-bn-relu-mp2-d0.2-fc16-bn-relu-d0.5"
KEYS = ["name", "kind", "weight_grad_norm", "activation_mean", "activation_std"]


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return (X[:400] / 16.0).reshape(-1, 1, 8, 8).astype(np.float32), y[:400]


def _state(model: nn.Sequential) -> dict:
    return {key: value.copy() for key, value in model.state_dict().items()}


# --------------------------------------------------------------------------- layer_statistics


def test_layer_statistics_on_a_plain_sequential(digits):
    X, y = digits
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32, random_state=0), nn.Tanh(),
                          nn.Dropout(0.5, random_state=1),
                          nn.Linear(32, 10, random_state=2))
    stats = layer_statistics(model, X[:64], y[:64])
    assert [(s["name"], s["kind"]) for s in stats] == [
        ("1", "Linear"), ("2", "Tanh"), ("4", "Linear")]
    assert all(list(s) == KEYS for s in stats)
    assert stats[1]["weight_grad_norm"] is None
    for s in stats:
        assert all(math.isfinite(s[k]) for k in KEYS[2:] if s[k] is not None)
        assert s["activation_std"] > 0
    # The numbers are those of a direct computation: the output layer's gradient.
    hidden = np.tanh(X[:64].reshape(64, -1) @ model[1].weight.data.T + model[1].bias.data)
    logits = hidden @ model[4].weight.data.T + model[4].bias.data
    proba = np.exp(logits - logits.max(1, keepdims=True))
    proba /= proba.sum(1, keepdims=True)
    proba[np.arange(64), y[:64]] -= 1
    expected = np.linalg.norm(proba.T @ hidden / 64)
    assert stats[2]["weight_grad_norm"] == pytest.approx(expected, rel=1e-4)
    assert stats[1]["activation_mean"] == pytest.approx(hidden.mean(), rel=1e-4, abs=1e-6)


def test_layer_statistics_leaves_the_network_unchanged(digits):
    X, y = digits
    model = nn.from_spec(ARCHITECTURE, (1, 8, 8), 10, random_state=0)
    criterion = nn.CrossEntropyLoss()
    criterion(model(X[:32]), y[:32])          # leave some gradient in param.grad
    model.backward(criterion.backward(), input_grad=False)
    model.eval()
    grads = [p.grad.copy() for p in model.parameters()]
    state = _state(model)
    dropout_rngs = [m._rng.bit_generator.state for m in model.modules()
                    if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    stats = layer_statistics(model, X[:64], y[:64])
    assert len(stats) == 3 * 3 + 1           # 3 x (weight, BN, ReLU) + output layer
    assert not any(m.training for m in model.modules())
    assert all(np.array_equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    after = model.state_dict()
    assert all(np.array_equal(state[k], after[k]) for k in state)
    assert int(after["1.num_batches_tracked"]) == 1          # the one training forward
    assert dropout_rngs == [m._rng.bit_generator.state for m in model.modules()
                            if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    # Training mode for BN: batch statistics (eval mode would see running ones).
    model.train()
    assert layer_statistics(model, X[:64], y[:64]) == stats
    assert all(m.training for m in model.modules())


def test_probe_indices_are_spread_and_deterministic():
    assert list(probe_indices(10, 4)) == [0, 3, 6, 9]
    assert list(probe_indices(3, 128)) == [0, 1, 2]
    with pytest.raises(ValueError):
        probe_indices(0)


def test_bn_keeps_the_gradient_of_a_deep_sigmoid_network(digits):
    """The vanishing-gradient claim on a tiny net: 8 sigmoid conv layers without BN pass
    the first layer a gradient ~1e-8 of the last one's; with BN ~1e-2 (at init, over 3
    seeds the ratios are 2e-8..4e-8 and 3e-2..5e-2: a margin of 10^5 against 10^3)."""
    X, y = digits
    for seed in range(3):
        ratios = []
        for bn in ("", "-bn"):
            model = nn.from_spec("-".join([f"c8{bn}-sigmoid"] * 8), (1, 8, 8), 10,
                                 random_state=seed)
            grads = [s["weight_grad_norm"] for s in layer_statistics(model, X[:128], y[:128])
                     if s["kind"] in ("Conv2d", "Linear")]
            ratios.append(grads[0] / grads[-1])
        assert ratios[1] > 1000 * ratios[0], ratios


# --------------------------------------------------------------------------- the estimator


@pytest.mark.parametrize("early_stopping", [False, True])
def test_recording_does_not_change_training(digits, early_stopping):
    X, y = digits
    params = {"architecture": ARCHITECTURE, "max_epochs": 3, "random_state": 0,
              "batch_size": 32, "early_stopping": early_stopping}
    plain = CNNClassifier(**params).fit(X, y)
    recorded = CNNClassifier(record_layer_stats=True, **params).fit(X, y)
    state, state_recorded = plain.model_.state_dict(), recorded.model_.state_dict()
    assert all(np.array_equal(state[k], state_recorded[k]) for k in state)
    assert np.array_equal(plain.predict_proba(X), recorded.predict_proba(X))
    assert plain.loss_curve_ == recorded.loss_curve_
    assert plain.layer_stats_init_ is None and "layers" not in plain.history_[0]
    init, history = recorded.layer_stats_init_, recorded.history_
    assert len(history) == 3 and all(len(entry["layers"]) == len(init) for entry in history)
    kinds = [s["kind"] for s in init]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["Linear", "BatchNorm1d",
                                                              "ReLU", "Linear"]
    assert init[0]["name"] == "0" and "0.weight" in state
    for moment in [init] + [entry["layers"] for entry in history]:
        for s in moment:
            assert list(s) == KEYS
            values = [s[k] for k in KEYS[2:] if s[k] is not None]
            assert all(math.isfinite(v) for v in values)
    # Training moves the network: the statistics after epoch 3 differ from the initial.
    assert history[-1]["layers"][0]["weight_grad_norm"] != init[0]["weight_grad_norm"]


def test_recording_with_partial_fit_and_warm_start(digits):
    X, y = digits
    clf = CNNClassifier(ARCHITECTURE, record_layer_stats=True, random_state=0)
    clf.partial_fit(X, y, classes=np.arange(10)).partial_fit(X, y)
    assert clf.layer_stats_init_ is not None and len(clf.history_) == 2
    assert all("layers" in entry for entry in clf.history_)
    warm = CNNClassifier(ARCHITECTURE, max_epochs=1, warm_start=True, random_state=0)
    warm.fit(X, y)
    warm.set_params(record_layer_stats=True).fit(X, y)
    assert warm.layer_stats_init_ is None            # the first fit did not record
    assert "layers" not in warm.history_[0] and "layers" in warm.history_[1]
    with pytest.raises(TypeError, match="record_layer_stats"):
        CNNClassifier(record_layer_stats="yes").fit(X, y)


def test_plot_layer_statistics(digits, tmp_path):
    pytest.importorskip("matplotlib")
    X, y = digits
    clf = CNNClassifier(ARCHITECTURE, max_epochs=1, record_layer_stats=True,
                        random_state=0).fit(X, y)
    path = tmp_path / "layers.png"
    plot_layer_statistics({"initial": clf.layer_stats_init_,
                           "after 1 epoch": clf.history_[-1]["layers"]}, path,
                          title="digits")
    assert path.stat().st_size > 1000


# --------------------------------------------------------------------------- the study


def test_run_recorder_stores_columns(digits):
    X, y = digits
    model = nn.from_spec(ARCHITECTURE, (1, 8, 8), 10, random_state=0)
    curves = {}
    record = run_recorder(model, X, y, curves, size=64)
    assert len(curves["layers"]["weight_grad_norm"]) == 1
    record()
    record()
    columns = curves["layers"]
    assert columns["kind"][:3] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert len(columns["weight_grad_norm"]) == 3
    assert all(len(row) == len(columns["name"]) for row in columns["activation_std"])
    assert columns["weight_grad_norm"][0][2] is None                 # a ReLU
    assert columns["weight_grad_norm"][0][0] == float(f"{columns['weight_grad_norm'][0][0]:.4g}")
    assert stack_statistics([]) == {"name": [], "kind": [], "weight_grad_norm": [],
                                    "activation_mean": [], "activation_std": []}


def test_depth_networks_keep_the_head_size():
    from bnrs.study import questions

    shapes = set()
    for d in questions.DEPTHS:
        for pools, side in ((2, 28), (1, 8)):
            arch = questions.depth_network(d, bn=True, pools=pools, conv_dropout=0.2,
                                           dense_dropout=0.5, hidden=32)
            model = nn.from_spec(arch, (1, side, side), 10)
            assert sum(isinstance(m, nn.Conv2d) for m in model) == d
            head = next(m for m in model if isinstance(m, nn.Linear))
            shapes.add((side, head.weight.shape))
    assert shapes == {(28, (32, 16 * 7 * 7)), (8, (32, 16 * 4 * 4))}
    with pytest.raises(ValueError):
        questions.depth_network(1, bn=False, pools=2)


def test_question_10_end_to_end(tmp_path, monkeypatch):
    """Question 10 on a tiny budget through the study's runner and report."""
    from bnrs.study import plots, questions, runner, storage

    monkeypatch.setattr(questions, "DEPTHS", (2, 3))
    table = runner.run(questions=[10], dataset="digits", quick=True, seeds=1, epochs=1,
                       scale=0.2, out=tmp_path, progress=False, n_jobs=1)
    assert 10 in questions.QUESTIONS
    # Short: 3 families x {no BN, BN} + He-initialised no BN; overfitting: 4 families.
    assert len(table) == (6 + 1 + 4) * 2 and {row["question"] for row in table} == {10}
    assert len(table.verdicts) == 4 + 3 + 3
    text = (tmp_path / "report.md").read_text()
    assert "## Q10." in text and "Dropout's effect on test accuracy is more favourable" in text
    assert "stops training at" in text and "Gradient diagnostics" in text
    run = storage.ResultStore(tmp_path).get()[table[0]["run_key"]]
    layers = run["curves"]["layers"]          # initial + 1 epoch, per layer
    assert len(layers["weight_grad_norm"]) == 2
    assert len(layers["activation_std"][1]) == len(layers["kind"]) > 0
    if plots.load_pyplot() is not None:
        for name in ("q10-depth.png", "q10-layers.png"):
            assert (tmp_path / "plots" / name).is_file()
            assert f"plots/{name}" in text
