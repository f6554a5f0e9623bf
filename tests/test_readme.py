"""The README's Python examples run as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no Python example"
    namespaces = []
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        namespaces.append(namespace)
    estimator, regressor, schedule, layers, weighted, mc_dropout, augmented = namespaces
    # The estimator example reaches the accuracy the README's claims rest on.
    assert estimator["clf"].score(estimator["X_test"], estimator["y_test"]) >= 0.98
    # The regressor example reads its channels-last images as such and fits both targets.
    reg = regressor["reg"]
    assert reg.data_format_ == "channels_last" and reg.input_shape_ == (1, 8, 8)
    assert reg.predict(regressor["X"][1500:]).shape == (297, 2)
    assert reg.score(regressor["X"][1500:], regressor["Y"][1500:]) > 0.9
    # The schedule example anneals the rate by its cosine, and its checkpoint found the
    # epoch the estimator restored (early stopping on the same validation loss).
    clf, best = schedule["clf"], schedule["best"]
    lrs = [epoch["lr"] for epoch in clf.history_]
    assert lrs[0] == 3e-3 and lrs == sorted(lrs, reverse=True) and len(set(lrs)) == len(lrs)
    assert best.best_value_ == clf.best_validation_loss_
    assert [epoch["valid_loss"] for epoch in clf.history_][best.best_epoch_ - 1] == \
        best.best_value_
    assert clf.score(schedule["X"], schedule["y"]) > 0.9
    # The layer example ends with evaluation-mode logits for its 32 samples and 10 classes.
    assert layers["logits"].shape == (32, 10)
    # The weights example balances its rare class; the MC-dropout example's mean is
    # predict_proba and it has a spread; the augmented network still learns.
    assert weighted["clf"].n_iter_ == 5
    mean, std = mc_dropout["mean"], mc_dropout["std"]
    np.testing.assert_array_equal(mean, mc_dropout["clf"].predict_proba(mc_dropout["X"][1500:]))
    assert std.shape == (297, 10) and std.max() > 0
    assert augmented["clf"].score(augmented["X"][1500:], augmented["y"][1500:]) > 0.8
