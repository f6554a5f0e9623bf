//! Direct convolution of stride 1 on the zero-padded image, without unfolding: forward
//! and weight gradient.
//!
//! An image's channels are copied into a *frame*: each plane zero-padded to Hp×Wp and
//! read as one flat row. Output pixel (oh, ow) sits at q = oh·Wp + ow of a flat output
//! of the same width, and input tap (ki, kj) of every pixel at q + ki·dh·Wp + kj·dw: one
//! offset per tap for all pixels, so sixteen consecutive outputs read sixteen consecutive
//! inputs (a vector load), for any kernel size, padding and dilation. The columns
//! ow ≥ W_out of the flat output are computed and dropped (2/16 of a 14×14 image under
//! 3×3, padding 1). A register tile holds R output channels × V vectors of 16 pixels:
//! per tap, V loads of the input and R broadcast weights feed R·V multiply-adds.
//!
//! The weight gradient is the same product read the other way: per (output channel,
//! tap) a dot product of the output gradient (laid out at the flat output's positions,
//! zero in the dropped columns, a tile's channels interleaved per vector: `GradLayout`)
//! with the shifted input frame, sixteen lanes at a time, summed over a group of images
//! before the lanes are added in a fixed tree.
//!
//! Every sum runs in the order (input channel, tap) per pixel, and (image, pixel) per
//! lane: fixed by the shape, whatever the tile, level or thread count. With FMA (the
//! AVX2 and AVX-512 levels) both levels give the same bits; the portable level multiplies
//! and adds separately, within float32 rounding of them.

use super::unfold::{copy_row, interior_rows};
use super::Conv2dParams;
use crate::error::Result;
use crate::kernels::multiply_add;
use crate::memory::resize_scratch;
use crate::parallel::StopToken;
use crate::simd::Level;
use crate::simd_dispatch;

/// Lanes of one vector: the pixels a load reads, whatever the level (two registers with
/// AVX2), so that the lanes' sums, and so the bits, do not depend on the level.
const LANES: usize = 16;

/// Values after the flat output's last plane: a fused 2×2 pool reads up to
/// `2·out_w` rounded up to whole steps of `2·MAPPED_STEP` from a row's start, at most
/// `2·MAPPED_STEP - 2` past the last output value (`W_out >= 2·out_w`).
pub(super) const FLAT_SLACK: usize = 2 * crate::kernels::pool::MAPPED_STEP;

const FRAME: &str = "conv2d (direct): the zero-padded frame of an image";
const FLAT_OUTPUT: &str = "conv2d (direct): the flat output of an image";

/// Per-image scratch (frame and flat output) up to which the direct kernels run: a
/// larger image goes to the tiled GEMM, whose scratch is bounded and which checks for
/// Ctrl-C within an image.
pub(super) const IMAGE_SCRATCH_BYTES: usize = 16 << 20;

/// Whether the direct kernels handle `p`: stride 1 (the flat frame needs one offset per
/// tap for every pixel), and an image's scratch within [`IMAGE_SCRATCH_BYTES`].
pub(super) fn handles(p: &Conv2dParams) -> bool {
    if p.stride != (1, 1) {
        return false;
    }
    let g = Geometry::new(p);
    let computed = g.computed(MAX_VECTORS);
    let floats = g.frame_len(p, computed).saturating_add(
        p.out_channels
            .next_multiple_of(MAX_CHANNELS)
            .saturating_mul(computed),
    );
    floats.saturating_mul(std::mem::size_of::<f32>()) <= IMAGE_SCRATCH_BYTES
}

/// The largest tile dimensions of [`Kernel`], for [`handles`]'s bound.
const MAX_VECTORS: usize = 2;
const MAX_CHANNELS: usize = 8;

/// The frame geometry of a convolution [`handles`] accepts.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    /// Padded width: the stride of the flat rows.
    wp: usize,
    /// One padded plane, Hp·Wp.
    plane: usize,
    /// Flat positions up to the last output pixel, (H_out - 1)·Wp + W_out.
    span: usize,
    /// The largest tap offset, (kH - 1)·dh·Wp + (kW - 1)·dw.
    reach: usize,
}

impl Geometry {
    pub(super) fn new(p: &Conv2dParams) -> Self {
        let (hp, wp) = p.padded_size();
        Geometry {
            wp,
            plane: hp * wp,
            span: (p.out_h - 1) * wp + p.out_w,
            reach: (p.kernel_h - 1) * p.dilation.0 * wp + (p.kernel_w - 1) * p.dilation.1,
        }
    }

    /// Flat positions computed: `span` rounded up to whole tiles of `vectors` vectors.
    fn computed(&self, vectors: usize) -> usize {
        self.span.div_ceil(vectors * LANES) * vectors * LANES
    }

    /// The frame's length: the planes and, after the last, what the last tile's taps
    /// reach (zeros).
    fn frame_len(&self, p: &Conv2dParams, computed: usize) -> usize {
        (p.in_channels - 1) * self.plane + self.plane.max(computed + self.reach)
    }

