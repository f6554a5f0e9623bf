//! The Python extension `bnrs._core`: the module definition. The plumbing every binding
//! shares lives beside it: the call guard in [`guard`], array arguments and outputs in
//! [`arrays`]; the error mapping is `From<Error> for PyErr` in [`crate::error`].

use numpy::PyArrayMethods;
use pyo3::prelude::*;

mod arrays;
mod guard;

mod activation;
mod batch_norm;
mod conv;
mod dropout;
mod evaluate;
mod fused;
mod group_norm;
mod linear;
mod loss;
mod optim;
mod pool;
mod runtime;
mod shapes;
mod step;

pub(crate) use arrays::{
    check_allocatable, check_shape, readable, slice, slice_mut, writeable, GradArrays, LayerGrads,
    NormGradArrays, NormGrads, Output, RunningBorrow,
};
pub(crate) use guard::{run_guarded, run_kernel, run_product_kernel};

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Initialise now, at import (which `os.fork` waits for), every lazily set global a
    // call would otherwise set on first use: a fork in the middle of that first use in
    // another thread would leave the child waiting on it forever.
    let py = m.py();
    arrays::NUMPY_EMPTY.import(py, "numpy", "empty")?;
    let probe = numpy::PyArray1::<f32>::zeros(py, 1, false);
    drop(probe.readwrite()); // rust-numpy's borrow-checking API, set on the first borrow
    crate::parallel::prepare_for_fork();
    crate::kernels::warm_up();
    if let Some(message) = crate::simd::take_environment_warning() {
        runtime::warn_runtime(py, &message)?;
    }
    activation::register(m)?;
    arrays::register(m)?;
    batch_norm::register(m)?;
    conv::register(m)?;
    dropout::register(m)?;
    evaluate::register(m)?;
    fused::register(m)?;
    group_norm::register(m)?;
    linear::register(m)?;
    loss::register(m)?;
    optim::register(m)?;
    pool::register(m)?;
    runtime::register(m)?;
    shapes::register(m)?;
    step::register(m)?;
    m.add_class::<arrays::CachedBuffer>()?;
    Ok(())
}
