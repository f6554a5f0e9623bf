"""One run of ``bnrs bench``: every section, printed as it is done, and the entry point."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

import bnrs

from .. import _core
from ..cli import parse_bench_args
from .keras_mirror import keras_problem
from .memory import measure_memory, rss_child
from .network import LENET, Network, Trainer
from .peaks import Peaks, measure_peaks
from .profile import profile_bnrs, profile_step, profile_torch
from .peer import run_peer
from .report import (all_targets, format_peers, format_scaling, format_section,
                     format_step_profile, format_summary, plot_results)
from .timing import measure_bnrs_scaling, measure_row, measure_scaling
from .torch_mirror import NO_RENORM_MESSAGE, has_batch_renorm, import_torch
from .workloads import MODES, Mode, Work, kernel_works, with_inference_batch

T = TypeVar("T")

#: The version of the JSON a run writes: 2 when the peers' runs are one per peer, network
#: and thread count (each naming its network), not one per peer and thread count.
SCHEMA = 2


def machine_info(torch) -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                              if line.startswith("model name")), cpu_model)
    except OSError:
        pass
    return {"cpu_model": cpu_model, "logical_cpus": os.cpu_count(),
            "usable_cpus": _usable_cpus(),
            "load_average_start": _load_average(),
            "simd_backend": bnrs.simd_backend(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "bnrs": bnrs.__version__, "torch": None if torch is None else torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _usable_cpus() -> int | None:
    """The CPUs this process may run on."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count())


def core_round_trip_ns() -> float | None:
    """The round trip of a cache line between two cores, in ns (``None`` with one usable
    CPU): tens of ns between cores that share a cache, several hundred between cores that
    do not. A virtual machine's CPUs can move from one to the other as the host schedules
    them, and every 2-thread time with them (see docs/benchmark.md)."""
    if (_usable_cpus() or 1) < 2:
        return None
    return round(_core.core_round_trip_ns(0.2), 1)


def between_round_trips(several_threads: bool, measure: Callable[[], T]
                        ) -> tuple[T, list[float | None]]:
    """``measure()``'s result and the round trip between cores before and after it (both
    ``None`` unless it runs ``several_threads``)."""
    before = core_round_trip_ns() if several_threads else None
    result = measure()
    return result, [before, core_round_trip_ns() if several_threads else None]


