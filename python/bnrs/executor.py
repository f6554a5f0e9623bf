"""The training step as one call into Rust: :func:`run_step`.

A :class:`~bnrs.nn.Sequential` of plain layers (Conv2d, Linear, BatchNorm1d/2d, ReLU,
LeakyReLU, Sigmoid, Tanh, MaxPool2d, AvgPool2d, Dropout, Dropout2d, Flatten), all in
training mode, trained with :class:`~bnrs.nn.CrossEntropyLoss` and :class:`~bnrs.optim.Adam`,
:class:`~bnrs.optim.AdamW` or :class:`~bnrs.optim.SGD`, is described once to a
:class:`bnrs._core.TrainStep` (the plan: its layers, their shapes, the parameter slots),
which keeps the activations, gradients and saved state in buffers from one step to the
next. Each step is then one call with the GIL released: zero the gradients, forward,
loss, backward, optimizer update, calling the kernels the layers call, in the same order
with the same arguments. Parameters, gradients, running statistics and optimizer state
stay the modules' and the optimizer's own NumPy arrays, updated in place, and the dropout
layers draw their seeds from their own generators as their forward does: the step leaves
the bits :func:`bnrs.training.train_step`'s Python path leaves.

When the Sequential fuses (its ``fuse`` flag and ``BNRS_FUSE``, see
:mod:`bnrs.nn.fusion`), the runs :func:`~bnrs.nn.fusion.fusion_plan` makes into training
blocks (a batch norm with the activation, 2×2 pool and dropout after it) are one stage
each, run by the fused kernels its :class:`~bnrs.nn.fusion.TrainBlock` calls; those give
the unfused bits, so the step's results do not depend on the fusion.

:func:`run_epoch` takes the steps of a whole epoch in one call
(:meth:`bnrs._core.TrainStep.run_epoch`): each batch gathered from the samples in Rust,
the next step started without returning to Python, the same bits as a :func:`run_step`
per batch.

Anything else (another layer or loss, a layer in evaluation mode, nested or branching
modules, a method of a layer, the loss or the optimizer replaced since import, an input
or target the layers would reject) returns None, and the caller runs the Python path.

:func:`run_forward` does for a forward in evaluation what :func:`run_step` does for a
training step: the stages :meth:`~bnrs.nn.Sequential.forward` would run fused (folded
convolution blocks, chained pooled blocks, dense blocks, the layers alone) described
once per sample shape to a :class:`bnrs._core.EvalStep`, then one call per forward with
the arrays of that call, the kernels the Python path calls with the same arguments: the
same bits, without the per-layer Python (most of a one-image forward).

``BNRS_FUSED_STEP=0`` turns the executor off, for steps and forwards (for comparisons).
"""

from __future__ import annotations

import math
import operator
import os
import weakref
from operator import attrgetter

import numpy as np

from . import _core, nn, optim
from . import functional as F
from .nn import fusion
from .nn.dropout import draw_seed

__all__ = ["STEP_ENV", "executor_enabled", "run_epoch", "run_forward", "run_step",
           "set_stage_clock",
           "stage_times"]

STEP_ENV = "BNRS_FUSED_STEP"

_OPTIMIZERS = {optim.Adam: "adam", optim.AdamW: "adamw", optim.SGD: "sgd"}

# What a plan depends on, per layer type: read at every step, and the plan rebuilt when
# any of it changed (a forward or backward replaced on the instance counts: a bound
# method equals the method of the same object only).
_COMMON = ("training", "forward", "backward")
_common = attrgetter(*_COMMON)


def _slope(value):
    """A slope as a plan reads it (``float()``: a NumPy scalar or 0-d array changed in
    place is read anew), keyed with its sign (:func:`bnrs.nn.fusion.slope_key`);
    anything else as it is (the layer raises it in its own words)."""
    try:
        return fusion.slope_key(float(value))
    except (TypeError, ValueError):
        return value, None


_WATCHED = {
    nn.Conv2d: attrgetter(*_COMMON, "weight", "bias", "stride", "padding", "dilation",
                           "groups", "in_channels", "out_channels", "kernel_size"),
    nn.Linear: attrgetter(*_COMMON, "weight", "bias", "in_features", "out_features"),
    nn.BatchNorm1d: attrgetter(*_COMMON, "weight", "bias", "eps", "momentum",
                               "track_running_stats", "num_features"),
    nn.BatchNorm2d: attrgetter(*_COMMON, "weight", "bias", "eps", "momentum",
                               "track_running_stats", "num_features"),
    nn.ReLU: attrgetter(*_COMMON),
    nn.LeakyReLU: lambda m: (_common(m), _slope(m.negative_slope)),
    nn.Sigmoid: attrgetter(*_COMMON),
    nn.Tanh: attrgetter(*_COMMON),
    nn.MaxPool2d: attrgetter(*_COMMON, "kernel_size", "stride", "padding"),
    nn.AvgPool2d: attrgetter(*_COMMON, "kernel_size", "stride", "padding",
                             "count_include_pad"),
    nn.Dropout: attrgetter(*_COMMON, "p", "_rng"),
    nn.Dropout2d: attrgetter(*_COMMON, "p", "_rng"),
    nn.Flatten: attrgetter(*_COMMON, "start_dim", "end_dim"),
}
# The methods whose arithmetic the executor reproduces, as they were at import: a layer,
# loss or optimizer whose method was replaced since (on the class, as a test or a
# profiler may do, or on the instance) runs the Python path, which calls the replacement.
_ORIGINAL_METHODS = {cls: (cls.forward, cls.backward) for cls in _WATCHED}
_ORIGINAL_METHODS[nn.CrossEntropyLoss] = (nn.CrossEntropyLoss.forward,
                                          nn.CrossEntropyLoss.backward)
