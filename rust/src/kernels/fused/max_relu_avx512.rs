//! One plane of the fused block's normalise → ReLU (or leaky ReLU) → 2×2 max pool, in
//! AVX-512 registers: the forward's pooled values, and the backward's gradient before the
//! batch norm (pass 1) from the pooled gradient.
//!
//! The portable path runs each stage over the whole plane (normalised plane, activated
//! copy, the windows' corners gathered into four arrays, the pool's gradient, the
//! activation's derivative): six passes over the plane's scratch. Here a step takes 16
//! windows of a row pair (32 values of each row, split into even and odd columns by one
//! permutation) through every stage while they are in registers. Each value gets the
//! portable stages' arithmetic (subtract, multiply, add without fusing; the same selects in
//! the same order, the first NaN and the first of equal values winning; `0.0 + g` routed to
//! the window's maximum; the derivative from the normalised value), so the same bits. The
//! forward may keep each window's code, and the backward route from the codes.

use std::arch::x86_64::*;

use super::max_relu::{check, uncovered_grad, PlaneMap, Rectifier};

/// Windows per step: one vector of each corner.
const STEP: usize = 16;

/// The lowest `n` bits.
fn low_bits(n: usize) -> __mmask16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// One step's windows: the 32 values of a top row read as two vectors of 16 (`low` from
/// offset `low_at` of the plane, `high` from `high_at`), the bottom row `w` further, split
/// into 16 windows. Rows of more than 8 windows take up to 16 windows of one row pair (the
/// high vector right after the low one); rows of at most 8 take two row pairs, the second
/// pair in the high vector, so that 14-wide planes fill 14 of 16 lanes instead of 7.
/// Masked-off lanes read as zero and are computed, never stored.
#[derive(Clone, Copy)]
struct Step {
    low_at: usize,
    high_at: usize,
    low: __mmask16,
    high: __mmask16,
    /// The lanes of the windows, after the even/odd split.
    windows: __mmask16,
    /// The step's windows as consecutive pooled values: `count` from `pooled_at`.
    pooled_at: usize,
    count: usize,
    /// Whether the windows are two row pairs' (lanes 0.. and 8..), else consecutive.
    two_pairs: bool,
}

/// Run `f` on each step covering a plane of width `w`, `out_h`×`out_w` windows, in
/// row-major order.
#[inline(always)]
fn for_each_step(w: usize, out_h: usize, out_w: usize, mut f: impl FnMut(&Step)) {
    if out_w > STEP / 2 {
        for oh in 0..out_h {
            let top = 2 * oh * w;
            for first in (0..out_w).step_by(STEP) {
                let n = (out_w - first).min(STEP);
                f(&Step {
                    low_at: top + 2 * first,
                    high_at: top + 2 * first + STEP,
                    low: low_bits(2 * n),
                    high: low_bits((2 * n).saturating_sub(STEP)),
                    windows: low_bits(n),
                    pooled_at: oh * out_w + first,
                    count: n,
                    two_pairs: false,
                });
            }
        }
    } else {
        let row = low_bits(2 * out_w);
        for oh in (0..out_h).step_by(2) {
            let top = 2 * oh * w;
            let second = oh + 1 < out_h;
            f(&Step {
                low_at: top,
                high_at: if second { top + 2 * w } else { top },
                low: row,
                high: if second { row } else { 0 },
                windows: low_bits(out_w) | if second { low_bits(out_w) << 8 } else { 0 },
                pooled_at: oh * out_w,
                count: if second { 2 * out_w } else { out_w },
                two_pairs: true,
            });
        }
    }
}

/// The even and odd columns of 32 consecutive values; and back.
struct Lanes {
    even: __m512i,
    odd: __m512i,
    interleave_low: __m512i,
    interleave_high: __m512i,
}

impl Lanes {
    #[target_feature(enable = "avx512f")]
    fn new() -> Self {
        let index = |f: fn(i32) -> i32| {
            let v: [i32; 16] = std::array::from_fn(|i| f(i as i32));
            // SAFETY: an unaligned load of a 16-value array.
            unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
        };
        Lanes {
            even: index(|i| 2 * i),
            odd: index(|i| 2 * i + 1),
            interleave_low: index(|i| (i / 2) | ((i & 1) << 4)),
            interleave_high: index(|i| (8 + i / 2) | ((i & 1) << 4)),
        }
    }
}

