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
                         [--network lenet inception resnet | --architecture SPEC]
                         [--input-shape C H W] [--n-classes K] [--batch-size B]
                         [--inference-batch-size B]

The package, one module per job: :mod:`.workloads` (the kernel rows and the run modes),
:mod:`.network` (the training and inference rows of LeNetBN, the other named networks or
the user's), :mod:`.torch_mirror` (PyTorch's import and the mirror of any bnrs network),
:mod:`.timing` (interleaved repeats, each after the other threads went idle; targets),
:mod:`.peaks` (the machine's peaks), :mod:`.memory` (peak RSS in a fresh process),
:mod:`.profile` (``--profile``), :mod:`.peer` (Keras and ONNX Runtime, each in a child
process of its own: ``--peers``, ``--peer-python``), :mod:`.keras_mirror` (any bnrs
network as a channels-last Keras model), :mod:`.report` (tables, plot) and
:mod:`.runner` (a run and the entry point); the arguments are parsed in :mod:`bnrs.cli`.
"""

from __future__ import annotations

from .memory import measure_memory, rss_child
from .network import (ARCHITECTURE, INPUT_SHAPE, LENET, N_CLASSES, NETWORKS, Network,
                      Trainer, build_bnrs_network, make_data, network_flops)
from .keras_mirror import (NoKerasCounterpart, build_keras_network, keras_plan,
                           keras_problem)
from .peaks import Peaks, copy_bandwidth_gbps, measure_peaks
from .peer import check_peer, run_peer
from .profile import LayerTimer, profile_bnrs, profile_step, profile_torch
from .report import (all_targets, format_memory, format_peers, format_profile,
                     format_scaling, format_section, format_step_profile, format_summary,
                     plot_results)
from .runner import (machine_info, main, measure_peers, measure_section, run_benchmarks,
                     run_mode)
from .timing import (Timings, measure, measure_bnrs_scaling, measure_row, measure_scaling,
                     measure_speedup, other_threads_running, spread, wait_until_idle)
from .torch_mirror import (NO_RENORM_MESSAGE, NO_TORCH_MESSAGE, TORCH_DISABLED_MESSAGE,
                           build_torch_network, has_batch_renorm, import_torch,
                           torch_mirror, torch_train_epoch, torch_train_step)
from .workloads import GBPS, GFLOPS, MIB, MODES, Mode, Work, kernel_works

__all__ = ["ARCHITECTURE", "GBPS", "GFLOPS", "INPUT_SHAPE", "LENET", "MIB", "MODES",
           "NETWORKS", "NO_RENORM_MESSAGE", "NO_TORCH_MESSAGE", "N_CLASSES",
           "TORCH_DISABLED_MESSAGE", "LayerTimer", "Mode", "Network", "NoKerasCounterpart",
           "Peaks", "Timings", "Trainer", "Work", "all_targets", "build_bnrs_network",
           "build_keras_network", "build_torch_network", "check_peer",
           "copy_bandwidth_gbps", "format_memory", "format_peers", "format_profile",
           "format_scaling", "format_section", "format_step_profile", "format_summary",
           "has_batch_renorm",
           "import_torch", "keras_plan", "keras_problem", "kernel_works", "machine_info",
           "main", "make_data", "measure", "measure_memory", "measure_peaks",
           "measure_bnrs_scaling", "measure_peers", "measure_row", "measure_scaling",
           "measure_section", "measure_speedup", "network_flops", "other_threads_running",
           "plot_results", "profile_bnrs", "profile_step", "profile_torch", "rss_child",
           "run_benchmarks", "run_mode", "run_peer", "spread", "torch_mirror",
           "torch_train_epoch", "torch_train_step", "wait_until_idle"]
