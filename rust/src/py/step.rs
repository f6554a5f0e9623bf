//! The training-step executor's binding: a plan built once from the layers' description,
//! then one call per step with the step's arrays.

use numpy::{
    PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::pool::pool2d;
use super::{run_guarded, slice, writeable};
use crate::kernels::activation::Activation;
use crate::kernels::fused::Pool2x2;
use crate::kernels::optim::{AdamConfig, SgdConfig};
use crate::step::{
    AdamUpdate, Batch, BlockDropout, EpochBatches, LayerKind, RunningArrays, SgdUpdate, StepArrays,
    StepPlan, Updates,
};

type Array<'py> = Bound<'py, PyArrayDyn<f32>>;
type Pair = (i64, i64);
type Running<'py> = (Array<'py>, Array<'py>, Bound<'py, PyArrayDyn<i64>>);
/// A layer as Python describes it: (kind, sample input shape, sample output shape, args).
type LayerDescription<'py> = (String, Vec<usize>, Vec<usize>, Bound<'py, PyTuple>);

/// The optimizer a plan updates with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Optimizer {
    Adam { decoupled: bool },
    Sgd,
}

/// A training step of a chain of layers, run in one call with the GIL released; built by
/// `bnrs.executor` from a Sequential (see there for the layer descriptions).
#[pyclass(module = "bnrs._core")]
pub(super) struct TrainStep {
    plan: StepPlan,
    optimizer: Optimizer,
    /// The parameters' names (for errors) and shapes, by slot.
    slot_names: Vec<String>,
    slot_shapes: Vec<Vec<usize>>,
    input_shape: Vec<usize>,
}

fn layer_kind(
    kind: &str,
    args: &Bound<'_, PyTuple>,
    slot_shapes: &[Vec<usize>],
) -> PyResult<LayerKind> {
    let weight_shape = |slot: usize| -> PyResult<&[usize]> {
        slot_shapes
            .get(slot)
            .map(Vec::as_slice)
            .ok_or_else(|| PyValueError::new_err(format!("layers: no parameter slot {slot}")))
    };
    Ok(match kind {
        "conv2d" => {
            let (weight, bias, stride, padding, dilation, groups): (
                usize,
                Option<usize>,
                Pair,
                Pair,
                Pair,
                i64,
            ) = args.extract()?;
            let shape: [usize; 4] = weight_shape(weight)?
                .try_into()
                .map_err(|_| PyValueError::new_err("layers: a conv2d weight is expected 4-D"))?;
            LayerKind::Conv2d {
                weight,
                bias,
                weight_shape: shape,
                stride,
                padding,
                dilation,
                groups,
            }
        }
        "linear" => {
            let (weight, bias): (usize, Option<usize>) = args.extract()?;
            let shape: [usize; 2] = weight_shape(weight)?
                .try_into()
                .map_err(|_| PyValueError::new_err("layers: a linear weight is expected 2-D"))?;
            LayerKind::Linear {
                weight,
                bias,
                weight_shape: shape,
            }
        }
        "batch_norm" => {
            let (weight, bias, running, eps, momentum) = args.extract()?;
            LayerKind::BatchNorm {
                weight,
                bias,
                running,
                eps,
                momentum,
            }
        }
        "bn_block" => {
            type Args = (
                Option<usize>,
                Option<usize>,
                Option<usize>,
                f32,
                Option<f32>,
                Option<(String, f32)>,
                Option<String>,
                Option<(f32, bool, usize)>,
            );
            let (weight, bias, running, eps, momentum, activation, pool, dropout): Args =
                args.extract()?;
            let activation = activation
                .map(|(name, slope)| Activation::from_name(&name, slope))
                .transpose()?;
            let pool = match pool.as_deref() {
                None => None,
                Some("max") => Some(Pool2x2::Max),
                Some("avg") => Some(Pool2x2::Avg),
                Some(other) => {
                    return Err(PyValueError::new_err(format!(
                        "layers: a block's pool {other:?}, expected None, 'max' or 'avg'"
                    )))
                }
            };
            let dropout = dropout.map(|(p, channel_wise, seed)| BlockDropout {
                p,
                channel_wise,
                seed,
            });
            LayerKind::BnBlock {
                weight,
                bias,
                running,
                eps,
                momentum,
                activation,
                pool,
                dropout,
            }
        }
        "activation" => {
            let (name, negative_slope): (String, f32) = args.extract()?;
            LayerKind::Activation(Activation::from_name(&name, negative_slope)?)
        }
        "max_pool2d" | "avg_pool2d" => LayerKind::Pool(pool2d(kind, args)?),
        "dropout" => {
            let (p, unit, seed) = args.extract()?;
            LayerKind::Dropout { p, unit, seed }
        }
        "zeros" => LayerKind::Zeros,
        "view" => LayerKind::View,
        other => {
            return Err(PyValueError::new_err(format!(
                "layers: unknown layer kind {other:?}"
            )))
        }
    })
}

