//! 2-D convolution (cross-correlation), forward and backward.
//!
//! Each image is unfolded (im2col) into a K×P matrix, K = C_in·kH·kW, P = H_out·W_out,
//! and multiplied by the C_out×K weight matrix. Which way that runs (a small-K product
//! for first layers, one GEMM shared by several small images, a GEMM on the image itself
//! for pointwise convolutions, or tiles of a large image) and how the backward runs is
//! chosen once from the shape by [`plan::Plan::new`], beside the reasons and
//! measurements. Images run in parallel; the weight gradient is summed per fixed group of
//! images, then over groups in order. The input gradient of a stride-1 convolution is
//! itself a convolution (of the output gradient with the flipped, transposed weights);
//! other strides fold the GEMM's K×P gradient back (col2im).
//!
//! With FMA (AVX2 or AVX-512), stride-1 convolutions skip the unfolding: a direct kernel
//! reads the zero-padded image (forward, and so the input gradient; the weight gradient
//! of larger images too).
//!
//! Grouped convolutions (groups > 1) run in `grouped`: depthwise ones by a per-channel
//! stencil, others as one of the convolutions above per group.
//!
//! Files: `params` (validation, output shape), `plan` (the choice of algorithm),
//! `unfold` (im2col and col2im, one loop), `microkernel` (the small-K product),
//! `direct` (the direct kernels), `grouped` and `depthwise` (groups > 1).

mod channels;
mod depthwise;
mod direct;
mod grouped;
mod microkernel;
mod params;
mod plan;
mod unfold;

use std::ops::Range;

use rayon::prelude::*;

use super::activation::{self, Activation};
use super::gemm::{sgemm, MatRef};
use super::pool;
use crate::error::Result;
use crate::memory::resize_scratch;
use crate::parallel::{stop_token, StopToken};
use crate::simd_dispatch;
use microkernel::small_k_product;
pub use params::Conv2dParams;
use plan::{Forward, InputGrad, Plan, Unfolding};
use unfold::{fold, unfold, Folding, Unfolder};

/// The unfolded image: the image itself for pointwise convolutions, else `col` filled.
fn unfolded<'a>(
    p: &Conv2dParams,
    image: &'a [f32],
    col: &'a mut Vec<f32>,
    unfolder: &mut Unfolder,
) -> Result<&'a [f32]> {
    if p.is_pointwise() {
        return Ok(image);
    }
    resize_scratch(col, p.col_rows() * p.pixels(), UNFOLDED_INPUT)?;
    unfolder.im2col(p, image, col, p.pixels())?;
    Ok(col)
}

/// What the scratch buffers hold, for the `MemoryError` when one cannot be had.
const UNFOLDED_INPUT: &str = "conv2d: the unfolded input (im2col)";
const UNFOLDED_GRAD: &str = "conv2d backward: the unfolded input gradient (col2im)";
const GEMM_PRODUCT: &str = "conv2d: the product of images sharing a GEMM";
const POOLED_CONV_OUTPUT: &str = "conv2d with a fused pool: one image's output";
const OUTPUT_GRAD_BLOCK: &str = "conv2d backward: the output gradients sharing a GEMM";

/// The output rows of tiles of `rows_per_tile` rows.
fn tiles(out_h: usize, rows_per_tile: usize) -> impl Iterator<Item = Range<usize>> {
    (0..out_h)
        .step_by(rows_per_tile)
        .map(move |first| first..(first + rows_per_tile).min(out_h))
}

/// What is applied to each output tile once its sums are complete (bias included), while
/// the tile is still in cache: the activation of a fused conv→activation block.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Epilogue {
    pub activation: Option<Activation>,
}

impl Epilogue {
    fn apply(&self, tile: &mut [f32]) {
        if let Some(act) = self.activation {
            activation::apply_in_place(act, tile);
        }
    }
}

/// `output = conv2d(input, weight) + bias`, by the algorithm [`Plan::new`] chooses.
pub fn forward(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
) -> Result<()> {
    forward_fused(p, input, weight, bias, Epilogue::default(), output)
}

/// [`forward`] with `epilogue` applied to each output tile inside the kernel: the same
/// bits as the activation applied afterwards, without a second pass over the output.
pub fn forward_fused(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    output: &mut [f32],
) -> Result<()> {
    if p.groups > 1 {
        check_forward_lengths(p, input, weight, bias, output)?;
        return grouped::forward(p, input, weight, bias, epilogue, output);
    }
    forward_planned(p, &Plan::new(p), input, weight, bias, epilogue, output)
}

fn check_forward_lengths(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &[f32],
) -> Result<()> {
    p.check_lengths(input.len(), weight.len(), output.len())?;
    if let Some(b) = bias {
        crate::error::check_len("bias", b.len(), p.out_channels)?;
    }
    Ok(())
}

/// The 2×2, stride-2, unpadded pool of a fused conv→activation→pool block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool2x2 {
    Max,
    Avg,
}

impl Pool2x2 {
    /// The pooled output's (H, W): floor halves, as `max_pool2d` / `avg_pool2d` give.
    pub fn output_size(p: &Conv2dParams) -> (usize, usize) {
        (p.out_h / 2, p.out_w / 2)
    }
}

/// [`forward_fused`] followed by a 2×2, stride-2 pool, in one call: each image (or each
/// group of images the plan multiplies together) is convolved into a per-thread scratch
/// by the plan's own path, then pooled into `output` (N, C_out, H_out/2, W_out/2) while
/// it is in cache; the full-resolution output never exists as a whole. The chunks are
/// the ones the plan's path uses for the whole batch, so the bits are those of
/// [`forward_fused`] then the pool. With [`Forward::Direct`] the bias and epilogue are
/// applied by the pool's pass, on the kernel's flat output. Requires H_out, W_out ≥ 2.
///
/// The pool runs 16 windows a step (`pool::pool_2x2_mapped`): on LeNet's 1000×1×28×28
/// first layer the former row-by-row pool (14 windows a row, 4-lane vectors) took half of
/// the fused call's time.
pub fn forward_fused_pooled(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    pool: Pool2x2,
    output: &mut [f32],
) -> Result<()> {
    let (ph, pw) = Pool2x2::output_size(p);
    if ph == 0 || pw == 0 {
        return Err(crate::error::Error::Invalid {
            arg: "input",
            got: format!("a convolution output of {}x{}", p.out_h, p.out_w),
            expected: "a convolution output of at least 2x2 for the fused 2x2 pool".into(),
        });
    }
    crate::error::check_len("output", output.len(), p.batch * p.out_channels * ph * pw)?;
    let full_len = p.batch * p.out_channels * p.pixels();
    p.check_lengths(input.len(), weight.len(), full_len)?;
    if let Some(b) = bias {
        crate::error::check_len("bias", b.len(), p.out_channels)?;
    }
    if p.groups > 1 {
        // Grouped: the whole output, then the pool (the same bits, more memory).
        // The pool may read past the last plane (see `pool_2x2_mapped`).
        let slack = 2 * pool::MAPPED_STEP;
        let mut full = Vec::new();
        resize_scratch(&mut full, full_len + slack, POOLED_CONV_OUTPUT)?;
        grouped::forward(p, input, weight, bias, epilogue, &mut full[..full_len])?;
        let (pixels, pooled) = (p.pixels(), p.out_channels * ph * pw);
        let read = (2 * ph - 1) * p.out_w + (2 * pw).next_multiple_of(slack);
        let full = &full;
        output
            .par_chunks_mut(pooled)
            .enumerate()
            .for_each(|(n, out)| {
                for c in 0..p.out_channels {
                    let start = (n * p.out_channels + c) * pixels;
                    let values = &full[start..start + read];
                    let out = &mut out[c * ph * pw..];
                    finish_pooled_plane(values, p.out_w, None, None, pool, out, (ph, pw));
                }
            });
        return Ok(());
    }
    let plan = Plan::new(p);
    let images = match plan.forward {
        Forward::SharedGemm { images } => images,
        _ => 1,
    };
    let per_image = PooledImages::new(p, &plan, weight, bias);
    let (pixels, pooled) = (p.pixels(), p.out_channels * ph * pw);
    let stop = stop_token();
    output
        .par_chunks_mut(images * pooled)
        .zip(input.par_chunks(images * p.image_len()))
        .try_for_each_init(
            || (Vec::new(), PooledScratch::default()),
            |(full, scratch), (out, inp)| {
                if stop.is_set() {
                    return Ok(());
                }
                if let Some(per_image) = &per_image {
                    return per_image.image(p, inp, bias, epilogue, pool, scratch, out);
                }
                let planes = inp.len() / p.image_len() * p.out_channels;
                // The pool may read past the last plane (see `pool_2x2_mapped`).
                let slack = 2 * pool::MAPPED_STEP;
                resize_scratch(full, planes * pixels + slack, POOLED_CONV_OUTPUT)?;
                run_forward(
                    p,
                    &plan,
                    inp,
                    weight,
                    bias,
                    epilogue,
                    &mut full[..planes * pixels],
                )?;
                let read = (2 * ph - 1) * p.out_w + (2 * pw).next_multiple_of(slack);
                for plane in 0..out.len() / (ph * pw) {
                    let values = &full[plane * pixels..plane * pixels + read];
                    let pooled = &mut out[plane * ph * pw..];
                    finish_pooled_plane(values, p.out_w, None, None, pool, pooled, (ph, pw));
                }
                Ok(())
            },
        )
}

