"""The four-phases-per-program up-conv forward (``gankernels/triton/up_conv3x3.py``) on CPU
under the Triton interpreter, against the float64 reference (upsample, then conv).

Run: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/interpreter/test_triton_up_conv_fwd.py``

The interpreter runs the kernel with 16×16×16 tiles, so the shapes below give several M
tiles with a partial last one, Co and Ci that do and do not divide the tile (16, 32 and
5, 17, 20, 33), 1-pixel-wide and odd images (every row and column is a border of some
phase), and both input paths: channels_last (channel stride 1: rows outside the image
read the zero row) and any other strides (masked copies).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from up_conv_cases import DTYPES, make_inputs, reference, rotated_cases

import gankernels
from gankernels.ops import reference as ref
from gankernels.testing import LAYOUTS, assert_close_rel
from gankernels.triton import conv3x3 as tconv
from gankernels.triton import up_conv3x3 as tup


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    # Outputs are NaN-filled before the launch: an output pixel no phase writes fails.
    monkeypatch.setattr(tconv, "POISON_OUTPUTS", True)


def _cases():
    return rotated_cases([(16, 16), (17, 5), (32, 33), (20, 17), (16, 3), (33, 32)], LAYOUTS)


@pytest.mark.parametrize("dtype,n,ci,co,h,w,act,bias,gain,clamp,layout", _cases())
def test_matches_reference(dtype, n, ci, co, h, w, act, bias, gain, clamp, layout):
    seed = zlib.crc32(f"up4-{dtype}-{act}-{ci}-{co}-{h}-{w}".encode())
    x, wt, b = make_inputs(n, ci, co, h, w, dtype, layout, bias, seed)
    alpha = 0.15 if act == "lrelu" else 0.2
    out, saved = tup.up_conv3x3_four_phase(x, wt, b, act, alpha, gain, clamp)
    expect = reference(x, wt, b, act, alpha, gain, clamp)
    assert out.dtype == dtype and out.shape == expect.shape == (n, co, 2 * h, 2 * w)
    assert saved.numel() == 0
    assert_close_rel(out, expect, dtype=dtype)
    assert ref.memory_format_of(out) == ref.memory_format_of(x)


def test_case_list_covers_the_spec():
    cases = [p.values for p in _cases()]
    for dtype in DTYPES:
        assert {c[6] for c in cases if c[0] == dtype} == set(ref.ACTIVATIONS)
    assert {c[10] for c in cases} == set(LAYOUTS)
    assert {c[7] for c in cases} == {True, False} and {c[9] for c in cases} == {None, 0.6}
    assert any(c[2] % 16 for c in cases) and any(c[2] % 16 == 0 for c in cases)  # Ci: partial and whole K tiles
    assert any(c[3] % 16 for c in cases) and any(c[3] % 16 == 0 for c in cases)  # Co: partial and whole N tiles
    assert any(c[1] * c[4] * c[5] > 16 and (c[1] * c[4] * c[5]) % 16 for c in cases)  # several M tiles, the last partial
    assert {c[4] for c in cases} >= {1, 2, 3, 4, 5} and {c[5] for c in cases} >= {1, 2, 4, 5, 7}


@pytest.mark.parametrize("tap", [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2), (1, 2)])
def test_each_tap_reaches_the_right_phases(tap):
    """A 3×3 kernel with one non-zero tap: the output is x upsampled and shifted by that
    tap, zero where it reads the padding. Exact in fp32 (one product per output), so
    any phase, shift or border mix-up shows, in both input paths."""
    kh, kw = tap
    for layout in ("channels_last", "nchw"):
        x, _, _ = make_inputs(1, 16, 16, 3, 4, torch.float32, layout, False, 23)
        wt = torch.zeros(16, 16, 3, 3)
        wt[torch.arange(16), torch.arange(16), kh, kw] = 1.0  # channel co reads channel co
        out, _ = tup.up_conv3x3_four_phase(x, wt, None, "linear", 0.2, 1.0, None)
        up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        expect = torch.nn.functional.pad(up, (1, 1, 1, 1))[:, :, kh : kh + 6, kw : kw + 8]
        assert torch.equal(out, expect), f"tap {tap}, {layout}"


def test_layouts_give_identical_results():
    """The zero-row path (channels_last) and the masked path (other strides) load the same
    values and reduce in the same order: bit-identical outputs."""
    x, wt, b = make_inputs(2, 20, 17, 3, 5, torch.float32, "nchw", True, 29)
    base, _ = tup.up_conv3x3_four_phase(x, wt, b, "lrelu", 0.2, 1.0, None)
    for x2 in (x.contiguous(memory_format=torch.channels_last), torch.cat([x, x], dim=3)[..., : x.shape[3]]):
        other, _ = tup.up_conv3x3_four_phase(x2, wt, b, "lrelu", 0.2, 1.0, None)
        assert torch.equal(base, other)


def test_nan_propagates_like_pytorch():
    x, wt, b = make_inputs(1, 16, 5, 4, 5, torch.float32, "channels_last", True, 31)
    x[0, 3, 0, 4] = float("nan")  # a corner pixel: its NaN reaches every phase around it
    out, _ = tup.up_conv3x3_four_phase(x, wt, b, "lrelu", 0.2, 1.0, None)
    expect = reference(x, wt, b, "lrelu", 0.2, 1.0, None)
    assert torch.isnan(expect).any()
    assert_close_rel(out, expect, dtype=torch.float32)  # NaN exactly where the reference has it


def test_up_conv3x3_forward_routes_by_input_channels(monkeypatch):
    """``conv3x3.up_conv3x3_forward`` (what the registered op calls) runs this kernel from
    MIN_CI input channels on, MODE 2 of the conv kernel below (Co = 65: above the row-pair
    kernel's Co, tests/interpreter/test_triton_up_conv_pairs.py)."""
    calls = []
    real = tup.up_conv3x3_four_phase
    monkeypatch.setattr(tup, "up_conv3x3_four_phase", lambda *a: calls.append(a[0].shape[1]) or real(*a))
    for ci in (tup.MIN_CI - 1, tup.MIN_CI):
        x, wt, b = make_inputs(1, ci, 65, 2, 3, torch.float32, "channels_last", True, 37)
        out = gankernels.up_conv3x3(x, wt, b, act="relu", backend="triton")
        assert_close_rel(out, reference(x, wt, b, "relu", 0.2, 1.0, None), dtype=torch.float32)
    assert calls == [tup.MIN_CI]


def test_zero_row_buffer():
    x = torch.randn(1, 4, 2, 2, dtype=torch.float16)
    z = tup._zero_row(4, x)
    assert z.dtype == torch.float16 and z.numel() >= 4 and not z.any()
    assert tup._zero_row(8, x) is z  # reused while large enough
    big = tup._zero_row(z.numel() + 1, x)
    assert big.numel() > z.numel() and not big.any()


# ----------------------------------------------------------------------------------
# Issue 14 item 4, second half: the phase-weight repack this kernel reads.


def test_phase_weights_summed_in_fp32_then_rounded_once():
    """Phase (0, 0) tap (1, 1) sums 3×3 taps (1, 1) + (2, 1) + (1, 2) = 1 + 2^-11 + 2^-11.
    Summed in fp16 it is 1 (each partial sum 1 + 2^-11 rounds back to 1); summed in fp32
    and rounded once it is 1 + 2^-10, exactly representable in fp16."""
    w = torch.zeros(1, 1, 3, 3, dtype=torch.float16)
    w[0, 0, 1, 1] = 1.0
    w[0, 0, 2, 1] = 2.0**-11
    w[0, 0, 1, 2] = 2.0**-11
    in_fp16 = (w[0, 0, 1, 1] + w[0, 0, 2, 1]) + w[0, 0, 1, 2]
    assert in_fp16.item() == 1.0  # what summing in the weight's dtype would give
    packed = tconv.packed_weight(w, torch.float16, phases=True).reshape(2, 2, 2, 2)  # [a, c, tr, tc] (Ci = Co = 1)
    assert packed[0, 0, 1, 1].item() == 1.0 + 2.0**-10


def test_phase_weights_follow_the_parameter_version():
    """An in-place update (an optimizer step) bumps the version: the next call repacks,
    and the four-phase kernel computes with the new weights."""
    tconv.clear_weight_cache()
    x, wt, b = make_inputs(1, 16, 5, 2, 3, torch.float32, "channels_last", True, 41)
    p1 = tconv.packed_weight(wt, torch.float32, phases=True)
    assert tconv.packed_weight(wt, torch.float32, phases=True) is p1  # cached
    out1, _ = tup.up_conv3x3_four_phase(x, wt, b, "linear", 0.2, 1.0, None)
    with torch.no_grad():
        wt.mul_(-2.0)
    p2 = tconv.packed_weight(wt, torch.float32, phases=True)
    assert p2 is not p1
    assert torch.equal(p2, ref.subpixel_phase_weights(wt).permute(0, 1, 4, 5, 3, 2).reshape(-1, 5))
    out2, _ = tup.up_conv3x3_four_phase(x, wt, b, "linear", 0.2, 1.0, None)
    assert_close_rel(out2, reference(x, wt, b, "linear", 0.2, 1.0, None), dtype=torch.float32)
    assert not torch.allclose(out1, out2)


@pytest.mark.parametrize(
    "kernel,dtype,n,ci,co,h,w",
    [
        ("four_phase", torch.float32, 1, 16, 8, 16, 16),  # M = 256: whole row tiles, no row masks
        ("four_phase", torch.float16, 2, 17, 5, 5, 7),  # partial tiles, odd sizes
        ("pairs", torch.float32, 1, 16, 8, 15, 16),  # M = 1·16·16 row pairs: whole row tiles
        ("pairs", torch.float16, 2, 17, 5, 5, 7),
    ],
)
def test_dense_channels_last_addressing_agrees(kernel, dtype, n, ci, co, h, w, monkeypatch):
    """Both up-conv kernels' compile-time addressing of dense channels_last tensors
    (DENSE_CL) and row-mask-free whole tiles (M_ALIGNED) give the bits of the runtime-stride
    form, equal to the reference."""
    from gankernels.triton import up_conv3x3_pairs as tpair

    fn = tup.up_conv3x3_four_phase if kernel == "four_phase" else tpair.up_conv3x3_phase_pairs
    x, wt, b = make_inputs(n, ci, co, h, w, dtype, "channels_last", True, 41)
    assert tconv._dense_channels_last(x)
    outs = {}
    for dense in (True, False):
        monkeypatch.setattr(tconv, "_DENSE_CL", dense)
        outs[dense], _ = fn(x, wt, b, "lrelu", 0.2, 1.0, None)
    assert torch.equal(outs[True], outs[False])
    assert_close_rel(outs[True], reference(x, wt, b, "lrelu", 0.2, 1.0, None), dtype=dtype)
