"""The eager fast path (gankernels.ops.eager) and the call cache in functional.

A fast backend is simulated on CPU by registering a test implementation under the
name "cuda" (restored afterwards) whose backward, like the Triton one, reads the
forward's output. Everything is compared with stock PyTorch in the same test.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gankernels
import gankernels.nn as gnn
from gankernels.ops import dispatch
from gankernels.ops import reference as ref
from gankernels.ops.dispatch import OpImpl


class _PassThrough(TorchDispatchMode):
    """Any active dispatch mode sends calls through the torch.library custom ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture
def output_reading_backend():
    """A 'cuda' conv3x3 whose backward takes the lrelu derivative from ``out``."""
    calls = {"forward": 0, "backward": 0}
    saved = dispatch._REGISTRY["conv3x3"].get("cuda")

    def forward(x, w, b, act, alpha, gain, clamp):
        calls["forward"] += 1
        return ref.conv3x3(x, w, b, act, alpha, gain, clamp), x.new_empty((0,))

    def backward(grad, x, w, b, out, saved, act, alpha, gain, clamp, needs):
        calls["backward"] += 1
        assert out.shape == grad.shape, "the output must be kept for this backward"
        slope = torch.where(out > 0, torch.ones_like(out), torch.full_like(out, alpha))
        return ref._conv_grads(grad * slope * gain, x, w, b is not None, needs)

    def supports(x, w, b, act, alpha, gain, clamp):
        return [] if (act == "lrelu" and alpha > 0 and gain > 0 and clamp is None) else ["only lrelu"]

    dispatch.register(
        "conv3x3",
        "cuda",
        OpImpl(forward=forward, supports=supports, backward=backward, backward_needs_output=lambda *a: True),
    )
    yield calls
    if saved is None:
        dispatch.unregister("conv3x3", "cuda")
    else:
        dispatch.register("conv3x3", "cuda", saved)


def _stock_grads(x, w, b, after):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = F.leaky_relu(F.conv2d(x, w, b, padding=1), 0.2)
    y = after(y)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize(
    "after",
    [
        lambda y: y,
        lambda y: y.add_(1.0),
        lambda y: y.mul_(-0.5),
        lambda y: torch.relu_(y),
        lambda y: F.leaky_relu(y, 0.1, inplace=True),
    ],
    ids=["none", "add_", "mul_", "relu_", "leaky_relu_inplace"],
)
def test_in_place_use_of_the_output_trains_like_stock(output_reading_backend, backend, after, request):
    x, w, b = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)
    want = _stock_grads(x, w, b, after)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    y = gankernels.conv3x3(xg, wg, bg, act="lrelu", alpha=0.2, backend=backend)
    y = after(y)
    y.backward(torch.ones_like(y))
    for got, ref_ in zip((y.detach(), xg.grad, wg.grad, bg.grad), want, strict=True):
        torch.testing.assert_close(got, ref_, rtol=1e-5, atol=1e-5)
    if backend == "cuda":
        # The output was kept for the backward; an in-place change forces one recomputation.
        modified = "none" not in request.node.callspec.id
        assert output_reading_backend == {"forward": 2 if modified else 1, "backward": 1}


def test_recomputes_only_when_the_output_was_modified(output_reading_backend):
    x, w, b = torch.randn(1, 2, 4, 4, requires_grad=True), torch.randn(2, 2, 3, 3), torch.randn(2)
    gankernels.conv3x3(x, w, b, act="lrelu", backend="cuda").sum().backward()
    assert output_reading_backend == {"forward": 1, "backward": 1}
    y = gankernels.conv3x3(x, w, b, act="lrelu", backend="cuda")
    y.mul_(2)
    y.sum().backward()
    assert output_reading_backend == {"forward": 3, "backward": 2}


