//! Which algorithm runs a convolution, chosen once from its shape by [`Plan::new`].
//!
//! Every choice depends on the shape alone, never on the thread count, so that results
//! are bit-identical at any number of threads. Measurements are CPU time, 1 thread, from
//! the commits that introduced each path (git log -- rust/src/kernels/conv*).

use super::direct::{self, Kernel};
use super::microkernel::SMALL_K;
use super::Conv2dParams;
use crate::simd::Level;

/// How the forward runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Forward {
    /// Per image, the small-K product ([`super::microkernel`]) of the image unfolded
    /// `rows` output rows at a time (all of them unless the image is large).
    SmallK { rows: usize },
    /// `images` small images unfolded side by side and multiplied by one GEMM.
    SharedGemm { images: usize },
    /// Per image, one GEMM on the image itself: a pointwise convolution (1×1, stride 1,
    /// no padding) is its own unfolded matrix.
    Pointwise,
    /// Per image, `rows` output rows unfolded at a time, one GEMM per tile.
    TiledIm2col { rows: usize },
    /// Per image, the direct kernel on the zero-padded frame ([`super::direct`]), with
    /// the tile of the level.
    Direct(Kernel),
}

/// How images are unfolded, and gradients folded back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Unfolding {
    /// Straight from the image: without padding every window lies inside it.
    Unpadded,
    /// Through a zero-padded copy of the image, so that no unfolded row tests bounds
    /// (each row a plain copy, no memcpy call for short rows).
    PaddedCopy,
    /// From the image, each row testing its bounds (padding reads as zero): when the
    /// padded copy would be larger than the unfolded matrix (a huge padding).
    BoundsTested,
}

/// How the input gradient runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum InputGrad {
    /// The forward of this convolution (the output gradient convolved with the
    /// transposed, flipped weights): see [`transposed_params`].
    Transposed(Conv2dParams),
    /// Per block of images, Wᵀ·dY by GEMM, folded back onto the images (col2im).
    GemmFold,
}

/// The algorithms of one convolution, forward and backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Plan {
    pub forward: Forward,
    pub unfolding: Unfolding,
    pub input_grad: InputGrad,
    /// Images per weight-gradient group: at most 8 groups, fixed by the batch size,
    /// each summing its images' gradients into its own buffer; the buffers are then
    /// added in order, so the sum's order never depends on the threads.
    pub weight_grad_group: usize,
    /// Images whose unfolded matrices share one weight-gradient GEMM within a group.
    pub weight_grad_images: usize,
    /// Output rows per unfolded tile of one image in the weight gradient (and the input
    /// gradient by [`InputGrad::GemmFold`]): all of them unless the image is large.
    pub backward_rows: usize,
    /// The weight gradient by [`super::direct`] with this kernel (per group of images,
    /// as the GEMM's), or `None` for the GEMM.
    pub weight_grad_direct: Option<Kernel>,
}

impl Plan {
    /// The plan at the SIMD level in use.
    pub(super) fn new(p: &Conv2dParams) -> Self {
        Plan::for_level(p, crate::simd::level())
    }

