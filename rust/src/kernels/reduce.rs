//! Sums with a fixed association order: eight interleaved lanes, then the lanes in order.
//!
//! The same order on every code path and thread count, so results are reproducible bit
//! for bit; the eight lanes map onto one AVX2 register when compiled for it.

const LANES: usize = 8;

#[inline(always)]
fn fold_lanes(acc: [f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Σ x.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    // Opaque lanes: seen through, LLVM's SLP vectoriser shaped the loop after the fold's
    // pairs (four 2-wide vectors and shuffles per chunk) instead of one 8-wide add.
    let mut total = fold_lanes(std::hint::black_box(acc));
    for &v in chunks.remainder() {
        total += v;
    }
    total
}

/// (Σ (x - shift), Σ (x - shift)²).
#[inline(always)]
pub fn shifted_sums(x: &[f32], shift: f32) -> (f32, f32) {
    let mut s1 = [0.0f32; LANES];
    let mut s2 = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let d = c[l] - shift;
            s1[l] += d;
            s2[l] += d * d;
        }
    }
    let (mut t1, mut t2) = (fold_lanes(s1), fold_lanes(s2));
    for &v in chunks.remainder() {
        let d = v - shift;
        t1 += d;
        t2 += d * d;
    }
    (t1, t2)
}

/// (Σ g, Σ g·(x - mean)).
#[inline(always)]
pub fn grad_sums(g: &[f32], x: &[f32], mean: f32) -> (f32, f32) {
    let mut s1 = [0.0f32; LANES];
    let mut s2 = [0.0f32; LANES];
    let mut gc = g.chunks_exact(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (a, b) in (&mut gc).zip(&mut xc) {
        for l in 0..LANES {
            s1[l] += a[l];
            s2[l] += a[l] * (b[l] - mean);
        }
    }
    let (mut t1, mut t2) = (fold_lanes(s1), fold_lanes(s2));
    for (&a, &b) in gc.remainder().iter().zip(xc.remainder()) {
        t1 += a;
        t2 += a * (b - mean);
    }
    (t1, t2)
}

/// [`grad_sums`] with its eight lanes in one AVX register: the same additions and
/// multiplications per lane in the same order, then the same fold and tail, so the same
/// bits. The portable loop, compiled for AVX2 or AVX-512, came out of LLVM's SLP
/// vectoriser as two-lane pieces with scalar multiplies (the fused block's per-plane
/// gradient sums, 5.8% of the LeNetBN training step at 1 thread).
///
/// # Safety
/// The CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub unsafe fn grad_sums_avx(g: &[f32], x: &[f32], mean: f32) -> (f32, f32) {
    use std::arch::x86_64::*;
    const { assert!(LANES == 8) };
    let n = g.len().min(x.len());
    let full = n - n % LANES;
    let (mut s1, mut s2) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let m = _mm256_set1_ps(mean);
    for i in (0..full).step_by(LANES) {
        // SAFETY: i + LANES <= full <= both lengths.
        let (a, b) = unsafe {
            (
                _mm256_loadu_ps(g.as_ptr().add(i)),
                _mm256_loadu_ps(x.as_ptr().add(i)),
            )
        };
        s1 = _mm256_add_ps(s1, a);
        s2 = _mm256_add_ps(s2, _mm256_mul_ps(a, _mm256_sub_ps(b, m)));
    }
    let (mut l1, mut l2) = ([0.0f32; LANES], [0.0f32; LANES]);
    // SAFETY: stores of one register into arrays of its eight lanes.
    unsafe {
        _mm256_storeu_ps(l1.as_mut_ptr(), s1);
        _mm256_storeu_ps(l2.as_mut_ptr(), s2);
    }
    let (mut t1, mut t2) = (fold_lanes(l1), fold_lanes(l2));
    for (&a, &b) in g[full..n].iter().zip(&x[full..n]) {
        t1 += a;
        t2 += a * (b - mean);
    }
    (t1, t2)
}

/// The full `LANES`-wide chunks of four slices, in step.
#[inline(always)]
fn chunks4(v: [&[f32]; 4], full: usize) -> impl Iterator<Item = [&[f32]; 4]> {
    let c = |k: usize| v[k][..full].chunks_exact(LANES);
    c(0).zip(c(1))
        .zip(c(2).zip(c(3)))
        .map(|((a, b), (c, d))| [a, b, c, d])
}

