"""The training-step executor (bnrs.executor, bnrs._core.TrainStep) against the Python path.

- Every layer type it runs, with Adam, AdamW and SGD (momentum, Nesterov, weight decay,
  parameter groups), at 1 and 2 threads: after several steps the loss, parameters,
  gradients, running statistics, num_batches_tracked, optimizer state and the dropout
  layers' generators are the bits of the Python path (BNRS_FUSED_STEP=0).
- The fused training blocks it plans (the runs bnrs.nn.fusion fuses), against the
  Python path and the executor without fusion (BNRS_FUSE=0), and its kernel calls.
- Networks or batches it does not run fall back to the Python path, with its results.
- A non-finite loss, a bad target, a changed layer: the state the Python path leaves.
- Ctrl-C during one long step raises KeyboardInterrupt within a second.
"""

from __future__ import annotations

import copy
import signal
import textwrap
import time

import bnrs
import numpy as np
import pytest
from bnrs import _core, executor, nn, optim
from bnrs.nn.dropout import draw_seed
from bnrs.nn.fusion import FUSE_ENV
from bnrs.training import batch_bounds, num_threads, train_epoch, train_step

LENET = "c4-bn-relu-mp2-c8-bn-relu-mp2-d0.25-fc16-bn-relu-d0.5"


def _optimizer(name: str, model: nn.Module):
    params = list(model.parameters())
    if name == "adam":
        return optim.Adam(params, lr=1e-2)
    if name == "adamw":
        return optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if name == "sgd":
        return optim.SGD(params, lr=0.1, momentum=0.9)
    if name == "nesterov":
        return optim.SGD(params, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3)
    if name == "plain_sgd":
        return optim.SGD(params, lr=0.1)
    if name == "groups":   # two groups with their own learning rates
        return optim.Adam([{"params": params[:2], "lr": 1e-3}, {"params": params[2:]}],
                          lr=1e-2)
    raise AssertionError(name)


def _batches(shape, n_classes, batch, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch,) + shape).astype(np.float32),
             rng.integers(0, n_classes, batch)) for _ in range(steps)]


def _train(monkeypatch, fused: bool, model, opt, batches, threads=1, sample_weight=None):
    """Train a copy of ``model`` and ``opt`` on ``batches``; return them and the losses."""
    model, opt = copy.deepcopy((model, opt))
    monkeypatch.setenv(executor.STEP_ENV, "1" if fused else "0")
    criterion = nn.CrossEntropyLoss()
    model.train()
    losses = []
    with num_threads(threads):
        for inputs, targets in batches:
            weight = None if sample_weight is None else sample_weight[:len(targets)]
            losses.append(train_step(model, criterion, opt, inputs, targets,
                                     sample_weight=weight))
    return model, opt, losses


def _same_bits(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), what


def assert_same_state(fused, python):
    """Model, gradients, optimizer and dropout generators bit for bit; same losses."""
    (model_a, opt_a, losses_a), (model_b, opt_b, losses_b) = fused, python
    _same_bits(losses_a, losses_b, "losses")   # NaN included
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert list(state_a) == list(state_b)
    for key in state_a:
        _same_bits(state_a[key], state_b[key], key)
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        _same_bits(pa.grad, pb.grad, f"{name}.grad")
    saved_a, saved_b = opt_a.state_dict(), opt_b.state_dict()
    assert saved_a["param_groups"] == saved_b["param_groups"]
    assert sorted(saved_a["state"]) == sorted(saved_b["state"])
    for index, values in saved_a["state"].items():
        assert sorted(values) == sorted(saved_b["state"][index])
        for key, value in values.items():
            if isinstance(value, np.ndarray):
                _same_bits(value, saved_b["state"][index][key], f"state {index} {key}")
            else:
                assert value == saved_b["state"][index][key], (index, key)
    for ma, mb in zip(model_a.modules(), model_b.modules()):
        if hasattr(ma, "_rng"):
            assert ma._rng.bit_generator.state == mb._rng.bit_generator.state
        assert ma._ctx is None and mb._ctx is None


def _runs_fused(model, opt, inputs, targets, monkeypatch) -> bool:
    """Whether the executor takes a step of this network (on copies)."""
    model, opt = copy.deepcopy((model, opt))
    monkeypatch.setenv(executor.STEP_ENV, "1")
    model.train()
    return executor.run_step(model, nn.CrossEntropyLoss(), opt, inputs, targets) is not None


def test_a_step_long_enough_to_be_watched_for_ctrl_c_is_the_bits_of_the_python_path(
        monkeypatch):
    # LeNetBN at batch 40 (~1.5e8 of the step's work) runs on the pool while the calling
    # thread polls for Ctrl-C, where the small networks above run on the calling thread.
    spec = "c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5"
    model = nn.from_spec(spec, (1, 28, 28), 10, random_state=0)
    opt = _optimizer("adam", model)
    batches = _batches((1, 28, 28), 10, 40, 2)
    assert _runs_fused(model, opt, *batches[0], monkeypatch)
    assert_same_state(_train(monkeypatch, True, model, opt, batches),
                      _train(monkeypatch, False, model, opt, batches))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd", "nesterov", "groups"])
def test_lenet_steps_are_the_bits_of_the_python_path(monkeypatch, opt_name, threads):
    model = nn.from_spec(LENET, (1, 12, 12), 5, random_state=0)
    opt = _optimizer(opt_name, model)
    batches = _batches((1, 12, 12), 5, 8, 4)
    assert _runs_fused(model, opt, *batches[0], monkeypatch)
    assert_same_state(_train(monkeypatch, True, model, opt, batches, threads),
                      _train(monkeypatch, False, model, opt, batches, threads))


def _layers_network():
    """Every layer type the executor runs, with the options that change its arithmetic."""
    rng = np.random.default_rng(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, rng=rng), nn.BatchNorm2d(4, momentum=None),
        nn.LeakyReLU(0.2), nn.Dropout2d(0.3, rng=rng), nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, bias=False, rng=rng),
        nn.BatchNorm2d(6, affine=False), nn.Tanh(),
        nn.MaxPool2d(3, stride=1, padding=1), nn.Dropout(0.0), nn.Flatten(),
        nn.Linear(6 * 2 * 2, 12, rng=rng), nn.BatchNorm1d(12, track_running_stats=False),
        nn.Sigmoid(), nn.Dropout(0.4, rng=rng), nn.Linear(12, 8, rng=rng), nn.ReLU(),
        nn.Dropout(1.0), nn.Linear(8, 3, bias=False, rng=rng))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("opt_name", ["adam", "plain_sgd"])
def test_every_layer_type_gives_the_bits_of_the_python_path(monkeypatch, opt_name, threads):
    model = _layers_network()
    opt = _optimizer(opt_name, model)
    batches = _batches((2, 10, 10), 3, 6, 3) + _batches((2, 10, 10), 3, 5, 1, seed=2)
    assert _runs_fused(model, opt, *batches[0], monkeypatch)
    assert_same_state(_train(monkeypatch, True, model, opt, batches, threads),
                      _train(monkeypatch, False, model, opt, batches, threads))


def _grouped_network():
    """Depthwise (multiplier 1 and 2, strided) and grouped convolutions, as ``dsc`` tokens
    and the fused training blocks after them build them."""
    rng = np.random.default_rng(5)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2, rng=rng), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=False, rng=rng),
        nn.Conv2d(8, 6, 1, rng=rng), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, rng=rng), nn.Flatten(),
        nn.Linear(6 * 3 * 3, 3, rng=rng))


