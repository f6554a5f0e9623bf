//! Batch normalisation over (N, C, *) inputs: statistics per channel over every other axis.
//!
//! Training normalises with the batch mean and biased variance (one pass over the data,
//! sums of values shifted by a sample of the channel, accumulated in f64 across planes)
//! and can update running statistics (unbiased variance, as PyTorch does). Evaluation
//! uses the running statistics. Channels are independent, so every result is the same at
//! any thread count.

use rayon::prelude::*;

use super::reduce::{grad_sums, grad_sums_x4, shifted_sums, shifted_sums_x4};
use crate::error::{check_len, Error, Result};
use crate::parallel::task_items;
use crate::simd_dispatch;

/// Layout of a batch-norm input: `batch` × `channels` × `spatial` values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormParams {
    pub batch: usize,
    pub channels: usize,
    pub spatial: usize,
    pub eps: f32,
}

/// Running statistics updated in place by a training forward.
pub struct RunningStats<'a> {
    pub mean: &'a mut [f32],
    pub var: &'a mut [f32],
    pub momentum: f32,
}

impl BatchNormParams {
    /// Validate an input of shape (N, C, *) (2-D or more).
    pub fn new(input_shape: &[usize], eps: f32) -> Result<Self> {
        if input_shape.len() < 2 {
            return Err(Error::invalid(
                "input",
                format!("a {}-D array {input_shape:?}", input_shape.len()),
                "a 2-D (N, C) or 4-D (N, C, H, W) array",
            ));
        }
        super::nonzero("input", input_shape)?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::invalid("eps", eps, "a finite number >= 0"));
        }
        Ok(BatchNormParams {
            batch: input_shape[0],
            channels: input_shape[1],
            spatial: input_shape[2..].iter().product(),
            eps,
        })
    }

    /// Values per channel.
    pub fn count(&self) -> usize {
        self.batch * self.spatial
    }

    pub(crate) fn len(&self) -> usize {
        self.batch * self.channels * self.spatial
    }

    /// The slices of channel `c`, one per image (for the tests' references).
    #[cfg(test)]
    fn channel_planes<'a>(
        &'a self,
        x: &'a [f32],
        c: usize,
    ) -> impl Iterator<Item = &'a [f32]> + 'a {
        let stride = self.channels * self.spatial;
        (0..self.batch)
            .map(move |n| &x[n * stride + c * self.spatial..n * stride + (c + 1) * self.spatial])
    }

    pub(crate) fn check_channel_vector(&self, arg: &'static str, v: Option<&[f32]>) -> Result<()> {
        match v {
            Some(v) => check_len(arg, v.len(), self.channels),
            None => Ok(()),
        }
    }
}

simd_dispatch! {
    /// Each plane's f32 [`shifted_sums`] of `images` consecutive images (`channels`
    /// planes of `len` values each) into `sums` (`[image][channel]`), each channel's
    /// planes shifted by its `shifts` value. Four images' planes of a channel at a time
    /// ([`shifted_sums_x4`]: the bits of one at a time).
    fn image_shifted_sums(x: &[f32], channels: usize, len: usize, shifts: &[f32], sums: &mut [(f32, f32)]) {
        let images = sums.len() / channels;
        let plane = |n: usize, c: usize| &x[(n * channels + c) * len..][..len];
        for (c, &shift) in shifts.iter().enumerate() {
            let mut n = 0;
            while n + 4 <= images {
                let four = [plane(n, c), plane(n + 1, c), plane(n + 2, c), plane(n + 3, c)];
                for (i, pair) in shifted_sums_x4(four, shift).into_iter().enumerate() {
                    sums[(n + i) * channels + c] = pair;
                }
                n += 4;
            }
            for n in n..images {
                sums[n * channels + c] = shifted_sums(plane(n, c), shift);
            }
        }
    }
}

