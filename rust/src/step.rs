//! A whole training step of a plain chain of layers in one call: zero the gradients,
//! forward, cross-entropy loss, backward, optimizer update, with the activations and
//! saved state in buffers kept between steps.
//!
//! It calls the same kernels as the per-layer bindings, in the order `bnrs.training.
//! train_step` calls them through Python, with the same arguments, so its results are
//! the same bits; only the per-layer Python and binding work (and the allocation of every
//! output) is gone. The plan is a list of [`Stage`]s, each the forward and backward of
//! one layer, or of a training-mode batch norm → activation → 2×2 pool → dropout run as
//! one fused block ([`LayerKind::BnBlock`], the kernels of [`crate::kernels::fused`],
//! which give the unfused bits): the runs `bnrs.nn.fusion` fuses in a Sequential.

use std::time::Instant;

use crate::clock::timed;
use crate::error::{Error, Result};
use crate::kernels::activation::{self, Activation};
use crate::kernels::batch_norm::{self, BatchNormParams, RunningStats};
use crate::kernels::conv::{self, Conv2dParams, Epilogue};
use crate::kernels::fused::{self, BnBlockParams, DropoutSpec, Pool2x2};
use crate::kernels::linear::{self, LinearParams};
use crate::kernels::loss::{self, ClassesParams};
use crate::kernels::optim::{self, AdamConfig, SgdConfig};
use crate::kernels::pool::{self, Pool2d};
use crate::kernels::{dropout, nonzero};
use crate::memory::{grow_scratch_until, resize_scratch};
use crate::parallel::{stop_token, StopToken};
use crate::simd_dispatch;

type Pair = (i64, i64);

/// What a layer does in the step, with the indices of the arrays it uses: parameters by
/// their slot in [`StepArrays::data`], running statistics by their index in
/// [`StepArrays::running`], dropout seeds by theirs in [`Batch::seeds`].
#[derive(Clone, Debug, PartialEq)]
pub enum LayerKind {
    Conv2d {
        weight: usize,
        bias: Option<usize>,
        weight_shape: [usize; 4],
        stride: Pair,
        padding: Pair,
        dilation: Pair,
        groups: i64,
    },
    Linear {
        weight: usize,
        bias: Option<usize>,
        weight_shape: [usize; 2],
    },
    /// Training-mode batch norm (batch statistics); `running` when it tracks them.
    BatchNorm {
        weight: Option<usize>,
        bias: Option<usize>,
        running: Option<usize>,
        eps: f32,
        /// None: the cumulative average, 1 / num_batches_tracked.
        momentum: Option<f32>,
    },
    Activation(Activation),
    Pool(Pool2d),
    /// Inverted dropout over units of `unit` elements (1, or H·W for Dropout2d) with the
    /// step's seed number `seed`.
    Dropout {
        p: f32,
        unit: usize,
        seed: usize,
    },
    /// Training-mode batch norm (as [`LayerKind::BatchNorm`]) with the activation, 2×2
    /// pool and dropout after it, as one fused block.
    BnBlock {
        weight: Option<usize>,
        bias: Option<usize>,
        running: Option<usize>,
        eps: f32,
        momentum: Option<f32>,
        activation: Option<Activation>,
        pool: Option<Pool2x2>,
        dropout: Option<BlockDropout>,
    },
    /// Zeros out, zeros back: dropout with p = 1.
    Zeros,
    /// The output is the input itself, reshaped (Flatten; dropout with p = 0).
    View,
}

/// The dropout at the end of a fused block: probability in (0, 1), whole planes as units
/// (Dropout2d) or elements, and the step's seed number.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockDropout {
    pub p: f32,
    pub channel_wise: bool,
    pub seed: usize,
}

impl LayerKind {
    /// The slots of the layer's weight and bias.
    fn parameters(&self) -> (Option<usize>, Option<usize>) {
        match self {
            LayerKind::Conv2d { weight, bias, .. } | LayerKind::Linear { weight, bias, .. } => {
                (Some(*weight), *bias)
            }
            LayerKind::BatchNorm { weight, bias, .. } | LayerKind::BnBlock { weight, bias, .. } => {
                (*weight, *bias)
            }
            _ => (None, None),
        }
    }

    /// The number of the step's dropout seed the layer draws, if it draws one.
    fn seed(&self) -> Option<usize> {
        match self {
            LayerKind::BnBlock { dropout, .. } => dropout.map(|d| d.seed),
            LayerKind::Dropout { seed, .. } => Some(*seed),
            _ => None,
        }
    }

    /// Whether it is a training batch norm (alone or in a fused block).
    fn is_norm(&self) -> bool {
        matches!(
            self,
            LayerKind::BatchNorm { .. } | LayerKind::BnBlock { .. }
        )
    }

    fn has_parameters(&self) -> bool {
        self.parameters().0.is_some()
    }

    /// Whether the output is the input itself (no kernel, no buffer of its own).
    fn is_view(&self) -> bool {
        matches!(self, LayerKind::View)
    }
}

/// A layer of the plan with the sample shapes around it (no batch axis) and the state
/// its forward keeps for its backward.
struct Stage {
    kind: LayerKind,
    input_shape: Vec<usize>,
    output_shape: Vec<usize>,
    /// Where the input and output live: `None` is the network's input.
    input: Option<usize>,
    output: Option<usize>,
    save_mean: Vec<f32>,
    save_invstd: Vec<f32>,
    indices: Vec<i64>,
    /// A fused block's pooling-window codes (one byte per output value), from its forward
    /// for its backward ([`fused::forward_train`]).
    window_codes: Vec<u8>,
}

/// The running statistics of one batch norm, updated in place.
pub struct RunningArrays<'a> {
    pub mean: &'a mut [f32],
    pub var: &'a mut [f32],
    pub num_batches_tracked: &'a mut i64,
}

/// One parameter's Adam (or AdamW) update: its slot, state and hyper-parameters.
pub struct AdamUpdate<'a> {
    pub slot: usize,
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    /// The 1-based index of this step for the parameter.
    pub step: u64,
    pub config: AdamConfig,
}

/// One parameter's SGD update.
pub struct SgdUpdate<'a> {
    pub slot: usize,
    pub momentum_buffer: Option<&'a mut [f32]>,
    pub first_step: bool,
    pub config: SgdConfig,
}

/// The optimizer's updates, in the optimizer's order of groups and parameters.
pub enum Updates<'a> {
    Adam(Vec<AdamUpdate<'a>>),
    Sgd(Vec<SgdUpdate<'a>>),
}

/// What one step trains on: its samples, their classes and weights, and the seeds of its
/// dropout masks.
pub struct Batch<'a> {
    pub input: &'a [f32],
    pub target: &'a [i64],
    pub sample_weight: Option<&'a [f64]>,
    pub seeds: &'a [u64],
}

/// The arrays a step updates, kept from one step to the next: the parameters, their
/// gradients, the running statistics and the optimizer's state.
pub struct StepArrays<'a> {
    /// The values of every parameter slot (the model's and the optimizer's).
    pub data: Vec<&'a mut [f32]>,
    /// Their gradients, added to by the backward (as `param.grad += ...`).
    pub grads: Vec<&'a mut [f32]>,
    /// The slots whose gradients are set to zero first (the optimizer's `zero_grad`).
    pub zero: &'a [usize],
    pub running: Vec<RunningArrays<'a>>,
    pub updates: Updates<'a>,
}