_ORIGINAL_METHODS[nn.Sequential] = (nn.Sequential.forward, nn.Sequential.backward)
_OPTIMIZER_METHODS = ("step", "zero_grad", "_update", "_validate")
_optimizer_methods = attrgetter(*_OPTIMIZER_METHODS)
_ORIGINAL_OPTIMIZER_METHODS = {cls: _optimizer_methods(cls) for cls in _OPTIMIZERS}
_ACTIVATIONS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid",
                nn.Tanh: "tanh"}


def _original_methods(obj) -> bool:
    """Whether ``obj``'s forward and backward are those of its class at import."""
    kind = type(obj)
    return ((kind.forward, kind.backward) == _ORIGINAL_METHODS[kind]
            and vars(obj).keys().isdisjoint(("forward", "backward")))


def _original_optimizer(optimizer) -> bool:
    """Whether ``optimizer``'s methods are those of its class at import."""
    kind = type(optimizer)
    return (_optimizer_methods(kind) == _ORIGINAL_OPTIMIZER_METHODS[kind]
            and vars(optimizer).keys().isdisjoint(_OPTIMIZER_METHODS))


def executor_enabled() -> bool:
    """Whether :func:`run_step` runs steps: ``BNRS_FUSED_STEP=0`` turns it off."""
    return os.environ.get(STEP_ENV, "1").strip() != "0"


class _Unsupported(Exception):
    """The network (or this step's batch) is not one the executor runs."""


def _fuses(model: nn.Sequential) -> bool:
    """Whether ``model``'s forward would run training-mode fused blocks (its ``fuse``
    flag, ``BNRS_FUSE`` and its mode, as :meth:`~bnrs.nn.Sequential.forward` decides)."""
    return fusion.fusion_enabled(model._fuses()) and model.training


def _signature(model: nn.Sequential):
    """What the plan of ``model`` depends on, or None for a layer type it does not run."""
    modules = tuple(model._modules.values())
    getters = list(map(_WATCHED.get, map(type, modules)))
    if None in getters:
        return None
    # Read at every step: a comprehension, not a loop of calls, keeps that cheap.
    return modules, [getter(module) for getter, module in zip(getters, modules)], \
        _fuses(model)


def _train_blocks(model: nn.Sequential, modules) -> dict[int, fusion.TrainBlock]:
    """The fused training blocks the Sequential's forward would run, by the index of their
    first module: :func:`bnrs.nn.fusion.fusion_plan`'s own choice."""
    if not _fuses(model):
        return {}
    blocks, index = {}, 0
    for step in fusion.fusion_plan(list(modules), {}, training=True):
        if isinstance(step, fusion.TrainBlock):
            blocks[index] = step
            index += len(step.modules)
        else:
            index += 1
    return blocks


