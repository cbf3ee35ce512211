"""Triton up-conv forward, four output phases per program: ``up_conv3x3``.

``conv3x3(upsample_nearest(x, 2), w)`` by the sub-pixel rewrite (DESIGN.md §4): output
pixel (2i+a, 2j+c) is a 2×2 conv of the low-resolution input around (i, j) with phase
(a, c)'s kernel, whose tap (tr, tc) reads the low-resolution pixel
(i + a + tr − 1, j + c + tc − 1). Across the 4 phases the 16 (phase, tap) pairs read only
9 distinct shifts (dr, dc) ∈ {−1, 0, 1}²: the corners feed 1 phase, the edges 2, the
centre all 4.

A program owns BLOCK_M low-resolution pixels × BLOCK_N output channels and all 4 phases:
each K step (BLOCK_K input channels) loads the 9 shifted [BLOCK_M, BLOCK_K] input tiles
once and the 16 phase-tap weight tiles, and feeds 16 ``tl.dot`` into 4 fp32
accumulators, one per phase. The epilogue (bias, activation, gain, clamp) runs on each
accumulator and stores it to its phase's pixels of the 2× output, so each program writes
2×2 output pixels per low-resolution pixel. Compared with one program per phase
(``conv3x3``'s MODE 2), each input tile is read 9 times instead of 16, and a copy's
address and mask work serves 16/9 dots instead of 1.

The input is addressed through its four strides (channels_last, NCHW and non-contiguous
inputs are read in place; channels_last is the fast one), the output through its own.
The packed phase weight (``[2, 2, 2, 2, Ci, Co]``, rows ordered a, c, tr, tc, ci) comes
from :func:`gankernels.triton.conv3x3.packed_weight`, cached per parameter version.

Entry point: :func:`up_conv3x3_four_phase`; :func:`serves` says which calls
``conv3x3.up_conv3x3_forward`` routes here.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import triton
import triton.language as tl

from gankernels.triton import conv3x3 as _conv
from gankernels.triton.conv3x3 import _MAX_TILE_ROWS, _epilogue, _tile_rows
from gankernels.triton.tuning import FamilyTuning
from gankernels.triton.utils import INTERPRET

__all__ = ["up_conv3x3_four_phase", "serves", "MIN_CI"]

MIN_CI = 16
"""Below this many input channels the one-phase-per-program kernel (its merged taps × channels
K axis) serves the call: a 16-deep channel step of this kernel would be mostly padding."""


# ----------------------------------------------------------------------------------
# The kernel.


@triton.jit
def _load_shift(a_ptrs, shift, tap_ok, BIT: tl.constexpr, k_ok, EVEN_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] input tile at low-resolution shift ``shift`` (a scalar element
    offset); zero where the shifted pixel is outside the image (bit BIT of the row's mask)."""
    row_in = (tap_ok & (1 << BIT)) != 0
    if EVEN_K:
        mask = row_in[:, None]
    else:
        mask = row_in[:, None] & k_ok[None, :]
    return tl.load(a_ptrs + shift, mask=mask, other=0.0)


@triton.jit
def _shift_ptrs(a_rows, row_off, shift, ar_k, zero_row, tap_ok, BIT: tl.constexpr):
    """[BLOCK_M, BLOCK_K] pointers to each row's pixel at ``shift`` (channels from the chunk's
    first), or to the zero row where that pixel is outside the image (bit BIT clear)."""
    row_in = (tap_ok & (1 << BIT)) != 0
    return tl.where(row_in[:, None], a_rows + (row_off + shift)[:, None] + ar_k[None, :], zero_row)


@triton.jit
def _load_chunk(ptrs, k_ok, EVEN_K: tl.constexpr):
    """An input tile through precomputed pointers; only a partial channel chunk is masked."""
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=k_ok[None, :], other=0.0)