@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_convolutions_give_the_bits_of_the_python_path(monkeypatch, threads):
    model = _grouped_network()
    opt = _optimizer("adam", model)
    batches = _batches((2, 10, 10), 3, 6, 3)
    assert _runs_fused(model, opt, *batches[0], monkeypatch)
    assert_same_state(_train(monkeypatch, True, model, opt, batches, threads),
                      _train(monkeypatch, False, model, opt, batches, threads))


def _blocks_network():
    """Fused training blocks of every shape, one at the start (whose input gradient is not
    wanted), dropouts in and out of blocks drawing from one generator, and runs the
    fusion leaves alone."""
    rng = np.random.default_rng(4)
    return nn.Sequential(
        nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2, 4, 3, padding=1, rng=rng), nn.Dropout(0.2, rng=rng),
        nn.BatchNorm2d(4, momentum=None), nn.LeakyReLU(0.2), nn.AvgPool2d(2),
        nn.Dropout2d(0.3, rng=rng),
        nn.Conv2d(4, 6, 1, bias=False, rng=rng), nn.BatchNorm2d(6, affine=False),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 1, rng=rng), nn.BatchNorm2d(6), nn.Tanh(),
        nn.MaxPool2d(3, stride=1, padding=1),   # not a 2x2 pool: not in the block
        nn.Flatten(), nn.Linear(6, 12, rng=rng),
        nn.BatchNorm1d(12, track_running_stats=False), nn.Sigmoid(),
        nn.Dropout(0.4, rng=rng), nn.Linear(12, 8, rng=rng), nn.BatchNorm1d(8),
        nn.Dropout(0.5, rng=rng), nn.Linear(8, 3, rng=rng))


def _plan_kinds(model, opt, inputs, targets, monkeypatch) -> list[str]:
    """The kinds of the stages the executor plans for this network (on copies)."""
    model, opt = copy.deepcopy((model, opt))
    monkeypatch.setenv(executor.STEP_ENV, "1")
    model.train()
    assert executor.run_step(model, nn.CrossEntropyLoss(), opt, inputs, targets) is not None
    return [layer[0] for layer in executor._EXECUTORS[model].plan.layers]


def _train_with(monkeypatch, step: bool, fuse: bool, model, opt, batches, threads):
    monkeypatch.setenv(FUSE_ENV, "1" if fuse else "0")
    return _train(monkeypatch, step, model, opt, batches, threads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
@pytest.mark.parametrize("network", ["lenet", "blocks"])
def test_fused_blocks_give_the_bits_of_the_unfused_paths(monkeypatch, network, opt_name,
                                                         threads):
    # The executor with fused blocks against the Python path without fusion and the
    # executor without fusion.
    if network == "lenet":
        model, shape, classes = nn.from_spec(LENET, (1, 12, 12), 5, random_state=0), \
            (1, 12, 12), 5
    else:
        model, shape, classes = _blocks_network(), (2, 8, 8), 3
    opt = _optimizer(opt_name, model)
    batches = _batches(shape, classes, 8, 3) + _batches(shape, classes, 5, 1, seed=2)
    monkeypatch.setenv(FUSE_ENV, "1")
    kinds = _plan_kinds(model, opt, *batches[0], monkeypatch)
    expected = (3 if network == "lenet" else 6)
    assert kinds.count("bn_block") == expected
    monkeypatch.setenv(FUSE_ENV, "0")
    assert "bn_block" not in _plan_kinds(model, opt, *batches[0], monkeypatch)
    fused = _train_with(monkeypatch, True, True, model, opt, batches, threads)
    assert_same_state(fused, _train_with(monkeypatch, False, False, model, opt, batches,
                                         threads))
    assert_same_state(fused, _train_with(monkeypatch, True, False, model, opt, batches,
                                         threads))


@pytest.mark.parametrize("fuse", [True, False])
def test_batches_that_shrink_and_grow_again_give_the_bits_of_the_python_path(monkeypatch,
                                                                             fuse):
    # The step keeps its buffers at their largest and uses a batch's share of them; a
    # network that starts with a batch norm computes the input gradient no layer wants.
    rng = np.random.default_rng(7)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.ReLU(), nn.Dropout2d(0.2, rng=rng),
                          nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.BatchNorm2d(3),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 4, rng=rng))
    opt = _optimizer("adam", model)
    batches = [batch for size, seed in ((6, 1), (2, 2), (5, 3), (6, 4), (3, 5))
               for batch in _batches((2, 6, 6), 4, size, 1, seed=seed)]
    monkeypatch.setenv(FUSE_ENV, "1" if fuse else "0")
    assert _plan_kinds(model, opt, *batches[0], monkeypatch)[0] == (
        "bn_block" if fuse else "batch_norm")
    assert_same_state(_train_with(monkeypatch, True, fuse, model, opt, batches, 1),
                      _train_with(monkeypatch, False, fuse, model, opt, batches, 1))


def test_the_fuse_flag_and_switch_are_followed_between_steps(monkeypatch):
    model = nn.from_spec(LENET, (1, 12, 12), 5, random_state=0)
    opt = _optimizer("adam", model)
    batches = _batches((1, 12, 12), 5, 8, 4)
    monkeypatch.setenv(FUSE_ENV, "1")
    unfused = copy.deepcopy(model)
    unfused.fuse = False
    assert "bn_block" not in _plan_kinds(unfused, opt, *batches[0], monkeypatch)

    def train(step):
        monkeypatch.setenv(executor.STEP_ENV, "1" if step else "0")
        trained, trained_opt = copy.deepcopy((model, opt))
        losses = []
        for k, batch in enumerate(batches):
            monkeypatch.setenv(FUSE_ENV, "1" if k % 2 else "0")
            trained.fuse = k != 2
            losses.append(train_step(trained, nn.CrossEntropyLoss(), trained_opt, *batch))
        return trained, trained_opt, losses

    assert_same_state(train(True), train(False))


def test_a_batch_a_fused_block_refuses_raises_as_the_python_path(monkeypatch):
    # One sample of (features,): one value per channel, which a training batch norm
    # refuses, fused or not, leaving num_batches_tracked alone.
    model = nn.from_spec("fc16-bn-relu-d0.5", (10,), 4, random_state=0)
    inputs, targets = _batches((10,), 4, 1, 1)[0]
    monkeypatch.setenv(FUSE_ENV, "1")
    for step in (True, False):
        monkeypatch.setenv(executor.STEP_ENV, "1" if step else "0")
        trained = copy.deepcopy(model)
        opt = _optimizer("adam", trained)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            train_step(trained, nn.CrossEntropyLoss(), opt, inputs, targets)
        assert trained[1].num_batches_tracked == 0


def test_a_forward_that_fails_leaves_the_later_dropouts_generators_alone(monkeypatch):
    # The first dropout runs before the batch norm refuses the batch (one sample of
    # (features,)); the second is never reached layer by layer, so its generator must
    # not have moved, whichever path ran and whether the last block fuses or not.
    model = nn.from_spec("fc12-relu-d0.5-fc16-bn-relu-d0.5", (10,), 4, random_state=0)
    inputs, targets = _batches((10,), 4, 1, 1)[0]
    for fuse in ("1", "0"):
        monkeypatch.setenv(FUSE_ENV, fuse)
        states = []
        for step in (True, False):
            monkeypatch.setenv(executor.STEP_ENV, "1" if step else "0")
            trained = copy.deepcopy(model)
            assert step is False or _runs_fused(trained, _optimizer("adam", trained),
                                                *_batches((10,), 4, 8, 1)[0], monkeypatch)
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                train_step(trained, nn.CrossEntropyLoss(), _optimizer("adam", trained),
                           inputs, targets)
            states.append([m._rng.bit_generator.state for m in trained
                           if isinstance(m, nn.Dropout)])
        fresh = [m._rng.bit_generator.state for m in model if isinstance(m, nn.Dropout)]
        assert states[0] == states[1]
        assert states[0][0] != fresh[0] and states[0][1] == fresh[1]


