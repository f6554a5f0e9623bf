//! conv2d bindings.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{check_shape, run_product_kernel, slice, GradArrays, LayerGrads, Output};
use crate::error::Error;
use crate::kernels::activation::Activation;
use crate::kernels::conv::{self, Conv2dParams, Epilogue, Pool2x2};

type Pair = (i64, i64);

/// conv2d forward: (N, C_in, H, W) * (C_out, C_in, kH, kW) -> (N, C_out, H_out, W_out),
/// with an optional activation (a name as `activation_forward` takes) applied per output
/// tile inside the kernel, and an optional 2×2, stride-2 pool ("max" or "avg") applied to
/// each image's output while it is in cache. `groups` splits the channels as
/// `torch.nn.Conv2d(groups=...)` does: the weight is (C_out, C_in/groups, kH, kW).
#[pyfunction]
#[pyo3(signature = (input, weight, bias, stride, padding, dilation, activation=None, negative_slope=0.0, pool=None, groups=1))]
#[allow(clippy::too_many_arguments)]
fn conv2d_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    weight: PyReadonlyArrayDyn<'py, f32>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    activation: Option<&str>,
    negative_slope: f32,
    pool: Option<&str>,
    groups: i64,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let p = Conv2dParams::grouped(
        input.shape(),
        weight.shape(),
        stride,
        padding,
        dilation,
        groups,
    )?;
    let pool = pool.map(parse_pool).transpose()?;
    let epilogue = parse_epilogue(activation, negative_slope)?;
    if let Some(b) = &bias {
        check_shape(b, "bias", &[p.out_channels])?;
    }
    let (x, w) = (slice(&input, "input")?, slice(&weight, "weight")?);
    let b = bias.as_ref().map(|b| slice(b, "bias")).transpose()?;
    let mut shape = p.output_shape();
    if pool.is_some() {
        (shape[2], shape[3]) = Pool2x2::output_size(&p);
    }
    let mut out = Output::new(py, "output", &shape)?;
    let out_data = out.data();
    run_product_kernel(py, p.multiply_adds(), || match pool {
        Some(pool) => conv::forward_fused_pooled(&p, x, w, b, epilogue, pool, out_data),
        None => conv::forward_fused(&p, x, w, b, epilogue, out_data),
    })?;
    Ok(out.into_array())
}

pub(super) fn parse_pool(name: &str) -> PyResult<Pool2x2> {
    match name {
        "max" => Ok(Pool2x2::Max),
        "avg" => Ok(Pool2x2::Avg),
        other => Err(Error::Invalid {
            arg: "pool",
            got: format!("{other:?}"),
            expected: "None, \"max\" or \"avg\"".into(),
        }
        .into()),
    }
}

fn parse_epilogue(activation: Option<&str>, negative_slope: f32) -> PyResult<Epilogue> {
    Ok(Epilogue {
        activation: activation
            .map(|name| Activation::from_name(name, negative_slope))
            .transpose()?,
    })
}

/// One block of [`conv2d_pooled_chain`]: (weight, bias, stride, padding, dilation,
/// activation, negative_slope, pool, groups), as [`conv2d_forward`] takes them.
type ChainBlock<'py> = (
    PyReadonlyArrayDyn<'py, f32>,
    Option<PyReadonlyArrayDyn<'py, f32>>,
    Pair,
    Pair,
    Pair,
    Option<String>,
    f32,
    String,
    i64,
);

/// Two fused conv→activation→2×2 pool blocks, `second` on `first`'s output, in one call:
/// the bits of two `conv2d_forward` calls with `pool`, each image through both blocks
/// while the first's output is in cache. Each block is a [`ChainBlock`] tuple.
#[pyfunction]
fn conv2d_pooled_chain<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    first: ChainBlock<'py>,
    second: ChainBlock<'py>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let p1 = chain_params(input.shape(), &first)?;
    let (ph, pw) = Pool2x2::output_size(&p1);
    let p2 = chain_params(&[p1.batch, p1.out_channels, ph, pw], &second)?;
    let one = chain_block(p1, &first)?;
    let two = chain_block(p2, &second)?;
    let x = slice(&input, "input")?;
    let mut out = Output::new(py, "output", &two.output_shape())?;
    let out_data = out.data();
    let work = p1.multiply_adds().saturating_add(p2.multiply_adds());
    run_product_kernel(py, work, || {
        conv::forward_fused_pooled_chain(&one, &two, x, out_data)
    })?;
    Ok(out.into_array())
}

