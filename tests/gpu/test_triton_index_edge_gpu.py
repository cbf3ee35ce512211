"""Issue 18 item 3 on a GPU: the wgrad split-K slice bounds near 2^31 pixels.

The last slice's end ``m_start + M_PER_SPLIT`` can pass 2^31 − 1 when the slices do
not divide the pixel count evenly; computed in int32 it wrapped negative and the slice
was silently skipped. ~16 GB of GPU memory (three bf16 tensors of 2^31 elements), and
slow (a 36-program grid walks 2^31 pixels, once per autotune configuration).
"""

from __future__ import annotations

import pytest
import torch

from gankernels.triton import conv3x3_backward as tbwd
from gankernels.triton.utils import ROW_INDEX_LIMIT

pytestmark = pytest.mark.gpu


@pytest.mark.slow
def test_wgrad_last_split_near_int32_limit():
    m = ROW_INDEX_LIMIT - 1  # split=4: 4 slices of 2^29 pixels; the last one ends at 2^31
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip("needs ~20 GB of free GPU memory")
    x = torch.ones(1, 1, 1, m, dtype=torch.bfloat16, device="cuda")
    grad = torch.ones_like(x)
    out = torch.ones_like(x)  # linear: the derivative does not depend on it
    w = torch.zeros(1, 1, 3, 3, dtype=torch.bfloat16, device="cuda")
    b = torch.zeros(1, dtype=torch.bfloat16, device="cuda")
    _, gw, gb = tbwd.fused_backward(
        "conv3x3", grad, x, w, b, out, x.new_empty(0), "linear", 0.2, 1.0, None, needs=(False, True, True), split=4
    )
    torch.cuda.synchronize()
    # x = grad = 1 on a 1-pixel-high image: the centre tap sees every pixel, the left and
    # right taps all but one, the other rows none.
    expect = torch.zeros(3, 3, dtype=torch.float64)
    expect[1, 1] = m
    expect[1, 0] = expect[1, 2] = m - 1
    torch.testing.assert_close(gw[0, 0].double(), expect, rtol=1e-2, atol=0)
    torch.testing.assert_close(gb.double(), torch.tensor([float(m)], device="cuda", dtype=torch.float64), rtol=1e-2, atol=0)
