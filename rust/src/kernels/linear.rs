//! Dense layer y = x·Wᵀ + b (PyTorch's weight layout: out_features × in_features).
//!
//! Rows of the batch (and, for the weight gradient, rows of W) are split into blocks of a
//! size fixed by the problem; each block is one GEMM with the whole reduction inside it
//! (the forward takes a thread's blocks in one GEMM where the `gemm` crate computes each
//! output alike either way), so results do not depend on the thread count.

use rayon::prelude::*;

use super::activation::{self, Activation};
use super::batch_norm;
use super::gemm::{sgemm, MatRef};
use super::multiply_add;
use crate::error::{check_len, checked_size, Error, Result};
use crate::parallel::chunk_len;

/// Shapes of a dense layer, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearParams {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// Rows per block: at least 16, at most 16 blocks.
fn row_block(rows: usize) -> usize {
    chunk_len(rows, 16, 16)
}

/// Whether the forward's product for `rows` rows of the batch takes the `gemm` crate's
/// general path, where each output is the same sum, in the same order,
/// whatever the number of rows: the crate computes the transposed product (`long` ×
/// `rows`, depth `depth`), and with more than 64 of its rows its depth blocking depends
/// on the depth alone. The other paths (at most 16×16 outputs; a depth of at most 2; one
/// row, a matrix-vector product; both sides at most 64) sum in an order of their own, so
/// a block that takes one keeps its own product.
fn general_path(long: usize, rows: usize, depth: usize) -> bool {
    long > 64 && depth > 2 && rows >= 2 && rows * long > 16 * 16
}

/// The forward's split into row blocks: jobs of consecutive blocks, one job per thread;
/// a job whose blocks all take the general path ([`general_path`]) is one product, so
/// that the weight is packed once for its rows rather than once per block. 64×1568→128
/// ran 1.4x faster at 1 thread and 1.3x at 2 with 32 rows a product instead of 16, and
/// 1.3x faster again at 1 thread with all 64 rows in one product (AMD EPYC with
/// AVX-512). A block gives the same bits in any job, so the split by threads changes no
/// value. (The backward's products gained nothing from merged blocks.)
#[derive(Clone, Copy)]
struct RowJobs {
    /// Rows of a block.
    rows: usize,
    /// Rows of a job: whole blocks.
    job: usize,
}

impl RowJobs {
    fn new(total: usize) -> Self {
        let rows = row_block(total);
        let blocks = total.div_ceil(rows);
        RowJobs {
            rows,
            job: blocks.div_ceil(rayon::current_num_threads().max(1)) * rows,
        }
    }

    /// Run `product(first_row, rows)` over a job of `job_rows` rows of `p`'s batch: once
    /// for the whole job when each of its blocks takes the general path, else once per
    /// block.
    fn run(&self, p: &LinearParams, job_rows: usize, mut product: impl FnMut(usize, usize)) {
        let blocks = (0..job_rows).step_by(self.rows);
        let general = |rows| general_path(p.out_features, rows, p.in_features);
        if blocks.clone().all(|b| general(self.rows.min(job_rows - b))) {
            product(0, job_rows);
        } else {
            for b in blocks {
                product(b, self.rows.min(job_rows - b));
            }
        }
    }
}

impl LinearParams {
    /// Validate an input (N, in_features) against a weight (out_features, in_features).
    pub fn new(input_shape: &[usize], weight_shape: &[usize]) -> Result<Self> {
        if input_shape.len() != 2 {
            return Err(Error::invalid(
                "input",
                format!("a {}-D array {input_shape:?}", input_shape.len()),
                "a 2-D (N, in_features) array",
            ));
        }
        if weight_shape.len() != 2 {
            return Err(Error::invalid(
                "weight",
                format!("a {}-D array {weight_shape:?}", weight_shape.len()),
                "a 2-D (out_features, in_features) array",
            ));
        }
        super::nonzero("input", input_shape)?;
        super::nonzero("weight", weight_shape)?;
        if weight_shape[1] != input_shape[1] {
            return Err(Error::invalid(
                "weight",
                format!("{} in_features (shape {weight_shape:?})", weight_shape[1]),
                format!(
                    "{} in_features, as input has (shape {input_shape:?})",
                    input_shape[1]
                ),
            ));
        }
        checked_size("output", &[input_shape[0], weight_shape[0]])?;
        Ok(LinearParams {
            batch: input_shape[0],
            in_features: input_shape[1],
            out_features: weight_shape[0],
        })
    }

