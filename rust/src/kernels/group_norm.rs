//! Group normalisation over (N, C, *) inputs: statistics per (sample, group of channels).
//!
//! The family of per-sample normalisations: LayerNorm over (C, H, W) is one group, and
//! InstanceNorm is C groups without affine; LayerNorm over the features of an (M, F) input
//! is one group of F channels of one value each, whose per-channel affine is then
//! per-element. Like PyTorch's `native_group_norm` the forward returns the output with the
//! mean and 1/sqrt(var + eps) ("rstd") of every (sample, group), which the backward takes.
//!
//! The values of one (sample, group) are contiguous; each is reduced by one thread in a
//! fixed order (chunks of [`STAT_CHUNK`] values in f32 lanes, accumulated in f64), so the
//! results are the same at any thread count.

use rayon::prelude::*;

use super::reduce::{grad_sums, shifted_sums};
use crate::error::{check_len, Error, Result};
use crate::simd_dispatch;

/// Values summed in f32 before the partial sum is added to the f64 total: short enough
/// that the f32 rounding stays at the level of the lane sums over one batch-norm plane.
const STAT_CHUNK: usize = 4096;

/// Layout of a group-norm input: `batch` × `channels` × `spatial` values, the channels
/// split into `groups` consecutive groups.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNormParams {
    pub batch: usize,
    pub channels: usize,
    pub spatial: usize,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNormParams {
    /// Validate an input of shape (N, C, *) (2-D or more) split into `num_groups` groups.
    pub fn new(input_shape: &[usize], num_groups: i64, eps: f32) -> Result<Self> {
        if input_shape.len() < 2 {
            return Err(Error::invalid(
                "input",
                format!("a {}-D array {input_shape:?}", input_shape.len()),
                "an array of 2 or more dimensions (N, C, *)",
            ));
        }
        super::nonzero("input", input_shape)?;
        let channels = input_shape[1];
        if num_groups < 1 || !channels.is_multiple_of(num_groups as usize) {
            return Err(Error::invalid(
                "num_groups",
                num_groups,
                format!("a positive divisor of the {channels} channels (input axis 1)"),
            ));
        }
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::invalid("eps", eps, "a finite number >= 0"));
        }
        Ok(GroupNormParams {
            batch: input_shape[0],
            channels,
            spatial: input_shape[2..].iter().product(),
            groups: num_groups as usize,
            eps,
        })
    }

    /// Channels per group.
    pub fn group_channels(&self) -> usize {
        self.channels / self.groups
    }

    /// Values per (sample, group): what each statistic sums.
    pub fn group_len(&self) -> usize {
        self.group_channels() * self.spatial
    }

    /// Number of (sample, group) pairs, the length of the mean and rstd vectors.
    pub fn rows(&self) -> usize {
        self.batch * self.groups
    }

    fn len(&self) -> usize {
        self.batch * self.channels * self.spatial
    }

    /// Rows per parallel task: at least ~4K values each, from the problem size only.
    fn min_rows_per_task(&self) -> usize {
        (4096 / self.group_len()).max(1)
    }

    fn check_channel_vector(&self, arg: &'static str, v: Option<&[f32]>) -> Result<()> {
        match v {
            Some(v) => check_len(arg, v.len(), self.channels),
            None => Ok(()),
        }
    }

    /// The channels of row `row` (sample n, group g) in a per-channel vector.
    fn group_slice<'a>(&self, v: Option<&'a [f32]>, row: usize) -> Option<&'a [f32]> {
        let cpg = self.group_channels();
        let g = row % self.groups;
        v.map(|v| &v[g * cpg..(g + 1) * cpg])
    }
}

simd_dispatch! {
    /// (Σ (x - shift), Σ (x - shift)²) over one row, in fixed chunks summed in f64.
    fn row_shifted_sums(x: &[f32], shift: f32) -> (f64, f64) {
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for chunk in x.chunks(STAT_CHUNK) {
            let (a, b) = shifted_sums(chunk, shift);
            s1 += f64::from(a);
            s2 += f64::from(b);
        }
        (s1, s2)
    }
}

simd_dispatch! {
    /// out = (x - mean)·rstd·gamma[c] + beta[c] over one row of channels of `spatial` values.
    fn normalize_row(x: &[f32], out: &mut [f32], mean: f32, rstd: f32,
                     gamma: Option<&[f32]>, beta: Option<&[f32]>, spatial: usize) {
        match (gamma, beta) {
            (None, None) => {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = (v - mean) * rstd;
                }
            }
            _ if spatial == 1 => {
                for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
                    let g = gamma.map_or(1.0, |g| g[i]);
                    let b = beta.map_or(0.0, |b| b[i]);
                    *o = (v - mean) * rstd * g + b;
                }
            }
            _ => {
                for (c, (o_plane, x_plane)) in
                    out.chunks_exact_mut(spatial).zip(x.chunks_exact(spatial)).enumerate()
                {
                    let g = gamma.map_or(1.0, |g| g[c]);
                    let b = beta.map_or(0.0, |b| b[c]);
                    for (o, &v) in o_plane.iter_mut().zip(x_plane) {
                        *o = (v - mean) * rstd * g + b;
                    }
                }
            }
        }
    }
}