simd_dispatch! {
    /// The f64 sums, in sample order, of each of `batch` plane pairs' f32 [`grad_sums`]
    /// (see [`channel_shifted_sums`]).
    fn channel_grad_sums(g: &[f32], x: &[f32], stride: usize, len: usize, batch: usize, mean: f32) -> (f64, f64) {
        let gp = |n: usize| &g[n * stride..n * stride + len];
        let xp = |n: usize| &x[n * stride..n * stride + len];
        let (mut sg, mut sgx) = (0.0f64, 0.0f64);
        let mut n = 0;
        while n + 4 <= batch {
            let sums = grad_sums_x4(
                [gp(n), gp(n + 1), gp(n + 2), gp(n + 3)],
                [xp(n), xp(n + 1), xp(n + 2), xp(n + 3)],
                mean,
            );
            for (a, b) in sums {
                sg += f64::from(a);
                sgx += f64::from(b);
            }
            n += 4;
        }
        for n in n..batch {
            let (a, b) = grad_sums(gp(n), xp(n), mean);
            sg += f64::from(a);
            sgx += f64::from(b);
        }
        (sg, sgx)
    }
}

/// [`grad_sums`] of one plane: in one AVX register from the AVX2 level up (the same bits).
pub(crate) fn plane_grad_sums(g: &[f32], x: &[f32], mean: f32) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() >= crate::simd::Level::Avx2 {
        // SAFETY: level() is Avx2 or above only when the CPU has AVX2.
        return unsafe { super::reduce::grad_sums_avx(g, x, mean) };
    }
    grad_sums(g, x, mean)
}

simd_dispatch! {
    /// out = (x - mean)·a + b.
    pub(crate) fn plane_normalise(x: &[f32], out: &mut [f32], mean: f32, a: f32, b: f32) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v - mean) * a + b;
        }
    }
}

simd_dispatch! {
    /// out = g·a + x·b + c.
    fn plane_grad_input(g: &[f32], x: &[f32], out: &mut [f32], a: f32, b: f32, c: f32) {
        for ((o, &gv), &xv) in out.iter_mut().zip(g).zip(x) {
            *o = gv * a + xv * b + c;
        }
    }
}

// One value per channel and sample (BatchNorm1d on (N, C)): the loops below run over
// rows of C values, vectorised across channels, instead of N·C planes of one value.
// Each channel's sums are accumulated in f64 in sample order, as over planes.

simd_dispatch! {
    /// s1[c] += x[c] - shift[c]; s2[c] += (x[c] - shift[c])², for one row.
    fn row_shifted_sums(x: &[f32], shift: &[f32], s1: &mut [f64], s2: &mut [f64]) {
        for (((&v, &sh), a), b) in x.iter().zip(shift).zip(s1.iter_mut()).zip(s2.iter_mut()) {
            let d = v - sh;
            *a += f64::from(d);
            *b += f64::from(d * d);
        }
    }
}

simd_dispatch! {
    /// sg[c] += g[c]; sgx[c] += g[c]·(x[c] - mean[c]), for one row.
    pub(crate) fn row_grad_sums(g: &[f32], x: &[f32], mean: &[f32], sg: &mut [f64], sgx: &mut [f64]) {
        for ((((&gv, &xv), &m), a), b) in
            g.iter().zip(x).zip(mean).zip(sg.iter_mut()).zip(sgx.iter_mut())
        {
            *a += f64::from(gv);
            *b += f64::from(gv * (xv - m));
        }
    }
}

simd_dispatch! {
    /// values[c] = (values[c] - mean[c])·a[c] + b[c], for rows of C values: the
    /// arithmetic of [`rows_normalise`], in place.
    pub(crate) fn rows_normalise_in_place(values: &mut [f32], mean: &[f32], a: &[f32], b: &[f32]) {
        for row in values.chunks_exact_mut(a.len()) {
            for (((v, &m), &aa), &bb) in row.iter_mut().zip(mean).zip(a).zip(b) {
                *v = (*v - m) * aa + bb;
            }
        }
    }
}

