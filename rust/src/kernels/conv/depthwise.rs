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

/// Output columns per step of a stencil: one AVX-512 register, two AVX2 ones. A row is
/// run in whole steps (the padded plane is wide enough for the last step's reads, and the
/// lanes beyond the row are dropped), so no row leaves a scalar remainder. A first
/// version that ran each row as a loop with its remainder reached 12, 6 and 3 GFLOP/s
/// forward on 28-, 14- and 7-wide planes (AVX-512, 1 thread); with whole steps, the
/// column stride a constant and fewer, larger jobs, 16, 13 and 7 (docs/benchmark.md).
const LANES: usize = 16;

/// Planes per parallel job at least: a 7×7 plane is a few dozen vector operations, less
/// than a job's set-up and a fresh scratch buffer.
const PLANES_PER_JOB: usize = 16;

/// The geometry of the stencil on a zero-padded plane.
#[derive(Clone, Copy, Debug)]
struct Stencil {
    kernel: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    out_w: usize,
    /// The padded plane's rows: the input's and the padding.
    padded_h: usize,
    /// The padded plane's width (the distance between its rows): the input's and the
    /// padding, and more zeros on the right for the reads of the last step of a row.
    padded_w: usize,
}

impl Stencil {
    fn new(p: &Conv2dParams) -> Self {
        let (padded_h, padded_w) = p.padded_size();
        let steps = p.out_w.div_ceil(LANES);
        let reach = (steps * LANES - 1) * p.stride.1 + (p.kernel_w - 1) * p.dilation.1 + 1;
        Stencil {
            kernel: (p.kernel_h, p.kernel_w),
            stride: p.stride,
            dilation: p.dilation,
            out_w: p.out_w,
            padded_h,
            padded_w: padded_w.max(reach),
        }
    }

    /// Where tap (ki, kj) of output row `oh`, step `step` starts in the padded plane.
    #[inline(always)]
    fn tap_start(&self, oh: usize, step: usize, ki: usize, kj: usize) -> usize {
        (oh * self.stride.0 + ki * self.dilation.0) * self.padded_w
            + step * LANES * self.stride.1
            + kj * self.dilation.1
    }

    fn taps(&self) -> usize {
        self.kernel.0 * self.kernel.1
    }

    fn steps(&self) -> usize {
        self.out_w.div_ceil(LANES)
    }

    fn padded_len(&self) -> usize {
        self.padded_h * self.padded_w
    }

    /// The output row's columns in step `step`: (first, count).
    #[inline(always)]
    fn columns(&self, step: usize) -> (usize, usize) {
        let first = step * LANES;
        (first, LANES.min(self.out_w - first))
    }

    /// The step's output-gradient values, zeros in the lanes beyond the row (a fixed-size
    /// copy for a whole step: a call to memcpy per step cost more than the step).
    #[inline(always)]
    fn gradient_lanes(&self, row: &[f32], step: usize) -> [f32; LANES] {
        let (first, count) = self.columns(step);
        let mut lanes = [0.0f32; LANES];
        if count == LANES {
            lanes.copy_from_slice(&row[first..first + LANES]);
        } else {
            for (lane, &v) in lanes.iter_mut().zip(&row[first..first + count]) {
                *lane = v;
            }
        }
        lanes
    }
}

/// Store a step's sums in the output row's columns (as [`Stencil::gradient_lanes`]).
#[inline(always)]
fn store_lanes(row: &mut [f32], first: usize, count: usize, acc: &[f32; LANES]) {
    if count == LANES {
        row[first..first + LANES].copy_from_slice(acc);
    } else {
        for (d, &v) in row[first..first + count].iter_mut().zip(acc) {
            *d = v;
        }
    }
}

/// The padded plane's values under a step's lanes from `start`, `stride` apart (lane l
/// at `l * stride`): a slice of known length, so that indexing it needs no bounds test.
#[inline(always)]
fn lane_source(padded: &[f32], start: usize, stride: usize) -> &[f32] {
    &padded[start..start + (LANES - 1) * stride + 1]
}

/// Calls `$body::<SW>` with the column stride as a constant for the usual strides 1 and 2
/// (contiguous or paired loads the compiler can vectorise), read at run time otherwise.
macro_rules! by_column_stride {
    ($body:ident($($arg:expr),*), $stride:expr) => {
        match $stride {
            1 => $body::<1>($($arg),*),
            2 => $body::<2>($($arg),*),
            _ => $body::<0>($($arg),*),
        }
    };
}

/// The column stride: `SW`, or the stencil's when `SW` is 0.
#[inline(always)]
fn column_stride<const SW: usize>(s: &Stencil) -> usize {
    if SW == 0 {
        s.stride.1
    } else {
        SW
    }
}

