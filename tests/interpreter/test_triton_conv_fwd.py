"""The Triton 3×3 convolution forward kernels (conv3x3, conv3x3_pool, up_conv3x3) on
CPU under the Triton interpreter, against the float64 reference.

Run: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/interpreter/test_triton_conv_fwd.py``

Shapes are tiny (the interpreter is slow); the case list below covers Ci and Co in
{1, 3, 8, 17, 32} (both the merged-K path for Ci < 16 and the per-tap chunked path,
with partial K and N tiles), H and W odd and even down to 1×1 / 2×2, N = 1 and 3,
every activation, with and without bias / gain / clamp, and the three input layouts,
without running the full cross product.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import gankernels
from gankernels.ops import reference as ref
from gankernels.ops import registration as reg
from gankernels.testing import LAYOUTS, assert_close_rel, random_input
from gankernels.triton import conv3x3 as tconv

OPS = ("conv3x3", "conv3x3_pool", "up_conv3x3")
REFERENCE = {"conv3x3": ref.conv3x3, "conv3x3_pool": ref.conv3x3_pool, "up_conv3x3": ref.up_conv3x3_naive}
DTYPES = (torch.float32, torch.float16)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    # Every output the module allocates is NaN-filled before the launch, so an element
    # the kernel does not write fails the comparison.
    monkeypatch.setattr(tconv, "POISON_OUTPUTS", True)


def _make(n, ci, co, h, w, dtype, layout, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = random_input(n, ci, h, w, dtype=dtype, layout=layout, generator=g)
    wt = (torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64) / (3 * ci**0.5)).to(dtype)
    b = (torch.randn(co, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    return x, wt, b


def _reference(op, x, w, b, act, alpha, gain, clamp):
    return REFERENCE[op](x.double(), w.double(), None if b is None else b.double(), act, alpha, gain, clamp)


def _cases():
    """A covering subset: every (op, dtype) pair sees every activation, each Ci/Co
    value, odd/even/tiny spatial sizes, both batch sizes, every layout, with and
    without bias, gain and clamp."""
    channels = [(1, 3), (3, 8), (8, 17), (17, 32), (32, 1), (3, 32)]
    spatial = [(1, 1), (2, 2), (5, 4), (3, 7), (6, 6), (1, 5)]
    pool_spatial = [(2, 2), (5, 4), (3, 7), (6, 6), (2, 5), (4, 3)]
    acts = list(ref.ACTIVATIONS)
    out = []
    for oi, op in enumerate(OPS):
        for di, dtype in enumerate(DTYPES):
            for i, act in enumerate(acts):
                k = i + 2 * oi + di  # rotate the other factors against the activation
                ci, co = channels[k % len(channels)]
                h, w = (pool_spatial if op == "conv3x3_pool" else spatial)[(k + di) % 6]
                n = 3 if k % 2 else 1
                layout = LAYOUTS[(k + i // 3 + oi) % 3]  # not locked to the channel pair
                bias = k % 4 != 1
                gain = 1.7 if k % 3 == 1 else 1.0
                clamp = 0.6 if k % 5 == 2 else None
                # fp16 cases stay small in Ci·Co: the interpreter is slowest there.
                out.append(
                    pytest.param(
                        op,
                        dtype,
                        n,
                        ci,
                        co,
                        h,
                        w,
                        act,
                        bias,
                        gain,
                        clamp,
                        layout,
                        id=f"{op}-{str(dtype)[6:]}-{act}-n{n}c{ci}x{co}-{h}x{w}-{layout}"
                        f"{'-bias' if bias else ''}{'-gain' if gain != 1 else ''}{'-clamp' if clamp else ''}",
                    )
                )
    return out


@pytest.mark.parametrize("op,dtype,n,ci,co,h,w,act,bias,gain,clamp,layout", _cases())
def test_matches_reference(op, dtype, n, ci, co, h, w, act, bias, gain, clamp, layout):
    seed = zlib.crc32(f"{op}-{dtype}-{act}-{ci}-{co}-{h}-{w}".encode())  # stable across processes
    x, wt, b = _make(n, ci, co, h, w, dtype, layout, bias, seed)
    alpha = 0.2 if act != "lrelu" else 0.15
    out = getattr(gankernels, op)(x, wt, b, act=act, alpha=alpha, gain=gain, clamp=clamp, backend="triton")
    expect = _reference(op, x, wt, b, act, alpha, gain, clamp)
    assert out.dtype == dtype and out.shape == expect.shape
    assert_close_rel(out, expect, dtype=dtype)
    # The output keeps x's memory format (anything not channels_last comes back contiguous).
    if layout == "channels_last" and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_give_identical_results(op, layout):
    """The kernel reads any strides in place: the same values in another layout give
    bit-identical results (same reduction order)."""
    x, wt, b = _make(2, 8, 8, 4, 6, torch.float32, "nchw", True, 7)
    base, _ = getattr(tconv, f"{op}_forward")(x, wt, b, "lrelu", 0.2, 1.0, None)
    if layout == "channels_last":
        x2 = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        x2 = torch.cat([x, torch.randn_like(x)], dim=3)[..., : x.shape[3]]
        assert not x2.is_contiguous()
    else:
        x2 = x.clone()
    other, _ = getattr(tconv, f"{op}_forward")(x2, wt, b, "lrelu", 0.2, 1.0, None)
    assert torch.equal(base, other)
    assert ref.memory_format_of(other) == ref.memory_format_of(x2)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "dtype,n,ci,h,w,layout",
    [
        (torch.float32, 3, 3, 5, 7, "channels_last"),  # RGB, odd sizes: partial tiles and image borders
        (torch.float16, 2, 1, 6, 3, "nchw"),  # K = 9: one step, most K columns past the taps
        (torch.float32, 1, 2, 2, 2, "noncontiguous"),  # every pixel on a border
        (torch.float32, 2, 8, 4, 5, "channels_last"),  # Ci a power of two: channel offsets hidden from the analysis
    ],
)
def test_narrow_input_tile_orientations_agree(op, dtype, n, ci, h, w, layout, monkeypatch):
    """The merged-K path (Ci < 16) loads its input tile rows-first or K-first, whichever
    dimension the installed Triton gives the lanes (``_LANES_ON_LAST_DIM``): both orders
    give bit-identical results, equal to the float64 reference, and the dense-row output
    store (channels_last output) the same values as the decoded one (NCHW output)."""
    x, wt, b = _make(n, ci, 5, h, w, dtype, layout, True, 23)
    outs = {}
    for lanes_last in (True, False):
        monkeypatch.setattr(tconv, "_LANES_ON_LAST_DIM", tl.constexpr(lanes_last))
        outs[lanes_last] = getattr(tconv, f"{op}_forward")(x, wt, b, "lrelu", 0.2, 1.0, None)
    (y1, s1), (y0, s0) = outs[True], outs[False]
    assert torch.equal(y1, y0) and torch.equal(s1, s0)
    assert_close_rel(y1, _reference(op, x, wt, b, "lrelu", 0.2, 1.0, None), dtype=dtype)
    # The other output layout: x in the other memory format (the output follows it).
    x2 = x.contiguous() if ref.memory_format_of(x) == torch.channels_last else x.contiguous(memory_format=torch.channels_last)
    y2, s2 = getattr(tconv, f"{op}_forward")(x2, wt, b, "lrelu", 0.2, 1.0, None)
    # (One input channel or a 1×1 output: both memory formats are the same strides.)
    assert ci == 1 or y1.shape[2] * y1.shape[3] == 1 or ref.memory_format_of(y2) != ref.memory_format_of(y1)
    assert torch.equal(y2, y1) and torch.equal(s2, s1)


@pytest.mark.parametrize("op", ("conv3x3", "conv3x3_pool"))
@pytest.mark.parametrize(
    "dtype,n,ci,h,w",
    [
        (torch.float32, 1, 3, 16, 16),  # RGB; M = 256 (pool: 4·64): whole row tiles, no row masks
        (torch.float16, 2, 3, 8, 16),  # two images in one tile
        (torch.float32, 1, 1, 17, 16),  # odd height: the pool drops the last row; M still whole tiles
        (torch.float16, 1, 8, 16, 16),  # Ci a power of two (channel offsets hidden from the analysis)
        (torch.float32, 3, 3, 5, 7),  # partial row tiles with compile-time addressing
        (torch.float32, 1, 17, 16, 16),  # the per-tap (wide) path: partial K chunks
        (torch.float16, 2, 32, 6, 7),  # the wide path, odd sizes
    ],
)
def test_dense_channels_last_addressing_agrees(op, dtype, n, ci, h, w, monkeypatch):
    """The compile-time addressing of dense channels_last tensors (DENSE_CL: constant
    strides and image size; merged-K and per-tap paths) and the row-mask-free form for whole
    row tiles (M_ALIGNED) give the bits of the runtime-stride form, equal to the reference."""
    x, wt, b = _make(n, ci, 5, h, w, dtype, "channels_last", True, 31)
    assert tconv._dense_channels_last(x)
    outs = {}
    for dense in (True, False):
        monkeypatch.setattr(tconv, "_DENSE_CL", dense)
        outs[dense] = getattr(tconv, f"{op}_forward")(x, wt, b, "lrelu", 0.2, 1.0, None)
    (y1, s1), (y0, s0) = outs[True], outs[False]
    assert torch.equal(y1, y0) and torch.equal(s1, s0)
    assert_close_rel(y1, _reference(op, x, wt, b, "lrelu", 0.2, 1.0, None), dtype=dtype)


def test_dense_channels_last_detection():
    x = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert tconv._dense_channels_last(x)
    assert not tconv._dense_channels_last(torch.empty(2, 3, 4, 5))  # NCHW
    assert not tconv._dense_channels_last(torch.empty(2, 3, 4, 6).contiguous(memory_format=torch.channels_last)[..., :5])
    # A size-1 dimension's stride is never used: NCHW with one channel is dense channels_last.
    assert tconv._dense_channels_last(torch.empty(2, 1, 4, 5))


def _pool_positions(y64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's argmax of each 2×2 window as dy*2+dx, and the gap between the window's
    largest and second-largest value (to skip near-ties)."""
    n, c, h, w = y64.shape
    ho, wo = h // 2, w // 2
    win = y64[:, :, : 2 * ho, : 2 * wo].reshape(n, c, ho, 2, wo, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, 4)
    top2 = win.topk(2, dim=-1).values
    _, flat = F.max_pool2d(y64, 2, return_indices=True)
    rows = flat // w
    cols = flat % w
    rows0 = torch.arange(ho).view(1, 1, ho, 1) * 2
    cols0 = torch.arange(wo).view(1, 1, 1, wo) * 2
    return (rows - rows0) * 2 + (cols - cols0), top2[..., 0] - top2[..., 1]


