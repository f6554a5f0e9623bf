//! Unfolding an image into the rows a convolution's GEMM reads (im2col), and folding
//! such rows back onto an image, adding overlaps (col2im).

use std::ops::Range;

use super::Conv2dParams;
use crate::kernels::valid_range;

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
pub(super) struct Unfolder {
    padded: Vec<f32>,
}

impl Unfolder {
    pub(super) fn new() -> Self {
        Unfolder { padded: Vec::new() }
    }

    /// The image as unfolded rows read it: the padded copy (borders zero), the image
    /// itself when there is no padding, or `None` when rows test their bounds instead.
    pub(super) fn source<'a>(
        &'a mut self,
        p: &Conv2dParams,
        image: &'a [f32],
    ) -> Option<&'a [f32]> {
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
    pub(super) fn im2col(&mut self, p: &Conv2dParams, image: &[f32], col: &mut [f32], ld: usize) {
        let src = self.source(p, image);
        unfold(p, src, image, 0..p.out_h, col, ld);
    }
}

/// [`im2col`] of output rows `rows`, from `src` ([`Unfolder::source`]) when it is given.
pub(super) fn unfold(
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
pub(super) fn fold(
    p: &Conv2dParams,
    col: &[f32],
    ld: usize,
    gx: &mut [f32],
    scratch: &mut Vec<f32>,
) {
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
