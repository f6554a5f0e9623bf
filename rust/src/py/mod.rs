//! The Python extension `bnrs._core`: argument extraction, the GIL, errors. Nothing else.

use std::panic::{catch_unwind, AssertUnwindSafe};

use numpy::{
    Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyKeyboardInterrupt, PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

use crate::error::Error;
use crate::parallel::Outcome;
use std::time::Duration;

mod activation;
mod batch_norm;
mod conv;
mod dropout;
mod linear;
mod loss;
mod optim;
mod pool;
mod runtime;

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::Invalid { .. } => PyValueError::new_err(err.to_string()),
            Error::TooLarge { .. } => PyMemoryError::new_err(err.to_string()),
        }
    }
}

/// Work (elements, or multiply-adds) from which a call is long enough (~10 ms) to be
/// watched for Ctrl-C while it runs.
const INTERRUPTIBLE_WORK: usize = 1 << 24;

/// How often a waiting caller checks for Ctrl-C while a kernel runs.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Run a kernel without the GIL, in the bnrs thread pool. For long calls (`work` at least
/// [`INTERRUPTIBLE_WORK`]) Ctrl-C is checked every 50 ms while it runs: the kernel stops
/// at its next chunk and `KeyboardInterrupt` is raised; shorter calls check it when they
/// return. A panic becomes a `RuntimeError` instead of aborting.
pub(crate) fn run<T: Send>(
    py: Python<'_>,
    work: usize,
    kernel: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    if work < INTERRUPTIBLE_WORK {
        // Short: handing the wait to a polling thread would cost more than the kernel.
        // The outer catch_unwind covers the pool itself (a pool that cannot start).
        let outcome = py.detach(|| {
            catch_unwind(AssertUnwindSafe(|| {
                crate::parallel::run(|| catch_unwind(AssertUnwindSafe(kernel)))
            }))
        });
        py.check_signals()?;
        return match outcome {
            Err(payload) => outcome_to_result(Err(payload)),
            Ok(Outcome::Done(outcome)) => outcome_to_result(outcome),
            Ok(Outcome::Interrupted(_)) => Err(interrupted_elsewhere()),
        };
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
        Ok(Outcome::Interrupted(Some(reason))) => {
            return Err(*reason.downcast::<PyErr>().expect("the poll keeps a PyErr"));
        }
        Ok(Outcome::Interrupted(None)) => return Err(interrupted_elsewhere()),
    };
    py.check_signals()?;
    outcome_to_result(outcome)
}

/// A kernel stopped early because Ctrl-C interrupted another thread's kernel call.
fn interrupted_elsewhere() -> PyErr {
    PyKeyboardInterrupt::new_err(
        "interrupted: Ctrl-C arrived while this kernel ran in another thread",
    )
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

/// The contiguous data of a read-only array argument.
pub(crate) fn slice<'a, T: numpy::Element>(
    arr: &'a PyReadonlyArrayDyn<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    arr.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name}: expected a C-contiguous array")))
}

/// The contiguous data of an array updated in place.
pub(crate) fn slice_mut<'a>(
    arr: &'a mut PyReadwriteArrayDyn<'_, f32>,
    name: &str,
) -> PyResult<&'a mut [f32]> {
    arr.as_slice_mut()
        .map_err(|_| PyValueError::new_err(format!("{name}: expected a C-contiguous array")))
}

/// Borrow an array for in-place update, with errors that name it.
pub(crate) fn writeable<'py>(
    arr: &Bound<'py, PyArrayDyn<f32>>,
    name: &str,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    use numpy::PyArrayMethods;
    arr.try_readwrite().map_err(|e| {
        PyValueError::new_err(format!(
            "{name}: cannot be updated in place ({e}); pass a writeable float32 array that \
             is not also passed as another argument"
        ))
    })
}

static NUMPY_EMPTY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The memory of a large output array (its base object): returned to the cache of
/// [`crate::buffers`] when the array is freed, so the next output of that size reuses
/// pages that are already mapped.
#[pyclass(frozen, module = "bnrs._core")]
struct CachedBuffer {
    block: Option<crate::buffers::Block>,
}

impl Drop for CachedBuffer {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            crate::buffers::give(block);
        }
    }
}

/// A new NumPy array for a kernel to fill, and the kernel's view of its data.
///
/// Large arrays (256 KiB and more) use memory from the cache of [`crate::buffers`], small
/// ones come from `numpy.empty`; either way they are uninitialised: every kernel writes
/// each element of its outputs before anything reads them, which saves a zeroing pass
/// over memory. Arrays of a failed or interrupted call
/// are dropped unread.
pub(crate) struct Output<'py, T: Element> {
    array: Bound<'py, PyArrayDyn<T>>,
    view: PyReadwriteArrayDyn<'py, T>,
}

