"""Tests of sample and class weights (the weighted losses and the estimators'
``sample_weight``/``class_weight``), Monte Carlo dropout (``nn.enable_dropout``,
``mc_samples``, ``predict_uncertainty``) and training-time augmentation
(``augment_shift``, ``augment_flip``).

The weights follow scikit-learn's meaning (MLPClassifier's): each batch's loss is
``sum(w * loss) / sum(w)``, so an integer weight k is the sample repeated k times in its
batch, and weights of 1 are no weights, bit for bit.
"""

import numpy as np
import pytest
from bnrs import CNNClassifier, CNNRegressor, nn
from bnrs import functional as F
from bnrs.estimator import _augment
from bnrs.training import num_threads
from sklearn.datasets import load_digits, make_blobs
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_sample_weight

SMALL_CNN = "c4-bn-relu-mp2-c8-bn-relu-mp2-d0.25-fc16-bn-relu-d0.5"
#: Integer weights of the equivalence tests, zeros (absent samples) included.
WEIGHTS = np.array([2, 1, 0, 3, 1, 1, 4, 0, 1, 2])


@pytest.fixture(scope="module")
def digits():
    """300 digits as (n, 8, 8) images in [0, 1] and their labels 0-9."""
    X, y = load_digits(return_X_y=True)
    return (X[:300] / 16.0).reshape(-1, 8, 8).astype(np.float32), y[:300]


def _repeated(weights):
    """The row indices that repeat row i weights[i] times."""
    return np.repeat(np.arange(len(weights)), weights)


def _batch(seed=0, n=10, classes=4):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, classes)).astype(np.float32) * 3,
            rng.integers(0, classes, n))


# --------------------------------------------------------------------------- the losses


def test_cross_entropy_weight_is_the_sample_repeated():
    logits, target = _batch()
    index = _repeated(WEIGHTS)
    assert F.cross_entropy(logits, target, WEIGHTS) == pytest.approx(
        F.cross_entropy(logits[index], target[index]), rel=1e-12)
    grad = F.cross_entropy_backward(logits, target, WEIGHTS)
    repeated = F.cross_entropy_backward(logits[index], target[index])
    # Row i's gradient is the sum of its copies' rows (exactly k times one row, in f64).
    expected = np.zeros_like(grad)
    np.add.at(expected, index, repeated)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-9)
    assert not grad[WEIGHTS == 0].any()


@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.HuberLoss(delta=0.5)],
                         ids=["mse", "huber"])
