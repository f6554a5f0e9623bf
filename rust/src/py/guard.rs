//! The call guard of every kernel call: the GIL released, Ctrl-C watched, panics caught.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::parallel::Outcome;

/// Work (elements, or multiply-adds) from which a call is long enough (~10 ms) to be
/// watched for Ctrl-C while it runs.
const INTERRUPTIBLE_WORK: usize = 1 << 24;

/// Elements below which a call runs on the calling thread alone, whatever the thread
/// count (about 20-60 µs of an elementwise kernel): handing a call to the pool's threads
/// costs two context switches (about 30 µs of wall time on a shared 2-vCPU machine), more
/// than splitting so little saves. The result is the same bits at any thread count.
const ONE_THREAD_ELEMENTS: usize = 1 << 16;

/// [`ONE_THREAD_ELEMENTS`] for a product's multiply-adds (a convolution's, a dense
/// layer's): about 60 µs at AVX-512 on one core (120 µs at AVX2), which two threads would
/// finish about a hand-off sooner. LeNetBN's evaluation forward of eight images at two
/// threads (its two convolutions, one call of 8.1M multiply-adds, on the calling thread):
/// 225 µs, as at one thread, against 245 µs with half this bound (AMD EPYC, AVX-512).
const ONE_THREAD_MULTIPLY_ADDS: usize = 1 << 23;

/// How often a waiting caller checks for Ctrl-C while a kernel runs.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Run a kernel without the GIL, in the bnrs thread pool. For long calls (`work` at least
/// [`INTERRUPTIBLE_WORK`]) from the main thread, Ctrl-C is checked every 50 ms while it
/// runs: the kernel stops at its next chunk and `KeyboardInterrupt` is raised; shorter
/// calls check it when they return. Only the main thread sees Ctrl-C (Python runs signal
/// handlers there), and the stop reaches only this call's kernel: calls from other threads
/// run to their end, without taking the GIL until they return. A panic becomes a
/// `RuntimeError` instead of aborting. Its time counts as kernel time ([`crate::clock`]).
///
/// `work` counts elements: a call of fewer than [`ONE_THREAD_ELEMENTS`] runs on the calling
/// thread alone.
pub(crate) fn run_kernel<T: Send>(
    py: Python<'_>,
    work: usize,
    kernel: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    run_sized(py, work, ONE_THREAD_ELEMENTS, kernel)
}

/// [`run_kernel`] for a product whose work is counted in multiply-adds: fewer than
/// [`ONE_THREAD_MULTIPLY_ADDS`] run on the calling thread alone.
pub(crate) fn run_product_kernel<T: Send>(
    py: Python<'_>,
    multiply_adds: usize,
    kernel: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    run_sized(py, multiply_adds, ONE_THREAD_MULTIPLY_ADDS, kernel)
}

/// A timed kernel call of `work`: on the calling thread alone below `one_thread_below`,
/// watched for Ctrl-C from [`INTERRUPTIBLE_WORK`].
fn run_sized<T: Send>(
    py: Python<'_>,
    work: usize,
    one_thread_below: usize,
    kernel: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    let one_thread = work < one_thread_below;
    run_guarded_on(py, work >= INTERRUPTIBLE_WORK, one_thread, || {
        crate::clock::timed(kernel)
    })
}

/// [`run_kernel`] for a job that times its own kernels (the training step: what it does
/// between them is overhead, not kernel time) and judges its own length: `interruptible`
/// when it is long enough to be watched for Ctrl-C while it runs.
pub(crate) fn run_guarded<T: Send>(
    py: Python<'_>,
    interruptible: bool,
    kernel: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    run_guarded_on(py, interruptible, false, kernel)
}

/// [`run_guarded`], on the calling thread alone when `one_thread` (and not
/// `interruptible`).
fn run_guarded_on<T: Send>(
    py: Python<'_>,
    interruptible: bool,
    one_thread: bool,
    kernel: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    // Another thread's call is never interrupted, so it has nothing to poll for; and it
    // must not take the GIL while it runs: the interpreter may be finalising by then
    // (a daemon thread, or one that `Thread.join` wrongly marked as stopped when Ctrl-C
    // interrupted it), and taking the GIL of a finalised interpreter crashes.
    if !interruptible || !handles_signals(py)? {
        // Short: handing the wait to a polling thread would cost more than the kernel.
        // The outer catch_unwind covers the pool itself (a pool that cannot start).
        let outcome = py.detach(|| {
            catch_unwind(AssertUnwindSafe(|| {
                let job = || catch_unwind(AssertUnwindSafe(kernel));
                if one_thread {
                    crate::parallel::run_on_calling_thread(job)
                } else {
                    crate::parallel::run_in_pool(job)
                }
            }))
        });
        py.check_signals()?;
        return outcome_to_result(outcome.and_then(|caught| caught));
    }
    let outcome = py.detach(|| {
        catch_unwind(AssertUnwindSafe(|| {
            crate::parallel::run_interruptible(
                || catch_unwind(AssertUnwindSafe(kernel)),
                SIGNAL_POLL,
                || {
                    Python::attach(|py| py.check_signals().err())
                        .map(|err| Box::new(err) as Box<dyn std::any::Any + Send>)
                },
            )
        }))
    });
    let outcome = match outcome {
        Err(payload) => return outcome_to_result(Err(payload)),
        Ok(Outcome::Done(outcome)) => outcome,
        Ok(Outcome::Interrupted(reason)) => {
            return Err(*reason.downcast::<PyErr>().expect("the poll keeps a PyErr"));
        }
    };
    py.check_signals()?;
    outcome_to_result(outcome)
}

static MAIN_THREAD: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static GET_IDENT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Whether the calling thread is Python's main thread, the only one that runs signal
/// handlers (asked each time: after `os.fork` from another thread, the forking thread is
/// the child's main thread).
pub(super) fn handles_signals(py: Python<'_>) -> PyResult<bool> {
    let main = MAIN_THREAD
        .import(py, "threading", "main_thread")?
        .call0()?
        .getattr("ident")?;
    let current = GET_IDENT.import(py, "threading", "get_ident")?.call0()?;
    main.eq(current)
}

type Caught<T> = std::thread::Result<crate::Result<T>>;

/// The kernel's result, or its panic as a `RuntimeError`.
fn outcome_to_result<T>(outcome: Caught<T>) -> PyResult<T> {
    match outcome {
        Ok(result) => result.map_err(PyErr::from),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(PyRuntimeError::new_err(format!(
                "internal error in a bnrs kernel (please report it): {message}"
            )))
        }
    }
}
