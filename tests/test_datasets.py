"""bnrs.datasets: digits, Fashion-MNIST (when installed), the search path, .npz files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from bnrs import datasets


def _write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def _fake_fashion(directory, n_train=30, n_test=20, compress=True) -> None:
    rng = np.random.default_rng(0)
    files = datasets.FASHION_MNIST_FILES
    _write_idx(directory / files["train_images"],
               rng.integers(0, 256, (n_train, 28, 28)), compress)
    _write_idx(directory / files["train_labels"], np.arange(n_train) % 10, compress)
    _write_idx(directory / files["test_images"],
               rng.integers(0, 256, (n_test, 28, 28)), compress)
    _write_idx(directory / files["test_labels"], np.arange(n_test) % 10, compress)


def test_digits_split_and_preprocessing():
    data = datasets.load_digits()
    assert data.X_train.shape == (1258, 1, 8, 8) and data.X_test.shape == (539, 1, 8, 8)
    assert data.X_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert set(np.unique(data.y_train)) == set(range(10)) == set(np.unique(data.y_test))
    assert abs(float(data.X_train.mean())) < 1e-4 and abs(float(data.X_train.std()) - 1) < 1e-3
    assert data.input_shape == (1, 8, 8) and data.n_classes == 10
    # Fixed: the same split and fingerprint every time.
    assert datasets.load_digits().fingerprint == data.fingerprint


def test_fashion_mnist_when_installed():
    try:
        data = datasets.load_fashion_mnist()
    except datasets.DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    assert data.X_train.shape == (60000, 1, 28, 28) and data.X_test.shape == (10000, 1, 28, 28)
    assert data.X_train.dtype == np.float32 and data.y_test.dtype == np.int64
    assert np.array_equal(np.unique(data.y_train), np.arange(10))
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert abs(float(data.X_train.mean())) < 1e-3


def test_fashion_mnist_absent_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (str(tmp_path / "neither"),))
    with pytest.raises(datasets.DatasetNotFoundError) as error:
        datasets.load_fashion_mnist()
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "BNRS_FASHION_MNIST" in message and "zalandoresearch/fashion-mnist" in message
    assert str(tmp_path / "nowhere") in message and "no such directory" in message
    assert isinstance(error.value, FileNotFoundError)


@pytest.mark.parametrize("variable, why", [("nowhere", "no such directory"),
                                           ("", "empty"),
                                           ("present", "missing t10k-labels-idx1-ubyte[.gz]")])
def test_fashion_mnist_variable_passed_over_is_a_warning(tmp_path, monkeypatch, variable, why):
    # Once passed over without a word when the default location had the files.
    (tmp_path / "default").mkdir()
    _fake_fashion(tmp_path / "default")
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (str(tmp_path / "default"),))
    if variable == "present":
        (tmp_path / variable).mkdir()
        _fake_fashion(tmp_path / variable)
        (tmp_path / variable / "t10k-labels-idx1-ubyte.gz").unlink()
    value = str(tmp_path / variable) if variable else ""
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, value)
    with pytest.warns(RuntimeWarning) as caught:
        assert datasets.find_fashion_mnist() == tmp_path / "default"
    assert [str(w.message) for w in caught] == [
        (f"BNRS_FASHION_MNIST: expected a directory holding the Fashion-MNIST files, got "
         f"{value!r} ({why}); ignored, using {tmp_path / 'default'}")]


def test_fashion_mnist_partial_directory_names_missing_files(tmp_path):
    _fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(datasets.DatasetNotFoundError, match=r"missing t10k-labels-idx1-ubyte"):
        datasets.load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_environment_variable(tmp_path, monkeypatch, compress):
    _fake_fashion(tmp_path, compress=compress)
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))
    data = datasets.load_fashion_mnist()
    assert data.X_train.shape == (30, 1, 28, 28) and data.X_test.shape == (20, 1, 28, 28)
    assert data.y_train.tolist() == [i % 10 for i in range(30)]
    # A directory argument and the CLI's forms find the same files.
    assert datasets.load_fashion_mnist(tmp_path).fingerprint == data.fingerprint
    assert datasets.load_dataset(str(tmp_path)).fingerprint == data.fingerprint
    assert datasets.load_dataset(f"fashion-mnist:{tmp_path}").fingerprint == data.fingerprint


def test_truncated_idx_file_is_reported(tmp_path):
    _fake_fashion(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        datasets.load_fashion_mnist(tmp_path)


def test_npz_without_test_set(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 6, 6)) * 5 + 3
    y = np.repeat(["cat", "dog"], 50)
    np.savez(tmp_path / "mine.npz", X=X, y=y)
    data = datasets.load_dataset(tmp_path / "mine.npz")
    assert data.name == "npz:mine.npz"
    assert data.X_train.shape == (80, 1, 6, 6) and data.X_test.shape == (20, 1, 6, 6)
    assert data.classes == ("cat", "dog")
    assert np.bincount(data.y_test).tolist() == [10, 10]
    assert abs(float(data.X_train.mean())) < 1e-4


def test_npz_with_test_set_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", X=rng.standard_normal((10, 2, 4, 4)), y=np.arange(10) % 2,
             X_test=rng.standard_normal((4, 2, 4, 4)), y_test=np.array([0, 1, 1, 0]))
    data = datasets.load_npz(tmp_path / "a.npz")
    assert data.X_train.shape == (10, 2, 4, 4) and data.X_test.shape == (4, 2, 4, 4)
    np.savez(tmp_path / "b.npz", X=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="expected arrays 'X' and 'y'"):
        datasets.load_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", X=np.zeros((4, 3)), y=np.zeros(5))
    with pytest.raises(ValueError, match="4 samples but y has 5"):
        datasets.load_npz(tmp_path / "c.npz")
    with pytest.raises(FileNotFoundError):
        datasets.load_npz(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="expected 'digits', 'fashion-mnist'"):
        datasets.load_dataset("mnist")


def test_split_indices_fixed_stratified_disjoint():
    y = np.repeat(np.arange(5), 40)
    train, val = datasets.split_indices(y, n_val=50, n_train=100)
    assert len(val) == 50 and len(train) == 100
    assert not set(train) & set(val)
    assert np.bincount(y[val]).tolist() == [10] * 5
    assert np.bincount(y[train]).tolist() == [20] * 5
    again_train, again_val = datasets.split_indices(y, 50, 100)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    everything, _ = datasets.split_indices(y, 50, None)
    assert len(everything) == 150
    with pytest.raises(ValueError, match="n_val"):
        datasets.split_indices(y, 0, None)


def _images(n=40, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 6, 6))


_TWO_CLASSES = np.arange(40) % 2


@pytest.mark.parametrize("arrays, message", [
    ({"X": np.where(np.arange(40)[:, None, None] == 7, np.nan, _images()),
      "y": _TWO_CLASSES}, r"X has 36 NaN values \(first in sample 7\)"),
    ({"X": _images(), "y": _TWO_CLASSES, "X_test": np.full((4, 6, 6), np.inf),
      "y_test": np.arange(4) % 2}, "X_test has 144 infinite values"),
    ({"X": _images(), "y": np.zeros(40, dtype=int)}, "single class"),
    ({"X": _images(), "y": np.linspace(0, 1, 40)}, "fractional labels"),
    ({"X": _images(), "y": np.where(np.arange(40) == 3, np.nan, _TWO_CLASSES)},
     "NaN or infinite labels"),
    ({"X": _images(), "y": np.zeros((40, 2), dtype=int)}, r"one label per sample.*\(40, 2\)"),
    ({"X": _images(), "y": _TWO_CLASSES, "X_test": _images(4), "y_test": np.arange(5) % 2},
     "X_test has 4 samples but y_test has 5"),
    ({"X": np.zeros((0, 6, 6)), "y": np.zeros(0, dtype=int)}, r"X is empty"),
    ({"X": np.zeros((40, 2, 3, 4, 5)), "y": _TWO_CLASSES}, r"got shape \(40, 2, 3, 4, 5\)"),
])
def test_npz_that_cannot_be_trained_on_is_refused_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as error:
        datasets.load_dataset(str(path))
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_npz_integral_float_labels_are_classes(tmp_path):
    np.savez(tmp_path / "a.npz", X=_images(), y=(np.arange(40) % 2).astype(float))
    data = datasets.load_npz(tmp_path / "a.npz")
    assert data.classes == (0, 1) and data.y_train.dtype == np.int64


@pytest.mark.parametrize("content", [b"not a zip archive at all", None])
def test_a_file_that_is_not_an_npz_archive(tmp_path, content):
    path = tmp_path / "mine.npz"
    if content is None:
        np.save(tmp_path / "array.npy", np.zeros(3))
        (tmp_path / "array.npy").rename(path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"mine\.npz: (not a readable|expected a \.npz)"):
        datasets.load_npz(path)
