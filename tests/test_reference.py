"""The reference (the spec) against stock PyTorch composites, gradcheck and gradgradcheck in float64."""

import pytest
import torch
import torch.nn.functional as F

from gankernels.ops import reference as ref

ACTS = ref.ACTIVATIONS


def _stock_act(p, act, alpha):
    return {
        "linear": lambda t: t,
        "relu": F.relu,
        "lrelu": lambda t: F.leaky_relu(t, alpha),
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "silu": F.silu,
    }[act](p)


def _inputs(n=2, ci=3, co=5, h=7, w=6, bias=True):
    x = torch.randn(n, ci, h, w, dtype=torch.float64)
    wt = torch.randn(co, ci, 3, 3, dtype=torch.float64)
    b = torch.randn(co, dtype=torch.float64) if bias else None
    return x, wt, b


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gain,clamp", [(1.0, None), (1.7, 0.8), (-0.5, None)])
def test_conv3x3_matches_stock(act, gain, clamp):
    x, w, b = _inputs()
    expect = _stock_act(F.conv2d(x, w, b, padding=1), act, 0.2) * gain
    if clamp is not None:
        expect = expect.clamp(-clamp, clamp)
    torch.testing.assert_close(ref.conv3x3(x, w, b, act, 0.2, gain, clamp), expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("h,w", [(7, 6), (1, 1), (2, 2), (5, 9)])
def test_conv3x3_pool_matches_stock(h, w):
    x, wt, b = _inputs(h=h, w=w)
    expect = F.max_pool2d(F.leaky_relu(F.conv2d(x, wt, b, padding=1), 0.2), 2) if min(h, w) >= 2 else None
    if expect is None:
        with pytest.raises(RuntimeError):
            ref.conv3x3_pool(x, wt, b, "lrelu")
        return
    torch.testing.assert_close(ref.conv3x3_pool(x, wt, b, "lrelu"), expect, rtol=0, atol=0)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 4), (8, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_subpixel_up_conv_equals_upsample_then_conv(h, w, bias):
    """DESIGN §4: the sub-pixel rewrite is exact (float64 to 1e-10)."""
    x, wt, b = _inputs(n=3, ci=4, co=6, h=h, w=w, bias=bias)
    naive = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), wt, b, padding=1)
    sub = ref.up_conv3x3_preact(x, wt, b)
    assert (sub - naive).abs().max().item() <= 1e-10
    for act in ACTS:
        full = ref.up_conv3x3(x, wt, b, act, 0.2, 1.3, 2.0)
        assert (full - ref.up_conv3x3_naive(x, wt, b, act, 0.2, 1.3, 2.0)).abs().max().item() <= 1e-10


def test_subpixel_phase_weight_tap_map():
    """The phase kernels follow DESIGN §4's tap map along each axis."""
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    pw = ref.subpixel_phase_weights(w)
    # phase (0, 0): rows (w0, w1+w2), cols (w0, w1+w2)
    r = [w[:, :, 0], w[:, :, 1] + w[:, :, 2]]
    for tr in range(2):
        expect = torch.stack([r[tr][..., 0], r[tr][..., 1] + r[tr][..., 2]], -1)
        torch.testing.assert_close(pw[0, 0, :, :, tr], expect)
    # phase (1, 1): rows (w0+w1, w2), cols (w0+w1, w2)
    r = [w[:, :, 0] + w[:, :, 1], w[:, :, 2]]
    for tr in range(2):
        expect = torch.stack([r[tr][..., 0] + r[tr][..., 1], r[tr][..., 2]], -1)
        torch.testing.assert_close(pw[1, 1, :, :, tr], expect)


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("act", ACTS)
def test_bias_act_matches_stock(act, dim):
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    b = torch.randn(x.shape[dim], dtype=torch.float64)
    shape = [1] * 4
    shape[dim] = -1
    expect = (_stock_act(x + b.view(shape), act, 0.3) * 2.0).clamp(-1.5, 1.5)
    torch.testing.assert_close(ref.bias_act(x, b, act, 0.3, 2.0, 1.5, dim % 4), expect, rtol=0, atol=0)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_upsample_and_its_backward(s):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = ref.upsample_nearest2d(x, s)
    torch.testing.assert_close(y, x.repeat_interleave(s, 2).repeat_interleave(s, 3))
    g = torch.randn_like(y)
    (expect,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(ref.upsample_nearest2d_backward(g, s), expect)


@pytest.mark.parametrize(
    "k,s,p,d,ceil",
    [(2, 2, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 1, True), (2, 2, 0, 1, True), (3, 1, 1, 2, False)],
)
def test_pool_output_size_and_backward(k, s, p, d, ceil):
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    y, idx = ref.max_pool2d(x, [k, k], [s, s], [p, p], [d, d], ceil)
    assert y.shape[2] == ref.pool_output_size(7, k, s, p, d, ceil)
    assert y.shape[3] == ref.pool_output_size(9, k, s, p, d, ceil)
    g = torch.randn_like(y)
    (expect,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(ref.max_pool2d_backward(g, x, idx), expect)


@pytest.mark.parametrize("size", range(1, 12))
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 3, 1), (2, 1, 0)])
def test_pool_output_size_matches_torch(size, k, s, p):
    for ceil in (False, True):
        if size + 2 * p < k:
            continue
        y = F.max_pool2d(torch.zeros(1, 1, size, 1), (k, 1), (s, 1), (p, 0), ceil_mode=ceil)
        assert ref.pool_output_size(size, k, s, p, 1, ceil) == y.shape[2]


FORWARDS = {
    "conv3x3": (ref.conv3x3, ref.conv3x3_backward),
    "conv3x3_pool": (ref.conv3x3_pool, ref.conv3x3_pool_backward),
    "up_conv3x3": (ref.up_conv3x3_naive, ref.up_conv3x3_backward),
}


@pytest.mark.parametrize("op", list(FORWARDS))
@pytest.mark.parametrize("act,gain,clamp", [("lrelu", 1.0, None), ("silu", 1.4, None), ("tanh", 0.7, 0.5), ("sigmoid", 1.0, None)])
def test_conv_backward_formulas_match_autograd(op, act, gain, clamp):
    fwd, bwd = FORWARDS[op]
    x, w, b = (t.requires_grad_() for t in _inputs(h=6, w=5))
    y = fwd(x, w, b, act, 0.2, gain, clamp)
    g = torch.randn_like(y)
    expect = torch.autograd.grad(y, (x, w, b), g)
    got = bwd(g, x, w, b, act, 0.2, gain, clamp)
    for e, o in zip(expect, got, strict=False):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ACTS)
def test_epilogue_derivative_matches_autograd(act):
    p = torch.randn(200, dtype=torch.float64, requires_grad=True)
    y = ref.epilogue(p, act, 0.1, 1.5, 0.9)
    (expect,) = torch.autograd.grad(y.sum(), p)
    torch.testing.assert_close(ref.epilogue_derivative(p, act, 0.1, 1.5, 0.9), expect)
