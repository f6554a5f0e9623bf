"""Kernel throughput at 1 and 2 threads: GFLOP/s for conv and linear, GB/s for the rest.

Run from the repository (after installing bnrs):  python benches/bench_kernels.py
Medians of several repeats after a warm-up, timed as ``bnrs bench`` times its kernel rows
(:func:`bnrs.bench.measure`); the machine is shared and noisy, so compare figures from one
run only.
"""

from __future__ import annotations

import argparse

import numpy as np

import bnrs
import bnrs.functional as F
from bnrs.bench import MODES, measure, spread


def median_seconds(fn, repeats: int) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` samples, as ``bnrs bench --quick``
    times a kernel (warmed up, each sample long enough for the timer)."""
    samples, _ = measure([fn], [fn], repeats, MODES["quick"].min_sample_seconds,
                         settle_seconds=0.0)
    return spread(samples[0])["median"]


def conv_cases(rng):
    for n, cin, h, cout in [(64, 1, 28, 16), (64, 16, 28, 32), (32, 64, 32, 64)]:
        x = rng.standard_normal((n, cin, h, h), dtype=np.float32)
        w = rng.standard_normal((cout, cin, 3, 3), dtype=np.float32)
        b = rng.standard_normal(cout, dtype=np.float32)
        y = F.conv2d(x, w, b, padding=1)
        gy = rng.standard_normal(y.shape, dtype=np.float32)
        flops = 2.0 * n * cout * h * h * cin * 9
        name = f"conv {n}x{cin}x{h}x{h}->{cout} k3p1"
        # Default arguments bind this iteration's arrays (closures bind late).
        yield (name + " fwd", lambda x=x, w=w, b=b: F.conv2d(x, w, b, padding=1), flops,
               "GFLOP/s")
        yield (name + " bwd", lambda gy=gy, x=x, w=w: F.conv2d_backward(gy, x, w, padding=1),
               2 * flops, "GFLOP/s")


def memory_cases(rng):
    x = rng.standard_normal((64, 32, 28, 28), dtype=np.float32)
    gy = rng.standard_normal(x.shape, dtype=np.float32)
    rm, rv = np.zeros(32, np.float32), np.ones(32, np.float32)
    gamma, beta = np.ones(32, np.float32), np.zeros(32, np.float32)
    _, mean, invstd = F.native_batch_norm(x, gamma, beta, rm, rv, training=True)
    y_pool, idx = F.max_pool2d(x, 2, return_indices=True)
    nbytes = x.nbytes
    # Bytes moved: each input read once and each output written once.
    yield ("BN train fwd 64x32x28x28",
           lambda: F.native_batch_norm(x, gamma, beta, rm, rv, training=True), 2 * nbytes, "GB/s")
    yield ("BN eval fwd", lambda: F.batch_norm(x, rm, rv, gamma, beta, training=False),
           2 * nbytes, "GB/s")
    yield ("BN bwd", lambda: F.batch_norm_backward(gy, x, gamma, mean, invstd), 3 * nbytes,
           "GB/s")
    yield "dropout p=0.5 fwd", lambda: F.dropout(x, 0.5, seed=1), 2 * nbytes, "GB/s"
    yield "dropout2d p=0.5 fwd", lambda: F.dropout2d(x, 0.5, seed=1), 2 * nbytes, "GB/s"
    yield ("max-pool 2x2 fwd", lambda: F.max_pool2d(x, 2, return_indices=True),
           nbytes + 3 * y_pool.nbytes, "GB/s")
    yield ("max-pool 2x2 bwd", lambda: F.max_pool2d_backward(y_pool, idx, x.shape),
           nbytes + 3 * y_pool.nbytes, "GB/s")
    yield "avg-pool 2x2 fwd", lambda: F.avg_pool2d(x, 2), nbytes + y_pool.nbytes, "GB/s"
    yield "relu fwd", lambda: F.relu(x), 2 * nbytes, "GB/s"


def linear_cases(rng):
    x = rng.standard_normal((64, 1568), dtype=np.float32)
    w = rng.standard_normal((128, 1568), dtype=np.float32)
    b = rng.standard_normal(128, dtype=np.float32)
    gy = rng.standard_normal((64, 128), dtype=np.float32)
    flops = 2.0 * 64 * 1568 * 128
    yield "linear 64x1568->128 fwd", lambda: F.linear(x, w, b), flops, "GFLOP/s"
    yield "linear 64x1568->128 bwd", lambda: F.linear_backward(gy, x, w), 2 * flops, "GFLOP/s"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = [*conv_cases(rng), *linear_cases(rng), *memory_cases(rng)]
    print(f"bnrs {bnrs.__version__}, SIMD path: {bnrs.simd_backend()}")
    header = f"{'kernel':34s}" + "".join(f"{f'{t} thread(s)':>24s}" for t in args.threads)
    print(header)
    for name, fn, work, unit in cases:
        row = f"{name:34s}"
        for threads in args.threads:
            bnrs.set_num_threads(threads)
            seconds = median_seconds(fn, args.repeats)
            row += f"{seconds * 1e3:9.3f} ms {work / seconds / 1e9:6.1f} {unit:7s}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
