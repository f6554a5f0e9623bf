"""Real image data for the study, offline: scikit-learn's digits, Fashion-MNIST, a .npz file.

Nothing is downloaded. Every loader returns a :class:`Dataset` with a fixed, documented
train/test split and preprocessing, so that every run of the study sees the same numbers.

=================  =========================================================================
``digits``         scikit-learn's 1,797 8x8 handwritten digits (always installed with
                   scikit-learn). Split: a stratified 30% test set (539 images) drawn with
                   seed 0; the other 1,258 images are the training set. Pixels (0-16) are
                   divided by 16, then standardised with the training set's mean and std.
``fashion-mnist``  Zalando's Fashion-MNIST: the official 60,000 training and 10,000 test
                   28x28 images. Pixels are divided by 255, then standardised with the
                   training set's mean and std (0.2860, 0.3530).
a ``.npz`` path    Arrays ``X`` (N, H, W), (N, C, H, W) or (N, n_features) and ``y`` (N
                   labels), and optionally ``X_test``/``y_test``. Without a test set, a
                   stratified 20% is held out with seed 0. Standardised per channel with
                   the training set's mean and std. Checked when loaded: finite values,
                   integer or string labels, at least 2 classes, matching lengths.
=================  =========================================================================

Fashion-MNIST is looked for, in this order, in the ``path`` argument, the directory named
by the environment variable ``BNRS_FASHION_MNIST``, and ``/usr/share/datasets/fashion-mnist``
(where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs it). The four standard
files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``, gzipped (``.gz``) or not.

The study further splits the training set (validation split, training subset): see
:func:`split_indices`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "Dataset",
    "DatasetNotFoundError",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_npz",
    "split_indices",
]

#: Searched after the ``path`` argument and ``$BNRS_FASHION_MNIST``.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_ENV = "BNRS_FASHION_MNIST"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_HOWTO = f"""\
How to get it (nothing is downloaded at run time):
  * Debian/Ubuntu:  sudo apt-get install dataset-fashion-mnist
    (installs the files to {FASHION_MNIST_DIRS[0]})
  * anywhere else: download the four files
      train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
      t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
    from https://github.com/zalandoresearch/fashion-mnist (directory data/fashion) into
    one directory, then pass it as path=... (Python), or --dataset DIR (CLI), or set
    {FASHION_MNIST_ENV}=DIR."""


class DatasetNotFoundError(FileNotFoundError):
    """The data files are not where they were looked for; the message says how to get them."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images and labels with a fixed train/test split, preprocessed, ready to train on.

    Attributes
    ----------
    name : str
        ``digits``, ``fashion-mnist`` or ``npz:<file name>``.
    X_train, X_test : ndarray, float32, (N, C, H, W) or (N, n_features)
    y_train, y_test : ndarray, int64, labels 0 .. n_classes - 1
    classes : tuple
        The original label of each class index.
    description : str
        The split and the preprocessing, in one sentence (quoted by the study's report).
    fingerprint : str
        A short hash of the arrays: the study stores it with every run, so runs made on
        different data are never mixed up.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple
    description: str
    fingerprint: str = field(default="")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W) or (n_features,)."""
        return tuple(self.X_train.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train {self.X_train.shape}, test "
                f"{self.X_test.shape}, {self.n_classes} classes)")


def _finish(name, X_train, y_train, X_test, y_test, classes, description) -> Dataset:
    """Encode labels as 0..K-1, cast, and fingerprint the arrays."""
    classes_array, y_train_codes = np.unique(y_train, return_inverse=True)
    unknown = np.setdiff1d(np.unique(y_test), classes_array)
    if unknown.size:
        raise ValueError(f"{name}: the test set has labels absent from the training set: "
                         f"{unknown.tolist()}")
    y_test_codes = np.searchsorted(classes_array, y_test)
    arrays = [np.ascontiguousarray(X_train, dtype=np.float32),
              y_train_codes.astype(np.int64),
              np.ascontiguousarray(X_test, dtype=np.float32),
              y_test_codes.astype(np.int64)]
    digest = hashlib.blake2b(digest_size=8)
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    if classes is None:
        classes = tuple(c.item() if hasattr(c, "item") else c for c in classes_array)
    return Dataset(name, arrays[0], arrays[1], arrays[2], arrays[3], tuple(classes),
                   description, digest.hexdigest())


def _stratified_subset(y: np.ndarray, indices: np.ndarray, n_keep: int,
                       rng: np.random.Generator):
    """(kept, rest): ``n_keep`` of ``indices``, each class in proportion (largest remainder)."""
    labels = y[indices]
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n_keep / len(indices))
    keep = np.floor(exact).astype(int)
    for position in np.argsort(-(exact - keep), kind="stable")[: n_keep - keep.sum()]:
        keep[position] += 1
    kept = np.sort(np.concatenate([rng.permutation(indices[labels == c])[:k]
                                   for c, k in zip(classes, keep)]))
    return kept, np.setdiff1d(indices, kept)


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int):
    """(train_indices, test_indices), each class split in the same proportion."""
    test, train = _stratified_subset(y, np.arange(len(y)), round(test_fraction * len(y)),
                                     np.random.default_rng(seed))
    return train, test


def split_indices(y: np.ndarray, n_val: int, n_train: int | None, seed: int = 0,
                  subset_seed=None):
    """The study's split of a training set: validation indices, training subset.

    ``n_val`` images are held out for validation, stratified by class; from the rest a
    stratified subset of ``n_train`` images (all when None or larger) is the training
    subset. The same seed gives the same split, whatever the network or its seed.
    ``subset_seed`` (anything :func:`numpy.random.default_rng` takes), if given, draws
    the training subset and its order instead, so that the validation set stays the
    one of ``seed`` while each run's seed draws its own subset.

    Returns
    -------
    train_indices, val_indices : ndarray of int
        The training subset in a fixed random order (so that its first images are a
        sample of it), and the validation indices, sorted.
    """
    y = np.asarray(y)
    if not 0 < n_val < len(y):
        raise ValueError(f"n_val: expected 1 .. {len(y) - 1}, got {n_val}")
    rng = np.random.default_rng(seed)
    val, rest = _stratified_subset(y, np.arange(len(y)), n_val, rng)
    if subset_seed is not None:
        rng = np.random.default_rng(subset_seed)
    if n_train is not None and n_train < len(rest):
        rest, _ = _stratified_subset(y, rest, n_train, rng)
    return rng.permutation(rest), val


def _standardise(X_train: np.ndarray, X_test: np.ndarray):
    """Per-channel (axis 1) standardisation with the training set's statistics."""
    axes = (0,) + tuple(range(2, X_train.ndim))
    mean = X_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = X_train.std(axis=axes, keepdims=True, dtype=np.float64)
    std[std == 0] = 1.0
    mean, scale = mean.astype(np.float32), (1.0 / std).astype(np.float32)
    return [((X.astype(np.float32) - mean) * scale).astype(np.float32, copy=False)
            for X in (X_train, X_test)]


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits: 1,258 training and 539 test images, (N, 1, 8, 8).

    The split is stratified, drawn with seed 0; pixels are divided by 16 and standardised
    with the training mean and std.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float64)[:, None] / 16.0
    train, test = _stratified_split(bunch.target, 0.3, seed=0)
    X_train, X_test = _standardise(images[train], images[test])
    return _finish("digits", X_train, bunch.target[train], X_test, bunch.target[test],
                   tuple(range(10)),
                   "scikit-learn's 8x8 digits; a stratified 30% test set (539 images, seed 0), "
                   "1,258 training images; pixels / 16, standardised with the training "
                   "mean and std")


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzipped or not): a big-endian header, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, but the file holds "
                         f"{len(data) - offset} values (truncated download?)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(path=None) -> Path:
    """The directory holding the four Fashion-MNIST files (see the module docstring).

    Raises
    ------
    DatasetNotFoundError
        Listing where it looked and how to get the files.
    """
    environment = None if path is not None else os.environ.get(FASHION_MNIST_ENV)
    if path is not None:
        candidates = [("the path argument", Path(path))]
    else:
        candidates = []
        if environment:   # an empty value would name the current directory
            candidates.append((f"${FASHION_MNIST_ENV}", Path(environment)))
        candidates += [("the default location", Path(d)) for d in FASHION_MNIST_DIRS]
    # Why the directory $BNRS_FASHION_MNIST names was passed over, for the warning.
    refused = "empty" if environment == "" else None
    looked = [f"  '' (${FASHION_MNIST_ENV}): empty"] if refused else []
    for origin, directory in candidates:
        missing = [stem for stem in FASHION_MNIST_FILES.values()
                   if _find_file(directory, stem) is None]
        if not missing:
            if refused:
                warnings.warn(
                    f"{FASHION_MNIST_ENV}: expected a directory holding the Fashion-MNIST "
                    f"files, got {environment!r} ({refused}); ignored, using {directory}",
                    RuntimeWarning, stacklevel=3)
            return directory
        why = ("no such directory" if not directory.is_dir()
               else "missing " + ", ".join(m + "[.gz]" for m in missing))
        if origin == f"${FASHION_MNIST_ENV}":
            refused = why
        looked.append(f"  {directory} ({origin}): {why}")
    raise DatasetNotFoundError("Fashion-MNIST not found. Looked in:\n" + "\n".join(looked)
                               + "\n" + FASHION_MNIST_HOWTO)