class _Plan:
    """A :class:`bnrs._core.TrainStep` for one model, optimizer type and sample shape,
    and the Python objects whose arrays each step passes."""

    def __init__(self, model: nn.Sequential, modules, kind: str, sample_shape):
        self.kind = kind
        self.sample_shape = sample_shape
        self.modules = modules
        self.slots: list[nn.Parameter] = []
        self.slot_of: dict[int, int] = {}
        names: list[str] = []
        for name, param in model.named_parameters():
            if id(param) in self.slot_of:
                raise _Unsupported("a parameter shared by two layers")
            self.slot_of[id(param)] = len(self.slots)
            self.slots.append(param)
            names.append(name)
        self.norms: list[nn.Module] = []
        self.dropouts: list[nn.Module] = []
        layers = []
        shape = tuple(sample_shape)
        blocks = _train_blocks(model, modules)
        index = 0
        while index < len(modules):
            block = blocks.get(index)
            if block is not None and block.pool is not None and min(shape[1:3]) < 2:
                block = None   # TrainBlock runs the modules unfused on such planes
            run = block.modules if block is not None else [modules[index]]
            output = shape
            for module in run:
                if not module.training:
                    raise _Unsupported("a layer in evaluation mode")
                if not _original_methods(module):
                    raise _Unsupported("a layer whose forward or backward was replaced")
                try:
                    output = tuple(module.output_shape(output))
                except (TypeError, ValueError):
                    raise _Unsupported("a layer that does not take its input") from None
            if block is not None:
                kind_args = self._describe_block(block, shape)
            else:
                kind_args = self._describe(modules[index], shape, output)
            layers.append((kind_args[0], list(shape), list(output), kind_args[1]))
            shape = output
            index += len(run)
        if len(shape) != 1:
            raise _Unsupported("logits that are not (N, classes)")
        self.names = names
        self.layers = layers

    def _slot(self, param) -> int | None:
        return None if param is None else self.slot_of[id(param)]

    def _norm(self, module) -> tuple:
        """A training batch norm's parameter slots, running statistics, eps, momentum."""
        running = None
        if module.track_running_stats:
            running = len(self.norms)
            self.norms.append(module)
        momentum = None if module.momentum is None else float(module.momentum)
        return (self._slot(module.weight), self._slot(module.bias), running,
                float(module.eps), momentum)

    def _describe_block(self, block: fusion.TrainBlock, shape) -> tuple[str, tuple]:
        """A fused block's description; its batch norm, then its dropout, take their
        running statistics and seed numbers in the layers' order."""
        norm = self._norm(block.norm)
        dropout = None
        if block.dropout is not None:
            self.dropouts.append(block.dropout)
            dropout = (float(block.dropout.p), type(block.dropout) is nn.Dropout2d,
                       len(self.dropouts) - 1)
        return "bn_block", norm + (block.activation, block.pool, dropout)

    def _describe(self, module, shape, output) -> tuple[str, tuple]:
        kind = type(module)
        if kind is nn.Conv2d:
            return "conv2d", (self._slot(module.weight), self._slot(module.bias),
                              module.stride, module.padding, module.dilation,
                              module.groups)
        if kind is nn.Linear:
            if len(shape) != 1:
                raise _Unsupported("a linear layer on more than one axis")
            return "linear", (self._slot(module.weight), self._slot(module.bias))
        if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
            return "batch_norm", self._norm(module)
        if kind in _ACTIVATIONS:
            return "activation", (_ACTIVATIONS[kind],
                                  float(getattr(module, "negative_slope", 0.0)))
        if kind is nn.MaxPool2d:
            return "max_pool2d", (module.kernel_size, module.stride, module.padding)
        if kind is nn.AvgPool2d:
            return "avg_pool2d", (module.kernel_size, module.stride, module.padding,
                                  module.count_include_pad)
        if kind in (nn.Dropout, nn.Dropout2d):
            if kind is nn.Dropout2d and len(shape) != 3:
                raise _Unsupported("Dropout2d on a sample that is not (C, H, W)")
            if module.p == 0.0:
                return "view", ()
            if module.p == 1.0:
                return "zeros", ()
            unit = shape[1] * shape[2] if kind is nn.Dropout2d else 1
            self.dropouts.append(module)
            return "dropout", (float(module.p), unit, len(self.dropouts) - 1)
        if kind is nn.Flatten:
            start = module.start_dim + len(shape) + 1 if module.start_dim < 0 else module.start_dim
            if start < 1:
                raise _Unsupported("a Flatten that merges the batch axis")
            return "view", ()
        raise _Unsupported(f"a {kind.__name__}")

    def core(self, optimizer) -> _core.TrainStep:
        """The Rust plan, over the model's parameters and then the optimizer's others."""
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in self.slot_of:
                    self.slot_of[id(param)] = len(self.slots)
                    self.slots.append(param)
                    self.names.append(f"optimizer parameter {len(self.slots) - 1}")
        return _core.TrainStep(self.layers, self.names, [list(p.shape) for p in self.slots],
                               self.kind)


class _Executor:
    """A model's plan and the key it was built for."""

    def __init__(self, signature, kind, sample_shape, plan: _Plan | None, train_step=None):
        self.signature, self.kind, self.sample_shape = signature, kind, sample_shape
        self.plan, self.train_step = plan, train_step
        # id(param group) -> its hyper-parameters when they last passed validation
        self.validated: dict[int, tuple] = {}


# Keyed by model, so that a plan (and its buffers) goes with its model.
_EXECUTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def release_buffers() -> int:
    """Free the buffers every model's step keeps between steps (its next step makes
    them again); returns the bytes freed. Part of :func:`bnrs.release_memory`."""
    return sum(executor.train_step.release_buffers()
               for executor in list(_EXECUTORS.values()) if executor.train_step is not None)


def set_stage_clock(model, on: bool = True) -> bool:
    """Start timing the stages of ``model``'s training steps by the executor, from zero
    (``on``), or stop and forget the times.

    Parameters
    ----------
    model : bnrs.nn.Sequential
        A model the executor has taken a training step of (its plan exists).
    on : bool, default True
        Whether to time the steps from now on.

    Returns
    -------
    bool
        False when the executor has no plan for ``model`` (no step yet, or a network it
        does not run): nothing is timed then. A plan made anew (after a layer or an
        optimizer's parameter group changed) starts with the clock off.
    """
    executor = _EXECUTORS.get(model)
    if executor is None or executor.train_step is None:
        return False
    executor.train_step.set_stage_clock(bool(on))
    return True


