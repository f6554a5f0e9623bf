"""The :class:`Module` base class, :class:`Parameter`, :class:`Sequential` and the seeding rule.

A module's ``forward`` (or call) computes its output and keeps what its ``backward`` needs;
``backward(grad_output)`` returns the input gradient and *adds* the parameter gradients to
``param.grad``. The saved state is released by ``backward`` and never pickled.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np

from .. import functional as F

__all__ = ["IncompatibleKeys", "Module", "Parameter", "Sequential", "as_generator"]


def as_generator(random_state=None, rng=None) -> np.random.Generator:
    """Return a ``numpy.random.Generator`` from a seed, a Generator or None.

    Parameters
    ----------
    random_state, rng : int, numpy.random.Generator or None
        Two names for the same thing; give at most one. An int seeds a new Generator,
        a Generator is used as is (and advanced by the caller's draws), a legacy
        ``numpy.random.RandomState`` seeds a new Generator from four of its draws, None
        draws fresh OS entropy.

    Returns
    -------
    numpy.random.Generator
    """
    if rng is not None and random_state is not None:
        raise TypeError("give either rng or random_state, not both")
    seed = random_state if rng is None else rng
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, np.random.RandomState):
        # scikit-learn's check_random_state gives these; derive a Generator from it.
        return np.random.default_rng(seed.randint(0, 2**32, size=4, dtype=np.uint64))
    if seed is None:
        return np.random.default_rng()
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            "random_state: expected an int seed, a numpy.random.Generator or None, "
            f"got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"random_state: expected a non-negative seed, got {seed}")
    return np.random.default_rng(int(seed))


class Parameter:
    """A trainable float32 array and the gradient accumulated for it.

    Parameters
    ----------
    data : array_like
        The initial value, stored as a new float32 C-contiguous array.

    Attributes
    ----------
    data : ndarray, float32
        The value, always float32, C-contiguous and writeable: optimizers and
        :meth:`Module.load_state_dict` update it in place. Assigning an array that is
        already so shares it (as PyTorch's ``p.data = t`` does); anything else is
        converted to a new array, and a new shape also resets ``grad``.
    grad : ndarray, float32
        Same shape as ``data``; ``backward`` adds to it and ``zero_grad`` clears it.
        Like PyTorch, the gradient is not pickled: an unpickled parameter starts at zero.
    """

    __slots__ = ("_data", "grad")

    def __init__(self, data):
        self._data = _writeable_float32(data, copy=True)
        self.grad = np.zeros_like(self._data)

    @property
    def data(self) -> np.ndarray:
        """The value (see the class docstring)."""
        return self._data

    @data.setter
    def data(self, value) -> None:
        value = _writeable_float32(value, copy=False)
        if value.shape != self._data.shape:
            self.grad = np.zeros_like(value)
        self._data = value

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ``data``."""
        return self._data.shape

    def __getstate__(self):
        return (self._data,)

    def __setstate__(self, state):
        self._data = state[0]
        self.grad = np.zeros_like(self._data)

    def __repr__(self) -> str:
        return f"Parameter(shape={self._data.shape})"


def _writeable_float32(value, copy: bool) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"Parameter: cannot be converted to an array: {error}") from None
    if array.dtype.kind not in "fiu":
        raise TypeError(f"Parameter: expected a real-valued array, got dtype {array.dtype}")
    if (copy or array.dtype != np.float32 or not array.flags.c_contiguous
            or not array.flags.writeable):
        return np.array(array, dtype=np.float32, order="C", copy=True)
    return array


class IncompatibleKeys(NamedTuple):
    """What :meth:`Module.load_state_dict` did not match (PyTorch's ``_IncompatibleKeys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """Base class of the layers: parameters, buffers, children, modes and state dicts.

    Subclasses list their parameter attribute names in ``_parameter_names`` and their
    buffer names in ``_buffer_names`` (a None value means "absent"), keep child modules in
    ``self._modules`` (see :meth:`add_module`), and implement :meth:`forward` and
    :meth:`backward`. What ``backward`` needs is kept in ``self._ctx`` by ``forward``.
    """

    _parameter_names: tuple[str, ...] = ()
    _buffer_names: tuple[str, ...] = ()

    def __init__(self):
        self.training = True
        self._modules: dict[str, Module] = OrderedDict()
        self._ctx = None

    # ---------------------------------------------------------------- computation

    def forward(self, input):
        """Compute the output and keep what :meth:`backward` needs."""
        raise NotImplementedError

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The output shape of one sample of shape ``input_shape`` (no batch axis)."""
        raise NotImplementedError(f"{type(self).__name__} does not define output_shape")

    def backward(self, grad_output, input_grad: bool = True):
        """Return the gradient of the input and add the parameter gradients to ``.grad``.

        Parameters
        ----------
        grad_output : ndarray
            Gradient of the loss with respect to the output of the last :meth:`forward`.
        input_grad : bool
            When False the input gradient is not needed: the module may skip computing
            it and returns None.

        Returns
        -------
        ndarray or None
        """
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _saved(self):
        """Take the state saved by ``forward``, once: a second backward is an error."""
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward: no saved forward state; call forward "
                "before backward (each forward supports one backward)")
        self._ctx = None
        return ctx

    def _grad_output(self, grad_output, shape) -> np.ndarray:
        """``grad_output`` as float32, checked to have ``shape``, the last output's shape."""
        grad = F.as_float32(grad_output, "grad_output")
        if grad.shape != tuple(shape):
            raise ValueError(f"{type(self).__name__}.backward: grad_output: expected shape "
                             f"{tuple(shape)} (the last forward's output), got {grad.shape}")
        return grad

    def clear_saved(self) -> None:
        """Drop what the last forward kept for backward, here and in all children."""
        for module in self.modules():
            module._ctx = None

    # ---------------------------------------------------------------- structure

    def add_module(self, name: str, module: Module) -> None:
        """Register ``module`` as a child named ``name`` (also an attribute, if free).

        Raises ValueError if the same instance is already in this module's tree: its
        saved forward state would be overwritten by the second use.
        """
        if not isinstance(module, Module):
            raise TypeError(f"{name}: expected a Module, got {type(module).__name__}")
        if not name or "." in name:
            raise ValueError(f"module name must be non-empty without '.', got {name!r}")
        if any(existing is module for existing in self.modules()):
            raise ValueError(f"{name}: this {type(module).__name__} instance is already in "
                             "the network; a module keeps its forward state for backward, "
                             "so use a new instance at each place")
        self._modules[name] = module
        if name.isidentifier() and isinstance(getattr(self, name, module), Module):
            setattr(self, name, module)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        """Yield ``(name, module)`` for the direct children."""
        yield from self._modules.items()

    def children(self) -> Iterator[Module]:
        """Yield the direct children."""
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """Yield ``(name, module)`` for this module (name ``prefix``) and all descendants."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        """Yield this module and all its descendants."""
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Yield ``(name, parameter)`` in PyTorch's order, named like ``"0.weight"``."""
        for module_name, module in self.named_modules(prefix):
            for name in module._parameter_names:
                param = getattr(module, name)
                if param is not None:
                    yield (f"{module_name}.{name}" if module_name else name), param

    def parameters(self) -> Iterator[Parameter]:
        """Yield the parameters (see :meth:`named_parameters`)."""
        for _, param in self.named_parameters():
            yield param

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(name, array)`` for the buffers that are present (not None)."""
        for module_name, module in self.named_modules(prefix):
            for name in module._buffer_names:
                buffer = getattr(module, name)
                if buffer is not None:
                    yield (f"{module_name}.{name}" if module_name else name), buffer

    def buffers(self) -> Iterator[np.ndarray]:
        """Yield the buffers (see :meth:`named_buffers`)."""
        for _, buffer in self.named_buffers():
            yield buffer

    # ---------------------------------------------------------------- modes and grads

    def train(self, mode: bool = True) -> Module:
        """Set training mode (``mode=True``) or evaluation mode here and in all children.

        Returns
        -------
        self
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"training mode is expected to be boolean, got {mode!r}")
        for module in self.modules():
            module.training = bool(mode)
        return self

    def eval(self) -> Module:
        """Set evaluation mode; the same as ``train(False)``."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Set every parameter gradient to zero (in place)."""
        for param in self.parameters():
            param.grad.fill(0.0)

    # ---------------------------------------------------------------- state dict

    def _state_items(self) -> Iterator[tuple[str, object, object]]:
        """Yield ``(key, owner_module, attribute)`` in PyTorch's state-dict order."""
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            for name in module._parameter_names + module._buffer_names:
                if getattr(module, name) is not None:
                    yield prefix + name, module, name

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Return copies of the parameters and buffers under PyTorch's key names.

        Keys are like ``"0.weight"``, ``"1.running_mean"``, ``"1.num_batches_tracked"``;
        values are new arrays (float32, or a 0-d int64 for ``num_batches_tracked``), so
        the dict is a snapshot that later training does not change. A PyTorch model loads
        it with ``{k: torch.from_numpy(v) for k, v in d.items()}``.
        """
        state = OrderedDict()
        for key, module, name in self._state_items():
            value = getattr(module, name)
            state[key] = (value.data if isinstance(value, Parameter) else value).copy()
        return state

    def load_state_dict(self, state_dict, strict: bool = True) -> IncompatibleKeys:
        """Copy parameters and buffers in from ``state_dict`` (keys as :meth:`state_dict`).

        Values may be any arrays (a PyTorch state dict converted with
        ``{k: v.numpy() for k, v in d.items()}``); they are copied into the existing
        arrays, converted to float32 (int64 for ``num_batches_tracked``). Nothing is
        changed unless every key can be loaded.

        Parameters
        ----------
        state_dict : mapping of str to array_like
        strict : bool
            Raise on missing or unexpected keys (as PyTorch does). Wrong shapes raise
            whatever ``strict`` is.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, both empty when ``strict``.

        Raises
        ------
        ValueError
            Naming the missing, unexpected and wrongly shaped keys.
        TypeError
            For a value that is not a real-valued array.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: expected a mapping of str to array, "
                            f"got {type(state_dict).__name__}")
        targets = {key: (module, name) for key, module, name in self._state_items()}
        missing = [key for key in targets if key not in state_dict]
        unexpected = [str(key) for key in state_dict if key not in targets]
        converted, problems = {}, []
        for key, (module, name) in targets.items():
            if key not in state_dict:
                continue
            try:
                value = np.asarray(state_dict[key])
            except (TypeError, ValueError) as error:
                raise type(error)(f"{key}: cannot be converted to an array: {error}") from None
            if value.dtype.kind not in "fiu":
                raise TypeError(f"{key}: expected a real-valued array, got dtype {value.dtype}")
            current = getattr(module, name)
            target = current.data if isinstance(current, Parameter) else current
            if value.shape != target.shape:
                problems.append(f"{key}: expected shape {target.shape}, got {value.shape}")
            converted[key] = (target, value)
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if problems:
            raise ValueError(f"error(s) in loading state_dict for {type(self).__name__}: "
                             + "; ".join(problems))
        for target, value in converted.values():
            target[...] = value
        return IncompatibleKeys(missing, unexpected)

    def summary(self, input_shape):
        """The table of layers, output shapes, parameters and multiply-adds for samples
        of ``input_shape`` (no batch axis); see :func:`bnrs.nn.summary`.

        Returns
        -------
        ModelSummary
            A ``str`` to print, with the rows and totals as attributes.
        """
        from .summary import summary   # summary.py imports this module

        return summary(self, input_shape)

    # ---------------------------------------------------------------- pickling, repr

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ctx"] = None
        if "_fusion_blocks" in state:   # Sequential: rebuilt on the next fused forward
            state["_fusion_blocks"] = {}
            state["_fused_input"] = None
            state["_train_blocks"] = {}
        return state

    def extra_repr(self) -> str:
        """The text inside the parentheses of ``repr``; subclasses override it."""
        return ""

    def __repr__(self) -> str:
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, module in self._modules.items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        lines.append(")")
        return "\n".join(lines)


