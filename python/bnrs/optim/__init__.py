"""Optimizers with PyTorch's names, arguments and update rules, over the Rust kernels.

Each optimizer updates ``param.data`` (and its own state) in place with
:func:`bnrs.functional.sgd_step` or :func:`bnrs.functional.adam_step`, from the gradients
that ``backward`` accumulated in ``param.grad``. As in PyTorch, parameters can be split
into groups with their own hyper-parameters, and ``param_groups[i]["lr"]`` can be
changed between steps.

Examples
--------
>>> import numpy as np
>>> from bnrs import nn, optim
>>> model = nn.Linear(3, 2, random_state=0)
>>> opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> crit = nn.CrossEntropyLoss()
>>> loss = crit(model(np.ones((4, 3), np.float32)), np.array([0, 1, 1, 0]))
>>> grad_input = model.backward(crit.backward())
>>> opt.step()
>>> opt.zero_grad()
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import numpy as np

from .. import functional as F
from .._validation import as_real, check_real
from ..nn.module import Parameter

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "lr_scheduler"]


#: The largest float32: a hyper-parameter above it would be infinite in the kernels.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _non_negative(group: dict[str, Any], name: str, label: str) -> None:
    _finite(group[name], label, 0.0)


def _finite(value, label: str, low: float | None = None, high: float | None = None, *,
            high_open: bool = False) -> float:
    """A hyper-parameter as a finite float (what the kernels accept), or an error.

    The kernels compute in float32, so a value beyond its range (which would become
    infinite there) is refused as well: here, before any parameter has moved.
    The messages start as PyTorch's do ("Invalid learning rate").
    """
    name = f"Invalid {label}"
    low = -_FLOAT32_MAX if low is None else low
    high = _FLOAT32_MAX if high is None else high
    return check_real(as_real(value, name, numbers_only=True), name, low, high,
                      high_open=high_open)


class Optimizer:
    """Base class: parameter groups, per-parameter state, ``zero_grad`` and state dicts.

    Parameters
    ----------
    params : iterable of Parameter, or iterable of dict
        The parameters to optimise (``model.parameters()``), or parameter groups: dicts
        with a ``"params"`` entry and hyper-parameters overriding ``defaults``.
    defaults : dict
        The hyper-parameters of the subclass.

    Attributes
    ----------
    param_groups : list of dict
        Each with ``"params"`` (a list of Parameter) and every hyper-parameter.
    state : dict
        Parameter -> dict of its optimizer state (momentum buffer, moments, step).
    """

    def __init__(self, params: Iterable, defaults: dict[str, Any]):
        self.defaults = dict(defaults)
        self.state: dict[Parameter, dict[str, Any]] = {}
        self.param_groups: list[dict[str, Any]] = []
        if isinstance(params, Parameter):
            raise TypeError("params: expected an iterable of Parameters (model.parameters()), "
                            "got a single Parameter")
        try:
            groups = list(params)
        except TypeError:
            raise TypeError("params: expected an iterable of Parameters (model.parameters()), "
                            f"got {type(params).__name__}") from None
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def _validate(self, group: dict[str, Any]) -> None:
        """Raise ValueError for an invalid hyper-parameter of ``group``."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters with its own hyper-parameters (defaults otherwise)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group: expected a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        params = [params] if isinstance(params, Parameter) else list(params or [])
        for param in params:
            if not isinstance(param, Parameter):
                raise TypeError(f"optimizer can only optimize bnrs.nn.Parameter objects, "
                                f"got {type(param).__name__}")
        if len(set(map(id, params))) != len(params):
            raise ValueError("optimizer: a parameter appears more than once in a group")
        known = {id(p) for group in self.param_groups for p in group["params"]}
        if any(id(p) in known for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        unknown = set(param_group) - set(self.defaults) - {"params"}
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown hyper-parameter(s) "
                            f"{sorted(unknown)}; expected {sorted(self.defaults)}")
        group = {**self.defaults, **param_group, "params": params}
        self._validate(group)
        self.param_groups.append(group)

    def zero_grad(self) -> None:
        """Set the gradient of every parameter to zero (in place)."""
        for group in self.param_groups:
            for param in group["params"]:
                param.grad.fill(0.0)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every parameter from its ``.grad``.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (called before the update).

        Returns
        -------
        float or None
            The closure's loss.
        """
        loss = None if closure is None else closure()
        # Check every group first, so that a bad value (e.g. param_groups[1]["lr"] set to
        # NaN between steps) fails before any parameter has moved.
        for group in self.param_groups:
            self._validate(group)
            for param in group["params"]:
                if param.grad.shape != param.data.shape:
                    raise ValueError(f"grad: expected shape {param.data.shape} (the "
                                     f"parameter's), got {param.grad.shape}")
        for group in self.param_groups:
            for param in group["params"]:
                self._update(param, group, self.state.setdefault(param, {}))
        return loss

    def _update(self, param: Parameter, group: dict[str, Any], state: dict[str, Any]):
        raise NotImplementedError

    # ---------------------------------------------------------------- state dicts

    def state_dict(self) -> dict[str, Any]:
        """A snapshot in PyTorch's layout: ``{"state": {index: {...}}, "param_groups": [...]}``.

        Parameters are numbered in group order from 0; arrays are copies.
        """
        index_of, groups, next_index = {}, [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(next_index, next_index + len(group["params"])))
            for offset, param in enumerate(group["params"]):
                index_of[param] = next_index + offset
            next_index += len(group["params"])
            groups.append(packed)
        state = {index_of[param]: {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                   for k, v in values.items()}
                 for param, values in self.state.items() if param in index_of}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyper-parameters and state saved by :meth:`state_dict`.

        Raises
        ------
        ValueError
            When the groups or the state arrays do not match this optimizer's parameters.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: expected a mapping, got {type(state_dict).__name__}")
        missing = [key for key in ("state", "param_groups") if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict: missing key(s) {missing}; expected what "
                             "Optimizer.state_dict() returns")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"the optimizer has {len(self.param_groups)}")
        params_by_index = {}
        for group, saved in zip(self.param_groups, saved_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"loaded state dict has a parameter group of "
                                 f"{len(saved['params'])} parameters where the optimizer's "
                                 f"has {len(group['params'])}")
            params_by_index.update(zip(saved["params"], group["params"]))
        new_state = {}
        for index, values in state_dict["state"].items():
            param = params_by_index.get(index)
            if param is None:
                raise ValueError(f"loaded state dict has state for parameter {index}, "
                                 f"which is in no parameter group")
            new_state[param] = {key: self._load_state_value(key, value, param)
                                for key, value in values.items()}
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            self._validate(merged)
            new_groups.append(merged)
        self.param_groups = new_groups
        self.state = new_state

    @staticmethod
    def _load_state_value(key: str, value, param: Parameter):
        if key == "step":
            return int(np.asarray(value))
        if value is None:
            return None
        array = np.array(value, dtype=np.float32, order="C", copy=True)
        if array.shape != param.data.shape:
            raise ValueError(f"state {key!r}: expected shape {param.data.shape}, "
                             f"got {array.shape}")
        return array

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for index, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {index}")
            lines.extend(f"    {k}: {v}" for k, v in sorted(group.items()) if k != "params")
        lines.append(")")
        return "\n".join(lines)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    ``d = grad + weight_decay * param``; with momentum, ``buf = d`` at the first step and
    ``buf = momentum * buf + (1 - dampening) * d`` after, then ``d = d + momentum * buf``
    (Nesterov) or ``d = buf``; ``param -= lr * d``.

    Parameters
    ----------
    params : iterable of Parameter or of dict
        ``model.parameters()``, or parameter groups.
    lr : float, default 1e-3
    momentum : float, default 0
    dampening : float, default 0
    weight_decay : float, default 0
        L2 penalty added to the gradient.
    nesterov : bool, default False
        Requires ``momentum > 0`` and ``dampening == 0``.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov})

    def _validate(self, group):
        _non_negative(group, "lr", "learning rate")
        _non_negative(group, "momentum", "momentum value")
        _finite(group["dampening"], "dampening value")
        _non_negative(group, "weight_decay", "weight_decay value")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _update(self, param, group, state):
        buffer = None
        first_step = False
        if group["momentum"] != 0:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = np.zeros_like(param.data)
                first_step = True
        F.sgd_step(param.data, param.grad, buffer, lr=group["lr"],
                   momentum=group["momentum"], dampening=group["dampening"],
                   nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                   first_step=first_step)


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (``amsgrad=False``).

    With ``g = grad + weight_decay * param`` (L2 penalty), ``m = beta1*m + (1-beta1)*g``,
    ``v = beta2*v + (1-beta2)*g**2`` and step t:
    ``param -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``.

    Parameters
    ----------
    params : iterable of Parameter or of dict
        ``model.parameters()``, or parameter groups.
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0
    """

    _decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    def _validate(self, group):
        _non_negative(group, "lr", "learning rate")
        _non_negative(group, "eps", "epsilon value")
        betas = group["betas"]
        try:
            count = len(betas)
        except TypeError:
            raise TypeError(f"Invalid betas: expected (beta1, beta2), got {betas!r}") from None
        if count != 2:
            raise ValueError(f"Invalid betas: expected (beta1, beta2), got {betas!r}")
        for index, beta in enumerate(betas):
            _finite(beta, f"beta parameter at index {index}", 0.0, 1.0, high_open=True)
        _non_negative(group, "weight_decay", "weight_decay value")
        group["betas"] = tuple(betas)

    def _update(self, param, group, state):
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(param.data)
            state["exp_avg_sq"] = np.zeros_like(param.data)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        F.adam_step(param.data, param.grad, state["exp_avg"], state["exp_avg_sq"],
                    state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled_weight_decay=self._decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    ``param *= 1 - lr * weight_decay`` first, then the Adam step on the plain gradient.

    Parameters
    ----------
    params : iterable of Parameter or of dict
        ``model.parameters()``, or parameter groups.
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 1e-2
    """

    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


# Imported last: the schedulers subclass nothing here but check for Optimizer, which must
# exist first. bnrs.optim.lr_scheduler is then available after `import bnrs`, as
# torch.optim.lr_scheduler is after `import torch`.
from . import lr_scheduler
