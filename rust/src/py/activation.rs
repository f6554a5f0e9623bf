//! Activation bindings.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{check_shape, run_kernel, slice, Output};
use crate::kernels::activation::{self, Activation};

type Array<'py> = Bound<'py, PyArrayDyn<f32>>;

/// y = f(x) for f in relu, leaky_relu, sigmoid, tanh.
#[pyfunction]
fn activation_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    name: &str,
    negative_slope: f32,
) -> PyResult<Array<'py>> {
    let act = Activation::from_name(name, negative_slope)?;
    let x = slice(&input, "input")?;
    let shape = input.shape().to_vec();
    let mut out = Output::new(py, "output", &shape)?;
    let out_data = out.data();
    run_kernel(py, x.len(), || activation::forward(act, x, out_data))?;
    Ok(out.into_array())
}

/// Input gradient from the forward's input (relu, leaky_relu) or output (sigmoid, tanh).
#[pyfunction]
fn activation_backward<'py>(
    py: Python<'py>,
    grad_output: PyReadonlyArrayDyn<'py, f32>,
    saved: PyReadonlyArrayDyn<'py, f32>,
    name: &str,
    negative_slope: f32,
) -> PyResult<Array<'py>> {
    let act = Activation::from_name(name, negative_slope)?;
    let saved_name = if matches!(act, Activation::Sigmoid | Activation::Tanh) {
        "output"
    } else {
        "input"
    };
    // The saved tensor comes from the forward: the gradient is checked against it.
    check_shape(&grad_output, "grad_output", saved.shape())?;
    let (g, s) = (
        slice(&grad_output, "grad_output")?,
        slice(&saved, saved_name)?,
    );
    let shape = grad_output.shape().to_vec();
    let mut out = Output::new(py, "grad_input", &shape)?;
    let out_data = out.data();
    run_kernel(py, g.len(), || activation::backward(act, g, s, out_data))?;
    Ok(out.into_array())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(activation_forward, m)?)?;
    m.add_function(wrap_pyfunction!(activation_backward, m)?)?;
    Ok(())
}
