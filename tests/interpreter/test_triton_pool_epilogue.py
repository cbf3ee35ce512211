"""The pooled conv's epilogue (``conv3x3_pool``, Triton, MODE 1) under the interpreter:
the 2×2 window reduction, its saved window codes and the stores, on inputs built to
stress them, checked exactly against the float64 reference.

Inputs and weights are small integers, so every conv value is an integer the kernel
computes exactly in fp32 and fp16: windows tie often (the first maximum in scan order
must win), and the values and codes can be compared bit for bit, not within a
tolerance. NaNs placed in the input spread to 3×3 blocks of conv outputs, so windows
hold 1 to 4 NaNs (a NaN wins over any number, the last NaN of a window wins). The
shapes give odd H and W (pooling floors), pooled pixel counts that are not a multiple
of the 4 windows a 16-row group holds nor of the tile, and Co not a multiple of the
channel tile.

Run: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/interpreter/test_triton_pool_epilogue.py``
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gankernels.ops import reference as ref
from gankernels.triton import conv3x3 as tconv


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    # Outputs start as NaN (codes as -1), so an element the kernel does not write fails.
    monkeypatch.setattr(tconv, "POISON_OUTPUTS", True)


def _integer_problem(n, ci, co, h, w, dtype, layout, seed, nans=0):
    """x in {-2..2}, w in {-1, 0, 1}, b in {-3..3}: exact integer conv values, many ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, ci, h, w), generator=g).to(dtype)
    for _ in range(nans):
        i = [int(torch.randint(0, s, (1,), generator=g)) for s in (n, ci, h, w)]
        x[i[0], i[1], i[2], i[3]] = float("nan")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randint(-1, 2, (co, ci, 3, 3), generator=g).to(dtype)
    b = torch.randint(-3, 4, (co,), generator=g).to(dtype)
    return x, wt, b


def _scan_pool(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2×2 max-pool of ``y`` by the documented rule, written out: scan each window in
    order dy*2 + dx, take a value if it is greater than the best so far or NaN."""
    n, c, h, w = y.shape
    ho, wo = h // 2, w // 2
    win = y[:, :, : 2 * ho, : 2 * wo].reshape(n, c, ho, 2, wo, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, 4)
    best, code = win[..., 0].clone(), torch.zeros(n, c, ho, wo, dtype=torch.long)
    for q in range(1, 4):
        v = win[..., q]
        take = (v > best) | torch.isnan(v)
        best = torch.where(take, v, best)
        code = torch.where(take, torch.full_like(code, q), code)
    return best, code


def _check(x, wt, b, act, alpha, gain, clamp):
    out, saved = tconv.conv3x3_pool_forward(x, wt, b, act, alpha, gain, clamp)
    # The conv output as the kernel rounds it to x's dtype (exact here: integers).
    y = ref.conv3x3(x.double(), wt.double(), b.double(), act, alpha, gain, clamp).to(x.dtype).double()
    expect, code = _scan_pool(y)
    # The written-out rule is PyTorch's: same values and positions as F.max_pool2d.
    stock, flat = F.max_pool2d(y, 2, return_indices=True)
    torch.testing.assert_close(expect, stock, rtol=0, atol=0, equal_nan=True)
    ho, wo = expect.shape[2:]
    rows0 = torch.arange(ho).view(1, 1, ho, 1) * 2
    cols0 = torch.arange(wo).view(1, 1, 1, wo) * 2
    assert torch.equal((flat // y.shape[3] - rows0) * 2 + (flat % y.shape[3] - cols0), code)

    assert out.dtype == x.dtype and saved.dtype == torch.int8 and out.shape == expect.shape
    torch.testing.assert_close(out.double(), expect, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(saved.long(), code)
    assert ref.memory_format_of(out) == ref.memory_format_of(x) == ref.memory_format_of(saved)
    return y, code


# (n, ci, co, h, w): odd and even H/W; pooled pixels per batch 15, 6, 35, 4 (not all
# multiples of 4 or of the interpreter's 4-window tile); Co 17, 20, 33 (partial channel
# tiles of 16) and 16; Ci < 16 (merged-K path) and >= 16 (per-tap path).
SHAPES = [(1, 3, 17, 6, 10), (2, 20, 20, 7, 5), (1, 5, 33, 11, 14), (3, 16, 16, 4, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}c{}x{}-{}x{}".format(*s))
def test_ties_take_the_first_maximum(dtype, shape):
    n, ci, co, h, w = shape
    layout = "channels_last" if ci % 2 else "nchw"
    x, wt, b = _integer_problem(n, ci, co, h, w, dtype, layout, seed=ci * 100 + co)
    y, code = _check(x, wt, b, "linear", 0.2, 1.0, None)
    # The case is about ties: some windows hold a repeated maximum, some of them not
    # at position 0 (so "first" is tested, not just "0").
    n_, c_, ho, wo = code.shape
    win = y[:, :, : 2 * ho, : 2 * wo].reshape(n_, c_, ho, 2, wo, 2).permute(0, 1, 2, 4, 3, 5).reshape(n_, c_, ho, wo, 4)
    tied = (win == win.amax(-1, keepdim=True)).sum(-1) > 1
    assert tied.any() and (tied & (code > 0)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_relu_zero_windows_and_partial_ties(dtype):
    """relu makes every negative value 0: whole windows of equal zeros (code 0) beside
    windows where a later zero never displaces an earlier one."""
    x, wt, b = _integer_problem(2, 6, 19, 9, 7, dtype, "channels_last", seed=5)
    _, code = _check(x, wt, b - 4, "relu", 0.2, 1.0, None)
    assert (code == 0).any() and (code == 3).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ["linear", "lrelu"])
def test_nan_windows(dtype, act):
    """NaNs spread through the conv to 3×3 blocks: windows with 1 to 4 NaNs, where the
    last NaN in scan order wins, beside windows of numbers."""
    x, wt, b = _integer_problem(1, 4, 18, 12, 11, dtype, "channels_last", seed=23, nans=3)
    y, code = _check(x, wt, b, act, 0.25, 1.0, None)
    n_, c_, ho, wo = code.shape
    win = y[:, :, : 2 * ho, : 2 * wo].reshape(n_, c_, ho, 2, wo, 2).permute(0, 1, 2, 4, 3, 5).reshape(n_, c_, ho, wo, 4)
    n_nan = torch.isnan(win).sum(-1)
    assert ((n_nan > 0) & (n_nan < 4)).any() and (n_nan == 4).any() and (n_nan == 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gain_and_clamp_ties(dtype):
    """clamp makes every large value equal to the bound: ties at the clamp, first wins."""
    x, wt, b = _integer_problem(1, 7, 21, 8, 13, dtype, "nchw", seed=31)
    _, code = _check(x, wt, b, "lrelu", 0.5, 2.0, 6.0)
    assert (code > 0).any()
