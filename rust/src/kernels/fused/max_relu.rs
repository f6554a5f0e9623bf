//! One plane of the fused block's normalise → ReLU (or leaky ReLU) → 2×2 max pool: the
//! forward's pooled values, and the backward's gradient before the batch norm (pass 1)
//! from the pooled gradient.
//!
//! The portable stages of the block run each stage over the whole plane (normalised plane,
//! activated copy, the windows' corners gathered into four arrays, the pool's gradient, the
//! activation's derivative): six passes over the plane's scratch. Here a step takes
//! [`STEP`] windows (two half steps of [`HALF`], from one row pair or, on narrow rows, from
//! two) through every stage at once, in fixed-size arrays: one body under
//! [`simd_dispatch!`] that LLVM vectorises at each level (the even/odd split of a row's
//! values and the interleave back are register shuffles). The AVX-512 level keeps its
//! hand-written kernels ([`super::max_relu_avx512`]): this body built for AVX-512 ran
//! LeNet's two blocks about 12% slower (CPU time, forward and backward).
//!
//! Each value gets the portable stages' arithmetic (subtract, multiply, add without
//! fusing; the same selects in the same order, the first NaN and the first of equal values
//! winning; `0.0 + g` routed to the window's maximum; the derivative from the normalised
//! value), so the same bits at every level.
//!
//! The training forward may also keep each window's outcome as one byte ([`code`]: the
//! corner the pool took and which corners' normalised values are above zero): the backward
//! then routes the gradient from the bytes ([`backward_from_codes`]) instead of normalising
//! the plane and scanning its windows again, with the same selects on the same values, so
//! the same bits.

use crate::kernels::activation::Activation;
use crate::kernels::pool::replaces;
use crate::simd_dispatch;

/// The activation before the pool: ReLU, or leaky ReLU with its slope.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Rectifier {
    Relu,
    Leaky(f32),
}

impl Rectifier {
    /// The slope the gradient takes at or below zero (ReLU's derivative is `g·0.0` there).
    pub(super) fn slope(self) -> f32 {
        match self {
            Rectifier::Relu => 0.0,
            Rectifier::Leaky(slope) => slope,
        }
    }
}

/// The plane's normalisation `(x - mean)·scale + shift` and its rectifier.
#[derive(Clone, Copy, Debug)]
pub(super) struct PlaneMap {
    pub mean: f32,
    pub scale: f32,
    pub shift: f32,
    pub rectifier: Rectifier,
}

impl PlaneMap {
    /// The batch norm's normalised value, as `plane_normalise` computes it.
    #[inline(always)]
    fn normalise(&self, v: f32) -> f32 {
        (v - self.mean) * self.scale + self.shift
    }
}

/// Check the plane's shapes: `h×w` input values, `(h/2)×(w/2)` pooled ones. Returns
/// `(h/2, w/2)`.
pub(super) fn check(plane: &[f32], w: usize, pooled: &[f32]) -> (usize, usize) {
    let (h, out_w) = (plane.len() / w.max(1), w / 2);
    assert!(
        w >= 2 && h >= 2 && plane.len() == h * w && pooled.len() == (h / 2) * out_w,
        "max_relu: a plane of {} values, width {w}, pooled to {}",
        plane.len(),
        pooled.len()
    );
    (h / 2, out_w)
}

/// No window covers the last column of an odd width or the last row of an odd height:
/// their gradient is a zero gradient through the rectifier's derivative.
pub(super) fn uncovered_grad(x: &[f32], w: usize, map: &PlaneMap, grad_input: &mut [f32]) {
    let slope = map.rectifier.slope();
    let uncovered = |v: f32| {
        if map.normalise(v) > 0.0 {
            0.0
        } else {
            0.0 * slope
        }
    };
    let h = x.len() / w;
    if w % 2 == 1 {
        for row in 0..h - h % 2 {
            let i = row * w + w - 1;
            grad_input[i] = uncovered(x[i]);
        }
    }
    if h % 2 == 1 {
        let last = x.len() - w;
        for (g, &v) in grad_input[last..].iter_mut().zip(&x[last..]) {
            *g = uncovered(v);
        }
    }
}