/// Borrow every array for update in place, each named after its parameter.
fn borrow_all<'py>(
    arrays: &[Array<'py>],
    names: &[String],
    shapes: &[Vec<usize>],
    what: &str,
) -> PyResult<Vec<PyReadwriteArrayDyn<'py, f32>>> {
    if arrays.len() != names.len() {
        return Err(PyValueError::new_err(format!(
            "{what}: expected {} arrays, one per parameter, got {}",
            names.len(),
            arrays.len()
        )));
    }
    arrays
        .iter()
        .zip(names.iter().zip(shapes))
        .map(|(array, (name, shape))| {
            if array.shape() != shape.as_slice() {
                return Err(PyValueError::new_err(format!(
                    "{name}{what}: expected shape {shape:?}, got {:?}",
                    array.shape()
                )));
            }
            if !array.is_c_contiguous() {
                return Err(not_contiguous(&format!("{name}{what}")));
            }
            writeable(array, format_args!("{name}{what}"))
        })
        .collect()
}

fn slices<'a>(views: &'a mut [PyReadwriteArrayDyn<'_, f32>]) -> Vec<&'a mut [f32]> {
    views
        .iter_mut()
        .map(|v| {
            v.as_slice_mut()
                .expect("a writeable float32 array checked contiguous")
        })
        .collect()
}

#[pymethods]
impl TrainStep {
    /// A plan of `layers`, each `(kind, sample input shape, sample output shape, args)`,
    /// over parameter slots named `slot_names` of `slot_shapes`; `optimizer` is "adam",
    /// "adamw" or "sgd".
    #[new]
    fn new(
        layers: Vec<LayerDescription<'_>>,
        slot_names: Vec<String>,
        slot_shapes: Vec<Vec<usize>>,
        optimizer: &str,
    ) -> PyResult<Self> {
        let optimizer = match optimizer {
            "adam" => Optimizer::Adam { decoupled: false },
            "adamw" => Optimizer::Adam { decoupled: true },
            "sgd" => Optimizer::Sgd,
            other => {
                return Err(PyValueError::new_err(format!(
                    "optimizer: expected 'adam', 'adamw' or 'sgd', got {other:?}"
                )))
            }
        };
        if slot_names.len() != slot_shapes.len() {
            return Err(PyValueError::new_err(
                "slot_names, slot_shapes: expected one name per shape",
            ));
        }
        let input_shape = layers
            .first()
            .map(|layer| layer.1.clone())
            .unwrap_or_default();
        let kinds = layers
            .into_iter()
            .map(|(kind, input, output, args)| {
                Ok((layer_kind(&kind, &args, &slot_shapes)?, input, output))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let n_slots = slot_names.len();
        Ok(TrainStep {
            plan: StepPlan::new(kinds, n_slots)?,
            optimizer,
            slot_names,
            slot_shapes,
            input_shape,
        })
    }

    /// How many of the last step's dropout seeds its forward used: those of the dropout
    /// layers it completed (all after a step that got past the forward).
    #[getter]
    fn seeds_used(&self) -> usize {
        self.plan.seeds_used()
    }

    /// Set `seeds_used` and `steps_done` to 0: called before `run` or `run_epoch`, so that
    /// a call refused before it starts (its arguments converted or checked) reports
    /// neither steps nor seeds of the call before.
    fn reset_counts(&mut self) {
        self.plan.reset_counts();
    }

    /// Free the activation and gradient buffers kept between steps (the next step makes
    /// them again); returns the bytes freed.
    fn release_buffers(&mut self) -> usize {
        self.plan.release()
    }

    /// One training step; returns the loss (a non-finite loss before the backward, with
    /// nothing updated but the running statistics). `running` holds (running_mean,
    /// running_var, num_batches_tracked) per batch norm that tracks them, `seeds` one
    /// seed per dropout layer drawing a mask, `zero` the slots whose gradients are zeroed
    /// first, and `updates` one tuple per parameter the optimizer updates, in its order:
    /// (slot, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) for Adam,
    /// (slot, momentum_buffer, first_step, lr, momentum, dampening, nesterov,
    /// weight_decay) for SGD.
    #[pyo3(signature = (input, target, sample_weight, data, grads, zero, running, seeds, updates))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        mut slf: PyRefMut<'py, Self>,
        py: Python<'py>,
        input: PyReadonlyArrayDyn<'py, f32>,
        target: PyReadonlyArrayDyn<'py, i64>,
        sample_weight: Option<PyReadonlyArrayDyn<'py, f64>>,
        data: Vec<Array<'py>>,
        grads: Vec<Array<'py>>,
        zero: Vec<usize>,
        running: Vec<Running<'py>>,
        seeds: Vec<u64>,
        updates: Vec<Bound<'py, PyTuple>>,
    ) -> PyResult<f64> {
        let this = &mut *slf;
        let batch = this.check_samples(
            ("input", "target"),
            input.shape(),
            target.shape(),
            sample_weight.as_ref().map(|w| w.shape()),
        )?;
        let x = slice(&input, "input")?;
        let t = slice(&target, "target")?;
        let w = sample_weight
            .as_ref()
            .map(|w| slice(w, "sample_weight"))
            .transpose()?;
        let seeds_needed = this.plan.running_and_seed_counts().1;
        if seeds.len() < seeds_needed {
            return Err(PyValueError::new_err(format!(
                "seeds: expected {seeds_needed} dropout seeds, got {}",
                seeds.len()
            )));
        }
        let mut borrowed = this.borrow(&data, &grads, &zero, &running, &updates)?;
        let mut arrays = this.arrays(&mut borrowed, &zero)?;
        let feed = Batch {
            input: x,
            target: t,
            sample_weight: w,
            seeds: &seeds,
        };
        let work = this.plan.work(batch);
        let plan = &mut this.plan;
        run_guarded(py, work >= STEP_INTERRUPTIBLE_WORK, || {
            plan.run(&feed, &mut arrays)
        })
    }

    /// Start timing each stage's forward and backward, the loss and the updates, from
    /// zero (`on`), or stop and forget the times. Off when the plan is made.
    fn set_stage_clock(&mut self, on: bool) {
        self.plan.set_stage_clock(on);
    }

    /// The wall time in seconds since the stage clock was switched on, as
    /// `(forward, backward, loss, update, steps)`: per stage (the plan's layers, in order)
    /// its forward and backward, then the loss's forward and gradient, the optimizer's
    /// updates, and the steps whose updates were done. None while the clock is off.
    #[allow(clippy::type_complexity)]
    fn stage_clock(&self) -> Option<(Vec<f64>, Vec<f64>, f64, f64, u64)> {
        self.plan.stage_clock().map(|c| {
            (
                c.forward.clone(),
                c.backward.clone(),
                c.loss,
                c.update,
                c.steps,
            )
        })
    }

    /// How many steps the last `run` (0 or 1) or `run_epoch` completed (backward and
    /// update done), also when it raised: a Ctrl-C seen as a step ended raises
    /// KeyboardInterrupt after its update.
    #[getter]
    fn steps_done(&self) -> usize {
        self.plan.steps_done()
    }

    /// The steps of an epoch in one call: a step (as `run`) per `(start, stop)` of
    /// `bounds`, on the samples (and their `sample_weight`, if given) at those positions
    /// of `order` (None: of `samples`), each gathered into the step's input; `seeds` holds each step's
    /// dropout seeds in turn, and `updates` the first step's tuples (the next steps count
    /// on from them). Returns the losses of the steps taken: the epoch stops after a
    /// non-finite one. See `steps_done`.
    #[pyo3(signature = (samples, targets, sample_weight, order, bounds, data, grads, zero, running, seeds, updates))]
    #[allow(clippy::too_many_arguments)]
    fn run_epoch<'py>(
        mut slf: PyRefMut<'py, Self>,
        py: Python<'py>,
        samples: PyReadonlyArrayDyn<'py, f32>,
        targets: PyReadonlyArrayDyn<'py, i64>,
        sample_weight: Option<PyReadonlyArrayDyn<'py, f64>>,
        order: Option<PyReadonlyArrayDyn<'py, i64>>,
        bounds: Vec<(usize, usize)>,
        data: Vec<Array<'py>>,
        grads: Vec<Array<'py>>,
        zero: Vec<usize>,
        running: Vec<Running<'py>>,
        seeds: Vec<u64>,
        updates: Vec<Bound<'py, PyTuple>>,
    ) -> PyResult<Vec<f64>> {
        let this = &mut *slf;
        this.check_samples(
            ("samples", "targets"),
            samples.shape(),
            targets.shape(),
            sample_weight.as_ref().map(|w| w.shape()),
        )?;
        if let Some(order) = &order {
            if order.ndim() != 1 {
                return Err(PyValueError::new_err(format!(
                    "order: expected a 1-D array of indices, got shape {:?}",
                    order.shape()
                )));
            }
        }
        let order = order.as_ref().map(|o| slice(o, "order")).transpose()?;
        let weights = sample_weight
            .as_ref()
            .map(|w| slice(w, "sample_weight"))
            .transpose()?;
        let batches = EpochBatches {
            samples: slice(&samples, "samples")?,
            targets: slice(&targets, "targets")?,
            weights,
            order,
            bounds: &bounds,
            seeds: &seeds,
        };
        let mut borrowed = this.borrow(&data, &grads, &zero, &running, &updates)?;
        let mut arrays = this.arrays(&mut borrowed, &zero)?;
        let work = bounds
            .iter()
            .map(|&(start, stop)| this.plan.work(stop.saturating_sub(start)))
            .fold(0usize, usize::saturating_add);
        let plan = &mut this.plan;
        run_guarded(py, work >= STEP_INTERRUPTIBLE_WORK, || {
            plan.run_epoch(&batches, &mut arrays)
        })
    }
}

/// Work ([`StepPlan::work`]) from which a step is watched for Ctrl-C while it runs. A
/// step's work is mostly vectorised multiply-adds, cheaper per unit than the elementwise
/// work the kernels' threshold is set for: LeNetBN's step at batch 8 (~3e7) takes about a
/// millisecond on one thread, where handing it to the pool and polling from the calling
/// thread costs tens of microseconds. Shorter steps check Ctrl-C when they return.
const STEP_INTERRUPTIBLE_WORK: usize = 1 << 27;

fn not_contiguous(name: &str) -> PyErr {
    PyValueError::new_err(format!("{name}: expected a C-contiguous array"))
}

/// An update's state arrays, borrowed: (slot, first, second) — Adam's exp_avg and
/// exp_avg_sq, or SGD's momentum buffer (and no second).
type StateViews<'py> = (
    usize,
    Option<PyReadwriteArrayDyn<'py, f32>>,
    Option<PyReadwriteArrayDyn<'py, f32>>,
);