/// A chain of layers and the buffers of its steps, kept from one step to the next.
pub struct StepPlan {
    stages: Vec<Stage>,
    /// The activations, one per stage that writes one.
    activations: Vec<Vec<f32>>,
    /// The output gradient of the stage running backward, and its input gradient.
    grad_output: Vec<f32>,
    grad_input: Vec<f32>,
    /// The kernels' parameter gradients, per slot, before they are added to `grads`
    /// (for the slots not written directly, see [`GradSinks`]).
    param_grads: Vec<Vec<f32>>,
    /// Per slot: whether a layer uses it, and whether this step is still to write its
    /// gradient directly (a layer's, zeroed by the step).
    used: Vec<bool>,
    direct: Vec<bool>,
    /// The first stage with parameters: the backward stops there, without its input
    /// gradient (as `Sequential.backward(..., input_grad=False)`).
    first_trained: usize,
    /// How many of the step's dropout seeds the layers that ran forward have used (one
    /// past the largest): after a failed step, the caller gives the generators of the
    /// others their draw back, as a layer-by-layer forward would not have reached them.
    seeds_used: usize,
    /// How many steps the last [`StepPlan::run`] (0 or 1) or [`StepPlan::run_epoch`]
    /// completed (backward and update done): the caller counts them in its optimizer's
    /// steps and dropout draws, the call having ended early or not.
    steps_done: usize,
    /// The wall time of each stage, while switched on ([`StepPlan::set_stage_clock`]).
    clock: Option<StageClock>,
}

/// Wall time spent in each part of the steps since the clock was switched on: per stage
/// its forward and backward (0 for a view, and the backward 0 for the stages before the
/// first with parameters, which the backward does not reach), the loss (forward and
/// gradient) and the optimizer's updates; and the steps whose updates were done. Steps
/// that stopped early (a non-finite loss, an error, Ctrl-C) add the time of the parts
/// they ran without being counted. Wall time, not CPU time: at several threads a stage's
/// time is what the step waits for it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageClock {
    pub forward: Vec<f64>,
    pub backward: Vec<f64>,
    pub loss: f64,
    pub update: f64,
    /// Steps whose updates were done.
    pub steps: u64,
}

/// `run()`, its wall time added to `*seconds` when `seconds` is given.
fn clocked<T>(seconds: Option<&mut f64>, run: impl FnOnce() -> T) -> T {
    match seconds {
        None => run(),
        Some(total) => {
            let start = Instant::now();
            let result = run();
            *total += start.elapsed().as_secs_f64();
            result
        }
    }
}

/// The mini-batches of an epoch, each gathered into its step's input in turn.
pub struct EpochBatches<'a> {
    /// Every sample, one after another (the plan's sample length each), and its class.
    pub samples: &'a [f32],
    pub targets: &'a [i64],
    /// Every sample's weight in the loss (None: the plain mean).
    pub weights: Option<&'a [f64]>,
    /// The order of the samples in this epoch (indices into them), or None: as they are.
    pub order: Option<&'a [i64]>,
    /// Each batch's (start, stop) positions into `order`, or into the samples.
    pub bounds: &'a [(usize, usize)],
    /// The dropout seeds of every step, one step's after another
    /// ([`StepPlan::running_and_seed_counts`] per step).
    pub seeds: &'a [u64],
}

const ACTIVATION: &str = "training step: a layer's output";
const GRADIENT: &str = "training step: a layer's input gradient";
const SAVED: &str = "training step: a layer's saved state";

fn len_of(batch: usize, sample: &[usize]) -> usize {
    batch * sample.iter().product::<usize>()
}

fn batched(batch: usize, sample: &[usize]) -> Vec<usize> {
    std::iter::once(batch)
        .chain(sample.iter().copied())
        .collect()
}

/// The first `len` values of `buffer`, a kernel's output kept from one step to the next;
/// grown (zeroed, a piece at a time: an interrupt stops it in between) only when it is
/// shorter. The kernels write every value of their output, so what an earlier step left
/// there is never read: a step after a smaller one (the last batch of an epoch) does not
/// write zeros only to overwrite them, nor does the backward's input gradient, whose
/// buffer swaps with the output gradient from layer to layer.
fn scratch<'b, T: Copy + Default>(
    buffer: &'b mut Vec<T>,
    len: usize,
    what: &'static str,
) -> Result<&'b mut [T]> {
    if buffer.len() < len && !grow_scratch_until(buffer, len, what, &stop_token())? {
        return Err(interrupted());
    }
    Ok(&mut buffer[..len])
}

simd_dispatch! {
    /// `total += part`, element by element: what `param.grad += grad` does in NumPy.
    fn accumulate(total: &mut [f32], part: &[f32]) {
        for (t, &p) in total.iter_mut().zip(part) {
            *t += p;
        }
    }
}

simd_dispatch! {
    /// `values += 0.0`: the bits of a gradient a kernel wrote as `0 + g` gives them (a
    /// zero's sign), at the widest vectors: a pass over every parameter of the network
    /// at every step (LeNetBN: 207k values; ~3 µs of a batch-8 step less than the
    /// baseline build's loop).
    fn plus_zero(values: &mut [f32]) {
        for v in values {
            *v += 0.0;
        }
    }
}

/// The error of an interrupted step: never seen by the caller, whose guard reports the
/// interrupt instead.
fn interrupted() -> Error {
    Error::invalid("training step", "an interrupt", "no interrupt")
}

impl StepPlan {
    /// Free the buffers kept between steps (the next step makes them again); returns the
    /// bytes freed.
    pub fn release(&mut self) -> usize {
        fn free<T>(buffer: &mut Vec<T>) -> usize {
            let bytes = buffer.capacity() * std::mem::size_of::<T>();
            *buffer = Vec::new();
            bytes
        }
        let mut bytes = free(&mut self.grad_output) + free(&mut self.grad_input);
        for buffer in self.activations.iter_mut().chain(&mut self.param_grads) {
            bytes += free(buffer);
        }
        for stage in &mut self.stages {
            bytes += free(&mut stage.save_mean) + free(&mut stage.save_invstd);
            bytes += free(&mut stage.indices) + free(&mut stage.window_codes);
        }
        bytes
    }

    /// How many dropout seeds the last step used: those of the dropout layers its forward
    /// completed (all of them after a step that got past the forward).
    pub fn seeds_used(&self) -> usize {
        self.seeds_used
    }

    /// How many steps the last [`StepPlan::run`] (0 or 1) or [`StepPlan::run_epoch`]
    /// completed, their updates done.
    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// Forget what the last call did ([`StepPlan::steps_done`], [`StepPlan::seeds_used`]):
    /// a call refused before it starts reports neither steps nor seeds.
    pub fn reset_counts(&mut self) {
        self.steps_done = 0;
        self.seeds_used = 0;
    }

    /// Start timing the stages from zero (`on`), or stop and forget the times.
    pub fn set_stage_clock(&mut self, on: bool) {
        self.clock = on.then(|| StageClock {
            forward: vec![0.0; self.stages.len()],
            backward: vec![0.0; self.stages.len()],
            ..StageClock::default()
        });
    }

    /// The times since the clock was switched on (None while it is off).
    pub fn stage_clock(&self) -> Option<&StageClock> {
        self.clock.as_ref()
    }