    pub(super) fn for_level(p: &Conv2dParams, level: Level) -> Self {
        let images = images_per_gemm(p);
        // With FMA (AVX2 or AVX-512): the levels' direct kernels give the same bits.
        let direct_handles = level >= Level::Avx2 && direct::handles(p) && !p.is_pointwise();
        let direct = direct_handles && p.col_rows() > SMALL_K;
        let forward = if direct {
            // Stride 1 with AVX-512, where the GEMM's packing and the unfolding cost more
            // than the 2/(W+2) dropped columns of the flat frame. Forward against the GEMM,
            // builds alternating, 4 rounds: 64x16x14x14->32 1.37x, 64x32x7x7->64 1.18x,
            // 64x16x28x28->32 1.17x, 32x64x32x32->64 1.29x; 64x32x14x14->16 (the input
            // gradient of the first, a forward of the transposed convolution) 1.95x.
            // (AMD EPYC Zen 5, 1 thread, CPU time, the machine loaded by other jobs.)
            // With AVX2 the plain forward is about as fast as the GEMM (64x16x14x14->32
            // 1.02x, 64x32x7x7->64 1.02x, 64x16x28x28->32 1.0x, 32x64x32x32->64 1.06x;
            // 64x32x14x14->16 1.20x), but only this path fuses the 2x2 pool (and chains
            // two blocks) in the evaluation forward: 64x16x14x14->32 with ReLU and max
            // pool 1.20x, LeNetBN inference 1.27x, a LeNetBN training step (batch 64)
            // 1.02x. (The same machine held to AVX2, builds alternating, 6 rounds.)
            Forward::Direct(Kernel::forward(level))
        } else if direct_handles {
            // A first layer (few unfolded rows): the direct kernel summing in the small-K
            // product's order, so its bits, without unfolding the image. Forward
            // 64x1x28x28->16 k3p1 against the small-K product, builds alternating, 4
            // rounds: 1.30x; with the fused ReLU and 2x2 pool on 1000 images 1.87x (with
            // the pool's own change). 1000 images unpooled 1.0x: writing the 50 MB output
            // bounds both. (AMD EPYC Zen 5, 1 thread, CPU time, the machine loaded.) With
            // AVX2, 64 images: unpooled 0.93-0.97x, with the fused ReLU and max pool 1.37x
            // (the same machine held to AVX2, builds alternating, 4 and 6 rounds).
            Forward::Direct(Kernel::small_k(level))
        } else if p.col_rows() <= SMALL_K {
            // Few unfolded rows (a first layer on one or three channels, 3×3): a GEMM with
            // a tiny inner dimension spends its time packing. 64x1x28x28->16 k3p1
            // forward: 2.5 -> 1.7 ms over the former row-wise direct kernel, and with
            // FMA intrinsics 0.98x -> 1.52-1.62x PyTorch 2.15's speed. The bound 32 is
            // the micro-kernel's register block, not a measured crossover.
            // A pointwise convolution reads the image itself: nothing to tile.
            Forward::SmallK {
                rows: if p.is_pointwise() {
                    p.out_h
                } else {
                    rows_within(p, SMALL_K_TILE_BYTES)
                },
            }
        } else if images > 1 {
            Forward::SharedGemm { images }
        } else if p.is_pointwise() {
            Forward::Pointwise
        } else {
            Forward::TiledIm2col {
                rows: rows_within(p, TILE_BYTES),
            }
        };
        let unfolding = if p.padding == (0, 0) {
            Unfolding::Unpadded
        } else if unfolds_padded(p) {
            Unfolding::PaddedCopy
        } else {
            Unfolding::BoundsTested
        };
        let input_grad = match transposed_params(p) {
            Some(transposed) => InputGrad::Transposed(transposed),
            None => InputGrad::GemmFold,
        };
        let weight_grad_group = crate::parallel::chunk_len(p.batch, 1, 8);
        Plan {
            forward,
            unfolding,
            input_grad,
            weight_grad_group,
            weight_grad_images: images.min(weight_grad_group),
            backward_rows: backward_rows(p),
            // Beside the forward's, from 14×14 outputs: weight gradient 1.31x faster on
            // 64x16x14x14->32, 1.37x on 64x16x28x28->32, 2.72x on 32x64x32x32->64 (as
            // above), but 0.69x on 64x32x7x7->64 (7 of 9 flat columns kept, and per image
            // only four steps of 16 pixels to spread its set-up over). With AVX2 (tile
            // 2×3; 3×2 as fast), the same rule: 1.16x on 64x16x14x14->32, 1.22x on
            // 64x16x28x28->32, 1.11x on 32x64x32x32->64 (20 rounds), 0.82x on
            // 64x32x7x7->64 (6 rounds); a LeNetBN training step (batch 64) 1.05x (18
            // rounds). (The same machine held to AVX2, 1 thread, CPU time, builds
            // alternating, the machine shared with other jobs.) Both levels give the same
            // bits.
            weight_grad_direct: (direct && p.pixels() >= 14 * 14)
                .then(|| Kernel::weight_grad(level)),
        }
    }
}

/// The unfolded tile of [`Forward::TiledIm2col`] stays within about 256 KiB (L2-sized),
/// so the GEMM reads it from cache (2d18151; the size was not tuned by measurement).
const TILE_BYTES: usize = 256 * 1024;

/// The unfolded tile of [`Forward::SmallK`]: LeNet-sized and other usual images are
/// unfolded whole, as before; a large one (a 8000×8000 image under a 5×5 kernel unfolded
/// to 6.4 GB) in tiles of bounded size. Each pixel's sum does not depend on the tiling,
/// so neither do the results.
const SMALL_K_TILE_BYTES: usize = 4 << 20;

/// Whole-image unfolding in the backward up to this size, as before: beyond it the
/// weight-gradient GEMM sums the image in tiles of [`BACKWARD_TILE_BYTES`], so its
/// rounding differs from the whole-image product (only for images this large, from
/// about 1×64×155×155 under 3×3: relative differences ~1e-6), and the unfolded scratch
/// stays bounded.
const WHOLE_IMAGE_UNFOLD_BYTES: usize = 128 << 20;

/// The backward's unfolded tile of a large image: a GEMM of C_out × 4 MiB-of-columns
/// floating-point operations between stop checks (~0.5 GFLOP at 128 output channels).
const BACKWARD_TILE_BYTES: usize = 4 << 20;

