//! 2-D max and average pooling (floor mode, dilation 1), forward and backward.
//!
//! Planes (one per image and channel) are independent and run in parallel; a backward
//! writes only its own plane, so every result is independent of the thread count.

use rayon::prelude::*;

use super::{nchw, non_negative_pair, positive_pair, window_output_hw};
use crate::error::{check_len, checked_size, Error, Result};
use crate::parallel::task_items;
use crate::simd_dispatch;

/// PyTorch's rule for pooling: padding at most half the kernel on each axis, rounded down
/// (`padding <= kernel_size // 2`).
pub fn check_padding(kernel: (usize, usize), padding: (usize, usize)) -> Result<()> {
    let most = (kernel.0 / 2, kernel.1 / 2);
    if padding.0 > most.0 || padding.1 > most.1 {
        return Err(Error::invalid(
            "padding",
            pair_text(padding),
            format!(
                "at most kernel_size // 2 = {} (kernel_size {})",
                pair_text(most),
                pair_text(kernel)
            ),
        ));
    }
    Ok(())
}

/// A pair as the user most likely wrote it: `2` when both axes agree, else `(2, 3)`.
fn pair_text(pair: (usize, usize)) -> String {
    if pair.0 == pair.1 {
        pair.0.to_string()
    } else {
        format!("{pair:?}")
    }
}

/// Shapes and hyper-parameters of a pooling, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dParams {
    pub batch: usize,
    pub channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub out_h: usize,
    pub out_w: usize,
}

impl Pool2dParams {
    /// Validate pooling of an (N, C, H, W) input, with PyTorch's rules: padding at most
    /// half the kernel, and at least one output position per axis.
    pub fn new(
        input_shape: &[usize],
        kernel: (i64, i64),
        stride: (i64, i64),
        padding: (i64, i64),
    ) -> Result<Self> {
        let (batch, channels, in_h, in_w) = nchw("input", input_shape)?;
        let kernel = positive_pair("kernel_size", kernel)?;
        let stride = positive_pair("stride", stride)?;
        let padding = non_negative_pair("padding", padding)?;
        check_padding(kernel, padding)?;
        let Some((out_h, out_w)) = window_output_hw((in_h, in_w), kernel, stride, padding, (1, 1))
        else {
            return Err(Error::invalid(
                "kernel_size",
                format!("{kernel:?} on an input of {in_h}×{in_w} padded by {padding:?}"),
                "a window no larger than the padded input",
            ));
        };
        checked_size("output", &[batch, channels, out_h, out_w])?;
        Ok(Pool2dParams {
            batch,
            channels,
            in_h,
            in_w,
            kernel,
            stride,
            padding,
            out_h,
            out_w,
        })
    }

    /// Output shape (N, C, H_out, W_out).
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.channels, self.out_h, self.out_w]
    }

    fn in_plane(&self) -> usize {
        self.in_h * self.in_w
    }

    fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    fn planes(&self) -> usize {
        self.batch * self.channels
    }

    /// Window rows (or columns) of output position `o` along an axis, clipped to the input.
    #[inline]
    fn window(o: usize, stride: usize, pad: usize, kernel: usize, len: usize) -> (usize, usize) {
        let start = (o * stride) as isize - pad as isize;
        let end = (start + kernel as isize).min(len as isize);
        (start.max(0) as usize, end.max(0) as usize)
    }

    /// Divisor of average pooling at (oh, ow), as PyTorch computes it.
    #[inline]
    fn avg_divisor(&self, oh: usize, ow: usize, count_include_pad: bool) -> f32 {
        let (h0, h1) = Self::window(oh, self.stride.0, self.padding.0, self.kernel.0, self.in_h);
        let (w0, w1) = Self::window(ow, self.stride.1, self.padding.1, self.kernel.1, self.in_w);
        if count_include_pad {
            // The window clipped to the padded input (not to the input itself).
            let hs = (oh * self.stride.0) as isize - self.padding.0 as isize;
            let ws = (ow * self.stride.1) as isize - self.padding.1 as isize;
            let he = (hs + self.kernel.0 as isize).min((self.in_h + self.padding.0) as isize);
            let we = (ws + self.kernel.1 as isize).min((self.in_w + self.padding.1) as isize);
            ((he - hs) * (we - ws)) as f32
        } else {
            ((h1 - h0) * (w1 - w0)) as f32
        }
    }
}

/// A 2-D pooling layer as a step or evaluation plan keeps it: max or average, with its
/// window, stride and padding as (height, width), checked on each input it meets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pool2d {
    Max {
        kernel: (i64, i64),
        stride: (i64, i64),
        padding: (i64, i64),
    },
    Avg {
        kernel: (i64, i64),
        stride: (i64, i64),
        padding: (i64, i64),
        count_include_pad: bool,
    },
}

