//! Dense layer y = x·Wᵀ + b (PyTorch's weight layout: out_features × in_features).
//!
//! Rows of the batch (and, for the weight gradient, rows of W) are split into blocks of a
//! size fixed by the problem; each block is one GEMM with the whole reduction inside it,
//! so results do not depend on the thread count.

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
    output
        .par_chunks_mut(rows * p.out_features)
        .zip(input.par_chunks(rows * p.in_features))
        .for_each(|(out, x)| {
            if stop.is_set() {
                return;
            }
            let m = x.len() / p.in_features;
            if let Some(b) = bias {
                for row in out.chunks_exact_mut(p.out_features) {
                    row.copy_from_slice(b);
                }
            }
            sgemm(
                m,
                p.out_features,
                p.in_features,
                out,
                p.out_features,
                bias.is_some(),
                MatRef::rows(x, p.in_features),
                MatRef::transposed(weight, p.in_features),
                &stop,
            );
            if let Some(act) = activation {
                activation::apply_in_place(act, out);
            }
        });
    Ok(())
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
