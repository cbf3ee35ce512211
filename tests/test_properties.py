"""Property tests of every op on the torch backend against the float64 reference
(issue 18), and the regression cases those searches (and the issue) found.

Hypothesis draws shapes from 1 up (odd and even, channel counts on and off multiples of
8 and 16), dtypes, memory formats, sliced and transposed views with storage offsets,
activations, gains, clamps and bias or none; every output and every gradient is compared
with the reference evaluated in float64. The search is bounded (``max_examples``, no
deadline) and derandomized so ``make test`` stays fast and reproducible. The same
strategies drive the Triton interpreter (tests/interpreter/test_properties_triton.py)
and the CUDA kernels' CPU emulation (tests/test_properties_cuda_emu.py).
"""

from __future__ import annotations

import property_cases as pc
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import gankernels
from gankernels.ops import reference as ref
from gankernels.testing import assert_close_rel

# ----------------------------------------------------------------------------------
# Regression cases (issue 18, item 7).


def _views() -> dict[str, torch.Tensor]:
    """Strided views of both layouts, with offsets, as user code makes them."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 8, 9, 10, generator=g)
    cl = base.contiguous(memory_format=torch.channels_last)
    return {
        "cl[:, :, ::2]": cl[:, :, ::2],
        "cl[:, :, 1::2]": cl[:, :, 1::2],
        "cl[:, :, :8:2]": cl[:, :, :8:2],
        "cl[:, 1:]": cl[:, 1:],
        "cl[..., 1:]": cl[..., 1:],
        "cl[1:, ::2]": cl[1:, ::2],
        "cl[:, :, :1, :1]": cl[:, :, :1, :1],
        "nchw[:, :, ::2]": base[:, :, ::2],
        "nchw[..., 1:]": base[..., 1:],
        "nchw.transpose(2, 3)": base.transpose(2, 3),
        "cl.transpose(2, 3)": cl.transpose(2, 3),
    }


@pytest.mark.parametrize("name", list(_views()))
def test_memory_format_of_a_view_is_the_one_pytorch_suggests(name):
    """For a non-dense view, F.conv2d (like max_pool2d and interpolate) lays its output
    out in the format ATen's ``suggest_memory_format`` names; memory_format_of must
    name the same one."""
    x = _views()[name]
    assert not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    y = F.conv2d(x, torch.ones(1, x.shape[1], 1, 1))
    assert y.stride() == y.contiguous(memory_format=ref.memory_format_of(x)).stride()


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides where they matter (size-1 dims may differ)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True) if n > 1)


@pytest.mark.parametrize("name", list(_views()))
def test_every_op_keeps_the_layout_stock_gives_a_view(name):
    """issue 18: ``x_cl[:, :, ::2]`` came back NCHW from every op where F.conv2d keeps
    channels_last. Each op's output must be laid out as the stock composite's."""
    x = _views()[name]
    c = x.shape[1]
    w = torch.randn(5, c, 3, 3)
    b = torch.randn(5)
    stock = {
        "conv3x3": (gankernels.conv3x3(x, w, b, backend="torch"), F.conv2d(x, w, b, padding=1)),
        "upsample": (gankernels.upsample_nearest2d(x, 2, backend="torch"), F.interpolate(x, scale_factor=2, mode="nearest")),
        "up_conv3x3": (
            gankernels.up_conv3x3(x, w, b, backend="torch"),
            F.conv2d(F.interpolate(x, scale_factor=2), w, b, padding=1),
        ),
    }
    if min(x.shape[2:]) >= 2:
        stock["max_pool2d"] = (gankernels.max_pool2d(x, 2, backend="torch"), F.max_pool2d(x, 2))
        stock["conv3x3_pool"] = (gankernels.conv3x3_pool(x, w, b, backend="torch"), F.max_pool2d(F.conv2d(x, w, b, padding=1), 2))
    for op, (got, want) in stock.items():
        assert _same_layout(got, want), f"{op}: strides {got.stride()} != stock's {want.stride()}"


# An elementwise op keeps a view's stride order (TensorIterator); bias_act's result is
# laid out as torch.empty_like(x), which does the same.


@pytest.mark.parametrize("name", list(_views()))
def test_bias_act_keeps_the_layout_an_elementwise_op_gives_a_view(name):
    x = _views()[name]
    got = gankernels.bias_act(x, torch.randn(x.shape[1]), act="lrelu", backend="torch")
    want = F.leaky_relu(x, 0.2)
    assert _same_layout(got, want), f"strides {got.stride()} != stock's {want.stride()}"


def test_max_pool2d_refuses_a_dilated_window_that_reads_only_padding():
    """Found by the CUDA emulation's property test: kernel 2, stride 2, padding 1,
    dilation 2 on a 1×1 input puts the only window's taps at -1 and 1, both padding.
    Stock returns -inf with index 2 (outside the 1-element plane) and its backward then
    adds that gradient to another plane; the CUDA kernel wrote out of bounds. gankernels
    refuses the configuration, naming the argument."""
    x = torch.randn(1, 3, 1, 1, requires_grad=True)
    y, idx = F.max_pool2d(x, 2, 2, 1, 2, return_indices=True)
    assert torch.isneginf(y).all() and (idx >= 1).all()  # stock's behaviour, pinned
    with pytest.raises(ValueError, match=r"^dilation: \[2, 2\] with padding \[1, 1\].*output row 0"):
        gankernels.max_pool2d(x, 2, 2, 1, 2, backend="torch")
    # A dilated window that keeps an input element is served as stock.
    x = torch.randn(2, 3, 5, 6)
    assert torch.equal(gankernels.max_pool2d(x, 3, 1, 1, 2, backend="torch"), F.max_pool2d(x, 3, 1, 1, 2))


def _on_the_clamp_bounds(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """x with values exactly at, inside and outside ±1, and a 3×3 kernel that copies
    each channel (so the conv's pre-activation is x exactly)."""
    vals = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 1.0], dtype=dtype)
    x = vals.repeat(2, 2, 8, 1).clone()
    x[:, 1] = x[:, 1].flip(-1)
    w = torch.zeros(2, 2, 3, 3, dtype=dtype)
    w[0, 0, 1, 1] = w[1, 1, 1, 1] = 1.0
    return x, w


