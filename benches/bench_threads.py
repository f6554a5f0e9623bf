"""Thread scaling of a LeNetBN training step, kernel call by kernel call.

Records every ``bnrs._core`` call of one training step of the default network
(``bnrs bench``'s LeNetBN on 1x28x28 images, batch 64, Adam), then replays each call
at 1 and at 2 threads, alternately, call by call and round after round, so that a
shared machine's load falls on both alike; per call the minimum wall time over the
rounds is kept (the call on a quiet machine) and the ratio 1-thread / 2-thread printed.
Then one epoch at 1 thread gives the CPU time outside the kernels (Python, bindings; the
kernel clock, ``bnrs._core._kernel_time``) against the kernels': the share outside is
serial, which bounds the 2-thread speed-up of the epoch (Amdahl) however well the kernels
scale. (At 1 thread the kernels run on the calling thread itself, so the split is by the
kernel clock, not by thread.)

    python benches/bench_threads.py [--rounds 20] [--samples 4000]

On a machine shared with other work the 2-thread times vary by tens of percent from
run to run: take the minimum over several runs, and quote the load average printed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import numpy as np
from bnrs import _core, executor, nn, optim
from bnrs.bench.network import LENET
from bnrs.training import batch_bounds, num_threads, train_epoch

#: Calls that compute shapes only.
NOT_KERNELS = {"check_fits_in_memory", "conv2d_output_shape", "pool2d_output_shape"}


def record_step(model, criterion, optimizer, images, labels) -> list[tuple[str, tuple, dict]]:
    """The ``_core`` kernel calls of one training step on ``images``, with their arguments
    (the layers' calls: the step executor's one call into Rust would hide them)."""
    calls = []
    originals = {name: getattr(_core, name) for name in dir(_core)
                 if not name.startswith("_") and callable(getattr(_core, name))
                 and not isinstance(getattr(_core, name), type)}

    def recorder(name, function):
        def record(*args, **kwargs):
            calls.append((name, args, kwargs))
            return function(*args, **kwargs)
        return record

    for name, function in originals.items():
        setattr(_core, name, recorder(name, function))
    step_setting = os.environ.get(executor.STEP_ENV)
    os.environ[executor.STEP_ENV] = "0"
    try:
        train_epoch(model, criterion, optimizer, images, labels, [(0, len(images))])
    finally:
        for name, function in originals.items():
            setattr(_core, name, function)
        if step_setting is None:
            del os.environ[executor.STEP_ENV]
        else:
            os.environ[executor.STEP_ENV] = step_setting
    return [call for call in calls if call[0] not in NOT_KERNELS]


def label(name: str, args: tuple) -> str:
    shape = next((x.shape for x in args if isinstance(x, np.ndarray)), ())
    return f"{name} {'x'.join(map(str, shape))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4000)
    args = parser.parse_args()
    images, labels = LENET.make_data(args.samples)
    model = LENET.build(0)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    bounds = batch_bounds(args.samples, 64, last="keep")
    train_epoch(model, criterion, optimizer, images, labels, bounds[:3])
    calls = record_step(model, criterion, optimizer, images[:64], labels[:64])

    best = defaultdict(lambda: float("inf"))
    loads = []
    for round_ in range(args.rounds):
        for index, (name, call_args, kwargs) in enumerate(calls):
            function = getattr(_core, name)
            for threads in ((1, 2) if round_ % 2 else (2, 1)):
                for _ in range(2):
                    with num_threads(threads):
                        start = time.perf_counter()
                        function(*call_args, **kwargs)
                        seconds = time.perf_counter() - start
                    best[index, threads] = min(best[index, threads], seconds)
        loads.append(os.getloadavg()[0])
    print(f"load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
    print(f"{'call (min wall, µs)':44s} {'1 thread':>9s} {'2 threads':>9s} {'ratio':>6s}")
    totals = [0.0, 0.0]
    for index, (name, call_args, _) in enumerate(calls):
        one, two = best[index, 1] * 1e6, best[index, 2] * 1e6
        totals[0] += one
        totals[1] += two
        print(f"{label(name, call_args):44s} {one:9.1f} {two:9.1f} {one / two:6.2f}")
    print(f"{f'all {len(calls)} calls':44s} {totals[0]:9.0f} {totals[1]:9.0f} "
          f"{totals[0] / totals[1]:6.2f}")

    read = _core._kernel_clock_read_seconds()
    with num_threads(1):
        train_epoch(model, criterion, optimizer, images, labels, bounds[:3])
        _core._kernel_clock(True)
        try:
            (kernel0, calls0), cpu0 = _core._kernel_time(), time.process_time()
            train_epoch(model, criterion, optimizer, images, labels, bounds)
            (kernel1, calls1), cpu1 = _core._kernel_time(), time.process_time()
        finally:
            _core._kernel_clock(False)
    # Each kernel call counted holds about one of its two clock readings (see bench_step).
    calls = calls1 - calls0
    kernel_seconds = kernel1 - kernel0 - read * calls
    outside_seconds = cpu1 - cpu0 - 2 * read * calls - kernel_seconds
    share = outside_seconds / (outside_seconds + kernel_seconds)
    print(f"epoch at 1 thread: outside the kernels {outside_seconds * 1e3 / len(bounds):.2f} ms "
          f"a step, kernels {kernel_seconds * 1e3 / len(bounds):.2f} ms a step: the share "
          f"outside, {share:.1%}, bounds the 2-thread speed-up at "
          f"{1 / (share + (1 - share) / 2):.2f}x")


if __name__ == "__main__":
    main()
