"""bnrs.optim.lr_scheduler against the learning rates PyTorch's schedulers set.

The expected sequences are ``lr_scheduler.<case>.*`` in ``fixtures/torch_fixtures.npz``,
written by ``fixtures/make_torch_fixtures.py`` (``lr_scheduler_cases``): for each case the
scheduler, the optimizer, the groups' learning rates, the keyword arguments (JSON), the
monitored values of ReduceLROnPlateau, and the learning rates (and cycled momentum of
OneCycleLR) after construction and after every step. The comparisons are exact: the
schedulers evaluate PyTorch's formulas in the same order, in Python floats.
"""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from bnrs import optim
from bnrs.nn import Parameter
from bnrs.optim import lr_scheduler
from bnrs.optim.lr_scheduler import (CosineAnnealingLR, LinearLR, MultiStepLR, OneCycleLR,
                                     ReduceLROnPlateau, StepLR)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "torch_fixtures.npz"

with np.load(FIXTURES) as _archive:
    DATA = {key: _archive[key] for key in _archive.files if key.startswith("lr_scheduler.")}

CASES = sorted({key.split(".")[1] for key in DATA})


class Case:
    """One fixture case: builds the optimizer and scheduler and runs its steps."""

    def __init__(self, name: str):
        self.name = name
        def get(key):
            return DATA[f"lr_scheduler.{name}.{key}"]

        self.scheduler_name = str(get("scheduler"))
        self.optimizer_name = str(get("optimizer"))
        self.group_lrs = [float(lr) for lr in get("group_lrs")]
        self.kwargs = json.loads(str(get("kwargs")))
        self.lrs = get("lrs")
        self.metrics = (get("metrics").tolist() if f"lr_scheduler.{name}.metrics" in DATA
                        else None)
        self.momentum = (get("momentum") if f"lr_scheduler.{name}.momentum" in DATA
                         else None)

    def optimizer(self) -> optim.Optimizer:
        groups = [{"params": [Parameter(np.zeros(2))], "lr": lr} for lr in self.group_lrs]
        if self.optimizer_name == "sgd":
            return optim.SGD(groups, momentum=0.9)
        return optim.Adam(groups)

    def scheduler(self, optimizer, **overrides):
        kwargs = {**self.kwargs, **overrides}
        return getattr(lr_scheduler, self.scheduler_name)(optimizer, **kwargs)

    def momenta(self, optimizer) -> list[float]:
        return [group["momentum"] if self.optimizer_name == "sgd" else group["betas"][0]
                for group in optimizer.param_groups]

    def step(self, optimizer, scheduler, index: int) -> None:
        """Step ``index`` (0-based): the optimizer on zero gradients, then the scheduler."""
        optimizer.step()
        if self.metrics is None:
            scheduler.step()
        else:
            scheduler.step(self.metrics[index])


@pytest.mark.parametrize("name", CASES)
def test_same_learning_rates_as_pytorch(name):
    case = Case(name)
    optimizer = case.optimizer()
    scheduler = case.scheduler(optimizer)
    lrs, momenta = [scheduler.get_last_lr()], [case.momenta(optimizer)]
    for index in range(len(case.lrs) - 1):
        case.step(optimizer, scheduler, index)
        lrs.append(scheduler.get_last_lr())
        momenta.append(case.momenta(optimizer))
        # The scheduler set the optimizer's learning rates to what it reports.
        assert [group["lr"] for group in optimizer.param_groups] == lrs[-1]
    np.testing.assert_array_equal(np.array(lrs), case.lrs)
    if case.momentum is not None:
        np.testing.assert_array_equal(np.array(momenta), case.momentum)


@pytest.mark.parametrize("name", CASES)
def test_state_dicts_resume_the_sequence(name):
    """Saving the scheduler and optimizer after k steps and loading both into new ones
    (made as when training starts) continues PyTorch's sequence exactly."""
    case = Case(name)
    steps = len(case.lrs) - 1
    saved_at = steps // 2
    optimizer = case.optimizer()
    scheduler = case.scheduler(optimizer)
    for index in range(saved_at):
        case.step(optimizer, scheduler, index)
    scheduler_state = pickle.loads(pickle.dumps(scheduler.state_dict()))
    optimizer_state = pickle.loads(pickle.dumps(optimizer.state_dict()))
    for index in range(saved_at, steps):   # the original goes on; its state dict must not
        case.step(optimizer, scheduler, index)

    resumed_optimizer = case.optimizer()
    resumed = case.scheduler(resumed_optimizer)
    resumed_optimizer.load_state_dict(optimizer_state)
    resumed.load_state_dict(scheduler_state)
    assert resumed.last_epoch == scheduler_state["last_epoch"]
    assert resumed.get_last_lr() == case.lrs[saved_at].tolist()
    lrs = []
    for index in range(saved_at, steps):
        case.step(resumed_optimizer, resumed, index)
        lrs.append(resumed.get_last_lr())
    np.testing.assert_array_equal(np.array(lrs), case.lrs[saved_at + 1:])