/// The per-image paths of [`forward_fused_pooled`] ([`Forward::Direct`]): the direct
/// kernel with output channels across the lanes where it runs, else the pixel one.
enum PooledImages {
    Channels(channels::ChannelPlan),
    Pixels(direct::ForwardPlan),
}

/// Per-thread scratch of [`PooledImages::image`].
#[derive(Default)]
struct PooledScratch {
    channels: channels::ChannelScratch,
    pixels: direct::ForwardScratch,
}

impl PooledImages {
    /// The per-image path of `plan`, or `None` for a path that runs on groups of images
    /// or unfolds them (the full output, then the pool).
    fn new(p: &Conv2dParams, plan: &Plan, weight: &[f32], bias: Option<&[f32]>) -> Option<Self> {
        match plan.forward {
            Forward::Direct(kernel) if p.groups == 1 => {
                let level = crate::simd::level();
                Some(if channels::handles(p, kernel, level) {
                    PooledImages::Channels(channels::ChannelPlan::new(
                        p, weight, bias, kernel, level,
                    ))
                } else {
                    PooledImages::Pixels(direct::ForwardPlan::new(p, weight, bias, kernel))
                })
            }
            _ => None,
        }
    }

    /// One image's pooled output planes into `out_image`.
    #[allow(clippy::too_many_arguments)]
    fn image(
        &self,
        p: &Conv2dParams,
        image: &[f32],
        bias: Option<&[f32]>,
        epilogue: Epilogue,
        pool: Pool2x2,
        scratch: &mut PooledScratch,
        out_image: &mut [f32],
    ) -> Result<()> {
        match self {
            PooledImages::Channels(plan) => plan.image_pooled(
                p,
                image,
                epilogue.activation,
                pool,
                &mut scratch.channels,
                out_image,
            ),
            PooledImages::Pixels(plan) => direct_image_pooled(
                p,
                plan,
                image,
                bias,
                &mut scratch.pixels,
                epilogue,
                pool,
                out_image,
            ),
        }
    }
}

/// One fused conv→activation→pool block of [`forward_fused_pooled_chain`]: the arguments
/// of [`forward_fused_pooled`] but the input and output.
#[derive(Clone, Copy, Debug)]
pub struct PooledConv<'a> {
    pub params: Conv2dParams,
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub epilogue: Epilogue,
    pub pool: Pool2x2,
}

impl PooledConv<'_> {
    /// The pooled output's shape (N, C_out, H_out/2, W_out/2).
    pub fn output_shape(&self) -> [usize; 4] {
        let p = &self.params;
        let (ph, pw) = Pool2x2::output_size(p);
        [p.batch, p.out_channels, ph, pw]
    }
}

const CHAIN_OUTPUT: &str = "conv2d chain: one image's output of the first block";

/// Two fused blocks, `second` on `first`'s output, as [`forward_fused_pooled`] twice, with
/// the same bits: where both run per image (the direct kernels), each image goes through
/// both blocks while the first's output is in cache, so that output never exists for the
/// whole batch (on LeNet's two blocks 12.5 MB per 1000 images written and read back).
/// `second.params` must take `first`'s output shape as its input.
pub fn forward_fused_pooled_chain(
    first: &PooledConv,
    second: &PooledConv,
    input: &[f32],
    output: &mut [f32],
) -> Result<()> {
    let (p1, p2) = (&first.params, &second.params);
    let between = first.output_shape();
    if between != [p2.batch, p2.in_channels, p2.in_h, p2.in_w] {
        return Err(crate::error::Error::Invalid {
            arg: "second",
            got: format!(
                "an input of {:?}",
                [p2.batch, p2.in_channels, p2.in_h, p2.in_w]
            ),
            expected: format!("the first block's output shape {between:?}"),
        });
    }
    let between_len: usize = between.iter().product();
    let per_images = (
        PooledImages::new(p1, &Plan::new(p1), first.weight, first.bias),
        PooledImages::new(p2, &Plan::new(p2), second.weight, second.bias),
    );
    let (Some(one), Some(two)) = per_images else {
        let mut full = Vec::new();
        resize_scratch(&mut full, between_len, CHAIN_OUTPUT)?;
        forward_fused_pooled(
            p1,
            input,
            first.weight,
            first.bias,
            first.epilogue,
            first.pool,
            &mut full,
        )?;
        return forward_fused_pooled(
            p2,
            &full,
            second.weight,
            second.bias,
            second.epilogue,
            second.pool,
            output,
        );
    };
    // The lengths and shapes forward_fused_pooled checks, before any image runs.
    let (ph1, pw1) = Pool2x2::output_size(p1);
    let (ph2, pw2) = Pool2x2::output_size(p2);
    if ph1 == 0 || pw1 == 0 || ph2 == 0 || pw2 == 0 {
        return Err(crate::error::Error::Invalid {
            arg: "input",
            got: format!(
                "convolution outputs of {}x{} and {}x{}",
                p1.out_h, p1.out_w, p2.out_h, p2.out_w
            ),
            expected: "convolution outputs of at least 2x2 for the fused 2x2 pools".into(),
        });
    }
    p1.check_lengths(
        input.len(),
        first.weight.len(),
        p1.batch * p1.out_channels * p1.pixels(),
    )?;
    p2.check_lengths(
        between_len,
        second.weight.len(),
        p2.batch * p2.out_channels * p2.pixels(),
    )?;
    crate::error::check_len(
        "output",
        output.len(),
        second.output_shape().iter().product(),
    )?;
    for (block, p) in [(first, p1), (second, p2)] {
        if let Some(b) = block.bias {
            crate::error::check_len("bias", b.len(), p.out_channels)?;
        }
    }
    let between_image = between_len / p1.batch.max(1);
    let stop = stop_token();
    output
        .par_chunks_mut(p2.out_channels * ph2 * pw2)
        .zip(input.par_chunks(p1.image_len()))
        .try_for_each_init(
            || {
                (
                    Vec::new(),
                    PooledScratch::default(),
                    PooledScratch::default(),
                )
            },
            |(middle, scratch1, scratch2), (out, image)| {
                if stop.is_set() {
                    return Ok(());
                }
                if middle.len() != between_image {
                    resize_scratch(middle, between_image, CHAIN_OUTPUT)?;
                }
                one.image(
                    p1,
                    image,
                    first.bias,
                    first.epilogue,
                    first.pool,
                    scratch1,
                    middle,
                )?;
                two.image(
                    p2,
                    middle,
                    second.bias,
                    second.epilogue,
                    second.pool,
                    scratch2,
                    out,
                )
            },
        )
}

