"""Triton fused 3×3 convolution, forward: ``conv3x3``, ``conv3x3_pool``, ``up_conv3x3``.

One implicit-GEMM kernel serves the three ops (DESIGN.md §4). A program owns a tile
of BLOCK_M rows (pixels) × BLOCK_N output channels, runs the K loop (taps × input
channels) into an fp32 accumulator with ``tl.dot``, then applies the epilogue (bias,
activation, gain, clamp) in registers before its one store:

* ``conv3x3`` (MODE 0): row = output pixel, 9 taps.
* ``conv3x3_pool`` (MODE 1): the GEMM rows are full-resolution pixels grouped by
  pooling window (each 16-row group holds 4 whole windows), so one accumulator holds
  every window's 4 values; after the epilogue the tile, rounded to the output dtype,
  is reshaped to [windows, Co, dy, dx] and reduced in registers with PyTorch's rule
  (first max wins, NaN wins) by one compare/select chain; only the pooled value and
  the int8 position ``dy*2 + dx`` are written.
* ``up_conv3x3`` (MODE 2): row = low-resolution pixel; each program computes one
  of the 4 output phases (a, c), a 2×2 conv on the low-resolution input with the
  sub-pixel phase kernel (``reference.subpixel_phase_weights``), stored straight into
  pixel (2i+a, 2j+c) of the 2× output; the upsampled tensor never exists (4/9 of the
  FLOPs). Serves Ci < 16 only: wider inputs go to :mod:`gankernels.triton.up_conv3x3`,
  which computes all 4 phases per program from one set of input tiles.

The K loop is one flat, software-pipelined loop. For wide inputs (Ci >= 16) a step is
(tap, BLOCK_K input channels); for narrow ones (Ci < 16, e.g. RGB) the taps and
channels are merged into one K axis of length taps·Ci so no step is mostly padding.
The input is addressed through its four strides, so channels_last, NCHW and
non-contiguous inputs are all read in place (channels_last is the fast one); the
output is written through its strides in x's memory format. Pixel offsets are 64-bit.

Weights are repacked once per parameter version into a K-major matrix
``[taps·Ci, Co]`` (``[3, 3, Ci, Co]``, or ``[2, 2, 2, 2, Ci, Co]`` phase kernels for
the up-conv), in x's dtype, and cached.

Public, stable entry points (the backward family imports them):
:func:`conv3x3_forward`, :func:`conv3x3_pool_forward`, :func:`up_conv3x3_forward`,
each returning ``(out, saved)``; :func:`packed_weight`; :func:`fake_saved_pool`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from typing import Optional

import torch
import triton
import triton.language as tl

from gankernels.ops import reference as ref
from gankernels.ops.dispatch import OpImpl, register
from gankernels.triton.tuning import FamilyTuning
from gankernels.triton.utils import INT32_LIMIT, INTERPRET, MAX_TILE_ROWS, ROW_INDEX_LIMIT, common_reasons, empty, span

__all__ = [
    "conv3x3_forward",
    "conv3x3_pool_forward",
    "up_conv3x3_forward",
    "packed_weight",
    "fake_saved_pool",
    "supports_conv3x3",
    "supports_conv3x3_pool",
    "supports_up_conv3x3",
    "POISON_OUTPUTS",
    "ACT_CODES",
]

ACT_CODES: dict[str, int] = {"linear": 0, "relu": 1, "lrelu": 2, "tanh": 3, "sigmoid": 4, "silu": 5}
"""Activation name -> the kernel's ``ACT`` constexpr."""

MODE_CONV, MODE_POOL, MODE_UP = 0, 1, 2

POISON_OUTPUTS: bool = os.environ.get("GANKERNELS_POISON_OUTPUTS") == "1"
"""Test hook: when true, every output this module allocates is filled with NaN (the
pool argmax with -1) before the launch, so an element the kernel fails to write shows
up in a comparison. Set by the tests (or ``GANKERNELS_POISON_OUTPUTS=1``); costs one
extra write of the output, so leave it off otherwise."""

# Below this many input channels the taps and channels share one K axis.
_FLAT_K_BELOW = 16

# The narrow-input path's gathered input tile has no contiguous dimension (pixels are Ci
# elements apart), so Triton lays its threads out by a tie rule that changed between
# releases: triton 3.6 gives consecutive lanes the first dimension, 3.8 the last (read
# from the TTGIR of both). The tile is loaded with the rows (pixels) on the dimension that
# gets the lanes, so each thread holds one row and all its K columns: one pixel decode and
# one 9-bit tap mask per thread instead of one per element (3.7 not checked; either
# orientation gives the same values).
_LANES_ON_LAST_DIM = tl.constexpr(tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 8))
_INT32_MAX = 2**31 - 1
# Every BLOCK_M divides it: a launch whose M does has no partial row tile (M_ALIGNED).
_MAX_TILE_ROWS = tl.constexpr(MAX_TILE_ROWS)
# Compile-time addressing for dense channels_last tensors (DENSE_CL, conv and pool); a
# test switches it off to compare against the runtime-stride form.
_DENSE_CL = True


# ----------------------------------------------------------------------------------
# The kernel.


@triton.jit
def _tanh(x):
    # tanh without libdevice (portable across Triton versions and the interpreter):
    # sign(x)·(1−e^{−2|x|})/(1+e^{−2|x|}), and the odd Taylor series near 0 where
    # 1−e^{−2|x|} would cancel.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.0625, small, big)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _epilogue(
    p, alpha, gain, clamp, ACT: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_CLAMP: tl.constexpr, LRELU_MAX: tl.constexpr = False
):
    """clip(act(p)·gain, −clamp, clamp) in fp32. Written with comparisons that keep
    NaN (as torch's relu/leaky_relu/clamp do), not with min/max.

    LRELU_MAX (0 < alpha <= 1): the leaky ReLU as max(p, p·alpha), the same bits in two
    instructions instead of three: p·alpha >= p exactly when p < 0 (fp32 rounding keeps
    |p·alpha| <= |p|), −0 stays −0, and a NaN p makes both operands NaN."""
    if ACT == 1:  # relu
        p = tl.where(p < 0.0, 0.0, p)
    elif ACT == 2 and LRELU_MAX:  # lrelu, 0 < alpha <= 1
        p = tl.maximum(p, p * alpha)
    elif ACT == 2:  # lrelu
        p = tl.where(p < 0.0, p * alpha, p)
    elif ACT == 3:  # tanh
        p = _tanh(p)
    elif ACT == 4:  # sigmoid
        p = 1.0 / (1.0 + tl.exp(-p))
    elif ACT == 5:  # silu
        p = p / (1.0 + tl.exp(-p))
    if HAS_GAIN:
        p = p * gain
    if HAS_CLAMP:
        p = tl.where(p > clamp, clamp, tl.where(p < -clamp, -clamp, p))
    return p