impl Pool2d {
    /// The pooling of an (N, C, H, W) `input_shape`, validated.
    pub fn params(&self, input_shape: &[usize]) -> Result<Pool2dParams> {
        let (Pool2d::Max {
            kernel,
            stride,
            padding,
        }
        | Pool2d::Avg {
            kernel,
            stride,
            padding,
            ..
        }) = *self;
        Pool2dParams::new(input_shape, kernel, stride, padding)
    }

    /// The forward of [`max_forward`] or [`avg_forward`]; a max pool writes each
    /// maximum's index to `indices` if given, an average pool takes none.
    pub fn forward(
        &self,
        p: &Pool2dParams,
        input: &[f32],
        output: &mut [f32],
        indices: Option<&mut [i64]>,
    ) -> Result<()> {
        match *self {
            Pool2d::Max { .. } => max_forward(p, input, output, indices),
            Pool2d::Avg {
                count_include_pad, ..
            } => avg_forward(p, input, count_include_pad, output),
        }
    }
}

/// Whether candidate `v` replaces the running maximum `best`: it is larger, or NaN,
/// unless the maximum is already NaN (the first NaN wins, as the general loop keeps it).
#[inline(always)]
pub(crate) fn replaces(v: f32, best: f32) -> bool {
    (v > best || v.is_nan()) & !best.is_nan()
}

/// Windows per chunk of [`max_pool_2x2_plane`].
const MAX_CHUNK: usize = 256;

simd_dispatch! {
    /// Max pooling of one plane with 2×2 windows, stride 2, no padding (the common case),
    /// with the same tie and NaN rules as the general loop.
    ///
    /// Chunks of up to [`MAX_CHUNK`] windows, in output order across rows: the windows'
    /// four corners and top-left indices are first gathered into arrays, then the selects
    /// (not branches: the comparisons are unpredictable on real data) run as one long loop
    /// giving each maximum and its corner (0 to 3, in window order), then a third loop
    /// turns corners into indices. Window by window, with the 64-bit index among the
    /// selects, LLVM kept the loop scalar at every level and did worse when it
    /// vectorised the 14 windows of a row: 64x32x28x28, 1 thread, wall time (best of 15),
    /// AMD EPYC, loaded: AVX-512 1.57 → 0.41 ms, AVX2 0.98 → 0.63 ms, portable 0.82 →
    /// 0.68 ms.
    pub(crate) fn max_pool_2x2_plane(plane: &[f32], in_w: usize, out: &mut [f32], idx: &mut [i64],
                          out_w: usize) {
        let w = in_w as i64;
        let windows = out.len();
        let mut corners = [[0.0f32; MAX_CHUNK]; 4];
        let mut top_left = [0i64; MAX_CHUNK];
        let mut picked = [0i32; MAX_CHUNK];
        let mut first = 0;
        while first < windows {
            let n = MAX_CHUNK.min(windows - first);
            // The chunk's windows, a row's run of them at a time.
            let mut k = 0;
            while k < n {
                let (oh, ow) = ((first + k) / out_w, (first + k) % out_w);
                let len = (out_w - ow).min(n - k);
                let corner = 2 * oh * in_w + 2 * ow;
                let top = &plane[corner..][..2 * len];
                let bottom = &plane[corner + in_w..][..2 * len];
                let [c0, c1, c2, c3] = &mut corners;
                for ((((t, b), v0), v1), (v2, v3)) in top.chunks_exact(2)
                    .zip(bottom.chunks_exact(2))
                    .zip(c0[k..k + len].iter_mut())
                    .zip(c1[k..k + len].iter_mut())
                    .zip(c2[k..k + len].iter_mut().zip(c3[k..k + len].iter_mut())) {
                    (*v0, *v1, *v2, *v3) = (t[0], t[1], b[0], b[1]);
                }
                for (j, at) in top_left[k..k + len].iter_mut().enumerate() {
                    *at = (corner + 2 * j) as i64;
                }
                k += len;
            }
            let [c0, c1, c2, c3] = &corners;
            for ((((o, p), &v0), &v1), (&v2, &v3)) in out[first..first + n].iter_mut()
                .zip(picked.iter_mut())
                .zip(c0.iter())
                .zip(c1.iter())
                .zip(c2.iter().zip(c3.iter())) {
                let (mut best, mut at) = (v0, 0);
                let take = replaces(v1, best);
                best = if take { v1 } else { best };
                at = if take { 1 } else { at };
                let take = replaces(v2, best);
                best = if take { v2 } else { best };
                at = if take { 2 } else { at };
                let take = replaces(v3, best);
                best = if take { v3 } else { best };
                at = if take { 3 } else { at };
                *o = best;
                *p = at;
            }
            for ((i, &at), &p) in idx[first..first + n].iter_mut().zip(&top_left).zip(&picked) {
                let row = if p >= 2 { at + w } else { at };
                *i = row + i64::from(p & 1);
            }
            first += n;
        }
    }
}

