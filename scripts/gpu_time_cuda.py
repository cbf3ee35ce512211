#!/usr/bin/env python3
"""Time the CUDA extension's kernels against stock PyTorch (eager, cuDNN) and the
Triton backend, bf16 channels_last, on the ANCHORS.md shapes.

    python scripts/gpu_time_cuda.py --out DIR        # writes DIR/gpu_time_cuda.{md,csv}

Cases:
* the 3→64 discriminator block (conv3x3 + bias + lrelu + 2×2 max-pool, batch 64,
  128×128; target ≥ 5× eager) and the same conv without the pool;
* the generator's RGB output layer (32→3 conv3x3 + bias + tanh, batch 128, 64×64);
* max_pool2d 2×2, nearest 2× upsample, bias + lrelu on 64×128×64×64 (target ≥ 80 %
  of the copy bandwidth measured at the start; bytes counted as ANCHORS.md does).

Forward, and forward+backward (gradients to w and b, "+dx" also to x). Median of
``triton.testing.do_bench`` (L2 flushed between calls). Each fast result is checked
against the stock one before it is timed. Runs in well under 2 minutes (Triton
contenders are dropped, and shown as "—", once 75 s have passed: cold Triton caches
autotune for minutes).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import gankernels  # noqa: E402
from gankernels.cuda import loader as cuda_backend  # noqa: E402
from gankernels.ops import dispatch  # noqa: E402
from gankernels.testing import rel_l2_error, tolerance  # noqa: E402

NAME = "gpu_time_cuda"
DT = torch.bfloat16
CL = torch.channels_last
# --smoke swaps these: CPU tensors, the torch backend standing in for cuda, tiny shapes.
CFG = {"device": "cuda", "fast": "cuda", "smoke": False}


def bench(fn: Callable[[], object]) -> float:
    if CFG["smoke"]:  # one wall-clock call: exercises the pipeline, times mean nothing
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (bytes read + written), 1 GiB."""
    src = torch.empty(2**16 if CFG["smoke"] else 2**29, dtype=torch.float16, device=CFG["device"])
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


# Triton contenders are skipped once the script has run this long (their first calls
# autotune and compile, which can take minutes on a cold cache): gpu_check.sh gives
# each timing script 180 s.
TRITON_BUDGET_S = 75.0
START = time.monotonic()


