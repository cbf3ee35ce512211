"""The 2-D tile of the memory-bound kernels (max-pool, upsample): which elements of an
[N, C, H, W] tensor a program covers.

The grid is flat: program ``pid`` takes row block ``pid // n_col_blocks`` and column block
``pid % n_col_blocks`` of a [rows, cols] view whose column axis is the tensor's
contiguous dimension — C for channels_last (rows enumerate pixels (n, h, w)), W for NCHW
(rows enumerate (n, c, h)) — so a tile's loads and stores run along memory.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_coords(
    pid, C, H, W, n_rows, n_cols, n_col_blocks,
    CL: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``(n, c, h, w, rows, pid_k, mask)`` of program ``pid``'s [BLOCK_R, BLOCK_K] tile:
    the four coordinates broadcastable to the tile (a [BLOCK_R, 1] or [1, BLOCK_K] each),
    the tile's row indices, its column block and the in-bounds mask. H, W are the
    dimensions the rows enumerate (the pooled output's for the max-pool forward).
    INT64: index arithmetic in 64 bits (a tensor beyond 2^31 elements)."""
    pid_r = pid // n_col_blocks
    pid_k = pid % n_col_blocks
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if INT64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    if CL:  # rows enumerate pixels (n, h, w), columns are channels
        w = (rows % W)[:, None]
        t = rows // W
        h = (t % H)[:, None]
        n = (t // H)[:, None]
        c = cols[None, :]
    else:  # rows enumerate (n, c, h), columns are w
        h = (rows % H)[:, None]
        t = rows // H
        c = (t % C)[:, None]
        n = (t // C)[:, None]
        w = cols[None, :]
    return n, c, h, w, rows, pid_k, mask