def load_fashion_mnist(path=None) -> Dataset:
    """Fashion-MNIST: 60,000 training and 10,000 test images, (N, 1, 28, 28), float32.

    Parameters
    ----------
    path : str or Path, optional
        A directory with the four idx files (gzipped or not). By default
        ``$BNRS_FASHION_MNIST``, then ``/usr/share/datasets/fashion-mnist``.

    Returns
    -------
    Dataset
        The official split; pixels / 255, standardised with the training mean and std.

    Raises
    ------
    DatasetNotFoundError
        A FileNotFoundError saying where it looked and how to get the files.
    """
    directory = find_fashion_mnist(path)
    arrays = {key: _read_idx(_find_file(directory, stem))
              for key, stem in FASHION_MNIST_FILES.items()}
    for part in ("train", "test"):
        if len(arrays[f"{part}_images"]) != len(arrays[f"{part}_labels"]):
            raise ValueError(f"{directory}: {part} images and labels differ in number")
    train = arrays["train_images"].astype(np.float32)[:, None] / 255.0
    test = arrays["test_images"].astype(np.float32)[:, None] / 255.0
    X_train, X_test = _standardise(train, test)
    return _finish("fashion-mnist", X_train, arrays["train_labels"], X_test,
                   arrays["test_labels"], FASHION_MNIST_CLASSES,
                   "Fashion-MNIST, the official 60,000 training / 10,000 test split; "
                   "pixels / 255, standardised with the training mean and std")