    /// The tap offsets within a plane, in (ki, kj) order.
    fn taps(&self, p: &Conv2dParams) -> Vec<usize> {
        (0..p.kernel_h)
            .flat_map(|ki| {
                (0..p.kernel_w).map(move |kj| ki * p.dilation.0 * self.wp + kj * p.dilation.1)
            })
            .collect()
    }
}

/// Copy `image`'s interior into `frame` (resized to `len`; borders zero). The borders are
/// never written, so a frame reused for the next image of the same shape keeps them.
pub(super) fn fill_frame(
    p: &Conv2dParams,
    image: &[f32],
    frame: &mut Vec<f32>,
    len: usize,
) -> Result<()> {
    if frame.len() != len {
        frame.clear();
        resize_scratch(frame, len, FRAME)?;
    }
    copy_interior(p, image, frame);
    Ok(())
}

simd_dispatch! {
    /// The image's rows into the frame's interior: with the level's vector width (the
    /// rows of small images are a few vectors each).
    fn copy_interior(p: &Conv2dParams, image: &[f32], frame: &mut [f32]) {
        for (row, padded_row) in interior_rows(p) {
            copy_row(
                &mut frame[padded_row..padded_row + p.in_w],
                &image[row..row + p.in_w],
            );
        }
    }
}

simd_dispatch! {
    /// Image `image`'s output gradient into a pass's flat gradients as `layout` lays them
    /// out (the dropped columns stay zero), and, when given, each plane's sum into
    /// `plane_sums`, at the level's vector width as [`copy_interior`] (in baseline code it
    /// took about 6% of the backward of LeNet's middle convolution).
    fn copy_grad_rows(p: &Conv2dParams, grad_output: &[f32], layout: GradLayout, image: usize,
                      grads: &mut [f32], plane_sums: Option<&mut [f32]>) {
        let (block, mut plane_sums) = (layout.channels * LANES, plane_sums);
        for (co, plane) in grad_output.chunks_exact(p.out_h * p.out_w).enumerate() {
            if let Some(sums) = plane_sums.as_deref_mut() {
                sums[co] = crate::kernels::reduce::sum(plane);
            }
            let start = (co / layout.channels) * layout.tile_len()
                + image * layout.channels * layout.computed
                + (co % layout.channels) * LANES;
            for (oh, row) in plane.chunks_exact(p.out_w).enumerate() {
                // The row's runs within one vector of flat positions.
                let (mut q, mut rest) = (oh * layout.wp, row);
                while !rest.is_empty() {
                    let lane = q % LANES;
                    let n = (LANES - lane).min(rest.len());
                    let at = start + q / LANES * block + lane;
                    let (run, after) = rest.split_at(n);
                    if n == LANES {
                        let dst: &mut [f32; LANES] =
                            (&mut grads[at..at + LANES]).try_into().expect("a vector");
                        *dst = run.try_into().expect("a vector");
                    } else {
                        copy_row(&mut grads[at..at + n], run);
                    }
                    q += n;
                    rest = after;
                }
            }
        }
    }
}

/// How the kernels run: the register tile (forward: output channels × vectors of 16
/// pixels; weight gradient: output channels × (input channel, tap) entries), whether
/// multiply-adds are fused, and whether the forward's sums start from the bias. Any tile
/// gives the same bits; `fused` and `from_bias` change them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Kernel {
    pub tile: (usize, usize),
    pub fused: bool,
    /// Each pixel's sum starts from its channel's bias (else from 0, the bias added to
    /// the finished sum): the order of the small-K product, whose bits this gives.
    pub from_bias: bool,
}

impl Kernel {
    /// The forward's tile of a level: AVX-512 has 32 vector registers (8×2 accumulators,
    /// 1.0-1.15x faster than 8×3, 12×2, 6×4, 4×4, 16×1 or 4×2 on the LeNet shapes); AVX2
    /// has 16, each holding half a vector of 16 (6×1: 1.5-2x faster than 3×2, 2×3, 4×2).
    /// The portable level cannot fuse (no FMA instruction: a libm call).
    pub(super) fn forward(level: Level) -> Self {
        Kernel {
            tile: if level == Level::Avx512 {
                (8, 2)
            } else {
                (6, 1)
            },
            fused: level != Level::Scalar,
            from_bias: false,
        }
    }

    /// The forward of a convolution with few unfolded rows (a first layer), in place of
    /// the small-K product ([`super::microkernel`]): with FMA it sums each pixel in the
    /// same order from the same start (bias, then (input channel, tap) in order, the
    /// padding's zeros included), so it gives that product's bits.
    pub(super) fn small_k(level: Level) -> Self {
        Kernel {
            from_bias: true,
            ..Kernel::forward(level)
        }
    }

    /// The weight gradient's tile of a level, as [`Kernel::forward`] (4×6: 1.05-1.15x
    /// faster than 3×6, 4×5, 2×8, 4×4; AVX2 2×3: 1.2-1.35x faster than 2×2 or 1×5).
    pub(super) fn weight_grad(level: Level) -> Self {
        Kernel {
            tile: if level == Level::Avx512 {
                (4, 6)
            } else {
                (2, 3)
            },
            fused: level != Level::Scalar,
            from_bias: false,
        }
    }
}

