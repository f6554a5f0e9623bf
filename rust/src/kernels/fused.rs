//! Training-mode fused block: batch norm with batch statistics → activation → 2×2 pool →
//! dropout, forward and backward, in as few passes over memory as the statistics allow.
//!
//! Forward: one pass for the batch statistics (the batch-norm kernel's own, so the same
//! bits), then one pass that normalises, applies the activation, pools and drops out each
//! plane while it is in cache. Only the block's input (the batch norm's input) and the
//! seed are kept: no normalised tensor, no activation input, no argmax indices; for
//! (leaky) ReLU and a max pool, optionally one byte per pooled value, the window's
//! outcome (the training step keeps them).
//!
//! Backward: pass 1 recomputes each plane's normalised values (the forward's arithmetic,
//! so the same bits), or reads the window bytes, regenerates the dropout mask from the
//! seed, routes the gradient through the pool (the forward's argmax rule) and the
//! activation's derivative, writes that gradient into `grad_input` and sums it per plane
//! for the batch norm; pass 2 turns it into the batch norm's input gradient in place.
//! Each step is the unfused kernel's arithmetic in the unfused order, so the block gives
//! the unfused chain's bits, and planes (or fixed chunks of rows) are the parallel split,
//! so the result is the same at any thread count.
//!
//! The statistics are not accumulated in the convolution's epilogue. The batch norm sums
//! values shifted by the first value of each channel (image 0's), which the tiles of the
//! other images, written in parallel, do not have yet; sums merged another way (Chan's
//! formula over per-tile means) would change the statistics' bits and so every result of
//! a training run. The block therefore reads its input once more for the statistics.

use rayon::prelude::*;

use super::activation::{self, Activation};
use super::batch_norm::{
    self, affine_coefficients, batch_stats, grad_input_coefficients, plane_grad_sums,
    plane_normalise, row_grad_sums, rows_normalise, rows_per_chunk, store_batch_stats,
    store_param_grads, BatchNormParams, RunningStats,
};
use super::dropout;
use super::pool::{
    avg_pool_2x2_plane, avg_pool_2x2_plane_backward, max_pool_2x2_plane_backward,
    max_pool_2x2_plane_values,
};
use crate::error::{check_len, Error, Result};
use crate::simd_dispatch;

mod max_relu;
#[cfg(target_arch = "x86_64")]
mod max_relu_avx512;

/// A pooling with 2×2 windows, stride 2, no padding (floor mode: an odd last row or
/// column is dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool2x2 {
    Max,
    /// Average of the four values (no padding, so `count_include_pad` does not matter).
    Avg,
}

/// Inverted dropout at the end of the block, as [`dropout::forward`] draws it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutSpec {
    /// Probability of dropping a unit, in (0, 1).
    pub p: f32,
    pub seed: u64,
    /// Whole output planes as units (Dropout2d) instead of elements (Dropout).
    pub channel_wise: bool,
}

/// Shapes and stages of a fused block, validated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnBlockParams {
    pub bn: BatchNormParams,
    /// (H, W) of a 4-D input; `None` for (N, C) or (N, C, L).
    pub plane_hw: Option<(usize, usize)>,
    pub activation: Option<Activation>,
    pub pool: Option<Pool2x2>,
    pub dropout: Option<DropoutSpec>,
}

impl BnBlockParams {
    /// Validate a block on an input of shape (N, C, *): a pool needs (N, C, H, W) with
    /// H, W >= 2, channel-wise dropout a 4-D input, dropout a `p` in (0, 1).
    pub fn new(
        input_shape: &[usize],
        eps: f32,
        activation: Option<Activation>,
        pool: Option<Pool2x2>,
        dropout: Option<DropoutSpec>,
    ) -> Result<Self> {
        let bn = BatchNormParams::new(input_shape, eps)?;
        let plane_hw = (input_shape.len() == 4).then(|| (input_shape[2], input_shape[3]));
        if pool.is_some() {
            match plane_hw {
                Some((h, w)) if h >= 2 && w >= 2 => {}
                _ => {
                    return Err(Error::invalid(
                        "input",
                        format!("shape {input_shape:?}"),
                        "a 4-D (N, C, H, W) array with H, W >= 2 for a 2x2 pool",
                    ))
                }
            }
        }
        if let Some(d) = dropout {
            if !(d.p > 0.0 && d.p < 1.0) {
                return Err(Error::invalid("p", d.p, "a dropout probability in (0, 1)"));
            }
            if d.channel_wise && plane_hw.is_none() {
                return Err(Error::invalid(
                    "input",
                    format!("shape {input_shape:?}"),
                    "a 4-D (N, C, H, W) array for channel-wise dropout",
                ));
            }
        }
        Ok(BnBlockParams {
            bn,
            plane_hw,
            activation,
            pool,
            dropout,
        })
    }

