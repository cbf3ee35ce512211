"""torch.library registration: opcheck, autograd (first and second order), torch.compile,
autocast, memory formats — through the torch backend on CPU."""

import pytest
import torch
import torch.nn.functional as F

import gankernels
import gankernels.testing
from gankernels.ops import reference as ref

OPS = torch.ops.gankernels


def _t(*shape, cl=False, grad=True):
    t = torch.randn(*shape, dtype=torch.float64)
    if cl:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


CONV_OPS = ["conv3x3", "conv3x3_pool", "up_conv3x3"]


@pytest.mark.parametrize("op", CONV_OPS)
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_conv_ops(op, cl, bias):
    x, w = _t(2, 3, 5, 6, cl=cl), _t(4, 3, 3, 3)
    b = _t(4) if bias else None
    torch.library.opcheck(getattr(OPS, op).default, (x, w, b, "lrelu", 0.2, 1.5, 0.9, "torch"))


@pytest.mark.parametrize("cfg", [([2, 2], [2, 2], [0, 0], [1, 1], False), ([3, 3], [2, 2], [1, 1], [1, 1], True)])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("return_indices", [False, True])
def test_opcheck_max_pool(cfg, cl, return_indices):
    torch.library.opcheck(OPS.max_pool2d.default, (_t(2, 3, 7, 6, cl=cl), *cfg, return_indices, "torch"))


@pytest.mark.parametrize("s", [1, 2, 3])
def test_opcheck_upsample(s):
    torch.library.opcheck(OPS.upsample_nearest2d.default, (_t(2, 3, 4, 5, cl=True), s, "torch"))


@pytest.mark.parametrize("act,bias,dim", [("linear", False, 1), ("silu", True, 1), ("lrelu", True, 3), ("tanh", True, 0)])
def test_opcheck_bias_act(act, bias, dim):
    x = _t(2, 3, 4, 5)
    b = _t(x.shape[dim]) if bias else None
    torch.library.opcheck(OPS.bias_act.default, (x, b, act, 0.2, 1.0, None, dim, "torch"))


# Smooth activations, so numerical second derivatives are well defined.
@pytest.mark.parametrize("op", [gankernels.conv3x3, gankernels.conv3x3_pool, gankernels.up_conv3x3])
@pytest.mark.parametrize("act", ["silu", "tanh", "linear"])
def test_gradcheck_and_gradgradcheck(op, act):
    x, w, b = _t(1, 2, 3, 4), _t(2, 2, 3, 3), _t(2)
    f = lambda x, w, b: op(x, w, b, act=act, gain=1.3, backend="torch")
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_gradgradcheck_memory_ops():
    x = _t(1, 2, 5, 6)
    assert torch.autograd.gradgradcheck(lambda x: gankernels.max_pool2d(x, 3, 2, 1, backend="torch"), (x,))
    assert torch.autograd.gradgradcheck(lambda x: gankernels.upsample_nearest2d(x, 3, backend="torch"), (x,))
    b = _t(2)
    assert torch.autograd.gradgradcheck(lambda x, b: gankernels.bias_act(x, b, "silu", gain=2.0, backend="torch"), (x, b))


def _small_gan(dtype=torch.float32):
    g = torch.nn.Sequential(
        gankernels.nn.UpConv3x3(8, 8, act="lrelu"),
        gankernels.nn.Conv3x3(8, 4, act="relu"),
        gankernels.nn.Upsample(scale_factor=2),
        gankernels.nn.Conv2d(4, 3, 3, padding=1, act="tanh"),
    ).to(dtype)
    d = torch.nn.Sequential(
        gankernels.nn.Conv3x3Pool(3, 8, act="lrelu"),
        gankernels.nn.Conv2d(8, 8, 3, padding=1, act="lrelu"),
        gankernels.nn.MaxPool2d(2),
        gankernels.nn.BiasAct(8, act="silu"),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 1),
    ).to(dtype)
    return g, d


