"""Layers for training CNNs with batch norm and dropout, with PyTorch's names.

Each module's ``forward`` (or call) returns its output and keeps what ``backward``
needs; ``backward(grad_output)`` returns the input gradient and adds the parameter
gradients to ``param.grad``. ``train()``/``eval()``, ``named_parameters()``,
``zero_grad()``, ``state_dict()`` and ``load_state_dict()`` behave as in PyTorch, with
PyTorch's state-dict key names.

Examples
--------
>>> import numpy as np
>>> from bnrs import nn
>>> model = nn.from_spec("c8-bn-relu-mp2", (1, 8, 8), 3, random_state=0)
>>> crit = nn.CrossEntropyLoss()
>>> x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
>>> loss = crit(model(x), np.array([0, 1, 2, 0]))
>>> model.backward(crit.backward(), input_grad=False)
>>> model[0].weight.grad.shape
(8, 1, 3, 3)
"""

from .activation import LeakyReLU, ReLU, Sigmoid, Tanh
from .batchnorm import BatchNorm1d, BatchNorm2d
from .branches import AdaptiveAvgPool2d, Concat, ModuleList, Residual
from .dropout import Dropout, Dropout2d, enable_dropout, mc_dropout
from .layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d
from .loss import CrossEntropyLoss, HuberLoss, MSELoss
from .module import IncompatibleKeys, Module, Parameter, Sequential
from .normalization import GroupNorm, InstanceNorm2d, LayerNorm
from .renorm import BatchRenorm1d, BatchRenorm2d
from .spec import DEFAULT_ARCHITECTURE, SpecError, Token, from_spec, parse
from .summary import LayerSummary, ModelSummary, summary

__all__ = [
    "DEFAULT_ARCHITECTURE",
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "Concat",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Dropout2d",
    "Flatten",
    "GroupNorm",
    "HuberLoss",
    "IncompatibleKeys",
    "InstanceNorm2d",
    "LayerNorm",
    "LayerSummary",
    "LeakyReLU",
    "Linear",
    "MSELoss",
    "MaxPool2d",
    "ModelSummary",
    "Module",
    "ModuleList",
    "Parameter",
    "ReLU",
    "Residual",
    "Sequential",
    "Sigmoid",
    "SpecError",
    "Tanh",
    "Token",
    "enable_dropout",
    "mc_dropout",
    "from_spec",
    "parse",
    "summary",
]