def stage_times(model) -> dict | None:
    """The wall time of each stage of ``model``'s steps since :func:`set_stage_clock`.

    A stage is one layer, or a fused block (a batch norm with the activation, pooling and
    dropout after it, as the executor plans them), named by its kind and its sample's
    shapes. A view (a reshape) takes no time, nor does the backward of the stages before
    the first with parameters (the backward stops there). Timing costs two clock
    readings a stage and step.

    Returns
    -------
    dict or None
        ``{"steps": steps whose updates were done, "stages": [{"stage": name,
        "forward_s": seconds, "backward_s": seconds}, ...], "loss_s": the loss and its
        gradient, "update_s": the optimizer's updates}``, in seconds summed over the
        steps (a step that stopped early, at a non-finite loss, an error or Ctrl-C, adds
        the time of what it ran but is not counted); None while the clock is off.

    Examples
    --------
    >>> import numpy as np
    >>> from bnrs import executor, nn, optim
    >>> from bnrs.training import train_step
    >>> model = nn.from_spec("fc8-bn-relu-d0.5", (4,), 2, random_state=0)
    >>> opt, loss = optim.Adam(model.parameters()), nn.CrossEntropyLoss()
    >>> x, y = np.ones((6, 4), np.float32), np.array([0, 1] * 3)
    >>> _ = train_step(model, loss, opt, x, y)
    >>> executor.set_stage_clock(model)
    True
    >>> _ = train_step(model, loss, opt, x, y)
    >>> times = executor.stage_times(model)
    >>> times["steps"], [stage["stage"] for stage in times["stages"]]
    (1, ['linear 4 -> 8', 'bn_block 8 -> 8', 'linear 8 -> 2'])
    """
    executor = _EXECUTORS.get(model)
    if executor is None or executor.train_step is None:
        return None
    clock = executor.train_step.stage_clock()
    if clock is None:
        return None
    forward, backward, loss, update, steps = clock
    shape = "x".join
    stages = [{"stage": f"{kind} {shape(map(str, before))} -> {shape(map(str, after))}",
               "forward_s": f, "backward_s": b}
              for (kind, before, after, _), f, b in zip(executor.plan.layers, forward,
                                                        backward)]
    return {"steps": steps, "stages": stages, "loss_s": loss, "update_s": update}


def _executor(model, optimizer, kind: str, sample_shape) -> _Executor | None:
    signature = _signature(model)
    if signature is None:
        return None
    executor = _EXECUTORS.get(model)
    if (executor is not None and executor.kind == kind
            and executor.sample_shape == sample_shape and executor.signature == signature):
        return executor
    try:
        plan = _Plan(model, signature[0], kind, sample_shape)
        try:
            train_step = plan.core(optimizer)
        except TypeError as error:
            # An attribute of a type the layers convert (an int padding, a list
            # stride) that the plan's description does not take: the Python path runs.
            raise _Unsupported(str(error)) from None
        executor = _Executor(signature, kind, sample_shape, plan, train_step)
    except _Unsupported:
        executor = _Executor(signature, kind, sample_shape, None)
    _EXECUTORS[model] = executor
    return executor


_INT64 = np.dtype(np.int64)


def _labels(targets, batch: int) -> np.ndarray | None:
    """The targets as the loss kernel takes them, or None for what the Python path must
    see (and reject in its own words)."""
    if type(targets) is np.ndarray and targets.dtype is _INT64 and targets.shape == (batch,):
        flags = targets.flags
        if flags.c_contiguous and flags.aligned:
            return targets   # the usual case, recognised without np.require's work
    labels = np.asarray(targets)
    if labels.dtype.kind not in "iu" or labels.shape != (batch,):
        return None
    if labels.dtype.kind == "u" and labels.size and (labels > np.iinfo(np.int64).max).any():
        return None
    return np.require(labels, np.int64, ["C_CONTIGUOUS", "ALIGNED"])


def _validate(optimizer, group, validated: dict) -> None:
    """``optimizer._validate(group)`` (which raises for a bad value, as ``step`` does), but
    only when the group's hyper-parameters differ from those it last passed with."""
    values = tuple(value for key, value in group.items() if key != "params")
    if validated.get(id(group)) == values:
        return
    optimizer._validate(group)
    validated[id(group)] = tuple(value for key, value in group.items() if key != "params")


class _Replan(Exception):
    """A parameter of the optimizer that the plan has no slot for (added since)."""


def _slot(slot_of: dict, param) -> int:
    try:
        return slot_of[id(param)]
    except KeyError:
        raise _Replan from None


def _adam_updates(optimizer, slot_of, created, validated, states):
    """Adam's update tuples for :meth:`bnrs._core.TrainStep.run`, in the optimizer's
    order, its state made where missing (noted in ``created``) and listed in ``states``
    (:class:`_Replan` for a parameter the plan has no slot for)."""
    updates = []
    for group in optimizer.param_groups:
        _validate(optimizer, group, validated)
        beta1, beta2 = group["betas"]
        hyper = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                 float(group["weight_decay"]))
        optimizer_state = optimizer.state
        for param in group["params"]:
            state = optimizer_state.get(param)
            if state is None or "step" not in state:
                created.append((param, state is None))
                state = optimizer_state.setdefault(param, {})
                state["step"] = 0
                state["exp_avg"] = np.zeros_like(param.data)
                state["exp_avg_sq"] = np.zeros_like(param.data)
            updates.append((_slot(slot_of, param), state["exp_avg"], state["exp_avg_sq"],
                            state["step"] + 1) + hyper)
            states.append(state)
    return updates