simd_dispatch! {
    /// out[c] = (x[c] - mean[c])·a[c] + b[c], for rows of C values.
    pub(crate) fn rows_normalise(x: &[f32], out: &mut [f32], mean: &[f32], a: &[f32], b: &[f32]) {
        for (o_row, x_row) in out.chunks_exact_mut(a.len()).zip(x.chunks_exact(a.len())) {
            for ((((o, &v), &m), &aa), &bb) in o_row.iter_mut().zip(x_row).zip(mean).zip(a).zip(b)
            {
                *o = (v - m) * aa + bb;
            }
        }
    }
}

simd_dispatch! {
    /// out[c] = g[c]·a[c] + x[c]·b[c] + c0[c], for rows of C values.
    fn rows_grad_input(g: &[f32], x: &[f32], out: &mut [f32], a: &[f32], b: &[f32],
                       c0: &[f32]) {
        let c = a.len();
        for ((o_row, g_row), x_row) in
            out.chunks_exact_mut(c).zip(g.chunks_exact(c)).zip(x.chunks_exact(c))
        {
            for (i, o) in o_row.iter_mut().enumerate() {
                *o = g_row[i] * a[i] + x_row[i] * b[i] + c0[i];
            }
        }
    }
}

/// Rows per parallel chunk of the one-value-per-channel path (~32K values).
pub(crate) fn rows_per_chunk(p: &BatchNormParams) -> usize {
    (crate::parallel::ELEMENTWISE_CHUNK / p.channels).max(1)
}

/// Two sums per channel of a one-value-per-channel input, `add_rows(columns, s1, s2)`
/// adding every row's `columns` in row order, blocks of columns in parallel. Each channel
/// sums its rows in the same order whatever the blocks, so the bits do not depend on
/// them; a block covers at least [`crate::parallel::ELEMENTWISE_CHUNK`] values (whole
/// SIMD registers of channels), so that a small layer stays one task.
fn column_sums(
    p: &BatchNormParams,
    add_rows: impl Fn(std::ops::Range<usize>, &mut [f64], &mut [f64]) + Sync,
) -> (Vec<f64>, Vec<f64>) {
    let block = (crate::parallel::ELEMENTWISE_CHUNK / p.batch)
        .max(1)
        .next_multiple_of(16);
    let (mut s1, mut s2) = (vec![0.0f64; p.channels], vec![0.0f64; p.channels]);
    s1.par_chunks_mut(block)
        .zip(s2.par_chunks_mut(block))
        .enumerate()
        .for_each(|(i, (s1, s2))| add_rows(i * block..i * block + s1.len(), s1, s2));
    (s1, s2)
}

/// Per channel: y = (x - mean[c])·scale[c] + shift[c], over planes in parallel.
///
/// Subtracting the mean first (rather than folding it into the shift, x·scale +
/// (shift - mean·scale), as PyTorch's CPU kernel does) keeps the rounding relative to
/// |x - mean| instead of |mean·scale|: a constant channel gives `shift` exactly.
fn normalise(
    p: &BatchNormParams,
    x: &[f32],
    y: &mut [f32],
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    let stop = crate::parallel::stop_token();
    if p.spatial == 1 {
        let chunk = rows_per_chunk(p) * p.channels;
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(out, rows)| rows_normalise(rows, out, mean, scale, shift));
        return;
    }
    let planes = task_items(p.spatial);
    y.par_chunks_mut(p.spatial)
        .zip(x.par_chunks(p.spatial))
        .with_min_len(planes)
        .with_max_len(planes)
        .enumerate()
        .for_each(|(i, (out, plane))| {
            if stop.is_set() {
                return;
            }
            let c = i % p.channels;
            plane_normalise(plane, out, mean[c], scale[c], shift[c]);
        });
}

