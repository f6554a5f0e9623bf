//! Depthwise convolution (groups = C_in, C_out = multiplier · C_in): each output channel
//! is a kH×kW stencil over one input channel, run on a zero-padded copy of the plane and
//! vectorised along the output row.
//!
//! As a GEMM each channel would be a product with an inner dimension of kH·kW (9 for 3×3)
//! and a single output row: all packing, no arithmetic. Here every tap is one
//! multiply-add over a whole output row.
//!
//! Each stencil keeps a fixed order (taps in row-major order; rows, then images in
//! order for the weight gradient), multiplies and adds separately, and is compiled once
//! per SIMD level by [`simd_dispatch!`]: the same bits at every level and thread count.
//! Work is split by (image, channel) planes for the forward and input gradient, by
//! channel for the weight gradient (which sums its images itself, in order).

use rayon::prelude::*;

use super::{Conv2dParams, Epilogue};
use crate::error::Result;
use crate::memory::resize_scratch;
use crate::parallel::stop_token;
use crate::simd_dispatch;

const PADDED_PLANE: &str = "depthwise conv2d: a zero-padded plane";
const WEIGHT_GRAD_LANES: &str = "depthwise conv2d backward: the weight gradient's row sums";

/// The geometry of the stencil on a zero-padded plane.
#[derive(Clone, Copy, Debug)]
struct Stencil {
    kernel: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    out_w: usize,
    /// The padded plane's width: the distance between its rows.
    padded_w: usize,
}

impl Stencil {
    fn new(p: &Conv2dParams) -> Self {
        Stencil {
            kernel: (p.kernel_h, p.kernel_w),
            stride: p.stride,
            dilation: p.dilation,
            out_w: p.out_w,
            padded_w: p.padded_size().1,
        }
    }

    /// Where tap (ki, kj) of output row `oh` starts in the padded plane.
    #[inline(always)]
    fn tap_start(&self, oh: usize, ki: usize, kj: usize) -> usize {
        (oh * self.stride.0 + ki * self.dilation.0) * self.padded_w + kj * self.dilation.1
    }

    fn taps(&self) -> usize {
        self.kernel.0 * self.kernel.1
    }
}

simd_dispatch! {
    /// `out` (H_out × W_out) = the stencil of `taps` over `padded`.
    fn stencil_forward(padded: &[f32], taps: &[f32], s: Stencil, out: &mut [f32]) {
        for (oh, row) in out.chunks_exact_mut(s.out_w).enumerate() {
            row.fill(0.0);
            for ki in 0..s.kernel.0 {
                for kj in 0..s.kernel.1 {
                    let w = taps[ki * s.kernel.1 + kj];
                    let src = &padded[s.tap_start(oh, ki, kj)..];
                    if s.stride.1 == 1 {
                        for (o, &x) in row.iter_mut().zip(src) {
                            *o += w * x;
                        }
                    } else {
                        for (o, &x) in row.iter_mut().zip(src.iter().step_by(s.stride.1)) {
                            *o += w * x;
                        }
                    }
                }
            }
        }
    }
}

simd_dispatch! {
    /// Adds to `padded_grad` the gradient of [`stencil_forward`] with respect to its
    /// padded plane, for the output gradient `grad_out` (H_out × W_out).
    fn stencil_input_grad(grad_out: &[f32], taps: &[f32], s: Stencil, padded_grad: &mut [f32]) {
        for (oh, row) in grad_out.chunks_exact(s.out_w).enumerate() {
            for ki in 0..s.kernel.0 {
                for kj in 0..s.kernel.1 {
                    let w = taps[ki * s.kernel.1 + kj];
                    let dst = &mut padded_grad[s.tap_start(oh, ki, kj)..];
                    if s.stride.1 == 1 {
                        for (d, &g) in dst.iter_mut().zip(row) {
                            *d += w * g;
                        }
                    } else {
                        for (d, &g) in dst.iter_mut().step_by(s.stride.1).zip(row) {
                            *d += w * g;
                        }
                    }
                }
            }
        }
    }
}

simd_dispatch! {
    /// Adds to `lanes` (kH·kW rows of W_out) the products of `grad_out` with the
    /// padded plane under each tap, column by column: the weight gradient before the sum
    /// over the output row.
    fn stencil_weight_grad(padded: &[f32], grad_out: &[f32], s: Stencil, lanes: &mut [f32]) {
        for (oh, row) in grad_out.chunks_exact(s.out_w).enumerate() {
            for ki in 0..s.kernel.0 {
                for kj in 0..s.kernel.1 {
                    let tap = ki * s.kernel.1 + kj;
                    let acc = &mut lanes[tap * s.out_w..(tap + 1) * s.out_w];
                    let src = &padded[s.tap_start(oh, ki, kj)..];
                    if s.stride.1 == 1 {
                        for ((a, &g), &x) in acc.iter_mut().zip(row).zip(src) {
                            *a += g * x;
                        }
                    } else {
                        for ((a, &g), &x) in acc.iter_mut().zip(row).zip(src.iter().step_by(s.stride.1)) {
                            *a += g * x;
                        }
                    }
                }
            }
        }
    }
}

