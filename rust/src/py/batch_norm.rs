//! Batch-norm bindings.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::{
    check_shape, readable, run_kernel, slice, NormGradArrays, NormGrads, Output, RunningBorrow,
};
use crate::kernels::batch_norm::{self, BatchNormParams};

type Array<'py> = Bound<'py, PyArrayDyn<f32>>;

/// Batch-norm forward: (output, save_mean, save_invstd); updates the running statistics in
/// place when training with them.
#[pyfunction]
#[pyo3(signature = (input, weight, bias, running_mean, running_var, training, momentum, eps))]
#[allow(clippy::too_many_arguments)]
fn batch_norm_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    weight: Option<PyReadonlyArrayDyn<'py, f32>>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
    running_mean: Option<Array<'py>>,
    running_var: Option<Array<'py>>,
    training: bool,
    momentum: f32,
    eps: f32,
) -> PyResult<(Array<'py>, Array<'py>, Array<'py>)> {
    let p = BatchNormParams::new(input.shape(), eps)?;
    let c = [p.channels];
    for (arr, name) in [(&weight, "weight"), (&bias, "bias")] {
        if let Some(a) = arr {
            check_shape(a, name, &c)?;
        }
    }
    for (arr, name) in [
        (&running_mean, "running_mean"),
        (&running_var, "running_var"),
    ] {
        if let Some(a) = arr {
            if a.shape() != c {
                return Err(PyValueError::new_err(format!(
                    "{name}: expected shape {c:?}, got {:?}",
                    a.shape()
                )));
            }
        }
    }
    let x = slice(&input, "input")?;
    let gamma = weight.as_ref().map(|w| slice(w, "weight")).transpose()?;
    let beta = bias.as_ref().map(|b| slice(b, "bias")).transpose()?;
    let mut y = Output::new(py, "output", input.shape())?;
    let mut mean = Output::new(py, "save_mean", &c)?;
    let mut invstd = Output::new(py, "save_invstd", &c)?;
    let (y_data, mean_data, invstd_data) = (y.data(), mean.data(), invstd.data());
    match (training, running_mean, running_var) {
        (true, running_mean, running_var) => {
            let mut borrowed = RunningBorrow::new(running_mean.as_ref(), running_var.as_ref())?;
            let running = borrowed.stats(momentum)?;
            run_kernel(py, x.len(), || {
                batch_norm::forward_train(
                    &p,
                    x,
                    gamma,
                    beta,
                    running,
                    y_data,
                    mean_data,
                    invstd_data,
                )
            })?;
        }
        // Only read in evaluation: a shared borrow, so read-only arrays (and several
        // threads evaluating one model) are fine.
        (false, Some(running_mean), Some(running_var)) => {
            let rm = readable(&running_mean, "running_mean")?;
            let rv = readable(&running_var, "running_var")?;
            let (rm, rv) = (slice(&rm, "running_mean")?, slice(&rv, "running_var")?);
            run_kernel(py, x.len(), || {
                batch_norm::forward_eval(&p, x, gamma, beta, rm, rv, y_data, mean_data, invstd_data)
            })?;
        }
        (false, _, _) => {
            return Err(crate::Error::invalid(
                "running_mean",
                "None",
                "running statistics when not training (or training=True)",
            )
            .into())
        }
    }
    Ok((y.into_array(), mean.into_array(), invstd.into_array()))
}

/// Batch-norm backward: (grad_input, grad_weight or None, grad_bias or None).
#[pyfunction]
#[pyo3(signature = (grad_output, input, weight, save_mean, save_invstd, training))]
fn batch_norm_backward<'py>(
    py: Python<'py>,
    grad_output: PyReadonlyArrayDyn<'py, f32>,
    input: PyReadonlyArrayDyn<'py, f32>,
    weight: Option<PyReadonlyArrayDyn<'py, f32>>,
    save_mean: PyReadonlyArrayDyn<'py, f32>,
    save_invstd: PyReadonlyArrayDyn<'py, f32>,
    training: bool,
) -> PyResult<NormGradArrays<'py>> {
    let p = BatchNormParams::new(input.shape(), 0.0)?;
    let c = [p.channels];
    check_shape(&grad_output, "grad_output", input.shape())?;
    check_shape(&save_mean, "save_mean", &c)?;
    check_shape(&save_invstd, "save_invstd", &c)?;
    if let Some(w) = &weight {
        check_shape(w, "weight", &c)?;
    }
    let (gy, x) = (slice(&grad_output, "grad_output")?, slice(&input, "input")?);
    let (mean, invstd) = (
        slice(&save_mean, "save_mean")?,
        slice(&save_invstd, "save_invstd")?,
    );
    let gamma = weight.as_ref().map(|w| slice(w, "weight")).transpose()?;
    let affine = gamma.is_some();
    let mut grads = NormGrads::new(py, input.shape(), affine.then_some(p.channels))?;
    let (gx_data, gg_data, gb_data) = grads.data();
    run_kernel(py, x.len(), || {
        batch_norm::backward(
            &p, gy, x, gamma, mean, invstd, training, gx_data, gg_data, gb_data,
        )
    })?;
    Ok(grads.into_arrays())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(batch_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(batch_norm_backward, m)?)?;
    Ok(())
}
