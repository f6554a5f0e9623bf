"""The end-to-end rows of ``bnrs bench``: training and inference of one network.

A :class:`Network` is an architecture string with its input shape, number of classes and
batch size; :data:`NETWORKS` are the named ones (``--network``), LeNetBN the default, and
``--architecture`` times the user's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import nn, optim
from ..training import batch_bounds, eval_logits, train_epoch
from .torch_mirror import build_torch_network, torch_train_epoch
from .workloads import GFLOPS, Mode, Work


#: The network of the end-to-end items ("LeNetBN"), on 1x28x28 inputs with 10 classes.
ARCHITECTURE = "c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5"
INPUT_SHAPE = (1, 28, 28)
N_CLASSES = 10


@dataclass(frozen=True)
class Network:
    """A network to time: ``from_spec(architecture, input_shape, n_classes)``.

    ``key`` prefixes its rows' keys (LeNetBN's have none, as before the other networks);
    ``min_ratio`` is the speed-ratio target of its rows (None: no target, as for a user's
    network). The batch size is the run mode's (``--batch-size`` sets it).
    """

    name: str
    key: str
    architecture: str
    input_shape: tuple[int, ...] = INPUT_SHAPE
    n_classes: int = N_CLASSES
    min_ratio: float | None = None

    def build(self, seed: int = 0) -> nn.Sequential:
        return nn.from_spec(self.architecture, self.input_shape, self.n_classes,
                            random_state=seed)

    def make_data(self, n_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Synthetic float32 inputs of ``input_shape`` and int64 labels in [0, n_classes)."""
        return make_data(n_samples, seed, self.input_shape, self.n_classes)


#: The named networks of ``--network``, each about 2-5 MFLOP per sample on 1x28x28
#: (Fashion-MNIST-sized) inputs: LeNetBN, a small Inception net (two Inception blocks
#: after a conv stem) and a small ResNet (three BasicBlocks, the last two halving the
#: size), both ending in global average pooling.
NETWORKS = {
    "lenet": Network("LeNetBN", "", ARCHITECTURE, min_ratio=1.5),
    "inception": Network("Inception", "inception_",
                         "c16-bn-relu-mp2-inc8_8_16_4_8_8-inc16_16_32_8_16_16-mp2-gap"),
    "resnet": Network("ResNet", "resnet_", "c16-bn-relu-mp2-res16-res32s2-res64s2-gap"),
}
LENET = NETWORKS["lenet"]


def make_data(n_samples: int, seed: int = 0, input_shape=INPUT_SHAPE,
              n_classes: int = N_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic float32 inputs (1x28x28 by default) and int64 labels in [0, n_classes)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_samples, *input_shape), dtype=np.float32)
    return images, rng.integers(0, n_classes, size=n_samples, dtype=np.int64)


def build_bnrs_network(seed: int = 0) -> nn.Sequential:
    """LeNetBN."""
    return LENET.build(seed)


def _layer_flops(layer: nn.Module, shape: tuple[int, ...],
                 first: bool) -> tuple[float, float, tuple[int, ...]]:
    """(forward, backward, output shape) of ``layer`` on one sample of ``shape``;
    ``first``: nothing before it needs an input gradient (so it computes none)."""
    output_shape = tuple(layer.output_shape(shape))
    if isinstance(layer, nn.Sequential):
        forward = backward = 0.0
        for child in layer:
            child_forward, child_backward, shape = _layer_flops(child, shape, first)
            forward, backward = forward + child_forward, backward + child_backward
            first = first and child_forward == 0.0
        return forward, backward, output_shape
    if isinstance(layer, (nn.Concat, nn.Residual)):
        parts = (layer.branches if isinstance(layer, nn.Concat)
                 else [p for p in (layer.body, layer.shortcut) if p is not None])
        totals = [_layer_flops(part, shape, first)[:2] for part in parts]
        return (sum(t[0] for t in totals), sum(t[1] for t in totals), output_shape)
    if isinstance(layer, nn.Conv2d):
        flops = 2.0 * math.prod(output_shape) * layer.in_channels // layer.groups * math.prod(
            layer.kernel_size)
    elif isinstance(layer, nn.Linear):
        flops = 2.0 * layer.in_features * layer.out_features
    else:
        flops = 0.0
    # The weight gradient costs one forward, the input gradient another.
    return flops, flops if first else 2 * flops, output_shape