@triton.jit
def _decode_rows(m, HB, WB):
    """(image, row, column) of flat pixel indices ``m`` (>= 0) on an N×HB×WB grid, with
    unsigned division (cheaper than signed: the indices are never negative)."""
    um = m.to(tl.uint32)
    hb = HB.to(tl.uint32)
    wb = WB.to(tl.uint32)
    t = um // wb
    return (t // hb).to(tl.int32), (t % hb).to(tl.int32), (um % wb).to(tl.int32)


@triton.jit
def _decode_rows_const(m, HB: tl.constexpr, WB: tl.constexpr):
    """``_decode_rows`` for a grid known at compile time: divisions by constants (shifts
    and masks for powers of two), no runtime division."""
    um = m.to(tl.uint32)
    t = um // WB
    return (t // HB).to(tl.int32), (t % HB).to(tl.int32), (um % WB).to(tl.int32)


@triton.jit
def _tile_rows(offs_m, M, HB, WB, HB_C: tl.constexpr, WB_C: tl.constexpr, M_ALIGNED: tl.constexpr, DENSE_CL: tl.constexpr):
    """A tile's GEMM rows ``offs_m`` on an N×HB×WB grid of M rows: ``(offs_m, m_ok, n, row,
    column)``, rows past M clamped to 0 and masked off. M_ALIGNED (M a multiple of every
    BLOCK_M): no mask. DENSE_CL: the grid is the compile-time HB_C × WB_C (decoding by
    constants)."""
    if M_ALIGNED:
        m_ok = tl.full(offs_m.shape, 1, tl.int1)
    else:
        m_ok = offs_m < M
        offs_m = tl.where(m_ok, offs_m, 0)
    if DENSE_CL:
        bn, bh, bw = _decode_rows_const(offs_m, HB_C, WB_C)
    else:
        bn, bh, bw = _decode_rows(offs_m, HB, WB)
    return offs_m, m_ok, bn, bh, bw


@triton.jit
def _widen(v):
    """``v`` (the output dtype) exactly in fp32, to pool with fp32 compares and selects.
    For bf16 by the bit shift, which LLVM does not fold back into bf16x2 compares: those
    need a byte permute per selected half and keep ptxas short of predicate registers."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def _pool_step(best, best_q, v, q: tl.constexpr):
    # PyTorch's max-pool rule, in scan order: take v if v > best or v is NaN. Starting
    # from the first value, this makes the first max win and the last NaN win.
    take = (v > best) | (v != v)
    return tl.where(take, v, best), tl.where(take, q, best_q)


# N, H, W and the derived sizes change from layer to layer; specialising on them (==1,
# divisible by 16) would only multiply compilations. The channel counts come twice: as
# compile-time constants CI, CO (each layer has its own anyway, and they are in the
# autotune key), so the tap decoding costs no division and the channel and output masks
# vanish when the tiles divide them; and as the runtime Ci, Co, for the K loop's trip
# count only: a constant one that small (9–18 steps) makes ptxas unroll the loop fully,
# a several times larger kernel, no cheaper per step. Strides stay specialised (vector loads).
@triton.jit(do_not_specialize=["N", "H", "W", "HB", "WB", "M"])
def _conv3x3_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    idx_ptr,
    N,
    H,
    W,
    Ci,
    Co,
    HB,
    WB,
    M,
    sxn,
    sxc,
    sxh,
    sxw,
    son,
    soc,
    soh,
    sow,
    alpha,
    gain,
    clamp,
    CI: tl.constexpr,
    CO: tl.constexpr,
    MODE: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_IN_K: tl.constexpr,
    HAS_GAIN: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    LRELU_MAX: tl.constexpr,
    FLAT_K: tl.constexpr,
    X_INT32: tl.constexpr,
    OUT_INT32: tl.constexpr,
    OUT_DENSE_ROWS: tl.constexpr,
    M_ALIGNED: tl.constexpr,
    DENSE_CL: tl.constexpr,
    H_C: tl.constexpr,
    W_C: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Tap geometry: KT×KT taps (the 3×3 kernel, or the up-conv's 2×2 phase kernels).
    if MODE == 2:
        KT: tl.constexpr = 2
    else:
        KT: tl.constexpr = 3
    T: tl.constexpr = KT * KT
    KTOT: tl.constexpr = T * CI  # rows of one sub-problem's packed weight matrix
    # The bias rides in K's padding where the merged K axis has one (see BIAS_IN_K at the
    # launch; the up-conv's 4·Ci can fill its steps exactly).
    if BIAS_IN_K:
        BIAS_K: tl.constexpr = KTOT % BLOCK_K != 0
    else:
        BIAS_K: tl.constexpr = False
    EVEN_N: tl.constexpr = CO % BLOCK_N == 0
    # M_ALIGNED: M is a multiple of every BLOCK_M, so no tile has rows past M (no row
    # masks). DENSE_CL (conv and pool): x and out are dense channels_last and the image
    # size is the compile-time H_C × W_C, so the grid decoding divides by constants and
    # every stride is a constant: the narrow path's input loads sit at immediate offsets
    # from one pointer, the wide path's steps add constants, and output rows sit m·CO apart.
    if M_ALIGNED:
        tl.static_assert(_MAX_TILE_ROWS % BLOCK_M == 0)
    # The compile-time grid (0 without DENSE_CL): pooled pixels for the pool.
    if MODE == 1:
        HB_C: tl.constexpr = H_C // 2
        WB_C: tl.constexpr = W_C // 2
    else:
        HB_C: tl.constexpr = H_C
        WB_C: tl.constexpr = W_C
    if DENSE_CL:
        tl.static_assert(MODE != 2, "DENSE_CL is the conv and pool kernels' addressing")
        SXC: tl.constexpr = 1
        SXW: tl.constexpr = CI
        SXH: tl.constexpr = W_C * CI
        SXN: tl.constexpr = H_C * W_C * CI

    # Program order: Co tiles fastest, then (up-conv) the 4 output phases, then pixel
    # tiles, so the programs that read one tile of input pixels run together. Phases
    # are separate programs, not a loop: the deep, narrow-M layers (512→256 at 8×8)
    # need the parallelism.
    pid = tl.program_id(0)
    num_n: tl.constexpr = (CO + BLOCK_N - 1) // BLOCK_N
    pid_n = pid % num_n
    rest = pid // num_n
    if MODE == 2:
        q = rest % 4  # output phase (a, c) = (q // 2, q % 2)
        pid_m = rest // 4
    else:
        q = 0
        pid_m = rest

    # Rows in 32 bits: the host keeps M + BLOCK_M below 2^31 (utils.ROW_INDEX_LIMIT).
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < CO
    if MODE == 1:
        # Rows are full-resolution pixels, 4 per pooling window. In-tile row r holds window
        # (r // 16)·4 + (r // 2) % 4 of the tile, dy = bit 0, dx = bit 3: bit 3 is the one
        # row bit an MMA accumulator (sm_80 mma and sm_90 wgmma alike: row = lane/4 + 8·reg
        # within a warp's 16 rows) keeps in a thread's registers, so dx is split off in-thread.
        BLOCK_P: tl.constexpr = BLOCK_M // 4
        tl.static_assert(BLOCK_M % 16 == 0, "the pooled conv needs BLOCK_M to be a multiple of 16")
        # Decoded from the global row index, unsigned (shifts and masks, no signed division):
        # tiles start at multiples of 16, so its bit fields are the in-tile ones.
        r = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.uint32)
        row_p = (((r >> 4) << 2) | ((r >> 1) & 3)).to(tl.int32)  # the row's pooled pixel
        row_p, m_ok, bn, bh, bw = _tile_rows(row_p, M // 4, HB, WB, HB_C, WB_C, M_ALIGNED, DENSE_CL)
        ch = bh * 2 + (r & 1).to(tl.int32)  # dy: row bit 0
        cw = bw * 2 + ((r >> 3) & 1).to(tl.int32)  # dx: row bit 3
    else:
        # Rows are output pixels (conv) or low-resolution pixels (up-conv).
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_m, m_ok, bn, bh, bw = _tile_rows(offs_m, M, HB, WB, HB_C, WB_C, M_ALIGNED, DENSE_CL)
        ch = bh
        cw = bw
    ar_k = tl.arange(0, BLOCK_K)

    if HAS_BIAS and not BIAS_K:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)

    # The input pixel of tap (0, 0) is (ih0, iw0) = (oh − 1, ow − 1): the 3×3 conv around
    # (ch, cw), or phase (a, c) reading low-resolution rows i − 1 + a + tr, columns j − 1 + c + tc.
    if MODE == 2:
        ih0 = ch + q // 2 - 1
        iw0 = cw + q % 2 - 1
        w_q = w_ptr + q * (KTOT * CO)  # this phase's packed kernel
    else:
        ih0 = ch - 1
        iw0 = cw - 1
        w_q = w_ptr
    # Each row's offset to its pixel (ih0, iw0): from x_ptr in 32 bits when x spans less
    # than 2^31 elements, else from the row's own image (64-bit base, 32-bit in-image offset).
    if DENSE_CL and X_INT32:
        a_base = x_ptr
        row_off = bn * SXN + ih0 * SXH + iw0 * SXW
    elif DENSE_CL:
        a_base = x_ptr + bn.to(tl.int64) * SXN
        row_off = ih0 * SXH + iw0 * SXW
    elif X_INT32:
        a_base = x_ptr
        row_off = bn * sxn + ih0 * sxh + iw0 * sxw
    else:
        a_base = x_ptr + bn.to(tl.int64) * sxn
        row_off = ih0 * sxh + iw0 * sxw

    # Bit tr·KT + tc of a row's mask: tap (tr, tc) reads inside the image (0 for rows
    # past M). Computed once, so a step tests one bit per row instead of four bounds.
    if DENSE_CL:
        H_IN = H_C
        W_IN = W_C
    else:
        H_IN = H
        W_IN = W
    tap_ok = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for dr in tl.static_range(KT):
        for dc in tl.static_range(KT):
            inside = m_ok & (ih0 + dr >= 0) & (ih0 + dr < H_IN) & (iw0 + dc >= 0) & (iw0 + dc < W_IN)
            tap_ok = tap_ok | (inside.to(tl.int32) << (dr * KT + dc))

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Taps and channels share one K axis (Ci < 16): K index kk = tap·Ci + ci.
        N_STEPS: tl.constexpr = (KTOT + BLOCK_K - 1) // BLOCK_K
        for s in range(N_STEPS):
            kk = s * BLOCK_K + ar_k  # [BLOCK_K] rows of the packed weight
            k_ok = kk < KTOT
            tap = tl.where(k_ok, kk // CI, T)  # T: no bit of tap_ok (and a shift < 32)
            ci = kk - (kk // CI) * CI
            tr = tap // KT
            tc = tap - tr * KT
            if CI > 1 and CI & (CI - 1) == 0:
                # ci·sxc is contiguous along K in runs of CI when the channel stride is 1, and
                # Triton would then give K the lanes (many rows per thread, 6.5 KB of spills at
                # Ci = 8). `one` (N >= 1 on every launch) hides that from its analysis.
                one = (N > 0).to(tl.int32)
                if DENSE_CL:
                    k_off = tr * SXH + tc * SXW + ci * one
                else:
                    k_off = tr * sxh + tc * sxw + ci * (sxc * one)
            elif DENSE_CL:
                k_off = tr * SXH + tc * SXW + ci * SXC  # a constant per register
            else:
                k_off = tr * sxh + tc * sxw + ci * sxc
            # Rows on the dimension Triton gives the lanes (see _LANES_ON_LAST_DIM). A K column
            # past KTOT has tap T, a bit no mask has. The row's pointer first, then the K
            # offsets: constant ones fold into the loads' immediates.
            row_ptr = a_base + row_off
            if _LANES_ON_LAST_DIM:
                a_ok = ((tap_ok[None, :] >> tap[:, None]) & 1) != 0
                a = tl.trans(tl.load(row_ptr[None, :] + k_off[:, None], mask=a_ok, other=0.0))
            else:
                a_ok = ((tap_ok[:, None] >> tap[None, :]) & 1) != 0
                a = tl.load(row_ptr[:, None] + k_off[None, :], mask=a_ok, other=0.0)
            b_ptrs = w_q + kk[:, None] * CO + offs_n[None, :]
            if BIAS_K:
                # The bias as one more product, in the padding of K: column KTOT of A is 1,
                # row KTOT of B the bias (x's dtype: 1·b is exact in the fp32 sum).
                is_bias = kk == KTOT
                a = tl.where(is_bias[None, :], 1.0, a).to(a.dtype)
                b_ptrs = tl.where(is_bias[:, None], b_ptr + offs_n[None, :], b_ptrs)
                bmat = tl.load(b_ptrs, mask=(k_ok | is_bias)[:, None] & n_ok[None, :], other=0.0)
            else:
                bmat = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, bmat, acc, input_precision=PRECISION)
    else:
        # A step is (tap, BLOCK_K input channels): tap = s // K_CHUNKS.
        K_CHUNKS: tl.constexpr = (CI + BLOCK_K - 1) // BLOCK_K
        EVEN_K: tl.constexpr = CI % BLOCK_K == 0
        # Loop-invariant offsets of the [BLOCK_M, BLOCK_K] input and [BLOCK_K, BLOCK_N]
        # weight tiles: a step only adds a scalar to each.
        a_off = row_off[:, None] + (ar_k * sxc)[None, :]
        b_off = ar_k[:, None] * CO + offs_n[None, :]
        for s in range(T * tl.cdiv(Ci, BLOCK_K)):  # = T·K_CHUNKS, from the runtime Ci (see above)
            tap = s // K_CHUNKS
            ci0 = (s - tap * K_CHUNKS) * BLOCK_K
            tr = tap // KT
            tc = tap - tr * KT
            row_in = (tap_ok & (1 << tap)) != 0
            if EVEN_K:
                a_ok = row_in[:, None]
                w_k_ok = None
            else:
                k_ok = ci0 + ar_k < CI
                a_ok = row_in[:, None] & k_ok[None, :]
                w_k_ok = k_ok[:, None]
            if DENSE_CL:
                tap_off = tr * SXH + tc * SXW + ci0
            else:
                tap_off = tr * sxh + tc * sxw + ci0 * sxc
            a = tl.load(a_base + tap_off + a_off, mask=a_ok, other=0.0)
            b_ptrs = w_q + (tap * CI + ci0) * CO + b_off
            if EVEN_K and EVEN_N:
                bmat = tl.load(b_ptrs)
            elif EVEN_K:
                bmat = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            elif EVEN_N:
                bmat = tl.load(b_ptrs, mask=w_k_ok, other=0.0)
            else:
                bmat = tl.load(b_ptrs, mask=w_k_ok & n_ok[None, :], other=0.0)
            acc = tl.dot(a, bmat, acc, input_precision=PRECISION)

    if HAS_BIAS and not BIAS_K:
        acc = acc + bias[None, :]
    y = _epilogue(acc, alpha, gain, clamp, ACT, HAS_GAIN, HAS_CLAMP, LRELU_MAX)

    if MODE != 1:
        if MODE == 0:
            yh = ch
            yw = cw
        else:
            yh = ch * 2 + q // 2
            yw = cw * 2 + q % 2
        if DENSE_CL and OUT_INT32:  # dense channels_last: the row's offset is m·CO
            o_ptrs = out_ptr + (offs_m * CO)[:, None] + offs_n[None, :]
        elif DENSE_CL:
            o_ptrs = out_ptr + (offs_m.to(tl.int64) * CO)[:, None] + offs_n[None, :]
        elif OUT_DENSE_ROWS:  # the row's offset is m·sow: no (image, row, column) decoding
            if OUT_INT32:
                o_ptrs = out_ptr + (offs_m * sow)[:, None] + (offs_n * soc)[None, :]
            else:
                o_ptrs = out_ptr + (offs_m.to(tl.int64) * sow)[:, None] + (offs_n.to(tl.int64) * soc)[None, :]
        elif OUT_INT32:  # the output spans < 2^31 elements: 32-bit offsets
            o_ptrs = out_ptr + (bn * son + yh * soh + yw * sow)[:, None] + (offs_n * soc)[None, :]
        else:
            o_row = bn.to(tl.int64) * son + yh.to(tl.int64) * soh + yw.to(tl.int64) * sow
            o_ptrs = out_ptr + o_row[:, None] + (offs_n.to(tl.int64) * soc)[None, :]
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    if MODE == 1:
        # Pool the values as they are stored: rounded to the output dtype first, so values
        # that tie only after rounding pool as F.max_pool2d pools the rounded conv output.
        y = y.to(out_ptr.dtype.element_ty)
        # The rows of a tile are (r // 16, dx, (r // 2) % 4, dy): [BM/16, dx, 4, dy, N] ->
        # [BM/16, 4, N, dy, dx], then split out the 4 window values. dx splits in-thread;
        # dy sits on a lane bit, so the tile (output dtype) goes through shared memory once
        # to a layout with whole windows per thread: cheaper than a cross-lane reduction,
        # where 2 lanes would share each window (`python -m gankernels.bench static`;
        # benchmarks/NOTES.md, step 6).
        y5 = tl.permute(tl.reshape(y, (BLOCK_M // 16, 2, 4, 2, BLOCK_N)), (0, 2, 4, 3, 1))
        y_dx0, y_dx1 = tl.split(y5)
        y00, y10 = tl.split(y_dx0)
        y01, y11 = tl.split(y_dx1)
        y00 = _widen(y00)
        y01 = _widen(y01)
        y10 = _widen(y10)
        y11 = _widen(y11)
        best, best_q = _pool_step(y00, tl.zeros(y00.shape, tl.int32), y01, 1)
        best, best_q = _pool_step(best, best_q, y10, 2)
        best, best_q = _pool_step(best, best_q, y11, 3)
        best = tl.reshape(best, (BLOCK_P, BLOCK_N))
        best_q = tl.reshape(best_q, (BLOCK_P, BLOCK_N))

        offs_p = pid_m * BLOCK_P + tl.arange(0, BLOCK_P)
        if M_ALIGNED:
            p_ok = tl.full((BLOCK_P,), 1, tl.int1)
        else:
            p_ok = offs_p < M // 4
            offs_p = tl.where(p_ok, offs_p, 0)
        if DENSE_CL and OUT_INT32:  # dense channels_last: the pooled pixel's offset is p·CO
            o_row = offs_p * CO
        elif DENSE_CL:
            o_row = offs_p.to(tl.int64) * CO
        elif OUT_DENSE_ROWS:  # the pooled pixel's offset is p·sow: no decoding
            if OUT_INT32:
                o_row = offs_p * sow
            else:
                o_row = offs_p.to(tl.int64) * sow
        else:
            pn, ph, pw = _decode_rows(offs_p, HB, WB)
            if OUT_INT32:
                o_row = pn * son + ph * soh + pw * sow
            else:
                o_row = pn.to(tl.int64) * son + ph.to(tl.int64) * soh + pw.to(tl.int64) * sow
        if OUT_INT32:
            o_off = o_row[:, None] + (offs_n * soc)[None, :]
        else:
            o_off = o_row[:, None] + (offs_n.to(tl.int64) * soc)[None, :]
        o_mask = p_ok[:, None] & n_ok[None, :]
        tl.store(out_ptr + o_off, best.to(out_ptr.dtype.element_ty), mask=o_mask)
        # Store the codes with the values' vector width (16 bytes of values per thread): with
        # their own (16 int8 per thread) Triton gives the two stores two layouts and pulls
        # each back through the chain above, computing it twice. Written so, the channel
        # offsets are offs_n, but the contiguity analysis sees runs of Q_VEC (a true bound:
        # tiles start at multiples of BLOCK_N >= Q_VEC), so both stores take one layout.
        Q_VEC: tl.constexpr = 128 // out_ptr.dtype.element_ty.primitive_bitwidth
        offs_nq = (offs_n // Q_VEC) * Q_VEC + offs_n % Q_VEC
        if OUT_INT32:
            q_off = o_row[:, None] + (offs_nq * soc)[None, :]
        else:
            q_off = o_row[:, None] + (offs_nq.to(tl.int64) * soc)[None, :]
        tl.store(idx_ptr + q_off, best_q.to(tl.int8), mask=o_mask)


# ----------------------------------------------------------------------------------
# Tuning: a small space per GPU family, keyed on the problem's shape and dtype (the
# autotuner adds the dtypes of tensor arguments to the key itself).

_TUNE_KEY = ["MODE", "N", "Ci", "Co", "H", "W", "FLAT_K", "PRECISION"]


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Hopper (sm_90): 228 KB of shared memory per SM, deep pipelines affordable. Ordered by
# the static issue load of the ANCHORS rows (`python -m gankernels.bench static
# --all-configs`): a 64- or 32-wide N tile needs a longer step (BLOCK_K 128, BLOCK_M 256)
# to keep the per-step cost of the input tile's masked copies below the tensor time.
_CONFIGS_HOPPER = [
    _cfg(128, 128, 64, 8, 3),  # 96 KB of pipeline and <= 128 registers: 2 CTAs per SM
    _cfg(128, 64, 128, 4, 3),  # Co = 64 (up-conv 128→64: load 0.46 where 128×64×64 has 0.58)
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 256, 64, 8, 3),  # load 0.25, but ~220-240 registers and 1 CTA per SM
    # Narrow inputs (RGB): one 32-deep K step covers 9·Ci. 128 rows on 4 warps: the input
    # tile, loaded K-major, puts one row and all 32 K columns in each thread (static
    # report: 760 instructions per warp for 128×64 outputs, where 64×64×32 w4 takes 1056).
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 64, 32, 4, 4),
    _cfg(128, 64, 32, 8, 2),
    _cfg(256, 32, 64, 4, 3),  # narrow outputs (Co <= 32: up-conv 64→32 load 0.92 where 128×32×64 has 1.20)
    _cfg(128, 32, 64, 4, 4),
    _cfg(256, 32, 32, 8, 3),
]
# Ampere (sm_80/86) and anything else: 164 KB (sm_80) or 100 KB (sm_86) of shared memory.
_CONFIGS_AMPERE = [
    _cfg(128, 128, 32, 8, 4),
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(128, 128, 64, 8, 3),
    _cfg(64, 64, 32, 4, 4),
    _cfg(128, 64, 32, 8, 2),
    _cfg(128, 32, 32, 4, 4),
    _cfg(256, 32, 32, 8, 3),
]
_SMEM_LIMIT = {"hopper": 227 * 1024, "ampere": 160 * 1024}
# The interpreter: one fixed small configuration (tuning is meaningless there).
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def _smem_bytes(c: triton.Config, elsize: int) -> int:
    kw = c.kwargs
    return c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * elsize


def _prune_configs(configs, named_args, smem_limit: int = _SMEM_LIMIT["ampere"], **kwargs):
    """Drop configurations that cannot pay off, before compiling them: tiles far
    larger than the problem (BLOCK_N beyond Co; BLOCK_K beyond Ci when channels are
    chunked per tap, beyond taps·Ci when they are merged), 32-wide N tiles when
    Co >= 128, and pipelines that overflow shared memory (fp32 at 128×128×64).
    Always keeps at least one. Merged-K tiles of more than 64 rows go last when the
    output is not channels_last: its rows are then decoded per thread in the store's
    layout (64 of them at 128 rows, 254 registers), where a channels_last output is
    written at m·stride(3)."""
    co, ci = named_args["Co"], named_args["Ci"]
    flat = kwargs.get("FLAT_K", named_args.get("FLAT_K", False))
    elsize = named_args["x_ptr"].element_size()
    max_n = max(32, triton.next_power_of_2(co))
    min_n = 64 if co >= 128 else 16  # a 32-wide tile re-reads the input Co/32 times
    taps = 4 if kwargs.get("MODE", named_args.get("MODE")) == MODE_UP else 9
    max_k = max(32, triton.next_power_of_2(taps * ci if flat else ci))
    kept = [
        c
        for c in configs
        if min_n <= c.kwargs["BLOCK_N"] <= max_n and c.kwargs["BLOCK_K"] <= max_k and _smem_bytes(c, elsize) <= smem_limit
    ]
    if not kept:
        smallest = min(configs, key=lambda c: _smem_bytes(c, elsize))
        kept = [triton.Config(dict(smallest.kwargs), num_warps=smallest.num_warps, num_stages=2)]
    out = named_args.get("out_ptr")
    if flat and out is not None and out.dim() == 4 and out.stride(1) != 1:
        kept.sort(key=lambda c: c.kwargs["BLOCK_M"] > 64)  # stable: list order otherwise
    return kept


AUTOTUNE: bool = os.environ.get("GANKERNELS_TRITON_AUTOTUNE", "1") != "0"
"""When false (``GANKERNELS_TRITON_AUTOTUNE=0``), the conv kernels launch the first
configuration of their list that survives pruning instead of autotuning: one compilation
per kernel variant (the GPU correctness tests use this to stay fast)."""

_TUNING = FamilyTuning(
    _conv3x3_fwd_kernel, _TUNE_KEY, {"hopper": _CONFIGS_HOPPER, "ampere": _CONFIGS_AMPERE}, _prune_configs, _SMEM_LIMIT
)


# ----------------------------------------------------------------------------------
# Weight repacking, cached per parameter version.

_PACK_CACHE_SIZE = 64
_pack_cache: OrderedDict[tuple, tuple[weakref.ref, torch.Tensor]] = OrderedDict()
_pack_lock = threading.Lock()


@triton.jit
def _phase_tap(
    w_ptr, base, swh, sww, mask, A: tl.constexpr, TR: tl.constexpr, C: tl.constexpr, TC: tl.constexpr, ACC: tl.constexpr
):
    """Phase (A, C)'s tap (TR, TC): the sum of the 3×3 taps it covers (DESIGN.md §4: along
    an axis phase 0 uses (w0, w1+w2), phase 1 (w0+w1, w2)), summed in ACC."""
    # Rows [K_LO, K_HI] of the 3×3 kernel: phase 0 tap 0 -> [0, 0], tap 1 -> [1, 2];
    # phase 1 tap 0 -> [0, 1], tap 1 -> [2, 2]. Columns likewise.
    K_LO: tl.constexpr = (1 + A) * TR
    K_HI: tl.constexpr = A + (2 - A) * TR
    L_LO: tl.constexpr = (1 + C) * TC
    L_HI: tl.constexpr = C + (2 - C) * TC
    # Rows summed first, then columns: the reference's order, so both give the same bits.
    total = tl.zeros(base.shape, ACC)
    for l in tl.static_range(L_LO, L_HI + 1):
        col = tl.zeros(base.shape, ACC)
        for k in tl.static_range(K_LO, K_HI + 1):
            col += tl.load(w_ptr + base + k * swh + l * sww, mask=mask, other=0.0).to(ACC)
        total += col
    return total


@triton.jit
def _repack_phases_kernel(
    w_ptr,
    out_ptr,
    Ci,
    Co,
    swo,
    swi,
    swh,
    sww,
    ACC: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    """out[a, c, tr, tc, ci, co] (contiguous ``[16·Ci, Co]``) = phase (a, c)'s tap (tr, tc)
    of ``w[co, ci, 3, 3]``, summed in ACC (fp32, fp64 for fp64 weights) and rounded once
    to out's dtype. One program per (Ci, Co) tile reads its 9 taps and writes all 16.

    PAIRS: the row-pair layout instead, out[c, tc, tr, ci, 1 − a, co] (``[8·Ci, 2·Co]``): the
    same 16 values, the two phase rows side by side along N (phase row 1 first: output rows
    2r − 1 and 2r read the same two input rows, with phase rows 1 and 0)."""
    offs_ci = tl.program_id(0) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask = (offs_ci < Ci)[:, None] & (offs_co < Co)[None, :]
    base = offs_ci[:, None] * swi + offs_co[None, :] * swo  # [ci, co]: out's row order
    o_tile = offs_ci[:, None] * Co + offs_co[None, :]
    for a in tl.static_range(2):
        for c in tl.static_range(2):
            for tr in tl.static_range(2):
                for tc in tl.static_range(2):
                    v = _phase_tap(w_ptr, base, swh, sww, mask, a, tr, c, tc, ACC)
                    if PAIRS:
                        rows = ((c * 2 + tc) * 2 + tr) * Ci + offs_ci
                        o_ptrs = out_ptr + rows[:, None] * (2 * Co) + ((1 - a) * Co + offs_co)[None, :]
                    else:
                        o_ptrs = out_ptr + (((a * 2 + c) * 2 + tr) * 2 + tc) * Ci * Co + o_tile
                    tl.store(o_ptrs, v.to(out_ptr.dtype.element_ty), mask=mask)


def _pack(w: torch.Tensor, dtype: torch.dtype, phases: bool, pairs: bool = False) -> torch.Tensor:
    w = w.detach()
    co, ci = w.shape[0], w.shape[1]
    if phases and (w.device.type != "cpu" or INTERPRET):
        # One kernel (not the ~20 small ops of the reference formula): this repack runs
        # after every optimizer step, and on every call under autocast (a new weight copy).
        shape = (8 * ci, 2 * co) if pairs else (16 * ci, co)
        out = torch.empty(shape, dtype=dtype, device=w.device)
        acc = tl.float64 if w.dtype == torch.float64 else tl.float32
        grid = (triton.cdiv(ci, 32), triton.cdiv(co, 32))
        _repack_phases_kernel[grid](w, out, ci, co, *w.stride(), ACC=acc, PAIRS=pairs, BLOCK_CI=32, BLOCK_CO=32)
        return out
    if phases:
        # Phase kernels summed in fp32 (fp64 if w is fp64), then cast once.
        acc_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        pw = ref.subpixel_phase_weights(w.to(acc_dtype))  # [a, c, Co, Ci, tr, tc]
        packed = pw.permute(0, 1, 4, 5, 3, 2)  # [a, c, tr, tc, Ci, Co]
        if pairs:  # [c, tc, tr, Ci, 1 - a, Co]
            return packed.flip(0).permute(1, 3, 2, 4, 0, 5).to(dtype).contiguous().reshape(8 * ci, 2 * co)
    else:
        packed = w.permute(2, 3, 1, 0)  # [kh, kw, Ci, Co]
    return packed.to(dtype).contiguous().reshape(-1, co)


def packed_weight(w: torch.Tensor, dtype: torch.dtype, phases: bool = False, pairs: bool = False) -> torch.Tensor:
    """``w`` [Co, Ci, 3, 3] as the kernel's K-major matrix in ``dtype``:
    ``[9·Ci, Co]`` (rows ordered kh, kw, ci) or, with ``phases``, the 16 sub-pixel
    phase taps ``[16·Ci, Co]`` (rows ordered a, c, tr, tc, ci); with ``phases`` and
    ``pairs``, the same taps as the row-pair layout ``[8·Ci, 2·Co]`` (rows ordered c, tc,
    tr, ci; columns 1 − a, co): what :mod:`gankernels.triton.up_conv3x3_pairs` reads.

    Cached per parameter version: the key is (data_ptr, ``_version``, dtype, device,
    shape, phases), and a hit also requires the cached entry's tensor to be this very
    tensor (a weak reference), so a new tensor that happens to reuse a freed one's
    memory — e.g. the per-call bf16 copy autocast makes — is never served stale
    weights. An in-place update (optimizer step) bumps ``_version`` and repacks.

    Never cached during CUDA-graph capture: the repack must be recorded in the graph,
    or every replay would run on the weights as they were when captured (an optimizer
    step between replays changes them in place without the host seeing it)."""
    if pairs and not phases:
        raise ValueError("pairs: the phase-pair layout is a layout of the phase taps; pass phases=True with it")
    if w.is_cuda and torch.cuda.is_current_stream_capturing():
        return _pack(w, dtype, phases, pairs)
    key = (w.data_ptr(), w._version, dtype, w.dtype, w.device, tuple(w.shape), bool(phases), bool(pairs))
    with _pack_lock:
        hit = _pack_cache.get(key)
        if hit is not None and hit[0]() is w:
            _pack_cache.move_to_end(key)
            return hit[1]
    packed = _pack(w, dtype, phases, pairs)
    try:
        wref = weakref.ref(w)
    except TypeError:  # some tensor subclasses are not weak-referenceable: no caching
        return packed
    with _pack_lock:
        _pack_cache[key] = (wref, packed)
        _pack_cache.move_to_end(key)
        while len(_pack_cache) > _PACK_CACHE_SIZE:
            _pack_cache.popitem(last=False)
    return packed


def clear_weight_cache() -> None:
    """Forget every repacked weight (e.g. to release memory)."""
    with _pack_lock:
        _pack_cache.clear()


# ----------------------------------------------------------------------------------
# Support checks.


def _shape_reasons(op: str, x: torch.Tensor, w: torch.Tensor) -> list[str]:
    reasons = []
    n, ci, h, wd = x.shape
    co = w.shape[0]
    if op == "conv3x3_pool" and (h < 2 or wd < 2):
        reasons.append(f"x: spatial size {h}×{wd} is smaller than the 2×2 pooling window (the pooled output would be empty)")
    if 16 * ci * co > _INT32_MAX:
        reasons.append(f"w: {co}×{ci} channels are too many for the packed weight's 32-bit indexing")
    rows = n * h * wd  # GEMM rows (pool: 4 per pooled pixel, at most N·H·W)
    if rows > ROW_INDEX_LIMIT:
        reasons.append(
            f"x: N·H·W = {rows} pixels exceeds the kernel's 32-bit pixel index (at most 2^31 − 1 − {MAX_TILE_ROWS}, "
            "so the last tile's rows do not wrap); split the batch"
        )
    if ci == 0 or co == 0 or n == 0:
        reasons.append("x/w: empty channel or batch dimension; use backend='torch'")
    if h == 0 or wd == 0:
        reasons.append(f"x: empty image ({h}×{wd}); use backend='torch'")
    if x.device.type == "cuda":
        # get_device_properties, not get_device_capability: torch.compile constant-folds it.
        props = torch.cuda.get_device_properties(x.device)
        major, minor = props.major, props.minor
        if major < 7:
            reasons.append(f"the GPU (sm_{major}{minor}) is older than sm_70; Triton's tl.dot needs tensor cores")
        elif x.dtype == torch.bfloat16 and major < 8:
            reasons.append(f"bfloat16 needs sm_80 or newer, this GPU is sm_{major}{minor}")
    return reasons


def _supports(op: str):
    def supports(x, w, b=None, act="linear", alpha=0.2, gain=1.0, clamp=None, **_):
        why = common_reasons(x, w=w, b=b)
        if x.dim() != 4 or w.dim() != 4:
            return why + ["x and w must be 4-D"]
        return why + _shape_reasons(op, x, w)

    supports.__name__ = f"supports_{op}"
    supports.__doc__ = f"Every reason the Triton backend cannot run ``{op}`` on these arguments (empty: it can)."
    return supports


supports_conv3x3 = _supports("conv3x3")
supports_conv3x3_pool = _supports("conv3x3_pool")
supports_up_conv3x3 = _supports("up_conv3x3")


# ----------------------------------------------------------------------------------
# Launch.


def _precision(x: torch.Tensor) -> str:
    # TF32 for fp32 exactly when cuDNN would use it; the interpreter is always exact.
    if x.dtype == torch.float32 and not INTERPRET and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _empty_out(shape: tuple, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return empty(POISON_OUTPUTS, shape, dtype=dtype or like.dtype, device=like.device, memory_format=ref.memory_format_of(like))


def _dense_rows(out: torch.Tensor) -> bool:
    """Whether ``out``'s pixels sit one ``stride(3)`` apart in (image, row, column) order, so
    pixel m's offset is m·stride(3) (channels_last output; NCHW has stride(3) = 1 but
    images Co·H·W apart)."""
    n_, _, h, w = out.shape
    sn, _, sh, sw = out.stride()
    return (h == 1 or sh == w * sw) and (n_ == 1 or sn == h * w * sw)


def _dense_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` [N, C, H, W] has the strides of a dense channels_last tensor (dims of
    size 1 excepted: their index is always 0), which is PyTorch's own channels_last
    contiguity test (one C++ call: this runs on every launch)."""
    return t.is_contiguous(memory_format=torch.channels_last)


