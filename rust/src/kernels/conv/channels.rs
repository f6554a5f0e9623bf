//! Direct convolution of stride 1 with the output channels across the vector lanes, for
//! the evaluation forward with a fused 2×2 pool ([`super::forward_fused_pooled`]) and,
//! from two vectors of output channels, the plain forward ([`ChannelPlan::image`]).
//!
//! [`super::direct`] puts sixteen consecutive flat pixels in a vector, so it also computes
//! the padding columns between output rows (224 positions for the 196 pixels of a 14×14
//! image under 3×3, padding 1). Here a vector holds sixteen output channels of one pixel:
//! per (input channel, tap), a tile of P pixels × V vectors of channels takes V loads of
//! weights and P broadcast inputs for P·V multiply-adds, and only the output pixels are
//! computed (the layout of ONNX Runtime's NCHWc kernels and oneDNN's blocked ones, here
//! for the output only). The output is channel-last, `[pixel][channel]`, so the pool's
//! four window values of sixteen channels are four plain vectors, without the
//! deinterleaving of pixel pairs; it writes the pooled planes back in NCHW.
//!
//! Each pixel's sum runs from the same start (0, or the bias for
//! [`super::direct::Kernel::small_k`]) over (input channel, tap) in the same order, fused
//! multiply-adds of the same products, as [`super::direct`]'s forward: the same bits. The
//! pool then applies the same bias add, activation and selects or sums as
//! `pool::pool_2x2_mapped`, so the fused call gives the bits of the other paths.

use super::direct::{self, Kernel};
use super::{Conv2dParams, Pool2x2};
use crate::error::Result;
use crate::kernels::activation::Activation;
use crate::kernels::pool::pool_window;
use crate::memory::resize_scratch;
use crate::simd::Level;
use crate::simd_dispatch;

/// Channels of one vector.
const LANES: usize = 16;

/// The register tile of a level: `pixels` pixels of one row × up to `vectors` vectors
/// of channels, a row's remainder in tiles of `rest` pixels, then single pixels. Any
/// tile gives the same bits: each pixel's sum is the same sequence of multiply-adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ChannelTile {
    pub pixels: usize,
    pub vectors: usize,
    pub rest: usize,
}

impl ChannelTile {
    /// AVX-512: a LeNet row (14 pixels) × 2 vectors, 28 accumulators of the 32
    /// registers. AVX2: a vector of sixteen channels is two of its 16 registers, so 6
    /// pixels × 1 vector (12 accumulators). With the fused pool on 64×16×14×14→32 it was
    /// as fast as 5×1 (rest 4) and 2×2 (4 rounds alternating), and in single runs 1.1x
    /// faster than 4×1, 1.15x than 6×1 with a rest of 4, 1.5-1.8x than 7×1, 3×2 and
    /// 14×2 (which spill). (CPU time, AMD EPYC with AVX-512 held to AVX2, loaded.)
    pub(super) fn of(level: Level) -> Self {
        if level == Level::Avx512 {
            ChannelTile {
                pixels: 14,
                vectors: 2,
                rest: 4,
            }
        } else {
            ChannelTile {
                pixels: 6,
                vectors: 1,
                rest: 2,
            }
        }
    }
}

const CHANNEL_OUTPUT: &str = "conv2d (direct, channels in lanes): one image's output";

/// Whether the kernel of `kernel` (the plan's direct forward at `level`) may run here
/// instead: with AVX2 or AVX-512 (a tile each, [`ChannelTile`]), with fused multiply-adds
/// (the bits of the direct kernel), from at least one vector of output channels, and not for
/// a first layer ([`Kernel::small_k`]): on LeNet's 1000×1×28×28→16 with the fused pool,
/// one input channel leaves a broadcast per multiply-add, and the pixel kernel was 1.4x
/// faster (CPU time, builds alternating, AMD EPYC with AVX-512, loaded). With AVX2, on
/// 64×16×14×14→32 with the fused ReLU and max pool it was 1.06x faster than the pixel
/// kernel, LeNetBN inference 1.05x (4 rounds alternating, AMD EPYC held to AVX2, loaded).
///
/// The channel-last output (channels rounded up to 16 where the pixel kernel rounds
/// them to 8: up to 1.33x its size) stays within the direct kernels' per-image scratch
/// bound ([`direct::handles`]): a larger image keeps the pixel kernel.
pub(super) fn handles(p: &Conv2dParams, kernel: Kernel, level: Level) -> bool {
    let output_bytes = p
        .pixels()
        .saturating_mul(p.out_channels.next_multiple_of(LANES))
        .saturating_mul(std::mem::size_of::<f32>());
    level >= Level::Avx2
        && kernel.fused
        && !kernel.from_bias
        && p.out_channels >= LANES
        && output_bytes <= direct::IMAGE_SCRATCH_BYTES
}

