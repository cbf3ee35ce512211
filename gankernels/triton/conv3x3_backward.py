"""Triton backward of the fused 3×3 convolutions: ``conv3x3``, ``conv3x3_pool``, ``up_conv3x3``.

Two implicit-GEMM kernels serve all three ops:

* **dgrad** (input gradient): M = N·H·W input pixels, N-dim = Ci, K = taps·Co. For a
  plain or pooled conv the taps are the 9 of the 3×3 kernel (a correlation of the
  pre-activation gradient with the 180°-rotated kernel, done by index arithmetic);
  for ``up_conv3x3`` they are the 16 (phase, tap) pairs of the sub-pixel rewrite
  (DESIGN.md §4), so the low-resolution input gradient comes out directly and the
  4× upsampled gradient never exists.
* **wgrad** (weight gradient): each program owns one (Co-block, Ci-block, tap) tile of
  the ``[Co, taps, Ci]`` gradient and loops over a fixed slice of M; the slices
  ("split-K") go to separate fp32 partial buffers that are summed in a fixed order
  afterwards — deterministic, no atomics. The bias gradient is the row sum of the
  same gradient tiles, accumulated by the programs of the first (Ci-block, tap) and
  reduced the same way. For ``up_conv3x3`` the 16 phase-tap gradients are mapped back
  to the 3×3 weight through the tap map of DESIGN.md §4 (a tiny fp32 einsum).

Neither kernel reads a materialised pre-activation gradient ``gp``: both compute it
in registers while loading (:func:`_epilogue_grad`) from

* ``grad`` and the forward's output ``out`` — the epilogue derivative is a function of
  the post-epilogue value y for linear, relu, lrelu (alpha ≥ 0), tanh and sigmoid
  with gain > 0 (the clamp mask is ``-clamp < y < clamp``);
* for ``conv3x3_pool``, the quarter-resolution ``grad`` and ``out`` plus the saved
  int8 argmax (``dy*2+dx`` per pooled value): a full-resolution pixel gets the pooled
  gradient only if it is its window's argmax, so the full-size gradient is never
  written;
* otherwise (silu, gain ≤ 0, lrelu with alpha < 0) from the recomputed pre-activation
  (conv + bias, at the gradient's resolution — full resolution for the pooled op),
  which costs one extra forward convolution with ``act="linear"``.

Numerics: operands are fed to ``tl.dot`` in the input dtype (fp16/bf16, fp32 — TF32
when ``torch.backends.cudnn.allow_tf32`` is on, as cuDNN does), accumulated in fp32;
``gp`` is rounded to the input dtype once, as a materialised gradient would be.

What is materialised (memory plan, per backward call):

* nothing of the size of the pre-activation gradient on the default path;
* for silu / gain ≤ 0 / lrelu with alpha < 0 only: the recomputed pre-activation,
  in x's dtype — N·Co·H·W for conv3x3 and (full resolution) for conv3x3_pool,
  N·Co·2H·2W for up_conv3x3; freed when the backward returns;
* the wgrad split-K partials, fp32 ``[S, Co, taps, Ci]`` (S = 1 when the tiles alone
  fill the GPU, at most 64), and ``[S, phases, Co]`` for the bias.

``CUDNN_PARTS`` is a switch (off by default, not measured yet) that hands the dgrad
and/or wgrad of the plain ``conv3x3`` to cuDNN, on a ``gp`` materialised (in x's
dtype) by a small elementwise kernel; set it only where a GPU measurement shows
cuDNN faster.

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
from gankernels.triton.utils import INTERPRET, ROW_INDEX_LIMIT, empty

try:  # The forward family (issue 4); its forward kernels recompute pre-activations.
    from gankernels.triton import conv3x3 as _fwd
except ModuleNotFoundError as _e:  # pragma: no cover - only before the forward lands
    if _e.name != "gankernels.triton.conv3x3":
        raise
    _fwd = None

OPS: tuple[str, ...] = ("conv3x3", "conv3x3_pool", "up_conv3x3")

# Kernel modes: which op's geometry the loads follow.
MODE_CONV, MODE_POOL, MODE_UP = 0, 1, 2
_MODE = {"conv3x3": MODE_CONV, "conv3x3_pool": MODE_POOL, "up_conv3x3": MODE_UP}
_NTAP = {MODE_CONV: 9, MODE_POOL: 9, MODE_UP: 16}
_ACT_CODE = {"linear": 0, "relu": 1, "lrelu": 2, "tanh": 3, "sigmoid": 4, "silu": 5}

POISON_OUTPUTS: bool = os.environ.get("GANKERNELS_POISON_OUTPUTS") == "1"
"""Test hook: fill every buffer this module allocates (gx, the split-K partials) with
NaN before the launch. Costs an extra write; off unless set (by tests or the env)."""

CUDNN_PARTS: dict[str, bool] = {"dgrad": False, "wgrad": False}
"""Hand the plain ``conv3x3``'s dgrad / wgrad to cuDNN (``torch.nn.grad``) on a
materialised pre-activation gradient. Off: no GPU measurement has shown it faster yet
(issue 5, item 4). Applies to the ``triton`` backend's ``conv3x3`` backward only."""