def test_drop_in_conv2d_output_modified_in_place():
    # Stock code does this everywhere: a convolution, then an in-place activation.
    torch.manual_seed(0)
    stock = torch.nn.Conv2d(4, 4, 3, padding=1)
    mine = gnn.Conv2d(4, 4, 3, padding=1)
    mine.load_state_dict(stock.state_dict())
    x = torch.randn(2, 4, 6, 6)
    for m in (stock, mine):
        m.zero_grad()
        torch.relu_(m(x)).sum().backward()
    torch.testing.assert_close(mine.weight.grad, stock.weight.grad)
    torch.testing.assert_close(mine.bias.grad, stock.bias.grad)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_eager_path_and_custom_op_path_agree(output_reading_backend, backend):
    x, w, b = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)
    results = []
    for mode in (None, _PassThrough):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        if mode is None:
            y = gankernels.conv3x3(xg, wg, bg, act="lrelu", backend=backend)
        else:
            with mode():
                y = gankernels.conv3x3(xg, wg, bg, act="lrelu", backend=backend)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xg.grad, wg.grad, bg.grad))
    for a, c in zip(*results, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_double_backward_through_the_fast_backend(output_reading_backend):
    x, w, b = (
        torch.randn(1, 2, 4, 4, dtype=torch.float64),
        torch.randn(3, 2, 3, 3, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
    )
    for backend in ("cuda", None):
        xg = x.clone().requires_grad_()
        if backend:
            y = gankernels.conv3x3(xg, w, b, act="lrelu", backend=backend)
        else:
            y = F.leaky_relu(F.conv2d(xg, w, b, padding=1), 0.2)
        (g,) = torch.autograd.grad(y.square().sum(), xg, create_graph=True)
        g.square().sum().backward()
        if backend:
            got = xg.grad
        else:
            want = xg.grad
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("through_custom_op", [False, True], ids=["eager", "custom-op"])
def test_an_r1_penalty_alone_gives_every_parameter_stocks_gradient(output_reading_backend, through_custom_op):
    """An R1 pass of its own (StyleGAN2's lazy regularisation steps the optimizer on it):
    through a fast backend, the conv bias gets stock's zero second-order gradient, not
    None (Adam skips a parameter whose grad is None), and x, w get stock's values."""
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 2, 5, 5), (3, 2, 3, 3), (3,)))
    grads = {}
    for name in ("gankernels", "stock"):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        mode = _PassThrough() if (through_custom_op and name == "gankernels") else contextlib.nullcontext()
        with mode:
            if name == "gankernels":
                y = gankernels.conv3x3(xg, wg, bg, act="lrelu", backend="cuda")
            else:
                y = F.leaky_relu(F.conv2d(xg, wg, bg, padding=1), 0.2)
            (gx,) = torch.autograd.grad(y.sum(), xg, create_graph=True)
            gx.square().sum().backward()
        grads[name] = (xg.grad, wg.grad, bg.grad)
    for got, want, what in zip(grads["gankernels"], grads["stock"], ("x", "w", "b"), strict=True):
        assert got is not None, f"{what}: no gradient where stock gives one"
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=what)
    assert output_reading_backend["forward"] >= 1


def test_no_grad_and_inference_mode_skip_autograd(output_reading_backend):
    x, w = torch.randn(1, 2, 4, 4, requires_grad=True), torch.randn(2, 2, 3, 3, requires_grad=True)
    with torch.no_grad():
        y = gankernels.conv3x3(x, w, act="lrelu", backend="cuda")
    assert y.grad_fn is None and not y.requires_grad
    with torch.inference_mode():
        z = gankernels.conv3x3(x, w, act="lrelu", backend="cuda")
    assert z.is_inference()
    torch.testing.assert_close(y, z)


def test_the_call_cache_still_checks_what_changed():
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    gankernels.conv3x3(x, w, act="lrelu", alpha=0.2)  # cached
    with pytest.raises(ValueError, match="w: has 3 input channels"):
        gankernels.conv3x3(x, torch.randn(3, 3, 3, 3), act="lrelu", alpha=0.2)
    with pytest.raises(TypeError, match="alpha: expected a number"):
        gankernels.conv3x3(x, w, act="lrelu", alpha=True)  # True == 1 and hashes alike: still checked
    with pytest.raises(TypeError, match="w: dtype"):
        gankernels.conv3x3(x, w.double(), act="lrelu", alpha=0.2)
    with pytest.raises(ValueError, match="act: unknown activation"):
        gankernels.conv3x3(x, w, act=["lrelu"])  # unhashable: goes to the checks


def test_autocast_applies_on_cached_calls():
    x, w, b = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(3)
    for _ in range(2):  # the second call hits the cache
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = gankernels.conv3x3(x, w, b, act="lrelu")
            want = F.leaky_relu(F.conv2d(x, w, b, padding=1), 0.2)
        assert y.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(y, want)


def test_single_ops_match_stock_with_in_place_after():
    x = torch.randn(2, 3, 6, 6)
    for gk_fn, stock_fn in (
        (lambda t: gankernels.max_pool2d(t, 2), lambda t: F.max_pool2d(t, 2)),
        (lambda t: gankernels.upsample_nearest2d(t, 2), lambda t: F.interpolate(t, scale_factor=2, mode="nearest")),
        (lambda t: gankernels.bias_act(t, torch.ones(3), act="lrelu"), lambda t: F.leaky_relu(t + 1, 0.2)),
    ):
        grads = []
        for fn in (gk_fn, stock_fn):
            xg = x.clone().requires_grad_()
            y = fn(xg).mul_(3)
            y.sum().backward()
            grads.append(xg.grad)
        torch.testing.assert_close(*grads)


def test_bias_act_returns_a_fresh_tensor():
    x = torch.randn(2, 3)
    y = gankernels.bias_act(x)  # linear, no bias: the value of x, but not x itself
    assert y is not x and y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(y, x)