def _sgd_updates(optimizer, slot_of, created, validated, states):
    """SGD's update tuples (see :func:`_adam_updates`; ``states`` stays empty: SGD
    counts no steps)."""
    updates = []
    for group in optimizer.param_groups:
        _validate(optimizer, group, validated)
        momentum = group["momentum"]
        hyper = (float(group["lr"]), float(momentum), float(group["dampening"]),
                 bool(group["nesterov"]), float(group["weight_decay"]))
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state is None:
                created.append((param, True))
                state = optimizer.state.setdefault(param, {})
            buffer, first_step = None, False
            if momentum != 0:
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    if not created or created[-1][0] is not param:
                        created.append((param, False))
                    buffer = state["momentum_buffer"] = np.zeros_like(param.data)
                    first_step = True
            updates.append((_slot(slot_of, param), buffer, first_step) + hyper)
    return updates


def _undo_created(optimizer, created) -> None:
    """Remove the optimizer state made for a step that did not happen."""
    for param, new_entry in created:
        if new_entry:
            optimizer.state.pop(param, None)
        else:
            for key in ("step", "exp_avg", "exp_avg_sq", "momentum_buffer"):
                optimizer.state[param].pop(key, None)


#: How the binding refuses an array it cannot update in place (shared by two arguments,
#: or borrowed elsewhere): refused before the step changes anything, so the Python path
#: takes the step instead (parameters may share one array there).
_SHARED_ARRAY = "cannot be updated in place"


def _kind(model, criterion, optimizer) -> str | None:
    """The optimizer's name in a plan, or None when the executor does not run steps of
    this model, loss and optimizer (or is turned off)."""
    if not executor_enabled() or type(criterion) is not nn.CrossEntropyLoss:
        return None
    kind = _OPTIMIZERS.get(type(optimizer))
    if (kind is None or type(model) is not nn.Sequential or not _original_methods(model)
            or not _original_methods(criterion) or not _original_optimizer(optimizer)):
        return None
    return kind


def _planned_updates(model, optimizer, kind: str, sample_shape):
    """(the executor, the optimizer's update tuples for its plan, the optimizer states it
    made, the Adam states it counts steps in: see :func:`_adam_updates`), or None when the
    Python path must take the step: a network the executor does not run, or a group or
    state the Python path would refuse (it raises then). A parameter added to the
    optimizer since the plan was made has the model planned again, once. Whatever state
    was made for a step not taken is undone."""
    for _ in range(2):
        executor = _executor(model, optimizer, kind, sample_shape)
        if executor is None or executor.plan is None:
            return None
        created: list = []
        states: list = []
        try:
            updates = (_sgd_updates if kind == "sgd" else _adam_updates)(
                optimizer, executor.plan.slot_of, created, executor.validated, states)
        except _Replan:
            _undo_created(optimizer, created)
            _EXECUTORS.pop(model, None)
            continue
        except (KeyError, TypeError, ValueError):
            _undo_created(optimizer, created)
            return None
        return executor, updates, created, states
    return None


def run_step(model, criterion, optimizer, inputs, targets,
             sample_weight=None) -> float | None:
    """One training step by the executor, or None when the Python path must take it.

    Parameters
    ----------
    model, criterion, optimizer, inputs, targets, sample_weight
        As :func:`bnrs.training.train_step`.

    Returns
    -------
    float or None
        The loss (non-finite: returned before the backward, as the Python path does),
        or None if the executor does not run this network or batch.
    """
    kind = _kind(model, criterion, optimizer)
    if kind is None:
        return None
    try:
        x = F.as_float32(inputs, "input")
    except (TypeError, ValueError, MemoryError):
        return None
    if x.ndim < 2:
        return None
    labels = _labels(targets, len(x))
    if labels is None:
        return None
    weight = None
    if sample_weight is not None:
        try:
            weight = F._sample_weight(sample_weight, len(labels), "sample_weight")
        except (TypeError, ValueError):
            return None
    planned = _planned_updates(model, optimizer, kind, x.shape[1:])
    if planned is None:
        return None
    executor, updates, created, states = planned
    plan = executor.plan
    zero = [update[0] for update in updates]   # the optimizer's zero_grad
    slots = plan.slots
    running = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in plan.norms]
    # For a step left to the Python path, or one that stops in its forward.
    generator_states = [m._rng.bit_generator.state for m in plan.dropouts]
    seeds = [draw_seed(m._rng) for m in plan.dropouts]
    model._fused_input = None
    model._train_blocks = {}
    executor.train_step.reset_counts()
    try:
        loss = executor.train_step.run(x, labels, weight, [p.data for p in slots],
                                       [p.grad for p in slots], zero, running, seeds,
                                       updates)
    except BaseException as error:
        refused = isinstance(error, ValueError) and _SHARED_ARRAY in str(error)
        if not refused and executor.train_step.steps_done:
            # Ctrl-C seen as the step ended: its updates are done, so it counts.
            _end_steps(plan, criterion, optimizer, created, states, 1)
            raise
        _undo_created(optimizer, created)
        # A refused step changed nothing (the Python path takes it). Otherwise the dropout
        # layers the forward did not complete would not have drawn in a layer-by-layer
        # forward either: their generators get the draw back (a generator two layers
        # share, only the later layer's).
        _replay(plan.dropouts, generator_states, 0,
                0 if refused else executor.train_step.seeds_used)
        if refused:
            return None
        raise
    _end_steps(plan, criterion, optimizer, created, states,
               1 if math.isfinite(loss) else 0)
    return loss