/// One image of [`forward_fused_pooled`] by [`Forward::Direct`]: the bias, epilogue and
/// pool applied to each channel's flat output plane where the kernel left it (in L1),
/// rows `row_stride` apart, without a copy to a dense plane: the elements and operations
/// of [`direct_image`] then the pool, so its bits.
#[allow(clippy::too_many_arguments)]
fn direct_image_pooled(
    p: &Conv2dParams,
    direct: &direct::ForwardPlan,
    image: &[f32],
    bias: Option<&[f32]>,
    scratch: &mut direct::ForwardScratch,
    epilogue: Epilogue,
    pool: Pool2x2,
    out_image: &mut [f32],
) -> Result<()> {
    let (ph, pw) = Pool2x2::output_size(p);
    let row_stride = direct.row_stride();
    // What the mapped pool reads of a plane (see `pool::pool_2x2_mapped`).
    let step = 2 * pool::MAPPED_STEP;
    let read = (2 * ph - 1) * row_stride + (2 * pw).next_multiple_of(step);
    let (flat, computed) = direct.flat_image(p, image, scratch)?;
    for co in 0..p.out_channels {
        let plane = &flat[co * computed..co * computed + read];
        // The unfused bias add, also of 0.0 (which turns -0 into +0).
        let add = (!direct.includes_bias()).then(|| bias.map_or(0.0, |b| b[co]));
        // To the image's end: the pool may store past the plane, before the next one.
        let pooled = &mut out_image[co * ph * pw..];
        let activation = epilogue.activation;
        finish_pooled_plane(plane, row_stride, add, activation, pool, pooled, (ph, pw));
    }
    Ok(())
}

simd_dispatch! {
    /// `pool` of `activation(v + add)` (or of `activation(v)`) for the values `v` of one
    /// flat output plane, rows `row_stride` apart, into the start of `out` (`out_hw`
    /// pooled; what follows may be overwritten, see `pool::pool_2x2_mapped`): the bias
    /// add, the epilogue and the pool of the unfused order in one pass over the plane.
    fn finish_pooled_plane(plane: &[f32], row_stride: usize, add: Option<f32>,
                           activation: Option<Activation>, pool: Pool2x2, out: &mut [f32],
                           out_hw: (usize, usize)) {
        let out_w = out_hw.1;
        // Steps of 8 windows for rows of at most 8 (LeNet's second pool has 7), else 16.
        macro_rules! pooled {
            ($map:expr) => {
                match (pool, out_w <= 8) {
                    (Pool2x2::Max, true) => pool::pool_2x2_mapped::<true, 8, 16>(
                        plane, row_stride, out, out_hw, $map),
                    (Pool2x2::Max, false) => pool::pool_2x2_mapped::<true, 16, 32>(
                        plane, row_stride, out, out_hw, $map),
                    (Pool2x2::Avg, true) => pool::pool_2x2_mapped::<false, 8, 16>(
                        plane, row_stride, out, out_hw, $map),
                    (Pool2x2::Avg, false) => pool::pool_2x2_mapped::<false, 16, 32>(
                        plane, row_stride, out, out_hw, $map),
                }
            };
        }
        // ReLU and the bias apart from the other activations, so that their loops
        // vectorise (a call per value of sigmoid or tanh would not anyway).
        let relu = Activation::Relu;
        match (add, activation) {
            (None, None) => pooled!(|v| v),
            (Some(b), None) => pooled!(move |v| v + b),
            (None, Some(Activation::Relu)) => pooled!(move |v| relu.value(v)),
            (Some(b), Some(Activation::Relu)) => pooled!(move |v| relu.value(v + b)),
            (None, Some(act)) => pooled!(move |v| act.value(v)),
            (Some(b), Some(act)) => pooled!(move |v| act.value(v + b)),
        }
    }
}

/// [`forward_fused`] by the algorithms of `plan`.
fn forward_planned(
    p: &Conv2dParams,
    plan: &Plan,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    output: &mut [f32],
) -> Result<()> {
    check_forward_lengths(p, input, weight, bias, output)?;
    run_forward(p, plan, input, weight, bias, epilogue, output)
}

/// The path of `plan.forward` on `input`'s images (lengths checked by the caller).
fn run_forward(
    p: &Conv2dParams,
    plan: &Plan,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    output: &mut [f32],
) -> Result<()> {
    match plan.forward {
        Forward::SmallK { rows } => forward_small_k(
            p,
            input,
            weight,
            bias,
            output,
            rows,
            plan.unfolding,
            epilogue,
        ),
        Forward::SharedGemm { images } => forward_shared(
            p,
            input,
            weight,
            bias,
            output,
            images,
            plan.unfolding,
            epilogue,
        ),
        Forward::Pointwise => {
            forward_pointwise(p, input, weight, bias, output, epilogue);
            Ok(())
        }
        Forward::TiledIm2col { rows } => forward_tiled(
            p,
            input,
            weight,
            bias,
            output,
            rows,
            plan.unfolding,
            epilogue,
        ),
        Forward::Direct(kernel) => forward_direct(p, input, weight, bias, output, kernel, epilogue),
    }
}

/// [`Forward::Direct`].
fn forward_direct(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    kernel: direct::Kernel,
    epilogue: Epilogue,
) -> Result<()> {
    let level = crate::simd::level();
    if channels::handles_planes(p, kernel, level) {
        // The channels-in-lanes kernel: only the output pixels computed (not the padding
        // columns of the flat output), the same sums in the same order.
        let plan = channels::ChannelPlan::new(p, weight, bias, kernel, level);
        return each_image(p, input, output, |scratch, image, out_image| {
            plan.image(p, image, scratch, out_image)?;
            for plane in out_image.chunks_exact_mut(p.pixels()) {
                epilogue.apply(plane);
            }
            Ok(())
        });
    }
    let direct = direct::ForwardPlan::new(p, weight, bias, kernel);
    each_image(p, input, output, |scratch, image, out_image| {
        direct_image(p, &direct, image, bias, scratch, out_image, epilogue)
    })
}

