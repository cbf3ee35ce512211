"""Functional ops: the reference (spec), dispatch, torch.library registration."""

from gankernels.ops.dispatch import BackendUnavailable, Explanation, use_backend
from gankernels.ops.functional import (
    bias_act,
    conv3x3,
    conv3x3_pool,
    explain,
    max_pool2d,
    tune,
    up_conv3x3,
    upsample_nearest2d,
)

__all__ = [
    "BackendUnavailable",
    "Explanation",
    "bias_act",
    "conv3x3",
    "conv3x3_pool",
    "explain",
    "max_pool2d",
    "tune",
    "up_conv3x3",
    "upsample_nearest2d",
    "use_backend",
]
