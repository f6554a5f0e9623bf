//! Shapes and hyper-parameters of a convolution: validation and the output-shape
//! arithmetic, in one place.

use crate::error::{checked_size, join_dims, Error, Result};
use crate::kernels::{nchw, non_negative_pair, nonzero, positive_pair, window_output_hw};

/// Shapes and hyper-parameters of a convolution, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub batch: usize,
    pub in_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_channels: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub out_h: usize,
    pub out_w: usize,
    /// Channel groups: input channel block g (of C_in/groups) feeds output channel block
    /// g (of C_out/groups) only, as `torch.nn.Conv2d(groups=...)`.
    pub groups: usize,
}

impl Conv2dParams {
    /// Validate an input of shape (N, C_in, H, W) against a weight (C_out, C_in, kH, kW).
    pub fn new(
        input_shape: &[usize],
        weight_shape: &[usize],
        stride: (i64, i64),
        padding: (i64, i64),
        dilation: (i64, i64),
    ) -> Result<Self> {
        Self::grouped(input_shape, weight_shape, stride, padding, dilation, 1)
    }

    /// [`Conv2dParams::new`] for `groups` channel groups: a weight (C_out, C_in/groups,
    /// kH, kW), both channel counts divisible by `groups`.
    pub fn grouped(
        input_shape: &[usize],
        weight_shape: &[usize],
        stride: (i64, i64),
        padding: (i64, i64),
        dilation: (i64, i64),
        groups: i64,
    ) -> Result<Self> {
        let (batch, in_channels, in_h, in_w) = nchw("input", input_shape)?;
        if weight_shape.len() != 4 {
            return Err(Error::invalid(
                "weight",
                format!("a {}-D array {weight_shape:?}", weight_shape.len()),
                "a 4-D (C_out, C_in/groups, kH, kW) array",
            ));
        }
        if groups < 1 {
            return Err(Error::invalid(
                "groups",
                groups.to_string(),
                "a positive number of groups (>= 1)",
            ));
        }
        let groups = groups as usize;
        nonzero("weight", weight_shape)?;
        let (out_channels, w_in, kernel_h, kernel_w) = (
            weight_shape[0],
            weight_shape[1],
            weight_shape[2],
            weight_shape[3],
        );
        if in_channels % groups != 0 || out_channels % groups != 0 {
            return Err(Error::invalid(
                "groups",
                format!(
                    "{groups}, with {in_channels} input channels (shape {input_shape:?}) and \
                     {out_channels} output channels (weight shape {weight_shape:?})"
                ),
                "a number of groups that divides both channel counts",
            ));
        }
        if w_in * groups != in_channels {
            return Err(Error::invalid(
                "weight",
                format!("{w_in} input channels per group (shape {weight_shape:?})"),
                format!(
                    "{} input channels per group: input has {in_channels} (shape \
                     {input_shape:?}) in {groups} group(s)",
                    in_channels / groups
                ),
            ));
        }
        let stride = positive_pair("stride", stride)?;
        let padding = non_negative_pair("padding", padding)?;
        let dilation = positive_pair("dilation", dilation)?;
        let kernel = (kernel_h, kernel_w);
        let Some((out_h, out_w)) =
            window_output_hw((in_h, in_w), kernel, stride, padding, dilation)
        else {
            return Err(Error::invalid(
                "weight",
                format!(
                    "a kernel of {kernel_h}×{kernel_w} (dilation {dilation:?}) on an input of \
                         {in_h}×{in_w} with padding {padding:?}"
                ),
                "a (dilated) kernel no larger than the padded input",
            ));
        };
        let params = Conv2dParams {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            kernel_h,
            kernel_w,
            stride,
            padding,
            dilation,
            out_h,
            out_w,
            groups,
        };
        let output = [batch, out_channels, out_h, out_w];
        if let Some(excess) = beyond_memory(&output).filter(|_| padding != (0, 0)) {
            // Without padding a convolution outputs no more per plane than its input,
            // which is in memory: when that output would fit, the padding is at fault.
            let unpadded = window_output_hw((in_h, in_w), kernel, stride, (0, 0), dilation);
            if unpadded.is_none_or(|(h, w)| beyond_memory(&[batch, out_channels, h, w]).is_none()) {
                return Err(Error::TooLarge {
                    arg: "padding",
                    reason: format!(
                        "{padding:?} makes an output of {} elements, too large to \
                         allocate{excess}",
                        join_dims(&output)
                    ),
                });
            }
        }
        checked_size("output", &output)?;
        checked_size("im2col buffer", &[params.col_rows(), out_h, out_w])?;
        Ok(params)
    }

    /// Output shape (N, C_out, H_out, W_out).
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.out_channels, self.out_h, self.out_w]
    }

    /// Multiply-adds of the forward pass.
    pub fn multiply_adds(&self) -> usize {
        self.output_shape()
            .iter()
            .product::<usize>()
            .saturating_mul(self.col_rows())
    }

    /// Rows of the unfolded image: C_in · kH · kW (per group: C_in/groups · kH · kW).
    pub fn col_rows(&self) -> usize {
        self.group_in_channels() * self.kernel_h * self.kernel_w
    }

    /// Input channels per group: the weight's second dimension.
    pub fn group_in_channels(&self) -> usize {
        self.in_channels / self.groups
    }

    /// Output channels per group.
    pub fn group_out_channels(&self) -> usize {
        self.out_channels / self.groups
    }

    /// Every input channel its own group (C_out a multiple of C_in, the depth
    /// multiplier): the per-channel stencil of [`super::depthwise`] runs it.
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels
    }

    pub(super) fn pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    pub(super) fn image_len(&self) -> usize {
        self.in_channels * self.in_h * self.in_w
    }

    /// The zero-padded image's height and width.
    pub(super) fn padded_size(&self) -> (usize, usize) {
        (
            self.in_h + 2 * self.padding.0,
            self.in_w + 2 * self.padding.1,
        )
    }

    /// 1×1, stride 1, no padding: the image itself is the unfolded matrix.
    pub(super) fn is_pointwise(&self) -> bool {
        self.kernel_h == 1 && self.kernel_w == 1 && self.stride == (1, 1) && self.padding == (0, 0)
    }

    pub(super) fn check_lengths(&self, input: usize, weight: usize, output: usize) -> Result<()> {
        crate::error::check_len("input", input, self.batch * self.image_len())?;
        crate::error::check_len("weight", weight, self.out_channels * self.col_rows())?;
        crate::error::check_len(
            "output",
            output,
            self.batch * self.out_channels * self.pixels(),
        )
    }
}

/// Why a float32 array of `dims` cannot be allocated ("" when its size overflows, else how
/// far it exceeds this machine's memory), or `None` when it can.
fn beyond_memory(dims: &[usize]) -> Option<String> {
    let Ok(elements) = checked_size("output", dims) else {
        return Some(String::new());
    };
    let bytes = elements as u128 * std::mem::size_of::<f32>() as u128;
    crate::memory::exceeds_physical(bytes).map(|excess| format!(": {excess}"))
}
