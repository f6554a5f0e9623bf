"""Fusion: LeNetBN inference or training, fused against unfused, in one process.

``--mode eval`` (default): the default architecture on 1x28x28 images (10 classes), in
evaluation mode with non-trivial running statistics, infers a fixed batch of images
(4,000 by default, in batches as ``CNNClassifier.predict_proba`` does: 512).

``--mode train``: one training epoch (Adam, cross-entropy, batches of 64 as ``bnrs
bench`` trains) over the same number of images, on two models with the same initial
weights, one fused, one not; both must end with the same bits.

``--mode step``: the same epochs through :func:`bnrs.training.train_step`, which ``fit``
uses: the step executor (one call into Rust per step), with its fused training blocks
(``fuse=True``) against without (``fuse=False``).

Each repetition runs ``fuse=True`` and ``fuse=False`` one after the other (alternating
which goes first), so that a shared machine's load falls on both alike. Times are CPU
time of this process (``time.process_time``); the ratio of the medians and the median of
the per-repetition ratios are printed.

    python benches/bench_fusion.py [--mode eval|train|step] [--images 4000] [--repeats 7]
                                   [--train-batch 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import bnrs
import numpy as np
from bnrs import executor, nn, optim
from bnrs import functional as F
from bnrs.nn.spec import DEFAULT_ARCHITECTURE, from_spec
from bnrs.training import train_step


def infer(model, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def train_epoch(model, optimizer, images, targets, batch: int) -> None:
    for i in range(0, len(images), batch):
        optimizer.zero_grad()
        logits = model(images[i:i + batch])
        model.backward(F.cross_entropy_backward(logits, targets[i:i + batch]),
                       input_grad=False)
        optimizer.step()


def step_epoch(model, optimizer, images, targets, batch: int) -> None:
    criterion = nn.CrossEntropyLoss()
    for i in range(0, len(images), batch):
        train_step(model, criterion, optimizer, images[i:i + batch], targets[i:i + batch])


def report(times: dict, label: str) -> None:
    fused, unfused = statistics.median(times[True]), statistics.median(times[False])
    ratios = [u / f for f, u in zip(times[True], times[False])]
    print(f"fused   median {fused:.3f} s CPU  (all: {', '.join(f'{t:.3f}' for t in times[True])})")
    print(f"unfused median {unfused:.3f} s CPU  "
          f"(all: {', '.join(f'{t:.3f}' for t in times[False])})")
    print(f"{label}: unfused/fused {unfused / fused:.3f}x (medians); per repetition "
          f"{', '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f}x)")


def bench_train(args) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((args.images, 1, 28, 28), dtype=np.float32)
    targets = rng.integers(0, 10, args.images)
    models, optimizers = {}, {}
    for fuse in (True, False):
        models[fuse] = from_spec(DEFAULT_ARCHITECTURE, (1, 28, 28), 10, random_state=0)
        models[fuse].fuse = fuse
        optimizers[fuse] = optim.Adam(models[fuse].parameters(), lr=1e-3)
    epoch = step_epoch if args.mode == "step" else train_epoch
    times = {True: [], False: []}
    for repeat in range(args.repeats):
        for fuse in ((True, False) if repeat % 2 == 0 else (False, True)):
            start = time.process_time()
            epoch(models[fuse], optimizers[fuse], images, targets, args.train_batch)
            times[fuse].append(time.process_time() - start)
    if args.mode == "step":
        stages = {fuse: [layer[0] for layer in executor._EXECUTORS[models[fuse]].plan.layers]
                  for fuse in (True, False)}
        print(f"step executor stages: fused {stages[True].count('bn_block')} blocks of "
              f"{len(stages[True])} stages, unfused {len(stages[False])} stages")
    same = all(np.array_equal(a, b) for a, b in zip(models[True].state_dict().values(),
                                                    models[False].state_dict().values()))
    print(f"training epochs of {args.images} images, batches of {args.train_batch}, Adam, "
          f"{args.threads} thread(s), SIMD {bnrs.simd_backend()}")
    report(times, "training epoch")
    print(f"fused and unfused models identical after {args.repeats} epochs: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("eval", "train", "step"), default="eval")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    bnrs.set_num_threads(args.threads)
    if args.mode in ("train", "step"):
        bench_train(args)
        return
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