/// The weights of the forward, in tiles of `channels` output channels:
/// `[tile][c_in][tap][channel]`, zero beyond C_out.
fn pack_forward_weights(p: &Conv2dParams, weight: &[f32], channels: usize) -> Vec<f32> {
    let taps = p.kernel_h * p.kernel_w;
    let tiles = p.out_channels.div_ceil(channels);
    let mut packed = vec![0.0f32; tiles * p.in_channels * taps * channels];
    for co in 0..p.out_channels {
        let (tile, r) = (co / channels, co % channels);
        for c in 0..p.in_channels {
            for t in 0..taps {
                packed[((tile * p.in_channels + c) * taps + t) * channels + r] =
                    weight[(co * p.in_channels + c) * taps + t];
            }
        }
    }
    packed
}

/// Per-image state of the forward: the frame and the flat output.
#[derive(Default)]
pub(super) struct ForwardScratch {
    frame: Vec<f32>,
    flat: Vec<f32>,
}

/// The packed weights and geometry of one forward call.
pub(super) struct ForwardPlan {
    geometry: Geometry,
    taps: Vec<usize>,
    weights: Vec<f32>,
    /// Where each channel's sums start: its bias with [`Kernel::from_bias`], else 0;
    /// zero beyond C_out.
    initial: Vec<f32>,
    from_bias: bool,
    channels: usize,
    vectors: usize,
    fused: bool,
}

impl ForwardPlan {
    /// The plan of `kernel`; `bias` is read only by a kernel whose sums start from it.
    pub(super) fn new(
        p: &Conv2dParams,
        weight: &[f32],
        bias: Option<&[f32]>,
        kernel: Kernel,
    ) -> Self {
        let (channels, vectors) = kernel.tile;
        let geometry = Geometry::new(p);
        let mut initial = vec![0.0f32; p.out_channels.next_multiple_of(channels)];
        if let (true, Some(b)) = (kernel.from_bias, bias) {
            initial[..p.out_channels].copy_from_slice(&b[..p.out_channels]);
        }
        ForwardPlan {
            geometry,
            taps: geometry.taps(p),
            weights: pack_forward_weights(p, weight, channels),
            initial,
            from_bias: kernel.from_bias,
            channels,
            vectors,
            fused: kernel.fused,
        }
    }

    /// Whether the sums already hold the bias (else the caller adds it).
    pub(super) fn includes_bias(&self) -> bool {
        self.from_bias
    }

    /// The row stride of [`ForwardPlan::flat_image`]'s planes (the padded width).
    pub(super) fn row_stride(&self) -> usize {
        self.geometry.wp
    }

    /// One image's flat output into `scratch`, returned with the distance `computed`
    /// between planes: output channel `co`'s plane starts at `co·computed`, its output
    /// row `oh` at `oh·row_stride` within it (the columns between rows are not outputs).
    /// After the last plane come at least [`FLAT_SLACK`] more values (of no meaning), so
    /// that a reader may run that far past a plane's last output row.
    pub(super) fn flat_image<'s>(
        &self,
        p: &Conv2dParams,
        image: &[f32],
        scratch: &'s mut ForwardScratch,
    ) -> Result<(&'s [f32], usize)> {
        let g = &self.geometry;
        let computed = g.computed(self.vectors);
        fill_frame(p, image, &mut scratch.frame, g.frame_len(p, computed))?;
        let tiles = p.out_channels.div_ceil(self.channels);
        resize_scratch(
            &mut scratch.flat,
            tiles * self.channels * computed + FLAT_SLACK,
            FLAT_OUTPUT,
        )?;
        direct_forward(
            self,
            p.in_channels,
            computed,
            &scratch.frame,
            &mut scratch.flat,
        );
        Ok((&scratch.flat, computed))
    }

    /// One image's output (C_out planes, NCHW), with the bias only if
    /// [`ForwardPlan::includes_bias`]: `write(channel, row, values)` receives each row.
    #[cfg(test)]
    pub(super) fn image(
        &self,
        p: &Conv2dParams,
        image: &[f32],
        scratch: &mut ForwardScratch,
        mut write: impl FnMut(usize, usize, &[f32]),
    ) -> Result<()> {
        let wp = self.geometry.wp;
        let (flat, computed) = self.flat_image(p, image, scratch)?;
        let planes = &flat[..p.out_channels * computed];
        for (co, plane) in planes.chunks_exact(computed).enumerate() {
            for oh in 0..p.out_h {
                write(co, oh, &plane[oh * wp..oh * wp + p.out_w]);
            }
        }
        Ok(())
    }
}

