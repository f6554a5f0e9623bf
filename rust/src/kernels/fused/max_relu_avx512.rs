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
//! the window's maximum; the derivative from the normalised value), so the same bits.

use std::arch::x86_64::*;

/// The activation before the pool: ReLU, or leaky ReLU with its slope.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Rectifier {
    Relu,
    Leaky(f32),
}

impl Rectifier {
    /// The slope the gradient takes at or below zero (ReLU's derivative is `g·0.0` there).
    fn slope(self) -> f32 {
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

/// Windows per step: one vector of each corner.
const STEP: usize = 16;

/// Loads of a step's row pair: `lanes` values (at most 32) of each row from `at`, the
/// masked-off lanes zero (they are computed and never stored).
#[derive(Clone, Copy)]
struct StepMasks {
    low: __mmask16,
    high: __mmask16,
    windows: __mmask16,
}

impl StepMasks {
    fn new(windows: usize) -> Self {
        let bits = |n: usize| if n >= 16 { u16::MAX } else { (1u16 << n) - 1 };
        StepMasks {
            low: bits((2 * windows).min(16)),
            high: bits((2 * windows).saturating_sub(16)),
            windows: bits(windows),
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

/// The normalised values `z` of one row's 32 values from `row[at..]`, split into even and
/// odd columns.
///
/// # Safety
/// AVX-512 F; the lanes of `masks` within `row`.
#[target_feature(enable = "avx512f")]
unsafe fn normalised_pairs(
    row: *const f32,
    masks: StepMasks,
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
            normalise(_mm512_maskz_loadu_ps(masks.low, row)),
            normalise(_mm512_maskz_loadu_ps(masks.high, row.add(16))),
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
    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, _mm512_setzero_ps());
    match rectifier {
        Rectifier::Relu => {
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(z, z);
            _mm512_maskz_mov_ps(positive | nan, z)
        }
        Rectifier::Leaky(slope) => {
            _mm512_mask_blend_ps(positive, _mm512_mul_ps(z, _mm512_set1_ps(slope)), z)
        }
    }
}

/// Where candidate `v` replaces the running maximum `best` (the pool's rule): larger, or
/// NaN, unless the maximum is NaN already.
#[target_feature(enable = "avx512f")]
fn replaces(v: __m512, best: __m512) -> __mmask16 {
    let larger = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best);
    let v_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let best_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(best, best);
    (larger | v_nan) & !best_nan
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

/// Check the plane's shapes: `h×w` input values, `(h/2)×(w/2)` pooled ones.
fn check(plane: &[f32], w: usize, pooled: &[f32]) -> (usize, usize) {
    let (h, out_w) = (plane.len() / w.max(1), w / 2);
    assert!(
        w >= 2 && h >= 2 && plane.len() == h * w && pooled.len() == (h / 2) * out_w,
        "max_relu_avx512: a plane of {} values, width {w}, pooled to {}",
        plane.len(),
        pooled.len()
    );
    (h / 2, out_w)
}

/// The pooled values of one plane `x` of width `w`: `max_pool_2x2_plane_values` of the
/// rectified normalised plane.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn forward_plane(x: &[f32], w: usize, map: &PlaneMap, out: &mut [f32]) {
    let (out_h, out_w) = check(x, w, out);
    let lanes = Lanes::new();
    for oh in 0..out_h {
        let top = 2 * oh * w;
        for first in (0..out_w).step_by(STEP) {
            let masks = StepMasks::new((out_w - first).min(STEP));
            // SAFETY: the masks cover columns 2·first.. below 2·out_w <= w of rows 2·oh and
            // 2·oh + 1 < h; the stored windows lie in `out`'s row oh.
            unsafe {
                let at = x.as_ptr().add(top + 2 * first);
                let (t0, t1) = normalised_pairs(at, masks, map, &lanes);
                let (b0, b1) = normalised_pairs(at.add(w), masks, map, &lanes);
                let corners = [t0, t1, b0, b1].map(|z| rectify(z, map.rectifier));
                let (best, _) = scan(corners);
                let dst = out.as_mut_ptr().add(oh * out_w + first);
                _mm512_mask_storeu_ps(dst, masks.windows, best);
            }
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
    let lanes = Lanes::new();
    let slope = _mm512_set1_ps(map.rectifier.slope());
    let derivative = |z: __m512, g: __m512| {
        let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, _mm512_setzero_ps());
        _mm512_mask_blend_ps(positive, _mm512_mul_ps(g, slope), g)
    };
    for oh in 0..out_h {
        let top = 2 * oh * w;
        for first in (0..out_w).step_by(STEP) {
            let masks = StepMasks::new((out_w - first).min(STEP));
            // SAFETY: as in forward_plane, for `x` and `grad_input` alike, and the pooled
            // gradient's row oh.
            unsafe {
                let at = x.as_ptr().add(top + 2 * first);
                let (t0, t1) = normalised_pairs(at, masks, map, &lanes);
                let (b0, b1) = normalised_pairs(at.add(w), masks, map, &lanes);
                let z = [t0, t1, b0, b1];
                let (_, [take1, take2, take3]) = scan(z.map(|z| rectify(z, map.rectifier)));
                let g = _mm512_maskz_loadu_ps(masks.windows, grad.as_ptr().add(oh * out_w + first));
                let routed = _mm512_add_ps(_mm512_setzero_ps(), g);
                let winners = [
                    !(take1 | take2 | take3),
                    take1 & !(take2 | take3),
                    take2 & !take3,
                    take3,
                ];
                let [g0, g1, g2, g3]: [__m512; 4] = std::array::from_fn(|k| {
                    derivative(z[k], _mm512_maskz_mov_ps(winners[k], routed))
                });
                let dst = grad_input.as_mut_ptr().add(top + 2 * first);
                for (row, (even, odd)) in [(dst, (g0, g1)), (dst.add(w), (g2, g3))] {
                    let low = _mm512_permutex2var_ps(even, lanes.interleave_low, odd);
                    let high = _mm512_permutex2var_ps(even, lanes.interleave_high, odd);
                    _mm512_mask_storeu_ps(row, masks.low, low);
                    _mm512_mask_storeu_ps(row.add(16), masks.high, high);
                }
            }
        }
    }
    // No window covers the last column of an odd width or the last row of an odd height:
    // a zero gradient through the derivative.
    let uncovered = |x: f32| {
        let z = (x - map.mean) * map.scale + map.shift;
        if z > 0.0 {
            0.0
        } else {
            0.0 * map.rectifier.slope()
        }
    };
    if w % 2 == 1 {
        for row in 0..2 * out_h {
            let i = row * w + w - 1;
            grad_input[i] = uncovered(x[i]);
        }
    }
    if (x.len() / w) % 2 == 1 {
        let last = x.len() - w;
        for (g, &v) in grad_input[last..].iter_mut().zip(&x[last..]) {
            *g = uncovered(v);
        }
    }
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

    #[test]
    fn planes_give_the_portable_stages_bits() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("max_relu_avx512: skipped, this CPU lacks AVX-512");
            return;
        }
        // Odd and even sizes, one step and several (16 windows a step), partial steps.
        let sizes = [
            (2, 2),
            (3, 3),
            (28, 28),
            (14, 14),
            (7, 9),
            (5, 34),
            (4, 33),
            (6, 70),
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
                let mut fast_pooled = vec![f32::NAN; pooled.len()];
                let mut fast_grad = vec![f32::NAN; x.len()];
                // SAFETY: the CPU has AVX-512 F (checked above).
                unsafe {
                    forward_plane(&x, w, &map, &mut fast_pooled);
                    backward_plane(&x, w, &map, &grad, &mut fast_grad);
                }
                let what = format!("{h}x{w} {rectifier:?}");
                assert_eq!(bits(&fast_pooled), bits(&pooled), "pooled {what}");
                assert_eq!(bits(&fast_grad), bits(&grad_input), "grad_input {what}");
            }
        }
    }
}
