//! 2-D convolution (cross-correlation, groups = 1), forward and backward.
//!
//! Each image is unfolded (im2col) into a K×P matrix, K = C_in·kH·kW, P = H_out·W_out,
//! and multiplied by the C_out×K weight matrix. A 1×1 convolution with stride 1 and no
//! padding is a plain GEMM on the image. Images run in parallel; the weight gradient is
//! summed per fixed group of images, then over groups in order. The input gradient of a
//! stride-1 convolution is itself a convolution (of the output gradient with the flipped,
//! transposed weights); other strides fold the GEMM's K×P gradient back (col2im).

use rayon::prelude::*;

use super::gemm::{sgemm, MatRef};
use super::{nchw, non_negative_pair, positive_pair, valid_range, window_out_len};
use crate::error::{checked_size, Error, Result};
use crate::parallel::{chunk_len, stop_token};
use crate::simd_dispatch;
use std::ops::Range;

/// Shapes and hyper-parameters of a convolution, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub batch: usize,
    pub in_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_channels: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub out_h: usize,
    pub out_w: usize,
}

impl Conv2dParams {
    /// Validate an input of shape (N, C_in, H, W) against a weight (C_out, C_in, kH, kW).
    pub fn new(
        input_shape: &[usize],
        weight_shape: &[usize],
        stride: (i64, i64),
        padding: (i64, i64),
        dilation: (i64, i64),
    ) -> Result<Self> {
        let (batch, in_channels, in_h, in_w) = nchw("input", input_shape)?;
        if weight_shape.len() != 4 {
            return Err(Error::invalid(
                "weight",
                format!("a {}-D array {weight_shape:?}", weight_shape.len()),
                "a 4-D (C_out, C_in, kH, kW) array",
            ));
        }
        super::nonzero("weight", weight_shape)?;
        let (out_channels, w_in, kernel_h, kernel_w) = (
            weight_shape[0],
            weight_shape[1],
            weight_shape[2],
            weight_shape[3],
        );
        if w_in != in_channels {
            return Err(Error::invalid(
                "weight",
                format!("{w_in} input channels (shape {weight_shape:?})"),
                format!("{in_channels} input channels, as input has (shape {input_shape:?})"),
            ));
        }
        let stride = positive_pair("stride", stride)?;
        let padding = non_negative_pair("padding", padding)?;
        let dilation = positive_pair("dilation", dilation)?;
        let out_h = window_out_len(in_h, padding.0, kernel_h, stride.0, dilation.0);
        let out_w = window_out_len(in_w, padding.1, kernel_w, stride.1, dilation.1);
        let (Some(out_h), Some(out_w)) = (out_h, out_w) else {
            return Err(Error::invalid(
                "weight",
                format!(
                    "a kernel of {kernel_h}×{kernel_w} (dilation {dilation:?}) on an input of \
                         {in_h}×{in_w} padded by {padding:?}"
                ),
                "a (dilated) kernel no larger than the padded input",
            ));
        };
        let params = Conv2dParams {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            kernel_h,
            kernel_w,
            stride,
            padding,
            dilation,
            out_h,
            out_w,
        };
        checked_size("output", &[batch, out_channels, out_h, out_w])?;
        checked_size("im2col buffer", &[params.col_rows(), out_h, out_w])?;
        Ok(params)
    }

    /// Output shape (N, C_out, H_out, W_out).
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.out_channels, self.out_h, self.out_w]
    }

    /// Multiply-adds of the forward pass.
    pub fn multiply_adds(&self) -> usize {
        self.output_shape()
            .iter()
            .product::<usize>()
            .saturating_mul(self.col_rows())
    }

    /// Rows of the unfolded image: C_in · kH · kW.
    pub fn col_rows(&self) -> usize {
        self.in_channels * self.kernel_h * self.kernel_w
    }

    fn pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    fn image_len(&self) -> usize {
        self.in_channels * self.in_h * self.in_w
    }

    /// 1×1, stride 1, no padding: the image itself is the unfolded matrix.
    fn is_pointwise(&self) -> bool {
        self.kernel_h == 1 && self.kernel_w == 1 && self.stride == (1, 1) && self.padding == (0, 0)
    }

    fn check_lengths(&self, input: usize, weight: usize, output: usize) -> Result<()> {
        crate::error::check_len("input", input, self.batch * self.image_len())?;
        crate::error::check_len("weight", weight, self.out_channels * self.col_rows())?;
        crate::error::check_len(
            "output",
            output,
            self.batch * self.out_channels * self.pixels(),
        )
    }
}

