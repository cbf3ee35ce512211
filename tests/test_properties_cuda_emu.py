"""Property tests of the CUDA kernels on CPU, through the emulation of
tests/test_cuda_extension.py (csrc/*.cu compiled by g++ against csrc/emu/, called with
the buffers ops.cpp would allocate), against the float64 reference (issue 18).

The ``emu`` fixture and the call helpers are imported from that module, not copied.
The runners below do what csrc/ops.cpp does around each launch (the dense copy or the
memory-format copy of the input, poisoned outputs, the vectorised path exactly when
every pointer is 16-byte aligned, the bias gradient as a float32 torch sum), so the
kernels see what they see on a GPU; fp32, fp16 and bf16.
"""

from __future__ import annotations

import ctypes

import property_cases as pc
import pytest
import test_cuda_extension as _ext
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from gankernels.cuda import loader as cuda_loader
from gankernels.cuda.loader import pool_saves_code
from gankernels.ops import reference as ref

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


# ----------------------------------------------------------------------------------
# Runners: (out, grads) of a property case on the emulated kernels.

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _aligned(*tensors: torch.Tensor) -> int:
    return int(all(t.data_ptr() % 16 == 0 for t in tensors))


def _bias_act(emu, case, tensors, grad, wants_grad):
    x, b = tensors
    d = case.dim % x.dim()
    xd = x if cuda_loader._is_dense(x) else x.contiguous()
    c = x.shape[d]
    inner = xd.stride(d) if c > 1 else 1
    bc = None if b is None else b.contiguous()
    epi = _epi(case.act, case.alpha, case.gain, case.clamp)
    y = cuda_loader._dense_like(xd).fill_(float("nan"))
    dt = EMU_DTYPES[x.dtype]
    assert emu.emu_bias_act_fwd(dt, _p(xd), _p(bc), _p(y), xd.numel(), inner, c, *epi, _aligned(xd, y)) == 0
    if not wants_grad:
        return y, ()
    g = torch.empty_like(xd).copy_(grad)
    gx = cuda_loader._dense_like(xd).fill_(float("nan"))
    assert emu.emu_bias_act_bwd(dt, _p(g), _p(xd), _p(bc), _p(gx), xd.numel(), inner, c, *epi, _aligned(xd, g, gx)) == 0
    dims = [i for i in range(x.dim()) if i != d]
    gb = None if b is None else (gx.sum(dims, dtype=torch.float32) if dims else gx.float()).to(b.dtype)
    return y, tuple((gx, gb)[i] for i in wants_grad)


def _pool_cfg(case):
    k, s, p, d, ceil = case.pool
    return [k, k], [s, s], [p, p], [d, d], ceil


def _max_pool(emu, case, tensors, grad, wants_grad):
    (x,) = tensors
    k, s, p, d, ceil = _pool_cfg(case)
    fmt = ref.memory_format_of(x)
    xc = x.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    ho = ref.pool_output_size(h, k[0], s[0], p[0], d[0], ceil)
    wo = ref.pool_output_size(w, k[1], s[1], p[1], d[1], ceil)
    # What training saves: the 1-byte window code where the window allows it, else int64.
    code = pool_saves_code(list(k), False)
    y, idx = _empty((n, c, ho, wo), x.dtype, fmt), _empty((n, c, ho, wo), torch.int8 if code else torch.int64, fmt)
    shape = _ext._i64(n, c, h, w, ho, wo)
    cfg = (ctypes.c_int * 8)(k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1])
    cl, dt = int(fmt == torch.channels_last), EMU_DTYPES[x.dtype]
    assert emu.emu_max_pool2d_fwd(dt, _p(xc), _p(y), _p(idx), int(code), shape, cfg, cl, _aligned(xc, y, idx)) == 0
    if not wants_grad:
        return y, ()
    g = grad.contiguous(memory_format=fmt)
    gx = _empty((n, c, h, w), x.dtype, fmt)
    assert emu.emu_max_pool2d_bwd(dt, _p(g), _p(idx), int(code), _p(gx), shape, cfg, cl, _aligned(g, idx, gx)) == 0
    return y, (gx,)


