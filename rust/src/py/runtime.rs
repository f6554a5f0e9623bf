//! Threads, SIMD path, memory, and forced panics (for tests of the error path).

use pyo3::exceptions::{PyMemoryError, PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::parallel::MAX_THREADS;

/// `n` as a thread count, 1 to [`MAX_THREADS`].
fn thread_count(n: &Bound<'_, PyAny>) -> PyResult<usize> {
    let expected = format!("an int in [1, {MAX_THREADS}]");
    if n.is_instance_of::<pyo3::types::PyBool>() || !n.hasattr("__index__")? {
        return Err(PyTypeError::new_err(format!(
            "n_threads: expected {expected}, got {}",
            n.repr()?
        )));
    }
    let value = n.call_method0("__index__")?;
    let threads = value
        .extract::<i64>()
        .ok()
        .filter(|&v| (1..=MAX_THREADS as i64).contains(&v))
        .ok_or_else(|| {
            PyValueError::new_err(format!("n_threads: expected {expected}, got {value}"))
        })?;
    Ok(threads as usize)
}

fn pool_error(error: String) -> PyErr {
    PyRuntimeError::new_err(format!("n_threads: {error}; the previous setting is kept"))
}

/// Use `n` threads for the kernels from now on (1 to 1024), in every thread without a
/// count of its own.
#[pyfunction]
fn set_num_threads(n: &Bound<'_, PyAny>) -> PyResult<()> {
    crate::parallel::set_num_threads(thread_count(n)?).map_err(pool_error)
}

/// Give the kernel calls of the calling thread their own thread count `n` (None: the
/// default again); returns the previous one, for the caller to restore.
#[pyfunction]
fn _set_local_num_threads(n: Option<&Bound<'_, PyAny>>) -> PyResult<Option<usize>> {
    let threads = n.map(thread_count).transpose()?;
    crate::parallel::set_local_threads(threads).map_err(pool_error)
}

/// Free the memory kept for reuse by large outputs; returns the bytes freed.
#[pyfunction]
fn release_memory() -> usize {
    crate::buffers::release()
}

/// Bytes kept for reuse by large outputs (at most an eighth of memory, 1 GiB).
#[pyfunction]
fn cached_memory() -> usize {
    crate::buffers::cached_bytes()
}

/// Raise `MemoryError` naming `name` if `elements` items of `itemsize` bytes exceed this
/// machine's physical memory (the check every output gets before it is allocated).
#[pyfunction]
fn check_fits_in_memory(name: &str, elements: &Bound<'_, PyAny>, itemsize: usize) -> PyResult<()> {
    // A Python int may exceed any Rust integer: such a count is too large by definition.
    let bytes = match elements.extract::<i128>() {
        Ok(count) => count
            .checked_mul(itemsize as i128)
            .map(|b| b.max(0) as u128),
        Err(err) if err.is_instance_of::<PyOverflowError>(elements.py()) => None,
        Err(err) => return Err(err),
    };
    let excess = match bytes {
        Some(bytes) => crate::memory::exceeds_physical(bytes),
        None => Some("more than any machine's memory".to_string()),
    };
    match excess {
        Some(excess) => Err(PyMemoryError::new_err(format!(
            "{name}: {elements} elements of {itemsize} bytes need {excess}"
        ))),
        None => Ok(()),
    }
}

/// Number of threads the kernel calls of the calling thread use.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::parallel::num_threads()
}

/// The SIMD level in use: "avx512", "avx2" or "scalar".
#[pyfunction]
fn simd_backend() -> &'static str {
    crate::simd::backend()
}

/// The SIMD levels this CPU can run, narrowest first ("scalar" always).
#[pyfunction]
fn simd_levels() -> Vec<&'static str> {
    crate::simd::Level::ALL
        .into_iter()
        .filter(|l| l.is_available())
        .map(|l| l.name())
        .collect()
}

