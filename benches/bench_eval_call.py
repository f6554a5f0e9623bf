"""The evaluation forward in one call against the fused Python path, in one process.

LeNetBN (the default architecture, 1x28x28 images, 10 classes) in evaluation mode calls
``model(x)`` on a fixed batch, for each batch size, alternately through the executor's
one call (:func:`bnrs.executor.run_forward`) and through the fused blocks run from Python
(``BNRS_FUSED_STEP=0``), so that a shared machine's load falls on both alike. Both
outputs must have the same bits. Times are CPU time of this process per forward
(``time.process_time``, kernel threads included); the median of each and the median of
the per-round ratios (Python path / one call) are printed.

    python benches/bench_eval_call.py [--batch-sizes 1 8 64 1000] [--threads 1]
                                      [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import bnrs
import numpy as np
from bnrs import executor
from bnrs.nn.spec import DEFAULT_ARCHITECTURE, from_spec


def forwards(model, x: np.ndarray, one_call: bool, calls: int) -> float:
    """CPU seconds per ``model(x)`` over ``calls`` calls, by the chosen path."""
    os.environ[executor.STEP_ENV] = "1" if one_call else "0"
    start = time.process_time()
    for _ in range(calls):
        model(x)
    return (time.process_time() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 1000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    bnrs.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    model = from_spec(DEFAULT_ARCHITECTURE, (1, 28, 28), 10, random_state=0)
    for module in model.modules():   # statistics away from the identity
        if hasattr(module, "running_var") and module.running_var is not None:
            module.running_mean[:] = rng.standard_normal(module.num_features)
            module.running_var[:] = rng.uniform(0.5, 2.0, module.num_features)
    model.eval()
    print(f"bnrs {bnrs.__version__}, {bnrs.simd_backend()}, {args.threads} thread(s); "
          "CPU time per forward, Python path / one call")
    for batch in args.batch_sizes:
        x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
        outputs = []
        for one_call in (False, True):
            os.environ[executor.STEP_ENV] = "1" if one_call else "0"
            outputs.append(model(x))
        if outputs[0].tobytes() != outputs[1].tobytes():
            raise SystemExit(f"batch {batch}: the two paths' outputs differ")
        calls = max(1, 2000 // batch)
        forwards(model, x, True, calls)   # warm both
        forwards(model, x, False, calls)
        python, one = [], []
        for _ in range(args.rounds):
            python.append(forwards(model, x, False, calls))
            one.append(forwards(model, x, True, calls))
        ratio = statistics.median(p / o for p, o in zip(python, one))
        print(f"batch {batch:5d}: Python path {statistics.median(python) * 1e6:9.1f} µs, "
              f"one call {statistics.median(one) * 1e6:9.1f} µs, ratio {ratio:.2f}x")
    os.environ.pop(executor.STEP_ENV, None)


if __name__ == "__main__":
    main()
