"""gankernels: fast fused GPU kernels for the layers GANs are made of.

Functional ops (each takes ``backend="auto" | "torch" | "triton" | "cuda"``)::

    conv3x3, conv3x3_pool, up_conv3x3, bias_act, max_pool2d, upsample_nearest2d

Drop-in modules live in :mod:`gankernels.nn`; :func:`convert` swaps stock layers of an
existing model for fused ones. See DESIGN.md (§1 for the exact semantics).
"""

from __future__ import annotations

__version__ = "0.1.0"

from gankernels import backends as _backends  # noqa: E402
from gankernels.ops import (  # noqa: E402
    BackendUnavailable,
    Explanation,
    bias_act,
    conv3x3,
    conv3x3_pool,
    explain,
    max_pool2d,
    tune,
    up_conv3x3,
    upsample_nearest2d,
    use_backend,
)

_backends.load_backends()

from gankernels import nn  # noqa: E402
from gankernels.convert import ConversionReport, convert  # noqa: E402

__all__ = [
    "BackendUnavailable",
    "ConversionReport",
    "Explanation",
    "bias_act",
    "conv3x3",
    "conv3x3_pool",
    "convert",
    "explain",
    "max_pool2d",
    "nn",
    "tune",
    "up_conv3x3",
    "upsample_nearest2d",
    "use_backend",
]