/// The normalised values `z` of a step's 32 values of one row (`down` = 0) or the row
/// below (`down` = w), split into even and odd columns.
///
/// # Safety
/// AVX-512 F; the step's lanes, `down` further, within `plane`.
#[target_feature(enable = "avx512f")]
unsafe fn normalised_pairs(
    plane: *const f32,
    step: &Step,
    down: usize,
    map: &PlaneMap,
    lanes: &Lanes,
) -> (__m512, __m512) {
    let normalise = |v: __m512| {
        _mm512_add_ps(
            _mm512_mul_ps(
                _mm512_sub_ps(v, _mm512_set1_ps(map.mean)),
                _mm512_set1_ps(map.scale),
            ),
            _mm512_set1_ps(map.shift),
        )
    };
    // SAFETY: the caller's bounds; masked-off lanes are not read.
    let (low, high) = unsafe {
        (
            normalise(_mm512_maskz_loadu_ps(
                step.low,
                plane.add(step.low_at + down),
            )),
            normalise(_mm512_maskz_loadu_ps(
                step.high,
                plane.add(step.high_at + down),
            )),
        )
    };
    (
        _mm512_permutex2var_ps(low, lanes.even, high),
        _mm512_permutex2var_ps(low, lanes.odd, high),
    )
}

/// The rectifier on `z`: ReLU keeps `z` where `z > 0` or NaN, else 0.0; leaky ReLU keeps it
/// where `z > 0`, else `z·slope`.
#[target_feature(enable = "avx512f")]
fn rectify(z: __m512, rectifier: Rectifier) -> __m512 {
    match rectifier {
        // `!(z <= 0)`: z > 0, or z is NaN.
        Rectifier::Relu => {
            _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NLE_UQ>(z, _mm512_setzero_ps()), z)
        }
        Rectifier::Leaky(slope) => {
            let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, _mm512_setzero_ps());
            _mm512_mask_blend_ps(positive, _mm512_mul_ps(z, _mm512_set1_ps(slope)), z)
        }
    }
}

/// Where candidate `v` replaces the running maximum `best` (the pool's rule): larger, or
/// NaN, unless the maximum is NaN already.
#[target_feature(enable = "avx512f")]
fn replaces(v: __m512, best: __m512) -> __mmask16 {
    // `!(v <= best)` (v > best, or either is NaN) where `best` is not NaN.
    let best_ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(best, best);
    _mm512_mask_cmp_ps_mask::<_CMP_NLE_UQ>(best_ordered, v, best)
}

/// The pool's window scan over corners (top left, top right, bottom left, bottom right):
/// the maximum, and where corners 1, 2, 3 took over from the ones before.
#[target_feature(enable = "avx512f")]
fn scan(corners: [__m512; 4]) -> (__m512, [__mmask16; 3]) {
    let mut best = corners[0];
    let mut takes = [0; 3];
    for (take, &corner) in takes.iter_mut().zip(&corners[1..]) {
        *take = replaces(corner, best);
        best = _mm512_mask_mov_ps(best, *take, corner);
    }
    (best, takes)
}