/// `image_output` on each image of `input` and its planes of `output`, in parallel, with a
/// scratch of type `S` per task; images after a stop request are skipped.
fn each_image<S: Default + Send>(
    p: &Conv2dParams,
    input: &[f32],
    output: &mut [f32],
    image_output: impl Fn(&mut S, &[f32], &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    let stop = stop_token();
    output
        .par_chunks_mut(p.out_channels * p.pixels())
        .zip(input.par_chunks(p.image_len()))
        .try_for_each_init(S::default, |scratch, (out_image, image)| {
            if stop.is_set() {
                return Ok(());
            }
            image_output(scratch, image, out_image)
        })
}

simd_dispatch! {
    /// The output planes of one image from the direct kernel's flat output (planes
    /// `computed` apart, rows `row_stride` apart), plus the bias (0.0 without one) when
    /// `add_bias`, else copied. At the level's vector width: the rows are short (14 or 28
    /// values in LeNet), and the closure that wrote them row by row compiled to baseline
    /// code.
    fn write_flat_planes(p: &Conv2dParams, flat: &[f32], computed: usize, row_stride: usize,
                         add_bias: bool, bias: Option<&[f32]>, out_image: &mut [f32]) {
        let pixels = p.pixels();
        for (co, out_plane) in out_image.chunks_exact_mut(pixels).enumerate() {
            let plane = &flat[co * computed..];
            for (oh, row) in out_plane.chunks_exact_mut(p.out_w).enumerate() {
                let values = &plane[oh * row_stride..oh * row_stride + p.out_w];
                if add_bias {
                    let b = bias.map_or(0.0, |b| b[co]);
                    for (d, &v) in row.iter_mut().zip(values) {
                        *d = v + b;
                    }
                } else {
                    unfold::copy_row(row, values);
                }
            }
        }
    }
}

/// One image of [`Forward::Direct`]: its output planes, bias added, epilogue applied.
fn direct_image(
    p: &Conv2dParams,
    direct: &direct::ForwardPlan,
    image: &[f32],
    bias: Option<&[f32]>,
    scratch: &mut direct::ForwardScratch,
    out_image: &mut [f32],
    epilogue: Epilogue,
) -> Result<()> {
    let pixels = p.pixels();
    let add_bias = !direct.includes_bias();
    let row_stride = direct.row_stride();
    let (flat, computed) = direct.flat_image(p, image, scratch)?;
    write_flat_planes(p, flat, computed, row_stride, add_bias, bias, out_image);
    for plane in out_image.chunks_exact_mut(pixels) {
        epilogue.apply(plane);
    }
    Ok(())
}

/// [`Forward::SmallK`]: `rows_per_tile` output rows unfolded at a time.
#[allow(clippy::too_many_arguments)]
fn forward_small_k(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    rows_per_tile: usize,
    unfolding: Unfolding,
    epilogue: Epilogue,
) -> Result<()> {
    let (pixels, k) = (p.pixels(), p.col_rows());
    let stop = stop_token();
    output
        .par_chunks_mut(p.out_channels * pixels)
        .zip(input.par_chunks(p.image_len()))
        .try_for_each_init(
            || (Vec::new(), Unfolder::new(unfolding)),
            |(col, unfolder), (out_image, image)| {
                if p.is_pointwise() {
                    if !stop.is_set() {
                        small_k_product(weight, image, k, pixels, bias, out_image, pixels);
                        epilogue.apply(out_image);
                    }
                    return Ok(());
                }
                let src = unfolder.source(p, image)?;
                image_tiles(
                    p,
                    src,
                    out_image,
                    rows_per_tile,
                    col,
                    &stop,
                    epilogue,
                    |col, width, out_tile| {
                        small_k_product(weight, col, k, width, bias, out_tile, pixels)
                    },
                )
            },
        )
}

/// One image's forward, `rows_per_tile` output rows at a time (a stop check per tile):
/// unfold the tile's input into `col`, let `product(col, width, out_tile)` write the
/// tile's sums into `out_tile` (the output from the tile's first pixel on, each channel's
/// plane `pixels` apart), then apply the epilogue to the tile in every plane while it is
/// still in cache. Shared by [`Forward::SmallK`] and [`Forward::TiledIm2col`], which
/// differ only in the product.
#[allow(clippy::too_many_arguments)]
fn image_tiles(
    p: &Conv2dParams,
    src: unfold::Source<'_>,
    out_image: &mut [f32],
    rows_per_tile: usize,
    col: &mut Vec<f32>,
    stop: &StopToken,
    epilogue: Epilogue,
    mut product: impl FnMut(&[f32], usize, &mut [f32]),
) -> Result<()> {
    let pixels = p.pixels();
    for rows in tiles(p.out_h, rows_per_tile) {
        if stop.is_set() {
            break;
        }
        let width = rows.len() * p.out_w;
        resize_scratch(col, p.col_rows() * width, UNFOLDED_INPUT)?;
        unfold(p, src, rows.clone(), col, width);
        let tile_start = rows.start * p.out_w;
        product(col, width, &mut out_image[tile_start..]);
        for plane in out_image.chunks_exact_mut(pixels) {
            epilogue.apply(&mut plane[tile_start..tile_start + width]);
        }
    }
    Ok(())
}

/// Fill each output channel's plane with its bias, for a GEMM to accumulate onto.
fn fill_bias(out_image: &mut [f32], bias: Option<&[f32]>, pixels: usize) {
    if let Some(b) = bias {
        for (row, &bc) in out_image.chunks_exact_mut(pixels).zip(b) {
            row.fill(bc);
        }
    }
}

/// [`Forward::Pointwise`].
fn forward_pointwise(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    epilogue: Epilogue,
) {
    let (pixels, k) = (p.pixels(), p.col_rows());
    let stop = stop_token();
    output
        .par_chunks_mut(p.out_channels * pixels)
        .zip(input.par_chunks(p.image_len()))
        .for_each(|(out_image, image)| {
            if stop.is_set() {
                return;
            }
            fill_bias(out_image, bias, pixels);
            sgemm(
                p.out_channels,
                pixels,
                k,
                out_image,
                pixels,
                bias.is_some(),
                MatRef::rows(weight, k),
                MatRef::rows(image, pixels),
                &stop,
            );
            epilogue.apply(out_image);
        });
}

/// [`Forward::TiledIm2col`]: `rows_per_tile` output rows unfolded at a time, a stop
/// check per tile (a 1×128×1024×1024 image took 4-5 s to stop between images).
#[allow(clippy::too_many_arguments)]
fn forward_tiled(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    rows_per_tile: usize,
    unfolding: Unfolding,
    epilogue: Epilogue,
) -> Result<()> {
    let (pixels, k) = (p.pixels(), p.col_rows());
    let stop = stop_token();
    output
        .par_chunks_mut(p.out_channels * pixels)
        .zip(input.par_chunks(p.image_len()))
        .try_for_each_init(
            || (Vec::new(), Unfolder::new(unfolding)),
            |(col, unfolder), (out_image, image)| {
                if stop.is_set() {
                    return Ok(());
                }
                fill_bias(out_image, bias, pixels);
                let src = unfolder.source(p, image)?;
                image_tiles(
                    p,
                    src,
                    out_image,
                    rows_per_tile,
                    col,
                    &stop,
                    epilogue,
                    |col, width, out_tile| {
                        sgemm(
                            p.out_channels,
                            width,
                            k,
                            out_tile,
                            pixels,
                            bias.is_some(),
                            MatRef::rows(weight, k),
                            MatRef::rows(col, width),
                            &stop,
                        )
                    },
                )
            },
        )
}

/// [`Forward::SharedGemm`]: `group` images unfolded side by side, one GEMM for them into
/// `product` (C_out × group·P), then copied to NCHW with the bias added.
#[allow(clippy::too_many_arguments)]
fn forward_shared(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    group: usize,
    unfolding: Unfolding,
    epilogue: Epilogue,
) -> Result<()> {
    let (pixels, k) = (p.pixels(), p.col_rows());
    let out_image = p.out_channels * pixels;
    let stop = stop_token();
    output
        .par_chunks_mut(group * out_image)
        .zip(input.par_chunks(group * p.image_len()))
        .try_for_each_init(
            || (Vec::new(), Vec::new(), Unfolder::new(unfolding)),
            |(col, product, unfolder), (out_group, in_group)| {
                if stop.is_set() {
                    return Ok(());
                }
                let n = in_group.len() / p.image_len() * pixels;
                resize_scratch(col, k * n, UNFOLDED_INPUT)?;
                for (i, image) in in_group.chunks_exact(p.image_len()).enumerate() {
                    unfolder.im2col(p, image, &mut col[i * pixels..], n)?;
                }
                resize_scratch(product, p.out_channels * n, GEMM_PRODUCT)?;
                sgemm(
                    p.out_channels,
                    n,
                    k,
                    product,
                    n,
                    false,
                    MatRef::rows(weight, k),
                    MatRef::rows(col, n),
                    &stop,
                );
                for (i, out) in out_group.chunks_exact_mut(out_image).enumerate() {
                    for (co, dst) in out.chunks_exact_mut(pixels).enumerate() {
                        let src = &product[co * n + i * pixels..co * n + (i + 1) * pixels];
                        let b = bias.map_or(0.0, |b| b[co]);
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = v + b;
                        }
                        epilogue.apply(dst);
                    }
                }
                Ok(())
            },
        )
}

