//! Unfolding an image into the rows a convolution's GEMM reads (im2col), and folding
//! such rows back onto an image, adding overlaps (col2im).

use std::ops::Range;

use super::plan::Unfolding;
use super::Conv2dParams;
use crate::error::Result;
use crate::kernels::valid_range;
use crate::memory::resize_scratch;

const PADDED_INPUT: &str = "conv2d: the zero-padded copy of an input image";
const PADDED_GRAD: &str = "conv2d backward: the zero-padded input gradient of an image";

/// Copy `src` to `dst` (same length): eight lanes at a time and an overlapping last eight,
/// so that the short rows of small images do not pay for a call to memcpy.
#[inline(always)]
pub(super) fn copy_row(dst: &mut [f32], src: &[f32]) {
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
pub(super) fn interior_rows(p: &Conv2dParams) -> impl Iterator<Item = (usize, usize)> + '_ {
    let (hp, wp) = p.padded_size();
    (0..p.in_channels).flat_map(move |c| {
        (0..p.in_h).map(move |h| {
            (
                (c * p.in_h + h) * p.in_w,
                c * hp * wp + (h + p.padding.0) * wp + p.padding.1,
            )
        })
    })
}

/// The image that unfolded rows read from or fold onto, as far as windows go: the image
/// itself, where windows may reach into the padding (bounds tested, padding reads as
/// zero), or its zero-padded copy (or an image without padding), which every window
/// lies inside.
#[derive(Clone, Copy)]
struct Frame {
    h: usize,
    w: usize,
    padding: (usize, usize),
}

impl Frame {
    fn image(p: &Conv2dParams) -> Self {
        Frame {
            h: p.in_h,
            w: p.in_w,
            padding: p.padding,
        }
    }

    fn padded(p: &Conv2dParams) -> Self {
        let (h, w) = p.padded_size();
        Frame {
            h,
            w,
            padding: (0, 0),
        }
    }
}

/// The output positions in `0..n_out` whose window pixel `reach` (kernel index ×
/// dilation) lies inside a frame axis of length `len` padded by `pad`.
#[inline(always)]
fn inside(reach: usize, pad: usize, stride: usize, len: usize, n_out: usize) -> (usize, usize) {
    if pad == 0 {
        // The output length is computed so that every window fits an unpadded axis.
        (0, n_out)
    } else {
        valid_range(reach as isize - pad as isize, stride, len, n_out)
    }
}

/// What moves between unfolded entries and the image pixels they hold.
trait Transfer {
    /// Unfolded entries `col[col_at..col_at + len]` and the image pixels from `image_at`,
    /// every `stride`th.
    fn stretch(&mut self, col_at: usize, image_at: usize, len: usize);
    /// Unfolded entries `col` whose window pixel lies in the padding.
    fn padding(&mut self, col: Range<usize>);
}

/// im2col: copy image pixels into the unfolded rows, padding as zero.
struct Unfold<'a> {
    image: &'a [f32],
    col: &'a mut [f32],
    stride: usize,
}

impl Transfer for Unfold<'_> {
    #[inline(always)]
    fn stretch(&mut self, col_at: usize, image_at: usize, len: usize) {
        let dst = &mut self.col[col_at..col_at + len];
        if self.stride == 1 {
            copy_row(dst, &self.image[image_at..image_at + len]);
        } else {
            for (o, v) in dst
                .iter_mut()
                .zip(self.image[image_at..].iter().step_by(self.stride))
            {
                *o = *v;
            }
        }
    }

    #[inline(always)]
    fn padding(&mut self, col: Range<usize>) {
        self.col[col].fill(0.0);
    }
}

/// col2im: add the unfolded rows onto the image pixels they came from.
struct Fold<'a> {
    col: &'a [f32],
    image: &'a mut [f32],
    stride: usize,
}

impl Transfer for Fold<'_> {
    #[inline(always)]
    fn stretch(&mut self, col_at: usize, image_at: usize, len: usize) {
        let src = &self.col[col_at..col_at + len];
        if self.stride == 1 {
            for (d, s) in self.image[image_at..image_at + len].iter_mut().zip(src) {
                *d += *s;
            }
        } else {
            for (d, s) in self.image[image_at..]
                .iter_mut()
                .step_by(self.stride)
                .zip(src)
            {
                *d += *s;
            }
        }
    }

    #[inline(always)]
    fn padding(&mut self, _col: Range<usize>) {}
}

