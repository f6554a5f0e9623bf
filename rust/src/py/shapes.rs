//! Output shapes of the window layers, for `bnrs.nn` to size a network before any data:
//! the same validation and arithmetic as the kernels'.

use pyo3::prelude::*;

use crate::error::Error;
use crate::kernels::{non_negative_pair, pool, positive_pair, window_output_hw};

type Pair = (i64, i64);

/// The (H_out, W_out) of a window on an (H, W) input, or a `ValueError` naming
/// `input_shape` when the window does not fit.
fn checked_output_hw(
    input_hw: Pair,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
) -> PyResult<(usize, usize)> {
    let input_hw = non_negative_pair("input_shape", input_hw)?;
    let output_hw = window_output_hw(input_hw, kernel, stride, padding, dilation);
    output_hw.ok_or_else(|| {
        Error::invalid(
            "input_shape",
            format!(
                "{}×{}, where the spatial size shrinks below 1",
                input_hw.0, input_hw.1
            ),
            format!(
                "a spatial size the window fits in (kernel {kernel:?}, dilation \
                 {dilation:?}, padding {padding:?})"
            ),
        )
        .into()
    })
}

/// (H_out, W_out) of a convolution on an (H, W) input.
#[pyfunction]
fn conv2d_output_shape(
    input_hw: Pair,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> PyResult<(usize, usize)> {
    checked_output_hw(
        input_hw,
        positive_pair("kernel_size", kernel_size)?,
        positive_pair("stride", stride)?,
        non_negative_pair("padding", padding)?,
        positive_pair("dilation", dilation)?,
    )
}

/// (H_out, W_out) of a max or average pooling on an (H, W) input.
#[pyfunction]
fn pool2d_output_shape(
    input_hw: Pair,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
) -> PyResult<(usize, usize)> {
    let kernel = positive_pair("kernel_size", kernel_size)?;
    let padding = non_negative_pair("padding", padding)?;
    pool::check_padding(kernel, padding)?;
    checked_output_hw(
        input_hw,
        kernel,
        positive_pair("stride", stride)?,
        padding,
        (1, 1),
    )
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(conv2d_output_shape, m)?)?;
    m.add_function(wrap_pyfunction!(pool2d_output_shape, m)?)?;
    Ok(())
}
