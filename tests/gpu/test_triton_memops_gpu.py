"""The Triton max-pool, upsample and bias_act kernels on a CUDA GPU (marked ``gpu``;
skipped without CUDA): the interpreter tests' checks plus bfloat16, the ANCHORS shape
64×128×64×64, 64-bit offsets, torch.compile(fullgraph=True) and CUDA-graph capture.

Outputs are poisoned (NaN / -1) before each kernel runs and everything is compared with
the float64 reference; indices exactly with PyTorch's. max_pool2d runs with
``return_indices`` True (int64 indices saved) and False (the training default: an int8
window code saved, decoded here and compared with PyTorch's indices).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gankernels
from gankernels.ops import reference as ref
from gankernels.testing import LAYOUTS, assert_close_rel, random_input
from gankernels.triton import bias_act as tbias_act
from gankernels.triton import max_pool as tmax_pool
from gankernels.triton import upsample as tupsample

pytestmark = pytest.mark.gpu

# bf16 (which the interpreter cannot run) on every layout; fp32/fp16, whose logic the
# interpreter tests cover in full, on the two dense layouts. Each (dtype, layout,
# config) is a separate Triton compilation, so the matrix is kept to what adds coverage.
DTYPE_LAYOUTS = [(torch.bfloat16, layout) for layout in LAYOUTS] + [
    (dtype, layout) for dtype in (torch.float32, torch.float16) for layout in ("nchw", "channels_last")
]
ANCHOR_SHAPE = (64, 128, 64, 64)
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    for mod in (tmax_pool, tupsample, tbias_act):
        monkeypatch.setattr(mod, "POISON_OUTPUTS", True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, dtype, layout, seed):
    return random_input(*shape, dtype=dtype, layout=layout, device="cuda", generator=_gen(seed))


def _assert_format(out: torch.Tensor, x: torch.Tensor, what: str) -> None:
    fmt = ref.memory_format_of(x)
    assert out.is_contiguous(memory_format=fmt), f"{what}: not in x's memory format {fmt} (strides {out.stride()})"


# ----------------------------------------------------------------------------------
# max_pool2d


def _decode_codes(code: torch.Tensor, k: int, s: int, p: int, width: int) -> torch.Tensor:
    """PyTorch's flat per-plane indices from the window codes ``ky * k + kx``."""
    ho = torch.arange(code.shape[2], device=code.device).view(-1, 1)
    wo = torch.arange(code.shape[3], device=code.device).view(1, -1)
    code = code.long()
    return (ho * s - p + code // k) * width + (wo * s - p + code % k)


def _check_max_pool(x, k, s, p, ceil_mode, return_indices):
    dtype = x.dtype
    xt = x.detach().clone().requires_grad_(True)
    out, saved = torch.ops.gankernels.max_pool2d.default(xt, [k, k], [s, s], [p, p], [1, 1], ceil_mode, return_indices, "triton")
    x64 = x.detach().double().requires_grad_(True)
    ref_out, ref_idx = F.max_pool2d(x64, k, s, p, ceil_mode=ceil_mode, return_indices=True)
    if return_indices:
        assert saved.dtype == torch.int64
        idx = saved
    else:
        assert saved.dtype == torch.int8 and saved.shape == ref_out.shape
        idx = _decode_codes(saved, k, s, p, x.shape[3])
    assert torch.equal(idx, ref_idx), "indices differ from PyTorch's"
    assert_close_rel(out, ref_out, dtype=dtype, what="max_pool2d forward")
    _assert_format(out, x, "max_pool2d out")
    _assert_format(saved, x, "max_pool2d saved")
    g = random_input(*out.shape, dtype=dtype, device="cuda", generator=_gen(2))
    out.backward(g)
    ref_out.backward(g.double())
    assert_close_rel(xt.grad, x64.grad, dtype=dtype, what="max_pool2d backward")
    _assert_format(xt.grad, x, "max_pool2d grad")


@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS)
@pytest.mark.parametrize("cfg", ((2, 2, 0), (3, 2, 1)), ids=["2x2s2", "3x3s2p1"])
@pytest.mark.parametrize("ceil_mode", (False, True))
@pytest.mark.parametrize("return_indices", (True, False), ids=["idx64", "code8"])
def test_max_pool2d_small(dtype, layout, cfg, ceil_mode, return_indices):
    x = _x((1, 5, 7, 9), dtype, layout, seed=1)
    x[0, 0, 0, 0] = NAN
    x[0, 0, 1, 1] = NAN
    x[0, 2, 2:4, 4:6] = 1.5
    x[0, 3, 4:6, 2:4] = -INF
    _check_max_pool(x, *cfg, ceil_mode, return_indices)


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("cfg", ((2, 2, 0), (3, 2, 1)), ids=["2x2s2", "3x3s2p1"])
@pytest.mark.parametrize("return_indices", (True, False), ids=["idx64", "code8"])
def test_max_pool2d_anchor_shape(layout, dtype, cfg, return_indices):
    _check_max_pool(_x(ANCHOR_SHAPE, dtype, layout, seed=3), *cfg, False, return_indices)


