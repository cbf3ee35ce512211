"""GPU tests of the Triton conv backward (dgrad, wgrad, bias) on the ANCHORS block shapes.

Run on a CUDA machine: pytest -q -m gpu tests/gpu/test_triton_conv_bwd_gpu.py
(skipped without CUDA). Forward and backward go through the registered ``triton`` op
and autograd; gradients are compared with float64 gradients of the reference (for
the pooled op with the argmax the forward saved, so a bf16 near-tie cannot fail it).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import gankernels
from gankernels.ops import reference as ref
from gankernels.ops import registration as reg
from gankernels.testing import assert_close_rel, random_input, tolerance

pytestmark = pytest.mark.gpu

# ANCHORS.md rows (Ci, Co, H_in), batch reduced from 64 to 2.
GENERATOR_ROWS = [(512, 256, 8), (256, 128, 16), (128, 64, 32), (64, 32, 64)]
DISCRIMINATOR_ROWS = [(3, 64, 128), (64, 128, 64), (128, 256, 32), (256, 512, 16)]
BATCH = 2
DEVICE = "cuda"  # the tests are GPU-only; a scratch CPU run under the interpreter may rebind it


def _cb():
    import gankernels.triton.conv3x3_backward as cb

    return cb


def _unpool_code(grad: torch.Tensor, code: torch.Tensor, h: int, wd: int) -> torch.Tensor:
    full = grad.new_zeros(grad.shape[0], grad.shape[1], h, wd)
    hp, wp = grad.shape[2:]
    for dy, dx in itertools.product(range(2), range(2)):
        full[:, :, dy : 2 * hp : 2, dx : 2 * wp : 2] = grad * (code.long() == dy * 2 + dx).to(grad.dtype)
    return full


def _reference_grads(op, grad, x, w, b, act, alpha, gain, clamp, code):
    x, w, grad = x.double(), w.double(), grad.double()
    b = None if b is None else b.double()
    if op == "conv3x3_pool":
        p = ref.conv3x3_preact(x, w, b)
        gp = _unpool_code(grad, code, p.shape[2], p.shape[3]) * ref.epilogue_derivative(p, act, alpha, gain, clamp)
        return ref._conv_grads(gp, x, w, b is not None, (True, True, True))
    back = ref.conv3x3_backward if op == "conv3x3" else ref.up_conv3x3_backward
    return back(grad, x, w, b, act, alpha, gain, clamp)


def _run(op, ci, co, h, dtype, layout, act="lrelu", gain=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = random_input(BATCH, ci, h, h, dtype=dtype, layout=layout, device=DEVICE, generator=gen).requires_grad_()
    w = random_input(co, ci, 3, 3, dtype=dtype, device=DEVICE, generator=gen, scale=1 / (3 * ci**0.5)).requires_grad_()
    b = random_input(co, dtype=dtype, device=DEVICE, generator=gen, scale=0.3).requires_grad_()
    y, saved = getattr(reg, f"{op}_op")(x, w, b, act, 0.2, gain, None, "triton")
    grad = random_input(*y.shape, dtype=dtype, device=DEVICE, generator=gen)
    y.backward(grad)
    torch.cuda.synchronize()
    want = _reference_grads(op, grad, x.detach(), w.detach(), b.detach(), act, 0.2, gain, None, saved)
    return (x.grad, w.grad, b.grad), want, x


def _check(op, ci, co, h, dtype, layout="channels_last", act="lrelu", gain=1.0):
    got, want, x = _run(op, ci, co, h, dtype, layout, act, gain)
    tol = tolerance(dtype, tf32=dtype == torch.float32 and torch.backends.cudnn.allow_tf32)
    for name, g, r in zip(("gx", "gw", "gb"), got, want, strict=True):
        assert g.dtype == dtype
        assert_close_rel(g, r, tol=tol, what=f"{op} {ci}->{co} H={h} {dtype} {layout} {act} {name}")
    assert ref.memory_format_of(got[0]) == ref.memory_format_of(x)


@pytest.fixture(autouse=True)
def _triton_backward_registered():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cb = _cb()
    for op in ("conv3x3", "conv3x3_pool", "up_conv3x3"):
        if "triton" not in gankernels.ops.dispatch.registered_backends(op):
            pytest.skip("the triton forward is not registered")
        assert gankernels.ops.dispatch.get_impl(op, "triton").backward is cb.BACKWARDS[op]


@pytest.mark.parametrize("ci, co, h", GENERATOR_ROWS)
def test_generator_rows_bf16(ci, co, h):
    _check("up_conv3x3", ci, co, h, torch.bfloat16)


@pytest.mark.parametrize("ci, co, h", DISCRIMINATOR_ROWS)
def test_discriminator_rows_bf16(ci, co, h):
    _check("conv3x3_pool", ci, co, h, torch.bfloat16)


@pytest.mark.parametrize("ci, co, h", DISCRIMINATOR_ROWS[1:3])
def test_conv3x3_rows_bf16(ci, co, h):
    _check("conv3x3", ci, co, h, torch.bfloat16)


def test_to_rgb_narrow_output():
    # The generator's last layer (32 -> 3, tanh): gp rows of 3 channels (unaligned for
    # vector loads), wgrad's narrowest swapped tile, dgrad's K tail.
    _check("conv3x3", 32, 3, 64, torch.bfloat16, act="tanh")


@pytest.mark.parametrize("op", ["conv3x3_pool", "up_conv3x3"])
def test_split_counts_agree(op):
    # Different wgrad split counts sum the same products in another order: equal to
    # rounding, each bitwise reproducible (checked in test_deterministic).
    cb = _cb()
    gen = torch.Generator().manual_seed(3)
    ci, co, h = 64, 128, 16
    x = random_input(BATCH, ci, h, h, dtype=torch.bfloat16, layout="channels_last", device=DEVICE, generator=gen)
    w = random_input(co, ci, 3, 3, dtype=torch.bfloat16, device=DEVICE, generator=gen, scale=1 / (3 * ci**0.5))
    b = random_input(co, dtype=torch.bfloat16, device=DEVICE, generator=gen)
    out, saved = getattr(reg, f"{op}_op")(x, w, b, "lrelu", 0.2, 1.0, None, "triton")
    grad = random_input(*out.shape, dtype=torch.bfloat16, device=DEVICE, generator=gen)
    grads = [cb.fused_backward(op, grad, x, w, b, out, saved, "lrelu", 0.2, 1.0, None, split=s)[1:] for s in (1, 3, 7)]
    for gw, gb in grads[1:]:
        assert_close_rel(gw, grads[0][0], tol=tolerance(torch.bfloat16), what=f"{op} gw across splits")
        assert_close_rel(gb, grads[0][1], tol=tolerance(torch.bfloat16), what=f"{op} gb across splits")


@pytest.mark.parametrize("op", ["conv3x3", "conv3x3_pool", "up_conv3x3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dtypes_nchw_and_silu(op, dtype):
    # silu takes the recompute path (pre-activation from the forward kernel).
    _check(op, 64, 32, 16, dtype, layout="nchw", act="silu")
    _check(op, 48, 40, 12, dtype, layout="noncontiguous", act="tanh", gain=1.5)


@pytest.mark.parametrize("op", ["conv3x3_pool", "up_conv3x3"])
def test_deterministic(op):
    a, _, _ = _run(op, 64, 128, 32, torch.bfloat16, "channels_last")
    b, _, _ = _run(op, 64, 128, 32, torch.bfloat16, "channels_last")
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v), "split-K wgrad must be bitwise reproducible"


def test_cudnn_switch():
    cb = _cb()
    before = dict(cb.CUDNN_PARTS)
    try:
        cb.CUDNN_PARTS.update(dgrad=True, wgrad=True)
        _check("conv3x3", 64, 64, 16, torch.bfloat16)
    finally:
        cb.CUDNN_PARTS.update(before)


def test_r1_penalty_matches_torch():
    for op in ("conv3x3", "conv3x3_pool"):
        res = {}
        for backend in ("torch", "triton"):
            gen = torch.Generator().manual_seed(5)
            x = random_input(2, 16, 16, 16, device=DEVICE, generator=gen, layout="channels_last").requires_grad_()
            w = random_input(32, 16, 3, 3, device=DEVICE, generator=gen, scale=0.1).requires_grad_()
            b = random_input(32, device=DEVICE, generator=gen).requires_grad_()
            y = getattr(gankernels, op)(x, w, b, act="lrelu", backend=backend)
            (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            gx.square().sum().backward()
            res[backend] = (gx.detach(), w.grad, b.grad)
        for name, u, v in zip(("gx", "dR1/dw", "dR1/db"), res["triton"], res["torch"], strict=True):
            assert_close_rel(u, v, tol=tolerance(torch.float32, tf32=True), what=f"{op} {name}")


def test_stock_block_agrees():
    # The whole generator block through nn-style stock ops vs the fused op, bf16.
    gen = torch.Generator().manual_seed(9)
    x = random_input(2, 128, 16, 16, dtype=torch.bfloat16, device=DEVICE, generator=gen, layout="channels_last")
    w = random_input(64, 128, 3, 3, dtype=torch.bfloat16, device=DEVICE, generator=gen, scale=0.03)
    b = random_input(64, dtype=torch.bfloat16, device=DEVICE, generator=gen)
    grads = []
    for fused in (True, False):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        if fused:
            y = gankernels.up_conv3x3(xs, ws, bs, act="lrelu", backend="triton")
        else:
            xd, wd, bd = (t.double() for t in (xs, ws, bs))
            y = F.leaky_relu(F.conv2d(F.interpolate(xd, scale_factor=2, mode="nearest"), wd, bd, padding=1), 0.2)
        y.float().square().mean().backward()
        grads.append((xs.grad, ws.grad, bs.grad))
    for name, u, v in zip(("gx", "gw", "gb"), grads[0], grads[1], strict=True):
        assert_close_rel(u, v, tol=tolerance(torch.bfloat16) * 2, what=name)
