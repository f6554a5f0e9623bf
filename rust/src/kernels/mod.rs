//! Pure-Rust kernels on float32 slices (NCHW, C-contiguous), forward and backward.
//!
//! Each module holds one op family; shapes and hyper-parameters are validated by a
//! small parameter struct before any work starts.

/// Runs `$body` with `$i` = 0, 1, ... up to (not including) the constant `$n` (at most
/// 16) as straight-line code. A register tile's loops must be unrolled before LLVM's loop
/// vectoriser runs: left as loops, it vectorises across the tile (its channels, rows or
/// features) with gathers and scatters of the accumulators instead of across the lanes
/// (30x slower in the direct convolution).
/// Defined before the modules so that every kernel module sees it.
macro_rules! unroll {
    ($i:ident < $n:expr => $body:block) => {
        unroll!(@ $i, $n, $body, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
    };
    (@ $i:ident, $n:expr, $body:block, $($k:literal)*) => {
        $( if $k < $n { let $i: usize = $k; $body } )*
    };
}

pub mod activation;
pub mod batch_norm;
pub mod conv;
pub mod dropout;
pub mod fused;
pub mod gemm;
pub mod group_norm;
pub mod linear;
pub mod loss;
pub mod optim;
pub mod peak;
pub mod pool;
pub mod reduce;

use crate::error::{Error, Result};

/// `acc + a·b`, fused (one rounding, with FMA) or not (the portable level, where a fused
/// multiply-add is a library call).
#[inline(always)]
pub(crate) fn multiply_add<const FUSED: bool>(a: f32, b: f32, acc: f32) -> f32 {
    if FUSED {
        a.mul_add(b, acc)
    } else {
        acc + a * b
    }
}

/// A (height, width) pair of strictly positive sizes, from signed user input.
pub fn positive_pair(arg: &'static str, value: (i64, i64)) -> Result<(usize, usize)> {
    if value.0 < 1 || value.1 < 1 {
        return Err(Error::invalid(
            arg,
            format!("{value:?}"),
            "positive values (>= 1)",
        ));
    }
    Ok((value.0 as usize, value.1 as usize))
}

/// A (height, width) pair of non-negative sizes, from signed user input.
pub fn non_negative_pair(arg: &'static str, value: (i64, i64)) -> Result<(usize, usize)> {
    if value.0 < 0 || value.1 < 0 {
        return Err(Error::invalid(
            arg,
            format!("{value:?}"),
            "non-negative values",
        ));
    }
    Ok((value.0 as usize, value.1 as usize))
}

/// Require an NCHW shape with no zero dimension; returns (N, C, H, W).
pub fn nchw(arg: &'static str, shape: &[usize]) -> Result<(usize, usize, usize, usize)> {
    if shape.len() != 4 {
        return Err(Error::invalid(
            arg,
            format!("a {}-D array {shape:?}", shape.len()),
            "a 4-D (N, C, H, W) array",
        ));
    }
    nonzero(arg, shape)?;
    Ok((shape[0], shape[1], shape[2], shape[3]))
}

/// Reject shapes with a zero dimension (empty batches, channels or planes).
pub fn nonzero(arg: &'static str, shape: &[usize]) -> Result<()> {
    if shape.contains(&0) {
        return Err(Error::invalid(
            arg,
            format!("shape {shape:?}"),
            "no zero-size dimension",
        ));
    }
    Ok(())
}

/// Output length of a sliding window along one axis (floor mode), or `None` when the
/// (dilated) window does not fit in the padded input.
pub fn window_out_len(
    len: usize,
    pad: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
) -> Option<usize> {
    let padded = len.checked_add(pad.checked_mul(2)?)?;
    let span = dilation.checked_mul(kernel - 1)?.checked_add(1)?;
    if padded < span {
        return None;
    }
    Some((padded - span) / stride + 1)
}

/// Output (H, W) of a sliding window on an (H, W) input (floor mode), or `None` when the
/// (dilated) window does not fit in the padded input on an axis.
pub fn window_output_hw(
    input_hw: (usize, usize),
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
) -> Option<(usize, usize)> {
    Some((
        window_out_len(input_hw.0, padding.0, kernel.0, stride.0, dilation.0)?,
        window_out_len(input_hw.1, padding.1, kernel.1, stride.1, dilation.1)?,
    ))
}

/// The output positions `o` in `0..n_out` for which `o * stride + offset` lies in `0..len`.
pub fn valid_range(offset: isize, stride: usize, len: usize, n_out: usize) -> (usize, usize) {
    let s = stride as isize;
    let lo = if offset >= 0 {
        0
    } else {
        (-offset + s - 1) / s
    };
    let room = len as isize - offset;
    let hi = if room <= 0 { 0 } else { (room + s - 1) / s };
    let hi = (hi as usize).min(n_out);
    let lo = (lo as usize).min(hi);
    (lo, hi)
}

/// Set every lazily initialised global the kernels use (CPU feature and cache detection
/// in the SIMD dispatch and the GEMM crate, the default thread count, the epoch collector
/// of rayon's deques) with one tiny call each, so that later calls only read them.
///
/// Fork safety needs this, not only speed: a global initialised behind a `Once` by a pool
/// thread at the moment another thread forks stays "being initialised" forever in the
/// child, where that thread does not exist, and the child's first thread to need it waits
/// forever. The epoch collector is such a global: the first pool thread that steals work
/// initialises it, which may be exactly when the calling program forks (the first kernel
/// call from one thread while another forks).
pub fn warm_up() {
    drop(crossbeam_epoch::pin());
    let _ = crate::simd::backend();
    let _ = crate::parallel::num_threads();
    let _ = crate::memory::physical_bytes();
    let mut out = [0.0f32; 1];
    gemm::sgemm(
        1,
        1,
        1,
        &mut out,
        1,
        false,
        gemm::MatRef::rows(&[1.0], 1),
        gemm::MatRef::rows(&[1.0], 1),
        &crate::parallel::StopToken::default(),
    );
}
