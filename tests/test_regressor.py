"""Tests of bnrs.CNNRegressor: scikit-learn's estimator checks, single- and multi-output
targets, the two losses, and the contract it shares with CNNClassifier (partial_fit,
warm_start, early stopping on R², Ctrl-C, divergence, determinism, pickling, layouts).

Everything trains on a few hundred of scikit-learn's 8x8 digits for a few epochs; the
targets are smooth functions of the pixels, so a small network fits them.
"""

import pickle
import warnings

import bnrs
import numpy as np
import pytest
from bnrs import CNNRegressor, nn
from bnrs.estimator import DivergenceError, _batch_bounds
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

SMALL_CNN = "c4-bn-relu-mp2-c8-bn-relu-mp2-d0.25-fc16-bn-relu-d0.5"


@pytest.fixture(scope="module")
def digits():
    """300 digits as (n, 8, 8) images in [0, 1], and two standardised targets: the ink in
    the top half and the ink in the left half."""
    X, _ = load_digits(return_X_y=True)
    X = (X[:300] / 16.0).reshape(-1, 8, 8).astype(np.float32)
    Y = np.stack([X[:, :4].mean(axis=(1, 2)), X[:, :, :4].mean(axis=(1, 2))], axis=1)
    return X, (Y - Y.mean(axis=0)) / Y.std(axis=0)


def _fit(X, y, **params):
    params = {"architecture": SMALL_CNN, "max_epochs": 3, "random_state": 0, **params}
    return CNNRegressor(**params).fit(X, y)


def _same_network(first, second):
    state, other = first.model_.state_dict(), second.model_.state_dict()
    assert list(state) == list(other)
    for key, value in state.items():
        np.testing.assert_array_equal(other[key], value, err_msg=key)


# --------------------------------------------------------------------------- sklearn checks


@parametrize_with_checks([CNNRegressor("fc16", max_epochs=10, learning_rate=0.01,
                                       random_state=0)])
def test_sklearn_compatible(estimator, check, request):
    # As for the classifier: a small multilayer perceptron, since the checks feed 2-D data
    # with a few features.
    name = getattr(check, "func", check).__name__
    if name == "check_sample_weight_equivalence_on_dense_data":
        # As for the classifier: equal within float32 rounding only, and whether that
        # lands within the check's rtol=1e-7 depends on the SIMD level (max relative
        # difference 1.5e-7 on AVX-512; within it on AVX2), so not strict;
        # tests/test_weights_mc.py checks it at 1e-5.
        request.node.add_marker(pytest.mark.xfail(
            reason="equivalent only within float32 rounding", strict=False))
    check(estimator)


# --------------------------------------------------------------------------- outputs


def test_single_output_fits_and_predicts_1d(digits):
    X, Y = digits
    reg = CNNRegressor(max_epochs=15, batch_size=32, learning_rate=3e-3,
                       random_state=0).fit(X[:200], Y[:200, 0])
    assert reg.architecture == nn.DEFAULT_ARCHITECTURE
    assert reg.n_outputs_ == 1 and reg.input_shape_ == (1, 8, 8)
    assert reg.model_[-1].weight.shape == (1, 128), "a linear output layer of one unit"
    prediction = reg.predict(X[200:])
    assert prediction.shape == (100,) and prediction.dtype == np.float64
    assert reg.score(X[200:], Y[200:, 0]) == r2_score(Y[200:, 0], prediction)
    assert reg.score(X[200:], Y[200:, 0]) > 0.7
    assert not reg.model_.training
    assert reg.loss_curve_[-1] < reg.loss_curve_[0]
    assert reg.loss_ == reg.loss_curve_[-1] and reg.best_loss_ == min(reg.loss_curve_)
    np.testing.assert_array_equal(reg.predict(X[200:]), prediction)


def test_multi_output(digits):
    X, Y = digits
    reg = _fit(X, Y, max_epochs=10, learning_rate=3e-3)
    assert reg.n_outputs_ == 2 and reg.model_[-1].weight.shape == (2, 16)
    prediction = reg.predict(X)
    assert prediction.shape == (300, 2)
    assert reg.score(X, Y) == r2_score(Y, prediction) > 0.5
    # A column vector stays a column: (n, 1) in, (n, 1) out.
    column = _fit(X, Y[:, :1])
    assert column.n_outputs_ == 1 and column.predict(X).shape == (300, 1)
    # The same network as for the 1-D target.
    flat = _fit(X, Y[:, 0])
    _same_network(flat, column)
    np.testing.assert_array_equal(column.predict(X).ravel(), flat.predict(X))


def test_the_loss_is_mean_squared_error_by_default(digits):
    X, Y = digits
    reg = _fit(X, Y, max_epochs=1, shuffle=False, architecture="fc8")
    assert isinstance(reg._criterion(), nn.MSELoss)
    huber = reg.set_params(loss="huber", delta=0.5)._criterion()
    assert isinstance(huber, nn.HuberLoss) and huber.delta == 0.5


