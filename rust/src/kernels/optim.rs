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

/// One SGD step on `param`; `momentum_buffer` is required when momentum is non-zero and
/// is (re)initialised to the gradient when `first_step`.
pub fn sgd_step(
    param: &mut [f32],
    grad: &[f32],
    momentum_buffer: Option<&mut [f32]>,
    cfg: SgdConfig,
    first_step: bool,
) -> Result<()> {
    check_sgd(momentum_buffer.is_some(), cfg)?;
    check_len("grad", grad.len(), param.len())?;
    let buf = match momentum_buffer {
        Some(buf) if cfg.momentum != 0.0 => {
            check_len("momentum_buffer", buf.len(), param.len())?;
            Some(buf)
        }
        _ => None,
    };
    let chunk = elementwise_chunk(param.len());
    match buf {
        Some(buf) => param
            .par_chunks_mut(chunk)
            .zip(grad.par_chunks(chunk))
            .zip(buf.par_chunks_mut(chunk))
            .for_each(|((w, g), b)| sgd_chunk(w, g, Some(b), cfg, first_step)),
        None => param
            .par_chunks_mut(chunk)
            .zip(grad.par_chunks(chunk))
            .for_each(|(w, g)| sgd_chunk(w, g, None, cfg, first_step)),
    }
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
    check_adam(step, cfg)?;
    check_len("grad", grad.len(), param.len())?;
    check_len("exp_avg", exp_avg.len(), param.len())?;
    check_len("exp_avg_sq", exp_avg_sq.len(), param.len())?;
    let t = step.min(i32::MAX as u64) as i32;
    let bias1 = 1.0 - f64::from(cfg.beta1).powi(t);
    let bias2 = 1.0 - f64::from(cfg.beta2).powi(t);
    let step_size = (f64::from(cfg.lr) / bias1) as f32;
    let bias2_sqrt = bias2.sqrt() as f32;
    let chunk = elementwise_chunk(param.len());
    param
        .par_chunks_mut(chunk)
        .zip(grad.par_chunks(chunk))
        .zip(
            exp_avg
                .par_chunks_mut(chunk)
                .zip(exp_avg_sq.par_chunks_mut(chunk)),
        )
        .for_each(|((w, g), (m, v))| adam_chunk(w, g, m, v, cfg, step_size, bias2_sqrt));
    Ok(())
}
