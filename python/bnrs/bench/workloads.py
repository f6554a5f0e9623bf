"""The kernel rows of ``bnrs bench``: each the same computation in bnrs and PyTorch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import functional as F


GFLOPS = "GFLOP/s"
GBPS = "GB/s"
MIB = 2**20


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
    settle_seconds: float       # least pause before each sample (then until threads idle)
    peak_seconds: float         # per FMA-peak measurement
    copy_bytes: int             # the array copied to measure the memory bandwidth
    profile_batches: int        # training steps under PyTorch's profiler (--profile)
    memory_batches: int | None   # steps of the peak-memory run (None: the whole epoch)
    memory_all_threads: bool    # peak memory at every thread count, or only at the last


def with_inference_batch(mode: Mode, size: int) -> Mode:
    """``mode`` with inference in batches of ``size``: as many batches as keep the
    inference passes at about the mode's number of samples (at least one batch)."""
    samples = mode.infer_batches * mode.infer_batch_size
    return dataclasses.replace(mode, infer_batch_size=size,
                               infer_batches=max(1, samples // size))


MODES = {
    "full": Mode("full", 64, 10_000, 64, 10, 1000, 15, 5, 0.02, 0.002, 0.1, 256 * MIB, 40,
                 None, True),
    # The memory peak is reached in the first steps (Adam's state is made at the first).
    "quick": Mode("quick", 64, 2_000, 64, 2, 1000, 3, 3, 0.005, 0.001, 0.05, 64 * MIB, 10,
                  10, False),
    # Tiny shapes and one repeat: checks that everything runs (the tests), measures nothing.
    "smoke": Mode("smoke", 2, 64, 64, 1, 32, 1, 1, 0.0, 0.0, 0.01, 4 * MIB, 2, None, False),
}


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
