//! max_pool2d and avg_pool2d bindings.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::{check_allocatable, check_shape, run_kernel, slice, Output};
use crate::kernels::pool::{self, Pool2d, Pool2dParams};

type Pair = (i64, i64);
type PooledWithIndices<'py> = (
    Bound<'py, PyArrayDyn<f32>>,
    Option<Bound<'py, PyArrayDyn<i64>>>,
);
type Shape4 = (i64, i64, i64, i64);

/// The forward input's (N, C, H, W) shape given to a backward: 4 positive sizes of an
/// input gradient that can be allocated (which else would be refused naming the array,
/// not the argument at fault).
fn checked_input_shape(shape: Shape4) -> PyResult<[usize; 4]> {
    let dims = [shape.0, shape.1, shape.2, shape.3];
    if dims.iter().any(|&d| d < 1) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "input_shape: expected 4 positive sizes (N, C, H, W), got {dims:?}"
        )));
    }
    let dims = dims.map(|d| d as usize);
    check_allocatable::<f32>("grad_input", &dims, "input_shape")?;
    Ok(dims)
}

/// max_pool2d forward: (output, indices), the indices None unless `return_indices`.
#[pyfunction]
#[pyo3(signature = (input, kernel_size, stride, padding, return_indices=true))]
fn max_pool2d_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    return_indices: bool,
) -> PyResult<PooledWithIndices<'py>> {
    let p = Pool2dParams::new(input.shape(), kernel_size, stride, padding)?;
    let x = slice(&input, "input")?;
    let mut out = Output::new(py, "output", &p.output_shape())?;
    let mut idx = Output::maybe(py, "indices", return_indices, &p.output_shape())?;
    let (out_data, idx_data) = (out.data(), idx.as_mut().map(Output::data));
    run_kernel(py, x.len(), || pool::max_forward(&p, x, out_data, idx_data))?;
    Ok((out.into_array(), idx.map(Output::into_array)))
}

/// max_pool2d backward from the forward's indices.
#[pyfunction]
fn max_pool2d_backward<'py>(
    py: Python<'py>,
    grad_output: PyReadonlyArrayDyn<'py, f32>,
    indices: PyReadonlyArrayDyn<'py, i64>,
    input_shape: Shape4,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let in_shape = checked_input_shape(input_shape)?;
    // grad_output first: the indices are checked against its shape.
    pool::check_max_grad_output(&in_shape, grad_output.shape())?;
    check_shape(&indices, "indices", grad_output.shape())?;
    let (gy, idx) = (
        slice(&grad_output, "grad_output")?,
        slice(&indices, "indices")?,
    );
    let gy_shape = grad_output.shape().to_vec();
    let mut gx = Output::sized_by(py, "grad_input", &in_shape, "input_shape")?;
    let gx_data = gx.data();
    run_kernel(py, gy.len(), || {
        pool::max_backward(&in_shape, &gy_shape, gy, idx, gx_data)
    })?;
    Ok(gx.into_array())
}

/// avg_pool2d forward.
#[pyfunction]
fn avg_pool2d_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    count_include_pad: bool,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let p = Pool2dParams::new(input.shape(), kernel_size, stride, padding)?;
    let x = slice(&input, "input")?;
    let shape = p.output_shape();
    let mut out = Output::new(py, "output", &shape)?;
    let out_data = out.data();
    run_kernel(py, x.len(), || {
        pool::avg_forward(&p, x, count_include_pad, out_data)
    })?;
    Ok(out.into_array())
}

/// avg_pool2d backward.
#[pyfunction]
fn avg_pool2d_backward<'py>(
    py: Python<'py>,
    grad_output: PyReadonlyArrayDyn<'py, f32>,
    input_shape: Shape4,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    count_include_pad: bool,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let in_shape = checked_input_shape(input_shape)?;
    let p = Pool2dParams::new(&in_shape, kernel_size, stride, padding)?;
    check_shape(&grad_output, "grad_output", &p.output_shape())?;
    let gy = slice(&grad_output, "grad_output")?;
    let mut gx = Output::sized_by(py, "grad_input", &in_shape, "input_shape")?;
    let gx_data = gx.data();
    run_kernel(py, gy.len(), || {
        pool::avg_backward(&p, gy, count_include_pad, gx_data)
    })?;
    Ok(gx.into_array())
}

/// A step or evaluation plan's pooling layer from the kind and arguments `bnrs.executor`
/// gives: "max_pool2d" with (kernel, stride, padding), "avg_pool2d" with those and
/// count_include_pad.
pub(super) fn pool2d(kind: &str, args: &Bound<'_, PyTuple>) -> PyResult<Pool2d> {
    match kind {
        "max_pool2d" => {
            let (kernel, stride, padding) = args.extract()?;
            Ok(Pool2d::Max {
                kernel,
                stride,
                padding,
            })
        }
        "avg_pool2d" => {
            let (kernel, stride, padding, count_include_pad) = args.extract()?;
            Ok(Pool2d::Avg {
                kernel,
                stride,
                padding,
                count_include_pad,
            })
        }
        other => Err(PyValueError::new_err(format!(
            "layers: {other:?} is not a pooling kind"
        ))),
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(max_pool2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(max_pool2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(avg_pool2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(avg_pool2d_backward, m)?)?;
    Ok(())
}