@pytest.mark.parametrize(
    "dtype,ci,co,h,w,act,layout",
    [
        (torch.float32, 3, 17, 5, 7, "lrelu", "channels_last"),
        (torch.float32, 17, 8, 6, 4, "linear", "nchw"),
        (torch.float16, 8, 32, 4, 5, "tanh", "noncontiguous"),
        (torch.float32, 1, 3, 3, 3, "silu", "nchw"),
    ],
)
def test_pool_saved_argmax(dtype, ci, co, h, w, act, layout):
    x, wt, b = _make(2, ci, co, h, w, dtype, layout, True, 11)
    out, saved = tconv.conv3x3_pool_forward(x, wt, b, act, 0.2, 1.0, None)
    y64 = ref.conv3x3(x.double(), wt.double(), b.double(), act, 0.2, 1.0, None)
    expect_pos, gap = _pool_positions(y64)
    assert saved.dtype == torch.int8 and saved.shape == out.shape
    assert ref.memory_format_of(saved) == ref.memory_format_of(out)
    assert int(saved.min()) >= 0 and int(saved.max()) <= 3
    clear = gap > (1e-2 if dtype == torch.float16 else 1e-4)
    assert clear.float().mean() > 0.8  # the check below covers most windows
    assert torch.equal(saved.long()[clear], expect_pos[clear])
    # The pooled value is the epilogue value at the saved position.
    assert_close_rel(out, F.max_pool2d(y64, 2), dtype=dtype)