/// The weights of [`InputGrad::Transposed`]: `[c][co][i][j] = weight[co][c][kH-1-i][kW-1-j]`.
fn transposed_weight(p: &Conv2dParams, weight: &[f32]) -> Vec<f32> {
    let (kh, kw) = (p.kernel_h, p.kernel_w);
    let mut flipped = vec![0.0f32; weight.len()];
    for co in 0..p.out_channels {
        for c in 0..p.in_channels {
            for i in 0..kh {
                for j in 0..kw {
                    flipped[((c * p.out_channels + co) * kh + i) * kw + j] =
                        weight[((co * p.in_channels + c) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)];
                }
            }
        }
    }
    flipped
}

simd_dispatch! {
    /// Each output channel's plane sum of one image's output gradient (`image`, C_out
    /// planes) into `sums`, for the bias gradient ([`bias_from_plane_sums`]). At the
    /// level's vector width (the sums only add, so the bits are the same at every level).
    fn image_plane_sums(pixels: usize, image: &[f32], sums: &mut [f32]) {
        for (sum, plane) in sums.iter_mut().zip(image.chunks_exact(pixels)) {
            *sum = crate::kernels::reduce::sum(plane);
        }
    }
}

/// The bias gradient from the planes' sums (`C_out` a row, one row per image): each
/// channel's added over the batch in f64, in image order.
fn bias_from_plane_sums(plane_sums: &[f32], grad_bias: &mut [f32]) {
    let channels = grad_bias.len();
    for (co, g) in grad_bias.iter_mut().enumerate() {
        let total: f64 = plane_sums
            .chunks_exact(channels)
            .map(|image| f64::from(image[co]))
            .fold(0.0, |total, sum| total + sum);
        *g = total as f32;
    }
}

/// Gradients of [`forward`]: `grad_input` (if given), `grad_weight`, `grad_bias` (if given).
pub fn backward(
    p: &Conv2dParams,
    grad_output: &[f32],
    input: &[f32],
    weight: &[f32],
    mut grad_input: Option<&mut [f32]>,
    grad_weight: &mut [f32],
    mut grad_bias: Option<&mut [f32]>,
) -> Result<()> {
    p.check_lengths(input.len(), weight.len(), grad_output.len())?;
    crate::error::check_len("grad_weight", grad_weight.len(), weight.len())?;
    if let Some(gb) = grad_bias.as_deref() {
        crate::error::check_len("grad_bias", gb.len(), p.out_channels)?;
    }
    let (pixels, k) = (p.pixels(), p.col_rows());
    let out_image = p.out_channels * pixels;

    let plan = Plan::new(p);
    // The direct weight gradient sums the planes of the output gradient while it frames
    // them (the same sums): the bias gradient without a pass of its own over them.
    let direct_weight_grad = plan.weight_grad_direct.filter(|_| {
        p.groups == 1
            && (grad_input.is_none() || matches!(plan.input_grad, InputGrad::Transposed(_)))
    });
    // The planes' sums of the output gradient, for the bias gradient: taken by the weight
    // gradient's loops while each image is in cache (a pass of their own was 17% of the
    // first layer's backward, 64x1x28x28->16, AMD EPYC with AVX-512); by a pass of their
    // own for grouped convolutions.
    let mut plane_sums = Vec::new();
    resize_scratch(
        &mut plane_sums,
        p.batch * p.out_channels,
        "conv2d backward: the sums of the output gradient's planes",
    )?;
    if p.groups > 1 {
        if let Some(gb) = grad_bias.take() {
            plane_sums
                .par_chunks_mut(p.out_channels)
                .zip(grad_output.par_chunks(out_image))
                .for_each(|(sums, image)| image_plane_sums(p.pixels(), image, sums));
            bias_from_plane_sums(&plane_sums, gb);
        }
        if let Some(gx) = grad_input.as_deref() {
            crate::error::check_len("grad_input", gx.len(), input.len())?;
        }
        return grouped::backward(p, grad_output, input, weight, grad_input, grad_weight);
    }

    let (group, block) = (plan.weight_grad_group, plan.weight_grad_images);
    let n_groups = p.batch.div_ceil(group);
    let mut partials = Vec::new();
    resize_scratch(
        &mut partials,
        n_groups * weight.len(),
        "conv2d backward: the weight gradients of groups of images",
    )?;
    if let (Some(gx), InputGrad::Transposed(transposed)) =
        (grad_input.as_deref_mut(), plan.input_grad)
    {
        crate::error::check_len("grad_input", gx.len(), input.len())?;
        forward(
            &transposed,
            grad_output,
            &transposed_weight(p, weight),
            None,
            gx,
        )?;
        grad_input = None; // done: the loop below computes the weight gradient only
    }
    if let Some(kernel) = direct_weight_grad {
        let direct = direct::WeightGradPlan::new(p, kernel);
        let want_sums = grad_bias.is_some();
        let stop = stop_token();
        partials
            .par_chunks_mut(weight.len())
            .zip(plane_sums.par_chunks_mut(group * p.out_channels))
            .zip(input.par_chunks(group * p.image_len()))
            .zip(grad_output.par_chunks(group * out_image))
            .try_for_each_init(
                direct::WeightGradScratch::default,
                |scratch, (((partial, sums), images), grads)| {
                    if stop.is_set() {
                        return Ok(());
                    }
                    let sums = want_sums.then_some(sums);
                    direct.images(p, images, grads, partial, sums, scratch, &stop)
                },
            )?;
        sum_partials(&partials, grad_weight);
        if let Some(gb) = grad_bias {
            bias_from_plane_sums(&plane_sums, gb);
        }
        return Ok(());
    }
    let want_bias = grad_bias.is_some();
    let grad_input_groups: Vec<Option<&mut [f32]>> = match grad_input {
        Some(gx) => {
            crate::error::check_len("grad_input", gx.len(), input.len())?;
            gx.chunks_mut(group * p.image_len()).map(Some).collect()
        }
        None => (0..n_groups).map(|_| None).collect(),
    };
    let image_len = p.image_len();
    let stop = stop_token();
    grad_input_groups
        .into_par_iter()
        .zip(partials.par_chunks_mut(weight.len()))
        .zip(plane_sums.par_chunks_mut(group * p.out_channels))
        .enumerate()
        .try_for_each(|(g, ((mut gx_group, partial), sums))| -> Result<()> {
            let (mut col, mut grad_col, mut gy_block) = (Vec::new(), Vec::new(), Vec::new());
            let (mut unfolder, mut scratch) = (Unfolder::new(plan.unfolding), Vec::new());
            let first = g * group;
            let last = (first + group).min(p.batch);
            for start in (first..last).step_by(block) {
                if stop.is_set() {
                    return Ok(());
                }
                let images = block.min(last - start);
                let n = images * pixels;
                if want_bias {
                    for i in start..start + images {
                        let at = (i - first) * p.out_channels;
                        let gy = &grad_output[i * out_image..(i + 1) * out_image];
                        image_plane_sums(pixels, gy, &mut sums[at..at + p.out_channels]);
                    }
                }
                if images == 1 && plan.backward_rows < p.out_h {
                    let image = &input[start * image_len..(start + 1) * image_len];
                    let gx = gx_group
                        .as_deref_mut()
                        .map(|gx| &mut gx[(start - first) * image_len..][..image_len]);
                    let tile = TileScratch {
                        col: &mut col,
                        grad_col: &mut grad_col,
                        unfolder: &mut unfolder,
                        fold_scratch: &mut scratch,
                    };
                    let gy = &grad_output[start * out_image..(start + 1) * out_image];
                    backward_image_tiled(
                        p,
                        &plan,
                        image,
                        gy,
                        weight,
                        partial,
                        start > first,
                        gx,
                        tile,
                        &stop,
                    )?;
                    continue;
                }
                // The block's unfolded images (K × n) and output gradients (C_out × n).
                let (cols, gys): (&[f32], &[f32]) = if images == 1 {
                    let image = &input[start * image_len..(start + 1) * image_len];
                    (
                        unfolded(p, image, &mut col, &mut unfolder)?,
                        &grad_output[start * out_image..(start + 1) * out_image],
                    )
                } else {
                    resize_scratch(&mut col, k * n, UNFOLDED_INPUT)?;
                    resize_scratch(&mut gy_block, p.out_channels * n, OUTPUT_GRAD_BLOCK)?;
                    for i in 0..images {
                        let image = &input[(start + i) * image_len..(start + i + 1) * image_len];
                        unfolder.im2col(p, image, &mut col[i * pixels..], n)?;
                        let gy = &grad_output[(start + i) * out_image..][..out_image];
                        for (co, src) in gy.chunks_exact(pixels).enumerate() {
                            gy_block[co * n + i * pixels..co * n + (i + 1) * pixels]
                                .copy_from_slice(src);
                        }
                    }
                    (&col, &gy_block)
                };
                sgemm(
                    p.out_channels,
                    k,
                    n,
                    partial,
                    k,
                    start > first,
                    MatRef::rows(gys, n),
                    MatRef::transposed(cols, n),
                    &stop,
                );
                let Some(gx_group) = gx_group.as_deref_mut() else {
                    continue;
                };
                // InputGrad::GemmFold: the other plan was done above.
                let gx_block = &mut gx_group[(start - first) * image_len..][..images * image_len];
                resize_scratch(&mut grad_col, k * n, UNFOLDED_GRAD)?;
                sgemm(
                    k,
                    n,
                    p.out_channels,
                    &mut grad_col,
                    n,
                    false,
                    MatRef::transposed(weight, k),
                    MatRef::rows(gys, n),
                    &stop,
                );
                for (i, gx) in gx_block.chunks_exact_mut(image_len).enumerate() {
                    fold(
                        p,
                        plan.unfolding,
                        &grad_col[i * pixels..],
                        n,
                        gx,
                        &mut scratch,
                    )?;
                }
            }
            Ok(())
        })?;
    sum_partials(&partials, grad_weight);
    if let Some(gb) = grad_bias {
        bias_from_plane_sums(&plane_sums, gb);
    }
    Ok(())
}

