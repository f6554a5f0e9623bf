//! Log-softmax and cross-entropy bindings.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{check_shape, run_kernel, slice, Output};
use crate::kernels::loss::{self, ClassesParams};

type Array<'py> = Bound<'py, PyArrayDyn<f32>>;

/// Row-wise log-softmax of (N, C) logits.
#[pyfunction]
fn log_softmax_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
) -> PyResult<Array<'py>> {
    let p = ClassesParams::new(input.shape())?;
    let x = slice(&input, "input")?;
    let shape = input.shape().to_vec();
    let mut out = Output::new(py, "output", &shape)?;
    let out_data = out.data();
    run_kernel(py, x.len(), || loss::log_softmax(&p, x, out_data))?;
    Ok(out.into_array())
}

/// Gradient of log-softmax from its output.
#[pyfunction]
fn log_softmax_backward<'py>(
    py: Python<'py>,
    grad_output: PyReadonlyArrayDyn<'py, f32>,
    output: PyReadonlyArrayDyn<'py, f32>,
) -> PyResult<Array<'py>> {
    let p = ClassesParams::named("output", output.shape())?;
    check_shape(&grad_output, "grad_output", output.shape())?;
    let (g, y) = (
        slice(&grad_output, "grad_output")?,
        slice(&output, "output")?,
    );
    let shape = output.shape().to_vec();
    let mut out = Output::new(py, "grad_input", &shape)?;
    let out_data = out.data();
    run_kernel(py, g.len(), || {
        loss::log_softmax_backward(&p, g, y, out_data)
    })?;
    Ok(out.into_array())
}

fn targets<'a>(p: &ClassesParams, target: &'a PyReadonlyArrayDyn<'_, i64>) -> PyResult<&'a [i64]> {
    check_shape(target, "target", &[p.batch])?;
    slice(target, "target")
}

fn weights<'a>(
    p: &ClassesParams,
    weight: &'a Option<PyReadonlyArrayDyn<'_, f64>>,
) -> PyResult<Option<&'a [f64]>> {
    weight
        .as_ref()
        .map(|w| {
            check_shape(w, "weight", &[p.batch])?;
            slice(w, "weight")
        })
        .transpose()
}

/// Mean (or weighted mean) cross-entropy of (N, C) logits against N class indices.
#[pyfunction]
#[pyo3(signature = (input, target, weight=None))]
fn cross_entropy_forward(
    py: Python<'_>,
    input: PyReadonlyArrayDyn<'_, f32>,
    target: PyReadonlyArrayDyn<'_, i64>,
    weight: Option<PyReadonlyArrayDyn<'_, f64>>,
) -> PyResult<f64> {
    let p = ClassesParams::new(input.shape())?;
    let (x, t) = (slice(&input, "input")?, targets(&p, &target)?);
    let w = weights(&p, &weight)?;
    run_kernel(py, x.len(), || loss::cross_entropy(&p, x, t, w))
}

/// Gradient of the mean (or weighted mean) cross-entropy w.r.t. the logits.
#[pyfunction]
#[pyo3(signature = (input, target, weight=None))]
fn cross_entropy_backward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    target: PyReadonlyArrayDyn<'py, i64>,
    weight: Option<PyReadonlyArrayDyn<'py, f64>>,
) -> PyResult<Array<'py>> {
    let p = ClassesParams::new(input.shape())?;
    let (x, t) = (slice(&input, "input")?, targets(&p, &target)?);
    let w = weights(&p, &weight)?;
    let shape = input.shape().to_vec();
    let mut out = Output::new(py, "grad_input", &shape)?;
    let out_data = out.data();
    run_kernel(py, x.len(), || {
        loss::cross_entropy_backward(&p, x, t, w, out_data)
    })?;
    Ok(out.into_array())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(log_softmax_forward, m)?)?;
    m.add_function(wrap_pyfunction!(log_softmax_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cross_entropy_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cross_entropy_backward, m)?)?;
    Ok(())
}