/// Copy `plane` (H×W) into the middle of `padded`, resized to the padded size, zeros
/// around.
fn pad_plane(p: &Conv2dParams, plane: &[f32], padded: &mut Vec<f32>) -> Result<()> {
    let (hp, wp) = p.padded_size();
    resize_scratch(padded, hp * wp, PADDED_PLANE)?;
    let (ph, pw) = p.padding;
    if (ph, pw) != (0, 0) {
        padded.fill(0.0);
    }
    for (ih, row) in plane.chunks_exact(p.in_w).enumerate() {
        padded[(ih + ph) * wp + pw..][..p.in_w].copy_from_slice(row);
    }
    Ok(())
}

/// Output channels per input channel.
fn multiplier(p: &Conv2dParams) -> usize {
    p.out_channels / p.in_channels
}

/// `output = depthwise conv2d(input, weight) + bias`, the epilogue applied per plane.
pub(super) fn forward(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    output: &mut [f32],
) -> Result<()> {
    let (s, m, pixels) = (Stencil::new(p), multiplier(p), p.pixels());
    let taps = s.taps();
    let stop = stop_token();
    output
        .par_chunks_mut(m * pixels)
        .zip(input.par_chunks(p.in_h * p.in_w))
        .enumerate()
        .try_for_each_init(Vec::new, |padded, (plane_index, (out_planes, plane))| {
            if stop.is_set() {
                return Ok(());
            }
            let c = plane_index % p.in_channels;
            pad_plane(p, plane, padded)?;
            for (j, out) in out_planes.chunks_exact_mut(pixels).enumerate() {
                let co = c * m + j;
                stencil_forward(padded, &weight[co * taps..(co + 1) * taps], s, out);
                if let Some(b) = bias {
                    for v in out.iter_mut() {
                        *v += b[co];
                    }
                }
                epilogue.apply(out);
            }
            Ok(())
        })
}

/// The input gradient, if `grad_input` is given, and the weight gradient of [`forward`].
pub(super) fn backward(
    p: &Conv2dParams,
    grad_output: &[f32],
    input: &[f32],
    weight: &[f32],
    grad_input: Option<&mut [f32]>,
    grad_weight: &mut [f32],
) -> Result<()> {
    let (s, m, pixels) = (Stencil::new(p), multiplier(p), p.pixels());
    let (taps, plane_len) = (s.taps(), p.in_h * p.in_w);
    let (hp, wp) = p.padded_size();
    let (ph, pw) = p.padding;
    let stop = stop_token();
    if let Some(grad_input) = grad_input {
        grad_input
            .par_chunks_mut(plane_len)
            .zip(grad_output.par_chunks(m * pixels))
            .enumerate()
            .try_for_each_init(Vec::new, |padded_grad, (plane_index, (gx, gy_planes))| {
                if stop.is_set() {
                    return Ok(());
                }
                let c = plane_index % p.in_channels;
                resize_scratch(padded_grad, hp * wp, PADDED_PLANE)?;
                padded_grad.fill(0.0);
                for (j, gy) in gy_planes.chunks_exact(pixels).enumerate() {
                    let co = c * m + j;
                    stencil_input_grad(gy, &weight[co * taps..(co + 1) * taps], s, padded_grad);
                }
                for (ih, row) in gx.chunks_exact_mut(p.in_w).enumerate() {
                    row.copy_from_slice(&padded_grad[(ih + ph) * wp + pw..][..p.in_w]);
                }
                Ok(())
            })?;
    }
    let out_image = p.out_channels * pixels;
    grad_weight
        .par_chunks_mut(m * taps)
        .enumerate()
        .try_for_each_init(
            || (Vec::new(), Vec::new()),
            |(padded, lanes), (c, gw)| {
                resize_scratch(lanes, m * taps * s.out_w, WEIGHT_GRAD_LANES)?;
                lanes.fill(0.0);
                for n in 0..p.batch {
                    if stop.is_set() {
                        return Ok(());
                    }
                    let plane = &input[(n * p.in_channels + c) * plane_len..][..plane_len];
                    pad_plane(p, plane, padded)?;
                    let gy_planes = &grad_output[n * out_image + c * m * pixels..][..m * pixels];
                    for (gy, lanes_j) in gy_planes
                        .chunks_exact(pixels)
                        .zip(lanes.chunks_exact_mut(taps * s.out_w))
                    {
                        stencil_weight_grad(padded, gy, s, lanes_j);
                    }
                }
                for (g, lane) in gw.iter_mut().zip(lanes.chunks_exact(s.out_w)) {
                    *g = lane.iter().sum();
                }
                Ok(())
            },
        )
}
