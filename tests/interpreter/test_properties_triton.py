"""Property tests of the Triton kernels under the interpreter (issue 18), and the
regression cases found.

Every case goes through the public API with ``backend="triton"`` (the dispatcher and
the registered op included) on tiny random shapes, fp32 and fp16 (bf16 runs on GPU only:
tests/gpu/test_fidelity_gpu.py), and compares the output and every gradient with the
float64 reference. Hypothesis draws the shapes, layouts, views and epilogues; the
searches are bounded and derandomized (the interpreter runs a kernel at Python speed).
"""

from __future__ import annotations

import property_cases as pc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gankernels
from gankernels.ops import reference as ref
from gankernels.testing import assert_close_rel

# ----------------------------------------------------------------------------------
# Regression cases (issue 18, item 7).


def test_bias_act_reads_a_strided_bias_through_its_stride():
    """``b = arange(6)[::2]`` is channels 0, 2, 4, not 0, 1, 2; and so is its gradient."""
    x = torch.zeros(1, 3, 2, 2, requires_grad=True)
    b = torch.arange(6.0)[::2].requires_grad_(True)
    y = gankernels.bias_act(x, b, backend="triton")
    assert torch.equal(y, torch.tensor([0.0, 2.0, 4.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    g = torch.arange(12.0).view(1, 3, 2, 2)
    y.backward(g)
    assert torch.equal(b.grad, g.sum((0, 2, 3)))
    # The same with an activation and a clamp, against the reference.
    x = torch.randn(2, 3, 4, 5)
    b = torch.randn(9)[1::3]
    y = gankernels.bias_act(x, b, "lrelu", 0.2, 1.4, 0.9, backend="triton")
    assert_close_rel(y, ref.bias_act(x.double(), b.double(), "lrelu", 0.2, 1.4, 0.9))


@pytest.mark.parametrize("shape,dim", [((0, 3), 1), ((4, 0), 1), ((0, 3, 2, 2), 1), ((2, 0, 3, 3), 1), ((5, 0), 0)])
def test_bias_act_with_an_empty_dimension(shape, dim):
    """An empty bias dimension raised ``ValueError: 0 is not in list``; an empty x
    gives an empty result and gradients of zeros, as stock does."""
    x = torch.randn(shape, requires_grad=True)
    b = torch.randn(shape[dim], requires_grad=True)
    y = gankernels.bias_act(x, b, "lrelu", dim=dim, backend="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and b.grad.shape == b.shape
    assert not b.grad.any()


def test_bias_act_keeps_a_strided_view_in_its_stride_order():
    """A non-dense channels_last view is copied densely in its own stride order (the
    layout an elementwise op gives it), not to NCHW."""
    from gankernels.triton.bias_act import bias_act_forward

    x = torch.randn(2, 6, 9, 10).contiguous(memory_format=torch.channels_last)[:, :, ::2]
    b = torch.randn(6)
    y = bias_act_forward(x, b, "relu", 0.2, 1.0, None, 1)
    assert y.stride() == torch.empty_like(x).stride()
    assert_close_rel(y, ref.bias_act(x.double(), b.double(), "relu"))


@pytest.mark.parametrize("gain", [1.0, -1.0], ids=["from_y", "from_p"])
@pytest.mark.parametrize("op", ["bias_act", "conv3x3", "conv3x3_pool", "up_conv3x3"])
def test_clamp_passes_no_gradient_at_exactly_the_bound(op, gain):
    """issue 18: at |y| == clamp, Triton bias_act (and the conv backward's
    recomputed-preactivation path) passed the gradient where torch.clamp (PyTorch 2.14),
    F.hardtanh and now the reference give 0."""
    import torch.nn.functional as F

    vals = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 1.0])
    x = vals.repeat(2, 2, 8, 1).clone()
    x[:, 1] = x[:, 1].flip(-1)
    w = torch.zeros(2, 2, 3, 3)
    w[0, 0, 1, 1] = w[1, 1, 1, 1] = 1.0  # the conv's pre-activation is x exactly
    stock = {
        "bias_act": lambda x: F.hardtanh(x * gain),
        "conv3x3": lambda x: F.hardtanh(F.conv2d(x, w, padding=1) * gain),
        "conv3x3_pool": lambda x: F.max_pool2d(F.hardtanh(F.conv2d(x, w, padding=1) * gain), 2),
        "up_conv3x3": lambda x: F.hardtanh(F.conv2d(F.interpolate(x, scale_factor=2), w, padding=1) * gain),
    }[op]
    fn = getattr(gankernels, op)
    args = () if op == "bias_act" else (w,)
    xs = x.clone().requires_grad_(True)
    out = stock(xs)
    grad = torch.arange(1.0, out.numel() + 1).view(out.shape)
    out.backward(grad)
    xt = x.clone().requires_grad_(True)
    fn(xt, *args, None, "linear", gain=gain, clamp=1.0, backend="triton").backward(grad)
    assert torch.equal(xt.grad, xs.grad)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("seed", [0, 1])
def test_up_conv3x3_with_inf_is_the_documented_behaviour(seed):
    """The Triton up_conv3x3 sums the taps that read one input pixel (the sub-pixel
    form). As its docstring and the README say: wherever upsample-then-conv is finite or
    ±inf it agrees; where the definition is NaN because an inf meets taps of opposite
    sign or a zero tap, it gives NaN or ±inf."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 5, generator=g)
    x[0, 1, 1, 2] = float("inf")
    x[1, 0, 3, 4] = float("-inf")
    x[1, 2, 0, 0] = float("nan")
    w = torch.randn(4, 3, 3, 3, generator=g)
    w[1, :, 1, 1] = 0.0
    b = torch.randn(4, generator=g)
    want = F.conv2d(F.interpolate(x.double(), scale_factor=2), w.double(), b.double(), padding=1)
    got = gankernels.up_conv3x3(x, w, b, backend="triton").double()
    nan = torch.isnan(want)
    assert nan.any() and torch.isinf(want).any()
    assert not torch.isfinite(got[nan]).any()  # NaN or ±inf where the definition is NaN
    assert torch.equal(got[torch.isinf(want)], want[torch.isinf(want)])
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert_close_rel(got[~nan], want[~nan], dtype=torch.float32)


# ----------------------------------------------------------------------------------
# Properties: each Triton kernel against the float64 reference, through the public op.
# Tiny shapes: the interpreter runs a program per tile at Python speed.

DTYPES = (torch.float32, torch.float16)
CONV_OPS = ("conv3x3", "conv3x3_pool", "up_conv3x3")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every buffer a kernel must fill starts as NaN, so an element left unwritten shows."""
    from gankernels.triton import bias_act, conv3x3, conv3x3_backward, max_pool, upsample

    for mod in (bias_act, conv3x3, conv3x3_backward, max_pool, upsample):
        if hasattr(mod, "POISON_OUTPUTS"):
            monkeypatch.setattr(mod, "POISON_OUTPUTS", True)


@pc.bounded(10)
@given(case=st.one_of(*(pc.conv_cases(op, DTYPES, max_n=2, max_hw=6) for op in CONV_OPS)))
def test_conv_ops_match_the_reference(case):
    pc.check(case, "triton")


@pc.bounded(25)
@given(case=pc.bias_act_cases(DTYPES, max_size=6))
def test_bias_act_matches_the_reference(case):
    pc.check(case, "triton")


@pc.bounded(15)
@given(case=pc.max_pool_cases(DTYPES, configs=pc.GAN_POOLS, max_hw=7))
def test_max_pool2d_matches_the_reference(case):
    pc.check(case, "triton")


@pc.bounded(15)
@given(case=pc.upsample_cases(DTYPES, max_hw=5))
def test_upsample_matches_the_reference(case):
    pc.check(case, "triton")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
@pc.bounded(15)
@given(
    case=st.one_of(
        pc.conv_cases("conv3x3", DTYPES, max_n=2, max_hw=5, ci_choices=(1, 3, 8), co_choices=(1, 5, 16)),
        pc.conv_cases("conv3x3_pool", DTYPES, max_n=2, max_hw=5, ci_choices=(1, 3, 8), co_choices=(1, 5, 16)),
        pc.bias_act_cases(DTYPES, max_size=5),
        pc.max_pool_cases(DTYPES, configs=pc.GAN_POOLS, max_hw=6),
        pc.upsample_cases(DTYPES, max_hw=4),
    ),
    big=st.booleans(),
)
def test_special_values_propagate_as_in_pytorch(case, big):
    """NaN and ±inf as in PyTorch, fp16 overflow to ±inf (up_conv3x3's documented
    difference has its own test above)."""
    case.specials, case.scale = not big, (2e4 if big and case.dtype == torch.float16 else 1.0)
    pc.check_forward_special_values(case, "triton")


@pc.bounded(5)
@given(
    case=st.one_of(
        *(pc.conv_cases(op, DTYPES, max_n=2, max_hw=5, ci_choices=(3, 9), co_choices=(5, 16)) for op in CONV_OPS),
        pc.bias_act_cases(DTYPES, max_size=5),
        pc.max_pool_cases(DTYPES, configs=pc.GAN_POOLS, max_hw=6),
        pc.upsample_cases(DTYPES, max_hw=4),
    )
)
def test_every_kernel_is_bitwise_deterministic(case):
    """Forward and backward twice on the same inputs: bitwise the same results."""
    pc.check(case, "triton", repeat=True)


# ----------------------------------------------------------------------------------
# Empty tensors.


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_memory_ops_serve_an_empty_batch(layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(0, 3, 6, 5).contiguous(memory_format=fmt).requires_grad_(True)
    b = torch.randn(3, requires_grad=True)
    for fn, stock in (
        (lambda: gankernels.max_pool2d(x, 3, 2, 1, backend="triton"), lambda: torch.nn.functional.max_pool2d(x, 3, 2, 1)),
        (lambda: gankernels.upsample_nearest2d(x, 2, backend="triton"), lambda: torch.nn.functional.interpolate(x, scale_factor=2)),
        (lambda: gankernels.bias_act(x, b, "lrelu", backend="triton"), lambda: x + b.view(1, 3, 1, 1)),
    ):
        y = fn()
        assert y.shape == stock().shape
        gx, gb = torch.autograd.grad(y.sum(), (x, b), allow_unused=True)
        assert gx.shape == x.shape
        assert gb is None or (gb.shape == b.shape and not gb.any())


@pytest.mark.parametrize("op", CONV_OPS)
def test_conv_ops_refuse_an_empty_batch_by_name_and_auto_serves_it(op):
    """The Triton conv kernels refuse N = 0 before launch with a reason; ``auto`` then
    runs the torch backend, which gives stock's empty result and zero parameter grads."""
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    with pytest.raises(gankernels.BackendUnavailable, match="empty"):
        getattr(gankernels, op)(x, w, b, backend="triton")
    y = getattr(gankernels, op)(x, w, b, backend="auto")
    assert y.shape[0] == 0 and y.shape[1] == 5
    y.sum().backward()
    assert not w.grad.any() and not b.grad.any() and x.grad.shape == x.shape


@pytest.mark.parametrize("op", ["conv3x3", "up_conv3x3"])
def test_conv_ops_refuse_an_empty_image_by_name(op):
    x = torch.randn(2, 3, 0, 4)
    with pytest.raises(gankernels.BackendUnavailable):
        getattr(gankernels, op)(x, torch.randn(5, 3, 3, 3), backend="triton")


# ----------------------------------------------------------------------------------
# The drop-in modules on the Triton backend against their stock twins
# (tests/test_dropin_fidelity.py runs the full matrix on the torch backend).

_FIDELITY_PAIRS = ("Conv2d+lrelu", "MaxPool2d", "MaxPool2d(3,2,1)", "Upsample", "Conv3x3", "Conv3x3Pool", "UpConv3x3", "BiasAct")


@pytest.mark.parametrize("name", _FIDELITY_PAIRS)
def test_modules_on_triton_train_as_stock(name):
    import test_dropin_fidelity as fidelity

    with gankernels.use_backend("triton"):
        ours, stock, x = fidelity._make(name)
        fidelity._assert_same(fidelity._run(ours, x, lambda y: y * 1.0), fidelity._run(stock, x, lambda y: y * 1.0), name)
        with torch.no_grad():
            assert_close_rel(ours(x), stock(x), what=f"{name} under no_grad")