/// Whether [`ChannelPlan::image`] may run the direct forward `kernel` at `level` (the
/// unpooled forward, whose channel-last output is transposed back to planes in registers,
/// [`write_planes`]): as [`handles`], from two vectors of output channels. On LeNet's
/// 64×16×14×14→32, 3×3, padding 1 it was 1.07x faster than the pixel kernel at AVX-512;
/// on the input gradient of that convolution (32 → 16 channels, one vector) 1.1x slower
/// (CPU time, builds alternating, AMD EPYC with AVX-512, shared). At AVX2, with the
/// transposition in registers (before it, value by value, the two kernels were even),
/// 1.11x faster on 64×16×14×14→32, 1.09x on 64×16×28×28→32, 1.10x on 64×32×7×7→64 and
/// 1.06x on 32×64×32×32→64 (CPU time, alternating in one process, AMD EPYC with AVX2
/// only), the same bits.
///
/// At AVX2 the choice is the kernel that computes fewer values: this one rounds the
/// channels up to 16 and computes the output pixels only, the pixel kernel rounds them to
/// its tile of 6 and computes the padding columns too. That keeps this kernel for the
/// shapes above and also takes one vector of channels where it fills it: the input
/// gradient of LeNet's middle convolution (64×32×14×14→16) 1.28x faster, 64×16×28×28→16
/// 1.54x, 64×64×7×7→16 1.25x; and leaves 64×8×20×20→24 (rounded to 32 here) to the pixel
/// kernel, which was 1.24x faster on it (CPU time, builds alternating, AMD EPYC with AVX2
/// only, the same bits).
pub(super) fn handles_planes(p: &Conv2dParams, kernel: Kernel, level: Level) -> bool {
    if !handles(p, kernel, level) {
        return false;
    }
    if level == Level::Avx512 {
        return p.out_channels >= 2 * LANES;
    }
    let pixel_channels = p.out_channels.next_multiple_of(kernel.tile.0);
    let (_, wp) = p.padded_size();
    p.out_channels.next_multiple_of(LANES) * p.pixels() <= pixel_channels * p.out_h * wp
}

/// The packed weights, starts and geometry of one call.
pub(super) struct ChannelPlan {
    /// Padded width (the frame's row stride) and one padded plane.
    wp: usize,
    plane: usize,
    /// Where each (input channel, tap) reads the frame, from a pixel's window start:
    /// `channel · plane + tap`, in the weights' order.
    starts: Vec<usize>,
    /// The largest of `starts`.
    reach: usize,
    /// `[vector][input channel][tap][lane]`, zero beyond C_out.
    weights: Vec<f32>,
    /// Where each channel's sums start (its bias with [`Kernel::from_bias`], else 0),
    /// zero beyond C_out.
    initial: Vec<f32>,
    /// C_out rounded up to whole vectors: the row length of the channel-last output.
    channels: usize,
    tile: ChannelTile,
    /// What the pool adds to each channel's sums before the activation, the unfused bias
    /// add (also of 0.0, which turns -0 into +0), unless the sums started from the bias;
    /// zero beyond C_out.
    add: Option<Vec<f32>>,
}

/// Per-thread scratch: the zero-padded frame and the channel-last output of one image.
#[derive(Default)]
pub(super) struct ChannelScratch {
    frame: Vec<f32>,
    output: Vec<f32>,
    /// The pooled output, channel-last, before its transposition to NCHW.
    pooled: Vec<f32>,
}

impl ChannelPlan {
    pub(super) fn new(
        p: &Conv2dParams,
        weight: &[f32],
        bias: Option<&[f32]>,
        kernel: Kernel,
        level: Level,
    ) -> Self {
        let (hp, wp) = p.padded_size();
        let taps: Vec<usize> = (0..p.kernel_h)
            .flat_map(|ki| {
                (0..p.kernel_w).map(move |kj| ki * p.dilation.0 * wp + kj * p.dilation.1)
            })
            .collect();
        let channels = p.out_channels.next_multiple_of(LANES);
        let per_vector = p.in_channels * taps.len() * LANES;
        let mut weights = vec![0.0f32; channels / LANES * per_vector];
        // [vector][input channel][tap][lane], written in that order: a scatter in the
        // weight's order (a store to another cache line each) was 5% of a one-image
        // LeNetBN forward.
        let row = p.in_channels * taps.len();
        for (vector, block) in weights.chunks_exact_mut(per_vector).enumerate() {
            let lanes = LANES.min(p.out_channels - vector * LANES);
            let rows = &weight[vector * LANES * row..][..lanes * row];
            for (k, values) in block.chunks_exact_mut(LANES).enumerate() {
                for (value, source) in values.iter_mut().zip(rows.chunks_exact(row)) {
                    *value = source[k];
                }
            }
        }
        let mut initial = vec![0.0f32; channels];
        let mut add = vec![0.0f32; channels];
        if let Some(b) = bias {
            let start = if kernel.from_bias {
                &mut initial
            } else {
                &mut add
            };
            start[..p.out_channels].copy_from_slice(&b[..p.out_channels]);
        }
        let plane = hp * wp;
        let starts: Vec<usize> = (0..p.in_channels)
            .flat_map(|c| taps.iter().map(move |&tap| c * plane + tap))
            .collect();
        ChannelPlan {
            wp,
            plane,
            reach: starts.iter().copied().max().unwrap_or(0),
            starts,
            weights,
            initial,
            channels,
            tile: ChannelTile::of(level),
            add: (!kernel.from_bias).then_some(add),
        }
    }

