//! Array arguments and results: contiguous views of the inputs, in-place buffers, shape
//! checks, the outputs the kernels fill (large ones from the buffer cache), and the
//! bitwise comparison of two arrays (`same_bits`).

use numpy::{
    Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

use crate::kernels::batch_norm::RunningStats;

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

/// Borrow an array for in-place update, with errors that name it (`name` is formatted
/// only for an error: a training step borrows dozens of arrays).
pub(crate) fn writeable<'py>(
    arr: &Bound<'py, PyArrayDyn<f32>>,
    name: impl std::fmt::Display,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    use numpy::PyArrayMethods;
    arr.try_readwrite().map_err(|e| {
        PyValueError::new_err(format!(
            "{name}: cannot be updated in place ({e}); pass a writeable float32 array that \
             is not also passed as another argument"
        ))
    })
}

/// The running mean and variance a training batch norm moves, borrowed for writing for
/// as long as this lives (both or neither given; the caller checks that).
pub(crate) struct RunningBorrow<'py> {
    mean: Option<PyReadwriteArrayDyn<'py, f32>>,
    var: Option<PyReadwriteArrayDyn<'py, f32>>,
}

impl<'py> RunningBorrow<'py> {
    pub(crate) fn new(
        mean: Option<&Bound<'py, PyArrayDyn<f32>>>,
        var: Option<&Bound<'py, PyArrayDyn<f32>>>,
    ) -> PyResult<Self> {
        Ok(RunningBorrow {
            mean: mean.map(|a| writeable(a, "running_mean")).transpose()?,
            var: var.map(|a| writeable(a, "running_var")).transpose()?,
        })
    }

    /// The statistics for the kernel, moved with `momentum`; None without them.
    pub(crate) fn stats(&mut self, momentum: f32) -> PyResult<Option<RunningStats<'_>>> {
        let mean = self
            .mean
            .as_mut()
            .map(|a| slice_mut(a, "running_mean"))
            .transpose()?;
        let var = self
            .var
            .as_mut()
            .map(|a| slice_mut(a, "running_var"))
            .transpose()?;
        Ok(mean
            .zip(var)
            .map(|(mean, var)| crate::kernels::batch_norm::RunningStats {
                mean,
                var,
                momentum,
            }))
    }
}

/// Borrow an array argument that is only read, with errors that name it. Unlike a
/// `PyReadonlyArrayDyn` argument, the caller decides at run time whether to read or write.
pub(crate) fn readable<'py>(
    arr: &Bound<'py, PyArrayDyn<f32>>,
    name: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    arr.try_readonly().map_err(|e| {
        PyValueError::new_err(format!(
            "{name}: cannot be read ({e}); it is being updated in place by another call"
        ))
    })
}

pub(super) static NUMPY_EMPTY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The memory of a large output array (its base object): returned to the cache of
/// [`crate::buffers`] when the array is freed, so the next output of that size reuses
/// pages that are already mapped.
#[pyclass(frozen, module = "bnrs._core")]
pub(super) struct CachedBuffer {
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
        Self::sized_by(py, name, shape, name)
    }

    /// An output whose size one argument alone decides (`input_shape`, a count): a
    /// request too large is that argument's fault, and its error names `arg`.
    pub(crate) fn sized_by(
        py: Python<'py>,
        name: &'static str,
        shape: &[usize],
        arg: &'static str,
    ) -> PyResult<Self> {
        let too_large = |detail: String| too_large::<T>(name, shape, arg, &detail);
        let bytes = check_allocatable::<T>(name, shape, arg)?;
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

/// The outputs of a norm's backward: the input gradient, and the weight and bias
/// gradients (one value per channel) when the norm has an affine.
pub(crate) struct NormGrads<'py> {
    input: Output<'py, f32>,
    weight: Option<Output<'py, f32>>,
    bias: Option<Output<'py, f32>>,
}

/// The arrays a norm's backward returns: (grad_input, grad_weight or None, grad_bias or None).
pub(crate) type NormGradArrays<'py> = (
    Bound<'py, PyArrayDyn<f32>>,
    Option<Bound<'py, PyArrayDyn<f32>>>,
    Option<Bound<'py, PyArrayDyn<f32>>>,
);

impl<'py> NormGrads<'py> {
    /// `affine_channels`: the channel count when there are weight and bias gradients.
    pub(crate) fn new(
        py: Python<'py>,
        input_shape: &[usize],
        affine_channels: Option<usize>,
    ) -> PyResult<Self> {
        let channel_grad = |name| {
            affine_channels
                .map(|c| Output::new(py, name, &[c]))
                .transpose()
        };
        Ok(NormGrads {
            input: Output::new(py, "grad_input", input_shape)?,
            weight: channel_grad("grad_weight")?,
            bias: channel_grad("grad_bias")?,
        })
    }

    pub(crate) fn data(&mut self) -> (&mut [f32], Option<&mut [f32]>, Option<&mut [f32]>) {
        (
            self.input.data(),
            self.weight.as_mut().map(Output::data),
            self.bias.as_mut().map(Output::data),
        )
    }

    pub(crate) fn into_arrays(self) -> NormGradArrays<'py> {
        (
            self.input.into_array(),
            self.weight.map(Output::into_array),
            self.bias.map(Output::into_array),
        )
    }
}

/// The error for an array of `shape` too large to allocate: "input_shape: a grad_input of
/// shape [..] (f32) is too large to allocate: ..." when `arg` sized it, "output: an array
/// of shape [..] ..." when the array is itself what the caller asked for.
fn too_large<T>(name: &str, shape: &[usize], arg: &str, detail: &str) -> PyErr {
    let array = if arg == name {
        "an array".to_string()
    } else {
        format!("a {name}")
    };
    PyMemoryError::new_err(format!(
        "{arg}: {array} of shape {shape:?} ({}) is too large to allocate{detail}",
        std::any::type_name::<T>()
    ))
}

/// The bytes of an array of `shape`, or a `MemoryError` naming `arg` when its size
/// overflows or exceeds this machine's memory (see [`Output::sized_by`]).
pub(crate) fn check_allocatable<T>(name: &str, shape: &[usize], arg: &str) -> PyResult<usize> {
    let bytes = shape
        .iter()
        .try_fold(std::mem::size_of::<T>(), |total, &d| total.checked_mul(d));
    let Some(bytes) = bytes else {
        return Err(too_large::<T>(name, shape, arg, ""));
    };
    if let Some(excess) = crate::memory::exceeds_physical(bytes as u128) {
        return Err(too_large::<T>(name, shape, arg, &format!(": {excess}")));
    }
    Ok(bytes)
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

/// Whether two C-contiguous float32 arrays hold the same bits: -0 is not +0, NaN payloads
/// count, and arrays of different lengths differ (their shapes are the caller's to
/// compare). For the fold cache's check that a layer's parameters are unchanged
/// (`bnrs.nn.fusion`): one pass in chunks the compiler vectorises, where NumPy made a
/// boolean array and reduced it.
#[pyfunction]
fn same_bits(a: PyReadonlyArrayDyn<'_, f32>, b: PyReadonlyArrayDyn<'_, f32>) -> PyResult<bool> {
    let (a, b) = (slice(&a, "a")?, slice(&b, "b")?);
    const CHUNK: usize = 64;
    Ok(a.len() == b.len()
        && a.chunks(CHUNK).zip(b.chunks(CHUNK)).all(|(x, y)| {
            x.iter()
                .zip(y)
                .fold(true, |same, (p, q)| same & (p.to_bits() == q.to_bits()))
        }))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(same_bits, m)?)?;
    Ok(())
}