/// Batch mean and biased variance of every channel.
pub(crate) fn batch_stats(p: &BatchNormParams, x: &[f32]) -> Vec<(f64, f64)> {
    let count = p.count() as f64;
    if p.spatial == 1 {
        let shift = &x[..p.channels];
        let (s1, s2) = column_sums(p, |columns, s1, s2| {
            for row in x.chunks_exact(p.channels) {
                row_shifted_sums(&row[columns.clone()], &shift[columns.clone()], s1, s2);
            }
        });
        return (0..p.channels)
            .map(|c| {
                let mean_shifted = s1[c] / count;
                let var = (s2[c] / count - mean_shifted * mean_shifted).max(0.0);
                (f64::from(shift[c]) + mean_shifted, var)
            })
            .collect();
    }
    // Each plane's f32 sums, by tasks of whole images (four or more: the sums take four
    // planes at a time), so that a thread reads the images it wrote in the layer before
    // (split by images too) rather than every image's planes of its channels; then each
    // channel's added in f64 in image order. In blocks of at most `BLOCK_TASKS` tasks,
    // so that the planes' sums take little memory whatever the batch.
    const BLOCK_TASKS: usize = 64;
    let image_len = p.channels * p.spatial;
    let task = task_items(image_len).next_multiple_of(4);
    let shifts: Vec<f32> = (0..p.channels).map(|c| x[c * p.spatial]).collect();
    let mut totals = vec![(0.0f64, 0.0f64); p.channels];
    let mut plane_sums = Vec::new();
    for block in x.chunks(BLOCK_TASKS * task * image_len) {
        plane_sums.clear();
        plane_sums.resize(block.len() / p.spatial, (0.0f32, 0.0f32));
        plane_sums
            .par_chunks_mut(task * p.channels)
            .zip(block.par_chunks(task * image_len))
            .for_each(|(sums, x)| image_shifted_sums(x, p.channels, p.spatial, &shifts, sums));
        for image in plane_sums.chunks_exact(p.channels) {
            for (total, &(a, b)) in totals.iter_mut().zip(image) {
                total.0 += f64::from(a);
                total.1 += f64::from(b);
            }
        }
    }
    totals
        .iter()
        .zip(&shifts)
        .map(|(&(s1, s2), &shift)| {
            let mean_shifted = s1 / count;
            let var = (s2 / count - mean_shifted * mean_shifted).max(0.0);
            (f64::from(shift) + mean_shifted, var)
        })
        .collect()
}

/// Scale gamma·invstd and shift beta of every channel (1 and 0 when not given).
pub(crate) fn affine_coefficients(
    p: &BatchNormParams,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    invstd: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    (0..p.channels)
        .map(|c| {
            let g = gamma.map_or(1.0, |g| g[c]);
            let b = beta.map_or(0.0, |b| b[c]);
            (g * invstd[c], b)
        })
        .unzip()
}

/// Training forward: normalise with batch statistics, write them (mean, 1/sqrt(var+eps))
/// to `save_mean`/`save_invstd`, and update `running` if given.
#[allow(clippy::too_many_arguments)]
pub fn forward_train(
    p: &BatchNormParams,
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running: Option<RunningStats<'_>>,
    y: &mut [f32],
    save_mean: &mut [f32],
    save_invstd: &mut [f32],
) -> Result<()> {
    check_len("input", x.len(), p.len())?;
    check_len("output", y.len(), p.len())?;
    check_train_arguments(p, gamma, beta, running.as_ref(), save_mean, save_invstd)?;
    let stats = batch_stats(p, x);
    store_batch_stats(p, &stats, running, save_mean, save_invstd);
    let (scale, shift) = affine_coefficients(p, gamma, beta, save_invstd);
    normalise(p, x, y, save_mean, &scale, &shift);
    Ok(())
}

