//! Bindings of the training-mode fused block (batch norm → activation → pool → dropout).

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{check_shape, run_kernel, slice, NormGradArrays, NormGrads, Output, RunningBorrow};
use crate::kernels::activation::Activation;
use crate::kernels::fused::{self, BnBlockParams, DropoutSpec, Pool2x2};
use crate::Error;

type Array<'py> = Bound<'py, PyArrayDyn<f32>>;

/// The block's stages from the binding's arguments, validated against `input_shape`.
#[allow(clippy::too_many_arguments)]
fn block_params(
    input_shape: &[usize],
    eps: f32,
    activation: Option<&str>,
    negative_slope: f32,
    pool: Option<&str>,
    dropout_p: f32,
    dropout_seed: u64,
    dropout_channel_wise: bool,
) -> crate::Result<BnBlockParams> {
    let activation = activation
        .map(|name| Activation::from_name(name, negative_slope))
        .transpose()?;
    let pool = match pool {
        None => None,
        Some("max") => Some(Pool2x2::Max),
        Some("avg") => Some(Pool2x2::Avg),
        Some(other) => return Err(Error::invalid("pool", other, "None, 'max' or 'avg'")),
    };
    if !(0.0..1.0).contains(&dropout_p) {
        return Err(Error::invalid(
            "dropout_p",
            dropout_p,
            "a dropout probability in [0, 1) (0: no dropout)",
        ));
    }
    let dropout = (dropout_p > 0.0).then_some(DropoutSpec {
        p: dropout_p,
        seed: dropout_seed,
        channel_wise: dropout_channel_wise,
    });
    BnBlockParams::new(input_shape, eps, activation, pool, dropout)
}

/// The per-channel arrays of a block, checked to have shape (C,).
fn channel_vectors<'a>(
    arrays: [(&'a Option<PyReadonlyArrayDyn<'_, f32>>, &'static str); 2],
    channels: usize,
) -> PyResult<[Option<&'a [f32]>; 2]> {
    let mut out = [None, None];
    for (slot, (arr, name)) in out.iter_mut().zip(arrays) {
        if let Some(a) = arr {
            check_shape(a, name, &[channels])?;
            *slot = Some(slice(a, name)?);
        }
    }
    Ok(out)
}

/// Training forward of a fused block: (output, save_mean, save_invstd); updates the
/// running statistics in place when given, as `batch_norm_forward` does.
#[pyfunction]
#[pyo3(signature = (input, weight, bias, running_mean, running_var, momentum, eps,
                    activation=None, negative_slope=0.0, pool=None, dropout_p=0.0,
                    dropout_seed=0, dropout_channel_wise=false))]
#[allow(clippy::too_many_arguments)]
fn bn_block_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    weight: Option<PyReadonlyArrayDyn<'py, f32>>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
    running_mean: Option<Array<'py>>,
    running_var: Option<Array<'py>>,
    momentum: f32,
    eps: f32,
    activation: Option<&str>,
    negative_slope: f32,
    pool: Option<&str>,
    dropout_p: f32,
    dropout_seed: u64,
    dropout_channel_wise: bool,
) -> PyResult<(Array<'py>, Array<'py>, Array<'py>)> {
    let p = block_params(
        input.shape(),
        eps,
        activation,
        negative_slope,
        pool,
        dropout_p,
        dropout_seed,
        dropout_channel_wise,
    )?;
    let c = p.bn.channels;
    let [gamma, beta] = channel_vectors([(&weight, "weight"), (&bias, "bias")], c)?;
    if running_mean.is_some() != running_var.is_some() {
        return Err(Error::invalid(
            "running_mean",
            "only one of running_mean and running_var",
            "both or neither",
        )
        .into());
    }
    let x = slice(&input, "input")?;
    let mut borrowed = RunningBorrow::new(running_mean.as_ref(), running_var.as_ref())?;
    let running = borrowed.stats(momentum)?;
    let mut y = Output::new(py, "output", &p.output_shape(input.shape()))?;
    let mut mean = Output::new(py, "save_mean", &[c])?;
    let mut invstd = Output::new(py, "save_invstd", &[c])?;
    let (y_data, mean_data, invstd_data) = (y.data(), mean.data(), invstd.data());
    run_kernel(py, x.len(), || {
        // No window codes: the backward is a call of its own, on arrays it cannot check
        // against this call's.
        fused::forward_train(
            &p,
            x,
            gamma,
            beta,
            running,
            y_data,
            mean_data,
            invstd_data,
            None,
        )
    })?;
    Ok((y.into_array(), mean.into_array(), invstd.into_array()))
}

/// Backward of a fused block: (grad_input, grad_weight or None, grad_bias or None).
#[pyfunction]
#[pyo3(signature = (grad_output, input, weight, bias, save_mean, save_invstd,
                    activation=None, negative_slope=0.0, pool=None, dropout_p=0.0,
                    dropout_seed=0, dropout_channel_wise=false))]
#[allow(clippy::too_many_arguments)]
fn bn_block_backward<'py>(
    py: Python<'py>,
    grad_output: PyReadonlyArrayDyn<'py, f32>,
    input: PyReadonlyArrayDyn<'py, f32>,
    weight: Option<PyReadonlyArrayDyn<'py, f32>>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
    save_mean: PyReadonlyArrayDyn<'py, f32>,
    save_invstd: PyReadonlyArrayDyn<'py, f32>,
    activation: Option<&str>,
    negative_slope: f32,
    pool: Option<&str>,
    dropout_p: f32,
    dropout_seed: u64,
    dropout_channel_wise: bool,
) -> PyResult<NormGradArrays<'py>> {
    let p = block_params(
        input.shape(),
        0.0,
        activation,
        negative_slope,
        pool,
        dropout_p,
        dropout_seed,
        dropout_channel_wise,
    )?;
    let c = p.bn.channels;
    check_shape(&grad_output, "grad_output", &p.output_shape(input.shape()))?;
    check_shape(&save_mean, "save_mean", &[c])?;
    check_shape(&save_invstd, "save_invstd", &[c])?;
    let [gamma, beta] = channel_vectors([(&weight, "weight"), (&bias, "bias")], c)?;
    let (gy, x) = (slice(&grad_output, "grad_output")?, slice(&input, "input")?);
    let (mean, invstd) = (
        slice(&save_mean, "save_mean")?,
        slice(&save_invstd, "save_invstd")?,
    );
    let mut grads = NormGrads::new(py, input.shape(), gamma.is_some().then_some(c))?;
    let (gx_data, gg_data, gb_data) = grads.data();
    run_kernel(py, x.len(), || {
        fused::backward(
            &p, gy, x, gamma, beta, mean, invstd, gx_data, gg_data, gb_data, None,
        )
    })?;
    Ok(grads.into_arrays())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(bn_block_forward, m)?)?;
    m.add_function(wrap_pyfunction!(bn_block_backward, m)?)?;
    Ok(())
}