    /// One image convolved, then bias-added (the bias the plan was made with, unless the
    /// sums started from it), activated and pooled into `out_image` (C_out planes of
    /// H_out/2 × W_out/2, NCHW).
    pub(super) fn image_pooled(
        &self,
        p: &Conv2dParams,
        image: &[f32],
        activation: Option<Activation>,
        pool: Pool2x2,
        scratch: &mut ChannelScratch,
        out_image: &mut [f32],
    ) -> Result<()> {
        self.convolve(p, image, scratch)?;
        let (ph, pw) = Pool2x2::output_size(p);
        if scratch.pooled.len() != ph * pw * self.channels {
            scratch.pooled.clear();
            resize_scratch(&mut scratch.pooled, ph * pw * self.channels, CHANNEL_OUTPUT)?;
        }
        pool_channels_last(
            &scratch.output,
            p,
            self.channels,
            self.add.as_deref(),
            activation,
            pool,
            &mut scratch.pooled,
        );
        // Transposed to planes as the unpooled output is, with nothing added.
        write_planes(
            &scratch.pooled,
            self.channels,
            None,
            ph * pw,
            &mut out_image[..p.out_channels * ph * pw],
        );
        Ok(())
    }
}

impl ChannelPlan {
    /// One image convolved into `scratch.output`, channels last (the image framed in
    /// `scratch.frame` first).
    fn convolve(
        &self,
        p: &Conv2dParams,
        image: &[f32],
        scratch: &mut ChannelScratch,
    ) -> Result<()> {
        direct::fill_frame(p, image, &mut scratch.frame, p.in_channels * self.plane)?;
        let output_len = p.pixels() * self.channels;
        if scratch.output.len() != output_len {
            scratch.output.clear();
            resize_scratch(&mut scratch.output, output_len, CHANNEL_OUTPUT)?;
        }
        channels_forward(self, p, &scratch.frame, &mut scratch.output);
        Ok(())
    }

    /// One image convolved into `out_image` (C_out planes, NCHW), each value plus its
    /// channel's bias (0.0 without one): the values [`super::direct`]'s forward writes
    /// through `write_flat_planes`, so its bits.
    pub(super) fn image(
        &self,
        p: &Conv2dParams,
        image: &[f32],
        scratch: &mut ChannelScratch,
        out_image: &mut [f32],
    ) -> Result<()> {
        self.convolve(p, image, scratch)?;
        let add = self
            .add
            .as_deref()
            .expect("sums that start from 0 take the bias after");
        write_planes(
            &scratch.output,
            self.channels,
            Some(add),
            p.pixels(),
            out_image,
        );
        Ok(())
    }
}

