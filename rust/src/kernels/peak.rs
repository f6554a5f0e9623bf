//! Machine limits measured in-process, so benchmarks can quote a fraction of peak.

use std::time::Instant;

/// Independent FMA chains per call: enough to cover the FMA latency on current cores.
const CHAINS: usize = 12;

#[inline(always)]
fn fma_chains(iterations: u64, seed: f32) -> f32 {
    let mut acc = [[seed; 8]; CHAINS];
    let (a, b) = (0.999_999f32, 1e-7f32);
    for _ in 0..iterations {
        for chain in acc.iter_mut() {
            for v in chain.iter_mut() {
                *v = v.mul_add(a, b);
            }
        }
    }
    acc.iter().flatten().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iterations: u64, seed: f32) -> f32 {
    fma_chains(iterations, seed)
}

/// Single-thread float32 FMA throughput in GFLOP/s (2 flops per FMA), over about
/// `seconds` seconds, on the AVX2+FMA path when the CPU has it.
pub fn fma_gflops(seconds: f64) -> f64 {
    let run = |iterations: u64| {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::cpu_has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { fma_chains_avx2(iterations, 1.0) };
        }
        fma_chains(iterations, 1.0)
    };
    let mut iterations = 1_000u64;
    loop {
        let start = Instant::now();
        std::hint::black_box(run(std::hint::black_box(iterations)));
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed >= seconds {
            let flops = 2.0 * (iterations as f64) * (CHAINS * 8) as f64;
            return flops / elapsed / 1e9;
        }
        iterations = iterations.saturating_mul(if elapsed < seconds / 10.0 { 8 } else { 2 });
    }
}