def test_a_forward_that_fails_gives_back_only_the_later_layers_draw_of_a_shared_generator(
        monkeypatch):
    # Both dropouts draw from one generator: layer by layer, the first draws before the
    # batch norm refuses the batch and the second never does, so the generator moves by
    # one draw. The executor drew both seeds up front and must give back the second only.
    model = nn.from_spec("fc12-relu-d0.5-fc16-bn-relu-d0.5", (10,), 4, random_state=0)
    model[6]._rng = model[2]._rng
    inputs, targets = _batches((10,), 4, 1, 1)[0]
    fresh = copy.deepcopy(model[2]._rng)
    draw_seed(fresh)
    for fuse in ("1", "0"):
        monkeypatch.setenv(FUSE_ENV, fuse)
        for step in (True, False):
            monkeypatch.setenv(executor.STEP_ENV, "1" if step else "0")
            trained = copy.deepcopy(model)
            assert trained[6]._rng is trained[2]._rng
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                train_step(trained, nn.CrossEntropyLoss(), _optimizer("adam", trained),
                           inputs, targets)
            assert trained[2]._rng.bit_generator.state == fresh.bit_generator.state, step


class _InterruptedAsItEnds:
    """A TrainStep whose ``run`` completes and then raises KeyboardInterrupt, as a call
    does when Ctrl-C is seen while its step ends (the binding discards the result)."""

    def __init__(self, train_step):
        self.train_step = train_step

    def __getattr__(self, name):
        return getattr(self.train_step, name)

    def run(self, *args):
        self.train_step.run(*args)
        raise KeyboardInterrupt


def _lenet_to_train(monkeypatch):
    """A small LeNet and its optimizer to train by the executor, four batches, and the
    state four uninterrupted steps leave (``_train``)."""
    monkeypatch.setenv(FUSE_ENV, "1")   # the stages a test names are the fused plan's
    model = nn.from_spec(LENET, (1, 12, 12), 3, random_state=0)
    opt = _optimizer("adam", model)
    batches = _batches((1, 12, 12), 3, 6, 4)
    reference = _train(monkeypatch, True, model, opt, batches)
    model, opt = copy.deepcopy((model, opt))
    model.train()
    monkeypatch.setenv(executor.STEP_ENV, "1")
    return model, opt, nn.CrossEntropyLoss(), batches, reference


def test_a_step_interrupted_as_it_ends_counts_in_the_optimizer(monkeypatch):
    # Its parameters moved, so Adam counts the step: the steps after it are those of
    # steps never interrupted.
    model, opt, criterion, batches, reference = _lenet_to_train(monkeypatch)
    losses = [train_step(model, criterion, opt, *batches[0])]
    train = executor._EXECUTORS[model]
    assert train.train_step.steps_done == 1
    train.train_step = _InterruptedAsItEnds(train.train_step)
    with pytest.raises(KeyboardInterrupt):
        train_step(model, criterion, opt, *batches[1])
    assert all(state["step"] == 2 for state in opt.state.values())
    train.train_step = train.train_step.train_step
    # The reference's loss of the interrupted step, which the call could not return.
    losses.append(reference[2][1])
    losses += [train_step(model, criterion, opt, *batch) for batch in batches[2:]]
    assert_same_state((model, opt, losses), reference)


def test_a_step_with_a_non_finite_loss_reports_no_step_done(monkeypatch):
    model = nn.from_spec("fc8-bn-relu-d0.5", (4,), 3, random_state=0)
    opt = _optimizer("adam", model)
    inputs, targets = _batches((4,), 3, 5, 1)[0]
    monkeypatch.setenv(executor.STEP_ENV, "1")
    model.train()
    train_step(model, nn.CrossEntropyLoss(), opt, inputs, targets)
    assert executor._EXECUTORS[model].train_step.steps_done == 1
    inputs[0, 0] = np.inf
    assert np.isnan(train_step(model, nn.CrossEntropyLoss(), opt, inputs, targets))
    assert executor._EXECUTORS[model].train_step.steps_done == 0
    assert all(state["step"] == 1 for state in opt.state.values())


def test_the_stage_clock_times_each_stage_without_changing_a_bit(monkeypatch):
    model, opt, criterion, batches, reference = _lenet_to_train(monkeypatch)
    assert not executor.set_stage_clock(model)   # no plan before the first step
    assert executor.stage_times(model) is None
    losses = [train_step(model, criterion, opt, *batches[0])]
    assert executor.stage_times(model) is None   # off until switched on
    assert executor.set_stage_clock(model)
    start = time.perf_counter()
    losses += [train_step(model, criterion, opt, *batch) for batch in batches[1:3]]
    elapsed = time.perf_counter() - start
    times = executor.stage_times(model)
    assert times["steps"] == 2
    names = [stage["stage"] for stage in times["stages"]]
    assert names == ["conv2d 1x12x12 -> 4x12x12", "bn_block 4x12x12 -> 4x6x6",
                     "conv2d 4x6x6 -> 8x6x6", "bn_block 8x6x6 -> 8x3x3", "view 8x3x3 -> 72",
                     "linear 72 -> 16", "bn_block 16 -> 16", "linear 16 -> 3"]
    for stage in times["stages"]:
        if stage["stage"].startswith("view"):
            assert stage["forward_s"] == stage["backward_s"] == 0.0
        else:
            assert stage["forward_s"] > 0 and stage["backward_s"] > 0
    assert times["loss_s"] > 0 and times["update_s"] > 0
    inside = times["loss_s"] + times["update_s"] + sum(
        stage["forward_s"] + stage["backward_s"] for stage in times["stages"])
    assert inside <= elapsed   # parts of the two steps, timed inside them
    # Switched on again: from zero; an epoch's steps count too.
    assert executor.set_stage_clock(model, True)
    assert executor.stage_times(model)["steps"] == 0
    losses += train_epoch(model, criterion, opt, *batches[3], [(0, 6)])
    assert executor.stage_times(model)["steps"] == 1
    assert_same_state((model, opt, losses), reference)
    # A step without updates (a non-finite loss) is not counted; its loss is timed.
    loss_before = executor.stage_times(model)["loss_s"]
    bad = batches[3][0].copy()
    bad[0, 0, 0, 0] = np.nan
    assert np.isnan(train_step(model, criterion, opt, bad, batches[3][1]))
    assert executor.stage_times(model)["steps"] == 1
    assert executor.stage_times(model)["loss_s"] > loss_before
    assert executor.set_stage_clock(model, False)
    assert executor.stage_times(model) is None


def test_a_learning_rate_beyond_float32_is_refused_before_any_parameter_moves(monkeypatch):
    # 1e39 is a finite Python float but infinite in float32: the kernels refused it at the
    # second group, after the first group's parameters had moved.
    model = nn.from_spec("fc6-relu-fc6", (4,), 3, random_state=0)
    inputs, targets = _batches((4,), 3, 8, 1)[0]
    before = copy.deepcopy(model.state_dict())
    for step in (True, False):
        monkeypatch.setenv(executor.STEP_ENV, "1" if step else "0")
        trained = copy.deepcopy(model)
        params = list(trained.parameters())
        opt = optim.Adam([{"params": params[:2]}, {"params": params[2:]}])
        opt.param_groups[1]["lr"] = 1e39   # as a scheduler or a user may set it
        with pytest.raises(ValueError, match=r"^Invalid learning rate: .*got 1e\+39"):
            train_step(trained, nn.CrossEntropyLoss(), opt, inputs, targets)
        for key, value in trained.state_dict().items():
            _same_bits(value, before[key], key)
        assert opt.state == {}