# ----------------------------------------------------------------------------------
# The pre-activation gradient, computed while loading.


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
# Kernels.


# Small spaces on purpose: each configuration compiles in a few seconds per variant
# (mode × activation × dtype), and a cold run of the ANCHORS set must stay short.
def _dgrad_configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ]


def _wgrad_configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_CO": 16, "BLOCK_CI": 16, "BLOCK_M": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 64, "BLOCK_M": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_CO": 128, "BLOCK_CI": 64, "BLOCK_M": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_CO": 128, "BLOCK_CI": 128, "BLOCK_M": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_CO": 32, "BLOCK_CI": 32, "BLOCK_M": 128}, num_warps=4, num_stages=3),
    ]


# Operand-tile bytes (stages × both tiles) a configuration may take. The real shared
# memory is up to ~1.75× this estimate (layout conversions, the epilogue): measured by
# tests/test_triton_compile.py, e.g. fp32 wgrad 128×64×64 ×3 stages, estimated 147 KB,
# needed 196–256 KB, over the 227 KB (sm_90) / 163 KB (sm_80) a block may have. Above
# this bound a configuration only costs compile time and fails at launch.
_TILE_BYTES_LIMIT = 128 * 1024


def _dgrad_tile_bytes(c, elsize: int) -> int:
    """A [BLOCK_M, BLOCK_K] and B [BLOCK_K, BLOCK_N] per stage."""
    kw = c.kwargs
    return c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * elsize


def _wgrad_tile_bytes(c, elsize: int) -> int:
    """grad [BLOCK_M, BLOCK_CO] and the activation [BLOCK_M, BLOCK_CI] per stage."""
    kw = c.kwargs
    return c.num_stages * (kw["BLOCK_CO"] + kw["BLOCK_CI"]) * kw["BLOCK_M"] * elsize


def _prune(dims: tuple[tuple[str, str], ...], tile_bytes):
    """Drop configurations whose channel tiles are far wider than the channels (they
    only compute padding) or whose tiles overflow shared memory; always keep the
    smallest."""

    def prune(configs, named_args, **kwargs):
        g = named_args.get("g_ptr")
        elsize = g.element_size() if hasattr(g, "element_size") else 2

        def fits(c):
            if tile_bytes(c, elsize) > _TILE_BYTES_LIMIT:
                return False
            return all(c.kwargs[blk] <= max(32, triton.next_power_of_2(int(named_args[arg]))) for blk, arg in dims)

        kept = [c for c in configs if fits(c)]
        return kept or [min(configs, key=lambda c: c.kwargs[dims[0][0]] * c.kwargs[dims[1][0]])]

    return prune


# Split-K slices of M are multiples of this, so every BLOCK_M above divides them.
_M_GRANULE = max(c.kwargs["BLOCK_M"] for c in _wgrad_configs())

