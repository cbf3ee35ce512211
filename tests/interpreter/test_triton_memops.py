"""The Triton max-pool, upsample and bias_act kernels on CPU, under the Triton
interpreter (TRITON_INTERPRET=1, its own process: see tests/conftest.py).

Every case calls the public API with ``backend="triton"`` (so the dispatcher and the
registered op are exercised), on fresh seeded random inputs, with the kernels' output
buffers poisoned (NaN / -1), and compares forward and backward with the float64
reference (indices exactly with PyTorch's). fp32 and fp16; bf16 runs on GPU only.

max_pool2d runs both ways: ``return_indices=True`` (int64 indices saved) and False (the
training default: an int8 window code saved, decoded here to PyTorch's indices).
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

DTYPES = (torch.float32, torch.float16)
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    for mod in (tmax_pool, tupsample, tbias_act):
        monkeypatch.setattr(mod, "POISON_OUTPUTS", True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_format(out: torch.Tensor, x: torch.Tensor, what: str) -> None:
    fmt = ref.memory_format_of(x)
    assert out.is_contiguous(memory_format=fmt), f"{what}: not in x's memory format {fmt} (strides {out.stride()})"


# ----------------------------------------------------------------------------------
# max_pool2d

POOL_CONFIGS = ((2, 2, 0), (3, 2, 1))  # (kernel, stride, padding)


def _pool_input(shape, dtype, layout, seed, specials: bool) -> torch.Tensor:
    x = random_input(*shape, dtype=dtype, layout=layout, generator=_gen(seed))
    if specials:
        # Two NaNs in one window (the last one must win), a lone NaN, ties, and an
        # all -inf 2×2 window (its first element must be reported).
        x[0, 0, 0, 0] = NAN
        x[0, 0, 1, 1] = NAN
        x[0, 1, 3, 2] = NAN
        x[0, 2, 2:4, 4:6] = 1.5
        x[0, 3, 4:6, 2:4] = -INF
    return x


def _decode_codes(code: torch.Tensor, k: int, s: int, p: int, width: int) -> torch.Tensor:
    """PyTorch's flat per-plane indices from the triton backend's window codes
    ``ky * k + kx``: input position (ho*s - p + ky, wo*s - p + kx)."""
    ho = torch.arange(code.shape[2]).view(-1, 1)
    wo = torch.arange(code.shape[3]).view(1, -1)
    code = code.long()
    return (ho * s - p + code // k) * width + (wo * s - p + code % k)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", POOL_CONFIGS, ids=["2x2s2", "3x3s2p1"])
@pytest.mark.parametrize("ceil_mode", (False, True))
@pytest.mark.parametrize("shape", ((1, 5, 7, 9), (2, 4, 8, 6)), ids=["n1_odd", "n2_even"])
@pytest.mark.parametrize("return_indices", (True, False), ids=["idx64", "code8"])
def test_max_pool2d(layout, dtype, cfg, ceil_mode, shape, return_indices):
    k, s, p = cfg
    x = _pool_input(shape, dtype, layout, seed=1, specials=True)
    xt = x.detach().clone().requires_grad_(True)
    # The registered op itself, to see what it saves for the backward.
    out, saved = torch.ops.gankernels.max_pool2d.default(xt, [k, k], [s, s], [p, p], [1, 1], ceil_mode, return_indices, "triton")

    x64 = x.detach().double().requires_grad_(True)
    ref_out, ref_idx = F.max_pool2d(x64, k, s, p, ceil_mode=ceil_mode, return_indices=True)
    assert out.dtype == dtype and saved.shape == ref_out.shape
    if return_indices:
        assert saved.dtype == torch.int64
        idx = saved
    else:
        assert saved.dtype == torch.int8, f"return_indices=False must save a 1-byte window code, got {saved.dtype}"
        assert 0 <= int(saved.min()) and int(saved.max()) < k * k, "window code out of range"
        idx = _decode_codes(saved, k, s, p, x.shape[3])
    assert torch.equal(idx, ref_idx), f"indices differ from PyTorch's:\n{idx}\n{ref_idx}"
    # PyTorch on the input's own dtype agrees too (the float64 reference is exact here).
    assert torch.equal(idx, F.max_pool2d(x, k, s, p, ceil_mode=ceil_mode, return_indices=True)[1])
    assert_close_rel(out, ref_out, dtype=dtype, what="max_pool2d forward")
    _assert_format(out, x, "max_pool2d out")
    _assert_format(saved, x, "max_pool2d saved")
    if not return_indices:  # and the public call agrees
        public = gankernels.max_pool2d(x, k, s, p, ceil_mode=ceil_mode, backend="triton")
        torch.testing.assert_close(public, out.detach(), rtol=0, atol=0, equal_nan=True)

    g = random_input(*out.shape, dtype=dtype, generator=_gen(2))
    out.backward(g)
    ref_out.backward(g.double())
    assert_close_rel(xt.grad, x64.grad, dtype=dtype, what="max_pool2d backward")
    _assert_format(xt.grad, x, "max_pool2d grad")


@pytest.mark.parametrize("cfg", POOL_CONFIGS, ids=["2x2s2", "3x3s2p1"])
def test_max_pool2d_noncontiguous_grad_and_unbatched(cfg):
    k, s, p = cfg
    x = random_input(3, 9, 11, dtype=torch.float32, generator=_gen(3)).requires_grad_(True)  # [C, H, W]
    out = gankernels.max_pool2d(x, k, s, p, backend="triton")
    x64 = x.detach().double().requires_grad_(True)
    ref_out = F.max_pool2d(x64, k, s, p)
    assert_close_rel(out, ref_out, what="max_pool2d unbatched forward")
    # sum() hands the backward an expanded (stride-0) gradient.
    (out.sum() * 3).backward()
    (ref_out.sum() * 3).backward()
    assert_close_rel(x.grad, x64.grad, what="max_pool2d backward, expanded grad")


@pytest.mark.parametrize("cfg", POOL_CONFIGS, ids=["2x2s2", "3x3s2p1"])
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_max_pool2d_fake_saved_and_opcheck(cfg, layout):
    """The op with return_indices=False passes opcheck (schema, autograd registration,
    fake tensor, AOT dispatch): the backend's fake_saved matches what it really saves."""
    k, s, p = cfg
    x = random_input(1, 3, 5, 6, layout=layout, generator=_gen(60)).requires_grad_(True)
    args = ([k, k], [s, s], [p, p], [1, 1], True)  # ceil_mode: a clipped last window
    _, saved = torch.ops.gankernels.max_pool2d.default(x, *args, False, "triton")
    fake = tmax_pool.fake_saved(x, *args, False)
    assert (fake.shape, fake.dtype, fake.stride()) == (saved.shape, saved.dtype, saved.stride())
    torch.library.opcheck(torch.ops.gankernels.max_pool2d.default, (x, *args, False, "triton"))


