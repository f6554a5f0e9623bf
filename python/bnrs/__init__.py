"""bnrs: fast CPU training of convolutional networks with batch normalization and dropout.

Rust kernels (multithreaded, AVX-512 or AVX2+FMA chosen at run time) exposed to NumPy. Start with
:mod:`bnrs.functional` (PyTorch's function names) or :mod:`bnrs.nn` (layers).
"""

import warnings as _warnings

from . import _core, functional, nn, optim
from ._core import (__version__, cached_memory, get_num_threads, set_num_threads, set_simd,
                    simd_backend, simd_levels)


def release_memory() -> int:
    """Free the memory bnrs keeps for reuse; returns the bytes freed.

    That is the memory of freed large outputs (:func:`cached_memory` says how much) and
    the activation and gradient buffers each model's one-call training step keeps from
    one step to the next (its next step makes them again).
    """
    from . import executor

    return _core.release_memory() + executor.release_buffers()


def _warn_about_environment() -> None:
    # Issued here rather than by the extension so that the warning points at the user's
    # import line (stacklevel: this function, the package, then importlib is skipped).
    for message in _core._environment_warnings():
        _warnings.warn(message, RuntimeWarning, stacklevel=3)


_warn_about_environment()


def __getattr__(name: str):
    # The estimator imports scikit-learn (about a second); load it on first use only.
    if name in ("CNNClassifier", "CNNRegressor"):
        from . import estimator

        return getattr(estimator, name)
    raise AttributeError(f"module 'bnrs' has no attribute {name!r}")


__all__ = [
    "CNNClassifier",
    "CNNRegressor",
    "__version__",
    "functional",
    "nn",
    "optim",
    "cached_memory",
    "get_num_threads",
    "release_memory",
    "set_num_threads",
    "set_simd",
    "simd_backend",
    "simd_levels",
]
