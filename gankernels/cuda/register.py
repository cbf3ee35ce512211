"""Importing this registers the ``cuda`` backend's implementations with the dispatcher.

The kernels are the C++/CUDA extension's ops (``csrc/``, loaded by
:mod:`gankernels.cuda.loader`): ``max_pool2d``, ``upsample_nearest2d``, ``bias_act``,
and ``conv3x3``/``conv3x3_pool`` for small channel counts (Ci <= 4 or Co <= 4).
``up_conv3x3`` has no CUDA kernel.

Which conv kernel serves a call is the extension's choice, not a reason to pass the
backend over: fp16/bf16 with Ci <= 4 and Co > 4 (the RGB input layer) runs on tensor
cores (``csrc/conv3x3_rgb_mma.cu``); float32 keeps the CUDA-core kernel (its 16-bit
tensor-core operands would lose float32's precision), as do Co <= 4 layers and the
backward (``csrc/conv3x3_small.cu``).
"""

from __future__ import annotations

from typing import Optional

import torch

from gankernels.cuda.loader import (
    SMALL_CHANNELS,
    SUPPORTED_DTYPES,
    _conv_saved,
    _extension_reason,
    _ops,
    _prepare,
    device_reason,
    pool_saved,
)
from gankernels.ops.dispatch import OpImpl, register


def _base_reasons(x: torch.Tensor, **others: Optional[torch.Tensor]) -> list[str]:
    """Device, dtype, extension and GPU-architecture reasons common to every op."""
    reasons: list[str] = []
    on_cuda = False
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    else:
        on_cuda = True
        for name, t in (("x", x), *others.items()):
            if t is not None and t.device.type != "cuda":
                reasons.append(f"{name} is on {t.device}; the cuda backend needs CUDA tensors")
                on_cuda = False
                break
    if x.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {x.dtype} runs only on the torch backend (cuda serves float32, float16, bfloat16)")
    why = _extension_reason()
    if why:
        reasons.append(why)
    elif on_cuda:
        why = device_reason(x.device.index if x.device.index is not None else torch.cuda.current_device())
        if why:
            reasons.append(why)
    return reasons


def _bias_act_supports(x, b, act, alpha, gain, clamp, dim) -> list[str]:
    return _base_reasons(x, b=b)


def _bias_act_forward(x, b, act, alpha, gain, clamp, dim):
    return _ops().bias_act(x, b, act, alpha, gain, clamp, dim)


def _bias_act_backward(grad, x, b, y, act, alpha, gain, clamp, dim, needs=(True, True)):
    """(gx, gb). ``needs`` = which of (x, b) want a gradient: the bias gradient is a
    second full read of gx, so it is skipped when b does not need it (gb is then None)."""
    gx = _ops().bias_act_backward(grad, x, b, act, alpha, gain, clamp, dim)
    gb = None
    if b is not None and needs[1]:
        # Deterministic reduction (torch's sum), accumulated in float32.
        dims = [d for d in range(x.dim()) if d != dim]
        gb = gx.sum(dims, dtype=torch.float32).to(b.dtype) if dims else gx.to(b.dtype)
    return gx, gb


def _max_pool_supports(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> list[str]:
    return _base_reasons(x)


def _max_pool_forward(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    """(values, saved): saved is PyTorch's int64 indices when asked for, else 1-byte
    window codes (loader.pool_saves_code)."""
    return _ops().max_pool2d(
        x, list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode), bool(return_indices)
    )


def _max_pool_fake_saved(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    return pool_saved(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def _max_pool_backward(grad, x, saved, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    return _ops().max_pool2d_backward(
        grad, x, saved, list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode)
    )


def _upsample_supports(x, scale_factor) -> list[str]:
    return _base_reasons(x)


def _upsample_forward(x, scale_factor):
    return _ops().upsample_nearest2d(x, int(scale_factor))


def _upsample_backward(grad, scale_factor):
    return _ops().upsample_nearest2d_backward(grad, int(scale_factor))


def _derivative_from_output(act: str, alpha: float, gain: float) -> bool:
    """Whether the backward reads the activation's derivative off the forward's output
    (exact for gain > 0 and linear, relu, lrelu with alpha >= 0, tanh, sigmoid; csrc's
    derivative_from_output) instead of recomputing the conv: then the output is kept."""
    return gain > 0 and act != "silu" and not (act == "lrelu" and alpha < 0)


def _make_conv(pool: bool):
    def supports(x, w, b, act, alpha, gain, clamp) -> list[str]:
        reasons = []
        ci, co = x.shape[1], w.shape[0]
        if ci > SMALL_CHANNELS and co > SMALL_CHANNELS:
            reasons.append(f"Ci and Co both > {SMALL_CHANNELS}: the direct kernel serves Ci <= 4 or Co <= 4 (got Ci={ci}, Co={co})")
        if pool and (x.shape[2] < 2 or x.shape[3] < 2):
            reasons.append(f"the 2×2 pool needs H, W >= 2, got {tuple(x.shape[2:])}")
        return _base_reasons(x, w=w, b=b) + reasons

    def forward(x, w, b, act, alpha, gain, clamp):
        return _ops().conv3x3_small(x, w, b, act, alpha, gain, clamp, pool)

    def backward(grad, x, w, b, out, saved, act, alpha, gain, clamp, needs):
        needs = [bool(n) for n in needs]
        y = out if _derivative_from_output(act, alpha, gain) else None
        gx, gw, gb = _ops().conv3x3_small_backward(grad, x, w, b, saved, y, act, alpha, gain, clamp, pool, needs)
        return (gx if needs[0] else None, gw if needs[1] else None, gb if (needs[2] and b is not None) else None)

    def fake_saved(x, w, b, act, alpha, gain, clamp):
        return _conv_saved(x, w, pool)

    return OpImpl(
        forward=forward,
        supports=supports,
        backward=backward,
        fake_saved=fake_saved,
        prepare=_prepare,
        backward_needs_output=lambda act, alpha, gain, clamp: _derivative_from_output(act, alpha, gain),
    )


def _register_backend() -> None:
    register(
        "bias_act",
        "cuda",
        OpImpl(forward=_bias_act_forward, supports=_bias_act_supports, backward=_bias_act_backward, prepare=_prepare),
    )
    register(
        "max_pool2d",
        "cuda",
        OpImpl(
            forward=_max_pool_forward,
            supports=_max_pool_supports,
            backward=_max_pool_backward,
            fake_saved=_max_pool_fake_saved,
            prepare=_prepare,
        ),
    )
    register(
        "upsample_nearest2d",
        "cuda",
        OpImpl(forward=_upsample_forward, supports=_upsample_supports, backward=_upsample_backward, prepare=_prepare),
    )
    register("conv3x3", "cuda", _make_conv(pool=False))
    register("conv3x3_pool", "cuda", _make_conv(pool=True))


_register_backend()
