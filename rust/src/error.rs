//! One error type for every kernel, and its one mapping to Python exceptions.

use std::fmt;

/// Why a kernel refused its arguments. Every variant names the argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A value, shape or size the operation cannot take (Python `ValueError`).
    Invalid {
        /// The argument, as the Python API names it.
        arg: &'static str,
        /// What was given.
        got: String,
        /// What the operation expects.
        expected: String,
    },
    /// The output would not fit in memory, or its size overflows (Python `MemoryError`).
    TooLarge {
        /// The argument whose value asked for too much, as the Python API names it; or,
        /// when no one argument is at fault, what could not be allocated.
        arg: &'static str,
        /// What was asked for, and why it cannot be had.
        reason: String,
    },
    /// A kernel's scratch buffer would not fit in memory (Python `MemoryError`).
    ScratchTooLarge {
        /// What the buffer is for.
        what: &'static str,
        /// Its size and why it cannot be had.
        detail: String,
    },
}

/// Result of a kernel.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Build an [`Error::Invalid`].
    pub fn invalid(arg: &'static str, got: impl fmt::Display, expected: impl fmt::Display) -> Self {
        Error::Invalid {
            arg,
            got: got.to_string(),
            expected: expected.to_string(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid { arg, got, expected } => {
                write!(f, "{arg}: expected {expected}, got {got}")
            }
            Error::TooLarge { arg, reason } => write!(f, "{arg}: {reason}"),
            Error::ScratchTooLarge { what, detail } => {
                write!(f, "{what}: scratch buffer {detail}")
            }
        }
    }
}

impl std::error::Error for Error {}

/// `ValueError` for arguments the kernel refuses, `MemoryError` for outputs too large.
#[cfg(feature = "python")]
impl From<Error> for pyo3::PyErr {
    fn from(err: Error) -> pyo3::PyErr {
        use pyo3::exceptions::{PyMemoryError, PyValueError};
        match err {
            Error::Invalid { .. } => PyValueError::new_err(err.to_string()),
            Error::TooLarge { .. } | Error::ScratchTooLarge { .. } => {
                PyMemoryError::new_err(err.to_string())
            }
        }
    }
}

/// Check that a slice has the length its shape implies.
pub fn check_len(arg: &'static str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::invalid(
            arg,
            format!("{len} elements"),
            format!("{expected} elements"),
        ))
    }
}

/// Multiply sizes, failing with [`Error::TooLarge`] instead of overflowing.
pub fn checked_size(what: &'static str, dims: &[usize]) -> Result<usize> {
    let too_large = |elements: String| Error::TooLarge {
        arg: what,
        reason: format!("{elements} elements is too large to allocate"),
    };
    let mut total: usize = 1;
    for &d in dims {
        total = total
            .checked_mul(d)
            .ok_or_else(|| too_large(join_dims(dims)))?;
    }
    // Beyond isize::MAX bytes no allocation can succeed.
    if total > (isize::MAX as usize) / std::mem::size_of::<f32>() {
        return Err(too_large(total.to_string()));
    }
    Ok(total)
}

/// Dimensions as `2×3×4`.
pub fn join_dims(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}
