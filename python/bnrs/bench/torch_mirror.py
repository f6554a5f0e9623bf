"""PyTorch beside bnrs: its import, and the bnrs network and training step mirrored."""

from __future__ import annotations

from collections.abc import Sequence

from .. import nn


NO_TORCH_MESSAGE = ("PyTorch is not installed in this environment (pip install torch in a "
                    "separate virtual environment to compare); showing bnrs alone")
TORCH_DISABLED_MESSAGE = "PyTorch comparison disabled (--no-torch); showing bnrs alone"


def import_torch(disabled: bool):
    """``(torch, None)``, or ``(None, why not)``."""
    if disabled:
        return None, TORCH_DISABLED_MESSAGE
    try:
        import torch
    except ImportError:
        return None, NO_TORCH_MESSAGE
    return torch, None


def build_torch_network(model: nn.Sequential, torch):
    """The same layers as a ``torch.nn.Sequential``, with the same weights and buffers."""
    tnn = torch.nn
    layers = []
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            layers.append(tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                     layer.stride, layer.padding, layer.dilation,
                                     bias=layer.bias is not None))
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            cls = tnn.BatchNorm2d if isinstance(layer, nn.BatchNorm2d) else tnn.BatchNorm1d
            layers.append(cls(layer.num_features, layer.eps, layer.momentum))
        elif isinstance(layer, nn.Linear):
            layers.append(tnn.Linear(layer.in_features, layer.out_features,
                                     bias=layer.bias is not None))
        elif isinstance(layer, nn.MaxPool2d):
            layers.append(tnn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding))
        elif isinstance(layer, nn.Dropout):
            layers.append(tnn.Dropout(layer.p))
        elif isinstance(layer, nn.Flatten):
            layers.append(tnn.Flatten(layer.start_dim, layer.end_dim))
        elif isinstance(layer, nn.ReLU):
            layers.append(tnn.ReLU())
        else:
            raise TypeError(f"no PyTorch counterpart for {layer!r} in the bench")
    network = tnn.Sequential(*layers)
    network.load_state_dict({key: torch.from_numpy(value.copy())
                             for key, value in model.state_dict().items()})
    return network


def torch_train_step(model, optimizer, inputs, targets, torch) -> None:
    """:func:`bnrs.training.train_step` in PyTorch (the model in training mode)."""
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()


def torch_train_epoch(model, optimizer, inputs, targets, bounds: Sequence[tuple[int, int]],
                      torch, order=None) -> None:
    """:func:`bnrs.training.train_epoch` in PyTorch: a step per (start, stop) of
    ``bounds``, positions into ``order`` (a tensor of sample indices) or the samples."""
    model.train()
    for start, stop in bounds:
        index = slice(start, stop) if order is None else order[start:stop]
        torch_train_step(model, optimizer, inputs[index], targets[index], torch)
