//! An evaluation forward of a plain chain of layers in one call: the stages
//! `bnrs.nn.fusion` runs in evaluation (convolution blocks with the batch norm folded
//! into their weights, two pooled blocks as one chain, dense layers with the batch
//! norm's arithmetic on their output, and the layers that run alone), each calling the
//! kernel the Python layer would call, with the same arguments, so the output has the
//! same bits. Only the per-layer Python and binding work is gone, which is most of an
//! evaluation forward of one image.
//!
//! The folded weights are computed at every call from the arrays of that call (as
//! `FusedBlock._fold` computes them: in float64, rounded once to float32), so nothing
//! the plan keeps can go stale; folding LeNetBN's two convolutions costs about 5K
//! multiplications, less than comparing the parameters with a kept copy would.

use crate::buffers::{self, Block, MIN_CACHED_BYTES};
use crate::error::{check_len, Error, Result};
use crate::kernels::activation::{self, Activation};
use crate::kernels::batch_norm::{self, BatchNormParams};
use crate::kernels::conv::{self, Conv2dParams, Epilogue, Pool2x2, PooledConv};
use crate::kernels::linear::{self, LinearParams};
use crate::kernels::pool::Pool2d;
use crate::memory::{exceeds_physical, resize_scratch};

type Pair = (i64, i64);

/// A batch norm in evaluation with running statistics: the slots of its weight, bias,
/// running mean and running variance, and its eps (a Python float).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalNorm {
    pub weight: Option<usize>,
    pub bias: Option<usize>,
    pub mean: usize,
    pub var: usize,
    pub eps: f64,
}

/// A convolution with what runs on its output tiles: a batch norm folded into its
/// weight and bias, an activation, a 2×2 stride-2 unpadded pool.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvBlock {
    pub weight: usize,
    pub bias: Option<usize>,
    pub stride: Pair,
    pub padding: Pair,
    pub dilation: Pair,
    pub groups: i64,
    pub norm: Option<EvalNorm>,
    pub activation: Option<Activation>,
    pub pool: Option<Pool2x2>,
}

/// What a stage of the plan runs; parameters and running statistics are slots of the
/// arrays each call passes.
#[derive(Clone, Debug, PartialEq)]
pub enum EvalKind {
    Conv(ConvBlock),
    /// Two pooled convolution blocks, the second on the first's output, in one kernel
    /// call ([`conv::forward_fused_pooled_chain`]).
    Chain(Box<(ConvBlock, ConvBlock)>),
    /// A dense layer on (N, in_features) with a batch norm's arithmetic and an activation
    /// on its output ([`linear::forward_fused`]).
    Linear {
        weight: usize,
        bias: Option<usize>,
        norm: Option<EvalNorm>,
        activation: Option<Activation>,
    },
    BatchNorm(EvalNorm),
    Activation(Activation),
    Pool(Pool2d),
    /// The output is the input itself, reshaped (Flatten; dropout in evaluation).
    View,
}

/// A stage with its sample shapes (no batch axis).
#[derive(Clone, Debug)]
struct Stage {
    kind: EvalKind,
    input_shape: Vec<usize>,
    output_shape: Vec<usize>,
}

/// An evaluation forward of a chain of stages over arrays in slots of given shapes.
#[derive(Clone, Debug)]
pub struct EvalPlan {
    stages: Vec<Stage>,
    slot_shapes: Vec<Vec<usize>>,
}

fn batched(batch: usize, sample: &[usize]) -> Vec<usize> {
    std::iter::once(batch)
        .chain(sample.iter().copied())
        .collect()
}

fn len_of(batch: usize, sample: &[usize]) -> usize {
    sample.iter().product::<usize>() * batch
}

fn plan_error(detail: String) -> Error {
    Error::invalid(
        "layers",
        detail,
        "a chain of evaluation stages that fit each other",
    )
}