impl<'py, T: Element> Output<'py, T> {
    /// `name` is the output as the Python API calls it, for the error when it is too
    /// large: the size is checked against the machine's memory before allocating, so an
    /// impossible request is a `MemoryError`, not a process the OS kills when it is touched.
    pub(crate) fn new(py: Python<'py>, name: &'static str, shape: &[usize]) -> PyResult<Self> {
        let bytes = shape
            .iter()
            .try_fold(std::mem::size_of::<T>(), |total, &d| total.checked_mul(d));
        let too_large = |detail: String| {
            PyMemoryError::new_err(format!(
                "{name}: an array of shape {shape:?} ({}) is too large to allocate{detail}",
                std::any::type_name::<T>()
            ))
        };
        match bytes {
            None => return Err(too_large(String::new())),
            Some(b) if b > crate::memory::physical_bytes() => {
                return Err(too_large(format!(
                    ": {:.3} GiB, more than this machine's {:.3} GiB of memory",
                    b as f64 / (1u64 << 30) as f64,
                    crate::memory::physical_bytes() as f64 / (1u64 << 30) as f64
                )));
            }
            Some(_) => {}
        }
        let bytes = bytes.expect("checked above");
        let array = if bytes >= crate::buffers::MIN_CACHED_BYTES {
            let block = crate::buffers::take(bytes)
                .ok_or_else(|| too_large(": the system refused the memory".to_string()))?;
            let data = block.as_ptr().cast::<T>();
            let owner = Bound::new(py, CachedBuffer { block: Some(block) })?;
            // SAFETY: the block holds `bytes` = size_of::<T>() × the shape's elements and
            // is aligned for T; `owner` keeps it alive, unmoved, as long as the array (its
            // base object) lives, and no other array or Rust code can reach it.
            unsafe {
                let view = numpy::ndarray::ArrayViewD::from_shape_ptr(
                    numpy::ndarray::IxDyn(shape),
                    data.cast_const(),
                );
                PyArrayDyn::<T>::borrow_from_array(&view, owner.into_any())
            }
        } else {
            let empty = NUMPY_EMPTY.import(py, "numpy", "empty")?;
            empty
                .call1((PyTuple::new(py, shape)?, numpy::dtype::<T>(py)))
                .map_err(|e| {
                    if e.is_instance_of::<PyMemoryError>(py) || e.is_instance_of::<PyValueError>(py)
                    {
                        too_large(format!(": {e}"))
                    } else {
                        e
                    }
                })?
                .cast_into::<PyArrayDyn<T>>()?
        };
        let view = array
            .try_readwrite()
            .map_err(|e| PyRuntimeError::new_err(format!("internal error: {e}")))?;
        Ok(Output { array, view })
    }

    /// The array's data, for the kernel to write.
    pub(crate) fn data(&mut self) -> &mut [T] {
        self.view.as_slice_mut().expect("a new array is contiguous")
    }

    /// An optional output: `Some` when `wanted`.
    pub(crate) fn maybe(
        py: Python<'py>,
        name: &'static str,
        wanted: bool,
        shape: &[usize],
    ) -> PyResult<Option<Self>> {
        wanted.then(|| Self::new(py, name, shape)).transpose()
    }

    pub(crate) fn into_array(self) -> Bound<'py, PyArrayDyn<T>> {
        drop(self.view);
        self.array
    }
}

/// The arrays a layer's backward returns: (grad_input or None, grad_weight, grad_bias or None).
pub(crate) type GradArrays<'py> = (
    Option<Bound<'py, PyArrayDyn<f32>>>,
    Bound<'py, PyArrayDyn<f32>>,
    Option<Bound<'py, PyArrayDyn<f32>>>,
);

/// The outputs of a conv or linear backward, the input and bias gradients optional.
pub(crate) struct LayerGrads<'py> {
    input: Option<Output<'py, f32>>,
    weight: Output<'py, f32>,
    bias: Option<Output<'py, f32>>,
}

/// The kernel's views of [`LayerGrads`]: input, weight and bias gradients.
pub(crate) type LayerGradData<'a> = (Option<&'a mut [f32]>, &'a mut [f32], Option<&'a mut [f32]>);

impl<'py> LayerGrads<'py> {
    pub(crate) fn new(
        py: Python<'py>,
        input_shape: Option<&[usize]>,
        weight_shape: &[usize],
        bias_len: Option<usize>,
    ) -> PyResult<Self> {
        Ok(LayerGrads {
            input: input_shape
                .map(|s| Output::new(py, "grad_input", s))
                .transpose()?,
            weight: Output::new(py, "grad_weight", weight_shape)?,
            bias: bias_len
                .map(|n| Output::new(py, "grad_bias", &[n]))
                .transpose()?,
        })
    }

    pub(crate) fn data(&mut self) -> LayerGradData<'_> {
        (
            self.input.as_mut().map(Output::data),
            self.weight.data(),
            self.bias.as_mut().map(Output::data),
        )
    }

    pub(crate) fn into_arrays(self) -> GradArrays<'py> {
        (
            self.input.map(Output::into_array),
            self.weight.into_array(),
            self.bias.map(Output::into_array),
        )
    }
}

/// Require `arr` to have exactly `expected` shape.
pub(crate) fn check_shape<T: numpy::Element>(
    arr: &PyReadonlyArrayDyn<'_, T>,
    name: &str,
    expected: &[usize],
) -> PyResult<()> {
    if arr.shape() != expected {
        return Err(PyValueError::new_err(format!(
            "{name}: expected shape {expected:?}, got {:?}",
            arr.shape()
        )));
    }
    Ok(())
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Initialise now, at import (which `os.fork` waits for), every lazily set global a
    // call would otherwise set on first use: a fork in the middle of that first use in
    // another thread would leave the child waiting on it forever.
    let py = m.py();
    NUMPY_EMPTY.import(py, "numpy", "empty")?;
    let probe = numpy::PyArray1::<f32>::zeros(py, 1, false);
    drop(probe.readwrite()); // rust-numpy's borrow-checking API, set on the first borrow
    crate::parallel::prepare_for_fork();
    crate::kernels::warm_up();
    if let Some(message) = crate::simd::take_environment_warning() {
        runtime::warn_runtime(py, &message)?;
    }
    activation::register(m)?;
    batch_norm::register(m)?;
    conv::register(m)?;
    dropout::register(m)?;
    linear::register(m)?;
    loss::register(m)?;
    optim::register(m)?;
    pool::register(m)?;
    runtime::register(m)?;
    m.add_class::<CachedBuffer>()?;
    Ok(())
}