def _sgd(lr=0.1, groups=1):
    return optim.SGD([{"params": [Parameter(np.zeros(2))], "lr": lr} for _ in range(groups)])


def test_scheduled_learning_rate_drives_the_update():
    param = Parameter(np.zeros(1))
    optimizer = optim.SGD([param], lr=1.0)
    scheduler = StepLR(optimizer, step_size=1, gamma=0.5)
    moved = []
    for _ in range(3):
        param.grad[:] = -1.0
        before = float(param.data[0])
        optimizer.step()
        moved.append(float(param.data[0]) - before)
        scheduler.step()
    assert moved == [1.0, 0.5, 0.25]


def test_get_last_lr_is_a_copy_and_state_dict_leaves_out_the_optimizer():
    optimizer = _sgd()
    scheduler = MultiStepLR(optimizer, milestones=[1, 1, 3])
    scheduler.get_last_lr()[0] = 99.0
    assert scheduler.get_last_lr() == [0.1]
    state = scheduler.state_dict()
    assert "optimizer" not in state and state["last_epoch"] == 0
    state["milestones"][7] = 1   # a copy: the scheduler's Counter is unchanged
    assert 7 not in scheduler.milestones
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.1 * 0.1 ** 2], rel=1e-15)


def test_a_new_scheduler_keeps_initial_lr_as_pytorch_does():
    optimizer = _sgd(lr=0.1)
    StepLR(optimizer, step_size=1)
    optimizer.param_groups[0]["lr"] = 0.5
    second = CosineAnnealingLR(optimizer, T_max=4)
    assert second.base_lrs == [0.1]   # group.setdefault("initial_lr", lr)


def test_schedulers_pickle_and_deepcopy_with_their_optimizer():
    optimizer = _sgd()
    scheduler = CosineAnnealingLR(optimizer, T_max=5)
    scheduler.step()
    for clone in (pickle.loads(pickle.dumps(scheduler)), copy.deepcopy(scheduler)):
        assert clone.optimizer is not optimizer
        clone.step()
        scheduler_copy_lr = clone.get_last_lr()
        assert clone.optimizer.param_groups[0]["lr"] == scheduler_copy_lr[0]
    scheduler.step()
    assert scheduler.get_last_lr() == scheduler_copy_lr


def test_onecycle_raises_past_its_total_steps():
    optimizer = _sgd()
    scheduler = OneCycleLR(optimizer, max_lr=1.0, total_steps=3)
    for _ in range(3):
        scheduler.step()
    with pytest.raises(ValueError, match="Tried to step 4 times"):
        scheduler.step()


def test_onecycle_phase_of_no_length_takes_its_end_value():
    # pct_start * total_steps == 1: PyTorch divides 0 by 0 at step 0.
    optimizer = _sgd()
    scheduler = OneCycleLR(optimizer, max_lr=0.4, total_steps=4, pct_start=0.25,
                           cycle_momentum=False)
    assert scheduler.get_last_lr() == [0.4]
    scheduler.step()
    assert scheduler.get_last_lr()[0] < 0.4


def test_linear_warm_up_reaches_the_base_rate_and_stays():
    optimizer = _sgd(lr=0.3)
    scheduler = LinearLR(optimizer, start_factor=0.1, total_iters=3)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(6):
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs[0] == pytest.approx(0.03)
    assert lrs[3:] == pytest.approx([0.3] * 4, rel=1e-15)


def test_plateau_reduces_after_patience():
    optimizer = _sgd(lr=1.0)
    scheduler = ReduceLROnPlateau(optimizer, patience=1, factor=0.5)
    for value in (1.0, 1.0, 1.0, 1.0, 1.0):
        scheduler.step(value)
    assert scheduler.get_last_lr() == [0.25]


