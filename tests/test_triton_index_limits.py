"""The Triton conv kernels index pixels in int32: the host refuses sizes whose last
tile would wrap (issue 18, item 3). No kernel runs here: the shapes are zero-stride
views, so nothing of their 2^31 elements is allocated.
"""

from __future__ import annotations

import pytest
import torch

from gankernels.triton import conv3x3 as tconv
from gankernels.triton import conv3x3_backward as tbwd
from gankernels.triton.utils import INT32_LIMIT, MAX_TILE_ROWS, ROW_INDEX_LIMIT


def _pixels(m: int) -> torch.Tensor:
    """A [1, 1, 1, m] input that allocates one element."""
    return torch.zeros(1, 1, 1, 1).expand(1, 1, 1, m)


def test_limit_leaves_room_for_the_last_tile():
    largest_block_m = max(c.kwargs["BLOCK_M"] for c in tconv._CONFIGS_HOPPER + tconv._CONFIGS_AMPERE)
    largest_block_m = max(largest_block_m, *(c.kwargs["BLOCK_M"] for c in tbwd._dgrad_configs() + tbwd._wgrad_configs()))
    assert largest_block_m <= MAX_TILE_ROWS
    assert ROW_INDEX_LIMIT + MAX_TILE_ROWS == INT32_LIMIT


@pytest.mark.parametrize("op", ["conv3x3", "conv3x3_pool", "up_conv3x3"])
def test_forward_refuses_rows_whose_last_tile_wraps(op):
    supports = getattr(tconv, f"supports_{op}")
    w = torch.zeros(1, 1, 3, 3)
    # 2^31 − 100 pixels: below 2^31, but pid·BLOCK_M + arange(BLOCK_M) passes 2^31 − 1 in the last tile.
    why = supports(x=_pixels(2**31 - 100), w=w)
    assert any("32-bit pixel index" in r for r in why), why
    why = supports(x=_pixels(ROW_INDEX_LIMIT - ROW_INDEX_LIMIT % 4), w=w)
    assert not any("32-bit pixel index" in r for r in why), why


def test_backward_refuses_rows_whose_last_tile_wraps():
    with pytest.raises(ValueError, match="indexes pixels in int32"):
        tbwd._check_int32("x", _pixels(2**31 - 100))
    tbwd._check_int32("x", _pixels(ROW_INDEX_LIMIT))
