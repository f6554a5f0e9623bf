"""Learning-rate schedulers with PyTorch's names, arguments and sequences.

Each scheduler wraps a :class:`bnrs.optim.Optimizer` and sets ``param_groups[i]["lr"]``
when it is created and at every :meth:`~LRScheduler.step`, exactly as
``torch.optim.lr_scheduler`` does: the same recursive ("chainable") formulas, evaluated
in the same order in Python floats, so that the same arguments give the same float64
learning rates (``tests/test_lr_scheduler.py`` compares them with sequences PyTorch
computed, stored in ``tests/fixtures/torch_fixtures.npz``).

As in PyTorch, call ``scheduler.step()`` after ``optimizer.step()``: once per epoch, or
once per batch for :class:`OneCycleLR`; :class:`ReduceLROnPlateau` takes the monitored
value, ``scheduler.step(valid_loss)``. The deprecated ``step(epoch)`` form is not
provided. Arguments are checked when the scheduler is created: a value of the wrong type
raises TypeError, one out of range ValueError, both naming the argument (where PyTorch
accepts some of these and fails later, e.g. ``StepLR(step_size=0)`` at the first step).

Examples
--------
>>> from bnrs import nn, optim
>>> from bnrs.optim.lr_scheduler import StepLR
>>> model = nn.Linear(3, 2, random_state=0)
>>> opt = optim.SGD(model.parameters(), lr=0.1)
>>> scheduler = StepLR(opt, step_size=2, gamma=0.5)
>>> lrs = []
>>> for epoch in range(5):
...     lrs.append(scheduler.get_last_lr()[0])
...     # ... an epoch of optimizer.step() calls ...
...     scheduler.step()
>>> lrs
[0.1, 0.1, 0.05, 0.05, 0.025]
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from .._validation import as_real, check_bool, check_int, check_options, check_real
from . import Optimizer

__all__ = ["CosineAnnealingLR", "LRScheduler", "LinearLR", "MultiStepLR", "OneCycleLR",
           "ReduceLROnPlateau", "StepLR"]


def _check_optimizer(optimizer) -> Optimizer:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected a bnrs.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    return optimizer


def _per_group(value, name: str, optimizer: Optimizer, low: float = 0.0) -> list[float]:
    """A real number for every parameter group: one for all, or a list of one per group
    (PyTorch's ``_format_param``)."""
    count = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name}: expected one value per parameter group ({count}), "
                             f"got {len(value)}")
        return [check_real(item, f"{name}[{index}]", low) for index, item in enumerate(value)]
    return [check_real(value, name, low)] * count