def _hardtanh_grads(fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return [t.grad for t in inputs]


@pytest.mark.parametrize("gain", [1.0, -1.0])
@pytest.mark.parametrize("op", ["bias_act", "conv3x3", "conv3x3_pool", "up_conv3x3"])
def test_clamp_passes_no_gradient_at_exactly_the_bound(op, gain):
    """issue 18: at |y| == clamp the torch backend passed the gradient where torch.clamp
    (PyTorch 2.14) and F.hardtanh give 0. Every op now matches the hardtanh composite."""
    x, w = _on_the_clamp_bounds()
    clamp = 1.0
    stock = {
        "bias_act": lambda x: F.hardtanh(x * gain, -clamp, clamp),
        "conv3x3": lambda x: F.hardtanh(F.conv2d(x, w, padding=1) * gain, -clamp, clamp),
        "conv3x3_pool": lambda x: F.max_pool2d(F.hardtanh(F.conv2d(x, w, padding=1) * gain, -clamp, clamp), 2),
        "up_conv3x3": lambda x: F.hardtanh(F.conv2d(F.interpolate(x, scale_factor=2), w, padding=1) * gain, -clamp, clamp),
    }[op]
    ours = {
        "bias_act": lambda x: gankernels.bias_act(x, None, "linear", gain=gain, clamp=clamp, backend="torch"),
        "conv3x3": lambda x: gankernels.conv3x3(x, w, None, "linear", gain=gain, clamp=clamp, backend="torch"),
        "conv3x3_pool": lambda x: gankernels.conv3x3_pool(x, w, None, "linear", gain=gain, clamp=clamp, backend="torch"),
        "up_conv3x3": lambda x: gankernels.up_conv3x3(x, w, None, "linear", gain=gain, clamp=clamp, backend="torch"),
    }[op]
    out = stock(x)
    grad = torch.arange(1.0, out.numel() + 1).view(out.shape)
    (want,) = _hardtanh_grads(stock, [x], grad)
    (got,) = _hardtanh_grads(ours, [x], grad)
    assert torch.equal(got, want)
    # And the reference's derivative itself, elementwise.
    d = ref.epilogue_derivative(torch.tensor([-1.0, -0.999, 0.999, 1.0]), "linear", 0.2, 1.0, 1.0)
    assert d.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_max_pool2d_accepts_exactly_what_stock_accepts():
    """issue 18: ``max_pool2d(x, 3, padding=2, dilation=2)`` passed gankernels' check
    (it halved the dilated size) and failed inside PyTorch with a raw RuntimeError.
    Over a grid of configurations, gankernels refuses (ValueError naming the argument)
    exactly where F.max_pool2d refuses, and agrees with it everywhere else."""
    x = torch.randn(2, 3, 7, 8)
    for k in range(1, 5):
        for pad in range(0, 4):
            for dil in range(1, 4):
                for stride in (1, 2, 3):
                    for ceil in (False, True):
                        cfg = dict(kernel_size=k, stride=stride, padding=pad, dilation=dil, ceil_mode=ceil)
                        try:
                            want = F.max_pool2d(x, return_indices=True, **cfg)
                        except RuntimeError:
                            with pytest.raises(ValueError, match=r"^(padding|x):"):
                                gankernels.max_pool2d(x, **cfg, backend="torch")
                            continue
                        if torch.isinf(want[0]).any():
                            # A window that reads only padding: stock gives -inf and an index
                            # outside the plane; gankernels refuses (see the test below).
                            with pytest.raises(ValueError, match=r"^dilation:"):
                                gankernels.max_pool2d(x, **cfg, backend="torch")
                            continue
                        got = gankernels.max_pool2d(x, return_indices=True, **cfg, backend="torch")
                        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), cfg


