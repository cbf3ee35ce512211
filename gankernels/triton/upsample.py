"""Triton nearest-neighbour upsampling by an integer factor, forward and backward.

Forward: ``y[n, c, i, j] = x[n, c, i // s, j // s]``. A program reads a 2-D tile of
the *input* once and writes each element's s×s copies, so the input is read exactly
once and every output element written once. The tile's second axis is the contiguous
dimension of the output (C for channels_last, W for NCHW); for NCHW and s = 2 (the
fast case) each output row is written as one contiguous, vectorised store of the
interleaved pair ``(x, x)``.

Backward: ``gx[n, c, h, w] = sum over the s×s block of grad``, a gather over a tile of
``gx`` (fp32 accumulation in a fixed order: deterministic, no atomics). For NCHW and
s = 2 each block row is one contiguous load split into even and odd columns.

Inputs are addressed through their strides (no copies); outputs take the input's
memory format (the forward's ``x``, the backward's ``grad``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gankernels.ops.dispatch import OpImpl, register
from gankernels.ops.reference import memory_format_of
from gankernels.triton.tile2d import tile_coords
from gankernels.triton.utils import common_reasons, empty, tile
from gankernels.triton.utils import needs_int64 as _needs_int64

# The kernels unroll the s×s block; beyond this the unrolled code gets large for no
# GAN use, so larger factors go to the torch backend.
MAX_SCALE = 8

_TILE = 2048  # input (forward) / grad-input (backward) elements per program


# Tests set this to True: every output buffer is then filled with NaN (-1 for indices)
# before the kernel runs, so an element a kernel fails to write shows up.
POISON_OUTPUTS = False


def _empty(*args, **kwargs) -> torch.Tensor:
    return empty(POISON_OUTPUTS, *args, **kwargs)


def _tile(inner: int, max_inner: int = 64) -> tuple[int, int]:
    return tile(inner, _TILE, max_inner)


@triton.jit
def _upsample_fwd_kernel(
    x_ptr, y_ptr,
    C, H, W,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    n_rows, n_cols, n_col_blocks,
    S: tl.constexpr, CL: tl.constexpr, PAIR: tl.constexpr, INT64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # A tile of input elements.
    n, c, h, w, rows, pid_k, mask = tile_coords(
        tl.program_id(0), C, H, W, n_rows, n_cols, n_col_blocks, CL, INT64, BLOCK_R, BLOCK_K
    )
    row_ok = rows < n_rows
    v = tl.load(x_ptr + n * sxn + c * sxc + h * sxh + w * sxw, mask=mask)
    y_plane = y_ptr + n * syn + c * syc
    if PAIR:
        # NCHW, s = 2, unit output W stride: interleave (v, v) into one contiguous row.
        vv = tl.reshape(tl.join(v, v), (BLOCK_R, 2 * BLOCK_K))
        wo = pid_k * (2 * BLOCK_K) + tl.arange(0, 2 * BLOCK_K)
        if INT64:
            wo = wo.to(tl.int64)
        m2 = row_ok[:, None] & (wo < 2 * W)[None, :]
        for a in tl.static_range(2):
            tl.store(y_plane + (h * 2 + a) * syh + wo[None, :], vv, mask=m2)
    else:
        for a in tl.static_range(S):
            for b in tl.static_range(S):
                tl.store(y_plane + (h * S + a) * syh + (w * S + b) * syw, v, mask=mask)


@triton.jit
def _upsample_bwd_kernel(
    g_ptr, gx_ptr,
    C, H, W,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    n_rows, n_cols, n_col_blocks,
    S: tl.constexpr, CL: tl.constexpr, PAIR: tl.constexpr, INT64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # A tile of gx (H, W are gx's, the low resolution).
    n, c, h, w, rows, pid_k, mask = tile_coords(
        tl.program_id(0), C, H, W, n_rows, n_cols, n_col_blocks, CL, INT64, BLOCK_R, BLOCK_K
    )
    row_ok = rows < n_rows
    g_plane = g_ptr + n * sgn + c * sgc
    acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    if PAIR:
        # NCHW, s = 2, unit grad W stride: each block row is one contiguous load.
        wi = pid_k * (2 * BLOCK_K) + tl.arange(0, 2 * BLOCK_K)
        if INT64:
            wi = wi.to(tl.int64)
        m2 = row_ok[:, None] & (wi < 2 * W)[None, :]
        for a in tl.static_range(2):
            g = tl.load(g_plane + (h * 2 + a) * sgh + wi[None, :], mask=m2, other=0.0).to(tl.float32)
            g0, g1 = tl.split(tl.reshape(g, (BLOCK_R, BLOCK_K, 2)))
            acc += g0 + g1
    else:
        for a in tl.static_range(S):
            for b in tl.static_range(S):
                g = tl.load(g_plane + (h * S + a) * sgh + (w * S + b) * sgw, mask=mask, other=0.0)
                acc += g.to(tl.float32)
    tl.store(gx_ptr + n * sxn + c * sxc + h * sxh + w * sxw, acc.to(gx_ptr.dtype.element_ty), mask=mask)


def supports(x: torch.Tensor, scale_factor: int) -> list[str]:
    """Every reason the triton upsample cannot serve this call (empty: it can)."""
    reasons = common_reasons(x)
    if scale_factor > MAX_SCALE:
        reasons.append(f"scale_factor={scale_factor}: the triton kernel serves integer factors up to {MAX_SCALE}")
    return reasons


def _rows_cols(cl: bool, n: int, c: int, h: int, w: int) -> tuple[int, int]:
    return (n * h * w, c) if cl else (n * c * h, w)


def upsample_nearest2d_forward(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=s, mode="nearest")`` for integer ``s``, in ``x``'s
    memory format."""
    s = int(scale_factor)
    if not 1 <= s <= MAX_SCALE:
        raise ValueError(f"scale_factor: the triton kernel serves integers 1..{MAX_SCALE}, got {scale_factor!r}")
    n, c, h, w = x.shape
    fmt = memory_format_of(x)
    y = _empty((n, c, h * s, w * s), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    cl = fmt == torch.channels_last
    n_rows, n_cols = _rows_cols(cl, n, c, h, w)
    block_r, block_k = _tile(n_cols)
    n_col_blocks = triton.cdiv(n_cols, block_k)
    grid = (triton.cdiv(n_rows, block_r) * n_col_blocks,)
    _upsample_fwd_kernel[grid](
        x, y, c, h, w, *x.stride(), *y.stride(), n_rows, n_cols, n_col_blocks,
        S=s, CL=cl, PAIR=(not cl) and s == 2 and y.stride(3) == 1, INT64=_needs_int64(x, y),
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4,
    )
    return y


def upsample_nearest2d_backward(grad: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """The sum of each s×s block of ``grad``, in ``grad``'s memory format."""
    s = int(scale_factor)
    n, c, hs, ws = grad.shape
    if hs % s or ws % s:
        raise ValueError(f"grad: spatial size {(hs, ws)} is not a multiple of scale_factor={s}")
    h, w = hs // s, ws // s
    fmt = memory_format_of(grad)
    gx = _empty((n, c, h, w), dtype=grad.dtype, device=grad.device, memory_format=fmt)
    if gx.numel() == 0:
        return gx
    cl = fmt == torch.channels_last
    n_rows, n_cols = _rows_cols(cl, n, c, h, w)
    block_r, block_k = _tile(n_cols)
    n_col_blocks = triton.cdiv(n_cols, block_k)
    grid = (triton.cdiv(n_rows, block_r) * n_col_blocks,)
    _upsample_bwd_kernel[grid](
        grad, gx, c, h, w, *grad.stride(), *gx.stride(), n_rows, n_cols, n_col_blocks,
        S=s, CL=cl, PAIR=(not cl) and s == 2 and grad.stride(3) == 1, INT64=_needs_int64(grad, gx),
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4,
    )
    return gx


register(
    "upsample_nearest2d",
    "triton",
    OpImpl(forward=upsample_nearest2d_forward, supports=supports, backward=upsample_nearest2d_backward),
)
