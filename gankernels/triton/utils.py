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


# ----------------------------------------------------------------------------------
# Launch helpers shared by the memory-bound kernel families.

INT32_LIMIT = 2**31 - 1

MAX_TILE_ROWS = 256
"""No conv kernel tile has more GEMM rows (BLOCK_M) than this."""

ROW_INDEX_LIMIT = INT32_LIMIT - MAX_TILE_ROWS
"""The most GEMM rows (pixels) a conv kernel indexes in int32. A tile's rows are
``pid * BLOCK_M + arange(BLOCK_M)``: the last tile reaches up to BLOCK_M − 1 past the
last row, which must not wrap to a negative index (it would pass the ``< M`` mask)."""


def empty(poison: bool, *args, **kwargs) -> torch.Tensor:
    """``torch.empty`` (or ``torch.empty_like`` when given a tensor); filled with NaN
    (-1 for integers) when ``poison``, so an element a kernel fails to write shows up."""
    t = torch.empty_like(*args, **kwargs) if isinstance(args[0], torch.Tensor) else torch.empty(*args, **kwargs)
    if poison:
        t.fill_(float("nan") if t.dtype.is_floating_point else -1)
    return t


def span(t: torch.Tensor) -> int:
    """One past the largest element offset ``t`` addresses (its storage footprint)."""
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True) if s > 0)


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any offset into these tensors can exceed int32 (then kernels index in int64)."""
    return any(span(t) > INT32_LIMIT or t.numel() > INT32_LIMIT for t in tensors)


def tile(inner: int, total: int, max_inner: int = 64) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K) for a 2-D tile of ``total`` elements: BLOCK_K covers the
    contiguous dimension (up to ``max_inner``), BLOCK_R fills the tile with rows."""
    import triton

    block_k = min(triton.next_power_of_2(max(inner, 1)), max_inner)
    return max(1, total // block_k), block_k
