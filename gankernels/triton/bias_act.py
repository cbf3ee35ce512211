"""Triton bias + activation + gain + clamp, forward and backward.

``y = clip(act(x + b) * gain, -clamp, clamp)`` with ``b`` broadcast along ``dim``, for
every activation of DESIGN §1. Computed in fp32, stored in ``x``'s dtype.

Layout: any *dense* tensor (every element stored once, in some order of its dims:
NCHW-contiguous, channels_last, or any permutation) is processed in place in its own
memory order, as a 2-D matrix ``[R, K]`` over its flat storage:

* when ``dim`` is the innermost dimension in memory (channels_last with ``dim=1``, or
  ``[B, C]`` with ``dim=1``), ``K = C`` and the bias index is the column;
* otherwise ``R = outer * C`` rows of ``K = inner`` elements each, one bias per row
  (NCHW with ``dim=1``: a row is an (n, c) plane).

Loads and stores run along memory (vectorised). A non-dense input (a strided view) is
copied once to a dense tensor in the view's own stride order first (``empty_like``, the
layout an elementwise op gives it); the output has that layout. A strided bias is
copied to unit stride.

Backward: ``gx = grad * epilogue'(x + b)``, recomputed from ``x`` and ``b`` (the same
formulas as ``reference.epilogue_derivative``), and ``gb`` = the sum of ``gx`` over all
but ``dim``: the kernel writes per-tile fp32 partial sums of ``gx`` (so ``gx`` is not
re-read) and a torch reduction of that small buffer finishes it. Deterministic, no
atomics. Double backward uses the reference formulas (wired in registration).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from gankernels.ops.dispatch import OpImpl, register
from gankernels.triton.utils import INT32_LIMIT, common_reasons, empty

ACT_CODES: dict[str, int] = {"linear": 0, "relu": 1, "lrelu": 2, "tanh": 3, "sigmoid": 4, "silu": 5}

_TILE = 4096  # elements per program (per iteration in the backward)
_MAX_BLOCK_K = 1024
_BWD_ROW_ITERS = 8  # row tiles one backward program walks (fewer gb partials to reduce)


# Tests set this to True: every output buffer is then filled with NaN (-1 for indices)
# before the kernel runs, so an element a kernel fails to write shows up.
POISON_OUTPUTS = False


def _empty(*args, **kwargs) -> torch.Tensor:
    return empty(POISON_OUTPUTS, *args, **kwargs)


# ----------------------------------------------------------------------------------
# Kernels


@triton.jit
def _sigmoid(p):
    return 1.0 / (1.0 + tl.exp(-p))


@triton.jit
def _activate(p, ACT: tl.constexpr, alpha):
    # NaN propagates as in PyTorch: the comparisons select p itself for NaN.
    if ACT == 1:  # relu
        p = tl.where(p < 0, 0.0, p)
    elif ACT == 2:  # lrelu
        p = tl.where(p > 0, p, p * alpha)
    elif ACT == 3:  # tanh(p) = 2 sigmoid(2p) - 1 (saturates correctly at ±inf)
        p = 2.0 * _sigmoid(2.0 * p) - 1.0
    elif ACT == 4:  # sigmoid
        p = _sigmoid(p)
    elif ACT == 5:  # silu
        p = p * _sigmoid(p)
    return p


@triton.jit
def _activation_derivative(p, ACT: tl.constexpr, alpha):
    # As reference.activation_derivative: at p == 0 relu/lrelu take the negative slope.
    if ACT == 0:
        d = tl.full(p.shape, 1.0, tl.float32)
    elif ACT == 1:
        d = (p > 0).to(tl.float32)
    elif ACT == 2:
        pos = (p > 0).to(tl.float32)
        d = pos + (1.0 - pos) * alpha
    elif ACT == 3:
        t = 2.0 * _sigmoid(2.0 * p) - 1.0
        d = 1.0 - t * t
    elif ACT == 4:
        s = _sigmoid(p)
        d = s * (1.0 - s)
    else:
        s = _sigmoid(p)
        d = s * (1.0 + p * (1.0 - s))
    return d


@triton.jit
def _tile_coords(pid_r, pid_k, it, R, K, ITERS: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (pid_r * ITERS + it) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if INT64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    offs = rows[:, None] * K + cols[None, :]
    return rows, cols, mask, offs


@triton.jit
def _load_bias(b_ptr, rows, cols, mask, C, BIAS_ON_COLS: tl.constexpr):
    if BIAS_ON_COLS:
        bias = tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    else:
        ch = rows % C
        bias = tl.load(b_ptr + ch, mask=ch >= 0, other=0.0).to(tl.float32)[:, None]
    return bias


@triton.jit
def _bias_act_fwd_kernel(
    x_ptr, b_ptr, y_ptr,
    R, K, C, n_col_blocks,
    alpha, gain, clamp,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_ON_COLS: tl.constexpr, APPLY_GAIN: tl.constexpr,
    HAS_CLAMP: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r = pid // n_col_blocks
    pid_k = pid % n_col_blocks
    rows, cols, mask, offs = _tile_coords(pid_r, pid_k, 0, R, K, 1, INT64, BLOCK_R, BLOCK_K)
    p = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        p = p + _load_bias(b_ptr, rows, cols, mask, C, BIAS_ON_COLS)
    y = _activate(p, ACT, alpha)
    if APPLY_GAIN:
        y = y * gain
    if HAS_CLAMP:
        # where(), not minimum/maximum: a NaN must stay NaN, as torch.clamp keeps it.
        y = tl.where(y < -clamp, -clamp, tl.where(y > clamp, clamp, y))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(
    g_ptr, x_ptr, b_ptr, gx_ptr, part_ptr,
    R, K, C, n_col_blocks,
    alpha, gain, clamp,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_GB: tl.constexpr, BIAS_ON_COLS: tl.constexpr,
    APPLY_GAIN: tl.constexpr, HAS_CLAMP: tl.constexpr, INT64: tl.constexpr, ITERS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r = pid // n_col_blocks
    pid_k = pid % n_col_blocks
    col_sum = tl.zeros([BLOCK_K], tl.float32)
    for it in tl.static_range(ITERS):
        rows, cols, mask, offs = _tile_coords(pid_r, pid_k, it, R, K, ITERS, INT64, BLOCK_R, BLOCK_K)
        p = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            p = p + _load_bias(b_ptr, rows, cols, mask, C, BIAS_ON_COLS)
        d = _activation_derivative(p, ACT, alpha)
        if APPLY_GAIN:
            d = d * gain
        if HAS_CLAMP:
            y = _activate(p, ACT, alpha) * gain
            # Open interval: 0 at |y| == clamp (reference.epilogue_derivative). Multiply by
            # the 0/1 mask (not where) so NaN * 0 stays NaN, as the reference does.
            d = d * ((y > -clamp) & (y < clamp)).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gx = g * d
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        if NEED_GB:
            gx = tl.where(mask, gx, 0.0)
            if BIAS_ON_COLS:
                col_sum += tl.sum(gx, axis=0)
            else:
                # One partial per (row, column block): part is [R, n_col_blocks].
                tl.store(part_ptr + rows * n_col_blocks + pid_k, tl.sum(gx, axis=1), mask=rows < R)
    if NEED_GB:
        if BIAS_ON_COLS:
            # One partial per (row group, column): part is [n_row_groups, K].
            cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
            tl.store(part_ptr + pid_r * K + cols, col_sum, mask=cols < K)


# ----------------------------------------------------------------------------------
# Host side


def _dense_order(t: torch.Tensor) -> Optional[list[int]]:
    """The dims of ``t`` (size > 1 only) from outermost to innermost in memory, if ``t``
    is dense (each element stored once, no gaps); else None."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    order = sorted(dims, key=lambda d: t.stride(d), reverse=True)
    expected = 1
    for d in reversed(order):
        if t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return order