@pytest.mark.parametrize("cfg", POOL_CONFIGS, ids=["2x2s2", "3x3s2p1"])
def test_max_pool2d_double_backward(cfg):
    """R1-style: the gradient w.r.t. the input, with create_graph, then differentiated
    again; the triton op (which saved window codes) matches the torch backend."""
    k, s, p = cfg
    x0 = random_input(2, 3, 7, 8, generator=_gen(70), layout="channels_last")
    w0 = random_input(3, generator=_gen(71))
    v = random_input(*F.max_pool2d(x0, k, s, p).shape, generator=_gen(72))

    def grads(backend: str):
        x = x0.detach().clone().requires_grad_(True)
        w = w0.detach().clone().requires_grad_(True)
        y = gankernels.max_pool2d(x * w.view(1, -1, 1, 1), k, s, p, backend=backend)
        score = (y.square() * v).sum()
        (gx,) = torch.autograd.grad(score, x, create_graph=True)
        gx.square().sum().backward()
        return gx.detach(), x.grad, w.grad

    for got, want, what in zip(grads("triton"), grads("torch"), ("grad x", "R1 grad x", "R1 grad w"), strict=True):
        assert_close_rel(got, want.double(), what=f"max_pool2d double backward: {what}")


def test_max_pool2d_backward_rejects_wrong_saved():
    x = random_input(1, 2, 4, 4, generator=_gen(80))
    g = random_input(1, 2, 2, 2, generator=_gen(81))
    with pytest.raises(ValueError, match="saved: expected int64 indices or torch.int8"):
        bad = torch.zeros(1, 2, 2, 2, dtype=torch.int32)
        tmax_pool.max_pool2d_backward(g, x, bad, [2, 2], [2, 2], [0, 0], [1, 1], False, False)