    fn check(&self, input: usize, weight: usize, output: usize) -> Result<()> {
        check_len("input", input, self.batch * self.in_features)?;
        check_len("weight", weight, self.out_features * self.in_features)?;
        check_len("output", output, self.batch * self.out_features)
    }
}

/// `output = input · weightᵀ + bias`.
pub fn forward(
    p: &LinearParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
) -> Result<()> {
    forward_fused(p, input, weight, bias, None, None, output)
}

/// A batch norm in evaluation applied to a dense layer's output, feature by feature:
/// `(y - mean)·scale + shift` (the coefficients of
/// [`crate::kernels::batch_norm::eval_coefficients`]).
#[derive(Clone, Copy)]
pub struct EvalNorm<'a> {
    pub mean: &'a [f32],
    pub scale: &'a [f32],
    pub shift: &'a [f32],
}

/// The coefficients of a batch norm in evaluation after a dense layer's `rows` × `features`
/// output, as the norm's evaluation forward computes them from its weight (`gamma`),
/// bias (`beta`), running statistics and eps (its errors for `rows` or `eps`): what
/// [`EvalNorm`] borrows.
pub struct EvalNormCoefficients<'a> {
    mean: &'a [f32],
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl<'a> EvalNormCoefficients<'a> {
    pub fn new(
        rows: usize,
        features: usize,
        gamma: Option<&[f32]>,
        beta: Option<&[f32]>,
        running_mean: &'a [f32],
        running_var: &[f32],
        eps: f32,
    ) -> Result<Self> {
        let p = batch_norm::BatchNormParams::new(&[rows, features], eps)?;
        p.check_channel_vector("norm weight", gamma)?;
        p.check_channel_vector("norm bias", beta)?;
        check_len("running_mean", running_mean.len(), features)?;
        check_len("running_var", running_var.len(), features)?;
        let mut invstd = vec![0.0f32; features];
        let (scale, shift) =
            batch_norm::eval_coefficients(&p, gamma, beta, running_var, &mut invstd);
        Ok(EvalNormCoefficients {
            mean: running_mean,
            scale,
            shift,
        })
    }

    /// The norm [`forward_fused`] applies.
    pub fn norm(&self) -> EvalNorm<'_> {
        EvalNorm {
            mean: self.mean,
            scale: &self.scale,
            shift: &self.shift,
        }
    }
}

/// [`forward`] with `norm`, then `activation`, applied to each block of rows as soon as
/// its GEMM ends, while the block is in cache: the same bits as the batch norm's
/// evaluation forward and the activation applied afterwards.
pub fn forward_fused(
    p: &LinearParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    norm: Option<EvalNorm<'_>>,
    activation: Option<Activation>,
    output: &mut [f32],
) -> Result<()> {
    p.check(input.len(), weight.len(), output.len())?;
    if let Some(b) = bias {
        check_len("bias", b.len(), p.out_features)?;
    }
    if let Some(n) = norm {
        check_len("running_mean", n.mean.len(), p.out_features)?;
        check_len("norm scale", n.scale.len(), p.out_features)?;
        check_len("norm shift", n.shift.len(), p.out_features)?;
    }
    let stop = crate::parallel::stop_token();
    let (in_f, out_f) = (p.in_features, p.out_features);
    if few_rows(p) {
        fill_rows(output, bias);
        few_rows_product(p, input, weight, bias.is_some(), output, &stop);
        if !stop.is_set() {
            finish_rows(output, norm, activation);
        }
        return Ok(());
    }
    let jobs = RowJobs::new(p.batch);
    output
        .par_chunks_mut(jobs.job * out_f)
        .zip(input.par_chunks(jobs.job * in_f))
        .for_each(|(out, x)| {
            if stop.is_set() {
                return;
            }
            fill_rows(out, bias);
            jobs.run(p, x.len() / in_f, |first, rows| {
                let x = &x[first * in_f..(first + rows) * in_f];
                let out = &mut out[first * out_f..(first + rows) * out_f];
                product(p, x, weight, bias.is_some(), out, &stop);
            });
            finish_rows(out, norm, activation);
        });
    Ok(())
}

