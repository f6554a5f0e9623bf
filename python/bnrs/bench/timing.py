"""Timing of the rows: interleaved repeats, their spread, and the speed targets."""

from __future__ import annotations

import gc
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

import bnrs

from .peaks import Peaks
from .workloads import Mode, Work


#: A kernel sample repeats the call at most this often to reach ``min_sample_seconds``.
MAX_CALLS_PER_SAMPLE = 1000


#: The longest wait for the process's other threads to go idle before a sample. PyTorch's
#: OpenMP workers (libgomp) spin 5-10 ms after each parallel region and ONNX Runtime's
#: intra-op pool 30-45 ms after each run (measured on the 2-core AMD EPYC): a bound well
#: above both, that still ends a wait on a thread that never sleeps.
IDLE_TIMEOUT_SECONDS = 1.0

#: How often the threads' states are read while waiting, and how many readings in a row
#: must find no other thread running: a spinning thread is running whenever it is looked
#: at, a thread that only wakes briefly is seldom caught twice.
IDLE_POLL_SECONDS = 0.0005
IDLE_POLLS = 3


def _nothing() -> None:
    """The default ``prepare`` of :func:`measure`."""


def thread_state(stat: str) -> str:
    """The state letter of a ``/proc/PID/task/TID/stat`` line (``R``: running or
    runnable, ``S``/``D``: asleep); the name before it, in brackets, may hold anything."""
    return stat[stat.rindex(")") + 2]


def _other_tasks(task_dir: str) -> list[str] | None:
    """The ``/proc`` directories of this process's threads other than the caller; None
    where they cannot be listed (not Linux)."""
    me = str(threading.get_native_id())
    try:
        return [f"{task_dir}/{tid}" for tid in os.listdir(task_dir) if tid != me]
    except OSError:
        return None


def other_threads_running(task_dir: str = "/proc/self/task") -> int | None:
    """How many threads of this process, other than the caller, are running or runnable;
    None where the states cannot be read (not Linux)."""
    tasks = _other_tasks(task_dir)
    if tasks is None:
        return None
    running = 0
    for task in tasks:
        try:
            with open(f"{task}/stat") as stat:
                running += thread_state(stat.read()) == "R"
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return running


#: The name of each of bnrs's pool threads begins so (rust/src/parallel.rs names them).
BNRS_THREAD_PREFIX = "bnrs-"