    /// (H_out, W_out) after the pool, or the input's (H, W).
    fn out_hw(&self) -> Option<(usize, usize)> {
        self.plane_hw.map(|(h, w)| match self.pool {
            Some(_) => (h / 2, w / 2),
            None => (h, w),
        })
    }

    /// Output shape: the input's, with H and W halved (rounded down) by a pool.
    pub fn output_shape(&self, input_shape: &[usize]) -> Vec<usize> {
        let mut shape = input_shape.to_vec();
        if let Some((h, w)) = self.out_hw() {
            shape[2] = h;
            shape[3] = w;
        }
        shape
    }

    /// Values per output plane.
    fn out_plane(&self) -> usize {
        self.out_hw().map_or(self.bn.spatial, |(h, w)| h * w)
    }

    /// Values of the output (and of its gradient, and window codes).
    pub fn out_len(&self) -> usize {
        self.bn.batch * self.bn.channels * self.out_plane()
    }

    /// How the work is split: planes, or (one value per channel) fixed chunks of rows.
    fn tiles(&self) -> Tiles {
        if self.bn.spatial == 1 {
            Tiles::Rows(rows_per_chunk(&self.bn) * self.bn.channels)
        } else {
            Tiles::Planes
        }
    }

    /// The activation's derivative or the max pool's argmax needs the activation's output.
    fn needs_activation_output(&self) -> bool {
        self.pool == Some(Pool2x2::Max) || self.activation.is_some_and(|a| a.grad_uses_output())
    }
}

/// The parallel split of a block, as the batch-norm kernel splits its element-wise passes
/// (so that per-channel coefficients are scalars on planes and vectors on rows).
#[derive(Clone, Copy)]
enum Tiles {
    /// One (image, channel) plane a tile.
    Planes,
    /// Tiles of this many values (whole rows of C), for one value per channel.
    Rows(usize),
}

/// Per-tile working space, one per rayon job: a plane's (or a chunk's) intermediates stay
/// in cache between the stages.
struct Scratch {
    normalised: Vec<f32>,
    activated: Vec<f32>,
    pooled: Vec<f32>,
    factors: FactorRun,
    grad: Vec<f32>,
    grad_unpooled: Vec<f32>,
    /// Five values per pooling window, for the max pool's backward.
    windows: Vec<f32>,
}

impl Scratch {
    /// Only what the block's stages use: a row tile is nominally ~32K values, so a small
    /// (N, C) batch gets no more than its size.
    fn new(p: &BnBlockParams) -> Self {
        let (tile_in, tile_out) = tile_lens(p);
        let (tile_in, tile_out) = (tile_in.min(p.bn.len()), tile_out.min(p.out_len()));
        let sized = |used: bool, len: usize| vec![0.0; if used { len } else { 0 }];
        let (pool, act, dropout) = (
            p.pool.is_some(),
            p.activation.is_some(),
            p.dropout.is_some(),
        );
        Scratch {
            normalised: vec![0.0; tile_in],
            activated: sized(p.needs_activation_output(), tile_in),
            pooled: sized(pool && dropout, tile_out),
            factors: FactorRun::default(),
            grad: sized(dropout, tile_out),
            grad_unpooled: sized(pool && act, tile_in),
            windows: sized(p.pool == Some(Pool2x2::Max), 5 * tile_out),
        }
    }
}

simd_dispatch! {
    /// g = g·a + x·b + c in place: [`batch_norm::backward`]'s input gradient, written over
    /// the gradient it is computed from.
    fn plane_grad_input_in_place(g: &mut [f32], x: &[f32], a: f32, b: f32, c: f32) {
        for (o, &xv) in g.iter_mut().zip(x) {
            *o = *o * a + xv * b + c;
        }
    }
}