def test_release_memory_frees_the_step_buffers_and_the_next_step_makes_them_again(
        monkeypatch):
    model = nn.from_spec(LENET, (1, 12, 12), 5, random_state=0)
    opt = _optimizer("adam", model)
    batches = _batches((1, 12, 12), 5, 16, 3)
    kept = _train(monkeypatch, True, model, opt, batches)
    model, opt = copy.deepcopy((model, opt))
    monkeypatch.setenv(executor.STEP_ENV, "1")
    losses = []
    for inputs, targets in batches:
        losses.append(train_step(model, nn.CrossEntropyLoss(), opt, inputs, targets))
        # At least the first convolution's output (16 x 4 x 12 x 12 float32) was kept.
        assert bnrs.release_memory() >= 16 * 4 * 12 * 12 * 4
        assert executor.release_buffers() == 0
    assert_same_state((model, opt, losses), kept)


def test_sample_weights_give_the_bits_of_the_python_path(monkeypatch):
    model = nn.from_spec("fc16-bn-relu-d0.5", (10,), 4, random_state=0)
    opt = _optimizer("adam", model)
    batches = _batches((10,), 4, 7, 3)
    weight = np.random.default_rng(5).uniform(0, 2, 7)
    assert_same_state(_train(monkeypatch, True, model, opt, batches, sample_weight=weight),
                      _train(monkeypatch, False, model, opt, batches, sample_weight=weight))


def test_frozen_and_foreign_parameters_as_the_python_path(monkeypatch):
    # The first layer's parameters out of the optimizer (their gradients accumulate over
    # the steps), and a parameter the optimizer updates that is in no layer.
    model = nn.from_spec("c3-relu-mp2-fc6-relu", (1, 6, 6), 3, random_state=0)
    params = list(model.parameters())
    foreign = nn.Parameter(np.ones((2, 2)))
    opt = optim.SGD([{"params": params[2:]}, {"params": [foreign], "lr": 0.5}], lr=0.1,
                    momentum=0.5)
    batches = _batches((1, 6, 6), 3, 4, 3)
    assert _runs_fused(model, opt, *batches[0], monkeypatch)
    fused = _train(monkeypatch, True, model, opt, batches)
    python = _train(monkeypatch, False, model, opt, batches)
    assert_same_state(fused, python)
    _same_bits(fused[1].param_groups[1]["params"][0].data,
               python[1].param_groups[1]["params"][0].data, "foreign parameter")


def test_a_parameter_group_added_between_steps_is_planned_again(monkeypatch):
    model = nn.from_spec("c3-relu-mp2-fc6-relu", (1, 6, 6), 3, random_state=0)
    params = list(model.parameters())
    batches = _batches((1, 6, 6), 3, 4, 4)

    def train(fused):
        monkeypatch.setenv(executor.STEP_ENV, "1" if fused else "0")
        trained = copy.deepcopy(model)
        trained_params = list(trained.parameters())
        opt = optim.Adam(trained_params[2:], lr=1e-2)
        losses = [train_step(trained, nn.CrossEntropyLoss(), opt, *batch)
                  for batch in batches[:2]]
        # The first layer's parameters, and one in no layer (unknown to the plan).
        opt.add_param_group({"params": trained_params[:2] + [nn.Parameter(np.ones(3))],
                             "lr": 1e-3})
        losses += [train_step(trained, nn.CrossEntropyLoss(), opt, *batch)
                   for batch in batches[2:]]
        return trained, opt, losses

    assert len(params) == 6
    assert_same_state(train(True), train(False))


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.ReLU(), nn.Flatten(),
                  nn.Linear(2 * 4 * 4, 3)),
    nn.from_spec("c2-res2-gap-fc3", (1, 6, 6), 3, random_state=0),
    nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(0), nn.Linear(2 * 4 * 4 * 4, 3)),
], ids=["groupnorm", "residual", "flatten-batch"])
def test_other_networks_fall_back_to_the_python_path(monkeypatch, model):
    opt = _optimizer("adam", model)
    inputs, targets = _batches((1, 6, 6), 3, 4, 1)[0]
    assert not _runs_fused(model, opt, inputs, targets, monkeypatch)


def test_a_layer_in_evaluation_mode_or_a_replaced_forward_falls_back(monkeypatch):
    model = nn.from_spec("fc6-bn-relu-d0.5", (4,), 3, random_state=0)
    opt = _optimizer("adam", model)
    inputs, targets = _batches((4,), 3, 4, 1)[0]
    assert _runs_fused(model, opt, inputs, targets, monkeypatch)
    monkeypatch.setenv(executor.STEP_ENV, "1")
    model.train()
    assert executor.run_step(model, nn.CrossEntropyLoss(), opt, inputs, targets) is not None
    model[1].eval()
    assert executor.run_step(model, nn.CrossEntropyLoss(), opt, inputs, targets) is None
    model.train()
    model[2].forward = lambda x: x   # as bench's per-layer profiler wraps a layer
    assert executor.run_step(model, nn.CrossEntropyLoss(), opt, inputs, targets) is None
    del model[2].forward
    assert executor.run_step(model, nn.CrossEntropyLoss(), opt, inputs, targets) is not None
    monkeypatch.setenv(executor.STEP_ENV, "0")
    assert executor.run_step(model, nn.CrossEntropyLoss(), opt, inputs, targets) is None


@pytest.mark.parametrize("cls, method", [(nn.ReLU, "forward"), (nn.BatchNorm1d, "backward"),
                                         (nn.CrossEntropyLoss, "forward"),
                                         (optim.Adam, "step")])
def test_a_method_replaced_on_the_class_falls_back(monkeypatch, cls, method):
    # A test or a profiler wrapping a class's method sees its wrapper called.
    model = nn.from_spec("fc6-bn-relu-d0.5", (4,), 3, random_state=0)
    opt = _optimizer("adam", model)
    inputs, targets = _batches((4,), 3, 4, 1)[0]
    assert _runs_fused(model, opt, inputs, targets, monkeypatch)
    original = getattr(cls, method)
    monkeypatch.setattr(cls, method, lambda self, *args, **kwargs: original(self, *args,
                                                                            **kwargs))
    assert not _runs_fused(model, opt, inputs, targets, monkeypatch)


def test_a_changed_layer_is_planned_again(monkeypatch):
    model = nn.from_spec("fc6-relu-d0.5", (4,), 3, random_state=0)
    opt = _optimizer("adam", model)
    batches = _batches((4,), 3, 5, 2)

    def train_then_change(fused):
        trained, trained_opt, losses = _train(monkeypatch, fused, model, opt, batches)
        trained[2].p = 0.25
        trained[0].weight = nn.Parameter(trained[0].weight.data * 2)
        trained_opt.param_groups[0]["params"][0] = trained[0].weight
        for inputs, targets in batches:
            losses.append(train_step(trained, nn.CrossEntropyLoss(), trained_opt, inputs,
                                     targets))
        return trained, trained_opt, losses

    assert_same_state(train_then_change(True), train_then_change(False))


def test_a_slope_changed_to_minus_zero_is_planned_again(monkeypatch):
    # 0.0 == -0.0, but the activation's negative outputs and gradients take the slope's
    # sign: the step must not keep the plan made for 0.0.
    model = nn.Sequential(nn.Linear(4, 6, random_state=0), nn.LeakyReLU(0.0),
                          nn.Linear(6, 3, random_state=1))
    opt = _optimizer("sgd", model)
    inputs, targets = _batches((4,), 3, 5, 1)[0]
    monkeypatch.setenv(executor.STEP_ENV, "1")
    train_step(model, nn.CrossEntropyLoss(), opt, inputs, targets)
    first = executor._EXECUTORS[model]
    model[1].negative_slope = -0.0
    train_step(model, nn.CrossEntropyLoss(), opt, inputs, targets)
    second = executor._EXECUTORS[model]
    assert second is not first
    (_, slope), = [args for kind, _, _, args in second.plan.layers if kind == "activation"]
    assert slope == 0 and np.signbit(slope)