@triton.jit
def _load_phase_tap(
    w_ptrs, P: tl.constexpr, CI: tl.constexpr, CO: tl.constexpr, k_ok, n_ok, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr
):
    """The [BLOCK_K, BLOCK_N] tile of phase-tap P = ((a·2 + c)·2 + tr)·2 + tc of the packed weight."""
    ptrs = w_ptrs + P * CI * CO
    if EVEN_K and EVEN_N:
        return tl.load(ptrs)
    elif EVEN_K:
        return tl.load(ptrs, mask=n_ok[None, :], other=0.0)
    elif EVEN_N:
        return tl.load(ptrs, mask=k_ok[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _dot_tap(acc, x, w_ptrs, P: tl.constexpr, CI: tl.constexpr, CO: tl.constexpr, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION):
    b = _load_phase_tap(w_ptrs, P, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N)
    return tl.dot(x, b, acc, input_precision=PRECISION)


@triton.jit
def _sixteen_dots(
    acc00,
    acc01,
    acc10,
    acc11,
    x_00,
    x_01,
    x_02,
    x_10,
    x_11,
    x_12,
    x_20,
    x_21,
    x_22,
    w_ptrs,
    CI: tl.constexpr,
    CO: tl.constexpr,
    k_ok,
    n_ok,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One K step of all 4 phases: phase (a, c) tap (tr, tc) (phase-tap P = a·8 + c·4 + tr·2
    + tc) reads x_<a+tr><c+tc>, the input at shift (a + tr − 1, c + tc − 1). Tap-major, so
    consecutive dots feed different accumulators."""
    acc00 = _dot_tap(acc00, x_00, w_ptrs, 0, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc01 = _dot_tap(acc01, x_01, w_ptrs, 4, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc10 = _dot_tap(acc10, x_10, w_ptrs, 8, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc11 = _dot_tap(acc11, x_11, w_ptrs, 12, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc00 = _dot_tap(acc00, x_01, w_ptrs, 1, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc01 = _dot_tap(acc01, x_02, w_ptrs, 5, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc10 = _dot_tap(acc10, x_11, w_ptrs, 9, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc11 = _dot_tap(acc11, x_12, w_ptrs, 13, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc00 = _dot_tap(acc00, x_10, w_ptrs, 2, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc01 = _dot_tap(acc01, x_11, w_ptrs, 6, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc10 = _dot_tap(acc10, x_20, w_ptrs, 10, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc11 = _dot_tap(acc11, x_21, w_ptrs, 14, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc00 = _dot_tap(acc00, x_11, w_ptrs, 3, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc01 = _dot_tap(acc01, x_12, w_ptrs, 7, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc10 = _dot_tap(acc10, x_21, w_ptrs, 11, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    acc11 = _dot_tap(acc11, x_22, w_ptrs, 15, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
    return acc00, acc01, acc10, acc11


@triton.jit
def _store_phase(
    acc,
    bias,
    out_ptr,
    o_ptrs,
    o_mask,
    alpha,
    gain,
    clamp,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GAIN: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
):
    if HAS_BIAS:
        acc = acc + bias[None, :]
    y = _epilogue(acc, alpha, gain, clamp, ACT, HAS_GAIN, HAS_CLAMP)
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=o_mask)


# N, H, W and M change from layer to layer: not specialised (it would only multiply
# compilations). The channel counts come twice, as in conv3x3's kernel: constexpr CI, CO
# (no division in the weight addressing, masks vanish where the tiles divide them) and the
# runtime Ci for the K loop's trip count (a constant one makes ptxas unroll the loop whole).
@triton.jit
def _up_strides(sxn, sxh, sxw, son, soh, sow, H, W, H_C: tl.constexpr, W_C: tl.constexpr, CI: tl.constexpr,
                CO: tl.constexpr, DENSE_CL: tl.constexpr):  # fmt: skip
    """(H, W, x's image/row/pixel strides, out's image/row/pixel strides) of an up-conv
    launch: DENSE_CL (x and out dense channels_last of H_C × W_C inputs) makes them all
    constants, else the runtime ones."""
    if DENSE_CL:
        return H_C, W_C, H_C * W_C * CI, W_C * CI, CI, 4 * H_C * W_C * CO, 2 * W_C * CO, CO
    return H, W, sxn, sxh, sxw, son, soh, sow


@triton.jit(do_not_specialize=["N", "H", "W", "M"])
def _up_conv3x3_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    z_ptr,
    N,
    H,
    W,
    Ci,
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
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GAIN: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    X_INT32: tl.constexpr,
    OUT_INT32: tl.constexpr,
    ZERO_ROWS: tl.constexpr,
    M_ALIGNED: tl.constexpr,
    DENSE_CL: tl.constexpr,
    H_C: tl.constexpr,
    W_C: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    EVEN_N: tl.constexpr = CO % BLOCK_N == 0
    EVEN_K: tl.constexpr = CI % BLOCK_K == 0
    # As conv3x3's kernel: M_ALIGNED, no row masks (M a multiple of every BLOCK_M);
    # DENSE_CL, x and out dense channels_last of H_C × W_C images: the grid decoding divides
    # by constants and every stride is a constant.
    if M_ALIGNED:
        tl.static_assert(_MAX_TILE_ROWS % BLOCK_M == 0)
    H_IN, W_IN, SXN, SXH, SXW, SON, SOH, SOW = _up_strides(sxn, sxh, sxw, son, soh, sow, H, W, H_C, W_C, CI, CO, DENSE_CL)

    # Co tiles fastest, so the programs that read one tile of input pixels run together.
    pid = tl.program_id(0)
    num_n: tl.constexpr = (CO + BLOCK_N - 1) // BLOCK_N
    pid_n = pid % num_n
    pid_m = pid // num_n

    # Rows: low-resolution pixels, 32-bit (the host keeps M + BLOCK_M below 2^31).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < CO
    offs_m, m_ok, bn, bh, bw = _tile_rows(offs_m, M, H, W, H_C, W_C, M_ALIGNED, DENSE_CL)
    ar_k = tl.arange(0, BLOCK_K)

    # Bit (dr + 1)·3 + (dc + 1) of a row's mask: the pixel at shift (dr, dc) is inside the
    # image (0 for rows past M). Computed once: it picks the zero row's pointers once
    # (channel stride 1) or masks each copy (other strides).
    tap_ok = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for r in tl.static_range(3):
        for c in tl.static_range(3):
            inside = m_ok & (bh + r - 1 >= 0) & (bh + r - 1 < H_IN) & (bw + c - 1 >= 0) & (bw + c - 1 < W_IN)
            tap_ok = tap_ok | (inside.to(tl.int32) << (r * 3 + c))
    # Each row's offset to its own pixel (the shift (0, 0)): from x_ptr in 32 bits when x
    # spans less than 2^31 elements, else from the row's image (64-bit base).
    if X_INT32:
        a_rows = x_ptr
        row_off = bn * SXN + bh * SXH + bw * SXW
    else:
        a_rows = (x_ptr + bn.to(tl.int64) * SXN)[:, None]
        row_off = bh * SXH + bw * SXW
    # The 8 non-zero shifts as element offsets (scalars: uniform registers, or constants).
    up = -SXH
    down = SXH
    left = -SXW
    right = SXW

    acc00 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc01 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc10 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc11 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_off = ar_k[:, None] * CO + offs_n[None, :]
    if ZERO_ROWS:
        # Channel stride 1: a row whose shifted pixel is outside the image points at a row of
        # zeros (z_ptr, >= Ci of them) instead, so the copies need no per-row mask; both
        # kinds of pointer advance by the chunk's first channel. Precomputed once.
        zero_row = z_ptr + ar_k[None, :]
        p_00 = _shift_ptrs(a_rows, row_off, up + left, ar_k, zero_row, tap_ok, 0)
        p_01 = _shift_ptrs(a_rows, row_off, up, ar_k, zero_row, tap_ok, 1)
        p_02 = _shift_ptrs(a_rows, row_off, up + right, ar_k, zero_row, tap_ok, 2)
        p_10 = _shift_ptrs(a_rows, row_off, left, ar_k, zero_row, tap_ok, 3)
        p_11 = _shift_ptrs(a_rows, row_off, 0, ar_k, zero_row, tap_ok, 4)
        p_12 = _shift_ptrs(a_rows, row_off, right, ar_k, zero_row, tap_ok, 5)
        p_20 = _shift_ptrs(a_rows, row_off, down + left, ar_k, zero_row, tap_ok, 6)
        p_21 = _shift_ptrs(a_rows, row_off, down, ar_k, zero_row, tap_ok, 7)
        p_22 = _shift_ptrs(a_rows, row_off, down + right, ar_k, zero_row, tap_ok, 8)
        for s in range(tl.cdiv(Ci, BLOCK_K)):  # the runtime Ci: see above
            ci0 = s * BLOCK_K
            k_ok = ci0 + ar_k < CI
            w_ptrs = w_ptr + ci0 * CO + b_off
            x_00 = _load_chunk(p_00 + ci0, k_ok, EVEN_K)
            x_01 = _load_chunk(p_01 + ci0, k_ok, EVEN_K)
            x_02 = _load_chunk(p_02 + ci0, k_ok, EVEN_K)
            x_10 = _load_chunk(p_10 + ci0, k_ok, EVEN_K)
            x_11 = _load_chunk(p_11 + ci0, k_ok, EVEN_K)
            x_12 = _load_chunk(p_12 + ci0, k_ok, EVEN_K)
            x_20 = _load_chunk(p_20 + ci0, k_ok, EVEN_K)
            x_21 = _load_chunk(p_21 + ci0, k_ok, EVEN_K)
            x_22 = _load_chunk(p_22 + ci0, k_ok, EVEN_K)
            acc00, acc01, acc10, acc11 = _sixteen_dots(
                acc00, acc01, acc10, acc11, x_00, x_01, x_02, x_10, x_11, x_12, x_20, x_21, x_22,
                w_ptrs, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION,
            )  # fmt: skip
    else:
        # Any channel stride: masked copies, a row's tile offsets computed once.
        a_ptrs0 = a_rows + (row_off[:, None] + (ar_k * sxc)[None, :])
        for s in range(tl.cdiv(Ci, BLOCK_K)):
            ci0 = s * BLOCK_K
            k_ok = ci0 + ar_k < CI
            a_ptrs = a_ptrs0 + ci0 * sxc
            w_ptrs = w_ptr + ci0 * CO + b_off
            # x_<r><c>: the input at shift (r − 1, c − 1), each loaded once.
            x_00 = _load_shift(a_ptrs, up + left, tap_ok, 0, k_ok, EVEN_K)
            x_01 = _load_shift(a_ptrs, up, tap_ok, 1, k_ok, EVEN_K)
            x_02 = _load_shift(a_ptrs, up + right, tap_ok, 2, k_ok, EVEN_K)
            x_10 = _load_shift(a_ptrs, left, tap_ok, 3, k_ok, EVEN_K)
            x_11 = _load_shift(a_ptrs, 0, tap_ok, 4, k_ok, EVEN_K)
            x_12 = _load_shift(a_ptrs, right, tap_ok, 5, k_ok, EVEN_K)
            x_20 = _load_shift(a_ptrs, down + left, tap_ok, 6, k_ok, EVEN_K)
            x_21 = _load_shift(a_ptrs, down, tap_ok, 7, k_ok, EVEN_K)
            x_22 = _load_shift(a_ptrs, down + right, tap_ok, 8, k_ok, EVEN_K)
            acc00, acc01, acc10, acc11 = _sixteen_dots(
                acc00, acc01, acc10, acc11, x_00, x_01, x_02, x_10, x_11, x_12, x_20, x_21, x_22,
                w_ptrs, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION,
            )  # fmt: skip

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        bias = None
    # Output pixel (2i + a, 2j + c): the row's (2i, 2j) plus a scalar per phase.
    if OUT_INT32:  # the output spans < 2^31 elements: 32-bit offsets
        o_ptrs = out_ptr + (bn * SON + (2 * bh) * SOH + (2 * bw) * SOW)[:, None] + (offs_n * soc)[None, :]
    else:
        o_row = bn.to(tl.int64) * SON + (2 * bh).to(tl.int64) * SOH + (2 * bw).to(tl.int64) * SOW
        o_ptrs = out_ptr + o_row[:, None] + (offs_n.to(tl.int64) * soc)[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    _store_phase(acc00, bias, out_ptr, o_ptrs, o_mask, alpha, gain, clamp, ACT, HAS_BIAS, HAS_GAIN, HAS_CLAMP)
    _store_phase(acc01, bias, out_ptr, o_ptrs + SOW, o_mask, alpha, gain, clamp, ACT, HAS_BIAS, HAS_GAIN, HAS_CLAMP)
    _store_phase(acc10, bias, out_ptr, o_ptrs + SOH, o_mask, alpha, gain, clamp, ACT, HAS_BIAS, HAS_GAIN, HAS_CLAMP)
    _store_phase(acc11, bias, out_ptr, o_ptrs + (SOH + SOW), o_mask, alpha, gain, clamp, ACT, HAS_BIAS, HAS_GAIN, HAS_CLAMP)


# ----------------------------------------------------------------------------------
# Tuning: per GPU family, keyed on the problem's shape and dtype (the autotuner adds the
# tensor arguments' dtypes to the key itself).

_TUNE_KEY = ["N", "H", "W", "CI", "CO", "PRECISION"]


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Two limits shape the tiles: the 4 fp32 accumulators (4·BLOCK_M·BLOCK_N / threads registers
# per thread, kept <= 128, see _ACC_REGS_LIMIT) and a pipeline stage's 25 tiles (9 input
# shifts, 16 phase taps: (9·BLOCK_M + 16·BLOCK_N)·BLOCK_K elements). Ordered by the static
# issue load of the ANCHORS rows (`python -m gankernels.bench static --all-configs`).
_CONFIGS_HOPPER = [
    _cfg(64, 64, 32, 4, 2),  # Co >= 64: load 0.43 (triton 3.8), 200 KB, ~205 registers
    _cfg(128, 32, 32, 4, 2),  # Co <= 32: 0.54, 208 KB
    _cfg(128, 64, 16, 8, 3),
    _cfg(64, 32, 32, 4, 3),
    _cfg(64, 64, 16, 4, 2),  # fp32 (4-byte elements: half the tile per stage)
    _cfg(64, 32, 16, 4, 3),
]
_CONFIGS_AMPERE = [
    _cfg(64, 64, 16, 4, 3),
    _cfg(64, 32, 32, 4, 2),
    _cfg(128, 32, 16, 4, 3),
]
_SMEM_LIMIT = {"hopper": 227 * 1024, "ampere": 160 * 1024}
_ACC_REGS_LIMIT = 128
# The interpreter: one fixed small configuration (tuning is meaningless there).
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def _smem_bytes(c: triton.Config, elsize: int) -> int:
    kw = c.kwargs
    return c.num_stages * (9 * kw["BLOCK_M"] + 16 * kw["BLOCK_N"]) * kw["BLOCK_K"] * elsize


def _acc_registers(c: triton.Config) -> int:
    kw = c.kwargs
    return 4 * kw["BLOCK_M"] * kw["BLOCK_N"] // (32 * c.num_warps)


def _prune_configs(configs, named_args, smem_limit: int = _SMEM_LIMIT["ampere"], **kwargs):
    """Drop configurations that cannot pay off, before compiling them: N tiles beyond Co
    (or 32 wide when Co >= 128: each N tile re-reads the input), K tiles beyond Ci,
    pipelines that overflow shared memory, accumulators over the register budget. Always
    keeps at least one."""
    # CI, CO are constexprs: keyword arguments of the launch (named_args for the heuristic).
    co, ci = kwargs.get("CO", named_args.get("CO")), kwargs.get("CI", named_args.get("CI"))
    elsize = named_args["x_ptr"].element_size()
    max_n = max(32, triton.next_power_of_2(co))
    min_n = 64 if co >= 128 else 16
    max_k = max(16, triton.next_power_of_2(ci))
    kept = [
        c
        for c in configs
        if min_n <= c.kwargs["BLOCK_N"] <= max_n
        and c.kwargs["BLOCK_K"] <= max_k
        and _smem_bytes(c, elsize) <= smem_limit
        and _acc_registers(c) <= _ACC_REGS_LIMIT
    ]
    if not kept:
        smallest = min(configs, key=lambda c: _smem_bytes(c, elsize))
        kept = [triton.Config(dict(smallest.kwargs), num_warps=smallest.num_warps, num_stages=1)]
    return kept


_TUNING = FamilyTuning(
    _up_conv3x3_fwd_kernel, _TUNE_KEY, {"hopper": _CONFIGS_HOPPER, "ampere": _CONFIGS_AMPERE}, _prune_configs, _SMEM_LIMIT
)


# ----------------------------------------------------------------------------------
# Launch.


_zero_rows: dict[tuple, torch.Tensor] = {}
_zero_rows_lock = threading.Lock()


def _zero_row(ci: int, x: torch.Tensor) -> torch.Tensor:
    """At least ``ci`` zeros of x's dtype on x's device: what a channels_last copy reads for
    a pixel outside the image. One per (device, dtype), grown as needed; never cached
    during CUDA-graph capture (the zero fill would only run when the graph replays)."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return torch.zeros(ci, dtype=x.dtype, device=x.device)
    key = (x.device, x.dtype)
    with _zero_rows_lock:
        z = _zero_rows.get(key)
        if z is None or z.numel() < ci:
            z = torch.zeros(max(ci, 1024), dtype=x.dtype, device=x.device)
            _zero_rows[key] = z
    return z


def serves(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``conv3x3.up_conv3x3_forward`` runs this kernel for ``x``, ``w`` (a call the
    Triton backend supports): every call with at least :data:`MIN_CI` input channels."""
    return x.shape[1] >= MIN_CI


def up_conv3x3_four_phase(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv3x3(upsample_nearest(x, 2), w, b, ...)``, all 4 output phases per program.

    Same contract as :func:`gankernels.triton.conv3x3.up_conv3x3_forward` (it routes
    here): ``x`` [N, Ci, H, W], ``w`` [Co, Ci, 3, 3], ``b`` [Co] or None, one dtype and
    device, a call ``supports_up_conv3x3`` accepts. Returns ``(out, saved)``: ``out``
    [N, Co, 2H, 2W] in x's memory format, ``saved`` an empty tensor."""
    n, ci, h, wd, co = _conv._checked_sizes(x, w, act)
    out = _conv._empty_out((n, co, 2 * h, 2 * wd), x)
    saved = x.new_empty((0,))
    m = n * h * wd  # GEMM rows: low-resolution pixels
    if out.numel() == 0:
        return out, saved

    wp = _conv.packed_weight(w, x.dtype, phases=True)
    bias = _conv._bias_arg(b, x, wp)
    zero_rows = x.stride(1) == 1
    zeros = _zero_row(ci, x) if zero_rows else wp  # dummy pointer when unused
    args = (x, wp, bias, out, zeros, n, h, wd, ci, m, *x.stride(), *out.stride(), *_conv._epilogue_args(alpha, gain, clamp))
    consts = dict(
        CI=ci,
        CO=co,
        **_conv._epilogue_consts(x, out, b, act, gain, clamp),
        ZERO_ROWS=zero_rows,
        **_conv._addressing_consts(x, out, m),
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(co, meta["BLOCK_N"]),)

    if INTERPRET or x.device.type != "cuda":
        _up_conv3x3_fwd_kernel[grid](*args, **consts, **_INTERPRETER_CONFIG)
    else:
        _TUNING.launch(grid, args, consts, x.device, _conv.AUTOTUNE, {"x_ptr": x})
    return out, saved
