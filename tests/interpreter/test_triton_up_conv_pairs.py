"""The row-pair up-conv forward for few output channels (``gankernels/triton/up_conv3x3_pairs.py``)
on CPU under the Triton interpreter, against the float64 reference (upsample, then conv).

Run: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/interpreter/test_triton_up_conv_pairs.py``

The interpreter runs the kernel with 16×16×16 tiles (two accumulators 32 wide: 2 output rows
× 16 channels), so the shapes below give several M tiles with a partial last one, Co that fills
the tile (16, 32: two N tiles) or not (5, 8, 17, 20), Ci that does and does not divide the K
tile (16, 32 and 17, 20, 33), 1-pixel-wide and odd images (the first and last row pairs hold
one output row each), and the two layouts it serves (channel stride 1): channels_last and a
strided view of a channels_last tensor.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from up_conv_cases import DTYPES, make_inputs, reference, rotated_cases

import gankernels
from gankernels.ops import reference as ref
from gankernels.testing import assert_close_rel
from gankernels.triton import conv3x3 as tconv
from gankernels.triton import up_conv3x3 as tup
from gankernels.triton import up_conv3x3_pairs as tpair

LAYOUTS = ("channels_last", "channels_last_view")  # what the kernel serves: channel stride 1


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    # Outputs are NaN-filled before the launch: an output pixel no row pair writes fails.
    monkeypatch.setattr(tconv, "POISON_OUTPUTS", True)


def _cases():
    return rotated_cases([(16, 8), (17, 5), (32, 32), (20, 17), (16, 16), (33, 20)], LAYOUTS)


@pytest.mark.parametrize("dtype,n,ci,co,h,w,act,bias,gain,clamp,layout", _cases())
def test_matches_reference(dtype, n, ci, co, h, w, act, bias, gain, clamp, layout):
    seed = zlib.crc32(f"uppairs-{dtype}-{act}-{ci}-{co}-{h}-{w}".encode())
    x, wt, b = make_inputs(n, ci, co, h, w, dtype, layout, bias, seed)
    alpha = 0.15 if act == "lrelu" else 0.2
    out, saved = tpair.up_conv3x3_phase_pairs(x, wt, b, act, alpha, gain, clamp)
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
    assert {8, 16, 32} <= {c[3] for c in cases} and any(c[3] % 16 for c in cases)  # Co: 8/16/32, partial N tiles
    assert any(c[2] % 16 for c in cases) and any(c[2] % 16 == 0 for c in cases)  # Ci: partial and whole K tiles
    rows = [c[1] * (c[4] + 1) * c[5] for c in cases]  # GEMM rows: row pairs
    assert any(m > 16 and m % 16 for m in rows)  # several M tiles, the last partial
    assert {c[4] for c in cases} >= {1, 2, 3, 4, 5} and {c[5] for c in cases} >= {1, 2, 4, 5, 7}


@pytest.mark.parametrize("tap", [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2), (1, 2), (0, 1)])
def test_each_tap_reaches_the_right_pixels(tap):
    """A 3×3 kernel with one non-zero tap: the output is x upsampled and shifted by that
    tap, zero where it reads the padding. Exact in fp32 (one product per output), so any
    row-pair, parity, shift or border mix-up shows, in both layouts."""
    kh, kw = tap
    for layout in LAYOUTS:
        x, _, _ = make_inputs(1, 16, 8, 3, 4, torch.float32, layout, False, 23)
        wt = torch.zeros(8, 16, 3, 3)
        wt[torch.arange(8), torch.arange(8), kh, kw] = 1.0  # channel co reads channel co
        out, _ = tpair.up_conv3x3_phase_pairs(x, wt, None, "linear", 0.2, 1.0, None)
        up = torch.nn.functional.interpolate(x[:, :8], scale_factor=2, mode="nearest")
        expect = torch.nn.functional.pad(up, (1, 1, 1, 1))[:, :, kh : kh + 6, kw : kw + 8]
        assert torch.equal(out, expect), f"tap {tap}, {layout}"


def test_layouts_give_identical_results():
    """A channels_last tensor and a strided view with the same values load the same values
    and reduce in the same order: bit-identical outputs."""
    x, wt, b = make_inputs(2, 20, 17, 3, 5, torch.float32, "channels_last_view", True, 29)
    base, _ = tpair.up_conv3x3_phase_pairs(x, wt, b, "lrelu", 0.2, 1.0, None)
    other, _ = tpair.up_conv3x3_phase_pairs(x.contiguous(memory_format=torch.channels_last), wt, b, "lrelu", 0.2, 1.0, None)
    assert torch.equal(base, other)


def test_refuses_other_channel_strides():
    x, wt, b = make_inputs(1, 16, 4, 2, 3, torch.float32, "channels_last", True, 30)
    x = x.contiguous()  # NCHW: channel stride H·W
    assert not tpair.serves(x, wt)
    with pytest.raises(ValueError, match="x: channel stride"):
        tpair.up_conv3x3_phase_pairs(x, wt, b)


def test_nan_propagates_like_pytorch():
    x, wt, b = make_inputs(1, 16, 5, 4, 5, torch.float32, "channels_last", True, 31)
    x[0, 3, 0, 4] = float("nan")  # a corner pixel: its NaN reaches the first and second row pairs
    x[0, 9, 1, 2] = float("nan")  # inside: exactly the 4×4 outputs PyTorch's NaN reaches, no more
    out, _ = tpair.up_conv3x3_phase_pairs(x, wt, b, "lrelu", 0.2, 1.0, None)
    expect = reference(x, wt, b, "lrelu", 0.2, 1.0, None)
    assert torch.isnan(expect).any()
    assert_close_rel(out, expect, dtype=torch.float32)  # NaN exactly where the reference has it


def test_routing_by_channels(monkeypatch):
    """``conv3x3.up_conv3x3_forward`` (what the registered op calls) runs this kernel for
    Ci >= MIN_CI, Co <= MAX_CO and channel stride 1; the four-phase kernel for wider Co or
    other strides, MODE 2 below MIN_CI."""
    calls = []
    for mod, fn in ((tpair, "up_conv3x3_phase_pairs"), (tup, "up_conv3x3_four_phase")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, real=real, fn=fn: calls.append((fn, a[0].shape[1], a[1].shape[0])) or real(*a))
    for ci, co, nchw in (
        (tup.MIN_CI - 1, 3, False),
        (tup.MIN_CI, tpair.MAX_CO, False),
        (tup.MIN_CI, tpair.MAX_CO + 1, False),
        (tup.MIN_CI, 8, True),
    ):
        x, wt, b = make_inputs(1, ci, co, 2, 3, torch.float32, "channels_last", True, 37)
        x = x.contiguous() if nchw else x
        out = gankernels.up_conv3x3(x, wt, b, act="relu", backend="triton")
        assert_close_rel(out, reference(x, wt, b, "relu", 0.2, 1.0, None), dtype=torch.float32)
    assert calls == [
        ("up_conv3x3_phase_pairs", tup.MIN_CI, tpair.MAX_CO),
        ("up_conv3x3_four_phase", tup.MIN_CI, tpair.MAX_CO + 1),
        ("up_conv3x3_four_phase", tup.MIN_CI, 8),  # channel stride != 1
    ]


# ----------------------------------------------------------------------------------
# The row-pair layout of the phase-weight repack.


def _pairs_from_phases(phases: torch.Tensor, ci: int, co: int) -> torch.Tensor:
    """The row-pair layout [8·Ci, 2·Co] built from the four-phase layout [16·Ci, Co] (rows
    a, c, tr, tc, ci) by copying: rows (c, tc, tr, ci), columns (1 − a, co)."""
    p = phases.reshape(2, 2, 2, 2, ci, co)
    out = torch.empty(2, 2, 2, ci, 2, co, dtype=phases.dtype)
    for a in range(2):
        for c in range(2):
            for tr in range(2):
                for tc in range(2):
                    out[c, tc, tr, :, 1 - a, :] = p[a, c, tr, tc]
    return out.reshape(8 * ci, 2 * co)


def test_pair_layout_is_the_phase_taps_rounded_once():
    """Every value of the row-pair layout is bit-equal to the four-phase layout's (both
    summed in fp32 and rounded once). With taps 1, 2^-11, 2^-11 (phase (0, 0) tap (1, 1)),
    an fp16 sum would give 1; the fp32 sum rounded once gives 1 + 2^-10."""
    tconv.clear_weight_cache()
    g = torch.Generator().manual_seed(43)
    w = torch.randn(5, 17, 3, 3, generator=g).to(torch.float16)
    w[0, 0] = 0.0
    w[0, 0, 1, 1] = 1.0
    w[0, 0, 2, 1] = 2.0**-11
    w[0, 0, 1, 2] = 2.0**-11
    phases = tconv.packed_weight(w, torch.float16, phases=True)
    pairs = tconv.packed_weight(w, torch.float16, phases=True, pairs=True)
    assert pairs.shape == (8 * 17, 2 * 5) and pairs.dtype == torch.float16
    assert torch.equal(pairs, _pairs_from_phases(phases, 17, 5))
    # Phase (0, 0) tap (1, 1): c = 0, tc = 1, tr = 1, ci = 0, column 1 − a = 1, co = 0.
    assert pairs.reshape(2, 2, 2, 17, 2, 5)[0, 1, 1, 0, 1, 0].item() == 1.0 + 2.0**-10
    # The CPU formula (no kernel) gives the same bits as the repack kernel.
    assert torch.equal(tconv._pack(w, torch.float16, True, True), pairs)


def test_pair_layout_follows_the_parameter_version(monkeypatch):
    """Cached per parameter version, separately from the four-phase layout; an in-place
    update (an optimizer step) repacks and the kernel computes with the new weights."""
    tconv.clear_weight_cache()
    x, wt, b = make_inputs(1, 16, 5, 2, 3, torch.float32, "channels_last", True, 41)
    p1 = tconv.packed_weight(wt, torch.float32, phases=True, pairs=True)
    assert tconv.packed_weight(wt, torch.float32, phases=True, pairs=True) is p1  # cached
    assert tconv.packed_weight(wt, torch.float32, phases=True) is not p1  # its own entry
    out1, _ = tpair.up_conv3x3_phase_pairs(x, wt, b, "linear", 0.2, 1.0, None)
    with torch.no_grad():
        wt.mul_(-2.0)
    p2 = tconv.packed_weight(wt, torch.float32, phases=True, pairs=True)
    assert p2 is not p1
    phases = ref.subpixel_phase_weights(wt).permute(0, 1, 4, 5, 3, 2).reshape(-1, 5)
    assert torch.equal(p2, _pairs_from_phases(phases, 16, 5))
    out2, _ = tpair.up_conv3x3_phase_pairs(x, wt, b, "linear", 0.2, 1.0, None)
    assert_close_rel(out2, reference(x, wt, b, "linear", 0.2, 1.0, None), dtype=torch.float32)
    assert not torch.allclose(out1, out2)


def test_pairs_needs_phases():
    with pytest.raises(ValueError, match="pairs"):
        tconv.packed_weight(torch.zeros(2, 2, 3, 3), torch.float32, pairs=True)