simd_dispatch! {
    /// g[c] = g[c]·a[c] + x[c]·b[c] + c0[c] in place, for rows of C values.
    fn rows_grad_input_in_place(g: &mut [f32], x: &[f32], a: &[f32], b: &[f32], c0: &[f32]) {
        let c = a.len();
        for (g_row, x_row) in g.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for (i, o) in g_row.iter_mut().enumerate() {
                *o = *o * a[i] + x_row[i] * b[i] + c0[i];
            }
        }
    }
}

/// The per-channel affine map of the normalisation: (mean, scale, shift).
struct Affine<'a> {
    mean: &'a [f32],
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl Affine<'_> {
    /// Tile `tile`'s input normalised into `out`, as the batch-norm forward computes it.
    fn normalise(&self, p: &BnBlockParams, tile: usize, x: &[f32], out: &mut [f32]) {
        match p.tiles() {
            Tiles::Planes => {
                let c = tile % p.bn.channels;
                plane_normalise(x, out, self.mean[c], self.scale[c], self.shift[c]);
            }
            Tiles::Rows(_) => rows_normalise(x, out, self.mean, &self.scale, &self.shift),
        }
    }
}

impl BnBlockParams {
    /// The rectifier of the [`max_relu`] kernels when they run the block's planes:
    /// planes, (leaky) ReLU then a 2×2 max pool, of a width they take.
    fn max_relu_rectifier(&self) -> Option<max_relu::Rectifier> {
        use max_relu::Rectifier;
        let rectifier = match self.activation {
            Some(Activation::Relu) => Rectifier::Relu,
            Some(Activation::LeakyRelu(slope)) => Rectifier::Leaky(slope),
            _ => return None,
        };
        let plane_w = self.plane_hw.map_or(0, |(_, w)| w);
        (self.pool == Some(Pool2x2::Max)
            && matches!(self.tiles(), Tiles::Planes)
            && max_relu::takes(plane_w))
        .then_some(rectifier)
    }

    /// Whether [`forward_train`] writes window codes for this block (and [`backward`]
    /// reads them): only where the [`max_relu`] kernels run it. Other blocks ignore them.
    pub fn writes_window_codes(&self) -> bool {
        self.max_relu_rectifier().is_some()
    }
}

/// The plane's map for the kernels of [`max_relu`], when they run the tile.
fn max_relu_map(p: &BnBlockParams, affine: &Affine<'_>, tile: usize) -> Option<max_relu::PlaneMap> {
    let rectifier = p.max_relu_rectifier()?;
    let c = tile % p.bn.channels;
    Some(max_relu::PlaneMap {
        mean: affine.mean[c],
        scale: affine.scale[c],
        shift: affine.shift[c],
        rectifier,
    })
}

/// (values per input tile, values per output tile).
fn tile_lens(p: &BnBlockParams) -> (usize, usize) {
    match p.tiles() {
        Tiles::Planes => (p.bn.spatial, p.out_plane()),
        Tiles::Rows(len) => (len, len),
    }
}

/// Units a [`FactorRun`] draws at least: 32 groups of the generator, 4 KB.
const FACTOR_RUN: usize = 32 * dropout::GROUP;

/// The dropout multipliers of a run of consecutive units, drawn at least [`FACTOR_RUN`] at
/// a time. A job's tiles are consecutive, so a tile's units (49 on 7×7 planes) are mostly
/// among those drawn for the tiles before it: the generator runs over whole runs of
/// groups in its vector lanes instead of once per tile. A unit's multiplier depends on
/// (seed, unit) alone, so the run changes no value.
#[derive(Default)]
struct FactorRun {
    /// The unit of `factors[0]`.
    first: usize,
    factors: Vec<f32>,
}

impl FactorRun {
    /// The multipliers of units `first_unit..first_unit + units`, of `total` units.
    fn get(&mut self, d: &DropoutSpec, first_unit: usize, units: usize, total: usize) -> &[f32] {
        let end = first_unit + units;
        if first_unit < self.first || end > self.first + self.factors.len() {
            let start = first_unit - first_unit % dropout::GROUP;
            let len = (start + FACTOR_RUN).clamp(end, total.max(end)) - start;
            self.factors.resize(len, 0.0);
            let drawn = dropout::unit_factors(d.p, d.seed, start, &mut self.factors);
            debug_assert!(drawn.is_ok(), "p was validated");
            self.first = start;
        }
        &self.factors[first_unit - self.first..end - self.first]
    }
}