/// Windows per half step: a half step takes 4 windows of a row pair (8 values of each
/// row, one AVX2 vector); a step takes two, from the same row pair or, on rows of fewer
/// than 8 windows, from two (LeNet's second block pools 14-wide planes to 7), so that its
/// 16 values a row fill two vectors either way. Rows of fewer windows (planes under 8
/// wide) take the portable stages instead.
const HALF: usize = 4;

/// Windows per step.
const STEP: usize = 2 * HALF;

/// Whether the kernels take planes of width `w` at the level in use.
pub(super) fn takes(w: usize) -> bool {
    w / 2 >= HALF || avx512()
}

/// Whether the level in use is AVX-512, where [`super::max_relu_avx512`] runs the planes.
fn avx512() -> bool {
    cfg!(target_arch = "x86_64") && crate::simd::level() == crate::simd::Level::Avx512
}

/// The steps covering a plane of width `w` with `out_h`×`out_w` windows (`out_w >= HALF`),
/// as two half steps `(top, pooled_at)` each: the half step's top row starts at value `top`
/// of the plane and its first window is pooled value `pooled_at`. Rows of at least `STEP`
/// windows take steps of consecutive windows, the row's last step moved back to end at its
/// last window; narrower rows take half steps (the last moved back likewise), two a step,
/// an odd last one paired with itself. Windows computed twice give the same bits, so every
/// step is whole. An iterator rather than a closure per step, so that the step's body is
/// compiled into the caller with its level's target features.
#[inline(always)]
fn steps(w: usize, out_h: usize, out_w: usize) -> impl Iterator<Item = [(usize, usize); 2]> {
    let half = move |oh: usize, first: usize| (2 * oh * w + 2 * first, oh * out_w + first);
    let wide = out_w >= STEP;
    let (per_row, unit) = if wide {
        (out_w.div_ceil(STEP), STEP)
    } else {
        (out_w.div_ceil(HALF), HALF)
    };
    let mut units = (0..out_h)
        .flat_map(move |oh| (0..per_row).map(move |k| (oh, (k * unit).min(out_w - unit))));
    std::iter::from_fn(move || {
        let (oh, first) = units.next()?;
        if wide {
            return Some([half(oh, first), half(oh, first + HALF)]);
        }
        let second = units
            .next()
            .map_or(half(oh, first), |(oh, first)| half(oh, first));
        Some([half(oh, first), second])
    })
}

/// A step's `2·STEP` values of one row (`down` = 0) or the row below (`down` = w): each
/// half step's `STEP` values from its `top`.
#[inline(always)]
fn row_values(plane: &[f32], halves: &[(usize, usize); 2], down: usize) -> [f32; 2 * STEP] {
    let mut values = [0.0; 2 * STEP];
    for (values, &(top, _)) in values.chunks_exact_mut(STEP).zip(halves) {
        for (v, &x) in values.iter_mut().zip(&plane[top + down..top + down + STEP]) {
            *v = x;
        }
    }
    values
}

/// The rectifier, leaky ReLU (`LEAKY`, with `slope`) or ReLU, as the activation computes it.
#[inline(always)]
fn rectify<const LEAKY: bool>(z: f32, slope: f32) -> f32 {
    if LEAKY {
        Activation::LeakyRelu(slope).value(z)
    } else {
        Activation::Relu.value(z)
    }
}

/// A step's values of one row: their normalised values `z` and their rectified values
/// split into even and odd columns (the windows' left and right corners). Plain loops over
/// fixed-size arrays: `array::map` and `array::from_fn` are not inlined into the level's
/// build.
#[inline(always)]
fn corners<const LEAKY: bool>(
    values: &[f32; 2 * STEP],
    map: &PlaneMap,
) -> ([f32; 2 * STEP], [f32; STEP], [f32; STEP]) {
    let slope = map.rectifier.slope();
    let mut z = [0.0; 2 * STEP];
    for (z, &v) in z.iter_mut().zip(values) {
        *z = map.normalise(v);
    }
    let (mut left, mut right) = ([0.0; STEP], [0.0; STEP]);
    for i in 0..STEP {
        left[i] = rectify::<LEAKY>(z[2 * i], slope);
        right[i] = rectify::<LEAKY>(z[2 * i + 1], slope);
    }
    (z, left, right)
}

