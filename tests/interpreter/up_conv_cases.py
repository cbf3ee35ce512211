"""Inputs, the float64 reference and the rotated case list shared by the two up-conv
forward kernels' interpreter tests (test_triton_up_conv_fwd.py: four phases per program;
test_triton_up_conv_pairs.py: row pairs)."""

from __future__ import annotations

import pytest
import torch

from gankernels.ops import reference as ref
from gankernels.testing import random_input

DTYPES = (torch.float32, torch.float16)
# Rows of the 6 cases per dtype: (Ci, Co) and (H, W), rotated against the activations.
SPATIAL = [(1, 1), (1, 4), (3, 5), (4, 4), (5, 2), (2, 7)]


def make_inputs(n, ci, co, h, w, dtype, layout, bias, seed):
    """x [n, ci, h, w] in ``layout`` (a ``gankernels.testing`` layout, or
    ``channels_last_view``: every other column of a channels_last tensor, channel stride 1
    but not channels_last-contiguous), weights scaled to keep outputs O(1), a bias or None."""
    g = torch.Generator().manual_seed(seed)
    if layout == "channels_last_view":
        x = random_input(n, ci, h, 2 * w, dtype=dtype, layout="channels_last", generator=g)[..., ::2]
        assert x.stride(1) == 1 and not x.is_contiguous(memory_format=torch.channels_last)
    else:
        x = random_input(n, ci, h, w, dtype=dtype, layout=layout, generator=g)
    wt = (torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64) / (3 * ci**0.5)).to(dtype)
    b = (torch.randn(co, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    return x, wt, b


def reference(x, w, b, act, alpha, gain, clamp):
    """Upsample, then conv, in float64."""
    return ref.up_conv3x3_naive(x.double(), w.double(), None if b is None else b.double(), act, alpha, gain, clamp)


def rotated_cases(channels: list[tuple[int, int]], layouts: tuple[str, ...]) -> list:
    """Every (dtype, activation) pair once, the other factors (channels, spatial size,
    batch, layout, bias, gain, clamp) rotated against them; pytest params in the order
    dtype, n, ci, co, h, w, act, bias, gain, clamp, layout."""
    out = []
    for di, dtype in enumerate(DTYPES):
        for i, act in enumerate(ref.ACTIVATIONS):
            k = i + di
            ci, co = channels[k % len(channels)]
            h, w = SPATIAL[(k + 3 * di) % len(SPATIAL)]
            n = 2 if k % 2 else 1
            layout = layouts[(i + (len(layouts) - 1) * di) % len(layouts)]
            bias = k % 3 != 1
            gain = 1.7 if k % 4 == 1 else 1.0
            clamp = 0.6 if k % 5 == 2 else None
            out.append(
                pytest.param(
                    dtype,
                    n,
                    ci,
                    co,
                    h,
                    w,
                    act,
                    bias,
                    gain,
                    clamp,
                    layout,
                    id=f"{str(dtype)[6:]}-{act}-n{n}c{ci}x{co}-{h}x{w}-{layout}"
                    f"{'-bias' if bias else ''}{'-gain' if gain != 1 else ''}{'-clamp' if clamp else ''}",
                )
            )
    return out
