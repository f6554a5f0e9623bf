"""Type stubs for the compiled extension ``bnrs._core`` (Rust kernels).

Arrays are float32 and C-contiguous unless noted; :mod:`bnrs.functional` converts user
input before calling these. Every function raises ``ValueError`` (bad shapes or values,
naming the argument), ``MemoryError`` (an output too large to allocate) or
``RuntimeError`` (an internal error, reported instead of aborting).
"""

from typing import Any, Literal, Optional, Tuple, final

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]
_Pair = Tuple[int, int]

__version__: str
__all__ = [
    "__version__",
    "_environment_warnings",
    "_panic_for_test",
    "_set_local_num_threads",
    "_watches_ctrl_c",
    "activation_backward",
    "activation_forward",
    "adam_step",
    "CachedBuffer",
    "EvalStep",
    "TrainStep",
    "_kernel_clock",
    "_kernel_clock_read_seconds",
    "_kernel_time",
    "avg_pool2d_backward",
    "avg_pool2d_forward",
    "batch_norm_backward",
    "batch_norm_forward",
    "bn_block_backward",
    "bn_block_forward",
    "conv2d_backward",
    "conv2d_forward",
    "conv2d_pooled_chain",
    "cached_memory",
    "core_round_trip_ns",
    "check_fits_in_memory",
    "conv2d_output_shape",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "dropout_forward",
    "dropout_mask",
    "fma_peak_gflops",
    "get_num_threads",
    "group_norm_backward",
    "group_norm_forward",
    "linear_backward",
    "linear_forward",
    "log_softmax_backward",
    "log_softmax_forward",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "pool2d_output_shape",
    "release_memory",
    "same_bits",
    "set_num_threads",
    "set_simd",
    "set_simd_enabled",
    "sgd_step",
    "simd_backend",
    "simd_levels",
]

