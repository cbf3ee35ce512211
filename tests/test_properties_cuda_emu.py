"""Property tests of the CUDA kernels on CPU, through the emulation of
tests/test_cuda_extension.py (csrc/*.cu compiled by g++ against csrc/emu/, called with
the buffers ops.cpp would allocate), against the float64 reference (issue 18).

The ``emu`` fixture and the call helpers are imported from that module, not copied.
"""

from __future__ import annotations

import pytest
import test_cuda_extension as _ext
import torch
import torch.nn.functional as F

emu = _ext.emu  # the module-scoped fixture that builds the emulation (pytest finds it here)
EMU_DTYPES, _emu_conv, _emu_conv_backward, _empty, _epi, _p = (
    _ext.EMU_DTYPES,
    _ext._emu_conv,
    _ext._emu_conv_backward,
    _ext._empty,
    _ext._epi,
    _ext._p,
)

# ----------------------------------------------------------------------------------
# Regression cases (issue 18, item 7).


@pytest.mark.parametrize("gain", [1.0, -1.0])
def test_emulated_clamp_passes_no_gradient_at_exactly_the_bound(emu, gain):
    """csrc/common.cuh passed the gradient at |y| == clamp; the reference, F.hardtanh and
    torch.clamp (PyTorch 2.14) give 0."""
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 1.0]).repeat(2, 2, 8, 1).clone()
    x[:, 1] = x[:, 1].flip(-1)
    grad = torch.arange(1.0, x.numel() + 1).view(x.shape)
    xs = x.clone().requires_grad_(True)
    F.hardtanh(xs * gain).backward(grad)
    gx = _empty(x.shape, torch.float32, torch.contiguous_format)
    b = torch.zeros(2)
    rc = emu.emu_bias_act_bwd(
        EMU_DTYPES[torch.float32], _p(grad), _p(x), _p(b), _p(gx), x.numel(), x.stride(1), 2, *_epi("linear", 0.2, gain, 1.0), 1
    )
    assert rc == 0
    assert torch.equal(gx, xs.grad)
    # The small-channel conv's backward, with a kernel that copies each channel.
    w = torch.zeros(2, 2, 3, 3)
    w[0, 0, 1, 1] = w[1, 1, 1, 1] = 1.0
    for pool in (False, True):
        xs = x.clone().requires_grad_(True)
        stock = F.hardtanh(F.conv2d(xs, w, padding=1) * gain)
        stock = F.max_pool2d(stock, 2) if pool else stock
        g = torch.arange(1.0, stock.numel() + 1).view(stock.shape)
        stock.backward(g)
        _, saved = _emu_conv(emu, x, w, b, "linear", gain, 1.0, pool)
        got, _, _ = _emu_conv_backward(emu, g, x, w, b, saved, "linear", gain, 1.0, pool)
        assert torch.equal(got, xs.grad), f"pool={pool}"