/// The pool's window scan over corners (top left, top right, bottom left, bottom right) of
/// one window: the maximum, and the corner it came from as 0.0 to 3.0 (a float, so that
/// the selects on it stay in float registers).
#[inline(always)]
fn scan(c0: f32, c1: f32, c2: f32, c3: f32) -> (f32, f32) {
    let (mut best, mut at) = (c0, 0.0);
    for (k, c) in [(1.0, c1), (2.0, c2), (3.0, c3)] {
        let take = replaces(c, best);
        best = if take { c } else { best };
        at = if take { k } else { at };
    }
    (best, at)
}

/// A window's outcome in one byte: bits 0-1 the corner the pool took (0 to 3: top left,
/// top right, bottom left, bottom right), bit `2 + k` whether corner `k`'s normalised value
/// is above zero (false for NaN). Level-independent: the forward of any level writes the
/// bytes that the backward of any level reads.
#[inline(always)]
pub(super) fn code(at: f32, z: [f32; 4]) -> u8 {
    let mut code = at as u8;
    for (k, &z) in z.iter().enumerate() {
        code |= u8::from(z > 0.0) << (2 + k);
    }
    code
}

/// [`forward_rectified`] with leaky ReLU (`LEAKY`) or ReLU, on rows of at least `STEP`
/// windows (`WIDE`: a step's pooled values are consecutive, one store that LLVM builds the
/// step's vectors from, rather than two half-width ones) or fewer.
#[inline(always)]
fn forward_steps<const LEAKY: bool, const WIDE: bool>(
    x: &[f32],
    w: usize,
    map: &PlaneMap,
    out: &mut [f32],
    mut codes: Option<&mut [u8]>,
) {
    let (out_h, out_w) = check(x, w, out);
    if let Some(codes) = codes.as_deref() {
        assert_eq!(codes.len(), out.len(), "max_relu: codes");
    }
    for halves in steps(w, out_h, out_w) {
        let (z_top, c0, c1) = corners::<LEAKY>(&row_values(x, &halves, 0), map);
        let (z_bottom, c2, c3) = corners::<LEAKY>(&row_values(x, &halves, w), map);
        let mut pooled = [0.0; STEP];
        let mut step_codes = [0u8; STEP];
        for i in 0..STEP {
            let (best, at) = scan(c0[i], c1[i], c2[i], c3[i]);
            pooled[i] = best;
            let z = [
                z_top[2 * i],
                z_top[2 * i + 1],
                z_bottom[2 * i],
                z_bottom[2 * i + 1],
            ];
            step_codes[i] = code(at, z);
        }
        if WIDE {
            let at = halves[0].1;
            for (o, &v) in out[at..at + STEP].iter_mut().zip(&pooled) {
                *o = v;
            }
            if let Some(codes) = codes.as_deref_mut() {
                codes[at..at + STEP].copy_from_slice(&step_codes);
            }
        } else {
            for (k, &(_, at)) in halves.iter().enumerate() {
                for (o, &v) in out[at..at + HALF].iter_mut().zip(&pooled[k * HALF..]) {
                    *o = v;
                }
                if let Some(codes) = codes.as_deref_mut() {
                    codes[at..at + HALF].copy_from_slice(&step_codes[k * HALF..][..HALF]);
                }
            }
        }
    }
}

/// The pooled values of one plane `x` of width `w` (at least `2·HALF`):
/// `max_pool_2x2_plane_values` of the rectified normalised plane, in portable steps; and,
/// when given, each window's [`code`] into `codes` (one per pooled value).
#[inline(always)]
fn forward_rectified(
    x: &[f32],
    w: usize,
    map: &PlaneMap,
    out: &mut [f32],
    codes: Option<&mut [u8]>,
) {
    match (map.rectifier, w / 2 >= STEP) {
        (Rectifier::Relu, true) => forward_steps::<false, true>(x, w, map, out, codes),
        (Rectifier::Relu, false) => forward_steps::<false, false>(x, w, map, out, codes),
        (Rectifier::Leaky(_), true) => forward_steps::<true, true>(x, w, map, out, codes),
        (Rectifier::Leaky(_), false) => forward_steps::<true, false>(x, w, map, out, codes),
    }
}

