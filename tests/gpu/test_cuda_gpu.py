"""The CUDA extension's kernels on a GPU, against the float64 reference, with every
buffer the extension allocates poisoned (NaN / -1) first (GANKERNELS_POISON_OUTPUTS=1),
odd shapes, NCHW / channels_last / non-contiguous inputs, fp32 / fp16 / bf16.

The extension is built first if needed (gankernels.cuda.loader.load(build=True));
skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gankernels
from gankernels.cuda import loader as cuda_backend
from gankernels.ops import reference as ref
from gankernels.testing import assert_close_rel, random_input

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "noncontiguous"]
ACTS = ["linear", "relu", "lrelu", "tanh", "sigmoid", "silu"]


@pytest.fixture(autouse=True)
def _poisoned_extension(monkeypatch):
    monkeypatch.setenv("GANKERNELS_POISON_OUTPUTS", "1")
    if torch.cuda.is_available():
        cuda_backend.load(build=True)  # raises with the compiler's message if it cannot build


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, dtype, layout, seed):
    return random_input(*shape, dtype=dtype, device="cuda", layout=layout, generator=_gen(seed))


def _fmt_ok(out: torch.Tensor, x: torch.Tensor) -> None:
    assert ref.memory_format_of(out) == ref.memory_format_of(x.contiguous(memory_format=ref.memory_format_of(x)))


# ----------------------------------------------------------------------------------
# max_pool2d


POOL_CONFIGS = [(2, 2, 0, False), (2, 2, 0, True), (3, 2, 1, False), (3, 2, 1, True), ((3, 2), (1, 2), (1, 0), False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", POOL_CONFIGS)
@pytest.mark.parametrize("shape", [(2, 16, 9, 11), (1, 3, 8, 8), (2, 24, 16, 12)])
def test_max_pool2d(dtype, layout, cfg, shape):
    k, s, p, ceil = cfg
    x = _x(shape, dtype, layout, 1).requires_grad_()
    out, idx = gankernels.max_pool2d(x, k, s, p, ceil_mode=ceil, return_indices=True, backend="cuda")
    want, widx = F.max_pool2d(x.detach(), k, s, p, ceil_mode=ceil, return_indices=True)
    assert torch.equal(out, want) and torch.equal(idx, widx)  # exact, ties included
    _fmt_ok(out, x)
    grad = _x(tuple(out.shape), dtype, "nchw", 2)
    (gx,) = torch.autograd.grad(out, x, grad)
    want_gx = ref.max_pool2d_backward(grad.double(), x.double(), widx)
    assert_close_rel(gx, want_gx, dtype=dtype, what="max_pool2d grad")


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", POOL_CONFIGS + [(3, 1, 1, False, 2)])
@pytest.mark.parametrize("shape", [(2, 16, 9, 11), (2, 24, 16, 32)])
def test_max_pool2d_saves_window_codes_without_indices(dtype, layout, cfg, shape):
    """Training's default (no indices asked for): 1-byte window codes are saved, and the
    gradient is PyTorch's (the 2×2 fast path and the gather alike)."""
    k, s, p, ceil, *dil = cfg
    d = dil[0] if dil else 1
    x = _x(shape, dtype, layout, 1).requires_grad_()
    out = gankernels.max_pool2d(x, k, s, p, d, ceil_mode=ceil, backend="cuda")
    want, widx = F.max_pool2d(x.detach(), k, s, p, d, ceil_mode=ceil, return_indices=True)
    assert torch.equal(out, want)
    _, saved = cuda_backend._ops().max_pool2d(x.detach(), *(_pair(v) for v in (k, s, p, d)), ceil, False)
    assert saved.dtype == torch.int8
    grad = _x(tuple(out.shape), dtype, "nchw", 2)
    (gx,) = torch.autograd.grad(out, x, grad)
    assert_close_rel(gx, ref.max_pool2d_backward(grad.double(), x.double(), widx), dtype=dtype, what="max_pool2d grad")


