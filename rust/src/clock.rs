//! The time spent inside kernels, for measuring what a training step spends outside them
//! (Python, bindings, output allocation). Off unless switched on (`bnrs._core.
//! _kernel_clock(True)`): then every kernel call adds the CPU time of the thread that
//! runs it, which at one kernel thread is all of the call's work, and is not inflated
//! by a machine shared with other work as wall time would be.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(false);
static KERNEL_NANOS: AtomicU64 = AtomicU64::new(0);
static KERNEL_CALLS: AtomicU64 = AtomicU64::new(0);

/// Count kernel time from now on (`true`) or stop counting.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// The calling thread's CPU time in nanoseconds.
#[cfg(unix)]
fn thread_cpu_nanos() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

/// Wall time where there is no thread CPU clock.
#[cfg(not(unix))]
fn thread_cpu_nanos() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Run `kernel`; while the clock is on, add its CPU time to the kernel time.
#[inline]
pub fn timed<T>(kernel: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return kernel();
    }
    let start = thread_cpu_nanos();
    let result = kernel();
    let spent = thread_cpu_nanos().saturating_sub(start);
    KERNEL_NANOS.fetch_add(spent, Ordering::Relaxed);
    KERNEL_CALLS.fetch_add(1, Ordering::Relaxed);
    result
}

/// The cost of one reading of the clock, in seconds: the fastest of a few loops of
/// readings (other work on the machine only ever adds time).
pub fn read_seconds() -> f64 {
    const READS: u32 = 2000;
    (0..7)
        .map(|_| {
            let start = std::time::Instant::now();
            for _ in 0..READS {
                std::hint::black_box(thread_cpu_nanos());
            }
            start.elapsed().as_secs_f64() / f64::from(READS)
        })
        .fold(f64::INFINITY, f64::min)
}

/// Kernel seconds counted so far (every thread's calls added up), and the number of
/// calls counted: each holds about one reading of the clock (a system call of about a
/// microsecond), which a measurement may subtract.
pub fn kernel_time() -> (f64, u64) {
    (
        KERNEL_NANOS.load(Ordering::Relaxed) as f64 * 1e-9,
        KERNEL_CALLS.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timed_calls_add_up_while_the_clock_is_on() {
        // A fixed amount of work, not a wall-clock spin: on a busy machine a thread
        // spinning for 3 ms of wall time may be given far less CPU time than that.
        // 2^24 additions through memory take well over a millisecond on any CPU.
        let spin = || {
            let mut x = 0u64;
            for _ in 0..1u32 << 24 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            x
        };
        super::set_enabled(true);
        let before = super::kernel_time();
        super::timed(spin);
        super::set_enabled(false);
        let after = super::kernel_time();
        assert!(after.0 - before.0 >= 0.001, "{after:?}");
        assert!(after.1 > before.1);
        super::timed(spin);
        assert_eq!(super::kernel_time(), after);
        let read = super::read_seconds();
        assert!(read > 0.0 && read < 1e-3, "{read}");
    }
}