/// Multiply `values` (output tile `tile`, or its gradient) by the tile's dropout
/// multipliers into `out`, as [`dropout::forward`] (and its backward, the same call) does.
fn apply_dropout(
    p: &BnBlockParams,
    d: &DropoutSpec,
    tile: usize,
    values: &[f32],
    out: &mut [f32],
    factors: &mut FactorRun,
) {
    let (_, tile_out) = tile_lens(p);
    let total = p.out_len();
    if d.channel_wise {
        let f = factors.get(d, tile, 1, total / tile_out.max(1))[0];
        for (o, &v) in out.iter_mut().zip(values) {
            *o = v * f;
        }
    } else {
        let factors = factors.get(d, tile * tile_out, values.len(), total);
        dropout::multiply(values, factors, out);
    }
}

/// 2×2 pooling of one plane into `out`.
fn pool_plane(pool: Pool2x2, plane: &[f32], plane_w: usize, out: &mut [f32], out_w: usize) {
    match pool {
        Pool2x2::Max => max_pool_2x2_plane_values(plane, plane_w, out, out_w),
        Pool2x2::Avg => avg_pool_2x2_plane(plane, plane_w, out, out_w),
    }
}

/// Forward of one tile: normalise, activation, pool, dropout, into `out`.
fn forward_tile(
    p: &BnBlockParams,
    affine: &Affine<'_>,
    tile: usize,
    x: &[f32],
    out: &mut [f32],
    s: &mut Scratch,
    codes: Option<&mut [u8]>,
) {
    let plane_w = p.plane_hw.map_or(0, |(_, w)| w);
    let out_w = p.out_hw().map_or(0, |(_, w)| w);
    if let Some(map) = max_relu_map(p, affine, tile) {
        match &p.dropout {
            None => max_relu::forward_plane(x, plane_w, &map, out, codes),
            Some(d) => {
                let pooled = &mut s.pooled[..out.len()];
                max_relu::forward_plane(x, plane_w, &map, pooled, codes);
                apply_dropout(p, d, tile, pooled, out, &mut s.factors);
            }
        }
        return;
    }
    let normalise = |target: &mut [f32]| {
        affine.normalise(p, tile, x, target);
        if let Some(act) = p.activation {
            activation::apply_in_place(act, target);
        }
    };
    // Each stage writes straight into `out` when it is the last one.
    if p.pool.is_none() && p.dropout.is_none() {
        normalise(out);
        return;
    }
    normalise(&mut s.normalised[..x.len()]);
    let activated = &s.normalised[..x.len()];
    match (p.pool, &p.dropout) {
        (Some(pool), None) => pool_plane(pool, activated, plane_w, out, out_w),
        (Some(pool), Some(d)) => {
            pool_plane(pool, activated, plane_w, &mut s.pooled, out_w);
            apply_dropout(p, d, tile, &s.pooled, out, &mut s.factors);
        }
        (None, Some(d)) => apply_dropout(p, d, tile, activated, out, &mut s.factors),
        (None, None) => unreachable!("handled above"),
    }
}

/// Training forward of the block: batch statistics (written to `save_mean`/`save_invstd`,
/// and moving `running` if given, exactly as [`batch_norm::forward_train`]), then
/// normalise → activation → pool → dropout in one pass into `y`
/// (shape [`BnBlockParams::output_shape`]).
///
/// `codes`, when given (one byte per output value), keeps each pooling window's outcome
/// where the planes take the (leaky) ReLU and max pool kernels: [`backward`] given them
/// back routes the gradient from them, the same bits, instead of normalising the input
/// and scanning its windows again (about a third of the block's backward). They hold for
/// this call's input and statistics only.
#[allow(clippy::too_many_arguments)]
pub fn forward_train(
    p: &BnBlockParams,
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running: Option<RunningStats<'_>>,
    y: &mut [f32],
    save_mean: &mut [f32],
    save_invstd: &mut [f32],
    codes: Option<&mut [u8]>,
) -> Result<()> {
    check_len("input", x.len(), p.bn.len())?;
    check_len("output", y.len(), p.out_len())?;
    if let Some(codes) = codes.as_deref() {
        check_len("codes", codes.len(), p.out_len())?;
    }
    batch_norm::check_train_arguments(
        &p.bn,
        gamma,
        beta,
        running.as_ref(),
        save_mean,
        save_invstd,
    )?;
    let stats = batch_stats(&p.bn, x);
    store_batch_stats(&p.bn, &stats, running, save_mean, save_invstd);
    let (scale, shift) = affine_coefficients(&p.bn, gamma, beta, save_invstd);
    let affine = Affine {
        mean: save_mean,
        scale,
        shift,
    };
    let (tile_in, tile_out) = tile_lens(p);
    let stop = crate::parallel::stop_token();
    let code_tiles: Vec<Option<&mut [u8]>> = match codes {
        Some(codes) => codes.chunks_mut(tile_out).map(Some).collect(),
        None => (0..y.len().div_ceil(tile_out)).map(|_| None).collect(),
    };
    y.par_chunks_mut(tile_out)
        .zip(x.par_chunks(tile_in).zip(code_tiles))
        .with_min_len((4096 / tile_in).max(1))
        .enumerate()
        .for_each_init(
            || Scratch::new(p),
            |scratch, (tile, (out, (xt, codes)))| {
                if !stop.is_set() {
                    forward_tile(p, &affine, tile, xt, out, scratch, codes);
                }
            },
        );
    Ok(())
}