simd_dispatch! {
    /// The input gradient of [`max_pool_2x2_plane`] from its output gradient `gy` and its
    /// input `plane`, without indices: each window's argmax (the same selects) gets
    /// 0.0 + g and the rest 0.0, as [`max_backward`] writes it; rows and columns no window
    /// covers are 0. For a fused backward that keeps no indices.
    ///
    /// The windows' four values are first gathered into four arrays over the whole plane
    /// (`scratch`: at least 5 values per window), so that the selects run as long loops
    /// that vectorise; row by row (7 to 14 windows in a small CNN) they compiled to scalar
    /// code.
    pub(crate) fn max_pool_2x2_plane_backward(plane: &[f32], in_w: usize, gy: &[f32],
                                              out_w: usize, gx: &mut [f32],
                                              scratch: &mut [f32]) {
        let windows = gy.len();
        let (corners, positions) = scratch[..5 * windows].split_at_mut(4 * windows);
        let positions = &mut positions[..windows];
        let (t0, rest) = corners.split_at_mut(windows);
        let (t1, rest) = rest.split_at_mut(windows);
        let (b0, b1) = rest.split_at_mut(windows);
        let rows = |oh: usize| (2 * oh * in_w, (2 * oh + 1) * in_w);
        for oh in 0..windows / out_w {
            let (top, bottom) = rows(oh);
            let (top, bottom) = (&plane[top..top + 2 * out_w], &plane[bottom..bottom + 2 * out_w]);
            let row = oh * out_w..(oh + 1) * out_w;
            for ((((t, b), v0), v1), (v2, v3)) in top.chunks_exact(2)
                .zip(bottom.chunks_exact(2))
                .zip(t0[row.clone()].iter_mut())
                .zip(t1[row.clone()].iter_mut())
                .zip(b0[row.clone()].iter_mut().zip(b1[row].iter_mut())) {
                (*v0, *v1, *v2, *v3) = (t[0], t[1], b[0], b[1]);
            }
        }
        for ((((at, &w0), &w1), &w2), &w3) in
            positions.iter_mut().zip(t0.iter()).zip(t1.iter()).zip(b0.iter()).zip(b1.iter()) {
            let (mut best, mut position) = (w0, 0.0f32);
            let take = replaces(w1, best);
            best = if take { w1 } else { best };
            position = if take { 1.0 } else { position };
            let take = replaces(w2, best);
            best = if take { w2 } else { best };
            position = if take { 2.0 } else { position };
            *at = if replaces(w3, best) { 3.0 } else { position };
        }
        // The corners now receive their gradients.
        for (((((&at, &g), g0), g1), g2), g3) in positions.iter().zip(gy)
            .zip(t0.iter_mut()).zip(t1.iter_mut()).zip(b0.iter_mut()).zip(b1.iter_mut()) {
            let v = 0.0 + g;
            *g0 = if at == 0.0 { v } else { 0.0 };
            *g1 = if at == 1.0 { v } else { 0.0 };
            *g2 = if at == 2.0 { v } else { 0.0 };
            *g3 = if at == 3.0 { v } else { 0.0 };
        }
        gx.fill(0.0);
        for oh in 0..windows / out_w {
            let (top, _) = rows(oh);
            let (g_top, rest) = gx[top..].split_at_mut(in_w);
            let (g_top, g_bottom) = (&mut g_top[..2 * out_w], &mut rest[..2 * out_w]);
            let row = oh * out_w..(oh + 1) * out_w;
            for ((((t, b), &v0), &v1), (&v2, &v3)) in g_top.chunks_exact_mut(2)
                .zip(g_bottom.chunks_exact_mut(2))
                .zip(t0[row.clone()].iter())
                .zip(t1[row.clone()].iter())
                .zip(b0[row.clone()].iter().zip(b1[row].iter())) {
                (t[0], t[1], b[0], b[1]) = (v0, v1, v2, v3);
            }
        }
    }
}