def _inf_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 5, generator=g)
    x[0, 1, 1, 2] = float("inf")
    x[1, 0, 3, 4] = float("-inf")
    x[1, 2, 0, 0] = float("nan")
    w = torch.randn(4, 3, 3, 3, generator=g)
    w[1, :, 1, 1] = 0.0  # a zero tap: 0·inf is NaN by the definition
    return x, w, torch.randn(4, generator=g)


@pytest.mark.parametrize("seed", [0, 1])
def test_up_conv3x3_propagates_inf_as_upsample_then_conv(seed):
    """issue 18: the torch backend's sub-pixel rewrite turned ``w0·inf + w1·inf`` into
    ``(w0 + w1)·inf``, giving ±inf where upsample-then-conv gives NaN. It now computes
    the definition: the same NaN/±inf pattern, and the same finite values."""
    x, w, b = _inf_case(seed)
    want = F.leaky_relu(F.conv2d(F.interpolate(x.double(), scale_factor=2), w.double(), b.double(), padding=1), 0.2)
    got = gankernels.up_conv3x3(x, w, b, "lrelu", backend="torch")
    assert torch.isnan(want).any() and torch.isinf(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)) and torch.equal(torch.isneginf(got), torch.isneginf(want))
    assert_close_rel(got, want, dtype=torch.float32)


# ----------------------------------------------------------------------------------
# Properties: every op on the torch backend against the float64 reference.

DTYPES = (torch.float32, torch.float16)


@pc.bounded(120)
@given(case=st.one_of(*(pc.conv_cases(op, DTYPES) for op in ("conv3x3", "conv3x3_pool", "up_conv3x3"))))
def test_conv_ops_match_the_reference(case):
    pc.check(case, "torch")


@pc.bounded(80)
@given(case=pc.bias_act_cases(DTYPES))
def test_bias_act_matches_the_reference(case):
    pc.check(case, "torch")


@pc.bounded(60)
@given(case=pc.max_pool_cases(DTYPES))
def test_max_pool2d_matches_the_reference(case):
    pc.check(case, "torch")


@pc.bounded(40)
@given(case=pc.upsample_cases(DTYPES))
def test_upsample_matches_the_reference(case):
    pc.check(case, "torch")


# ----------------------------------------------------------------------------------
# N = 0 (and other empty dims), as stock.