impl EvalPlan {
    /// A plan of `stages` (kind, sample input shape, sample output shape), checked: each
    /// stage takes the shape the one before gives, every slot exists with the shape its
    /// stage needs, and at least one stage runs a kernel.
    pub fn new(
        stages: Vec<(EvalKind, Vec<usize>, Vec<usize>)>,
        slot_shapes: Vec<Vec<usize>>,
    ) -> Result<Self> {
        let stages: Vec<Stage> = stages
            .into_iter()
            .map(|(kind, input_shape, output_shape)| Stage {
                kind,
                input_shape,
                output_shape,
            })
            .collect();
        if stages.iter().all(|s| s.kind == EvalKind::View) {
            return Err(plan_error("no stage that runs a kernel".into()));
        }
        let plan = EvalPlan {
            stages,
            slot_shapes,
        };
        for (i, pair) in plan.stages.windows(2).enumerate() {
            if pair[0].output_shape != pair[1].input_shape {
                return Err(plan_error(format!(
                    "stage {} gives {:?}, stage {} takes {:?}",
                    i,
                    pair[0].output_shape,
                    i + 1,
                    pair[1].input_shape
                )));
            }
        }
        for stage in &plan.stages {
            let (input, output) = (&stage.input_shape, &stage.output_shape);
            if len_of(1, input) == 0 {
                return Err(plan_error(format!("an empty sample shape {input:?}")));
            }
            // The kernel's own shape checks, on a batch of one.
            let given = plan.stage_output(stage, 1)?;
            if given[1..] != output[..] {
                return Err(plan_error(format!(
                    "a stage of {input:?} gives {:?}, not {output:?}",
                    &given[1..]
                )));
            }
        }
        Ok(plan)
    }

    /// The sample shape the plan takes.
    pub fn input_shape(&self) -> &[usize] {
        &self.stages[0].input_shape
    }

    /// The sample shape it gives.
    pub fn output_shape(&self) -> &[usize] {
        &self.stages[self.stages.len() - 1].output_shape
    }

    /// The number of array slots a call passes.
    pub fn slot_shapes(&self) -> &[Vec<usize>] {
        &self.slot_shapes
    }

    /// The slot's expected shape, or an error naming it.
    fn slot_shape(&self, slot: usize) -> Result<&[usize]> {
        self.slot_shapes
            .get(slot)
            .map(Vec::as_slice)
            .ok_or_else(|| plan_error(format!("no array slot {slot}")))
    }

    fn check_vector(&self, slot: Option<usize>, channels: usize) -> Result<()> {
        if let Some(slot) = slot {
            let shape = self.slot_shape(slot)?;
            if shape != [channels] {
                return Err(plan_error(format!(
                    "slot {slot} of shape {shape:?} where ({channels},) is needed"
                )));
            }
        }
        Ok(())
    }

    fn check_norm(&self, norm: &Option<EvalNorm>, channels: usize) -> Result<()> {
        if let Some(n) = norm {
            for slot in [n.weight, n.bias, Some(n.mean), Some(n.var)] {
                self.check_vector(slot, channels)?;
            }
        }
        Ok(())
    }

    fn conv_params(&self, block: &ConvBlock, input: &[usize]) -> Result<Conv2dParams> {
        let p = Conv2dParams::grouped(
            input,
            self.slot_shape(block.weight)?,
            block.stride,
            block.padding,
            block.dilation,
            block.groups,
        )?;
        self.check_vector(block.bias, p.out_channels)?;
        self.check_norm(&block.norm, p.out_channels)?;
        if block.pool.is_some() && (p.out_h < 2 || p.out_w < 2) {
            return Err(plan_error(format!(
                "a pooled convolution output of {}x{}",
                p.out_h, p.out_w
            )));
        }
        Ok(p)
    }

    fn conv_output(&self, block: &ConvBlock, input: &[usize]) -> Result<Vec<usize>> {
        let p = self.conv_params(block, input)?;
        let mut shape = p.output_shape();
        if block.pool.is_some() {
            (shape[2], shape[3]) = Pool2x2::output_size(&p);
        }
        Ok(shape.to_vec())
    }

