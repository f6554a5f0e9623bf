//! The thread pool and work splitting that keep results independent of the thread count.
//!
//! Work is cut into chunks whose size depends only on the problem size, never on the
//! number of threads, and partial results are combined in chunk order. rayon then only
//! decides *who* computes a chunk, not *what* is computed, so every result is bit-identical
//! at any thread count.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use rayon::{ThreadPool, ThreadPoolBuilder};

/// Most elements per chunk of element-wise work: large enough to amortise scheduling on
/// big arrays, small enough to balance two to a few dozen threads on them.
pub const ELEMENTWISE_CHUNK: usize = 1 << 15;

/// Fewest elements per chunk of element-wise work ([`elementwise_chunk`]): 32 KiB of
/// float32, a few microseconds of a memory-bound pass, well above rayon's cost per task.
pub const ELEMENTWISE_MIN_CHUNK: usize = 1 << 13;

/// Chunks an element-wise pass is cut into, up to [`ELEMENTWISE_CHUNK`] elements each.
const ELEMENTWISE_TARGET_CHUNKS: usize = 64;

/// Elements per chunk of an element-wise pass over `len` elements: about
/// [`ELEMENTWISE_TARGET_CHUNKS`] chunks, within [`ELEMENTWISE_MIN_CHUNK`] and
/// [`ELEMENTWISE_CHUNK`], a multiple of 1024 (whole SIMD blocks at every level, so a
/// chunk's scalar tail never moves). Depends only on `len`.
///
/// A fixed 32K chunk left the activations of a batch-64 LeNet in 4 to 25 chunks: 100,352
/// dropout values in 4 (three full, one of 2,048) cannot be split evenly by two threads.
pub fn elementwise_chunk(len: usize) -> usize {
    chunk_len(len, ELEMENTWISE_MIN_CHUNK, ELEMENTWISE_TARGET_CHUNKS)
        .next_multiple_of(1024)
        .min(ELEMENTWISE_CHUNK)
}

/// Elements a task of a memory-bound loop covers ([`task_items`]): 128 KiB of float32,
/// a few microseconds of work, far above rayon's cost per task (tens of nanoseconds).
pub const TASK_ELEMENTS: usize = 1 << 15;

/// Items per rayon task (`with_min_len` and `with_max_len`) of a loop over items of
/// `item_len` elements each (planes, channels): about [`TASK_ELEMENTS`] elements, at
/// least one item.
///
/// Left to itself, rayon cuts a loop into about two pieces per thread and splits a piece
/// again only when another thread steals it. The second thread wakes up tens of
/// microseconds into a call of a hundred or two: it stole a quarter or half of the
/// loop, and the first thread, done with the rest, sat idle (a batch-norm forward over
/// 32 channels scaled 1.06x at two threads). Tasks of a fixed size let the two share
/// the work to within one task. Who runs a task, not what it computes, depends on this,
/// so the bits do not.
pub fn task_items(item_len: usize) -> usize {
    (TASK_ELEMENTS / item_len.max(1)).max(1)
}

/// The pools: the process default (`BNRS_NUM_THREADS` or [`set_num_threads`]) and a few
/// of other sizes for calls made under a per-thread count ([`set_local_threads`]).
struct Pools {
    default: SizedPool,
    /// Most recently used last; at most [`MAX_OTHER_POOLS`].
    others: Vec<SizedPool>,
    pid: u32,
}

struct SizedPool {
    pool: Arc<ThreadPool>,
    threads: usize,
}

static POOLS: Mutex<Option<Pools>> = Mutex::new(None);

/// Pools kept besides the default one: enough for the few `n_threads` values a program
/// uses at once (a grid search over it, say), few enough that idle threads stay bounded.
/// An evicted pool lives on until the calls still running in it end.
const MAX_OTHER_POOLS: usize = 3;

/// Most threads a pool may have: far above any core count, far below what would exhaust
/// the system's thread limit.
pub const MAX_THREADS: usize = 1024;