/// The pooled values of one plane `x` of width `w`: `max_pool_2x2_plane_values` of the
/// rectified normalised plane; and, when given, each window's code
/// ([`super::max_relu::code`]) into `codes`.
///
/// # Safety
/// The CPU must have the AVX-512 level (F, BW, VL).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn forward_plane(
    x: &[f32],
    w: usize,
    map: &PlaneMap,
    out: &mut [f32],
    codes: Option<&mut [u8]>,
) {
    let (out_h, out_w) = check(x, w, out);
    let codes = codes.map(|codes| {
        assert_eq!(codes.len(), out.len(), "max_relu_avx512: codes");
        codes.as_mut_ptr()
    });
    let lanes = Lanes::new();
    for_each_step(w, out_h, out_w, |step| {
        // SAFETY: a step's lanes lie in rows 2·oh, 2·oh + 1 < h (and the next pair's), at
        // columns below 2·out_w <= w; its pooled values (and codes) in `out` (`codes`).
        unsafe {
            let (t0, t1) = normalised_pairs(x.as_ptr(), step, 0, map, &lanes);
            let (b0, b1) = normalised_pairs(x.as_ptr(), step, w, map, &lanes);
            let corners = [t0, t1, b0, b1].map(|z| rectify(z, map.rectifier));
            let (best, [take1, take2, take3]) = scan(corners);
            let pooled = if step.two_pairs {
                _mm512_maskz_compress_ps(step.windows, best)
            } else {
                best
            };
            let dst = out.as_mut_ptr().add(step.pooled_at);
            _mm512_mask_storeu_ps(dst, low_bits(step.count), pooled);
            if let Some(codes) = codes {
                // The corner the pool took (the last one that took over), then which
                // corners are above zero. (The masks one by one: as an array, they went
                // through the stack in two sizes, a stalled load a step.)
                let code = _mm512_maskz_mov_epi32(take1, _mm512_set1_epi32(1));
                let code = _mm512_mask_mov_epi32(code, take2, _mm512_set1_epi32(2));
                let code = _mm512_mask_mov_epi32(code, take3, _mm512_set1_epi32(3));
                let code = positive_bits(code, t0, 4);
                let code = positive_bits(code, t1, 8);
                let code = positive_bits(code, b0, 16);
                let code = positive_bits(code, b1, 32);
                let code = if step.two_pairs {
                    _mm512_maskz_compress_epi32(step.windows, code)
                } else {
                    code
                };
                _mm512_mask_cvtepi32_storeu_epi8(
                    codes.add(step.pooled_at).cast(),
                    low_bits(step.count),
                    code,
                );
            }
        }
    });
}

/// `code` with `bit` set in the lanes where `z > 0` (ordered: not for NaN).
#[target_feature(enable = "avx512f")]
fn positive_bits(code: __m512i, z: __m512, bit: i32) -> __m512i {
    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, _mm512_setzero_ps());
    _mm512_mask_or_epi32(code, positive, code, _mm512_set1_epi32(bit))
}

/// The rectifier's slope as [`write_routed`] applies it.
struct Slope {
    slope: __m512,
    /// `0.0·slope`: `+0.0` unless the slope is negative (or NaN).
    zero_sloped: __m512,
    zero_stays_zero: bool,
}

impl Slope {
    #[target_feature(enable = "avx512f")]
    fn new(map: &PlaneMap) -> Self {
        let zero_times_slope = 0.0 * map.rectifier.slope();
        Slope {
            slope: _mm512_set1_ps(map.rectifier.slope()),
            zero_sloped: _mm512_set1_ps(zero_times_slope),
            zero_stays_zero: zero_times_slope.to_bits() == 0,
        }
    }
}

/// A step's pooled gradient, `count` values from `pooled_at` of `grad`, in its windows'
/// lanes.
///
/// # Safety
/// Those values lie within `grad`.
#[target_feature(enable = "avx512f")]
unsafe fn step_grad(grad: &[f32], step: &Step) -> __m512 {
    // SAFETY: the caller's bounds; masked-off lanes are not read.
    let g =
        unsafe { _mm512_maskz_loadu_ps(low_bits(step.count), grad.as_ptr().add(step.pooled_at)) };
    if step.two_pairs {
        _mm512_maskz_expand_ps(step.windows, g)
    } else {
        g
    }
}

/// The gradient before the rectifier of a step's values into `grad_input`: `0.0 + g` at
/// each window's maximum (`winners[k]`: the windows whose corner `k` the pool took) and
/// 0.0 elsewhere, then the derivative, `g` where the corner's `z > 0` (`positive[k]`),
/// else `g·slope`: a corner that is not its window's maximum gets `0.0`, and `0.0·slope`
/// when `z <= 0` (`-0.0` for a negative slope).
///
/// # Safety
/// The step's lanes, and the row below them, lie within `grad_input`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn write_routed(
    grad_input: &mut [f32],
    w: usize,
    step: &Step,
    g: __m512,
    winners: [__mmask16; 4],
    positive: [__mmask16; 4],
    slope: &Slope,
    lanes: &Lanes,
) {
    let routed = _mm512_add_ps(_mm512_setzero_ps(), g);
    let sloped = _mm512_mul_ps(routed, slope.slope);
    let [g0, g1, g2, g3]: [__m512; 4] = std::array::from_fn(|k| {
        let winner = _mm512_mask_blend_ps(positive[k], sloped, routed);
        if slope.zero_stays_zero {
            _mm512_maskz_mov_ps(winners[k], winner)
        } else {
            let loser = _mm512_maskz_mov_ps(!positive[k], slope.zero_sloped);
            _mm512_mask_blend_ps(winners[k], loser, winner)
        }
    });
    let dst = grad_input.as_mut_ptr();
    for (down, (even, odd)) in [(0, (g0, g1)), (w, (g2, g3))] {
        let low = _mm512_permutex2var_ps(even, lanes.interleave_low, odd);
        let high = _mm512_permutex2var_ps(even, lanes.interleave_high, odd);
        // SAFETY: the caller's bounds; masked-off lanes are not written.
        unsafe {
            _mm512_mask_storeu_ps(dst.add(step.low_at + down), step.low, low);
            _mm512_mask_storeu_ps(dst.add(step.high_at + down), step.high, high);
        }
    }
}