class LRScheduler:
    """Base class: the base learning rates, the step count and the state dict.

    Parameters
    ----------
    optimizer : bnrs.optim.Optimizer
        The optimizer whose ``param_groups[i]["lr"]`` the scheduler sets.
    last_epoch : int, default -1
        The index of the last step taken; -1 starts the schedule (and records each
        group's ``"lr"`` as its ``"initial_lr"`` unless the group has one). A value >= 0
        resumes a schedule, from groups that have their ``"initial_lr"``.

    Attributes
    ----------
    optimizer : bnrs.optim.Optimizer
    base_lrs : list of float
        Every group's ``"initial_lr"``.
    last_epoch : int
        Steps taken (0 after construction).
    """

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1):
        self.optimizer = _check_optimizer(optimizer)
        last_epoch = check_int(last_epoch, "last_epoch", -1)
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for index, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise ValueError(
                        f"last_epoch={last_epoch} resumes a schedule, but "
                        f"param_groups[{index}] has no 'initial_lr': load the optimizer's "
                        "state dict saved with the scheduler first, or pass last_epoch=-1")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self) -> None:
        """Take the step that sets the learning rates of step 0."""
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def get_lr(self) -> list[float]:
        """The learning rates of step ``last_epoch`` (called by :meth:`step`)."""
        raise NotImplementedError

    def step(self) -> None:
        """Advance the schedule by one step and set every group's ``"lr"``."""
        self._step_count += 1
        self.last_epoch += 1
        self._set_lrs(self.get_lr())

    def _set_lrs(self, values: list[float]) -> None:
        groups = self.optimizer.param_groups
        if len(values) != len(groups):
            raise ValueError(f"the optimizer has {len(groups)} parameter groups, but the "
                             f"scheduler was made for {len(values)}")
        for group, lr in zip(groups, values):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in groups]

    def _current_lrs(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        """The learning rates the last step set, one per parameter group.

        Returns
        -------
        list of float
        """
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: every attribute but the optimizer (copies), as PyTorch's.

        Returns
        -------
        dict
        """
        return {key: copy.deepcopy(value) for key, value in self.__dict__.items()
                if key != "optimizer"}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        The learning rates in the optimizer are not changed: load the optimizer's own
        state dict, saved at the same time, for those.

        Parameters
        ----------
        state_dict : dict
            What :meth:`state_dict` returned.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: expected a mapping, got {type(state_dict).__name__}")
        if "last_epoch" not in state_dict:
            raise ValueError("state_dict: missing key 'last_epoch'; expected what "
                             f"{type(self).__name__}.state_dict() returns")
        self.__dict__.update({key: copy.deepcopy(value) for key, value in state_dict.items()
                              if key != "optimizer"})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, lr={self._last_lr})"


class StepLR(LRScheduler):
    """Multiply every group's learning rate by ``gamma`` every ``step_size`` steps, as
    ``torch.optim.lr_scheduler.StepLR``.

    Parameters
    ----------
    optimizer : bnrs.optim.Optimizer
    step_size : int
        Steps (epochs) between decays, >= 1.
    gamma : float, default 0.1
        The factor of each decay, >= 0.
    last_epoch : int, default -1
        See :class:`LRScheduler`.
    """

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1):
        self.step_size = check_int(step_size, "step_size", 1)
        self.gamma = check_real(gamma, "gamma", 0.0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current_lrs()
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]


class MultiStepLR(LRScheduler):
    """Multiply every group's learning rate by ``gamma`` at each milestone, as
    ``torch.optim.lr_scheduler.MultiStepLR``.

    Parameters
    ----------
    optimizer : bnrs.optim.Optimizer
    milestones : iterable of int
        The steps (epochs, >= 0) at which the learning rate decays; a step listed n
        times decays by ``gamma ** n``.
    gamma : float, default 0.1
        The factor of each decay, >= 0.
    last_epoch : int, default -1
        See :class:`LRScheduler`.
    """

    def __init__(self, optimizer: Optimizer, milestones: Iterable[int], gamma: float = 0.1,
                 last_epoch: int = -1):
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
            raise TypeError(f"milestones: expected a list of ints, got {milestones!r}")
        self.milestones = Counter(check_int(milestone, "milestones", 0)
                                  for milestone in milestones)
        self.gamma = check_real(gamma, "gamma", 0.0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch not in self.milestones:
            return self._current_lrs()
        return [group["lr"] * self.gamma ** self.milestones[self.last_epoch]
                for group in self.optimizer.param_groups]


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from each group's base learning rate to ``eta_min`` over
    ``T_max`` steps, as ``torch.optim.lr_scheduler.CosineAnnealingLR``.

    ``lr_t = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``, computed
    recursively as PyTorch does (each step from the last learning rate); after ``T_max``
    steps the learning rate rises again along the same cosine (no restarts).

    Parameters
    ----------
    optimizer : bnrs.optim.Optimizer
    T_max : int
        Steps (epochs) of the half cosine, >= 1.
    eta_min : float, default 0.0
        The smallest learning rate, >= 0.
    last_epoch : int, default -1
        See :class:`LRScheduler`.
    """

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,
                 last_epoch: int = -1):
        self.T_max = check_int(T_max, "T_max", 1)
        self.eta_min = check_real(eta_min, "eta_min", 0.0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        groups = self.optimizer.param_groups
        if self._is_initial:
            return self._current_lrs()
        if (self.last_epoch - 1 - self.T_max) % (2 * self.T_max) == 0:
            return [group["lr"] + (base_lr - self.eta_min)
                    * (1 - math.cos(math.pi / self.T_max)) / 2
                    for base_lr, group in zip(self.base_lrs, groups)]
        return [(1 + math.cos(math.pi * self.last_epoch / self.T_max))
                / (1 + math.cos(math.pi * (self.last_epoch - 1) / self.T_max))
                * (group["lr"] - self.eta_min) + self.eta_min
                for group in groups]


class LinearLR(LRScheduler):
    """Scale every group's learning rate by a factor that goes linearly from
    ``start_factor`` to ``end_factor`` over ``total_iters`` steps, then stays: PyTorch's
    linear warm-up, ``torch.optim.lr_scheduler.LinearLR``.

    Parameters
    ----------
    optimizer : bnrs.optim.Optimizer
    start_factor : float, default 1/3
        The factor at step 0, in (0, 1].
    end_factor : float, default 1.0
        The factor from step ``total_iters`` on, in [0, 1].
    total_iters : int, default 5
        Steps of the ramp, >= 1.
    last_epoch : int, default -1
        See :class:`LRScheduler`.
    """

    def __init__(self, optimizer: Optimizer, start_factor: float = 1.0 / 3,
                 end_factor: float = 1.0, total_iters: int = 5, last_epoch: int = -1):
        self.start_factor = check_real(start_factor, "start_factor", 0.0, 1.0,
                                       low_open=True)
        self.end_factor = check_real(end_factor, "end_factor", 0.0, 1.0)
        self.total_iters = check_int(total_iters, "total_iters", 1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        groups = self.optimizer.param_groups
        if self.last_epoch == 0:
            return [group["lr"] * self.start_factor for group in groups]
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._current_lrs()
        return [group["lr"] * (1.0 + (self.end_factor - self.start_factor)
                               / (self.total_iters * self.start_factor
                                  + (self.last_epoch - 1)
                                  * (self.end_factor - self.start_factor)))
                for group in groups]


class OneCycleLR(LRScheduler):
    """The 1cycle policy, stepped once per batch, as ``torch.optim.lr_scheduler.OneCycleLR``.

    The learning rate rises from ``max_lr / div_factor`` to ``max_lr`` over the first
    ``pct_start`` of ``total_steps``, then falls to ``max_lr / div_factor /
    final_div_factor`` (with ``three_phase``, back to the start first, then to the
    minimum); with ``cycle_momentum`` the momentum (SGD's ``momentum``, Adam's and
    AdamW's ``beta1``) moves the opposite way between ``max_momentum`` and
    ``base_momentum``. The groups get the keys PyTorch adds: ``initial_lr``, ``max_lr``,
    ``min_lr`` and, with ``cycle_momentum``, ``max_momentum`` and ``base_momentum``.

    Parameters
    ----------
    optimizer : bnrs.optim.Optimizer
    max_lr : float or list of float
        The peak learning rate (one per group in a list).
    total_steps : int, optional
        Steps in the cycle; if None, ``epochs * steps_per_epoch``. Stepping more than
        ``total_steps`` times raises ValueError.
    epochs, steps_per_epoch : int, optional
        Give ``total_steps`` when it is None.
    pct_start : float, default 0.3
        The fraction of the cycle spent rising, in [0, 1].
    anneal_strategy : {"cos", "linear"}, default "cos"
    cycle_momentum : bool, default True
    base_momentum : float or list of float, default 0.85
        The momentum at the peak learning rate.
    max_momentum : float or list of float, default 0.95
        The momentum at the start (and end) of the cycle.
    div_factor : float, default 25.0
        ``initial_lr = max_lr / div_factor``.
    final_div_factor : float, default 1e4
        ``min_lr = initial_lr / final_div_factor``.
    three_phase : bool, default False
    last_epoch : int, default -1
        The index of the last batch (see :class:`LRScheduler`).

    Notes
    -----
    Where a phase has no length (``pct_start * total_steps == 1``, e.g. 4 steps with
    ``pct_start=0.25``), PyTorch divides 0 by 0 and raises ZeroDivisionError; here the
    phase's end value is taken.
    """

    def __init__(self, optimizer: Optimizer, max_lr, total_steps: int | None = None,
                 epochs: int | None = None, steps_per_epoch: int | None = None,
                 pct_start: float = 0.3, anneal_strategy: str = "cos",
                 cycle_momentum: bool = True, base_momentum=0.85, max_momentum=0.95,
                 div_factor: float = 25.0, final_div_factor: float = 1e4,
                 three_phase: bool = False, last_epoch: int = -1):
        _check_optimizer(optimizer)
        if total_steps is not None:
            self.total_steps = check_int(total_steps, "total_steps", 1)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = (check_int(epochs, "epochs", 1)
                                * check_int(steps_per_epoch, "steps_per_epoch", 1))
        else:
            raise ValueError("total_steps: expected total_steps, or epochs and "
                             "steps_per_epoch, got none of them")
        pct_start = check_real(pct_start, "pct_start", 0.0, 1.0)
        self._anneal_func_type = check_options(anneal_strategy, "anneal_strategy",
                                               ("cos", "linear"))
        div_factor = check_real(div_factor, "div_factor", 0.0, low_open=True)
        final_div_factor = check_real(final_div_factor, "final_div_factor", 0.0,
                                      low_open=True)
        three_phase = check_bool(three_phase, "three_phase")
        self.cycle_momentum = check_bool(cycle_momentum, "cycle_momentum")
        last_epoch = check_int(last_epoch, "last_epoch", -1)
        rise = float(pct_start * self.total_steps) - 1
        if three_phase:
            self._schedule_phases = [
                {"end_step": rise, "start_lr": "initial_lr", "end_lr": "max_lr",
                 "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
                {"end_step": float(2 * pct_start * self.total_steps) - 2,
                 "start_lr": "max_lr", "end_lr": "initial_lr",
                 "start_momentum": "base_momentum", "end_momentum": "max_momentum"},
                {"end_step": self.total_steps - 1, "start_lr": "initial_lr",
                 "end_lr": "min_lr", "start_momentum": "max_momentum",
                 "end_momentum": "max_momentum"}]
        else:
            self._schedule_phases = [
                {"end_step": rise, "start_lr": "initial_lr", "end_lr": "max_lr",
                 "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
                {"end_step": self.total_steps - 1, "start_lr": "max_lr",
                 "end_lr": "min_lr", "start_momentum": "base_momentum",
                 "end_momentum": "max_momentum"}]
        max_lrs = _per_group(max_lr, "max_lr", optimizer)
        if self.cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise ValueError("cycle_momentum: the optimizer has no momentum or beta1 "
                                 "to cycle; pass cycle_momentum=False")
            self.use_beta1 = "betas" in optimizer.defaults
            max_momentums = _per_group(max_momentum, "max_momentum", optimizer)
            base_momentums = _per_group(base_momentum, "base_momentum", optimizer)
        # Every argument is checked before the groups change.
        if last_epoch == -1:
            for index, group in enumerate(optimizer.param_groups):
                group["initial_lr"] = max_lrs[index] / div_factor
                group["max_lr"] = max_lrs[index]
                group["min_lr"] = group["initial_lr"] / final_div_factor
            if self.cycle_momentum:
                for group, top, base in zip(optimizer.param_groups, max_momentums,
                                            base_momentums):
                    if self.use_beta1:
                        group["betas"] = (top, *group["betas"][1:])
                    else:
                        group["momentum"] = top
                    group["max_momentum"] = top
                    group["base_momentum"] = base
        super().__init__(optimizer, last_epoch)

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self._anneal_func_type == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self) -> list[float]:
        step_num = self.last_epoch
        if step_num > self.total_steps:
            raise ValueError(f"Tried to step {step_num} times. The specified number of "
                             f"total steps is {self.total_steps}")
        lrs = []
        last_phase = len(self._schedule_phases) - 1
        for group in self.optimizer.param_groups:
            start_step = 0.0
            for index, phase in enumerate(self._schedule_phases):
                end_step = phase["end_step"]
                if step_num <= end_step or index == last_phase:
                    length = end_step - start_step
                    pct = (step_num - start_step) / length if length != 0 else 1.0
                    lr = self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct)
                    if self.cycle_momentum:
                        momentum = self._anneal(group[phase["start_momentum"]],
                                                group[phase["end_momentum"]], pct)
                    break
                start_step = phase["end_step"]
            lrs.append(lr)
            if self.cycle_momentum:
                if self.use_beta1:
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum
        return lrs


class ReduceLROnPlateau(LRScheduler):
    """Multiply every group's learning rate by ``factor`` when a monitored value has not
    improved for ``patience`` steps, as ``torch.optim.lr_scheduler.ReduceLROnPlateau``.

    Call ``step(value)`` once per epoch with the monitored value (a validation loss,
    say). A value improves on the best when it is below ``best * (1 - threshold)``
    (mode "min", threshold_mode "rel"), below ``best - threshold`` ("abs"), or above
    ``best * (1 + threshold)`` / ``best + threshold`` in mode "max". After more than
    ``patience`` steps without improvement the learning rates are reduced (not below
    ``min_lr``, and only by more than ``eps``), then ``cooldown`` steps pass before bad
    steps count again.

    Parameters
    ----------
    optimizer : bnrs.optim.Optimizer
    mode : {"min", "max"}, default "min"
    factor : float, default 0.1
        In [0, 1).
    patience : int, default 10
        >= 0.
    threshold : float, default 1e-4
        >= 0.
    threshold_mode : {"rel", "abs"}, default "rel"
    cooldown : int, default 0
        >= 0.
    min_lr : float or list of float, default 0
        >= 0; one per group in a list.
    eps : float, default 1e-8
        >= 0.
    """

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr=0, eps: float = 1e-8):
        self.optimizer = _check_optimizer(optimizer)
        self.factor = check_real(factor, "factor", 0.0, 1.0, high_open=True)
        if isinstance(min_lr, (list, tuple)):
            self.default_min_lr = None
            self.min_lrs = _per_group(min_lr, "min_lr", optimizer)
        else:
            self.default_min_lr = check_real(min_lr, "min_lr", 0.0)
            self.min_lrs = [self.default_min_lr] * len(optimizer.param_groups)
        self.patience = check_int(patience, "patience", 0)
        self.cooldown = check_int(cooldown, "cooldown", 0)
        self.eps = check_real(eps, "eps", 0.0)
        self.last_epoch = 0
        self._last_lr = self._current_lrs()
        self._init_is_better(check_options(mode, "mode", ("min", "max")),
                             check_real(threshold, "threshold", 0.0),
                             check_options(threshold_mode, "threshold_mode", ("rel", "abs")))
        self._reset()

    def _reset(self) -> None:
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def _init_is_better(self, mode: str, threshold: float, threshold_mode: str) -> None:
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.mode, self.threshold, self.threshold_mode = mode, threshold, threshold_mode

    def _is_better(self, value: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return value < best * (1.0 - self.threshold)
        if self.mode == "min":
            return value < best - self.threshold
        if self.threshold_mode == "rel":
            return value > best * (self.threshold + 1.0)
        return value > best + self.threshold

    @property
    def in_cooldown(self) -> bool:
        """Whether the cooldown after a reduction is running."""
        return self.cooldown_counter > 0

    def step(self, metrics) -> None:
        """Record the monitored value of one epoch; reduce the learning rates if due.

        Parameters
        ----------
        metrics : float
            The monitored value (a real number).
        """
        current = as_real(metrics, "metrics", numbers_only=True)
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = self._current_lrs()

    def _reduce_lr(self) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise ValueError(f"min_lr: the optimizer has {len(groups)} parameter "
                                 f"groups, but min_lr has {len(self.min_lrs)} values")
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                group["lr"] = new_lr

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._init_is_better(self.mode, self.threshold, self.threshold_mode)
