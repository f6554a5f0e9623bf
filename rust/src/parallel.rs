//! The thread pool and work splitting that keep results independent of the thread count.
//!
//! Work is cut into chunks whose size depends only on the problem size, never on the
//! number of threads, and partial results are combined in chunk order. rayon then only
//! decides *who* computes a chunk, not *what* is computed, so every result is bit-identical
//! at any thread count.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use rayon::{ThreadPool, ThreadPoolBuilder};

/// Elements per chunk for element-wise work: large enough to amortise scheduling,
/// small enough to balance two to a few dozen threads on typical layer sizes.
pub const ELEMENTWISE_CHUNK: usize = 1 << 15;

struct Pool {
    pool: Arc<ThreadPool>,
    threads: usize,
    pid: u32,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// Most threads a pool may have: far above any core count, far below what would exhaust
/// the system's thread limit.
pub const MAX_THREADS: usize = 1024;

/// The environment variable that sets the default number of threads.
pub const NUM_THREADS_ENV: &str = "BNRS_NUM_THREADS";

/// The thread count a `BNRS_NUM_THREADS` value asks for (1 to [`MAX_THREADS`],
/// surrounding spaces allowed), or why the value is refused.
pub fn parse_num_threads(value: &str) -> Result<usize, String> {
    value
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_THREADS).contains(n))
        .ok_or_else(|| format!("expected an int in [1, {MAX_THREADS}], got '{value}'"))
}

/// The default thread count, and the warning to give if `BNRS_NUM_THREADS` was refused.
struct DefaultThreads {
    threads: usize,
    refused: Option<String>,
}

/// `BNRS_NUM_THREADS`, else the number of cores; read once (the core count reads cgroup
/// files, too slow to repeat per call), at import since the module warms up.
fn default_setting() -> &'static DefaultThreads {
    static DEFAULT: std::sync::OnceLock<DefaultThreads> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(|| {
        let cores = || std::thread::available_parallelism().map_or(1, |n| n.get());
        let Some(raw) = std::env::var_os(NUM_THREADS_ENV) else {
            return DefaultThreads {
                threads: cores(),
                refused: None,
            };
        };
        let requested = match raw.to_str() {
            Some(value) => parse_num_threads(value),
            None => Err(format!(
                "expected an int in [1, {MAX_THREADS}], got {raw:?} (not valid UTF-8)"
            )),
        };
        match requested {
            Ok(threads) => DefaultThreads {
                threads,
                refused: None,
            },
            // A bad value must not stop the program: the cores are a safe default, and
            // the warning says the setting had no effect.
            Err(why) => {
                let threads = cores();
                DefaultThreads {
                    threads,
                    refused: Some(format!(
                        "{NUM_THREADS_ENV}: {why}; ignored, using the default: {threads} \
                         (the number of cores)"
                    )),
                }
            }
        }
    })
}

fn default_threads() -> usize {
    default_setting().threads
}

/// Why the value of `BNRS_NUM_THREADS` was ignored, if it was (for a warning).
pub fn num_threads_env_refusal() -> Option<&'static str> {
    default_setting().refused.as_deref()
}

fn build(threads: usize) -> Result<Pool, String> {
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bnrs-{i}"))
        .build()
        .map_err(|e| format!("could not start a pool of {threads} threads: {e}"))?;
    Ok(Pool {
        pool: Arc::new(pool),
        threads,
        pid: std::process::id(),
    })
}

/// The pool, rebuilt in a child process after `fork` (whose copy has no threads).
fn current_pool() -> Arc<ThreadPool> {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    match guard.as_ref() {
        Some(p) if p.pid == pid => p.pool.clone(),
        stale => {
            let threads = stale.map_or_else(default_threads, |p| p.threads);
            // If the system refuses that many threads, one still computes the same result.
            let fresh = build(threads)
                .or_else(|_| build(1))
                .unwrap_or_else(|e| panic!("bnrs: {e}"));
            let pool = fresh.pool.clone();
            // A pool inherited through fork has no threads behind it: leak it rather than
            // run its destructor, which would wait for threads that do not exist.
            if let Some(old) = guard.take() {
                std::mem::forget(old);
            }
            *guard = Some(fresh);
            pool
        }
    }
}

/// Number of threads the kernels use (`BNRS_NUM_THREADS`, else the number of cores).
pub fn num_threads() -> usize {
    let guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    guard.as_ref().map_or_else(default_threads, |p| p.threads)
}

/// Use `threads` threads (at least 1) from now on. If the system cannot start them, the
/// error says why and the current pool is kept.
pub fn set_num_threads(threads: usize) -> Result<(), String> {
    let threads = threads.max(1);
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if guard
        .as_ref()
        .is_some_and(|p| p.threads == threads && p.pid == std::process::id())
    {
        return Ok(());
    }
    let fresh = build(threads)?;
    if let Some(old) = guard.replace(fresh) {
        if old.pid != std::process::id() {
            std::mem::forget(old); // inherited through fork: no threads to stop
        }
    }
    Ok(())
}