def _replay(dropouts, states, steps: int, partial: int = 0) -> None:
    """Put the dropout layers' generators where a step-by-step epoch leaves them: back to
    ``states`` (as they were before the epoch), then ``steps`` steps' draws, and the draws
    of the first ``partial`` layers of one more step."""
    for module, state in zip(dropouts, states):
        module._rng.bit_generator.state = state
    for _ in range(steps):
        for module in dropouts:
            draw_seed(module._rng)
    for module in dropouts[:partial]:
        draw_seed(module._rng)


def _epoch_order(order, n_samples: int) -> tuple[bool, np.ndarray | None]:
    """(whether the executor can take ``order``, the order as it takes it): None stays
    None; else a 1-D array of integers, each a sample's index (0 .. n_samples - 1: NumPy
    reads a negative index from the end, and an index past the end raises, on the
    Python path)."""
    if order is None:
        return True, None
    if type(order) is not np.ndarray or order.ndim != 1 or order.dtype.kind not in "iu":
        return False, None
    if order.size and not (order.min() >= 0 and order.max() < n_samples):
        return False, None
    return True, np.require(order, np.int64, ["C_CONTIGUOUS", "ALIGNED"])


def run_epoch(model, criterion, optimizer, X, y, bounds, order=None,
              sample_weight=None) -> list[float] | None:
    """The steps of :func:`bnrs.training.train_epoch` (without transform, per-step callback
    or ``mark``) in one call into Rust, or None when they must be taken one by one.

    The batches are gathered from ``X`` in Rust, and the steps follow one another without
    returning to Python: the bits, the losses, the optimizer's step counts and the
    dropout layers' generators are those of a :func:`run_step` per batch, and so are those
    of an epoch that stops early (at a non-finite loss, an error or Ctrl-C).

    Parameters
    ----------
    model, criterion, optimizer
        As :func:`bnrs.training.train_step`.
    X, y, bounds, order, sample_weight
        As :func:`bnrs.training.train_epoch`. ``X`` must be a C-contiguous float32 array
        (the executor reads the samples where they are), every batch one of samples and
        every weight finite and non-negative. A batch whose weights are all 0 is skipped
        (its loss 0.0), as there.

    Returns
    -------
    list of float or None
        The loss of every step taken; None if the executor does not run this epoch (the
        caller takes its steps one by one).
    """
    kind = _kind(model, criterion, optimizer)
    if kind is None or type(X) is not np.ndarray or X.dtype != np.float32 or X.ndim < 2:
        return None
    if not (X.flags.c_contiguous and X.flags.aligned):
        return None
    n_samples = len(X)
    labels = _labels(y, n_samples)
    usable, order = _epoch_order(order, n_samples)
    if labels is None or not usable:
        return None
    positions = n_samples if order is None else len(order)
    try:   # integers only: the Python path's slices refuse floats
        bounds = [(operator.index(start), operator.index(stop)) for start, stop in bounds]
    except (TypeError, ValueError):
        return None
    if not bounds or not all(0 <= start < stop <= positions for start, stop in bounds):
        return None
    weights, taken = _epoch_weights(sample_weight, n_samples, order, bounds)
    if taken is None:
        return None
    if not taken:   # every batch's weights are 0: no step
        return [0.0] * len(bounds)
    steps = [bounds[index] for index in taken]
    planned = _planned_updates(model, optimizer, kind, X.shape[1:])
    if planned is None:
        return None
    executor, updates, created, states = planned
    plan = executor.plan
    train_step = executor.train_step
    zero = [update[0] for update in updates]
    slots = plan.slots
    running = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in plan.norms]
    dropouts = plan.dropouts
    generator_states = [m._rng.bit_generator.state for m in dropouts]
    seeds = [draw_seed(m._rng) for _ in steps for m in dropouts]
    model._fused_input = None
    model._train_blocks = {}
    train_step.reset_counts()
    try:
        losses = train_step.run_epoch(X, labels, weights, order, steps,
                                      [p.data for p in slots], [p.grad for p in slots],
                                      zero, running, seeds, updates)
    except BaseException as error:
        if isinstance(error, ValueError) and _SHARED_ARRAY in str(error):
            # Refused before any step: the steps are taken one by one.
            _undo_created(optimizer, created)
            _replay(dropouts, generator_states, 0)
            return None
        _end_steps(plan, criterion, optimizer, created, states, train_step.steps_done)
        _replay(dropouts, generator_states, train_step.steps_done, train_step.seeds_used)
        raise
    done = train_step.steps_done
    _end_steps(plan, criterion, optimizer, created, states, done)
    if done < len(steps):   # stopped at a non-finite loss, after that step's forward
        _replay(dropouts, generator_states, done + 1)
    return _with_skipped(losses, taken, len(bounds))