    /// How many running-statistics entries and dropout seeds a step of this plan reads
    /// (one past the largest index its layers name), for the binding to check the lists
    /// it is given against.
    pub fn running_and_seed_counts(&self) -> (usize, usize) {
        let (mut running, mut seeds) = (0, 0);
        for stage in &self.stages {
            let r = match &stage.kind {
                LayerKind::BatchNorm { running, .. } | LayerKind::BnBlock { running, .. } => {
                    *running
                }
                _ => None,
            };
            let s = stage.kind.seed();
            running = running.max(r.map_or(0, |r| r + 1));
            seeds = seeds.max(s.map_or(0, |s| s + 1));
        }
        (running, seeds)
    }

    /// A plan of `layers`, each with its sample input and output shapes (no batch axis),
    /// over `n_slots` parameter slots. The layers must chain: each input shape the
    /// output shape before it, the last a (classes,) vector of logits.
    pub fn new(layers: Vec<(LayerKind, Vec<usize>, Vec<usize>)>, n_slots: usize) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::invalid("layers", "none", "at least one layer"));
        }
        let mut stages = Vec::with_capacity(layers.len());
        let mut current: Option<usize> = None;
        let mut n_buffers = 0;
        for (index, (kind, input_shape, output_shape)) in layers.into_iter().enumerate() {
            if let Some(previous) = stages.last().map(|s: &Stage| &s.output_shape) {
                if *previous != input_shape {
                    return Err(Error::invalid(
                        "layers",
                        format!("layer {index} taking {input_shape:?} after {previous:?}"),
                        "each layer's input shape the output shape of the one before",
                    ));
                }
            }
            nonzero("layers", &input_shape)?;
            let input = current;
            if !kind.is_view() {
                current = Some(n_buffers);
                n_buffers += 1;
            }
            stages.push(Stage {
                kind,
                input_shape,
                output_shape,
                input,
                output: current,
                save_mean: Vec::new(),
                save_invstd: Vec::new(),
                indices: Vec::new(),
                window_codes: Vec::new(),
            });
        }
        let last = stages.last().expect("at least one layer");
        if last.output_shape.len() != 1 {
            return Err(Error::invalid(
                "layers",
                format!("a last output of shape {:?}", last.output_shape),
                "(classes,) logits",
            ));
        }
        let mut used = vec![false; n_slots];
        for stage in &stages {
            let (weight, bias) = stage.kind.parameters();
            for slot in weight.into_iter().chain(bias) {
                if slot >= n_slots || used[slot] {
                    return Err(Error::invalid(
                        "layers",
                        format!("parameter slot {slot} used twice or out of {n_slots}"),
                        "each layer's parameters in slots of their own",
                    ));
                }
                used[slot] = true;
            }
        }
        let first_trained = stages
            .iter()
            .position(|s| s.kind.has_parameters())
            .unwrap_or(stages.len());
        Ok(StepPlan {
            stages,
            activations: vec![Vec::new(); n_buffers],
            grad_output: Vec::new(),
            grad_input: Vec::new(),
            param_grads: vec![Vec::new(); n_slots],
            used,
            direct: vec![false; n_slots],
            first_trained,
            seeds_used: 0,
            steps_done: 0,
            clock: None,
        })
    }

    /// The number of samples per step the arrays' input holds.
    pub fn sample_len(&self) -> usize {
        self.stages[0].input_shape.iter().product()
    }

    /// Multiply-adds of a step of `batch` samples (roughly: the forward's three times),
    /// for the guard's choice of watching a call for Ctrl-C while it runs.
    pub fn work(&self, batch: usize) -> usize {
        self.stages
            .iter()
            .map(|s| {
                let out = len_of(batch, &s.output_shape);
                match &s.kind {
                    LayerKind::Conv2d { weight_shape, .. } => {
                        out.saturating_mul(weight_shape[1] * weight_shape[2] * weight_shape[3])
                    }
                    LayerKind::Linear { weight_shape, .. } => out.saturating_mul(weight_shape[1]),
                    _ => out,
                }
            })
            .fold(0usize, usize::saturating_add)
            .saturating_mul(3)
    }

    /// One step on `feed`: zero the gradients of `arrays.zero`, forward, loss; if the loss
    /// is finite, the backward (adding to the gradients) and the optimizer's updates.
    /// Returns the loss (a non-finite one before any backward, as `train_step`).
    /// [`StepPlan::steps_done`] is 1 once the updates are done, and stays 1 when the call
    /// is then reported as interrupted (a Ctrl-C seen as the step ended discards its
    /// result, not its updates).
    pub fn run(&mut self, feed: &Batch<'_>, arrays: &mut StepArrays<'_>) -> Result<f64> {
        self.steps_done = 0;
        let loss = self.step(feed, arrays)?;
        if loss.is_finite() {
            self.steps_done = 1;
        }
        Ok(loss)
    }

    /// [`StepPlan::run`] without the count.
    fn step(&mut self, feed: &Batch<'_>, arrays: &mut StepArrays<'_>) -> Result<f64> {
        let sample_len = self.sample_len();
        if sample_len == 0 || !feed.input.len().is_multiple_of(sample_len) {
            return Err(Error::invalid(
                "input",
                format!("{} values", feed.input.len()),
                format!("a whole number of samples of {sample_len} values"),
            ));
        }
        let batch = feed.input.len() / sample_len;
        self.seeds_used = 0;
        if arrays.data.len() != self.used.len() || arrays.grads.len() != self.used.len() {
            return Err(Error::invalid(
                "data, grads",
                format!("{} and {} arrays", arrays.data.len(), arrays.grads.len()),
                format!("one per parameter slot, {}", self.used.len()),
            ));
        }
        // zero_grad: the gradients the backward writes are zeroed by writing them; those
        // it did not write when the step ends early are zeroed then.
        self.direct.fill(false);
        for &slot in arrays.zero {
            self.direct[slot] = self.used[slot];
            if !self.used[slot] {
                arrays.grads[slot].fill(0.0);
            }
        }
        let outcome = self.forward_backward(batch, feed, arrays);
        for (slot, _) in self
            .direct
            .iter()
            .enumerate()
            .filter(|(_, &pending)| pending)
        {
            arrays.grads[slot].fill(0.0);
        }
        let loss = outcome?;
        if loss.is_finite() {
            if stop_token().is_set() {
                return Err(interrupted());
            }
            clocked(self.clock.as_mut().map(|c| &mut c.update), || {
                update(arrays)
            })?;
            if let Some(clock) = &mut self.clock {
                clock.steps += 1;
            }
        }
        Ok(loss)
    }

    /// The steps of an epoch, one per batch of `batches`, in one call: each batch's samples
    /// gathered (in `order`) into the step's input, then a step as [`StepPlan::run`]
    /// takes it (without `run`'s reset of [`StepPlan::steps_done`], which the epoch
    /// counts up) with that step's dropout seeds on `arrays`. After each step the
    /// optimizer's step counts move on as the next `train_step` would pass them (Adam's
    /// `step` + 1; SGD's `first_step` false). Returns the losses of the steps taken; the epoch stops after
    /// a non-finite one (that step, as `train_step`, without backward or update).
    /// [`StepPlan::steps_done`] counts the completed steps, also after an error.
    pub fn run_epoch(
        &mut self,
        batches: &EpochBatches<'_>,
        arrays: &mut StepArrays<'_>,
    ) -> Result<Vec<f64>> {
        self.steps_done = 0;
        self.seeds_used = 0;
        let sample_len = self.sample_len();
        let n_samples = batches.samples.len() / sample_len.max(1);
        if sample_len == 0 || n_samples * sample_len != batches.samples.len() {
            return Err(Error::invalid(
                "samples",
                format!("{} values", batches.samples.len()),
                format!("a whole number of samples of {sample_len} values"),
            ));
        }
        if batches.targets.len() != n_samples {
            return Err(Error::invalid(
                "targets",
                format!("{} class indices", batches.targets.len()),
                format!("one per sample, {n_samples}"),
            ));
        }
        if let Some(weights) = batches.weights.filter(|w| w.len() != n_samples) {
            return Err(Error::invalid(
                "sample_weight",
                format!("{} weights", weights.len()),
                format!("one per sample, {n_samples}"),
            ));
        }
        let positions = match batches.order {
            Some(order) => {
                if let Some(&bad) = order
                    .iter()
                    .find(|&&i| usize::try_from(i).map_or(true, |i| i >= n_samples))
                {
                    return Err(Error::invalid(
                        "order",
                        format!("index {bad}"),
                        format!("indices below {n_samples}, the number of samples"),
                    ));
                }
                order.len()
            }
            None => n_samples,
        };
        if let Some(&(start, stop)) = batches
            .bounds
            .iter()
            .find(|&&(start, stop)| start >= stop || stop > positions)
        {
            return Err(Error::invalid(
                "bounds",
                format!("a batch ({start}, {stop})"),
                format!("start < stop <= {positions}"),
            ));
        }
        let per_step = self.running_and_seed_counts().1;
        let seeds_needed = batches.bounds.len() * per_step;
        if batches.seeds.len() < seeds_needed {
            return Err(Error::invalid(
                "seeds",
                format!("{} dropout seeds", batches.seeds.len()),
                format!("{per_step} per step, {seeds_needed}"),
            ));
        }
        let stop_requested = stop_token();
        let mut input = Vec::new();
        let mut target = Vec::new();
        let mut weight = Vec::new();
        let mut losses = Vec::with_capacity(batches.bounds.len());
        for (index, &(start, stop)) in batches.bounds.iter().enumerate() {
            // What an error or Ctrl-C before the step's forward leaves: no seed used.
            self.seeds_used = 0;
            if stop_requested.is_set() {
                return Err(interrupted());
            }
            let (x, t, w): (&[f32], &[i64], Option<&[f64]>) = match batches.order {
                // Consecutive samples: the step reads them where they are.
                None => (
                    &batches.samples[start * sample_len..stop * sample_len],
                    &batches.targets[start..stop],
                    batches.weights.map(|w| &w[start..stop]),
                ),
                Some(order) => {
                    let rows = Rows {
                        input: &mut input,
                        target: &mut target,
                        weight: &mut weight,
                    };
                    gather(
                        batches,
                        &order[start..stop],
                        sample_len,
                        rows,
                        &stop_requested,
                    )?;
                    (&input, &target, batches.weights.map(|_| &weight[..]))
                }
            };
            let feed = Batch {
                input: x,
                target: t,
                sample_weight: w,
                seeds: &batches.seeds[index * per_step..(index + 1) * per_step],
            };
            let loss = self.step(&feed, arrays)?;
            losses.push(loss);
            if !loss.is_finite() {
                break;
            }
            self.steps_done += 1;
            // A Ctrl-C seen once the step returned takes no draw of it back.
            self.seeds_used = 0;
            arrays.next_step();
        }
        Ok(losses)
    }

    /// Forward, loss and (if the loss is finite) backward; returns the loss.
    fn forward_backward(
        &mut self,
        batch: usize,
        feed: &Batch<'_>,
        arrays: &mut StepArrays<'_>,
    ) -> Result<f64> {
        let stop = stop_token();
        self.forward(batch, feed, arrays)?;
        if stop.is_set() {
            return Err(interrupted());
        }
        let last = self.stages.last().expect("a plan has layers");
        let classes = ClassesParams::new(&batched(batch, &last.output_shape))?;
        let logits = match last.output {
            None => feed.input,
            Some(k) => &self.activations[k][..len_of(batch, &last.output_shape)],
        };
        // The loss and, if finite, its gradient (the backward's start).
        let grad_output = &mut self.grad_output;
        let loss = clocked(
            self.clock.as_mut().map(|c| &mut c.loss),
            || -> Result<f64> {
                let loss = timed(|| {
                    loss::cross_entropy(&classes, logits, feed.target, feed.sample_weight)
                })?;
                if loss.is_finite() {
                    let grad_logits = scratch(grad_output, logits.len(), GRADIENT)?;
                    timed(|| {
                        loss::cross_entropy_backward(
                            &classes,
                            logits,
                            feed.target,
                            feed.sample_weight,
                            grad_logits,
                        )
                    })?;
                }
                Ok(loss)
            },
        )?;
        if !loss.is_finite() {
            return Ok(loss);
        }
        self.backward(batch, feed, arrays)?;
        Ok(loss)
    }

    fn forward(
        &mut self,
        batch: usize,
        feed: &Batch<'_>,
        arrays: &mut StepArrays<'_>,
    ) -> Result<()> {
        let stop = stop_token();
        for index in 0..self.stages.len() {
            if stop.is_set() {
                return Err(interrupted());
            }
            let Some(out_slot) = self.stages[index]
                .output
                .filter(|_| !self.stages[index].kind.is_view())
            else {
                continue;
            };
            let mut output = std::mem::take(&mut self.activations[out_slot]);
            let stage = &mut self.stages[index];
            let x = match stage.input {
                None => feed.input,
                Some(k) => &self.activations[k][..len_of(batch, &stage.input_shape)],
            };
            let seconds = self.clock.as_mut().map(|c| &mut c.forward[index]);
            let result = clocked(seconds, || {
                scratch(&mut output, len_of(batch, &stage.output_shape), ACTIVATION)
                    .and_then(|out| stage_forward(stage, batch, x, out, feed.seeds, arrays))
            });
            self.activations[out_slot] = output;
            result?;
            if let Some(seed) = self.stages[index].kind.seed() {
                self.seeds_used = self.seeds_used.max(seed + 1);
            }
        }
        Ok(())
    }

    fn backward(
        &mut self,
        batch: usize,
        feed: &Batch<'_>,
        arrays: &mut StepArrays<'_>,
    ) -> Result<()> {
        let stop = stop_token();
        let StepArrays { data, grads, .. } = arrays;
        let mut sinks = GradSinks {
            grads,
            scratch: &mut self.param_grads,
            direct: &mut self.direct,
        };
        for index in (self.first_trained..self.stages.len()).rev() {
            if stop.is_set() {
                return Err(interrupted());
            }
            let stage = &self.stages[index];
            if stage.kind.is_view() {
                continue; // the gradient passes unchanged (reshaped)
            }
            let (in_len, out_len) = (
                len_of(batch, &stage.input_shape),
                len_of(batch, &stage.output_shape),
            );
            let input_grad = index > self.first_trained;
            // A batch norm's backward computes its input gradient even when it is not
            // wanted (the layer's backward drops it then): into the same buffer.
            let gx = match input_grad || stage.kind.is_norm() {
                true => Some(scratch(&mut self.grad_input, in_len, GRADIENT)?),
                false => None,
            };
            let x = match stage.input {
                None => feed.input,
                Some(k) => &self.activations[k][..in_len],
            };
            let y =
                &self.activations[stage.output.expect("a stage that is no view writes")][..out_len];
            let seconds = self.clock.as_mut().map(|c| &mut c.backward[index]);
            clocked(seconds, || {
                stage_backward(
                    stage,
                    batch,
                    x,
                    y,
                    &self.grad_output[..out_len],
                    gx,
                    data,
                    &mut sinks,
                    feed.seeds,
                )
            })?;
            if input_grad {
                std::mem::swap(&mut self.grad_output, &mut self.grad_input);
            }
        }
        Ok(())
    }
}

