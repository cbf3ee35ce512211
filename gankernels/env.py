"""``python -m gankernels.env``: versions, the GPU, the extension, and which backend
can serve which op (and why not)."""

from __future__ import annotations

import platform
import sys

import torch


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as e:  # noqa: BLE001
        return f"not importable ({e})"


def _extension_status() -> str:
    import importlib

    try:
        cuda_backend = importlib.import_module("gankernels.cuda.loader")
    except ModuleNotFoundError as e:
        if e.name == "gankernels.cuda.loader":
            return "no CUDA backend in this version"
        return f"unavailable: {e}"
    try:
        return cuda_backend.extension_status()
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {e}"


def _probe_calls():
    """One small representative call per op on the best device, for the table."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(2, 16, 8, 8, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3, device=device, dtype=dtype)
    b = torch.randn(16, device=device, dtype=dtype)
    return (
        device,
        dtype,
        {
            "bias_act": ((x, b), {"act": "lrelu"}),
            "conv3x3": ((x, w, b), {"act": "lrelu"}),
            "conv3x3_pool": ((x, w, b), {"act": "lrelu"}),
            "up_conv3x3": ((x, w, b), {"act": "lrelu"}),
            "max_pool2d": ((x, 2), {}),
            "upsample_nearest2d": ((x, 2), {}),
        },
    )


def report() -> str:
    import gankernels
    from gankernels.ops.dispatch import BACKENDS

    lines = [
        f"gankernels {gankernels.__version__}",
        f"python     {sys.version.split()[0]} ({platform.machine()})",
        f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, cuDNN: {torch.backends.cudnn.version()})",
        f"triton     {_triton_version()}",
    ]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU        {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("GPU        none (CUDA not available): the fast backends need one; ops run on the torch backend")
    lines.append(f"extension  {_extension_status()}")
    from gankernels.ops import choice, dispatch

    lines.append(
        f"default    backend {dispatch.default_backend()!r}"
        + (f"  <- PROBLEM: {dispatch.ENV_PROBLEM}" if dispatch.ENV_PROBLEM else "")
    )
    lines.append(f"choices    auto's measured choices are cached in {choice.cache_file()}")
    device, dtype, calls = _probe_calls()
    lines.append(
        f"\nbackends for a small {str(dtype).replace('torch.', '')} channels_last call on {device}"
        " ('auto' times those that can serve a call on its first use, and keeps the fastest):"
    )
    for op, (args, kwargs) in calls.items():
        ex = gankernels.explain(op, *args, backend="auto", **kwargs)
        lines.append(f"  {op:20s} auto -> {ex.backend}" + (f"  [{ex.how}]" if ex.how else ""))
        for b in BACKENDS:
            if b in ex.rejected:
                lines.append(f"  {'':20s}   {b}: no — " + "; ".join(ex.rejected[b]))
            else:
                lines.append(f"  {'':20s}   {b}: yes")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
