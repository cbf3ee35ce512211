"""The Triton 3×3 convolution forward kernels on a CUDA GPU: bf16, fp16 and fp32
(TF32 and exact) on the ANCHORS.md block shapes (batch reduced to 8), against the
float64 reference. Skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gankernels
from gankernels.ops import reference as ref
from gankernels.testing import assert_close_rel, tolerance

pytestmark = pytest.mark.gpu

GEN_ROWS = [(512, 256, 8), (256, 128, 16), (128, 64, 32), (64, 32, 64)]
DISC_ROWS = [(3, 64, 128), (64, 128, 64), (128, 256, 32), (256, 512, 16)]
BATCH = 8


@pytest.fixture(autouse=True)
def _poison_outputs_no_tuning(monkeypatch):
    """NaN-poisoned outputs, and no autotuning unless a test asks for it (the
    ``autotune`` fixture): an autotuned kernel variant compiles every configuration,
    which the timing script needs anyway (and then finds in Triton's disk cache), but
    is too slow for every correctness case."""
    from gankernels.triton import conv3x3 as tconv

    monkeypatch.setattr(tconv, "POISON_OUTPUTS", True)
    monkeypatch.setattr(tconv, "AUTOTUNE", False)


@pytest.fixture
def autotune(monkeypatch, _poison_outputs_no_tuning):
    from gankernels.triton import conv3x3 as tconv

    monkeypatch.setattr(tconv, "AUTOTUNE", True)


@pytest.fixture
def tf32(request):
    """Set cuDNN's TF32 switch (which the Triton kernels follow) for one test."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = request.param
    yield request.param
    torch.backends.cudnn.allow_tf32 = old


def _inputs(n, ci, co, h, w, dtype, seed, layout="channels_last"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, ci, h, w, device="cuda", generator=g, dtype=torch.float64)
    wt = torch.randn(co, ci, 3, 3, device="cuda", generator=g, dtype=torch.float64) / (3 * ci**0.5)
    b = torch.randn(co, device="cuda", generator=g, dtype=torch.float64) * 0.2
    x, wt, b = x.to(dtype), wt.to(dtype), b.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        x = torch.cat([x, x], dim=3)[..., ::2]
    return x, wt, b


def _ref(op, x, w, b, act="lrelu", alpha=0.2, gain=1.0, clamp=None):
    fn = {"conv3x3": ref.conv3x3, "conv3x3_pool": ref.conv3x3_pool, "up_conv3x3": ref.up_conv3x3_naive}[op]
    return fn(x.double(), w.double(), b.double(), act, alpha, gain, clamp)


CASES = [("up_conv3x3", *r) for r in GEN_ROWS] + [("conv3x3_pool", *r) for r in DISC_ROWS] + [("conv3x3", *r) for r in DISC_ROWS]


@pytest.mark.parametrize("op,ci,co,h", CASES)
def test_anchor_shapes_bf16_autotuned(op, ci, co, h, autotune):
    x, w, b = _inputs(BATCH, ci, co, h, h, torch.bfloat16, seed=ci + h)
    out = getattr(gankernels, op)(x, w, b, act="lrelu", backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(out, _ref(op, x, w, b), dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16])
@pytest.mark.parametrize("op,ci,co,h", CASES[1::2])
def test_anchor_shapes_fp16(op, ci, co, h, dtype):
    x, w, b = _inputs(BATCH, ci, co, h, h, dtype, seed=ci + h)
    out = getattr(gankernels, op)(x, w, b, act="lrelu", backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(out, _ref(op, x, w, b), dtype=dtype)


@pytest.mark.parametrize("tf32", [True, False], indirect=True, ids=["tf32", "ieee"])
@pytest.mark.parametrize("op,ci,co,h", [CASES[0], CASES[4], CASES[6], CASES[9]])
def test_anchor_shapes_fp32(op, ci, co, h, tf32, monkeypatch):
    from gankernels.triton import conv3x3 as tconv

    monkeypatch.setattr(tconv, "AUTOTUNE", tf32)  # TF32 is what the timing script runs
    x, w, b = _inputs(BATCH, ci, co, h, h, torch.float32, seed=ci + h)
    out = getattr(gankernels, op)(x, w, b, act="lrelu", backend="triton")
    assert_close_rel(out, _ref(op, x, w, b), dtype=torch.float32, tf32=tf32)


@pytest.mark.parametrize(
    "op,layout", [("conv3x3", "nchw"), ("conv3x3_pool", "nchw"), ("up_conv3x3", "nchw"), ("conv3x3_pool", "noncontiguous")]
)
def test_other_layouts_bf16(op, layout):
    x, w, b = _inputs(2, 64, 48, 13, 10, torch.bfloat16, seed=3, layout=layout)
    out = getattr(gankernels, op)(x, w, b, act="silu", gain=1.4, clamp=1.0, backend="triton")
    assert out.is_contiguous()
    assert_close_rel(out, _ref(op, x, w, b, "silu", 0.2, 1.4, 1.0), dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "op,act", [("conv3x3", a) for a in ref.ACTIVATIONS] + [("conv3x3_pool", "silu"), ("up_conv3x3", "tanh")]
)
def test_activations_odd_shapes(op, act):
    x, w, b = _inputs(3, 17, 40, 9, 7, torch.float16, seed=5)
    out = getattr(gankernels, op)(x, w, b, act=act, alpha=0.1, gain=0.8, backend="triton")
    assert_close_rel(out, _ref(op, x, w, b, act, 0.1, 0.8, None), dtype=torch.float16)


def test_pool_saved_argmax_gpu():
    from gankernels.triton.conv3x3 import conv3x3_pool_forward

    x, w, b = _inputs(2, 64, 32, 16, 16, torch.float32, seed=9)
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        out, saved = conv3x3_pool_forward(x, w, b, "lrelu", 0.2, 1.0, None)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    y = ref.conv3x3(x.double(), w.double(), b.double(), "lrelu", 0.2, 1.0, None)
    _, flat = F.max_pool2d(y, 2, return_indices=True)
    ho, wo = out.shape[2:]
    pos = (flat // 16 - torch.arange(ho, device="cuda").view(1, 1, -1, 1) * 2) * 2 + (
        flat % 16 - torch.arange(wo, device="cuda").view(1, 1, 1, -1) * 2
    )
    assert saved.dtype == torch.int8
    assert (saved.long() == pos).float().mean() > 0.999  # near-ties may flip in fp32


def test_autocast_bf16():
    x, w, b = _inputs(4, 64, 64, 16, 16, torch.float32, seed=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gankernels.conv3x3_pool(x, w, b, act="lrelu", backend="triton")
    assert out.dtype == torch.bfloat16
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    assert_close_rel(out, _ref("conv3x3_pool", xb, wb, bb), tol=tolerance(torch.bfloat16))


def test_torch_compile_fullgraph():
    x, w, b = _inputs(2, 32, 32, 8, 8, torch.bfloat16, seed=2)

    @torch.compile(fullgraph=True)
    def f(x, w, b):
        return gankernels.up_conv3x3(x, w, b, act="lrelu", backend="triton")

    assert_close_rel(f(x, w, b), _ref("up_conv3x3", x, w, b), dtype=torch.bfloat16)
