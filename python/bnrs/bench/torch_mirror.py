"""PyTorch beside bnrs: its import, any bnrs network mirrored, and its training step.

:func:`torch_mirror` is the project's one PyTorch mirror of a bnrs network: the bench
times it against bnrs, and docs/interop.md (checked by docs/torch_roundtrip.py) shows it
to users who take a model to PyTorch. PyTorch is imported only when a mirror is built,
never by ``import bnrs.bench``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from .. import nn


NO_TORCH_MESSAGE = ("PyTorch is not installed in this environment (pip install torch in a "
                    "separate virtual environment to compare); showing bnrs alone")
TORCH_DISABLED_MESSAGE = "PyTorch comparison disabled (--no-torch); showing bnrs alone"
NO_RENORM_MESSAGE = ("PyTorch has no batch renormalisation (brn), so the bench cannot time "
                     "the same network in PyTorch: use bn instead, or --no-torch to time "
                     "bnrs alone")


def import_torch(disabled: bool):
    """``(torch, None)``, or ``(None, why not)``."""
    if disabled:
        return None, TORCH_DISABLED_MESSAGE
    try:
        import torch
    except ImportError:
        return None, NO_TORCH_MESSAGE
    return torch, None


@functools.cache
def _containers(torch):
    """PyTorch modules for :class:`bnrs.nn.Concat` and :class:`bnrs.nn.Residual`, with the
    same state-dict keys (defined on first use: they subclass ``torch.nn.Module``)."""

    class Concat(torch.nn.Module):   # bnrs.nn.Concat: an Inception block's branches
        def __init__(self, *branches):
            super().__init__()
            self.branches = torch.nn.ModuleList(branches)

        def forward(self, x):
            return torch.cat([branch(x) for branch in self.branches], dim=1)

    class Residual(torch.nn.Module):   # bnrs.nn.Residual: activation(body(x) + shortcut(x))
        def __init__(self, body, shortcut=None, activation=None):
            super().__init__()
            self.body, self.shortcut, self.activation = body, shortcut, activation

        def forward(self, x):
            y = self.body(x) + (x if self.shortcut is None else self.shortcut(x))
            return y if self.activation is None else self.activation(y)

    return Concat, Residual


def has_batch_renorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a :class:`bnrs.nn.BatchRenorm1d` or ``BatchRenorm2d``."""
    return any(isinstance(module, (nn.BatchRenorm1d, nn.BatchRenorm2d))
               for module in model.modules())


def torch_mirror(model: nn.Module, torch=None):
    """A ``torch.nn`` module with the layers of ``model``: same keys, same forward.

    Works for any network :func:`bnrs.nn.from_spec` builds (or any nesting of bnrs
    layers, :class:`~bnrs.nn.Sequential`, :class:`~bnrs.nn.Concat` and
    :class:`~bnrs.nn.Residual`), with the same hyper-parameters (eps, momentum, padding,
    ...). Its weights are PyTorch's own initialisation: load ``model.state_dict()`` to
    copy bnrs's (:func:`build_torch_network` does both).

    Parameters
    ----------
    model : bnrs.nn.Module
    torch : module or None, default None
        The ``torch`` package (imported here if None).

    Returns
    -------
    torch.nn.Module
        In training mode.

    Raises
    ------
    NotImplementedError
        For a layer without a PyTorch counterpart. Batch renormalisation (``brn``) becomes
        ``torch.nn.BatchNorm*d``: exact in evaluation mode (both use the running
        statistics), plain batch norm if trained on in PyTorch.
    """
    if torch is None:
        import torch
    tnn = torch.nn
    concat, residual = _containers(torch)

    def mirror(layer):
        if isinstance(layer, nn.Sequential):
            return tnn.Sequential(*(mirror(child) for child in layer))
        if isinstance(layer, nn.Concat):
            return concat(*(mirror(branch) for branch in layer.branches))
        if isinstance(layer, nn.Residual):
            return residual(*(None if part is None else mirror(part)
                              for part in (layer.body, layer.shortcut, layer.activation)))
        if isinstance(layer, nn.AdaptiveAvgPool2d):
            return tnn.AdaptiveAvgPool2d(1)
        if isinstance(layer, nn.Conv2d):
            return tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                              layer.stride, layer.padding, layer.dilation,
                              groups=layer.groups, bias=layer.bias is not None)
        if isinstance(layer, nn.Linear):
            return tnn.Linear(layer.in_features, layer.out_features,
                              bias=layer.bias is not None)
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):   # BatchRenorm too
            torch_class = (tnn.BatchNorm2d if isinstance(layer, nn.BatchNorm2d)
                           else tnn.BatchNorm1d)
            return torch_class(layer.num_features, layer.eps, layer.momentum,
                               layer.affine, layer.track_running_stats)
        if isinstance(layer, nn.GroupNorm):
            return tnn.GroupNorm(layer.num_groups, layer.num_channels, layer.eps,
                                 layer.affine)
        if isinstance(layer, nn.LayerNorm):
            return tnn.LayerNorm(layer.normalized_shape, layer.eps,
                                 layer.elementwise_affine, bias=layer.bias is not None)
        if isinstance(layer, nn.InstanceNorm2d):
            return tnn.InstanceNorm2d(layer.num_features, layer.eps, affine=layer.affine)
        if isinstance(layer, nn.MaxPool2d):
            return tnn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
        if isinstance(layer, nn.AvgPool2d):
            return tnn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding,
                                 count_include_pad=layer.count_include_pad)
        if isinstance(layer, nn.Flatten):
            return tnn.Flatten(layer.start_dim, layer.end_dim)
        if isinstance(layer, nn.LeakyReLU):
            return tnn.LeakyReLU(layer.negative_slope)
        if isinstance(layer, (nn.Dropout, nn.Dropout2d)):
            return getattr(tnn, type(layer).__name__)(layer.p)
        if isinstance(layer, (nn.ReLU, nn.Sigmoid, nn.Tanh)):
            return getattr(tnn, type(layer).__name__)()
        raise NotImplementedError(f"no PyTorch mirror for {layer!r}")

    return mirror(model)


def build_torch_network(model: nn.Module, torch):
    """:func:`torch_mirror` of ``model`` with its weights and buffers loaded.

    Raises
    ------
    ValueError
        If ``model`` has batch renormalisation, which PyTorch lacks: the two would not
        train the same network (:data:`NO_RENORM_MESSAGE`).
    """
    if has_batch_renorm(model):
        raise ValueError(NO_RENORM_MESSAGE)
    network = torch_mirror(model, torch)
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