# ----------------------------------------------------------------------------------
# upsample_nearest2d


def _check_upsample(x, scale):
    dtype = x.dtype
    xt = x.detach().clone().requires_grad_(True)
    y = gankernels.upsample_nearest2d(xt, scale, backend="triton")
    x64 = x.detach().double().requires_grad_(True)
    ref_y = ref.upsample_nearest2d(x64, scale)
    assert torch.equal(y.double(), ref_y.detach()), "nearest upsampling must copy exactly"
    _assert_format(y, x, "upsample out")
    g = random_input(*y.shape, dtype=dtype, device="cuda", generator=_gen(7))
    y.backward(g)
    ref_y.backward(g.double())
    assert_close_rel(xt.grad, x64.grad, dtype=dtype, what="upsample backward")
    _assert_format(xt.grad, x, "upsample grad")


@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS)
def test_upsample_small(dtype, layout):
    _check_upsample(_x((1, 5, 7, 9), dtype, layout, seed=6), 2)
    if dtype == torch.bfloat16:
        _check_upsample(_x((1, 5, 7, 9), dtype, layout, seed=6), 3)


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_upsample_anchor_shape(layout, dtype):
    _check_upsample(_x(ANCHOR_SHAPE, dtype, layout, seed=8), 2)


# ----------------------------------------------------------------------------------
# bias_act


def _check_bias_act(x, b, act, gain, clamp, dim=1, alpha=0.2):
    dtype = x.dtype
    xt = x.detach().clone().requires_grad_(True)
    bt = None if b is None else b.detach().clone().requires_grad_(True)
    y = gankernels.bias_act(xt, bt, act, alpha, gain, clamp, dim, backend="triton")
    x64 = x.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    ref_y = ref.bias_act(x64, b64, act, alpha, gain, clamp, dim)
    what = f"bias_act {act} gain={gain} clamp={clamp} dim={dim} {dtype}"
    assert_close_rel(y, ref_y, dtype=dtype, what=what + " forward")
    _assert_format(y, x, what)
    g = random_input(*y.shape, dtype=dtype, device="cuda", generator=_gen(11))
    y.backward(g)
    ref_y.backward(g.double())
    assert_close_rel(xt.grad, x64.grad, dtype=dtype, what=what + " grad x")
    if b is not None:
        assert_close_rel(bt.grad, b64.grad, dtype=dtype, what=what + " grad b")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_bias_act_every_act_bf16(layout, act):
    x = _x((2, 5, 7, 9), torch.bfloat16, layout, seed=10)
    b = random_input(5, dtype=torch.bfloat16, device="cuda", generator=_gen(12))
    _check_bias_act(x, b, act, 1.7, 0.6)
    if act == "lrelu":
        _check_bias_act(x, None, act, 1.0, None)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_bias_act_lrelu(layout, dtype):
    x = _x((2, 5, 7, 9), dtype, layout, seed=13)
    b = random_input(5, dtype=dtype, device="cuda", generator=_gen(14))
    _check_bias_act(x, b, "lrelu", 1.4, 0.5)


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_bias_act_anchor_shape(layout, dtype):
    x = _x(ANCHOR_SHAPE, dtype, layout, seed=15)
    b = random_input(ANCHOR_SHAPE[1], dtype=dtype, device="cuda", generator=_gen(16))
    _check_bias_act(x, b, "lrelu", 2**0.5, None)


