//! Log-softmax and cross-entropy over (N, C) logits.

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};

/// Shapes of a classification output, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassesParams {
    pub batch: usize,
    pub classes: usize,
}

impl ClassesParams {
    /// Validate (N, C) logits.
    pub fn new(shape: &[usize]) -> Result<Self> {
        Self::named("input", shape)
    }

    /// Validate an (N, C) array the Python API calls `name`.
    pub fn named(name: &'static str, shape: &[usize]) -> Result<Self> {
        if shape.len() != 2 {
            return Err(Error::invalid(
                name,
                format!("a {}-D array {shape:?}", shape.len()),
                "a 2-D (N, C) array of logits",
            ));
        }
        super::nonzero(name, shape)?;
        Ok(ClassesParams {
            batch: shape[0],
            classes: shape[1],
        })
    }

    fn check_target(&self, target: &[i64]) -> Result<()> {
        check_len("target", target.len(), self.batch)?;
        if let Some(&bad) = target
            .iter()
            .find(|&&t| t < 0 || t as usize >= self.classes)
        {
            return Err(Error::invalid(
                "target",
                format!("class index {bad}"),
                format!("class indices in [0, {})", self.classes),
            ));
        }
        Ok(())
    }
}

/// (max, log Σ exp(x - max)) of one row, in f64.
fn row_log_norm(row: &[f32]) -> (f32, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
    (max, total.ln())
}

/// out = log_softmax(x) row-wise.
pub fn log_softmax(p: &ClassesParams, x: &[f32], out: &mut [f32]) -> Result<()> {
    check_len("input", x.len(), p.batch * p.classes)?;
    check_len("output", out.len(), x.len())?;
    out.par_chunks_mut(p.classes)
        .zip(x.par_chunks(p.classes))
        .for_each(|(o, row)| {
            let (max, log_norm) = row_log_norm(row);
            for (ov, &v) in o.iter_mut().zip(row) {
                *ov = (f64::from(v - max) - log_norm) as f32;
            }
        });
    Ok(())
}

/// Gradient of log-softmax from its output y: g - exp(y)·Σg, row-wise.
pub fn log_softmax_backward(
    p: &ClassesParams,
    grad_output: &[f32],
    output: &[f32],
    grad_input: &mut [f32],
) -> Result<()> {
    check_len("grad_output", grad_output.len(), p.batch * p.classes)?;
    check_len("output", output.len(), grad_output.len())?;
    check_len("grad_input", grad_input.len(), grad_output.len())?;
    grad_input
        .par_chunks_mut(p.classes)
        .zip(
            grad_output
                .par_chunks(p.classes)
                .zip(output.par_chunks(p.classes)),
        )
        .for_each(|(gx, (g, y))| {
            let total: f64 = g.iter().map(|&v| f64::from(v)).sum();
            for ((o, &gv), &yv) in gx.iter_mut().zip(g).zip(y) {
                *o = (f64::from(gv) - f64::from(yv).exp() * total) as f32;
            }
        });
    Ok(())
}

/// Validate per-sample loss weights: N finite, non-negative values, not all zero.
/// Returns their sum, taken in row order (f64).
fn weight_total(p: &ClassesParams, weight: &[f64]) -> Result<f64> {
    check_len("weight", weight.len(), p.batch)?;
    if let Some(&bad) = weight.iter().find(|w| !w.is_finite() || **w < 0.0) {
        return Err(Error::invalid(
            "weight",
            format!("the value {bad}"),
            "finite, non-negative sample weights",
        ));
    }
    let total: f64 = weight.iter().sum();
    if total <= 0.0 {
        return Err(Error::invalid(
            "weight",
            "weights that are all zero",
            "at least one positive sample weight",
        ));
    }
    Ok(total)
}

