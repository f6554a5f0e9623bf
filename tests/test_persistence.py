"""Persistence across processes, and clear errors for state that does not fit.

``test_nn`` and ``test_optim`` round-trip state dicts and pickles inside one process;
here one child process trains and saves (pickle, or a state dict in an .npz file) and
another, a fresh interpreter, loads and predicts or resumes training: the results must
be bit-identical; likewise for a pickled CNNClassifier, which also continues training
identically. Loading a state dict that is not a mapping, lacks keys, has extra or
wrongly shaped ones, or values that are not arrays, raises an error naming the keys and
changes nothing; likewise an optimizer's.
"""

from __future__ import annotations

import child
import numpy as np
import pytest
from bnrs import nn, optim

#: Shared by the writer and the reader: a network with every kind of state (conv and
#: linear weights, batch-norm running statistics and counters, dropout generators).
COMMON = """
    import pickle
    import numpy as np
    from bnrs import nn, optim
    SPEC, SHAPE = "c6-bn-relu-mp2-sd0.1-fc12-bn-relu-d0.3", (2, 10, 10)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((12, 2, 10, 10), dtype=np.float32)
    target = rng.integers(0, 3, 12)
    loss_fn = nn.CrossEntropyLoss()

    def train(model, opt, steps):
        model.train()
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            losses.append(loss_fn(model(x), target))
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
        return losses

    def evaluate(model):
        model.eval()
        return model(x)
"""

WRITER = COMMON + """
    model = nn.from_spec(SPEC, SHAPE, 3, random_state=1)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 3)
    with open("{folder}/model.pkl", "wb") as f:
        pickle.dump((model, opt), f)
    np.savez("{folder}/state.npz", **model.state_dict())
    with open("{folder}/optimizer.pkl", "wb") as f:
        pickle.dump(opt.state_dict(), f)
    np.save("{folder}/eval.npy", evaluate(model))
    np.save("{folder}/resumed.npy", np.array(train(model, opt, 2)))
    np.save("{folder}/resumed_eval.npy", evaluate(model))
"""

READER = COMMON + """
    expected = np.load("{folder}/eval.npy")
    with open("{folder}/model.pkl", "rb") as f:
        model, opt = pickle.load(f)
    print("PICKLE_EVAL", np.array_equal(evaluate(model), expected))
    resumed = np.array(train(model, opt, 2))
    print("PICKLE_RESUME", np.array_equal(resumed, np.load("{folder}/resumed.npy")),
          np.array_equal(evaluate(model), np.load("{folder}/resumed_eval.npy")))

    fresh = nn.from_spec(SPEC, SHAPE, 3, random_state=99)  # other weights, same layout
    with np.load("{folder}/state.npz") as state:
        fresh.load_state_dict(dict(state))
    print("STATE_DICT_EVAL", np.array_equal(evaluate(fresh), expected))
    fresh_opt = optim.Adam(fresh.parameters(), lr=1e-2)
    with open("{folder}/optimizer.pkl", "rb") as f:
        fresh_opt.load_state_dict(pickle.load(f))
    # A state dict has no dropout generators (as in PyTorch): the resumed run draws
    # other masks, so it can only be checked to train on from the loaded moments.
    print("STATE_DICT_RESUME_FINITE",
          bool(np.isfinite(train(fresh, fresh_opt, 2)).all()))
"""


def test_pickle_and_state_dict_round_trip_exactly_across_processes(tmp_path):
    child.run(WRITER.format(folder=tmp_path))
    result = child.run(READER.format(folder=tmp_path))
    assert result.stdout.split("\n")[:4] == [
        "PICKLE_EVAL True", "PICKLE_RESUME True True", "STATE_DICT_EVAL True",
        "STATE_DICT_RESUME_FINITE True"], result.stdout