def test_max_pool2d_nan_and_inf_like_pytorch():
    x = _x((2, 8, 6, 6), torch.float32, "channels_last", 3)
    x[0, 0, 0, 0] = float("nan")
    x[0, 1, 2:4, 2:4] = float("-inf")
    x[1, 2, 1, 1] = float("inf")
    for k, s, p in ((2, 2, 0), (3, 2, 1)):
        out, idx = gankernels.max_pool2d(x, k, s, p, return_indices=True, backend="cuda")
        want, widx = F.max_pool2d(x, k, s, p, return_indices=True)
        assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())
        assert torch.equal(idx, widx)


# ----------------------------------------------------------------------------------
# upsample_nearest2d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 3, 8, 8), (2, 40, 4, 4)])
def test_upsample_nearest2d(dtype, layout, scale, shape):
    x = _x(shape, dtype, layout, 4).requires_grad_()
    y = gankernels.upsample_nearest2d(x, scale, backend="cuda")
    assert torch.equal(y, F.interpolate(x.detach(), scale_factor=scale, mode="nearest"))
    _fmt_ok(y, x)
    grad = _x(tuple(y.shape), dtype, layout, 5)
    (gx,) = torch.autograd.grad(y, x, grad)
    assert_close_rel(gx, ref.upsample_nearest2d_backward(grad.double(), scale), dtype=dtype, what="upsample grad")


# ----------------------------------------------------------------------------------
# bias_act


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gain,clamp", [(1.0, None), (1.41, 0.5)])
def test_bias_act(dtype, act, layout, gain, clamp):
    x = _x((2, 24, 7, 9), dtype, layout, 6).requires_grad_()
    b = _x((24,), dtype, "nchw", 7).requires_grad_()
    y = gankernels.bias_act(x, b, act, 0.2, gain, clamp, backend="cuda")
    want = ref.bias_act(x.double(), b.double(), act, 0.2, gain, clamp)
    assert_close_rel(y, want, dtype=dtype, what="bias_act")
    grad = _x(tuple(y.shape), dtype, "nchw", 8)
    gx, gb = torch.autograd.grad(y, (x, b), grad)
    wgx, wgb = ref.bias_act_backward(grad.double(), x.double(), b.double(), act, 0.2, gain, clamp, 1)
    assert_close_rel(gx, wgx, dtype=dtype, what="bias_act grad x")
    assert_close_rel(gb, wgb, dtype=dtype, what="bias_act grad b")


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_bias_act_any_dim_and_odd_sizes(dim):
    x = _x((3, 5, 7, 13), torch.bfloat16, "channels_last", 9)
    b = _x((x.shape[dim],), torch.bfloat16, "nchw", 10)
    y = gankernels.bias_act(x, b, "lrelu", dim=dim, backend="cuda")
    assert_close_rel(y, ref.bias_act(x.double(), b.double(), "lrelu", 0.2, 1.0, None, dim % 4), dtype=torch.bfloat16)
    x1 = _x((1001,), torch.float16, "nchw", 11)  # a tail after the 16-byte vectors
    assert_close_rel(
        gankernels.bias_act(x1, None, "silu", backend="cuda"), ref.bias_act(x1.double(), None, "silu"), dtype=torch.float16
    )


# ----------------------------------------------------------------------------------
# the small-channel direct 3×3 convolution


def _conv_inputs(n, ci, co, h, w, dtype, layout, seed):
    g = _gen(seed)
    x = random_input(n, ci, h, w, dtype=dtype, device="cuda", layout=layout, generator=g)
    wt = (torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64) / (3 * ci**0.5)).to("cuda", dtype)
    b = (torch.randn(co, generator=g, dtype=torch.float64) * 0.2).to("cuda", dtype)
    return x, wt, b