simd_dispatch! {
    /// The flat output (`[channel][computed]`, channels rounded up to tiles) of one frame.
    fn direct_forward(plan: &ForwardPlan, in_channels: usize, computed: usize, frame: &[f32],
                      flat: &mut [f32]) {
        let (weights, taps, plane) = (&plan.weights, &plan.taps, plan.geometry.plane);
        let initial = &plan.initial;
        macro_rules! run {
            ($r:literal, $v:literal) => {
                if plan.fused {
                    forward_tiles::<$r, $v, true>(frame, weights, initial, taps, in_channels,
                                                  plane, computed, flat)
                } else {
                    forward_tiles::<$r, $v, false>(frame, weights, initial, taps, in_channels,
                                                   plane, computed, flat)
                }
            };
        }
        match (plan.channels, plan.vectors) {
            (8, 2) => run!(8, 2),
            (6, 1) => run!(6, 1),
            _ => unreachable!("direct_forward: no tile of {}×{}", plan.channels, plan.vectors),
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_tiles<const R: usize, const V: usize, const FUSED: bool>(
    frame: &[f32],
    weights: &[f32],
    initial: &[f32],
    taps: &[usize],
    in_channels: usize,
    plane: usize,
    computed: usize,
    flat: &mut [f32],
) {
    let per_tile = in_channels * taps.len() * R;
    let reach = taps.last().copied().unwrap_or(0);
    for ((tile_weights, tile_initial), out) in weights
        .chunks_exact(per_tile)
        .zip(initial.chunks_exact(R))
        .zip(flat.chunks_exact_mut(R * computed))
    {
        let tile_initial: &[f32; R] = tile_initial.try_into().expect("a tile of starts");
        let mut q = 0;
        while q < computed {
            let mut acc = [[[0.0f32; LANES]; V]; R];
            unroll!(r < R => {
                acc[r] = [[tile_initial[r]; LANES]; V];
            });
            for c in 0..in_channels {
                let window = &frame[c * plane + q..c * plane + q + reach + V * LANES];
                let w = &tile_weights[c * taps.len() * R..(c + 1) * taps.len() * R];
                for (&tap, wt) in taps.iter().zip(w.chunks_exact(R)) {
                    // A plain tap: an opaque one (`black_box`) cost a store and a load a
                    // tap, and the loop vectorises over the lanes without it (the LeNetBN
                    // epoch 1.04x faster, AVX2; the AVX-512 loop is the same instructions
                    // less those).
                    let window = &window[tap..][..V * LANES];
                    let wt: &[f32; R] = wt.try_into().expect("a tile of weights");
                    let mut x = [[0.0f32; LANES]; V];
                    unroll!(v < V => {
                        x[v] = window[v * LANES..(v + 1) * LANES].try_into().expect("a vector");
                    });
                    unroll!(r < R => {
                        unroll!(v < V => {
                            for (a, &xl) in acc[r][v].iter_mut().zip(&x[v]) {
                                *a = multiply_add::<FUSED>(wt[r], xl, *a);
                            }
                        });
                    });
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (v, acc_v) in acc_r.iter().enumerate() {
                    let at = r * computed + q + v * LANES;
                    let dst: &mut [f32; LANES] =
                        (&mut out[at..at + LANES]).try_into().expect("a vector");
                    *dst = *acc_v;
                }
            }
            q += V * LANES;
        }
    }
}

/// Images whose frames a weight-gradient pass holds at once: about 512 KiB (L2-sized).
const PASS_BYTES: usize = 512 * 1024;

/// Floats a scratch buffer has beyond its use, for [`cache_aligned`].
const ALIGN_SLACK: usize = 64 / std::mem::size_of::<f32>() - 1;

/// The `len` floats of `buffer` (`len + ALIGN_SLACK` long) from its first 64-byte
/// boundary: the kernel's vectors of output gradients are then whole cache lines, where
/// the allocator's 16-byte alignment split every one of them in two. The window stays
/// where it is while the buffer is not reallocated, so its zero borders are kept.
fn cache_aligned(buffer: &mut [f32], len: usize) -> &mut [f32] {
    let start = buffer.as_ptr().align_offset(64).min(ALIGN_SLACK);
    &mut buffer[start..start + len]
}

const GRAD_FRAMES: &str = "conv2d backward (direct): the frames of a group of images";

/// The geometry and tiles of one weight-gradient call.
pub(super) struct WeightGradPlan {
    geometry: Geometry,
    /// Per (input channel, tap) entry, padded to whole tiles: its offset in a frame.
    entries: Vec<usize>,
    channels: usize,
    entries_per_tile: usize,
    /// Flat positions per output-gradient row: the span rounded up to a vector.
    computed: usize,
    frame_len: usize,
    images_per_pass: usize,
    fused: bool,
}

/// The frames of one pass, reused from pass to pass.
#[derive(Default)]
pub(super) struct WeightGradScratch {
    frames: Vec<f32>,
    grads: Vec<f32>,
    /// The lanes of one tile row of sums, before they are added.
    lanes: Vec<f32>,
}

impl WeightGradPlan {
    pub(super) fn new(p: &Conv2dParams, kernel: Kernel) -> Self {
        let (channels, entries_per_tile) = kernel.tile;
        let geometry = Geometry::new(p);
        let computed = geometry.computed(1);
        let taps = geometry.taps(p);
        let mut entries: Vec<usize> = (0..p.in_channels)
            .flat_map(|c| taps.iter().map(move |&t| c * geometry.plane + t))
            .collect();
        entries.resize(entries.len().next_multiple_of(entries_per_tile), 0);
        let frame_len = geometry.frame_len(p, computed);
        let grad_len = p.out_channels.next_multiple_of(channels) * computed;
        let image_bytes = (frame_len + grad_len) * std::mem::size_of::<f32>();
        WeightGradPlan {
            geometry,
            entries,
            channels,
            entries_per_tile,
            computed,
            frame_len,
            images_per_pass: (PASS_BYTES / image_bytes).max(1),
            fused: kernel.fused,
        }
    }

    /// The weight gradient of `images` (consecutive, with their output gradients) into
    /// `partial` (C_out × C_in·kH·kW), overwritten; when given, each output-gradient
    /// plane's sum (`reduce::sum`, for the bias gradient) into `plane_sums` (images ×
    /// C_out): a convolution without a bias skips them (one chain of dependent additions
    /// per plane, about 5% of the weight gradient of 64×16×14×14→32).
    /// Returns early, `partial` unfinished, once `stop` is set: checked pass by pass, as
    /// a group of a large batch is many passes (at most 8 groups: 250 images each at
    /// batch 2,000).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn images(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        grad_output: &[f32],
        partial: &mut [f32],
        mut plane_sums: Option<&mut [f32]>,
        scratch: &mut WeightGradScratch,
        stop: &StopToken,
    ) -> Result<()> {
        let (image_len, out_image) = (p.image_len(), p.out_channels * p.pixels());
        let n_images = input.len() / image_len;
        let grad_rows = p.out_channels.next_multiple_of(self.channels);
        let grad_len = grad_rows * self.computed;
        let k = p.col_rows();
        for (pass, first) in (0..n_images).step_by(self.images_per_pass).enumerate() {
            if stop.is_set() {
                return Ok(());
            }
            let count = self.images_per_pass.min(n_images - first);
            let (frames_len, grads_len) = (count * self.frame_len, count * grad_len);
            if scratch.frames.len() != frames_len + ALIGN_SLACK {
                scratch.frames.clear();
                resize_scratch(&mut scratch.frames, frames_len + ALIGN_SLACK, GRAD_FRAMES)?;
                scratch.grads.clear();
                resize_scratch(&mut scratch.grads, grads_len + ALIGN_SLACK, GRAD_FRAMES)?;
            }
            let frames = cache_aligned(&mut scratch.frames, frames_len);
            let grads = cache_aligned(&mut scratch.grads, grads_len);
            for i in 0..count {
                let image = &input[(first + i) * image_len..][..image_len];
                copy_interior(
                    p,
                    image,
                    &mut frames[i * self.frame_len..][..self.frame_len],
                );
                let layout = GradLayout {
                    computed: self.computed,
                    wp: self.geometry.wp,
                    channels: self.channels,
                    count,
                };
                copy_grad_rows(
                    p,
                    &grad_output[(first + i) * out_image..][..out_image],
                    layout,
                    i,
                    grads,
                    plane_sums
                        .as_deref_mut()
                        .map(|sums| &mut sums[(first + i) * p.out_channels..][..p.out_channels]),
                );
            }
            resize_scratch(
                &mut scratch.lanes,
                self.channels * self.entries.len() * LANES,
                GRAD_FRAMES,
            )?;
            let images = Images {
                frames,
                frame_len: self.frame_len,
                grads,
                computed: self.computed,
                count,
            };
            direct_weight_grad(
                self,
                &images,
                (p.out_channels, k),
                pass > 0,
                partial,
                &mut scratch.lanes,
            );
        }
        Ok(())
    }
}

simd_dispatch! {
    /// `partial[co][e]` (+)= Σ over `count` images and flat positions of the output
    /// gradient times the frame shifted by entry `e`'s offset.
    fn direct_weight_grad(plan: &WeightGradPlan, images: &Images, shape: (usize, usize),
                          accumulate: bool, partial: &mut [f32], lanes: &mut [f32]) {
        let (entries, (out_channels, k)) = (&plan.entries, shape);
        macro_rules! run {
            ($r:literal, $s:literal) => {
                if plan.fused {
                    weight_grad_tiles::<$r, $s, true>(images, entries, out_channels, k,
                                                      accumulate, partial, lanes)
                } else {
                    weight_grad_tiles::<$r, $s, false>(images, entries, out_channels, k,
                                                       accumulate, partial, lanes)
                }
            };
        }
        match (plan.channels, plan.entries_per_tile) {
            (4, 6) => run!(4, 6),
            (2, 3) => run!(2, 3),
            _ => unreachable!(
                "direct_weight_grad: no tile of {}×{}",
                plan.channels,
                plan.entries_per_tile
            ),
        }
    }
}

/// The frames and flat output gradients of the images of one pass, the gradients as
/// [`GradLayout`] lays them out.
struct Images<'a> {
    frames: &'a [f32],
    frame_len: usize,
    grads: &'a [f32],
    computed: usize,
    count: usize,
}

/// Where a pass keeps its flat output gradients: per tile of `channels` output channels,
/// per image, per vector of 16 flat positions, the tile's channels one after another:
/// `[tile][image][position / 16][channel % channels][position % 16]`. The kernel then
/// reads a tile's gradients in one run through all the images (one pointer, constant
/// offsets), where rows `computed` apart per channel and per image took a pointer each,
/// reset per image (about a fifth of the weight gradient's time).
#[derive(Clone, Copy)]
struct GradLayout {
    computed: usize,
    /// Row stride of the flat positions.
    wp: usize,
    channels: usize,
    /// Images of the pass.
    count: usize,
}

impl GradLayout {
    /// One tile's gradients, all images.
    fn tile_len(&self) -> usize {
        self.count * self.channels * self.computed
    }
}

/// The sum of a vector's lanes, in a fixed tree (halves added, then quarters, ...).
#[inline(always)]
fn lane_sum(v: [f32; LANES]) -> f32 {
    let mut v = v;
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            v[l] += v[l + half];
        }
        half /= 2;
    }
    v[0]
}

