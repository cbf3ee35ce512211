"""Triton backward of the fused 3×3 convolutions: ``conv3x3``, ``conv3x3_pool``, ``up_conv3x3``.

Two plain GEMMs over one materialised pre-activation gradient ``gp``:

1. **gp once** (:func:`_gp_kernel`, memory-bound): ``gp = d loss / d(conv + bias)`` on the
   GEMM grid, in x's dtype, written once into a zero-bordered NHWC buffer. It folds the
   activation derivative, gain and clamp and, for ``conv3x3_pool``, routes the
   quarter-resolution gradient to each window's argmax through the saved int8 code
   (``dy*2+dx``). For ``up_conv3x3`` the 2× gradient is stored as its 4 output phases
   (a, c), each a low-resolution plane: ``G[a, c][n, i, j] = gp[n, 2i+a, 2j+c]``. The
   same programs write per-tile column sums of gp (fp32): the bias gradient's partials.
2. **dgrad** (:func:`_dgrad_kernel`): ``gx = Σ_taps G[pixel + tap offset] · Wᵀ[tap]`` with M
   the input pixels, K = taps·Co. For a plain or pooled conv it is a correlation with the
   180°-rotated kernel (9 taps); for the up-conv it is the adjoint of the sub-pixel form,
   at low resolution: 16 (phase, tap) pairs, each a plane and a shift (DESIGN.md §4). The
   weight is the forward's packed ``[taps·Ci, Co]`` matrix (its cache serves both), read
   transposed.
3. **wgrad** (:func:`_wgrad_kernel`): ``dW[tap] = Gᵀ · shift_tap(X)`` with the reduction
   over the pixels of the zero-bordered grid, ``X`` a zero-bordered NHWC copy of x
   (:func:`_pad_kernel`). Split over M into fp32 partials ``[S, taps, Co, Ci]``.
4. **finalize** (:func:`_finalize_kernel`): the split sum in a fixed order, the up-conv's
   16→9 tap fold (DESIGN.md §4), the cast to w's dtype and layout; and the bias gradient
   from the gp kernel's partials, also in a fixed order. Deterministic: no atomics.

Why the zero border: both GEMMs address ``gp`` (and wgrad ``X``) as flat NHWC rows of a
``(H+2)×(W+2)`` grid per image, so a tap is one scalar offset (``dh·(W+2) + dw`` rows)
and the zero border is the convolution's padding. The main loops do no pixel index
arithmetic and no pixel bounds masks (channel-tail masks only where a tile does not
divide the channels); each step is two tile loads at a scalar offset and an MMA. Guard
rows before and after the grid keep shifted reads in bounds.

The derivative of the epilogue is read off the forward's output y for linear, relu,
lrelu (alpha ≥ 0), tanh and sigmoid with gain > 0 (the clamp mask is
``-clamp < y < clamp``); otherwise (silu, gain ≤ 0, lrelu with alpha < 0) the
pre-activation is recomputed by the forward kernel with ``act="linear"``.

Numerics: ``gp`` is rounded to x's dtype once (as a materialised gradient is in stock
PyTorch); MMA operands in x's dtype (fp32: TF32 when ``torch.backends.cudnn.allow_tf32``
is on, as cuDNN does), fp32 accumulation; the bias gradient sums the unrounded fp32 gp.

Memory, per backward call (nothing is saved by the forward beyond ``out`` and, for the
pool, its int8 code): ``G`` (N·Co·(H+2)·(W+2) in x's dtype, 4 planes for the up-conv:
the size of the conv output's gradient plus its border), ``X`` (x plus its border, when
wgrad is wanted; rows padded to 8 channels below 16), the fp32 split partials ``[S, taps, Co, Ci]`` and the bias partials;
for the recompute path also the pre-activation.

``CUDNN_PARTS`` is a switch (off by default, not measured yet) that hands the dgrad
and/or wgrad of the plain ``conv3x3`` to cuDNN, on the same ``gp``; set it only where a
GPU measurement shows cuDNN faster.

Under ``torch.compile`` the registration runs these inside the opaque op
``gankernels::<op>_backward`` (``gankernels.ops.registration``), whose fake kernel
AOTAutograd traces.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from gankernels.ops import reference as ref
from gankernels.ops.dispatch import get_impl, register, registered_backends
from gankernels.triton.conv3x3 import _tile_rows
from gankernels.triton.utils import INT32_LIMIT, INTERPRET, ROW_INDEX_LIMIT, empty

try:  # The forward family (issue 4): its packed weights and pre-activation recompute.
    from gankernels.triton import conv3x3 as _fwd
except ModuleNotFoundError as _e:  # pragma: no cover - only before the forward lands
    if _e.name != "gankernels.triton.conv3x3":
        raise
    _fwd = None

OPS: tuple[str, ...] = ("conv3x3", "conv3x3_pool", "up_conv3x3")

# Kernel modes: which op's geometry the kernels follow.
MODE_CONV, MODE_POOL, MODE_UP = 0, 1, 2
_MODE = {"conv3x3": MODE_CONV, "conv3x3_pool": MODE_POOL, "up_conv3x3": MODE_UP}
_NTAP = {MODE_CONV: 9, MODE_POOL: 9, MODE_UP: 16}
_NPLANE = {MODE_CONV: 1, MODE_POOL: 1, MODE_UP: 4}
_ACT_CODE = {"linear": 0, "relu": 1, "lrelu": 2, "tanh": 3, "sigmoid": 4, "silu": 5}

POISON_OUTPUTS: bool = os.environ.get("GANKERNELS_POISON_OUTPUTS") == "1"
"""Test hook: fill every buffer this module allocates (gx, gp, the padded copy, the
partials) with NaN before the launch. Costs an extra write; off unless set."""

CUDNN_PARTS: dict[str, bool] = {"dgrad": False, "wgrad": False}
"""Hand the plain ``conv3x3``'s dgrad / wgrad to cuDNN (``torch.nn.grad``) on the
materialised pre-activation gradient. Off: no GPU measurement has shown it faster yet
(issue 5, item 4). Applies to the ``triton`` backend's ``conv3x3`` backward only."""

SM_COUNT_WITHOUT_GPU = 132
"""The SM count the wgrad split assumes where there is no CUDA device to ask (meta
tensors: the AOT compile and the static report): an H100/H200's."""


# ----------------------------------------------------------------------------------
# The derivative of the epilogue.


@triton.jit
def _tanh_f32(p):
    # tanh via exp: exact limits (exp overflow gives 1 - 0), fine absolute accuracy.
    return 1.0 - 2.0 / (tl.exp(2.0 * p) + 1.0)


@triton.jit
def _dact_from_y(y, alpha, gain, clamp, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr):
    """d epilogue / dp as a function of the (clamped) output y; needs gain > 0 and,
    for lrelu, alpha >= 0 (then y > 0 exactly where p > 0)."""
    if ACT == 0:
        d = tl.full(y.shape, 1.0, tl.float32) * gain
    elif ACT == 1:
        d = tl.where(y > 0, gain, 0.0)
    elif ACT == 2:
        d = tl.where(y > 0, gain, gain * alpha)
    elif ACT == 3:
        t = y / gain
        d = gain * (1.0 - t * t)
    else:  # ACT == 4, sigmoid
        s = y / gain
        d = gain * s * (1.0 - s)
    if HAS_CLAMP:
        # ``clamp`` here is the level as stored in y's dtype. A clamped value sits
        # exactly at ±clamp; an unclamped one lands there only if it rounds onto it
        # (within half an ulp of the clamp), where PyTorch would pass the gradient.
        d = tl.where((y > -clamp) & (y < clamp), d, 0.0)
    return d


