//! The evaluation executor's binding: a plan built once from the stages' description,
//! then one call per forward with that forward's arrays.

use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::pool::pool2d;
use super::{run_product_kernel, slice, Output};
use crate::evaluate::{ConvBlock, EvalKind, EvalNorm, EvalPlan};
use crate::kernels::activation::Activation;

type Pair = (i64, i64);
/// A stage as Python describes it: (kind, sample input shape, sample output shape, args).
type StageDescription<'py> = (String, Vec<usize>, Vec<usize>, Bound<'py, PyTuple>);
/// A batch norm: (weight slot, bias slot, running mean slot, running variance slot, eps).
type NormArgs = Option<(Option<usize>, Option<usize>, usize, usize, f64)>;
/// A convolution block: (weight, bias, stride, padding, dilation, groups, norm,
/// activation, pool).
type ConvArgs = (
    usize,
    Option<usize>,
    Pair,
    Pair,
    Pair,
    i64,
    NormArgs,
    Option<(String, f32)>,
    Option<String>,
);

/// An evaluation forward of a chain of layers in one call with the GIL released; built
/// by `bnrs.executor` from a Sequential in evaluation mode (see there for the stages).
#[pyclass(module = "bnrs._core")]
pub(super) struct EvalStep {
    plan: EvalPlan,
}

fn norm(args: NormArgs) -> Option<EvalNorm> {
    args.map(|(weight, bias, mean, var, eps)| EvalNorm {
        weight,
        bias,
        mean,
        var,
        eps,
    })
}

fn activation(args: Option<(String, f32)>) -> PyResult<Option<Activation>> {
    Ok(args
        .map(|(name, slope)| Activation::from_name(&name, slope))
        .transpose()?)
}

fn conv_block(args: ConvArgs) -> PyResult<ConvBlock> {
    let (weight, bias, stride, padding, dilation, groups, norm_args, act, pool) = args;
    let pool = pool.as_deref().map(super::conv::parse_pool).transpose()?;
    Ok(ConvBlock {
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        norm: norm(norm_args),
        activation: activation(act)?,
        pool,
    })
}

fn stage_kind(kind: &str, args: &Bound<'_, PyTuple>) -> PyResult<EvalKind> {
    Ok(match kind {
        "conv" => EvalKind::Conv(conv_block(args.extract()?)?),
        "conv_chain" => {
            let (first, second): (ConvArgs, ConvArgs) = args.extract()?;
            EvalKind::Chain(Box::new((conv_block(first)?, conv_block(second)?)))
        }
        "linear" => {
            let (weight, bias, norm_args, act): (usize, Option<usize>, NormArgs, _) =
                args.extract()?;
            EvalKind::Linear {
                weight,
                bias,
                norm: norm(norm_args),
                activation: activation(act)?,
            }
        }
        "batch_norm" => {
            let (weight, bias, mean, var, eps) = args.extract()?;
            EvalKind::BatchNorm(EvalNorm {
                weight,
                bias,
                mean,
                var,
                eps,
            })
        }
        "activation" => {
            let (name, slope): (String, f32) = args.extract()?;
            EvalKind::Activation(Activation::from_name(&name, slope)?)
        }
        "max_pool2d" | "avg_pool2d" => EvalKind::Pool(pool2d(kind, args)?),
        "view" => EvalKind::View,
        other => {
            return Err(PyValueError::new_err(format!(
                "stages: unknown stage kind {other:?}"
            )))
        }
    })
}

/// Each array borrowed for reading, or None when one is not a float32 array of its slot's
/// shape, C-contiguous and aligned (the caller then runs the layers themselves, which
/// convert or reject it in their own words).
fn borrow_arrays<'py>(
    arrays: &[Bound<'py, PyAny>],
    shapes: &[Vec<usize>],
) -> Option<Vec<PyReadonlyArrayDyn<'py, f32>>> {
    if arrays.len() != shapes.len() {
        return None;
    }
    arrays
        .iter()
        .zip(shapes)
        .map(|(array, shape)| {
            let array = array.cast::<PyArrayDyn<f32>>().ok()?;
            let aligned = (array.data() as usize).is_multiple_of(std::mem::align_of::<f32>());
            if array.shape() != shape.as_slice() || !array.is_c_contiguous() || !aligned {
                return None;
            }
            array.try_readonly().ok()
        })
        .collect()
}

#[pymethods]
impl EvalStep {
    /// A plan of `stages`, each `(kind, sample input shape, sample output shape, args)`,
    /// over array slots of `slot_shapes`.
    #[new]
    fn new(stages: Vec<StageDescription<'_>>, slot_shapes: Vec<Vec<usize>>) -> PyResult<Self> {
        let stages = stages
            .into_iter()
            .map(|(kind, input, output, args)| Ok((stage_kind(&kind, &args)?, input, output)))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(EvalStep {
            plan: EvalPlan::new(stages, slot_shapes)?,
        })
    }

    /// The sample shape the plan takes.
    #[getter]
    fn input_shape(&self) -> Vec<usize> {
        self.plan.input_shape().to_vec()
    }

    /// The forward of `input` (N samples of the plan's input shape, N ≥ 1) with `arrays`
    /// in the slots; None when an array does not suit (see `borrow_arrays`).
    fn forward<'py>(
        &self,
        py: Python<'py>,
        input: PyReadonlyArrayDyn<'py, f32>,
        arrays: Vec<Bound<'py, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyArrayDyn<f32>>>> {
        let plan = &self.plan;
        let shape = input.shape();
        if shape.first().is_none_or(|&n| n == 0) || shape[1..] != *plan.input_shape() {
            return Err(PyValueError::new_err(format!(
                "input: expected (N, {:?}) with N ≥ 1, got {shape:?}",
                plan.input_shape()
            )));
        }
        let batch = shape[0];
        let Some(borrowed) = borrow_arrays(&arrays, plan.slot_shapes()) else {
            return Ok(None);
        };
        let slices = borrowed
            .iter()
            .map(|a| slice(a, "arrays"))
            .collect::<PyResult<Vec<_>>>()?;
        let x = slice(&input, "input")?;
        let out_shape: Vec<usize> = std::iter::once(batch)
            .chain(plan.output_shape().iter().copied())
            .collect();
        let mut out = Output::new(py, "output", &out_shape)?;
        let out_data = out.data();
        run_product_kernel(py, plan.multiply_adds(batch), || {
            plan.forward(batch, x, &slices, out_data)
        })?;
        Ok(Some(out.into_array()))
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<EvalStep>()?;
    Ok(())
}