/// The checks of a training forward other than the input and output lengths.
pub(crate) fn check_train_arguments(
    p: &BatchNormParams,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running: Option<&RunningStats<'_>>,
    save_mean: &[f32],
    save_invstd: &[f32],
) -> Result<()> {
    p.check_channel_vector("weight", gamma)?;
    p.check_channel_vector("bias", beta)?;
    check_len("save_mean", save_mean.len(), p.channels)?;
    check_len("save_invstd", save_invstd.len(), p.channels)?;
    if p.count() < 2 {
        return Err(Error::invalid(
            "input",
            format!(
                "{} value per channel (shape N={}, C={})",
                p.count(),
                p.batch,
                p.channels
            ),
            "more than 1 value per channel when training",
        ));
    }
    if let Some(r) = running {
        check_len("running_mean", r.mean.len(), p.channels)?;
        check_len("running_var", r.var.len(), p.channels)?;
        if !r.momentum.is_finite() {
            return Err(Error::invalid("momentum", r.momentum, "a finite number"));
        }
    }
    Ok(())
}

/// Write the batch statistics as (mean, 1/sqrt(var+eps)) to `save_mean`/`save_invstd` and
/// move `running` towards them (unbiased variance).
pub(crate) fn store_batch_stats(
    p: &BatchNormParams,
    stats: &[(f64, f64)],
    running: Option<RunningStats<'_>>,
    save_mean: &mut [f32],
    save_invstd: &mut [f32],
) {
    for (c, &(mean, var)) in stats.iter().enumerate() {
        save_mean[c] = mean as f32;
        save_invstd[c] = (1.0 / (var + f64::from(p.eps)).sqrt()) as f32;
    }
    if let Some(r) = running {
        let m = f64::from(r.momentum);
        let unbias = p.count() as f64 / (p.count() - 1) as f64;
        for (c, &(mean, var)) in stats.iter().enumerate() {
            r.mean[c] = ((1.0 - m) * f64::from(r.mean[c]) + m * mean) as f32;
            r.var[c] = ((1.0 - m) * f64::from(r.var[c]) + m * var * unbias) as f32;
        }
    }
}

/// Evaluation forward with running statistics; also writes the mean and invstd it used.
#[allow(clippy::too_many_arguments)]
pub fn forward_eval(
    p: &BatchNormParams,
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running_mean: &[f32],
    running_var: &[f32],
    y: &mut [f32],
    save_mean: &mut [f32],
    save_invstd: &mut [f32],
) -> Result<()> {
    check_len("input", x.len(), p.len())?;
    check_len("output", y.len(), p.len())?;
    p.check_channel_vector("weight", gamma)?;
    p.check_channel_vector("bias", beta)?;
    check_len("running_mean", running_mean.len(), p.channels)?;
    check_len("running_var", running_var.len(), p.channels)?;
    save_mean.copy_from_slice(running_mean);
    let (scale, shift) = eval_coefficients(p, gamma, beta, running_var, save_invstd);
    normalise(p, x, y, save_mean, &scale, &shift);
    Ok(())
}

/// The evaluation's `(scale, shift)` per channel (the output is `(x - running_mean)·scale
/// + shift`), with `1/sqrt(running_var + eps)` written to `invstd`: what
/// [`forward_eval`] applies, for a kernel that applies it to its own output (the
/// evaluation's dense layer followed by a batch norm, [`crate::kernels::linear`]).
pub(crate) fn eval_coefficients(
    p: &BatchNormParams,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running_var: &[f32],
    invstd: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    for (s, &var) in invstd.iter_mut().zip(running_var) {
        *s = (1.0 / (f64::from(var) + f64::from(p.eps)).sqrt()) as f32;
    }
    affine_coefficients(p, gamma, beta, invstd)
}