def _addressing_consts(x: torch.Tensor, out: torch.Tensor, m: int, dense_ok: bool = True) -> dict:
    """The compile-time addressing flags of the conv kernels for ``m`` GEMM rows: M_ALIGNED
    (m a multiple of every BLOCK_M: no row masks) and, where ``dense_ok`` and x and out are
    dense channels_last, DENSE_CL with the image size H_C × W_C (one compilation per image
    size, which the tuning keys (H, W) have anyway)."""
    dense = _DENSE_CL and dense_ok and _dense_channels_last(x) and _dense_channels_last(out)
    h, w = (x.shape[2], x.shape[3]) if dense else (0, 0)
    return {"M_ALIGNED": m % MAX_TILE_ROWS == 0, "DENSE_CL": dense, "H_C": h, "W_C": w}


def _checked_sizes(x: torch.Tensor, w: torch.Tensor, act: str) -> tuple[int, int, int, int, int]:
    """``(N, Ci, H, W, Co)`` of a 3×3 call, after the checks every conv launcher makes."""
    if act not in ACT_CODES:
        raise ValueError(f"act: unknown activation {act!r}; expected one of {tuple(ACT_CODES)}")
    n, ci, h, wd = x.shape
    co = w.shape[0]
    if w.shape[1] != ci:
        raise ValueError(f"w: has {w.shape[1]} input channels but x has {ci}")
    return n, ci, h, wd, co


