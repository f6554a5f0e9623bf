"""Tests of bnrs.CNNClassifier: scikit-learn's estimator checks, input shapes, training
loop behaviour (small batches, early stopping, Ctrl-C, divergence), determinism,
pickling and use inside scikit-learn's model-selection tools.

Everything trains on a few hundred of scikit-learn's 8x8 digits for a few epochs, so the
whole file runs in seconds.
"""

import pickle
import warnings

import bnrs
import numpy as np
import pytest
from bnrs import CNNClassifier, nn
from bnrs.estimator import DivergenceError, FitInterruptedWarning, _batch_bounds
from sklearn.base import clone
from sklearn.datasets import load_digits, make_blobs
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

#: The default architecture's layers fit 8x8 images: 8x8 -> 4x4 -> 2x2.
SMALL_CNN = "c4-bn-relu-mp2-c8-bn-relu-mp2-d0.25-fc16-bn-relu-d0.5"


@pytest.fixture(scope="module")
def digits():
    """300 digits as (n, 8, 8) images in [0, 1] and their labels 0-9."""
    X, y = load_digits(return_X_y=True)
    return (X[:300] / 16.0).reshape(-1, 8, 8).astype(np.float32), y[:300]


def _fit(X, y, **params):
    params = {"architecture": SMALL_CNN, "max_epochs": 3, "random_state": 0, **params}
    return CNNClassifier(**params).fit(X, y)


# --------------------------------------------------------------------------- sklearn checks


@parametrize_with_checks([CNNClassifier("fc16", max_epochs=10, learning_rate=0.01,
                                        random_state=0)])
def test_sklearn_compatible(estimator, check):
    # A small multilayer perceptron: the checks feed 2-D data with 1 to 20 features,
    # which a CNN cannot take (see the input-shape rule); the CNN is tested below.
    check(estimator)


def test_default_architecture_fits_and_predicts_images(digits):
    X, y = digits
    clf = CNNClassifier(max_epochs=8, batch_size=32, learning_rate=3e-3,
                        random_state=0).fit(X[:200], y[:200])
    assert clf.architecture == nn.DEFAULT_ARCHITECTURE
    assert clf.input_shape_ == (1, 8, 8)
    assert clf.n_features_in_ == 8
    assert list(clf.classes_) == list(range(10))
    proba = clf.predict_proba(X[200:])
    assert proba.shape == (100, 10) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(clf.predict_log_proba(X[200:]), np.log(proba), rtol=1e-12)
    np.testing.assert_array_equal(clf.predict(X[200:]), clf.classes_[proba.argmax(axis=1)])
    assert clf.score(X[200:], y[200:]) > 0.8
    assert not clf.model_.training, "model_ is left in evaluation mode"
    assert clf.n_iter_ == 8 == len(clf.loss_curve_) == len(clf.history_)
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]
    assert clf.loss_ == clf.loss_curve_[-1] and clf.best_loss_ == min(clf.loss_curve_)
    assert clf.validation_scores_ is None and clf.best_validation_score_ is None
    assert [entry["epoch"] for entry in clf.history_] == list(range(1, 9))
    assert set(clf.history_[0]) == {"epoch", "train_loss", "seconds"}
    assert isinstance(clf.optimizer_, bnrs.optim.Adam)
    # Evaluation mode: repeated predictions are identical (no dropout, running stats).
    np.testing.assert_array_equal(clf.predict_proba(X[200:]), proba)


# --------------------------------------------------------------------------- inputs


def test_string_labels(digits):
    X, y = digits
    names = np.array(["zero", "one", "two"])
    mask = y < 3
    clf = _fit(X[mask], names[y[mask]], max_epochs=10, batch_size=16, learning_rate=0.01)
    assert list(clf.classes_) == ["one", "two", "zero"]
    assert set(clf.predict(X[mask])) <= set(names)
    assert clf.score(X[mask], names[y[mask]]) > 0.9