/// The channel-last `output` (`[pixel][channels]`), plus `add` if given, into C_out planes of
/// `pixels` (NCHW): plane by plane, each written in order. At AVX-512 each 16×16 block is
/// transposed in registers ([`write_planes_avx512`]), at AVX2 each 8×8 block
/// ([`write_planes_avx2`]); the portable body moves it value by value (LLVM builds the
/// transpose from single-value inserts: 13% of LeNet's middle convolution forward). All
/// write `value + add[c]`, or the value itself without `add` (not `+ 0.0`, which would
/// turn -0 into +0): the same bits.
fn write_planes(
    output: &[f32],
    channels: usize,
    add: Option<&[f32]>,
    pixels: usize,
    out_image: &mut [f32],
) {
    let out_channels = out_image.len() / pixels;
    assert!(
        channels.is_multiple_of(LANES)
            && out_channels <= channels
            && add.is_none_or(|add| add.len() >= out_channels.next_multiple_of(LANES))
            && output.len() >= pixels * channels,
        "write_planes: channel-last output of {channels} channels"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() == Level::Avx512 {
        // SAFETY: the level is AVX-512 only on CPUs that have it; the bounds are checked
        // above.
        unsafe { write_planes_avx512(output, channels, add, pixels, out_image) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() == Level::Avx2 {
        // SAFETY: the level is AVX2 only on CPUs that have it; the bounds are checked
        // above.
        unsafe { write_planes_avx2(output, channels, add, pixels, out_image) };
        return;
    }
    write_planes_portable(output, channels, add, pixels, out_image);
}

/// [`write_planes`] on 8×8 blocks transposed in registers (the 16-channel groups as two
/// halves): pairs of rows interleaved, then pairs of pairs, then the 128-bit lanes.
///
/// # Safety
/// AVX2; the bounds [`write_planes`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn write_planes_avx2(
    output: &[f32],
    channels: usize,
    add: Option<&[f32]>,
    pixels: usize,
    out_image: &mut [f32],
) {
    use std::arch::x86_64::*;
    const HALF: usize = LANES / 2;
    let out_channels = out_image.len() / pixels;
    let blocks = pixels / HALF;
    for group in (0..out_channels).step_by(HALF) {
        let count = HALF.min(out_channels - group);
        for block in 0..blocks {
            // SAFETY: rows block·8.. of 8 channels from `group` lie in `output`
            // (`pixels · channels` values, `group + 8 <= channels`: `channels` is a
            // multiple of 16 and `group < out_channels <= channels`).
            let r: [__m256; HALF] = std::array::from_fn(|j| unsafe {
                _mm256_loadu_ps(output.as_ptr().add((block * HALF + j) * channels + group))
            });
            let t: [__m256; HALF] = std::array::from_fn(|i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i & 1 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            });
            // u[4q + k]: from t[4q + (k >> 1)] and t[4q + 2 + (k >> 1)]; channels k and
            // k + 4 of pixels 4q..4q + 4 in its two 128-bit lanes.
            let u: [__m256; HALF] = std::array::from_fn(|i| {
                let (q, k) = (i / 4, i % 4);
                let (a, b) = (t[4 * q + k / 2], t[4 * q + 2 + k / 2]);
                if k % 2 == 0 {
                    _mm256_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm256_shuffle_ps::<0xEE>(a, b)
                }
            });
            // Channel c: the low (c < 4) or high 128-bit lanes of u[c % 4] and u[4 + c % 4].
            for c in 0..count {
                let (a, b) = (u[c % 4], u[4 + c % 4]);
                let column = if c < 4 {
                    _mm256_permute2f128_ps::<0x20>(a, b)
                } else {
                    _mm256_permute2f128_ps::<0x31>(a, b)
                };
                let value = match add {
                    Some(add) => _mm256_add_ps(column, _mm256_set1_ps(add[group + c])),
                    None => column,
                };
                let at = (group + c) * pixels + block * HALF;
                let dst = &mut out_image[at..at + HALF];
                // SAFETY: eight values of `dst`.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), value) };
            }
        }
        write_last_pixels(
            output,
            channels,
            add,
            blocks * HALF..pixels,
            group..group + count,
            out_image,
        );
    }
}

/// [`write_planes`] on 16×16 blocks transposed in registers: pairs of rows interleaved,
/// then pairs of pairs, then 128-bit lanes twice (the classic four rounds of shuffles).
///
/// # Safety
/// AVX-512 F; the bounds [`write_planes`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn write_planes_avx512(
    output: &[f32],
    channels: usize,
    add: Option<&[f32]>,
    pixels: usize,
    out_image: &mut [f32],
) {
    use std::arch::x86_64::*;
    let out_channels = out_image.len() / pixels;
    let blocks = pixels / LANES;
    for group in (0..out_channels).step_by(LANES) {
        let count = LANES.min(out_channels - group);
        for block in 0..blocks {
            // SAFETY: rows block·16.. of 16 channels from `group` lie in `output`
            // (`pixels · channels` values, `group + 16 <= channels`).
            let r: [__m512; LANES] = std::array::from_fn(|j| unsafe {
                _mm512_loadu_ps(output.as_ptr().add((block * LANES + j) * channels + group))
            });
            let t: [__m512; LANES] = std::array::from_fn(|i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i & 1 == 0 {
                    _mm512_unpacklo_ps(a, b)
                } else {
                    _mm512_unpackhi_ps(a, b)
                }
            });
            // u[4q + k]: from t[4q + (k >> 1)] and t[4q + 2 + (k >> 1)].
            let u: [__m512; LANES] = std::array::from_fn(|i| {
                let (q, k) = (i / 4, i % 4);
                let (a, b) = (t[4 * q + k / 2], t[4 * q + 2 + k / 2]);
                if k % 2 == 0 {
                    _mm512_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm512_shuffle_ps::<0xEE>(a, b)
                }
            });
            // v[8h + 4s + k]: 128-bit lanes of u[8h + k] and u[8h + 4 + k].
            let v: [__m512; LANES] = std::array::from_fn(|i| {
                let (h, s, k) = (i / 8, (i / 4) % 2, i % 4);
                let (a, b) = (u[8 * h + k], u[8 * h + 4 + k]);
                if s == 0 {
                    _mm512_shuffle_f32x4::<0x88>(a, b)
                } else {
                    _mm512_shuffle_f32x4::<0xDD>(a, b)
                }
            });
            // Column c: 128-bit lanes of v[c % 8] and v[8 + c % 8].
            for c in 0..count {
                let (a, b) = (v[c % 8], v[8 + c % 8]);
                let column = if c < 8 {
                    _mm512_shuffle_f32x4::<0x88>(a, b)
                } else {
                    _mm512_shuffle_f32x4::<0xDD>(a, b)
                };
                let value = match add {
                    Some(add) => _mm512_add_ps(column, _mm512_set1_ps(add[group + c])),
                    None => column,
                };
                let at = (group + c) * pixels + block * LANES;
                let dst = &mut out_image[at..at + LANES];
                // SAFETY: sixteen values of `dst`.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), value) };
            }
        }
        write_last_pixels(
            output,
            channels,
            add,
            blocks * LANES..pixels,
            group..group + count,
            out_image,
        );
    }
}

/// Pixels `last` (those after the last whole block, to the planes' end: `last.end` is
/// their length) of channels `group`, one by one: the end of [`write_planes`]'s planes.
#[inline(always)]
fn write_last_pixels(
    output: &[f32],
    channels: usize,
    add: Option<&[f32]>,
    last: std::ops::Range<usize>,
    group: std::ops::Range<usize>,
    out_image: &mut [f32],
) {
    let pixels = last.end;
    for c in group {
        let plane = &mut out_image[c * pixels..(c + 1) * pixels];
        for q in last.clone() {
            let value = output[q * channels + c];
            plane[q] = add.map_or(value, |add| value + add[c]);
        }
    }
}