/// The pool's input gradient `target` from its output gradient `grad`: max pooling routes
/// each value to the forward's argmax (the same selects on the same values), average
/// pooling spreads it, both as the unfused backward writes it.
fn unpool_plane(
    pool: Pool2x2,
    activated: &[f32],
    grad: &[f32],
    plane_w: usize,
    out_w: usize,
    target: &mut [f32],
    scratch: &mut [f32],
) {
    match pool {
        Pool2x2::Max => {
            max_pool_2x2_plane_backward(activated, plane_w, grad, out_w, target, scratch)
        }
        Pool2x2::Avg => avg_pool_2x2_plane_backward(grad, out_w, target, plane_w),
    }
}

/// Backward pass 1 on one tile: the gradient with respect to the batch norm's output,
/// into `grad_input` (the tile of the block's input shape).
#[allow(clippy::too_many_arguments)]
fn grad_before_activation(
    p: &BnBlockParams,
    affine: &Affine<'_>,
    tile: usize,
    x: &[f32],
    grad_output: &[f32],
    grad_input: &mut [f32],
    s: &mut Scratch,
    codes: Option<&[u8]>,
) {
    let n = x.len();
    let plane_w = p.plane_hw.map_or(0, |(_, w)| w);
    let out_w = p.out_hw().map_or(0, |(_, w)| w);
    let dropped: &[f32] = match &p.dropout {
        Some(d) => {
            let m = grad_output.len();
            apply_dropout(p, d, tile, grad_output, &mut s.grad[..m], &mut s.factors);
            &s.grad[..m]
        }
        None => grad_output,
    };
    if let Some(map) = max_relu_map(p, affine, tile) {
        match codes {
            Some(codes) => {
                max_relu::backward_from_codes(x, plane_w, &map, codes, dropped, grad_input)
            }
            None => max_relu::backward_plane(x, plane_w, &map, dropped, grad_input),
        }
        return;
    }
    affine.normalise(p, tile, x, &mut s.normalised[..n]);
    let needs_output = p.needs_activation_output();
    if let (Some(act), true) = (p.activation, needs_output) {
        s.activated[..n].copy_from_slice(&s.normalised[..n]);
        activation::apply_in_place(act, &mut s.activated[..n]);
    }
    let normalised = &s.normalised[..n];
    let activated = if needs_output && p.activation.is_some() {
        &s.activated[..n]
    } else {
        normalised
    };
    let saved = |act: Activation| {
        if act.grad_uses_output() {
            activated
        } else {
            normalised
        }
    };
    match (p.pool, p.activation) {
        (None, None) => grad_input.copy_from_slice(dropped),
        (None, Some(act)) => activation::backward_in_tile(act, dropped, saved(act), grad_input),
        (Some(pool), None) => unpool_plane(
            pool,
            activated,
            dropped,
            plane_w,
            out_w,
            grad_input,
            &mut s.windows,
        ),
        (Some(pool), Some(act)) => {
            let unpooled = &mut s.grad_unpooled[..n];
            unpool_plane(
                pool,
                activated,
                dropped,
                plane_w,
                out_w,
                unpooled,
                &mut s.windows,
            );
            activation::backward_in_tile(act, unpooled, saved(act), grad_input);
        }
    }
}

