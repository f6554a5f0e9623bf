"""The machine's peaks that the rates are quoted against: FMA throughput and copy bandwidth."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .. import _core
from .workloads import GFLOPS, Mode


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
