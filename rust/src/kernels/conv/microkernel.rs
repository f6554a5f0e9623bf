//! The small-K product: weight (C_out × K) · unfolded image (K × P) for first layers
//! with few unfolded rows, in AVX2+FMA intrinsics and in portable code.

use crate::simd_dispatch;

/// Unfolded rows up to which the small-K product replaces the GEMM.
pub(super) const SMALL_K: usize = 32;

/// out (C_out × P, row c at `out[c * out_ld]`) = weight (C_out × K) · col (K × P)
/// (+ bias), K <= 32, for first layers on one or three channels: with AVX2 and FMA
/// intrinsics when the AVX2 path is on (fused multiply-adds: within float32 rounding of
/// the portable path, not bit-equal). Each pixel's sum is the same whatever P, so a
/// tile of an image gives the bits of the whole.
pub(super) fn small_k_product(
    weight: &[f32],
    col: &[f32],
    k: usize,
    pixels: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    out_ld: usize,
) {
    let channels = weight.len() / k;
    assert!(
        k <= SMALL_K
            && col.len() >= k * pixels
            && out_ld >= pixels
            && out.len() >= (channels - 1) * out_ld + pixels,
        "small_k_product: operands too short"
    );
    if let Some(b) = bias {
        assert!(b.len() >= channels, "small_k_product: bias too short");
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::use_avx2() {
        // SAFETY: the AVX2 path is on only for CPUs with AVX2 and FMA; lengths checked above.
        unsafe { small_k_product_fma(weight, col, k, pixels, bias, out, out_ld) };
        return;
    }
    small_k_product_portable(weight, col, k, pixels, bias, out, out_ld);
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
    out_ld: usize,
) {
    use std::arch::x86_64::*;
    let channels = weight.len() / k;
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
            let dst = y.add(co * out_ld + start);
            _mm256_storeu_ps(dst, a0);
            _mm256_storeu_ps(dst.add(8), a1);
            _mm256_storeu_ps(dst.add(16), a2);
            _mm256_storeu_ps(dst.add(24), a3);
            if pair {
                let dst = y.add((co + 1) * out_ld + start);
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
            *y.add(co * out_ld + px) = acc;
        }
    }
}

simd_dispatch! {
    /// [`small_k_product`] in portable code: a block of 32 pixels is loaded once and
    /// reused for every output channel, with four independent accumulators of eight
    /// lanes so the adds do not wait on each other.
    fn small_k_product_portable(weight: &[f32], col: &[f32], k: usize, pixels: usize,
                       bias: Option<&[f32]>, out: &mut [f32], out_ld: usize) {
        const BLOCK: usize = 32;
        let channels = weight.len() / k;
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
                let dst = &mut out[co * out_ld + start..co * out_ld + start + width];
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::tests::values;

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
            small_k_product_portable(&weight, &col, k, pixels, Some(&bias), &mut portable, pixels);
            let mut fused = vec![0.0f32; channels * pixels];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: checked above that the CPU has AVX2 and FMA; lengths are exact.
            unsafe {
                small_k_product_fma(&weight, &col, k, pixels, Some(&bias), &mut fused, pixels)
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
}