_W, _B = torch.randn(4, 3, 3, 3), torch.randn(4)
EMPTY_CASES = {
    "conv3x3": (
        lambda x, w, b: gankernels.conv3x3(x, w, b, "lrelu", backend="torch"),
        lambda x, w, b: F.leaky_relu(F.conv2d(x, w, b, padding=1), 0.2),
    ),
    "conv3x3_pool": (
        lambda x, w, b: gankernels.conv3x3_pool(x, w, b, "lrelu", backend="torch"),
        lambda x, w, b: F.max_pool2d(F.leaky_relu(F.conv2d(x, w, b, padding=1), 0.2), 2),
    ),
    "up_conv3x3": (
        lambda x, w, b: gankernels.up_conv3x3(x, w, b, "lrelu", backend="torch"),
        lambda x, w, b: F.leaky_relu(F.conv2d(F.interpolate(x, scale_factor=2), w, b, padding=1), 0.2),
    ),
    "max_pool2d": (lambda x: gankernels.max_pool2d(x, 3, 2, 1, backend="torch"), lambda x: F.max_pool2d(x, 3, 2, 1)),
    "upsample_nearest2d": (
        lambda x: gankernels.upsample_nearest2d(x, 2, backend="torch"),
        lambda x: F.interpolate(x, scale_factor=2),
    ),
    "bias_act": (
        lambda x, b: gankernels.bias_act(x, b[:3], "silu", backend="torch"),
        lambda x, b: F.silu(x + b[:3].view(1, 3, 1, 1)),
    ),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("op", list(EMPTY_CASES))
def test_empty_batch_runs_as_stock(op, layout):
    """N = 0: the same (empty) output as stock, and gradients of the right shapes, zero
    for the parameters. (issue 18: max_pool2d and conv3x3_pool's backward raised
    'cannot reshape tensor of 0 elements'.)"""
    ours, stock = EMPTY_CASES[op]
    x = torch.randn(0, 3, 5, 6).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )
    params = [] if op in ("max_pool2d", "upsample_nearest2d") else ([_B] if op == "bias_act" else [_W, _B])
    results = []
    for fn in (ours, stock):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, *params)]
        y = fn(*leaves)
        y.sum().backward()
        results.append((y, [t.grad for t in leaves]))
    (y, grads), (want, want_grads) = results
    assert y.shape == want.shape and y.dtype == want.dtype
    for g, wg in zip(grads, want_grads, strict=True):
        assert g is not None and g.shape == wg.shape and torch.equal(g, wg)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4)])
def test_bias_act_without_bias_on_an_empty_tensor(shape):
    x = torch.empty(shape, requires_grad=True)
    y = gankernels.bias_act(x, None, "linear", backend="torch")  # the reference returns x itself
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


def test_bias_act_along_dim_0_of_a_1d_tensor():
    """issue 18: the bias gradient of a 1-D x with dim=0 came back as a scalar (the
    reference summed over an empty list of dims, i.e. everything)."""
    x = torch.randn(5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    g = torch.randn(5)
    gankernels.bias_act(x, b, "lrelu", 0.2, 1.3, None, 0, backend="torch").backward(g)
    x64, b64 = x.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    (F.leaky_relu(x64 + b64, 0.2) * 1.3).backward(g.double())
    assert_close_rel(x.grad, x64.grad)
    assert b.grad.shape == (5,)
    assert_close_rel(b.grad, b64.grad)


# ----------------------------------------------------------------------------------
# Special values: NaN and ±inf propagate as in PyTorch; fp16 overflow gives ±inf as
# PyTorch's fp16 ops do.


def _special_cases(dtypes, ops=("conv3x3", "conv3x3_pool", "up_conv3x3")):
    conv = [pc.conv_cases(op, dtypes) for op in ops]
    return st.one_of(*conv, pc.bias_act_cases(dtypes), pc.max_pool_cases(dtypes), pc.upsample_cases(dtypes))


@pc.bounded(60)
@given(case=_special_cases(DTYPES), big=st.booleans())
def test_special_values_propagate_as_in_pytorch(case, big):
    case.specials, case.scale = not big, (2e4 if big and case.dtype == torch.float16 else 1.0)
    pc.check_forward_special_values(case, "torch")