simd_dispatch! {
    /// [`write_planes`] below AVX-512: each 16×16 block moved value by value.
    fn write_planes_portable(output: &[f32], channels: usize, add: Option<&[f32]>,
                             pixels: usize, out_image: &mut [f32]) {
        let out_channels = out_image.len() / pixels;
        let blocks = pixels / LANES;
        for group in (0..out_channels).step_by(LANES) {
            let group_add: Option<&[f32; LANES]> =
                add.map(|add| add[group..group + LANES].try_into().expect("a vector"));
            let count = LANES.min(out_channels - group);
            for block in 0..blocks {
                let mut rows = [[0.0f32; LANES]; LANES];
                unroll!(j < LANES => {
                    let at = (block * LANES + j) * channels + group;
                    rows[j] = output[at..at + LANES].try_into().expect("a vector");
                });
                let mut columns = [[0.0f32; LANES]; LANES];
                unroll!(c < LANES => {
                    unroll!(j < LANES => {
                        let value = rows[j][c];
                        columns[c][j] = group_add.map_or(value, |add| value + add[c]);
                    });
                });
                for (c, column) in columns.iter().enumerate().take(count) {
                    let at = (group + c) * pixels + block * LANES;
                    out_image[at..at + LANES].copy_from_slice(column);
                }
            }
            write_last_pixels(output, channels, add, blocks * LANES..pixels, group..group + count,
                              out_image);
        }
    }
}

simd_dispatch! {
    /// The channel-last output (`[pixel][channels]`) of one frame.
    fn channels_forward(plan: &ChannelPlan, p: &Conv2dParams, frame: &[f32], output: &mut [f32]) {
        let vectors = plan.channels / LANES;
        let tile = plan.tile;
        macro_rules! tiles {
            ($v:literal, $first:expr) => {
                match (tile.pixels, tile.rest) {
                    (14, 4) => image_tiles::<$v, 14, 4>(plan, p, $first, frame, output),
                    (6, 2) => image_tiles::<$v, 6, 2>(plan, p, $first, frame, output),
                    _ => unreachable!("channels_forward: no tile of {tile:?}"),
                }
            };
        }
        let mut first = 0;
        while first < vectors {
            if tile.vectors >= 2 && vectors - first >= 2 {
                tiles!(2, first);
                first += 2;
            } else {
                tiles!(1, first);
                first += 1;
            }
        }
    }
}

/// Every output pixel for the `V` vectors of channels from vector `first`, in flat
/// order: tiles of `P` pixels, then of `REST`, then single pixels. A tile may run on into
/// the next output row (the rows' padding columns lie between its pixels in the frame),
/// so that a row's remainder does not leave small tiles: with AVX2's 6-pixel tile, a
/// 14-pixel row is 6 + 6 + 2, and the 2-pixel tile's four accumulators wait on their
/// multiply-adds' latency. LeNetBN's inference (a 1000×1×28×28 forward, the same bits)
/// ran 1.05x faster than with tiles of one row at a time (CPU time, builds alternating,
/// 8 rounds, AMD EPYC with AVX2 only).
#[inline(always)]
fn image_tiles<const V: usize, const P: usize, const REST: usize>(
    plan: &ChannelPlan,
    p: &Conv2dParams,
    first: usize,
    frame: &[f32],
    output: &mut [f32],
) {
    let per_vector = plan.starts.len() * LANES;
    let weights = &plan.weights[first * per_vector..][..V * per_vector];
    let initial = &plan.initial[first * LANES..][..V * LANES];
    let tile = Tile {
        weights,
        initial,
        frame,
        starts: &plan.starts,
        reach: plan.reach,
        wp: plan.wp,
        out_w: p.out_w,
        per_vector,
        channels: plan.channels,
        first,
    };
    let pixels = p.pixels();
    let mut pixel = 0;
    while pixel + P <= pixels {
        tile.pixels::<V, P>(pixel, output);
        pixel += P;
    }
    while pixel + REST <= pixels {
        tile.pixels::<V, REST>(pixel, output);
        pixel += REST;
    }
    while pixel < pixels {
        tile.pixels::<V, 1>(pixel, output);
        pixel += 1;
    }
}

/// What every tile of one run of [`image_tiles`] reads.
struct Tile<'a> {
    /// The `V` vectors' weights, `[vector][input channel][tap][lane]`.
    weights: &'a [f32],
    initial: &'a [f32],
    frame: &'a [f32],
    /// Where each (input channel, tap) reads ([`ChannelPlan::starts`]) and the largest.
    starts: &'a [usize],
    reach: usize,
    /// The frame's row stride (the padded width) and the output's row length.
    wp: usize,
    out_w: usize,
    per_vector: usize,
    channels: usize,
    first: usize,
}