simd_dispatch! {
    /// Per channel of one row: (Σ dy, Σ dy·(x - mean)) over its `spatial` values.
    fn row_channel_grad_sums(g: &[f32], x: &[f32], mean: f32, spatial: usize,
                             sums: &mut [(f64, f64)]) {
        if spatial == 1 {
            for ((s, &gv), &xv) in sums.iter_mut().zip(g).zip(x) {
                *s = (f64::from(gv), f64::from(gv * (xv - mean)));
            }
            return;
        }
        for ((s, g_plane), x_plane) in
            sums.iter_mut().zip(g.chunks_exact(spatial)).zip(x.chunks_exact(spatial))
        {
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for (gc, xc) in g_plane.chunks(STAT_CHUNK).zip(x_plane.chunks(STAT_CHUNK)) {
                let (a, b) = grad_sums(gc, xc, mean);
                sg += f64::from(a);
                sgx += f64::from(b);
            }
            *s = (sg, sgx);
        }
    }
}

/// The per-row part of grad_input = dy·a[c] + (x - mean)·b + c0.
#[derive(Clone, Copy)]
struct RowGrad {
    mean: f32,
    b: f32,
    c0: f32,
}

simd_dispatch! {
    /// out = dy·a[c] + (x - mean)·b + c0 over one row; a[c] = rstd·gamma[c].
    fn row_grad_input(g: &[f32], x: &[f32], out: &mut [f32], a: &[f32], spatial: usize,
                      row: RowGrad) {
        let RowGrad { mean, b, c0 } = row;
        if spatial == 1 {
            for (((o, &gv), &xv), &av) in out.iter_mut().zip(g).zip(x).zip(a) {
                *o = gv * av + (xv - mean) * b + c0;
            }
            return;
        }
        for (((o_plane, g_plane), x_plane), &av) in out
            .chunks_exact_mut(spatial)
            .zip(g.chunks_exact(spatial))
            .zip(x.chunks_exact(spatial))
            .zip(a)
        {
            for ((o, &gv), &xv) in o_plane.iter_mut().zip(g_plane).zip(x_plane) {
                *o = gv * av + (xv - mean) * b + c0;
            }
        }
    }
}

/// Forward: normalise every (sample, group) with its own mean and biased variance, then
/// apply the per-channel affine; writes the mean and rstd = 1/sqrt(var + eps) of every
/// (sample, group), in (N, G) order, to `save_mean`/`save_rstd`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    p: &GroupNormParams,
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [f32],
    save_mean: &mut [f32],
    save_rstd: &mut [f32],
) -> Result<()> {
    check_len("input", x.len(), p.len())?;
    check_len("output", y.len(), p.len())?;
    p.check_channel_vector("weight", gamma)?;
    p.check_channel_vector("bias", beta)?;
    check_len("save_mean", save_mean.len(), p.rows())?;
    check_len("save_rstd", save_rstd.len(), p.rows())?;
    let len = p.group_len();
    let count = len as f64;
    let eps = f64::from(p.eps);
    let stop = crate::parallel::stop_token();
    y.par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .zip(save_mean.par_iter_mut().zip(save_rstd.par_iter_mut()))
        .with_min_len(p.min_rows_per_task())
        .enumerate()
        .for_each(|(row, ((out, values), (mean_out, rstd_out)))| {
            if stop.is_set() {
                return;
            }
            // Sums shifted by a value of the row keep the variance exact for rows whose
            // mean is far from 0.
            let shift = values[0];
            let (s1, s2) = row_shifted_sums(values, shift);
            let mean_shifted = s1 / count;
            let var = (s2 / count - mean_shifted * mean_shifted).max(0.0);
            let mean = (f64::from(shift) + mean_shifted) as f32;
            let rstd = (1.0 / (var + eps).sqrt()) as f32;
            *mean_out = mean;
            *rstd_out = rstd;
            normalize_row(
                values,
                out,
                mean,
                rstd,
                p.group_slice(gamma, row),
                p.group_slice(beta, row),
                p.spatial,
            );
        });
    Ok(())
}