def test_host_cost_benchmark_reports_ratios(tmp_path):
    from gankernels.bench import host_cost

    ticks = iter(range(0, 10**12, 1000))
    cases = [c for c in host_cost.build_cases(quick=True) if "upsample" in c.name]
    for c in cases:
        c.calls = 2
    rows = host_cost.measure(cases, rounds=2, clock=lambda: next(ticks))
    assert [r.name for r in rows] == ["upsample ×2, forward", "upsample ×2, forward + backward"]
    for r in rows:  # a fake clock advancing 1 µs per reading: both sides 0.5 µs per call
        assert r.stock_us == r.gankernels_us == 0.5 and r.met
    table = host_cost.format_table(rows)
    assert "| upsample ×2, forward | 0.5 | 0.5 | 1.00× | +0.0 | ≤ +10 µs | met |" in table


def test_host_cost_is_a_bench_command(tmp_path):
    from gankernels.bench import cli

    cli.main(["host-cost", "--quick", "--rounds", "1", "--out", str(tmp_path)])  # exit status: targets met or not
    md = (tmp_path / "host_cost.md").read_text()
    assert "python -m gankernels.bench host-cost --quick --device cpu" in md
    rows = __import__("json").loads((tmp_path / "host_cost.json").read_text())["rows"]
    assert len(rows) == 13 and all(r["stock_us"] > 0 and r["gankernels_us"] > 0 for r in rows)


@pytest.mark.parametrize("through_custom_op", [False, True], ids=["eager", "custom-op"])
@pytest.mark.parametrize("b_requires_grad", [False, True])
def test_bias_act_backward_is_told_whether_the_bias_needs_a_gradient(through_custom_op, b_requires_grad):
    """A frozen bias (a GAN's EMA copy, a fine-tuned layer) costs no bias reduction: the
    backend's backward hears it through ``needs`` and skips it; the gradients are stock's."""
    seen = []
    saved = dispatch._REGISTRY["bias_act"].get("cuda")

    def forward(x, b, act, alpha, gain, clamp, dim):
        return ref.bias_act(x, b, act, alpha, gain, clamp, dim)

    def backward(grad, x, b, y, act, alpha, gain, clamp, dim, needs):
        seen.append(tuple(needs))
        gx, gb = ref.bias_act_backward(grad, x, b, act, alpha, gain, clamp, dim)
        return gx, (gb if needs[1] else None)

    dispatch.register("bias_act", "cuda", OpImpl(forward=forward, supports=lambda **kw: [], backward=backward))
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
        b = torch.randn(3, generator=g, requires_grad=b_requires_grad)
        mode = _PassThrough() if through_custom_op else contextlib.nullcontext()
        with mode:
            y = gankernels.bias_act(x, b, act="lrelu", backend="cuda")
        y.backward(torch.ones_like(y))
    finally:
        if saved is None:
            dispatch.unregister("bias_act", "cuda")
        else:
            dispatch.register("bias_act", "cuda", saved)
    assert seen == [(True, b_requires_grad)]
    xs, bs = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(b_requires_grad)
    F.leaky_relu(xs + bs.view(1, -1, 1, 1), 0.2).sum().backward()
    torch.testing.assert_close(x.grad, xs.grad)
    assert (b.grad is None) == (not b_requires_grad)
    if b_requires_grad:
        torch.testing.assert_close(b.grad, bs.grad)


@pytest.mark.parametrize("through_custom_op", [False, True], ids=["eager", "custom-op"])
def test_bias_act_double_backward_gives_stocks_zero_bias_gradient(through_custom_op):
    saved = dispatch._REGISTRY["bias_act"].get("cuda")

    def backward(grad, x, b, y, act, alpha, gain, clamp, dim, needs):
        gx, gb = ref.bias_act_backward(grad, x, b, act, alpha, gain, clamp, dim)
        return gx, gb

    impl = OpImpl(forward=lambda x, b, act, alpha, gain, clamp, dim: ref.bias_act(x, b, act, alpha, gain, clamp, dim),
                  supports=lambda **kw: [], backward=backward)  # fmt: skip
    dispatch.register("bias_act", "cuda", impl)
    try:
        g = torch.Generator().manual_seed(4)
        x, b = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
        grads = {}
        for name in ("gankernels", "stock"):
            xg, bg = x.clone().requires_grad_(), b.clone().requires_grad_()
            mode = _PassThrough() if (through_custom_op and name == "gankernels") else contextlib.nullcontext()
            with mode:
                if name == "gankernels":
                    y = gankernels.bias_act(xg, bg, act="lrelu", gain=1.5, backend="cuda")
                else:
                    y = F.leaky_relu(xg + bg.view(1, -1, 1, 1), 0.2) * 1.5
                (gx,) = torch.autograd.grad(y.sum(), xg, create_graph=True)
                gx.square().sum().backward()
            grads[name] = (xg.grad, bg.grad)
    finally:
        if saved is None:
            dispatch.unregister("bias_act", "cuda")
        else:
            dispatch.register("bias_act", "cuda", saved)
    for got, want, what in zip(grads["gankernels"], grads["stock"], ("x", "b"), strict=True):
        assert got is not None and want is not None, what
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=what)