fn param<'a>(arrays: &'a StepArrays<'_>, slot: usize) -> &'a [f32] {
    &*arrays.data[slot]
}

fn stage_forward(
    stage: &mut Stage,
    batch: usize,
    x: &[f32],
    out: &mut [f32],
    seeds: &[u64],
    arrays: &mut StepArrays<'_>,
) -> Result<()> {
    let in_shape = batched(batch, &stage.input_shape);
    match &stage.kind {
        LayerKind::Conv2d {
            weight,
            bias,
            weight_shape,
            stride,
            padding,
            dilation,
            groups,
        } => {
            let p = Conv2dParams::grouped(
                &in_shape,
                weight_shape,
                *stride,
                *padding,
                *dilation,
                *groups,
            )?;
            let (w, b) = (param(arrays, *weight), bias.map(|b| param(arrays, b)));
            timed(|| conv::forward_fused(&p, x, w, b, Epilogue::default(), out))
        }
        LayerKind::Linear {
            weight,
            bias,
            weight_shape,
        } => {
            let p = LinearParams::new(&in_shape, weight_shape)?;
            let (w, b) = (param(arrays, *weight), bias.map(|b| param(arrays, b)));
            timed(|| linear::forward(&p, x, w, b, out))
        }
        LayerKind::BatchNorm {
            weight,
            bias,
            running,
            eps,
            momentum,
        } => {
            let p = BatchNormParams::new(&in_shape, *eps)?;
            resize_scratch(&mut stage.save_mean, p.channels, SAVED)?;
            resize_scratch(&mut stage.save_invstd, p.channels, SAVED)?;
            let gamma = weight.map(|w| &*arrays.data[w]);
            let beta = bias.map(|b| &*arrays.data[b]);
            let stats = running.map(|r| &mut arrays.running[r]);
            let (mean, invstd) = (&mut stage.save_mean, &mut stage.save_invstd);
            train_norm(stats, *momentum, |running| {
                timed(|| batch_norm::forward_train(&p, x, gamma, beta, running, out, mean, invstd))
            })
        }
        LayerKind::BnBlock {
            weight,
            bias,
            running,
            eps,
            momentum,
            ..
        } => {
            let p = block_params(&stage.kind, &in_shape, *eps, seeds)?;
            resize_scratch(&mut stage.save_mean, p.bn.channels, SAVED)?;
            resize_scratch(&mut stage.save_invstd, p.bn.channels, SAVED)?;
            let gamma = weight.map(|w| &*arrays.data[w]);
            let beta = bias.map(|b| &*arrays.data[b]);
            let stats = running.map(|r| &mut arrays.running[r]);
            let (mean, invstd) = (&mut stage.save_mean, &mut stage.save_invstd);
            // Window codes only for the blocks that write them (not a BatchNorm1d's).
            let codes = if p.writes_window_codes() {
                resize_scratch(&mut stage.window_codes, p.out_len(), SAVED)?;
                Some(&mut stage.window_codes[..])
            } else {
                None
            };
            train_norm(stats, *momentum, |running| {
                timed(|| {
                    fused::forward_train(&p, x, gamma, beta, running, out, mean, invstd, codes)
                })
            })
        }
        LayerKind::Activation(act) => timed(|| activation::forward(*act, x, out)),
        LayerKind::Pool(pooling) => {
            let p = pooling.params(&in_shape)?;
            let indices = match pooling {
                Pool2d::Max { .. } => Some(scratch(&mut stage.indices, out.len(), SAVED)?),
                Pool2d::Avg { .. } => None,
            };
            timed(|| pooling.forward(&p, x, out, indices))
        }
        LayerKind::Dropout { p, unit, seed } => {
            nonzero("input", &in_shape)?;
            let seed = seeds[*seed];
            timed(|| dropout::forward(x, *p, seed, *unit, out))
        }
        LayerKind::Zeros => {
            out.fill(0.0);
            Ok(())
        }
        LayerKind::View => unreachable!("a view runs no forward"),
    }
}