def _epoch_weights(sample_weight, n_samples: int, order, bounds):
    """(the weights as the executor takes them, the indices of the batches it steps on),
    or (None, None) when the epoch is left to the steps: weights of another shape, type or
    sign (the steps raise, or skip a batch whose weights sum to 0 or less, where the
    executor could not tell the same batches apart)."""
    if sample_weight is None:
        return None, list(range(len(bounds)))
    try:
        weights = F._sample_weight(sample_weight, n_samples, "sample_weight")
    except (TypeError, ValueError):
        return None, None
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        return None, None
    # The steps skip a batch unless its weights' sum is above 0: with weights finite and
    # non-negative, unless one of them is.
    by_position = weights if order is None else weights[order]
    taken = [index for index, (start, stop) in enumerate(bounds)
             if by_position[start:stop].any()]
    return weights, taken


def _with_skipped(losses: list[float], taken: list[int], n_batches: int) -> list[float]:
    """The losses of every batch in order: those of the steps taken, 0.0 for a batch
    skipped for its weights, up to the step that ended the epoch."""
    if len(taken) == n_batches:
        return losses
    merged = [0.0] * n_batches
    for index, loss in zip(taken, losses):
        merged[index] = loss
    if len(losses) < len(taken) or (losses and not math.isfinite(losses[-1])):
        return merged[:taken[len(losses) - 1] + 1]
    return merged


def _end_steps(plan: _Plan, criterion, optimizer, created, states, done: int) -> None:
    """The Python side of ``done`` steps taken by the executor (one call of ``run`` or
    ``run_epoch``): the layers keep nothing of them, the optimizer counts them (and drops
    the state it made for none)."""
    for module in plan.modules:
        module._ctx = None
    criterion._ctx = None
    if done == 0:
        _undo_created(optimizer, created)
    for state in states:
        state["step"] += done


# --------------------------------------------------------------------------- evaluation


class _EvalPlan:
    """A :class:`bnrs._core.EvalStep` for one model in evaluation and sample shape, and
    where each forward's arrays come from: the stages of
    :func:`bnrs.nn.fusion.fusion_plan` and :func:`~bnrs.nn.fusion.chain_blocks` for that
    shape, each described with the arguments its Python path passes its kernel."""

    def __init__(self, modules, sample_shape):
        self.sample_shape = sample_shape
        self.sources: list[tuple] = []   # (getter, module) per array slot
        self.slot_of: dict[tuple, int] = {}
        self.shapes: list[list[int]] = []
        self.stages: list[tuple] = []
        for module in modules:
            if module.training:
                raise _Unsupported("a layer in training mode")
            if not _original_methods(module):
                raise _Unsupported("a layer whose forward or backward was replaced")
        steps = fusion.chain_blocks(fusion.fusion_plan(list(modules), {}, training=False))
        shape = tuple(sample_shape)
        for step in steps:
            shape = self._step(step, shape)
        try:
            self.core = _core.EvalStep(self.stages, self.shapes)
        except (TypeError, ValueError) as error:
            # A stage the kernels would refuse, or an attribute of a type the layers
            # convert (an int padding, a list stride): the Python path runs it.
            raise _Unsupported(str(error)) from None

    def _slot(self, module, attribute: str) -> int:
        """The slot of ``module``'s array at ``attribute`` (a dotted path)."""
        key = (id(module), attribute)
        slot = self.slot_of.get(key)
        if slot is None:
            getter = attrgetter(attribute)
            array = getter(module)
            if not isinstance(array, np.ndarray):
                raise _Unsupported(f"{attribute} that is not an array")
            slot = self.slot_of[key] = len(self.sources)
            self.sources.append((getter, module))
            self.shapes.append(list(array.shape))
        return slot

    def _parameter(self, module, name: str) -> int | None:
        return None if getattr(module, name) is None else self._slot(module, f"{name}.data")

    def _norm(self, norm) -> tuple:
        """An evaluation batch norm with running statistics: its slots and eps."""
        if not norm.track_running_stats:
            raise _Unsupported("a batch norm without running statistics")
        return (self._parameter(norm, "weight"), self._parameter(norm, "bias"),
                self._slot(norm, "running_mean"), self._slot(norm, "running_var"),
                float(norm.eps))

    def _add(self, kind: str, shape, output, args: tuple) -> tuple:
        self.stages.append((kind, list(shape), list(output), args))
        return tuple(output)

    @staticmethod
    def _output(modules, shape) -> tuple:
        for module in modules:
            try:
                shape = tuple(module.output_shape(shape))
            except (TypeError, ValueError):
                raise _Unsupported("a layer that does not take its input") from None
        return shape

    def _conv(self, layer, norm=None, activation=None, pool=None) -> tuple:
        return (self._slot(layer, "weight.data"), self._parameter(layer, "bias"),
                layer.stride, layer.padding, layer.dilation, layer.groups,
                None if norm is None else self._norm(norm), activation, pool)

    def _step(self, step, shape) -> tuple:
        """Describe ``step`` on samples of ``shape`` as its Python path would run it;
        returns its output's sample shape."""
        if isinstance(step, fusion.FusedChain):
            first, second = step.first, step.second
            if fusion._fits(first, (1,) + shape):
                between = self._output(first.modules, shape)
                if fusion._fits(second, (1,) + between):
                    return self._add("conv_chain", shape, self._output(second.modules, between),
                                     (self._block(first), self._block(second)))
            return self._step(second, self._step(first, shape))
        if isinstance(step, fusion.FusedBlock):
            if not fusion._fits(step, (1,) + shape):
                for module in step.modules:   # run_block runs them one by one
                    shape = self._module(module, shape)
                return shape
            output = self._output(step.modules, shape)
            if type(step.layer) is nn.Conv2d:
                return self._add("conv", shape, output, self._block(step))
            if len(shape) != 1:
                raise _Unsupported("a linear layer on more than one axis")
            layer = step.layer
            norm = None if step.norm is None else self._norm(step.norm)
            return self._add("linear", shape, output,
                             (self._slot(layer, "weight.data"), self._parameter(layer, "bias"),
                              norm, step.activation))
        return self._module(step, shape)

    def _block(self, block: fusion.FusedBlock) -> tuple:
        return self._conv(block.layer, block.norm, block.activation, block.pool)

    def _module(self, module, shape) -> tuple:
        """Describe a layer that runs as itself."""
        output = self._output([module], shape)
        kind = type(module)
        if kind is nn.Conv2d:
            return self._add("conv", shape, output, self._conv(module))
        if kind is nn.Linear:
            if len(shape) != 1:
                raise _Unsupported("a linear layer on more than one axis")
            return self._add("linear", shape, output,
                             (self._slot(module, "weight.data"),
                              self._parameter(module, "bias"), None, None))
        if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
            return self._add("batch_norm", shape, output, self._norm(module))
        if kind in _ACTIVATIONS:
            return self._add("activation", shape, output,
                             (_ACTIVATIONS[kind],
                              float(getattr(module, "negative_slope", 0.0))))
        if kind is nn.MaxPool2d:
            return self._add("max_pool2d", shape, output,
                             (module.kernel_size, module.stride, module.padding))
        if kind is nn.AvgPool2d:
            return self._add("avg_pool2d", shape, output,
                             (module.kernel_size, module.stride, module.padding,
                              module.count_include_pad))
        if kind in (nn.Dropout, nn.Dropout2d):   # the identity in evaluation
            return self._add("view", shape, output, ())
        if kind is nn.Flatten:
            start = module.start_dim + len(shape) + 1 if module.start_dim < 0 else module.start_dim
            if start < 1:
                raise _Unsupported("a Flatten that merges the batch axis")
            return self._add("view", shape, output, ())
        raise _Unsupported(f"a {kind.__name__}")


