//! In-place optimizer updates with PyTorch's formulas (`torch.optim.SGD`, `Adam`, `AdamW`).

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};
use crate::parallel::elementwise_chunk;
use crate::simd_dispatch;

/// SGD hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub lr: f32,
    pub momentum: f32,
    pub dampening: f32,
    pub nesterov: bool,
    pub weight_decay: f32,
}

/// Adam / AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// AdamW: decay the parameter directly instead of adding it to the gradient.
    pub decoupled: bool,
}

fn finite_non_negative(arg: &'static str, v: f32) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(Error::invalid(arg, v, "a finite number >= 0"));
    }
    Ok(())
}

fn in_unit_interval(arg: &'static str, v: f32) -> Result<()> {
    if !(0.0..1.0).contains(&v) {
        return Err(Error::invalid(arg, v, "a number in [0, 1)"));
    }
    Ok(())
}

impl SgdConfig {
    pub fn validate(&self) -> Result<()> {
        finite_non_negative("lr", self.lr)?;
        finite_non_negative("momentum", self.momentum)?;
        finite_non_negative("weight_decay", self.weight_decay)?;
        if !self.dampening.is_finite() {
            return Err(Error::invalid(
                "dampening",
                self.dampening,
                "a finite number",
            ));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::invalid(
                "nesterov",
                "True",
                "momentum > 0 and dampening = 0 with nesterov",
            ));
        }
        Ok(())
    }
}

impl AdamConfig {
    pub fn validate(&self) -> Result<()> {
        finite_non_negative("lr", self.lr)?;
        in_unit_interval("beta1", self.beta1)?;
        in_unit_interval("beta2", self.beta2)?;
        finite_non_negative("eps", self.eps)?;
        finite_non_negative("weight_decay", self.weight_decay)
    }
}

simd_dispatch! {
    fn sgd_chunk(param: &mut [f32], grad: &[f32], buf: Option<&mut [f32]>, cfg: SgdConfig, first: bool) {
        match buf {
            None => {
                for (w, &g) in param.iter_mut().zip(grad) {
                    let d = g + cfg.weight_decay * *w;
                    *w -= cfg.lr * d;
                }
            }
            Some(buf) => {
                for ((w, &g), b) in param.iter_mut().zip(grad).zip(buf.iter_mut()) {
                    let d = g + cfg.weight_decay * *w;
                    *b = if first { d } else { cfg.momentum * *b + (1.0 - cfg.dampening) * d };
                    let step = if cfg.nesterov { d + cfg.momentum * *b } else { *b };
                    *w -= cfg.lr * step;
                }
            }
        }
    }
}

simd_dispatch! {
    fn adam_chunk(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], cfg: AdamConfig,
                  step_size: f32, bias2_sqrt: f32) {
        let decay = 1.0 - cfg.lr * cfg.weight_decay;
        for (((w, &g), mv), vv) in param.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = if cfg.decoupled {
                *w *= decay;
                g
            } else {
                g + cfg.weight_decay * *w
            };
            *mv += (g - *mv) * (1.0 - cfg.beta1);
            *vv = cfg.beta2 * *vv + (1.0 - cfg.beta2) * g * g;
            let denom = vv.sqrt() / bias2_sqrt + cfg.eps;
            *w -= step_size * (*mv / denom);
        }
    }
}

/// What [`sgd_step`] checks of its scalars before it changes anything: the
/// hyper-parameters, and a momentum buffer given when momentum is non-zero.
pub fn check_sgd(has_momentum_buffer: bool, cfg: SgdConfig) -> Result<()> {
    cfg.validate()?;
    if cfg.momentum != 0.0 && !has_momentum_buffer {
        return Err(Error::invalid(
            "momentum_buffer",
            "None",
            "a buffer when momentum != 0",
        ));
    }
    Ok(())
}

/// What [`adam_step`] checks of its scalars before it changes anything: the
/// hyper-parameters and a 1-based step.
pub fn check_adam(step: u64, cfg: AdamConfig) -> Result<()> {
    cfg.validate()?;
    if step == 0 {
        return Err(Error::invalid(
            "step",
            0,
            "the 1-based index of this step (>= 1)",
        ));
    }
    Ok(())
}