/// Run a training batch norm's `kernel` with the running statistics it moves (the
/// momentum as the layer computes it), then count the batch in `num_batches_tracked`.
fn train_norm(
    stats: Option<&mut RunningArrays<'_>>,
    momentum: Option<f32>,
    kernel: impl FnOnce(Option<RunningStats<'_>>) -> Result<()>,
) -> Result<()> {
    let Some(stats) = stats else {
        return kernel(None);
    };
    let tracked = *stats.num_batches_tracked + 1;
    // Python's float 1 / tracked, then the binding's f32.
    let momentum = momentum.unwrap_or((1.0 / tracked as f64) as f32);
    kernel(Some(RunningStats {
        mean: &mut *stats.mean,
        var: &mut *stats.var,
        momentum,
    }))?;
    // After the kernel, so that a rejected batch leaves the count unchanged.
    *stats.num_batches_tracked += 1;
    Ok(())
}

/// The fused kernels' parameters of a [`LayerKind::BnBlock`] on a batch of `in_shape`
/// (eps 0 for the backward, as the binding's), its dropout seed from `seeds`.
fn block_params(
    kind: &LayerKind,
    in_shape: &[usize],
    eps: f32,
    seeds: &[u64],
) -> Result<BnBlockParams> {
    let LayerKind::BnBlock {
        activation,
        pool,
        dropout,
        ..
    } = kind
    else {
        unreachable!("only a fused block has a block's parameters")
    };
    let dropout = dropout.map(|d| DropoutSpec {
        p: d.p,
        seed: seeds[d.seed],
        channel_wise: d.channel_wise,
    });
    BnBlockParams::new(in_shape, eps, *activation, *pool, dropout)
}

/// Where the backward writes parameter gradients: per slot, `direct` when the step zeroed
/// the slot's `grad` (the kernel writes it, then `+ 0.0`: the bits of `0 + g`, which is g
/// but for the sign of a zero), else into `scratch` added to `grad` afterwards.
struct GradSinks<'s, 'a> {
    grads: &'s mut [&'a mut [f32]],
    scratch: &'s mut [Vec<f32>],
    /// Cleared once the slot's gradient is written.
    direct: &'s mut [bool],
}