simd_dispatch! {
    /// [`max_pool_2x2_plane`] without the indices (inference), the same values.
    pub(crate) fn max_pool_2x2_plane_values(plane: &[f32], in_w: usize, out: &mut [f32], out_w: usize) {
        for (oh, out_row) in out.chunks_exact_mut(out_w).enumerate() {
            let top = &plane[2 * oh * in_w..2 * oh * in_w + 2 * out_w];
            let bottom = &plane[(2 * oh + 1) * in_w..(2 * oh + 1) * in_w + 2 * out_w];
            for (o, (t, b)) in out_row.iter_mut()
                .zip(top.chunks_exact(2).zip(bottom.chunks_exact(2))) {
                let mut best = t[0];
                best = if replaces(t[1], best) { t[1] } else { best };
                best = if replaces(b[0], best) { b[0] } else { best };
                best = if replaces(b[1], best) { b[1] } else { best };
                *o = best;
            }
        }
    }
}

/// The maximum of output (oh, ow)'s window in `plane` and its flat index: ties keep the
/// first in row-major window order; the first NaN wins. Padding counts as -inf.
fn window_max(p: &Pool2dParams, plane: &[f32], oh: usize, ow: usize) -> (f32, usize) {
    let (h0, h1) = Pool2dParams::window(oh, p.stride.0, p.padding.0, p.kernel.0, p.in_h);
    let (w0, w1) = Pool2dParams::window(ow, p.stride.1, p.padding.1, p.kernel.1, p.in_w);
    let mut best = f32::NEG_INFINITY;
    let mut best_at = h0 * p.in_w + w0;
    for ih in h0..h1 {
        for (iw, &v) in plane[ih * p.in_w..(ih + 1) * p.in_w]
            .iter()
            .enumerate()
            .take(w1)
            .skip(w0)
        {
            if v > best || v.is_nan() {
                best = v;
                best_at = ih * p.in_w + iw;
                if v.is_nan() {
                    return (best, best_at);
                }
            }
        }
    }
    (best, best_at)
}

/// Max pooling; `indices`, if given, receives each maximum's flat index in its input
/// plane. Ties keep the first maximum in row-major window order; NaN propagates.
pub fn max_forward(
    p: &Pool2dParams,
    input: &[f32],
    output: &mut [f32],
    indices: Option<&mut [i64]>,
) -> Result<()> {
    check_len("input", input.len(), p.planes() * p.in_plane())?;
    check_len("output", output.len(), p.planes() * p.out_plane())?;
    let Some(indices) = indices else {
        max_forward_values(p, input, output);
        return Ok(());
    };
    check_len("indices", indices.len(), output.len())?;
    let stop = crate::parallel::stop_token();
    let planes = task_items(p.in_plane());
    output
        .par_chunks_mut(p.out_plane())
        .zip(indices.par_chunks_mut(p.out_plane()))
        .zip(input.par_chunks(p.in_plane()))
        .with_min_len(planes)
        .with_max_len(planes)
        .for_each(|((out, idx), plane)| {
            if stop.is_set() {
                return;
            }
            if is_2x2(p) {
                max_pool_2x2_plane(plane, p.in_w, out, idx, p.out_w);
                return;
            }
            for oh in 0..p.out_h {
                for ow in 0..p.out_w {
                    let (best, best_at) = window_max(p, plane, oh, ow);
                    out[oh * p.out_w + ow] = best;
                    idx[oh * p.out_w + ow] = best_at as i64;
                }
            }
        });
    Ok(())
}

/// Run `f` on each (output plane, input plane) pair in parallel, unless a stop was
/// requested. Planes are the split, so the result does not depend on the thread count.
fn per_plane(
    output: &mut [f32],
    out_plane: usize,
    input: &[f32],
    in_plane: usize,
    f: impl Fn(&mut [f32], &[f32]) + Sync + Send,
) {
    let stop = crate::parallel::stop_token();
    let planes = task_items(out_plane.max(in_plane));
    output
        .par_chunks_mut(out_plane)
        .zip(input.par_chunks(in_plane))
        .with_min_len(planes)
        .with_max_len(planes)
        .for_each(|(out, plane)| {
            if !stop.is_set() {
                f(out, plane);
            }
        });
}

/// [`max_forward`] without indices.
fn max_forward_values(p: &Pool2dParams, input: &[f32], output: &mut [f32]) {
    per_plane(output, p.out_plane(), input, p.in_plane(), |out, plane| {
        if is_2x2(p) {
            max_pool_2x2_plane_values(plane, p.in_w, out, p.out_w);
            return;
        }
        for oh in 0..p.out_h {
            for ow in 0..p.out_w {
                out[oh * p.out_w + ow] = window_max(p, plane, oh, ow).0;
            }
        }
    });
}