def _model():
    return nn.Sequential(nn.Conv2d(1, 2, 3, random_state=0), nn.BatchNorm2d(2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(2, 3, random_state=1))


def _assert_unchanged(model, state):
    for key, value in model.state_dict().items():
        assert np.array_equal(value, state[key]), f"{key} changed by a failed load"


@pytest.mark.parametrize("bad, error, match", [
    ([("0.weight", 1)], TypeError, "state_dict: expected a mapping"),
    ("not a dict", TypeError, "state_dict: expected a mapping"),
    ({"0.weight": [[1.0], [1.0, 2.0]]}, ValueError, r"0\.weight: cannot be converted"),
    ({"0.weight": "abc"}, TypeError, r"0\.weight: expected a real-valued array"),
    ({"4.weight": np.zeros((3, 3))}, ValueError, r"4\.weight: expected shape \(3, 2\)"),
    ({"1.running_mean": np.zeros(5)}, ValueError, r"1\.running_mean: expected shape \(2,\)"),
    ({"1.num_batches_tracked": np.zeros(2)}, ValueError, r"1\.num_batches_tracked"),
])
def test_load_state_dict_rejects_bad_values_naming_the_key(bad, error, match):
    model = _model()
    state = model.state_dict()
    given = bad if not isinstance(bad, dict) else {**state, **bad}
    with pytest.raises(error, match=match):
        model.load_state_dict(given)
    _assert_unchanged(model, state)


def test_load_state_dict_names_every_missing_extra_and_misshapen_key():
    model = _model()
    state = model.state_dict()
    broken = {k: v for k, v in state.items() if k not in ("0.bias", "1.running_var")}
    broken.update({"9.weight": np.zeros(1), "2.bias": np.zeros(1),
                   "4.bias": np.zeros(4)})
    with pytest.raises(ValueError) as info:
        model.load_state_dict(broken)
    message = str(info.value)
    for key in ("0.bias", "1.running_var", "9.weight", "2.bias", "4.bias"):
        assert key in message, f"{key} not named in: {message}"
    _assert_unchanged(model, state)


def _optimizer():
    model = nn.Linear(3, 2, random_state=0)
    opt = optim.Adam(model.parameters(), lr=0.1)
    for param in model.parameters():
        param.grad[...] = 1.0
    opt.step()
    return model, opt


@pytest.mark.parametrize("mutate, error, match", [
    (lambda s: [s], TypeError, "state_dict: expected a mapping"),
    (lambda s: {"state": s["state"]}, ValueError, "param_groups"),
    (lambda s: {"param_groups": s["param_groups"]}, ValueError, "state"),
    (lambda s: {**s, "state": {0: {**s["state"][0], "exp_avg": np.zeros(7)}}},
     ValueError, "exp_avg"),
    (lambda s: {**s, "state": {5: s["state"][0]}}, ValueError, "parameter 5"),
    (lambda s: {**s, "param_groups": [{**s["param_groups"][0], "lr": float("nan")}]},
     ValueError, "learning rate"),
])
def test_optimizer_load_state_dict_rejects_what_does_not_fit(mutate, error, match):
    model, opt = _optimizer()
    saved = opt.state_dict()
    before = {key: value.copy() for key, value in opt.state[model.weight].items()
              if isinstance(value, np.ndarray)}
    with pytest.raises(error, match=match):
        opt.load_state_dict(mutate(saved))
    for key, value in before.items():
        assert np.array_equal(opt.state[model.weight][key], value), key
    assert opt.param_groups[0]["lr"] == 0.1


ESTIMATOR_WRITER = """
    import pickle
    import numpy as np
    import bnrs
    rng = np.random.default_rng(3)
    X = rng.standard_normal((30, 2, 6, 6)).astype(np.float32)
    y = np.array(["a", "b", "c"])[np.arange(30) % 3]
    clf = bnrs.CNNClassifier("c4-bn-relu-mp2-d0.3-fc8-bn-relu-d0.2", max_epochs=2,
                             batch_size=16, data_format="channels_first",
                             random_state=0).fit(X, y)
    with open("{folder}/clf.pkl", "wb") as f:
        pickle.dump(clf, f)
    np.save("{folder}/X.npy", X)
    np.save("{folder}/proba.npy", clf.predict_proba(X))
    np.save("{folder}/labels.npy", clf.predict(X))
    clf.partial_fit(X, y)
    np.save("{folder}/continued.npy", clf.predict_proba(X))
"""

ESTIMATOR_READER = """
    import pickle
    import numpy as np
    X = np.load("{folder}/X.npy")
    with open("{folder}/clf.pkl", "rb") as f:
        clf = pickle.load(f)
    print("PROBA", np.array_equal(clf.predict_proba(X), np.load("{folder}/proba.npy")))
    print("LABELS", np.array_equal(clf.predict(X), np.load("{folder}/labels.npy")))
    clf.partial_fit(X, np.array(["a", "b", "c"])[np.arange(30) % 3])
    print("CONTINUED", np.array_equal(clf.predict_proba(X), np.load("{folder}/continued.npy")))
"""


def test_pickled_estimator_predicts_and_trains_on_identically_in_another_process(tmp_path):
    child.run(ESTIMATOR_WRITER.format(folder=tmp_path))
    result = child.run(ESTIMATOR_READER.format(folder=tmp_path))
    assert result.stdout.split("\n")[:3] == ["PROBA True", "LABELS True", "CONTINUED True"]
