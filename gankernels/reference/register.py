"""The ``torch`` backend: the reference composites (cuDNN on GPU). Serves every call."""

from __future__ import annotations

from gankernels.ops import reference as ref
from gankernels.ops.dispatch import OpImpl, register


def _conv(fn):
    def forward(x, w, b, act, alpha, gain, clamp):
        return fn(x, w, b, act, alpha, gain, clamp), x.new_empty((0,))

    return forward


register(
    "bias_act", "torch", OpImpl(forward=lambda x, b, act, alpha, gain, clamp, dim: ref.bias_act(x, b, act, alpha, gain, clamp, dim))
)
register("conv3x3", "torch", OpImpl(forward=_conv(ref.conv3x3)))
register("conv3x3_pool", "torch", OpImpl(forward=_conv(ref.conv3x3_pool)))
# The composite a user writes (upsample, then convolve): stock's results and cost.
register("up_conv3x3", "torch", OpImpl(forward=_conv(ref.up_conv3x3_naive)))
register(
    "max_pool2d",
    "torch",
    # Always PyTorch's int64 indices, with or without return_indices.
    OpImpl(
        forward=lambda x, kernel_size, stride, padding, dilation, ceil_mode, return_indices: ref.max_pool2d(
            x, kernel_size, stride, padding, dilation, ceil_mode
        )
    ),
)
register("upsample_nearest2d", "torch", OpImpl(forward=lambda x, scale_factor: ref.upsample_nearest2d(x, scale_factor)))
