"""The training step's CPU time, layer by layer (the Python path) against the step
executor (one call into Rust), and the share of each step spent outside the kernels.

LeNetBN (``c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5``, 1x28x28, 10
classes, Adam), one model per path, trained on the same random batches. The two paths
alternate round by round (``BNRS_FUSED_STEP=1`` / ``0``); each round times ``--steps``
steps twice: with the kernel clock off (the step's CPU time, ``time.process_time``: the
ratio of the paths) and on (``bnrs._core._kernel_time``: the kernels' CPU time and
calls, for the share outside the kernels). With the clock on, each kernel call costs two
readings of the thread CPU clock (system calls of R seconds, ``_core.
_kernel_clock_read_seconds``), one inside
its interval: of the step's CPU time S, the kernels' K and C calls, the step without the
clock is S - 2RC, the kernels K - RC and the rest S - K - RC, all from the same steps (a
shared machine moves CPU times from one run to the next by more than that rest). Ratios
are per round, medians over the rounds. At more than one thread the kernel clock counts
only the thread that runs each call, not its helpers: the share outside is then overstated.

    python benches/bench_step.py [--batch-size 8] [--rounds 5] [--steps 150] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from bnrs import _core, executor, nn, optim
from bnrs.training import num_threads, train_step

LENET = "c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5"


class Path:
    """One model and optimizer trained by one path."""

    def __init__(self, fused: bool, batch_size: int, steps: int):
        self.fused, self.batch_size, self.steps = fused, batch_size, steps
        self.model = nn.from_spec(LENET, (1, 28, 28), 10, random_state=0)
        self.optimizer = optim.Adam(self.model.parameters(), lr=1e-3)
        self.criterion = nn.CrossEntropyLoss()
        rng = np.random.default_rng(0)
        self.X = rng.standard_normal((steps * batch_size, 1, 28, 28)).astype(np.float32)
        self.y = rng.integers(0, 10, steps * batch_size)

    def _steps(self, count: int) -> None:
        for i in range(count):
            batch = slice(i * self.batch_size, (i + 1) * self.batch_size)
            train_step(self.model, self.criterion, self.optimizer, self.X[batch],
                       self.y[batch])

    def measure(self, clock: bool) -> tuple[float, float, float]:
        """(CPU s, kernel s, kernel calls) per step."""
        os.environ[executor.STEP_ENV] = "1" if self.fused else "0"
        self.model.train()
        self._steps(3)
        _core._kernel_clock(clock)
        try:
            (kernel0, calls0), cpu0 = _core._kernel_time(), time.process_time()
            self._steps(self.steps)
            (kernel1, calls1), cpu1 = _core._kernel_time(), time.process_time()
        finally:
            _core._kernel_clock(False)
        n = self.steps
        return (cpu1 - cpu0) / n, (kernel1 - kernel0) / n, (calls1 - calls0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    read = _core._kernel_clock_read_seconds()
    paths = {fused: Path(fused, args.batch_size, args.steps) for fused in (False, True)}
    cpu = {False: [], True: []}
    outside = {False: [], True: []}
    with num_threads(args.threads):
        for round_ in range(args.rounds):
            for fused in (False, True) if round_ % 2 == 0 else (True, False):
                cpu[fused].append(paths[fused].measure(clock=False)[0])
                step, kernel, calls = paths[fused].measure(clock=True)
                outside[fused].append((step - kernel - read * calls)
                                      / (step - 2 * read * calls))
    print(f"LeNetBN step, batch {args.batch_size}, {args.threads} thread(s), "
          f"{_core.simd_backend()}, {args.rounds} rounds x {args.steps} steps "
          f"(clock read {read * 1e6:.2f} us)")
    for fused, name in ((False, "layer by layer"), (True, "executor")):
        print(f"  {name:>14}: {statistics.median(cpu[fused]) * 1e3:.3f} ms CPU per step; "
              f"outside the kernels {100 * statistics.median(outside[fused]):.1f}% "
              f"(rounds: {', '.join(f'{100 * f:.1f}' for f in outside[fused])})")
    ratios = [p / e for p, e in zip(cpu[False], cpu[True])]
    print(f"  layer by layer / executor, CPU per step: median {statistics.median(ratios):.3f}x "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