simd_dispatch! {
    /// `out` (H_out × W_out) = the stencil of `taps` over `padded`.
    fn stencil_forward(padded: &[f32], taps: &[f32], s: Stencil, out: &mut [f32]) {
        by_column_stride!(forward_plane(padded, taps, &s, out), s.stride.1)
    }
}

/// [`stencil_forward`]; each step's sums stay in registers over the taps.
#[inline(always)]
fn forward_plane<const SW: usize>(padded: &[f32], taps: &[f32], s: &Stencil, out: &mut [f32]) {
    let sw = column_stride::<SW>(s);
    for (oh, row) in out.chunks_exact_mut(s.out_w).enumerate() {
        for step in 0..s.steps() {
            let mut acc = [0.0f32; LANES];
            for ki in 0..s.kernel.0 {
                for kj in 0..s.kernel.1 {
                    let w = taps[ki * s.kernel.1 + kj];
                    let x = lane_source(padded, s.tap_start(oh, step, ki, kj), sw);
                    for l in 0..LANES {
                        acc[l] += w * x[l * sw];
                    }
                }
            }
            let (first, count) = s.columns(step);
            store_lanes(row, first, count, &acc);
        }
    }
}

simd_dispatch! {
    /// Adds to `padded_grad` the gradient of [`stencil_forward`] with respect to its
    /// padded plane, for the output gradient `grad_out` (H_out × W_out).
    fn stencil_input_grad(grad_out: &[f32], taps: &[f32], s: Stencil, padded_grad: &mut [f32]) {
        by_column_stride!(input_grad_plane(grad_out, taps, &s, padded_grad), s.stride.1)
    }
}

#[inline(always)]
fn input_grad_plane<const SW: usize>(
    grad_out: &[f32],
    taps: &[f32],
    s: &Stencil,
    padded_grad: &mut [f32],
) {
    let sw = column_stride::<SW>(s);
    for (oh, row) in grad_out.chunks_exact(s.out_w).enumerate() {
        for step in 0..s.steps() {
            let g = s.gradient_lanes(row, step);
            for ki in 0..s.kernel.0 {
                for kj in 0..s.kernel.1 {
                    let w = taps[ki * s.kernel.1 + kj];
                    let start = s.tap_start(oh, step, ki, kj);
                    let dst = &mut padded_grad[start..start + (LANES - 1) * sw + 1];
                    for l in 0..LANES {
                        dst[l * sw] += w * g[l];
                    }
                }
            }
        }
    }
}

simd_dispatch! {
    /// Adds to `lanes` (one row of `LANES` sums per tap) the products of `grad_out` with
    /// the padded plane under each tap, lane by lane: the weight gradient before the sum
    /// over the lanes.
    fn stencil_weight_grad(padded: &[f32], grad_out: &[f32], s: Stencil, lanes: &mut [[f32; LANES]]) {
        by_column_stride!(weight_grad_plane(padded, grad_out, &s, lanes), s.stride.1)
    }
}

#[inline(always)]
fn weight_grad_plane<const SW: usize>(
    padded: &[f32],
    grad_out: &[f32],
    s: &Stencil,
    lanes: &mut [[f32; LANES]],
) {
    let sw = column_stride::<SW>(s);
    for (oh, row) in grad_out.chunks_exact(s.out_w).enumerate() {
        for step in 0..s.steps() {
            let g = s.gradient_lanes(row, step);
            for ki in 0..s.kernel.0 {
                for kj in 0..s.kernel.1 {
                    let x = lane_source(padded, s.tap_start(oh, step, ki, kj), sw);
                    let acc = &mut lanes[ki * s.kernel.1 + kj];
                    for l in 0..LANES {
                        acc[l] += g[l] * x[l * sw];
                    }
                }
            }
        }
    }
}