/// A convolution's (or any layer's) weight and bias with the evaluation batch norm after
/// it folded in: per output channel `c`, `scale = γ/√(var+eps)`, the weight's values
/// times `scale`, and `(bias - mean)·scale + β` as the new bias (`γ`, `β`, the bias
/// default to 1, 0, 0), in float64 and rounded once to float32: the bits of
/// `bnrs.nn.fusion.FusedBlock._fold`, the same operations in the same order on NumPy's
/// float64. `weight` holds `mean.len()` rows of equal length.
#[allow(clippy::too_many_arguments)]
pub fn fold_into_weights(
    weight: &[f32],
    bias: Option<&[f32]>,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    running_mean: &[f32],
    running_var: &[f32],
    eps: f64,
    folded_weight: &mut [f32],
    folded_bias: &mut [f32],
) -> Result<()> {
    let channels = running_mean.len();
    for (name, len) in [
        ("running_var", Some(running_var.len())),
        ("bias", bias.map(<[f32]>::len)),
        ("weight", gamma.map(<[f32]>::len)),
        ("bias", beta.map(<[f32]>::len)),
        ("folded_bias", Some(folded_bias.len())),
    ] {
        if let Some(len) = len {
            check_len(name, len, channels)?;
        }
    }
    check_len("folded_weight", folded_weight.len(), weight.len())?;
    if channels == 0 || !weight.len().is_multiple_of(channels) {
        return Err(Error::invalid(
            "weight",
            format!("{} values", weight.len()),
            format!("a whole number of values for each of {channels} channels"),
        ));
    }
    let row = weight.len() / channels;
    for c in 0..channels {
        let mut scale = 1.0 / (f64::from(running_var[c]) + eps).sqrt();
        if let Some(g) = gamma {
            scale *= f64::from(g[c]);
        }
        let mut shift = -f64::from(running_mean[c]) * scale;
        if let Some(b) = bias {
            shift += f64::from(b[c]) * scale;
        }
        if let Some(b) = beta {
            shift += f64::from(b[c]);
        }
        let (from, to) = (c * row, (c + 1) * row);
        for (out, &w) in folded_weight[from..to].iter_mut().zip(&weight[from..to]) {
            *out = (f64::from(w) * scale) as f32;
        }
        folded_bias[c] = shift as f32;
    }
    Ok(())
}

/// Gradients of batch normalisation. `training` says whether the forward used batch
/// statistics (the gradient then flows through them) or fixed running statistics.
/// `grad_gamma`/`grad_beta` are written when given.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    p: &BatchNormParams,
    grad_output: &[f32],
    x: &[f32],
    gamma: Option<&[f32]>,
    save_mean: &[f32],
    save_invstd: &[f32],
    training: bool,
    grad_input: &mut [f32],
    grad_gamma: Option<&mut [f32]>,
    grad_beta: Option<&mut [f32]>,
) -> Result<()> {
    check_len("grad_output", grad_output.len(), p.len())?;
    check_len("input", x.len(), p.len())?;
    check_len("grad_input", grad_input.len(), p.len())?;
    p.check_channel_vector("weight", gamma)?;
    check_len("save_mean", save_mean.len(), p.channels)?;
    check_len("save_invstd", save_invstd.len(), p.channels)?;
    let sums: Vec<(f64, f64)> = if p.spatial == 1 {
        let (sg, sgx) = column_sums(p, |columns, sg, sgx| {
            for (g, xr) in grad_output
                .chunks_exact(p.channels)
                .zip(x.chunks_exact(p.channels))
            {
                let (g, xr) = (&g[columns.clone()], &xr[columns.clone()]);
                row_grad_sums(g, xr, &save_mean[columns.clone()], sg, sgx);
            }
        });
        sg.into_iter().zip(sgx).collect()
    } else {
        let channels = task_items(p.count());
        (0..p.channels)
            .into_par_iter()
            .with_min_len(channels)
            .with_max_len(channels)
            .map(|c| {
                let (offset, stride) = (c * p.spatial, p.channels * p.spatial);
                channel_grad_sums(
                    &grad_output[offset..],
                    &x[offset..],
                    stride,
                    p.spatial,
                    p.batch,
                    save_mean[c],
                )
            })
            .collect()
    };
    let coefficients = grad_input_coefficients(p, gamma, save_mean, save_invstd, &sums, training);
    if p.spatial == 1 {
        let (a, (b, c0)): (Vec<f32>, (Vec<f32>, Vec<f32>)) =
            coefficients.iter().map(|&(a, b, c)| (a, (b, c))).unzip();
        let chunk = rows_per_chunk(p) * p.channels;
        grad_input
            .par_chunks_mut(chunk)
            .zip(grad_output.par_chunks(chunk).zip(x.par_chunks(chunk)))
            .for_each(|(out, (g, xr))| rows_grad_input(g, xr, out, &a, &b, &c0));
    } else {
        let stop = crate::parallel::stop_token();
        let planes = task_items(p.spatial);
        grad_input
            .par_chunks_mut(p.spatial)
            .zip(
                grad_output
                    .par_chunks(p.spatial)
                    .zip(x.par_chunks(p.spatial)),
            )
            .with_min_len(planes)
            .with_max_len(planes)
            .enumerate()
            .for_each(|(i, (out, (g, xp)))| {
                if stop.is_set() {
                    return;
                }
                let (a, b, c0) = coefficients[i % p.channels];
                plane_grad_input(g, xp, out, a, b, c0);
            });
    }
    store_param_grads(p, &sums, save_invstd, grad_gamma, grad_beta)
}