thread_local! {
    /// The thread count of the kernel calls made from this thread, if it has its own.
    static LOCAL_THREADS: Cell<Option<usize>> = const { Cell::new(None) };
}

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

fn build(threads: usize) -> Result<SizedPool, String> {
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bnrs-{i}"))
        .build()
        .map_err(|e| format!("could not start a pool of {threads} threads: {e}"))?;
    Ok(SizedPool {
        pool: Arc::new(pool),
        threads,
    })
}

/// A pool of `threads` threads, or, if the system refuses that many, of one: one thread
/// computes the same result.
fn build_or_one(threads: usize) -> SizedPool {
    build(threads)
        .or_else(|_| build(1))
        .unwrap_or_else(|e| panic!("bnrs: {e}"))
}

/// The pools of this process: after `fork`, whose copies have no threads behind them, a
/// fresh default pool of the same size (the others are built again when asked for).
fn pools_here(guard: &mut Option<Pools>) -> &mut Pools {
    let pid = std::process::id();
    let mut threads = default_threads();
    if let Some(inherited) = guard.take_if(|p| p.pid != pid) {
        threads = inherited.default.threads;
        // Leak the inherited pools rather than run their destructors, which would wait
        // for threads that do not exist.
        std::mem::forget(inherited);
    }
    guard.get_or_insert_with(|| Pools {
        default: build_or_one(threads),
        others: Vec::new(),
        pid,
    })
}

impl Pools {
    /// The pool of `threads` threads, built if there is none.
    fn of_size(&mut self, threads: usize) -> Result<Arc<ThreadPool>, String> {
        if threads == self.default.threads {
            return Ok(self.default.pool.clone());
        }
        let sized = match self.others.iter().position(|p| p.threads == threads) {
            Some(i) => self.others.remove(i),
            None => build(threads)?,
        };
        let pool = sized.pool.clone();
        self.others.push(sized);
        if self.others.len() > MAX_OTHER_POOLS {
            self.others.remove(0);
        }
        Ok(pool)
    }
}

/// The pool for a kernel call from this thread: of its own thread count if it has one
/// ([`set_local_threads`]), else the default pool.
fn current_pool() -> Arc<ThreadPool> {
    let mut guard = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let pools = pools_here(&mut guard);
    match LOCAL_THREADS.get() {
        None => pools.default.pool.clone(),
        // Checked when it was set; should the system refuse the threads now, one thread
        // computes the same result.
        Some(threads) => pools
            .of_size(threads)
            .unwrap_or_else(|_| build_or_one(1).pool),
    }
}

/// Number of threads the kernel calls made from this thread use: its own count
/// ([`set_local_threads`]) if it has one, else the default (`BNRS_NUM_THREADS`, else the
/// number of cores, or what [`set_num_threads`] set).
pub fn num_threads() -> usize {
    if let Some(threads) = LOCAL_THREADS.get() {
        return threads;
    }
    let guard = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    guard
        .as_ref()
        .map_or_else(default_threads, |p| p.default.threads)
}

/// Use `threads` threads (at least 1) from now on, in every thread without a count of its
/// own. If the system cannot start them, the error says why and the current pool is kept.
pub fn set_num_threads(threads: usize) -> Result<(), String> {
    let threads = threads.max(1);
    let mut guard = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let pools = pools_here(&mut guard);
    if pools.default.threads == threads {
        return Ok(());
    }
    let fresh = match pools.others.iter().position(|p| p.threads == threads) {
        Some(i) => pools.others.remove(i),
        None => build(threads)?,
    };
    // The replaced pool's threads exit once the calls still running in it end.
    pools.default = fresh;
    Ok(())
}

