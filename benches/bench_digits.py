"""The estimator's quality benchmark: CNNClassifier on scikit-learn's digits, next to PyTorch.

The protocol: the 1797 digits split 75/25 (``train_test_split(..., random_state=0)``),
X / 16 as 1x8x8 float32 images, the default architecture (its two 2x2 poolings take 8x8
to 2x2), Adam (learning rate 1e-3), batches of 64, 30 epochs, no early stopping. For each
seed it reports the test accuracy and the fit time of ``CNNClassifier.fit``.

When PyTorch is importable, the same network (same layers, same initial weights) is
trained with ``torch.optim.Adam`` on the same batches in the same order (the generator
that drew the weights then shuffles each epoch, as in ``CNNClassifier.fit``), in the
same process, alternating with bnrs seed by seed, so the fit-time ratio is measured side
by side (absolute times move by 25-60% on a shared machine; the ratio much less). Only
the dropout masks differ (each framework draws its own).

    python benches/bench_digits.py [--seeds 5] [--epochs 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import bnrs
from bnrs import CNNClassifier, nn
from bnrs.bench import build_torch_network, import_torch, torch_train_epoch
from bnrs.nn.module import as_generator
from bnrs.nn.spec import DEFAULT_ARCHITECTURE
from bnrs.training import batch_bounds   # the estimator's batches, for the same steps

BATCH_SIZE = 64
LEARNING_RATE = 1e-3


def digits():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25,
                                                        random_state=0)
    return X_train, y_train, X_test, y_test


def fit_bnrs(seed: int, epochs: int, X_train, y_train, X_test, y_test) -> tuple[float, float]:
    clf = CNNClassifier(DEFAULT_ARCHITECTURE, learning_rate=LEARNING_RATE,
                        batch_size=BATCH_SIZE, max_epochs=epochs, random_state=seed,
                        n_iter_no_change=epochs + 1)   # always the full epochs
    start = time.perf_counter()
    clf.fit(X_train, y_train)
    seconds = time.perf_counter() - start
    return clf.score(X_test, y_test), seconds


def fit_torch(torch, seed: int, epochs: int, X_train, y_train, X_test,
              y_test) -> tuple[float, float]:
    """The same network and batches in PyTorch, in the plain training loop its users write
    (:func:`bnrs.bench.torch_train_epoch`)."""
    rng = as_generator(seed)   # as CNNClassifier.fit: weights first, then the shuffles
    model = build_torch_network(nn.from_spec(DEFAULT_ARCHITECTURE, (1, 8, 8), 10,
                                             random_state=rng), torch)
    torch.manual_seed(seed)   # dropout masks
    bounds = batch_bounds(len(X_train), BATCH_SIZE, last="merge_single")
    inputs, targets = torch.from_numpy(X_train), torch.from_numpy(y_train.astype(np.int64))
    start = time.perf_counter()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    for _ in range(epochs):
        torch_train_epoch(model, optimizer, inputs, targets, bounds, torch,
                          order=torch.from_numpy(rng.permutation(len(X_train))))
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(X_test)).argmax(1).numpy()
    return float(np.mean(predicted == y_test)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    torch, why = import_torch(args.no_torch)
    bnrs.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    data = digits()
    print(f"bnrs {bnrs.__version__} ({bnrs.simd_backend()} kernels), "
          + (f"PyTorch {torch.__version__}" if torch is not None else why)
          + f"; {args.threads} thread(s); digits {len(data[0])} train / {len(data[2])} test; "
          f"{DEFAULT_ARCHITECTURE}; Adam lr {LEARNING_RATE}, batch {BATCH_SIZE}, "
          f"{args.epochs} epochs")
    fit_bnrs(0, 1, *data)   # warm-up: thread pool, pages
    if torch is not None:
        fit_torch(torch, 0, 1, *data)
    fits = {"bnrs": lambda seed: fit_bnrs(seed, args.epochs, *data)}
    if torch is not None:
        fits["PyTorch"] = lambda seed: fit_torch(torch, seed, args.epochs, *data)
    rows = []
    for seed in range(args.seeds):
        # Alternate which framework goes first, so drifts of the machine's speed cancel.
        names = list(fits) if seed % 2 == 0 else list(fits)[::-1]
        row = {name: fits[name](seed) for name in names}
        rows.append(row)
        line = f"seed {seed}: bnrs test accuracy {row['bnrs'][0]:.4f}, fit {row['bnrs'][1]:.2f} s"
        if "PyTorch" in row:
            line += (f"; PyTorch {row['PyTorch'][0]:.4f}, {row['PyTorch'][1]:.2f} s; "
                     f"time ratio torch/bnrs {row['PyTorch'][1] / row['bnrs'][1]:.2f}x")
        print(line, flush=True)
    for name in fits:
        accuracies = [row[name][0] for row in rows]
        line = (f"{name}: test accuracy mean {statistics.mean(accuracies):.4f} "
                f"(min {min(accuracies):.4f}, max {max(accuracies):.4f}); fit time median "
                f"{statistics.median(row[name][1] for row in rows):.2f} s")
        if name == "PyTorch":
            ratios = [row["PyTorch"][1] / row["bnrs"][1] for row in rows]
            line += f"; time ratio torch/bnrs median {statistics.median(ratios):.2f}x"
        print(line)

if __name__ == "__main__":
    main()
