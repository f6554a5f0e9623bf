//! Optimizer bindings: in-place updates of parameters and their state.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::{run_kernel, slice, slice_mut, writeable};
use crate::kernels::optim::{self, AdamConfig, SgdConfig};

type Array<'py> = Bound<'py, PyArrayDyn<f32>>;

fn same_shape(name: &str, arr: &[usize], param: &[usize]) -> PyResult<()> {
    if arr != param {
        return Err(PyValueError::new_err(format!(
            "{name}: expected the shape of param {param:?}, got {arr:?}"
        )));
    }
    Ok(())
}

/// One SGD step, in place on `param` (and `momentum_buffer`).
#[pyfunction]
#[pyo3(signature = (param, grad, momentum_buffer, lr, momentum, dampening, nesterov, weight_decay, first_step))]
#[allow(clippy::too_many_arguments)]
fn sgd_step(
    py: Python<'_>,
    param: Array<'_>,
    grad: PyReadonlyArrayDyn<'_, f32>,
    momentum_buffer: Option<Array<'_>>,
    lr: f32,
    momentum: f32,
    dampening: f32,
    nesterov: bool,
    weight_decay: f32,
    first_step: bool,
) -> PyResult<()> {
    let cfg = SgdConfig {
        lr,
        momentum,
        dampening,
        nesterov,
        weight_decay,
    };
    same_shape("grad", grad.shape(), param.shape())?;
    if let Some(b) = &momentum_buffer {
        same_shape("momentum_buffer", b.shape(), param.shape())?;
    }
    let g = slice(&grad, "grad")?;
    let mut w = writeable(&param, "param")?;
    let mut buf = momentum_buffer
        .as_ref()
        .map(|b| writeable(b, "momentum_buffer"))
        .transpose()?;
    let w = slice_mut(&mut w, "param")?;
    let buf = buf
        .as_mut()
        .map(|b| slice_mut(b, "momentum_buffer"))
        .transpose()?;
    run_kernel(py, g.len(), || optim::sgd_step(w, g, buf, cfg, first_step))
}

/// One Adam / AdamW step, in place on `param`, `exp_avg` and `exp_avg_sq`.
#[pyfunction]
#[pyo3(signature = (param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, decoupled))]
#[allow(clippy::too_many_arguments)]
fn adam_step(
    py: Python<'_>,
    param: Array<'_>,
    grad: PyReadonlyArrayDyn<'_, f32>,
    exp_avg: Array<'_>,
    exp_avg_sq: Array<'_>,
    step: u64,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    decoupled: bool,
) -> PyResult<()> {
    let cfg = AdamConfig {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled,
    };
    same_shape("grad", grad.shape(), param.shape())?;
    same_shape("exp_avg", exp_avg.shape(), param.shape())?;
    same_shape("exp_avg_sq", exp_avg_sq.shape(), param.shape())?;
    let g = slice(&grad, "grad")?;
    let mut w = writeable(&param, "param")?;
    let mut m = writeable(&exp_avg, "exp_avg")?;
    let mut v = writeable(&exp_avg_sq, "exp_avg_sq")?;
    let (w, m, v) = (
        slice_mut(&mut w, "param")?,
        slice_mut(&mut m, "exp_avg")?,
        slice_mut(&mut v, "exp_avg_sq")?,
    );
    run_kernel(py, g.len(), || optim::adam_step(w, g, m, v, step, cfg))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sgd_step, m)?)?;
    m.add_function(wrap_pyfunction!(adam_step, m)?)?;
    Ok(())
}