/// Per channel, (a, b, c) with grad_input = a·g + b·x + c, from the sums (Σ g,
/// Σ g·(x - mean)) of each channel.
pub(crate) fn grad_input_coefficients(
    p: &BatchNormParams,
    gamma: Option<&[f32]>,
    save_mean: &[f32],
    save_invstd: &[f32],
    sums: &[(f64, f64)],
    training: bool,
) -> Vec<(f32, f32, f32)> {
    let count = p.count() as f64;
    (0..p.channels)
        .map(|c| {
            let invstd = f64::from(save_invstd[c]);
            let k = f64::from(gamma.map_or(1.0, |g| g[c])) * invstd;
            if training {
                let (sg, sgx) = sums[c];
                let b = -k * invstd * invstd * sgx / count;
                let c0 = -k * sg / count - b * f64::from(save_mean[c]);
                (k as f32, b as f32, c0 as f32)
            } else {
                (k as f32, 0.0, 0.0)
            }
        })
        .collect()
}

/// Write grad_gamma = Σ g·(x - mean)·invstd and grad_beta = Σ g, when given.
pub(crate) fn store_param_grads(
    p: &BatchNormParams,
    sums: &[(f64, f64)],
    save_invstd: &[f32],
    grad_gamma: Option<&mut [f32]>,
    grad_beta: Option<&mut [f32]>,
) -> Result<()> {
    if let Some(gg) = grad_gamma {
        check_len("grad_weight", gg.len(), p.channels)?;
        for c in 0..p.channels {
            gg[c] = (sums[c].1 * f64::from(save_invstd[c])) as f32;
        }
    }
    if let Some(gb) = grad_beta {
        check_len("grad_bias", gb.len(), p.channels)?;
        for c in 0..p.channels {
            gb[c] = sums[c].0 as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statistics are each channel's plane sums ([`shifted_sums`], shifted by the
    /// channel's first value) added in f64 in image order, whatever the tasks, blocks and
    /// threads: batches of whole and partial blocks and tasks, planes of odd lengths.
    #[test]
    fn batch_statistics_add_each_channels_planes_in_image_order_at_any_thread_count() {
        // 2 x 4,100 values an image: tasks of 4 images, blocks of 256; 261 images are a
        // whole block and a partial one, and a partial task.
        for shape in [[261usize, 2, 4100], [7, 3, 5], [1, 4, 9], [64, 16, 196]] {
            let p = BatchNormParams::new(&shape, 0.0).unwrap();
            // Planes of very different magnitudes, so that the f64 sums round and their
            // order shows.
            let image_len = (p.channels * p.spatial) as u32;
            let x: Vec<f32> = (0..p.len() as u32)
                .map(|i| {
                    let h = i.wrapping_mul(0x9E37_79B9).rotate_left(11);
                    let scale = [1.0, 1e15, 1e-15, 3e7, 1e-7][(i / image_len % 5) as usize];
                    ((h % 4001) as f32 / 1000.0 - 2.0) * scale
                })
                .collect();
            let count = p.count() as f64;
            let expected: Vec<(u64, u64)> = (0..p.channels)
                .map(|c| {
                    let shift = x[c * p.spatial];
                    let (mut s1, mut s2) = (0.0f64, 0.0f64);
                    for plane in p.channel_planes(&x, c) {
                        let (a, b) = shifted_sums(plane, shift);
                        s1 += f64::from(a);
                        s2 += f64::from(b);
                    }
                    let m = s1 / count;
                    let var = (s2 / count - m * m).max(0.0);
                    ((f64::from(shift) + m).to_bits(), var.to_bits())
                })
                .collect();
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let stats = pool.install(|| batch_stats(&p, &x));
                let got: Vec<(u64, u64)> = stats
                    .iter()
                    .map(|(m, v)| (m.to_bits(), v.to_bits()))
                    .collect();
                assert_eq!(got, expected, "{shape:?} at {threads} threads");
            }
        }
    }

    #[test]
    fn normalised_channels_have_zero_mean_unit_variance() {
        let p = BatchNormParams::new(&[3, 2, 2, 2], 0.0).unwrap();
        let x: Vec<f32> = (0..24).map(|i| (i * i % 7) as f32 + 100.0).collect();
        let (mut y, mut mean, mut invstd) = (vec![0.0; 24], vec![0.0; 2], vec![0.0; 2]);
        forward_train(&p, &x, None, None, None, &mut y, &mut mean, &mut invstd).unwrap();
        for c in 0..2 {
            let vals: Vec<f64> = p
                .channel_planes(&y, c)
                .flatten()
                .map(|&v| f64::from(v))
                .collect();
            let m = vals.iter().sum::<f64>() / 12.0;
            let v = vals.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / 12.0;
            assert!(
                m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4,
                "channel {c}: {m} {v}"
            );
        }
    }

    #[test]
    fn a_constant_channel_far_from_zero_gives_beta_exactly() {
        // Folded as x·a + (beta - mean·a), |mean·a| ~ 2e7 here and the output was -2, not -1.
        for shape in [[4usize, 2, 3, 3], [6, 2, 1, 1]] {
            let p = BatchNormParams::new(&shape, 1e-5).unwrap();
            let n = p.len();
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    if (i / p.spatial) % 2 == 1 {
                        -3e4
                    } else {
                        i as f32
                    }
                })
                .collect();
            let (gamma, beta) = ([1.0f32, 2.0], [0.5f32, -1.0]);
            let (mut y, mut mean, mut invstd) = (vec![0.0; n], vec![0.0; 2], vec![0.0; 2]);
            forward_train(
                &p,
                &x,
                Some(&gamma),
                Some(&beta),
                None,
                &mut y,
                &mut mean,
                &mut invstd,
            )
            .unwrap();
            let channel_1: Vec<f32> = p.channel_planes(&y, 1).flatten().copied().collect();
            assert!(
                channel_1.iter().all(|&v| v == -1.0),
                "{shape:?}: {channel_1:?}"
            );
            let (rm, rv) = (vec![-3e4f32; 2], vec![0.0f32; 2]);
            forward_eval(
                &p,
                &x,
                Some(&gamma),
                Some(&beta),
                &rm,
                &rv,
                &mut y,
                &mut mean,
                &mut invstd,
            )
            .unwrap();
            let channel_1: Vec<f32> = p.channel_planes(&y, 1).flatten().copied().collect();
            assert!(
                channel_1.iter().all(|&v| v == -1.0),
                "{shape:?} eval: {channel_1:?}"
            );
        }
    }

    #[test]
    fn one_value_per_channel_is_rejected_in_training() {
        let p = BatchNormParams::new(&[1, 3], 1e-5).unwrap();
        let (mut y, mut m, mut s) = (vec![0.0; 3], vec![0.0; 3], vec![0.0; 3]);
        let err = forward_train(
            &p,
            &[1.0, 2.0, 3.0],
            None,
            None,
            None,
            &mut y,
            &mut m,
            &mut s,
        );
        assert!(matches!(err, Err(Error::Invalid { arg: "input", .. })));
    }
}
