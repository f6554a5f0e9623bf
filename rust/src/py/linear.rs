//! Linear-layer bindings.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{check_shape, run_product_kernel, slice, LayerGrads, Output};
use crate::kernels::activation::Activation;
use crate::kernels::linear::{self, LinearParams};

type Array<'py> = Bound<'py, PyArrayDyn<f32>>;

/// A batch norm in evaluation after the layer: (weight, bias, running_mean, running_var,
/// eps), as `batch_norm_forward` takes them.
type NormArgs<'py> = (
    Option<PyReadonlyArrayDyn<'py, f32>>,
    Option<PyReadonlyArrayDyn<'py, f32>>,
    PyReadonlyArrayDyn<'py, f32>,
    PyReadonlyArrayDyn<'py, f32>,
    f32,
);

/// y = f(norm(x·Wᵀ + b)), `norm` an optional batch norm in evaluation (its running
/// statistics) and f an optional activation (a name as `activation_forward` takes), both
/// applied per block of rows inside the kernel, with the bits of the layers one by one.
#[pyfunction]
#[pyo3(signature = (input, weight, bias, activation=None, negative_slope=0.0, norm=None))]
fn linear_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    weight: PyReadonlyArrayDyn<'py, f32>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
    activation: Option<&str>,
    negative_slope: f32,
    norm: Option<NormArgs<'py>>,
) -> PyResult<Array<'py>> {
    let p = LinearParams::new(input.shape(), weight.shape())?;
    let act = activation
        .map(|name| Activation::from_name(name, negative_slope))
        .transpose()?;
    if let Some(b) = &bias {
        check_shape(b, "bias", &[p.out_features])?;
    }
    let (x, w) = (slice(&input, "input")?, slice(&weight, "weight")?);
    let b = bias.as_ref().map(|b| slice(b, "bias")).transpose()?;
    let coefficients = match &norm {
        None => None,
        Some((gamma, beta, running_mean, running_var, eps)) => {
            let c = [p.out_features];
            for (arr, name) in [(gamma, "norm weight"), (beta, "norm bias")] {
                if let Some(a) = arr {
                    check_shape(a, name, &c)?;
                }
            }
            check_shape(running_mean, "running_mean", &c)?;
            check_shape(running_var, "running_var", &c)?;
            Some(linear::EvalNormCoefficients::new(
                p.batch,
                p.out_features,
                gamma
                    .as_ref()
                    .map(|g| slice(g, "norm weight"))
                    .transpose()?,
                beta.as_ref().map(|b| slice(b, "norm bias")).transpose()?,
                slice(running_mean, "running_mean")?,
                slice(running_var, "running_var")?,
                *eps,
            )?)
        }
    };
    let eval_norm = coefficients
        .as_ref()
        .map(linear::EvalNormCoefficients::norm);
    let mut out = Output::new(py, "output", &[p.batch, p.out_features])?;
    let out_data = out.data();
    let work = p
        .batch
        .saturating_mul(p.in_features)
        .saturating_mul(p.out_features);
    run_product_kernel(py, work, || {
        linear::forward_fused(&p, x, w, b, eval_norm, act, out_data)
    })?;
    Ok(out.into_array())
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
    let mut grads = LayerGrads::new(
        py,
        input_grad.then(|| input.shape()),
        weight.shape(),
        bias.then_some(p.out_features),
    )?;
    let (gx_data, gw_data, gb_data) = grads.data();
    let work = p
        .batch
        .saturating_mul(p.in_features)
        .saturating_mul(2 * p.out_features);
    run_product_kernel(py, work, || {
        linear::backward(&p, gy, x, w, gx_data, gw_data, gb_data)
    })?;
    Ok(grads.into_arrays())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(linear_forward, m)?)?;
    m.add_function(wrap_pyfunction!(linear_backward, m)?)?;
    Ok(())
}