def test_huber_loss_resists_outliers(digits):
    X, Y = digits
    y = Y[:, 0].copy()
    corrupted = y.copy()
    corrupted[::10] += 30.0                         # a tenth of the targets far off
    params = {"max_epochs": 15, "learning_rate": 3e-3}
    squared = _fit(X, corrupted, **params)
    huber = _fit(X, corrupted, loss="huber", delta=1.0, **params)
    assert squared.loss_curve_ != huber.loss_curve_
    clean = np.arange(300) % 10 != 0
    assert huber.score(X[clean], y[clean]) > squared.score(X[clean], y[clean]) + 0.1


def test_targets_must_be_finite_numbers(digits):
    X, Y = digits
    bad = Y[:, 0].copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _fit(X, bad)
    with pytest.raises(ValueError):
        _fit(X, np.array(["a", "b", "c"])[np.arange(300) % 3])
    with pytest.raises(ValueError):
        _fit(X, np.zeros((300, 2, 2)))


# --------------------------------------------------------------------------- parameters

BAD_PARAMETERS = {"loss": (1, "absolute_error"), "delta": ("1", 0.0),
                  "data_format": (None, "nchw")}


def test_every_parameter_has_a_constraint():
    assert set(CNNRegressor._parameter_constraints) == set(CNNRegressor().get_params())
    shared = set(bnrs.CNNClassifier().get_params())
    # class_weight is the classifier's alone
    assert set(CNNRegressor().get_params()) == (shared - {"class_weight"}) | {"loss", "delta"}


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
@pytest.mark.parametrize("name", BAD_PARAMETERS)
def test_bad_parameter_type_or_value(digits, name, method):
    X, Y = digits
    wrong_type, wrong_value = BAD_PARAMETERS[name]
    with pytest.raises(TypeError, match=rf"^{name}: expected .*, got "):
        getattr(CNNRegressor(SMALL_CNN, **{name: wrong_type}), method)(X, Y)
    with pytest.raises(ValueError, match=rf"^{name}: expected .*, got "):
        getattr(CNNRegressor(SMALL_CNN, **{name: wrong_value}), method)(X, Y)


# --------------------------------------------------------------------------- training loop


def test_partial_fit(digits):
    X, Y = digits
    reg = CNNRegressor(SMALL_CNN, random_state=0)
    reg.partial_fit(X[:100], Y[:100]).partial_fit(X[100:200], Y[100:200])
    assert reg.n_iter_ == 2 == len(reg.loss_curve_)
    with pytest.raises(ValueError, match=r"y has shape \(50,\).*2 output"):
        reg.partial_fit(X[:50], Y[:50, 0])
    # One partial_fit equals one epoch of fit.
    one_epoch = _fit(X, Y, max_epochs=1)
    incremental = CNNRegressor(SMALL_CNN, random_state=0).partial_fit(X, Y)
    np.testing.assert_array_equal(incremental.predict(X), one_epoch.predict(X))


def test_warm_start(digits):
    X, Y = digits
    reg = _fit(X, Y, warm_start=True, max_epochs=2)
    reg.set_params(learning_rate=1e-4).fit(X, Y)
    assert reg.n_iter_ == 4 and reg.optimizer_.param_groups[0]["lr"] == 1e-4
    assert _fit(X, Y, max_epochs=4).loss_curve_[:2] == reg.loss_curve_[:2]
    predictions = reg.predict(X)
    with pytest.raises(ValueError, match="output"):
        reg.fit(X, Y[:, 0])                          # another number of outputs
    np.testing.assert_array_equal(reg.predict(X), predictions)   # left as it was
    assert reg.n_iter_ == 4


def test_early_stopping_on_validation_r2(digits):
    X, Y = digits
    reg = _fit(X, Y, early_stopping=True, validation_fraction=0.2, max_epochs=6,
               learning_rate=3e-3)
    assert len(reg.validation_scores_) == reg.n_iter_ == 6
    assert reg.best_validation_score_ == max(reg.validation_scores_)
    assert reg.best_loss_ is None
    assert all(score <= 1.0 for score in reg.validation_scores_)
    assert reg.validation_scores_[-1] > reg.validation_scores_[0]
    assert [entry["valid_score"] for entry in reg.history_] == reg.validation_scores_
    # The restored network is the best epoch's: its R² on the whole data is that of a fit
    # stopped at that epoch (same seed, same split, same epochs).
    best_epoch = int(np.argmax(reg.validation_scores_)) + 1
    stopped = _fit(X, Y, early_stopping=True, validation_fraction=0.2,
                   max_epochs=best_epoch, learning_rate=3e-3)
    np.testing.assert_array_equal(reg.predict(X), stopped.predict(X))
    # No epoch can improve by tol=10: the first counts, then 2 without improvement.
    assert _fit(X, Y, early_stopping=True, tol=10.0, n_iter_no_change=2,
                max_epochs=10).n_iter_ == 3