def test_a_non_finite_loss_leaves_the_state_of_the_python_path(monkeypatch):
    model = nn.from_spec("fc6-bn-relu-d0.5", (4,), 3, random_state=0)
    opt = _optimizer("adam", model)
    batches = _batches((4,), 3, 4, 2)
    batches[1][0][0, 0] = np.inf
    fused, python = (_train(monkeypatch, f, model, opt, batches) for f in (True, False))
    assert not np.isfinite(fused[2][1])
    for result in (fused, python):   # the Python path keeps its forward's state
        result[0].clear_saved()
    assert_same_state(fused, python)
    # A first step that diverges creates no optimizer state.
    fresh = _optimizer("adam", model)
    fused, python = (_train(monkeypatch, f, model, fresh, batches[1:]) for f in (True, False))
    for result in (fused, python):
        result[0].clear_saved()
        assert result[1].state == {}
    assert_same_state(fused, python)


def test_a_bad_target_raises_as_the_python_path(monkeypatch):
    model = nn.from_spec("fc6-relu", (4,), 3, random_state=0)
    opt = _optimizer("sgd", model)
    inputs, targets = _batches((4,), 3, 4, 1)[0]
    targets[1] = 7
    messages = []
    for fused in (True, False):
        monkeypatch.setenv(executor.STEP_ENV, "1" if fused else "0")
        with pytest.raises(ValueError) as error:
            train_step(model, nn.CrossEntropyLoss(), opt, inputs, targets)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "target" in messages[0]


def test_a_hyper_parameter_changed_between_steps_is_used_or_refused(monkeypatch):
    # A scheduler's new learning rate is used at the next step; an invalid one raises
    # PyTorch's message, as optimizer.step does (the executor validates changed groups).
    model = nn.from_spec("fc6-relu", (4,), 3, random_state=0)
    batches = _batches((4,), 3, 4, 2)

    def train(fused):
        monkeypatch.setenv(executor.STEP_ENV, "1" if fused else "0")
        trained = copy.deepcopy(model)
        opt = _optimizer("adam", trained)
        losses = [train_step(trained, nn.CrossEntropyLoss(), opt, *batches[0])]
        opt.param_groups[0]["lr"] = 0.5
        losses.append(train_step(trained, nn.CrossEntropyLoss(), opt, *batches[1]))
        opt.param_groups[0]["lr"] = float("nan")
        with pytest.raises(ValueError, match="Invalid learning rate"):
            train_step(trained, nn.CrossEntropyLoss(), opt, *batches[1])
        opt.param_groups[0]["lr"] = 0.5   # NaN equals nothing, in the comparison too
        trained.clear_saved()
        return trained, opt, losses

    assert_same_state(train(True), train(False))


def test_the_binding_names_the_array_at_fault(monkeypatch):
    model = nn.from_spec("fc6-relu", (4,), 3, random_state=0)
    opt = _optimizer("adam", model)
    inputs, targets = _batches((4,), 3, 4, 1)[0]
    monkeypatch.setenv(executor.STEP_ENV, "1")
    train_step(model, nn.CrossEntropyLoss(), opt, inputs, targets)
    plan = executor._EXECUTORS[model]
    slots = plan.plan.slots
    grads = [p.grad for p in slots]
    grads[2] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"2\.weight\.grad: expected shape \[3, 6\]"):
        plan.train_step.run(inputs, targets, None, [p.data for p in slots], grads, [], [], [],
                            [])
    with pytest.raises(ValueError, match="input: expected shape"):
        plan.train_step.run(inputs[:, :2], targets, None, [p.data for p in slots],
                            [p.grad for p in slots], [], [], [], [])


@pytest.mark.parametrize("fuse", [False, True])
def test_the_step_makes_the_python_paths_kernel_calls_with_one_for_the_updates(monkeypatch, fuse):
    # With fusion, the norm -> activation -> pool run is one fused kernel call forward
    # and one backward, in the executor as in the Python path: four calls fewer.
    monkeypatch.setenv(FUSE_ENV, "1" if fuse else "0")
    model = nn.from_spec("c4-bn-relu-mp2-fc8-relu-d0.5", (1, 8, 8), 3, random_state=0)
    opt = _optimizer("adam", model)
    inputs, targets = _batches((1, 8, 8), 3, 16, 1)[0]
    assert _plan_kinds(model, opt, inputs, targets, monkeypatch).count("bn_block") == fuse
    calls = {}
    _core._kernel_clock(True)
    try:
        for fused in (True, False):
            monkeypatch.setenv(executor.STEP_ENV, "1" if fused else "0")
            trained, trained_opt = copy.deepcopy((model, opt))
            seconds, before = _core._kernel_time()
            train_step(trained, nn.CrossEntropyLoss(), trained_opt, inputs, targets)
            after = _core._kernel_time()
            assert after[0] > seconds
            calls[fused] = after[1] - before
    finally:
        _core._kernel_clock(False)
    # conv, bn, relu, pool, linear, relu, dropout, linear forward and backward; the
    # loss forward and backward; Adam over eight parameters: a call per parameter on the
    # Python path, one for all of them in the executor.
    layers = 8 * 2 + 2 - (4 if fuse else 0)
    assert calls[False] == layers + 8
    assert calls[True] == layers + 1
    stopped = _core._kernel_time()
    train_step(model, nn.CrossEntropyLoss(), opt, inputs, targets)
    assert _core._kernel_time() == stopped


#: Training steps calibrated in the child to last about 1.5 seconds each.
LONG_STEP_SETUP = """
    from bnrs.training import train_step
    model = nn.from_spec("c64-bn-relu-c64-bn-relu-mp2-fc10", (8, 32, 32), 10,
                         random_state=0)
    opt = optim.Adam(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    probe = rng.standard_normal((2, 8, 32, 32), dtype=np.float32)
    train_step(model, loss_fn, opt, probe, np.arange(2))
    start = time.monotonic()
    train_step(model, loss_fn, opt, probe, np.arange(2))
    per_sample = (time.monotonic() - start) / 2
    n = max(4, int(1.5 / per_sample))
    x = rng.standard_normal((n, 8, 32, 32), dtype=np.float32)
    target = rng.integers(0, 10, n)
"""
# Steps in a loop, so that the signal lands in one however the calibration came out.
LONG_STEP_BODY = """
        while True:
            train_step(model, loss_fn, opt, x, target)
"""


def test_sigint_during_one_long_step_is_honoured_within_a_second():
    from test_interrupts import sigint_latency

    latency = sigint_latency(LONG_STEP_SETUP, LONG_STEP_BODY, delay=0.3)
    assert latency < 1.0, f"SIGINT took {latency:.3f} s to be honoured"


# ------------------------------------------------- cases the executor leaves to Python


def test_an_optimizer_group_the_python_path_refuses_raises_its_error(monkeypatch):
    # A group without Adam's keys: the executor re-planned for ever (RecursionError).
    model = nn.from_spec("c4-bn-relu-mp2-fc8-relu-d0.5", (1, 8, 8), 3, random_state=0)
    opt = _optimizer("adam", model)
    opt.param_groups.append({"params": [nn.Parameter(np.zeros(3, np.float32))],
                             "lr": 0.1})
    inputs, targets = _batches((1, 8, 8), 3, 16, 1)[0]
    errors = []
    for fused in (True, False):
        monkeypatch.setenv(executor.STEP_ENV, "1" if fused else "0")
        trained, trained_opt = copy.deepcopy((model, opt))
        with pytest.raises(KeyError) as caught:
            train_step(trained, nn.CrossEntropyLoss(), trained_opt, inputs, targets)
        errors.append(str(caught.value))
    assert errors[0] == errors[1]