def test_pool_ties_take_first_position():
    """relu with a strongly negative bias makes whole windows 0: the first position wins."""
    x, wt, _ = _make(1, 3, 4, 4, 4, torch.float32, "nchw", False, 3)
    b = torch.full((4,), -100.0)
    out, saved = tconv.conv3x3_pool_forward(x, wt, b, "relu", 0.2, 1.0, None)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(saved, torch.zeros_like(saved))


def test_pool_argmax_is_taken_after_rounding():
    """Issue 18 item 4: values that differ in fp32 but tie once rounded to the output
    dtype must pool as F.max_pool2d pools the rounded conv output (first max wins).
    Here every conv value is 1 (centre tap) plus 2^-13 times the left neighbour: in fp32
    the right column of each window is larger, in fp16 (ulp 2^-10 at 1) all four tie."""
    x = torch.ones(1, 1, 2, 4, dtype=torch.float16)
    wt = torch.zeros(1, 1, 3, 3, dtype=torch.float16)
    wt[0, 0, 1, 1] = 1.0
    wt[0, 0, 1, 0] = 2.0**-13
    out, saved = tconv.conv3x3_pool_forward(x, wt, None, "linear", 0.2, 1.0, None)
    y = F.conv2d(x.double(), wt.double(), padding=1).half()  # stock: conv output rounded, then pooled
    assert y[0, 0, 0, 0] == y[0, 0, 0, 1]  # the tie after rounding the test is about
    expect_pos, _ = _pool_positions(y.double())
    assert torch.equal(out, F.max_pool2d(y, 2))
    assert torch.equal(saved.long(), expect_pos)
    assert torch.equal(saved, torch.zeros_like(saved))