def test_r1_penalty_double_backward_matches_stock():
    """R1: grad of D(x).sum() w.r.t. x with create_graph, then backward into D's weights."""
    g, d = _small_gan(torch.float64)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(d(x).sum(), x, create_graph=True)
    gx.square().sum().backward()
    # (The final Linear's bias does not affect gx, so it gets no gradient.)
    got = [None if p.grad is None else p.grad.clone() for p in d.parameters()]

    stock = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.LeakyReLU(0.2), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.LeakyReLU(0.2), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 1),
    ).double()  # fmt: skip
    # Same parameters; BiasAct(silu) has a zero bias, mirror it with a silu in the stock net.
    with torch.no_grad():
        stock[0].weight.copy_(d[0].weight), stock[0].bias.copy_(d[0].bias)
        stock[3].weight.copy_(d[1].weight), stock[3].bias.copy_(d[1].bias)
        stock[7].weight.copy_(d[5].weight), stock[7].bias.copy_(d[5].bias)
    stock.insert(6, torch.nn.SiLU())
    x2 = x.detach().clone().requires_grad_()
    (gx2,) = torch.autograd.grad(stock(x2).sum(), x2, create_graph=True)
    gx2.square().sum().backward()
    torch.testing.assert_close(gx, gx2)
    expect = [stock[0].weight.grad, stock[0].bias.grad, stock[3].weight.grad, stock[3].bias.grad]
    for e, o in zip(expect, got[:4], strict=False):
        torch.testing.assert_close(o, e)
    assert got[4] is not None and got[4].abs().sum() > 0  # the BiasAct bias gets a second-order gradient
    torch.testing.assert_close(got[5], stock[8].weight.grad)
    assert got[6] is None and stock[8].bias.grad is None


def test_compile_fullgraph_generator_and_discriminator_match_eager():
    torch._dynamo.reset()
    g, d = _small_gan()
    z = torch.randn(2, 8, 4, 4)
    eager_img = g(z)
    eager_score = d(eager_img)
    cg = torch.compile(g, fullgraph=True, backend="aot_eager")
    cd = torch.compile(d, fullgraph=True, backend="aot_eager")
    img = cg(z)
    score = cd(img)
    torch.testing.assert_close(img, eager_img)
    torch.testing.assert_close(score, eager_score)
    # and the compiled backward matches eager's
    score.sum().backward()
    grads = [p.grad.clone() for p in list(g.parameters()) + list(d.parameters())]
    for p in list(g.parameters()) + list(d.parameters()):
        p.grad = None
    d(g(z)).sum().backward()
    for e, o in zip([p.grad for p in list(g.parameters()) + list(d.parameters())], grads, strict=False):
        torch.testing.assert_close(o, e)


def test_compile_inductor_fullgraph():
    torch._dynamo.reset()
    _, d = _small_gan()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(torch.compile(d, fullgraph=True)(x), d(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", [gankernels.conv3x3, gankernels.conv3x3_pool, gankernels.up_conv3x3])
def test_autocast_like_conv2d(op):
    x = torch.randn(1, 4, 6, 6)
    w = torch.randn(5, 4, 3, 3)
    b = torch.randn(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(x, w, b, act="lrelu")
        stock = F.conv2d(x, w, b, padding=1)
    assert y.dtype == stock.dtype == torch.bfloat16
    expect = {"conv3x3": ref.conv3x3, "conv3x3_pool": ref.conv3x3_pool, "up_conv3x3": ref.up_conv3x3}[op.__name__]
    expect = expect(x.double(), w.double(), b.double(), "lrelu")
    gankernels.testing.assert_close_rel(y, expect, dtype=torch.bfloat16)
    # float64 is not autocast-eligible: it stays float64, as with F.conv2d
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert op(x.double(), w.double(), b.double()).dtype == torch.float64


@pytest.mark.parametrize("op", [gankernels.conv3x3, gankernels.conv3x3_pool, gankernels.up_conv3x3])
def test_memory_format_is_kept(op):
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(8, 4, 3, 3)
    y = op(x.contiguous(memory_format=torch.channels_last), w)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert op(x, w).is_contiguous()
    torch.testing.assert_close(y, op(x, w))


def test_max_pool2d_matches_torch_including_unbatched_and_indices():
    x = torch.randn(2, 3, 7, 9)
    x[0, 0, 0, 0] = float("nan")
    for args in [(2,), (3, 2, 1), ((3, 2), (2, 1), (1, 0))]:
        for ceil in (False, True):
            y, i = gankernels.max_pool2d(x, *args, ceil_mode=ceil, return_indices=True)
            ye, ie = F.max_pool2d(x, *args, ceil_mode=ceil, return_indices=True)
            torch.testing.assert_close(y, ye, equal_nan=True)
            assert torch.equal(i, ie)
    torch.testing.assert_close(gankernels.max_pool2d(x[0], 2), F.max_pool2d(x[0], 2), equal_nan=True)


def test_upsample_accepts_integral_float_scale():
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(gankernels.upsample_nearest2d(x, 2.0), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_bias_act_identity_returns_a_fresh_tensor():
    x = torch.randn(2, 3)
    y = gankernels.bias_act(x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()