def test_record_layer_stats_leaves_training_unchanged(digits):
    X, Y = digits
    plain = _fit(X, Y, loss="huber")
    recorded = _fit(X, Y, loss="huber", record_layer_stats=True)
    _same_network(plain, recorded)
    assert len(recorded.layer_stats_init_) > 0
    assert all(np.isfinite(entry["weight_grad_norm"])
               for entry in recorded.history_[-1]["layers"]
               if entry["weight_grad_norm"] is not None)


@pytest.mark.parametrize("completed", [0, 2])
def test_keyboard_interrupt_keeps_the_last_completed_epoch(digits, monkeypatch, completed):
    X, Y = digits
    original, calls = nn.MSELoss.forward, []

    def forward(self, input, target):
        calls.append(1)
        if len(calls) == completed * len(_batch_bounds(len(X), 64)) + 3:
            raise KeyboardInterrupt
        return original(self, input, target)

    monkeypatch.setattr(nn.MSELoss, "forward", forward)
    reg = CNNRegressor(SMALL_CNN, max_epochs=5, random_state=0)
    with pytest.raises(KeyboardInterrupt):    # re-raised after restoring the last epoch
        reg.fit(X, Y)
    monkeypatch.undo()
    assert reg.n_iter_ == completed and not reg.model_.training
    expected = (_fit(X, Y, max_epochs=completed).model_ if completed else
                nn.from_spec(SMALL_CNN, (1, 8, 8), 2, np.random.default_rng(0)))
    for key, value in expected.state_dict().items():
        np.testing.assert_array_equal(reg.model_.state_dict()[key], value, err_msg=key)
    reg.partial_fit(X, Y)
    assert reg.n_iter_ == completed + 1


def test_divergence_raises_and_keeps_a_finite_network(digits):
    X, Y = digits
    reg = CNNRegressor("fc64-relu-fc64-relu", optimizer="sgd", learning_rate=1e6,
                       max_epochs=5, random_state=0)
    with pytest.raises(DivergenceError, match=r"diverged in epoch 1 \(batch \d+ of 5\)"):
        reg.fit(X, Y)
    assert all(np.isfinite(p.data).all() for p in reg.model_.parameters())
    assert np.isfinite(reg.predict(X)).all()


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_same_predictions_at_any_thread_count(digits):
    X, Y = digits
    threads = bnrs.get_num_threads()
    params = {"architecture": nn.DEFAULT_ARCHITECTURE, "max_epochs": 2, "random_state": 7}
    one = CNNRegressor(n_threads=1, **params).fit(X, Y)
    assert bnrs.get_num_threads() == threads
    two = CNNRegressor(n_threads=2, **params).fit(X, Y)
    again = CNNRegressor(n_threads=2, **params).fit(X, Y)
    assert one.loss_curve_ == two.loss_curve_ == again.loss_curve_
    np.testing.assert_array_equal(one.predict(X), two.predict(X))
    np.testing.assert_array_equal(two.predict(X), again.predict(X))
    other_seed = CNNRegressor(**{**params, "random_state": 8}).fit(X, Y)
    assert not np.array_equal(other_seed.predict(X), one.predict(X))


def test_pickle_round_trip(digits):
    X, Y = digits
    reg = _fit(X, Y[:, 0], loss="huber")
    restored = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(restored.predict(X), reg.predict(X))
    restored.partial_fit(X, Y[:, 0])
    reg.partial_fit(X, Y[:, 0])
    np.testing.assert_array_equal(restored.predict(X), reg.predict(X))


def test_channels_last_images_fit_as_channels_first(digits):
    X, Y = digits
    first = np.stack([X, 1.0 - X, X * X], axis=1)                # (n, 3, 8, 8)
    last = np.ascontiguousarray(first.transpose(0, 2, 3, 1))    # (n, 8, 8, 3)
    from_first, from_last = _fit(first, Y), _fit(last, Y)
    assert from_last.data_format_ == "channels_last" and from_last.input_shape_ == (3, 8, 8)
    assert from_first.loss_curve_ == from_last.loss_curve_
    _same_network(from_first, from_last)
    np.testing.assert_array_equal(from_last.predict(last), from_first.predict(first))
    with pytest.raises(ValueError, match="data_format"):
        _fit(np.zeros((20, 3, 8, 3), np.float32), np.zeros(20))


# --------------------------------------------------------------------------- model selection


def test_clone_and_grid_search_over_losses(digits):
    X, Y = digits
    reg = _fit(X, Y, loss="huber", delta=2.0)
    copy = clone(reg)
    assert copy.get_params() == reg.get_params() and not hasattr(copy, "model_")
    search = GridSearchCV(CNNRegressor(SMALL_CNN, max_epochs=3, random_state=0, n_threads=1),
                          {"loss": ["squared_error", "huber"]}, cv=2, error_score="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        search.fit(X, Y)
    assert search.best_params_["loss"] in ("squared_error", "huber")
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