def test_nan_propagates_like_pytorch():
    x, wt, b = _make(1, 3, 5, 6, 6, torch.float32, "channels_last", True, 5)
    x[0, 1, 2, 3] = float("nan")
    for op in OPS:
        out = getattr(gankernels, op)(x, wt, b, act="lrelu", backend="triton")
        expect = _reference(op, x, wt, b, "lrelu", 0.2, 1.0, None)
        assert torch.isnan(expect).any()
        assert_close_rel(out, expect, dtype=torch.float32, what=op)  # NaN exactly where the reference has it
    _, saved = tconv.conv3x3_pool_forward(x, wt, b, "lrelu", 0.2, 1.0, None)
    # PyTorch takes a NaN over any number, and the last NaN of a window: pooled pixel
    # (1, 1) covers conv rows 2..3, cols 2..3, whose 3×3 neighbourhoods all contain the
    # NaN at (2, 3), so all four are NaN and the last position (3) wins.
    assert int(saved[0, 0, 1, 1]) == 3


@triton.jit
def _lrelu_both_forms(x_ptr, out_ptr, alpha, N: tl.constexpr):
    offs = tl.arange(0, N)
    p = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, tconv._epilogue(p, alpha, 1.0, 0.0, 2, False, False, False))
    tl.store(out_ptr + N + offs, tconv._epilogue(p, alpha, 1.0, 0.0, 2, False, False, True))


@pytest.mark.parametrize("alpha", [0.2, 0.15, 1.0, 2.0**-20, 0.999])
def test_lrelu_max_form_gives_the_select_forms_bits(alpha):
    """The narrow-input path's leaky ReLU for 0 < alpha <= 1, max(p, p·alpha), against the
    select form bit for bit: signed zeros, denormals (whose products underflow), infinities,
    the largest finite values and random values of every magnitude (NaN stays NaN)."""
    g = torch.Generator().manual_seed(17)
    special = [0.0, -0.0, 1e-45, -1e-45, 3e-39, -3e-39, float("inf"), float("-inf"), 3.4e38, -3.4e38, float("nan")]
    n = 512 - len(special)
    rand = torch.randn(n, generator=g) * torch.exp2(torch.randint(-140, 120, (n,), generator=g).float())
    x = torch.cat([torch.tensor(special), rand]).float()
    out = torch.empty(2 * x.numel())
    _lrelu_both_forms[(1,)](x, out, alpha, N=x.numel())
    select, maxed = out[: x.numel()], out[x.numel() :]
    nan = torch.isnan(select)
    assert torch.equal(nan, torch.isnan(maxed)) and int(nan.sum()) == 1
    assert torch.equal(select[~nan].view(torch.int32), maxed[~nan].view(torch.int32))
    assert (select[~nan].view(torch.int32) < 0).sum() > 100  # the negative side is exercised


@pytest.mark.parametrize("op", ["conv3x3", "conv3x3_pool"])
@pytest.mark.parametrize("alpha", [0.2, 1.0, 0.0, 1.5, -0.3])
def test_narrow_input_lrelu_every_alpha(op, alpha):
    """The merged-K path takes the max form of the leaky ReLU for 0 < alpha <= 1 and the
    select form otherwise (alpha 0, > 1, negative): both match the reference."""
    x, wt, b = _make(2, 3, 6, 5, 6, torch.float32, "channels_last", True, 29)
    out, _ = getattr(tconv, f"{op}_forward")(x, wt, b, "lrelu", alpha, 1.0, None)
    assert_close_rel(out, _reference(op, x, wt, b, "lrelu", alpha, 1.0, None), dtype=torch.float32)