@pytest.mark.parametrize("make, error, name", [
    (lambda opt: StepLR(opt, step_size=0), ValueError, "step_size"),
    (lambda opt: StepLR(opt, step_size=2.0), TypeError, "step_size"),
    (lambda opt: StepLR(opt, step_size=2, gamma=-0.1), ValueError, "gamma"),
    (lambda opt: StepLR(opt, step_size=2, gamma="0.1"), TypeError, "gamma"),
    (lambda opt: StepLR(opt, 2, last_epoch=-2), ValueError, "last_epoch"),
    (lambda opt: StepLR(opt, 2, last_epoch=3), ValueError, "last_epoch"),
    (lambda opt: MultiStepLR(opt, milestones=3), TypeError, "milestones"),
    (lambda opt: MultiStepLR(opt, milestones="35"), TypeError, "milestones"),
    (lambda opt: MultiStepLR(opt, milestones=[2, -1]), ValueError, "milestones"),
    (lambda opt: CosineAnnealingLR(opt, T_max=0), ValueError, "T_max"),
    (lambda opt: CosineAnnealingLR(opt, T_max=5, eta_min=float("nan")), ValueError,
     "eta_min"),
    (lambda opt: LinearLR(opt, start_factor=0.0), ValueError, "start_factor"),
    (lambda opt: LinearLR(opt, end_factor=1.5), ValueError, "end_factor"),
    (lambda opt: LinearLR(opt, total_iters=0), ValueError, "total_iters"),
    (lambda opt: OneCycleLR(opt, max_lr=0.1), ValueError, "total_steps"),
    (lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=0), ValueError, "total_steps"),
    (lambda opt: OneCycleLR(opt, max_lr=0.1, epochs=2, steps_per_epoch=0), ValueError,
     "steps_per_epoch"),
    (lambda opt: OneCycleLR(opt, max_lr=[0.1, 0.2], total_steps=5), ValueError, "max_lr"),
    (lambda opt: OneCycleLR(opt, max_lr=-1.0, total_steps=5), ValueError, "max_lr"),
    (lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=5, pct_start=1.5), ValueError,
     "pct_start"),
    (lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=5, anneal_strategy="cosine"),
     ValueError, "anneal_strategy"),
    (lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=5, div_factor=0.0), ValueError,
     "div_factor"),
    (lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=5, three_phase="yes"), TypeError,
     "three_phase"),
    (lambda opt: ReduceLROnPlateau(opt, mode="avg"), ValueError, "mode"),
    (lambda opt: ReduceLROnPlateau(opt, factor=1.0), ValueError, "factor"),
    (lambda opt: ReduceLROnPlateau(opt, patience=-1), ValueError, "patience"),
    (lambda opt: ReduceLROnPlateau(opt, threshold_mode="relative"), ValueError,
     "threshold_mode"),
    (lambda opt: ReduceLROnPlateau(opt, min_lr=[0.0, 0.0]), ValueError, "min_lr"),
    (lambda opt: ReduceLROnPlateau(opt).step("low"), TypeError, "metrics"),
    (lambda opt: StepLR(object(), step_size=1), TypeError, "optimizer"),
    (lambda opt: ReduceLROnPlateau([opt]), TypeError, "optimizer"),
])
def test_bad_arguments_name_the_argument(make, error, name):
    optimizer = _sgd()
    before = copy.deepcopy(optimizer.param_groups)
    with pytest.raises(error, match=rf"^{name}\b"):
        make(optimizer)
    if name != "metrics":   # a rejected scheduler leaves the optimizer as it was
        assert [{k: v for k, v in group.items() if k != "params"}
                for group in optimizer.param_groups] == [
            {k: v for k, v in group.items() if k != "params"} for group in before]


def test_cycle_momentum_needs_momentum_or_betas():
    class Plain(optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

    with pytest.raises(ValueError, match="^cycle_momentum"):
        OneCycleLR(Plain([Parameter(np.zeros(1))]), max_lr=0.1, total_steps=5)
    OneCycleLR(Plain([Parameter(np.zeros(1))]), max_lr=0.1, total_steps=5,
               cycle_momentum=False)


def test_load_state_dict_rejects_what_is_not_a_state_dict():
    scheduler = StepLR(_sgd(), step_size=1)
    with pytest.raises(TypeError, match="^state_dict"):
        scheduler.load_state_dict([1, 2])
    with pytest.raises(ValueError, match="^state_dict"):
        scheduler.load_state_dict({"gamma": 0.5})