/// The padded copy of an image is made up to this size; a larger image is unfolded with
/// bounds tests instead (same values, so the same results), so that no scratch grows
/// with the image.
const PADDED_COPY_BYTES: usize = 64 << 20;

/// Output rows per unfolded tile of at most `bytes` (at least one row).
fn rows_within(p: &Conv2dParams, bytes: usize) -> usize {
    let row_bytes = p.col_rows() * p.out_w * std::mem::size_of::<f32>();
    (bytes / row_bytes.max(1)).clamp(1, p.out_h)
}

/// [`Plan::backward_rows`]: a pointwise convolution is its own unfolded matrix, so its
/// images are never unfolded, nor tiled.
fn backward_rows(p: &Conv2dParams) -> usize {
    let whole = p.col_rows() * p.pixels() * std::mem::size_of::<f32>();
    if p.is_pointwise() || whole <= WHOLE_IMAGE_UNFOLD_BYTES {
        p.out_h
    } else {
        rows_within(p, BACKWARD_TILE_BYTES)
    }
}

/// Images unfolded side by side into one GEMM, so that its n (images × pixels) reaches
/// about 512 columns: measured, a 7×7 image (49 columns) alone runs the GEMM 1.1-1.2×
/// slower than eight side by side, while 14×14 images (196) gain nothing from more than
/// two and lose ~10% at eight (the block leaves the L2 cache). At least eight blocks
/// remain for the threads. 1 for pointwise convolutions and large images (tiled by rows
/// instead). With the padded copy: 64x16x14x14->32 forward 1.11x, backward 1.02x
/// PyTorch 2.15's speed (4121f25).
fn images_per_gemm(p: &Conv2dParams) -> usize {
    const TARGET_COLUMNS: usize = 512;
    const BLOCK_BYTES: usize = 1 << 20;
    if p.is_pointwise() {
        return 1;
    }
    let columns = TARGET_COLUMNS.min(BLOCK_BYTES / (std::mem::size_of::<f32>() * p.col_rows()));
    (columns / p.pixels().max(1)).clamp(1, p.batch.div_ceil(8).max(1))
}

/// Whether images are unfolded through a zero-padded copy: when that copy is no larger
/// than the unfolded matrix itself (every usual convolution; not a huge padding) and
/// within [`PADDED_COPY_BYTES`].
fn unfolds_padded(p: &Conv2dParams) -> bool {
    let (hp, wp) = p.padded_size();
    let padded = p.in_channels * hp * wp;
    padded <= p.col_rows() * p.pixels() && padded * std::mem::size_of::<f32>() <= PADDED_COPY_BYTES
}