def load_npz(path) -> Dataset:
    """Your own data: a .npz with ``X`` and ``y`` (and optionally ``X_test``, ``y_test``).

    ``X`` may be (N, H, W) (one channel is added), (N, C, H, W) or (N, n_features) (for
    dense-only architectures). Without a test set a stratified 20% is held out (seed 0).
    Standardised per channel with the training statistics.

    Raises
    ------
    ValueError
        Naming the file, when the data cannot be trained on: NaN or infinite values in
        ``X`` or ``X_test``; a shape other than those above or an empty array; labels that
        are not integers (integral floats such as 1.0 are taken) or strings; fewer than
        2 classes in ``y``; ``X`` and ``y`` (or ``X_test`` and ``y_test``) of different
        lengths; test labels absent from ``y``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a .npz with arrays X and y)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):   # np.load read a .npy file
        # A ValueError: the file's content is wrong, not the type of an argument.
        raise ValueError(f"{path}: expected a .npz archive with arrays X and y, "  # noqa: TRY004
                         "found a single .npy array")
    with archive:
        if "X" not in archive or "y" not in archive:
            raise ValueError(f"{path}: expected arrays 'X' and 'y', found {sorted(archive)}")
        try:
            X, y = archive["X"], archive["y"]
            X_test, y_test = archive.get("X_test"), archive.get("y_test")
        except ValueError as error:   # object arrays need pickle, refused for safety
            raise ValueError(f"{path}: {error}") from None
    if (X_test is None) != (y_test is None):
        raise ValueError(f"{path}: give both X_test and y_test, or neither")
    X, y = _as_samples(X, "X", path), _as_labels(y, "y", path)
    _check_pair(X, y, "X", "y", path)
    if len(np.unique(y)) < 2:
        raise ValueError(f"{path}: y has a single class ({y[0]!r}); a classification "
                         "study needs at least 2")
    if X_test is None:
        train, test = _stratified_split(y, 0.2, seed=0)
        X, X_test, y, y_test = X[train], X[test], y[train], y[test]
        split = "a stratified 20% test set (seed 0)"
    else:
        X_test, y_test = _as_samples(X_test, "X_test", path), _as_labels(y_test, "y_test",
                                                                         path)
        _check_pair(X_test, y_test, "X_test", "y_test", path)
        if y_test.dtype.kind != y.dtype.kind and "U" in (y.dtype.kind, y_test.dtype.kind):
            raise ValueError(f"{path}: y holds {_label_kind(y)} but y_test holds "
                             f"{_label_kind(y_test)}")
        if X_test.shape[1:] != X.shape[1:]:
            raise ValueError(f"{path}: X_test samples {X_test.shape[1:]} differ from X's "
                             f"{X.shape[1:]}")
        split = "the file's own X_test/y_test"
    X_train, X_test = _standardise(X.astype(np.float64), X_test.astype(np.float64))
    return _finish(f"npz:{path.name}", X_train, y, X_test, y_test, None,
                   f"{path.name}: {len(X_train)} training / {len(X_test)} test samples "
                   f"({split}); standardised per channel with the training statistics")


def _as_samples(X, name, path) -> np.ndarray:
    """``X`` as (N, C, H, W) or (N, n_features): numeric, finite, no empty dimension."""
    X = np.asarray(X)
    if X.dtype.kind not in "fiub":
        raise ValueError(f"{path}: {name} must be numeric, got dtype {X.dtype}")
    if X.ndim not in (2, 3, 4):
        raise ValueError(f"{path}: {name} must be (N, H, W), (N, C, H, W) or "
                         f"(N, n_features), got shape {X.shape}")
    if 0 in X.shape:
        raise ValueError(f"{path}: {name} is empty, shape {X.shape}")
    if X.dtype.kind == "f":
        bad = ~np.isfinite(X)
        if bad.any():
            n_nan = int(np.isnan(X).sum())
            counts = " and ".join(text for count, text in (
                (n_nan, f"{n_nan} NaN"), (bad.sum() - n_nan, f"{bad.sum() - n_nan} infinite"))
                if count)
            raise ValueError(f"{path}: {name} has {counts} values (first in sample "
                             f"{int(np.argwhere(bad)[0][0])}); remove or impute them first")
    return X[:, None] if X.ndim == 3 else X


def _label_kind(y: np.ndarray) -> str:
    return "strings" if y.dtype.kind in "US" else "numbers"


def _as_labels(y, name, path) -> np.ndarray:
    """``y`` as a 1-D array of class labels: integers (integral floats such as 1.0 too) or
    strings; a fractional or non-finite label means a regression target, not a class."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{path}: {name} must be one label per sample, shape (N,), got "
                         f"shape {y.shape}")
    if y.dtype.kind in "US":
        return y
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise ValueError(f"{path}: {name} has NaN or infinite labels; labels must be "
                             "integers or strings")
        if (y != np.round(y)).any():
            raise ValueError(f"{path}: {name} has fractional labels (e.g. "
                             f"{y[y != np.round(y)][0]!r}); labels must be integers or "
                             "strings (the study classifies; it does not regress)")
        return y.astype(np.int64)
    if y.dtype.kind not in "iub":
        raise ValueError(f"{path}: {name} must hold integer or string labels, got dtype "
                         f"{y.dtype}")
    return y


def _check_pair(X: np.ndarray, y: np.ndarray, x_name: str, y_name: str, path) -> None:
    if len(X) != len(y):
        raise ValueError(f"{path}: {x_name} has {len(X)} samples but {y_name} has "
                         f"{len(y)} labels")


def load_dataset(name_or_path) -> Dataset:
    """``digits``, ``fashion-mnist`` (or ``fashion-mnist:DIR``), a .npz file, or a directory
    with the Fashion-MNIST files."""
    text = str(name_or_path)
    if text == "digits":
        return load_digits()
    if text == "fashion-mnist":
        return load_fashion_mnist()
    if text.startswith("fashion-mnist:"):
        return load_fashion_mnist(text.split(":", 1)[1])
    path = Path(text)
    if path.is_dir():
        return load_fashion_mnist(path)
    if path.suffix == ".npz" or path.is_file():
        return load_npz(path)
    raise ValueError(f"dataset: expected 'digits', 'fashion-mnist', a .npz file or a "
                     f"directory with the Fashion-MNIST files, got {text!r}")