/// Give the kernel calls made from this thread their own thread count (`Some`), or the
/// default again (`None`); returns the previous setting, for the caller to restore.
///
/// Per thread, so that concurrent callers (two `fit`s with different `n_threads`) neither
/// see nor undo each other's count, however their calls overlap: each call runs in a pool
/// of its caller's size. If the system cannot start the threads, the error says why and
/// nothing changes.
pub fn set_local_threads(threads: Option<usize>) -> Result<Option<usize>, String> {
    let threads = threads.map(|n| n.max(1));
    if let Some(n) = threads {
        let mut guard = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        pools_here(&mut guard).of_size(n)?;
    }
    Ok(LOCAL_THREADS.replace(threads))
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
    std::sync::MutexGuard<'static, Option<Pools>>,
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
    let pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let buffers = crate::buffers::lock_for_fork();
    let _ = HELD_FOR_FORK.try_with(|held| *held.borrow_mut() = Some((pools, buffers)));
}

#[cfg(unix)]
extern "C" fn fork_parent() {
    let _ = HELD_FOR_FORK.try_with(|held| held.borrow_mut().take());
}

#[cfg(unix)]
extern "C" fn fork_child() {
    let _ = HELD_FOR_FORK.try_with(|held| held.borrow_mut().take());
}

/// The stop request of one kernel call: set when its caller is interrupted, checked by
/// the call's kernel between chunks of work. Per call, so that an interrupt reaches only
/// the work of the thread it was meant for: calls from other threads, running in the same
/// pool at the same time, go on undisturbed.
#[derive(Clone, Default)]
pub struct StopToken(Option<Arc<AtomicBool>>);

impl StopToken {
    fn new() -> StopToken {
        StopToken(Some(Arc::new(AtomicBool::new(false))))
    }

    fn set(&self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// A token already set, for tests of what a kernel does once asked to stop.
    #[cfg(test)]
    pub(crate) fn already_set() -> StopToken {
        let token = StopToken::new();
        token.set();
        token
    }

    /// Whether the call should stop early (its caller was interrupted). A call that was
    /// asked to stop is reported as interrupted, never as a result.
    #[inline]
    pub fn is_set(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    }
}

thread_local! {
    /// The token of the kernel call whose job this pool thread started, for the job's
    /// kernel to take ([`stop_token`]).
    static CALL_STOP: RefCell<StopToken> = RefCell::new(StopToken::default());
}

/// The stop token of the kernel call running on this thread. A kernel takes it where it
/// starts, before its parallel loops, and the loops' closures capture it: inside a loop a
/// pool thread may be running a chunk stolen from another call's job, whose token is not
/// this thread's. Outside any call (Rust tests calling a kernel directly) nothing ever
/// sets it.
pub fn stop_token() -> StopToken {
    CALL_STOP.with(|token| token.borrow().clone())
}

/// Run `job` with `token` as this thread's [`stop_token`], then put back the one before:
/// a pool thread waiting inside one call's parallel loop may start another call's job,
/// which nests.
fn with_stop_token<R>(token: StopToken, job: impl FnOnce() -> R) -> R {
    struct Restore(Option<StopToken>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(previous) = self.0.take() {
                CALL_STOP.with(|token| *token.borrow_mut() = previous);
            }
        }
    }
    let _restore = Restore(Some(CALL_STOP.with(|current| current.replace(token))));
    job()
}

/// How [`run_interruptible`] ended.
pub enum Outcome<R> {
    /// The job finished undisturbed.
    Done(R),
    /// The caller's poll asked to stop (its value is kept); partial results were
    /// discarded.
    Interrupted(Box<dyn std::any::Any + Send>),
}

/// Run `job` in the pool of the calling thread's size, without watching for interrupts:
/// nothing stops it early. At one thread it runs on the calling thread itself
/// ([`own_thread_pool`]).
pub fn run_in_pool<R: Send>(job: impl FnOnce() -> R + Send) -> R {
    // A token of its own (never set), not that of whichever call's job the pool thread
    // that starts this one may be inside.
    let job = || with_stop_token(StopToken::default(), job);
    let pool = current_pool();
    if pool.current_num_threads() == 1 {
        if let Some(own) = own_thread_pool() {
            return own.install(job);
        }
    }
    pool.install(job)
}

