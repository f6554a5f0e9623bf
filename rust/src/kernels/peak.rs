//! Machine limits measured in-process, so benchmarks can quote a fraction of peak.

use std::time::Instant;

/// This thread's CPU time where the system gives it (so that time spent preempted by other
/// processes on a shared machine does not lower the peak: a peak measured low makes every
/// kernel look closer to it than it is), else the wall clock.
enum ThreadClock {
    #[cfg(unix)]
    Cpu(f64),
    Wall(Instant),
}

impl ThreadClock {
    #[cfg(unix)]
    fn cpu_seconds() -> Option<f64> {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec for the call to fill.
        let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
        (status == 0).then_some(now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9)
    }

    fn now() -> ThreadClock {
        #[cfg(unix)]
        if let Some(seconds) = ThreadClock::cpu_seconds() {
            return ThreadClock::Cpu(seconds);
        }
        ThreadClock::Wall(Instant::now())
    }

    fn elapsed_seconds(&self) -> f64 {
        match self {
            #[cfg(unix)]
            ThreadClock::Cpu(start) => {
                ThreadClock::cpu_seconds().map_or(f64::INFINITY, |now| now - start)
            }
            ThreadClock::Wall(start) => start.elapsed().as_secs_f64(),
        }
    }
}

use crate::simd::Level;

/// Independent FMA chains per call: enough to cover the FMA latency on current cores.
const CHAINS: usize = 12;

/// `CHAINS` chains of `LANES`-wide FMAs (one register each at the matching level), or of a
/// multiply then an add when not `FUSED` (portable code has no FMA instruction).
#[inline(always)]
fn fma_chains<const LANES: usize, const FUSED: bool>(iterations: u64, seed: f32) -> f32 {
    let mut acc = [[seed; LANES]; CHAINS];
    let (a, b) = (0.999_999f32, 1e-7f32);
    for _ in 0..iterations {
        for chain in acc.iter_mut() {
            for v in chain.iter_mut() {
                *v = if FUSED { v.mul_add(a, b) } else { *v * a + b };
            }
        }
    }
    acc.iter().flatten().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iterations: u64, seed: f32) -> f32 {
    fma_chains::<8, true>(iterations, seed)
}

/// [`fma_chains`] on 16 lanes, in intrinsics: LLVM turns the generic loop at 16 lanes into
/// gathers and scatters through memory (under 1 GFLOP/s), not 12 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512cd,avx512dq,avx512vl")]
unsafe fn fma_chains_avx512(iterations: u64, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(seed); CHAINS];
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    for _ in 0..iterations {
        for chain in acc.iter_mut() {
            *chain = _mm512_fmadd_ps(*chain, a, b);
        }
    }
    let mut lanes = [0.0f32; 16];
    let mut total = 0.0;
    for chain in acc {
        // `lanes` holds 16 floats; storeu needs no alignment.
        _mm512_storeu_ps(lanes.as_mut_ptr(), chain);
        total += lanes.iter().sum::<f32>();
    }
    total
}

/// Single-thread float32 FMA throughput in GFLOP/s (2 flops per FMA), over about
/// `seconds` seconds of this thread's CPU time, at the SIMD level in use (the widest the CPU has unless lowered;
/// at the portable level, SSE multiplies and adds, which is what its kernels run).
pub fn fma_gflops(seconds: f64) -> f64 {
    let level = crate::simd::level();
    let lanes = match level {
        Level::Avx512 => 16,
        Level::Avx2 => 8,
        Level::Scalar => 4,
    };
    let run = |iterations: u64| {
        #[cfg(target_arch = "x86_64")]
        match level {
            // SAFETY: simd::level() names only levels the CPU has.
            Level::Avx512 => return unsafe { fma_chains_avx512(iterations, 1.0) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { fma_chains_avx2(iterations, 1.0) },
            Level::Scalar => {}
        }
        fma_chains::<4, false>(iterations, 1.0)
    };
    let mut iterations = 1_000u64;
    loop {
        let start = ThreadClock::now();
        std::hint::black_box(run(std::hint::black_box(iterations)));
        let elapsed = start.elapsed_seconds();
        if elapsed >= seconds {
            let flops = 2.0 * (iterations as f64) * (CHAINS * lanes) as f64;
            return flops / elapsed / 1e9;
        }
        iterations = iterations.saturating_mul(if elapsed < seconds / 10.0 { 8 } else { 2 });
    }
}

/// The round trip of one cache line between two threads, in nanoseconds: one thread
/// writes a counter, the other answers on the same line, for about `seconds` of wall
/// clock; the median of ten batches. On two idle cores it is what any data one core
/// hands the other costs in latency: tens of nanoseconds between cores that share a
/// cache, several hundred between cores that do not (a virtual machine's two CPUs may
/// move between the two from one minute to the next). A waiting thread spins, then
/// yields, so that the measure also ends on a machine with one core free (slowly). Fails
/// only if the second thread cannot be started.
pub fn core_round_trip_ns(seconds: f64) -> std::io::Result<f64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Spins between yields while waiting for the other thread.
    const SPINS: u32 = 1 << 14;
    /// Wait until `line` holds a value `done` accepts, and return it.
    fn wait_until(line: &AtomicU64, done: impl Fn(u64) -> bool) -> u64 {
        let mut spins = 0u32;
        loop {
            let value = line.load(Ordering::Acquire);
            if done(value) {
                return value;
            }
            spins += 1;
            if spins.is_multiple_of(SPINS) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
    const BATCHES: usize = 10;
    let line = Arc::new(AtomicU64::new(0));
    let answer = Arc::clone(&line);
    // The other thread answers each odd value with the next even one until told to stop
    // (u64::MAX).
    let answerer = std::thread::Builder::new().spawn(move || {
        let mut seen = 0u64;
        loop {
            let value = wait_until(&answer, |value| value != seen);
            if value == u64::MAX {
                return;
            }
            answer.store(value + 1, Ordering::Release);
            seen = value + 1;
        }
    })?;
    let mut value = 0u64;
    let mut round_trips = |count: u64| {
        let start = Instant::now();
        for _ in 0..count {
            line.store(value + 1, Ordering::Release);
            wait_until(&line, |answered| answered == value + 2);
            value += 2;
        }
        start.elapsed().as_secs_f64()
    };
    // Size a batch: four times the round trips until one takes a fortieth of `seconds`,
    // so that the ten take a quarter of it to all of it.
    let mut count = 64u64;
    while round_trips(count) < seconds / BATCHES as f64 / 4.0 && count < 1 << 40 {
        count *= 4;
    }
    let mut batches: Vec<f64> = (0..BATCHES)
        .map(|_| round_trips(count) / count as f64 * 1e9)
        .collect();
    line.store(u64::MAX, Ordering::Release);
    answerer
        .join()
        .expect("the answering thread does not panic");
    batches.sort_by(f64::total_cmp);
    Ok(batches[BATCHES / 2])
}
