"""What every Triton kernel family needs: whether a call can run, and launch helpers.

Triton kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set before this package is imported; used by the CPU tests).
"""

from __future__ import annotations

import os

import torch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def device_reasons(**tensors: torch.Tensor | None) -> list[str]:
    """Why the Triton backend cannot run on these tensors' devices (empty: it can)."""
    reasons = []
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRET:
            continue
        reasons.append(f"{name} is on {t.device}; the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
        break
    return reasons


def dtype_reasons(x: torch.Tensor) -> list[str]:
    if x.dtype not in SUPPORTED_DTYPES:
        return [f"dtype {x.dtype} runs only on the torch backend (triton serves float16, bfloat16, float32)"]
    if INTERPRET and x.dtype == torch.bfloat16:
        return ["the Triton interpreter computes bfloat16 wrongly; bfloat16 is served on GPU only"]
    return []


def common_reasons(x: torch.Tensor, **others: torch.Tensor | None) -> list[str]:
    """Device and dtype reasons for a call whose main input is ``x``."""
    return device_reasons(x=x, **others) + dtype_reasons(x)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    from gankernels.ops.reference import memory_format_of as _fmt

    return _fmt(t)
