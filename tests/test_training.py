"""bnrs.training: the loop shared by CNNClassifier, ``bnrs study`` and ``bnrs bench``."""

from __future__ import annotations

import bnrs
import numpy as np
import pytest
from bnrs import nn, optim
from bnrs.training import (STAGES, batch_bounds, eval_logits, num_threads, train_epoch,
                           train_step)

ARCHITECTURE = "c4-bn-relu-mp2-d0.25-fc8-bn-relu"


def _data(n: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 1, 8, 8), dtype=np.float32),
            rng.integers(0, 3, size=n, dtype=np.int64))


def _setup(seed: int = 0):
    model = nn.from_spec(ARCHITECTURE, (1, 8, 8), 3, random_state=seed)
    return model, nn.CrossEntropyLoss(), optim.Adam(model.parameters(), lr=1e-2)


@pytest.mark.parametrize("n, size, last, expected", [
    (65, 64, "merge_single", [(0, 65)]),
    (66, 64, "merge_single", [(0, 64), (64, 66)]),
    (10, 64, "merge_single", [(0, 10)]),
    (65, 64, "keep", [(0, 64), (64, 65)]),
    (10, 64, "keep", [(0, 10)]),
    (130, 64, "drop", [(0, 64), (64, 128)]),
    (128, 64, "drop", [(0, 64), (64, 128)]),
    (10, 64, "drop", []),
    (0, 64, "keep", []),
])
def test_batch_bounds_rules(n, size, last, expected):
    assert batch_bounds(n, size, last=last) == expected


def test_batch_bounds_rejects_an_unknown_rule():
    with pytest.raises(ValueError, match="last"):
        batch_bounds(10, 4, last="pad")


def test_train_step_marks_every_stage_in_order():
    model, criterion, optimizer = _setup()
    X, y = _data()
    before = model[0].weight.data.copy()
    stages = []
    loss = train_step(model.train(), criterion, optimizer, X, y, mark=stages.append)
    assert stages == list(STAGES)
    assert np.isfinite(loss)
    assert not np.array_equal(before, model[0].weight.data)


def test_train_epoch_stops_at_a_non_finite_loss_before_its_backward():
    X, y = _data()
    X[12] = np.inf                            # in the second batch of 8
    model, criterion, optimizer = _setup()
    losses = train_epoch(model, criterion, optimizer, X, y, batch_bounds(20, 8))
    assert len(losses) == 2 and np.isfinite(losses[0]) and not np.isfinite(losses[1])
    expected, criterion, optimizer = _setup()     # the first batch alone
    train_epoch(expected, criterion, optimizer, X, y, batch_bounds(20, 8)[:1])
    # The parameters; batch norm's running statistics took the non-finite forward in.
    for a, b in zip(model.parameters(), expected.parameters()):
        np.testing.assert_array_equal(a.data, b.data)
    assert model.training
    assert all(module._ctx is None for module in model.modules())


def test_train_epoch_follows_the_order():
    X, y = _data()
    order = np.random.default_rng(1).permutation(20)
    bounds = batch_bounds(20, 8)
    model, criterion, optimizer = _setup()
    shuffled = train_epoch(model, criterion, optimizer, X, y, bounds, order)
    model, criterion, optimizer = _setup()
    permuted = train_epoch(model, criterion, optimizer, X[order], y[order], bounds)
    assert shuffled == permuted


def test_eval_logits_in_chunks_in_evaluation_mode_and_restores_the_mode():
    model, _, _ = _setup()
    X, _ = _data(n=11)
    model.train()
    chunks = list(eval_logits(model, X, 4))
    assert [len(c) for c in chunks] == [4, 4, 3]
    assert model.training
    model.eval()
    expected = [model(X[start:start + 4]) for start in (0, 4, 8)]
    for chunk, logits in zip(chunks, expected):
        np.testing.assert_array_equal(chunk, logits)


def test_num_threads_restores_the_count():
    before = bnrs.get_num_threads()
    with num_threads(1):
        assert bnrs.get_num_threads() == 1
    assert bnrs.get_num_threads() == before
    with num_threads(None):
        assert bnrs.get_num_threads() == before


def test_num_threads_blocks_overlapping_in_two_threads_keep_their_own_counts():
    """A block's count is its thread's own: two blocks that overlap in time, the second
    entered inside the first and left after it, each see their count and restore only
    their thread's, so the process default is unchanged afterwards."""
    import threading

    before = bnrs.get_num_threads()
    first_in, second_in, first_out = (threading.Event() for _ in range(3))
    seen = {}

    def first():
        with num_threads(1):
            first_in.set()
            second_in.wait(30)
            seen["first"] = bnrs.get_num_threads()
        first_out.set()

    def second():
        first_in.wait(30)
        with num_threads(3):
            second_in.set()
            first_out.wait(30)
            seen["second"] = bnrs.get_num_threads()
        seen["second after"] = bnrs.get_num_threads()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert seen == {"first": 1, "second": 3, "second after": before}
    assert bnrs.get_num_threads() == before