/// Input gradient of max pooling: each output gradient is added at its recorded index.
/// Needs only the input and output shapes (N, C, H, W) and (N, C, H_out, W_out).
/// A max-pool backward's grad_output: 4-D, with the N and C of `input_shape`; returns
/// its (H_out, W_out).
pub fn check_max_grad_output(
    input_shape: &[usize],
    grad_output_shape: &[usize],
) -> Result<(usize, usize)> {
    let (n, c, _, _) = nchw("input_shape", input_shape)?;
    let (gn, gc, gh, gw) = nchw("grad_output", grad_output_shape)?;
    if (gn, gc) != (n, c) {
        return Err(Error::invalid(
            "grad_output",
            format!("shape {grad_output_shape:?}"),
            format!("N={n} and C={c}, as input_shape {input_shape:?}"),
        ));
    }
    Ok((gh, gw))
}

/// Max pooling's input gradient from the forward's `indices`. An index outside its plane
/// is an error naming the first such in flat order; `grad_input` is then partly written.
pub fn max_backward(
    input_shape: &[usize],
    grad_output_shape: &[usize],
    grad_output: &[f32],
    indices: &[i64],
    grad_input: &mut [f32],
) -> Result<()> {
    let (n, c, h, w) = nchw("input_shape", input_shape)?;
    let (gh, gw) = check_max_grad_output(input_shape, grad_output_shape)?;
    check_len("grad_output", grad_output.len(), n * c * gh * gw)?;
    check_len("indices", indices.len(), grad_output.len())?;
    check_len("grad_input", grad_input.len(), n * c * h * w)?;
    let plane_len = (h * w) as i64;
    let stop = crate::parallel::stop_token();
    // Each plane checks its indices as it scatters them, in parallel: a serial check
    // beforehand was a tenth of the call on one thread. The first bad index in flat
    // order is the one reported, whichever thread meets it.
    let planes = task_items(h * w);
    let bad = grad_input
        .par_chunks_mut(h * w)
        .zip(grad_output.par_chunks(gh * gw))
        .zip(indices.par_chunks(gh * gw))
        .with_min_len(planes)
        .with_max_len(planes)
        .find_map_first(|((gx, gy), idx)| {
            if stop.is_set() {
                return None;
            }
            gx.fill(0.0);
            for (&g, &i) in gy.iter().zip(idx) {
                if !(0..plane_len).contains(&i) {
                    return Some(i);
                }
                gx[i as usize] += g;
            }
            None
        });
    match bad {
        Some(bad) => Err(Error::invalid(
            "indices",
            format!("index {bad}"),
            format!("flat indices into an H×W plane of {plane_len} elements"),
        )),
        None => Ok(()),
    }
}

/// Output columns of the widest step of [`pool_2x2_mapped`].
pub(crate) const MAPPED_STEP: usize = 16;

/// 2×2, stride-2 pooling of `map(v)` for the values `v` of one plane whose rows start
/// `row_stride` apart, into `out` (rows of `out_w`): [`max_pool_2x2_plane_values`]
/// (`MAX`) or [`avg_pool_2x2_plane`], the same selects and sums on the same values, so
/// the same bits as `map` applied to the plane first and that function after. For a
/// kernel's epilogue (bias and activation as `map`) on an output plane in cache.
///
/// Each step reads `STEP` windows (`PAIRS` = 2·`STEP` values) from both rows of a pair,
/// also past a row's last window: `plane` must hold `(2·out_h - 1)·row_stride + 2·out_w`
/// rounded up to whole steps of `PAIRS` values; the extra values go through `map`
/// (their results are dropped, whatever they are). The `out_h`·`out_w` outputs go to the
/// start of `out`; each step stores whole, also past its row, where the next row's
/// steps store over it, and past the last row if `out` is longer (a caller's next
/// plane, written after this one): a short copy of a variable length would be a call
/// to memcpy, here only where `out` ends.
/// One 2×2 window's maximum (`MAX`) or average from its corners in window order (top
/// left, top right, bottom left, bottom right). The maximum is each row's winner, then the
/// winner of the two: the window-order scan's value (the largest, the first of equal ones,
/// the first NaN), with two selects in a row instead of three. The average sums from 0.0
/// in window order, as the general loop.
#[inline(always)]
pub(crate) fn pool_window<const MAX: bool>(t0: f32, t1: f32, b0: f32, b1: f32) -> f32 {
    if MAX {
        let top = if replaces(t1, t0) { t1 } else { t0 };
        let bottom = if replaces(b1, b0) { b1 } else { b0 };
        if replaces(bottom, top) {
            bottom
        } else {
            top
        }
    } else {
        (0.0 + t0 + t1 + b0 + b1) / 4.0
    }
}