/// The loop of unfolding and folding, written once: unfolded row r (channel, kernel row,
/// kernel column) starts at `col[r * ld]` and holds the pixels of output rows `rows`;
/// for each, the stretch of output columns whose window pixel lies inside `frame` goes
/// to [`Transfer::stretch`], the rest to [`Transfer::padding`]. Folding adds
/// overlapping entries in this order (channel, kernel row, kernel column, output row,
/// output column), which fixes the bits of its result.
#[inline(always)]
fn walk(
    p: &Conv2dParams,
    frame: Frame,
    rows: Range<usize>,
    ld: usize,
    transfer: &mut impl Transfer,
) {
    if frame.padding == (0, 0) {
        walk_frame::<false>(p, frame, rows, ld, transfer);
    } else {
        walk_frame::<true>(p, frame, rows, ld, transfer);
    }
}

/// [`walk`], with the bounds tests compiled out when `BOUNDED` is false (a frame without
/// padding, which every window lies inside): the per-row tests cost a few cycles next
/// to copies of a dozen pixels, and left in they measured 1.1-1.3× the CPU time of
/// LeNet-sized convolutions, forward and backward (1 thread, AVX-512 EPYC).
#[inline(always)]
fn walk_frame<const BOUNDED: bool>(
    p: &Conv2dParams,
    frame: Frame,
    rows: Range<usize>,
    ld: usize,
    transfer: &mut impl Transfer,
) {
    let (out_w, width) = (p.out_w, rows.len() * p.out_w);
    let plane = frame.h * frame.w;
    let mut row_start = 0;
    for c in 0..p.in_channels {
        for ki in 0..p.kernel_h {
            let reach = ki * p.dilation.0;
            let (oh_lo, oh_hi) = if BOUNDED {
                let (lo, hi) = inside(reach, frame.padding.0, p.stride.0, frame.h, p.out_h);
                (
                    lo.clamp(rows.start, rows.end),
                    hi.clamp(rows.start, rows.end),
                )
            } else {
                (rows.start, rows.end)
            };
            let row_offset = reach as isize - frame.padding.0 as isize;
            for kj in 0..p.kernel_w {
                let start = row_start;
                row_start += ld;
                let reach = kj * p.dilation.1;
                let (ow_lo, ow_hi) = if BOUNDED {
                    inside(reach, frame.padding.1, p.stride.1, frame.w, out_w)
                } else {
                    (0, out_w)
                };
                let first_w = ((ow_lo * p.stride.1) as isize + reach as isize
                    - frame.padding.1 as isize) as usize;
                if BOUNDED {
                    if oh_lo > rows.start {
                        transfer.padding(start..start + (oh_lo - rows.start) * out_w);
                    }
                    let tail = (oh_hi - rows.start) * out_w;
                    if tail < width {
                        transfer.padding(start + tail..start + width);
                    }
                }
                for oh in oh_lo..oh_hi {
                    let at = start + (oh - rows.start) * out_w;
                    if BOUNDED {
                        if ow_lo > 0 {
                            transfer.padding(at..at + ow_lo);
                        }
                        if ow_hi < out_w {
                            transfer.padding(at + ow_hi..at + out_w);
                        }
                        if ow_lo == ow_hi {
                            continue;
                        }
                    }
                    let ih = ((oh * p.stride.0) as isize + row_offset) as usize;
                    transfer.stretch(
                        at + ow_lo,
                        c * plane + ih * frame.w + first_w,
                        ow_hi - ow_lo,
                    );
                }
            }
        }
    }
}

/// An image as unfolded rows read it, and its [`Frame`].
#[derive(Clone, Copy)]
pub(super) struct Source<'a> {
    data: &'a [f32],
    frame: Frame,
}

/// Images unfolded for the GEMM as the plan's [`Unfolding`] says.
pub(super) struct Unfolder {
    unfolding: Unfolding,
    padded: Vec<f32>,
}

impl Unfolder {
    pub(super) fn new(unfolding: Unfolding) -> Self {
        Unfolder {
            unfolding,
            padded: Vec::new(),
        }
    }