def _upsample(emu, case, tensors, grad, wants_grad):
    (x,) = tensors
    fmt = ref.memory_format_of(x)
    xc = x.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    s, cl, dt = case.factor, int(fmt == torch.channels_last), EMU_DTYPES[x.dtype]
    y = _empty((n, c, h * s, w * s), x.dtype, fmt)
    assert emu.emu_upsample_fwd(dt, _p(xc), _p(y), n, c, h, w, s, cl, _aligned(xc, y)) == 0
    if not wants_grad:
        return y, ()
    g = grad.contiguous(memory_format=fmt)
    gx = _empty((n, c, h, w), x.dtype, fmt)
    assert emu.emu_upsample_bwd(dt, _p(g), _p(gx), n, c, h, w, s, cl, _aligned(g, gx)) == 0
    return y, (gx,)


def _conv(emu, case, tensors, grad, wants_grad):
    x, w, b = tensors
    pool = case.op == "conv3x3_pool"
    out, saved = _emu_conv(emu, x, w, b, case.act, case.gain, case.clamp, pool)
    if not wants_grad:
        return out, ()
    grads = _emu_conv_backward(emu, grad, x, w, b, saved, case.act, case.gain, case.clamp, pool)
    return out, tuple(grads[i] for i in wants_grad)


def _runner(emu, fn):
    return lambda case, tensors, grad, wants_grad: fn(emu, case, tensors, grad, wants_grad)


# The small-channel conv kernel: Ci <= 4 or Co <= 4 (gankernels.cuda.register). The
# emulation helpers fix the lrelu slope at 0.2.
SMALL = (1, 2, 3, 4)


def _conv_cases(op):
    small_ci = pc.conv_cases(op, DTYPES, max_n=2, max_hw=8, ci_choices=SMALL)
    small_co = pc.conv_cases(op, DTYPES, max_n=2, max_hw=8, co_choices=SMALL)
    return st.one_of(small_ci, small_co).map(lambda c: (setattr(c, "alpha", 0.2), c)[1])


@pc.bounded(30)
@given(case=st.one_of(_conv_cases("conv3x3"), _conv_cases("conv3x3_pool")))
def test_emulated_conv_matches_the_reference(emu, case):
    pc.check(case, _runner(emu, _conv))


@pc.bounded(100)
@given(case=pc.bias_act_cases(DTYPES))
def test_emulated_bias_act_matches_the_reference(emu, case):
    pc.check(case, _runner(emu, _bias_act))


@pc.bounded(100)
@given(case=pc.max_pool_cases(DTYPES))
def test_emulated_max_pool2d_matches_the_reference(emu, case):
    pc.check(case, _runner(emu, _max_pool))


@pc.bounded(50)
@given(case=pc.upsample_cases(DTYPES))
def test_emulated_upsample_matches_the_reference(emu, case):
    pc.check(case, _runner(emu, _upsample))


_RUNNERS = {
    "conv3x3": _conv,
    "conv3x3_pool": _conv,
    "bias_act": _bias_act,
    "max_pool2d": _max_pool,
    "upsample_nearest2d": _upsample,
}


@pc.bounded(40)
@given(
    case=st.one_of(
        _conv_cases("conv3x3"),
        _conv_cases("conv3x3_pool"),
        pc.bias_act_cases(DTYPES),
        pc.max_pool_cases(DTYPES),
        pc.upsample_cases(DTYPES),
    ),
    big=st.booleans(),
)
def test_emulated_special_values_propagate_as_in_pytorch(emu, case, big):
    """NaN and ±inf as in PyTorch; fp16/bf16 overflow to ±inf."""
    case.specials, case.scale = not big, (2e4 if big and case.dtype == torch.float16 else 1e38 if big else 1.0)
    pc.check_forward_special_values(case, _runner(emu, _RUNNERS[case.op]))


@pc.bounded(10)
@given(
    case=st.one_of(
        _conv_cases("conv3x3"),
        _conv_cases("conv3x3_pool"),
        pc.bias_act_cases(DTYPES),
        pc.max_pool_cases(DTYPES),
        pc.upsample_cases(DTYPES),
    )
)
def test_emulated_kernels_are_bitwise_deterministic(emu, case):
    pc.check(case, _runner(emu, _RUNNERS[case.op]), repeat=True)