    /// The stage's output shape for a batch of `batch`, by its kernel's parameters.
    fn stage_output(&self, stage: &Stage, batch: usize) -> Result<Vec<usize>> {
        let input = batched(batch, &stage.input_shape);
        Ok(match &stage.kind {
            EvalKind::Conv(block) => self.conv_output(block, &input)?,
            EvalKind::Chain(blocks) => {
                if blocks.0.pool.is_none() || blocks.1.pool.is_none() {
                    return Err(plan_error("a chained convolution without a pool".into()));
                }
                let between = self.conv_output(&blocks.0, &input)?;
                self.conv_output(&blocks.1, &between)?
            }
            EvalKind::Linear {
                weight, bias, norm, ..
            } => {
                let p = LinearParams::new(&input, self.slot_shape(*weight)?)?;
                self.check_vector(*bias, p.out_features)?;
                self.check_norm(norm, p.out_features)?;
                vec![batch, p.out_features]
            }
            EvalKind::BatchNorm(norm) => {
                let p = BatchNormParams::new(&input, norm.eps as f32)?;
                self.check_norm(&Some(*norm), p.channels)?;
                input
            }
            EvalKind::Activation(_) => input,
            EvalKind::Pool(pooling) => pooling.params(&input)?.output_shape().to_vec(),
            EvalKind::View => {
                if len_of(1, &stage.output_shape) != len_of(1, &stage.input_shape) {
                    return Err(plan_error(format!(
                        "a view of {:?} as {:?}",
                        stage.input_shape, stage.output_shape
                    )));
                }
                batched(batch, &stage.output_shape)
            }
        })
    }

    /// Multiply-adds of a forward of `batch` samples (the convolutions' and dense
    /// layers'), for the call's threading and Ctrl-C decisions.
    pub fn multiply_adds(&self, batch: usize) -> usize {
        let conv = |block: &ConvBlock, input: &[usize]| {
            self.conv_params(block, input)
                .map_or(0, |p| p.multiply_adds())
        };
        self.stages
            .iter()
            .map(|stage| {
                let input = batched(batch, &stage.input_shape);
                match &stage.kind {
                    EvalKind::Conv(block) => conv(block, &input),
                    EvalKind::Chain(blocks) => {
                        let between = self.conv_output(&blocks.0, &input).unwrap_or_default();
                        conv(&blocks.0, &input).saturating_add(conv(&blocks.1, &between))
                    }
                    EvalKind::Linear { .. } => len_of(batch, &stage.input_shape)
                        .saturating_mul(len_of(1, &stage.output_shape)),
                    _ => len_of(batch, &stage.input_shape),
                }
            })
            .fold(0usize, usize::saturating_add)
    }

    /// Run the plan on `input` (`batch` samples of the plan's input shape) into `output`
    /// (`batch` samples of its output shape); `arrays` holds each slot's values, checked
    /// against the slots' shapes by the caller.
    pub fn forward(
        &self,
        batch: usize,
        input: &[f32],
        arrays: &[&[f32]],
        output: &mut [f32],
    ) -> Result<()> {
        if arrays.len() != self.slot_shapes.len() {
            return Err(Error::invalid(
                "arrays",
                format!("{} arrays", arrays.len()),
                format!("{}, one per slot", self.slot_shapes.len()),
            ));
        }
        for (slot, (values, shape)) in arrays.iter().zip(&self.slot_shapes).enumerate() {
            if values.len() != len_of(1, shape) {
                return Err(Error::invalid(
                    "arrays",
                    format!("{} values in slot {slot}", values.len()),
                    format!("{shape:?}"),
                ));
            }
        }
        check_len("input", input.len(), len_of(batch, self.input_shape()))?;
        check_len("output", output.len(), len_of(batch, self.output_shape()))?;
        let last = self
            .stages
            .iter()
            .rposition(|s| s.kind != EvalKind::View)
            .expect("a plan runs at least one kernel");
        // Two buffers in turn for the stages' outputs; the last kernel writes `output`.
        let mut buffers: [StageBuffer; 2] = [StageBuffer::default(), StageBuffer::default()];
        let mut current: Option<usize> = None; // None: the input
        for (index, stage) in self.stages.iter().enumerate() {
            if stage.kind == EvalKind::View {
                continue;
            }
            if index == last {
                let x = current.map_or(input, |b| buffers[b].values());
                return self.run_stage(stage, batch, x, arrays, output);
            }
            let next = usize::from(current == Some(0));
            buffers[next] = StageBuffer::new(len_of(batch, &stage.output_shape))?;
            let [first, second] = &mut buffers;
            let (x, y): (&[f32], &mut [f32]) = match (current, next) {
                (None, 0) => (input, first.values_mut()),
                (None, _) => (input, second.values_mut()),
                (Some(_), 0) => (second.values(), first.values_mut()),
                (Some(_), _) => (first.values(), second.values_mut()),
            };
            self.run_stage(stage, batch, x, arrays, y)?;
            current = Some(next);
        }
        unreachable!("the last kernel stage returns")
    }