/// An update's scalars: the step (Adam) or first_step (SGD), and the hyper-parameters.
enum UpdateConfig {
    Adam(u64, AdamConfig),
    Sgd(bool, SgdConfig),
}

/// A step's arrays, borrowed for update in place (see [`TrainStep::borrow`]).
struct Borrowed<'py> {
    data: Vec<PyReadwriteArrayDyn<'py, f32>>,
    grads: Vec<PyReadwriteArrayDyn<'py, f32>>,
    running: Vec<RunningViews<'py>>,
    states: Vec<StateViews<'py>>,
    configs: Vec<UpdateConfig>,
}

type RunningViews<'py> = (
    PyReadwriteArrayDyn<'py, f32>,
    PyReadwriteArrayDyn<'py, f32>,
    PyReadwriteArrayDyn<'py, i64>,
);

impl TrainStep {
    /// The number of samples of a step's (or an epoch's) samples, checked against the
    /// plan's sample shape, with one class index and at most one weight each; `names`
    /// name the samples' and the classes' arguments in the errors.
    fn check_samples(
        &self,
        names: (&str, &str),
        shape: &[usize],
        target_shape: &[usize],
        weight_shape: Option<&[usize]>,
    ) -> PyResult<usize> {
        let (samples, targets) = names;
        if shape.len() != self.input_shape.len() + 1 || shape[1..] != self.input_shape[..] {
            return Err(PyValueError::new_err(format!(
                "{samples}: expected shape (N, {}), the plan's samples, got {shape:?}",
                crate::error::join_dims(&self.input_shape)
            )));
        }
        let n = shape[0];
        if target_shape != [n] {
            return Err(PyValueError::new_err(format!(
                "{targets}: expected {n} class indices, got shape {target_shape:?}"
            )));
        }
        if let Some(weight_shape) = weight_shape.filter(|&w| w != [n]) {
            return Err(PyValueError::new_err(format!(
                "sample_weight: expected shape ({n},), got {weight_shape:?}"
            )));
        }
        Ok(n)
    }

