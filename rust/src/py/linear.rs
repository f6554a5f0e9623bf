//! Linear-layer bindings.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{buffer, check_shape, run, slice, to_numpy};
use crate::kernels::linear::{self, LinearParams};

type Array<'py> = Bound<'py, PyArrayDyn<f32>>;

/// y = x·Wᵀ + b.
#[pyfunction]
#[pyo3(signature = (input, weight, bias))]
fn linear_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    weight: PyReadonlyArrayDyn<'py, f32>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
) -> PyResult<Array<'py>> {
    let p = LinearParams::new(input.shape(), weight.shape())?;
    if let Some(b) = &bias {
        check_shape(b, "bias", &[p.out_features])?;
    }
    let (x, w) = (slice(&input, "input")?, slice(&weight, "weight")?);
    let b = bias.as_ref().map(|b| slice(b, "bias")).transpose()?;
    let shape = [p.batch, p.out_features];
    let out = run(
        py,
        p.batch
            .saturating_mul(p.in_features)
            .saturating_mul(p.out_features),
        || {
            let mut out = buffer("output", &shape)?;
            linear::forward(&p, x, w, b, &mut out)?;
            Ok(out)
        },
    )?;
    to_numpy(py, out, &shape)
}

/// (grad_input or None, grad_weight, grad_bias or None).
#[pyfunction]
fn linear_backward<'py>(
    py: Python<'py>,
    grad_output: PyReadonlyArrayDyn<'py, f32>,
    input: PyReadonlyArrayDyn<'py, f32>,
    weight: PyReadonlyArrayDyn<'py, f32>,
    bias: bool,
    input_grad: bool,
) -> PyResult<(Option<Array<'py>>, Array<'py>, Option<Array<'py>>)> {
    let p = LinearParams::new(input.shape(), weight.shape())?;
    check_shape(&grad_output, "grad_output", &[p.batch, p.out_features])?;
    let (gy, x, w) = (
        slice(&grad_output, "grad_output")?,
        slice(&input, "input")?,
        slice(&weight, "weight")?,
    );
    let (in_shape, w_shape) = (input.shape().to_vec(), weight.shape().to_vec());
    let (gx, gw, gb) = run(
        py,
        p.batch
            .saturating_mul(p.in_features)
            .saturating_mul(2 * p.out_features),
        || {
            let mut gx = if input_grad {
                Some(buffer("grad_input", &in_shape)?)
            } else {
                None
            };
            let mut gw = buffer("grad_weight", &w_shape)?;
            let mut gb = if bias {
                Some(buffer("grad_bias", &[p.out_features])?)
            } else {
                None
            };
            linear::backward(&p, gy, x, w, gx.as_deref_mut(), &mut gw, gb.as_deref_mut())?;
            Ok((gx, gw, gb))
        },
    )?;
    Ok((
        gx.map(|g| to_numpy(py, g, &in_shape)).transpose()?,
        to_numpy(py, gw, &w_shape)?,
        gb.map(|g| to_numpy(py, g, &[p.out_features])).transpose()?,
    ))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(linear_forward, m)?)?;
    m.add_function(wrap_pyfunction!(linear_backward, m)?)?;
    Ok(())
}