    /// The image as unfolded rows read it: the padded copy (borders zero) for
    /// [`Unfolding::PaddedCopy`], else the image itself.
    pub(super) fn source<'a>(
        &'a mut self,
        p: &Conv2dParams,
        image: &'a [f32],
    ) -> Result<Source<'a>> {
        if self.unfolding != Unfolding::PaddedCopy {
            return Ok(Source {
                data: image,
                frame: Frame::image(p),
            });
        }
        let (hp, wp) = p.padded_size();
        let len = p.in_channels * hp * wp;
        if self.padded.len() != len {
            // Only interiors are written below, so the borders stay zero from here on.
            self.padded.clear();
            resize_scratch(&mut self.padded, len, PADDED_INPUT)?;
        }
        for (row, padded_row) in interior_rows(p) {
            copy_row(
                &mut self.padded[padded_row..padded_row + p.in_w],
                &image[row..row + p.in_w],
            );
        }
        Ok(Source {
            data: &self.padded,
            frame: Frame::padded(p),
        })
    }

    /// [`unfold`] of all output rows of `image` into `col` (row r at `col[r * ld]`).
    pub(super) fn im2col(
        &mut self,
        p: &Conv2dParams,
        image: &[f32],
        col: &mut [f32],
        ld: usize,
    ) -> Result<()> {
        let src = self.source(p, image)?;
        unfold(p, src, 0..p.out_h, col, ld);
        Ok(())
    }
}

/// Unfold output rows `rows` of one image `src` (C_in, H, W) into `col`: K rows, each
/// holding those output rows' pixels, row r starting at `col[r * ld]` (`ld` >= their
/// count, so several images can sit side by side). Padding reads as zero.
pub(super) fn unfold(
    p: &Conv2dParams,
    src: Source,
    rows: Range<usize>,
    col: &mut [f32],
    ld: usize,
) {
    let mut transfer = Unfold {
        image: src.data,
        col,
        stride: p.stride.1,
    };
    walk(p, src.frame, rows, ld, &mut transfer);
}

/// Fold `col` (all output rows, row r at `col[r * ld]`) onto one image's gradient `gx`,
/// adding overlapping entries and overwriting `gx`: through a zero-padded buffer
/// `scratch` for [`Unfolding::PaddedCopy`].
pub(super) fn fold(
    p: &Conv2dParams,
    unfolding: Unfolding,
    col: &[f32],
    ld: usize,
    gx: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<()> {
    let mut folding = Folding::begin(p, unfolding, gx, scratch)?;
    folding.add(col, ld, 0..p.out_h);
    folding.finish();
    Ok(())
}

/// [`fold`] tile by tile: [`Folding::begin`], [`Folding::add`] for each tile of output
/// rows, [`Folding::finish`].
pub(super) struct Folding<'a> {
    p: &'a Conv2dParams,
    padded: bool,
    gx: &'a mut [f32],
    scratch: &'a mut Vec<f32>,
}

impl<'a> Folding<'a> {
    pub(super) fn begin(
        p: &'a Conv2dParams,
        unfolding: Unfolding,
        gx: &'a mut [f32],
        scratch: &'a mut Vec<f32>,
    ) -> Result<Self> {
        let padded = unfolding == Unfolding::PaddedCopy;
        if padded {
            let (hp, wp) = p.padded_size();
            scratch.clear();
            resize_scratch(scratch, p.in_channels * hp * wp, PADDED_GRAD)?;
        } else {
            gx.fill(0.0);
        }
        Ok(Folding {
            p,
            padded,
            gx,
            scratch,
        })
    }

    /// Add `col` (output rows `rows`, row r at `col[r * ld]`) onto the gradient.
    pub(super) fn add(&mut self, col: &[f32], ld: usize, rows: Range<usize>) {
        let p = self.p;
        let (frame, image) = if self.padded {
            (Frame::padded(p), &mut self.scratch[..])
        } else {
            (Frame::image(p), &mut self.gx[..])
        };
        let mut transfer = Fold {
            col,
            image,
            stride: p.stride.1,
        };
        walk(p, frame, rows, ld, &mut transfer);
    }

    pub(super) fn finish(self) {
        if !self.padded {
            return;
        }
        for (row, padded_row) in interior_rows(self.p) {
            copy_row(
                &mut self.gx[row..row + self.p.in_w],
                &self.scratch[padded_row..padded_row + self.p.in_w],
            );
        }
    }
}
