"""The end-to-end rows of ``bnrs bench``: training and inference of LeNetBN."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .. import nn, optim
from ..training import batch_bounds, eval_logits, train_epoch
from .torch_mirror import build_torch_network, torch_train_epoch
from .workloads import GFLOPS, Mode, Work


#: The network of the end-to-end items ("LeNetBN"), on 1x28x28 inputs with 10 classes.
ARCHITECTURE = "c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5"
INPUT_SHAPE = (1, 28, 28)
N_CLASSES = 10


def make_data(n_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 1x28x28 float32 images and int64 labels in [0, 10)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_samples, *INPUT_SHAPE), dtype=np.float32)
    return images, rng.integers(0, N_CLASSES, size=n_samples, dtype=np.int64)


def build_bnrs_network(seed: int = 0) -> nn.Sequential:
    return nn.from_spec(ARCHITECTURE, INPUT_SHAPE, N_CLASSES, random_state=seed)


def network_flops(model: nn.Sequential, input_shape=INPUT_SHAPE) -> tuple[float, float]:
    """FLOPs per sample of the conv and linear layers: (inference, training step).

    A training step is the forward plus, per layer, the weight gradient (one forward's
    worth) and the input gradient (another), except for the first layer's input gradient,
    which a training loop skips. Batch norm, activations, pooling and the optimizer are not
    counted (they are memory-bound).
    """
    shape = tuple(input_shape)
    forward = backward = 0.0
    for layer in model:
        output_shape = layer.output_shape(shape)
        if isinstance(layer, nn.Conv2d):
            flops = 2.0 * math.prod(output_shape) * layer.in_channels * math.prod(
                layer.kernel_size)
        elif isinstance(layer, nn.Linear):
            flops = 2.0 * layer.in_features * layer.out_features
        else:
            flops = 0.0
        backward += flops if forward == 0.0 else 2 * flops
        forward += flops
        shape = output_shape
    return forward, forward + backward


class Trainer:
    """One network in both frameworks, with the same initial weights, data and optimizer."""

    def __init__(self, mode: Mode, torch):
        self.mode, self.torch = mode, torch
        self.images, self.labels = make_data(mode.train_samples)
        self.model = build_bnrs_network()
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
        mode, has_torch = self.mode, self.torch is not None
        inference_flops, train_flops = network_flops(self.model)
        n_infer = self._inference_samples()
        n_train = len(self.images)
        return [
            Work("inference", f"LeNetBN inference, {mode.infer_batches} x "
                 f"{mode.infer_batch_size}, eval", inference_flops * n_infer, GFLOPS,
                 self.bnrs_inference, self.torch_inference if has_torch else None, 1.5,
                 samples=n_infer, warm_bnrs=lambda: self.bnrs_inference(1),
                 warm_torch=lambda: self.torch_inference(1)),
            Work("train_epoch", f"LeNetBN train epoch, {n_train} x 1x28x28, "
                 f"batch {mode.batch_size}, Adam", train_flops * n_train, GFLOPS,
                 self.bnrs_epoch, self.torch_epoch if has_torch else None, 1.5,
                 samples=n_train, warm_bnrs=lambda: self.bnrs_epoch(5),
                 warm_torch=lambda: self.torch_epoch(5)),
        ]