/// [`shifted_sums`] of four slices of one length at once: each result has the bits of
/// `shifted_sums` on its slice (its own lanes, in the same order), but the four chains of
/// additions overlap in the pipeline instead of each waiting on its last addition.
#[inline(always)]
pub fn shifted_sums_x4(xs: [&[f32]; 4], shift: f32) -> [(f32, f32); 4] {
    #[inline(always)]
    fn step(s1: &mut [f32; LANES], s2: &mut [f32; LANES], c: &[f32], shift: f32) {
        for l in 0..LANES {
            let d = c[l] - shift;
            s1[l] += d;
            s2[l] += d * d;
        }
    }
    let n = xs[0].len();
    assert!(xs.iter().all(|x| x.len() == n), "slices of one length");
    let full = n - n % LANES;
    let mut s1 = [[0.0f32; LANES]; 4];
    let mut s2 = [[0.0f32; LANES]; 4];
    for [c0, c1, c2, c3] in chunks4(xs, full) {
        let [a0, a1, a2, a3] = &mut s1;
        let [b0, b1, b2, b3] = &mut s2;
        step(a0, b0, c0, shift);
        step(a1, b1, c1, shift);
        step(a2, b2, c2, shift);
        step(a3, b3, c3, shift);
    }
    std::array::from_fn(|k| {
        let (mut t1, mut t2) = (fold_lanes(s1[k]), fold_lanes(s2[k]));
        for &v in &xs[k][full..] {
            let d = v - shift;
            t1 += d;
            t2 += d * d;
        }
        (t1, t2)
    })
}

/// [`grad_sums`] of four pairs of slices of one length at once (each result the bits of
/// `grad_sums` on its pair; see [`shifted_sums_x4`]).
#[inline(always)]
pub fn grad_sums_x4(gs: [&[f32]; 4], xs: [&[f32]; 4], mean: f32) -> [(f32, f32); 4] {
    #[inline(always)]
    fn step(s1: &mut [f32; LANES], s2: &mut [f32; LANES], a: &[f32], b: &[f32], mean: f32) {
        for l in 0..LANES {
            s1[l] += a[l];
            s2[l] += a[l] * (b[l] - mean);
        }
    }
    let n = gs[0].len();
    assert!(
        gs.iter().chain(&xs).all(|v| v.len() == n),
        "slices of one length"
    );
    let full = n - n % LANES;
    let mut s1 = [[0.0f32; LANES]; 4];
    let mut s2 = [[0.0f32; LANES]; 4];
    for ([g0, g1, g2, g3], [x0, x1, x2, x3]) in chunks4(gs, full).zip(chunks4(xs, full)) {
        let [a0, a1, a2, a3] = &mut s1;
        let [b0, b1, b2, b3] = &mut s2;
        step(a0, b0, g0, x0, mean);
        step(a1, b1, g1, x1, mean);
        step(a2, b2, g2, x2, mean);
        step(a3, b3, g3, x3, mean);
    }
    std::array::from_fn(|k| {
        let (mut t1, mut t2) = (fold_lanes(s1[k]), fold_lanes(s2[k]));
        for (&a, &b) in gs[k][full..].iter().zip(&xs[k][full..]) {
            t1 += a;
            t2 += a * (b - mean);
        }
        (t1, t2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx_grad_sums_give_the_portable_bits() {
        if !std::arch::is_x86_feature_detected!("avx") {
            eprintln!("grad_sums_avx: skipped, this CPU lacks AVX");
            return;
        }
        let bits = |(a, b): (f32, f32)| (a.to_bits(), b.to_bits());
        for n in [0, 1, 7, 8, 9, 49, 196, 785] {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
                .collect();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 40.0) * 0.021)
                .collect();
            // SAFETY: the CPU has AVX (checked above).
            let fast = unsafe { grad_sums_avx(&g, &x, -0.2) };
            assert_eq!(bits(fast), bits(grad_sums(&g, &x, -0.2)), "n {n}");
        }
    }

    #[test]
    fn four_at_once_gives_the_bits_of_one_at_a_time() {
        for n in [0, 1, 7, 8, 9, 49, 196, 785] {
            let v = |k: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * 7 + k * 13) as f32 * 0.61).sin() * 3.0)
                    .collect()
            };
            let (g, x): (Vec<_>, Vec<_>) = (0..4).map(|k| (v(k), v(k + 4))).unzip();
            let gs = [&g[0][..], &g[1], &g[2], &g[3]];
            let xs = [&x[0][..], &x[1], &x[2], &x[3]];
            let bits = |(a, b): (f32, f32)| (a.to_bits(), b.to_bits());
            let shifted = shifted_sums_x4(xs, 0.3);
            let grads = grad_sums_x4(gs, xs, -0.2);
            for k in 0..4 {
                assert_eq!(bits(shifted[k]), bits(shifted_sums(xs[k], 0.3)), "n {n}");
                assert_eq!(bits(grads[k]), bits(grad_sums(gs[k], xs[k], -0.2)), "n {n}");
            }
        }
    }
}