/// Level `G` of [`lane_sum`]'s tree on two vectors, each of groups of `G` lanes (one
/// entry's partial sums a group): each group's halves added, `x`'s groups first. Sixteen
/// entries take four levels instead of sixteen trees, and the result is in entry order.
#[inline(always)]
fn fold_halves<const G: usize>(x: &[f32; LANES], y: &[f32; LANES]) -> [f32; LANES] {
    let half = G / 2;
    let mut out = [0.0f32; LANES];
    for (i, o) in out.iter_mut().enumerate() {
        let (source, k) = if i < LANES / 2 {
            (x, i)
        } else {
            (y, i - LANES / 2)
        };
        let at = k / half * G + k % half;
        *o = source[at] + source[at + half];
    }
    out
}

/// `dst[e]` (+)= the sum of entry `e`'s lanes (`row[e·16..]`) by [`lane_sum`]'s tree,
/// sixteen entries at a time with two-vector shuffles instead of a gather per lane
/// (what LLVM made of one tree per entry: about 15% of the weight gradient's time).
#[inline(always)]
fn add_lane_sums(row: &[f32], dst: &mut [f32], accumulate: bool) {
    let mut blocks = row.chunks_exact(LANES * LANES);
    let mut outs = dst.chunks_exact_mut(LANES);
    for (block, out) in (&mut blocks).zip(&mut outs) {
        let v = |e: usize| -> &[f32; LANES] {
            block[e * LANES..][..LANES].try_into().expect("a vector")
        };
        let mut eighths = [[0.0f32; LANES]; 8];
        unroll!(m < 8 => {
            eighths[m] = fold_halves::<16>(v(2 * m), v(2 * m + 1));
        });
        let mut quarters = [[0.0f32; LANES]; 4];
        unroll!(m < 4 => {
            quarters[m] = fold_halves::<8>(&eighths[2 * m], &eighths[2 * m + 1]);
        });
        let pairs = [
            fold_halves::<4>(&quarters[0], &quarters[1]),
            fold_halves::<4>(&quarters[2], &quarters[3]),
        ];
        let sums = fold_halves::<2>(&pairs[0], &pairs[1]);
        for (d, &sum) in out.iter_mut().zip(&sums) {
            *d = if accumulate { *d + sum } else { sum };
        }
    }
    for (v, d) in blocks
        .remainder()
        .chunks_exact(LANES)
        .zip(outs.into_remainder())
    {
        let sum = lane_sum(v.try_into().expect("a vector"));
        *d = if accumulate { *d + sum } else { sum };
    }
}

