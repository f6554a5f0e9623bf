//! Grouped convolution (groups > 1): depthwise by its own stencil ([`super::depthwise`]),
//! any other grouping as one ordinary convolution per group.
//!
//! A group's channels are a contiguous block of each image, so a group's input is
//! gathered into a batch of its own (N, C_in/groups, H, W), convolved by the plan of
//! that sub-convolution, and its output scattered back. Its weights (and their gradient)
//! are a contiguous block of the weight already. Groups run one after another, each
//! parallel over its images as any convolution: the results do not depend on the threads.

use super::{depthwise, Conv2dParams, Epilogue};
use crate::error::Result;
use crate::memory::resize_scratch;
use crate::parallel::stop_token;

const GROUP_INPUT: &str = "grouped conv2d: one group's input";
const GROUP_OUTPUT: &str = "grouped conv2d: one group's output";

/// The ordinary convolution of one group.
fn group_params(p: &Conv2dParams) -> Conv2dParams {
    Conv2dParams {
        in_channels: p.group_in_channels(),
        out_channels: p.group_out_channels(),
        groups: 1,
        ..*p
    }
}

/// Copy channel block `g` (`block` = channels × plane elements per image, `image` the
/// image's length) of every image of `from` into `to`, one block after another.
fn gather(from: &[f32], image: usize, block: usize, g: usize, to: &mut [f32]) {
    for (dst, src) in to.chunks_exact_mut(block).zip(from.chunks_exact(image)) {
        dst.copy_from_slice(&src[g * block..(g + 1) * block]);
    }
}

/// The inverse of [`gather`].
fn scatter(from: &[f32], image: usize, block: usize, g: usize, to: &mut [f32]) {
    for (src, dst) in from.chunks_exact(block).zip(to.chunks_exact_mut(image)) {
        dst[g * block..(g + 1) * block].copy_from_slice(src);
    }
}

/// [`super::forward_fused`] for `p.groups > 1` (lengths checked by the caller).
pub(super) fn forward(
    p: &Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    output: &mut [f32],
) -> Result<()> {
    if p.is_depthwise() {
        return depthwise::forward(p, input, weight, bias, epilogue, output);
    }
    let sub = group_params(p);
    let (in_block, out_block) = (sub.image_len(), sub.out_channels * sub.pixels());
    let weight_block = sub.out_channels * sub.col_rows();
    let (mut group_input, mut group_output) = (Vec::new(), Vec::new());
    resize_scratch(&mut group_input, p.batch * in_block, GROUP_INPUT)?;
    resize_scratch(&mut group_output, p.batch * out_block, GROUP_OUTPUT)?;
    let stop = stop_token();
    for g in 0..p.groups {
        if stop.is_set() {
            break;
        }
        gather(input, p.image_len(), in_block, g, &mut group_input);
        super::forward_fused(
            &sub,
            &group_input,
            &weight[g * weight_block..(g + 1) * weight_block],
            bias.map(|b| &b[g * sub.out_channels..(g + 1) * sub.out_channels]),
            epilogue,
            &mut group_output,
        )?;
        scatter(
            &group_output,
            p.out_channels * p.pixels(),
            out_block,
            g,
            output,
        );
    }
    Ok(())
}

/// The input gradient (if `grad_input` is given) and weight gradient of [`forward`]
/// (lengths checked by the caller; the bias gradient is the caller's).
pub(super) fn backward(
    p: &Conv2dParams,
    grad_output: &[f32],
    input: &[f32],
    weight: &[f32],
    mut grad_input: Option<&mut [f32]>,
    grad_weight: &mut [f32],
) -> Result<()> {
    if p.is_depthwise() {
        return depthwise::backward(p, grad_output, input, weight, grad_input, grad_weight);
    }
    let sub = group_params(p);
    let (in_block, out_block) = (sub.image_len(), sub.out_channels * sub.pixels());
    let weight_block = sub.out_channels * sub.col_rows();
    let (mut group_input, mut group_grad_output) = (Vec::new(), Vec::new());
    let mut group_grad_input = Vec::new();
    resize_scratch(&mut group_input, p.batch * in_block, GROUP_INPUT)?;
    resize_scratch(&mut group_grad_output, p.batch * out_block, GROUP_OUTPUT)?;
    if grad_input.is_some() {
        resize_scratch(&mut group_grad_input, p.batch * in_block, GROUP_INPUT)?;
    }
    let stop = stop_token();
    for g in 0..p.groups {
        if stop.is_set() {
            break;
        }
        gather(input, p.image_len(), in_block, g, &mut group_input);
        gather(
            grad_output,
            p.out_channels * p.pixels(),
            out_block,
            g,
            &mut group_grad_output,
        );
        super::backward(
            &sub,
            &group_grad_output,
            &group_input,
            &weight[g * weight_block..(g + 1) * weight_block],
            grad_input.is_some().then_some(&mut group_grad_input[..]),
            &mut grad_weight[g * weight_block..(g + 1) * weight_block],
            None,
        )?;
        if let Some(gx) = grad_input.as_deref_mut() {
            scatter(&group_grad_input, p.image_len(), in_block, g, gx);
        }
    }
    Ok(())
}
