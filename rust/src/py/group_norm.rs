//! Group-norm bindings (also LayerNorm and InstanceNorm, which the Python layer maps onto it).

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{check_shape, run_kernel, slice, NormGradArrays, NormGrads, Output};
use crate::kernels::group_norm::{self, GroupNormParams};

type Array<'py> = Bound<'py, PyArrayDyn<f32>>;

/// Group-norm forward: (output, mean, rstd), the statistics of shape (N, num_groups).
#[pyfunction]
#[pyo3(signature = (input, num_groups, weight, bias, eps))]
fn group_norm_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    num_groups: i64,
    weight: Option<PyReadonlyArrayDyn<'py, f32>>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
    eps: f32,
) -> PyResult<(Array<'py>, Array<'py>, Array<'py>)> {
    let p = GroupNormParams::new(input.shape(), num_groups, eps)?;
    let c = [p.channels];
    for (arr, name) in [(&weight, "weight"), (&bias, "bias")] {
        if let Some(a) = arr {
            check_shape(a, name, &c)?;
        }
    }
    let x = slice(&input, "input")?;
    let gamma = weight.as_ref().map(|w| slice(w, "weight")).transpose()?;
    let beta = bias.as_ref().map(|b| slice(b, "bias")).transpose()?;
    let stats_shape = [p.batch, p.groups];
    let mut y = Output::new(py, "output", input.shape())?;
    let mut mean = Output::new(py, "mean", &stats_shape)?;
    let mut rstd = Output::new(py, "rstd", &stats_shape)?;
    let (y_data, mean_data, rstd_data) = (y.data(), mean.data(), rstd.data());
    run_kernel(py, x.len(), || {
        group_norm::forward(&p, x, gamma, beta, y_data, mean_data, rstd_data)
    })?;
    Ok((y.into_array(), mean.into_array(), rstd.into_array()))
}

/// Group-norm backward: (grad_input, grad_weight or None, grad_bias or None).
#[pyfunction]
#[pyo3(signature = (grad_output, input, num_groups, weight, mean, rstd))]
fn group_norm_backward<'py>(
    py: Python<'py>,
    grad_output: PyReadonlyArrayDyn<'py, f32>,
    input: PyReadonlyArrayDyn<'py, f32>,
    num_groups: i64,
    weight: Option<PyReadonlyArrayDyn<'py, f32>>,
    mean: PyReadonlyArrayDyn<'py, f32>,
    rstd: PyReadonlyArrayDyn<'py, f32>,
) -> PyResult<NormGradArrays<'py>> {
    let p = GroupNormParams::new(input.shape(), num_groups, 0.0)?;
    let c = [p.channels];
    let stats_shape = [p.batch, p.groups];
    check_shape(&grad_output, "grad_output", input.shape())?;
    check_shape(&mean, "mean", &stats_shape)?;
    check_shape(&rstd, "rstd", &stats_shape)?;
    if let Some(w) = &weight {
        check_shape(w, "weight", &c)?;
    }
    let (gy, x) = (slice(&grad_output, "grad_output")?, slice(&input, "input")?);
    let (mean_data, rstd_data) = (slice(&mean, "mean")?, slice(&rstd, "rstd")?);
    let gamma = weight.as_ref().map(|w| slice(w, "weight")).transpose()?;
    let affine = gamma.is_some();
    let mut grads = NormGrads::new(py, input.shape(), affine.then_some(p.channels))?;
    let (gx_data, gg_data, gb_data) = grads.data();
    run_kernel(py, x.len(), || {
        group_norm::backward(
            &p, gy, x, gamma, mean_data, rstd_data, gx_data, gg_data, gb_data,
        )
    })?;
    Ok(grads.into_arrays())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(group_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(group_norm_backward, m)?)?;
    Ok(())
}