def test_regression_loss_weight_is_the_sample_repeated(loss):
    rng = np.random.default_rng(1)
    prediction = rng.standard_normal((10, 3)).astype(np.float32)
    target = rng.standard_normal((10, 3)).astype(np.float32)
    index = _repeated(WEIGHTS)
    weighted = loss(prediction, target, WEIGHTS)
    grad = loss.backward()
    assert weighted == pytest.approx(loss(prediction[index], target[index]), rel=1e-12)
    expected = np.zeros_like(grad)
    np.add.at(expected, index, loss.backward())
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.MSELoss(), nn.HuberLoss()],
                         ids=["cross_entropy", "mse", "huber"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_weights_of_one_are_bit_identical_to_none(loss, n_threads):
    logits, target = _batch(n=130, classes=5)
    if not isinstance(loss, nn.CrossEntropyLoss):
        target = np.random.default_rng(2).standard_normal(logits.shape).astype(np.float32)
    with num_threads(n_threads):
        plain, plain_grad = loss(logits, target), loss.backward()
        ones, ones_grad = loss(logits, target, np.ones(len(logits))), loss.backward()
    assert ones == plain
    np.testing.assert_array_equal(ones_grad, plain_grad)


def test_network_gradients_of_a_weighted_batch_are_those_of_the_repeated_batch():
    # A fixed batch through a network without batch norm or dropout (those see the batch
    # itself, so repeats change their statistics or masks): parameter gradients agree
    # within float32 rounding.
    rng = np.random.default_rng(3)
    X = rng.standard_normal((10, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, 10)
    index = _repeated(WEIGHTS)
    grads = []
    for inputs, targets, weight in ((X, y, WEIGHTS), (X[index], y[index], None)):
        model = nn.from_spec("c4-relu-mp2-fc8-relu", (1, 6, 6), 3, random_state=0)
        crit = nn.CrossEntropyLoss()
        model.zero_grad()
        crit(model(inputs), targets, weight)
        model.backward(crit.backward(), input_grad=False)
        grads.append({name: p.grad.copy() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        np.testing.assert_allclose(grad, grads[1][name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)


@pytest.mark.parametrize("weight, message", [
    (np.ones(3), r"weight: expected shape \(10,\)"),
    (-np.ones(10), "finite, non-negative"),
    (np.full(10, np.nan), "finite, non-negative"),
    (np.zeros(10), "at least one positive"),
])
def test_bad_loss_weights(weight, message):
    logits, target = _batch()
    with pytest.raises(ValueError, match=message):
        F.cross_entropy(logits, target, weight)
    with pytest.raises(ValueError, match=message):
        F.cross_entropy_backward(logits, target, weight)
    with pytest.raises(ValueError, match="sample_weight: .*" + message.split(": ")[-1]):
        nn.MSELoss()(logits, logits, weight)


# --------------------------------------------------------------------------- the estimators


@pytest.mark.parametrize("make, kwargs", [
    (CNNClassifier, {}), (CNNClassifier, {"early_stopping": True}),
    (CNNRegressor, {}), (CNNRegressor, {"loss": "huber", "early_stopping": True})])
def test_fit_with_weights_of_one_is_bit_identical(digits, make, kwargs):
    X, y = digits
    if make is CNNRegressor:
        y = y / 9.0
    params = {"architecture": SMALL_CNN, "max_epochs": 2, "random_state": 0, **kwargs}
    plain = make(**params).fit(X, y)
    ones = make(**params).fit(X, y, sample_weight=np.ones(len(X)))
    assert ones.loss_curve_ == plain.loss_curve_
    assert ones.validation_scores_ == plain.validation_scores_
    np.testing.assert_array_equal(ones.predict(X), plain.predict(X))
    if make is CNNClassifier:
        np.testing.assert_array_equal(ones.predict_proba(X), plain.predict_proba(X))
        uniform = make(**params, class_weight={label: 1.0 for label in range(10)})
        np.testing.assert_array_equal(uniform.fit(X, y).predict_proba(X),
                                      plain.predict_proba(X))


@pytest.mark.parametrize("make", [CNNClassifier, CNNRegressor])
def test_integer_weights_are_repeated_samples_in_one_batch(make):
    # scikit-learn's check_sample_weight_equivalence, with float32's tolerance: every
    # sample in one batch (a dense network without batch norm, shuffle or not).
    X, y = make_blobs(n_samples=10, centers=3, n_features=4, random_state=0)
    X = X.astype(np.float32)
    y = y if make is CNNClassifier else y / 2.0
    index = _repeated(WEIGHTS)
    params = {"architecture": "fc16-relu", "max_epochs": 20, "learning_rate": 0.01,
              "batch_size": 64, "random_state": 0}
    weighted = make(**params).fit(X, y, sample_weight=WEIGHTS)
    repeated = make(**params).fit(X[index], y[index])
    np.testing.assert_allclose(weighted.loss_curve_, repeated.loss_curve_, rtol=1e-5)
    method = "predict_proba" if make is CNNClassifier else "predict"
    np.testing.assert_allclose(getattr(weighted, method)(X), getattr(repeated, method)(X),
                               rtol=1e-5, atol=1e-6)


def test_zero_weight_batches_are_skipped(digits):
    X, y = digits
    weight = np.zeros(len(X))
    weight[:20] = 1.0   # with batch_size=10, most batches have no weight at all
    clf = CNNClassifier(SMALL_CNN, max_epochs=2, batch_size=10, random_state=0)
    clf.fit(X, y, sample_weight=weight)
    assert all(np.isfinite(clf.loss_curve_))


def test_class_weight_balanced_is_compute_sample_weight(digits):
    X, y = digits
    keep = (y != 3) | (np.arange(len(y)) % 4 == 0)   # class 3 rare
    X, y = X[keep], y[keep]
    params = {"architecture": SMALL_CNN, "max_epochs": 2, "random_state": 0}
    balanced = CNNClassifier(**params, class_weight="balanced").fit(X, y)
    weighted = CNNClassifier(**params).fit(X, y, sample_weight=compute_sample_weight(
        "balanced", y))
    np.testing.assert_array_equal(balanced.predict_proba(X), weighted.predict_proba(X))
    both = CNNClassifier(**params, class_weight={3: 4.0}).fit(X, y,
                                                               sample_weight=np.full(len(y), 0.5))
    by_hand = CNNClassifier(**params).fit(X, y, sample_weight=np.where(y == 3, 2.0, 0.5))
    np.testing.assert_array_equal(both.predict_proba(X), by_hand.predict_proba(X))


def test_class_weight_check_with_enough_epochs():
    # scikit-learn's check_class_weight_classifiers, with 100 epochs instead of the
    # 10 of the test_estimator.py instance (there too few steps move the predictions).
    for centers in (2, 3):
        X, y = make_blobs(centers=centers, random_state=0, cluster_std=20)
        X_train, X_test, y_train, _ = train_test_split(X, y, test_size=0.5, random_state=0)
        class_weight = {0: 1000, 1: 0.0001, 2: 0.0001} if centers == 3 else {0: 1000,
                                                                            1: 0.0001}
        clf = CNNClassifier("fc16", max_epochs=100, learning_rate=0.01, n_iter_no_change=20,
                            random_state=0, class_weight=class_weight).fit(X_train, y_train)
        assert np.mean(clf.predict(X_test) == 0) > 0.87


@pytest.mark.parametrize("sample_weight, error, message", [
    (np.ones(5), ValueError, r"^sample_weight: expected shape \(300,\)"),
    (-np.ones(300), ValueError, r"^sample_weight: expected finite, non-negative"),
    (np.full(300, np.inf), ValueError, r"^sample_weight: expected finite, non-negative"),
    (np.zeros(300), ValueError, r"^sample_weight: expected at least one positive"),
    (np.array(["a"] * 300), TypeError, r"^sample_weight: expected real numbers"),
])
@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_bad_sample_weight(digits, sample_weight, error, message, method):
    X, y = digits
    clf = CNNClassifier(SMALL_CNN, max_epochs=1)
    with pytest.raises(error, match=message):
        if method == "fit":
            clf.fit(X, y, sample_weight=sample_weight)
        else:
            clf.partial_fit(X, y, classes=np.arange(10), sample_weight=sample_weight)
    assert not hasattr(clf, "model_")


@pytest.mark.parametrize("class_weight, message", [
    ({11: 1.0}, r"^class_weight: the key 11 is not a class"),
    ({0: -1.0}, r"^class_weight: expected finite, non-negative weights"),
    ({0: "1"}, r"^class_weight: expected finite, non-negative weights"),
])
def test_bad_class_weight(digits, class_weight, message):
    X, y = digits
    with pytest.raises(ValueError, match=message):
        CNNClassifier(SMALL_CNN, max_epochs=1, class_weight=class_weight).fit(X, y)


def test_all_weights_zero_after_class_weight(digits):
    X, y = digits
    clf = CNNClassifier(SMALL_CNN, max_epochs=1, class_weight={0: 0.0})
    with pytest.raises(ValueError, match="class_weight and sample_weight"):
        clf.fit(X, y, sample_weight=(y == 0).astype(float))


def test_balanced_class_weight_refused_by_partial_fit(digits):
    X, y = digits
    with pytest.raises(ValueError, match="class_weight='balanced' is not supported by "
                                         "partial_fit"):
        CNNClassifier(SMALL_CNN, class_weight="balanced").partial_fit(X, y, np.arange(10))


def test_partial_fit_with_weights_of_one(digits):
    X, y = digits
    plain = CNNClassifier(SMALL_CNN, random_state=0).partial_fit(X, y, np.arange(10))
    ones = CNNClassifier(SMALL_CNN, random_state=0).partial_fit(X, y, np.arange(10),
                                                                 np.ones(len(X)))
    np.testing.assert_array_equal(ones.predict_proba(X), plain.predict_proba(X))


# --------------------------------------------------------------------------- MC dropout


def test_enable_dropout_switches_dropout_layers_alone():
    model = nn.from_spec("fc8-bn-relu-d0.5", (4,), 2, random_state=0).eval()
    assert nn.enable_dropout(model) is model
    for layer in model:
        assert layer.training == isinstance(layer, (nn.Dropout, nn.Dropout2d))
    nn.enable_dropout(model, False)
    assert not any(layer.training for layer in model)
    with pytest.raises(TypeError, match="mode"):
        nn.enable_dropout(model, "yes")


def test_mc_dropout_batch_norm_stays_in_evaluation(digits):
    X, _ = digits
    model = nn.from_spec(SMALL_CNN, (1, 8, 8), 10, random_state=0)
    nn.enable_dropout(model.eval())
    running = model[1].running_mean.copy()
    first, second = model(X[:20, None]), model(X[:20, None])
    np.testing.assert_array_equal(model[1].running_mean, running)
    assert not np.array_equal(first, second)   # new masks per pass


def test_mc_dropout_block_is_reproducible_and_restores_the_model(digits):
    X, _ = digits
    x = X[:20, None]
    model = nn.from_spec(SMALL_CNN, (1, 8, 8), 10, random_state=0)
    model[1].training = False   # a mixed mode, restored as it was
    modes = [m.training for m in model.modules()]
    generators = [m._rng for m in model.modules() if isinstance(m, nn.Dropout)]
    states = [g.bit_generator.state for g in generators]
    runs = []
    for seed in (5, np.random.SeedSequence(5), 6):
        with nn.mc_dropout(model, seed) as inside:
            assert inside is model
            assert [m.training for m in model] == [isinstance(m, nn.Dropout) for m in model]
            running = model[1].running_mean.copy()
            runs.append(np.stack([model(x) for _ in range(3)]))
            np.testing.assert_array_equal(model[1].running_mean, running)
        assert [m.training for m in model.modules()] == modes
        assert [m._rng for m in model.modules() if isinstance(m, nn.Dropout)] == generators
        assert [g.bit_generator.state for g in generators] == states
    assert not np.array_equal(runs[0][0], runs[0][1])       # new masks per pass
    np.testing.assert_array_equal(runs[0], runs[1])          # an int or its SeedSequence
    assert not np.array_equal(runs[0], runs[2])


@pytest.fixture(scope="module")
def mc_fitted(digits):
    X, y = digits
    return CNNClassifier(SMALL_CNN, max_epochs=2, random_state=0, mc_samples=8).fit(X, y)


def test_mc_samples_does_not_change_training(digits, mc_fitted):
    X, y = digits
    plain = CNNClassifier(SMALL_CNN, max_epochs=2, random_state=0).fit(X, y)
    assert plain.loss_curve_ == mc_fitted.loss_curve_
    np.testing.assert_array_equal(mc_fitted.set_params(mc_samples=0).predict_proba(X),
                                  plain.predict_proba(X))
    mc_fitted.set_params(mc_samples=8)


def test_mc_predictions_are_reproducible_at_any_thread_count(digits, mc_fitted):
    X, _ = digits
    mean, std = mc_fitted.predict_uncertainty(X)
    np.testing.assert_array_equal(mc_fitted.predict_proba(X), mean)
    for n_threads in (1, 2):
        again = CNNClassifier(**{**mc_fitted.get_params(), "n_threads": n_threads})
        again.fit(*digits)
        np.testing.assert_array_equal(again.predict_uncertainty(X)[0], mean)
        np.testing.assert_array_equal(again.predict_uncertainty(X)[1], std)
    np.testing.assert_allclose(mean.sum(axis=1), 1.0, rtol=1e-12)
    assert (std > 0).any() and (std >= 0).all()
    np.testing.assert_array_equal(mc_fitted.predict(X),
                                  mc_fitted.classes_[np.argmax(mean, axis=1)])
    np.testing.assert_array_equal(mc_fitted.predict_log_proba(X), np.log(mean))


def test_mc_predictions_leave_training_unchanged(digits):
    X, y = digits
    params = {"architecture": SMALL_CNN, "max_epochs": 1, "random_state": 0,
              "mc_samples": 3, "warm_start": True}
    predicted = CNNClassifier(**params).fit(X, y)
    predicted.predict_uncertainty(X)
    untouched = CNNClassifier(**params).fit(X, y)
    predicted.fit(X, y)
    untouched.fit(X, y)
    np.testing.assert_array_equal(predicted.set_params(mc_samples=0).predict_proba(X),
                                  untouched.set_params(mc_samples=0).predict_proba(X))


def test_mc_without_dropout_has_no_spread(digits):
    X, y = digits
    clf = CNNClassifier("c4-bn-relu-mp2-fc16", max_epochs=1, random_state=0,
                        mc_samples=3).fit(X, y)
    mean, std = clf.predict_uncertainty(X)
    # identical passes; the float64 mean of three equal values may be off by an ulp
    np.testing.assert_allclose(std, 0.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(mean, clf.set_params(mc_samples=0).predict_proba(X),
                               rtol=1e-6)


def test_regressor_predict_uncertainty(digits):
    X, y = digits
    reg = CNNRegressor(SMALL_CNN, max_epochs=2, random_state=0, mc_samples=5).fit(X, y / 9)
    mean, std = reg.predict_uncertainty(X)
    assert mean.shape == std.shape == (len(X),)
    np.testing.assert_array_equal(reg.predict(X), mean)
    assert (std > 0).any()
    multi = CNNRegressor(SMALL_CNN, max_epochs=1, random_state=0, mc_samples=2)
    mean, std = multi.fit(X, np.stack([y, -y], axis=1) / 9).predict_uncertainty(X)
    assert mean.shape == std.shape == (len(X), 2)


def test_predict_uncertainty_needs_mc_samples(digits, mc_fitted):
    X, _ = digits
    mc_fitted.set_params(mc_samples=0)
    try:
        with pytest.raises(ValueError, match="^mc_samples: predict_uncertainty needs"):
            mc_fitted.predict_uncertainty(X)
        mc_fitted.set_params(mc_samples=-2)
        with pytest.raises(ValueError, match=r"^mc_samples: expected an int >= 0"):
            mc_fitted.predict_proba(X)
    finally:
        mc_fitted.set_params(mc_samples=8)


# --------------------------------------------------------------------------- augmentation


def test_augment_matches_a_per_sample_reference():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((6, 2, 5, 7)).astype(np.float32)
    before = X.copy()
    out = _augment(X, np.random.default_rng(9), shift=2, flip=True)
    np.testing.assert_array_equal(X, before)   # the batch is not written to
    draws = np.random.default_rng(9)
    offsets = draws.integers(0, 5, size=(2, 6))
    mirrored = draws.random(6) < 0.5
    for i in range(6):
        padded = np.pad(X[i], ((0, 0), (2, 2), (2, 2)))
        expected = padded[:, offsets[0, i]:offsets[0, i] + 5, offsets[1, i]:offsets[1, i] + 7]
        if mirrored[i]:
            expected = expected[:, :, ::-1]
        np.testing.assert_array_equal(out[i], expected)
    flipped = _augment(X, np.random.default_rng(9), shift=0, flip=True)
    np.testing.assert_array_equal(X, before)
    assert flipped.shape == X.shape


def test_augmentation_is_reproducible_and_changes_training(digits):
    X, y = digits
    params = {"architecture": SMALL_CNN, "max_epochs": 2, "random_state": 0}
    plain = CNNClassifier(**params).fit(X, y)
    runs = [CNNClassifier(**params, augment_shift=1, augment_flip=True,
                          n_threads=n).fit(X, y) for n in (1, 2)]
    np.testing.assert_array_equal(runs[0].predict_proba(X), runs[1].predict_proba(X))
    assert runs[0].loss_curve_ != plain.loss_curve_
    reg = [CNNRegressor(**params, augment_shift=2).fit(X, y / 9) for _ in range(2)]
    np.testing.assert_array_equal(reg[0].predict(X), reg[1].predict(X))


def test_augmentation_refuses_vectors_and_large_shifts(digits):
    X, y = digits
    with pytest.raises(ValueError, match="^augment_flip: augmentation needs image samples"):
        CNNClassifier("fc16", max_epochs=1, augment_flip=True).fit(X.reshape(len(X), -1), y)
    with pytest.raises(ValueError, match="^augment_shift: augmentation needs image samples"):
        CNNRegressor("fc16", max_epochs=1, augment_shift=1).fit(X.reshape(len(X), -1), y)
    with pytest.raises(ValueError, match=r"^augment_shift: expected fewer pixels .*got 8"):
        CNNClassifier(SMALL_CNN, max_epochs=1, augment_shift=8).fit(X, y)
    # 2-D X of image rows is fine when the architecture makes images of it (digits' 64)
    CNNClassifier(SMALL_CNN, max_epochs=1, augment_shift=1).fit(X.reshape(len(X), -1), y)


@pytest.mark.parametrize("monitor", ["valid_score", "valid_loss"])
def test_held_out_samples_all_of_weight_zero_validate_unweighted(monitor):
    # 40 samples, weights on 10: these seeds' splits hold out only weight-0 samples, whose
    # weighted validation loss had nothing to average by (a ValueError after an epoch).
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 1, 6, 6)).astype(np.float32)
    y = np.arange(40) % 2
    weight = np.zeros(40)
    weight[::4] = 1.0
    for seed in (5, 14, 16):
        clf = CNNClassifier("c4-relu-fc8", max_epochs=2, early_stopping=True,
                            validation_fraction=0.1, early_stopping_monitor=monitor,
                            random_state=seed)
        clf.fit(X, y, sample_weight=weight)
        assert clf.n_iter_ == 2 and np.isfinite(clf.best_validation_loss_)