# ----------------------------------------------------------------------------------
# 64-bit offsets, torch.compile, CUDA graphs


def test_int64_offsets():
    """Tensors of more than 2**31 elements (about 4.3 GB each in bf16) go through the
    int64 index path; the far end of each result is checked against the reference."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    n = 2**31 + 2**20  # elements
    x = torch.randn((1, 2, 8, n // 16), device="cuda", dtype=torch.bfloat16)  # [1, 2, 8, ~134M]
    tail = (..., slice(-64, None))
    out, idx = tmax_pool.max_pool2d_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    # The last 64 output columns pool the last 128 input columns.
    r_out, r_idx = F.max_pool2d(x[..., -128:].float(), 2, return_indices=True)
    assert torch.equal(out[tail].float(), r_out)
    width = x.shape[-1]
    assert torch.equal(idx[tail], (r_idx // 128) * width + (width - 128) + r_idx % 128)
    del out, idx
    # The 1-byte window code path (return_indices=False) and its backward, same tail.
    out, code = tmax_pool.max_pool2d_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False, False)
    assert code.dtype == torch.int8 and torch.equal(out[tail].float(), r_out)
    assert torch.equal(_decode_codes(code[tail], 2, 2, 0, 128), r_idx)
    g = torch.ones_like(out)
    del out
    gx = tmax_pool.max_pool2d_backward(g, x, code, [2, 2], [2, 2], [0, 0], [1, 1], False, False)
    del g, code
    r_gx = torch.ops.aten.max_pool2d_with_indices_backward(
        torch.ones_like(r_out), x[..., -128:].float(), [2, 2], [2, 2], [0, 0], [1, 1], False, r_idx
    )
    assert torch.equal(gx[..., -128:].float(), r_gx)
    del gx
    b = torch.randn(2, device="cuda", dtype=torch.bfloat16)
    y = tbias_act.bias_act_forward(x, b, "lrelu", 0.2, 1.0, None, 1)
    assert_close_rel(y[tail], ref.bias_act(x[tail].double(), b.double(), "lrelu", 0.2, 1.0, None, 1), what="bias_act int64")
    del y
    xs = x[..., : n // 64]  # 2**29 + 2**18 elements -> 2**31 + 2**20 upsampled
    y = tupsample.upsample_nearest2d_forward(xs.contiguous(), 2)
    assert torch.equal(y[..., -4:, -128:], F.interpolate(xs[..., -2:, -64:], scale_factor=2, mode="nearest"))


def test_torch_compile_fullgraph():
    def block(x, b):
        y = gankernels.bias_act(x, b, "lrelu", backend="triton")
        y = gankernels.max_pool2d(y, 2, backend="triton")
        return gankernels.upsample_nearest2d(y, 2, backend="triton")

    x = _x((2, 8, 16, 16), torch.bfloat16, "channels_last", seed=20)
    b = random_input(8, dtype=torch.bfloat16, device="cuda", generator=_gen(21))
    compiled = torch.compile(block, fullgraph=True)
    xe = x.detach().clone().requires_grad_(True)
    xc = x.detach().clone().requires_grad_(True)
    ye, yc = block(xe, b), compiled(xc, b)
    assert torch.equal(ye, yc)
    yc.float().square().sum().backward()
    ye.float().square().sum().backward()
    assert torch.equal(xe.grad, xc.grad)


def test_cuda_graph_capture():
    x = _x((2, 8, 16, 16), torch.float16, "channels_last", seed=22)
    b = random_input(8, dtype=torch.float16, device="cuda", generator=_gen(23))

    def step():
        y = gankernels.bias_act(x, b, "silu", backend="triton")
        return gankernels.upsample_nearest2d(gankernels.max_pool2d(y, 3, 2, 1, backend="triton"), 2, backend="triton")

    expected = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compile) outside the capture, on a side stream
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(_x((2, 8, 16, 16), torch.float16, "channels_last", seed=24))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, step())
    assert not torch.equal(captured, expected)
