//! Dense layer y = x·Wᵀ + b (PyTorch's weight layout: out_features × in_features).
//!
//! Rows of the batch (and, for the weight gradient, rows of W) are split into blocks of a
//! size fixed by the problem; each block is one GEMM with the whole reduction inside it
//! (the forward takes two blocks in one GEMM where the `gemm` crate computes each output
//! alike either way), so results do not depend on the thread count.

use rayon::prelude::*;

use super::activation::{self, Activation};
use super::gemm::{sgemm, MatRef};
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

/// Row blocks per parallel job of the forward. A job whose blocks all take the `gemm`
/// crate's general path ([`general_path`]) is one product, so that the weight is packed
/// once for its rows rather than once per block: 64×1568→128 ran 1.4x faster at 1
/// thread, 1.3x at 2 (AMD EPYC with AVX-512, 32 rows a product instead of 16).
const FORWARD_JOB_BLOCKS: usize = 2;

/// Whether the forward's product for `rows` rows takes the `gemm` crate's general path,
/// where each output is the same sum, in the same order, whatever the number of rows: the
/// crate computes the transposed product (out_features × rows, depth in_features), and
/// with more than 64 of its rows its depth blocking depends on the depth alone. The
/// other paths (at most 16×16 outputs, which includes one row; a depth of at most 2; both
/// sides at most 64) sum in an order of their own, so a block that takes one keeps its
/// own product.
fn general_path(p: &LinearParams, rows: usize) -> bool {
    p.out_features > 64 && p.in_features > 2 && rows * p.out_features > 16 * 16
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
    forward_fused(p, input, weight, bias, None, output)
}

/// [`forward`] with `activation` applied to each block of rows as soon as its GEMM ends,
/// while the block is in cache: the same bits as the activation applied afterwards.
pub fn forward_fused(
    p: &LinearParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    activation: Option<Activation>,
    output: &mut [f32],
) -> Result<()> {
    p.check(input.len(), weight.len(), output.len())?;
    if let Some(b) = bias {
        check_len("bias", b.len(), p.out_features)?;
    }
    let stop = crate::parallel::stop_token();
    let rows = row_block(p.batch);
    let job = FORWARD_JOB_BLOCKS * rows;
    output
        .par_chunks_mut(job * p.out_features)
        .zip(input.par_chunks(job * p.in_features))
        .for_each(|(out, x)| {
            if stop.is_set() {
                return;
            }
            if let Some(b) = bias {
                for row in out.chunks_exact_mut(p.out_features) {
                    row.copy_from_slice(b);
                }
            }
            let blocks = x.chunks(rows * p.in_features);
            if blocks
                .clone()
                .all(|x| general_path(p, x.len() / p.in_features))
            {
                product(p, x, weight, bias.is_some(), out, &stop);
            } else {
                let out_blocks = out.chunks_mut(rows * p.out_features);
                for (out, x) in out_blocks.zip(blocks) {
                    product(p, x, weight, bias.is_some(), out, &stop);
                }
            }
            if let Some(act) = activation {
                activation::apply_in_place(act, out);
            }
        });
    Ok(())
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

    #[test]
    fn forward_gives_the_bits_of_one_product_per_row_block() {
        let stop = crate::parallel::stop_token();
        let shapes = [
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
        ];
        let mut merged = 0;
        for (batch, in_features, out_features) in shapes {
            let p = LinearParams {
                batch,
                in_features,
                out_features,
            };
            let x = values(batch * in_features, 1);
            let w = values(out_features * in_features, 2);
            let b = values(out_features, 3);
            let mut got = vec![f32::NAN; batch * out_features];
            forward(&p, &x, &w, Some(&b), &mut got).unwrap();
            // One product per block of `row_block` rows, as each block was computed alone.
            let rows = row_block(batch);
            let mut want = vec![f32::NAN; batch * out_features];
            for (out, xb) in want
                .chunks_mut(rows * out_features)
                .zip(x.chunks(rows * in_features))
            {
                for row in out.chunks_exact_mut(out_features) {
                    row.copy_from_slice(&b);
                }
                product(&p, xb, &w, true, out, &stop);
            }
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();
            assert_eq!(
                differ, 0,
                "{batch}x{in_features}->{out_features}: values differ"
            );
            merged += usize::from(batch > rows && general_path(&p, rows));
        }
        assert!(merged >= 4, "only {merged} shapes merged blocks");
    }
}