@triton.jit
def _dact_from_p(p, alpha, gain, clamp, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr):
    """d epilogue / dp from the pre-activation p (any act, any gain)."""
    if ACT == 0:
        d = tl.full(p.shape, 1.0, tl.float32)
        yu = p
    elif ACT == 1:
        d = tl.where(p > 0, 1.0, 0.0)
        yu = tl.maximum(p, 0.0)
    elif ACT == 2:
        d = tl.where(p > 0, 1.0, alpha)
        yu = tl.where(p > 0, p, p * alpha)
    elif ACT == 3:
        yu = _tanh_f32(p)
        d = 1.0 - yu * yu
    elif ACT == 4:
        yu = 1.0 / (1.0 + tl.exp(-p))
        d = yu * (1.0 - yu)
    else:  # ACT == 5, silu
        s = 1.0 / (1.0 + tl.exp(-p))
        d = s * (1.0 + p * (1.0 - s))
        yu = p * s
    d = d * gain
    if HAS_CLAMP:
        yu = yu * gain
        d = tl.where((yu > -clamp) & (yu < clamp), d, 0.0)  # 0 at |y| == clamp, as the reference
    return d


@triton.jit
def _epilogue_grad(
    g_ptr, g_s0, g_s1, g_s2, g_s3,
    a_ptr, a_s0, a_s1, a_s2, a_s3,
    i_ptr, i_s0, i_s1, i_s2, i_s3,
    n, co, gh, gw, mask, Hp, Wp,
    alpha, gain, clamp,
    POOL: tl.constexpr, FROM_Y: tl.constexpr, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr,
):
    """gp = d loss / d pre-activation at (n, co, gh, gw), in fp32, 0 where ``mask`` is off.

    Indices are broadcastable 2-D tensors; (gh, gw) are pre-activation coordinates
    (full resolution). ``a_ptr`` is y (indexed like ``grad``) when FROM_Y, else the
    pre-activation p at (gh, gw). For POOL, ``grad``/``y``/argmax are pooled tensors.
    """
    if POOL:
        ph = gh // 2
        pw = gw // 2
        mask = mask & (ph < Hp) & (pw < Wp)
        g = tl.load(g_ptr + n * g_s0 + co * g_s1 + ph * g_s2 + pw * g_s3, mask=mask, other=0.0).to(tl.float32)
        sel = tl.load(i_ptr + n * i_s0 + co * i_s1 + ph * i_s2 + pw * i_s3, mask=mask, other=-1).to(tl.int32)
        # Only the window's argmax received the pooled value in the forward.
        mask = mask & (sel == (gh - 2 * ph) * 2 + (gw - 2 * pw))
        if FROM_Y:
            v = tl.load(a_ptr + n * a_s0 + co * a_s1 + ph * a_s2 + pw * a_s3, mask=mask, other=0.0).to(tl.float32)
        else:
            v = tl.load(a_ptr + n * a_s0 + co * a_s1 + gh * a_s2 + gw * a_s3, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + n * g_s0 + co * g_s1 + gh * g_s2 + gw * g_s3, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(a_ptr + n * a_s0 + co * a_s1 + gh * a_s2 + gw * a_s3, mask=mask, other=0.0).to(tl.float32)
    if FROM_Y:
        d = _dact_from_y(v, alpha, gain, clamp, ACT, HAS_CLAMP)
    else:
        d = _dact_from_p(v, alpha, gain, clamp, ACT, HAS_CLAMP)
    return tl.where(mask, g * d, 0.0)


# ----------------------------------------------------------------------------------
# The zero-bordered grid.
#
# A buffer holds, per plane, ``ROWS = FRONT + M_PAD + BACK`` rows of C contiguous values:
# the N images' (H+2)×(W+2) pixels in (n, hp, wp) order from row FRONT, the border and
# every row outside the images zero. FRONT = BACK = W + 3 rows: a tap shifts a row by at
# most (W+2) + 1. M_PAD rounds N·(H+2)·(W+2) up to a whole number of wgrad granules.


@triton.jit
def _grid_pixel(offs_r, FRONT, N, H, W):
    """(n, h, w, interior) of buffer rows ``offs_r``: the image pixel each row holds
    (h, w unpadded), and whether it is one (not border, guard or tail)."""
    m = offs_r - FRONT
    wp2 = W + 2
    plane = (H + 2) * wp2
    nn = m // plane
    rem = m - nn * plane
    hp = rem // wp2
    wp = rem - hp * wp2
    interior = (m >= 0) & (nn < N) & (hp >= 1) & (hp <= H) & (wp >= 1) & (wp <= W)
    return nn, hp - 1, wp - 1, interior


@triton.jit
def _gp_kernel(
    g_ptr, g_s0, g_s1, g_s2, g_s3,
    a_ptr, a_s0, a_s1, a_s2, a_s3,
    i_ptr, i_s0, i_s1, i_s2, i_s3,
    gp_ptr, bpart_ptr,
    N, H: tl.constexpr, W: tl.constexpr, Co: tl.constexpr, Hp: tl.constexpr, Wp: tl.constexpr, ROWS, FRONT,
    alpha, gain, clamp,
    MODE: tl.constexpr, FROM_Y: tl.constexpr, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr,
    HAS_BIAS: tl.constexpr, IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """G[plane, row, co] = gp at the row's pixel (0 off the images), in gp's dtype, and
    bpart[plane, row block, co] = Σ_rows gp (fp32). Planes: the up-conv's 4 output phases
    (a, c) on the low-resolution grid; one full-resolution plane otherwise. The image sizes
    and Co are compile-time constants (each layer compiles once anyway): the grid decoding
    divides by constants."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    plane = tl.program_id(2)
    if IDX64:  # a grid of 2^31 rows or more
        offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    else:
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = offs_r < ROWS
    c_ok = offs_c < Co
    nn, h, w, interior = _grid_pixel(offs_r, FRONT, N, H, W)
    if MODE == 2:
        gh = 2 * h + plane // 2
        gw = 2 * w + plane % 2
    else:
        gh = h
        gw = w
    gp = _epilogue_grad(
        g_ptr, g_s0, g_s1, g_s2, g_s3, a_ptr, a_s0, a_s1, a_s2, a_s3, i_ptr, i_s0, i_s1, i_s2, i_s3,
        nn.to(tl.int64)[:, None], offs_c[None, :], gh[:, None], gw[:, None], (interior & r_ok)[:, None] & c_ok[None, :],
        Hp, Wp, alpha, gain, clamp, MODE == 1, FROM_Y, ACT, HAS_CLAMP,
    )
    row = plane.to(tl.int64) * ROWS + offs_r
    tl.store(gp_ptr + row[:, None] * Co + offs_c[None, :], gp.to(gp_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])
    if HAS_BIAS:
        bpart_row = plane * tl.num_programs(0) + pid_r
        tl.store(bpart_ptr + bpart_row.to(tl.int64) * Co + offs_c, tl.sum(gp, axis=0), mask=c_ok)


@triton.jit
def _pad_kernel(
    x_ptr, x_s0, x_s1, x_s2, x_s3, xp_ptr,
    N, H, W, C, CP, ROWS, FRONT,
    IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """X[row, c] = x at the row's pixel, 0 off the images and for channels c >= C: x's
    zero-bordered NHWC copy, CP >= C values per row."""
    if IDX64:
        offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    else:
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = offs_r < ROWS
    nn, h, w, interior = _grid_pixel(offs_r, FRONT, N, H, W)
    src = nn.to(tl.int64)[:, None] * x_s0 + offs_c[None, :] * x_s1 + h[:, None] * x_s2 + w[:, None] * x_s3
    v = tl.load(x_ptr + src, mask=(interior & r_ok)[:, None] & (offs_c < C)[None, :], other=0.0)
    tl.store(xp_ptr + offs_r.to(tl.int64)[:, None] * CP + offs_c[None, :], v, mask=r_ok[:, None] & (offs_c < CP)[None, :])


@triton.jit
def _tap_shift(tap, WP2, MODE: tl.constexpr):
    """(plane, row shift) of a dgrad tap on the zero-bordered grid. 3×3: tap (kh, kw)
    reads gp at (h + 1 − kh, w + 1 − kw). Up-conv, tap (a, c, t, u): the forward's
    out[2i+a, 2j+c] read x[i+a+t−1, j+c+u−1], so x[r, s] gets G[a, c] at
    (r + 1 − a − t, s + 1 − c − u)."""
    if MODE == 2:
        # tap >= 0: shifts and masks, not signed divisions (each of which costs a
        # sign fix-up in the K loop).
        plane = tap >> 2
        dh = 1 - (tap >> 3) - ((tap >> 1) & 1)
        dw = 1 - (plane & 1) - (tap & 1)
    else:
        plane = tap * 0
        dh = 1 - tap // 3
        dw = 1 - tap % 3
    return plane, dh * WP2 + dw


# ----------------------------------------------------------------------------------
# The two GEMMs. One configuration per shape, chosen on the host (:func:`_dgrad_config`,
# :func:`_wgrad_config`): wgrad's split count depends on it, and the masks it needs
# (channel tails) are compile-time flags of it. The autotuner wrapper only carries the
# chosen configuration (its pruning returns exactly that one, so nothing is timed).


def _cfg(blocks: dict, warps: int, stages: int) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def _dgrad_configs() -> list:
    if INTERPRET:
        return [_cfg({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, 4, 1)]
    return [
        # 128×128 tiles on 8 warps: on 4 they take 245 registers on sm_90 and spill on sm_80.
        _cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 4),
        _cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 4),
        _cfg({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 64}, 4, 4),
        _cfg({"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 4),
        _cfg({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 4),
    ]


# Below this many input channels wgrad puts all of a plane's taps on the tile's N side
# (TAPS_IN_N): column n of the tile is (tap n // C, channel n % C) of X, whose rows are
# padded to C channels (:func:`_taps_in_n_channels`). One program then reads each gp
# tile once for every tap.
_TAPS_IN_N_BELOW = 16
# The up-conv with a narrow Co takes TAPS_IN_N for these channel counts too (see
# :func:`_wgrad_taps_in_n`): X's rows are then x's own Ci channels, unpadded.
_UP_TAPS_IN_N_CI = (16, 32, 64)
# X may take this many times x's bytes for the sake of 16-byte rows (8 channels).
_PAD_BYTES_RATIO = 4


def _tap_groups(mode: int) -> int:
    """Column groups of a TAPS_IN_N tile: a plane's taps, padded to a power of two."""
    return 4 if mode == MODE_UP else 16


def _wgrad_taps_in_n(ci: int, co: int, mode: int, elsize: int) -> bool:
    """Whether wgrad takes the TAPS_IN_N tile: below _TAPS_IN_N_BELOW input channels, and
    for the up-conv with Co <= 32 and Ci in _UP_TAPS_IN_N_CI where such a tile fits
    (bf16: all three; fp32: Ci <= 32). There the plain tile is at most Co × Ci = 32 × 64
    (Co on the MMA's N side), so a 256-cycle step needs 256 rows, and its per-MMA
    descriptor and per-load address arithmetic set the issue load; a plane's 4 taps × Ci
    columns (at most 256) make the same step from 64 rows, and each G tile is read once
    per plane instead of once per tap."""
    if ci < _TAPS_IN_N_BELOW:
        return True
    if mode != MODE_UP or co > 32 or ci not in _UP_TAPS_IN_N_CI:
        return False
    block_ci = _tap_groups(mode) * ci
    return any(_fits(c, {"BLOCK_CO": co}, elsize) for c in _taps_in_n_configs() if c.kwargs["BLOCK_CI"] == block_ci)


def _taps_in_n_channels(ci: int, mode: int, pixels: int, grid_rows: int) -> int:
    """X's channels per row (and per column group) on the TAPS_IN_N path: 8 (rows of 16
    bytes, one cp.async each: a 4-channel row costs twice the load instructions) unless
    that makes X more than _PAD_BYTES_RATIO× x (a grid much larger than the image, e.g.
    1-pixel-high images); else the next power of two of Ci, at least 4 for the up-conv
    (its 4 taps must fill 16 columns)."""
    if grid_rows * 8 <= _PAD_BYTES_RATIO * pixels * ci:
        return max(8, triton.next_power_of_2(ci))
    return max(triton.next_power_of_2(ci), 16 // _tap_groups(mode))


def _taps_in_n_configs() -> list:
    """TAPS_IN_N tiles: BLOCK_CI = column groups × channels per group."""
    m, stages = (32, 1) if INTERPRET else (128, 3)
    cos = (16,) if INTERPRET else (64, 32, 16)
    # 8 warps for a 64×256 tile: its fp32 accumulator alone is 128 registers a thread at 4.
    return [
        _cfg({"BLOCK_CO": co, "BLOCK_CI": ci, "BLOCK_M": m if ci <= 64 else 64}, 8 if co * ci >= 64 * 256 else 4, stages)
        for ci in (256, 128, 64, 32, 16)
        for co in cos
    ]


def _wgrad_configs() -> list:
    """Every wgrad configuration (the autotuner's list; the host picks one per shape)."""
    return _plain_wgrad_configs() + _taps_in_n_configs()


def _plain_wgrad_configs() -> list:
    """Tiles [BLOCK_CO, BLOCK_CI] reduced over BLOCK_M rows per step. A Co block below 64
    is swapped onto the MMA's N side (wgmma's M is 64 per warpgroup)."""
    if INTERPRET:  # a wide Co tile too, so the tests reach the unswapped orientation
        return [_cfg({"BLOCK_CO": co, "BLOCK_CI": 16, "BLOCK_M": 32}, 4, 1) for co in (64, 16)]
    return [
        _cfg({"BLOCK_CO": 128, "BLOCK_CI": 128, "BLOCK_M": 64}, 8, 4),  # 4 warps spill on sm_80
        _cfg({"BLOCK_CO": 128, "BLOCK_CI": 64, "BLOCK_M": 64}, 4, 4),
        _cfg({"BLOCK_CO": 64, "BLOCK_CI": 128, "BLOCK_M": 64}, 4, 4),
        _cfg({"BLOCK_CO": 64, "BLOCK_CI": 64, "BLOCK_M": 128}, 4, 3),
        _cfg({"BLOCK_CO": 32, "BLOCK_CI": 128, "BLOCK_M": 128}, 4, 3),
        _cfg({"BLOCK_CO": 32, "BLOCK_CI": 64, "BLOCK_M": 256}, 4, 2),
        _cfg({"BLOCK_CO": 16, "BLOCK_CI": 64, "BLOCK_M": 128}, 4, 3),
    ]




# Operand tiles (stages × both tiles) must leave room in shared memory (227 KB per block
# on sm_90, 163 KB on sm_80) for the layout conversions and the epilogue.
_TILE_BYTES_LIMIT = 128 * 1024


def _fits(c: triton.Config, dims: dict, elsize: int) -> bool:
    """``dims``: {block name: channel count}; a tile may not be far wider than its
    channels (it would only compute padding)."""
    sizes = [c.kwargs[k] for k in c.kwargs]
    tile = c.num_stages * (sizes[0] + sizes[1]) * sizes[2] * elsize
    if tile > _TILE_BYTES_LIMIT:
        return False
    return all(c.kwargs[k] <= max(16, triton.next_power_of_2(int(n))) for k, n in dims.items())


def _choose(configs: list, dims: dict, elsize: int) -> triton.Config:
    kept = [c for c in configs if _fits(c, dims, elsize)]
    if kept:
        return kept[0]
    last = configs[-1]  # the smallest tile, in a shallower pipeline
    return _cfg(dict(last.kwargs), last.num_warps, min(2, last.num_stages))


def _dgrad_pairs_taps(mode: int, co: int, block_k: int) -> bool:
    """Whether dgrad's K-steps take the up-conv's taps in pairs: (a, c, t, u=1) and
    (a, c, t, u=0) read adjacent grid rows, so for BLOCK_K = 2·Co one contiguous
    [BLOCK_M, 2·Co] slice of G feeds both (narrow Co: a 32-deep step is too short)."""
    return mode == MODE_UP and block_k == 2 * co


def _dgrad_config(ci: int, co: int, mode: int, elsize: int) -> triton.Config:
    configs = _dgrad_configs()
    if mode == MODE_UP and co <= 32:
        pairs = [c for c in configs if _dgrad_pairs_taps(mode, co, c.kwargs["BLOCK_K"])]
        if pairs:
            return _choose(pairs, {"BLOCK_N": ci}, elsize)
    return _choose(configs, {"BLOCK_N": ci, "BLOCK_K": co}, elsize)


def _taps_per_plane(mode: int) -> int:
    return 4 if mode == MODE_UP else 9


def _wgrad_config(ci: int, co: int, mode: int, cip: int, elsize: int) -> triton.Config:
    """``cip``: X's channels per row."""
    taps_in_n = _taps_in_n_configs()
    if _wgrad_taps_in_n(ci, co, mode, elsize):
        block_ci = _tap_groups(mode) * cip
        return _choose([c for c in taps_in_n if c.kwargs["BLOCK_CI"] == block_ci], {"BLOCK_CO": co}, elsize)
    return _choose(_plain_wgrad_configs(), {"BLOCK_CO": co, "BLOCK_CI": ci}, elsize)


def _only_chosen(choose, args: tuple[str, ...]):
    """Autotune pruning that keeps exactly the configuration the host chose:
    ``choose(*args, elsize=...)`` on the launch's arguments."""

    def prune(configs, named_args, **kwargs):
        values = [int(kwargs[a]) if a in kwargs else int(named_args[a]) for a in args]
        return [choose(*values, elsize=named_args["gp_ptr"].element_size())]

    return prune


# The wgrad reduction's granule: every wgrad BLOCK_M divides it, so split slices and the
# padded grid are whole numbers of steps.
_M_GRANULE = max(c.kwargs["BLOCK_M"] for c in _wgrad_configs())


@triton.autotune(
    configs=_dgrad_configs(),
    key=["N", "H", "W", "Ci", "Co", "MODE"],
    prune_configs_by={"early_config_prune": _only_chosen(_dgrad_config, ("Ci", "Co", "MODE"))},
)
@triton.jit
def _dgrad_kernel(
    gp_ptr, wt_ptr, gx_ptr, gx_s0, gx_s1, gx_s2, gx_s3,
    N, H: tl.constexpr, W: tl.constexpr, Ci: tl.constexpr, Co: tl.constexpr, ROWS, FRONT, N_STEPS,
    MODE: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, K_CHUNKS: tl.constexpr,
    PAIRS: tl.constexpr, IDX64: tl.constexpr, M_ALIGNED: tl.constexpr, GX_CL: tl.constexpr, GX_INT32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gx[n, ci, h, w] = Σ_taps Σ_co G[plane(tap), pixel + shift(tap), co] · wt[tap, ci, co]
    (``wt`` the forward's packed ``[taps·Ci, Co]`` weight, read transposed). With PAIRS
    (up-conv, BLOCK_K = 2·Co) a step is the tap pair (2s + 1, 2s): see
    :func:`_dgrad_pairs_taps`.

    The image size and channel counts are compile-time constants (each layer is its own
    compilation anyway): the pixel decoding divides by constants, the tap shifts and the
    row strides are constants. M_ALIGNED: N·H·W is a multiple of BLOCK_M (no row masks);
    GX_CL: gx is dense channels_last (pixel m's channels at m·Ci)."""
    pid = tl.program_id(0)
    num_n: tl.constexpr = (Ci + BLOCK_N - 1) // BLOCK_N
    pid_n = pid % num_n
    pid_m = pid // num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows past the end read pixel 0 and are never stored; H, W constant: the decoding divides by constants.
    offs_m, m_ok, nn, xh, xw = _tile_rows(offs_m, N * H * W, H, W, H, W, M_ALIGNED, True)
    WP2: tl.constexpr = W + 2
    # Each row's grid row, computed once; a tap adds a scalar.
    if IDX64:
        row = FRONT + (nn.to(tl.int64) * (H + 2) + xh + 1) * WP2 + xw + 1
    else:
        row = FRONT + (nn * (H + 2) + xh + 1) * WP2 + xw + 1
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Ci
    a_offs = row[:, None] * Co + offs_k[None, :]
    if PAIRS:
        # Column k < Co: tap 2s + 1 (u = 1), channel k; k >= Co: tap 2s, channel k − Co.
        b_offs = ((1 - offs_k // Co)[:, None] * Ci + offs_n[None, :]) * Co + (offs_k % Co)[:, None]
    else:
        b_offs = offs_n[None, :] * Co + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # N_STEPS = taps · K_CHUNKS (taps / 2 with PAIRS), passed at run time so the loop
    # stays a loop (a constant trip count gets unrolled whole); the tap is a division by
    # a constant.
    for s in range(N_STEPS):
        if PAIRS:
            tap = 2 * s + 1
            c0 = 0
        else:
            tap = s // K_CHUNKS
            c0 = (s - tap * K_CHUNKS) * BLOCK_K
        plane, shift = _tap_shift(tap, WP2, MODE)
        if IDX64:
            a_base = gp_ptr + ((plane.to(tl.int64) * ROWS + shift) * Co + c0)
        else:
            a_base = gp_ptr + ((plane * ROWS + shift) * Co + c0)
        if PAIRS:
            b_base = wt_ptr + (tap - 1) * Ci * Co
        else:
            b_base = wt_ptr + (tap * Ci * Co + c0)
        if EVEN_K:
            a = tl.load(a_base + a_offs)
            if EVEN_N:
                b = tl.load(b_base + b_offs)
            else:
                b = tl.load(b_base + b_offs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (c0 + offs_k) < Co
            a = tl.load(a_base + a_offs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_base + b_offs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if GX_CL and GX_INT32:
        gx_off = offs_m[:, None] * Ci + offs_n[None, :]
    elif GX_CL:
        gx_off = offs_m.to(tl.int64)[:, None] * Ci + offs_n[None, :]
    else:
        gx_off = nn.to(tl.int64)[:, None] * gx_s0 + offs_n[None, :] * gx_s1 + xh[:, None] * gx_s2 + xw[:, None] * gx_s3
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(
    configs=_wgrad_configs(),
    key=["N", "H", "W", "Ci", "Co", "MODE"],
    prune_configs_by={"early_config_prune": _only_chosen(_wgrad_config, ("Ci", "Co", "MODE", "CIP"))},
)
@triton.jit
def _wgrad_kernel(
    gp_ptr, x_ptr, part_ptr,
    N, H, W, Ci, Co, CIP, ROWS, FRONT, M_PAD, M_PER_SPLIT,
    MODE: tl.constexpr, EVEN_CO: tl.constexpr, EVEN_CI: tl.constexpr, TAPS_IN_N: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """part[s, tap, co, ci] = Σ_{rows m of slice s} G[plane(tap), m, co] · X[m + shift(tap), ci].

    The sum runs over the zero-bordered grid: border rows of G are zero, so they add
    nothing, and X's border is the padding. 3×3 tap (kh, kw) pairs gp at (h, w) with x
    at (h + kh − 1, w + kw − 1); the up-conv's (a, c, t, u) pairs G[a, c] at (i, j) with
    x at (i + a + t − 1, j + c + u − 1). X has CIP values per row.

    A program owns one tap and a [BLOCK_CO, BLOCK_CI] tile; with TAPS_IN_N it owns a
    plane and its tile's columns are (tap, channel) pairs, CIP (= BLOCK_CI / 4 or / 16)
    channels per tap."""
    NTAP: tl.constexpr = 16 if MODE == 2 else 9
    TPP: tl.constexpr = 4 if MODE == 2 else 9  # taps per plane
    PLANE_TAP0: tl.constexpr = 4 if MODE == 2 else 0  # a plane's first tap, per plane
    SWAP: tl.constexpr = BLOCK_CO < 64  # put Co on the MMA's N side
    pid_co = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    WP2 = W + 2
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    cols = tl.arange(0, BLOCK_CI)
    if TAPS_IN_N:
        # Channels per column group == CIP, as a constant: the row stride's alignment
        # (16 bytes at 8 channels) is then known, so X loads are 16-byte cp.async.
        TAP_CH: tl.constexpr = BLOCK_CI // (4 if MODE == 2 else 16)
        XS = TAP_CH
        plane = pid_q
        j = cols // TAP_CH
        tap = tl.where(j < TPP, plane * PLANE_TAP0 + j, 0)
        offs_ci = cols % TAP_CH
    else:
        XS = CIP
        tap = pid_q % NTAP
        offs_ci = (pid_q // NTAP) * BLOCK_CI + cols
        if MODE == 2:
            plane = tap // 4
        else:
            plane = tap * 0
    if MODE == 2:
        shift = (tap // 8 + (tap // 2) % 2 - 1) * WP2 + (tap // 4) % 2 + tap % 2 - 1
    else:
        shift = (tap // 3 - 1) * WP2 + tap % 3 - 1
    offs_m = tl.arange(0, BLOCK_M)
    m_start = pid_s * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M_PAD)
    # Tile pointers, advanced by one tile per step.
    g_offs = offs_m[:, None] * Co + offs_co[None, :]
    if TAPS_IN_N:
        x_offs = (offs_m.to(tl.int64)[:, None] + shift.to(tl.int64)[None, :]) * XS + offs_ci[None, :]
    else:
        x_offs = (offs_m[:, None] + shift) * XS + offs_ci[None, :]
    g_base = gp_ptr + (plane.to(tl.int64) * ROWS + FRONT + m_start) * Co + g_offs
    x_base = x_ptr + (FRONT + m_start).to(tl.int64) * XS + x_offs
    co_ok = offs_co < Co
    ci_ok = offs_ci < Ci
    if SWAP:
        acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    for _ in range(m_start, m_end, BLOCK_M):
        if EVEN_CO:
            g = tl.load(g_base)
        else:
            g = tl.load(g_base, mask=co_ok[None, :], other=0.0)
        if EVEN_CI:
            xt = tl.load(x_base)
        else:
            xt = tl.load(x_base, mask=ci_ok[None, :], other=0.0)
        if SWAP:
            acc = tl.dot(tl.trans(xt), g, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(tl.trans(g), xt, acc, input_precision=PRECISION)
        g_base += BLOCK_M * Co
        x_base += BLOCK_M * XS
    if TAPS_IN_N:
        ok_cols = (j < TPP) & ci_ok
    else:
        ok_cols = ci_ok
    col_off = tap.to(tl.int64) * Co * Ci + offs_ci
    if SWAP:
        p_off = col_off[:, None] + offs_co[None, :].to(tl.int64) * Ci
        p_mask = ok_cols[:, None] & co_ok[None, :]
    else:
        p_off = col_off[None, :] + offs_co[:, None].to(tl.int64) * Ci
        p_mask = co_ok[:, None] & ok_cols[None, :]
    tl.store(part_ptr + pid_s.to(tl.int64) * NTAP * Co * Ci + p_off, acc, mask=p_mask)


@triton.jit
def _finalize_kernel(
    part_ptr, bpart_ptr, gw_ptr, gw_s0, gw_s1, gw_s2, gw_s3, gb_ptr,
    S, Co, Ci, B_ROWS,
    MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """gw[co, ci, kh, kw] = Σ_s (fold of) part[s, :, co, ci], gb[co] = Σ_r bpart[r, co]:
    both summed in a fixed order. The first programs do the weight, the rest the bias.

    Up-conv fold (DESIGN.md §4), per axis: 3×3 row k collects the phase taps (a, t) with
    k = 0: t = 0;  k = 1: (a, t) = (0, 1) or (1, 0);  k = 2: t = 1."""
    NTAP: tl.constexpr = 16 if MODE == 2 else 9
    pid = tl.program_id(0)
    if HAS_W:
        n_w = tl.cdiv(Co * Ci, BLOCK_E)
    else:
        n_w = 0
    if pid < n_w:
        offs_e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        e_ok = offs_e < Co * Ci
        co = offs_e // Ci
        ci = offs_e - co * Ci
        q = tl.arange(0, 16)
        q_ok = q < NTAP
        acc = tl.zeros((BLOCK_E, 16), dtype=tl.float32)
        src = q.to(tl.int64)[None, :] * (Co * Ci) + offs_e[:, None]
        ptrs = part_ptr + src
        for _ in range(S):
            acc += tl.load(ptrs, mask=e_ok[:, None] & q_ok[None, :], other=0.0)
            ptrs += NTAP * Co * Ci
        gw_e = gw_ptr + co.to(tl.int64) * gw_s0 + ci * gw_s1
        if MODE == 2:
            a = q // 8
            c = (q // 4) % 2
            t = (q // 2) % 2
            u = q % 2
            for k in tl.static_range(9):
                kh = k // 3
                kw = k % 3
                # The 4 phase taps that 3×3 tap (kh, kw) collects, summed with a select
                # (a product with a 0/1 matrix would be turned into an fp32 dot).
                if kh == 0:
                    row_in = t == 0
                elif kh == 1:
                    row_in = a + t == 1
                else:
                    row_in = t == 1
                if kw == 0:
                    col_in = u == 0
                elif kw == 1:
                    col_in = c + u == 1
                else:
                    col_in = u == 1
                v = tl.sum(tl.where((row_in & col_in)[None, :], acc, 0.0), axis=1)
                tl.store(gw_e + kh * gw_s2 + kw * gw_s3, v.to(gw_ptr.dtype.element_ty), mask=e_ok)
        else:
            k = tl.arange(0, 16)  # the 3×3 tap kh·3 + kw (9 of 16 used)
            dst = (k // 3)[None, :] * gw_s2 + (k % 3)[None, :] * gw_s3
            tl.store(gw_e[:, None] + dst, acc.to(gw_ptr.dtype.element_ty), mask=e_ok[:, None] & (k < 9)[None, :])
    elif HAS_B:
        offs_c = (pid - n_w) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < Co
        offs_r = tl.arange(0, BLOCK_R)
        bacc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for r0 in range(0, B_ROWS, BLOCK_R):
            rows = r0 + offs_r
            b_ok = (rows < B_ROWS)[:, None] & c_ok[None, :]
            v = tl.load(bpart_ptr + rows.to(tl.int64)[:, None] * Co + offs_c[None, :], mask=b_ok, other=0.0)
            bacc += tl.sum(v, axis=0)
        tl.store(gb_ptr + offs_c, bacc.to(gb_ptr.dtype.element_ty), mask=c_ok)


# ----------------------------------------------------------------------------------
# Host side.


def _alloc(shape: tuple, dtype: torch.dtype, device: torch.device, fmt=torch.contiguous_format) -> torch.Tensor:
    """An output buffer; NaN-filled when POISON_OUTPUTS is on, so an element a kernel
    fails to write shows up in a comparison."""
    return empty(POISON_OUTPUTS, shape, dtype=dtype, device=device, memory_format=fmt)


def derivative_from_output(act: str, alpha: float, gain: float) -> bool:
    """Whether the epilogue derivative can be read off the forward's output y (else the
    pre-activation is recomputed)."""
    if gain <= 0 or act == "silu":
        return False
    if act == "lrelu" and alpha < 0:
        return False
    return True


def _preactivation(op: str, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """conv + bias at the gradient's resolution (full resolution for the pooled op)."""
    up = op == "up_conv3x3"
    if _fwd is not None:
        fn = _fwd.up_conv3x3_forward if up else _fwd.conv3x3_forward
        p, _ = fn(x=x, w=w, b=b, act="linear", alpha=0.2, gain=1.0, clamp=None)
        return p
    # Before the Triton forward exists: the reference, in fp32 so CPU half precision works.
    f = ref.up_conv3x3_preact if up else ref.conv3x3_preact
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    return f(x.to(wide), w.to(wide), None if b is None else b.to(wide)).to(x.dtype)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM_COUNT_WITHOUT_GPU


def wgrad_split(device: torch.device, tiles: int, granules: int) -> int:
    """Split count of wgrad's reduction: ``tiles`` (the output tiles of the chosen
    configuration) times the split fills every SM about twice. On the CPU interpreter at
    most 2 (enough to test the fixed-order sum)."""
    if device.type == "cpu":
        return max(1, min(2, granules))
    return max(1, min(granules, 64, triton.cdiv(2 * _sm_count(device), max(tiles, 1))))


def _check_int32(name: str, t: torch.Tensor) -> None:
    # Pixel indices are int32 in the kernels (batch offsets are int64).
    if t.numel() and t[0].numel() >= 2**31:
        raise ValueError(f"{name}: one image has {t[0].numel()} elements; the triton backward needs < 2**31 (use backend='torch')")
    n, _, h, w = t.shape
    if n * h * w > ROW_INDEX_LIMIT:
        raise ValueError(
            f"{name}: N·H·W = {n * h * w} pixels; the triton backward indexes pixels in int32 and needs at most "
            f"{ROW_INDEX_LIMIT} (2^31 − 1 less a tile, so the last tile's rows do not wrap; use backend='torch' "
            "or split the batch)"
        )


def _pack_weight(op: str, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[taps·Ci, Co]`` in ``dtype``, rows ordered (kh, kw, ci) or, for the up-conv,
    (a, c, t, u, ci) over the 16 sub-pixel phase taps (summed in fp32, rounded once):
    the forward's packed layout, so its per-parameter-version cache serves both."""
    up = op == "up_conv3x3"
    if _fwd is not None:
        return _fwd.packed_weight(w, dtype, phases=up)
    w = w.detach()
    co = w.shape[0]
    if up:
        packed = ref.subpixel_phase_weights(w.float()).permute(0, 1, 4, 5, 3, 2)  # [a, c, t, u, Ci, Co]
    else:
        packed = w.permute(2, 3, 1, 0)  # [kh, kw, Ci, Co]
    return packed.to(dtype).contiguous().reshape(-1, co)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The zero-bordered NHWC grid both GEMMs address (see the module docstring)."""

    n: int
    h: int  # the GEMM grid: x's size (the up-conv's low resolution)
    w: int
    front: int  # guard rows before the first image (= back guard)
    m_pad: int  # rows wgrad reduces over: N·(H+2)·(W+2) rounded up to a granule
    rows: int  # rows per plane: front + m_pad + back

    @staticmethod
    def of(n: int, h: int, w: int) -> Grid:
        front = w + 3
        m_pad = triton.cdiv(n * (h + 2) * (w + 2), _M_GRANULE) * _M_GRANULE
        return Grid(n, h, w, front, m_pad, front + m_pad + front)

    def interior(self, buf: torch.Tensor, plane: int = 0) -> torch.Tensor:
        """The [N, C, H, W] view (channels_last strides) of plane ``plane`` of ``buf``."""
        c = buf.shape[-1]
        p = (self.h + 2) * (self.w + 2)
        off = ((plane * self.rows) + self.front + (self.w + 2) + 1) * c
        return buf.as_strided((self.n, c, self.h, self.w), (p * c, 1, (self.w + 2) * c, c), buf.storage_offset() + off)


def _mem_tile(c: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the memory-bound kernels: 2048-element tiles (256 in the
    interpreter; 16 elements a thread: at 32 the pool's gathers spill), the channel block
    up to 64 wide."""
    block_c = min(triton.next_power_of_2(max(c, 1)), 64 if not INTERPRET else 16)
    return max(1, (256 if INTERPRET else 2048) // block_c), block_c


def _operands(op: str, grad, x, w, b, out, saved, act, alpha, gain, clamp):
    """The gp kernel's arguments: (grad, aux, code) with their strides, the pooled size,
    the scalars and the constexpr flags."""
    mode = _MODE[op]
    from_y = derivative_from_output(act, alpha, gain)
    if mode == MODE_POOL:
        if saved.dtype != torch.int8 or tuple(saved.shape) != tuple(grad.shape):
            raise ValueError(
                f"saved: conv3x3_pool's triton backward needs the int8 argmax [N, Co, H//2, W//2] (dy*2+dx) "
                f"saved by the triton forward; got {saved.dtype} of shape {tuple(saved.shape)}"
            )
        idx = saved
    else:
        idx = grad  # unused; any valid pointer
    if from_y:
        if tuple(out.shape) != tuple(grad.shape):
            raise ValueError(f"out: expected the forward's output of shape {tuple(grad.shape)}, got {tuple(out.shape)}")
        aux = out
    else:
        aux = _preactivation(op, x, w, b)
        _check_int32("the recomputed pre-activation", aux)
    hp, wp = (grad.shape[2], grad.shape[3]) if mode == MODE_POOL else (0, 0)
    flags = dict(ACT=_ACT_CODE[act], FROM_Y=from_y, HAS_CLAMP=clamp is not None)
    clamp_level = 0.0
    if clamp is not None:
        clamp_level = float(clamp)
        if from_y:
            # A clamped output holds the clamp rounded to out's dtype (via fp32, as the
            # forward computes): compare y with that, not with the exact level.
            clamp_level = torch.tensor(clamp, dtype=torch.float32).to(out.dtype).item()
    scalars = (float(alpha), float(gain), clamp_level)
    tensors = (grad, *grad.stride(), aux, *aux.stride(), idx, *idx.stride())
    return mode, tensors, (hp, wp), scalars, flags


def _launch_gp(mode: int, tensors, geom, scalars, flags, x: torch.Tensor, co: int, grid: Grid, with_bias: bool):
    """G (the zero-bordered gp, ``[planes, rows, Co]`` in x's dtype) and the bias partials
    (``[planes·row blocks, Co]`` fp32, or a dummy)."""
    planes = _NPLANE[mode]
    gp = _alloc((planes, grid.rows, co), x.dtype, x.device)
    block_r, block_c = _mem_tile(co)
    row_blocks = triton.cdiv(grid.rows, block_r)
    bpart = _alloc((planes * row_blocks, co) if with_bias else (1,), torch.float32, x.device)
    _gp_kernel[(row_blocks, triton.cdiv(co, block_c), planes)](
        *tensors, gp, bpart, grid.n, grid.h, grid.w, co, *geom, grid.rows, grid.front, *scalars,
        MODE=mode, HAS_BIAS=with_bias, IDX64=grid.rows + block_r > INT32_LIMIT, BLOCK_R=block_r, BLOCK_C=block_c, **flags,
    )
    return gp, bpart


def _launch_pad(x: torch.Tensor, grid: Grid, cp: int) -> torch.Tensor:
    """X: x in the zero-bordered grid, ``cp`` >= Ci values per row."""
    ci = x.shape[1]
    xp = _alloc((grid.rows, cp), x.dtype, x.device)
    block_r, block_c = _mem_tile(cp)
    _pad_kernel[(triton.cdiv(grid.rows, block_r), triton.cdiv(cp, block_c))](
        x, *x.stride(), xp, grid.n, grid.h, grid.w, ci, cp, grid.rows, grid.front,
        IDX64=grid.rows + block_r > INT32_LIMIT, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return xp


def pre_activation_grad(
    op: str,
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    out: torch.Tensor,
    saved: torch.Tensor,
    act: str,
    alpha: float,
    gain: float,
    clamp: Optional[float],
) -> torch.Tensor:
    """The gradient of the pre-activation (conv + bias) at full resolution in x's dtype
    and memory format: a copy of the interior of the zero-bordered buffer the GEMMs read.
    Used by tests; not for ``up_conv3x3`` (its gradient is stored as 4 phase planes)."""
    if op not in ("conv3x3", "conv3x3_pool"):
        raise ValueError(f"op: pre_activation_grad serves 'conv3x3' and 'conv3x3_pool', got {op!r}")
    mode, tensors, geom, scalars, flags = _operands(op, grad, x, w, b, out, saved, act, alpha, gain, clamp)
    n, _, h, wd = x.shape
    grid = Grid.of(n, h, wd)
    gp, _ = _launch_gp(mode, tensors, geom, scalars, flags, x, w.shape[0], grid, with_bias=False)
    return grid.interior(gp).contiguous(memory_format=ref.memory_format_of(x))


def _launch_dgrad(mode: int, gp: torch.Tensor, wt: torch.Tensor, x: torch.Tensor, co: int, grid: Grid, precision: str):
    n, ci, h, wd = x.shape
    gx = _alloc(x.shape, x.dtype, x.device, ref.memory_format_of(x))
    cfg = _dgrad_config(ci, co, mode, x.element_size())
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    pairs = _dgrad_pairs_taps(mode, co, bk)
    k_chunks = triton.cdiv(co, bk)
    _dgrad_kernel[(triton.cdiv(n * h * wd, bm) * triton.cdiv(ci, bn),)](
        gp, wt, gx, *gx.stride(), n, h, wd, ci, co, grid.rows, grid.front, _NTAP[mode] // 2 if pairs else _NTAP[mode] * k_chunks,
        MODE=mode, EVEN_N=ci % bn == 0, EVEN_K=pairs or co % bk == 0, K_CHUNKS=k_chunks, PAIRS=pairs,
        IDX64=gp.numel() > INT32_LIMIT, M_ALIGNED=(n * h * wd) % bm == 0,
        GX_CL=gx.is_contiguous(memory_format=torch.channels_last), GX_INT32=gx.numel() <= INT32_LIMIT, PRECISION=precision,
    )
    return gx


def _launch_wgrad(mode: int, gp: torch.Tensor, xp: torch.Tensor, x: torch.Tensor, co: int, grid: Grid, precision: str, split):
    n, ci, h, wd = x.shape
    ntap = _NTAP[mode]
    cfg = _wgrad_config(ci, co, mode, xp.shape[1], x.element_size())
    bco, bci = cfg.kwargs["BLOCK_CO"], cfg.kwargs["BLOCK_CI"]
    taps_in_n = _wgrad_taps_in_n(ci, co, mode, x.element_size())
    q_programs = _NPLANE[mode] if taps_in_n else triton.cdiv(ci, bci) * ntap
    tiles = triton.cdiv(co, bco) * q_programs
    granules = grid.m_pad // _M_GRANULE
    s = wgrad_split(x.device, tiles, granules) if split is None else max(1, min(int(split), granules))
    m_per_split = triton.cdiv(granules, s) * _M_GRANULE
    s = triton.cdiv(grid.m_pad, m_per_split)  # no empty slices
    part = _alloc((s, ntap, co, ci), torch.float32, x.device)
    _wgrad_kernel[(triton.cdiv(co, bco), q_programs, s)](
        gp, xp, part, n, h, wd, ci, co, xp.shape[1], grid.rows, grid.front, grid.m_pad, m_per_split,
        MODE=mode, EVEN_CO=co % bco == 0, EVEN_CI=taps_in_n or ci % bci == 0, TAPS_IN_N=taps_in_n, PRECISION=precision,
    )
    return part


def _launch_finalize(mode: int, part: Optional[torch.Tensor], bpart: Optional[torch.Tensor], w: torch.Tensor,
                     b: Optional[torch.Tensor]):
    co, ci = w.shape[0], w.shape[1]
    gw = _alloc(w.shape, w.dtype, w.device, ref.memory_format_of(w)) if part is not None else None
    gb = _alloc(b.shape, b.dtype, b.device) if bpart is not None else None
    block_e = 32 if mode == MODE_UP else 64
    block_c = min(triton.next_power_of_2(co), 128)
    n_w = triton.cdiv(co * ci, block_e) if part is not None else 0
    n_b = triton.cdiv(co, block_c) if bpart is not None else 0
    dummy = part if part is not None else bpart
    _finalize_kernel[(n_w + n_b,)](
        dummy if part is None else part, dummy if bpart is None else bpart,
        dummy if gw is None else gw, *(gw.stride() if gw is not None else (0, 0, 0, 0)), dummy if gb is None else gb,
        part.shape[0] if part is not None else 0, co, ci, bpart.shape[0] if bpart is not None else 0,
        MODE=mode, HAS_W=part is not None, HAS_B=bpart is not None, BLOCK_E=block_e, BLOCK_R=32, BLOCK_C=block_c,
    )
    return gw, gb


def fused_backward(
    op: str,
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    out: torch.Tensor,
    saved: torch.Tensor,
    act: str,
    alpha: float,
    gain: float,
    clamp: Optional[float],
    needs: tuple[bool, bool, bool] = (True, True, True),
    split: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(gx, gw, gb) of ``op`` (``conv3x3``, ``conv3x3_pool`` or ``up_conv3x3``), each
    None where ``needs`` says it is not wanted (gb also when ``b`` is None).

    ``out`` is the forward's output; ``saved`` the forward's saved tensor (the int8
    argmax for ``conv3x3_pool``, ignored otherwise). ``split`` forces the number of
    wgrad split slices (default: :func:`wgrad_split`).
    """
    if op not in _MODE:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if act not in _ACT_CODE:
        raise ValueError(f"act: unknown activation {act!r}; expected one of {tuple(_ACT_CODE)}")
    want_x, want_w, want_b = bool(needs[0]), bool(needs[1]), bool(needs[2]) and b is not None
    gx = gw = gb = None
    if not (want_x or want_w or want_b):
        return gx, gw, gb
    _check_int32("x", x)
    _check_int32("grad", grad)
    mode, tensors, geom, scalars, flags = _operands(op, grad, x, w, b, out, saved, act, alpha, gain, clamp)
    n, ci, h, wd = x.shape
    co = w.shape[0]
    precision = _precision(x.dtype, x.device)
    grid = Grid.of(n, h, wd)
    gp, bpart = _launch_gp(mode, tensors, geom, scalars, flags, x, co, grid, with_bias=want_b)

    if op == "conv3x3" and x.device.type == "cuda" and (CUDNN_PARTS["dgrad"] or CUDNN_PARTS["wgrad"]):
        gp_nchw = grid.interior(gp)
        if want_x and CUDNN_PARTS["dgrad"]:
            gx = torch.nn.grad.conv2d_input(x.shape, w, gp_nchw, padding=1).contiguous(memory_format=ref.memory_format_of(x))
            want_x = False
        if want_w and CUDNN_PARTS["wgrad"]:
            gw = torch.nn.grad.conv2d_weight(x, w.shape, gp_nchw, padding=1)
            want_w = False

    if want_x:
        gx = _launch_dgrad(mode, gp, _pack_weight(op, w, x.dtype), x, co, grid, precision)
    part = None
    if want_w:
        cp = _taps_in_n_channels(ci, mode, n * h * wd, grid.rows) if ci < _TAPS_IN_N_BELOW else ci
        part = _launch_wgrad(mode, gp, _launch_pad(x, grid, cp), x, co, grid, precision, split)
    if want_w or want_b:
        gw_f, gb = _launch_finalize(mode, part, bpart if want_b else None, w, b)
        gw = gw_f if want_w else gw
    return gx, gw, gb


def _backward(op, grad, x, w, b, out, saved, act, alpha, gain, clamp, needs):
    needs = (bool(needs[0]), bool(needs[1]), bool(needs[2]) and b is not None)
    if not any(needs):
        return None, None, None
    gx, gw, gb = fused_backward(op, grad, x, w, b, out, saved, act, float(alpha), float(gain), clamp, needs)
    return (gx if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None)


def conv3x3_backward(grad, x, w, b, out, saved, act, alpha, gain, clamp, needs):
    """The ``triton`` backend's ``conv3x3`` backward (see :func:`fused_backward`)."""
    return _backward("conv3x3", grad, x, w, b, out, saved, act, alpha, gain, clamp, needs)


def conv3x3_pool_backward(grad, x, w, b, out, saved, act, alpha, gain, clamp, needs):
    """The ``triton`` backend's ``conv3x3_pool`` backward (see :func:`fused_backward`)."""
    return _backward("conv3x3_pool", grad, x, w, b, out, saved, act, alpha, gain, clamp, needs)


def up_conv3x3_backward(grad, x, w, b, out, saved, act, alpha, gain, clamp, needs):
    """The ``triton`` backend's ``up_conv3x3`` backward (see :func:`fused_backward`)."""
    return _backward("up_conv3x3", grad, x, w, b, out, saved, act, alpha, gain, clamp, needs)


BACKWARDS = {
    "conv3x3": conv3x3_backward,
    "conv3x3_pool": conv3x3_pool_backward,
    "up_conv3x3": up_conv3x3_backward,
}


def register_backwards() -> list[str]:
    """Attach the backward to each op whose ``triton`` forward is registered; returns
    the ops it was attached to."""
    done = []
    for op, fn in BACKWARDS.items():
        if "triton" in registered_backends(op):
            register(op, "triton", dataclasses.replace(get_impl(op, "triton"), backward=fn))
            done.append(op)
    return done


register_backwards()