/// Run `job` on the calling thread alone, whatever the pool's size: in the thread's own
/// one-thread pool ([`own_thread_pool`]), else (no pool of its own to be had) as
/// [`run_in_pool`]. For a call too short to gain from the pool's threads what handing it
/// to them costs; any thread count gives the same bits.
pub fn run_on_calling_thread<R: Send>(job: impl FnOnce() -> R + Send) -> R {
    if let Some(own) = own_thread_pool() {
        return own.install(|| with_stop_token(StopToken::default(), job));
    }
    run_in_pool(job)
}

thread_local! {
    /// [`own_thread_pool`]: not built yet (`None`), built, or refused (`Some(None)`).
    static OWN_THREAD_POOL: Cell<Option<Option<&'static ThreadPool>>> =
        const { Cell::new(None) };
}

/// Most threads given a pool of their own ([`own_thread_pool`]) in the life of the process.
/// rayon keeps such a pool's registry after its thread ends (about 7.6 KiB, measured over
/// 2,000 short-lived threads each making one call at one thread), so a program that starts
/// thread after thread (a server's thread per request) grew by that much per thread; past
/// this many, a thread's calls at one thread go to the shared one-thread pool instead (a
/// hand-off, two context switches per call). Enough for the threads a program keeps
/// (its main thread, a thread pool's workers).
const MAX_OWN_POOLS: usize = 64;

/// Pools of their own built so far ([`MAX_OWN_POOLS`]).
static OWN_POOLS_BUILT: AtomicUsize = AtomicUsize::new(0);

/// A pool of one thread, the calling thread itself, made on its first call at one thread
/// and kept for its later ones: `install` then runs the job where it is called. Handing a
/// call to a pool thread and waiting for it costs two context switches, measured at ~12 µs
/// of CPU (~30 µs of wall time) per call on the AMD EPYC, loaded: a tenth of the CPU time
/// of a batch-8 LeNetBN step through the layers, and about as much as its smallest
/// kernels. No other thread ever uses this pool, so the thread never waits for itself.
/// rayon keeps such a pool until the process ends (the thread is its worker from then on;
/// its calls at more threads wait for the other pool as rayon's nested pools do), so at
/// most [`MAX_OWN_POOLS`] threads get one. `None` if rayon refuses (a thread already in a
/// pool) or the threads before took them all.
fn own_thread_pool() -> Option<&'static ThreadPool> {
    own_thread_pool_within(&OWN_POOLS_BUILT, MAX_OWN_POOLS)
}

/// [`own_thread_pool`], `built` counting the pools built so far, at most `max`.
fn own_thread_pool_within(built: &AtomicUsize, max: usize) -> Option<&'static ThreadPool> {
    OWN_THREAD_POOL.with(|cell| {
        if let Some(pool) = cell.get() {
            return pool;
        }
        let claimed = built
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        let pool = claimed
            .then(|| {
                ThreadPoolBuilder::new()
                    .num_threads(1)
                    .use_current_thread()
                    .build()
                    .ok()
            })
            .flatten()
            .map(|pool| &*Box::leak(Box::new(pool)));
        if claimed && pool.is_none() {
            built.fetch_sub(1, Ordering::Relaxed);
        }
        cell.set(Some(pool));
        pool
    })
}