impl Tile<'_> {
    /// Where flat output pixel `pixel` (rows of `out_w`) starts its window in the frame
    /// (rows of `wp`).
    #[inline(always)]
    fn frame_at(&self, pixel: usize) -> usize {
        pixel / self.out_w * self.wp + pixel % self.out_w
    }

    /// The `P` output pixels from flat output pixel `pixel`, for `V` vectors of channels.
    #[inline(always)]
    fn pixels<const V: usize, const P: usize>(&self, pixel: usize, output: &mut [f32]) {
        let at = self.frame_at(pixel);
        if pixel % self.out_w + P <= self.out_w {
            // In one row: consecutive in the frame, offsets the compiler knows.
            self.run::<V, P>(at, std::array::from_fn(|j| j), pixel, output);
        } else {
            let offsets = std::array::from_fn(|j| self.frame_at(pixel + j) - at);
            self.run::<V, P>(at, offsets, pixel, output);
        }
    }

    /// `P` pixels, the `j`th at flat frame position `at + offsets[j]` (increasing) and
    /// output pixel `pixel + j`, for `V` vectors of channels.
    #[inline(always)]
    fn run<const V: usize, const P: usize>(
        &self,
        at: usize,
        offsets: [usize; P],
        pixel: usize,
        output: &mut [f32],
    ) {
        // Every read is within one slice of `last + 1` values a tap: the offsets are
        // clamped to the last, which they do not exceed, so that the compiler sees it.
        let last = offsets[P - 1];
        let offsets = offsets.map(|o| o.min(last));
        let mut acc = [[[0.0f32; LANES]; V]; P];
        let mut start = [[0.0f32; LANES]; V];
        unroll!(v < V => {
            start[v] = self.initial[v * LANES..(v + 1) * LANES].try_into().expect("a vector");
        });
        unroll!(j < P => {
            acc[j] = start;
        });
        // Every read is within `window`: the starts do not exceed `reach`.
        let window = &self.frame[at..][..self.reach + last + 1];
        // Each vector's weights, a tap's `LANES` after another's in `starts`' order. The
        // first vector's walk along with the starts (no check a tap); `others` holds the
        // walks of the rest (its first entry unused).
        let vector_weights =
            |v: usize| self.weights[v * self.per_vector..][..self.per_vector].chunks_exact(LANES);
        let mut others: [std::slice::ChunksExact<'_, f32>; V] =
            [(); V].map(|()| [].chunks_exact(LANES));
        unroll!(v < V => {
            others[v] = vector_weights(v);
        });
        // One flat loop over (input channel, tap), the sums' order. A plain tap: the
        // tile's reads are broadcasts either way, and an opaque one (`black_box`) cost a
        // store and a load a tap (LeNetBN inference 1.06x faster without, AVX2; the
        // AVX-512 loop is the same instructions less those).
        for (&tap_start, first_weights) in self.starts.iter().zip(vector_weights(0)) {
            let x = &window[tap_start..][..=last];
            let mut w = [[0.0f32; LANES]; V];
            w[0] = first_weights.try_into().expect("a vector");
            unroll!(v < V => {
                if v > 0 {
                    w[v] = others[v].next().expect("a tap's weights").try_into().expect("a vector");
                }
            });
            unroll!(j < P => {
                let xj = x[offsets[j]];
                unroll!(v < V => {
                    for (a, &wl) in acc[j][v].iter_mut().zip(&w[v]) {
                        *a = wl.mul_add(xj, *a);
                    }
                });
            });
        }
        unroll!(j < P => {
            unroll!(v < V => {
                let at = (pixel + j) * self.channels + (self.first + v) * LANES;
                let dst: &mut [f32; LANES] =
                    (&mut output[at..at + LANES]).try_into().expect("a vector");
                *dst = acc[j][v];
            });
        });
    }
}

simd_dispatch! {
    /// `pool` of `activation(v + add)` (or of `activation(v)`) over the channel-last
    /// output, into `pooled` (channel-last too): the selects and sums of
    /// `pool::pool_2x2_mapped` on the values of its map, so its bits.
    fn pool_channels_last(output: &[f32], p: &Conv2dParams, channels: usize,
                          add: Option<&[f32]>, activation: Option<Activation>, pool: Pool2x2,
                          pooled: &mut [f32]) {
        let shape = Pooled { out_w: p.out_w, channels, size: Pool2x2::output_size(p) };
        macro_rules! pooled {
            ($map:expr) => {
                match pool {
                    Pool2x2::Max => pool_vectors::<true>(output, &shape, pooled, $map),
                    Pool2x2::Avg => pool_vectors::<false>(output, &shape, pooled, $map),
                }
            };
        }
        // ReLU and the bias apart from the other activations, so that their loops
        // vectorise (as `finish_pooled_plane`). Without an add, `output` stands in for
        // the add values (read, not used).
        let relu = Activation::Relu;
        let unused = &output[..channels];
        match (add, activation) {
            (None, None) => pooled!((unused, |v, _| v)),
            (Some(add), None) => pooled!((add, |v, b| v + b)),
            (None, Some(Activation::Relu)) => pooled!((unused, move |v, _| relu.value(v))),
            (Some(add), Some(Activation::Relu)) => pooled!((add, move |v, b| relu.value(v + b))),
            (None, Some(act)) => pooled!((unused, move |v, _| act.value(v))),
            (Some(add), Some(act)) => pooled!((add, move |v, b| act.value(v + b))),
        }
    }
}

/// The shapes [`pool_vectors`] reads and writes.
struct Pooled {
    out_w: usize,
    channels: usize,
    size: (usize, usize),
}