def _has_parameters(module: Module) -> bool:
    return next(iter(module.parameters()), None) is not None


class Sequential(Module):
    """Modules applied in order; children are named ``"0"``, ``"1"``, ...

    Parameters
    ----------
    *modules : Module
        The layers, or a single ``OrderedDict`` of name to module as in PyTorch.
    fuse : bool, default True
        In evaluation mode, run each Conv2d → BatchNorm2d → activation (and Linear →
        BatchNorm1d → activation) as one fused block: the batch norm folded into the
        weights, the activation applied inside the kernel (see :mod:`bnrs.nn.fusion`).
        The result differs from the unfused one by float32 rounding only. In training
        mode, each batch norm followed by an activation, 2×2 pool and/or dropout runs as
        one fused block, with the unfused bits (outputs, gradients, running statistics).
        False, or the environment variable ``BNRS_FUSE=0``, runs every module as itself.

    Examples
    --------
    >>> from bnrs import nn
    >>> model = nn.Sequential(nn.Linear(4, 8, random_state=0), nn.ReLU(),
    ...                       nn.Linear(8, 3, random_state=1))
    >>> [name for name, _ in model.named_parameters()]
    ['0.weight', '0.bias', '2.weight', '2.bias']
    """

    def __init__(self, *modules, fuse: bool = True):
        super().__init__()
        self.fuse = bool(fuse)
        self._fusion_blocks: dict = {}
        self._fused_input = None
        # Training blocks of the last forward, by the index of their last module.
        self._train_blocks: dict = {}
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, module in modules[0].items():
                self.add_module(str(name), module)
        else:
            for index, module in enumerate(modules):
                self.add_module(str(index), module)

    def append(self, module: Module) -> Sequential:
        """Add ``module`` at the end; returns self."""
        self.add_module(str(len(self._modules)), module)
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, index):
        """The module at ``index``, or a Sequential of a slice (keeping the names)."""
        if isinstance(index, slice):
            return Sequential(OrderedDict(list(self._modules.items())[index]),
                              fuse=self._fuses())
        return list(self._modules.values())[index]

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The output shape of one sample of shape ``input_shape`` (no batch axis)."""
        shape = tuple(input_shape)
        for module in self._modules.values():
            shape = module.output_shape(shape)
        return shape

    def _fuses(self) -> bool:
        return getattr(self, "fuse", True)   # pickles from before fusion lack the attribute

    def forward(self, input):
        """Apply every module in order (fused blocks, see ``fuse``)."""
        from . import fusion   # fusion.py imports the layers, which import this module

        self._fused_input = None
        self._train_blocks = {}
        modules = list(self._modules.values())
        if not fusion.fusion_enabled(self._fuses()):
            return self._forward_unfused(input)
        if not self.training:
            from .. import executor   # executor.py imports the layers

            output = executor.run_forward(self, input)
            if output is not None:
                # A backward re-runs the modules unfused on this input (see backward).
                self._fused_input = (input, modules)
                return output
        if not hasattr(self, "_fusion_blocks"):
            self._fusion_blocks = {}
        steps = fusion.fusion_plan(modules, self._fusion_blocks, training=self.training)
        if not self.training:
            steps = fusion.chain_blocks(steps)
        output, fused_modules, index = input, [], 0
        for step in steps:
            if isinstance(step, (fusion.FusedBlock, fusion.FusedChain)):
                run = fusion.run_chain if isinstance(step, fusion.FusedChain) else fusion.run_block
                output = run(step, output)
                fused_modules += step.modules
                index += len(step.modules)
            elif isinstance(step, fusion.TrainBlock):
                output = step.forward(output)
                index += len(step.modules)
                self._train_blocks[index - 1] = (index - len(step.modules), step)
            else:
                output = step(output)
                index += 1
        if fused_modules:
            # A backward re-runs the modules unfused on this input (see backward).
            self._fused_input = (input, fused_modules)
        return output

    def _forward_unfused(self, input):
        output = input
        for module in self._modules.values():
            output = module(output)
        return output

    def backward(self, grad_output, input_grad: bool = True):
        """Back-propagate through every module in reverse order.

        Parameters
        ----------
        grad_output : ndarray
            Gradient of the loss with respect to the output of the last forward.
        input_grad : bool
            With False (what a training loop wants) the gradient of the network's input
            is not computed: the backward stops at the first module that has parameters,
            which is told to skip its own input gradient (cheap for a leading Conv2d or
            Linear), and None is returned.

        Returns
        -------
        ndarray or None
            The input gradient, or None when ``input_grad`` is False.

        Notes
        -----
        After a fused forward in evaluation mode the modules did not keep their state
        (after one run by the executor in one call, no module did): the forward is first
        re-run unfused on the same input, so the gradient is that of the unfused network,
        as without fusion. After one in training mode each fused
        block runs its own backward, with the unfused bits.
        """
        fused = getattr(self, "_fused_input", None)
        self._fused_input = None
        # Only if that fused forward is still the last one: no module of its blocks ran
        # since (a caller may call the children itself), and still in evaluation.
        if (fused is not None and not self.training
                and all(module._ctx is None for module in fused[1])):
            self._forward_unfused(fused[0])
        modules = list(self._modules.values())
        stop = 0
        if not input_grad:
            stop = next((i for i, m in enumerate(modules) if _has_parameters(m)), len(modules))
            for module in modules[:stop]:
                module.clear_saved()
        train_blocks = getattr(self, "_train_blocks", {})
        self._train_blocks = {}
        grad, index = grad_output, len(modules) - 1
        while index >= stop:
            start, block = train_blocks.get(index, (None, None))
            if block is not None and start >= stop and block.ran_fused():
                grad = block.backward(grad, input_grad=input_grad or start > stop)
                index = start - 1
                continue
            grad = modules[index].backward(grad, input_grad=input_grad or index > stop)
            index -= 1
        return grad if input_grad else None