def _load_average() -> float | None:
    """The 1-minute load average (other processes compete for the cores), if known."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure_section(threads: int, works: Sequence[Work], trainer: Trainer, mode: Mode,
                    peaks: Peaks, args: argparse.Namespace) -> dict:
    """Every row at ``threads`` (already set), the peak memory and the profile (of
    ``trainer``'s network)."""
    rows = []
    gc.collect()

    def measure_rows() -> None:
        for work in works:
            _progress(f"  {threads}t: {work.name}")
            rows.append(measure_row(work, threads, mode, peaks))

    _, (round_trip, round_trip_after) = between_round_trips(threads > 1, measure_rows)
    section: dict[str, Any] = {"threads": threads, "rows": rows,
                               "core_round_trip_ns": round_trip,
                               "core_round_trip_ns_after": round_trip_after}
    if mode.memory_all_threads or threads == args.threads[-1]:
        _progress(f"  {threads}t: peak memory of a training epoch (fresh processes)")
        frameworks = ["bnrs"] + ([] if trainer.torch is None else ["torch"])
        section["memory"] = measure_memory(frameworks, mode, threads, trainer.network)
    if args.profile:
        _progress(f"  {threads}t: profiling the training step")
        section["profile"] = {
            "network": trainer.network.name,
            "bnrs": profile_bnrs(trainer),
            "torch": None if trainer.torch is None else profile_torch(trainer)}
    return section


def run_mode(args: argparse.Namespace) -> Mode:
    """The sizes of the run (``--smoke``, ``--quick`` or full) with ``--batch-size`` and
    ``--inference-batch-size``."""
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.batch_size is not None:
        mode = dataclasses.replace(mode, batch_size=args.batch_size)
    if args.inference_batch_size is not None:
        mode = with_inference_batch(mode, args.inference_batch_size)
    return mode


def measure_peers(pythons: dict, threads: Sequence[int], mode: Mode,
                  networks: Sequence[Network] = (LENET,)) -> dict:
    """Each peer on each network at each thread count, in a child process of its own
    (after the rest of the bench, so that nothing else of it runs meanwhile)."""
    peers = {}
    for framework, python in pythons.items():
        runs = []
        for network in networks:
            for n in threads:
                _progress(f"  {n}t: {framework} against bnrs on {network.name} "
                          f"(python -m bnrs.bench.peer, {python})")
                runs.append(run_peer(framework, python, n, mode.name, network,
                                     mode.batch_size, mode.infer_batch_size))
        peers[framework] = {"python": python, "runs": runs}
    return peers


def scaling_child_command(args: argparse.Namespace, mode: Mode) -> list[str]:
    """``python -m bnrs.bench --scaling-child ...``: bnrs's speed-ups of the run's works
    (its sizes, thread counts and networks) in a fresh process."""
    command = [sys.executable, "-m", "bnrs.bench", "--scaling-child", "--no-peers",
               "--threads", *map(str, args.threads), "--repeats", str(mode.kernel_repeats),
               "--batch-size", str(mode.batch_size),
               "--inference-batch-size", str(mode.infer_batch_size)]
    command += [] if mode.name == "full" else [f"--{mode.name}"]
    if args.architecture is not None:
        command += ["--architecture", args.architecture]
    elif args.network:
        command += ["--network", *args.network]
    if args.input_shape is not None:
        command += ["--input-shape", *map(str, args.input_shape)]
    if args.n_classes is not None:
        command += ["--n-classes", str(args.n_classes)]
    return command


def scaling_pairs(works: Sequence[Work],
                  thread_counts: Sequence[int]) -> list[tuple[int, Work]]:
    """(threads, work) of each speed-up to measure: the works with a scaling target at
    each count above 1, when 1 is in the run."""
    return [(n, work) for n in thread_counts if n > 1 and 1 in thread_counts
            for work in works if work.scaling]


def scaling_child(args: argparse.Namespace) -> list[dict]:
    """bnrs's speed-ups, measured in this process, which imports no other framework; what
    ``--scaling-child`` prints."""
    mode = run_mode(args)
    if args.repeats is not None:
        mode = dataclasses.replace(mode, kernel_repeats=args.repeats)
    works = kernel_works(mode, None)
    for network in args.networks:
        works += Trainer(mode, None, network).works()
    results = []
    for threads, work in scaling_pairs(works, args.threads):
        _progress(f"  speed-up 1t -> {threads}t: {work.name} (bnrs, scaling child)")
        results.append({**measure_bnrs_scaling(work, threads, mode), "process": "child"})
    return results


def measure_all_scaling(works: Sequence[Work], mode: Mode, torch,
                        args: argparse.Namespace) -> list[dict]:
    """The speed-up rows. bnrs's speed-ups are measured where no other framework's threads
    run: in this process without PyTorch, else in a child process (``--scaling-child``),
    since PyTorch's OpenMP workers spin after its calls; PyTorch's here, alone."""
    pairs = scaling_pairs(works, args.threads)
    if not pairs:
        return []
    bnrs_speedups: dict = {}
    if torch is not None:
        _progress("  speed-up 1t -> nt of bnrs in a process without PyTorch "
                  "(python -m bnrs.bench --scaling-child)")
        done = subprocess.run(scaling_child_command(args, mode), capture_output=True,
                              text=True, timeout=7200, check=False)
        try:
            speedups = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            # Measured here instead, with PyTorch's workers idle between the samples.
            _progress("  the scaling child failed (" + (done.stderr.strip().splitlines()
                      or ["no output"])[-1] + "): bnrs's speed-ups measured in this process")
            speedups = []
        bnrs_speedups = {(row["key"], row["threads"]): row for row in speedups}
    rows = []
    for threads, work in pairs:
        _progress(f"  speed-up 1t -> {threads}t: {work.name}")
        rows.append(measure_scaling(work, threads, mode, torch,
                                    bnrs_speedups.get((work.key, threads))))
    return rows


def run_benchmarks(args: argparse.Namespace) -> dict:
    """Measure everything the arguments ask for, printing each table as it is done."""
    mode = run_mode(args)
    if args.repeats is not None:
        mode = dataclasses.replace(mode, kernel_repeats=args.repeats)
    torch, torch_missing = import_torch(args.no_torch)
    if torch is not None and any(has_batch_renorm(network.build())
                                 for network in args.networks):
        # Found before anything is measured, in one line, as the parser's errors.
        print(f"bnrs bench: error: --architecture: {NO_RENORM_MESSAGE}", file=sys.stderr)
        raise SystemExit(2)
    if "keras" in getattr(args, "peer_pythons", {}):
        for network in args.networks:
            problem = keras_problem(network.build(), network.input_shape)
            if problem:
                # Found before anything is measured, as batch renormalisation for PyTorch.
                print(f"bnrs bench: error: --architecture: {problem}; the keras peer cannot "
                      f"time {network.name}: leave keras out (--peers NAME ... or --no-peers)",
                      file=sys.stderr)
                raise SystemExit(2)
    info = machine_info(torch)
    print(f"bnrs bench ({mode.name}): bnrs {info['bnrs']} ({info['simd_backend']}), "
          f"PyTorch {info['torch'] or '-'}, NumPy {info['numpy']}, Python {info['python']}")
    print(f"machine: {info['cpu_model']}, {info['usable_cpus']} usable of "
          f"{info['logical_cpus']} logical CPUs, load average {info['load_average_start']}, "
          f"{info['date']}")
    for network in args.networks:
        print(f"network {network.name}: {network.architecture} on "
              f"{'x'.join(map(str, network.input_shape))}, {network.n_classes} classes, "
              f"batch {mode.batch_size}")
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
    trainers = [Trainer(mode, torch, network) for network in args.networks]
    for trainer in trainers:
        works += trainer.works()
    sections = []
    previous_threads = bnrs.get_num_threads()
    previous_torch_threads = None if torch is None else torch.get_num_threads()
    try:
        for threads in args.threads:
            bnrs.set_num_threads(threads)
            if torch is not None:
                torch.set_num_threads(threads)
            section = measure_section(threads, works, trainers[0], mode, peaks, args)
            sections.append(section)
            print()
            print("\n".join(format_section(section, peaks)), flush=True)
        step_profile = None
        if args.profile:
            _progress("profiling the training step's stages at each thread count")
            step_profile = profile_step(trainers[0], args.threads, mode.epoch_repeats)
            unplanned = (f"-- profile: no stage times for {trainers[0].network.name}: its "
                         "steps did not run as the step executor's plan (a network it does "
                         "not plan, BNRS_FUSED_STEP=0, or a plan made anew during the run)")
            lines = format_step_profile(step_profile) or [unplanned]
            print("\n" + "\n".join(lines), flush=True)
        scaling, scaling_round_trips = between_round_trips(
            max(args.threads) > 1, lambda: measure_all_scaling(works, mode, torch, args))
    finally:
        bnrs.set_num_threads(previous_threads)
        if torch is not None:
            torch.set_num_threads(previous_torch_threads)
    lines = format_scaling(scaling, scaling_round_trips)
    print(("\n" + "\n".join(lines)) if lines else "", flush=True)
    peers = measure_peers(getattr(args, "peer_pythons", {}), args.threads, mode,
                          args.networks)
    lines = format_peers(peers)
    print(("\n" + "\n".join(lines)) if lines else "", flush=True)
    info["load_average_end"] = _load_average()
    info["core_round_trip_ns_end"] = core_round_trip_ns()
    end = f"\nload average at the end: {info['load_average_end']}"
    if info["core_round_trip_ns_end"] is not None:
        end += f"; cache-line round trip between cores {info['core_round_trip_ns_end']:.0f} ns"
    print(end)
    targets = all_targets(sections, scaling)
    print("\n" + "\n".join(format_summary(targets)), flush=True)
    return {"schema": SCHEMA, "mode": dataclasses.asdict(mode),
            "architecture": args.networks[0].architecture,
            "networks": [dataclasses.asdict(network) for network in args.networks],
            "machine": info, "torch_available": torch is not None,
            "torch_missing": torch_missing,
            "peaks": {"fma_gflops_1t": peaks.fma_gflops_1t,
                      "fma_gflops_concurrent": peaks.fma_gflops_concurrent,
                      "copy_gbps": peaks.copy_gbps},
            "sections": sections, "step_profile": step_profile, "scaling": scaling,
            "scaling_core_round_trip_ns": scaling_round_trips,
            "peers": peers, "targets": targets}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bnrs bench`` (and ``python -m bnrs.bench``); returns the exit code."""
    args = parse_bench_args(argv)
    if args.scaling_child:
        print(json.dumps(scaling_child(args)))
        return 0
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, run_mode(args), args.threads[0],
                                   args.networks[0])))
        return 0
    result = run_benchmarks(args)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
        print(f"raw numbers written to {args.json}")
    if args.plot:
        plot_results(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0