/// One parameter of a [`sgd_steps`] call: its values, gradient and momentum buffer.
pub struct SgdArrays<'a> {
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub momentum_buffer: Option<&'a mut [f32]>,
    pub cfg: SgdConfig,
    pub first_step: bool,
}

/// One parameter of an [`adam_steps`] call: its values, gradient and moments.
pub struct AdamArrays<'a> {
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    pub step: u64,
    pub cfg: AdamConfig,
}

/// One SGD step on `param`; `momentum_buffer` is required when momentum is non-zero and
/// is (re)initialised to the gradient when `first_step`.
pub fn sgd_step(
    param: &mut [f32],
    grad: &[f32],
    momentum_buffer: Option<&mut [f32]>,
    cfg: SgdConfig,
    first_step: bool,
) -> Result<()> {
    sgd_steps(vec![SgdArrays {
        param,
        grad,
        momentum_buffer,
        cfg,
        first_step,
    }])
}

/// [`sgd_step`] on each of `params`: every one checked before any moves, then the
/// chunks of all of them in one parallel loop (a parameter's chunks as [`sgd_step`]
/// cuts them, each value updated alone, so the same bits). A loop per parameter left
/// the second thread idle in the small ones' (a network's biases and batch-norm
/// parameters: most of its parameters, a few hundred values each).
pub fn sgd_steps(params: Vec<SgdArrays<'_>>) -> Result<()> {
    for a in &params {
        check_sgd(a.momentum_buffer.is_some(), a.cfg)?;
        check_len("grad", a.grad.len(), a.param.len())?;
        if let (Some(buf), true) = (&a.momentum_buffer, a.cfg.momentum != 0.0) {
            check_len("momentum_buffer", buf.len(), a.param.len())?;
        }
    }
    type Chunk<'a> = (
        &'a mut [f32],
        &'a [f32],
        Option<&'a mut [f32]>,
        SgdConfig,
        bool,
    );
    let mut chunks: Vec<Chunk<'_>> = Vec::new();
    for a in params {
        let chunk = elementwise_chunk(a.param.len());
        let (cfg, first) = (a.cfg, a.first_step);
        let values = a.param.chunks_mut(chunk).zip(a.grad.chunks(chunk));
        match a.momentum_buffer.filter(|_| cfg.momentum != 0.0) {
            Some(buf) => chunks.extend(
                values
                    .zip(buf.chunks_mut(chunk))
                    .map(|((w, g), b)| (w, g, Some(b), cfg, first)),
            ),
            None => chunks.extend(values.map(|(w, g)| (w, g, None, cfg, first))),
        }
    }
    chunks
        .into_par_iter()
        .for_each(|(w, g, b, cfg, first)| sgd_chunk(w, g, b, cfg, first));
    Ok(())
}

/// One Adam (or AdamW) step; `step` is the 1-based index of this step.
pub fn adam_step(
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    step: u64,
    cfg: AdamConfig,
) -> Result<()> {
    adam_steps(vec![AdamArrays {
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        step,
        cfg,
    }])
}