/// Each row of `out` set to `bias`, the products' start (left as it is without one).
fn fill_rows(out: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(b.len()) {
            row.copy_from_slice(b);
        }
    }
}

/// `norm`, then `activation`, applied to the rows of `out`.
fn finish_rows(out: &mut [f32], norm: Option<EvalNorm<'_>>, activation: Option<Activation>) {
    if let Some(n) = norm {
        batch_norm::rows_normalise_in_place(out, n.mean, n.scale, n.shift);
    }
    if let Some(act) = activation {
        activation::apply_in_place(act, out);
    }
}

/// `out (+)= x · weightᵀ` for the rows of `x`.
fn product(
    p: &LinearParams,
    x: &[f32],
    weight: &[f32],
    accumulate: bool,
    out: &mut [f32],
    stop: &crate::parallel::StopToken,
) {
    sgemm(
        x.len() / p.in_features,
        p.out_features,
        p.in_features,
        out,
        p.out_features,
        accumulate,
        MatRef::rows(x, p.in_features),
        MatRef::transposed(weight, p.in_features),
        stop,
    );
}

/// Batches of at most this many rows take [`few_rows_product`].
const FEW_ROWS: usize = 16;

/// Whether the forward of `p` takes [`few_rows_product`]: a batch of at most
/// [`FEW_ROWS`] rows, and a weight of at least [`FEW_ROWS_WEIGHT`] values in rows of at
/// least 4 vectors of [`LANES`]. Against the GEMM at 1 thread (CPU time, in one process,
/// AMD EPYC with AVX2 only): 1568→128 batch 1 1.13x, 2 1.11x, 8 1.75x, 16 1.14x;
/// 512→256 batch 2 3.7x, 8 1.6x; 1000→1000 4.2x, 1.65x. Smaller layers keep the GEMM,
/// which packs little and was faster: 300→128 0.62x at batch 2, 128→10 0.83x at 8.
fn few_rows(p: &LinearParams) -> bool {
    p.batch <= FEW_ROWS
        && p.in_features >= 4 * LANES
        && p.in_features * p.out_features >= FEW_ROWS_WEIGHT
}

/// The smallest weight (values) of [`few_rows`]: 256 KB.
const FEW_ROWS_WEIGHT: usize = 1 << 16;

/// Lanes of the dot products' accumulators, whatever the level (two registers with AVX2),
/// so that their sums, and so the bits, do not depend on it.
const LANES: usize = 16;

/// Output features of a tile of [`few_rows_product`] (by two rows: 6 accumulators of
/// 16 lanes, 12 of AVX2's 16 registers).
const OUT_TILE: usize = 3;

/// Output features per parallel job of [`few_rows_product`]: at least 24, at most 16
/// jobs. Each output is one job's, so the split changes no value.
fn feature_block(out_features: usize) -> usize {
    chunk_len(out_features, 8 * OUT_TILE, 16).next_multiple_of(OUT_TILE)
}

/// `out (+)= x · weightᵀ` for a batch of few rows, without the GEMM: the GEMM packs the
/// whole weight at every call (800 KB for LeNet's 1568→128 layer) and splits the work
/// by rows, so one thread ran a batch of 8 alone. Here each output feature's weight row
/// is read once for all the rows, straight from the weight's own layout (PyTorch's
/// out × in: one output's weights are contiguous), jobs of output features run in
/// parallel, and each output is a dot product summed in [`LANES`] lanes, the lanes
/// added in a fixed tree, then the last `in_features % LANES` terms in order: the same
/// bits at any thread count (the portable level multiplies and adds separately).
fn few_rows_product(
    p: &LinearParams,
    x: &[f32],
    weight: &[f32],
    accumulate: bool,
    out: &mut [f32],
    stop: &crate::parallel::StopToken,
) {
    let (in_f, out_f, rows) = (p.in_features, p.out_features, p.batch);
    let block = feature_block(out_f);
    // The sums feature by feature (`[feature][row]`), then added to `out` row by row.
    let mut sums = vec![0.0f32; out_f * rows];
    sums.par_chunks_mut(block * rows)
        .zip(weight.par_chunks(block * in_f))
        .for_each(|(sums, w)| {
            if stop.is_set() {
                return;
            }
            dot_rows(x, w, in_f, rows, sums);
        });
    for (r, row) in out.chunks_exact_mut(out_f).enumerate() {
        for (o, value) in row.iter_mut().enumerate() {
            let sum = sums[o * rows + r];
            *value = if accumulate { *value + sum } else { sum };
        }
    }
}

