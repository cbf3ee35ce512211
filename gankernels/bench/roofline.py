"""The roofline floor of a case: ``max(FLOPs / matmul rate, bytes / copy bandwidth)``.

Counted as ANCHORS.md does, for the op as stock PyTorch defines it:

* 3×3 ops: ``FLOPs = 2·N·Co·Ho·Wo·9·Ci`` at the convolution's resolution — for the
  up-conv cases that is the upsampled ``(2H)×(2W)``, the stock FLOPs, although the
  sub-pixel form needs only 4/9 of them (so a sub-pixel kernel can beat "100 %").
  Bytes: read ``x``, ``w``, ``b`` once and write the output once (the pooled output for
  the pooled cases, the upsampled-resolution output for the up-conv cases).
* ``max_pool2d``: read x, write x/4; backward: read grad/4 and an index/4 of the same
  element size, write grad_in.
* ``upsample_nearest2d``: read x, write 4x; backward: read 4x, write x.
* ``bias_act``: read x (and b), write y; backward: read x and grad, write grad_in.
  Elementwise arithmetic is counted as 0 FLOPs: these ops are bytes-bound.

Forward+backward (``fwdbwd``): FLOPs ×3 for the 3×3 ops (data and weight gradients
each cost a forward), and the bytes of the backward added — for the 3×3 ops: read the
output gradient, the output, x and w; write grad_x, grad_w and grad_b. The backward
alone (``bwd``): FLOPs ×2 and the backward's bytes only.

For the memory-bound ops (no FLOPs) the floor is the bytes at copy bandwidth, so "% of
floor" is "% of copy bandwidth", the figure ANCHORS.md quotes for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gankernels.bench.cases import CONV_OPS, POOL_CONV_OPS, UP_OPS, Case


@dataclass(frozen=True)
class Ceilings:
    """What the device measured at the start of the run."""

    copy_bytes_per_s: float  # bytes read + written per second by a large tensor copy
    matmul_flops_per_s: float  # dense matmul rate (bf16 8192³ on CUDA)
    matmul_what: str = "bf16 8192³"
    copy_what: str = ""


def element_size(case: Case) -> int:
    return torch.empty((), dtype=case.torch_dtype).element_size()


def flops(case: Case) -> float:
    """Floating-point operations of the case (multiply-add = 2)."""
    if case.op not in CONV_OPS:
        return 0.0
    s = case.shape
    ho, wo = (2 * s.h, 2 * s.w) if case.op in UP_OPS else (s.h, s.w)
    f = 2.0 * s.n * s.co * ho * wo * 9 * s.c
    return {"fwd": 1, "fwdbwd": 3, "bwd": 2}[case.mode] * f


def bytes_moved(case: Case) -> float:
    """The fewest bytes the case must read and write (see the module docstring)."""
    s = case.shape
    e = element_size(case)
    x = s.n * s.c * s.h * s.w
    if case.op in CONV_OPS:
        w, b = s.co * s.c * 9, s.co
        if case.op in UP_OPS:
            y = s.n * s.co * 4 * s.h * s.w
        elif case.op in POOL_CONV_OPS:
            y = s.n * s.co * (s.h // 2) * (s.w // 2)
        else:
            y = s.n * s.co * s.h * s.w
        fwd = x + w + b + y
        bwd = (y + y + x + w) + (x + w + b)
    elif case.op == "max_pool2d":
        y = s.n * s.c * (s.h // 2) * (s.w // 2)
        fwd = x + y
        bwd = y + y + x
    elif case.op == "upsample_nearest2d":
        fwd = x + 4 * x
        bwd = 4 * x + x
    elif case.op == "bias_act":
        fwd = x + s.c + x
        bwd = x + x + x
    else:
        raise ValueError(f"case.op: no byte count for {case.op!r}")
    return float(e * {"fwd": fwd, "fwdbwd": fwd + bwd, "bwd": bwd}[case.mode])


def floor_ms(case: Case, ceilings: Ceilings) -> float:
    """``max(FLOPs / matmul rate, bytes / copy bandwidth)`` in milliseconds."""
    return 1e3 * max(flops(case) / ceilings.matmul_flops_per_s, bytes_moved(case) / ceilings.copy_bytes_per_s)


def percent_of_floor(floor: float, measured_ms: float) -> float:
    """How close a measured time is to the floor: ``100 · floor / measured``."""
    return 100.0 * floor / measured_ms
