"""Train a small CNN with batch norm and dropout on scikit-learn's digits, then ablate both.

The 1797 8x8 digit images are split 75/25 (``train_test_split(..., random_state=0)``) and
scaled to [0, 1]. The network is bnrs's default architecture, whose two 2x2 poolings
take 8x8 images to 4x4 and then 2x2:

    c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5

It is trained with Adam (learning rate 1e-3, batches of 32) for 20 epochs, printing a
line per epoch, then trained again without batch norm, without dropout and without
either (same seed, same settings) to show what each does. Runs in about half a minute on
two cores.

    python examples/train_digits.py
"""

import time

import bnrs
import numpy as np
from bnrs import CNNClassifier
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ARCHITECTURE = "c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5"
SETTINGS = {"learning_rate": 1e-3, "batch_size": 32, "max_epochs": 20, "random_state": 0}


def without(architecture: str, *kinds: str) -> str:
    """The architecture without its ``bn`` and/or dropout (``d<p>``) tokens."""
    def dropped(token: str) -> bool:
        return ("bn" in kinds and token == "bn") or ("dropout" in kinds
                                                      and token.startswith("d"))
    return "-".join(token for token in architecture.split("-") if not dropped(token))


def fit_and_score(architecture, X_train, y_train, X_test, y_test, verbose=0):
    clf = CNNClassifier(architecture, verbose=verbose, **SETTINGS)
    start = time.perf_counter()
    clf.fit(X_train, y_train)
    seconds = time.perf_counter() - start
    return clf, seconds, clf.score(X_train, y_train), clf.score(X_test, y_test)


def main():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25,
                                                        random_state=0)
    print(f"bnrs {bnrs.__version__}: {bnrs.get_num_threads()} threads, "
          f"{bnrs.simd_backend()} kernels")
    print(f"digits: {len(X_train)} training and {len(X_test)} test images of 1x8x8")
    print(f"architecture: {ARCHITECTURE}")
    print(f"settings: Adam, {SETTINGS}\n")

    clf, seconds, train_acc, test_acc = fit_and_score(ARCHITECTURE, X_train, y_train,
                                                      X_test, y_test, verbose=1)
    print(f"\nepochs: {clf.n_iter_}, fit time: {seconds:.1f} s "
          f"({seconds / clf.n_iter_:.2f} s per epoch), "
          f"parameters: {sum(p.data.size for p in clf.model_.parameters())}")
    print(f"test accuracy: {test_acc:.4f} ({round(test_acc * len(y_test))}/{len(y_test)})")

    print("\nWhat batch norm and dropout did (same seed and settings, "
          f"{SETTINGS['max_epochs']} epochs):")
    print(f"{'network':<16}{'train acc':>10}{'test acc':>10}{'last loss':>11}"
          f"{'fit s':>7}  architecture")
    runs = [("BN + dropout", ARCHITECTURE, (clf, seconds, train_acc, test_acc))]
    for name, kinds in [("no BN", ("bn",)), ("no dropout", ("dropout",)),
                        ("neither", ("bn", "dropout"))]:
        architecture = without(ARCHITECTURE, *kinds)
        runs.append((name, architecture,
                     fit_and_score(architecture, X_train, y_train, X_test, y_test)))
    for name, architecture, (model, fit_seconds, train_score, test_score) in runs:
        print(f"{name:<16}{train_score:>10.4f}{test_score:>10.4f}"
              f"{model.loss_curve_[-1]:>11.4f}{fit_seconds:>7.1f}  {architecture}")
    print("(the training loss is measured in training mode, with dropout on, so it is "
          "higher with dropout)")


if __name__ == "__main__":
    main()