def test_parameters_sharing_one_array_train_as_on_the_python_path(monkeypatch):
    model = nn.from_spec("fc6-relu-fc6-relu-d0.5", (6,), 6, random_state=0)
    model[2].weight.data = model[0].weight.data       # two layers, one weight array
    opt = _optimizer("adam", model)
    batches = _batches((6,), 6, 8, 3)
    assert_same_state(_train(monkeypatch, True, model, opt, batches),
                      _train(monkeypatch, False, model, opt, batches))


def test_a_replaced_sequential_forward_is_called(monkeypatch):
    model = nn.from_spec("fc6-relu", (6,), 3, random_state=0)
    opt = _optimizer("sgd", model)
    inputs, targets = _batches((6,), 3, 8, 1)[0]
    calls = []
    original = model.forward

    def forward(x):
        calls.append(len(x))
        return original(x)

    model.forward = forward
    monkeypatch.setenv(executor.STEP_ENV, "1")
    train_step(model, nn.CrossEntropyLoss(), opt, inputs, targets)
    assert calls == [8]


def test_the_binding_refuses_too_few_seeds_or_statistics(monkeypatch):
    model = nn.from_spec("c4-bn-relu-mp2-fc8-relu-d0.5", (1, 8, 8), 3, random_state=0)
    opt = _optimizer("adam", model)
    inputs, targets = _batches((1, 8, 8), 3, 16, 1)[0]
    monkeypatch.setenv(executor.STEP_ENV, "1")
    model.train()
    assert executor.run_step(model, nn.CrossEntropyLoss(), opt, inputs, targets) is not None
    plan = executor._EXECUTORS[model].plan
    step = executor._EXECUTORS[model].train_step
    slots = plan.slots
    running = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in plan.norms]
    seeds = [1 for _ in plan.dropouts]
    args = (inputs, targets.astype(np.int64), None, [p.data for p in slots],
            [p.grad for p in slots], [])
    with pytest.raises(ValueError, match=r"seeds: expected \d+ dropout seeds, got 0"):
        step.run(*args, running, [], [])
    with pytest.raises(ValueError, match=r"running: expected \d+ batch norm statistics"):
        step.run(*args, [], seeds, [])


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.PCG64DXSM,
                                           np.random.MT19937, np.random.Philox])
def test_a_dropout_seed_is_the_draw_of_the_layers_forward(bit_generator):
    # The seed drawer takes PCG64's seeds from the bit generator directly: the same numbers,
    # and the generator left as Generator.integers leaves it, after a 32-bit draw too.
    ours, layers = (np.random.Generator(bit_generator(11)) for _ in range(2))
    for generator in (ours, layers):
        generator.integers(0, 10, dtype=np.uint32)
    seeds = [draw_seed(ours) for _ in range(5)]
    assert seeds == [int(layers.integers(0, 2**64, dtype=np.uint64)) for _ in range(5)]
    assert all(type(seed) is int for seed in seeds)
    assert ours.random() == layers.random()


# ---------------------------------------------------------------- an epoch in one call


def _epoch(monkeypatch, path: str, model, opt, X, y, bounds, order, threads=1):
    """Train copies of ``model`` and ``opt`` for one train_epoch: the executor's epoch in
    one call ("epoch"), its steps one by one ("steps": a per-step callback keeps them
    apart) or the Python path ("python"); return them and the losses."""
    model, opt = copy.deepcopy((model, opt))
    monkeypatch.setenv(executor.STEP_ENV, "0" if path == "python" else "1")
    after_step = None if path == "epoch" else (lambda: None)
    with num_threads(threads):
        losses = train_epoch(model, nn.CrossEntropyLoss(), opt, X, y, bounds, order,
                             after_step=after_step)
    return model, opt, losses


def _epoch_data(shape, n_classes, n, seed=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n,) + shape).astype(np.float32),
            rng.integers(0, n_classes, n))


def _takes_epoch(model, opt, X, y, bounds, order, monkeypatch) -> bool:
    """Whether the executor takes the whole epoch in one call (on copies)."""
    model, opt = copy.deepcopy((model, opt))
    monkeypatch.setenv(executor.STEP_ENV, "1")
    model.train()
    return executor.run_epoch(model, nn.CrossEntropyLoss(), opt, X, y, bounds,
                              order) is not None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd", "nesterov", "groups"])
@pytest.mark.parametrize("shuffled", [False, True])
def test_an_epoch_in_one_call_is_the_bits_of_its_steps(monkeypatch, opt_name, threads,
                                                       shuffled):
    model = nn.from_spec(LENET, (1, 12, 12), 5, random_state=0)
    opt = _optimizer(opt_name, model)
    X, y = _epoch_data((1, 12, 12), 5, 45)
    bounds = batch_bounds(45, 8, last="keep")   # the last batch has 5 samples
    order = np.random.default_rng(4).permutation(45) if shuffled else None
    assert _takes_epoch(model, opt, X, y, bounds, order, monkeypatch)
    # Twice: the second epoch goes on from the optimizer state the first made.
    runs = []
    for path in ("epoch", "steps", "python"):
        trained, trained_opt, losses = _epoch(monkeypatch, path, model, opt, X, y, bounds,
                                              order, threads)
        more = _epoch(monkeypatch, path, trained, trained_opt, X, y, bounds[:3], order,
                      threads)
        runs.append((more[0], more[1], losses + more[2]))
    assert len(runs[0][2]) == len(bounds) + 3
    assert_same_state(runs[0], runs[1])
    assert_same_state(runs[0], runs[2])


@pytest.mark.parametrize("fuse", ["1", "0"])
@pytest.mark.parametrize("network", ["layers", "blocks"])
def test_an_epoch_of_every_layer_type_is_the_bits_of_its_steps(monkeypatch, network, fuse):
    monkeypatch.setenv(FUSE_ENV, fuse)
    model, shape = ((_layers_network(), (2, 10, 10)) if network == "layers"
                    else (_blocks_network(), (2, 8, 8)))
    opt = _optimizer("adam", model)
    X, y = _epoch_data(shape, 3, 30)
    bounds = batch_bounds(30, 7)   # the last batch has 9 samples
    order = np.random.default_rng(5).permutation(30)
    assert _takes_epoch(model, opt, X, y, bounds, order, monkeypatch)
    assert_same_state(_epoch(monkeypatch, "epoch", model, opt, X, y, bounds, order, 2),
                      _epoch(monkeypatch, "steps", model, opt, X, y, bounds, order, 2))


def test_an_epoch_stops_at_a_non_finite_loss_as_its_steps_do(monkeypatch):
    model = nn.from_spec("fc6-bn-relu-d0.5-fc5-relu-d0.2", (4,), 3, random_state=0)
    X, y = _epoch_data((4,), 3, 24)
    bounds = batch_bounds(24, 4)
    for bad_batch in (2, 0):   # a later step, then the first
        X_bad = X.copy()
        X_bad[4 * bad_batch + 1, 0] = np.inf
        opt = _optimizer("adam", model)
        runs = [_epoch(monkeypatch, path, model, opt, X_bad, y, bounds, None)
                for path in ("epoch", "steps")]
        assert len(runs[0][2]) == bad_batch + 1 and not np.isfinite(runs[0][2][-1])
        for result in runs:   # the Python path keeps its forward's state
            result[0].clear_saved()
        assert_same_state(*runs)
        assert (runs[0][1].state == {}) == (bad_batch == 0)