/// Mean over the batch of -log_softmax(x)[n, target[n]], summed in row order; with
/// `weight`, the weighted mean Σ w_n·l_n / Σ w_n (scikit-learn's meaning: a weight of 2
/// counts as the row twice). Weights of 1 give the unweighted bits: every product and
/// both sums are then exact.
pub fn cross_entropy(
    p: &ClassesParams,
    x: &[f32],
    target: &[i64],
    weight: Option<&[f64]>,
) -> Result<f64> {
    check_len("input", x.len(), p.batch * p.classes)?;
    p.check_target(target)?;
    let total_weight = weight.map(|w| weight_total(p, w)).transpose()?;
    let losses: Vec<f64> = x
        .par_chunks(p.classes)
        .zip(target.par_iter())
        .map(|(row, &t)| {
            let (max, log_norm) = row_log_norm(row);
            log_norm - f64::from(row[t as usize] - max)
        })
        .collect();
    Ok(match (weight, total_weight) {
        (Some(w), Some(total)) => losses.iter().zip(w).map(|(l, w)| l * w).sum::<f64>() / total,
        _ => losses.iter().sum::<f64>() / p.batch as f64,
    })
}

/// Gradient of [`cross_entropy`] w.r.t. the logits: (softmax(x) - onehot(target)) / N,
/// or with `weight` row n scaled by w_n / Σ w instead of 1 / N.
pub fn cross_entropy_backward(
    p: &ClassesParams,
    x: &[f32],
    target: &[i64],
    weight: Option<&[f64]>,
    grad_input: &mut [f32],
) -> Result<()> {
    check_len("input", x.len(), p.batch * p.classes)?;
    check_len("grad_input", grad_input.len(), x.len())?;
    p.check_target(target)?;
    let total_weight = weight.map(|w| weight_total(p, w)).transpose()?;
    let inv_n = 1.0 / p.batch as f64;
    grad_input
        .par_chunks_mut(p.classes)
        .zip(x.par_chunks(p.classes).zip(target.par_iter()))
        .enumerate()
        .for_each(|(n, (g, (row, &t)))| {
            let scale = match (weight, total_weight) {
                (Some(w), Some(total)) => w[n] / total,
                _ => inv_n,
            };
            let (max, log_norm) = row_log_norm(row);
            for (j, (gv, &v)) in g.iter_mut().zip(row).enumerate() {
                let prob = (f64::from(v - max) - log_norm).exp();
                let onehot = if j == t as usize { 1.0 } else { 0.0 };
                *gv = ((prob - onehot) * scale) as f32;
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> (ClassesParams, Vec<f32>, Vec<i64>) {
        let p = ClassesParams::new(&[5, 3]).unwrap();
        let x: Vec<f32> = (0..15)
            .map(|i| ((i * 7) % 11) as f32 * 0.37 - 1.5)
            .collect();
        (p, x, vec![0, 2, 1, 1, 0])
    }

    #[test]
    fn weights_of_one_give_the_unweighted_bits() {
        let (p, x, t) = batch();
        let ones = [1.0; 5];
        let plain = cross_entropy(&p, &x, &t, None).unwrap();
        assert_eq!(
            cross_entropy(&p, &x, &t, Some(&ones)).unwrap().to_bits(),
            plain.to_bits()
        );
        let (mut g_plain, mut g_ones) = (vec![0.0; 15], vec![0.0; 15]);
        cross_entropy_backward(&p, &x, &t, None, &mut g_plain).unwrap();
        cross_entropy_backward(&p, &x, &t, Some(&ones), &mut g_ones).unwrap();
        assert_eq!(g_plain, g_ones);
    }

    #[test]
    fn an_integer_weight_is_the_row_repeated() {
        let (p, x, t) = batch();
        let weight = [2.0, 1.0, 0.0, 1.0, 1.0];
        let rows = [0usize, 0, 1, 3, 4];
        let xr: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * 3..r * 3 + 3].to_vec())
            .collect();
        let tr: Vec<i64> = rows.iter().map(|&r| t[r]).collect();
        let weighted = cross_entropy(&p, &x, &t, Some(&weight)).unwrap();
        let repeated = cross_entropy(&ClassesParams::new(&[5, 3]).unwrap(), &xr, &tr, None);
        assert!((weighted - repeated.unwrap()).abs() < 1e-12);
    }

    #[test]
    fn bad_weights_are_refused() {
        let (p, x, t) = batch();
        for weight in [
            vec![1.0; 4],
            vec![1.0, -1.0, 1.0, 1.0, 1.0],
            vec![1.0, f64::NAN, 1.0, 1.0, 1.0],
            vec![0.0; 5],
        ] {
            assert!(cross_entropy(&p, &x, &t, Some(&weight)).is_err());
            let mut grad = vec![0.0; 15];
            assert!(cross_entropy_backward(&p, &x, &t, Some(&weight), &mut grad).is_err());
        }
    }
}