/// `grad_weight` = the groups' partial gradients added in order.
fn sum_partials(partials: &[f32], grad_weight: &mut [f32]) {
    let len = grad_weight.len();
    grad_weight.par_iter_mut().enumerate().for_each(|(i, g)| {
        let mut total = 0.0f32;
        for part in partials.chunks_exact(len) {
            total += part[i];
        }
        *g = total;
    });
}

/// The scratch of [`backward_image_tiled`], reused from tile to tile and image to image.
struct TileScratch<'a> {
    col: &'a mut Vec<f32>,
    grad_col: &'a mut Vec<f32>,
    unfolder: &'a mut Unfolder,
    fold_scratch: &'a mut Vec<f32>,
}

/// The backward of one image too large to unfold whole ([`Plan::backward_rows`]): adds
/// its weight gradient to `partial` (or overwrites it unless `accumulate`) and, for
/// [`InputGrad::GemmFold`], writes its input gradient to `gx`, tile by tile with a stop
/// check per tile. The weight gradient sums the tiles' products in order: its rounding
/// differs from the whole image's single GEMM, but not with the thread count.
#[allow(clippy::too_many_arguments)]
fn backward_image_tiled(
    p: &Conv2dParams,
    plan: &Plan,
    image: &[f32],
    grad_output: &[f32],
    weight: &[f32],
    partial: &mut [f32],
    accumulate: bool,
    grad_input: Option<&mut [f32]>,
    scratch: TileScratch,
    stop: &StopToken,
) -> Result<()> {
    let (pixels, k) = (p.pixels(), p.col_rows());
    let src = scratch.unfolder.source(p, image)?;
    let mut folding = grad_input
        .map(|gx| Folding::begin(p, plan.unfolding, gx, scratch.fold_scratch))
        .transpose()?;
    for (t, rows) in tiles(p.out_h, plan.backward_rows).enumerate() {
        if stop.is_set() {
            return Ok(());
        }
        let width = rows.len() * p.out_w;
        let grad_output_tile = MatRef::rows(&grad_output[rows.start * p.out_w..], pixels);
        resize_scratch(scratch.col, k * width, UNFOLDED_INPUT)?;
        unfold(p, src, rows.clone(), scratch.col, width);
        sgemm(
            p.out_channels,
            k,
            width,
            partial,
            k,
            accumulate || t > 0,
            grad_output_tile,
            MatRef::transposed(scratch.col, width),
            stop,
        );
        if let Some(folding) = folding.as_mut() {
            resize_scratch(scratch.grad_col, k * width, UNFOLDED_GRAD)?;
            sgemm(
                k,
                width,
                p.out_channels,
                scratch.grad_col,
                width,
                false,
                MatRef::transposed(weight, k),
                grad_output_tile,
                stop,
            );
            folding.add(scratch.grad_col, width, rows);
        }
    }
    if let Some(folding) = folding {
        folding.finish();
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::error::Error;
    use crate::simd::Level;

    #[test]
    fn direct_small_k_kernel_gives_the_small_k_product_bits() {
        if !crate::simd::use_avx2() {
            return; // the small-K product is then portable code, without FMA
        }
        // First layers: one and three channels, odd sizes, 5×5, padding 0-2, dilation,
        // channel counts that leave partial tiles; with and without a bias.
        for (input, weight, padding, dilation) in [
            ([3, 1, 28, 28], [16, 1, 3, 3], (1, 1), (1, 1)),
            ([2, 1, 9, 7], [5, 1, 3, 3], (0, 0), (1, 1)),
            ([2, 3, 11, 13], [7, 3, 3, 3], (1, 2), (1, 1)),
            ([1, 1, 10, 9], [9, 1, 5, 5], (2, 2), (1, 1)),
            ([2, 2, 12, 12], [3, 2, 3, 3], (2, 1), (2, 2)),
            ([1, 1, 3, 3], [17, 1, 3, 3], (1, 1), (1, 1)),
        ] {
            let p = Conv2dParams::new(&input, &weight, (1, 1), padding, dilation).unwrap();
            let small = Plan::for_level(&p, Level::Scalar);
            assert!(matches!(small.forward, Forward::SmallK { .. }), "{input:?}");
            let x = values(input.iter().product(), 1);
            let w = values(weight.iter().product(), 2);
            let b = values(weight[0], 3);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for bias in [Some(&b[..]), None] {
                let run = |plan: &Plan| {
                    let mut y = vec![f32::NAN; p.output_shape().iter().product()];
                    forward_planned(&p, plan, &x, &w, bias, Epilogue::default(), &mut y).unwrap();
                    y
                };
                let expected = run(&small);
                for tile in [(8, 2), (6, 1)] {
                    let kernel = direct::Kernel {
                        tile,
                        fused: true,
                        from_bias: true,
                    };
                    let direct = Plan {
                        forward: Forward::Direct(kernel),
                        ..small
                    };
                    assert_eq!(
                        bits(&run(&direct)),
                        bits(&expected),
                        "{input:?} {tile:?} bias {}",
                        bias.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn fused_pool_gives_the_bits_of_the_forward_then_the_pool() {
        use crate::kernels::pool::{self, Pool2dParams};
        // Every forward path, odd output sizes (the last row and column dropped), widths
        // past one step of the mapped pool, with and without bias and activation.
        for (input, weight, stride, padding, dilation) in [
            ([3, 1, 28, 28], [16, 1, 3, 3], (1, 1), (1, 1), (1, 1)),
            ([2, 3, 9, 11], [5, 3, 3, 3], (1, 1), (0, 1), (1, 1)),
            ([4, 16, 14, 14], [32, 16, 3, 3], (1, 1), (1, 1), (1, 1)),
            ([2, 8, 7, 37], [9, 8, 3, 3], (1, 1), (1, 1), (1, 1)),
            ([2, 16, 6, 5], [3, 16, 1, 1], (1, 1), (0, 0), (1, 1)),
            ([2, 4, 13, 12], [6, 4, 3, 3], (2, 1), (1, 1), (1, 1)),
            // The channels-in-lanes kernel: two vectors of channels and one, a partial
            // vector, rows of tiles of 14, 4 and 1 pixels, a 5×3 kernel, dilation.
            ([2, 5, 9, 23], [48, 5, 3, 3], (1, 1), (1, 1), (1, 1)),
            ([1, 3, 11, 6], [17, 3, 5, 3], (1, 1), (2, 1), (1, 1)),
            ([2, 4, 12, 13], [20, 4, 3, 3], (1, 1), (2, 1), (2, 1)),
        ] {
            let p = Conv2dParams::new(&input, &weight, stride, padding, dilation).unwrap();
            let x = values(input.iter().product(), 4);
            let w = values(weight.iter().product(), 5);
            let b = values(weight[0], 6);
            let out_shape = p.output_shape();
            let pool_params = Pool2dParams::new(&out_shape, (2, 2), (2, 2), (0, 0)).unwrap();
            let pooled_len: usize = pool_params.output_shape().iter().product();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for (bias, activation) in [
                (Some(&b[..]), Some(Activation::Relu)),
                (None, None),
                (Some(&b[..]), Some(Activation::Tanh)),
                (None, Some(Activation::LeakyRelu(0.1))),
            ] {
                let epilogue = Epilogue { activation };
                let mut full = vec![0.0; out_shape.iter().product()];
                forward_fused(&p, &x, &w, bias, epilogue, &mut full).unwrap();
                for (kind, pool) in [("max", Pool2x2::Max), ("avg", Pool2x2::Avg)] {
                    let mut expected = vec![0.0; pooled_len];
                    match pool {
                        Pool2x2::Max => pool::max_forward(&pool_params, &full, &mut expected, None),
                        Pool2x2::Avg => pool::avg_forward(&pool_params, &full, true, &mut expected),
                    }
                    .unwrap();
                    let mut fused = vec![f32::NAN; pooled_len];
                    forward_fused_pooled(&p, &x, &w, bias, epilogue, pool, &mut fused).unwrap();
                    assert_eq!(
                        bits(&fused),
                        bits(&expected),
                        "{input:?} {kind} {activation:?} bias {}",
                        bias.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn fused_chain_gives_the_bits_of_the_two_blocks() {
        // LeNet's blocks (both per image with FMA), odd sizes, a second block on the
        // GEMM path (stride 2) and a grouped one (both through the whole intermediate);
        // max and avg.
        for (input, first_weight, second_weight, stride, groups) in [
            ([3, 1, 28, 28], [16, 1, 3, 3], [32, 16, 3, 3], 1, 1),
            ([2, 3, 19, 23], [20, 3, 3, 3], [17, 20, 3, 3], 1, 1),
            ([2, 2, 12, 12], [4, 2, 3, 3], [6, 4, 3, 3], 2, 1),
            ([2, 2, 14, 14], [8, 2, 3, 3], [8, 4, 3, 3], 1, 2),
        ] {
            let p1 = Conv2dParams::new(&input, &first_weight, (1, 1), (1, 1), (1, 1)).unwrap();
            let (ph, pw) = Pool2x2::output_size(&p1);
            let between = [input[0], first_weight[0], ph, pw];
            let p2 = Conv2dParams::grouped(
                &between,
                &second_weight,
                (stride, stride),
                (1, 1),
                (1, 1),
                groups,
            )
            .unwrap();
            let x = values(input.iter().product(), 7);
            let (w1, w2) = (
                values(first_weight.iter().product(), 8),
                values(second_weight.iter().product(), 9),
            );
            let (b1, b2) = (values(first_weight[0], 10), values(second_weight[0], 11));
            for (pool, activation) in [
                (Pool2x2::Max, Some(Activation::Relu)),
                (Pool2x2::Avg, Some(Activation::Tanh)),
                (Pool2x2::Max, None),
            ] {
                let epilogue = Epilogue { activation };
                let first = PooledConv {
                    params: p1,
                    weight: &w1,
                    bias: Some(&b1),
                    epilogue,
                    pool,
                };
                let second = PooledConv {
                    params: p2,
                    weight: &w2,
                    bias: Some(&b2),
                    epilogue,
                    pool,
                };
                let mut middle = vec![f32::NAN; between.iter().product()];
                forward_fused_pooled(&p1, &x, &w1, Some(&b1), epilogue, pool, &mut middle).unwrap();
                let mut expected = vec![f32::NAN; second.output_shape().iter().product()];
                forward_fused_pooled(&p2, &middle, &w2, Some(&b2), epilogue, pool, &mut expected)
                    .unwrap();
                let mut chained = vec![f32::NAN; expected.len()];
                forward_fused_pooled_chain(&first, &second, &x, &mut chained).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&chained),
                    bits(&expected),
                    "{input:?} {pool:?} {activation:?}"
                );
            }
        }
    }

    #[test]
    fn fused_chain_refuses_a_second_block_of_another_input_shape() {
        let p1 = Conv2dParams::new(&[2, 1, 12, 12], &[4, 1, 3, 3], (1, 1), (1, 1), (1, 1)).unwrap();
        let p2 = Conv2dParams::new(&[2, 4, 5, 6], &[3, 4, 3, 3], (1, 1), (1, 1), (1, 1)).unwrap();
        let (w1, w2) = (values(36, 1), values(108, 2));
        let epilogue = Epilogue::default();
        let first = PooledConv {
            params: p1,
            weight: &w1,
            bias: None,
            epilogue,
            pool: Pool2x2::Max,
        };
        let second = PooledConv {
            params: p2,
            weight: &w2,
            bias: None,
            epilogue,
            pool: Pool2x2::Max,
        };
        let mut out = vec![0.0; 2 * 3 * 2 * 3];
        let err = forward_fused_pooled_chain(&first, &second, &values(288, 3), &mut out);
        assert!(
            matches!(err, Err(Error::Invalid { arg: "second", .. })),
            "{err:?}"
        );
    }

    /// Direct definition of the convolution, for comparison.
    pub(super) fn naive(p: &Conv2dParams, x: &[f32], w: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; p.output_shape().iter().product()];
        for n in 0..p.batch {
            for co in 0..p.out_channels {
                for oh in 0..p.out_h {
                    for ow in 0..p.out_w {
                        let mut acc = 0.0f64;
                        let group = co / p.group_out_channels();
                        for c in 0..p.group_in_channels() {
                            for ki in 0..p.kernel_h {
                                for kj in 0..p.kernel_w {
                                    let ih = (oh * p.stride.0 + ki * p.dilation.0) as isize
                                        - p.padding.0 as isize;
                                    let iw = (ow * p.stride.1 + kj * p.dilation.1) as isize
                                        - p.padding.1 as isize;
                                    if ih < 0
                                        || iw < 0
                                        || ih >= p.in_h as isize
                                        || iw >= p.in_w as isize
                                    {
                                        continue;
                                    }
                                    let ci = group * p.group_in_channels() + c;
                                    let xv = x[((n * p.in_channels + ci) * p.in_h + ih as usize)
                                        * p.in_w
                                        + iw as usize];
                                    let wv = w[((co * p.group_in_channels() + c) * p.kernel_h
                                        + ki)
                                        * p.kernel_w
                                        + kj];
                                    acc += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                        y[((n * p.out_channels + co) * p.out_h + oh) * p.out_w + ow] = acc as f32;
                    }
                }
            }
        }
        y
    }

    pub(super) fn values(len: usize, salt: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(salt) >> 8) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn forward_matches_direct_definition() {
        for (shape, wshape, s, pd, d) in [
            ([2, 3, 7, 9], [4, 3, 3, 3], (1, 1), (1, 1), (1, 1)),
            ([1, 2, 8, 8], [3, 2, 3, 2], (2, 1), (0, 1), (1, 2)),
            ([3, 1, 5, 5], [2, 1, 1, 1], (1, 1), (0, 0), (1, 1)),
            ([1, 2, 6, 7], [2, 2, 5, 5], (2, 2), (2, 1), (1, 1)),
            // K = 576 with 30 output columns: several im2col tiles per image.
            ([2, 64, 20, 30], [3, 64, 3, 3], (1, 1), (1, 1), (1, 1)),
            ([1, 64, 21, 30], [2, 64, 3, 3], (2, 1), (0, 1), (1, 1)),
        ] {
            let p = Conv2dParams::new(&shape, &wshape, s, pd, d).unwrap();
            // The GEMM paths (the plan of the portable level), and the direct one where
            // the FMA levels have it.
            let gemm = Plan::for_level(&p, Level::Scalar);
            if shape[1] == 64 {
                assert!(
                    matches!(gemm.forward, Forward::TiledIm2col { rows } if rows < p.out_h),
                    "the case should span several tiles"
                );
            }
            let x = values(shape.iter().product(), 1);
            let w = values(wshape.iter().product(), 2);
            for plan in [
                gemm,
                Plan::for_level(&p, Level::Avx2),
                Plan::for_level(&p, Level::Avx512),
            ] {
                let mut y = vec![0.0; p.output_shape().iter().product()];
                forward_planned(&p, &plan, &x, &w, None, Epilogue::default(), &mut y).unwrap();
                for (a, b) in y.iter().zip(naive(&p, &x, &w)) {
                    assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn fused_activation_gives_the_bits_of_the_separate_pass() {
        for (shape, wshape, s, pd, level, expected) in [
            (
                [3, 1, 9, 7],
                [4, 1, 3, 3],
                (1, 1),
                (1, 1),
                Level::Scalar,
                "small",
            ),
            (
                [16, 16, 7, 7],
                [8, 16, 3, 3],
                (1, 1),
                (1, 1),
                Level::Scalar,
                "shared",
            ),
            (
                [2, 40, 6, 5],
                [3, 40, 1, 1],
                (1, 1),
                (0, 0),
                Level::Avx2,
                "pointwise",
            ),
            (
                [2, 64, 20, 30],
                [3, 64, 3, 3],
                (2, 1),
                (1, 1),
                Level::Avx2,
                "tiled",
            ),
            (
                [16, 16, 7, 7],
                [8, 16, 3, 3],
                (1, 1),
                (1, 1),
                Level::Avx512,
                "direct",
            ),
            (
                [16, 16, 7, 7],
                [8, 16, 3, 3],
                (1, 1),
                (1, 1),
                Level::Avx2,
                "direct",
            ),
        ] {
            let p = Conv2dParams::new(&shape, &wshape, s, pd, (1, 1)).unwrap();
            let plan = Plan::for_level(&p, level);
            let path = match plan.forward {
                Forward::SmallK { .. } => "small",
                Forward::SharedGemm { .. } => "shared",
                Forward::Pointwise => "pointwise",
                Forward::TiledIm2col { rows } if rows < p.out_h => "tiled",
                Forward::TiledIm2col { .. } => "one tile",
                Forward::Direct(_) => "direct",
            };
            assert_eq!(path, expected);
            let x = values(shape.iter().product(), 3);
            let w = values(wshape.iter().product(), 4);
            let b = values(wshape[0], 5);
            let mut plain = vec![0.0; p.output_shape().iter().product()];
            forward_planned(&p, &plan, &x, &w, Some(&b), Epilogue::default(), &mut plain).unwrap();
            for act in [
                Activation::Relu,
                Activation::LeakyRelu(0.1),
                Activation::Sigmoid,
                Activation::Tanh,
            ] {
                let mut separate = vec![0.0; plain.len()];
                activation::forward(act, &plain, &mut separate).unwrap();
                let mut fused = vec![0.0; plain.len()];
                let epilogue = Epilogue {
                    activation: Some(act),
                };
                forward_planned(&p, &plan, &x, &w, Some(&b), epilogue, &mut fused).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fused), bits(&separate), "{path} {act:?}");
            }
        }
    }

    #[test]
    fn grouped_and_depthwise_match_the_direct_definition() {
        // (input, weight, stride, padding, dilation, groups): depthwise (multiplier 1 and
        // 2, strides, dilation) and general groups. Every SIMD level: tests/test_grouped_conv.py.
        for (shape, wshape, s, pd, d, groups) in [
            ([2, 4, 9, 7], [4, 1, 3, 3], (1, 1), (1, 1), (1, 1), 4),
            ([1, 3, 11, 13], [6, 1, 3, 3], (2, 2), (2, 1), (1, 1), 3),
            ([3, 2, 8, 9], [4, 1, 3, 2], (1, 2), (0, 1), (2, 1), 2),
            ([2, 6, 10, 10], [9, 2, 5, 5], (2, 1), (2, 2), (1, 1), 3),
            ([2, 4, 7, 7], [8, 2, 1, 1], (1, 1), (0, 0), (1, 1), 2),
        ] {
            let p = Conv2dParams::grouped(&shape, &wshape, s, pd, d, groups).unwrap();
            assert_eq!(p.is_depthwise(), wshape[1] == 1);
            let x = values(shape.iter().product(), 7);
            let w = values(wshape.iter().product(), 8);
            let mut y = vec![0.0; p.output_shape().iter().product()];
            forward(&p, &x, &w, None, &mut y).unwrap();
            for (a, b) in y.iter().zip(naive(&p, &x, &w)) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn grouped_rejects_groups_that_do_not_divide_the_channels() {
        for (shape, wshape, groups) in [
            ([1, 4, 5, 5], [6, 1, 3, 3], 4),
            ([1, 6, 5, 5], [4, 2, 3, 3], 3),
            ([1, 4, 5, 5], [4, 1, 3, 3], 0),
        ] {
            let err = Conv2dParams::grouped(&shape, &wshape, (1, 1), (0, 0), (1, 1), groups);
            assert!(
                matches!(err, Err(Error::Invalid { arg: "groups", .. })),
                "{err:?}"
            );
        }
        let err = Conv2dParams::grouped(&[1, 4, 5, 5], &[4, 2, 3, 3], (1, 1), (0, 0), (1, 1), 4);
        assert!(matches!(err, Err(Error::Invalid { arg: "weight", .. })));
    }

    #[test]
    fn output_columns_entirely_in_the_padding() {
        // Width 1, padding 2, stride 3: the second output column reads only padding.
        let p = Conv2dParams::new(&[1, 1, 3, 1], &[1, 1, 1, 1], (1, 3), (0, 2), (1, 1)).unwrap();
        let x = [1.0, 2.0, 3.0];
        let mut y = vec![0.0; p.output_shape().iter().product()];
        forward(&p, &x, &[2.0], None, &mut y).unwrap();
        assert_eq!(y, naive(&p, &x, &[2.0]));
        let (mut gx, mut gw) = (vec![0.0; 3], vec![0.0; 1]);
        backward(
            &p,
            &vec![1.0; y.len()],
            &x,
            &[2.0],
            Some(&mut gx),
            &mut gw,
            None,
        )
        .unwrap();
        assert_eq!(gx, [0.0; 3]);
    }

    #[test]
    fn rejects_kernel_larger_than_padded_input() {
        let err = Conv2dParams::new(&[1, 1, 2, 2], &[1, 1, 3, 3], (1, 1), (0, 0), (1, 1));
        assert!(matches!(err, Err(Error::Invalid { arg: "weight", .. })));
    }
}