simd_dispatch! {
    /// [`forward_rectified`] compiled for each level.
    fn forward_portable(x: &[f32], w: usize, map: &PlaneMap, out: &mut [f32],
                        codes: Option<&mut [u8]>) {
        forward_rectified(x, w, map, out, codes)
    }
}

/// The gradient of one row of a step before the rectifier: the routed gradients of the
/// left and right corners interleaved back into columns, through the derivative (`g`
/// where the value's `z > 0`, `positive`, else `g·slope`, as `relu_grad_chunk`), into each
/// half step's values of `grad_input` from its `top`, `down` further.
#[inline(always)]
fn row_grad(
    positive: &[bool; 2 * STEP],
    left: &[f32; STEP],
    right: &[f32; STEP],
    slope: f32,
    halves: &[(usize, usize); 2],
    down: usize,
    grad_input: &mut [f32],
) {
    let mut routed = [0.0; 2 * STEP];
    for i in 0..STEP {
        routed[2 * i] = left[i];
        routed[2 * i + 1] = right[i];
    }
    let mut grad = [0.0; 2 * STEP];
    for ((o, &g), &positive) in grad.iter_mut().zip(&routed).zip(positive) {
        *o = if positive { g } else { g * slope };
    }
    for (grad, &(top, _)) in grad.chunks_exact(STEP).zip(halves) {
        let at = top + down;
        for (o, &g) in grad_input[at..at + STEP].iter_mut().zip(grad) {
            *o = g;
        }
    }
}

/// A step's gradient before the rectifier, both rows, into `grad_input`: `0.0 + g` at the
/// corner each window's pool took (`at`, 0.0 to 3.0: top left, top right, bottom left,
/// bottom right) and 0.0 at the others, through the derivative (`top` and `bottom`: whether
/// each value's `z` is above zero). The recomputing backward and the one from the window
/// codes both route here, so they give the same bits by construction.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn route_step(
    g: &[f32; STEP],
    at: &[f32; STEP],
    top: &[bool; 2 * STEP],
    bottom: &[bool; 2 * STEP],
    slope: f32,
    halves: &[(usize, usize); 2],
    w: usize,
    grad_input: &mut [f32],
) {
    // Four arrays, not an array of four: LLVM then keeps them in registers, and
    // interleaves them back into columns with register shuffles.
    let (mut g0, mut g1, mut g2, mut g3) = ([0.0; STEP], [0.0; STEP], [0.0; STEP], [0.0; STEP]);
    for i in 0..STEP {
        let v = 0.0 + g[i];
        g0[i] = if at[i] == 0.0 { v } else { 0.0 };
        g1[i] = if at[i] == 1.0 { v } else { 0.0 };
        g2[i] = if at[i] == 2.0 { v } else { 0.0 };
        g3[i] = if at[i] == 3.0 { v } else { 0.0 };
    }
    row_grad(top, &g0, &g1, slope, halves, 0, grad_input);
    row_grad(bottom, &g2, &g3, slope, halves, w, grad_input);
}

/// [`backward_rectified`] with leaky ReLU (`LEAKY`) or ReLU.
#[inline(always)]
fn backward_steps<const LEAKY: bool>(
    x: &[f32],
    w: usize,
    map: &PlaneMap,
    grad: &[f32],
    grad_input: &mut [f32],
) {
    let (out_h, out_w) = check(x, w, grad);
    assert_eq!(grad_input.len(), x.len(), "max_relu: grad_input");
    let slope = map.rectifier.slope();
    for halves in steps(w, out_h, out_w) {
        let (z_top, c0, c1) = corners::<LEAKY>(&row_values(x, &halves, 0), map);
        let (z_bottom, c2, c3) = corners::<LEAKY>(&row_values(x, &halves, w), map);
        let mut g = [0.0; STEP];
        for (g, &(_, at)) in g.chunks_exact_mut(HALF).zip(&halves) {
            for (g, &v) in g.iter_mut().zip(&grad[at..at + HALF]) {
                *g = v;
            }
        }
        let mut at = [0.0; STEP];
        for i in 0..STEP {
            at[i] = scan(c0[i], c1[i], c2[i], c3[i]).1;
        }
        let (mut top, mut bottom) = ([false; 2 * STEP], [false; 2 * STEP]);
        for j in 0..2 * STEP {
            top[j] = z_top[j] > 0.0;
            bottom[j] = z_bottom[j] > 0.0;
        }
        route_step(&g, &at, &top, &bottom, slope, &halves, w, grad_input);
    }
    uncovered_grad(x, w, map, grad_input);
}