def test_an_epoch_that_fails_midway_keeps_the_steps_before(monkeypatch):
    # The third batch has one sample: its batch norm refuses it, after the first dropout
    # drew its seed and before the second did; the two steps before it stay taken.
    model = nn.from_spec("fc12-relu-d0.5-fc16-bn-relu-d0.5", (10,), 4, random_state=0)
    X, y = _epoch_data((10,), 4, 9)
    bounds = [(0, 4), (4, 8), (8, 9)]
    opt = _optimizer("sgd", model)
    results = []
    for path in ("epoch", "steps"):
        trained, trained_opt = copy.deepcopy((model, opt))
        monkeypatch.setenv(executor.STEP_ENV, "1")
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            train_epoch(trained, nn.CrossEntropyLoss(), trained_opt, X, y, bounds,
                        after_step=None if path == "epoch" else (lambda: None))
        results.append((trained, trained_opt, []))
    assert_same_state(*results)
    trained = results[0][0]
    assert int(trained[4].num_batches_tracked) == 2
    assert all(s["momentum_buffer"] is not None for s in results[0][1].state.values())


def test_an_epoch_the_executor_cannot_gather_is_taken_step_by_step(monkeypatch):
    # Float64 samples, an order with a negative index (NumPy's from the end) and a batch
    # past the order's end (sliced short, as NumPy does): the Python steps' own rules.
    model = nn.from_spec("fc6-bn-relu-d0.5", (4,), 3, random_state=0)
    opt = _optimizer("adam", model)
    X, y = _epoch_data((4,), 3, 12)
    order = np.arange(12)[::-1] - 1   # 10 .. -1
    strided = np.repeat(X, 2, axis=0)[::2]   # C-contiguous it is not
    for samples, order_, bounds in [(X.astype(np.float64), None, [(0, 6), (6, 12)]),
                                    (X, order, [(0, 6), (6, 12)]),
                                    (X, None, [(0, 6), (6, 20)]),
                                    (strided, None, [(0, 6), (6, 12)])]:
        assert not _takes_epoch(model, opt, samples, y, bounds, order_, monkeypatch)
        assert_same_state(
            _epoch(monkeypatch, "epoch", model, opt, samples, y, bounds, order_),
            _epoch(monkeypatch, "steps", model, opt, samples, y, bounds, order_))


def test_the_epoch_binding_names_the_argument_at_fault(monkeypatch):
    model = nn.from_spec("fc6-bn-relu-d0.5", (4,), 3, random_state=0)
    opt = _optimizer("sgd", model)
    X, y = _epoch_data((4,), 3, 12)
    monkeypatch.setenv(executor.STEP_ENV, "1")
    model.train()
    assert executor.run_epoch(model, nn.CrossEntropyLoss(), opt, X, y, [(0, 6)]) is not None
    plan = executor._EXECUTORS[model].plan
    step = executor._EXECUTORS[model].train_step
    slots = plan.slots
    running = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in plan.norms]
    updates = [(plan.slot_of[id(p)], opt.state[p]["momentum_buffer"], False, 0.1, 0.9, 0.0,
                False, 0.0) for p in slots]

    def run(order, bounds, seeds, targets=y):
        return step.run_epoch(X, targets, None, order, bounds, [p.data for p in slots],
                              [p.grad for p in slots], [], running, seeds, updates)

    seeds = [1, 2]
    # After the last step no seed of a step left unfinished: a Ctrl-C seen then gives no
    # draw back.
    assert run(None, [(0, 6), (6, 12)], seeds) and (step.steps_done, step.seeds_used) == (2, 0)
    before = [p.data.copy() for p in slots]
    with pytest.raises(ValueError, match=r"order: expected indices below 12, the number "
                                         r"of samples, got index 12"):
        run(np.array([0, 12], np.int64), [(0, 2)], seeds)
    with pytest.raises(ValueError, match=r"order: expected indices below 12, the number "
                                         r"of samples, got index -1"):
        run(np.array([-1, 3], np.int64), [(0, 2)], seeds)
    with pytest.raises(ValueError,
                       match=r"bounds: expected start < stop <= 12, got a batch \(4, 4\)"):
        run(None, [(0, 4), (4, 4)], seeds)
    with pytest.raises(ValueError, match=r"seeds: expected 1 per step, 2, got 1 dropout seeds"):
        run(None, [(0, 4), (4, 8)], [1])
    with pytest.raises(ValueError, match=r"targets: expected 12 class indices"):
        run(None, [(0, 4)], seeds, y[:5])
    with pytest.raises(ValueError, match=r"order: expected a 1-D array"):
        run(np.zeros((2, 2), np.int64), [(0, 2)], seeds)
    with pytest.raises(ValueError, match=r"sample_weight: expected shape \(12,\), got \[5\]"):
        step.run_epoch(X, y, np.ones(5), None, [(0, 4)], [p.data for p in slots],
                       [p.grad for p in slots], [], running, seeds, updates)
    for p, value in zip(slots, before):   # refused before any step
        assert np.array_equal(p.data, value)
    # No step taken, no seed used: nothing of the epoch before is reported.
    assert (step.steps_done, step.seeds_used) == (0, 0)


def test_sigint_during_an_epoch_of_short_steps_keeps_the_steps_taken():
    # Each step is too short to be watched for Ctrl-C alone; the epoch is, and the steps
    # it completed are counted by the optimizer as by the running statistics (which the
    # interrupted step's forward may have counted too).
    import child

    code = textwrap.dedent("""
        import time
        import numpy as np
        from bnrs import nn, optim
        from bnrs.training import batch_bounds, train_epoch
        rng = np.random.default_rng(0)
        model = nn.from_spec("c8-bn-relu-mp2-fc16-bn-relu-d0.5", (1, 12, 12), 4,
                             random_state=0)
        opt = optim.Adam(model.parameters(), lr=1e-3)
        X = rng.standard_normal((20_000, 1, 12, 12), dtype=np.float32)
        y = rng.integers(0, 4, len(X))
        bounds = batch_bounds(len(X), 16)
        print("READY", flush=True)
        try:
            while True:
                train_epoch(model, nn.CrossEntropyLoss(), opt, X, y, bounds,
                            rng.permutation(len(X)))
        except KeyboardInterrupt:
            print("INTERRUPTED", time.monotonic(), flush=True)
        print("STEPS", *sorted({int(s["step"]) for s in opt.state.values()}), flush=True)
        print("COUNTS", *sorted({int(m.num_batches_tracked) for m in model
                                 if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))}),
              flush=True)
    """)
    process = child.start(code)
    child.expect_line(process, "READY")
    time.sleep(1.0)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    stdout, stderr = child.finish(process, timeout=60)
    lines = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    assert "INTERRUPTED" in lines, f"no KeyboardInterrupt\n{stdout}\n{stderr}"
    assert float(lines["INTERRUPTED"]) - sent < 1.0
    steps = [int(v) for v in lines["STEPS"].split()]
    counts = [int(v) for v in lines["COUNTS"].split()]
    assert len(steps) == 1 and steps[0] > 0, stdout
    assert set(counts) <= {steps[0], steps[0] + 1}, stdout


def test_an_epoch_refused_by_the_binding_after_another_counts_nothing(monkeypatch):
    # A gradient of the wrong shape is refused before the epoch starts: no step is
    # counted and no dropout draw is kept, whatever the epoch before did.
    model = nn.from_spec("fc6-bn-relu-d0.5-fc5-relu-d0.2", (4,), 3, random_state=0)
    X, y = _epoch_data((4,), 3, 24)
    bounds = batch_bounds(24, 4)
    results = []
    for path in ("epoch", "steps"):
        trained, opt, _ = _epoch(monkeypatch, path, model, _optimizer("adam", model), X, y,
                                 bounds, None)
        generators = [m._rng.bit_generator.state for m in trained if isinstance(m, nn.Dropout)]
        trained[0].weight.grad = np.zeros((1, 1), np.float32)
        with pytest.raises(ValueError, match="grad: expected shape"):
            train_epoch(trained, nn.CrossEntropyLoss(), opt, X, y, bounds,
                        after_step=None if path == "epoch" else (lambda: None))
        assert {s["step"] for s in opt.state.values()} == {len(bounds)}
        assert generators == [m._rng.bit_generator.state for m in trained
                              if isinstance(m, nn.Dropout)]
        results.append((trained, opt, generators))
    assert results[0][2] == results[1][2]


