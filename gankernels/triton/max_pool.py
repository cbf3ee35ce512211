"""Triton max-pool: forward (values + PyTorch's flat indices or a 1-byte window
position) and a gather backward.

Serves the two configurations GANs use, 2×2 stride 2 and 3×3 stride 2 padding 1
(dilation 1, ``ceil_mode`` either way); ``supports`` sends everything else to torch.

Semantics, exactly as PyTorch's kernels (CPU and CUDA alike):

* the window is scanned row-major; an element replaces the running max when it is
  strictly greater or is NaN, so ties keep the first maximum and the *last* NaN of a
  window wins; the running max starts at -inf with the index of the first in-bounds
  element, so an all -inf window reports that element;
* the index is ``h * W + w`` within the (n, c) plane; padding never wins; ``ceil_mode``
  windows are clipped at the input's edge.

Layout: a program handles a 2-D tile of outputs whose second axis is the output's
contiguous dimension, C for channels_last and W for NCHW, so loads and stores run
along memory. Inputs are addressed through their strides, so any strided input works
without a copy; outputs are allocated in ``x``'s memory format.

What the forward saves for the backward (``saved``):

* ``return_indices=True``: PyTorch's int64 flat per-plane indices, exactly;
* ``return_indices=False`` (training's default): an int8 *window code*
  ``ky * KW + kx`` (0..3 for 2×2, 0..8 for 3×3), the argmax's position inside its
  window, chosen by the same rule. In bf16 the int64 indices would be most of the bytes
  the op moves (forward: 2 B read + 0.5 B values + 2 B indices per input element; with
  the code 2 B + 0.5 B + 0.25 B). The backward decodes the input position as
  ``(oh * SH - PH + ky, ow * SW - PW + kx)``; ``fake_saved`` describes the tensor.

Backward (``gx`` from ``grad`` and the saved indices or codes) is a gather: each input position
visits the ``ceil(k / s)`` windows per axis that can cover it (1×1 for 2×2/2, 2×2
for 3×3/2 pad 1), takes ``grad`` where the window's index names it and sums in a fixed
order. No atomics, deterministic, and every element of ``gx`` is written once.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from gankernels.ops.dispatch import OpImpl, register
from gankernels.ops.reference import memory_format_of, pool_output_size
from gankernels.triton.tile2d import tile_coords
from gankernels.triton.utils import common_reasons, empty, tile
from gankernels.triton.utils import needs_int64 as _needs_int64

# (kernel_size, stride, padding, dilation) the kernels are built and tested for.
SERVED_CONFIGS: tuple[tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]], ...] = (
    ((2, 2), (2, 2), (0, 0), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
)

# Tile size in output (forward) / input (backward) elements per program.
_TILE = 2048


# dtype of the window code saved when return_indices=False (values 0..KH*KW-1).
CODE_DTYPE = torch.int8

# Tests set this to True: every output buffer is then filled with NaN (-1 for indices)
# before the kernel runs, so an element a kernel fails to write shows up.
POISON_OUTPUTS = False


def _empty(*args, **kwargs) -> torch.Tensor:
    return empty(POISON_OUTPUTS, *args, **kwargs)


def _tile(inner: int, max_inner: int = 64) -> tuple[int, int]:
    return tile(inner, _TILE, max_inner)


# ----------------------------------------------------------------------------------
# Kernels


@triton.jit
def _max_pool_fwd_kernel(
    x_ptr, out_ptr, idx_ptr,
    C, H, W, Ho, Wo,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    n_rows, n_cols, n_col_blocks,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    CL: tl.constexpr, PAIR: tl.constexpr, INT64: tl.constexpr, CODE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # CODE: idx_ptr receives the window code ky * KW + kx (int8) instead of the int64
    # flat index h * W + w; the argmax rule is the same.
    # Tile = [BLOCK_R, BLOCK_K] outputs; the column axis is the output's contiguous
    # dimension (C for channels_last, Wo for NCHW).
    n, c, ho, wo, rows, pid_k, out_mask = tile_coords(
        tl.program_id(0), C, Ho, Wo, n_rows, n_cols, n_col_blocks, CL, INT64, BLOCK_R, BLOCK_K
    )
    plane = x_ptr + n * sxn + c * sxc
    h0 = ho * SH - PH
    w0 = wo * SW - PW
    best = tl.full([BLOCK_R, BLOCK_K], float("-inf"), tl.float32)
    # PyTorch starts from the first in-bounds element of the (clipped) window (every
    # window has one: pool_output_size makes each start inside the input or its left pad).
    if CODE:
        best_idx = (tl.maximum(h0, 0) - h0) * KW + (tl.maximum(w0, 0) - w0)
        best_idx = best_idx.to(tl.int32) + tl.zeros([BLOCK_R, BLOCK_K], tl.int32)
    else:
        best_idx = tl.maximum(h0, 0) * W + tl.maximum(w0, 0)
        best_idx = best_idx.to(tl.int64) + tl.zeros([BLOCK_R, BLOCK_K], tl.int64)
    if PAIR:
        # NCHW, 2-wide stride-2 windows, unit W stride: one contiguous load of 2*BLOCK_K
        # input columns per window row (vectorised), split into even/odd columns.
        wi2 = pid_k * (2 * BLOCK_K) + tl.arange(0, 2 * BLOCK_K)
        if INT64:
            wi2 = wi2.to(tl.int64)
        col_ok = (wi2 < W) & (wi2 < 2 * Wo)
        row_ok = rows < n_rows
        wo_even = 2 * wo
        for kh in tl.static_range(KH):
            hi = h0 + kh
            ok = (row_ok[:, None] & (hi >= 0) & (hi < H)) & col_ok[None, :]
            v = tl.load(plane + hi * sxh + wi2[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            v0, v1 = tl.split(tl.reshape(v, (BLOCK_R, BLOCK_K, 2)))
            upd = (v0 > best) | (v0 != v0)
            best = tl.where(upd, v0, best)
            if CODE:
                best_idx = tl.where(upd, kh * KW, best_idx)
            else:
                best_idx = tl.where(upd, hi * W + wo_even, best_idx)
            upd = (v1 > best) | (v1 != v1)
            best = tl.where(upd, v1, best)
            if CODE:
                best_idx = tl.where(upd, kh * KW + 1, best_idx)
            else:
                best_idx = tl.where(upd, hi * W + wo_even + 1, best_idx)
    else:
        for kh in tl.static_range(KH):
            hi = h0 + kh
            h_ok = (hi >= 0) & (hi < H)
            for kw in tl.static_range(KW):
                wi = w0 + kw
                ok = out_mask & h_ok & (wi >= 0) & (wi < W)
                # Masked (padding / clipped / out-of-tile) elements read -inf and never win.
                v = tl.load(plane + hi * sxh + wi * sxw, mask=ok, other=float("-inf")).to(tl.float32)
                upd = (v > best) | (v != v)
                best = tl.where(upd, v, best)
                if CODE:
                    best_idx = tl.where(upd, kh * KW + kw, best_idx)
                else:
                    best_idx = tl.where(upd, hi * W + wi, best_idx)
    o = n * son + c * soc + ho * soh + wo * sow
    tl.store(out_ptr + o, best.to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(idx_ptr + o, best_idx.to(idx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _max_pool_bwd_kernel(
    g_ptr, idx_ptr, gx_ptr,
    C, H, W, Ho, Wo,
    sgn, sgc, sgh, sgw,
    sin, sic, sih, siw,
    sxn, sxc, sxh, sxw,
    n_rows, n_cols, n_col_blocks,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    CL: tl.constexpr, PAIR: tl.constexpr, INT64: tl.constexpr, CODE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # CODE: idx_ptr holds int8 window codes ky * KW + kx, else int64 flat indices.
    # Tile = [BLOCK_R, BLOCK_K] *input* positions (columns: C for channels_last, W for
    # NCHW), except with PAIR (NCHW 2×2/2): columns are output columns wo, each giving
    # the two input columns 2*wo and 2*wo + 1.
    n, c, h, w, rows, pid_k, in_mask = tile_coords(
        tl.program_id(0), C, H, W, n_rows, n_cols, n_col_blocks, CL, INT64, BLOCK_R, BLOCK_K
    )
    if PAIR:
        # Windows do not overlap: input (h, 2wo + j) can only be named by window
        # (h // 2, wo). Load that window's index and grad once (contiguous along wo),
        # route grad to column j = 0 or 1, and store the interleaved pair as one
        # contiguous row of gx. Positions no window covers (odd H/W, floor) get 0.
        wo = w  # with PAIR the columns are output columns
        ho = h // 2
        ok = in_mask & (ho < Ho) & (wo < Wo)
        won = tl.load(idx_ptr + n * sin + c * sic + ho * sih + wo * siw, mask=ok, other=-1)
        g = tl.load(g_ptr + n * sgn + c * sgc + ho * sgh + wo * sgw, mask=ok, other=0.0).to(tl.float32)
        if CODE:
            won = won.to(tl.int32)
            base = (h - 2 * ho) * 2  # code of (h, 2*wo) in its window; (h, 2*wo + 1) is base + 1
        else:
            base = h * W + 2 * wo
        pair = tl.join(tl.where(won == base, g, 0.0), tl.where(won == base + 1, g, 0.0))
        wi = pid_k * (2 * BLOCK_K) + tl.arange(0, 2 * BLOCK_K)
        if INT64:
            wi = wi.to(tl.int64)
        gx = tl.reshape(pair, (BLOCK_R, 2 * BLOCK_K))
        st_mask = (rows < n_rows)[:, None] & (wi < W)[None, :]
        tl.store(gx_ptr + n * sxn + c * sxc + h * sxh + wi[None, :], gx.to(gx_ptr.dtype.element_ty), mask=st_mask)
    else:
        me = h * W + w  # the flat index a window names when its max is here (int64 form)
        acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
        # Windows covering h: ho*SH - PH <= h <= ho*SH - PH + KH - 1; the largest such ho is
        # (h + PH) // SH and at most ceil(KH / SH) of them exist (likewise along w).
        ho_top = (h + PH) // SH
        wo_top = (w + PW) // SW
        for dh in tl.static_range((KH + SH - 1) // SH):
            ho = ho_top - dh
            h_ok = (ho >= 0) & (ho < Ho) & (h <= ho * SH - PH + KH - 1)
            for dw in tl.static_range((KW + SW - 1) // SW):
                wo = wo_top - dw
                ok = in_mask & h_ok & (wo >= 0) & (wo < Wo) & (w <= wo * SW - PW + KW - 1)
                won = tl.load(idx_ptr + n * sin + c * sic + ho * sih + wo * siw, mask=ok, other=-1)
                if CODE:
                    # (h, w)'s position inside window (ho, wo), valid where ok.
                    ok = ok & (won.to(tl.int32) == (h - (ho * SH - PH)) * KW + (w - (wo * SW - PW)))
                else:
                    ok = ok & (won == me)
                g = tl.load(g_ptr + n * sgn + c * sgc + ho * sgh + wo * sgw, mask=ok, other=0.0)
                acc += g.to(tl.float32)
        tl.store(gx_ptr + n * sxn + c * sxc + h * sxh + w * sxw, acc.to(gx_ptr.dtype.element_ty), mask=in_mask)


# ----------------------------------------------------------------------------------
# Host side


def _config_reason(kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int]) -> Optional[str]:
    cfg = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    if cfg in SERVED_CONFIGS:
        return None
    return (
        f"kernel_size={tuple(kernel_size)}, stride={tuple(stride)}, padding={tuple(padding)}, dilation={tuple(dilation)}: "
        "the triton kernel serves 2×2 stride 2 and 3×3 stride 2 padding 1 only (dilation 1)"
    )


def supports(
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    return_indices: bool = False,
) -> list[str]:
    """Every reason the triton max-pool cannot serve this call (empty: it can)."""
    reasons = common_reasons(x)
    why = _config_reason(kernel_size, stride, padding, dilation)
    if why:
        reasons.append(why)
    return reasons


def _pooled_shape(
    x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int], ceil_mode: bool
) -> tuple[int, int, int, int]:
    """(N, C, Ho, Wo) of the pooled output (dilation 1, the only one served)."""
    n, c, h, w = x.shape
    ho = pool_output_size(h, kernel_size[0], stride[0], padding[0], 1, ceil_mode)
    wo = pool_output_size(w, kernel_size[1], stride[1], padding[1], 1, ceil_mode)
    return n, c, ho, wo


def fake_saved(
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    return_indices: bool,
) -> torch.Tensor:
    """An empty tensor like the ``saved`` that :func:`max_pool2d_forward` returns with
    ``return_indices=False``: int8 window codes, pooled shape, ``x``'s memory format
    (``x`` may be a fake tensor: only its shape, device and layout are used)."""
    shape = _pooled_shape(x, kernel_size, stride, padding, ceil_mode)
    return x.new_empty(shape, dtype=CODE_DTYPE).contiguous(memory_format=memory_format_of(x))


def max_pool2d_forward(
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    return_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.max_pool2d`` for a served configuration: ``(values, saved)``, both in ``x``'s
    memory format. ``saved`` is PyTorch's int64 flat per-plane indices when
    ``return_indices``, else int8 window codes ``ky * KW + kx`` (see the module doc)."""
    why = _config_reason(kernel_size, stride, padding, dilation)
    if why:
        raise ValueError(f"kernel_size/stride/padding/dilation: {why}")
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    _, _, ho, wo = _pooled_shape(x, kernel_size, stride, padding, ceil_mode)
    fmt = memory_format_of(x)
    out = _empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    idx_dtype = torch.int64 if return_indices else CODE_DTYPE
    idx = _empty((n, c, ho, wo), dtype=idx_dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out, idx
    cl = fmt == torch.channels_last
    n_rows, n_cols = (n * ho * wo, c) if cl else (n * c * ho, wo)
    block_r, block_k = _tile(n_cols)
    n_col_blocks = triton.cdiv(n_cols, block_k)
    pair = (not cl) and kw == 2 and sw == 2 and pw == 0 and x.stride(3) == 1
    grid = (triton.cdiv(n_rows, block_r) * n_col_blocks,)
    _max_pool_fwd_kernel[grid](
        x, out, idx,
        c, h, w, ho, wo,
        *x.stride(), *out.stride(),
        n_rows, n_cols, n_col_blocks,
        KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw,
        CL=cl, PAIR=pair, INT64=_needs_int64(x, idx), CODE=not return_indices,
        BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=4,
    )
    return out, idx


def max_pool2d_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    saved: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    return_indices: bool = True,
) -> torch.Tensor:
    """Gradient w.r.t. ``x`` from the pooled ``grad`` and the forward's ``saved`` (int64
    flat indices or int8 window codes, told apart by dtype), in ``x``'s memory format
    (gather, deterministic, no atomics)."""
    if saved.dtype not in (torch.int64, CODE_DTYPE):
        raise ValueError(f"saved: expected int64 indices or {CODE_DTYPE} window codes from max_pool2d_forward, got {saved.dtype}")
    if saved.shape != grad.shape:
        raise ValueError(f"saved: shape {tuple(saved.shape)} must equal grad's {tuple(grad.shape)} (the pooled shape)")
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    ho, wo = grad.shape[2], grad.shape[3]
    gx = _empty(x.shape, dtype=grad.dtype, device=grad.device, memory_format=memory_format_of(x))
    if gx.numel() == 0:
        return gx
    cl = memory_format_of(x) == torch.channels_last
    pair = (not cl) and (kh, kw, sh, sw, ph, pw) == (2, 2, 2, 2, 0, 0) and gx.stride(3) == 1
    n_rows, n_cols = (n * h * w, c) if cl else (n * c * h, triton.cdiv(w, 2) if pair else w)
    block_r, block_k = _tile(n_cols)
    n_col_blocks = triton.cdiv(n_cols, block_k)
    grid = (triton.cdiv(n_rows, block_r) * n_col_blocks,)
    _max_pool_bwd_kernel[grid](
        grad, saved, gx,
        c, h, w, ho, wo,
        *grad.stride(), *saved.stride(), *gx.stride(),
        n_rows, n_cols, n_col_blocks,
        KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw,
        CL=cl, PAIR=pair, INT64=_needs_int64(grad, saved, gx), CODE=saved.dtype == CODE_DTYPE,
        BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=4,
    )
    return gx


register(
    "max_pool2d",
    "triton",
    OpImpl(forward=max_pool2d_forward, supports=supports, backward=max_pool2d_backward, fake_saved=fake_saved),
)