def _reference_pool_grads(grad, x, w, b, act, gain, clamp, saved, needs=(True, True, True)):
    """The reference gradients of conv3x3_pool, routed through the kernel's own argmax
    (so a near-tie the low-precision kernel resolved differently does not count)."""
    x, w, b, grad = x.double(), w.double(), b.double(), grad.double()
    p = ref.conv3x3_preact(x, w, b)
    n, co, ho, wo = grad.shape
    qh = torch.arange(ho, device=x.device).view(1, 1, ho, 1)
    qw = torch.arange(wo, device=x.device).view(1, 1, 1, wo)
    am = saved.long()
    idx = (2 * qh + am // 2) * x.shape[3] + (2 * qw + am % 2)
    gy = ref._unpool(grad, idx, p.shape)
    gp = gy * ref.epilogue_derivative(p, act, 0.2, gain, clamp)
    return ref._conv_grads(gp, x, w, True, needs)


CONV_CHANNELS = [(3, 64), (3, 16), (1, 5), (4, 4), (3, 3), (32, 3), (20, 4), (7, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ci,co", CONV_CHANNELS)
@pytest.mark.parametrize("pool", [False, True])
def test_conv3x3_small(dtype, ci, co, pool):
    for layout, (n, h, w), act, gain, clamp in (
        ("channels_last", (2, 13, 17), "lrelu", 1.0, None),
        ("nchw", (1, 34, 35), "silu", 1.41, 0.6),  # more than one 32×32 tile, odd
        ("noncontiguous", (2, 8, 8), "tanh", 1.0, None),
    ):
        x, wt, b = _conv_inputs(n, ci, co, h, w, dtype, layout, seed=ci * 100 + co)
        x.requires_grad_()
        wt.requires_grad_()
        b.requires_grad_()
        fn = gankernels.conv3x3_pool if pool else gankernels.conv3x3
        out = fn(x, wt, b, act, 0.2, gain, clamp, backend="cuda")
        want = (ref.conv3x3_pool if pool else ref.conv3x3)(x.double(), wt.double(), b.double(), act, 0.2, gain, clamp)
        what = f"{'conv3x3_pool' if pool else 'conv3x3'} {ci}->{co} {layout} {act}"
        assert_close_rel(out, want, dtype=dtype, what=what)
        _fmt_ok(out, x)
        grad = _x(tuple(out.shape), dtype, "nchw", 12)
        gx, gw, gb = torch.autograd.grad(out, (x, wt, b), grad)
        if pool:
            _, saved = cuda_backend._ops().conv3x3_small(x.detach(), wt.detach(), b.detach(), act, 0.2, gain, clamp, True)
            wgx, wgw, wgb = _reference_pool_grads(grad, x, wt, b, act, gain, clamp, saved)
        else:
            wgx, wgw, wgb = ref.conv3x3_backward(grad.double(), x.double(), wt.double(), b.double(), act, 0.2, gain, clamp)
        assert_close_rel(gx, wgx, dtype=dtype, what=what + " grad x")
        assert_close_rel(gw, wgw, dtype=dtype, what=what + " grad w")
        assert_close_rel(gb, wgb, dtype=dtype, what=what + " grad b")


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
@pytest.mark.parametrize("ci,co", [(3, 16), (16, 3)])
def test_conv3x3_small_partial_gradients(needs, ci, co):
    x, wt, b = _conv_inputs(2, ci, co, 10, 12, torch.float32, "channels_last", 13)
    grad = _x((2, co, 5, 6), torch.float32, "channels_last", 14)
    _, saved = cuda_backend._ops().conv3x3_small(x, wt, b, "relu", 0.2, 1.0, None, True)
    got = cuda_backend._ops().conv3x3_small_backward(grad, x, wt, b, saved, None, "relu", 0.2, 1.0, None, True, list(needs))
    want = _reference_pool_grads(grad, x, wt, b, "relu", 1.0, None, saved, needs)
    for need, g, w in zip(needs, got, want, strict=True):
        if need:
            assert_close_rel(g, w, dtype=torch.float32)
        else:
            assert g.numel() == 0


def test_conv3x3_small_backward_is_deterministic():
    x, wt, b = _conv_inputs(4, 3, 64, 64, 64, torch.bfloat16, "channels_last", 15)
    x.requires_grad_()
    wt.requires_grad_()
    b.requires_grad_()
    grads = []
    for _ in range(2):
        out = gankernels.conv3x3_pool(x, wt, b, "lrelu", backend="cuda")
        grads.append(torch.autograd.grad(out, (x, wt, b), torch.ones_like(out)))
    for a, c in zip(*grads, strict=True):
        assert torch.equal(a, c)


def test_conv3x3_anchor_shape_and_auto_choice():
    """The ANCHORS 3→64 discriminator block (batch reduced to 8): right answer, and
    auto picks this backend for it."""
    x, wt, b = _conv_inputs(8, 3, 64, 128, 128, torch.bfloat16, "channels_last", 16)
    assert gankernels.explain("conv3x3_pool", x, wt, b, act="lrelu").backend == "cuda"
    out = gankernels.conv3x3_pool(x, wt, b, "lrelu", backend="cuda")
    assert_close_rel(out, ref.conv3x3_pool(x.double(), wt.double(), b.double(), "lrelu"), dtype=torch.bfloat16)


@pytest.mark.parametrize("ci,co", [(3, 16), (16, 3)])
def test_conv3x3_small_backward_of_an_empty_batch(ci, co):
    """N = 0: zero weight and bias gradients, as stock autograd gives (H·W = 0 is
    covered at the kernel level by the CPU emulation; stock conv2d refuses it)."""
    x = torch.randn(0, ci, 8, 8, device="cuda").requires_grad_()
    wt = torch.randn(co, ci, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(co, device="cuda", requires_grad=True)
    out = gankernels.conv3x3(x, wt, b, "lrelu", backend="cuda")
    gx, gw, gb = torch.autograd.grad(out, (x, wt, b), torch.ones_like(out))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(wt)) and torch.equal(gb, torch.zeros_like(b))


def test_the_library_has_a_kernel_for_this_gpu():
    assert cuda_backend.device_reason(torch.cuda.current_device()) is None


def test_runs_on_the_current_stream():
    x, wt, b = _conv_inputs(2, 3, 16, 32, 32, torch.float16, "channels_last", 17)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = gankernels.conv3x3(x, wt, b, "relu", backend="cuda")
        y = gankernels.max_pool2d(out, 2, backend="cuda")
    s.synchronize()
    assert_close_rel(y, F.max_pool2d(ref.conv3x3(x.double(), wt.double(), b.double(), "relu"), 2), dtype=torch.float16)


def test_compiles_without_graph_breaks():
    x, wt, b = _conv_inputs(2, 3, 16, 16, 16, torch.bfloat16, "channels_last", 18)

    def block(x):
        y = gankernels.conv3x3_pool(x, wt, b, "lrelu", backend="cuda")
        return gankernels.upsample_nearest2d(gankernels.bias_act(y, None, "relu", backend="cuda"), 2, backend="cuda")

    compiled = torch.compile(block, fullgraph=True)
    assert torch.equal(compiled(x), block(x))


def test_strided_views_take_the_format_their_strides_suggest():
    """csrc/ops.cpp's format_of is the reference's memory_format_of, which the fake kernels
    use: a strided view of a channels_last tensor gives channels_last outputs, on the GPU
    and under FakeTensorMode alike."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.gankernels_cuda
    base = _x((2, 3, 12, 16), torch.bfloat16, "channels_last", 19)
    w = torch.randn(16, 3, 3, 3, generator=_gen(20)).to("cuda", torch.bfloat16)
    calls = {
        "conv": lambda x, w: ops.conv3x3_small(x, w, None, "relu", 0.2, 1.0, None, False)[0],
        "conv pool": lambda x, w: ops.conv3x3_small(x, w, None, "relu", 0.2, 1.0, None, True)[1],
        "max_pool2d": lambda x, w: ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False, False)[0],
        "upsample": lambda x, w: ops.upsample_nearest2d(x, 2),
    }
    for view in (base[:, :, :, ::2], base[:, :, 1:-1], base[:1, :, ::3, 2:]):
        assert not view.is_contiguous(memory_format=torch.channels_last)
        assert ref.memory_format_of(view) == torch.channels_last
        for name, call in calls.items():
            out = call(view, w)
            with FakeTensorMode() as mode:
                fake = call(mode.from_tensor(view), mode.from_tensor(w))
            assert out.stride() == fake.stride(), (name, view.stride(), out.stride(), fake.stride())
            assert ref.memory_format_of(out) == torch.channels_last, name
