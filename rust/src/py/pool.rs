//! max_pool2d and avg_pool2d bindings.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{buffer, check_shape, run, slice, to_numpy, zeros};
use crate::kernels::pool::{self, Pool2dParams};

type Pair = (i64, i64);
type PooledWithIndices<'py> = (Bound<'py, PyArrayDyn<f32>>, Bound<'py, PyArrayDyn<i64>>);
type Shape4 = (i64, i64, i64, i64);

/// An (N, C, H, W) shape given by the caller.
fn shape4(shape: Shape4) -> PyResult<[usize; 4]> {
    let dims = [shape.0, shape.1, shape.2, shape.3];
    if dims.iter().any(|&d| d < 1) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "input_shape: expected 4 positive sizes (N, C, H, W), got {dims:?}"
        )));
    }
    Ok(dims.map(|d| d as usize))
}

/// max_pool2d forward: (output, indices).
#[pyfunction]
fn max_pool2d_forward<'py>(
    py: Python<'py>,
    input: PyReadonlyArrayDyn<'py, f32>,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
) -> PyResult<PooledWithIndices<'py>> {
    let p = Pool2dParams::new(input.shape(), kernel_size, stride, padding)?;
    let x = slice(&input, "input")?;
    let shape = p.output_shape();
    let (out, idx) = run(py, x.len(), || {
        let mut out = buffer("output", &shape)?;
        let mut idx = zeros::<i64>("indices", out.len())?;
        pool::max_forward(&p, x, &mut out, &mut idx)?;
        Ok((out, idx))
    })?;
    Ok((to_numpy(py, out, &shape)?, to_numpy(py, idx, &shape)?))
}

/// max_pool2d backward from the forward's indices.
#[pyfunction]
fn max_pool2d_backward<'py>(
    py: Python<'py>,
    grad_output: PyReadonlyArrayDyn<'py, f32>,
    indices: PyReadonlyArrayDyn<'py, i64>,
    input_shape: Shape4,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let in_shape = shape4(input_shape)?;
    check_shape(&indices, "indices", grad_output.shape())?;
    let (gy, idx) = (
        slice(&grad_output, "grad_output")?,
        slice(&indices, "indices")?,
    );
    let gy_shape = grad_output.shape().to_vec();
    let gx = run(py, gy.len(), || {
        let mut gx = buffer("grad_input", &in_shape)?;
        pool::max_backward(&in_shape, &gy_shape, gy, idx, &mut gx)?;
        Ok(gx)
    })?;
    to_numpy(py, gx, &in_shape)
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
    let out = run(py, x.len(), || {
        let mut out = buffer("output", &shape)?;
        pool::avg_forward(&p, x, count_include_pad, &mut out)?;
        Ok(out)
    })?;
    to_numpy(py, out, &shape)
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
    let in_shape = shape4(input_shape)?;
    let p = Pool2dParams::new(&in_shape, kernel_size, stride, padding)?;
    check_shape(&grad_output, "grad_output", &p.output_shape())?;
    let gy = slice(&grad_output, "grad_output")?;
    let gx = run(py, gy.len(), || {
        let mut gx = buffer("grad_input", &in_shape)?;
        pool::avg_backward(&p, gy, count_include_pad, &mut gx)?;
        Ok(gx)
    })?;
    to_numpy(py, gx, &in_shape)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(max_pool2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(max_pool2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(avg_pool2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(avg_pool2d_backward, m)?)?;
    Ok(())
}