def test_a_parameter_group_added_between_epochs_counts_each_step_once(monkeypatch):
    model = nn.from_spec("fc6-bn-relu-d0.5", (4,), 3, random_state=0)
    X, y = _epoch_data((4,), 3, 24)
    bounds = batch_bounds(24, 4)
    runs = []
    monkeypatch.setenv(executor.STEP_ENV, "1")
    for path in ("epoch", "steps"):
        # The same objects for both epochs: the second finds the plan of the first,
        # without a slot for the new parameter.
        trained, opt = copy.deepcopy((model, _optimizer("adam", model)))
        after_step = None if path == "epoch" else (lambda: None)
        losses = train_epoch(trained, nn.CrossEntropyLoss(), opt, X, y, bounds,
                             after_step=after_step)
        opt.add_param_group({"params": [nn.Parameter(np.ones(3, np.float32))]})
        losses += train_epoch(trained, nn.CrossEntropyLoss(), opt, X, y, bounds,
                              after_step=after_step)
        runs.append((trained, opt, losses))
    assert_same_state(*runs)
    steps = {s["step"] for p, s in runs[0][1].state.items() if p.shape != (3,)}
    assert steps == {2 * len(bounds)}


def test_an_epoch_whose_later_batch_has_a_bad_target_keeps_the_steps_before(monkeypatch):
    model = nn.from_spec("fc6-bn-relu-d0.5", (4,), 3, random_state=0)
    X, y = _epoch_data((4,), 3, 24)
    y[13] = 7   # in the fourth batch
    results = []
    for path in ("epoch", "steps"):
        trained, opt = copy.deepcopy((model, _optimizer("sgd", model)))
        monkeypatch.setenv(executor.STEP_ENV, "1")
        with pytest.raises(ValueError, match="target"):
            train_epoch(trained, nn.CrossEntropyLoss(), opt, X, y, batch_bounds(24, 4),
                        after_step=None if path == "epoch" else (lambda: None))
        trained.clear_saved()
        results.append((trained, opt, []))
    assert_same_state(*results)
    assert int(results[0][0][1].num_batches_tracked) == 4   # three steps and a forward


def test_an_epoch_takes_its_batches_from_any_iterable_and_refuses_float_bounds(monkeypatch):
    model = nn.from_spec("fc6-bn-relu-d0.5", (4,), 3, random_state=0)
    X, y = _epoch_data((4,), 3, 24)
    bounds = batch_bounds(24, 5)
    monkeypatch.setenv(executor.STEP_ENV, "1")
    unsupported = nn.Sequential(nn.Sequential(nn.Linear(4, 3)))   # nested: layer by layer
    for network in (model, unsupported):
        trained, opt = copy.deepcopy((network, _optimizer("adam", network)))
        losses = train_epoch(trained, nn.CrossEntropyLoss(), opt, X, y, iter(bounds))
        assert len(losses) == len(bounds)
    trained, opt = copy.deepcopy((model, _optimizer("adam", model)))
    with pytest.raises(TypeError):
        train_epoch(trained, nn.CrossEntropyLoss(), opt, X, y, [(0.0, 12.0)])


@pytest.mark.parametrize("shuffled", [False, True])
def test_an_epoch_with_sample_weights_is_the_bits_of_its_steps(monkeypatch, shuffled):
    # Weights of several sizes, and batches whose weights are all 0 (skipped: loss 0.0,
    # no step, no dropout draw), first, between and last.
    model = nn.from_spec(LENET, (1, 12, 12), 5, random_state=0)
    X, y = _epoch_data((1, 12, 12), 5, 40)
    bounds = batch_bounds(40, 5)
    order = np.random.default_rng(6).permutation(40) if shuffled else None
    weight = np.random.default_rng(7).uniform(0.5, 2.0, 40).astype(np.float32)
    positions = order if order is not None else np.arange(40)
    for batch in (0, 3, 7):
        weight[positions[5 * batch:5 * batch + 5]] = 0
    opt = _optimizer("adam", model)
    assert _takes_epoch(model, opt, X, y, bounds, order, monkeypatch)
    runs = []
    for path in ("epoch", "steps", "python"):
        trained, trained_opt = copy.deepcopy((model, opt))
        monkeypatch.setenv(executor.STEP_ENV, "0" if path == "python" else "1")
        losses = train_epoch(trained, nn.CrossEntropyLoss(), trained_opt, X, y, bounds, order,
                             sample_weight=weight,
                             after_step=None if path == "epoch" else (lambda: None))
        runs.append((trained, trained_opt, losses))
    assert [runs[0][2][b] for b in (0, 3, 7)] == [0.0, 0.0, 0.0] and len(runs[0][2]) == 8
    assert_same_state(runs[0], runs[1])
    assert_same_state(runs[0], runs[2])
    assert _takes_epoch_weighted(model, opt, X, y, bounds, weight, monkeypatch, order)


def test_an_epoch_with_weights_stops_at_a_non_finite_loss_as_its_steps_do(monkeypatch):
    model = nn.from_spec("fc6-bn-relu-d0.5", (4,), 3, random_state=0)
    X, y = _epoch_data((4,), 3, 24)
    X[9, 0] = np.inf   # in the third batch
    weight = np.ones(24)
    weight[4:8] = 0    # the second batch is skipped
    weight[16:20] = 0  # and the fifth, after the stop
    runs = []
    for path in ("epoch", "steps"):
        trained, opt = copy.deepcopy((model, _optimizer("adam", model)))
        monkeypatch.setenv(executor.STEP_ENV, "1")
        losses = train_epoch(trained, nn.CrossEntropyLoss(), opt, X, y, batch_bounds(24, 4),
                             sample_weight=weight,
                             after_step=None if path == "epoch" else (lambda: None))
        trained.clear_saved()
        runs.append((trained, opt, losses))
    assert len(runs[0][2]) == 3 and runs[0][2][1] == 0.0 and not np.isfinite(runs[0][2][2])
    assert_same_state(*runs)


def test_weights_the_executor_cannot_tell_apart_leave_the_epoch_to_the_steps(monkeypatch):
    # A negative weight (the steps skip a batch whose weights sum to 0 or less, and the
    # loss refuses the others), a NaN, and weights of another length.
    model = nn.from_spec("fc6-bn-relu-d0.5", (4,), 3, random_state=0)
    X, y = _epoch_data((4,), 3, 12)
    opt = _optimizer("adam", model)
    for weight in (np.r_[-1.0, 0.0, 0.0, 0.0, np.ones(8)], np.r_[np.nan, np.ones(11)],
                   np.ones(13)):
        assert not _takes_epoch_weighted(model, opt, X, y, [(0, 4), (4, 12)], weight,
                                         monkeypatch)
    assert _takes_epoch_weighted(model, opt, X, y, [(0, 4), (4, 12)], np.ones(12),
                                 monkeypatch)


def _takes_epoch_weighted(model, opt, X, y, bounds, weight, monkeypatch, order=None) -> bool:
    """Whether the executor takes the whole epoch, with these weights, in one call."""
    model, opt = copy.deepcopy((model, opt))
    monkeypatch.setenv(executor.STEP_ENV, "1")
    model.train()
    return executor.run_epoch(model, nn.CrossEntropyLoss(), opt, X, y, bounds, order,
                              weight) is not None