impl GradSinks<'_, '_> {
    /// Run `kernel` with the gradients of `weight` and `bias` to write, then add them to
    /// `grad` (weight, then bias, as the layers do) if it succeeded.
    fn write(
        &mut self,
        weight: usize,
        bias: Option<usize>,
        kernel: impl FnOnce(&mut [f32], Option<&mut [f32]>) -> Result<()>,
    ) -> Result<()> {
        let mut staged = |slot: usize| -> Result<Option<Vec<f32>>> {
            if self.direct[slot] {
                return Ok(None);
            }
            let mut grad = std::mem::take(&mut self.scratch[slot]);
            resize_scratch(&mut grad, self.grads[slot].len(), GRADIENT)?;
            Ok(Some(grad))
        };
        let mut weight_scratch = staged(weight)?;
        let mut bias_scratch = bias.map(&mut staged).transpose()?.flatten();
        let result = {
            let (weight_grad, bias_grad) = match bias {
                Some(b) => {
                    let [w, b] = self
                        .grads
                        .get_disjoint_mut([weight, b])
                        .expect("a layer's weight and bias are distinct slots");
                    (&mut **w, Some(&mut **b))
                }
                None => (&mut *self.grads[weight], None),
            };
            let gw = match weight_scratch.as_mut() {
                Some(scratch) => &mut scratch[..],
                None => weight_grad,
            };
            let gb = match (bias_scratch.as_mut(), bias_grad) {
                (Some(scratch), _) => Some(&mut scratch[..]),
                (None, direct) => direct,
            };
            kernel(gw, gb)
        };
        for (slot, scratch) in [(Some(weight), weight_scratch), (bias, bias_scratch)] {
            let Some(slot) = slot else { continue };
            match scratch {
                Some(scratch) => {
                    if result.is_ok() {
                        accumulate(self.grads[slot], &scratch);
                    }
                    self.scratch[slot] = scratch;
                }
                None if result.is_ok() => {
                    plus_zero(self.grads[slot]);
                    self.direct[slot] = false;
                }
                None => {}
            }
        }
        result
    }
}

#[allow(clippy::too_many_arguments)]
fn stage_backward(
    stage: &Stage,
    batch: usize,
    x: &[f32],
    y: &[f32],
    grad_output: &[f32],
    grad_input: Option<&mut [f32]>,
    data: &[&mut [f32]],
    sinks: &mut GradSinks<'_, '_>,
    seeds: &[u64],
) -> Result<()> {
    let in_shape = batched(batch, &stage.input_shape);
    let out_shape = batched(batch, &stage.output_shape);
    let expect_grad = "only a layer with parameters stops the backward";
    let norm_grad = "a batch norm always writes an input gradient";
    match &stage.kind {
        LayerKind::Conv2d {
            weight,
            bias,
            weight_shape,
            stride,
            padding,
            dilation,
            groups,
        } => {
            let p = Conv2dParams::grouped(
                &in_shape,
                weight_shape,
                *stride,
                *padding,
                *dilation,
                *groups,
            )?;
            let w = &*data[*weight];
            sinks.write(*weight, *bias, |gw, gb| {
                timed(|| conv::backward(&p, grad_output, x, w, grad_input, gw, gb))
            })
        }
        LayerKind::Linear {
            weight,
            bias,
            weight_shape,
        } => {
            let p = LinearParams::new(&in_shape, weight_shape)?;
            let w = &*data[*weight];
            sinks.write(*weight, *bias, |gw, gb| {
                timed(|| linear::backward(&p, grad_output, x, w, grad_input, gw, gb))
            })
        }
        LayerKind::BatchNorm { weight, bias, .. } => {
            // The backward's parameters carry no eps (the binding's are made with 0).
            let p = BatchNormParams::new(&in_shape, 0.0)?;
            let gx = grad_input.expect(norm_grad);
            let (mean, invstd) = (&stage.save_mean[..], &stage.save_invstd[..]);
            match (weight, bias) {
                (Some(w), Some(b)) => {
                    let gamma = &*data[*w];
                    sinks.write(*w, Some(*b), |gg, gb| {
                        timed(|| {
                            batch_norm::backward(
                                &p,
                                grad_output,
                                x,
                                Some(gamma),
                                mean,
                                invstd,
                                true,
                                gx,
                                Some(gg),
                                gb,
                            )
                        })
                    })
                }
                _ => timed(|| {
                    batch_norm::backward(
                        &p,
                        grad_output,
                        x,
                        None,
                        mean,
                        invstd,
                        true,
                        gx,
                        None,
                        None,
                    )
                }),
            }
        }
        LayerKind::BnBlock { weight, bias, .. } => {
            let p = block_params(&stage.kind, &in_shape, 0.0, seeds)?;
            let gx = grad_input.expect(norm_grad);
            let (mean, invstd) = (&stage.save_mean[..], &stage.save_invstd[..]);
            let codes = p.writes_window_codes().then_some(&stage.window_codes[..]);
            let beta = bias.map(|b| &*data[b]);
            match (weight, bias) {
                (Some(w), Some(b)) => {
                    let gamma = &*data[*w];
                    sinks.write(*w, Some(*b), |gg, gb| {
                        timed(|| {
                            fused::backward(
                                &p,
                                grad_output,
                                x,
                                Some(gamma),
                                beta,
                                mean,
                                invstd,
                                gx,
                                Some(gg),
                                gb,
                                codes,
                            )
                        })
                    })
                }
                _ => timed(|| {
                    fused::backward(
                        &p,
                        grad_output,
                        x,
                        weight.map(|w| &*data[w]),
                        beta,
                        mean,
                        invstd,
                        gx,
                        None,
                        None,
                        codes,
                    )
                }),
            }
        }
        LayerKind::Activation(act) => {
            let gx = grad_input.expect(expect_grad);
            let saved = match act {
                Activation::Sigmoid | Activation::Tanh => y,
                _ => x,
            };
            timed(|| activation::backward(*act, grad_output, saved, gx))
        }
        LayerKind::Pool(Pool2d::Max { .. }) => {
            let gx = grad_input.expect(expect_grad);
            let indices = &stage.indices[..grad_output.len()];
            timed(|| pool::max_backward(&in_shape, &out_shape, grad_output, indices, gx))
        }
        LayerKind::Pool(
            pooling @ Pool2d::Avg {
                count_include_pad, ..
            },
        ) => {
            let gx = grad_input.expect(expect_grad);
            let p = pooling.params(&in_shape)?;
            timed(|| pool::avg_backward(&p, grad_output, *count_include_pad, gx))
        }
        LayerKind::Dropout { p, unit, seed } => {
            let gx = grad_input.expect(expect_grad);
            let seed = seeds[*seed];
            timed(|| dropout::forward(grad_output, *p, seed, *unit, gx))
        }
        LayerKind::Zeros => {
            grad_input.expect(expect_grad).fill(0.0);
            Ok(())
        }
        LayerKind::View => unreachable!("a view runs no backward"),
    }
}

/// A batch's samples, classes and weights, gathered.
struct Rows<'b> {
    input: &'b mut Vec<f32>,
    target: &'b mut Vec<i64>,
    weight: &'b mut Vec<f64>,
}

/// The samples, classes and weights (if any) of `indices` (checked in range), one after
/// another, into `rows`; an interrupt stops it every 1 MiB of samples (the first batch
/// writes fresh memory, slow the first time on a virtual machine: see
/// [`grow_scratch_until`]).
fn gather(
    batches: &EpochBatches<'_>,
    indices: &[i64],
    sample_len: usize,
    rows: Rows<'_>,
    stop: &StopToken,
) -> Result<()> {
    let Rows {
        input,
        target,
        weight,
    } = rows;
    input.clear();
    target.clear();
    weight.clear();
    if input.try_reserve(indices.len() * sample_len).is_err() {
        return Err(Error::invalid(
            "training step: a batch's input",
            "more memory than is free",
            "memory for it",
        ));
    }
    let check_every = ((1 << 20) / (sample_len * std::mem::size_of::<f32>()).max(1)).max(1);
    for (n, &i) in indices.iter().enumerate() {
        if n % check_every == 0 && stop.is_set() {
            return Err(interrupted());
        }
        let i = i as usize;
        input.extend_from_slice(&batches.samples[i * sample_len..(i + 1) * sample_len]);
        target.push(batches.targets[i]);
        if let Some(weights) = batches.weights {
            weight.push(weights[i]);
        }
    }
    Ok(())
}

