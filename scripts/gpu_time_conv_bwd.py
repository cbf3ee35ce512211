#!/usr/bin/env python3
"""Time forward+backward of the ANCHORS.md GAN blocks, Triton vs stock PyTorch, and the
activation memory each keeps for its backward; write a short table.

    python scripts/gpu_time_conv_bwd.py --out DIR     # DIR/gpu_time_conv_bwd.{md,csv}

Rows (bf16, channels_last, batch 64, leaky ReLU 0.2):
  * generator block     up_conv3x3    512→256 H8, 256→128 H16, 128→64 H32, 64→32 H64
  * discriminator block conv3x3_pool  3→64 H128, 64→128 H64, 128→256 H32, 256→512 H16
One step = forward, then backward of a fixed upstream gradient into x, w and b
(``triton.testing.do_bench`` median, L2 flushed, grads reset between calls).
Formulations: eager (cuDNN) channels_last, ``torch.compile`` of the same stock code
(its compile time counts against the time budget; skipped rows are reported, never
silently dropped), for the generator the exact transposed-convolution rewrite, and
``gankernels`` with ``backend="triton"`` (forward and backward Triton kernels).
Speed-up = fastest stock fwd+bwd / triton fwd+bwd; targets from ANCHORS.md
(generator ≥ 2×, discriminator ≥ 1.5×; the 3→64 row's target belongs to the CUDA
extension and is only reported here).

Memory: ``torch.cuda.memory_allocated`` held after a forward with grad enabled, minus
before (the output plus everything saved for backward), and the forward's peak
(``max_memory_allocated``), per block, stock eager vs triton.
The tables are rewritten after every row, so a timeout still leaves the rows done.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from gankernels.bench.cases import transposed_kernel

NAME = "gpu_time_conv_bwd"
ALPHA = 0.2
GEN_ROWS = [(512, 256, 8), (256, 128, 16), (128, 64, 32), (64, 32, 64)]
DISC_ROWS = [(3, 64, 128), (64, 128, 64), (128, 256, 32), (256, 512, 16)]
TARGET = {"generator": 2.0, "discriminator": 1.5}


def stock_generator(x, w, b):
    return F.leaky_relu(F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1), ALPHA)


def stock_discriminator(x, w, b):
    return F.max_pool2d(F.leaky_relu(F.conv2d(x, w, b, padding=1), ALPHA), 2)


def transposed_generator(x, w, b):
    # The weight transform is part of the step (it is differentiated through).
    return F.leaky_relu(F.conv_transpose2d(x, transposed_kernel(w), b, stride=2, padding=1), ALPHA)


def _bench(fn: Callable[[], object], grads: list[torch.Tensor]) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grads, return_mode="median"))


def _memory(fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """(MiB held after the forward, MiB peak during it), relative to before."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = fn()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    del y
    return held / 2**20, peak / 2**20