    /// Check and borrow the arrays a step updates: parameters, gradients, running
    /// statistics and optimizer state (each refused, before anything changes, when it
    /// cannot be written in place).
    fn borrow<'py>(
        &self,
        data: &[Array<'py>],
        grads: &[Array<'py>],
        zero: &[usize],
        running: &[Running<'py>],
        updates: &[Bound<'py, PyTuple>],
    ) -> PyResult<Borrowed<'py>> {
        if let Some(&slot) = zero.iter().find(|&&s| s >= self.slot_names.len()) {
            return Err(PyValueError::new_err(format!(
                "zero: no parameter slot {slot}"
            )));
        }
        let running_needed = self.plan.running_and_seed_counts().0;
        if running.len() < running_needed {
            return Err(PyValueError::new_err(format!(
                "running: expected {running_needed} batch norm statistics, got {}",
                running.len()
            )));
        }
        let data = borrow_all(data, &self.slot_names, &self.slot_shapes, "")?;
        let grads = borrow_all(grads, &self.slot_names, &self.slot_shapes, ".grad")?;
        let running = running
            .iter()
            .enumerate()
            .map(|(index, (mean, var, count))| {
                let count = count.try_readwrite().map_err(|e| {
                    PyValueError::new_err(format!("running[{index}].num_batches_tracked: {e}"))
                })?;
                Ok((
                    writeable(mean, format_args!("running[{index}].running_mean"))?,
                    writeable(var, format_args!("running[{index}].running_var"))?,
                    count,
                ))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let (states, configs) = self.updates(updates)?;
        Ok(Borrowed {
            data,
            grads,
            running,
            states,
            configs,
        })
    }

    /// The step's arrays over `borrowed` (whose update configurations it takes).
    fn arrays<'a>(
        &self,
        borrowed: &'a mut Borrowed<'_>,
        zero: &'a [usize],
    ) -> PyResult<StepArrays<'a>> {
        let mut running_arrays = Vec::with_capacity(borrowed.running.len());
        for (index, (mean, var, count)) in borrowed.running.iter_mut().enumerate() {
            let count = count
                .as_slice_mut()
                .ok()
                .filter(|c| c.len() == 1)
                .ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "running[{index}].num_batches_tracked: expected a 0-d int64 array"
                    ))
                })?;
            running_arrays.push(RunningArrays {
                mean: mean
                    .as_slice_mut()
                    .map_err(|_| not_contiguous("running_mean"))?,
                var: var
                    .as_slice_mut()
                    .map_err(|_| not_contiguous("running_var"))?,
                num_batches_tracked: &mut count[0],
            });
        }
        let configs = std::mem::take(&mut borrowed.configs);
        let updates = self.bind_updates(&mut borrowed.states, configs);
        Ok(StepArrays {
            data: slices(&mut borrowed.data),
            grads: slices(&mut borrowed.grads),
            zero,
            running: running_arrays,
            updates,
        })
    }

    fn state<'py>(
        &self,
        slot: usize,
        array: &Array<'py>,
        what: &str,
    ) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
        let name = &self.slot_names[slot];
        if array.shape() != self.slot_shapes[slot].as_slice() {
            return Err(PyValueError::new_err(format!(
                "{name} {what}: expected the parameter's shape {:?}, got {:?}",
                self.slot_shapes[slot],
                array.shape()
            )));
        }
        if !array.is_c_contiguous() {
            return Err(not_contiguous(&format!("{name} {what}")));
        }
        writeable(array, format_args!("{name} {what}"))
    }

    fn checked_slot(&self, slot: usize) -> PyResult<usize> {
        if slot >= self.slot_names.len() {
            return Err(PyValueError::new_err(format!(
                "updates: no parameter slot {slot}"
            )));
        }
        Ok(slot)
    }

    /// The optimizer's state arrays, borrowed, and its hyper-parameters, per update.
    #[allow(clippy::type_complexity)]
    fn updates<'py>(
        &self,
        updates: &[Bound<'py, PyTuple>],
    ) -> PyResult<(Vec<StateViews<'py>>, Vec<UpdateConfig>)> {
        let mut states = Vec::with_capacity(updates.len());
        let mut configs = Vec::with_capacity(updates.len());
        for update in updates {
            match self.optimizer {
                Optimizer::Adam { decoupled } => {
                    let (slot, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay): (
                        usize,
                        Array<'py>,
                        Array<'py>,
                        u64,
                        f32,
                        f32,
                        f32,
                        f32,
                        f32,
                    ) = update.extract()?;
                    let slot = self.checked_slot(slot)?;
                    states.push((
                        slot,
                        Some(self.state(slot, &exp_avg, "exp_avg")?),
                        Some(self.state(slot, &exp_avg_sq, "exp_avg_sq")?),
                    ));
                    configs.push(UpdateConfig::Adam(
                        step,
                        AdamConfig {
                            lr,
                            beta1,
                            beta2,
                            eps,
                            weight_decay,
                            decoupled,
                        },
                    ));
                }
                Optimizer::Sgd => {
                    let (slot, buffer, first_step, lr, momentum, dampening, nesterov, weight_decay): (
                        usize,
                        Option<Array<'py>>,
                        bool,
                        f32,
                        f32,
                        f32,
                        bool,
                        f32,
                    ) = update.extract()?;
                    let slot = self.checked_slot(slot)?;
                    let buffer = buffer
                        .map(|b| self.state(slot, &b, "momentum_buffer"))
                        .transpose()?;
                    states.push((slot, buffer, None));
                    configs.push(UpdateConfig::Sgd(
                        first_step,
                        SgdConfig {
                            lr,
                            momentum,
                            dampening,
                            nesterov,
                            weight_decay,
                        },
                    ));
                }
            }
        }
        Ok((states, configs))
    }

    fn bind_updates<'a>(
        &self,
        states: &'a mut [StateViews<'_>],
        configs: Vec<UpdateConfig>,
    ) -> Updates<'a> {
        let mut adam = Vec::new();
        let mut sgd = Vec::new();
        for ((slot, first, second), config) in states.iter_mut().zip(configs) {
            let first = first.as_mut().map(|a| {
                a.as_slice_mut()
                    .expect("a writeable float32 array checked contiguous")
            });
            match config {
                UpdateConfig::Adam(step, config) => adam.push(AdamUpdate {
                    slot: *slot,
                    exp_avg: first.expect("Adam has exp_avg"),
                    exp_avg_sq: second
                        .as_mut()
                        .expect("Adam has exp_avg_sq")
                        .as_slice_mut()
                        .expect("a writeable float32 array checked contiguous"),
                    step,
                    config,
                }),
                UpdateConfig::Sgd(first_step, config) => sgd.push(SgdUpdate {
                    slot: *slot,
                    momentum_buffer: first,
                    first_step,
                    config,
                }),
            }
        }
        match self.optimizer {
            Optimizer::Adam { .. } => Updates::Adam(adam),
            Optimizer::Sgd => Updates::Sgd(sgd),
        }
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TrainStep>()?;
    Ok(())
}