impl StepArrays<'_> {
    /// The optimizer's counts as the next step has them: Adam's step one more, SGD's
    /// momentum buffers past their first step.
    fn next_step(&mut self) {
        match &mut self.updates {
            Updates::Adam(params) => params.iter_mut().for_each(|u| u.step += 1),
            Updates::Sgd(params) => params.iter_mut().for_each(|u| u.first_step = false),
        }
    }
}

/// The optimizer's updates of every parameter, in one parallel loop over all their
/// chunks ([`optim::adam_steps`], [`optim::sgd_steps`]). Every update's hyper-parameters
/// and lengths are checked before the first parameter moves, and a Ctrl-C is not taken
/// during the loop: a step updates all of them or none (the caller counts Adam's steps
/// only for a step that returned).
fn update(arrays: &mut StepArrays<'_>) -> Result<()> {
    let StepArrays {
        data,
        grads,
        updates,
        ..
    } = arrays;
    // Each slot's values, taken once by the parameter that updates them.
    let mut values: Vec<Option<&mut [f32]>> = data.iter_mut().map(|d| Some(&mut **d)).collect();
    let mut take = |slot: usize| {
        values[slot].take().ok_or_else(|| {
            Error::invalid(
                "updates",
                format!("parameter slot {slot} updated twice"),
                "each parameter once",
            )
        })
    };
    match updates {
        Updates::Adam(params) => {
            let mut steps = Vec::with_capacity(params.len());
            for u in params.iter_mut() {
                steps.push(optim::AdamArrays {
                    param: take(u.slot)?,
                    grad: &*grads[u.slot],
                    exp_avg: &mut *u.exp_avg,
                    exp_avg_sq: &mut *u.exp_avg_sq,
                    step: u.step,
                    cfg: u.config,
                });
            }
            timed(|| optim::adam_steps(steps))
        }
        Updates::Sgd(params) => {
            let mut steps = Vec::with_capacity(params.len());
            for u in params.iter_mut() {
                steps.push(optim::SgdArrays {
                    param: take(u.slot)?,
                    grad: &*grads[u.slot],
                    momentum_buffer: u.momentum_buffer.as_deref_mut(),
                    cfg: u.config,
                    first_step: u.first_step,
                });
            }
            timed(|| optim::sgd_steps(steps))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear(weight: usize, bias: usize, in_features: usize, out_features: usize) -> LayerKind {
        LayerKind::Linear {
            weight,
            bias: Some(bias),
            weight_shape: [out_features, in_features],
        }
    }

    #[test]
    fn gathering_a_batch_takes_its_rows_in_order_and_stops_when_asked() {
        let samples: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let targets = [0i64, 1, 2, 3];
        let weights = [0.5f64, 1.0, 1.5, 2.0];
        let batches = EpochBatches {
            samples: &samples,
            targets: &targets,
            weights: Some(&weights),
            order: None,
            bounds: &[],
            seeds: &[],
        };
        let gathered = |indices: &[i64], stop: &StopToken| {
            // What an earlier batch left: cleared.
            let (mut input, mut target, mut weight) = (vec![-1.0], vec![-1], vec![-1.0]);
            let rows = Rows {
                input: &mut input,
                target: &mut target,
                weight: &mut weight,
            };
            gather(&batches, indices, 3, rows, stop).map(|()| (input, target, weight))
        };
        let (input, target, weight) = gathered(&[3, 0], &StopToken::default()).unwrap();
        assert_eq!(input, [9.0, 10.0, 11.0, 0.0, 1.0, 2.0]);
        assert_eq!((target, weight), (vec![3, 0], vec![2.0, 0.5]));
        assert!(gathered(&[1, 2], &StopToken::already_set()).is_err());
    }

    #[test]
    fn a_plan_refuses_layers_that_do_not_chain_or_share_a_slot() {
        let unchained = vec![
            (linear(0, 1, 4, 3), vec![4], vec![3]),
            (LayerKind::Activation(Activation::Relu), vec![5], vec![5]),
        ];
        assert!(StepPlan::new(unchained, 2).is_err());
        let shared = vec![
            (linear(0, 1, 4, 4), vec![4], vec![4]),
            (linear(0, 2, 4, 3), vec![4], vec![3]),
        ];
        assert!(StepPlan::new(shared, 3).is_err());
        let not_logits = vec![(LayerKind::View, vec![2, 2], vec![2, 2])];
        assert!(StepPlan::new(not_logits, 0).is_err());
    }

    #[test]
    fn a_step_is_the_kernels_called_in_turn() {
        // linear -> relu -> linear, cross-entropy, plain SGD, against the kernels called
        // one by one as the layers call them.
        let (n, i, h, o) = (5, 4, 6, 3);
        let values = |len: usize, seed: f32| -> Vec<f32> {
            (0..len).map(|k| (k as f32 * 0.37 + seed).sin()).collect()
        };
        let x = values(n * i, 0.1);
        let target: Vec<i64> = (0..n as i64).map(|k| k % o as i64).collect();
        let mut params = [
            values(h * i, 0.2),
            values(h, 0.3),
            values(o * h, 0.4),
            values(o, 0.5),
        ];
        let config = SgdConfig {
            lr: 0.1,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        // By hand.
        let (p1, p2) = (
            LinearParams::new(&[n, i], &[h, i]).unwrap(),
            LinearParams::new(&[n, h], &[o, h]).unwrap(),
        );
        let mut hidden = vec![0.0; n * h];
        linear::forward(&p1, &x, &params[0], Some(&params[1]), &mut hidden).unwrap();
        let mut act = vec![0.0; n * h];
        activation::forward(Activation::Relu, &hidden, &mut act).unwrap();
        let mut logits = vec![0.0; n * o];
        linear::forward(&p2, &act, &params[2], Some(&params[3]), &mut logits).unwrap();
        let classes = ClassesParams::new(&[n, o]).unwrap();
        let loss = loss::cross_entropy(&classes, &logits, &target, None).unwrap();
        let mut g_logits = vec![0.0; n * o];
        loss::cross_entropy_backward(&classes, &logits, &target, None, &mut g_logits).unwrap();
        let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
        let mut g_act = vec![0.0; n * h];
        {
            let (g01, g23) = grads.split_at_mut(2);
            let (gw2, gb2) = g23.split_at_mut(1);
            linear::backward(
                &p2,
                &g_logits,
                &act,
                &params[2],
                Some(&mut g_act),
                &mut gw2[0],
                Some(&mut gb2[0]),
            )
            .unwrap();
            let mut g_hidden = vec![0.0; n * h];
            activation::backward(Activation::Relu, &g_act, &hidden, &mut g_hidden).unwrap();
            let (gw1, gb1) = g01.split_at_mut(1);
            linear::backward(
                &p1,
                &g_hidden,
                &x,
                &params[0],
                None,
                &mut gw1[0],
                Some(&mut gb1[0]),
            )
            .unwrap();
        }
        let mut expected = params.clone();
        for (p, g) in expected.iter_mut().zip(&grads) {
            optim::sgd_step(p, g, None, config, false).unwrap();
        }
        // By the plan.
        let mut plan = StepPlan::new(
            vec![
                (linear(0, 1, i, h), vec![i], vec![h]),
                (LayerKind::Activation(Activation::Relu), vec![h], vec![h]),
                (linear(2, 3, h, o), vec![h], vec![o]),
            ],
            4,
        )
        .unwrap();
        let mut step_grads: Vec<Vec<f32>> = params.iter().map(|p| vec![7.0; p.len()]).collect();
        let zero = [0, 1, 2, 3];
        let updates = Updates::Sgd(
            (0..4)
                .map(|slot| SgdUpdate {
                    slot,
                    momentum_buffer: None,
                    first_step: false,
                    config,
                })
                .collect(),
        );
        let feed = Batch {
            input: &x,
            target: &target,
            sample_weight: None,
            seeds: &[],
        };
        let mut arrays = StepArrays {
            data: params.iter_mut().map(|p| &mut p[..]).collect(),
            grads: step_grads.iter_mut().map(|g| &mut g[..]).collect(),
            zero: &zero,
            running: Vec::new(),
            updates,
        };
        assert_eq!(
            plan.run(&feed, &mut arrays).unwrap().to_bits(),
            loss.to_bits()
        );
        drop(arrays);
        for (k, (got, want)) in params.iter().zip(&expected).enumerate() {
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "param {k}"
            );
        }
        for (k, (got, want)) in step_grads.iter().zip(&grads).enumerate() {
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == (b + 0.0).to_bits()),
                "grad {k}"
            );
        }
    }

    #[test]
    fn an_update_refused_for_one_parameter_moves_none_and_buffers_can_be_freed() {
        let (n, i, o) = (4, 3, 2);
        let x: Vec<f32> = (0..n * i).map(|k| (k as f32 * 0.3).sin()).collect();
        let target: Vec<i64> = (0..n as i64).map(|k| k % o as i64).collect();
        let mut params = [vec![0.25_f32; o * i], vec![0.5_f32; o]];
        let before = params.clone();
        let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
        let mut plan = StepPlan::new(vec![(linear(0, 1, i, o), vec![i], vec![o])], 2).unwrap();
        let config = |lr: f32| SgdConfig {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        // The bias's learning rate is infinite: the weight, updated first, must not move.
        let updates = Updates::Sgd(
            [(0, 0.1), (1, f32::INFINITY)]
                .into_iter()
                .map(|(slot, lr)| SgdUpdate {
                    slot,
                    momentum_buffer: None,
                    first_step: false,
                    config: config(lr),
                })
                .collect(),
        );
        let feed = Batch {
            input: &x,
            target: &target,
            sample_weight: None,
            seeds: &[],
        };
        let mut arrays = StepArrays {
            data: params.iter_mut().map(|p| &mut p[..]).collect(),
            grads: grads.iter_mut().map(|g| &mut g[..]).collect(),
            zero: &[0, 1],
            running: Vec::new(),
            updates,
        };
        assert!(plan.run(&feed, &mut arrays).is_err());
        drop(arrays);
        assert_eq!(params, before);
        // The logits and the loss gradient were kept; freed once, then nothing is left.
        assert!(plan.release() >= 2 * n * o * std::mem::size_of::<f32>());
        assert_eq!(plan.release(), 0);
    }

    #[test]
    fn a_fused_block_gives_the_bits_of_its_layers() {
        // linear -> [batch norm -> relu -> dropout] -> linear, Adam, two steps: the block
        // as one fused stage against its layers one by one.
        let (n, i, h, o) = (6, 4, 5, 3);
        let values = |len: usize, seed: f32| -> Vec<f32> {
            (0..len).map(|k| (k as f32 * 0.61 + seed).sin()).collect()
        };
        let x = values(n * i, 0.1);
        let target: Vec<i64> = (0..n as i64).map(|k| k % o as i64).collect();
        let norm = (Some(2), Some(3), Some(0), 1e-5_f32, Some(0.1_f32));
        let fused_layers = vec![
            (linear(0, 1, i, h), vec![i], vec![h]),
            (
                LayerKind::BnBlock {
                    weight: norm.0,
                    bias: norm.1,
                    running: norm.2,
                    eps: norm.3,
                    momentum: norm.4,
                    activation: Some(Activation::Relu),
                    pool: None,
                    dropout: Some(BlockDropout {
                        p: 0.4,
                        channel_wise: false,
                        seed: 0,
                    }),
                },
                vec![h],
                vec![h],
            ),
            (linear(4, 5, h, o), vec![h], vec![o]),
        ];
        let layers = vec![
            (linear(0, 1, i, h), vec![i], vec![h]),
            (
                LayerKind::BatchNorm {
                    weight: norm.0,
                    bias: norm.1,
                    running: norm.2,
                    eps: norm.3,
                    momentum: norm.4,
                },
                vec![h],
                vec![h],
            ),
            (LayerKind::Activation(Activation::Relu), vec![h], vec![h]),
            (
                LayerKind::Dropout {
                    p: 0.4,
                    unit: 1,
                    seed: 0,
                },
                vec![h],
                vec![h],
            ),
            (linear(4, 5, h, o), vec![h], vec![o]),
        ];
        let train = |layers: Vec<(LayerKind, Vec<usize>, Vec<usize>)>| {
            let mut plan = StepPlan::new(layers, 6).unwrap();
            let mut params: Vec<Vec<f32>> = [h * i, h, h, h, o * h, o]
                .iter()
                .enumerate()
                .map(|(k, &len)| values(len, 0.2 + k as f32))
                .collect();
            let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
            let mut moments: Vec<(Vec<f32>, Vec<f32>)> = params
                .iter()
                .map(|p| (vec![0.0; p.len()], vec![0.0; p.len()]))
                .collect();
            let (mut mean, mut var, mut tracked) = (vec![0.0; h], vec![1.0; h], 0_i64);
            let mut losses = Vec::new();
            for step in 1..=2_u64 {
                let updates = Updates::Adam(
                    moments
                        .iter_mut()
                        .enumerate()
                        .map(|(slot, (m, v))| AdamUpdate {
                            slot,
                            exp_avg: m,
                            exp_avg_sq: v,
                            step,
                            config: AdamConfig {
                                lr: 0.01,
                                beta1: 0.9,
                                beta2: 0.999,
                                eps: 1e-8,
                                weight_decay: 0.0,
                                decoupled: false,
                            },
                        })
                        .collect(),
                );
                let feed = Batch {
                    input: &x,
                    target: &target,
                    sample_weight: None,
                    seeds: &[12345 + step],
                };
                let mut arrays = StepArrays {
                    data: params.iter_mut().map(|p| &mut p[..]).collect(),
                    grads: grads.iter_mut().map(|g| &mut g[..]).collect(),
                    zero: &[0, 1, 2, 3, 4, 5],
                    running: vec![RunningArrays {
                        mean: &mut mean,
                        var: &mut var,
                        num_batches_tracked: &mut tracked,
                    }],
                    updates,
                };
                losses.push(plan.run(&feed, &mut arrays).unwrap().to_bits());
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut all: Vec<Vec<u32>> = params.iter().map(|p| bits(p)).collect();
            all.extend(grads.iter().map(|g| bits(g)));
            all.extend(moments.iter().flat_map(|(m, v)| [bits(m), bits(v)]));
            all.push(bits(&mean));
            all.push(bits(&var));
            (losses, all, tracked)
        };
        assert_eq!(train(fused_layers), train(layers));
    }
}
