"""Numerics at the edges: batch norm on constant and nearly constant channels, extreme
finite values, and training that diverges.

``test_estimator`` checks that a huge SGD learning rate raises DivergenceError in epoch 1;
here divergence also comes in a later epoch (which must be named, with the earlier epochs
kept) and from data, and batch norm must stay finite and accurate where a naive variance
(E[x²] - E[x]²) would cancel to a negative number.
"""

from __future__ import annotations

import bnrs
import numpy as np
import pytest
import reference as ref
from bnrs import functional as F
from bnrs import nn
from bnrs.estimator import DivergenceError


def _constant_channel(offset, noise, shape=(4, 3, 5, 5), seed=0):
    """Channel 1 is ``offset`` plus ``noise``-sized variation; the others are normal."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    x[:, 1] = offset + noise * rng.standard_normal(x[:, 1].shape)
    return x.astype(np.float32)


@pytest.mark.parametrize("offset, noise", [(0.0, 0.0), (5.0, 0.0), (-3e4, 0.0),
                                           (1e4, 1e-3), (1e3, 1e-2), (1e6, 1.0)])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_batch_norm_of_a_constant_channel_stays_finite_and_accurate(offset, noise, eps):
    x = _constant_channel(offset, noise)
    gy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    gamma, beta = np.array([1.0, 2.0, 0.5], np.float32), np.array([0.1, -1.0, 0.0],
                                                                  np.float32)
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, mean, invstd = F.native_batch_norm(x, gamma, beta, running_mean, running_var, True,
                                          0.1, eps)
    grads = F.batch_norm_backward(gy, x, gamma, mean, invstd, True)
    for name, value in [("output", y), ("save_mean", mean), ("save_invstd", invstd),
                        ("running_mean", running_mean), ("running_var", running_var),
                        ("grad_input", grads[0]), ("grad_weight", grads[1]),
                        ("grad_bias", grads[2])]:
        assert np.isfinite(value).all(), f"{name} is not finite"
    expected = ref.batch_norm(x, gamma, beta, np.zeros(3), np.ones(3), True, 0.1, eps)
    np.testing.assert_allclose(invstd, expected[2], rtol=1e-2)
    np.testing.assert_allclose(running_var, expected[4], rtol=1e-3, atol=1e-6)
    u = 2.0**-24  # float32 unit roundoff
    channel = x[:, 1].astype(np.float64)
    # The mean is the float64 mean of float32 plane sums, rounded to float32 once.
    mean_bound = u * abs(expected[1][1]) + 4 * u * np.abs(channel - expected[1][1]).max()
    assert abs(float(mean[1]) - expected[1][1]) <= mean_bound
    # The output is (x - mean)*a + beta with a = gamma*invstd, from the float32 mean and
    # invstd the kernel returns: x - mean, a, the product and the sum each round once, so
    # the error is at most 3u|a(x - mean)| + u|y|. Folding the mean into the shift,
    # x*a + (beta - mean*a) (PyTorch's CPU kernel), would add rounding of |mean*a| (~2e7
    # for mean -3e4, invstd 316, gamma 2: the constant channel came out -2, not -1).
    scale = float(gamma[1]) * invstd[1].astype(np.float64)
    normalised = (channel - float(mean[1])) * scale
    given_stats = normalised + float(beta[1])
    arithmetic_bound = 3 * u * np.abs(normalised) + u * np.abs(given_stats)
    assert (np.abs(y[:, 1] - given_stats) <= arithmetic_bound).all()
    # Against the exact output: the statistics' own errors carried through, as well.
    invstd_error = abs(float(invstd[1]) - expected[2][1])
    bound = (arithmetic_bound + scale * abs(float(mean[1]) - expected[1][1])
             + float(gamma[1]) * np.abs(channel - float(mean[1])) * invstd_error)
    assert (np.abs(y[:, 1] - expected[0][:, 1]) <= 2 * bound).all()
    if noise == 0.0:  # exactly constant: invstd = 1/sqrt(eps), the output exactly beta
        np.testing.assert_allclose(invstd[1], 1 / np.sqrt(eps), rtol=1e-6)
        np.testing.assert_array_equal(y[:, 1], beta[1])
        plain = F.native_batch_norm(x, training=True, eps=eps)[0]
        np.testing.assert_array_equal(plain[:, 1], 0.0)


@pytest.mark.parametrize("layer, shape", [(nn.BatchNorm2d, (6, 3, 4, 4)),
                                          (nn.BatchNorm1d, (6, 3)),
                                          (nn.BatchNorm1d, (6, 3, 7))])
def test_batch_norm_layers_with_a_constant_channel_in_training_and_eval(layer, shape):
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    x[:, 1] = 7.0
    bn = layer(3)
    for _ in range(3):
        y = bn(x)
        grad = bn.backward(np.ones_like(y))
        assert np.isfinite(y).all() and np.isfinite(grad).all()
    bn.eval()
    assert np.isfinite(bn(x)).all()
    assert bn.running_var[1] == pytest.approx(0.9**3, rel=1e-6)  # decayed, never negative


def test_extreme_finite_values_give_the_rounded_exact_results():
    """Finite in, finite out, except where the exact value itself overflows float32."""
    big = np.float32(3e38)
    logits = np.array([[big, -big, 0.0], [-big, -big, -big], [1.0, 2.0, 3.0]], np.float32)
    target = np.array([0, 2, 1])
    with np.errstate(over="ignore"):
        exact_log_softmax = ref.log_softmax(logits).astype(np.float32)  # -6e38 is -inf
    np.testing.assert_array_equal(F.log_softmax(logits)[:2], exact_log_softmax[:2])
    for name, value in [("cross_entropy_backward", F.cross_entropy_backward(logits, target)),
                        ("sigmoid", F.sigmoid(logits)), ("tanh", F.tanh(logits)),
                        ("softmax of equal logits", F.log_softmax(logits[1:2]))]:
        assert np.isfinite(value).all(), name
    assert F.log_softmax(logits)[1] == pytest.approx(np.log([1 / 3] * 3), rel=1e-6)


def _blobs(n=90, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    X = (rng.standard_normal((n, 16)) + 2 * y[:, None]) * scale
    return X.astype(np.float32), y


def test_divergence_in_a_later_epoch_names_it_and_keeps_the_earlier_ones():
    X, y = _blobs()
    clf = bnrs.CNNClassifier("fc32-relu-fc32-relu", optimizer="sgd", learning_rate=1e-2,
                             max_epochs=2, batch_size=30, random_state=0).fit(X, y)
    kept = clf.model_.state_dict()
    clf.set_params(learning_rate=1e12)
    with pytest.raises(DivergenceError, match=r"diverged in epoch 3 \(batch \d+ of 3\)"):
        clf.partial_fit(X, y)
    assert clf.n_iter_ == 2
    for key, value in clf.model_.state_dict().items():
        np.testing.assert_array_equal(value, kept[key], err_msg=key)
    assert np.isfinite(clf.predict_proba(X)).all()


def test_data_that_overflows_the_loss_raises_divergence_not_nan_predictions():
    X, y = _blobs(scale=1e37)  # finite in float32, but the logits overflow
    clf = bnrs.CNNClassifier("fc16-relu", optimizer="sgd", learning_rate=1e-3, max_epochs=3,
                             batch_size=30, random_state=0)
    with pytest.raises(DivergenceError, match=r"epoch 1 .*(inf|nan|NaN)"):
        clf.fit(X, y)
    assert all(np.isfinite(p.data).all() for p in clf.model_.parameters())
