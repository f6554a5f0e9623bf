//! Dropout bindings.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{run_kernel, slice, Output};
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
    let mut out = Output::new(py, "output", &shape)?;
    let out_data = out.data();
    run_kernel(py, x.len(), || dropout::forward(x, p, seed, unit, out_data))?;
    Ok(out.into_array())
}

/// The keep decisions (1 = kept) of units 0..n.
#[pyfunction]
fn dropout_mask<'py>(
    py: Python<'py>,
    n: usize,
    p: f32,
    seed: u64,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let mut keep = Output::sized_by(py, "mask", &[n], "n")?;
    let keep_data = keep.data();
    run_kernel(py, n, || dropout::mask(p, seed, keep_data))?;
    Ok(keep.into_array())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dropout_forward, m)?)?;
    m.add_function(wrap_pyfunction!(dropout_mask, m)?)?;
    Ok(())
}