/// Each 2×2 window of `map(v, add[channel])`, sixteen channels a step, into `pooled`
/// (`[pooled pixel][channels]`).
#[inline(always)]
fn pool_vectors<const MAX: bool>(
    output: &[f32],
    shape: &Pooled,
    pooled: &mut [f32],
    (add, map): (&[f32], impl Fn(f32, f32) -> f32),
) {
    let (ph, pw) = shape.size;
    let row = shape.out_w * shape.channels;
    let mut pooled_pixels = pooled.chunks_exact_mut(shape.channels);
    for i in 0..ph {
        for k in 0..pw {
            let pooled_pixel = pooled_pixels.next().expect("a pooled pixel");
            let top_left = (2 * i * shape.out_w + 2 * k) * shape.channels;
            for first in (0..shape.channels).step_by(LANES) {
                let vector = |at: usize| -> &[f32; LANES] {
                    output[at + first..at + first + LANES]
                        .try_into()
                        .expect("a vector")
                };
                let (t0, t1) = (vector(top_left), vector(top_left + shape.channels));
                let (b0, b1) = (
                    vector(top_left + row),
                    vector(top_left + row + shape.channels),
                );
                let add: &[f32; LANES] = add[first..first + LANES].try_into().expect("a vector");
                let pooled: &mut [f32; LANES] = (&mut pooled_pixel[first..first + LANES])
                    .try_into()
                    .expect("a vector");
                for l in 0..LANES {
                    let (t0, t1) = (map(t0[l], add[l]), map(t1[l], add[l]));
                    let (b0, b1) = (map(b0[l], add[l]), map(b1[l], add[l]));
                    pooled[l] = pool_window::<MAX>(t0, t1, b0, b1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::tests::values;

    type Shape = ([usize; 4], [usize; 4], (i64, i64), (i64, i64));

    /// (input, weight, padding, dilation): LeNet's middle convolution and its input
    /// gradient (one vector of channels), tiles within a row
    /// and across rows, of every size of both levels' tiles, channels leaving a partial
    /// vector, rectangular and dilated kernels, pixels a whole number of 16-pixel blocks
    /// and not.
    const SHAPES: [Shape; 6] = [
        ([3, 16, 14, 14], [32, 16, 3, 3], (1, 1), (1, 1)),
        ([2, 3, 7, 9], [32, 3, 3, 3], (1, 1), (1, 1)),
        ([1, 4, 6, 31], [33, 4, 3, 2], (0, 1), (1, 2)),
        ([1, 5, 9, 4], [48, 5, 5, 3], (2, 2), (2, 1)),
        ([2, 2, 4, 4], [40, 2, 3, 3], (1, 1), (1, 1)),
        ([2, 32, 14, 14], [16, 32, 3, 3], (1, 1), (1, 1)),
    ];

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// The levels whose tiles run (those this CPU lacks too: the tile, not the level,
    /// decides the loops), each with its pixel kernel.
    const LEVELS: [Level; 2] = [Level::Avx512, Level::Avx2];

    /// One case of the tests: a level, its pixel kernel, a shape of [`SHAPES`], and the
    /// input, weights and bias (values from `salt`, `salt + 1`, `salt + 2`).
    struct Case {
        level: Level,
        kernel: Kernel,
        shape: Shape,
        p: Conv2dParams,
        x: Vec<f32>,
        w: Vec<f32>,
        b: Vec<f32>,
    }

    /// Every level of [`LEVELS`] with every shape of [`SHAPES`].
    fn cases(salt: u32) -> impl Iterator<Item = Case> {
        LEVELS.into_iter().flat_map(move |level| {
            SHAPES.into_iter().map(move |shape| {
                let (input, weight, padding, dilation) = shape;
                Case {
                    level,
                    kernel: Kernel::forward(level),
                    shape,
                    p: Conv2dParams::new(&input, &weight, (1, 1), padding, dilation).unwrap(),
                    x: values(input.iter().product(), salt),
                    w: values(weight.iter().product(), salt + 1),
                    b: values(weight[0], salt + 2),
                }
            })
        })
    }

    #[test]
    fn planes_run_where_they_compute_fewer_values_than_the_pixel_kernel() {
        let params = |input: [usize; 4], weight: [usize; 4]| {
            Conv2dParams::new(&input, &weight, (1, 1), (1, 1), (1, 1)).unwrap()
        };
        let input_grad = params([64, 32, 14, 14], [16, 32, 3, 3]);
        let middle = params([64, 16, 14, 14], [32, 16, 3, 3]);
        let partial = params([64, 8, 20, 20], [24, 8, 3, 3]);
        let (avx2, avx512) = (Kernel::forward(Level::Avx2), Kernel::forward(Level::Avx512));
        // AVX2: 16×196 values against 18×224, 32×196 against 36×224, 32×400 against 24×440.
        assert!(handles_planes(&input_grad, avx2, Level::Avx2));
        assert!(handles_planes(&middle, avx2, Level::Avx2));
        assert!(!handles_planes(&partial, avx2, Level::Avx2));
        // AVX-512: from two vectors of channels.
        assert!(!handles_planes(&input_grad, avx512, Level::Avx512));
        assert!(handles_planes(&middle, avx512, Level::Avx512));
        // Never without fused multiply-adds, nor for a first layer's sums from the bias.
        assert!(!handles_planes(
            &middle,
            Kernel::forward(Level::Scalar),
            Level::Avx2
        ));
        assert!(!handles_planes(
            &middle,
            Kernel::small_k(Level::Avx2),
            Level::Avx2
        ));
    }

    #[test]
    fn write_planes_transposes_and_adds_at_each_level() {
        // (channels of the channel-last output, output channels, pixels): partial groups
        // of channels, pixels a whole number of 16-pixel blocks and not; with an add and
        // without one (which keeps -0, where adding 0.0 would not).
        for (channels, out_channels, pixels) in [
            (32usize, 32usize, 196usize),
            (32, 20, 37),
            (16, 16, 16),
            (48, 33, 15),
        ] {
            let mut output = values(pixels * channels, 7);
            output[channels + 1] = -0.0;
            output[(pixels - 1) * channels] = -0.0;
            let add_values = values(out_channels.next_multiple_of(LANES), 8);
            for add in [Some(&add_values[..]), None] {
                let want: Vec<f32> = (0..out_channels * pixels)
                    .map(|i| {
                        let value = output[(i % pixels) * channels + i / pixels];
                        add.map_or(value, |add| value + add[i / pixels])
                    })
                    .collect();
                let case = format!("{channels} {out_channels} {pixels} {}", add.is_some());
                let mut got = vec![f32::NAN; want.len()];
                write_planes(&output, channels, add, pixels, &mut got);
                assert_eq!(bits(&got), bits(&want), "{case}: in use");
                got.fill(f32::NAN);
                write_planes_portable(&output, channels, add, pixels, &mut got);
                assert_eq!(bits(&got), bits(&want), "{case}: portable");
                #[cfg(target_arch = "x86_64")]
                if Level::Avx2.is_available() {
                    got.fill(f32::NAN);
                    // SAFETY: the CPU has AVX2; the bounds are write_planes's.
                    unsafe { write_planes_avx2(&output, channels, add, pixels, &mut got) };
                    assert_eq!(bits(&got), bits(&want), "{case}: avx2");
                }
                #[cfg(target_arch = "x86_64")]
                if Level::Avx512.is_available() {
                    got.fill(f32::NAN);
                    // SAFETY: the CPU has AVX-512; the bounds are write_planes's.
                    unsafe { write_planes_avx512(&output, channels, add, pixels, &mut got) };
                    assert_eq!(bits(&got), bits(&want), "{case}: avx512");
                }
            }
        }
    }

    #[test]
    fn planes_give_the_bits_of_the_pixel_kernel_with_each_tile() {
        for case in cases(1) {
            let Case {
                level,
                kernel,
                shape: (input, weight, ..),
                p,
                x,
                w,
                b,
            } = case;
            let pixel_plan = direct::ForwardPlan::new(&p, &w, None, kernel);
            let mut pixel_scratch = direct::ForwardScratch::default();
            let mut scratch = ChannelScratch::default();
            let out_image = p.out_channels * p.pixels();
            for bias in [Some(&b[..]), None] {
                let plan = ChannelPlan::new(&p, &w, bias, kernel, level);
                for (n, image) in x.chunks_exact(p.image_len()).enumerate() {
                    let mut expected = vec![f32::NAN; out_image];
                    pixel_plan
                        .image(&p, image, &mut pixel_scratch, |co, oh, row| {
                            let add = bias.map_or(0.0, |b| b[co]);
                            let at = (co * p.out_h + oh) * p.out_w;
                            for (e, &v) in expected[at..at + p.out_w].iter_mut().zip(row) {
                                *e = v + add;
                            }
                        })
                        .unwrap();
                    let mut planes = vec![f32::NAN; out_image];
                    plan.image(&p, image, &mut scratch, &mut planes).unwrap();
                    assert_eq!(
                        bits(&planes),
                        bits(&expected),
                        "{level:?} {input:?} {weight:?} image {n} bias {}",
                        bias.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn pooled_gives_the_bits_of_the_pixel_kernel_with_each_tile() {
        use crate::kernels::conv::{direct_image_pooled, Epilogue};
        for case in cases(4) {
            let Case {
                level,
                kernel,
                shape: (input, weight, ..),
                p,
                x,
                w,
                b,
            } = case;
            let pixel_plan = direct::ForwardPlan::new(&p, &w, None, kernel);
            let mut pixel_scratch = direct::ForwardScratch::default();
            let mut scratch = ChannelScratch::default();
            let (ph, pw) = Pool2x2::output_size(&p);
            let out_image = p.out_channels * ph * pw;
            for (bias, activation, pool) in [
                (Some(&b[..]), Some(Activation::Relu), Pool2x2::Max),
                (None, None, Pool2x2::Avg),
                (Some(&b[..]), Some(Activation::Tanh), Pool2x2::Avg),
            ] {
                let plan = ChannelPlan::new(&p, &w, bias, kernel, level);
                let epilogue = Epilogue { activation };
                for (n, image) in x.chunks_exact(p.image_len()).enumerate() {
                    // The pixel kernel's pool may store past the image's planes.
                    let mut expected = vec![f32::NAN; out_image + 2 * direct::FLAT_SLACK];
                    direct_image_pooled(
                        &p,
                        &pixel_plan,
                        image,
                        bias,
                        &mut pixel_scratch,
                        epilogue,
                        pool,
                        &mut expected,
                    )
                    .unwrap();
                    let mut pooled = vec![f32::NAN; out_image];
                    plan.image_pooled(&p, image, activation, pool, &mut scratch, &mut pooled)
                        .unwrap();
                    assert_eq!(
                        bits(&pooled),
                        bits(&expected[..out_image]),
                        "{level:?} {input:?} {weight:?} image {n} {pool:?} {activation:?}"
                    );
                }
            }
        }
    }
}
