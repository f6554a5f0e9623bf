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
    let mut total = fold_lanes(acc);
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