def network_flops(model: nn.Sequential, input_shape=INPUT_SHAPE) -> tuple[float, float]:
    """FLOPs per sample of the conv and linear layers: (inference, training step).

    A training step is the forward plus, per layer, the weight gradient (one forward's
    worth) and the input gradient (another), except for the input gradient of the layers
    that see the input first, which a training loop skips. Inside a block every branch
    counts. Batch norm, activations, pooling and the optimizer are not counted (they are
    memory-bound).
    """
    forward, backward, _ = _layer_flops(model, tuple(input_shape), True)
    return forward, forward + backward


class Trainer:
    """One network in both frameworks, with the same initial weights, data and optimizer."""

    def __init__(self, mode: Mode, torch, network: Network = LENET):
        self.mode, self.torch, self.network = mode, torch, network
        self.images, self.labels = network.make_data(mode.train_samples)
        self.model = network.build()
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = optim.Adam(self.model.parameters(), lr=1e-3)
        if torch is not None:
            self.torch_model = build_torch_network(self.model, torch)
            self.torch_optimizer = torch.optim.Adam(self.torch_model.parameters(), lr=1e-3)
            self.torch_images = torch.from_numpy(self.images)
            self.torch_labels = torch.from_numpy(self.labels)

    def _train_bounds(self, limit: int | None = None) -> list[tuple[int, int]]:
        """The epoch's batches (the last may be shorter), or its first ``limit``."""
        return batch_bounds(len(self.images), self.mode.batch_size, last="keep")[:limit]

    def _inference_samples(self, limit: int | None = None) -> int:
        """The samples of the inference passes, or of their first ``limit`` batches."""
        n = min(len(self.images), self.mode.infer_batches * self.mode.infer_batch_size)
        return n if limit is None else min(n, limit * self.mode.infer_batch_size)

    def bnrs_epoch(self, limit: int | None = None,
                   mark: Callable[[str], None] | None = None) -> None:
        train_epoch(self.model, self.criterion, self.optimizer, self.images, self.labels,
                    self._train_bounds(limit), mark=mark)

    def torch_epoch(self, limit: int | None = None) -> None:
        torch_train_epoch(self.torch_model, self.torch_optimizer, self.torch_images,
                          self.torch_labels, self._train_bounds(limit), self.torch)

    def bnrs_inference(self, limit: int | None = None) -> None:
        for _ in eval_logits(self.model, self.images[:self._inference_samples(limit)],
                             self.mode.infer_batch_size):
            pass

    def torch_inference(self, limit: int | None = None) -> None:
        self.torch_model.eval()
        with self.torch.no_grad():
            for start, stop in batch_bounds(self._inference_samples(limit),
                                            self.mode.infer_batch_size, last="keep"):
                self.torch_model(self.torch_images[start:stop])

    def works(self) -> list[Work]:
        """The inference and training-epoch rows (warm-ups: one batch, a few steps)."""
        mode, network, has_torch = self.mode, self.network, self.torch is not None
        inference_flops, train_flops = network_flops(self.model, network.input_shape)
        n_infer = self._inference_samples()
        n_train = len(self.images)
        shape = "x".join(map(str, network.input_shape))
        prefix = network.key
        return [
            Work(f"{prefix}inference", f"{network.name} inference, {mode.infer_batches} x "
                 f"{mode.infer_batch_size}, eval", inference_flops * n_infer, GFLOPS,
                 self.bnrs_inference, self.torch_inference if has_torch else None,
                 network.min_ratio, samples=n_infer, warm_bnrs=lambda: self.bnrs_inference(1),
                 warm_torch=lambda: self.torch_inference(1)),
            Work(f"{prefix}train_epoch", f"{network.name} train epoch, {n_train} x {shape}, "
                 f"batch {mode.batch_size}, Adam", train_flops * n_train, GFLOPS,
                 self.bnrs_epoch, self.torch_epoch if has_torch else None, network.min_ratio,
                 samples=n_train, warm_bnrs=lambda: self.bnrs_epoch(5),
                 warm_torch=lambda: self.torch_epoch(5),
                 # The thread-scaling target of a training epoch is LeNetBN's, on
                 # its own inputs: the network that has speed targets.
                 scaling=network.min_ratio is not None),
        ]