class _EvalExecutor:
    """A model's evaluation plan (None: the Python path runs it) and its key."""

    def __init__(self, signature, sample_shape, plan: _EvalPlan | None):
        self.signature, self.sample_shape, self.plan = signature, sample_shape, plan


# Keyed by model, so that a plan goes with its model.
_EVAL_EXECUTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_FLOAT32 = np.dtype(np.float32)


def run_forward(model: nn.Sequential, input) -> np.ndarray | None:
    """``model(input)`` in evaluation as one call into Rust, with the GIL released, or
    None when the Python path must run it.

    The stages are those :meth:`bnrs.nn.Sequential.forward` runs fused (``model`` fuses),
    described once per sample shape and calling the same kernels with the same
    arguments, so the output has the same bits; a convolution's batch norm is folded at
    every call from the arrays of that call. Every layer must be in evaluation mode and of
    a type the training executor runs (a batch norm with running statistics, a dense
    layer on (N, features)); the input must have a batch axis and at least one sample.
    Like the fused Python path, the layers keep no state for a backward: the
    Sequential's backward re-runs the forward unfused. ``BNRS_FUSED_STEP=0`` turns it
    off."""
    if not executor_enabled():
        return None
    signature = _signature(model)
    if signature is None:
        return None
    if (type(input) is np.ndarray and input.dtype is _FLOAT32 and input.flags.c_contiguous
            and input.flags.aligned):
        x = input
    else:
        try:
            x = F.as_float32(input, "input")
        except (TypeError, ValueError, MemoryError):
            return None   # the layers raise it in their own words
    shape = x.shape
    if len(shape) < 2 or shape[0] == 0:
        return None
    sample_shape = shape[1:]
    try:
        executor = _EVAL_EXECUTORS.get(model)
    except TypeError:   # a Sequential subclass that is not hashable
        return None
    if (executor is None or executor.sample_shape != sample_shape
            or executor.signature != signature):
        try:
            plan = _EvalPlan(signature[0], sample_shape)
        except _Unsupported:
            plan = None
        executor = _EVAL_EXECUTORS[model] = _EvalExecutor(signature, sample_shape, plan)
    plan = executor.plan
    if plan is None:
        return None
    output = plan.core.forward(x, [getter(module) for getter, module in plan.sources])
    if output is not None:
        for module in signature[0]:
            module._ctx = None   # a backward must not find an older forward's state
    return output