/// [`adam_step`] on each of `params`, as [`sgd_steps`]: every one checked before any
/// moves, then the chunks of all of them in one parallel loop.
pub fn adam_steps(params: Vec<AdamArrays<'_>>) -> Result<()> {
    for a in &params {
        check_adam(a.step, a.cfg)?;
        check_len("grad", a.grad.len(), a.param.len())?;
        check_len("exp_avg", a.exp_avg.len(), a.param.len())?;
        check_len("exp_avg_sq", a.exp_avg_sq.len(), a.param.len())?;
    }
    type Chunk<'a> = (
        &'a mut [f32],
        &'a [f32],
        &'a mut [f32],
        &'a mut [f32],
        AdamConfig,
        f32,
        f32,
    );
    let mut chunks: Vec<Chunk<'_>> = Vec::new();
    for a in params {
        let t = a.step.min(i32::MAX as u64) as i32;
        let bias1 = 1.0 - f64::from(a.cfg.beta1).powi(t);
        let bias2 = 1.0 - f64::from(a.cfg.beta2).powi(t);
        let step_size = (f64::from(a.cfg.lr) / bias1) as f32;
        let bias2_sqrt = bias2.sqrt() as f32;
        let (chunk, cfg) = (elementwise_chunk(a.param.len()), a.cfg);
        chunks.extend(
            a.param
                .chunks_mut(chunk)
                .zip(a.grad.chunks(chunk))
                .zip(
                    a.exp_avg
                        .chunks_mut(chunk)
                        .zip(a.exp_avg_sq.chunks_mut(chunk)),
                )
                .map(|((w, g), (m, v))| (w, g, m, v, cfg, step_size, bias2_sqrt)),
        );
    }
    chunks
        .into_par_iter()
        .for_each(|(w, g, m, v, cfg, step_size, bias2_sqrt)| {
            adam_chunk(w, g, m, v, cfg, step_size, bias2_sqrt)
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, salt: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ salt) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    const ADAM: AdamConfig = AdamConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        decoupled: true,
    };

    const SGD: SgdConfig = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.0,
        nesterov: true,
        weight_decay: 1e-3,
    };

    /// Sizes of one chunk, several chunks with a short last one, and a handful.
    const SIZES: [usize; 3] = [300, 70_000, 5];

    #[test]
    fn adam_steps_give_the_bits_of_one_call_per_parameter_or_move_nothing() {
        let make = |salt| -> Vec<[Vec<f32>; 4]> {
            SIZES
                .iter()
                .map(|&n| std::array::from_fn(|k| values(n, salt + k as u32)))
                .collect()
        };
        let (mut one_by_one, mut together) = (make(1), make(1));
        for (i, [w, g, m, v]) in one_by_one.iter_mut().enumerate() {
            adam_step(w, g, m, v, 3 + i as u64, ADAM).unwrap();
        }
        let steps = together
            .iter_mut()
            .enumerate()
            .map(|(i, [w, g, m, v])| AdamArrays {
                param: w,
                grad: g,
                exp_avg: m,
                exp_avg_sq: v,
                step: 3 + i as u64,
                cfg: ADAM,
            })
            .collect();
        adam_steps(steps).unwrap();
        for (a, b) in one_by_one.iter().zip(&together) {
            for (x, y) in a.iter().zip(b) {
                assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
            }
        }
        // A bad length in the last parameter: nothing moves, the first included.
        let mut arrays = make(2);
        let before = arrays.clone();
        let last = arrays.len() - 1;
        arrays[last][3].pop();
        let steps = arrays
            .iter_mut()
            .map(|[w, g, m, v]| AdamArrays {
                param: w,
                grad: g,
                exp_avg: m,
                exp_avg_sq: v,
                step: 1,
                cfg: ADAM,
            })
            .collect();
        assert!(adam_steps(steps).is_err());
        assert_eq!(arrays[0], before[0]);
    }

    #[test]
    fn sgd_steps_give_the_bits_of_one_call_per_parameter() {
        for (momentum, first) in [(true, true), (true, false), (false, false)] {
            let make = || -> Vec<[Vec<f32>; 3]> {
                SIZES
                    .iter()
                    .map(|&n| std::array::from_fn(|k| values(n, 7 + k as u32)))
                    .collect()
            };
            let cfg = if momentum {
                SGD
            } else {
                SgdConfig {
                    momentum: 0.0,
                    nesterov: false,
                    ..SGD
                }
            };
            let (mut one_by_one, mut together) = (make(), make());
            for [w, g, b] in one_by_one.iter_mut() {
                sgd_step(w, g, momentum.then_some(&mut b[..]), cfg, first).unwrap();
            }
            let steps = together
                .iter_mut()
                .map(|[w, g, b]| SgdArrays {
                    param: w,
                    grad: g,
                    momentum_buffer: momentum.then_some(&mut b[..]),
                    cfg,
                    first_step: first,
                })
                .collect();
            sgd_steps(steps).unwrap();
            assert_eq!(one_by_one, together);
        }
    }
}