/// Backward pass 1 of one plane: from the pooled gradient `grad` (after the dropout),
/// the gradient before the rectifier into `grad_input`: `0.0 + g` at each window's
/// maximum and 0.0 elsewhere (also the rows and columns no window covers), then the
/// rectifier's derivative, `g` where `z > 0`, else `g·slope`.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn backward_plane(
    x: &[f32],
    w: usize,
    map: &PlaneMap,
    grad: &[f32],
    grad_input: &mut [f32],
) {
    let (out_h, out_w) = check(x, w, grad);
    assert_eq!(grad_input.len(), x.len(), "max_relu_avx512: grad_input");
    let (lanes, slope) = (Lanes::new(), Slope::new(map));
    for_each_step(w, out_h, out_w, |step| {
        // SAFETY: as in forward_plane, for `x` and `grad_input` alike, and the pooled
        // gradient's values.
        unsafe {
            let (t0, t1) = normalised_pairs(x.as_ptr(), step, 0, map, &lanes);
            let (b0, b1) = normalised_pairs(x.as_ptr(), step, w, map, &lanes);
            let z = [t0, t1, b0, b1];
            let (_, [take1, take2, take3]) = scan(z.map(|z| rectify(z, map.rectifier)));
            let winners = [
                !(take1 | take2 | take3),
                take1 & !(take2 | take3),
                take2 & !take3,
                take3,
            ];
            let positive = z.map(|z| _mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, _mm512_setzero_ps()));
            let g = step_grad(grad, step);
            write_routed(grad_input, w, step, g, winners, positive, &slope, &lanes);
        }
    });
    uncovered_grad(x, w, map, grad_input);
}

/// [`backward_plane`] from the window codes [`forward_plane`] wrote for the same plane and
/// map: the same selects on the same values, without the plane's (`x` is read only where
/// no window covers it).
///
/// # Safety
/// The CPU must have the AVX-512 level (F, BW, VL).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn backward_from_codes(
    x: &[f32],
    w: usize,
    map: &PlaneMap,
    codes: &[u8],
    grad: &[f32],
    grad_input: &mut [f32],
) {
    let (out_h, out_w) = check(x, w, grad);
    assert_eq!(grad_input.len(), x.len(), "max_relu_avx512: grad_input");
    assert_eq!(codes.len(), grad.len(), "max_relu_avx512: codes");
    let (lanes, slope) = (Lanes::new(), Slope::new(map));
    for_each_step(w, out_h, out_w, |step| {
        // SAFETY: as in backward_plane; the step's codes lie where its pooled values do.
        unsafe {
            let code = _mm_maskz_loadu_epi8(
                low_bits(step.count),
                codes.as_ptr().add(step.pooled_at).cast(),
            );
            let code = _mm512_cvtepu8_epi32(code);
            let code = if step.two_pairs {
                _mm512_maskz_expand_epi32(step.windows, code)
            } else {
                code
            };
            let at = _mm512_and_si512(code, _mm512_set1_epi32(3));
            let winners: [__mmask16; 4] =
                std::array::from_fn(|k| _mm512_cmpeq_epi32_mask(at, _mm512_set1_epi32(k as i32)));
            let positive: [__mmask16; 4] =
                std::array::from_fn(|k| _mm512_test_epi32_mask(code, _mm512_set1_epi32(4 << k)));
            let g = step_grad(grad, step);
            write_routed(grad_input, w, step, g, winners, positive, &slope, &lanes);
        }
    });
    uncovered_grad(x, w, map, grad_input);
}