def conv2d_forward(
    input: _F32,
    weight: _F32,
    bias: Optional[_F32],
    stride: _Pair,
    padding: _Pair,
    dilation: _Pair,
    activation: Optional[str] = None,
    negative_slope: float = 0.0,
    pool: Optional[str] = None,
    groups: int = 1,
) -> _F32: ...
def conv2d_pooled_chain(
    input: _F32,
    first: Tuple[
        _F32, Optional[_F32], _Pair, _Pair, _Pair, Optional[str], float, str, int
    ],
    second: Tuple[
        _F32, Optional[_F32], _Pair, _Pair, _Pair, Optional[str], float, str, int
    ],
) -> _F32: ...
def conv2d_backward(
    grad_output: _F32,
    input: _F32,
    weight: _F32,
    stride: _Pair,
    padding: _Pair,
    dilation: _Pair,
    bias: bool,
    input_grad: bool,
    groups: int = 1,
) -> Tuple[Optional[_F32], _F32, Optional[_F32]]: ...
def max_pool2d_forward(
    input: _F32, kernel_size: _Pair, stride: _Pair, padding: _Pair, return_indices: bool = True
) -> Tuple[_F32, Optional[_I64]]: ...
def max_pool2d_backward(
    grad_output: _F32, indices: _I64, input_shape: Tuple[int, int, int, int]
) -> _F32: ...
def avg_pool2d_forward(
    input: _F32, kernel_size: _Pair, stride: _Pair, padding: _Pair, count_include_pad: bool
) -> _F32: ...
def avg_pool2d_backward(
    grad_output: _F32,
    input_shape: Tuple[int, int, int, int],
    kernel_size: _Pair,
    stride: _Pair,
    padding: _Pair,
    count_include_pad: bool,
) -> _F32: ...
def batch_norm_forward(
    input: _F32,
    weight: Optional[_F32],
    bias: Optional[_F32],
    running_mean: Optional[_F32],
    running_var: Optional[_F32],
    training: bool,
    momentum: float,
    eps: float,
) -> Tuple[_F32, _F32, _F32]: ...
def batch_norm_backward(
    grad_output: _F32,
    input: _F32,
    weight: Optional[_F32],
    save_mean: _F32,
    save_invstd: _F32,
    training: bool,
) -> Tuple[_F32, Optional[_F32], Optional[_F32]]: ...
def bn_block_forward(
    input: _F32,
    weight: Optional[_F32],
    bias: Optional[_F32],
    running_mean: Optional[_F32],
    running_var: Optional[_F32],
    momentum: float,
    eps: float,
    activation: Optional[str] = None,
    negative_slope: float = 0.0,
    pool: Optional[str] = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_channel_wise: bool = False,
) -> Tuple[_F32, _F32, _F32]: ...
def bn_block_backward(
    grad_output: _F32,
    input: _F32,
    weight: Optional[_F32],
    bias: Optional[_F32],
    save_mean: _F32,
    save_invstd: _F32,
    activation: Optional[str] = None,
    negative_slope: float = 0.0,
    pool: Optional[str] = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_channel_wise: bool = False,
) -> Tuple[_F32, Optional[_F32], Optional[_F32]]: ...
def group_norm_forward(
    input: _F32, num_groups: int, weight: Optional[_F32], bias: Optional[_F32], eps: float
) -> Tuple[_F32, _F32, _F32]: ...
def group_norm_backward(
    grad_output: _F32,
    input: _F32,
    num_groups: int,
    weight: Optional[_F32],
    mean: _F32,
    rstd: _F32,
) -> Tuple[_F32, Optional[_F32], Optional[_F32]]: ...
def dropout_forward(input: _F32, p: float, seed: int, unit: int) -> _F32: ...
def dropout_mask(n: int, p: float, seed: int) -> npt.NDArray[np.uint8]: ...
def linear_forward(
    input: _F32,
    weight: _F32,
    bias: Optional[_F32],
    activation: Optional[str] = None,
    negative_slope: float = 0.0,
    norm: Optional[Tuple[Optional[_F32], Optional[_F32], _F32, _F32, float]] = None,
) -> _F32: ...
def linear_backward(
    grad_output: _F32, input: _F32, weight: _F32, bias: bool, input_grad: bool
) -> Tuple[Optional[_F32], _F32, Optional[_F32]]: ...
def activation_forward(input: _F32, name: str, negative_slope: float) -> _F32: ...
def activation_backward(
    grad_output: _F32, saved: _F32, name: str, negative_slope: float
) -> _F32: ...
def log_softmax_forward(input: _F32) -> _F32: ...
def log_softmax_backward(grad_output: _F32, output: _F32) -> _F32: ...
def cross_entropy_forward(
    input: _F32, target: _I64, weight: Optional[_F64] = None
) -> float: ...
def cross_entropy_backward(
    input: _F32, target: _I64, weight: Optional[_F64] = None
) -> _F32: ...
def sgd_step(
    param: _F32,
    grad: _F32,
    momentum_buffer: Optional[_F32],
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    first_step: bool,
) -> None: ...
def adam_step(
    param: _F32,
    grad: _F32,
    exp_avg: _F32,
    exp_avg_sq: _F32,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> None: ...
@final
class CachedBuffer:
    """The memory of a large output array (its ``base``), reused once the array is freed."""

@final
class TrainStep:
    """A training step of a chain of layers in one call (built by :mod:`bnrs.executor`).

    ``layers``: one ``(kind, sample input shape, sample output shape, args)`` per layer,
    kind one of "conv2d", "linear", "batch_norm", "activation", "max_pool2d",
    "avg_pool2d", "dropout", "zeros", "view", or "bn_block" (a fused training batch norm
    → activation → 2x2 pool → dropout run); the parameters are numbered by slot
    (``slot_names``, ``slot_shapes``); ``optimizer`` is "adam", "adamw" or "sgd".
    """

    def __new__(
        cls,
        layers: list[tuple[str, list[int], list[int], tuple[Any, ...]]],
        slot_names: list[str],
        slot_shapes: list[list[int]],
        optimizer: str,
    ) -> TrainStep: ...
    def run(
        self,
        input: _F32,
        target: _I64,
        sample_weight: Optional[_F64],
        data: list[_F32],
        grads: list[_F32],
        zero: list[int],
        running: list[tuple[_F32, _F32, _I64]],
        seeds: list[int],
        updates: list[tuple[Any, ...]],
    ) -> float:
        """Zero the gradients of ``zero``, forward, loss, backward, optimizer update;
        the loss (a non-finite one before the backward)."""
    def run_epoch(
        self,
        samples: _F32,
        targets: _I64,
        sample_weight: Optional[_F64],
        order: Optional[_I64],
        bounds: list[tuple[int, int]],
        data: list[_F32],
        grads: list[_F32],
        zero: list[int],
        running: list[tuple[_F32, _F32, _I64]],
        seeds: list[int],
        updates: list[tuple[Any, ...]],
    ) -> list[float]:
        """A step (as ``run``) per ``(start, stop)`` of ``bounds`` on the samples (and
        their ``sample_weight``) at those positions of ``order`` (None: of ``samples``);
        ``seeds`` holds every step's dropout seeds in turn and ``updates`` the first
        step's tuples.
        The losses of the steps taken: the epoch stops after a non-finite one."""
    @property
    def seeds_used(self) -> int:
        """How many of the last step's dropout seeds its forward used."""
    @property
    def steps_done(self) -> int:
        """How many steps the last ``run`` (0 or 1) or ``run_epoch`` completed, their
        updates done (also when it raised: Ctrl-C seen as a step ended)."""
    def reset_counts(self) -> None:
        """Set ``seeds_used`` and ``steps_done`` to 0 (before a call)."""
    def set_stage_clock(self, on: bool) -> None:
        """Start timing the stages from zero (``on``), or stop and forget the times."""
    def stage_clock(
        self,
    ) -> tuple[list[float], list[float], float, float, int] | None:
        """Wall seconds since the clock was switched on: (forward per stage, backward per
        stage, loss, optimizer updates, steps whose updates were done); None when off."""
    def release_buffers(self) -> int:
        """Free the buffers kept between steps; the bytes freed."""

@final
class EvalStep:
    """An evaluation forward of a chain of layers in one call (built by
    :func:`bnrs.executor.run_forward`).

    ``stages``: one ``(kind, sample input shape, sample output shape, args)`` per stage,
    kind one of "conv" (a convolution with an optional folded batch norm, activation and
    2x2 pool), "conv_chain" (two pooled "conv" blocks in one kernel call), "linear" (with
    an optional batch norm's arithmetic and activation on its output), "batch_norm",
    "activation", "max_pool2d", "avg_pool2d" or "view"; the arrays (parameters and
    running statistics) are numbered by slot, of ``slot_shapes``.
    """

    def __new__(
        cls,
        stages: list[tuple[str, list[int], list[int], tuple[Any, ...]]],
        slot_shapes: list[list[int]],
    ) -> EvalStep: ...
    @property
    def input_shape(self) -> list[int]:
        """The sample shape the plan takes."""
    def forward(self, input: _F32, arrays: list[Any]) -> Optional[_F32]:
        """The output for ``input`` (N >= 1 samples of ``input_shape``) with ``arrays`` in
        the slots; None when an array is not C-contiguous aligned float32 of its slot's
        shape."""

def conv2d_output_shape(
    input_hw: _Pair, kernel_size: _Pair, stride: _Pair, padding: _Pair, dilation: _Pair
) -> _Pair: ...
def pool2d_output_shape(
    input_hw: _Pair, kernel_size: _Pair, stride: _Pair, padding: _Pair
) -> _Pair: ...
def check_fits_in_memory(name: str, elements: int, itemsize: int) -> None: ...
def set_num_threads(n: int) -> None: ...
def release_memory() -> int: ...
def cached_memory() -> int: ...
def get_num_threads() -> int: ...
def simd_backend() -> Literal["avx512", "avx2", "scalar"]: ...
def simd_levels() -> list[str]: ...
def set_simd(level: str) -> Literal["avx512", "avx2", "scalar"]: ...
def _set_local_num_threads(n: Optional[int]) -> Optional[int]: ...
def set_simd_enabled(enabled: bool) -> None: ...
def _panic_for_test() -> None: ...
def _kernel_clock(enabled: bool) -> None: ...
def _kernel_clock_read_seconds() -> float: ...
def _kernel_time() -> tuple[float, int]: ...
def _environment_warnings() -> list[str]: ...
def _watches_ctrl_c() -> bool: ...
def fma_peak_gflops(seconds: float) -> float: ...
def core_round_trip_ns(seconds: float) -> float: ...
def same_bits(a: _F32, b: _F32) -> bool: ...
