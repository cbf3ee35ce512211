"""Triton up-conv forward for few output channels, output row pairs: ``up_conv3x3``.

The four-phase kernel (:mod:`gankernels.triton.up_conv3x3`) issues 16 dots of N = BLOCK_N
and K = BLOCK_K per input-channel chunk. At Co <= 32 every one is an N = 32 (or narrower)
Hopper MMA of 16 tensor cycles, and each MMA costs about as many instructions to issue (its
shared-memory descriptors, fences, the copies and commit of its own tiles) whatever its
size: the issue slots, not the tensor cores, bound it (``benchmarks/NOTES.md`` step 5b).

Here the GEMM is reshaped so that each MMA is 2× wider and 2× deeper, with no zero taps.
Output rows 2r − 1 (phase row a = 1 of input row r − 1) and 2r (phase row a = 0 of input
row r) both read input rows r − 1 and r only, each with tap row 0 on row r − 1 and tap row
1 on row r. So a GEMM row is a *row pair* (image, r, column j), r = 0 … H, holding output
pixels (2r − 1 + h, 2j + c), h, c ∈ {0, 1}; one accumulator per column parity c holds
its [h, co] outputs (2·BLOCK_N wide). Per input-channel chunk, the input tile of column
shift dc ∈ {−1, 0, 1} is [BLOCK_M, 2·BLOCK_K] (rows r − 1 then r along K), and parity c
reads shifts c − 1 and c (tap column tc = 0, 1): 4 dots of [BLOCK_M, 2·BLOCK_K] ×
[2·BLOCK_K, 2·BLOCK_N] per chunk instead of 16 of [BLOCK_M, BLOCK_K] × [BLOCK_K,
BLOCK_N], the same multiply-adds, from 3 input tiles instead of 9. Every product is a real
tap, so NaN and ±inf reach exactly the outputs they reach in PyTorch. The first and last
row pairs (r = 0, r = H) hold one output row each (the other is masked): (H + 1)/H the
rows of the four-phase kernel.

The input must have channel stride 1 (channels_last, or a view of it): a row whose shifted
pixel is outside the image reads a row of zeros, so no copy is masked.
:func:`serves` sends other strides to the four-phase kernel.

The packed weight (``[8·Ci, 2·Co]``, rows ordered c, tc, tr, ci; columns 1 − a, co) is
:func:`gankernels.triton.conv3x3.packed_weight` with ``pairs=True``: the same fp32-summed
phase taps as the four-phase layout, rounded once, cached per parameter version.

Entry point: :func:`up_conv3x3_phase_pairs`; :func:`serves` says which calls
``conv3x3.up_conv3x3_forward`` routes here.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from gankernels.triton import conv3x3 as _conv
from gankernels.triton import up_conv3x3 as _four
from gankernels.triton.conv3x3 import _tile_rows
from gankernels.triton.tuning import FamilyTuning
from gankernels.triton.up_conv3x3 import _store_phase, _up_strides
from gankernels.triton.utils import INTERPRET

__all__ = ["up_conv3x3_phase_pairs", "serves", "MAX_CO"]

MAX_CO = 64
"""Calls with at most this many output channels (and at least ``up_conv3x3.MIN_CI`` input
channels, channel stride 1) run this kernel, the others the four-phase kernel. On the
static report (``benchmarks/NOTES.md`` step 5b) this kernel's main loop is also the lighter
one at Co = 128 and 256; those stay on the four-phase kernel until a GPU has timed both."""


# ----------------------------------------------------------------------------------
# The kernel.


@triton.jit
def _dot_tap(
    acc, x, w_ptrs, T: tl.constexpr, CI: tl.constexpr, CO: tl.constexpr, k_ok, n_ok, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + x @ weight tile T = 2·c + tc ([2·BLOCK_K, 2·BLOCK_N]: tap rows 0, 1 along K,
    output rows 2r − 1, 2r along N) of output column parity c, tap column tc."""
    ptrs = w_ptrs + T * (2 * CI) * (2 * CO)
    if EVEN_K and EVEN_N:
        b = tl.load(ptrs)
    elif EVEN_K:
        b = tl.load(ptrs, mask=n_ok[None, :], other=0.0)
    elif EVEN_N:
        b = tl.load(ptrs, mask=k_ok[:, None], other=0.0)
    else:
        b = tl.load(ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    return tl.dot(x, b, acc, input_precision=PRECISION)


@triton.jit
def _shift_pair_ptrs(a_rows, row_off, sh_lo, sh_hi, BIT_LO: tl.constexpr, BIT_HI: tl.constexpr, lo, ar_qk, z_ptr, tap_ok):
    """[BLOCK_M, 2·BLOCK_K] pointers: columns < BLOCK_K at shift sh_lo (the upper input
    row), the others at sh_hi (the lower), channels from the chunk's first; the zero row
    where that pixel is outside the image."""
    ok_lo = ((tap_ok >> BIT_LO) & 1) != 0
    ok_hi = ((tap_ok >> BIT_HI) & 1) != 0
    p_lo = tl.where(ok_lo[:, None], a_rows + (row_off + sh_lo)[:, None] + ar_qk[None, :], z_ptr + ar_qk[None, :])
    p_hi = tl.where(ok_hi[:, None], a_rows + (row_off + sh_hi)[:, None] + ar_qk[None, :], z_ptr + ar_qk[None, :])
    return tl.where(lo[None, :], p_lo, p_hi)


@triton.jit
def _load_pair(ptrs, k_ok, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=k_ok[None, :], other=0.0)


# As the four-phase kernel: N, H, W, M not specialised; CI, CO constexpr for the weight
# addressing and masks, the runtime Ci for the K loop's trip count (a constant one makes
# ptxas unroll the loop whole).
@triton.jit(do_not_specialize=["N", "H", "W", "M"])
def _up_conv3x3_pairs_fwd_kernel(
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
        tl.static_assert(_conv._MAX_TILE_ROWS % BLOCK_M == 0)
    H_IN, W_IN, SXN, SXH, SXW, SON, SOH, SOW = _up_strides(sxn, sxh, sxw, son, soh, sow, H, W, H_C, W_C, CI, CO, DENSE_CL)

    pid = tl.program_id(0)
    num_n: tl.constexpr = (CO + BLOCK_N - 1) // BLOCK_N
    pid_n = pid % num_n
    pid_m = pid // num_n

    # Rows: (image, r, column j) on an N × (H + 1) × W grid (M of them); row r covers
    # output rows 2r − 1 and 2r (both read input rows r − 1 and r), columns 2j, 2j + 1.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m, m_ok, bn, br, bw = _tile_rows(offs_m, M, H + 1, W, H_C + 1, W_C, M_ALIGNED, DENSE_CL)
    # Accumulator column j (of both, one per output column parity c): output row
    # 2r − 1 + j // BLOCK_N, channel co.
    ar_j = tl.arange(0, 2 * BLOCK_N)
    col_h = ar_j // BLOCK_N
    offs_co = pid_n * BLOCK_N + ar_j % BLOCK_N
    n_ok = offs_co < CO

    # Bit (dr + 1)·3 + (dc + 1), dr ∈ {−1, 0}: the input pixel (r + dr, j + dc) is inside.
    tap_ok = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for dr in tl.static_range(2):
        for dc in tl.static_range(3):
            inside = m_ok & (br + dr - 1 >= 0) & (br + dr - 1 < H_IN) & (bw + dc - 1 >= 0) & (bw + dc - 1 < W_IN)
            tap_ok = tap_ok | (inside.to(tl.int32) << (dr * 3 + dc))
    if X_INT32:
        a_rows = x_ptr
        row_off = bn * SXN + br * SXH + bw * SXW
    else:
        a_rows = (x_ptr + bn.to(tl.int64) * SXN)[:, None]
        row_off = br * SXH + bw * SXW
    up = -SXH
    left = -SXW
    right = SXW

    # K inside a chunk: q < BLOCK_K reads input row r − 1 (tap row 0 of both output rows),
    # the rest input row r (tap row 1), channel q % BLOCK_K.
    ar_q = tl.arange(0, 2 * BLOCK_K)
    lo = ar_q < BLOCK_K
    ar_qk = ar_q % BLOCK_K
    acc0 = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    # Weight rows (c, tc, tr, ci), columns (h, co) of the row-pair layout.
    b_off = ((ar_q // BLOCK_K) * CI + ar_qk)[:, None] * (2 * CO) + (col_h * CO + offs_co)[None, :]
    # The channel stride is 1 (the host routes only such inputs here): a row whose shifted
    # pixel is outside the image reads the zero row (z_ptr, >= Ci zeros; see up_conv3x3),
    # so the copies need no mask; the 3 column shifts' pointers are computed once.
    p_0 = _shift_pair_ptrs(a_rows, row_off, up + left, left, 0, 3, lo, ar_qk, z_ptr, tap_ok)
    p_1 = _shift_pair_ptrs(a_rows, row_off, up, 0, 1, 4, lo, ar_qk, z_ptr, tap_ok)
    p_2 = _shift_pair_ptrs(a_rows, row_off, up + right, right, 2, 5, lo, ar_qk, z_ptr, tap_ok)
    for s in range(tl.cdiv(Ci, BLOCK_K)):  # the runtime Ci: see above
        ci0 = s * BLOCK_K
        k_ok = ci0 + ar_qk < CI
        w_ptrs = w_ptr + ci0 * (2 * CO) + b_off
        x_0 = _load_pair(p_0 + ci0, k_ok, EVEN_K)
        x_1 = _load_pair(p_1 + ci0, k_ok, EVEN_K)
        x_2 = _load_pair(p_2 + ci0, k_ok, EVEN_K)
        # Column parity c = 0 reads shifts −1, 0 (tc = 0, 1); c = 1 reads 0, +1.
        acc0 = _dot_tap(acc0, x_0, w_ptrs, 0, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
        acc1 = _dot_tap(acc1, x_1, w_ptrs, 2, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
        acc0 = _dot_tap(acc0, x_1, w_ptrs, 1, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)
        acc1 = _dot_tap(acc1, x_2, w_ptrs, 3, CI, CO, k_ok, n_ok, EVEN_K, EVEN_N, PRECISION)

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_co, mask=n_ok, other=0.0).to(tl.float32)
    else:
        bias = None
    # Output pixel (2r − 1 + h, 2j + c): row 2r − 1 exists from r = 1 on, row 2r up to
    # r = H − 1.
    if OUT_INT32:
        o_row = bn * SON + (2 * br - 1) * SOH + (2 * bw) * SOW
        o_ptrs = out_ptr + o_row[:, None] + (col_h * SOH + offs_co * soc)[None, :]
    else:
        o_row = bn.to(tl.int64) * SON + (2 * br - 1).to(tl.int64) * SOH + (2 * bw).to(tl.int64) * SOW
        o_ptrs = out_ptr + o_row[:, None] + (col_h.to(tl.int64) * SOH + offs_co.to(tl.int64) * soc)[None, :]
    row_ok = tl.where(col_h[None, :] == 0, (br >= 1)[:, None], (br < H)[:, None])
    o_mask = m_ok[:, None] & n_ok[None, :] & row_ok
    _store_phase(acc0, bias, out_ptr, o_ptrs, o_mask, alpha, gain, clamp, ACT, HAS_BIAS, HAS_GAIN, HAS_CLAMP)
    _store_phase(acc1, bias, out_ptr, o_ptrs + SOW, o_mask, alpha, gain, clamp, ACT, HAS_BIAS, HAS_GAIN, HAS_CLAMP)


# ----------------------------------------------------------------------------------
# Tuning.

# The four-phase kernel's tuning key, config maker, limits and accumulator count (both keep
# four BLOCK_M x BLOCK_N fp32 accumulators per program).
_TUNE_KEY, _cfg, _acc_registers = _four._TUNE_KEY, _four._cfg, _four._acc_registers
_SMEM_LIMIT, _ACC_REGS_LIMIT, _INTERPRETER_CONFIG = _four._SMEM_LIMIT, _four._ACC_REGS_LIMIT, _four._INTERPRETER_CONFIG


# BLOCK_N is one phase's width (the two accumulators and the weight tiles are 2·BLOCK_N
# wide: output rows 2r − 1 and 2r). Two limits shape the tiles: the fp32 accumulators
# (4·BLOCK_M·BLOCK_N / threads registers per thread, <= 128) and a pipeline stage's 7
# tiles (3 input [BLOCK_M, 2·BLOCK_K], 4 weight [2·BLOCK_K, 2·BLOCK_N]: (6·BLOCK_M +
# 16·BLOCK_N)·BLOCK_K elements). Ordered by the static report (`python -m gankernels.bench
# static --all-configs`, NOTES step 5b): 256x32x16 w8 s3 has the lowest CTA load (0.83) at
# a main-loop load of 0.33 (triton 3.8) / 0.31 (3.6) with 223 registers at Co = 32; 128x32x32
# w4 s2 has the lowest main-loop load (0.29 / 0.28) at 255 registers. Co = 64: 128x64x16 w8 s3,
# 0.28 / 0.27 (CTA load 0.62 / 0.61).
_CONFIGS_HOPPER = [
    _cfg(128, 64, 16, 8, 3),  # Co > 32
    _cfg(64, 64, 32, 4, 2),
    _cfg(256, 32, 16, 8, 3),  # Co <= 32
    _cfg(128, 32, 32, 4, 2),
    _cfg(128, 32, 16, 4, 3),
    _cfg(128, 16, 32, 4, 3),  # Co <= 16
    _cfg(64, 32, 32, 4, 2),
    _cfg(128, 32, 16, 4, 2),  # fp32 (4-byte elements: half the tile per stage)
    _cfg(64, 16, 16, 4, 3),
]
_CONFIGS_AMPERE = [
    _cfg(64, 32, 32, 4, 2),
    _cfg(64, 16, 32, 4, 2),
    _cfg(64, 32, 16, 4, 2),
]
def _smem_bytes(c: triton.Config, elsize: int) -> int:
    kw = c.kwargs
    return max(c.num_stages, 1) * (6 * kw["BLOCK_M"] + 16 * kw["BLOCK_N"]) * kw["BLOCK_K"] * elsize


def _prune_configs(configs, named_args, smem_limit: int = _SMEM_LIMIT["ampere"], **kwargs):
    """Drop configurations that cannot pay off: a phase's N tile beyond Co rounded up to a
    power of two (the zero columns would be computed and thrown away), K tiles beyond Ci,
    pipelines that overflow shared memory, accumulators over the register budget. Always
    keeps at least one."""
    co, ci = kwargs.get("CO", named_args.get("CO")), kwargs.get("CI", named_args.get("CI"))
    elsize = named_args["x_ptr"].element_size()
    max_n = max(16, triton.next_power_of_2(co))
    max_k = max(16, triton.next_power_of_2(ci))
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_N"] <= max_n
        and c.kwargs["BLOCK_K"] <= max_k
        and _smem_bytes(c, elsize) <= smem_limit
        and _acc_registers(c) <= _ACC_REGS_LIMIT
    ]
    if not kept:
        smallest = min(configs, key=lambda c: _smem_bytes(c, elsize))
        kept = [triton.Config(dict(smallest.kwargs), num_warps=smallest.num_warps, num_stages=1)]
    return kept


_TUNING = FamilyTuning(
    _up_conv3x3_pairs_fwd_kernel, _TUNE_KEY, {"hopper": _CONFIGS_HOPPER, "ampere": _CONFIGS_AMPERE}, _prune_configs, _SMEM_LIMIT
)


# ----------------------------------------------------------------------------------
# Launch.


def serves(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``conv3x3.up_conv3x3_forward`` runs this kernel for ``x``, ``w`` (a call the
    Triton backend supports): at least ``up_conv3x3.MIN_CI`` input channels, at most
    :data:`MAX_CO` output channels, and a channel stride of 1 (channels_last; the
    four-phase kernel serves other strides: gathering [BLOCK_M, 2·BLOCK_K] tiles element
    by element here spills 688 B on sm_90)."""
    return x.shape[1] >= _four.MIN_CI and w.shape[0] <= MAX_CO and x.stride(1) == 1


def up_conv3x3_phase_pairs(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv3x3(upsample_nearest(x, 2), w, b, ...)``, a GEMM row per output row pair
    (2 × 2 output pixels from two input rows), both output rows along N.

    Same contract as :func:`gankernels.triton.conv3x3.up_conv3x3_forward` (it routes
    here): ``x`` [N, Ci, H, W], ``w`` [Co, Ci, 3, 3], ``b`` [Co] or None, one dtype and
    device, a call ``supports_up_conv3x3`` accepts, ``x`` with channel stride 1. Returns ``(out, saved)``: ``out``
    [N, Co, 2H, 2W] in x's memory format, ``saved`` an empty tensor."""
    n, ci, h, wd, co = _conv._checked_sizes(x, w, act)
    if x.stride(1) != 1 and ci > 1:
        raise ValueError(
            f"x: channel stride {x.stride(1)}; this kernel reads channels_last inputs (channel stride 1): "
            "pass x.contiguous(memory_format=torch.channels_last), or call up_conv3x3_forward, which routes other strides"
        )
    out = _conv._empty_out((n, co, 2 * h, 2 * wd), x)
    saved = x.new_empty((0,))
    m = n * (h + 1) * wd  # GEMM rows: output row pairs (2r − 1, 2r) × low-resolution columns
    if out.numel() == 0:
        return out, saved

    wp = _conv.packed_weight(w, x.dtype, phases=True, pairs=True)
    bias = _conv._bias_arg(b, x, wp)
    zeros = _four._zero_row(ci, x)
    sxn, _, sxh, sxw = x.stride()
    args = (x, wp, bias, out, zeros, n, h, wd, ci, m, sxn, sxh, sxw, *out.stride(), *_conv._epilogue_args(alpha, gain, clamp))
    consts = dict(
        CI=ci,
        CO=co,
        **_conv._epilogue_consts(x, out, b, act, gain, clamp),
        **_conv._addressing_consts(x, out, m),
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(co, meta["BLOCK_N"]),)

    if INTERPRET or x.device.type != "cuda":
        _up_conv3x3_pairs_fwd_kernel[grid](*args, **consts, **_INTERPRETER_CONFIG)
    else:
        _TUNING.launch(grid, args, consts, x.device, _conv.AUTOTUNE, {"x_ptr": x})
    return out, saved
