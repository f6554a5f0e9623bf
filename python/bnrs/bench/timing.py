"""Timing of the rows: interleaved repeats, their spread, and the speed targets."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

import bnrs

from .peaks import Peaks
from .workloads import Mode, Work


#: A kernel sample repeats the call at most this often to reach ``min_sample_seconds``.
MAX_CALLS_PER_SAMPLE = 1000


def _nothing() -> None:
    """The default ``prepare`` of :func:`measure`."""


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
        row["targets"].append(check_target("speed ratio torch/bnrs", work.min_ratio,
                                           row["ratio"]))
    if work.min_peak is not None and threads == 1:
        row["targets"].append(check_target("fraction of peak", work.min_peak,
                                           row["peak_fraction"]))
    return row


def check_target(kind: str, minimum: float, measured: float | None) -> dict:
    """A target ``measured >= minimum``; unmeasured (None) when PyTorch is missing."""
    return {"kind": kind, "target": minimum, "measured": measured,
            "met": None if measured is None else bool(measured >= minimum)}


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
    prepare = [switch(bnrs.set_num_threads, n, work.run_bnrs) for n in (1, threads)]
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
            "targets": [check_target("thread speed-up", 0.9 * threads, speedups[0])]}