#[inline(always)]
fn weight_grad_tiles<const R: usize, const S: usize, const FUSED: bool>(
    images: &Images,
    entries: &[usize],
    out_channels: usize,
    k: usize,
    accumulate: bool,
    partial: &mut [f32],
    lanes: &mut [f32],
) {
    let computed = images.computed;
    let tile_len = images.count * R * computed;
    for (co, grad_tile) in (0..out_channels)
        .step_by(R)
        .zip(images.grads.chunks_exact(tile_len))
    {
        for (tile, offsets) in entries.chunks_exact(S).enumerate() {
            let offsets: &[usize; S] = offsets.try_into().expect("a tile of entries");
            let mut acc = [[[0.0f32; LANES]; S]; R];
            for (frame, grads) in images
                .frames
                .chunks_exact(images.frame_len)
                .zip(grad_tile.chunks_exact(R * computed))
            {
                let mut x_rows: [&[f32]; S] = [&[]; S];
                unroll!(s < S => {
                    x_rows[s] = &frame[offsets[s]..][..computed];
                });
                for (j, g_block) in (0..computed)
                    .step_by(LANES)
                    .zip(grads.chunks_exact(R * LANES))
                {
                    // An opaque barrier keeps the vectoriser off this loop (see unroll!);
                    // rows sliced to `computed` above leave one bounds check per step.
                    std::hint::black_box(());
                    let mut g = [[0.0f32; LANES]; R];
                    unroll!(r < R => {
                        g[r] = g_block[r * LANES..][..LANES].try_into().expect("a vector");
                    });
                    unroll!(s < S => {
                        let x: [f32; LANES] = x_rows[s][j..j + LANES].try_into().expect("a vector");
                        unroll!(r < R => {
                            for (a, (&gl, &xl)) in acc[r][s].iter_mut().zip(g[r].iter().zip(&x)) {
                                *a = multiply_add::<FUSED>(gl, xl, *a);
                            }
                        });
                    });
                }
            }
            unroll!(r < R => {
                unroll!(s < S => {
                    let at = ((r * entries.len()) + tile * S + s) * LANES;
                    let dst: &mut [f32; LANES] =
                        (&mut lanes[at..at + LANES]).try_into().expect("a vector");
                    *dst = acc[r][s];
                });
            });
        }
        // Lane sums apart from the loop above: next to it, LLVM's SLP vectoriser pairs
        // lanes (2-wide vectors) instead of using 16.
        for r in 0..R.min(out_channels - co) {
            add_lane_sums(
                &lanes[r * entries.len() * LANES..][..k * LANES],
                &mut partial[(co + r) * k..][..k],
                accumulate,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::tests::{naive, values};

    /// Every tile, fused and not (the tiles of the levels this CPU lacks run too: the
    /// tile, not the level, decides the loop's shape).
    fn kernels(of: fn(Level) -> Kernel) -> Vec<Kernel> {
        let tiles = [of(Level::Avx512).tile, of(Level::Avx2).tile];
        tiles
            .into_iter()
            .flat_map(|tile| {
                [true, false].map(|fused| Kernel {
                    tile,
                    fused,
                    from_bias: false,
                })
            })
            .collect()
    }

    type Shape = ([usize; 4], [usize; 4], (i64, i64), (i64, i64));

    /// (input, weight, padding, dilation): odd sizes, rectangular and dilated kernels,
    /// channel counts that leave partial tiles, a kernel that fills the padded input.
    const SHAPES: [Shape; 6] = [
        ([2, 3, 7, 9], [5, 3, 3, 3], (1, 1), (1, 1)),
        ([1, 4, 6, 11], [9, 4, 3, 2], (0, 1), (1, 2)),
        ([3, 2, 5, 5], [17, 2, 5, 5], (2, 2), (1, 1)),
        ([1, 5, 9, 4], [3, 5, 1, 3], (0, 2), (2, 1)),
        ([2, 16, 7, 7], [32, 16, 3, 3], (1, 1), (1, 1)),
        ([1, 2, 3, 4], [2, 2, 5, 6], (1, 1), (1, 1)),
    ];

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    fn assert_close(actual: &[f32], expected: &[f32], terms: usize, what: &str) {
        let tolerance = 4.0 * f32::EPSILON * terms as f32;
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() <= tolerance * (1.0 + e.abs()),
                "{what} element {i}: {a} vs {e}"
            );
        }
    }

    fn forward_with(p: &Conv2dParams, x: &[f32], w: &[f32], kernel: Kernel) -> Vec<f32> {
        let plan = ForwardPlan::new(p, w, None, kernel);
        let mut scratch = ForwardScratch::default();
        let out_image = p.out_channels * p.pixels();
        let mut y = vec![f32::NAN; p.batch * out_image];
        for (image, out) in x.chunks(p.image_len()).zip(y.chunks_mut(out_image)) {
            plan.image(p, image, &mut scratch, |co, oh, row| {
                let at = (co * p.out_h + oh) * p.out_w;
                out[at..at + p.out_w].copy_from_slice(row);
            })
            .unwrap();
        }
        y
    }

    #[test]
    fn forward_matches_the_definition_with_every_tile() {
        for (input, weight, padding, dilation) in SHAPES {
            let p = Conv2dParams::new(&input, &weight, (1, 1), padding, dilation).unwrap();
            assert!(handles(&p));
            let x = values(input.iter().product(), 1);
            let w = values(weight.iter().product(), 2);
            let expected = naive(&p, &x, &w);
            let mut fused_bits = None;
            for kernel in kernels(Kernel::forward) {
                let y = forward_with(&p, &x, &w, kernel);
                assert_close(
                    &y,
                    &expected,
                    p.col_rows(),
                    &format!("{input:?} {kernel:?}"),
                );
                if kernel.fused {
                    // Every pixel sums (channel, tap) in order, whatever the tile.
                    let fused = fused_bits.get_or_insert_with(|| bits(&y));
                    assert_eq!(*fused, bits(&y), "{input:?} {kernel:?}");
                }
            }
        }
    }

    /// The weight gradient by definition, in f64.
    fn naive_weight_grad(p: &Conv2dParams, x: &[f32], gy: &[f32]) -> Vec<f32> {
        let mut gw = vec![0.0f64; p.out_channels * p.col_rows()];
        for n in 0..p.batch {
            for co in 0..p.out_channels {
                for oh in 0..p.out_h {
                    for ow in 0..p.out_w {
                        let g = gy[((n * p.out_channels + co) * p.out_h + oh) * p.out_w + ow];
                        for c in 0..p.in_channels {
                            for ki in 0..p.kernel_h {
                                for kj in 0..p.kernel_w {
                                    let ih =
                                        (oh + ki * p.dilation.0) as isize - p.padding.0 as isize;
                                    let iw =
                                        (ow + kj * p.dilation.1) as isize - p.padding.1 as isize;
                                    if ih < 0
                                        || iw < 0
                                        || ih >= p.in_h as isize
                                        || iw >= p.in_w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((n * p.in_channels + c) * p.in_h + ih as usize)
                                        * p.in_w
                                        + iw as usize];
                                    gw[((co * p.in_channels + c) * p.kernel_h + ki)
                                        * p.kernel_w
                                        + kj] += f64::from(g) * f64::from(xv);
                                }
                            }
                        }
                    }
                }
            }
        }
        gw.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn weight_grad_matches_the_definition_with_every_tile_and_pass() {
        for (input, weight, padding, dilation) in SHAPES {
            let p = Conv2dParams::new(&input, &weight, (1, 1), padding, dilation).unwrap();
            let x = values(input.iter().product(), 3);
            let gy = values(p.output_shape().iter().product(), 4);
            let expected = naive_weight_grad(&p, &x, &gy);
            let mut fused_bits = None;
            for kernel in kernels(Kernel::weight_grad) {
                // All images in one pass, and one image per pass (the passes' sums added
                // in order): within rounding of each other.
                for images_per_pass in [usize::MAX, 1] {
                    let mut plan = WeightGradPlan::new(&p, kernel);
                    plan.images_per_pass = images_per_pass.min(plan.images_per_pass.max(p.batch));
                    let mut gw = vec![f32::NAN; expected.len()];
                    let mut plane_sums = vec![f32::NAN; p.batch * p.out_channels];
                    let mut scratch = WeightGradScratch::default();
                    // Asked to stop: returns before its first pass.
                    let stop = StopToken::already_set();
                    let sums = Some(plane_sums.as_mut_slice());
                    plan.images(&p, &x, &gy, &mut gw, sums, &mut scratch, &stop)
                        .unwrap();
                    assert!(gw.iter().all(|v| v.is_nan()), "{input:?} {kernel:?}");
                    let stop = StopToken::default();
                    // Without the planes' sums (no bias): the same weight gradient.
                    plan.images(&p, &x, &gy, &mut gw, None, &mut scratch, &stop)
                        .unwrap();
                    let without_sums = bits(&gw);
                    assert!(
                        plane_sums.iter().all(|v| v.is_nan()),
                        "{input:?} {kernel:?}"
                    );
                    let sums = Some(plane_sums.as_mut_slice());
                    plan.images(&p, &x, &gy, &mut gw, sums, &mut scratch, &stop)
                        .unwrap();
                    assert_eq!(bits(&gw), without_sums, "{input:?} {kernel:?}");
                    let sums: Vec<f32> = gy
                        .chunks_exact(p.pixels())
                        .map(crate::kernels::reduce::sum)
                        .collect();
                    assert_eq!(bits(&plane_sums), bits(&sums), "{input:?} {kernel:?}");
                    let what = format!("{input:?} {kernel:?} {images_per_pass}");
                    assert_close(&gw, &expected, p.batch * p.pixels(), &what);
                    if kernel.fused && images_per_pass == usize::MAX {
                        let fused = fused_bits.get_or_insert_with(|| bits(&gw));
                        assert_eq!(*fused, bits(&gw), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn lane_sums_of_sixteen_entries_give_each_tree_bits() {
        // Two blocks of sixteen entries and a remainder of five; values of mixed
        // magnitudes so that any other order of the adds rounds differently.
        let entries = 37;
        let row: Vec<f32> = values(entries * LANES, 5)
            .iter()
            .enumerate()
            .map(|(i, v)| v * [1.0, 3.0e3, 7.0e-3, 1.1e5][i % 4])
            .collect();
        let start = values(entries, 6);
        for accumulate in [false, true] {
            let mut sums = start.clone();
            add_lane_sums(&row, &mut sums, accumulate);
            for (e, lanes) in row.chunks_exact(LANES).enumerate() {
                let tree = lane_sum(lanes.try_into().unwrap());
                let expected = if accumulate { start[e] + tree } else { tree };
                assert_eq!(sums[e].to_bits(), expected.to_bits(), "entry {e}");
            }
        }
    }

    #[test]
    fn refuses_strides_and_images_too_large() {
        let strided = Conv2dParams::new(&[1, 2, 9, 9], &[3, 2, 3, 3], (2, 1), (1, 1), (1, 1));
        assert!(!handles(&strided.unwrap()));
        let huge = Conv2dParams::new(&[1, 64, 512, 512], &[8, 64, 3, 3], (1, 1), (1, 1), (1, 1));
        assert!(!handles(&huge.unwrap()));
    }
}