def threads_cpu_seconds(task_dir: str = "/proc/self/task") -> tuple[float, float] | None:
    """CPU seconds so far of this process's threads other than the caller: (bnrs's pool
    threads, all the others); None where they cannot be read (not Linux).

    The others are the other framework's threads in a bench process: their CPU time during
    a bnrs sample is time they took from it (and bnrs's during the other's samples)."""
    tasks = _other_tasks(task_dir)
    if tasks is None:
        return None
    bnrs_seconds = other_seconds = 0.0
    for task in tasks:
        try:
            with open(f"{task}/comm") as comm:
                name = comm.read()
            with open(f"{task}/schedstat") as schedstat:
                seconds = int(schedstat.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile, or no schedstat
        if name.startswith(BNRS_THREAD_PREFIX):
            bnrs_seconds += seconds
        else:
            other_seconds += seconds
    return bnrs_seconds, other_seconds


def wait_until_idle(minimum: float, timeout: float = IDLE_TIMEOUT_SECONDS,
                    running: Callable[[], int | None] = other_threads_running,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.perf_counter) -> tuple[float, bool]:
    """Sleep at least ``minimum`` seconds, then until no other thread of the process runs.

    A framework's thread pool may keep spinning after its call returned (PyTorch's OpenMP
    workers, ONNX Runtime's intra-op pool): a sample of the other framework taken then
    shares the cores with it. The wait ends when :data:`IDLE_POLLS` readings in a row
    find no other thread running, or after ``timeout``.

    Returns
    -------
    waited : float
        Seconds waited.
    idle : bool
        Whether the other threads were seen idle (False: ``timeout`` reached, or their
        states unreadable, when only ``minimum`` is waited).
    """
    start = clock()
    if minimum > 0:
        sleep(minimum)
    quiet = 0
    while quiet < IDLE_POLLS:
        count = running()
        if count is None:
            return clock() - start, False
        quiet = quiet + 1 if count == 0 else 0
        if quiet < IDLE_POLLS:
            if clock() - start >= timeout:
                return clock() - start, False
            sleep(IDLE_POLL_SECONDS)
    return clock() - start, True


class Timings(NamedTuple):
    """What :func:`measure` found for each run."""

    samples: list[list[float]]  # seconds per call, one per repeat
    cores: list[float]          # process CPU time / wall time while it ran: cores it got
    idle_waits: list[list[float]]  # seconds waited for idle threads before each sample
    not_idle: list[int]         # samples started with other threads still running
    # CPU seconds of (bnrs's pool threads, the other threads but the caller) during each
    # run's samples, summed; None where /proc cannot be read.
    threads_cpu: list[tuple[float, float] | None]


def measure(runs: Sequence[Callable[[], Any]], warmups: Sequence[Callable[[], Any]],
            repeats: int, min_sample_seconds: float, settle_seconds: float,
            prepare: Sequence[Callable[[], Any]] | None = None) -> Timings:
    """Seconds per call of each run: ``repeats`` samples each, interleaved.

    ``prepare[i]``, if given, is called before run i's warm-up and before each of its
    samples, outside the timer (to set its thread count). Then, before each sample, the
    process waits ``settle_seconds`` and until its other threads have gone idle
    (:func:`wait_until_idle`), whichever run they belong to: no run is timed while a pool
    left spinning by the one before it competes for the cores.

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
    idle_waits: list[list[float]] = [[] for _ in runs]
    not_idle = [0] * len(runs)
    threads_cpu: list[tuple[float, float] | None] = [(0.0, 0.0)] * len(runs)
    cpu_seconds = [0.0] * len(runs)
    wall_seconds = [0.0] * len(runs)
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for repeat in range(repeats):
            order = range(len(runs)) if repeat % 2 == 0 else range(len(runs) - 1, -1, -1)
            for index in order:
                prepare[index]()
                waited, idle = wait_until_idle(settle_seconds)
                idle_waits[index].append(waited)
                not_idle[index] += not idle
                run, count = runs[index], calls[index]
                threads_before = threads_cpu_seconds()
                cpu_start, start = time.process_time(), time.perf_counter()
                for _ in range(count):
                    run()
                wall = time.perf_counter() - start
                threads_after = threads_cpu_seconds()
                so_far = threads_cpu[index]
                threads_cpu[index] = (
                    None if so_far is None or threads_before is None or threads_after is None
                    else (so_far[0] + threads_after[0] - threads_before[0],
                          so_far[1] + threads_after[1] - threads_before[1]))
                cpu_seconds[index] += time.process_time() - cpu_start
                wall_seconds[index] += wall
                samples[index].append(wall / count)
    finally:
        if gc_enabled:
            gc.enable()
    return Timings(samples, [cpu / max(wall, 1e-9)
                             for cpu, wall in zip(cpu_seconds, wall_seconds)],
                   idle_waits, not_idle, threads_cpu)


def idle_summary(timings: Timings) -> dict:
    """The waits for idle threads of a measurement, for a row's JSON: the longest wait
    before a sample of each run, how many samples started before the other threads were
    idle (0 unless a thread never slept or /proc could not be read), and the CPU seconds
    of bnrs's pool threads and of the other threads (the caller's aside) during each run's
    samples: a framework's samples should find the other's threads near 0."""
    return {"idle_wait_max_s": [max(waits, default=0.0) for waits in timings.idle_waits],
            "not_idle": list(timings.not_idle),
            "bnrs_threads_cpu_s": [None if cpu is None else cpu[0]
                                   for cpu in timings.threads_cpu],
            "other_threads_cpu_s": [None if cpu is None else cpu[1]
                                    for cpu in timings.threads_cpu]}


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
    timings = measure(
        runs, warmups, mode.epoch_repeats if end_to_end else mode.kernel_repeats,
        0.0 if end_to_end else mode.min_sample_seconds, mode.settle_seconds)
    samples, cores = timings.samples, timings.cores
    bnrs_time = spread(samples[0])
    row = {"key": work.key, "name": work.name, "threads": threads, "unit": work.unit,
           "amount": work.amount, "bnrs_s": bnrs_time, "torch_s": None, "ratio": None,
           "paired_ratio": None, "rate": work.amount / bnrs_time["median"] / 1e9,
           "torch_rate": None, "samples": work.samples or None, "cores": cores,
           **idle_summary(timings), "targets": []}
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


def _scaling_sizes(work: Work, mode: Mode) -> tuple[int, float]:
    """Repeats and minimum sample length of a speed-up measurement of ``work``: an
    end-to-end item (a training epoch) as its row, a kernel as its row."""
    if work.samples > 0:
        return mode.epoch_repeats, 0.0
    return mode.kernel_repeats, mode.min_sample_seconds


def measure_speedup(run: Callable[[], Any], warm: Callable[[], Any],
                    set_num_threads: Callable[[int], None], threads: int, repeats: int,
                    min_sample_seconds: float, settle_seconds: float) -> dict:
    """``run`` at 1 and at ``threads`` threads of one framework, interleaved in one
    measurement (:func:`measure`): the medians, the speed-up and the cores of each."""
    def switch(n: int):
        # bnrs starts a new pool when the count changes: one untimed call lets its
        # threads start (and PyTorch's pool resize) before the sample.
        def prepare() -> None:
            set_num_threads(n)
            warm()
        return prepare

    timings = measure([run, run], [warm, warm], repeats, min_sample_seconds, settle_seconds,
                      [switch(1), switch(threads)])
    one, many = (spread(s) for s in timings.samples)
    return {"1t_s": one, "nt_s": many, "speedup": one["median"] / many["median"],
            "cores": timings.cores, **idle_summary(timings)}


def measure_bnrs_scaling(work: Work, threads: int, mode: Mode) -> dict:
    """bnrs's speed-up of ``work`` from 1 to ``threads`` threads, measured in this process
    (which should run no other framework: see :func:`measure_scaling`)."""
    previous = bnrs.get_num_threads()
    try:
        speedup = measure_speedup(work.run_bnrs, work.warm_bnrs or work.run_bnrs,
                                  bnrs.set_num_threads, threads, *_scaling_sizes(work, mode),
                                  mode.settle_seconds)
    finally:
        bnrs.set_num_threads(previous)
    return {"key": work.key, "threads": threads, **speedup}


def measure_scaling(work: Work, threads: int, mode: Mode, torch,
                    bnrs_speedup: dict | None = None) -> dict:
    """Speed-up of ``work`` from 1 to ``threads`` threads, in bnrs and in PyTorch.

    The 1-thread and ``threads``-thread runs of each framework are interleaved in one
    measurement, so that a change in the load of a shared machine affects both alike (the
    per-thread-count tables are minutes apart). The frameworks are measured apart: bnrs's
    (:func:`measure_bnrs_scaling`) is ``bnrs_speedup`` when given, measured in a process
    with no other framework (``bnrs bench`` runs it in a child when PyTorch is loaded),
    else here; PyTorch's here. The target is 90% of linear scaling: 1.8x at 2 threads.
    """
    if bnrs_speedup is None:
        bnrs_speedup = measure_bnrs_scaling(work, threads, mode)
    torch_speedup = None
    if work.run_torch is not None:
        torch_speedup = measure_speedup(work.run_torch, work.warm_torch or work.run_torch,
                                        torch.set_num_threads, threads,
                                        *_scaling_sizes(work, mode), mode.settle_seconds)
    return {"key": work.key, "name": work.name, "threads": threads,
            "bnrs_1t_s": bnrs_speedup["1t_s"], "bnrs_s": bnrs_speedup["nt_s"],
            "bnrs_speedup": bnrs_speedup["speedup"],
            "bnrs_process": bnrs_speedup.get("process", "bench"),
            "torch_1t_s": torch_speedup and torch_speedup["1t_s"],
            "torch_s": torch_speedup and torch_speedup["nt_s"],
            "torch_speedup": torch_speedup and torch_speedup["speedup"],
            # CPU time / wall time of each run (bnrs 1t, nt, PyTorch 1t, nt): below
            # ``threads`` on a busy machine.
            "cores": bnrs_speedup["cores"] + (torch_speedup["cores"] if torch_speedup else []),
            "idle_wait_max_s": bnrs_speedup["idle_wait_max_s"]
            + (torch_speedup["idle_wait_max_s"] if torch_speedup else []),
            **{key: bnrs_speedup[key] + (torch_speedup[key] if torch_speedup else [])
               for key in ("not_idle", "bnrs_threads_cpu_s", "other_threads_cpu_s")},
            "targets": [check_target("thread speed-up", 0.9 * threads,
                                     bnrs_speedup["speedup"])]}