/// Gradients of [`forward`]: `grad_input`, and when given `grad_gamma`/`grad_beta` (C each).
///
/// With x̂ = (x - mean)·rstd and g = dy·gamma[c], per (sample, group) of L values:
/// grad_input = rstd·(g - mean(g) - x̂·mean(g·x̂)); grad_gamma[c] = Σ dy·x̂,
/// grad_beta[c] = Σ dy over the samples and the channel's values.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    p: &GroupNormParams,
    grad_output: &[f32],
    x: &[f32],
    gamma: Option<&[f32]>,
    save_mean: &[f32],
    save_rstd: &[f32],
    grad_input: &mut [f32],
    grad_gamma: Option<&mut [f32]>,
    grad_beta: Option<&mut [f32]>,
) -> Result<()> {
    check_len("grad_output", grad_output.len(), p.len())?;
    check_len("input", x.len(), p.len())?;
    check_len("grad_input", grad_input.len(), p.len())?;
    p.check_channel_vector("weight", gamma)?;
    check_len("mean", save_mean.len(), p.rows())?;
    check_len("rstd", save_rstd.len(), p.rows())?;
    if let Some(gg) = &grad_gamma {
        check_len("grad_weight", gg.len(), p.channels)?;
    }
    if let Some(gb) = &grad_beta {
        check_len("grad_bias", gb.len(), p.channels)?;
    }
    let len = p.group_len();
    let cpg = p.group_channels();
    // (Σ dy, Σ dy·(x - mean)) of every (sample, channel), in (N, C) order.
    let mut channel_sums = vec![(0.0f64, 0.0f64); p.batch * p.channels];
    let stop = crate::parallel::stop_token();
    channel_sums
        .par_chunks_mut(cpg)
        .zip(grad_output.par_chunks(len).zip(x.par_chunks(len)))
        .with_min_len(p.min_rows_per_task())
        .enumerate()
        .for_each(|(row, (sums, (g, values)))| {
            if stop.is_set() {
                return;
            }
            row_channel_grad_sums(g, values, save_mean[row], p.spatial, sums);
        });
    let count = len as f64;
    let mut gamma_rstd = vec![0.0f32; p.batch * p.channels];
    gamma_rstd
        .par_chunks_mut(cpg)
        .zip(grad_input.par_chunks_mut(len))
        .zip(grad_output.par_chunks(len).zip(x.par_chunks(len)))
        .with_min_len(p.min_rows_per_task())
        .enumerate()
        .for_each(|(row, ((a, out), (g, values)))| {
            if stop.is_set() {
                return;
            }
            let rstd = f64::from(save_rstd[row]);
            let group_gamma = p.group_slice(gamma, row);
            // Σ g and Σ g·(x - mean) over the row, channel by channel in order.
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for (c, &(a_sum, b_sum)) in channel_sums[row * cpg..(row + 1) * cpg].iter().enumerate()
            {
                let k = f64::from(group_gamma.map_or(1.0, |gm| gm[c]));
                sg += k * a_sum;
                sgx += k * b_sum;
                a[c] = (k * rstd) as f32;
            }
            let b = -rstd * rstd * rstd * sgx / count;
            let c0 = -rstd * sg / count;
            let coefficients = RowGrad {
                mean: save_mean[row],
                b: b as f32,
                c0: c0 as f32,
            };
            row_grad_input(g, values, out, a, p.spatial, coefficients);
        });
    if grad_gamma.is_none() && grad_beta.is_none() {
        return Ok(());
    }
    // Per channel, the samples in order: the same sums at any thread count.
    let per_channel: Vec<(f64, f64)> = (0..p.channels)
        .map(|c| {
            let g = c / cpg;
            (0..p.batch).fold((0.0f64, 0.0f64), |(sb, sw), n| {
                let (a_sum, b_sum) = channel_sums[n * p.channels + c];
                let rstd = f64::from(save_rstd[n * p.groups + g]);
                (sb + a_sum, sw + b_sum * rstd)
            })
        })
        .collect();
    if let Some(gg) = grad_gamma {
        for (out, &(_, w)) in gg.iter_mut().zip(&per_channel) {
            *out = w as f32;
        }
    }
    if let Some(gb) = grad_beta {
        for (out, &(b, _)) in gb.iter_mut().zip(&per_channel) {
            *out = b as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_has_zero_mean_unit_variance() {
        let p = GroupNormParams::new(&[2, 6, 5, 7], 3, 0.0).unwrap();
        let x: Vec<f32> = (0..p.len()).map(|i| (i * i % 13) as f32 + 50.0).collect();
        let (mut y, mut mean, mut rstd) = (vec![0.0; p.len()], vec![0.0; 6], vec![0.0; 6]);
        forward(&p, &x, None, None, &mut y, &mut mean, &mut rstd).unwrap();
        for row in y.chunks(p.group_len()) {
            let n = row.len() as f64;
            let m = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let v = row.iter().map(|&a| (f64::from(a) - m).powi(2)).sum::<f64>() / n;
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4, "{m} {v}");
        }
    }

    #[test]
    fn groups_must_divide_the_channels() {
        for groups in [0, -1, 4] {
            let err = GroupNormParams::new(&[2, 6, 3], groups, 1e-5);
            assert!(matches!(
                err,
                Err(Error::Invalid {
                    arg: "num_groups",
                    ..
                })
            ));
        }
    }
}