def test_input_layouts(digits):
    X, y = digits
    four_d = _fit(X[:, None], y)
    three_d = _fit(X, y)
    square = _fit(X.reshape(-1, 64), y)
    for clf in (four_d, three_d, square):
        assert clf.input_shape_ == (1, 8, 8)
    # The same network on the same data, whatever the layout.
    reference = four_d.predict_proba(X[:, None])
    np.testing.assert_array_equal(three_d.predict_proba(X), reference)
    np.testing.assert_array_equal(square.predict_proba(X.reshape(-1, 64)), reference)
    with pytest.raises(ValueError, match="fitted on samples of shape"):
        three_d.predict(X[:, :, :4].reshape(-1, 8, 4))


def test_input_shape_parameter(digits):
    X, y = digits
    two_channels = np.concatenate([X, 1.0 - X], axis=1).reshape(len(X), -1)  # (n, 128)
    clf = _fit(two_channels, y, input_shape=(2, 8, 8))
    assert clf.input_shape_ == (2, 8, 8) and clf.n_features_in_ == 128
    assert clf.model_[0].weight.shape == (4, 2, 3, 3)
    assert clf.predict(two_channels).shape == (len(X),)
    with pytest.raises(ValueError, match="values per sample"):
        _fit(two_channels, y, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        _fit(two_channels, y, input_shape=(8, 8))


def test_two_d_rule(digits):
    X, y = digits
    flat = X.reshape(len(X), -1)
    # Without a conv or pooling token the rows are feature vectors, square or not.
    assert _fit(flat, y, architecture="fc16-bn-relu").input_shape_ == (64,)
    assert _fit(flat[:, :60], y, architecture="fc16").input_shape_ == (60,)
    # With one, the row length must be a square, else input_shape is asked for.
    with pytest.raises(ValueError, match="not a square number.*input_shape"):
        _fit(flat[:, :60], y)
    # A shape the architecture cannot shrink to raises, naming the token.
    with pytest.raises(ValueError, match="cannot build the architecture.*'mp2'"):
        _fit(flat[:, :4], y, architecture="c4-mp2-mp2")


def test_bad_parameters(digits):
    X, y = digits
    with pytest.raises(ValueError, match="optimizer"):
        _fit(X, y, optimizer="rmsprop")
    with pytest.raises(ValueError, match="learning_rate"):
        _fit(X, y, learning_rate=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        _fit(X, y, batch_size=0)
    with pytest.raises(ValueError, match="bad token 'c0'"):
        _fit(X, y, architecture="c0-relu")
    with pytest.raises(ValueError, match="one class"):
        _fit(X[:10], np.zeros(10))


#: One value of the wrong type and one of the right type but out of range, per parameter.
BAD_PARAMETERS = {
    "architecture": (3, None),
    "input_shape": ("1x8x8", (8, 8)),
    "optimizer": (1, "rmsprop"),
    "learning_rate": ("0.1", 0.0),
    "momentum": (None, -0.5),
    "weight_decay": ("0", -1e-4),
    "batch_size": (8.0, 0),
    "max_epochs": (True, 0),
    "shuffle": ("no", None),
    "early_stopping": ("no", None),
    "validation_fraction": ("0.1", 1.0),
    "n_iter_no_change": (2.5, 0),
    "tol": ([1e-4], float("nan")),
    "warm_start": (1, None),
    "random_state": ("seed", -1),
    "n_threads": (1.0, 0),
    "verbose": (2.7, -1),
    "record_layer_stats": ("yes", None),
}


def test_every_parameter_has_a_constraint():
    assert set(CNNClassifier._parameter_constraints) == set(CNNClassifier().get_params())
    assert set(BAD_PARAMETERS) == set(CNNClassifier().get_params())


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
@pytest.mark.parametrize("name", BAD_PARAMETERS)
def test_bad_parameter_type_or_value(digits, name, method):
    X, y = digits
    wrong_type, wrong_value = BAD_PARAMETERS[name]
    params = {"architecture": SMALL_CNN, "max_epochs": 1}
    fit = getattr(CNNClassifier(**{**params, name: wrong_type}), method)
    with pytest.raises(TypeError, match=rf"^{name}: expected .*, got "):
        fit(X, y, classes=np.unique(y)) if method == "partial_fit" else fit(X, y)
    if wrong_value is not None:
        fit = getattr(CNNClassifier(**{**params, name: wrong_value}), method)
        with pytest.raises(ValueError, match=rf"^{name}: expected .*, got "):
            fit(X, y, classes=np.unique(y)) if method == "partial_fit" else fit(X, y)


@pytest.mark.parametrize("name", ["shuffle", "early_stopping"])
def test_a_string_is_not_taken_for_true(digits, name):
    # "no" used to be truthy: early_stopping="no" held out validation data and
    # shuffle="no" shuffled.
    X, y = digits
    with pytest.raises(TypeError, match=name):
        _fit(X, y, **{name: "no"})


def test_numpy_bools_and_bool_verbose_are_accepted(digits, capsys):
    X, y = digits
    clf = _fit(X, y, shuffle=np.False_, early_stopping=np.True_, warm_start=np.False_,
               record_layer_stats=np.False_, verbose=True, max_epochs=1)
    assert clf.validation_scores_ is not None
    assert "epoch   1" in capsys.readouterr().out
    with pytest.raises(TypeError, match="verbose"):
        _fit(X, y, verbose=2.7)


def _fitted_state(clf) -> dict:
    """Every attribute a fit sets, in a form that compares with ==."""
    state = {}
    for name, value in vars(clf).items():
        if name in CNNClassifier._parameter_constraints:
            continue
        if name == "model_":
            value = {key: array.tobytes() for key, array in value.state_dict().items()}
        elif name == "optimizer_":
            value = repr(value.state_dict())
        elif name == "_rng":
            value = value.bit_generator.state
        elif isinstance(value, np.ndarray):
            value = (value.dtype, value.shape, value.tobytes())
        state[name] = value
    return state


def test_a_rejected_fit_leaves_the_fitted_estimator_as_it_was(digits):
    X, y = digits
    flat = X.reshape(len(X), -1)
    clf = _fit(flat, y)
    state, proba = _fitted_state(clf), clf.predict_proba(flat)
    # A class of one sample cannot be stratified into a validation split.
    rare = y.copy()
    rare[0] = 99
    one_nine = np.r_[np.flatnonzero(y != 9), np.flatnonzero(y == 9)[:1]]
    rejected = [
        lambda: clf.fit(flat[:, :63], y),                        # not a square number
        lambda: clf.fit(flat, np.zeros(len(flat))),              # one class
        lambda: clf.set_params(batch_size=0).fit(flat, y),       # a bad parameter
        lambda: clf.set_params(batch_size=64, early_stopping=True).fit(flat, rare),
        lambda: clf.set_params(early_stopping=False, architecture="c4-mp2-mp2-mp2-mp2"
                               ).fit(flat, y),                    # cannot be built
        lambda: clf.set_params(architecture=SMALL_CNN).partial_fit(flat[:, :63], y),
        lambda: clf.partial_fit(flat, y, classes=np.arange(11)),
        lambda: clf.set_params(warm_start=True).fit(X, y),       # another layout
        lambda: clf.set_params(early_stopping=True).fit(flat, rare),
        lambda: clf.fit(flat[one_nine], y[one_nine]),            # after the stream's draw
    ]
    for call in rejected:
        with pytest.raises(ValueError):
            call()
        assert _fitted_state(clf) == state
        np.testing.assert_array_equal(clf.predict_proba(flat), proba)
    # Warm-start training goes on as if the rejected calls had never been made.
    clf.set_params(warm_start=True, early_stopping=True)
    again = _fit(flat, y).set_params(warm_start=True, early_stopping=True)
    np.testing.assert_array_equal(clf.fit(flat, y).predict_proba(flat),
                                  again.fit(flat, y).predict_proba(flat))


def test_adamw_has_its_own_default_weight_decay(digits):
    X, y = digits
    decays = {name: _fit(X, y, optimizer=name, max_epochs=1).optimizer_.param_groups[0][
        "weight_decay"] for name in ("adam", "adamw", "sgd")}
    assert decays == {"adam": 0.0, "adamw": 0.01, "sgd": 0.0}
    assert bnrs.optim.AdamW(nn.Linear(2, 2).parameters()).param_groups[0][
        "weight_decay"] == decays["adamw"]
    plain = _fit(X, y, optimizer="adamw", weight_decay=0.0)
    assert plain.optimizer_.param_groups[0]["weight_decay"] == 0.0
    assert plain.loss_curve_ != _fit(X, y, optimizer="adamw").loss_curve_


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_default_weight_decay_is_zero_for_adam_and_sgd(digits, optimizer):
    X, y = digits
    default = _fit(X, y, optimizer=optimizer)
    zero = _fit(X, y, optimizer=optimizer, weight_decay=0.0)
    assert default.loss_curve_ == zero.loss_curve_
    np.testing.assert_array_equal(default.predict_proba(X), zero.predict_proba(X))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_other_optimizers(digits, optimizer):
    X, y = digits
    clf = _fit(X, y, optimizer=optimizer, learning_rate=0.05, weight_decay=1e-4,
               max_epochs=5)
    assert type(clf.optimizer_).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[optimizer]
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]


# --------------------------------------------------------------------------- training loop


def test_batch_bounds_merge_a_last_batch_of_one():
    assert _batch_bounds(65, 64) == [(0, 65)]
    assert _batch_bounds(129, 64) == [(0, 64), (64, 129)]
    assert _batch_bounds(66, 64) == [(0, 64), (64, 66)]
    assert _batch_bounds(10, 64) == [(0, 10)]
    assert _batch_bounds(1, 64) == [(0, 1)]


def test_last_batch_of_one_sample(digits):
    X, y = digits
    # 65 samples in batches of 32: 32 + 33, never a batch of one for BatchNorm1d.
    clf = CNNClassifier(max_epochs=2, batch_size=32, random_state=0).fit(X[:65], y[:65])
    assert clf.n_iter_ == 2 and np.isfinite(clf.loss_curve_).all()


def test_too_few_samples_for_batch_norm(digits):
    X, y = digits
    clf = CNNClassifier(random_state=0)
    with pytest.raises(ValueError, match="batch norm.*at least 2 samples"):
        clf.partial_fit(X[:1], y[:1], classes=np.arange(10))
    with pytest.raises(ValueError, match="batch norm.*batch_size=1"):
        CNNClassifier(batch_size=1).fit(X[:20], y[:20])
    # Without batch norm a single sample, or batch_size=1, is fine.
    CNNClassifier("c4-relu-fc8", random_state=0).partial_fit(X[:1], y[:1], classes=[0, 1])
    CNNClassifier("c4-relu-fc8", batch_size=1, max_epochs=1).fit(X[:20], y[:20])


def test_partial_fit(digits):
    X, y = digits
    clf = CNNClassifier(SMALL_CNN, random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X[:50], y[:50])
    clf.partial_fit(X[:50], y[:50], classes=np.arange(10))
    clf.partial_fit(X[50:100], y[50:100])
    clf.partial_fit(X[100:150], y[100:150], classes=np.arange(10))
    assert clf.n_iter_ == 3 == len(clf.loss_curve_)
    assert list(clf.classes_) == list(range(10))
    with pytest.raises(ValueError, match="not the same"):
        clf.partial_fit(X[:50], y[:50], classes=np.arange(11))
    with pytest.raises(ValueError, match="labels not in classes_"):
        clf.partial_fit(X[:50], y[:50] + 10)
    # One partial_fit equals one epoch of fit.
    one_epoch = _fit(X, y, max_epochs=1)
    incremental = CNNClassifier(SMALL_CNN, random_state=0).partial_fit(
        X, y, classes=np.arange(10))
    np.testing.assert_array_equal(incremental.predict_proba(X), one_epoch.predict_proba(X))


def test_warm_start(digits):
    X, y = digits
    clf = _fit(X, y, warm_start=True, max_epochs=2)
    clf.set_params(learning_rate=1e-4).fit(X, y)
    assert clf.n_iter_ == 4 and len(clf.history_) == 4
    assert clf.optimizer_.param_groups[0]["lr"] == 1e-4
    # Four epochs in two warm-started fits are four epochs in one fit.
    straight = _fit(X, y, max_epochs=4)
    assert straight.loss_curve_[:2] == clf.loss_curve_[:2]
    clf.set_params(architecture="c4-relu-fc8")
    with pytest.raises(ValueError, match="architecture changed"):
        clf.fit(X, y)


def test_early_stopping(digits):
    X, y = digits
    clf = _fit(X, y, early_stopping=True, validation_fraction=0.2, max_epochs=6)
    assert len(clf.validation_scores_) == clf.n_iter_ == 6
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    assert clf.best_loss_ is None
    assert all(0.0 <= s <= 1.0 for s in clf.validation_scores_)
    assert [entry["valid_score"] for entry in clf.history_] == clf.validation_scores_
    # No epoch can improve by tol=1: the first epoch counts, then 2 without improvement.
    stopped = _fit(X, y, early_stopping=True, tol=1.0, n_iter_no_change=2, max_epochs=10)
    assert stopped.n_iter_ == 3
    # The same for the training loss when early_stopping is off.
    assert _fit(X, y, tol=100.0, n_iter_no_change=2, max_epochs=10).n_iter_ == 3


def test_verbose_prints_a_line_per_epoch(digits, capsys):
    X, y = digits
    _fit(X, y, verbose=1, early_stopping=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("epoch   1") and "train_loss" in lines[0]
    assert "valid_score" in lines[0] and lines[0].endswith(" s")


def _interrupt_on_batch(monkeypatch, batch: int) -> None:
    """Make the loss raise KeyboardInterrupt (as Ctrl-C would) in its ``batch``-th call."""
    original = nn.CrossEntropyLoss.forward
    calls = []

    def forward(self, input, target):
        calls.append(1)
        if len(calls) == batch:
            raise KeyboardInterrupt
        return original(self, input, target)

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", forward)


@pytest.mark.parametrize("completed", [0, 2])
def test_keyboard_interrupt_keeps_the_last_completed_epoch(digits, monkeypatch, completed):
    X, y = digits
    batches_per_epoch = len(_batch_bounds(len(X), 64))  # 5
    _interrupt_on_batch(monkeypatch, completed * batches_per_epoch + 3)
    clf = CNNClassifier(SMALL_CNN, max_epochs=5, random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            clf.fit(X, y)
    assert not [w for w in caught if w.category is FitInterruptedWarning]
    assert clf.n_iter_ == completed == len(clf.loss_curve_)
    assert not clf.model_.training
    # The network is exactly that of a fit stopped after the completed epochs (the
    # initial one for none: the estimator's Generator first initialises the layers).
    monkeypatch.undo()
    expected = (_fit(X, y, max_epochs=completed).model_ if completed else
                nn.from_spec(SMALL_CNN, (1, 8, 8), 10, np.random.default_rng(0)))
    state, expected_state = clf.model_.state_dict(), expected.state_dict()
    assert list(state) == list(expected_state)
    for key, value in expected_state.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    assert np.isfinite(clf.predict_proba(X)).all()
    # It can go on training.
    clf.partial_fit(X, y)
    assert clf.n_iter_ == completed + 1


def test_keyboard_interrupt_stops_a_grid_search(digits, monkeypatch):
    """Ctrl-C in one candidate's fit stops the search, not only that fit."""
    X, y = digits
    _interrupt_on_batch(monkeypatch, 2)
    search = GridSearchCV(CNNClassifier(SMALL_CNN, max_epochs=2, random_state=0),
                          {"learning_rate": [1e-3, 1e-2]}, cv=2, n_jobs=1)
    with pytest.raises(KeyboardInterrupt):
        search.fit(X, y)
    assert not hasattr(search, "cv_results_")


def test_divergence_raises_and_keeps_a_finite_network(digits):
    X, y = digits
    clf = CNNClassifier("fc64-relu-fc64-relu", optimizer="sgd", learning_rate=1e6,
                        max_epochs=5, random_state=0)
    with pytest.raises(DivergenceError, match=r"diverged in epoch 1 \(batch \d+ of 5\)"):
        clf.fit(X, y)
    assert isinstance(DivergenceError("x"), RuntimeError)
    assert all(np.isfinite(p.data).all() for p in clf.model_.parameters())
    assert np.isfinite(clf.predict_proba(X)).all()


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_same_predictions_at_any_thread_count(digits):
    X, y = digits
    threads = bnrs.get_num_threads()
    params = {"architecture": nn.DEFAULT_ARCHITECTURE, "max_epochs": 2, "random_state": 7}
    one = CNNClassifier(n_threads=1, **params).fit(X, y)
    assert bnrs.get_num_threads() == threads, "n_threads is restored after fit"
    two = CNNClassifier(n_threads=2, **params).fit(X, y)
    again = CNNClassifier(n_threads=2, **params).fit(X, y)
    assert one.loss_curve_ == two.loss_curve_ == again.loss_curve_
    np.testing.assert_array_equal(one.predict_proba(X), two.predict_proba(X))
    np.testing.assert_array_equal(two.predict_proba(X), again.predict_proba(X))
    other_seed = CNNClassifier(**{**params, "random_state": 8}).fit(X, y)
    assert not np.array_equal(other_seed.predict_proba(X), one.predict_proba(X))


def test_pickle_round_trip(digits):
    X, y = digits
    clf = _fit(X, y)
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict_proba(X), clf.predict_proba(X))
    # Training goes on identically from the copy and from the original.
    restored.partial_fit(X, y)
    clf.partial_fit(X, y)
    np.testing.assert_array_equal(restored.predict_proba(X), clf.predict_proba(X))


# --------------------------------------------------------------------------- model selection


def test_clone(digits):
    X, y = digits
    clf = _fit(X, y, learning_rate=3e-3)
    copy = clone(clf)
    assert copy.get_params() == clf.get_params()
    assert not hasattr(copy, "model_")


def test_pipeline_with_a_scaler():
    X, y = make_blobs(n_samples=120, centers=3, n_features=5, random_state=0)
    pipe = make_pipeline(StandardScaler(), CNNClassifier("fc16-bn-relu", max_epochs=20,
                                                         learning_rate=0.01, random_state=0))
    assert pipe.fit(X * 100.0, y).score(X * 100.0, y) > 0.95


def test_grid_search_over_architectures(digits):
    X, y = digits
    search = GridSearchCV(
        CNNClassifier(max_epochs=3, random_state=0, n_threads=1),
        {"architecture": ["c4-bn-relu-mp2-fc16", "c8-bn-relu-mp2-mp2-fc16"]},
        cv=2, n_jobs=2, error_score="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # loky may warn about worker setup
        search.fit(X, y)
    assert search.best_params_["architecture"] in ("c4-bn-relu-mp2-fc16",
                                                   "c8-bn-relu-mp2-mp2-fc16")
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_estimator_.n_iter_ == 3