/// Backward pass 1 of one plane of width `w` (at least `2·HALF`): from the pooled gradient
/// `grad` (after the dropout), the gradient before the rectifier into `grad_input`:
/// `0.0 + g` at each window's maximum and 0.0 elsewhere (also the rows and columns no
/// window covers), then the rectifier's derivative, `g` where `z > 0`, else `g·slope`; in
/// portable steps.
#[inline(always)]
fn backward_rectified(x: &[f32], w: usize, map: &PlaneMap, grad: &[f32], grad_input: &mut [f32]) {
    match map.rectifier {
        Rectifier::Relu => backward_steps::<false>(x, w, map, grad, grad_input),
        Rectifier::Leaky(_) => backward_steps::<true>(x, w, map, grad, grad_input),
    }
}

simd_dispatch! {
    /// [`backward_rectified`] compiled for each level.
    fn backward_portable(x: &[f32], w: usize, map: &PlaneMap, grad: &[f32], grad_input: &mut [f32]) {
        backward_rectified(x, w, map, grad, grad_input)
    }
}

/// [`backward_rectified`] from the forward's window codes (see [`code`]), in portable
/// steps: the same routing and derivative from the bytes, without the plane's values
/// (but for the rows and columns no window covers).
#[inline(always)]
fn backward_codes_steps(
    x: &[f32],
    w: usize,
    map: &PlaneMap,
    codes: &[u8],
    grad: &[f32],
    grad_input: &mut [f32],
) {
    let (out_h, out_w) = check(x, w, grad);
    assert_eq!(grad_input.len(), x.len(), "max_relu: grad_input");
    assert_eq!(codes.len(), grad.len(), "max_relu: codes");
    let slope = map.rectifier.slope();
    for halves in steps(w, out_h, out_w) {
        let (mut g, mut c) = ([0.0; STEP], [0u8; STEP]);
        for (k, &(_, at)) in halves.iter().enumerate() {
            g[k * HALF..][..HALF].copy_from_slice(&grad[at..at + HALF]);
            c[k * HALF..][..HALF].copy_from_slice(&codes[at..at + HALF]);
        }
        let mut at = [0.0; STEP];
        let (mut top, mut bottom) = ([false; 2 * STEP], [false; 2 * STEP]);
        for i in 0..STEP {
            at[i] = f32::from(c[i] & 3);
            top[2 * i] = c[i] & 4 != 0;
            top[2 * i + 1] = c[i] & 8 != 0;
            bottom[2 * i] = c[i] & 16 != 0;
            bottom[2 * i + 1] = c[i] & 32 != 0;
        }
        route_step(&g, &at, &top, &bottom, slope, &halves, w, grad_input);
    }
    uncovered_grad(x, w, map, grad_input);
}

simd_dispatch! {
    /// [`backward_codes_steps`] compiled for each level.
    fn backward_codes_portable(x: &[f32], w: usize, map: &PlaneMap, codes: &[u8], grad: &[f32],
                               grad_input: &mut [f32]) {
        backward_codes_steps(x, w, map, codes, grad, grad_input)
    }
}

/// The pooled values of one plane `x` of width `w` (one [`takes`]):
/// `max_pool_2x2_plane_values` of the rectified normalised plane (AVX-512 intrinsics at
/// that level, else the portable steps); and, when given, each window's [`code`] into
/// `codes` (one per pooled value), for [`backward_from_codes`].
pub(super) fn forward_plane(
    x: &[f32],
    w: usize,
    map: &PlaneMap,
    out: &mut [f32],
    codes: Option<&mut [u8]>,
) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the AVX-512 level runs only on a CPU that has it.
        unsafe { super::max_relu_avx512::forward_plane(x, w, map, out, codes) };
        return;
    }
    forward_portable(x, w, map, out, codes);
}