/// The convolution whose forward is the input gradient of `p`, when `p` has stride 1 and
/// padding at most the dilated kernel's extent d·(k - 1): the output gradient convolved
/// with the weights transposed (C_in × C_out) and flipped, padded by d·(k - 1) - p, which
/// gives back H×W. It runs as a forward (unfolded in cache-sized tiles, no fold of a
/// K×P gradient matrix), which measured faster than GEMM + col2im: backward
/// 32x64x32x32->64 191 -> 178 ms, 64x16x28x28->16 24.2 -> 21.8 ms (bbf295f).
pub(super) fn transposed_params(p: &Conv2dParams) -> Option<Conv2dParams> {
    let extent = (
        p.dilation.0 * (p.kernel_h - 1),
        p.dilation.1 * (p.kernel_w - 1),
    );
    if p.stride != (1, 1) || p.padding.0 > extent.0 || p.padding.1 > extent.1 {
        return None;
    }
    Some(Conv2dParams {
        batch: p.batch,
        in_channels: p.out_channels,
        in_h: p.out_h,
        in_w: p.out_w,
        out_channels: p.in_channels,
        kernel_h: p.kernel_h,
        kernel_w: p.kernel_w,
        stride: (1, 1),
        padding: (extent.0 - p.padding.0, extent.1 - p.padding.1),
        dilation: p.dilation,
        out_h: p.in_h,
        out_w: p.in_w,
        groups: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan of the portable level: the GEMM paths.
    fn plan(input: [usize; 4], weight: [usize; 4], stride: i64, padding: i64) -> Plan {
        plan_at(input, weight, stride, padding, Level::Scalar)
    }

    fn plan_at(
        input: [usize; 4],
        weight: [usize; 4],
        stride: i64,
        padding: i64,
        level: Level,
    ) -> Plan {
        let p = Conv2dParams::new(
            &input,
            &weight,
            (stride, stride),
            (padding, padding),
            (1, 1),
        )
        .unwrap();
        Plan::for_level(&p, level)
    }

    #[test]
    fn lenet_shapes_choose_the_expected_algorithms() {
        let first = plan([64, 1, 28, 28], [16, 1, 3, 3], 1, 1);
        assert_eq!(first.forward, Forward::SmallK { rows: 28 });
        assert_eq!(first.backward_rows, 28);
        assert_eq!(first.unfolding, Unfolding::PaddedCopy);
        assert!(matches!(first.input_grad, InputGrad::Transposed(_)));
        let middle = plan([64, 16, 14, 14], [32, 16, 3, 3], 1, 1);
        assert_eq!(middle.forward, Forward::SharedGemm { images: 2 });
        assert_eq!(
            (middle.weight_grad_group, middle.weight_grad_images),
            (8, 2)
        );
        let strided = plan([64, 16, 14, 14], [32, 16, 3, 3], 2, 1);
        assert_eq!(strided.input_grad, InputGrad::GemmFold);
        let pointwise = plan([2, 64, 32, 32], [32, 64, 1, 1], 1, 0);
        assert_eq!(pointwise.forward, Forward::Pointwise);
        assert_eq!(pointwise.unfolding, Unfolding::Unpadded);
        let large = plan([2, 64, 40, 40], [8, 64, 3, 3], 1, 1);
        assert!(matches!(large.forward, Forward::TiledIm2col { rows } if rows < 40));
        let huge_padding = plan([1, 3, 6, 6], [4, 3, 1, 1], 2, 3);
        assert_eq!(huge_padding.unfolding, Unfolding::BoundsTested);
    }

    #[test]
    fn direct_kernels_with_fma() {
        for level in [Level::Avx512, Level::Avx2] {
            let direct = Kernel::forward(level);
            let middle = plan_at([64, 16, 14, 14], [32, 16, 3, 3], 1, 1, level);
            assert_eq!(middle.forward, Forward::Direct(direct));
            let small = plan_at([64, 32, 7, 7], [64, 32, 3, 3], 1, 1, level);
            assert_eq!(small.forward, Forward::Direct(direct));
            // The weight gradient by the direct kernel from 14×14 outputs.
            assert_eq!(small.weight_grad_direct, None);
            for (input, weight) in [
                ([64, 16, 14, 14], [32, 16, 3, 3]),
                ([64, 16, 28, 28], [32, 16, 3, 3]),
                ([32, 64, 32, 32], [64, 64, 3, 3]),
            ] {
                assert_eq!(
                    plan_at(input, weight, 1, 1, level).weight_grad_direct,
                    Some(Kernel::weight_grad(level))
                );
            }
            let InputGrad::Transposed(transposed) = middle.input_grad else {
                panic!("{:?}", middle.input_grad)
            };
            assert_eq!(
                Plan::for_level(&transposed, level).forward,
                Forward::Direct(direct)
            );
            // The first layer's forward (small K) by the kernel in the small-K product's
            // order; its weight gradient stays on the GEMM.
            let first = plan_at([64, 1, 28, 28], [16, 1, 3, 3], 1, 1, level);
            assert_eq!(first.forward, Forward::Direct(Kernel::small_k(level)));
            assert!(Kernel::small_k(level).from_bias && !direct.from_bias);
            assert_eq!(first.weight_grad_direct, None);
            // Not: strides, pointwise.
            for (input, weight, stride, padding) in [
                ([64, 1, 28, 28], [16, 1, 3, 3], 2, 1),
                ([64, 16, 28, 28], [32, 16, 3, 3], 2, 1),
                ([2, 64, 32, 32], [32, 64, 1, 1], 1, 0),
            ] {
                let p = plan_at(input, weight, stride, padding, level);
                assert!(!matches!(p.forward, Forward::Direct(_)) && p.weight_grad_direct.is_none());
            }
        }
        // At the portable level, the GEMM.
        assert!(plan([64, 16, 28, 28], [32, 16, 3, 3], 1, 1)
            .weight_grad_direct
            .is_none());
    }

    #[test]
    fn scratch_of_huge_images_is_bounded() {
        let huge = plan([1, 1, 8000, 8000], [1, 1, 5, 5], 1, 2);
        let Forward::SmallK { rows } = huge.forward else {
            panic!("{:?}", huge.forward)
        };
        assert!(rows * 8000 * 25 * 4 <= SMALL_K_TILE_BYTES && rows >= 1);
        assert!(huge.backward_rows * 8000 * 25 * 4 <= BACKWARD_TILE_BYTES);
        assert_eq!(huge.unfolding, Unfolding::BoundsTested);
        let wide = plan([1, 128, 1024, 1024], [128, 128, 3, 3], 1, 1);
        assert_eq!(wide.forward, Forward::TiledIm2col { rows: 1 });
        assert_eq!(wide.unfolding, Unfolding::BoundsTested);
    }
}