def _bias_arg(b: Optional[torch.Tensor], x: torch.Tensor, dummy: torch.Tensor) -> torch.Tensor:
    """The bias in x's dtype, or ``dummy`` (any valid pointer: the kernel reads no bias)."""
    return b.detach().to(x.dtype).contiguous() if b is not None else dummy


def _epilogue_args(alpha: float, gain: float, clamp: Optional[float]) -> tuple[float, float, float]:
    """The epilogue's runtime scalars (alpha, gain, clamp; clamp 0 when off)."""
    return float(alpha), float(gain), float(clamp if clamp is not None else 0.0)


def _epilogue_consts(
    x: torch.Tensor, out: torch.Tensor, b: Optional[torch.Tensor], act: str, gain: float, clamp: Optional[float]
) -> dict:
    """The compile-time flags every conv kernel's epilogue and addressing take."""
    return dict(
        ACT=ACT_CODES[act],
        HAS_BIAS=b is not None,
        HAS_GAIN=float(gain) != 1.0,
        HAS_CLAMP=clamp is not None,
        X_INT32=span(x) <= INT32_LIMIT,
        OUT_INT32=span(out) <= INT32_LIMIT,
        PRECISION=_precision(x),
    )


def _launch(
    mode: int,
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    act: str,
    alpha: float,
    gain: float,
    clamp: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    n, ci, h, wd, co = _checked_sizes(x, w, act)
    if mode == MODE_CONV:
        hb, wb, out_shape = h, wd, (n, co, h, wd)
    elif mode == MODE_POOL:
        hb, wb, out_shape = h // 2, wd // 2, (n, co, h // 2, wd // 2)
    else:
        hb, wb, out_shape = h, wd, (n, co, 2 * h, 2 * wd)
    out = _empty_out(out_shape, x)
    idx = _empty_out(out_shape, x, torch.int8) if mode == MODE_POOL else x.new_empty((0,))
    # GEMM rows: output pixels, low-res pixels (up-conv), or pooled pixels × 4 window positions.
    m = n * hb * wb * (4 if mode == MODE_POOL else 1)
    if out.numel() == 0:
        return out, idx

    wp = packed_weight(w, x.dtype, phases=(mode == MODE_UP))
    bias = _bias_arg(b, x, wp)
    flat = ci < _FLAT_K_BELOW
    args = (
        x,
        wp,
        bias,
        out,
        idx if mode == MODE_POOL else out,
        n,
        h,
        wd,
        ci,
        co,
        hb,
        wb,
        m,
        *x.stride(),
        *out.stride(),
        *_epilogue_args(alpha, gain, clamp),
    )
    consts = dict(
        CI=ci,
        CO=co,
        MODE=mode,
        **_epilogue_consts(x, out, b, act, gain, clamp),
        # Narrow inputs, 16-bit: the bias may ride in K's padding (the kernel checks there is
        # one). Not for fp32, whose TF32 products would round the bias.
        BIAS_IN_K=b is not None and flat and x.dtype in (torch.float16, torch.bfloat16),
        # The leaky ReLU as max(p, alpha·p): the select form's bits in one instruction less.
        LRELU_MAX=act == "lrelu" and 0.0 < float(alpha) <= 1.0,
        FLAT_K=flat,
        # Only the narrow-input (first-layer) path takes it so far: the wide path's epilogue
        # is amortised over its K loop, and its static rows are recorded without it.
        OUT_DENSE_ROWS=flat and mode != MODE_UP and _dense_rows(out),
        **_addressing_consts(x, out, m, dense_ok=mode != MODE_UP),
    )

    phases = 4 if mode == MODE_UP else 1  # the up-conv's output phases are separate programs

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(co, meta["BLOCK_N"]) * phases,)

    if INTERPRET or x.device.type != "cuda":
        _conv3x3_fwd_kernel[grid](*args, **consts, **_INTERPRETER_CONFIG)
    else:
        _TUNING.launch(grid, args, consts, x.device, AUTOTUNE, {"Co": co, "Ci": ci, "x_ptr": x, "out_ptr": out})
    return out, idx