#[inline(always)]
pub(crate) fn pool_2x2_mapped<const MAX: bool, const STEP: usize, const PAIRS: usize>(
    plane: &[f32],
    row_stride: usize,
    out: &mut [f32],
    (out_h, out_w): (usize, usize),
    map: impl Fn(f32) -> f32,
) {
    const { assert!(PAIRS == 2 * STEP && STEP <= MAPPED_STEP) };
    assert!(
        out.len() >= out_h * out_w,
        "pool_2x2_mapped: output too short"
    );
    for oh in 0..out_h {
        let top_row = 2 * oh * row_stride;
        let mut ow = 0;
        while ow < out_w {
            let top: &[f32; PAIRS] = plane[top_row + 2 * ow..][..PAIRS]
                .try_into()
                .expect("a step of the top row");
            let bottom: &[f32; PAIRS] = plane[top_row + row_stride + 2 * ow..][..PAIRS]
                .try_into()
                .expect("a step of the bottom row");
            let mut pooled = [0.0f32; STEP];
            for (i, o) in pooled.iter_mut().enumerate() {
                let (t0, t1) = (map(top[2 * i]), map(top[2 * i + 1]));
                let (b0, b1) = (map(bottom[2 * i]), map(bottom[2 * i + 1]));
                *o = pool_window::<MAX>(t0, t1, b0, b1);
            }
            let at = oh * out_w + ow;
            match out.get_mut(at..at + STEP) {
                Some(whole) => whole.copy_from_slice(&pooled),
                None => {
                    let n = STEP.min(out_w - ow);
                    out[at..at + n].copy_from_slice(&pooled[..n]);
                }
            }
            ow += STEP;
        }
    }
}

simd_dispatch! {
    /// Average pooling of one plane with 2×2 windows, stride 2, no padding: the general
    /// loop's sum order (from 0.0, row-major) and divisor, so the same values.
    pub(crate) fn avg_pool_2x2_plane(plane: &[f32], in_w: usize, out: &mut [f32], out_w: usize) {
        for (oh, out_row) in out.chunks_exact_mut(out_w).enumerate() {
            let top = &plane[2 * oh * in_w..2 * oh * in_w + 2 * out_w];
            let bottom = &plane[(2 * oh + 1) * in_w..(2 * oh + 1) * in_w + 2 * out_w];
            for (o, (t, b)) in out_row.iter_mut()
                .zip(top.chunks_exact(2).zip(bottom.chunks_exact(2))) {
                *o = (0.0 + t[0] + t[1] + b[0] + b[1]) / 4.0;
            }
        }
    }
}

simd_dispatch! {
    /// Input gradient of [`avg_pool_2x2_plane`]: each window gets 0.0 + g/4, as the
    /// general loop adds it to a zeroed gradient; rows and columns no window covers are 0.
    pub(crate) fn avg_pool_2x2_plane_backward(gy: &[f32], out_w: usize, gx: &mut [f32], in_w: usize) {
        gx.fill(0.0);
        for (oh, gy_row) in gy.chunks_exact(out_w).enumerate() {
            let (top, rest) = gx[2 * oh * in_w..].split_at_mut(in_w);
            let bottom = &mut rest[..in_w];
            for ((&g, t), b) in gy_row.iter()
                .zip(top[..2 * out_w].chunks_exact_mut(2))
                .zip(bottom[..2 * out_w].chunks_exact_mut(2)) {
                let v = 0.0 + g / 4.0;
                t[0] = v;
                t[1] = v;
                b[0] = v;
                b[1] = v;
            }
        }
    }
}

/// Whether pooling uses the 2×2, stride 2, unpadded fast paths.
fn is_2x2(p: &Pool2dParams) -> bool {
    p.kernel == (2, 2) && p.stride == (2, 2) && p.padding == (0, 0)
}

/// Average pooling.
pub fn avg_forward(
    p: &Pool2dParams,
    input: &[f32],
    count_include_pad: bool,
    output: &mut [f32],
) -> Result<()> {
    check_len("input", input.len(), p.planes() * p.in_plane())?;
    check_len("output", output.len(), p.planes() * p.out_plane())?;
    per_plane(output, p.out_plane(), input, p.in_plane(), |out, plane| {
        if is_2x2(p) {
            avg_pool_2x2_plane(plane, p.in_w, out, p.out_w);
            return;
        }
        for oh in 0..p.out_h {
            let (h0, h1) = Pool2dParams::window(oh, p.stride.0, p.padding.0, p.kernel.0, p.in_h);
            for ow in 0..p.out_w {
                let (w0, w1) =
                    Pool2dParams::window(ow, p.stride.1, p.padding.1, p.kernel.1, p.in_w);
                let mut total = 0.0f32;
                for ih in h0..h1 {
                    for &v in &plane[ih * p.in_w + w0..ih * p.in_w + w1] {
                        total += v;
                    }
                }
                out[oh * p.out_w + ow] = total / p.avg_divisor(oh, ow, count_include_pad);
            }
        }
    });
    Ok(())
}