/// Unfold output rows `rows` of one image (C_in, H, W) into `col`: K rows, each holding
/// those output rows' pixels, row r starting at `col[r * ld]` (`ld` >= their count, so
/// several images can sit side by side). Padding reads as zero.
fn im2col(p: &Conv2dParams, image: &[f32], rows: Range<usize>, col: &mut [f32], ld: usize) {
    let width = rows.len() * p.out_w;
    let plane = p.in_h * p.in_w;
    let mut col_rows = (0..p.col_rows()).map(|r| r * ld);
    for c in 0..p.in_channels {
        let src = &image[c * plane..(c + 1) * plane];
        for ki in 0..p.kernel_h {
            let row_offset = (ki * p.dilation.0) as isize - p.padding.0 as isize;
            let (oh_lo, oh_hi) = valid_range(row_offset, p.stride.0, p.in_h, p.out_h);
            let (oh_lo, oh_hi) = (
                oh_lo.clamp(rows.start, rows.end),
                oh_hi.clamp(rows.start, rows.end),
            );
            for kj in 0..p.kernel_w {
                let col_offset = (kj * p.dilation.1) as isize - p.padding.1 as isize;
                let (ow_lo, ow_hi) = valid_range(col_offset, p.stride.1, p.in_w, p.out_w);
                let start = col_rows.next().expect("im2col: K rows");
                let dst = &mut col[start..start + width];
                dst[..(oh_lo - rows.start) * p.out_w].fill(0.0);
                dst[(oh_hi.max(oh_lo) - rows.start) * p.out_w..].fill(0.0);
                for oh in oh_lo..oh_hi {
                    let ih = ((oh * p.stride.0) as isize + row_offset) as usize;
                    let src_row = &src[ih * p.in_w..(ih + 1) * p.in_w];
                    let local = oh - rows.start;
                    let out_row = &mut dst[local * p.out_w..(local + 1) * p.out_w];
                    out_row[..ow_lo].fill(0.0);
                    out_row[ow_hi..].fill(0.0);
                    if ow_lo == ow_hi {
                        continue;
                    }
                    let first = ((ow_lo * p.stride.1) as isize + col_offset) as usize;
                    if p.stride.1 == 1 {
                        out_row[ow_lo..ow_hi]
                            .copy_from_slice(&src_row[first..first + ow_hi - ow_lo]);
                    } else {
                        for (o, v) in out_row[ow_lo..ow_hi]
                            .iter_mut()
                            .zip(src_row[first..].iter().step_by(p.stride.1))
                        {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}

/// Fold `col` (K rows of the pixels of output rows `rows`, row r at `col[r * ld]`) back
/// onto one image, adding overlapping entries. The image is accumulated into, not cleared.
fn col2im(p: &Conv2dParams, col: &[f32], rows: Range<usize>, image: &mut [f32], ld: usize) {
    let width = rows.len() * p.out_w;
    let plane = p.in_h * p.in_w;
    let mut col_rows = (0..p.col_rows()).map(|r| r * ld);
    for c in 0..p.in_channels {
        let dst = &mut image[c * plane..(c + 1) * plane];
        for ki in 0..p.kernel_h {
            let row_offset = (ki * p.dilation.0) as isize - p.padding.0 as isize;
            let (oh_lo, oh_hi) = valid_range(row_offset, p.stride.0, p.in_h, p.out_h);
            let (oh_lo, oh_hi) = (
                oh_lo.clamp(rows.start, rows.end),
                oh_hi.clamp(rows.start, rows.end),
            );
            for kj in 0..p.kernel_w {
                let col_offset = (kj * p.dilation.1) as isize - p.padding.1 as isize;
                let (ow_lo, ow_hi) = valid_range(col_offset, p.stride.1, p.in_w, p.out_w);
                let start = col_rows.next().expect("col2im: K rows");
                let src = &col[start..start + width];
                if ow_lo == ow_hi {
                    continue;
                }
                for oh in oh_lo..oh_hi {
                    let ih = ((oh * p.stride.0) as isize + row_offset) as usize;
                    let dst_row = &mut dst[ih * p.in_w..(ih + 1) * p.in_w];
                    let local = (oh - rows.start) * p.out_w;
                    let src_row = &src[local + ow_lo..local + ow_hi];
                    let first = ((ow_lo * p.stride.1) as isize + col_offset) as usize;
                    if p.stride.1 == 1 {
                        for (d, s) in dst_row[first..first + src_row.len()]
                            .iter_mut()
                            .zip(src_row)
                        {
                            *d += *s;
                        }
                    } else {
                        for (d, s) in dst_row[first..].iter_mut().step_by(p.stride.1).zip(src_row) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    }
}

/// The zero-padded image's height and width.
fn padded_size(p: &Conv2dParams) -> (usize, usize) {
    (p.in_h + 2 * p.padding.0, p.in_w + 2 * p.padding.1)
}

/// Whether images are unfolded through a zero-padded copy: when that copy is no larger
/// than the unfolded matrix itself (every usual convolution; not a huge padding), so that
/// every unfolded row is a plain copy with no bounds to test.
fn unfolds_padded(p: &Conv2dParams) -> bool {
    let (hp, wp) = padded_size(p);
    p.in_channels * hp * wp <= p.col_rows() * p.pixels()
}

/// Copy `src` to `dst` (same length): eight lanes at a time and an overlapping last eight,
/// so that the short rows of small images do not pay for a call to memcpy.
#[inline(always)]
fn copy_row(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    debug_assert_eq!(n, src.len());
    if n < 8 {
        dst.copy_from_slice(src);
        return;
    }
    let mut i = 0;
    while i + 8 <= n {
        let d: &mut [f32; 8] = (&mut dst[i..i + 8]).try_into().expect("eight lanes");
        *d = src[i..i + 8].try_into().expect("eight lanes");
        i += 8;
    }
    if i < n {
        let d: &mut [f32; 8] = (&mut dst[n - 8..]).try_into().expect("eight lanes");
        *d = src[n - 8..].try_into().expect("eight lanes");
    }
}

/// For each image row (channel c, row h): where it starts in the image and in the
/// zero-padded image.
fn interior_rows(p: &Conv2dParams) -> impl Iterator<Item = (usize, usize)> + '_ {
    let (hp, wp) = padded_size(p);
    (0..p.in_channels).flat_map(move |c| {
        (0..p.in_h).map(move |h| {
            (
                (c * p.in_h + h) * p.in_w,
                c * hp * wp + (h + p.padding.0) * wp + p.padding.1,
            )
        })
    })
}

/// Images unfolded for the GEMM, through a zero-padded copy when [`unfolds_padded`].
struct Unfolder {
    padded: Vec<f32>,
}

impl Unfolder {
    fn new() -> Self {
        Unfolder { padded: Vec::new() }
    }

    /// The image as unfolded rows read it: the padded copy (borders zero), the image
    /// itself when there is no padding, or `None` when rows test their bounds instead.
    fn source<'a>(&'a mut self, p: &Conv2dParams, image: &'a [f32]) -> Option<&'a [f32]> {
        if !unfolds_padded(p) {
            return None;
        }
        if p.padding == (0, 0) {
            return Some(image);
        }
        let (hp, wp) = padded_size(p);
        let len = p.in_channels * hp * wp;
        if self.padded.len() != len {
            // Only interiors are written below, so the borders stay zero from here on.
            self.padded.clear();
            self.padded.resize(len, 0.0);
        }
        for (row, padded_row) in interior_rows(p) {
            copy_row(
                &mut self.padded[padded_row..padded_row + p.in_w],
                &image[row..row + p.in_w],
            );
        }
        Some(&self.padded)
    }

    /// [`im2col`] of all output rows of `image` into `col` (row r at `col[r * ld]`).
    fn im2col(&mut self, p: &Conv2dParams, image: &[f32], col: &mut [f32], ld: usize) {
        let src = self.source(p, image);
        unfold(p, src, image, 0..p.out_h, col, ld);
    }
}

/// [`im2col`] of output rows `rows`, from `src` ([`Unfolder::source`]) when it is given.
fn unfold(
    p: &Conv2dParams,
    src: Option<&[f32]>,
    image: &[f32],
    rows: Range<usize>,
    col: &mut [f32],
    ld: usize,
) {
    match src {
        Some(src) => im2col_padded(p, src, rows, col, ld),
        None => im2col(p, image, rows, col, ld),
    }
}

/// [`im2col`] from a zero-padded image (or an unpadded one): no bounds to test.
fn im2col_padded(p: &Conv2dParams, src: &[f32], rows: Range<usize>, col: &mut [f32], ld: usize) {
    let (hp, wp) = padded_size(p);
    let mut r = 0;
    for c in 0..p.in_channels {
        let plane = &src[c * hp * wp..(c + 1) * hp * wp];
        for ki in 0..p.kernel_h {
            for kj in 0..p.kernel_w {
                let row_start = r * ld;
                r += 1;
                for (local, oh) in rows.clone().enumerate() {
                    let first = (oh * p.stride.0 + ki * p.dilation.0) * wp + kj * p.dilation.1;
                    let dst = &mut col[row_start + local * p.out_w..][..p.out_w];
                    if p.stride.1 == 1 {
                        copy_row(dst, &plane[first..first + p.out_w]);
                    } else {
                        for (o, v) in dst
                            .iter_mut()
                            .zip(plane[first..].iter().step_by(p.stride.1))
                        {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}

/// Fold `col` (all output rows, row r at `col[r * ld]`) onto one image's gradient `gx`,
/// overwriting it: through a zero-padded buffer `scratch` when [`unfolds_padded`].
fn fold(p: &Conv2dParams, col: &[f32], ld: usize, gx: &mut [f32], scratch: &mut Vec<f32>) {
    if !unfolds_padded(p) {
        gx.fill(0.0);
        col2im(p, col, 0..p.out_h, gx, ld);
        return;
    }
    let (hp, wp) = padded_size(p);
    let unpadded = p.padding == (0, 0);
    let target: &mut [f32] = if unpadded {
        gx.fill(0.0);
        gx
    } else {
        scratch.clear();
        scratch.resize(p.in_channels * hp * wp, 0.0);
        scratch
    };
    let mut r = 0;
    for c in 0..p.in_channels {
        let plane = &mut target[c * hp * wp..(c + 1) * hp * wp];
        for ki in 0..p.kernel_h {
            for kj in 0..p.kernel_w {
                let row_start = r * ld;
                r += 1;
                for oh in 0..p.out_h {
                    let first = (oh * p.stride.0 + ki * p.dilation.0) * wp + kj * p.dilation.1;
                    let src = &col[row_start + oh * p.out_w..][..p.out_w];
                    if p.stride.1 == 1 {
                        for (d, s) in plane[first..first + p.out_w].iter_mut().zip(src) {
                            *d += *s;
                        }
                    } else {
                        for (d, s) in plane[first..].iter_mut().step_by(p.stride.1).zip(src) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    }
    if !unpadded {
        for (row, padded_row) in interior_rows(p) {
            copy_row(
                &mut gx[row..row + p.in_w],
                &scratch[padded_row..padded_row + p.in_w],
            );
        }
    }
}

/// Output rows per im2col tile: the unfolded tile stays within about 256 KiB (L2-sized),
/// so the GEMM reads it from cache. Fixed by the problem, never by the thread count.
fn tile_rows(p: &Conv2dParams) -> usize {
    const TILE_BYTES: usize = 256 * 1024;
    let row_bytes = p.col_rows() * p.out_w * std::mem::size_of::<f32>();
    (TILE_BYTES / row_bytes.max(1)).clamp(1, p.out_h)
}

/// Images unfolded side by side into one GEMM, so that its n (images × pixels) reaches
/// about 512 columns: measured, a 7×7 image (49 columns) alone runs the GEMM 1.1-1.2×
/// slower than eight side by side, while 14×14 images (196) gain nothing from more than
/// two and lose ~10% at eight (the block leaves the L2 cache). At least eight blocks
/// remain for the threads. 1 for pointwise convolutions and large images (tiled by rows
/// instead). Fixed by the problem, never by the thread count.
fn images_per_gemm(p: &Conv2dParams) -> usize {
    const TARGET_COLUMNS: usize = 512;
    const BLOCK_BYTES: usize = 1 << 20;
    if p.is_pointwise() {
        return 1;
    }
    let columns = TARGET_COLUMNS.min(BLOCK_BYTES / (std::mem::size_of::<f32>() * p.col_rows()));
    (columns / p.pixels().max(1)).clamp(1, p.batch.div_ceil(8).max(1))
}

/// The unfolded image: the image itself for pointwise convolutions, else `col` filled.
fn unfolded<'a>(
    p: &Conv2dParams,
    image: &'a [f32],
    col: &'a mut Vec<f32>,
    unfolder: &mut Unfolder,
) -> &'a [f32] {
    if p.is_pointwise() {
        image
    } else {
        col.resize(p.col_rows() * p.pixels(), 0.0);
        unfolder.im2col(p, image, col, p.pixels());
        col
    }
}

/// Unfolded rows up to which the small-K product replaces the GEMM.
const SMALL_K: usize = 32;

/// Whether the small-K product suits this shape: few unfolded rows (a first layer on one
/// or three channels), where a GEMM with a tiny inner dimension spends its time packing.
fn use_small_k(p: &Conv2dParams) -> bool {
    p.col_rows() <= SMALL_K
}

/// out (C_out × P) = weight (C_out × K) · col (K × P) (+ bias), K <= 32, for first layers
/// on one or three channels: with AVX2 and FMA intrinsics when the AVX2 path is on
/// (fused multiply-adds: within float32 rounding of the portable path, not bit-equal).
fn small_k_product(
    weight: &[f32],
    col: &[f32],
    k: usize,
    pixels: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let channels = out.len() / pixels;
    assert!(
        k <= SMALL_K && weight.len() >= channels * k && col.len() >= k * pixels,
        "small_k_product: operands too short"
    );
    if let Some(b) = bias {
        assert!(b.len() >= channels, "small_k_product: bias too short");
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::use_avx2() {
        // SAFETY: the AVX2 path is on only for CPUs with AVX2 and FMA; lengths checked above.
        unsafe { small_k_product_fma(weight, col, k, pixels, bias, out) };
        return;
    }
    small_k_product_portable(weight, col, k, pixels, bias, out);
}

/// [`small_k_product`] with FMA: blocks of 32 pixels (four registers) for two output
/// channels at once, each block row loaded straight from `col`.
///
/// # Safety
/// The CPU must have AVX2 and FMA, and the lengths checked by [`small_k_product`] hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn small_k_product_fma(
    weight: &[f32],
    col: &[f32],
    k: usize,
    pixels: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let channels = out.len() / pixels;
    let full = pixels / 32 * 32;
    let (w, x, y) = (weight.as_ptr(), col.as_ptr(), out.as_mut_ptr());
    let bias_of = |c: usize| bias.map_or(0.0, |b| b[c]);
    let mut start = 0;
    while start < full {
        let mut co = 0;
        while co < channels {
            let pair = co + 1 < channels;
            let (b0, b1) = (
                _mm256_set1_ps(bias_of(co)),
                _mm256_set1_ps(if pair { bias_of(co + 1) } else { 0.0 }),
            );
            let (mut a0, mut a1, mut a2, mut a3) = (b0, b0, b0, b0);
            let (mut c0, mut c1, mut c2, mut c3) = (b1, b1, b1, b1);
            for kk in 0..k {
                let src = x.add(kk * pixels + start);
                let (x0, x1, x2, x3) = (
                    _mm256_loadu_ps(src),
                    _mm256_loadu_ps(src.add(8)),
                    _mm256_loadu_ps(src.add(16)),
                    _mm256_loadu_ps(src.add(24)),
                );
                let w0 = _mm256_set1_ps(*w.add(co * k + kk));
                a0 = _mm256_fmadd_ps(w0, x0, a0);
                a1 = _mm256_fmadd_ps(w0, x1, a1);
                a2 = _mm256_fmadd_ps(w0, x2, a2);
                a3 = _mm256_fmadd_ps(w0, x3, a3);
                if pair {
                    let w1 = _mm256_set1_ps(*w.add((co + 1) * k + kk));
                    c0 = _mm256_fmadd_ps(w1, x0, c0);
                    c1 = _mm256_fmadd_ps(w1, x1, c1);
                    c2 = _mm256_fmadd_ps(w1, x2, c2);
                    c3 = _mm256_fmadd_ps(w1, x3, c3);
                }
            }
            let dst = y.add(co * pixels + start);
            _mm256_storeu_ps(dst, a0);
            _mm256_storeu_ps(dst.add(8), a1);
            _mm256_storeu_ps(dst.add(16), a2);
            _mm256_storeu_ps(dst.add(24), a3);
            if pair {
                let dst = y.add((co + 1) * pixels + start);
                _mm256_storeu_ps(dst, c0);
                _mm256_storeu_ps(dst.add(8), c1);
                _mm256_storeu_ps(dst.add(16), c2);
                _mm256_storeu_ps(dst.add(24), c3);
            }
            co += 2;
        }
        start += 32;
    }
    for co in 0..channels {
        for px in full..pixels {
            let mut acc = bias_of(co);
            for kk in 0..k {
                acc = (*w.add(co * k + kk)).mul_add(*x.add(kk * pixels + px), acc);
            }
            *y.add(co * pixels + px) = acc;
        }
    }
}

simd_dispatch! {
    /// [`small_k_product`] in portable code: a block of 32 pixels is loaded once and
    /// reused for every output channel, with four independent accumulators of eight
    /// lanes so the adds do not wait on each other.
    fn small_k_product_portable(weight: &[f32], col: &[f32], k: usize, pixels: usize,
                       bias: Option<&[f32]>, out: &mut [f32]) {
        const BLOCK: usize = 32;
        let channels = out.len() / pixels;
        let mut block = [[0.0f32; BLOCK]; SMALL_K];
        let mut start = 0;
        while start < pixels {
            let width = BLOCK.min(pixels - start);
            for (kk, lanes) in block.iter_mut().enumerate().take(k) {
                let src = &col[kk * pixels + start..kk * pixels + start + width];
                if width == BLOCK {
                    // A fixed-size copy is a few vector loads; a variable one calls memmove.
                    *lanes = src.try_into().expect("a full block");
                } else {
                    lanes[..width].copy_from_slice(src);
                }
            }
            for co in 0..channels {
                let mut acc = [bias.map_or(0.0, |b| b[co]); BLOCK];
                for (&w, lanes) in weight[co * k..(co + 1) * k].iter().zip(&block) {
                    for (a, &v) in acc.iter_mut().zip(lanes) {
                        *a += w * v;
                    }
                }
                let dst = &mut out[co * pixels + start..co * pixels + start + width];
                if width == BLOCK {
                    let dst: &mut [f32; BLOCK] = dst.try_into().expect("a full block");
                    *dst = acc;
                } else {
                    dst.copy_from_slice(&acc[..width]);
                }
            }
            start += BLOCK;
        }
    }
}

/// `output = conv2d(input, weight) + bias`.
pub fn forward(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
) -> Result<()> {
    p.check_lengths(input.len(), weight.len(), output.len())?;
    if let Some(b) = bias {
        crate::error::check_len("bias", b.len(), p.out_channels)?;
    }
    let (pixels, k) = (p.pixels(), p.col_rows());
    let stop = stop_token();
    let images = output
        .par_chunks_mut(p.out_channels * pixels)
        .zip(input.par_chunks(p.image_len()));
    if use_small_k(p) {
        images.for_each_init(
            || (Vec::new(), Unfolder::new()),
            |(col, unfolder), (out_image, image)| {
                if stop.is_set() {
                    return;
                }
                let unfolded_image = unfolded(p, image, col, unfolder);
                small_k_product(weight, unfolded_image, k, pixels, bias, out_image);
            },
        );
        return Ok(());
    }
    let group = images_per_gemm(p);
    if group > 1 {
        forward_grouped(p, input, weight, bias, output, group);
        return Ok(());
    }
    let rows_per_tile = tile_rows(p);
    images.for_each_init(
        || (Vec::new(), Unfolder::new()),
        |(col, unfolder), (out_image, image)| {
            if stop.is_set() {
                return;
            }
            if let Some(b) = bias {
                for (row, &bc) in out_image.chunks_exact_mut(pixels).zip(b) {
                    row.fill(bc);
                }
            }
            if p.is_pointwise() {
                sgemm(
                    p.out_channels,
                    pixels,
                    k,
                    out_image,
                    pixels,
                    bias.is_some(),
                    MatRef::rows(weight, k),
                    MatRef::rows(image, pixels),
                );
                return;
            }
            let src = unfolder.source(p, image);
            for first_row in (0..p.out_h).step_by(rows_per_tile) {
                let rows = first_row..(first_row + rows_per_tile).min(p.out_h);
                let width = rows.len() * p.out_w;
                col.resize(k * width, 0.0);
                unfold(p, src, image, rows.clone(), col, width);
                sgemm(
                    p.out_channels,
                    width,
                    k,
                    &mut out_image[rows.start * p.out_w..],
                    pixels,
                    bias.is_some(),
                    MatRef::rows(weight, k),
                    MatRef::rows(col, width),
                );
            }
        },
    );
    Ok(())
}

/// [`forward`] for small images: `group` images unfolded side by side, one GEMM for them
/// into `product` (C_out × group·P), then copied to NCHW with the bias added.
fn forward_grouped(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    group: usize,
) {
    let (pixels, k) = (p.pixels(), p.col_rows());
    let out_image = p.out_channels * pixels;
    let stop = stop_token();
    output
        .par_chunks_mut(group * out_image)
        .zip(input.par_chunks(group * p.image_len()))
        .for_each_init(
            || (Vec::new(), Vec::new(), Unfolder::new()),
            |(col, product, unfolder), (out_group, in_group)| {
                if stop.is_set() {
                    return;
                }
                let n = in_group.len() / p.image_len() * pixels;
                col.resize(k * n, 0.0);
                for (i, image) in in_group.chunks_exact(p.image_len()).enumerate() {
                    unfolder.im2col(p, image, &mut col[i * pixels..], n);
                }
                product.resize(p.out_channels * n, 0.0);
                sgemm(
                    p.out_channels,
                    n,
                    k,
                    product,
                    n,
                    false,
                    MatRef::rows(weight, k),
                    MatRef::rows(col, n),
                );
                for (i, out) in out_group.chunks_exact_mut(out_image).enumerate() {
                    for (co, dst) in out.chunks_exact_mut(pixels).enumerate() {
                        let src = &product[co * n + i * pixels..co * n + (i + 1) * pixels];
                        let b = bias.map_or(0.0, |b| b[co]);
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = v + b;
                        }
                    }
                }
            },
        );
}

/// The convolution whose forward is the input gradient of `p`, when `p` has stride 1 and
/// padding at most the dilated kernel's extent d·(k - 1): the output gradient convolved
/// with the weights transposed (C_in × C_out) and flipped, padded by d·(k - 1) - p, which
/// gives back H×W. It runs as a forward (unfolded in cache-sized tiles, no fold of a
/// K×P gradient matrix), which measures faster than GEMM + col2im.
fn transposed_params(p: &Conv2dParams) -> Option<Conv2dParams> {
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
    })
}

/// The weights of [`transposed_params`]: `[c][co][i][j] = weight[co][c][kH-1-i][kW-1-j]`.
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

/// Gradients of [`forward`]: `grad_input` (if given), `grad_weight`, `grad_bias` (if given).
pub fn backward(
    p: &Conv2dParams,
    grad_output: &[f32],
    input: &[f32],
    weight: &[f32],
    grad_input: Option<&mut [f32]>,
    grad_weight: &mut [f32],
    grad_bias: Option<&mut [f32]>,
) -> Result<()> {
    p.check_lengths(input.len(), weight.len(), grad_output.len())?;
    crate::error::check_len("grad_weight", grad_weight.len(), weight.len())?;
    let (pixels, k) = (p.pixels(), p.col_rows());
    let out_image = p.out_channels * pixels;

    if let Some(gb) = grad_bias {
        crate::error::check_len("grad_bias", gb.len(), p.out_channels)?;
        gb.par_iter_mut().enumerate().for_each(|(co, g)| {
            let mut total = 0.0f64;
            for n in 0..p.batch {
                let start = n * out_image + co * pixels;
                total += f64::from(super::reduce::sum(&grad_output[start..start + pixels]));
            }
            *g = total as f32;
        });
    }

    // Images are split into at most 8 groups fixed by the batch size; each group sums its
    // images' weight gradients into its own buffer, and the buffers are added in order.
    // Within a group, blocks of `block` images share one GEMM (see images_per_gemm).
    let group = chunk_len(p.batch, 1, 8);
    let block = images_per_gemm(p).min(group);
    let n_groups = p.batch.div_ceil(group);
    let mut partials = vec![0.0f32; n_groups * weight.len()];
    let mut grad_input = grad_input;
    if let (Some(gx), Some(transposed)) = (grad_input.as_deref_mut(), transposed_params(p)) {
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
        .enumerate()
        .for_each(|(g, (mut gx_group, partial))| {
            let (mut col, mut grad_col, mut gy_block) = (Vec::new(), Vec::new(), Vec::new());
            let (mut unfolder, mut scratch) = (Unfolder::new(), Vec::new());
            let first = g * group;
            let last = (first + group).min(p.batch);
            for start in (first..last).step_by(block) {
                if stop.is_set() {
                    return;
                }
                let images = block.min(last - start);
                let n = images * pixels;
                // The block's unfolded images (K × n) and output gradients (C_out × n).
                let (cols, gys): (&[f32], &[f32]) = if images == 1 {
                    let image = &input[start * image_len..(start + 1) * image_len];
                    (
                        unfolded(p, image, &mut col, &mut unfolder),
                        &grad_output[start * out_image..(start + 1) * out_image],
                    )
                } else {
                    col.resize(k * n, 0.0);
                    gy_block.resize(p.out_channels * n, 0.0);
                    for i in 0..images {
                        let image = &input[(start + i) * image_len..(start + i + 1) * image_len];
                        unfolder.im2col(p, image, &mut col[i * pixels..], n);
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
                );
                let Some(gx_group) = gx_group.as_deref_mut() else {
                    continue;
                };
                // Only strided (or over-padded) convolutions get here: the rest took the
                // transposed path above, pointwise ones included.
                let gx_block = &mut gx_group[(start - first) * image_len..][..images * image_len];
                grad_col.resize(k * n, 0.0);
                sgemm(
                    k,
                    n,
                    p.out_channels,
                    &mut grad_col,
                    n,
                    false,
                    MatRef::transposed(weight, k),
                    MatRef::rows(gys, n),
                );
                for (i, gx) in gx_block.chunks_exact_mut(image_len).enumerate() {
                    fold(p, &grad_col[i * pixels..], n, gx, &mut scratch);
                }
            }
        });
    grad_weight.par_iter_mut().enumerate().for_each(|(i, g)| {
        let mut total = 0.0f32;
        for part in partials.chunks_exact(weight.len()) {
            total += part[i];
        }
        *g = total;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct definition of the convolution, for comparison.
    fn naive(p: &Conv2dParams, x: &[f32], w: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; p.output_shape().iter().product()];
        for n in 0..p.batch {
            for co in 0..p.out_channels {
                for oh in 0..p.out_h {
                    for ow in 0..p.out_w {
                        let mut acc = 0.0f64;
                        for c in 0..p.in_channels {
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
                                    let xv = x[((n * p.in_channels + c) * p.in_h + ih as usize)
                                        * p.in_w
                                        + iw as usize];
                                    let wv = w[((co * p.in_channels + c) * p.kernel_h + ki)
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

    fn values(len: usize, salt: u32) -> Vec<f32> {
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
            if shape[1] == 64 {
                assert!(
                    tile_rows(&p) < p.out_h,
                    "the case should span several tiles"
                );
            }
            let x = values(shape.iter().product(), 1);
            let w = values(wshape.iter().product(), 2);
            let mut y = vec![0.0; p.output_shape().iter().product()];
            forward(&p, &x, &w, None, &mut y).unwrap();
            for (a, b) in y.iter().zip(naive(&p, &x, &w)) {
                assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn small_k_fma_path_matches_the_portable_one() {
        if !crate::simd::cpu_has_avx2_fma() {
            return;
        }
        for &(k, pixels, channels) in &[(1, 32, 2), (9, 784, 16), (27, 77, 5), (32, 31, 3)] {
            let weight = values(channels * k, 1);
            let col = values(k * pixels, 2);
            let bias = values(channels, 3);
            let mut portable = vec![0.0f32; channels * pixels];
            small_k_product_portable(&weight, &col, k, pixels, Some(&bias), &mut portable);
            let mut fused = vec![0.0f32; channels * pixels];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: checked above that the CPU has AVX2 and FMA; lengths are exact.
            unsafe {
                small_k_product_fma(&weight, &col, k, pixels, Some(&bias), &mut fused)
            };
            for (i, (a, b)) in portable.iter().zip(&fused).enumerate() {
                let scale: f32 = (0..k)
                    .map(|kk| (weight[i / pixels * k + kk] * col[kk * pixels + i % pixels]).abs())
                    .sum::<f32>()
                    + bias[i / pixels].abs();
                assert!(
                    (a - b).abs() <= 1e-6 * scale.max(1.0),
                    "k {k} element {i}: {a} vs {b}"
                );
            }
        }
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