fn chain_params(input_shape: &[usize], block: &ChainBlock<'_>) -> PyResult<Conv2dParams> {
    let (weight, _, stride, padding, dilation, _, _, _, groups) = block;
    Ok(Conv2dParams::grouped(
        input_shape,
        weight.shape(),
        *stride,
        *padding,
        *dilation,
        *groups,
    )?)
}

fn chain_block<'a>(
    params: Conv2dParams,
    block: &'a ChainBlock<'_>,
) -> PyResult<conv::PooledConv<'a>> {
    let (weight, bias, _, _, _, activation, negative_slope, pool, _) = block;
    if let Some(b) = bias {
        check_shape(b, "bias", &[params.out_channels])?;
    }
    Ok(conv::PooledConv {
        params,
        weight: slice(weight, "weight")?,
        bias: bias.as_ref().map(|b| slice(b, "bias")).transpose()?,
        epilogue: parse_epilogue(activation.as_deref(), *negative_slope)?,
        pool: parse_pool(pool)?,
    })
}

/// conv2d backward: (grad_input or None, grad_weight, grad_bias or None).
#[pyfunction]
#[pyo3(signature = (grad_output, input, weight, stride, padding, dilation, bias, input_grad, groups=1))]
#[allow(clippy::too_many_arguments)]
fn conv2d_backward<'py>(
    py: Python<'py>,
    grad_output: PyReadonlyArrayDyn<'py, f32>,
    input: PyReadonlyArrayDyn<'py, f32>,
    weight: PyReadonlyArrayDyn<'py, f32>,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    bias: bool,
    input_grad: bool,
    groups: i64,
) -> PyResult<GradArrays<'py>> {
    let p = Conv2dParams::grouped(
        input.shape(),
        weight.shape(),
        stride,
        padding,
        dilation,
        groups,
    )?;
    check_grad_output_channels(&grad_output, &weight)?;
    check_shape(&grad_output, "grad_output", &p.output_shape())?;
    let (gy, x, w) = (
        slice(&grad_output, "grad_output")?,
        slice(&input, "input")?,
        slice(&weight, "weight")?,
    );
    let mut grads = LayerGrads::new(
        py,
        input_grad.then(|| input.shape()),
        weight.shape(),
        bias.then_some(p.out_channels),
    )?;
    let (gx_data, gw_data, gb_data) = grads.data();
    run_product_kernel(py, p.multiply_adds().saturating_mul(2), || {
        conv::backward(&p, gy, x, w, gx_data, gw_data, gb_data)
    })?;
    Ok(grads.into_arrays())
}

/// grad_output's channels against the weight's output channels: nothing says which of
/// the two is wrong, so the error names both.
fn check_grad_output_channels(
    grad_output: &PyReadonlyArrayDyn<'_, f32>,
    weight: &PyReadonlyArrayDyn<'_, f32>,
) -> PyResult<()> {
    let (gy_shape, w_shape) = (grad_output.shape(), weight.shape());
    if gy_shape.len() == 4 && gy_shape[1] != w_shape[0] {
        return Err(crate::Error::invalid(
            "grad_output, weight",
            format!(
                "{} channels in grad_output (shape {gy_shape:?}) and {} output channels in \
                 weight (shape {w_shape:?})",
                gy_shape[1], w_shape[0]
            ),
            "as many channels in grad_output as the weight has output channels",
        )
        .into());
    }
    Ok(())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(conv2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_pooled_chain, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_backward, m)?)?;
    Ok(())
}
