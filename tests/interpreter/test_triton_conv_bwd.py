"""Triton backward of conv3x3 / conv3x3_pool / up_conv3x3 under the Triton interpreter.

Run: TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/interpreter/test_triton_conv_bwd.py

Most tests call the backward directly with the forward's outputs (``out``, ``saved``)
taken from the float64 reference, so they check the backward kernels alone; a few go
end to end through ``gankernels.conv3x3(..., backend="triton")`` and autograd. Every
gradient is compared with float64 gradients by relative L2 error (DESIGN.md §6), all
kernel-allocated buffers poisoned with NaN.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import gankernels
from gankernels.ops import reference as ref
from gankernels.testing import assert_close_rel, random_input, tolerance

cb = pytest.importorskip("gankernels.triton.conv3x3_backward")

OPS = ("conv3x3", "conv3x3_pool", "up_conv3x3")
FORWARD = {"conv3x3": ref.conv3x3, "conv3x3_pool": ref.conv3x3_pool, "up_conv3x3": ref.up_conv3x3}
PREACT = {"conv3x3": ref.conv3x3_preact, "conv3x3_pool": ref.conv3x3_preact, "up_conv3x3": ref.up_conv3x3_preact}

# (N, Ci, Co, H, W): N in {1, 3}, channels in {1, 3, 8, 17}, odd and even sizes.
SHAPES = [(1, 3, 8, 5, 7), (3, 8, 3, 4, 5), (1, 17, 1, 3, 6), (2, 1, 17, 5, 4), (3, 3, 3, 7, 3)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(cb, "POISON_OUTPUTS", True)
    if cb._fwd is not None:
        monkeypatch.setattr(cb._fwd, "POISON_OUTPUTS", True)


def argmax_code(y: torch.Tensor) -> torch.Tensor:
    """The pool forward's ``saved``: each 2×2 window's argmax as int8 ``dy*2+dx``."""
    _, idx = F.max_pool2d(y, 2, return_indices=True)
    wd = y.shape[3]
    ph = torch.arange(idx.shape[2]).view(1, 1, -1, 1)
    pw = torch.arange(idx.shape[3]).view(1, 1, 1, -1)
    return ((idx // wd - 2 * ph) * 2 + (idx % wd - 2 * pw)).to(torch.int8)


def unpool_code(grad: torch.Tensor, code: torch.Tensor, h: int, wd: int) -> torch.Tensor:
    """Route pooled ``grad`` to the full-resolution argmax positions ``code``."""
    full = grad.new_zeros(grad.shape[0], grad.shape[1], h, wd)
    hp, wp = grad.shape[2:]
    for dy, dx in itertools.product(range(2), range(2)):
        sel = (code.long() == dy * 2 + dx).to(grad.dtype)
        full[:, :, dy : 2 * hp : 2, dx : 2 * wp : 2] = grad * sel
    return full


def reference_grads(op, grad, x, w, b, act, alpha, gain, clamp, code=None):
    """(gx, gw, gb) in float64. For the pooled op, the window argmax is ``code`` (the
    one the forward saved), so a near-tie the low-precision forward resolved the other
    way cannot make the comparison fail."""
    x, w, grad = x.double(), w.double(), grad.double()
    b = None if b is None else b.double()
    if op == "conv3x3_pool":
        p = ref.conv3x3_preact(x, w, b)
        if code is None:
            code = argmax_code(ref.epilogue(p, act, alpha, gain, clamp))
        gp = unpool_code(grad, code, p.shape[2], p.shape[3]) * ref.epilogue_derivative(p, act, alpha, gain, clamp)
        return ref._conv_grads(gp, x, w, b is not None, (True, True, True))
    back = ref.conv3x3_backward if op == "conv3x3" else ref.up_conv3x3_backward
    return back(grad, x, w, b, act, alpha, gain, clamp)


def safe_clamp(yu: torch.Tensor, frac: float = 0.6) -> float:
    """A clamp level between the 40th and 90th percentile of |y| that no value
    comes within 0.15 % of: the backward reads the clamp mask off the (rounded) output, so a value that
    rounds onto the clamp would flip the mask in fp16 (DESIGN §6 compares away from
    such ties)."""
    v = yu.detach().abs().flatten().double().sort().values
    v = v[v > 0]
    lo, hi = int(len(v) * 0.4), max(int(len(v) * 0.9), int(len(v) * 0.4) + 2)
    best, level = -1.0, float(v[int(len(v) * frac)])
    for i in range(lo, min(hi, len(v) - 1)):
        gap = float((v[i + 1] - v[i]) / v[i + 1])
        if gap > best:
            best, level = gap, float((v[i] + v[i + 1]) / 2)
    # fp16 rounds y by up to 2^-11 ≈ 0.05 %: a 0.3 % gap keeps every value off the level.
    assert best > 0.003, "no clean gap for the clamp level; change the seed"
    return level


def make_case(op, shape, dtype, layout, act, gain, clamp, bias=True, seed=0, alpha=0.2):
    """Inputs, the forward's outputs as the Triton forward would produce them, a
    random upstream gradient, and the clamp level actually used."""
    gen = torch.Generator().manual_seed(seed)
    n, ci, co, h, wd = shape
    x = random_input(n, ci, h, wd, dtype=dtype, layout=layout, generator=gen)
    w = random_input(co, ci, 3, 3, dtype=dtype, generator=gen, scale=1.0 / (3 * ci**0.5))
    b = random_input(co, dtype=dtype, generator=gen, scale=0.5) if bias else None
    p = PREACT[op](x.double(), w.double(), None if b is None else b.double())
    if clamp == "auto":
        clamp = safe_clamp(ref.activate(p, act, alpha) * gain)
    y = ref.epilogue(p, act, alpha, gain, clamp)
    saved = x.new_empty((0,))
    if op == "conv3x3_pool":
        saved = ref.same_memory_format(argmax_code(y), x)
        y = F.max_pool2d(y, 2)
    out = ref.same_memory_format(y.to(dtype), x)
    grad = ref.same_memory_format(random_input(*out.shape, dtype=dtype, generator=gen), x)
    if layout == "noncontiguous":
        grad = random_input(*out.shape, dtype=dtype, layout="noncontiguous", generator=gen)
    return x, w, b, out, saved, grad, clamp


def check(op, shape, dtype, layout, act, gain, clamp, bias=True, alpha=0.2, needs=(True, True, True), split=None, seed=0):
    x, w, b, out, saved, grad, clamp = make_case(op, shape, dtype, layout, act, gain, clamp, bias, seed, alpha)
    gx, gw, gb = cb.fused_backward(op, grad, x, w, b, out, saved, act, alpha, gain, clamp, needs, split=split)
    rx, rw, rb = reference_grads(op, grad, x, w, b, act, alpha, gain, clamp, saved if op == "conv3x3_pool" else None)
    tol = tolerance(dtype)
    for name, got, want, need in (("gx", gx, rx, needs[0]), ("gw", gw, rw, needs[1]), ("gb", gb, rb, needs[2] and bias)):
        if not need:
            assert got is None, f"{name} computed although not needed"
            continue
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
        assert_close_rel(got, want, tol=tol, what=f"{op} {act} {name}")
    if gx is not None:
        assert ref.memory_format_of(gx) == ref.memory_format_of(x), "gx must keep x's memory format"
    return gx, gw, gb


# --------------------------------------------------------------------------------
# Every activation, every op, fp32; gain and clamp varied (clamp "auto": a clean level).

_EPILOGUES = [(1.0, None), (1.7, "auto"), (0.6, None), (-1.3, "auto"), (1.0, "auto"), (2.0, None)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("act_i, act", list(enumerate(ref.ACTIVATIONS)))
def test_fp32_every_activation(op, act_i, act):
    gain, clamp = _EPILOGUES[(act_i + OPS.index(op)) % len(_EPILOGUES)]
    shape = SHAPES[(act_i + 2 * OPS.index(op)) % len(SHAPES)]
    check(op, shape, torch.float32, "nchw", act, gain, clamp, bias=act_i % 3 != 2, seed=act_i)


_FP16_CASES = {
    "conv3x3": [("tanh", 1.4, "auto"), ("sigmoid", 0.8, None)],
    "conv3x3_pool": [("lrelu", 1.0, "auto"), ("silu", 1.0, None)],
    "up_conv3x3": [("silu", 1.0, "auto"), ("relu", 1.3, None)],
}


@pytest.mark.parametrize("op, act, gain, clamp", [(op, *c) for op, cases in _FP16_CASES.items() for c in cases])
def test_fp16(op, act, gain, clamp):
    # Co >= 3 here: a single-channel gb is one sum with cancellation, ill-conditioned
    # for a relative test at fp16 precision.
    shape = [s for s in SHAPES if s[2] >= 3][(OPS.index(op) + len(act)) % 4]
    check(op, shape, torch.float16, "nchw", act, gain, clamp, seed=3)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout, dtype", [("channels_last", torch.float16), ("noncontiguous", torch.float32)])
def test_layouts(op, layout, dtype):
    check(op, (2, 8, 3, 5, 6), dtype, layout, "lrelu", 1.0, None, seed=5)


@pytest.mark.parametrize("op, alpha, gain", [("conv3x3", -0.3, 1.0), ("conv3x3_pool", 0.2, 0.0), ("up_conv3x3", -0.3, 0.5)])
def test_recompute_paths(op, alpha, gain):
    # lrelu with a negative slope, or gain 0, cannot be read off y: the pre-activation is recomputed.
    check(op, (1, 3, 3, 5, 5), torch.float32, "nchw", "lrelu", gain, None, alpha=alpha, seed=7)


@pytest.mark.parametrize(
    "op, needs",
    [
        ("conv3x3", (True, False, False)),
        ("conv3x3_pool", (False, True, False)),
        ("up_conv3x3", (False, False, True)),
        ("conv3x3", (False, False, True)),
    ],
)
def test_needs_subsets(op, needs):
    check(op, (1, 3, 8, 4, 5), torch.float32, "nchw", "lrelu", 1.0, None, needs=needs, seed=11)


@pytest.mark.parametrize("op", ["conv3x3_pool", "up_conv3x3"])
def test_split_k_is_deterministic_and_correct(op):
    # 2·8·9 = 144 rows of the zero-bordered grid, 5 granules of 32: several split slices
    # summed in a fixed order.
    args = (op, (2, 3, 5, 6, 7), torch.float32, "channels_last", "lrelu", 1.0, None)
    a = check(*args, split=3, seed=13)
    b = check(*args, split=3, seed=13)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v), "the same split must give bitwise identical gradients"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_whole_row_tiles(op, layout):
    # N·H·W = 256 input pixels: dgrad's row tiles are whole (no row masks, M_ALIGNED), and
    # a dense channels_last gx is stored at pixel·Ci (GX_CL); NCHW keeps the strided store.
    check(op, (1, 16, 8, 16, 16), torch.float32, layout, "lrelu", 1.0, None, seed=19)


@pytest.mark.parametrize("op", OPS)
def test_wide_tiles_even_channels(op):
    # Co = 64 takes wgrad's unswapped tile (Co on the MMA's M side) and channel counts that
    # the tiles divide take the mask-free loads of both GEMMs.
    check(op, (1, 32, 64, 4, 5), torch.float32, "channels_last", "lrelu", 1.0, None, seed=17)


@pytest.mark.parametrize("op", ["conv3x3_pool", "up_conv3x3"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 5), (1, 3, 4, 20, 20)])
def test_few_input_channels_taps_in_n(op, shape):
    # Ci < 16: wgrad puts a plane's taps on the tile's N side over a channel-padded copy of
    # x: 4 channels per row for the small image (the bordered grid is large next to it),
    # 8 for the 20×20 one.
    n, ci, _, h, wd = shape
    grid = cb.Grid.of(n, h, wd)
    want_cip = 8 if h == 20 else 4
    assert cb._taps_in_n_channels(ci, cb.MODE_POOL, n * h * wd, grid.rows) == want_cip
    check(op, shape, torch.float32, "nchw", "relu", 1.0, None, seed=19)


@pytest.mark.parametrize("shape", [(2, 16, 8, 3, 4), (1, 32, 5, 4, 3)])
def test_up_conv_narrow_co_taps_in_n(shape):
    # The up-conv with Co <= 32 and Ci in (16, 32, 64): wgrad puts a plane's 4 taps × Ci
    # on the tile's columns over x's own channels (no padding); Co = 5 takes the Co mask.
    _, ci, co, _, _ = shape
    assert cb._wgrad_taps_in_n(ci, co, cb.MODE_UP, 4) and not cb._wgrad_taps_in_n(ci, co, cb.MODE_CONV, 4)
    check("up_conv3x3", shape, torch.float32, "channels_last", "lrelu", 1.0, None, seed=23)


@pytest.mark.parametrize("op", OPS)
def test_gp_grid_layout(op):
    """The gp kernel's zero-bordered buffer: each plane holds gp at its interior rows
    (for the up-conv, phase (a, c) holds gp[2i+a, 2j+c]) and exact zeros everywhere else
    (border, guards, tail), and its bias partials sum to the bias gradient."""
    x, w, b, out, saved, grad, clamp = make_case(op, (2, 3, 4, 5, 3), torch.float32, "nchw", "tanh", 1.3, "auto")
    mode, tensors, geom, scalars, flags = cb._operands(op, grad, x, w, b, out, saved, "tanh", 0.2, 1.3, clamp)
    n, _, h, wd = x.shape
    grid = cb.Grid.of(n, h, wd)
    buf, bpart = cb._launch_gp(mode, tensors, geom, scalars, flags, x, w.shape[0], grid, with_bias=True)
    p = PREACT[op](x.double(), w.double(), b.double())
    gy = grad.double() if op != "conv3x3_pool" else unpool_code(grad.double(), saved, p.shape[2], p.shape[3])
    want = gy * ref.epilogue_derivative(p, "tanh", 0.2, 1.3, clamp)
    planes = 4 if op == "up_conv3x3" else 1
    assert buf.shape == (planes, grid.rows, w.shape[0])
    outside = torch.ones(planes, grid.rows, dtype=torch.bool)
    for q in range(planes):
        got = grid.interior(buf, q)
        exp = want[:, :, q // 2 :: 2, q % 2 :: 2] if op == "up_conv3x3" else want
        assert_close_rel(got, exp, dtype=torch.float32, what=f"gp plane {q}")
        rows = grid.front + torch.arange(n * (h + 2) * (wd + 2)).view(n, h + 2, wd + 2)[:, 1 : h + 1, 1 : wd + 1]
        outside[q, rows.flatten()] = False
    assert torch.equal(buf[outside], torch.zeros_like(buf[outside])), "the border and guard rows must be exactly zero"
    assert_close_rel(bpart.sum(0), want.sum((0, 2, 3)), dtype=torch.float32, what="bias partials")


def test_wgrad_split_count():
    # Enough slices that tiles × slices covers 2 waves of an H100/H200's 132 SMs, at most
    # one slice per granule and 64 in all; on the CPU interpreter at most 2.
    meta = torch.device("meta")
    assert cb.wgrad_split(meta, tiles=72, granules=1000) == 4
    assert cb.wgrad_split(meta, tiles=9, granules=1000) == 30
    assert cb.wgrad_split(meta, tiles=1, granules=1000) == 64
    assert cb.wgrad_split(meta, tiles=9, granules=5) == 5
    assert cb.wgrad_split(meta, tiles=512, granules=1000) == 1
    assert cb.wgrad_split(torch.device("cpu"), tiles=1, granules=1000) == 2


def test_expanded_grad():
    # grad of y.sum() arrives as an expanded (zero-stride) tensor.
    x, w, b, out, saved, _, _ = make_case("conv3x3_pool", (2, 3, 8, 6, 5), torch.float32, "nchw", "lrelu", 1.0, None)
    grad = torch.ones(()).expand(out.shape)
    gx, gw, gb = cb.fused_backward("conv3x3_pool", grad, x, w, b, out, saved, "lrelu", 0.2, 1.0, None)
    rx, rw, rb = reference_grads("conv3x3_pool", grad.contiguous(), x, w, b, "lrelu", 0.2, 1.0, None, saved)
    assert_close_rel(gx, rx, dtype=torch.float32, what="gx")
    assert_close_rel(gw, rw, dtype=torch.float32, what="gw")
    assert_close_rel(gb, rb, dtype=torch.float32, what="gb")


@pytest.mark.parametrize("op", ["conv3x3", "conv3x3_pool"])
def test_pre_activation_grad(op):
    x, w, b, out, saved, grad, clamp = make_case(op, (2, 3, 17, 5, 6), torch.float32, "channels_last", "tanh", 1.2, "auto")
    gp = cb.pre_activation_grad(op, grad, x, w, b, out, saved, "tanh", 0.2, 1.2, clamp)
    p = ref.conv3x3_preact(x.double(), w.double(), b.double())
    gy = grad.double() if op == "conv3x3" else unpool_code(grad.double(), saved, p.shape[2], p.shape[3])
    want = gy * ref.epilogue_derivative(p, "tanh", 0.2, 1.2, clamp)
    assert ref.memory_format_of(gp) == torch.channels_last
    assert_close_rel(gp, want, dtype=torch.float32, what="gp")


def test_reference_helper_matches_autograd():
    # The same-argmax reference used above agrees with float64 autograd of the spec.
    x, w, b, _, saved, grad, _ = make_case("conv3x3_pool", (2, 3, 4, 5, 6), torch.float64, "nchw", "silu", 1.0, None)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    ref.conv3x3_pool(xs, ws, bs, "silu", 0.2, 1.0, None).backward(grad)
    rx, rw, rb = reference_grads("conv3x3_pool", grad, x, w, b, "silu", 0.2, 1.0, None, saved)
    for got, want in ((rx, xs.grad), (rw, ws.grad), (rb, bs.grad)):
        assert_close_rel(got, want, tol=1e-12)


# --------------------------------------------------------------------------------
# End to end: the registered triton op, its forward's out/saved, autograd.


def _triton_ready(op):
    return "triton" in gankernels.ops.dispatch.registered_backends(op) and cb._fwd is not None


@pytest.mark.parametrize(
    "op, dtype, layout, act",
    [(op, torch.float32, "channels_last", "lrelu") for op in OPS] + [("conv3x3_pool", torch.float16, "nchw", "silu")],
)
def test_end_to_end_autograd(op, dtype, layout, act):
    if not _triton_ready(op):
        pytest.skip("the triton forward is not registered")
    assert gankernels.ops.dispatch.get_impl(op, "triton").backward is cb.BACKWARDS[op]
    gen = torch.Generator().manual_seed(21)
    n, ci, co, h, wd = (2, 3, 5, 5, 6)
    x = random_input(n, ci, h, wd, dtype=dtype, layout=layout, generator=gen).requires_grad_()
    w = random_input(co, ci, 3, 3, dtype=dtype, generator=gen, scale=1 / (3 * ci**0.5)).requires_grad_()
    b = random_input(co, dtype=dtype, generator=gen).requires_grad_()
    y, saved = getattr(gankernels.ops.registration, f"{op}_op")(x, w, b, act, 0.2, 1.0, None, "triton")
    grad = random_input(*y.shape, dtype=dtype, generator=gen)
    y.backward(grad)
    rx, rw, rb = reference_grads(op, grad, x.detach(), w.detach(), b.detach(), act, 0.2, 1.0, None,
                                 saved if op == "conv3x3_pool" else None)
    assert_close_rel(x.grad, rx, dtype=dtype, what="gx")
    assert_close_rel(w.grad, rw, dtype=dtype, what="gw")
    assert_close_rel(b.grad, rb, dtype=dtype, what="gb")


@pytest.mark.parametrize("op", ["conv3x3", "conv3x3_pool"])
def test_r1_penalty_double_backward(op):
    if not _triton_ready(op):
        pytest.skip("the triton forward is not registered")
    gen = torch.Generator().manual_seed(31)
    x0 = random_input(2, 3, 6, 6, generator=gen)
    w0 = random_input(8, 3, 3, 3, generator=gen, scale=0.3)
    b0 = random_input(8, generator=gen)
    results = {}
    for backend in ("torch", "triton"):
        x = x0.clone().requires_grad_()
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = getattr(gankernels, op)(x, w, b, act="lrelu", backend=backend)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        penalty = gx.square().sum()
        penalty.backward()
        results[backend] = (gx.detach(), w.grad, b.grad)
    for name, got, want in zip(("gx", "d R1/dw", "d R1/db"), results["triton"], results["torch"], strict=True):
        assert_close_rel(got, want, dtype=torch.float32, what=name)


def test_bad_saved_raises():
    x, w, b, out, saved, grad, _ = make_case("conv3x3_pool", (1, 3, 3, 4, 4), torch.float32, "nchw", "lrelu", 1.0, None)
    with pytest.raises(ValueError, match="saved"):
        cb.fused_backward("conv3x3_pool", grad, x, w, b, out, saved.long(), "lrelu", 0.2, 1.0, None)


def test_backward_traces_under_torch_compile():
    # AOTAutograd traces the backward with fake tensors: the kernels sit behind an opaque
    # custom op (gankernels::conv3x3_pool_backward) with a fake kernel.
    if not _triton_ready("conv3x3_pool"):
        pytest.skip("the triton forward is not registered")
    gen = torch.Generator().manual_seed(41)
    x = random_input(1, 3, 5, 6, generator=gen).requires_grad_()
    w = random_input(4, 3, 3, 3, generator=gen, scale=0.3).requires_grad_()
    b = random_input(4, generator=gen).requires_grad_()

    def block(x, w, b):
        return gankernels.conv3x3_pool(x, w, b, act="lrelu", backend="triton")

    torch._dynamo.reset()
    torch.compile(block, backend="aot_eager", fullgraph=True)(x, w, b).square().sum().backward()
    compiled = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    block(x, w, b).square().sum().backward()
    for got, t in zip(compiled, (x, w, b), strict=True):
        assert torch.equal(got, t.grad)


def test_backward_custom_op_opcheck():
    x, w, b, out, saved, grad, _ = make_case("conv3x3", (1, 3, 4, 4, 5), torch.float32, "channels_last", "tanh", 1.0, None)
    for needs in ([True, True, True], [False, True, False]):
        torch.library.opcheck(
            torch.ops.gankernels.conv3x3_backward.default,
            (grad, x, w, b, out, saved, "tanh", 0.2, 1.0, None, needs, "triton"),
            test_utils=("test_schema", "test_faketensor"),
        )