_KEY = ["N", "H", "W", "Ci", "Co", "MODE", "ACT", "FROM_Y"]


@triton.autotune(
    configs=_dgrad_configs(),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune((("BLOCK_N", "Ci"), ("BLOCK_K", "Co")), _dgrad_tile_bytes)},
)
@triton.jit
def _dgrad_kernel(
    g_ptr, g_s0, g_s1, g_s2, g_s3,
    a_ptr, a_s0, a_s1, a_s2, a_s3,
    i_ptr, i_s0, i_s1, i_s2, i_s3,
    wt_ptr, gx_ptr, gx_s0, gx_s1, gx_s2, gx_s3,
    N, H, W, Ci, Co, Hp, Wp,
    alpha, gain, clamp,
    MODE: tl.constexpr, FROM_Y: tl.constexpr, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gx[n, ci, h, w] = Σ_taps Σ_co gp[n, co, tap position] · wt[tap, ci, co]
    (``wt`` is the forward's packed ``[taps·Ci, Co]`` weight)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * H * W
    xw = offs_m % W
    xh = (offs_m // W) % H
    nn = (offs_m // (H * W)).to(tl.int64)
    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = offs_ci < Ci
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    NTAP: tl.constexpr = 16 if MODE == 2 else 9
    # One flat K loop over (tap, Co-block): a single software-pipelined loop, compact
    # code (an unrolled loop per tap compiles several times slower).
    k_chunks = tl.cdiv(Co, BLOCK_K)
    for step in range(0, NTAP * k_chunks):
        q = step // k_chunks
        offs_co = (step - q * k_chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        co_ok = offs_co < Co
        if MODE == 2:
            # Phase (a, c), tap (t, u): out[2i+a, 2j+c] reads x[i+a+t-1, j+c+u-1].
            pa = q // 8
            pc = (q // 4) % 2
            li = xh + 1 - pa - (q // 2) % 2
            lj = xw + 1 - pc - q % 2
            ok = m_ok & (li >= 0) & (li < H) & (lj >= 0) & (lj < W)
            gh = 2 * li + pa
            gw = 2 * lj + pc
        else:
            gh = xh + 1 - q // 3
            gw = xw + 1 - q % 3
            ok = m_ok & (gh >= 0) & (gh < H) & (gw >= 0) & (gw < W)
        gp = _epilogue_grad(
            g_ptr, g_s0, g_s1, g_s2, g_s3, a_ptr, a_s0, a_s1, a_s2, a_s3, i_ptr, i_s0, i_s1, i_s2, i_s3,
            nn[:, None], offs_co[None, :], gh[:, None], gw[:, None], ok[:, None] & co_ok[None, :], Hp, Wp,
            alpha, gain, clamp, MODE == 1, FROM_Y, ACT, HAS_CLAMP,
        )
        wt = tl.load(
            wt_ptr + (q * Ci + offs_ci[None, :]) * Co + offs_co[:, None],
            mask=co_ok[:, None] & ci_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(gp.to(wt.dtype), wt, acc, input_precision=PRECISION)
    gx_off = nn[:, None] * gx_s0 + offs_ci[None, :] * gx_s1 + xh[:, None] * gx_s2 + xw[:, None] * gx_s3
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & ci_ok[None, :])


@triton.autotune(
    configs=_wgrad_configs(),
    key=_KEY + ["COMPUTE_W"],
    prune_configs_by={"early_config_prune": _prune((("BLOCK_CO", "Co"), ("BLOCK_CI", "Ci")), _wgrad_tile_bytes)},
)
@triton.jit
def _wgrad_kernel(
    g_ptr, g_s0, g_s1, g_s2, g_s3,
    a_ptr, a_s0, a_s1, a_s2, a_s3,
    i_ptr, i_s0, i_s1, i_s2, i_s3,
    x_ptr, x_s0, x_s1, x_s2, x_s3,
    part_ptr, bpart_ptr,
    N, H, W, Ci, Co, Hp, Wp, M_PER_SPLIT,
    alpha, gain, clamp,
    MODE: tl.constexpr, FROM_Y: tl.constexpr, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr,
    PRECISION: tl.constexpr, COMPUTE_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """part[s, co, tap, ci] = Σ_{m in slice s} gp[co, m] · x[m shifted by tap, ci];
    bpart[s, phase, co] = Σ_{m in slice s} gp[co, m] (phase: the up-conv's 4 output
    phases, else 1). M runs over the pixels of the conv's
    own output grid (the low-resolution grid for the up-conv, one phase per tap)."""
    NTAP: tl.constexpr = 16 if MODE == 2 else 9
    # The bias gradient sums gp over every pixel of the pre-activation grid: for the
    # up-conv that is one tap (t = u = 0) of each of the 4 phases, else tap 0.
    NPHASE: tl.constexpr = 4 if MODE == 2 else 1
    pid_co = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    if COMPUTE_W:
        q = pid_q % NTAP
        ci_blk = pid_q // NTAP
    else:  # bias only: one program per phase
        q = pid_q * (NTAP // NPHASE)
        ci_blk = pid_q * 0  # a tensor like in the other branch
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < Co
    offs_ci = ci_blk * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = offs_ci < Ci
    if MODE == 2:
        pa = q // 8
        pc = (q // 4) % 2
        dh = pa + (q // 2) % 2 - 1
        dw = pc + q % 2 - 1
    else:
        pa = 0
        pc = 0
        dh = q // 3 - 1
        dw = q % 3 - 1
    M = N * H * W
    m_start = pid_s * M_PER_SPLIT  # < M: the host launches cdiv(M, M_PER_SPLIT) slices
    # Not min(m_start + M_PER_SPLIT, M): the last slice's end can pass 2^31 and wrap.
    m_end = m_start + tl.minimum(M_PER_SPLIT, M - m_start)
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        ow = offs_m % W
        oh = (offs_m // W) % H
        nn = (offs_m // (H * W)).to(tl.int64)
        if MODE == 2:
            gh = 2 * oh + pa
            gw = 2 * ow + pc
        else:
            gh = oh
            gw = ow
        gp = _epilogue_grad(
            g_ptr, g_s0, g_s1, g_s2, g_s3, a_ptr, a_s0, a_s1, a_s2, a_s3, i_ptr, i_s0, i_s1, i_s2, i_s3,
            nn[None, :], offs_co[:, None], gh[None, :], gw[None, :], co_ok[:, None] & m_ok[None, :], Hp, Wp,
            alpha, gain, clamp, MODE == 1, FROM_Y, ACT, HAS_CLAMP,
        )
        if HAS_BIAS:
            bacc += tl.sum(gp, axis=1)
        if COMPUTE_W:
            xh = oh + dh
            xw = ow + dw
            x_ok = m_ok & (xh >= 0) & (xh < H) & (xw >= 0) & (xw < W)
            xt = tl.load(
                x_ptr + nn[:, None] * x_s0 + offs_ci[None, :] * x_s1 + xh[:, None] * x_s2 + xw[:, None] * x_s3,
                mask=x_ok[:, None] & ci_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(gp.to(xt.dtype), xt, acc, input_precision=PRECISION)
    if COMPUTE_W:
        p_off = ((pid_s * Co + offs_co[:, None]).to(tl.int64) * NTAP + q) * Ci + offs_ci[None, :]
        tl.store(part_ptr + p_off, acc, mask=co_ok[:, None] & ci_ok[None, :])
    if HAS_BIAS:
        owner = (ci_blk == 0) & (q % (NTAP // NPHASE) == 0)
        tl.store(bpart_ptr + (pid_s * NPHASE + q // (NTAP // NPHASE)) * Co + offs_co, bacc, mask=co_ok & owner)


@triton.jit
def _gp_kernel(
    g_ptr, g_s0, g_s1, g_s2, g_s3,
    a_ptr, a_s0, a_s1, a_s2, a_s3,
    i_ptr, i_s0, i_s1, i_s2, i_s3,
    gp_ptr, o_s0, o_s1, o_s2, o_s3,
    N, H, W, Co, Hp, Wp,
    alpha, gain, clamp,
    POOL: tl.constexpr, FROM_Y: tl.constexpr, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Materialise gp[n, co, h, w] on the pre-activation grid (for the cuDNN switch)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = offs_m < N * H * W
    c_ok = offs_c < Co
    ow = offs_m % W
    oh = (offs_m // W) % H
    nn = (offs_m // (H * W)).to(tl.int64)
    mask = m_ok[:, None] & c_ok[None, :]
    gp = _epilogue_grad(
        g_ptr, g_s0, g_s1, g_s2, g_s3, a_ptr, a_s0, a_s1, a_s2, a_s3, i_ptr, i_s0, i_s1, i_s2, i_s3,
        nn[:, None], offs_c[None, :], oh[:, None], ow[:, None], mask, Hp, Wp,
        alpha, gain, clamp, POOL, FROM_Y, ACT, HAS_CLAMP,
    )
    off = nn[:, None] * o_s0 + offs_c[None, :] * o_s1 + oh[:, None] * o_s2 + ow[:, None] * o_s3
    tl.store(gp_ptr + off, gp.to(gp_ptr.dtype.element_ty), mask=mask)


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
    # Before the Triton forward exists (and for CPU tensors without the interpreter's
    # forward): the reference, computed in fp32 so CPU half precision works.
    f = ref.up_conv3x3_preact if up else ref.conv3x3_preact
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    return f(x.to(wide), w.to(wide), None if b is None else b.to(wide)).to(x.dtype)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _default_split(device: torch.device, base_programs: int, m_granules: int) -> int:
    """Split-K count for wgrad: enough programs to fill the GPU about twice."""
    if device.type != "cuda":
        return min(2, m_granules)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(m_granules, 64, triton.cdiv(2 * sms, max(base_programs, 1))))


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


# up_conv3x3 tap map (DESIGN.md §4): T[k, phase, tap] = 1 where 3×3 row k feeds phase tap.
_TAP_MAP = torch.tensor(
    [[[1.0, 0.0], [1.0, 0.0]],  # w0 -> p[0][0], p[1][0]
     [[0.0, 1.0], [1.0, 0.0]],  # w1 -> p[0][1], p[1][0]
     [[0.0, 1.0], [0.0, 1.0]]],  # w2 -> p[0][1], p[1][1]
    dtype=torch.float32,
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


def _operands(op: str, grad, x, w, b, out, saved, act, alpha, gain, clamp):
    """Arguments common to the kernels: (grad, aux, argmax) with their strides, the
    pre-activation-grid size, and the constexpr flags."""
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
    if mode == MODE_POOL:
        hp, wp = grad.shape[2], grad.shape[3]
    else:
        hp, wp = 0, 0
    flags = dict(
        ACT=_ACT_CODE[act],
        FROM_Y=from_y,
        HAS_CLAMP=clamp is not None,
    )
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
    """The gradient of the pre-activation (conv + bias), materialised at full
    resolution in x's dtype and memory format — what the fused kernels compute in
    registers. Used by the cuDNN switch (:data:`CUDNN_PARTS`) and by tests; not for
    ``up_conv3x3`` (its pre-activation grid is the 2× output; use the fused path)."""
    if op not in ("conv3x3", "conv3x3_pool"):
        raise ValueError(f"op: pre_activation_grad serves 'conv3x3' and 'conv3x3_pool', got {op!r}")
    _mode, tensors, geom, scalars, flags = _operands(op, grad, x, w, b, out, saved, act, alpha, gain, clamp)
    return _launch_gp(op, tensors, geom, scalars, flags, x, w.shape[0])


def _launch_gp(op: str, tensors: tuple, geom: tuple, scalars: tuple, flags: dict, x: torch.Tensor, co: int) -> torch.Tensor:
    n, _, h, wd = x.shape
    gp = _alloc((n, co, h, wd), x.dtype, x.device, ref.memory_format_of(x))
    bm, bc = (16, 16) if INTERPRET else (64, 32)
    grid = (triton.cdiv(n * h * wd, bm), triton.cdiv(co, bc))
    _gp_kernel[grid](*tensors, gp, *gp.stride(), n, h, wd, co, *geom, *scalars,
                     POOL=op == "conv3x3_pool", BLOCK_M=bm, BLOCK_C=bc, **flags)
    return gp


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
    wgrad split-K slices (default: enough to fill the GPU).
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
    ntap = _NTAP[mode]
    precision = _precision(x.dtype, x.device)
    fmt = ref.memory_format_of(x)

    use_cudnn = op == "conv3x3" and x.device.type == "cuda" and (
        (want_x and CUDNN_PARTS["dgrad"]) or (want_w and CUDNN_PARTS["wgrad"])
    )
    gp = _launch_gp(op, tensors, geom, scalars, flags, x, co) if use_cudnn else None
    if use_cudnn and want_x and CUDNN_PARTS["dgrad"]:
        gx = torch.nn.grad.conv2d_input(x.shape, w, gp, padding=1).contiguous(memory_format=fmt)
        want_x = False
    if use_cudnn and want_w and CUDNN_PARTS["wgrad"]:
        gw = torch.nn.grad.conv2d_weight(x, w.shape, gp, padding=1)
        want_w = False

    if want_x:
        wt = _pack_weight(op, w, x.dtype)
        gx = _alloc(x.shape, x.dtype, x.device, fmt)
        grid = lambda meta: (triton.cdiv(n * h * wd, meta["BLOCK_M"]), triton.cdiv(ci, meta["BLOCK_N"]))  # noqa: E731
        _dgrad_kernel[grid](
            *tensors, wt, gx, *gx.stride(), n, h, wd, ci, co, *geom, *scalars,
            MODE=mode, PRECISION=precision, **flags,
        )

    if want_w or want_b:
        m = n * h * wd
        granules = triton.cdiv(m, _M_GRANULE)
        if split is None:
            split = _default_split(x.device, triton.cdiv(co, 64) * (triton.cdiv(ci, 64) * ntap if want_w else 1), granules)
        split = max(1, min(int(split), granules))
        m_per_split = triton.cdiv(granules, split) * _M_GRANULE
        split = triton.cdiv(m, m_per_split)  # no empty slices
        part = _alloc((split, co, ntap, ci) if want_w else (1,), torch.float32, x.device)
        nphase = 4 if mode == MODE_UP else 1
        bpart = _alloc((split, nphase, co) if want_b else (1,), torch.float32, x.device)
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(co, meta["BLOCK_CO"]),
            triton.cdiv(ci, meta["BLOCK_CI"]) * ntap if want_w else nphase,
            split,
        )
        _wgrad_kernel[grid](
            *tensors, x, *x.stride(), part, bpart, n, h, wd, ci, co, *geom, m_per_split, *scalars,
            MODE=mode, PRECISION=precision, COMPUTE_W=want_w, HAS_BIAS=want_b, **flags,
        )
        if want_w:
            g = part.sum(0)  # fixed-order reduction of the split-K slices: deterministic
            if mode == MODE_UP:
                tm = _TAP_MAP.to(g.device)
                # g[o, (a, c, t, u), i] -> dw[o, i, k, l] = Σ T[k, a, t] T[l, c, u] g[...]
                g = torch.einsum("kat,lcu,oactui->oikl", tm, tm, g.view(co, 2, 2, 2, 2, ci))
            else:
                g = g.view(co, 3, 3, ci).permute(0, 3, 1, 2)
            gw = g.to(w.dtype).contiguous(memory_format=ref.memory_format_of(w))
        if want_b:
            gb = bpart.sum((0, 1)).to(b.dtype)
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