/// Make `fork` safe while other threads use bnrs: the pool's and the buffer cache's locks
/// are taken before the fork and released after it in both processes, so the child never
/// inherits them locked, and the child starts with no kernel running. Registered once,
/// at import.
pub fn prepare_for_fork() {
    #[cfg(unix)]
    {
        static REGISTERED: std::sync::Once = std::sync::Once::new();
        REGISTERED.call_once(|| {
            // SAFETY: the handlers are plain functions that only lock and unlock mutexes and
            // store atomics, which is what pthread_atfork handlers may do.
            // It fails only without memory for the registration; bnrs then works as
            // before, minus the guarantee for a fork in the middle of a kernel call.
            let _ = unsafe {
                libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child))
            };
        });
    }
}

/// The locks held across a fork: the pool's and the output buffer cache's.
#[cfg(unix)]
type ForkGuards = (
    std::sync::MutexGuard<'static, Option<Pool>>,
    std::sync::MutexGuard<'static, crate::buffers::Cache>,
);

#[cfg(unix)]
thread_local! {
    static HELD_FOR_FORK: std::cell::RefCell<Option<ForkGuards>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(unix)]
extern "C" fn fork_prepare() {
    // Always in this order (nothing else ever holds both), so this cannot deadlock.
    let pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let buffers = crate::buffers::lock_for_fork();
    let _ = HELD_FOR_FORK.try_with(|held| *held.borrow_mut() = Some((pool, buffers)));
}

#[cfg(unix)]
extern "C" fn fork_parent() {
    let _ = HELD_FOR_FORK.try_with(|held| held.borrow_mut().take());
}

#[cfg(unix)]
extern "C" fn fork_child() {
    // The kernels that were running belong to threads the child does not have.
    RUNNING.store(0, Ordering::SeqCst);
    STOP.store(false, Ordering::SeqCst);
    let _ = HELD_FOR_FORK.try_with(|held| held.borrow_mut().take());
}

static STOP: AtomicBool = AtomicBool::new(false);
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Whether running kernels should stop early (an interrupt arrived). Kernels check it
/// between chunks of work; a job that saw it set is reported as interrupted, never as a
/// result.
#[inline]
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// How [`run_interruptible`] ended.
pub enum Outcome<R> {
    /// The job finished undisturbed.
    Done(R),
    /// The caller's poll asked to stop (its value is kept), or another caller's did while
    /// this job ran (`None`); partial results were discarded.
    Interrupted(Option<Box<dyn std::any::Any + Send>>),
}

/// Counts a running job in [`RUNNING`] for its lifetime, whatever way it ends (a panic
/// included): STOP is cleared when the last running job ends, never while one runs.
struct Running;

impl Running {
    fn start() -> Running {
        RUNNING.fetch_add(1, Ordering::SeqCst);
        Running
    }

    /// Whether a stop was requested while this job ran (so it may have ended early).
    fn stopped(&self) -> bool {
        STOP.load(Ordering::SeqCst)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if RUNNING.fetch_sub(1, Ordering::SeqCst) == 1 {
            STOP.store(false, Ordering::SeqCst);
        }
    }
}

/// Run `job` in the pool, without watching for interrupts itself; if another caller's
/// interrupt asked the kernels to stop while it ran, its (possibly partial) result is
/// discarded: `Interrupted(None)`.
pub fn run_in_pool<R: Send>(job: impl FnOnce() -> R + Send) -> Outcome<R> {
    let pool = current_pool();
    let running = Running::start();
    let result = pool.install(job);
    if running.stopped() {
        Outcome::Interrupted(None)
    } else {
        Outcome::Done(result)
    }
}

/// Run `job` in the pool while the calling thread calls `poll` every `interval`. When
/// `poll` returns `Some(reason)`, every running kernel is asked to stop
/// ([`stop_requested`]) and the job's result is discarded.
pub fn run_interruptible<R: Send>(
    job: impl FnOnce() -> R + Send,
    interval: Duration,
    mut poll: impl FnMut() -> Option<Box<dyn std::any::Any + Send>>,
) -> Outcome<R> {
    let pool = current_pool();
    let running = Running::start();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut result = None;
    let mut reason = None;
    pool.in_place_scope(|scope| {
        let slot = &mut result;
        scope.spawn(move |_| {
            *slot = Some(job());
            // The receiver outlives the scope, so the send cannot fail.
            let _ = done_tx.send(());
        });
        while let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(interval) {
            if reason.is_none() {
                if let Some(r) = poll() {
                    reason = Some(r);
                    STOP.store(true, Ordering::SeqCst);
                }
            }
        }
    });
    // STOP is only cleared when no job runs, so a job that overlapped an interrupt sees it.
    let stopped = running.stopped();
    drop(running);
    match (reason, stopped) {
        (Some(r), _) => Outcome::Interrupted(Some(r)),
        (None, true) => Outcome::Interrupted(None),
        (None, false) => Outcome::Done(result.expect("the job ran to completion")),
    }
}

/// Chunk length for `len` items split into at most `max_chunks` chunks of at least
/// `min_len` items. Depends only on its arguments, so on the problem size.
pub fn chunk_len(len: usize, min_len: usize, max_chunks: usize) -> usize {
    let by_count = len.div_ceil(max_chunks.max(1));
    by_count.max(min_len).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_from_the_environment() {
        assert_eq!(parse_num_threads("3"), Ok(3));
        assert_eq!(parse_num_threads(" 1024 "), Ok(1024));
        for bad in ["0", "abc", "99999", "-1", "", "2.5"] {
            assert_eq!(
                parse_num_threads(bad),
                Err(format!("expected an int in [1, 1024], got '{bad}'"))
            );
        }
    }
}