    fn run_stage(
        &self,
        stage: &Stage,
        batch: usize,
        x: &[f32],
        arrays: &[&[f32]],
        out: &mut [f32],
    ) -> Result<()> {
        let input = batched(batch, &stage.input_shape);
        let slot = |s: usize| arrays[s];
        match &stage.kind {
            EvalKind::Conv(block) => {
                let p = self.conv_params(block, &input)?;
                let folded = Folded::new(block, arrays)?;
                let (w, b) = block_weights(&folded, block, arrays);
                let epilogue = Epilogue {
                    activation: block.activation,
                };
                match block.pool {
                    Some(pool) => conv::forward_fused_pooled(&p, x, w, b, epilogue, pool, out),
                    None => conv::forward_fused(&p, x, w, b, epilogue, out),
                }
            }
            EvalKind::Chain(blocks) => {
                let (one, two) = (&blocks.0, &blocks.1);
                let p1 = self.conv_params(one, &input)?;
                let p2 = self.conv_params(two, &self.conv_output(one, &input)?)?;
                let (f1, f2) = (Folded::new(one, arrays)?, Folded::new(two, arrays)?);
                let first = pooled(p1, one, &f1, arrays)?;
                let second = pooled(p2, two, &f2, arrays)?;
                conv::forward_fused_pooled_chain(&first, &second, x, out)
            }
            EvalKind::Linear {
                weight,
                bias,
                norm,
                activation,
            } => {
                let p = LinearParams::new(&input, self.slot_shape(*weight)?)?;
                let (w, b) = (slot(*weight), bias.map(slot));
                let coefficients = norm
                    .map(|n| {
                        linear::EvalNormCoefficients::new(
                            batch,
                            p.out_features,
                            n.weight.map(slot),
                            n.bias.map(slot),
                            slot(n.mean),
                            slot(n.var),
                            n.eps as f32,
                        )
                    })
                    .transpose()?;
                let eval_norm = coefficients
                    .as_ref()
                    .map(linear::EvalNormCoefficients::norm);
                linear::forward_fused(&p, x, w, b, eval_norm, *activation, out)
            }
            EvalKind::BatchNorm(n) => {
                let p = BatchNormParams::new(&input, n.eps as f32)?;
                let (mut mean, mut invstd) = (vec![0.0; p.channels], vec![0.0; p.channels]);
                batch_norm::forward_eval(
                    &p,
                    x,
                    n.weight.map(slot),
                    n.bias.map(slot),
                    slot(n.mean),
                    slot(n.var),
                    out,
                    &mut mean,
                    &mut invstd,
                )
            }
            EvalKind::Activation(act) => activation::forward(*act, x, out),
            EvalKind::Pool(pooling) => pooling.forward(&pooling.params(&input)?, x, out, None),
            EvalKind::View => Ok(()),
        }
    }
}