class Run:
    def __init__(self, out_dir: pathlib.Path, batch: int, budget_s: float, argv: list[str]):
        self.out_dir, self.batch, self.budget_s = out_dir, batch, budget_s
        self.start = time.time()
        self.csv_rows: list[dict] = []
        self.md_rows: list[str] = []
        self.notes: list[str] = []
        self.compiled: dict[str, Callable] = {}
        import triton

        props = torch.cuda.get_device_properties(0)
        self.header = [
            f"# Triton conv backward: forward+backward of the ANCHORS blocks ({datetime.date.today()})",
            "",
            f"`python {' '.join(argv)}` on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
            f"triton {triton.__version__}, cuDNN {torch.backends.cudnn.version()}; bf16 channels_last, batch {batch}, "
            "lrelu 0.2; do_bench median ms of forward+backward (grads to x, w, b).",
            "",
            "| block | Ci→Co, H | eager CL | compile CL | transposed CL | triton | speed-up vs best stock | target | "
            "fwd-held MiB stock → triton | fwd-peak MiB stock → triton |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]

    def elapsed(self) -> float:
        return time.time() - self.start

    def timed(self, what: str, fn: Callable[[], object], grads: list[torch.Tensor]) -> Optional[float]:
        try:
            return _bench(fn, grads)
        except Exception as e:  # a failing formulation is reported, not fatal
            self.notes.append(f"{what}: failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
            return None

    def row(self, block: str, ci: int, co: int, h: int) -> None:
        import gankernels
        import gankernels.triton.conv3x3_backward  # noqa: F401  (registers the backward)

        dtype = torch.bfloat16
        g = torch.Generator(device="cuda").manual_seed(ci * 7 + h)
        x = torch.randn(self.batch, ci, h, h, device="cuda", generator=g).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        w = (torch.randn(co, ci, 3, 3, device="cuda", generator=g) / (3 * math.sqrt(ci))).to(dtype).requires_grad_()
        b = (torch.randn(co, device="cuda", generator=g) * 0.1).to(dtype).requires_grad_()
        gen = block == "generator"
        stock = stock_generator if gen else stock_discriminator
        op = gankernels.up_conv3x3 if gen else gankernels.conv3x3_pool
        ho = 2 * h if gen else h // 2
        grad = torch.randn(self.batch, co, ho, ho, device="cuda", generator=g).to(dtype)
        grad = grad.contiguous(memory_format=torch.channels_last)
        grads = [x, w, b]
        shape = f"{ci}→{co}, {h}"

        def step(fn):
            def run():
                fn(x, w, b).backward(grad)

            return run

        def fused(x_, w_, b_):
            return op(x_, w_, b_, act="lrelu", alpha=ALPHA, backend="triton")

        t: dict[str, Optional[float]] = {}
        t["eager CL"] = self.timed(f"{block} {shape} eager", step(stock), grads)
        if self.elapsed() < 0.6 * self.budget_s:
            cf = self.compiled.setdefault(block, torch.compile(stock, dynamic=False))
            t["compile CL"] = self.timed(f"{block} {shape} compile", step(cf), grads)
        else:
            t["compile CL"] = None
            self.notes.append(f"{block} {shape}: torch.compile skipped (time budget)")
        t["transposed CL"] = self.timed(f"{block} {shape} transposed", step(transposed_generator), grads) if gen else None
        t["triton"] = self.timed(f"{block} {shape} triton", step(fused), grads)

        # Correctness of the timed path, against stock in fp32 on the same bf16 inputs.
        errs = []
        for fn in (fused, lambda a, c, d: stock(a.float(), c.float(), d.float())):
            for p in grads:
                p.grad = None
            fn(x, w, b).backward(grad if fn is fused else grad.float())
            errs.append([p.grad.float().clone() for p in grads])
        for p in grads:
            p.grad = None
        rel = max(
            float(torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e)) for a, e in zip(errs[0], errs[1], strict=True)
        )

        mem_stock = _memory(lambda: stock(x, w, b))
        mem_ours = _memory(lambda: fused(x, w, b))

        stock_best = min((v for k, v in t.items() if k != "triton" and v is not None), default=None)
        ratio = stock_best / t["triton"] if (stock_best and t["triton"]) else None
        target = TARGET[block]
        if block == "discriminator" and ci == 3:
            verdict = f"({target}× — row owned by the CUDA extension)"
        elif ratio is None:
            verdict = f"{target}×: not measured"
        else:
            verdict = f"{target}×: {'met' if ratio >= target else 'NOT met'}"

        def ms(v):
            return "—" if v is None else f"{v:.3f}"

        self.md_rows.append(
            f"| {block} | {shape} | {ms(t['eager CL'])} | {ms(t['compile CL'])} | {ms(t['transposed CL'])} | {ms(t['triton'])} | "
            f"{'—' if ratio is None else f'{ratio:.2f}×'} | {verdict} | {mem_stock[0]:.0f} → {mem_ours[0]:.0f} | "
            f"{mem_stock[1]:.0f} → {mem_ours[1]:.0f} |"
        )
        for k, v in t.items():
            self.csv_rows.append(dict(block=block, ci=ci, co=co, h_in=h, variant=k, fwd_bwd_ms="" if v is None else f"{v:.4f}"))
        self.csv_rows.append(dict(block=block, ci=ci, co=co, h_in=h, variant="grad rel err vs fp32 stock", fwd_bwd_ms=f"{rel:.2e}"))
        for name, (held, peak) in (("stock", mem_stock), ("triton", mem_ours)):
            self.csv_rows.append(dict(block=block, ci=ci, co=co, h_in=h, variant=f"{name} fwd held MiB", fwd_bwd_ms=f"{held:.1f}"))
            self.csv_rows.append(dict(block=block, ci=ci, co=co, h_in=h, variant=f"{name} fwd peak MiB", fwd_bwd_ms=f"{peak:.1f}"))
        if rel > 3e-2:
            self.notes.append(f"{block} {shape}: triton gradients differ from fp32 stock by {rel:.2e} (relative L2)")
        self.write()

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lines = self.header + self.md_rows + [""]
        lines += [f"- {n}" for n in self.notes]
        lines.append(f"- elapsed {self.elapsed():.0f} s (budget {self.budget_s:.0f} s)")
        (self.out_dir / f"{NAME}.md").write_text("\n".join(lines) + "\n")
        with open(self.out_dir / f"{NAME}.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["block", "ci", "co", "h_in", "variant", "fwd_bwd_ms"])
            wr.writeheader()
            wr.writerows(self.csv_rows)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=pathlib.Path, help="directory for gpu_time_conv_bwd.{md,csv}")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--budget", type=float, default=160.0, help="seconds; rows past it are reported as skipped")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_time_conv_bwd: no CUDA GPU; nothing measured", file=sys.stderr)
        return 0
    torch.backends.cudnn.benchmark = True
    run = Run(args.out, args.batch, args.budget, ["scripts/gpu_time_conv_bwd.py", *argv])
    rows = [("generator", *r) for r in GEN_ROWS] + [("discriminator", *r) for r in DISC_ROWS]
    for block, ci, co, h in rows:
        if run.elapsed() > args.budget:
            run.notes.append(f"{block} {ci}→{co}, {h}: skipped (time budget)")
            run.write()
            continue
        try:
            run.row(block, ci, co, h)
            print(run.md_rows[-1], flush=True)
        except Exception as e:  # one broken row must not lose the others
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            run.notes.append(f"{block} {ci}→{co}, {h}: FAILED ({type(e).__name__}: {msg})")
            run.write()
            print(run.notes[-1], flush=True)
    run.write()
    print((args.out / f"{NAME}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