def test_max_pool2d_unsupported_config_is_refused():
    x = random_input(1, 3, 8, 8, generator=_gen(4))
    for kwargs in (dict(kernel_size=3, stride=1), dict(kernel_size=2, stride=2, dilation=2), dict(kernel_size=3, stride=2)):
        with pytest.raises(gankernels.BackendUnavailable, match="serves 2×2 stride 2 and 3×3 stride 2 padding 1 only"):
            gankernels.max_pool2d(x, backend="triton", **kwargs)
        # auto passes triton over and serves it with torch.
        out = gankernels.max_pool2d(x, backend="auto", **kwargs)
        assert torch.equal(out, F.max_pool2d(x, **kwargs))
    # triton can serve 2×2 (auto picks by measurement; CPU calls are not timed: stock)
    assert "triton" in gankernels.explain("max_pool2d", x, 2).candidates
    assert gankernels.explain("max_pool2d", x, 3, 1).candidates == ("torch",)


def test_max_pool2d_bfloat16_refused_under_interpreter():
    x = random_input(1, 3, 8, 8, dtype=torch.bfloat16, generator=_gen(5))
    with pytest.raises(gankernels.BackendUnavailable, match="bfloat16"):
        gankernels.max_pool2d(x, 2, backend="triton")


# ----------------------------------------------------------------------------------
# upsample_nearest2d


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", (2, 3, 1))
def test_upsample_nearest2d(layout, dtype, scale):
    x = random_input(1, 5, 7, 9, dtype=dtype, layout=layout, generator=_gen(6))
    xt = x.detach().clone().requires_grad_(True)
    y = gankernels.upsample_nearest2d(xt, scale, backend="triton")
    x64 = x.detach().double().requires_grad_(True)
    ref_y = ref.upsample_nearest2d(x64, scale)
    assert torch.equal(y.double(), ref_y.detach()), "nearest upsampling must copy exactly"
    assert_close_rel(y, ref_y, dtype=dtype, what="upsample forward")
    _assert_format(y, x, "upsample out")

    g = random_input(*y.shape, dtype=dtype, generator=_gen(7))
    y.backward(g)
    ref_y.backward(g.double())
    assert_close_rel(xt.grad, x64.grad, dtype=dtype, what="upsample backward")
    _assert_format(xt.grad, x, "upsample grad")


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_upsample_backward_strided_grads(layout):
    x = random_input(2, 3, 5, 4, layout=layout, generator=_gen(8)).requires_grad_(True)
    y = gankernels.upsample_nearest2d(x, 2, backend="triton")
    # An expanded (stride-0) grad, then a non-contiguous one, straight to the backend.
    (y.sum() * 2).backward()
    assert_close_rel(x.grad, torch.full(x.shape, 8.0, dtype=torch.float64), what="upsample backward, expanded grad")
    g = random_input(*y.shape, layout="noncontiguous", generator=_gen(9))
    gx = tupsample.upsample_nearest2d_backward(g, 2)
    assert_close_rel(gx, ref.upsample_nearest2d_backward(g.double(), 2), what="upsample backward, strided grad")


# ----------------------------------------------------------------------------------
# bias_act

EPILOGUES = ((1.0, None), (1.7, 0.6))  # (gain, clamp)


def _check_bias_act(x, b, act, gain, clamp, dim, alpha=0.2, seed=0):
    dtype = x.dtype
    xt = x.detach().clone().requires_grad_(True)
    bt = None if b is None else b.detach().clone().requires_grad_(True)
    y = gankernels.bias_act(xt, bt, act, alpha, gain, clamp, dim, backend="triton")
    x64 = x.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    ref_y = ref.bias_act(x64, b64, act, alpha, gain, clamp, dim)
    what = f"bias_act {act} gain={gain} clamp={clamp} dim={dim} bias={b is not None}"
    assert y.dtype == dtype
    assert_close_rel(y, ref_y, dtype=dtype, what=what + " forward")
    _assert_format(y, x, what)

    g = random_input(*y.shape, dtype=dtype, generator=_gen(seed + 100))
    y.backward(g)
    ref_y.backward(g.double())
    assert_close_rel(xt.grad, x64.grad, dtype=dtype, what=what + " grad x")
    _assert_format(xt.grad, x, what + " grad x")
    if b is not None:
        assert bt.grad.dtype == b.dtype
        assert_close_rel(bt.grad, b64.grad, dtype=dtype, what=what + " grad b")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_bias_act_4d(layout, dtype, act):
    for i, (gain, clamp) in enumerate(EPILOGUES):
        for with_bias in (True, False):
            x = random_input(1, 5, 7, 9, dtype=dtype, layout=layout, generator=_gen(10 + i))
            b = random_input(5, dtype=dtype, generator=_gen(20 + i)) if with_bias else None
            _check_bias_act(x, b, act, gain, clamp, dim=1, seed=i)