/// [`backward_plane`] from the codes [`forward_plane`] wrote for the same plane and map:
/// the same bits, without normalising the plane and scanning its windows again (`x` is
/// read only where no window covers it).
pub(super) fn backward_from_codes(
    x: &[f32],
    w: usize,
    map: &PlaneMap,
    codes: &[u8],
    grad: &[f32],
    grad_input: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the AVX-512 level runs only on a CPU that has it.
        unsafe { super::max_relu_avx512::backward_from_codes(x, w, map, codes, grad, grad_input) };
        return;
    }
    backward_codes_portable(x, w, map, codes, grad, grad_input);
}

/// Backward pass 1 of one plane (see [`backward_rectified`]), at the level in use.
pub(super) fn backward_plane(
    x: &[f32],
    w: usize,
    map: &PlaneMap,
    grad: &[f32],
    grad_input: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the AVX-512 level runs only on a CPU that has it.
        unsafe { super::max_relu_avx512::backward_plane(x, w, map, grad, grad_input) };
        return;
    }
    backward_portable(x, w, map, grad, grad_input);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::activation::{self, Activation};
    use crate::kernels::batch_norm::plane_normalise;
    use crate::kernels::pool::{max_pool_2x2_plane_backward, max_pool_2x2_plane_values};

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// Few distinct values (ties within windows, rectified zeros), signed zeros, NaNs and
    /// infinities, from a fixed sequence.
    fn awkward(n: usize, salt: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(salt) >> 9;
                match v % 23 {
                    0 => f32::NAN,
                    1 => -0.0,
                    2 => 0.0,
                    3 => f32::INFINITY,
                    4 => f32::NEG_INFINITY,
                    k => (k % 5) as f32 * 0.5 - 1.0,
                }
            })
            .collect()
    }

    /// The portable stages, as the fused block runs them without this module.
    fn portable(
        x: &[f32],
        w: usize,
        map: &PlaneMap,
        grad: &[f32],
        activation: Activation,
    ) -> (Vec<f32>, Vec<f32>) {
        let out_w = w / 2;
        let mut z = vec![0.0; x.len()];
        plane_normalise(x, &mut z, map.mean, map.scale, map.shift);
        let mut activated = z.clone();
        activation::apply_in_place(activation, &mut activated);
        let mut pooled = vec![0.0; grad.len()];
        max_pool_2x2_plane_values(&activated, w, &mut pooled, out_w);
        let (mut unpooled, mut windows) = (vec![0.0; x.len()], vec![0.0; 5 * grad.len()]);
        max_pool_2x2_plane_backward(&activated, w, grad, out_w, &mut unpooled, &mut windows);
        let mut grad_input = vec![0.0; x.len()];
        activation::backward_in_tile(activation, &unpooled, &z, &mut grad_input);
        (pooled, grad_input)
    }

    type Forward = fn(&[f32], usize, &PlaneMap, &mut [f32], Option<&mut [u8]>);
    type Backward = fn(&[f32], usize, &PlaneMap, &[f32], &mut [f32]);
    type FromCodes = fn(&[f32], usize, &PlaneMap, &[u8], &[f32], &mut [f32]);
    /// Whether a kernel takes planes of a width.
    type Takes = fn(usize) -> bool;

    struct Kernels {
        name: &'static str,
        takes: Takes,
        forward: Forward,
        backward: Backward,
        from_codes: FromCodes,
    }

    /// The portable steps (compiled for the baseline), the kernels at the level in use, and
    /// the AVX-512 ones if the CPU has them. The other levels' builds of the portable steps
    /// are checked from Python, which sets the level (tests/test_fusion.py).
    fn kernels() -> Vec<Kernels> {
        let mut kernels = vec![
            Kernels {
                name: "portable",
                takes: |w| w / 2 >= HALF,
                forward: forward_rectified,
                backward: backward_rectified,
                from_codes: backward_codes_steps,
            },
            Kernels {
                name: "level in use",
                takes,
                forward: forward_plane,
                backward: backward_plane,
                from_codes: backward_from_codes,
            },
        ];
        #[cfg(target_arch = "x86_64")]
        if crate::simd::Level::Avx512.is_available() {
            use super::super::max_relu_avx512 as avx512;
            // SAFETY: the CPU has the AVX-512 level (checked just above).
            kernels.push(Kernels {
                name: "avx512",
                takes: |_| true,
                forward: |x, w, map, out, codes| unsafe {
                    avx512::forward_plane(x, w, map, out, codes)
                },
                backward: |x, w, map, grad, grad_input| unsafe {
                    avx512::backward_plane(x, w, map, grad, grad_input)
                },
                from_codes: |x, w, map, codes, grad, grad_input| unsafe {
                    avx512::backward_from_codes(x, w, map, codes, grad, grad_input)
                },
            });
        }
        kernels
    }

    #[test]
    fn planes_give_the_portable_stages_bits() {
        // Odd and even sizes; one step and several (4, 8 or 16 windows a step), the last one
        // partial or moved back; rows narrower than a step.
        let sizes = [
            (2, 2),
            (3, 3),
            (28, 28),
            (14, 14),
            (7, 9),
            (5, 34),
            (4, 33),
            (6, 70),
            (4, 16),
            (5, 17),
            (6, 8),
            (5, 11),
            (3, 15),
        ];
        let maps = [
            (Rectifier::Relu, Activation::Relu, 0.25, 1.5, -0.5),
            (Rectifier::Relu, Activation::Relu, -1.0, -2.0, 0.0),
            (
                Rectifier::Leaky(0.1),
                Activation::LeakyRelu(0.1),
                0.5,
                0.75,
                0.125,
            ),
            (
                Rectifier::Leaky(-0.3),
                Activation::LeakyRelu(-0.3),
                0.0,
                1.0,
                0.0,
            ),
        ];
        for (salt, &(h, w)) in sizes.iter().enumerate() {
            for &(rectifier, activation, mean, scale, shift) in &maps {
                let map = PlaneMap {
                    mean,
                    scale,
                    shift,
                    rectifier,
                };
                let x = awkward(h * w, salt as u32);
                let grad = awkward((h / 2) * (w / 2), 100 + salt as u32);
                let (pooled, grad_input) = portable(&x, w, &map, &grad, activation);
                let mut first_codes: Option<Vec<u8>> = None;
                for k in kernels().into_iter().filter(|k| (k.takes)(w)) {
                    let what = format!("{} {h}x{w} {rectifier:?}", k.name);
                    let mut fast_pooled = vec![f32::NAN; pooled.len()];
                    let mut fast_grad = vec![f32::NAN; x.len()];
                    (k.forward)(&x, w, &map, &mut fast_pooled, None);
                    (k.backward)(&x, w, &map, &grad, &mut fast_grad);
                    assert_eq!(bits(&fast_pooled), bits(&pooled), "pooled {what}");
                    assert_eq!(bits(&fast_grad), bits(&grad_input), "grad_input {what}");
                    // With the window codes: the same pooled values, codes that do not
                    // depend on the kernel, and the backward's bits from them.
                    let mut codes = vec![u8::MAX; pooled.len()];
                    fast_pooled.fill(f32::NAN);
                    (k.forward)(&x, w, &map, &mut fast_pooled, Some(&mut codes));
                    assert_eq!(
                        bits(&fast_pooled),
                        bits(&pooled),
                        "pooled with codes {what}"
                    );
                    assert!(codes.iter().all(|&c| c < 64), "codes {what}: {codes:?}");
                    let first = first_codes.get_or_insert_with(|| codes.clone());
                    assert_eq!(*first, codes, "codes {what}");
                    fast_grad.fill(f32::NAN);
                    (k.from_codes)(&x, w, &map, &codes, &grad, &mut fast_grad);
                    assert_eq!(bits(&fast_grad), bits(&grad_input), "from codes {what}");
                }
            }
        }
    }
}