/// Use a SIMD level for the kernels and the GEMM from now on (process-wide).
///
/// Parameters
/// ----------
/// level : str
///     "avx512", "avx2" or "scalar" (see `simd_levels()` for what this CPU has).
///
/// Returns
/// -------
/// str
///     The level now in use: `level`, or the widest the CPU has if it lacks `level`
///     (with a RuntimeWarning).
///
/// Raises
/// ------
/// ValueError
///     If `level` is not one of the names above.
#[pyfunction]
fn set_simd(py: Python<'_>, level: &str) -> PyResult<&'static str> {
    let requested = crate::simd::Level::parse(level).ok_or_else(|| {
        PyValueError::new_err(format!(
            "level: expected 'avx512', 'avx2' or 'scalar', got {level:?}"
        ))
    })?;
    let (level, warning) = crate::simd::set_level(requested);
    if let Some(message) = warning {
        warn_runtime(py, &message)?;
    }
    Ok(level.name())
}

/// Use SIMD (True: the level BNRS_SIMD chose at import unless it was scalar, else the
/// widest the CPU has) or force the portable scalar path (False).
#[pyfunction]
fn set_simd_enabled(enabled: bool) {
    crate::simd::set_enabled(enabled);
}

/// Issue a `RuntimeWarning` (attributed to the caller's line).
pub(super) fn warn_runtime(py: Python<'_>, message: &str) -> PyResult<()> {
    let message =
        std::ffi::CString::new(message.replace('\0', " ")).expect("NUL bytes were replaced");
    let category = py.get_type::<pyo3::exceptions::PyRuntimeWarning>();
    PyErr::warn(py, category.as_any(), &message, 1)
}

/// A machine measure's duration: a number of seconds in (0, 60].
fn check_seconds(seconds: f64) -> PyResult<()> {
    if seconds.is_finite() && seconds > 0.0 && seconds <= 60.0 {
        return Ok(());
    }
    Err(PyValueError::new_err(format!(
        "seconds: expected a number in (0, 60], got {seconds}"
    )))
}

/// Single-thread float32 FMA throughput (GFLOP/s), measured for about `seconds`.
#[pyfunction]
fn fma_peak_gflops(py: Python<'_>, seconds: f64) -> PyResult<f64> {
    check_seconds(seconds)?;
    py.detach(|| Ok(crate::kernels::peak::fma_gflops(seconds)))
}

/// The round trip of a cache line between two threads (ns), measured for about
/// `seconds`.
#[pyfunction]
fn core_round_trip_ns(py: Python<'_>, seconds: f64) -> PyResult<f64> {
    check_seconds(seconds)?;
    py.detach(|| crate::kernels::peak::core_round_trip_ns(seconds))
        .map_err(|e| {
            pyo3::exceptions::PyOSError::new_err(format!(
                "core_round_trip_ns: cannot start a thread: {e}"
            ))
        })
}

/// (kernel CPU seconds, kernel calls) counted while the kernel clock was on, every
/// thread's calls added up (a training step's CPU time less the first is its overhead
/// outside the kernels; each call counted holds about one reading of the clock).
#[pyfunction]
fn _kernel_time() -> (f64, u64) {
    crate::clock::kernel_time()
}

/// Seconds one reading of the kernel clock costs (each call it counts holds about one).
#[pyfunction]
fn _kernel_clock_read_seconds(py: Python<'_>) -> f64 {
    py.detach(crate::clock::read_seconds)
}

/// Switch the kernel clock on or off (off at import: it costs two clock reads per call).
#[pyfunction]
fn _kernel_clock(enabled: bool) {
    crate::clock::set_enabled(enabled);
}

/// Raise the error a kernel panic becomes (tests the panic-to-exception path).
#[pyfunction]
fn _panic_for_test(py: Python<'_>) -> PyResult<()> {
    super::run_kernel(py, usize::MAX, || -> crate::Result<()> {
        panic!("forced panic for a test")
    })
}

/// Whether a long kernel call from the calling thread is watched for Ctrl-C while it runs
/// (only from Python's main thread: the others never see a signal).
#[pyfunction]
fn _watches_ctrl_c(py: Python<'_>) -> PyResult<bool> {
    super::guard::handles_signals(py)
}

/// Why the values of bnrs's environment variables were ignored, if they were: the
/// package warns with these at import (from Python, so the warning points at the import).
#[pyfunction]
fn _environment_warnings() -> Vec<&'static str> {
    crate::parallel::num_threads_env_refusal()
        .into_iter()
        .collect()
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(_set_local_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(release_memory, m)?)?;
    m.add_function(wrap_pyfunction!(cached_memory, m)?)?;
    m.add_function(wrap_pyfunction!(check_fits_in_memory, m)?)?;
    m.add_function(wrap_pyfunction!(simd_backend, m)?)?;
    m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
    m.add_function(wrap_pyfunction!(_kernel_time, m)?)?;
    m.add_function(wrap_pyfunction!(_kernel_clock, m)?)?;
    m.add_function(wrap_pyfunction!(_kernel_clock_read_seconds, m)?)?;
    m.add_function(wrap_pyfunction!(_environment_warnings, m)?)?;
    m.add_function(wrap_pyfunction!(_watches_ctrl_c, m)?)?;
    m.add_function(wrap_pyfunction!(fma_peak_gflops, m)?)?;
    m.add_function(wrap_pyfunction!(core_round_trip_ns, m)?)?;
    Ok(())
}