def triton_serves(op: str, *args, **kwargs) -> bool:
    if CFG["smoke"] or "triton" not in dispatch.registered_backends(op):
        return False
    if time.monotonic() - START > TRITON_BUDGET_S:
        print(f"skipping triton for {op}: past the {TRITON_BUDGET_S:.0f} s budget for Triton compiles", flush=True)
        return False
    return "triton" not in gankernels.explain(op, *args, backend="triton", **kwargs).rejected


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad_idx: list[int]) -> Callable[[], None]:
    """A closure running fn(*inputs) and the backward to inputs[grad_idx]."""
    leaves = [t.detach().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    g = torch.randn_like(out)

    def run():
        y = fn(*leaves)
        torch.autograd.grad(y, [leaves[i] for i in grad_idx], g)

    return run


def time_conv(case: str, n: int, ci: int, co: int, hw: int, act: str, pool: bool) -> list[tuple]:
    """(direction, stock ms, cuda ms, triton ms or None, rel err) for one conv case."""
    x = torch.randn(n, ci, hw, hw, device=CFG["device"], dtype=DT).contiguous(memory_format=CL)
    w = (torch.randn(co, ci, 3, 3, device=CFG["device"]) / (3 * ci**0.5)).to(DT)
    b = (torch.randn(co, device=CFG["device"]) * 0.2).to(DT)

    def stock(x, w, b):
        y = F.conv2d(x, w, b, padding=1)
        y = F.leaky_relu(y, 0.2) if act == "lrelu" else torch.tanh(y)
        return F.max_pool2d(y, 2) if pool else y

    op = "conv3x3_pool" if pool else "conv3x3"
    fn = getattr(gankernels, op)

    def with_backend(backend: str) -> Callable[..., torch.Tensor]:
        return lambda x, w, b: fn(x, w, b, act, backend=backend)

    err = rel_l2_error(with_backend(CFG["fast"])(x, w, b), stock(x, w, b))
    assert err <= 2 * tolerance(DT), f"{case}: cuda differs from stock (rel L2 {err:.2e})"
    contenders = [stock, with_backend(CFG["fast"])] + ([with_backend("triton")] if triton_serves(op, x, w, b, act) else [])
    out = []
    for direction, grads in (("fwd", None), ("fwd+bwd", [1, 2]), ("fwd+bwd+dx", [0, 1, 2])):
        times = []
        for f in contenders:
            times.append(bench((lambda f=f: f(x, w, b)) if grads is None else fwd_bwd(f, [x, w, b], grads)))
        out.append((direction, times[0], times[1], times[2] if len(times) > 2 else None, err))
    return out


def time_mem(case: str, op: str, stock, fast, x: torch.Tensor, targs: tuple, tkw: dict) -> list[tuple]:
    """fwd and bwd rows (direction, stock, cuda, triton or None, rel err) of a memory-bound op.
    The backward is timed alone (autograd.grad on a kept graph)."""
    err = rel_l2_error(fast(x, CFG["fast"]), stock(x))
    assert err <= tolerance(DT), f"{case}: cuda differs from stock (rel L2 {err:.2e})"
    contenders = [stock, lambda x: fast(x, CFG["fast"])]
    if triton_serves(op, *targs, **tkw):
        contenders.append(lambda x: fast(x, "triton"))
    fwd = [bench(lambda f=f: f(x)) for f in contenders]
    bwd = []
    for f in contenders:
        leaf = x.detach().requires_grad_()
        y = f(leaf)
        g = torch.randn_like(y)
        bwd.append(bench(lambda y=y, g=g, leaf=leaf: torch.autograd.grad(y, leaf, g, retain_graph=True)))
    pad = [None] if len(contenders) == 2 else []
    return [("fwd", *fwd, *pad, err), ("bwd", *bwd, *pad, err)]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for gpu_time_cuda.md / .csv")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, torch backend as the contender: tests this script")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        CFG.update(device="cpu", fast="torch", smoke=True)
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to time (--smoke runs the pipeline on CPU)", file=sys.stderr)
        return 1
    else:
        cuda_backend.load(build=True)
    k = 8 if args.smoke else 1  # shrink batch and spatial size in smoke mode
    torch.manual_seed(0)
    bw = copy_bandwidth()
    rows: list[dict] = []

    def record(
        case: str, direction: str, stock_ms: float, cuda_ms: float, triton_ms: Optional[float], nbytes: Optional[int], err: float
    ):
        rows.append(
            dict(
                case=case,
                direction=direction,
                stock_ms=stock_ms,
                cuda_ms=cuda_ms,
                triton_ms=triton_ms,
                speedup=stock_ms / cuda_ms,
                pct_copy_bw=(100 * nbytes / (cuda_ms * 1e-3) / bw) if nbytes else None,
                rel_err=err,
            )
        )
        print(rows[-1], flush=True)

    # --- convolutions -------------------------------------------------------------
    convs = [
        ("disc 3→64 conv+lrelu+pool, 64×128²", 64 // k, 3, 64, 128 // k, "lrelu", True),
        ("disc 3→64 conv+lrelu, 64×128²", 64 // k, 3, 64, 128 // k, "lrelu", False),
        ("gen 32→3 conv+tanh, 128×64²", 128 // k, 32, 3, 64 // k, "tanh", False),
    ]
    for case, n, ci, co, hw, act, pool in convs:
        for direction, s, c, t, err in time_conv(case, n, ci, co, hw, act, pool):
            record(case, direction, s, c, t, None, err)

    # --- memory-bound ops -----------------------------------------------------------
    shape = (64 // k, 128, 64 // k, 64 // k)
    x = torch.randn(shape, device=CFG["device"], dtype=DT).contiguous(memory_format=CL)
    bias = torch.randn(shape[1], device=CFG["device"], dtype=DT)
    full = x.numel() * x.element_size()
    mem_ops = [
        (
            "max_pool2d 2×2",
            "max_pool2d",
            lambda x: F.max_pool2d(x, 2),
            lambda x, be: gankernels.max_pool2d(x, 2, backend=be),
            ((x, 2), {}),
            (full + full // 4, full // 4 + full // 4 + full),
        ),
        (
            "upsample 2×",
            "upsample_nearest2d",
            lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
            lambda x, be: gankernels.upsample_nearest2d(x, 2, backend=be),
            ((x, 2), {}),
            (5 * full, 5 * full),
        ),
        (
            "bias + lrelu",
            "bias_act",
            lambda x: F.leaky_relu(x + bias.view(1, -1, 1, 1), 0.2),
            lambda x, be: gankernels.bias_act(x, bias, "lrelu", backend=be),
            ((x, bias), {"act": "lrelu"}),
            (2 * full, 3 * full),
        ),
    ]
    for case, op, stock, fast, (targs, tkw), nbytes in mem_ops:
        for (direction, s, c, t, err), nb in zip(time_mem(case, op, stock, fast, x, targs, tkw), nbytes, strict=True):
            record(case, direction, s, c, t, nb, err)

    # --- write --------------------------------------------------------------------
    gpu = torch.cuda.get_device_properties(0).name if not args.smoke else "CPU smoke run: times mean nothing"
    csv_path = os.path.join(args.out, f"{NAME}.csv")
    with open(csv_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    md = [
        f"### CUDA extension vs stock PyTorch ({gpu}, torch {torch.__version__}, "
        f"{datetime.date.today()}, bf16 channels_last; copy bandwidth {bw / 1e12:.2f} TB/s)",
        "",
        "| case | dir | stock ms | cuda ms | triton ms | cuda speed-up | cuda % copy BW |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        tri = f"{r['triton_ms']:.3f}" if r["triton_ms"] is not None else "—"
        pct = f"{r['pct_copy_bw']:.0f} %" if r["pct_copy_bw"] is not None else "—"
        md.append(
            f"| {r['case']} | {r['direction']} | {r['stock_ms']:.3f} | {r['cuda_ms']:.3f} | {tri} | {r['speedup']:.2f}× | {pct} |"
        )
    with open(os.path.join(args.out, f"{NAME}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