/// Run `job` in the pool of the calling thread's size while the calling thread calls
/// `poll` every `interval`. When `poll` returns `Some(reason)`, this call's kernel is asked
/// to stop ([`StopToken::is_set`]) and the job's result is discarded; other calls running
/// at the same time are not disturbed.
pub fn run_interruptible<R: Send>(
    job: impl FnOnce() -> R + Send,
    interval: Duration,
    mut poll: impl FnMut() -> Option<Box<dyn std::any::Any + Send>>,
) -> Outcome<R> {
    let pool = current_pool();
    let stop = StopToken::new();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut result = None;
    let mut reason = None;
    pool.in_place_scope(|scope| {
        let slot = &mut result;
        let job_stop = stop.clone();
        scope.spawn(move |_| {
            *slot = Some(with_stop_token(job_stop, job));
            // The receiver outlives the scope, so the send cannot fail.
            let _ = done_tx.send(());
        });
        while let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(interval) {
            if reason.is_none() {
                reason = poll();
                if reason.is_some() {
                    stop.set();
                }
            }
        }
    });
    match reason {
        Some(reason) => Outcome::Interrupted(reason),
        None => Outcome::Done(result.expect("the job ran to completion")),
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
    fn elementwise_chunks_are_whole_blocks_within_bounds() {
        assert_eq!(elementwise_chunk(1), ELEMENTWISE_MIN_CHUNK);
        assert_eq!(elementwise_chunk(100_352), ELEMENTWISE_MIN_CHUNK);
        assert_eq!(elementwise_chunk(802_816), 13_312);
        assert_eq!(elementwise_chunk(1 << 30), ELEMENTWISE_CHUNK);
        for len in [1, 1000, 65_537, 401_408, 3_000_000, 1 << 24] {
            let chunk = elementwise_chunk(len);
            assert!(chunk.is_multiple_of(1024), "{len}: {chunk}");
            assert!((ELEMENTWISE_MIN_CHUNK..=ELEMENTWISE_CHUNK).contains(&chunk));
        }
    }

    #[test]
    fn a_call_at_one_thread_runs_on_the_calling_thread() {
        use rayon::prelude::*;
        // A thread of its own: the thread count set here is this thread's only.
        std::thread::spawn(|| {
            let caller = std::thread::current().id();
            let sum = || (0..10_000u64).into_par_iter().sum::<u64>();
            set_local_threads(Some(1)).unwrap();
            let (runner, total) = run_in_pool(|| (std::thread::current().id(), sum()));
            assert_eq!((runner, total), (caller, 49_995_000));
            // Now a worker of its own pool, the thread still hands calls at more threads
            // to their pool, and long calls at one thread too (it polls while they run).
            set_local_threads(Some(2)).unwrap();
            let (runner, total) = run_in_pool(|| (std::thread::current().id(), sum()));
            assert!(runner != caller && total == 49_995_000);
            set_local_threads(Some(1)).unwrap();
            let outcome = run_interruptible(
                || (std::thread::current().id(), sum()),
                Duration::from_millis(1),
                || None,
            );
            let Outcome::Done((runner, total)) = outcome else {
                panic!("nothing interrupted the call")
            };
            assert!(runner != caller && total == 49_995_000);
            assert_eq!(run_in_pool(|| std::thread::current().id()), caller);
        })
        .join()
        .unwrap();
    }

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

    #[test]
    fn at_most_max_own_pools_threads_get_a_pool_of_their_own() {
        // A count of its own, so that the other tests' threads keep theirs: of ten threads
        // one after the other, the first four get a pool of their own and keep it; the
        // others are refused one, and their calls at one thread still run, in the shared
        // pool.
        static BUILT: AtomicUsize = AtomicUsize::new(0);
        let got: Vec<(bool, bool, usize)> = (0..10)
            .map(|_| {
                std::thread::spawn(|| {
                    let own = own_thread_pool_within(&BUILT, 4);
                    let again = own_thread_pool_within(&BUILT, 4);
                    assert_eq!(own.map(|p| p as *const _), again.map(|p| p as *const _));
                    set_local_threads(Some(1)).unwrap();
                    let caller = std::thread::current().id();
                    let (sum, on_caller) = run_in_pool(|| {
                        use rayon::prelude::*;
                        let sum: usize = (0..100usize).into_par_iter().sum();
                        (sum, std::thread::current().id() == caller)
                    });
                    (own.is_some(), on_caller, sum)
                })
                .join()
                .unwrap()
            })
            .collect();
        assert_eq!(BUILT.load(Ordering::Relaxed), 4);
        for (i, &(own, on_caller, sum)) in got.iter().enumerate() {
            assert_eq!(own, i < 4, "thread {i}: {got:?}");
            // A thread's own pool runs its calls where they are made; the shared one on
            // its pool thread.
            assert_eq!(on_caller, own, "thread {i}: {got:?}");
            assert_eq!(sum, 4950);
        }
    }
}