crate::simd_dispatch! {
    /// The dot products of each of `rows` rows of `x` with each weight row of `w` (rows
    /// of `in_f`) into `sums` (`[weight row][row]`), in tiles of two rows by
    /// [`OUT_TILE`] weight rows.
    fn dot_rows(x: &[f32], w: &[f32], in_f: usize, rows: usize, sums: &mut [f32]) {
        let fused = crate::simd::level() != crate::simd::Level::Scalar;
        if fused {
            dot_tiles::<true>(x, w, in_f, rows, sums);
        } else {
            dot_tiles::<false>(x, w, in_f, rows, sums);
        }
    }
}

#[inline(always)]
fn dot_tiles<const FUSED: bool>(x: &[f32], w: &[f32], in_f: usize, rows: usize, sums: &mut [f32]) {
    let features = w.len() / in_f;
    let x_row = |r: usize| &x[r * in_f..(r + 1) * in_f];
    let w_row = |o: usize| &w[o * in_f..(o + 1) * in_f];
    let mut o = 0;
    while o < features {
        // Whole tiles of features, then the last ones one at a time.
        let tile = if features - o >= OUT_TILE {
            OUT_TILE
        } else {
            1
        };
        let mut r = 0;
        while r < rows {
            let pair = 2.min(rows - r);
            macro_rules! tile {
                ($rt:literal, $ot:expr) => {{
                    let values = dot_tile::<$rt, $ot, FUSED>(
                        std::array::from_fn(|i| x_row(r + i)),
                        std::array::from_fn(|j| w_row(o + j)),
                    );
                    for (j, column) in values.iter().enumerate() {
                        sums[(o + j) * rows + r..][..$rt].copy_from_slice(column);
                    }
                }};
            }
            match (pair, tile) {
                (2, OUT_TILE) => tile!(2, OUT_TILE),
                (1, OUT_TILE) => tile!(1, OUT_TILE),
                (2, _) => tile!(2, 1),
                _ => tile!(1, 1),
            }
            r += pair;
        }
        o += tile;
    }
}

/// The `RT × OT` dot products of rows `x` with weight rows `w` (all of one length), as
/// `[weight row][row]`: [`few_rows_product`]'s order.
#[inline(always)]
fn dot_tile<const RT: usize, const OT: usize, const FUSED: bool>(
    x: [&[f32]; RT],
    w: [&[f32]; OT],
) -> [[f32; RT]; OT] {
    let n = x[0].len();
    let full = n - n % LANES;
    let mut acc = [[[0.0f32; LANES]; RT]; OT];
    let mut k = 0;
    while k < full {
        let mut xv = [[0.0f32; LANES]; RT];
        unroll!(i < RT => {
            xv[i] = x[i][k..k + LANES].try_into().expect("a vector");
        });
        unroll!(j < OT => {
            let wv: &[f32; LANES] = w[j][k..k + LANES].try_into().expect("a vector");
            unroll!(i < RT => {
                for ((a, &xl), &wl) in acc[j][i].iter_mut().zip(&xv[i]).zip(wv) {
                    *a = multiply_add::<FUSED>(xl, wl, *a);
                }
            });
        });
        k += LANES;
    }
    let mut sums = [[0.0f32; RT]; OT];
    for (j, (sums_j, acc_j)) in sums.iter_mut().zip(&acc).enumerate() {
        for (i, (sum, lanes)) in sums_j.iter_mut().zip(acc_j).enumerate() {
            let mut lanes = *lanes;
            let mut half = LANES / 2;
            while half > 0 {
                for l in 0..half {
                    lanes[l] += lanes[l + half];
                }
                half /= 2;
            }
            *sum = lanes[0];
            for k in full..n {
                *sum = multiply_add::<FUSED>(x[i][k], w[j][k], *sum);
            }
        }
    }
    sums
}