def test_weight_repacked_once_per_version():
    tconv.clear_weight_cache()
    x, wt, b = _make(1, 8, 3, 3, 3, torch.float32, "nchw", True, 13)
    p1 = tconv.packed_weight(wt, torch.float32)
    assert tconv.packed_weight(wt, torch.float32) is p1  # cached
    assert p1.shape == (9 * 8, 3)
    assert tconv.packed_weight(wt, torch.float32, phases=True).shape == (16 * 8, 3)
    with torch.no_grad():
        wt.mul_(-2.0)  # an optimizer-style in-place update bumps the version
    assert tconv.packed_weight(wt, torch.float32) is not p1
    out = gankernels.conv3x3(x, wt, b, act="linear", backend="triton")
    assert_close_rel(out, _reference("conv3x3", x, wt, b, "linear", 0.2, 1.0, None), dtype=torch.float32)
    # A clone at another address, or a new tensor that may reuse a freed one's memory,
    # never sees stale packed weights.
    w2 = wt.clone()
    del wt
    w3 = torch.randn_like(w2)
    out = gankernels.up_conv3x3(x, w3, b, backend="triton")
    assert_close_rel(out, _reference("up_conv3x3", x, w3, b, "linear", 0.2, 1.0, None), dtype=torch.float32)


def test_packed_phase_weights_are_the_reference_ones():
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    packed = tconv.packed_weight(w, torch.float64, phases=True).reshape(2, 2, 2, 2, 4, 5)
    pw = ref.subpixel_phase_weights(w)  # [a, c, Co, Ci, tr, tc]
    assert torch.equal(packed, pw.permute(0, 1, 4, 5, 3, 2))


@pytest.mark.parametrize(
    "src,dst,layout", [(torch.float32, torch.float16, "channels_last"), (torch.float16, torch.float32, "nchw")]
)
def test_phase_repack_kernel_matches_the_formula(src, dst, layout):
    """The one-kernel phase repack gives the reference formula's bits (summed in fp32,
    rounded once), for tiles that do not divide the channels and any weight layout."""
    w = torch.randn(37, 33, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(19)).to(src)
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    got = tconv._pack(w, dst, phases=True)
    pw = ref.subpixel_phase_weights(w.float())  # [a, c, Co, Ci, tr, tc]
    expect = pw.permute(0, 1, 4, 5, 3, 2).to(dst).contiguous().reshape(-1, 37)
    assert got.shape == (16 * 33, 37) and got.dtype == dst
    assert torch.equal(got, expect)


def test_supports_reasons():
    x = torch.randn(1, 3, 1, 4)
    w = torch.randn(4, 3, 3, 3)
    why = tconv.supports_conv3x3_pool(x=x, w=w, b=None)
    assert any("2×2" in r for r in why)
    assert tconv.supports_conv3x3(x=x, w=w, b=None) == []
    assert tconv.supports_conv3x3(x=x.double(), w=w.double(), b=None)  # fp64: torch backend only
    assert tconv.supports_conv3x3(x=x.bfloat16(), w=w.bfloat16(), b=None)  # interpreter refuses bf16
    with pytest.raises(gankernels.BackendUnavailable, match="2×2"):
        gankernels.conv3x3_pool(x, w, backend="triton")


def test_fake_saved_and_opcheck():
    """The registered custom op with this backend passes torch.library.opcheck (schema,
    fake kernel incl. fake_saved, autograd registration)."""
    x, wt, b = _make(1, 3, 4, 4, 4, torch.float32, "channels_last", True, 17)
    for op in (reg.conv3x3_op, reg.conv3x3_pool_op):
        torch.library.opcheck(op, (x, wt, b, "lrelu", 0.2, 1.0, None, "triton"), test_utils=("test_schema", "test_faketensor"))
    _, saved = tconv.conv3x3_pool_forward(x, wt, b, "lrelu", 0.2, 1.0, None)
    fake = tconv.fake_saved_pool(x, wt, b)
    assert fake.shape == saved.shape and fake.dtype == saved.dtype and fake.stride() == saved.stride()


def test_case_list_covers_the_spec():
    cases = [p.values for p in _cases()]
    assert {c[3] for c in cases} | {c[4] for c in cases} == {1, 3, 8, 17, 32}
    assert {c[2] for c in cases} == {1, 3}
    assert set(itertools.chain.from_iterable((c[5], c[6]) for c in cases)) >= {1, 2, 3, 4, 5, 6, 7}
    for op, dtype in itertools.product(OPS, DTYPES):
        sub = [c for c in cases if c[0] == op and c[1] == dtype]
        assert {c[7] for c in sub} == set(ref.ACTIVATIONS)
    assert {c[11] for c in cases} == set(LAYOUTS)
    assert {c[8] for c in cases} == {True, False} and {c[10] for c in cases} == {None, 0.6}
