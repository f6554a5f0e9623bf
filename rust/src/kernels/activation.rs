//! Element-wise activations and their gradients.

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};
use crate::parallel::elementwise_chunk;
use crate::simd_dispatch;

/// An activation function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Relu,
    LeakyRelu(f32),
    Sigmoid,
    Tanh,
}

impl Activation {
    /// f(v) for one value: the arithmetic of [`apply_in_place`], for a kernel that applies
    /// the activation while the value is in a register (so the same bits).
    #[inline(always)]
    pub fn value(self, v: f32) -> f32 {
        match self {
            Activation::Relu => relu(v),
            Activation::LeakyRelu(s) => leaky_relu(v, s),
            Activation::Sigmoid => sigmoid(v),
            Activation::Tanh => v.tanh(),
        }
    }

    /// Whether the gradient is computed from the output (sigmoid, tanh) rather than from
    /// the input (relu, leaky relu), as [`backward`]'s `saved` is.
    pub fn grad_uses_output(self) -> bool {
        matches!(self, Activation::Sigmoid | Activation::Tanh)
    }

    /// Parse a name (`relu`, `leaky_relu`, `sigmoid`, `tanh`) and its slope.
    pub fn from_name(name: &str, negative_slope: f32) -> Result<Self> {
        match name {
            "relu" => Ok(Activation::Relu),
            "leaky_relu" => {
                if !negative_slope.is_finite() {
                    return Err(Error::invalid(
                        "negative_slope",
                        negative_slope,
                        "a finite number",
                    ));
                }
                Ok(Activation::LeakyRelu(negative_slope))
            }
            "sigmoid" => Ok(Activation::Sigmoid),
            "tanh" => Ok(Activation::Tanh),
            other => Err(Error::invalid(
                "activation",
                other,
                "one of relu, leaky_relu, sigmoid, tanh",
            )),
        }
    }
}

// One definition per function, shared by the out-of-place pass and the in-place epilogue
// of the convolution and linear kernels, so that a fused activation gives the same bits.
#[inline(always)]
fn relu(v: f32) -> f32 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

#[inline(always)]
fn leaky_relu(v: f32, slope: f32) -> f32 {
    if v > 0.0 {
        v
    } else {
        v * slope
    }
}

/// Stable on both tails: exp of a non-positive number only.
#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    if v >= 0.0 {
        1.0 / (1.0 + (-v).exp())
    } else {
        let e = v.exp();
        e / (1.0 + e)
    }
}

simd_dispatch! {
    fn relu_chunk(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = relu(v);
        }
    }
}

simd_dispatch! {
    fn leaky_chunk(x: &[f32], y: &mut [f32], slope: f32) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = leaky_relu(v, slope);
        }
    }
}

simd_dispatch! {
    fn relu_in_place(values: &mut [f32]) {
        for v in values {
            *v = relu(*v);
        }
    }
}

simd_dispatch! {
    fn leaky_in_place(values: &mut [f32], slope: f32) {
        for v in values {
            *v = leaky_relu(*v, slope);
        }
    }
}

simd_dispatch! {
    fn relu_grad_chunk(g: &[f32], x: &[f32], out: &mut [f32], slope: f32) {
        for ((o, &gv), &xv) in out.iter_mut().zip(g).zip(x) {
            *o = if xv > 0.0 { gv } else { gv * slope };
        }
    }
}

simd_dispatch! {
    fn sigmoid_grad_chunk(g: &[f32], y: &[f32], out: &mut [f32]) {
        for ((o, &gv), &yv) in out.iter_mut().zip(g).zip(y) {
            *o = gv * (yv * (1.0 - yv));
        }
    }
}

simd_dispatch! {
    fn tanh_grad_chunk(g: &[f32], y: &[f32], out: &mut [f32]) {
        for ((o, &gv), &yv) in out.iter_mut().zip(g).zip(y) {
            *o = gv * (1.0 - yv * yv);
        }
    }
}

fn sigmoid_chunk(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = sigmoid(v);
    }
}

fn tanh_chunk(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.tanh();
    }
}

/// values = f(values), serially: the epilogue of a kernel's output tile, applied while the
/// tile is in cache (the caller already runs tiles in parallel). Bit-identical to
/// [`forward`].
pub fn apply_in_place(act: Activation, values: &mut [f32]) {
    match act {
        Activation::Relu => relu_in_place(values),
        Activation::LeakyRelu(s) => leaky_in_place(values, s),
        Activation::Sigmoid => values.iter_mut().for_each(|v| *v = sigmoid(*v)),
        Activation::Tanh => values.iter_mut().for_each(|v| *v = v.tanh()),
    }
}

/// y = f(x).
pub fn forward(act: Activation, x: &[f32], y: &mut [f32]) -> Result<()> {
    check_len("output", y.len(), x.len())?;
    let chunk = elementwise_chunk(x.len());
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(y, x)| match act {
            Activation::Relu => relu_chunk(x, y),
            Activation::LeakyRelu(s) => leaky_chunk(x, y, s),
            Activation::Sigmoid => sigmoid_chunk(x, y),
            Activation::Tanh => tanh_chunk(x, y),
        });
    Ok(())
}

/// Input gradient. `saved` is the forward's input for relu and leaky relu, its output
/// for sigmoid and tanh (PyTorch's convention).
pub fn backward(
    act: Activation,
    grad_output: &[f32],
    saved: &[f32],
    grad_input: &mut [f32],
) -> Result<()> {
    check_len("input", saved.len(), grad_output.len())?;
    check_len("grad_input", grad_input.len(), grad_output.len())?;
    let chunk = elementwise_chunk(grad_output.len());
    grad_input
        .par_chunks_mut(chunk)
        .zip(grad_output.par_chunks(chunk).zip(saved.par_chunks(chunk)))
        .for_each(|(out, (g, s))| backward_in_tile(act, g, s, out));
    Ok(())
}

/// [`backward`] serially, on a tile of a fused kernel that already runs tiles in parallel:
/// the same bits.
pub fn backward_in_tile(
    act: Activation,
    grad_output: &[f32],
    saved: &[f32],
    grad_input: &mut [f32],
) {
    match act {
        Activation::Relu => relu_grad_chunk(grad_output, saved, grad_input, 0.0),
        Activation::LeakyRelu(slope) => relu_grad_chunk(grad_output, saved, grad_input, slope),
        Activation::Sigmoid => sigmoid_grad_chunk(grad_output, saved, grad_input),
        Activation::Tanh => tanh_grad_chunk(grad_output, saved, grad_input),
    }
}
