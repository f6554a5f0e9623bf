"""LeNetBN's training epoch alone, as a share of this machine's FMA peak.

The epoch of ``bnrs bench`` (``c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5``
on its synthetic 1x28x28 data, 10,000 images in batches of 64, Adam), timed in a process
that imports no other framework: ``--rounds`` rounds, each one epoch at 1 thread and one at
each other ``--threads`` count, in turn (after a 5-batch warm-up at that count), so that
the machine's load falls on every count alike. The FMA peak is measured as the bench
measures it (the best of ten short runs of ``_core.fma_peak_gflops`` on one core, times
the threads), before the first round and after the last; the shares use the higher of the
two. Printed per count: each round's wall time, and the median's and the fastest round's
share of the peak (the fastest is the epoch on the quietest stretch of a shared machine;
the bench reports the median).

At more than one thread, the round trip of a cache line between two cores
(``bnrs._core.core_round_trip_ns``) is measured before each round's epoch and printed on
a line of its own: on a virtual machine whose CPUs the host moves between cores that
share a cache and cores that do not (tens of ns against several hundred), it tells the
rounds run in either placement apart.

``--concurrent`` also times, in each round, as many processes as the largest thread count
taking one single-thread epoch each at the same moment (each process builds the same model
and data, and warms up, before the first round): what the machine gives each core when
every core works, without any sharing of work. Printed: each round's mean epoch of those
processes, how much slower it is than the single-thread epoch alone (ratio of medians),
and so the best the largest thread count could do: the single-thread epoch divided among
the threads and slowed as much (the share of the peak assumes no slowdown at all).

``--step-by-step`` also times, in each round right after it, the same epoch with its steps
taken one by one (a per-step callback that does nothing keeps ``train_epoch`` from taking
the epoch in one call), and prints how much faster the one call is (ratio of medians).

    python benches/bench_epoch.py [--rounds 5] [--threads 1 2] [--samples 10000]
                                  [--step-by-step] [--concurrent]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time

import bnrs
from bnrs import _core, nn, optim
from bnrs.bench.network import LENET, network_flops
from bnrs.bench.workloads import MODES
from bnrs.training import batch_bounds, train_epoch


def fma_peak_gflops() -> float:
    """One core's FMA peak, as ``bnrs bench`` (its full run) measures it."""
    return max(_core.fma_peak_gflops(MODES["full"].peak_seconds) for _ in range(10))


def concurrent_worker(samples: int, barrier, results) -> None:
    """One of ``--concurrent``'s processes: a single-thread epoch each time ``barrier``
    lets the processes go (after a warm-up), its time put on ``results``; stops when the
    barrier is broken."""
    images, labels = LENET.make_data(samples)
    model = LENET.build()
    criterion, optimizer = nn.CrossEntropyLoss(), optim.Adam(model.parameters(), lr=1e-3)
    bounds = batch_bounds(len(images), 64, last="keep")
    bnrs.set_num_threads(1)
    train_epoch(model, criterion, optimizer, images, labels, bounds[:5])
    while True:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        start = time.perf_counter()
        train_epoch(model, criterion, optimizer, images, labels, bounds)
        results.put(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--step-by-step", action="store_true",
                        help="also time the epoch's steps one by one, alternating")
    parser.add_argument("--concurrent", action="store_true",
                        help="also time single-thread epochs in as many processes at once "
                             "as the largest thread count")
    args = parser.parse_args()

    images, labels = LENET.make_data(args.samples)
    model = LENET.build()
    criterion, optimizer = nn.CrossEntropyLoss(), optim.Adam(model.parameters(), lr=1e-3)
    bounds = batch_bounds(len(images), 64, last="keep")
    _, step_flops = network_flops(model)
    epoch_gflop = step_flops * len(images) / 1e9

    workers, at_once = [], max(args.threads)
    if args.concurrent:
        context = multiprocessing.get_context("spawn")
        barrier, results = context.Barrier(at_once + 1), context.Queue()
        workers = [context.Process(target=concurrent_worker,
                                   args=(args.samples, barrier, results))
                   for _ in range(at_once)]
        for worker in workers:
            worker.start()
    peak = fma_peak_gflops()
    times: dict[int, list[float]] = {n: [] for n in args.threads}
    by_step: dict[int, list[float]] = {n: [] for n in args.threads}
    round_trips: dict[int, list[float]] = {n: [] for n in args.threads if n > 1}
    together: list[float] = []
    for _ in range(args.rounds):
        if workers:
            barrier.wait(timeout=600)
            together.append(statistics.mean(results.get(timeout=600) for _ in workers))
        for n in args.threads:
            bnrs.set_num_threads(n)
            train_epoch(model, criterion, optimizer, images, labels, bounds[:5])
            if n in round_trips:
                round_trips[n].append(_core.core_round_trip_ns(0.1))
            start = time.perf_counter()
            train_epoch(model, criterion, optimizer, images, labels, bounds)
            times[n].append(time.perf_counter() - start)
            if args.step_by_step:
                start = time.perf_counter()
                train_epoch(model, criterion, optimizer, images, labels, bounds,
                            after_step=lambda: None)
                by_step[n].append(time.perf_counter() - start)
    if workers:
        barrier.abort()
        for worker in workers:
            worker.join()
    peak = max(peak, fma_peak_gflops())

    print(f"LeNetBN training epoch, {len(images)} images, batch 64, Adam: {epoch_gflop:.1f} "
          f"GFLOP; bnrs {bnrs.__version__} ({bnrs.simd_backend()}), FMA peak "
          f"{peak:.1f} GFLOP/s per core")
    for n, samples in times.items():
        median, fastest = statistics.median(samples), min(samples)
        rounds = ", ".join(f"{t * 1e3:.0f}" for t in samples)
        print(f"  {n} thread(s): {rounds} ms; median {median * 1e3:.0f} ms = "
              f"{epoch_gflop / median / (peak * n):.1%} of the peak, fastest "
              f"{fastest * 1e3:.0f} ms = {epoch_gflop / fastest / (peak * n):.1%}")
        if n in round_trips:
            trips = ", ".join(f"{t:.0f}" for t in round_trips[n])
            print(f"  {n} thread(s), cache-line round trip between cores before each "
                  f"round: {trips} ns")
        if args.step_by_step:
            rounds = ", ".join(f"{t * 1e3:.0f}" for t in by_step[n])
            ratio = statistics.median(by_step[n]) / median
            print(f"  {n} thread(s), step by step: {rounds} ms; the epoch in one call "
                  f"{ratio:.3f}x faster (medians)")
    if together and 1 in times:
        rounds = ", ".join(f"{t * 1e3:.0f}" for t in together)
        slower = statistics.median(together) / statistics.median(times[1])
        bound = statistics.median(times[1]) * slower / at_once
        processes = "processes at once" if at_once > 1 else "process (alone)"
        print(f"  {at_once} {processes}, 1 thread each: {rounds} ms (mean of the "
              f"processes); {slower:.3f}x the single-thread epoch alone (medians), so "
              f"{at_once} thread(s) at best {bound * 1e3:.0f} ms = "
              f"{epoch_gflop / bound / (peak * at_once):.1%} of the peak")


if __name__ == "__main__":
    main()
