//! The thread pool and work splitting that keep results independent of the thread count.
//!
//! Work is cut into chunks whose size depends only on the problem size, never on the
//! number of threads, and partial results are combined in chunk order. rayon then only
//! decides *who* computes a chunk, not *what* is computed, so every result is bit-identical
//! at any thread count.

use std::sync::{Arc, Mutex};

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

fn default_threads() -> usize {
    std::env::var("BNRS_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn build(threads: usize) -> Pool {
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bnrs-{i}"))
        .build()
        .expect("failed to start the bnrs thread pool");
    Pool {
        pool: Arc::new(pool),
        threads,
        pid: std::process::id(),
    }
}

/// The pool, rebuilt in a child process after `fork` (whose copy has no threads).
fn current_pool() -> Arc<ThreadPool> {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    match guard.as_ref() {
        Some(p) if p.pid == pid => p.pool.clone(),
        stale => {
            let threads = stale.map_or_else(default_threads, |p| p.threads);
            let fresh = build(threads);
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

/// Use `threads` threads (at least 1) from now on.
pub fn set_num_threads(threads: usize) {
    let threads = threads.max(1);
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if guard
        .as_ref()
        .is_some_and(|p| p.threads == threads && p.pid == std::process::id())
    {
        return;
    }
    *guard = Some(build(threads));
}

/// Run `f` inside the bnrs pool, so its rayon calls use the configured threads.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    current_pool().install(f)
}

/// Chunk length for `len` items split into at most `max_chunks` chunks of at least
/// `min_len` items. Depends only on its arguments, so on the problem size.
pub fn chunk_len(len: usize, min_len: usize, max_chunks: usize) -> usize {
    let by_count = len.div_ceil(max_chunks.max(1));
    by_count.max(min_len).max(1)
}
