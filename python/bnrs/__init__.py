"""bnrs: fast CPU training of convolutional networks with batch normalization and dropout.

Rust kernels (multithreaded, AVX2/FMA chosen at run time) exposed to NumPy. Start with
:mod:`bnrs.functional` (PyTorch's function names) or :mod:`bnrs.nn` (layers).
"""

from . import _core, functional, nn, optim
from ._core import __version__, get_num_threads, set_num_threads, simd_backend

__all__ = [
    "__version__",
    "functional",
    "nn",
    "optim",
    "get_num_threads",
    "set_num_threads",
    "simd_backend",
]
