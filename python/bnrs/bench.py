"""``bnrs bench``: bnrs against PyTorch on the kernels, a training epoch and inference.

Each work item runs in bnrs and, when PyTorch is importable, in PyTorch in the same process
on the same arrays (``torch.from_numpy``): both are warmed up, then their repeats alternate
(bnrs, torch, torch, bnrs, ...), at each thread count. A row gives the medians and
interquartile ranges, the speed ratio torch time / bnrs time (above 1: bnrs is faster), the
bnrs rate (GFLOP/s for conv, linear and the whole network, GB/s for the memory-bound
kernels) and that rate as a fraction of the machine's peak, measured here: the FMA
throughput of one core at the SIMD level in use (``bnrs._core.fma_peak_gflops``: AVX-512
where the CPU has it, unless ``BNRS_SIMD`` lowers it) times the threads, and the
bandwidth of a large NumPy copy on that many threads. The peak resident memory of a training
epoch is measured in a fresh process per framework.

PyTorch is never a dependency of bnrs: install it beside bnrs in a separate virtual
environment to compare (docs/benchmark.md). Without it the bench runs bnrs alone.

Usage::

    python -m bnrs.bench [--quick] [--threads 1 2] [--json FILE] [--plot FILE] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from . import _core, nn, optim
from . import functional as F

__all__ = ["main"]

NO_TORCH_MESSAGE = ("PyTorch is not installed in this environment (pip install torch in a "
                    "separate virtual environment to compare); showing bnrs alone")
TORCH_DISABLED_MESSAGE = "PyTorch comparison disabled (--no-torch); showing bnrs alone"

#: The network of the end-to-end items ("LeNetBN"), on 1x28x28 inputs with 10 classes.
ARCHITECTURE = "c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5"
INPUT_SHAPE = (1, 28, 28)
N_CLASSES = 10

GFLOPS = "GFLOP/s"
GBPS = "GB/s"
MIB = 2**20
#: A kernel sample repeats the call at most this often to reach ``min_sample_seconds``.
MAX_CALLS_PER_SAMPLE = 1000


@dataclass(frozen=True)
class Mode:
    """The sizes and repeat counts of one run of the bench."""

    name: str
    kernel_batch: int           # N of the 64-sample kernel shapes (the large conv uses half)
    train_samples: int          # one training epoch
    batch_size: int
    infer_batches: int
    infer_batch_size: int
    kernel_repeats: int
    epoch_repeats: int          # training epochs and inference passes
    min_sample_seconds: float   # a kernel sample repeats the call until it takes this long
    settle_seconds: float       # pause before each sample, so the other thread pool sleeps
    peak_seconds: float         # per FMA-peak measurement
    copy_bytes: int             # the array copied to measure the memory bandwidth
    profile_batches: int        # training steps under PyTorch's profiler (--profile)
    memory_batches: int | None   # steps of the peak-memory run (None: the whole epoch)
    memory_all_threads: bool    # peak memory at every thread count, or only at the last


MODES = {
    "full": Mode("full", 64, 10_000, 64, 10, 1000, 15, 5, 0.02, 0.002, 0.1, 256 * MIB, 40,
                 None, True),
    # The memory peak is reached in the first steps (Adam's state is made at the first).
    "quick": Mode("quick", 64, 2_000, 64, 2, 1000, 3, 3, 0.005, 0.001, 0.05, 64 * MIB, 10,
                  10, False),
    # Tiny shapes and one repeat: checks that everything runs (the tests), measures nothing.
    "smoke": Mode("smoke", 2, 64, 64, 1, 32, 1, 1, 0.0, 0.0, 0.01, 4 * MIB, 2, None, False),
}


# --------------------------------------------------------------------------- work items


@dataclass
class Work:
    """One row: the same computation in bnrs and (optionally) PyTorch, and its targets.

    ``amount`` is the FLOPs (unit GFLOP/s) or the bytes moved (unit GB/s) of one call.
    ``min_ratio`` is the target speed ratio torch/bnrs, ``min_peak`` the target fraction of
    the machine peak at 1 thread, ``scaling`` whether the multi-thread speed-up is a target.
    End-to-end items set ``samples`` (per call) and their own warm-ups.
    """

    key: str
    name: str
    amount: float
    unit: str
    run_bnrs: Callable[[], Any]
    run_torch: Callable[[], Any] | None
    min_ratio: float | None = None
    min_peak: float | None = None
    scaling: bool = False
    samples: int = 0
    warm_bnrs: Callable[[], Any] | None = None
    warm_torch: Callable[[], Any] | None = None


def _standard_normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _tensors(torch, *arrays):
    """PyTorch views of the arrays (no copy), or Nones without PyTorch."""
    return tuple(None if torch is None else torch.from_numpy(a) for a in arrays)


def conv_works(rng, torch, n: int, c_in: int, size: int, c_out: int, key: str,
               input_grad: bool = True, min_ratio: float | None = None,
               min_peak: float | None = None, scaling: bool = False) -> list[Work]:
    """Forward and backward of a 3x3, padding-1 convolution with bias."""
    x = _standard_normal(rng, n, c_in, size, size)
    weight = _standard_normal(rng, c_out, c_in, 3, 3)
    bias = _standard_normal(rng, c_out)
    grad_output = _standard_normal(rng, n, c_out, size, size)
    tx, tweight, tbias, tgrad = _tensors(torch, x, weight, bias, grad_output)
    flops = 2.0 * n * c_out * size * size * c_in * 9
    name = f"conv {n}x{c_in}x{size}x{size}->{c_out} k3p1"

    def torch_forward():
        return torch.nn.functional.conv2d(tx, tweight, tbias, padding=1)

    def torch_backward():
        return torch.ops.aten.convolution_backward(
            tgrad, tx, tweight, [c_out], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [input_grad, True, True])

    has_torch = torch is not None
    return [
        Work(f"{key}_fwd", f"{name} fwd", flops, GFLOPS,
             lambda: F.conv2d(x, weight, bias, padding=1),
             torch_forward if has_torch else None, min_ratio, min_peak, scaling),
        # The weight gradient costs one forward, the input gradient another.
        Work(f"{key}_bwd", f"{name} bwd" + ("" if input_grad else " (no grad_input)"),
             flops * (2 if input_grad else 1), GFLOPS,
             lambda: F.conv2d_backward(grad_output, x, weight, padding=1,
                                       input_grad=input_grad),
             torch_backward if has_torch else None, min_ratio, None, scaling),
    ]


def memory_bound_works(rng, torch, n: int) -> list[Work]:
    """Batch norm, dropout and pooling on a (n, 32, 28, 28) activation.

    Bytes count each input read once and each output written once (the int64 max-pool
    indices included); a kernel that reads twice runs below its GB/s.
    """
    x = _standard_normal(rng, n, 32, 28, 28)
    grad = _standard_normal(rng, n, 32, 28, 28)
    pooled_grad = _standard_normal(rng, n, 32, 14, 14)
    gamma, beta = np.ones(32, np.float32), np.zeros(32, np.float32)
    running_mean, running_var = np.zeros(32, np.float32), np.ones(32, np.float32)
    _, save_mean, save_invstd = F.native_batch_norm(x, gamma, beta, training=True)
    size, pooled = x.nbytes, pooled_grad.nbytes
    shape = f"{n}x32x28x28"
    # PyTorch's own buffers: running statistics are updated in place by both frameworks.
    t = _tensors(torch, x, grad, pooled_grad, gamma, beta, running_mean.copy(),
                 running_var.copy(), save_mean, save_invstd)
    tx, tgrad, tpooled_grad, tgamma, tbeta, tmean, tvar, tsave_mean, tsave_invstd = t
    aten: Any = None if torch is None else torch.ops.aten
    # CPU PyTorch's dropout multiplies by a float noise tensor; its backward does the same.
    tnoise = None if torch is None else torch.empty_like(tx).bernoulli_(0.5).div_(0.5)

    def bnrs_max_pool_step():
        _, indices = F.max_pool2d(x, 2, return_indices=True)
        return F.max_pool2d_backward(pooled_grad, indices, x.shape)

    def torch_max_pool_step():
        _, indices = aten.max_pool2d_with_indices(tx, [2, 2], [2, 2])
        return aten.max_pool2d_with_indices_backward(tpooled_grad, tx, [2, 2], [2, 2], [0, 0],
                                                     [1, 1], False, indices)

    def bnrs_avg_pool_step():
        F.avg_pool2d(x, 2)
        return F.avg_pool2d_backward(pooled_grad, x.shape, 2)

    def torch_avg_pool_step():
        torch.nn.functional.avg_pool2d(tx, 2)
        return aten.avg_pool2d_backward(tpooled_grad, tx, [2, 2], [2, 2], [0, 0], False, True,
                                        None)

    cases = [
        ("bn_train_fwd", f"BN2d {shape} train fwd", 2 * size,
         lambda: F.native_batch_norm(x, gamma, beta, running_mean, running_var, training=True),
         lambda: aten.native_batch_norm(tx, tgamma, tbeta, tmean, tvar, True, 0.1, 1e-5), 2.0),
        ("bn_eval_fwd", f"BN2d {shape} eval fwd", 2 * size,
         lambda: F.batch_norm(x, running_mean, running_var, gamma, beta, training=False),
         lambda: aten.native_batch_norm(tx, tgamma, tbeta, tmean, tvar, False, 0.1, 1e-5),
         None),
        ("bn_bwd", f"BN2d {shape} train bwd", 3 * size,
         lambda: F.batch_norm_backward(grad, x, gamma, save_mean, save_invstd),
         lambda: aten.native_batch_norm_backward(tgrad, tx, tgamma, tmean, tvar, tsave_mean,
                                                 tsave_invstd, True, 1e-5, [True] * 3), None),
        ("dropout_fwd", f"dropout p=0.5 {shape} fwd", 2 * size,
         lambda: F.dropout(x, 0.5, seed=1),
         lambda: torch.nn.functional.dropout(tx, 0.5, training=True), 10.0),
        ("dropout_bwd", f"dropout p=0.5 {shape} bwd", 2 * size,
         lambda: F.dropout_backward(grad, 0.5, seed=1), lambda: tgrad * tnoise, None),
        ("maxpool_fwd", f"max-pool 2x2 {shape} fwd", size + 3 * pooled,
         lambda: F.max_pool2d(x, 2, return_indices=True),
         lambda: aten.max_pool2d_with_indices(tx, [2, 2], [2, 2]), 3.0),
        ("maxpool_fwdbwd", f"max-pool 2x2 {shape} fwd+bwd", 2 * size + 6 * pooled,
         bnrs_max_pool_step, torch_max_pool_step, 3.0),
        ("avgpool_fwd", f"avg-pool 2x2 {shape} fwd", size + pooled,
         lambda: F.avg_pool2d(x, 2), lambda: torch.nn.functional.avg_pool2d(tx, 2), 1.5),
        ("avgpool_fwdbwd", f"avg-pool 2x2 {shape} fwd+bwd", 2 * size + 2 * pooled,
         bnrs_avg_pool_step, torch_avg_pool_step, 1.5),
    ]
    # Every memory-bound item except the dropout backward has the scaling target.
    return [Work(key, name, float(amount), GBPS, run_bnrs,
                 run_torch if torch is not None else None, min_ratio,
                 scaling=key != "dropout_bwd")
            for key, name, amount, run_bnrs, run_torch, min_ratio in cases]


def linear_works(rng, torch, n: int) -> list[Work]:
    """The hidden layer of the network: (n, 1568) -> 128."""
    x = _standard_normal(rng, n, 1568)
    weight = _standard_normal(rng, 128, 1568)
    bias = _standard_normal(rng, 128)
    grad_output = _standard_normal(rng, n, 128)
    tx, tweight, tbias, tgrad = _tensors(torch, x, weight, bias, grad_output)
    flops = 2.0 * n * 1568 * 128
    has_torch = torch is not None
    return [
        Work("linear_fwd", f"linear {n}x1568->128 fwd", flops, GFLOPS,
             lambda: F.linear(x, weight, bias),
             (lambda: torch.nn.functional.linear(tx, tweight, tbias)) if has_torch else None),
        # What autograd runs for addmm: grad_input, grad_weight, grad_bias.
        Work("linear_bwd", f"linear {n}x1568->128 bwd", 2 * flops, GFLOPS,
             lambda: F.linear_backward(grad_output, x, weight),
             (lambda: (tgrad.mm(tweight), tgrad.t().mm(tx), tgrad.sum(0)))
             if has_torch else None),
    ]


def kernel_works(mode: Mode, torch) -> list[Work]:
    """The kernel rows, built on fixed-seed data shared by both frameworks."""
    rng = np.random.default_rng(0)
    n = mode.kernel_batch
    return [
        *conv_works(rng, torch, n, 1, 28, 16, "conv_first", input_grad=False, min_ratio=1.5),
        *conv_works(rng, torch, n, 16, 28, 32, "conv_second"),
        # LeNetBN's second conv, the largest part of its training step.
        *conv_works(rng, torch, n, 16, 14, 32, "conv_lenet2"),
        *conv_works(rng, torch, max(n // 2, 1), 64, 32, 64, "conv_large", min_ratio=0.9,
                    min_peak=0.8, scaling=True),
        *memory_bound_works(rng, torch, n),
        *linear_works(rng, torch, n),
    ]


# --------------------------------------------------------------------------- the network


def make_data(n_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 1x28x28 float32 images and int64 labels in [0, 10)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_samples, *INPUT_SHAPE), dtype=np.float32)
    return images, rng.integers(0, N_CLASSES, size=n_samples, dtype=np.int64)


def build_bnrs_network(seed: int = 0) -> nn.Sequential:
    return nn.from_spec(ARCHITECTURE, INPUT_SHAPE, N_CLASSES, random_state=seed)


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


def _no_mark(stage: str) -> None:
    """The default ``mark`` of :func:`bnrs_train_step`: no instrumentation."""


def _nothing() -> None:
    """The default ``prepare`` of :func:`measure`."""


def bnrs_train_step(model, criterion, optimizer, inputs, targets, mark=_no_mark) -> None:
    """One training step; ``mark(stage)`` is called as each stage ends (for --profile)."""
    model.train()
    optimizer.zero_grad()
    mark("zero_grad")
    logits = model(inputs)
    mark("forward")
    criterion(logits, targets)
    grad_logits = criterion.backward()
    mark("loss fwd+bwd")
    model.backward(grad_logits, input_grad=False)
    mark("backward")
    optimizer.step()
    mark("optimizer step")


def torch_train_step(model, optimizer, inputs, targets, torch) -> None:
    model.train()
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()


def _batches(n_samples: int, batch_size: int, limit: int | None = None):
    starts = range(0, n_samples, batch_size)
    for start in starts if limit is None else starts[:limit]:
        yield slice(start, start + batch_size)


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

    def bnrs_epoch(self, limit: int | None = None, mark=_no_mark) -> None:
        for batch in _batches(len(self.images), self.mode.batch_size, limit):
            bnrs_train_step(self.model, self.criterion, self.optimizer, self.images[batch],
                            self.labels[batch], mark)

    def torch_epoch(self, limit: int | None = None) -> None:
        for batch in _batches(len(self.images), self.mode.batch_size, limit):
            torch_train_step(self.torch_model, self.torch_optimizer, self.torch_images[batch],
                             self.torch_labels[batch], self.torch)

    def _inference_batches(self, limit: int | None = None):
        n = min(len(self.images), self.mode.infer_batches * self.mode.infer_batch_size)
        return _batches(n, self.mode.infer_batch_size, limit)

    def bnrs_inference(self, limit: int | None = None) -> None:
        self.model.eval()
        for batch in self._inference_batches(limit):
            self.model(self.images[batch])
        self.model.clear_saved()

    def torch_inference(self, limit: int | None = None) -> None:
        self.torch_model.eval()
        with self.torch.no_grad():
            for batch in self._inference_batches(limit):
                self.torch_model(self.torch_images[batch])

    def works(self) -> list[Work]:
        """The inference and training-epoch rows (warm-ups: one batch, a few steps)."""
        mode, has_torch = self.mode, self.torch is not None
        inference_flops, train_flops = network_flops(self.model)
        n_infer = min(len(self.images), mode.infer_batches * mode.infer_batch_size)
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


# --------------------------------------------------------------------------- measuring


class Timings(NamedTuple):
    """What :func:`measure` found for each run."""

    samples: list[list[float]]  # seconds per call, one per repeat
    cores: list[float]          # process CPU time / wall time while it ran: cores it got


def measure(runs: Sequence[Callable[[], Any]], warmups: Sequence[Callable[[], Any]],
            repeats: int, min_sample_seconds: float, settle_seconds: float,
            prepare: Sequence[Callable[[], Any]] | None = None) -> Timings:
    """Seconds per call of each run: ``repeats`` samples each, interleaved.

    ``prepare[i]``, if given, is called before run i's warm-up and before each of its
    samples, outside the timer (to set its thread count).

    Each run is warmed up (pages touched, thread pools started, allocator caches filled) by
    its warm-up and the calibration call, then the runs take turns, in reverse order every
    other repeat, with Python's cycle collector paused (the caller collects beforehand).
    A sample repeats the call until it lasts ``min_sample_seconds`` (calibrated on one
    call; 0 means one call and no calibration), so that short kernels are not lost in the
    timer's resolution.
    """
    prepare = prepare or [_nothing] * len(runs)
    calls = []
    for run, warmup, setup in zip(runs, warmups, prepare):
        setup()
        warmup()
        if min_sample_seconds > 0:
            start = time.perf_counter()
            run()
            once = max(time.perf_counter() - start, 1e-9)
            calls.append(max(1, min(MAX_CALLS_PER_SAMPLE,
                                    math.ceil(min_sample_seconds / once))))
        else:
            calls.append(1)
    samples: list[list[float]] = [[] for _ in runs]
    cpu_seconds = [0.0] * len(runs)
    wall_seconds = [0.0] * len(runs)
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for repeat in range(repeats):
            order = range(len(runs)) if repeat % 2 == 0 else range(len(runs) - 1, -1, -1)
            for index in order:
                prepare[index]()
                if settle_seconds:
                    time.sleep(settle_seconds)
                run, count = runs[index], calls[index]
                cpu_start, start = time.process_time(), time.perf_counter()
                for _ in range(count):
                    run()
                wall = time.perf_counter() - start
                cpu_seconds[index] += time.process_time() - cpu_start
                wall_seconds[index] += wall
                samples[index].append(wall / count)
    finally:
        if gc_enabled:
            gc.enable()
    return Timings(samples, [cpu / max(wall, 1e-9)
                             for cpu, wall in zip(cpu_seconds, wall_seconds)])


def spread(samples: Sequence[float]) -> dict:
    """Median, quartiles and extremes of a list of samples (seconds or ratios)."""
    values = np.asarray(samples, dtype=np.float64)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3),
            "min": float(values.min()), "max": float(values.max()),
            "samples": [float(v) for v in values]}


@dataclass
class Peaks:
    """The machine's measured peaks."""

    fma_gflops_1t: float
    fma_gflops_concurrent: dict[int, float] = field(default_factory=dict)
    copy_gbps: dict[int, float] = field(default_factory=dict)

    def of(self, unit: str, threads: int) -> float:
        """The peak a ``unit`` rate at ``threads`` is quoted against: the FMA peak of one
        core times ``threads``, or the best copy bandwidth on at most ``threads`` threads
        (more threads never have to be slower)."""
        if unit == GFLOPS:
            return self.fma_gflops_1t * threads
        return max(gbps for n, gbps in self.copy_gbps.items() if n <= threads)