def conv3x3_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``clip(act(conv2d(x, w, padding=1) + b)·gain)`` by the Triton kernel.

    Returns ``(out, saved)``: ``out`` [N, Co, H, W] in x's memory format (channels_last
    stays channels_last, anything else comes back contiguous), ``saved`` an empty
    tensor (the backward works from ``out``, recomputing the pre-activation where the
    activation's derivative needs it). Arguments as validated by
    ``gankernels.conv3x3``; ``x``, ``w``, ``b`` share one dtype and device."""
    return _launch(MODE_CONV, x, w, b, act, alpha, gain, clamp)


def conv3x3_pool_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_pool2d(conv3x3(x, w, b, ...), 2)`` by the Triton kernel, pooling in registers.

    Returns ``(out, saved)``: ``out`` [N, Co, H//2, W//2] (odd sizes floor) in x's
    memory format; ``saved`` int8, same shape and memory format, the position of each
    window's max, ``dy*2 + dx`` (0..3), the first max in dy-major scan order winning
    and a NaN winning as in ``F.max_pool2d``. The activation is applied before the
    max (needed for the non-monotone silu)."""
    return _launch(MODE_POOL, x, w, b, act, alpha, gain, clamp)


def up_conv3x3_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv3x3(upsample_nearest(x, 2), w, b, ...)`` by the sub-pixel Triton kernel.

    Returns ``(out, saved)``: ``out`` [N, Co, 2H, 2W] in x's memory format, ``saved``
    an empty tensor. The phase kernels are summed in fp32 and cast to x's dtype once
    per weight version. Calls with Ci >= 16 run, for channels_last inputs with Co <= 64,
    the kernel with a GEMM row per output row pair
    (:mod:`gankernels.triton.up_conv3x3_pairs`), otherwise the one that computes all 4
    output phases per program (:mod:`gankernels.triton.up_conv3x3`); the others MODE 2
    here."""
    from gankernels.triton import up_conv3x3, up_conv3x3_pairs  # they import this module

    if up_conv3x3_pairs.serves(x, w):
        return up_conv3x3_pairs.up_conv3x3_phase_pairs(x, w, b, act, alpha, gain, clamp)
    if up_conv3x3.serves(x, w):
        return up_conv3x3.up_conv3x3_four_phase(x, w, b, act, alpha, gain, clamp)
    return _launch(MODE_UP, x, w, b, act, alpha, gain, clamp)


def fake_saved_pool(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
) -> torch.Tensor:
    """The (empty-valued) ``saved`` of :func:`conv3x3_pool_forward` for fake tensors:
    int8 [N, Co, H//2, W//2] in x's memory format."""
    n, _, h, wd = x.shape
    return x.new_empty((n, w.shape[0], h // 2, wd // 2), dtype=torch.int8).contiguous(memory_format=ref.memory_format_of(x))


register("conv3x3", "triton", OpImpl(forward=conv3x3_forward, supports=supports_conv3x3))
register("conv3x3_pool", "triton", OpImpl(forward=conv3x3_pool_forward, supports=supports_conv3x3_pool, fake_saved=fake_saved_pool))
register("up_conv3x3", "triton", OpImpl(forward=up_conv3x3_forward, supports=supports_up_conv3x3))