/// Gradients of [`forward_train`]: `grad_output` has the output's shape; `x`, `gamma`,
/// `beta`, `save_mean`, `save_invstd` (and the seed in `p`) are the forward's, and so
/// are `codes` when given (written by that forward call). Writes `grad_input` and, when
/// given, `grad_gamma`/`grad_beta`: the unfused chain's bits.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    p: &BnBlockParams,
    grad_output: &[f32],
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    save_mean: &[f32],
    save_invstd: &[f32],
    grad_input: &mut [f32],
    grad_gamma: Option<&mut [f32]>,
    grad_beta: Option<&mut [f32]>,
    codes: Option<&[u8]>,
) -> Result<()> {
    let bn = &p.bn;
    check_len("grad_output", grad_output.len(), p.out_len())?;
    if let Some(codes) = codes {
        check_len("codes", codes.len(), p.out_len())?;
    }
    check_len("input", x.len(), bn.len())?;
    check_len("grad_input", grad_input.len(), bn.len())?;
    for (arg, v) in [("weight", gamma), ("bias", beta)] {
        if let Some(v) = v {
            check_len(arg, v.len(), bn.channels)?;
        }
    }
    check_len("save_mean", save_mean.len(), bn.channels)?;
    check_len("save_invstd", save_invstd.len(), bn.channels)?;
    let (scale, shift) = affine_coefficients(bn, gamma, beta, save_invstd);
    let affine = Affine {
        mean: save_mean,
        scale,
        shift,
    };
    let (tile_in, tile_out) = tile_lens(p);
    let stop = crate::parallel::stop_token();
    // Pass 1: the batch norm's output gradient, and on planes its sums per plane.
    let plane_sums: Vec<(f32, f32)> = grad_input
        .par_chunks_mut(tile_in)
        .zip(x.par_chunks(tile_in).zip(grad_output.par_chunks(tile_out)))
        .with_min_len((4096 / tile_in).max(1))
        .enumerate()
        .map_init(
            || Scratch::new(p),
            |scratch, (tile, (gi, (xt, go)))| {
                if stop.is_set() {
                    return (0.0, 0.0);
                }
                // The tile's codes: as many as its output gradient has values.
                let codes = codes.map(|codes| &codes[tile * tile_out..][..go.len()]);
                grad_before_activation(p, &affine, tile, xt, go, gi, scratch, codes);
                match p.tiles() {
                    Tiles::Planes => plane_grad_sums(gi, xt, save_mean[tile % bn.channels]),
                    Tiles::Rows(_) => (0.0, 0.0),
                }
            },
        )
        .collect();
    // Per channel in image order, in f64: the batch-norm backward's order.
    let sums: Vec<(f64, f64)> = match p.tiles() {
        Tiles::Planes => {
            let mut sums = vec![(0.0f64, 0.0f64); bn.channels];
            for (tile, &(a, b)) in plane_sums.iter().enumerate() {
                let c = &mut sums[tile % bn.channels];
                c.0 += f64::from(a);
                c.1 += f64::from(b);
            }
            sums
        }
        Tiles::Rows(_) => {
            let (mut sg, mut sgx) = (vec![0.0f64; bn.channels], vec![0.0f64; bn.channels]);
            for (g, xr) in grad_input
                .chunks_exact(bn.channels)
                .zip(x.chunks_exact(bn.channels))
            {
                row_grad_sums(g, xr, save_mean, &mut sg, &mut sgx);
            }
            sg.into_iter().zip(sgx).collect()
        }
    };
    // Pass 2: the batch norm's input gradient, in place.
    let coefficients = grad_input_coefficients(bn, gamma, save_mean, save_invstd, &sums, true);
    match p.tiles() {
        Tiles::Planes => grad_input
            .par_chunks_mut(tile_in)
            .zip(x.par_chunks(tile_in))
            .with_min_len((4096 / tile_in).max(1))
            .enumerate()
            .for_each(|(tile, (gi, xt))| {
                if !stop.is_set() {
                    let (a, b, c0) = coefficients[tile % bn.channels];
                    plane_grad_input_in_place(gi, xt, a, b, c0);
                }
            }),
        Tiles::Rows(_) => {
            let (a, (b, c0)): (Vec<f32>, (Vec<f32>, Vec<f32>)) =
                coefficients.iter().map(|&(a, b, c)| (a, (b, c))).unzip();
            grad_input
                .par_chunks_mut(tile_in)
                .zip(x.par_chunks(tile_in))
                .for_each(|(gi, xt)| rows_grad_input_in_place(gi, xt, &a, &b, &c0));
        }
    }
    store_param_grads(bn, &sums, save_invstd, grad_gamma, grad_beta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pool::{self, Pool2dParams};

    fn values(n: usize, salt: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(salt) >> 8;
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The unfused chain: batch norm, activation, pool, dropout, each its own kernel; and
    /// the backward in reverse. Returns (output, mean, invstd, grad_input, grad_gamma,
    /// grad_beta).
    #[allow(clippy::type_complexity)]
    fn unfused(
        p: &BnBlockParams,
        shape: &[usize],
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        grad_output: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let c = p.bn.channels;
        let n = x.len();
        let (mut z, mut mean, mut invstd) = (vec![0.0; n], vec![0.0; c], vec![0.0; c]);
        batch_norm::forward_train(
            &p.bn,
            x,
            Some(gamma),
            Some(beta),
            None,
            &mut z,
            &mut mean,
            &mut invstd,
        )
        .unwrap();
        let mut a = z.clone();
        if let Some(act) = p.activation {
            activation::forward(act, &z, &mut a).unwrap();
        }
        let pool_params = p
            .pool
            .map(|_| Pool2dParams::new(shape, (2, 2), (2, 2), (0, 0)).unwrap());
        let (mut pooled, mut idx) = (vec![0.0; p.out_len()], vec![0i64; p.out_len()]);
        match p.pool {
            Some(Pool2x2::Max) => pool::max_forward(
                pool_params.as_ref().unwrap(),
                &a,
                &mut pooled,
                Some(&mut idx),
            )
            .unwrap(),
            Some(Pool2x2::Avg) => {
                pool::avg_forward(pool_params.as_ref().unwrap(), &a, true, &mut pooled).unwrap()
            }
            None => pooled.copy_from_slice(&a),
        }
        let unit = |d: &DropoutSpec| if d.channel_wise { p.out_plane() } else { 1 };
        let mut y = pooled.clone();
        if let Some(d) = &p.dropout {
            dropout::forward(&pooled, d.p, d.seed, unit(d), &mut y).unwrap();
        }
        let mut g_pooled = grad_output.to_vec();
        if let Some(d) = &p.dropout {
            dropout::forward(grad_output, d.p, d.seed, unit(d), &mut g_pooled).unwrap();
        }
        let mut g_a = vec![0.0; n];
        match p.pool {
            Some(Pool2x2::Max) => {
                let out_shape = pool_params.unwrap().output_shape();
                pool::max_backward(shape, &out_shape, &g_pooled, &idx, &mut g_a).unwrap()
            }
            Some(Pool2x2::Avg) => {
                pool::avg_backward(pool_params.as_ref().unwrap(), &g_pooled, true, &mut g_a)
                    .unwrap()
            }
            None => g_a.copy_from_slice(&g_pooled),
        }
        let mut g_z = g_a.clone();
        if let Some(act) = p.activation {
            let saved = if act.grad_uses_output() { &a } else { &z };
            activation::backward(act, &g_a, saved, &mut g_z).unwrap();
        }
        let (mut gx, mut gg, mut gb) = (vec![0.0; n], vec![0.0; c], vec![0.0; c]);
        batch_norm::backward(
            &p.bn,
            &g_z,
            x,
            Some(gamma),
            &mean,
            &invstd,
            true,
            &mut gx,
            Some(&mut gg),
            Some(&mut gb),
        )
        .unwrap();
        (y, mean, invstd, gx, gg, gb)
    }

    #[test]
    fn fused_block_gives_the_unfused_bits() {
        let activations = [
            None,
            Some(Activation::Relu),
            Some(Activation::LeakyRelu(0.1)),
            Some(Activation::Sigmoid),
            Some(Activation::Tanh),
        ];
        // (N, C) of 4001 rows: several row chunks, the last one partial.
        let shapes: [&[usize]; 5] = [
            &[3, 5, 7, 9],
            &[1, 3, 5, 5],
            &[4, 17, 1],
            &[6, 10],
            &[4001, 10],
        ];
        for shape in shapes {
            for act in activations {
                for pool in [None, Some(Pool2x2::Max), Some(Pool2x2::Avg)] {
                    for channel_wise in [None, Some(false), Some(true)] {
                        let four_d = shape.len() == 4;
                        if (pool.is_some() || channel_wise == Some(true)) && !four_d {
                            continue;
                        }
                        let dropout = channel_wise.map(|channel_wise| DropoutSpec {
                            p: 0.3,
                            seed: 77,
                            channel_wise,
                        });
                        let p = BnBlockParams::new(shape, 1e-5, act, pool, dropout).unwrap();
                        let n: usize = shape.iter().product();
                        let c = shape[1];
                        let x = values(n, 1);
                        let (gamma, beta) = (values(c, 2), values(c, 3));
                        let go = values(p.out_len(), 4);
                        let expected = unfused(&p, shape, &x, &gamma, &beta, &go);
                        // Without the window codes, and with them (forward to backward).
                        for with_codes in [false, true] {
                            let mut y = vec![0.0; p.out_len()];
                            let (mut mean, mut invstd) = (vec![0.0; c], vec![0.0; c]);
                            let mut codes = vec![u8::MAX; p.out_len()];
                            forward_train(
                                &p,
                                &x,
                                Some(&gamma),
                                Some(&beta),
                                None,
                                &mut y,
                                &mut mean,
                                &mut invstd,
                                with_codes.then_some(&mut codes[..]),
                            )
                            .unwrap();
                            let (mut gx, mut gg, mut gb) =
                                (vec![0.0; n], vec![0.0; c], vec![0.0; c]);
                            backward(
                                &p,
                                &go,
                                &x,
                                Some(&gamma),
                                Some(&beta),
                                &mean,
                                &invstd,
                                &mut gx,
                                Some(&mut gg),
                                Some(&mut gb),
                                with_codes.then_some(&codes[..]),
                            )
                            .unwrap();
                            let what =
                                format!("{shape:?} {act:?} {pool:?} {dropout:?} {with_codes}");
                            let bits =
                                |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                            assert_eq!(bits(&y), bits(&expected.0), "output {what}");
                            assert_eq!(bits(&mean), bits(&expected.1), "mean {what}");
                            assert_eq!(bits(&invstd), bits(&expected.2), "invstd {what}");
                            assert_eq!(bits(&gx), bits(&expected.3), "grad_input {what}");
                            assert_eq!(bits(&gg), bits(&expected.4), "grad_weight {what}");
                            assert_eq!(bits(&gb), bits(&expected.5), "grad_bias {what}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn window_codes_are_written_only_where_the_max_relu_kernels_run() {
        let block = |shape: &[usize], act, pool| BnBlockParams::new(shape, 1e-5, act, pool, None);
        let (relu, leaky) = (Some(Activation::Relu), Some(Activation::LeakyRelu(0.1)));
        let max = Some(Pool2x2::Max);
        // LeNetBN's blocks: planes wide enough for the kernels at every level.
        for act in [relu, leaky] {
            assert!(block(&[4, 16, 28, 28], act, max)
                .unwrap()
                .writes_window_codes());
        }
        // Another activation or pool, no pool, or a batch norm over (N, C): none.
        let none = [
            block(&[4, 16, 28, 28], Some(Activation::Tanh), max),
            block(&[4, 16, 28, 28], relu, Some(Pool2x2::Avg)),
            block(&[4, 16, 28, 28], relu, None),
            block(&[4, 128], relu, None),
        ];
        for p in none {
            assert!(!p.unwrap().writes_window_codes());
        }
    }

    #[test]
    fn pool_needs_planes_and_dropout_an_open_probability() {
        let err = BnBlockParams::new(&[4, 3], 1e-5, None, Some(Pool2x2::Max), None);
        assert!(matches!(err, Err(Error::Invalid { arg: "input", .. })));
        let err = BnBlockParams::new(&[4, 3, 1, 5], 1e-5, None, Some(Pool2x2::Avg), None);
        assert!(matches!(err, Err(Error::Invalid { arg: "input", .. })));
        let dropout = DropoutSpec {
            p: 1.0,
            seed: 0,
            channel_wise: false,
        };
        let err = BnBlockParams::new(&[4, 3], 1e-5, None, None, Some(dropout));
        assert!(matches!(err, Err(Error::Invalid { arg: "p", .. })));
    }
}