/// Copy `plane` (H×W) into `padded`, sized to the stencil's padded plane, at the padding's
/// offset, zeros around. The zeros are written once, when the buffer is sized: a buffer
/// serves one convolution's planes, whose copies all cover the same middle.
fn pad_plane(p: &Conv2dParams, s: &Stencil, plane: &[f32], padded: &mut Vec<f32>) -> Result<()> {
    if padded.len() != s.padded_len() {
        padded.clear();
        resize_scratch(padded, s.padded_len(), PADDED_PLANE)?;
    }
    let (ph, pw) = p.padding;
    for (ih, row) in plane.chunks_exact(p.in_w).enumerate() {
        padded[(ih + ph) * s.padded_w + pw..][..p.in_w].copy_from_slice(row);
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
        .with_min_len(PLANES_PER_JOB)
        .try_for_each_init(Vec::new, |padded, (plane_index, (out_planes, plane))| {
            if stop.is_set() {
                return Ok(());
            }
            let c = plane_index % p.in_channels;
            pad_plane(p, &s, plane, padded)?;
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
    let stop = stop_token();
    if let Some(grad_input) = grad_input {
        match super::plan::transposed_params(p) {
            Some(transposed) => {
                input_grad_gathered(p, &transposed, grad_output, weight, grad_input)?
            }
            None => input_grad_scattered(p, &s, grad_output, weight, grad_input)?,
        }
    }
    let out_image = p.out_channels * pixels;
    grad_weight
        .par_chunks_mut(m * taps)
        .enumerate()
        .try_for_each_init(
            || (Vec::new(), Vec::new()),
            |(padded, lanes), (c, gw)| {
                resize_scratch(lanes, m * taps, WEIGHT_GRAD_LANES)?;
                lanes.fill([0.0; LANES]);
                for n in 0..p.batch {
                    if stop.is_set() {
                        return Ok(());
                    }
                    let plane = &input[(n * p.in_channels + c) * plane_len..][..plane_len];
                    pad_plane(p, &s, plane, padded)?;
                    let gy_planes = &grad_output[n * out_image + c * m * pixels..][..m * pixels];
                    for (gy, lanes_j) in gy_planes
                        .chunks_exact(pixels)
                        .zip(lanes.chunks_exact_mut(taps))
                    {
                        stencil_weight_grad(padded, gy, s, lanes_j);
                    }
                }
                for (g, lane) in gw.iter_mut().zip(lanes.iter()) {
                    *g = lane.iter().sum();
                }
                Ok(())
            },
        )
}

/// The input gradient of a stride-1 depthwise convolution as the forward of its
/// transposed one (`transposed`: the output gradient padded by d·(k - 1) - p, the taps
/// flipped), summed over the channel's `multiplier` outputs in order. Each value is
/// gathered in registers: the scatter of [`input_grad_scattered`] stores overlapping
/// rows tap after tap, which stalls on store forwarding (28x28 planes 2.6x slower).
fn input_grad_gathered(
    p: &Conv2dParams,
    transposed: &Conv2dParams,
    grad_output: &[f32],
    weight: &[f32],
    grad_input: &mut [f32],
) -> Result<()> {
    let (s, m, pixels) = (Stencil::new(transposed), multiplier(p), p.pixels());
    let taps = s.taps();
    // Each channel's taps reversed: [kh-1-i][kw-1-j].
    let flipped: Vec<f32> = weight
        .chunks_exact(taps)
        .flat_map(|t| t.iter().rev().copied())
        .collect();
    let stop = stop_token();
    grad_input
        .par_chunks_mut(p.in_h * p.in_w)
        .zip(grad_output.par_chunks(m * pixels))
        .enumerate()
        .with_min_len(PLANES_PER_JOB)
        .try_for_each_init(
            || (Vec::new(), Vec::new()),
            |(padded, term), (plane_index, (gx, gy_planes))| {
                if stop.is_set() {
                    return Ok(());
                }
                let c = plane_index % p.in_channels;
                for (j, gy) in gy_planes.chunks_exact(pixels).enumerate() {
                    let co = c * m + j;
                    pad_plane(transposed, &s, gy, padded)?;
                    let flipped = &flipped[co * taps..(co + 1) * taps];
                    if j == 0 {
                        stencil_forward(padded, flipped, s, gx);
                    } else {
                        resize_scratch(term, gx.len(), PADDED_PLANE)?;
                        stencil_forward(padded, flipped, s, term);
                        for (g, &t) in gx.iter_mut().zip(term.iter()) {
                            *g += t;
                        }
                    }
                }
                Ok(())
            },
        )
}

/// The input gradient of any depthwise convolution: each output gradient scattered onto
/// a zero-padded plane through the taps, the plane's middle copied out.
fn input_grad_scattered(
    p: &Conv2dParams,
    s: &Stencil,
    grad_output: &[f32],
    weight: &[f32],
    grad_input: &mut [f32],
) -> Result<()> {
    let (m, pixels, taps) = (multiplier(p), p.pixels(), s.taps());
    let (ph, pw) = p.padding;
    let stop = stop_token();
    grad_input
        .par_chunks_mut(p.in_h * p.in_w)
        .zip(grad_output.par_chunks(m * pixels))
        .enumerate()
        .with_min_len(PLANES_PER_JOB)
        .try_for_each_init(Vec::new, |padded_grad, (plane_index, (gx, gy_planes))| {
            if stop.is_set() {
                return Ok(());
            }
            let c = plane_index % p.in_channels;
            resize_scratch(padded_grad, s.padded_len(), PADDED_PLANE)?;
            padded_grad.fill(0.0);
            for (j, gy) in gy_planes.chunks_exact(pixels).enumerate() {
                let co = c * m + j;
                stencil_input_grad(gy, &weight[co * taps..(co + 1) * taps], *s, padded_grad);
            }
            for (ih, row) in gx.chunks_exact_mut(p.in_w).enumerate() {
                row.copy_from_slice(&padded_grad[(ih + ph) * s.padded_w + pw..][..p.in_w]);
            }
            Ok(())
        })
}
