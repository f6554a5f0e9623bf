"""Evaluation-mode fusion: LeNetBN inference, fused against unfused, in one process.

The default architecture on 1x28x28 images (10 classes), in evaluation mode with
non-trivial running statistics, infers a fixed batch of images (4,000 by default, in
batches as ``CNNClassifier.predict_proba`` does: 512) with ``fuse=True`` and with
``fuse=False`` alternately, repetition by repetition, so that a shared machine's load
falls on both alike. Times are CPU time of this process (``time.process_time``); the
ratio of the medians is printed.

    python benches/bench_fusion.py [--images 4000] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import bnrs
import numpy as np
from bnrs import nn
from bnrs.nn.spec import DEFAULT_ARCHITECTURE, from_spec


def infer(model, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    bnrs.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    model = from_spec(DEFAULT_ARCHITECTURE, (1, 28, 28), 10, random_state=0)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean[:] = rng.normal(0.0, 0.1, module.num_features)
            module.running_var[:] = rng.uniform(0.5, 2.0, module.num_features)
    model.eval()
    images = rng.random((args.images, 1, 28, 28), dtype=np.float32)
    times = {True: [], False: []}
    outputs = {}
    for _ in range(args.repeats):
        for fuse in (True, False):
            model.fuse = fuse
            start = time.process_time()
            outputs[fuse] = infer(model, images, args.batch)
            times[fuse].append(time.process_time() - start)
    fused, unfused = statistics.median(times[True]), statistics.median(times[False])
    difference = np.abs(outputs[True] - outputs[False]).max()
    print(f"{args.images} images, batches of {args.batch}, {args.threads} thread(s), "
          f"SIMD {bnrs.simd_backend()}")
    print(f"fused   median {fused:.3f} s CPU  (all: {', '.join(f'{t:.3f}' for t in times[True])})")
    print(f"unfused median {unfused:.3f} s CPU  "
          f"(all: {', '.join(f'{t:.3f}' for t in times[False])})")
    print(f"speed-up {unfused / fused:.2f}x; largest |fused - unfused| logit {difference:.2e}")


if __name__ == "__main__":
    main()
