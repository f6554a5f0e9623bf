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

/// How often a waiting caller checks for Ctrl-C while a kernel runs.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Run a kernel without the GIL, in the bnrs thread pool. For long calls (`work` at least
/// [`INTERRUPTIBLE_WORK`]) from the main thread, Ctrl-C is checked every 50 ms while it
/// runs: the kernel stops at its next chunk and `KeyboardInterrupt` is raised; shorter
/// calls check it when they return. Only the main thread sees Ctrl-C (Python runs signal
/// handlers there), and the stop reaches only this call's kernel: calls from other threads
/// run to their end, without taking the GIL until they return. A panic becomes a
/// `RuntimeError` instead of aborting. Its time counts as kernel time ([`crate::clock`]).
pub(crate) fn run_kernel<T: Send>(
    py: Python<'_>,
    work: usize,
    kernel: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    run_guarded(py, work >= INTERRUPTIBLE_WORK, || {
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
    // Another thread's call is never interrupted, so it has nothing to poll for; and it
    // must not take the GIL while it runs: the interpreter may be finalising by then
    // (a daemon thread, or one that `Thread.join` wrongly marked as stopped when Ctrl-C
    // interrupted it), and taking the GIL of a finalised interpreter crashes.
    if !interruptible || !handles_signals(py)? {
        // Short: handing the wait to a polling thread would cost more than the kernel.
        // The outer catch_unwind covers the pool itself (a pool that cannot start).
        let outcome = py.detach(|| {
            catch_unwind(AssertUnwindSafe(|| {
                crate::parallel::run_in_pool(|| catch_unwind(AssertUnwindSafe(kernel)))
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