@pytest.mark.parametrize(
    "shape,dim,layout",
    [
        ((2, 5, 7, 9), 3, "channels_last"),  # bias along W of a channels_last tensor
        ((2, 5, 7, 9), 0, "nchw"),
        ((2, 5, 7, 9), -2, "noncontiguous"),
        ((6, 13), 1, "nchw"),  # [B, C] (a linear layer's output): bias along the contiguous dim
        ((4, 6, 11), 1, "nchw"),
        ((31,), 0, "nchw"),
        ((3, 1, 4, 5), 1, "nchw"),  # C = 1
        ((9000, 3), 1, "nchw"),  # several row groups of gb partials
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_act_other_dims(shape, dim, layout, dtype):
    if len(shape) == 4:
        x = random_input(*shape, dtype=dtype, layout=layout, generator=_gen(30))
    else:
        x = random_input(*shape, dtype=dtype, generator=_gen(30))
    b = random_input(shape[dim], dtype=dtype, generator=_gen(31))
    for act, gain, clamp in (("lrelu", 1.4, None), ("silu", 1.0, 0.5), ("tanh", 2.0, None)):
        _check_bias_act(x, b, act, gain, clamp, dim=dim)


# exp(±1e4) overflows to inf on purpose (the formulas saturate correctly); numpy warns.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_bias_act_nan_and_large_values(act):
    x = random_input(1, 3, 4, 5, generator=_gen(40), scale=30.0)
    x[0, 0, 0, :3] = torch.tensor([NAN, 1e4, -1e4])
    b = random_input(3, generator=_gen(41))
    y = gankernels.bias_act(x, b, act, 0.2, 1.0, None, 1, backend="triton")
    assert_close_rel(y, ref.bias_act(x.double(), b.double(), act, 0.2, 1.0, None, 1), what=f"bias_act {act} with NaN/large")
    y = gankernels.bias_act(x, b, act, 0.2, 1.0, 0.3, 1, backend="triton")
    assert_close_rel(y, ref.bias_act(x.double(), b.double(), act, 0.2, 1.0, 0.3, 1), what=f"bias_act {act} clamped with NaN")


def test_bias_act_double_backward():
    x = random_input(2, 3, 4, 5, generator=_gen(50)).requires_grad_(True)
    b = random_input(3, generator=_gen(51)).requires_grad_(True)
    (gx,) = torch.autograd.grad(gankernels.bias_act(x, b, "silu", gain=1.3, backend="triton").square().sum(), x, create_graph=True)
    gxx, gbb = torch.autograd.grad(gx.square().sum(), (x, b))
    x64, b64 = x.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    (rx,) = torch.autograd.grad(ref.bias_act(x64, b64, "silu", gain=1.3).square().sum(), x64, create_graph=True)
    rxx, rbb = torch.autograd.grad(rx.square().sum(), (x64, b64))
    assert_close_rel(gx, rx, what="bias_act first-order grad")
    assert_close_rel(gxx, rxx, what="bias_act double backward (x)")
    assert_close_rel(gbb, rbb, what="bias_act double backward (b)")


@pytest.mark.parametrize("dim", [1, 3])
def test_bias_act_backward_without_the_bias_gradient(dim):
    """needs=(True, False) (a bias that needs no gradient): no reduction, gb None, gx the same."""
    x = random_input(2, 3, 4, 5, generator=_gen(60))
    b = random_input(x.shape[dim], generator=_gen(61))
    grad = random_input(*x.shape, generator=_gen(62))
    args = dict(grad=grad, x=x, b=b, y=x.new_empty((0,)), act="lrelu", alpha=0.2, gain=1.0, clamp=None, dim=dim)
    gx_all, gb_all = tbias_act.bias_act_backward(**args)
    gx, gb = tbias_act.bias_act_backward(**args, needs=(True, False))
    assert gb is None and gb_all is not None
    torch.testing.assert_close(gx, gx_all, rtol=0, atol=0)
    shape = [1] * 4
    shape[dim] = -1
    x64 = x.double()
    want = grad.double() * torch.where(x64 + b.double().view(shape) > 0, 1.0, 0.2)
    assert_close_rel(gx, want, what="bias_act gx without gb")
