//! Dropout bindings.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{buffer, run, slice, to_numpy, zeros};
use crate::kernels::dropout;

/// Inverted dropout over units of `unit` consecutive elements; also its own backward.
#[pyfunction]
fn dropout_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    p: f32,
    seed: u64,
    unit: usize,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    crate::kernels::nonzero("input", input.shape())?;
    let x = slice(&input, "input")?;
    let shape = input.shape().to_vec();
    let out = run(py, x.len(), || {
        let mut out = buffer("output", &shape)?;
        dropout::forward(x, p, seed, unit, &mut out)?;
        Ok(out)
    })?;
    to_numpy(py, out, &shape)
}

/// The keep decisions (1 = kept) of units 0..n.
#[pyfunction]
fn dropout_mask<'py>(
    py: Python<'py>,
    n: usize,
    p: f32,
    seed: u64,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let keep = run(py, n, || {
        let mut keep = zeros::<u8>("mask", n)?;
        dropout::mask(p, seed, &mut keep)?;
        Ok(keep)
    })?;
    to_numpy(py, keep, &[n])
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dropout_forward, m)?)?;
    m.add_function(wrap_pyfunction!(dropout_mask, m)?)?;
    Ok(())
}