def _matrix_view(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int, int, int, bool]:
    """``(x_dense, R, K, C, bias_on_cols)``: ``x`` (or a contiguous copy if it is not
    dense) seen as the ``[R, K]`` matrix of its storage, see the module docstring."""
    order = _dense_order(x)
    if order is None:
        # A strided view: one dense copy in the view's own stride order (the layout an
        # elementwise op gives it), then the dense case.
        x = torch.empty_like(x).copy_(x)
        order = _dense_order(x)
    c = x.shape[dim]
    if c == 1:  # the bias is one number: one row, bias index row % 1 == 0
        return x, 1, x.numel(), 1, False
    pos = order.index(dim)
    inner = 1
    for d in order[pos + 1 :]:
        inner *= x.shape[d]
    outer = x.numel() // (inner * c)
    if inner == 1:
        return x, outer, c, c, True
    return x, outer * c, inner, c, False


def _dense_bias(b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels index the bias as ``b[c]`` at offset ``c``: a strided bias (``b[::2]``)
    is copied to a unit-stride one (it has one element per channel: a tiny copy)."""
    return b if b is None or b.stride(0) == 1 else b.contiguous()


def _blocks(R: int, K: int) -> tuple[int, int]:
    block_k = min(triton.next_power_of_2(max(K, 1)), _MAX_BLOCK_K)
    block_r = max(1, min(_TILE // block_k, triton.next_power_of_2(max(R, 1))))
    return block_r, block_k


def _epilogue_flags(act: str, gain: float, clamp: Optional[float]) -> dict:
    if act not in ACT_CODES:
        raise ValueError(f"act: unknown activation {act!r}; expected one of {tuple(ACT_CODES)}")
    return dict(ACT=ACT_CODES[act], APPLY_GAIN=gain != 1, HAS_CLAMP=clamp is not None)


def supports(
    x: torch.Tensor, b: Optional[torch.Tensor], act: str, alpha: float, gain: float, clamp: Optional[float], dim: int
) -> list[str]:
    """Every reason the triton bias_act cannot serve this call (empty: it can)."""
    reasons = common_reasons(x, b=b)
    if act not in ACT_CODES:
        reasons.append(f"act={act!r} is not one of {tuple(ACT_CODES)}")
    return reasons


def bias_act_forward(
    x: torch.Tensor, b: Optional[torch.Tensor], act: str, alpha: float, gain: float, clamp: Optional[float], dim: int
) -> torch.Tensor:
    """``clip(act(x + b) * gain, -clamp, clamp)`` with ``b`` along ``dim``; the result
    has ``x``'s layout (a dense one in the same stride order if ``x`` is a view)."""
    flags = _epilogue_flags(act, gain, clamp)
    if x.numel() == 0:
        return _empty(x)
    b = _dense_bias(b)
    xd, R, K, C, on_cols = _matrix_view(x, dim)
    y = _empty(xd)  # same strides as the dense xd: same [R, K] storage order
    block_r, block_k = _blocks(R, K)
    n_col_blocks = triton.cdiv(K, block_k)
    grid = (triton.cdiv(R, block_r) * n_col_blocks,)
    _bias_act_fwd_kernel[grid](
        xd, xd if b is None else b, y,
        R, K, C, n_col_blocks,
        float(alpha), float(gain), 0.0 if clamp is None else float(clamp),
        HAS_BIAS=b is not None, BIAS_ON_COLS=on_cols, INT64=xd.numel() > INT32_LIMIT,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4, **flags,
    )
    return y


def bias_act_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    b: Optional[torch.Tensor],
    y: torch.Tensor,
    act: str,
    alpha: float,
    gain: float,
    clamp: Optional[float],
    dim: int,
    needs: tuple[bool, bool] = (True, True),
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(gx, gb)``: ``gx = grad * epilogue'(x + b)`` in ``x``'s layout and dtype, ``gb``
    its sum over every dim but ``dim`` (None without a bias, or when ``needs[1]``, the
    bias's need of a gradient, is false: the kernel then skips the reduction). ``y`` is
    not needed: the derivative is recomputed from ``x``."""
    flags = _epilogue_flags(act, gain, clamp)
    need_gb = b is not None and bool(needs[1])
    if x.numel() == 0:
        return _empty(x), (torch.zeros_like(b) if need_gb else None)
    b = _dense_bias(b)
    xd, R, K, C, on_cols = _matrix_view(x, dim)
    gx = _empty(xd)
    # grad must walk the same storage order as xd.
    if grad.shape != xd.shape or any(grad.stride(d) != xd.stride(d) for d in range(xd.dim()) if xd.shape[d] > 1):
        grad = torch.empty_like(xd).copy_(grad)
    block_r, block_k = _blocks(R, K)
    n_col_blocks = triton.cdiv(K, block_k)
    n_row_blocks = triton.cdiv(R, block_r)
    iters = min(_BWD_ROW_ITERS, n_row_blocks) if (need_gb and on_cols) else 1
    n_row_groups = triton.cdiv(n_row_blocks, iters)
    if need_gb:
        part_shape = (n_row_groups, K) if on_cols else (R, n_col_blocks)
        part = _empty(part_shape, dtype=torch.float32, device=x.device)
    else:
        part = gx  # unused
    grid = (n_row_groups * n_col_blocks,)
    _bias_act_bwd_kernel[grid](
        grad, xd, xd if b is None else b, gx, part,
        R, K, C, n_col_blocks,
        float(alpha), float(gain), 0.0 if clamp is None else float(clamp),
        HAS_BIAS=b is not None, NEED_GB=need_gb, BIAS_ON_COLS=on_cols, INT64=xd.numel() > INT32_LIMIT,
        ITERS=iters, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4, **flags,
    )
    gb = None
    if need_gb:
        # Deterministic: torch's sum over a fixed-shape buffer.
        gb = part.sum(0) if on_cols else part.sum(1).view(-1, C).sum(0)
        gb = gb.to(b.dtype)
    return gx, gb


register("bias_act", "triton", OpImpl(forward=bias_act_forward, supports=supports, backward=bias_act_backward))