/// A stage's output between two stages: a large one in memory of [`crate::buffers`]
/// (given back when dropped, so the next forward finds its pages mapped, as the Python
/// path's outputs do), a small one in a vector. Every stage writes all of its output
/// before the next reads it.
#[derive(Default)]
struct StageBuffer {
    block: Option<Block>,
    small: Vec<f32>,
    len: usize,
}

impl StageBuffer {
    fn new(len: usize) -> Result<Self> {
        let bytes = len as u128 * std::mem::size_of::<f32>() as u128;
        let refused = |detail: String| Error::ScratchTooLarge {
            what: "a stage's output",
            detail,
        };
        if let Some(excess) = exceeds_physical(bytes) {
            return Err(refused(excess));
        }
        let bytes = bytes as usize;
        if bytes < MIN_CACHED_BYTES {
            let mut small = Vec::new();
            resize_scratch(&mut small, len, "a stage's output")?;
            return Ok(StageBuffer {
                block: None,
                small,
                len,
            });
        }
        let block = buffers::take(bytes)
            .ok_or_else(|| refused(format!("of {bytes} bytes refused by the system")))?;
        Ok(StageBuffer {
            block: Some(block),
            small: Vec::new(),
            len,
        })
    }

    fn values(&self) -> &[f32] {
        match &self.block {
            // SAFETY: the block holds `len` f32 values (4·len bytes, 64-byte aligned) and
            // is owned by this buffer; the stage that wrote it wrote every value.
            Some(block) => unsafe {
                std::slice::from_raw_parts(block.as_ptr().cast::<f32>(), self.len)
            },
            None => &self.small,
        }
    }

    fn values_mut(&mut self) -> &mut [f32] {
        match &mut self.block {
            // SAFETY: as in `values`, and `&mut self` makes this the only view; any bit
            // pattern is a valid f32, and the stage writes every value before it is read.
            Some(block) => unsafe {
                std::slice::from_raw_parts_mut(block.as_ptr().cast::<f32>(), self.len)
            },
            None => &mut self.small,
        }
    }
}

impl Drop for StageBuffer {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            buffers::give(block);
        }
    }
}

/// A convolution block's weight and bias with its batch norm folded in, when it has one.
struct Folded {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Folded {
    fn new(block: &ConvBlock, arrays: &[&[f32]]) -> Result<Option<Self>> {
        let Some(n) = block.norm else {
            return Ok(None);
        };
        let slot = |s: usize| arrays[s];
        let weight = slot(block.weight);
        let channels = slot(n.mean).len();
        let mut folded = Folded {
            weight: Vec::new(),
            bias: Vec::new(),
        };
        resize_scratch(&mut folded.weight, weight.len(), "a folded weight")?;
        folded.bias.resize(channels, 0.0);
        batch_norm::fold_into_weights(
            weight,
            block.bias.map(slot),
            n.weight.map(slot),
            n.bias.map(slot),
            slot(n.mean),
            slot(n.var),
            n.eps,
            &mut folded.weight,
            &mut folded.bias,
        )?;
        Ok(Some(folded))
    }
}

/// The weight and bias a convolution block runs with: the folded ones, or its own.
fn block_weights<'a>(
    folded: &'a Option<Folded>,
    block: &ConvBlock,
    arrays: &[&'a [f32]],
) -> (&'a [f32], Option<&'a [f32]>) {
    match folded {
        Some(f) => (&f.weight, Some(&f.bias)),
        None => (arrays[block.weight], block.bias.map(|b| arrays[b])),
    }
}

/// A pooled block of a chain, as the chain kernel takes it.
fn pooled<'a>(
    params: Conv2dParams,
    block: &ConvBlock,
    folded: &'a Option<Folded>,
    arrays: &[&'a [f32]],
) -> Result<PooledConv<'a>> {
    let (weight, bias) = block_weights(folded, block, arrays);
    Ok(PooledConv {
        params,
        weight,
        bias,
        epilogue: Epilogue {
            activation: block.activation,
        },
        pool: block
            .pool
            .ok_or_else(|| plan_error("a chained convolution without a pool".into()))?,
    })
}