/// Gradients of [`forward`]: `grad_input` (if given), `grad_weight`, `grad_bias` (if given).
pub fn backward(
    p: &LinearParams,
    grad_output: &[f32],
    input: &[f32],
    weight: &[f32],
    grad_input: Option<&mut [f32]>,
    grad_weight: &mut [f32],
    grad_bias: Option<&mut [f32]>,
) -> Result<()> {
    p.check(input.len(), weight.len(), grad_output.len())?;
    check_len("grad_weight", grad_weight.len(), weight.len())?;
    let stop = crate::parallel::stop_token();
    if let Some(gx) = grad_input {
        check_len("grad_input", gx.len(), input.len())?;
        let rows = row_block(p.batch);
        gx.par_chunks_mut(rows * p.in_features)
            .zip(grad_output.par_chunks(rows * p.out_features))
            .for_each(|(gx, gy)| {
                if stop.is_set() {
                    return;
                }
                let m = gy.len() / p.out_features;
                sgemm(
                    m,
                    p.in_features,
                    p.out_features,
                    gx,
                    p.in_features,
                    false,
                    MatRef::rows(gy, p.out_features),
                    MatRef::rows(weight, p.in_features),
                    &stop,
                );
            });
    }
    // grad_weight rows (one per output feature) in blocks: gyᵀ · x over the whole batch.
    let rows = row_block(p.out_features);
    grad_weight
        .par_chunks_mut(rows * p.in_features)
        .enumerate()
        .for_each(|(blk, gw)| {
            if stop.is_set() {
                return;
            }
            let m = gw.len() / p.in_features;
            let first = blk * rows;
            sgemm(
                m,
                p.in_features,
                p.batch,
                gw,
                p.in_features,
                false,
                MatRef::transposed(&grad_output[first..], p.out_features),
                MatRef::rows(input, p.in_features),
                &stop,
            );
        });
    if let Some(gb) = grad_bias {
        check_len("grad_bias", gb.len(), p.out_features)?;
        gb.fill(0.0);
        for row in grad_output.chunks_exact(p.out_features) {
            for (b, &g) in gb.iter_mut().zip(row) {
                *b += g;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values with varied exponents and signs, so that a change of summation order shows.
    fn values(n: usize, salt: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = (i ^ salt).wrapping_mul(0x9E37_79B9).rotate_left(13);
                let v = (h % 2001) as f32 / 1000.0 - 1.0;
                v * [1.0, 1e-3, 37.0][(h % 3) as usize]
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// (batch, in_features, out_features).
    const SHAPES: [(usize, usize, usize); 12] = [
        (64, 1568, 128),
        (100, 37, 65),
        (33, 7, 200),
        (17, 300, 70),
        (2, 50, 128),
        (35, 50, 100),
        (1000, 3, 80),
        (64, 1568, 10),
        (130, 5, 65),
        (49, 2, 128),
        (65, 20, 300),
        (160, 70, 66),
    ];

    /// A layer of the shape and its input, weight and bias (values from salts 1, 2, 3).
    fn layer(batch: usize, in_f: usize, out_f: usize) -> (LinearParams, [Vec<f32>; 3]) {
        let p = LinearParams {
            batch,
            in_features: in_f,
            out_features: out_f,
        };
        let xwb = [
            values(batch * in_f, 1),
            values(out_f * in_f, 2),
            values(out_f, 3),
        ];
        (p, xwb)
    }

    /// The three products of each shape at `threads` threads: forward, input and weight
    /// gradients.
    fn products(threads: usize, batch: usize, in_f: usize, out_f: usize) -> [Vec<f32>; 3] {
        let (p, [x, w, b]) = layer(batch, in_f, out_f);
        let gy = values(batch * out_f, 4);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut y = vec![f32::NAN; batch * out_f];
            forward(&p, &x, &w, Some(&b), &mut y).unwrap();
            let (mut gx, mut gw) = (vec![f32::NAN; x.len()], vec![f32::NAN; w.len()]);
            backward(&p, &gy, &x, &w, Some(&mut gx), &mut gw, None).unwrap();
            [y, gx, gw]
        })
    }

    /// The same products, one per block of `row_block` rows, each block computed alone.
    fn per_block(batch: usize, in_f: usize, out_f: usize) -> [Vec<f32>; 3] {
        let stop = crate::parallel::stop_token();
        let (_, [x, w, b]) = layer(batch, in_f, out_f);
        let gy = values(batch * out_f, 4);
        let mut y = vec![f32::NAN; batch * out_f];
        let rows = row_block(batch);
        for (first, out) in (0..batch).step_by(rows).zip(y.chunks_mut(rows * out_f)) {
            let m = out.len() / out_f;
            for row in out.chunks_exact_mut(out_f) {
                row.copy_from_slice(&b);
            }
            let x = MatRef::rows(&x[first * in_f..], in_f);
            sgemm(
                m,
                out_f,
                in_f,
                out,
                out_f,
                true,
                x,
                MatRef::transposed(&w, in_f),
                &stop,
            );
        }
        let mut gx = vec![f32::NAN; batch * in_f];
        for (first, gx) in (0..batch).step_by(rows).zip(gx.chunks_mut(rows * in_f)) {
            let m = gx.len() / in_f;
            let gy = MatRef::rows(&gy[first * out_f..], out_f);
            sgemm(
                m,
                in_f,
                out_f,
                gx,
                in_f,
                false,
                gy,
                MatRef::rows(&w, in_f),
                &stop,
            );
        }
        let mut gw = vec![f32::NAN; out_f * in_f];
        let rows = row_block(out_f);
        for (first, gw) in (0..out_f).step_by(rows).zip(gw.chunks_mut(rows * in_f)) {
            let m = gw.len() / in_f;
            let gy = MatRef::transposed(&gy[first..], out_f);
            sgemm(
                m,
                in_f,
                batch,
                gw,
                in_f,
                false,
                gy,
                MatRef::rows(&x, in_f),
                &stop,
            );
        }
        [y, gx, gw]
    }

    #[test]
    fn products_give_the_bits_of_one_product_per_row_block_at_any_thread_count() {
        let mut merged = 0;
        for (batch, in_f, out_f) in SHAPES {
            let want = per_block(batch, in_f, out_f);
            for threads in [1, 2, 3, 5] {
                let got = products(threads, batch, in_f, out_f);
                for (k, name) in ["output", "grad_input", "grad_weight"].iter().enumerate() {
                    assert!(
                        bits(&got[k]) == bits(&want[k]),
                        "{batch}x{in_f}->{out_f}, {threads} threads: {name} differs"
                    );
                }
            }
            // Forwards that merge blocks at one thread.
            let rows = row_block(batch);
            merged += usize::from(batch > rows && general_path(out_f, rows, in_f));
        }
        assert!(merged >= 4, "only {merged} shapes merge blocks");
    }

    #[test]
    fn a_batch_norm_and_activation_in_the_kernel_give_the_bits_of_the_layers() {
        use crate::kernels::batch_norm::{eval_coefficients, forward_eval, BatchNormParams};
        let act = Activation::from_name("leaky_relu", 0.1).unwrap();
        for (batch, in_f, out_f) in [(1, 37, 65), (700, 300, 33), (64, 1568, 128), (8, 1568, 128)] {
            let (p, [x, w, b]) = layer(batch, in_f, out_f);
            let (gamma, beta, mean) = (values(out_f, 5), values(out_f, 6), values(out_f, 7));
            let var: Vec<f32> = values(out_f, 8).iter().map(|v| v.abs() + 0.1).collect();
            let np = BatchNormParams::new(&[batch, out_f], 1e-3).unwrap();
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let (fused, layers) = pool.install(|| {
                    let mut invstd = vec![0.0f32; out_f];
                    let (scale, shift) =
                        eval_coefficients(&np, Some(&gamma), Some(&beta), &var, &mut invstd);
                    let norm = EvalNorm {
                        mean: &mean,
                        scale: &scale,
                        shift: &shift,
                    };
                    let mut fused = vec![f32::NAN; batch * out_f];
                    forward_fused(&p, &x, &w, Some(&b), Some(norm), Some(act), &mut fused).unwrap();
                    let mut y = vec![f32::NAN; batch * out_f];
                    forward(&p, &x, &w, Some(&b), &mut y).unwrap();
                    let mut layers = vec![f32::NAN; batch * out_f];
                    let (mut m, mut s) = (vec![0.0f32; out_f], vec![0.0f32; out_f]);
                    forward_eval(
                        &np,
                        &y,
                        Some(&gamma),
                        Some(&beta),
                        &mean,
                        &var,
                        &mut layers,
                        &mut m,
                        &mut s,
                    )
                    .unwrap();
                    activation::apply_in_place(act, &mut layers);
                    (fused, layers)
                });
                assert!(
                    bits(&fused) == bits(&layers),
                    "{batch}x{in_f}->{out_f}, {threads} threads"
                );
            }
        }
    }

    /// [`few_rows_product`]'s documented order, written out value by value: each output
    /// a dot product in 16 lanes (lane `l` takes terms `l`, `l + 16`, ...), the lanes
    /// added by halves, then the last terms in order, then added to the bias.
    fn few_rows_by_hand(x: &[f32], w: &[f32], b: &[f32], in_f: usize, fused: bool) -> Vec<f32> {
        let fma = |a: f32, c: f32, acc: f32| {
            if fused {
                a.mul_add(c, acc)
            } else {
                acc + a * c
            }
        };
        let full = in_f - in_f % 16;
        let mut out = Vec::new();
        for xr in x.chunks_exact(in_f) {
            for (wr, &bias) in w.chunks_exact(in_f).zip(b) {
                let mut lanes = [0.0f32; 16];
                for k in 0..full {
                    lanes[k % 16] = fma(xr[k], wr[k], lanes[k % 16]);
                }
                for half in [8, 4, 2, 1] {
                    for l in 0..half {
                        lanes[l] += lanes[l + half];
                    }
                }
                let mut sum = lanes[0];
                for k in full..in_f {
                    sum = fma(xr[k], wr[k], sum);
                }
                out.push(bias + sum);
            }
        }
        out
    }

    #[test]
    fn few_rows_give_the_documented_sums_at_any_thread_count() {
        let fused = crate::simd::level() != crate::simd::Level::Scalar;
        for (batch, in_f, out_f) in [(1, 1568, 128), (3, 333, 197), (16, 1000, 70), (2, 64, 1024)] {
            let (p, [x, w, b]) = layer(batch, in_f, out_f);
            assert!(few_rows(&p), "{batch}x{in_f}->{out_f}");
            let want = few_rows_by_hand(&x, &w, &b, in_f, fused);
            // Against float64: the order's rounding only.
            for (o, &got) in want.iter().enumerate() {
                let (r, f) = (o / out_f, o % out_f);
                let xr = &x[r * in_f..(r + 1) * in_f];
                let wr = &w[f * in_f..(f + 1) * in_f];
                let exact: f64 = b[f] as f64
                    + xr.iter()
                        .zip(wr)
                        .map(|(&a, &c)| a as f64 * c as f64)
                        .sum::<f64>();
                let scale: f64 = b[f].abs() as f64
                    + xr.iter()
                        .zip(wr)
                        .map(|(&a, &c)| (a as f64 * c as f64).abs())
                        .sum::<f64>();
                assert!(
                    (got as f64 - exact).abs() <= 1e-5 * scale,
                    "{batch}x{in_f}->{out_f}"
                );
            }
            for threads in [1, 2, 3, 5] {
                let got = products(threads, batch, in_f, out_f);
                assert!(
                    bits(&got[0]) == bits(&want),
                    "{batch}x{in_f}->{out_f}, {threads} threads"
                );
            }
        }
        // Below the bounds: the GEMM.
        for (batch, in_f, out_f) in [(17, 1568, 128), (8, 300, 128), (8, 48, 4096)] {
            let (p, _) = layer(batch, in_f, out_f);
            assert!(!few_rows(&p), "{batch}x{in_f}->{out_f}");
        }
    }

    #[test]
    fn one_row_and_small_products_keep_their_own_path() {
        // One row: a matrix-vector product; 16×16 outputs or fewer: the crate's small
        // kernels; depth 2: its outer products.
        assert!(!general_path(300, 1, 100));
        assert!(!general_path(128, 2, 100));
        assert!(!general_path(128, 4, 2));
        assert!(!general_path(64, 16, 100));
        assert!(general_path(65, 4, 3));
    }
}
