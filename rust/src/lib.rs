//! bnrs: CPU kernels for convolutional networks with batch normalization and dropout.
//!
//! The kernels in [`kernels`] are plain Rust on slices (NCHW, float32, C-contiguous);
//! the Python extension `bnrs._core` (feature `python`) is a thin layer over them.

pub mod buffers;
pub mod clock;
pub mod error;
pub mod evaluate;
pub mod kernels;
pub mod memory;
pub mod parallel;
pub mod simd;
pub mod step;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