def copy_bandwidth_gbps(n_threads: int, n_bytes: int, repeats: int = 5) -> float:
    """Best GB/s (bytes read + written) of ``np.copyto`` split over ``n_threads`` threads."""
    source = np.ones(n_bytes // 4, dtype=np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)  # touch every page
    bounds = np.linspace(0, source.size, n_threads + 1).astype(int)
    parts = [(target[lo:hi], source[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    best = math.inf
    with ThreadPoolExecutor(n_threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda part: np.copyto(*part), parts))  # NumPy frees the GIL
            best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best / 1e9


def measure_peaks(thread_counts: Sequence[int], mode: Mode) -> Peaks:
    """FMA peak of one core (best of 10), and per thread count the concurrent FMA rate and
    the copy bandwidth."""
    # Many short trials: on a shared machine some fall in a window without preemption.
    peaks = Peaks(max(_core.fma_peak_gflops(mode.peak_seconds) for _ in range(10)))
    for n in sorted(set(thread_counts)):
        with ThreadPoolExecutor(n) as pool:
            rates = list(pool.map(_core.fma_peak_gflops, [mode.peak_seconds] * n))
        peaks.fma_gflops_concurrent[n] = float(sum(rates))
        peaks.copy_gbps[n] = copy_bandwidth_gbps(n, mode.copy_bytes)
    return peaks


def measure_row(work: Work, threads: int, mode: Mode, peaks: Peaks) -> dict:
    """Time one work item in both frameworks and evaluate its targets at ``threads``."""
    end_to_end = work.samples > 0
    runs, warmups = [work.run_bnrs], [work.warm_bnrs or work.run_bnrs]
    if work.run_torch is not None:
        runs.append(work.run_torch)
        warmups.append(work.warm_torch or work.run_torch)
    samples, cores = measure(
        runs, warmups, mode.epoch_repeats if end_to_end else mode.kernel_repeats,
        0.0 if end_to_end else mode.min_sample_seconds, mode.settle_seconds)
    bnrs_time = spread(samples[0])
    row = {"key": work.key, "name": work.name, "threads": threads, "unit": work.unit,
           "amount": work.amount, "bnrs_s": bnrs_time, "torch_s": None, "ratio": None,
           "paired_ratio": None, "rate": work.amount / bnrs_time["median"] / 1e9,
           "torch_rate": None, "samples": work.samples or None, "cores": cores,
           "targets": []}
    row["peak_fraction"] = row["rate"] / peaks.of(work.unit, threads)
    if work.run_torch is not None:
        torch_time = spread(samples[1])
        row["torch_s"] = torch_time
        row["ratio"] = torch_time["median"] / bnrs_time["median"]
        row["paired_ratio"] = spread([t / b for b, t in zip(samples[0], samples[1])])
        row["torch_rate"] = work.amount / torch_time["median"] / 1e9
    if work.min_ratio is not None:
        row["targets"].append(_target("speed ratio torch/bnrs", work.min_ratio, row["ratio"]))
    if work.min_peak is not None and threads == 1:
        row["targets"].append(_target("fraction of peak", work.min_peak, row["peak_fraction"]))
    return row


def _target(kind: str, minimum: float, measured: float | None) -> dict:
    """A target ``measured >= minimum``; unmeasured (None) when PyTorch is missing."""
    return {"kind": kind, "target": minimum, "measured": measured,
            "met": None if measured is None else bool(measured >= minimum)}


# --------------------------------------------------------------------------- peak memory


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False if unable."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int:
    """This process's peak resident set size in KiB.

    ``VmHWM`` where /proc has it: unlike ``ru_maxrss``, which after fork + exec starts from
    the parent's peak (a bench process holding PyTorch is over 1 GB), it covers only this
    process's own address space, and :func:`_reset_peak_rss` resets it.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def rss_child(framework: str, mode: Mode, threads: int) -> dict:
    """Peak RSS of one training epoch in this (fresh) process, above the baseline after the
    imports and the data; printed as JSON by ``--rss-child``."""
    _core.set_num_threads(threads)
    images, labels = make_data(mode.train_samples)
    torch, torch_missing = import_torch(disabled=framework != "torch")
    if framework == "torch":
        if torch is None:
            raise SystemExit(torch_missing)
        torch.set_num_threads(threads)
    # After a reset the baseline is the current RSS, not the high-water mark of the imports.
    reset = _reset_peak_rss()
    baseline_kib = _peak_rss_kib()
    steps = len(list(_batches(len(images), mode.batch_size, mode.memory_batches)))
    model = build_bnrs_network()
    if torch is None:
        criterion, optimizer = nn.CrossEntropyLoss(), optim.Adam(model.parameters(), lr=1e-3)
        for batch in _batches(len(images), mode.batch_size, mode.memory_batches):
            bnrs_train_step(model, criterion, optimizer, images[batch], labels[batch])
    else:
        torch_model = build_torch_network(model, torch)
        del model
        optimizer = torch.optim.Adam(torch_model.parameters(), lr=1e-3)
        torch_images, torch_labels = torch.from_numpy(images), torch.from_numpy(labels)
        for batch in _batches(len(images), mode.batch_size, mode.memory_batches):
            torch_train_step(torch_model, optimizer, torch_images[batch], torch_labels[batch],
                             torch)
    peak_kib = _peak_rss_kib()
    return {"framework": framework, "threads": threads, "steps": steps,
            "baseline_kib": baseline_kib,
            "peak_kib": peak_kib, "epoch_kib": peak_kib - baseline_kib,
            "baseline_is_current_rss": reset}


def measure_memory(frameworks: Sequence[str], mode: Mode, threads: int) -> dict:
    """Run :func:`rss_child` for each framework in a fresh interpreter."""
    result: dict[str, Any] = {}
    for framework in frameworks:
        command = [sys.executable, "-m", "bnrs.bench", "--rss-child", framework,
                   "--threads", str(threads)] + ([] if mode.name == "full" else [f"--{mode.name}"])
        done = subprocess.run(command, check=False, capture_output=True, text=True,
                              timeout=1800)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            result[framework] = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            result[framework] = json.loads(lines[-1])
    bnrs_kib = result["bnrs"].get("epoch_kib")
    torch_kib = result.get("torch", {}).get("epoch_kib")
    ratio = torch_kib / bnrs_kib if bnrs_kib and torch_kib is not None else None
    result["ratio"] = ratio
    result["targets"] = [_target("peak RSS torch/bnrs", 1.0, ratio)]
    return result


# --------------------------------------------------------------------------- profile


class LayerTimer:
    """Adds up the time of each layer's forward and backward in a bnrs Sequential.

    The layers' bound methods are shadowed by timing wrappers (instance attributes) until
    :meth:`remove`.
    """

    def __init__(self, model: nn.Sequential):
        self.model = model
        self.seconds: dict[tuple[int, str], float] = defaultdict(float)
        self.labels: dict[int, str] = {}
        for index, layer in enumerate(model):
            for method in ("forward", "backward"):
                setattr(layer, method, self._timed(index, layer, method))

    def _timed(self, index: int, layer, method: str):
        inner = getattr(layer, method)

        def timed(data, *args, **kwargs):
            if index not in self.labels:
                shape = "x".join(str(d) for d in np.shape(data))
                self.labels[index] = f"{index:2d} {type(layer).__name__} {shape}"
            start = time.perf_counter()
            result = inner(data, *args, **kwargs)
            self.seconds[index, method] += time.perf_counter() - start
            return result

        return timed

    def remove(self) -> None:
        for layer in self.model:
            del layer.forward, layer.backward


def profile_bnrs(trainer: Trainer) -> dict:
    """Per-layer and per-stage time of one bnrs training epoch, in ms per batch."""
    stages: dict[str, float] = defaultdict(float)
    clock = [0.0]

    def mark(stage: str) -> None:
        now = time.perf_counter()
        stages[stage] += now - clock[0]
        clock[0] = now

    timer = LayerTimer(trainer.model)
    try:
        trainer.bnrs_epoch(5)  # warm-up
        timer.seconds.clear()
        stages.clear()
        clock[0] = time.perf_counter()
        trainer.bnrs_epoch(mark=mark)
    finally:
        timer.remove()
    n_batches = math.ceil(len(trainer.images) / trainer.mode.batch_size)
    per_batch = 1e3 / n_batches
    layers = [{"layer": timer.labels[index],
               "forward_ms": timer.seconds[index, "forward"] * per_batch,
               "backward_ms": timer.seconds[index, "backward"] * per_batch}
              for index in sorted(timer.labels)]
    return {"batches": n_batches, "layers": layers,
            "stages_ms": {stage: seconds * per_batch for stage, seconds in stages.items()}}


def profile_torch(trainer: Trainer, top: int = 15) -> dict:
    """PyTorch's profiler over some training steps: the ops with the most self CPU time."""
    torch = trainer.torch
    n_batches = min(trainer.mode.profile_batches,
                    math.ceil(len(trainer.images) / trainer.mode.batch_size))
    trainer.torch_epoch(5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as profiler:
        trainer.torch_epoch(n_batches)
    events = sorted(profiler.key_averages(group_by_input_shape=True),
                    key=lambda event: event.self_cpu_time_total, reverse=True)
    total_us = sum(event.self_cpu_time_total for event in events)
    ops = [{"op": event.key, "shapes": str(event.input_shapes)[:60],
            "self_ms": event.self_cpu_time_total / 1e3 / n_batches,
            "calls": event.count / n_batches} for event in events[:top]]
    return {"batches": n_batches, "self_ms_total": total_us / 1e3 / n_batches, "ops": ops}


# --------------------------------------------------------------------------- output


def _ms(seconds: float) -> str:
    """Milliseconds with about three significant digits."""
    ms = seconds * 1e3
    digits = 0 if ms >= 100 else 1 if ms >= 10 else 2 if ms >= 1 else 3
    return f"{ms:.{digits}f}"


def _timing(stats: dict | None) -> tuple[str, str]:
    if stats is None:
        return "-", ""
    return _ms(stats["median"]), f"{_ms(stats['q1'])}-{_ms(stats['q3'])}"


def _target_text(target: dict) -> str:
    if target["kind"] == "fraction of peak":
        return f">={target['target']:.0%} pk"
    return f">={target['target']:g}x"


def _met_text(target: dict) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[target["met"]]


TABLE_FORMAT = "{:<51} {:>7} {:<13} {:>8} {:<13} {:>10} {:>15} {:>6}  {:<17} {}"


def format_section(section: dict, peaks: Peaks) -> list[str]:
    """The table of one thread count, then samples/s, memory and the profile."""
    threads = section["threads"]
    plural = "s" if threads > 1 else ""
    title = (f"== {threads} thread{plural}: peak {peaks.of(GFLOPS, threads):.1f} GFLOP/s "
             f"(FMA, {peaks.fma_gflops_1t:.1f} x {threads}), "
             f"{peaks.of(GBPS, threads):.1f} GB/s (copy) ==")
    lines = [title,
             TABLE_FORMAT.format("work", "bnrs ms", "(IQR)", "torch ms", "(IQR)",
                                 "torch/bnrs", "bnrs rate", "% peak", "target", "met?")]
    for row in section["rows"]:
        bnrs_median, bnrs_iqr = _timing(row["bnrs_s"])
        torch_median, torch_iqr = _timing(row["torch_s"])
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        targets = row["targets"]
        lines.append(TABLE_FORMAT.format(
            row["name"], bnrs_median, f"({bnrs_iqr})", torch_median,
            f"({torch_iqr})" if torch_iqr else "", ratio, f"{row['rate']:.1f} {row['unit']}",
            f"{row['peak_fraction']:.0%}", ", ".join(_target_text(t) for t in targets),
            ", ".join(_met_text(t) for t in targets)).rstrip())
    for row in section["rows"]:
        if row["samples"]:
            text = f"{row['name']}: bnrs {row['samples'] / row['bnrs_s']['median']:,.0f} samples/s"
            if row["torch_s"] is not None:
                text += f", torch {row['samples'] / row['torch_s']['median']:,.0f} samples/s"
            lines.append(text)
    lines.extend(format_memory(section.get("memory")))
    lines.extend(format_profile(section.get("profile")))
    return lines


def format_memory(memory: dict | None) -> list[str]:
    if memory is None:
        return []
    parts, steps = [], memory["bnrs"].get("steps")
    for framework in ("bnrs", "torch"):
        if framework not in memory:
            continue
        entry = memory[framework]
        if "error" in entry:
            parts.append(f"{framework} failed: {entry['error']}")
        else:
            parts.append(f"{framework} {entry['epoch_kib'] / 1024:.1f} MiB "
                         f"(process peak {entry['peak_kib'] / 1024:.0f} MiB)")
    text = (f"peak RSS of training ({steps} steps) above the baseline: " + ", ".join(parts))
    if memory["ratio"] is not None:
        target = memory["targets"][0]
        text += (f"; torch/bnrs {memory['ratio']:.2f}x, target bnrs <= torch: "
                 f"{_met_text(target)}")
    return [text]


def format_profile(profile: dict | None) -> list[str]:
    if profile is None:
        return []
    bnrs_profile = profile["bnrs"]
    title = ("-- profile: bnrs training step, ms per batch (mean of "
             f"{bnrs_profile['batches']} batches)")
    lines = [title,
             f"   {'layer (input shape)':<40} {'forward':>8} {'backward':>9} {'total':>8}"]
    layer_total = 0.0
    for layer in bnrs_profile["layers"]:
        total = layer["forward_ms"] + layer["backward_ms"]
        layer_total += total
        lines.append(f"   {layer['layer']:<40} {layer['forward_ms']:8.3f} "
                     f"{layer['backward_ms']:9.3f} {total:8.3f}")
    stages = bnrs_profile["stages_ms"]
    step = sum(stages.values())
    lines.append(f"   {'all layers':<40} {'':8} {'':9} {layer_total:8.3f}")
    for stage, ms in stages.items():
        lines.append(f"   stage {stage:<34} {ms:8.3f} ms ({ms / step:.0%} of the step)")
    lines.append(f"   step total {step:.3f} ms; layers {layer_total / step:.0%}, the rest is "
                 "the Python around them")
    torch_profile = profile.get("torch")
    if torch_profile is not None:
        lines.append(f"-- profile: PyTorch training step, top ops by self CPU time, ms per "
                     f"batch (of {torch_profile['self_ms_total']:.3f} ms under the profiler, "
                     f"{torch_profile['batches']} batches)")
        for op in torch_profile["ops"]:
            lines.append(f"   {op['op']:<42} {op['self_ms']:8.3f}  x{op['calls']:<4g} "
                         f"{op['shapes']}")
    return lines


def measure_scaling(work: Work, threads: int, mode: Mode, torch) -> dict:
    """Speed-up of ``work`` from 1 to ``threads`` threads, in bnrs and in PyTorch.

    The 1-thread and ``threads``-thread runs are interleaved in one measurement, so that a
    change in the load of a shared machine affects both alike (the per-thread-count tables
    are minutes apart). The target is 90% of linear scaling: 1.8x at 2 threads.
    """
    def switch(set_num_threads: Callable[[int], None], n: int, run: Callable[[], Any]):
        # bnrs starts a new pool when the count changes: one untimed call lets its
        # threads start (and PyTorch's pool resize) before the sample.
        def prepare() -> None:
            set_num_threads(n)
            run()
        return prepare

    runs = [work.run_bnrs, work.run_bnrs]
    prepare = [switch(_core.set_num_threads, n, work.run_bnrs) for n in (1, threads)]
    if work.run_torch is not None:
        runs += [work.run_torch, work.run_torch]
        prepare += [switch(torch.set_num_threads, n, work.run_torch) for n in (1, threads)]
    samples, cores = measure(runs, runs, mode.kernel_repeats, mode.min_sample_seconds,
                             mode.settle_seconds, prepare)
    times = [spread(s) for s in samples]
    speedups = [times[i]["median"] / times[i + 1]["median"] for i in range(0, len(runs), 2)]
    return {"key": work.key, "name": work.name, "threads": threads,
            "bnrs_1t_s": times[0], "bnrs_s": times[1], "bnrs_speedup": speedups[0],
            "torch_1t_s": times[2] if torch is not None else None,
            "torch_s": times[3] if torch is not None else None,
            "torch_speedup": speedups[1] if torch is not None else None,
            # CPU time / wall time of each run: below ``threads`` on a busy machine.
            "cores": cores,
            "targets": [_target("thread speed-up", 0.9 * threads, speedups[0])]}


def format_scaling(rows: Sequence[dict]) -> list[str]:
    if not rows:
        return []
    row_format = "{:<51} {:>7} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7} {}"
    title = ("== speed-up over 1 thread (1 and n threads interleaved in one measurement; "
             "cores = CPU time / wall time of bnrs at n threads, what the machine gave it) ==")
    lines = [title,
             row_format.format("work", "threads", "bnrs 1t ms", "bnrs nt ms", "cores", "bnrs",
                               "torch", "target", "met?")]
    for row in rows:
        target = row["targets"][0]
        torch_text = "-" if row["torch_speedup"] is None else f"{row['torch_speedup']:.2f}x"
        lines.append(row_format.format(
            row["name"], row["threads"], _ms(row["bnrs_1t_s"]["median"]),
            _ms(row["bnrs_s"]["median"]), f"{row['cores'][1]:.2f}",
            f"{row['bnrs_speedup']:.2f}x", torch_text,
            f">={target['target']:g}x", _met_text(target)))
    return lines


def all_targets(sections: Sequence[dict], scaling: Sequence[dict]) -> list[dict]:
    """Every target with the work and thread count it belongs to."""
    targets = []
    for section in sections:
        for row in section["rows"]:
            targets += [{"work": row["name"], "threads": section["threads"], **t}
                        for t in row["targets"]]
        if section.get("memory"):
            targets += [{"work": "peak RSS of a training epoch", "threads": section["threads"],
                         **t} for t in section["memory"]["targets"]]
    for row in scaling:
        targets += [{"work": row["name"], "threads": row["threads"], **t}
                    for t in row["targets"]]
    return targets


def format_summary(targets: Sequence[dict]) -> list[str]:
    measured = [t for t in targets if t["met"] is not None]
    met = sum(t["met"] for t in measured)
    lines = [f"== targets: {met} of {len(measured)} met"
             + (f" ({len(targets) - len(measured)} not measured without PyTorch)"
                if len(measured) < len(targets) else "") + " =="]
    for target in targets:
        value, goal = target["measured"], target["target"]
        if target["kind"] == "fraction of peak":
            text = "n/a" if value is None else f"{value:.0%}"
            goal_text = f"{goal:.0%}"
        else:
            text = "n/a" if value is None else f"{value:.2f}x"
            goal_text = f"{goal:g}x"
        status = {True: "met ", False: "MISS", None: "n/a "}[target["met"]]
        lines.append(f"  {status} {target['work']}, {target['threads']}t: {target['kind']} "
                     f"{text} (target >= {goal_text})")
    return lines


def plot_results(result: dict, path: str) -> None:
    """Bars of each item's speed ratio per thread count, with its target; % of peak when
    PyTorch was missing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have_ratios = result["torch_available"]
    sections = result["sections"]
    names = [row["name"] for row in sections[0]["rows"]]
    height = 0.8 / len(sections)
    figure, axes = plt.subplots(figsize=(10, 0.35 * len(names) * len(sections) + 1.5))
    for offset, section in enumerate(sections):
        values = [row["ratio"] if have_ratios else row["peak_fraction"] * 100
                  for row in section["rows"]]
        positions = [i + offset * height for i in range(len(names))]
        axes.barh(positions, values, height, label=f"{section['threads']} thread(s)")
    for i, row in enumerate(sections[0]["rows"]):
        for target in row["targets"]:
            if have_ratios and target["kind"] == "speed ratio torch/bnrs":
                axes.plot([target["target"]] * 2, [i - 0.1, i + 0.8 - 0.1], color="black")
    if have_ratios:
        axes.axvline(1.0, color="grey", linestyle=":")
        axes.set_xscale("log")
        axes.set_xlabel("speed ratio torch time / bnrs time (black: target)")
    else:
        axes.set_xlabel("bnrs rate, % of the measured peak (no PyTorch to compare)")
    axes.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=7)
    axes.invert_yaxis()
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------- main


def machine_info(torch) -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                              if line.startswith("model name")), cpu_model)
    except OSError:
        pass
    usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count())
    return {"cpu_model": cpu_model, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "load_average_start": _load_average(),
            "simd_backend": _core.simd_backend(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "bnrs": _core.__version__, "torch": None if torch is None else torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _load_average() -> float | None:
    """The 1-minute load average (other processes compete for the cores), if known."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def import_torch(disabled: bool):
    """``(torch, None)``, or ``(None, why not)``."""
    if disabled:
        return None, TORCH_DISABLED_MESSAGE
    try:
        import torch
    except ImportError:
        return None, NO_TORCH_MESSAGE
    return torch, None


def parse_args(argv) -> argparse.Namespace:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    parser = argparse.ArgumentParser(
        prog="bnrs bench", description="Time bnrs against PyTorch (when importable): "
        "kernels, a training epoch and inference, at each thread count.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="a shorter run: 2,000 training samples, 3 repeats")
    size.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, nargs="+", metavar="N",
                        default=sorted({1, usable}),
                        help="thread counts to run (default: 1 and the usable cores)")
    parser.add_argument("--repeats", type=int, metavar="R",
                        help="repeats per kernel (default 15, 3 with --quick)")
    parser.add_argument("--json", metavar="FILE", help="write every raw number here")
    parser.add_argument("--plot", metavar="FILE", help="draw the ratios (needs matplotlib)")
    parser.add_argument("--profile", action="store_true",
                        help="also time each layer of the bnrs training step, and PyTorch's "
                        "top ops")
    parser.add_argument("--no-torch", action="store_true",
                        help="run bnrs alone even if PyTorch is importable")
    parser.add_argument("--rss-child", choices=("bnrs", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.threads) < 1:
        parser.error(f"--threads: expected counts >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {args.repeats}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib), or leave out --plot")
    return args


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure_section(threads: int, works: Sequence[Work], trainer: Trainer, mode: Mode,
                    peaks: Peaks, args: argparse.Namespace) -> dict:
    """Every row at ``threads`` (already set), the peak memory and the profile."""
    rows = []
    gc.collect()
    for work in works:
        _progress(f"  {threads}t: {work.name}")
        rows.append(measure_row(work, threads, mode, peaks))
    section: dict[str, Any] = {"threads": threads, "rows": rows}
    if mode.memory_all_threads or threads == args.threads[-1]:
        _progress(f"  {threads}t: peak memory of a training epoch (fresh processes)")
        frameworks = ["bnrs"] + ([] if trainer.torch is None else ["torch"])
        section["memory"] = measure_memory(frameworks, mode, threads)
    if args.profile:
        _progress(f"  {threads}t: profiling the training step")
        section["profile"] = {
            "bnrs": profile_bnrs(trainer),
            "torch": None if trainer.torch is None else profile_torch(trainer)}
    return section


def run(args: argparse.Namespace) -> dict:
    """Measure everything the arguments ask for, printing each table as it is done."""
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.repeats is not None:
        mode = dataclasses.replace(mode, kernel_repeats=args.repeats)
    torch, torch_missing = import_torch(args.no_torch)
    info = machine_info(torch)
    print(f"bnrs bench ({mode.name}): bnrs {info['bnrs']} ({info['simd_backend']}), "
          f"PyTorch {info['torch'] or '-'}, NumPy {info['numpy']}, Python {info['python']}")
    print(f"machine: {info['cpu_model']}, {info['usable_cpus']} usable of "
          f"{info['logical_cpus']} logical CPUs, load average {info['load_average_start']}, "
          f"{info['date']}")
    if torch_missing:
        print(torch_missing)
    busy = info["load_average_start"] is not None and info["load_average_start"] >= 1
    if busy:
        print(f"note: the machine is busy (load average {info['load_average_start']} on "
              f"{info['usable_cpus']} CPUs): times run long and vary, the 2-thread ones most; "
              "ratios compare interleaved runs")
    print("speed ratio = torch time / bnrs time (above 1: bnrs is faster); medians of "
          f"{mode.kernel_repeats} interleaved repeats ({mode.epoch_repeats} for the network), "
          "IQR in brackets", flush=True)
    _progress("measuring the machine's peaks...")
    peaks = measure_peaks(args.threads, mode)
    works = kernel_works(mode, torch)
    trainer = Trainer(mode, torch)
    works += trainer.works()
    sections = []
    previous_threads = _core.get_num_threads()
    previous_torch_threads = None if torch is None else torch.get_num_threads()
    try:
        for threads in args.threads:
            _core.set_num_threads(threads)
            if torch is not None:
                torch.set_num_threads(threads)
            section = measure_section(threads, works, trainer, mode, peaks, args)
            sections.append(section)
            print()
            print("\n".join(format_section(section, peaks)), flush=True)
        scaling = []
        for threads in (n for n in args.threads if n > 1 and 1 in args.threads):
            for work in works:
                if work.scaling:
                    _progress(f"  speed-up 1t -> {threads}t: {work.name}")
                    scaling.append(measure_scaling(work, threads, mode, torch))
    finally:
        _core.set_num_threads(previous_threads)
        if torch is not None:
            torch.set_num_threads(previous_torch_threads)
    info["load_average_end"] = _load_average()
    print(f"\nload average at the end: {info['load_average_end']}")
    targets = all_targets(sections, scaling)
    lines = format_scaling(scaling)
    print(("\n" + "\n".join(lines)) if lines else "")
    print("\n" + "\n".join(format_summary(targets)), flush=True)
    return {"schema": 1, "mode": dataclasses.asdict(mode), "architecture": ARCHITECTURE,
            "machine": info, "torch_available": torch is not None,
            "torch_missing": torch_missing,
            "peaks": {"fma_gflops_1t": peaks.fma_gflops_1t,
                      "fma_gflops_concurrent": peaks.fma_gflops_concurrent,
                      "copy_gbps": peaks.copy_gbps},
            "sections": sections, "scaling": scaling, "targets": targets}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bnrs bench`` (and ``python -m bnrs.bench``); returns the exit code."""
    args = parse_args(argv)
    if args.rss_child:
        mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
        print(json.dumps(rss_child(args.rss_child, mode, args.threads[0])))
        return 0
    result = run(args)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
        print(f"raw numbers written to {args.json}")
    if args.plot:
        plot_results(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