/// Input gradient of average pooling; overlapping windows accumulate.
pub fn avg_backward(
    p: &Pool2dParams,
    grad_output: &[f32],
    count_include_pad: bool,
    grad_input: &mut [f32],
) -> Result<()> {
    check_len("grad_output", grad_output.len(), p.planes() * p.out_plane())?;
    check_len("grad_input", grad_input.len(), p.planes() * p.in_plane())?;
    per_plane(
        grad_input,
        p.in_plane(),
        grad_output,
        p.out_plane(),
        |gx, gy| {
            if is_2x2(p) {
                avg_pool_2x2_plane_backward(gy, p.out_w, gx, p.in_w);
                return;
            }
            gx.fill(0.0);
            for oh in 0..p.out_h {
                let (h0, h1) =
                    Pool2dParams::window(oh, p.stride.0, p.padding.0, p.kernel.0, p.in_h);
                for ow in 0..p.out_w {
                    let (w0, w1) =
                        Pool2dParams::window(ow, p.stride.1, p.padding.1, p.kernel.1, p.in_w);
                    let g = gy[oh * p.out_w + ow] / p.avg_divisor(oh, ow, count_include_pad);
                    for ih in h0..h1 {
                        for v in &mut gx[ih * p.in_w + w0..ih * p.in_w + w1] {
                            *v += g;
                        }
                    }
                }
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::activation::Activation;

    #[test]
    fn max_pool_2x2_picks_window_maxima_and_routes_gradients() {
        let p = Pool2dParams::new(&[1, 1, 2, 4], (2, 2), (2, 2), (0, 0)).unwrap();
        let x = [1.0, 5.0, 2.0, 2.0, 3.0, 4.0, 7.0, 0.0];
        let (mut y, mut idx) = ([0.0; 2], [0i64; 2]);
        max_forward(&p, &x, &mut y, Some(&mut idx)).unwrap();
        assert_eq!(y, [5.0, 7.0]);
        assert_eq!(idx, [1, 6]);
        let mut gx = [9.0; 8];
        max_backward(&[1, 1, 2, 4], &p.output_shape(), &[1.0, 2.0], &idx, &mut gx).unwrap();
        assert_eq!(gx, [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0]);
    }

    #[test]
    fn the_first_bad_index_in_flat_order_is_reported_at_any_thread_count() {
        // 512 planes, so that the scatter runs in several tasks; a bad index late in the
        // last plane and another in an early one: the early one is named.
        let (shape, out_shape) = ([64, 8, 2, 2], [64, 8, 1, 1]);
        let mut indices = vec![0i64; 512];
        indices[511] = -1;
        indices[37] = 4;
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut gx = vec![0.0; 2048];
            let err = pool
                .install(|| max_backward(&shape, &out_shape, &[1.0; 512], &indices, &mut gx))
                .unwrap_err();
            assert!(
                err.to_string().ends_with("got index 4"),
                "{threads} threads: {err}"
            );
        }
    }

    #[test]
    fn index_free_2x2_backward_routes_as_the_indices_do() {
        // Ties, signed zeros and NaNs in every window position; odd H and W.
        let (in_h, in_w) = (5, 7);
        let pick = [0.0f32, -0.0, 1.0, 1.0, f32::NAN, -2.0, 3.0];
        let plane: Vec<f32> = (0..in_h * in_w)
            .map(|i| pick[(i * 5 + i / 3) % 7])
            .collect();
        let (out_h, out_w) = (in_h / 2, in_w / 2);
        let gy: Vec<f32> = (0..out_h * out_w).map(|i| i as f32 - 2.5).collect();
        let (mut y, mut idx) = (vec![0.0; gy.len()], vec![0i64; gy.len()]);
        max_pool_2x2_plane(&plane, in_w, &mut y, &mut idx, out_w);
        let mut expected = vec![0.0f32; plane.len()];
        for (&g, &i) in gy.iter().zip(&idx) {
            expected[i as usize] += g;
        }
        let mut routed = vec![9.0f32; plane.len()];
        let mut scratch = vec![0.0f32; 5 * gy.len()];
        max_pool_2x2_plane_backward(&plane, in_w, &gy, out_w, &mut routed, &mut scratch);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&routed), bits(&expected));
    }

    #[test]
    fn mapped_2x2_pool_gives_the_bits_of_map_then_the_plane_functions() {
        // Every window of four drawn from these values (ties, signed zeros, two NaN
        // payloads, infinities) over a few planes, with rows `stride` apart (columns past
        // the windows hold other values) and a map that makes ties and zeros of its own.
        let pick = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::NAN,
            f32::from_bits(0x7fc0_0001),
            f32::INFINITY,
            f32::NEG_INFINITY,
            2.5,
        ];
        let windows: Vec<[f32; 4]> = (0..pick.len().pow(4))
            .map(|i| {
                let digit = |k: u32| pick[i / pick.len().pow(k) % pick.len()];
                [digit(0), digit(1), digit(2), digit(3)]
            })
            .collect();
        type Map = (&'static str, fn(f32) -> f32);
        let maps: [Map; 3] = [
            ("identity", |v| v),
            ("relu of v - 1", |v| Activation::Relu.value(v - 1.0)),
            ("tanh", f32::tanh),
        ];
        for (out_h, out_w, extra) in [
            (1usize, 1usize, 0usize),
            (3, 5, 1),
            (7, 14, 2),
            (2, 17, 3),
            (4, 33, 0),
        ] {
            let stride = 2 * out_w + extra;
            let needed = (2 * out_h - 1) * stride + (2 * out_w).next_multiple_of(32);
            for (first, chunk) in windows.chunks(out_h * out_w).enumerate().take(40) {
                let mut plane: Vec<f32> = (0..needed.max(2 * out_h * stride))
                    .map(|i| pick[(i + first) % pick.len()] + 0.5)
                    .collect();
                for (k, window) in chunk.iter().enumerate() {
                    let (oh, ow) = (k / out_w, k % out_w);
                    let at = 2 * oh * stride + 2 * ow;
                    plane[at..at + 2].copy_from_slice(&window[..2]);
                    plane[at + stride..at + stride + 2].copy_from_slice(&window[2..]);
                }
                let out_len = chunk.len() / out_w * out_w;
                if out_len == 0 {
                    continue;
                }
                let shape = (out_len / out_w, out_w);
                for (name, map) in maps {
                    let mapped: Vec<f32> = plane.iter().map(|&v| map(v)).collect();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    let (mut expected, mut actual) = (vec![0.0; out_len], vec![9.0; out_len]);
                    max_pool_2x2_plane_values(&mapped, stride, &mut expected, out_w);
                    pool_2x2_mapped::<true, 16, 32>(&plane, stride, &mut actual, shape, map);
                    let mut narrow = vec![9.0; out_len];
                    pool_2x2_mapped::<true, 8, 16>(&plane, stride, &mut narrow, shape, map);
                    assert_eq!(
                        bits(&narrow),
                        bits(&expected),
                        "max 8 {name} {out_w} {first}"
                    );
                    assert_eq!(bits(&actual), bits(&expected), "max {name} {out_w} {first}");
                    avg_pool_2x2_plane(&mapped, stride, &mut expected, out_w);
                    pool_2x2_mapped::<false, 16, 32>(&plane, stride, &mut actual, shape, map);
                    // A sum of two NaNs has either's payload, as the compiler orders the
                    // operands (LLVM leaves it open): NaN is compared as NaN.
                    let nan_as_one = |v: &[f32]| {
                        v.iter()
                            .map(|f| if f.is_nan() { u32::MAX } else { f.to_bits() })
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(
                        nan_as_one(&actual),
                        nan_as_one(&expected),
                        "avg {name} {out_w} {first}"
                    );
                }
            }
        }
    }

    #[test]
    fn padding_above_half_the_kernel_is_rejected() {
        let err = Pool2dParams::new(&[1, 1, 4, 4], (2, 2), (2, 2), (2, 2));
        assert!(matches!(err, Err(Error::Invalid { arg: "padding", .. })));
    }

    #[test]
    fn padding_message_states_the_limit_and_the_value() {
        let message = |kernel, padding| check_padding(kernel, padding).unwrap_err().to_string();
        assert_eq!(
            message((2, 2), (2, 2)),
            "padding: expected at most kernel_size // 2 = 1 (kernel_size 2), got 2"
        );
        assert_eq!(
            message((2, 5), (1, 3)),
            "padding: expected at most kernel_size // 2 = (1, 2) (kernel_size (2, 5)), got (1, 3)"
        );
    }
}
