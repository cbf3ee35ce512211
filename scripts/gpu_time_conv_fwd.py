#!/usr/bin/env python3
"""Time the Triton fused 3×3 convolution forward against stock PyTorch on the
ANCHORS.md blocks (batch 64, leaky ReLU 0.2), and write a short table.

    python scripts/gpu_time_conv_fwd.py --out DIR     # DIR/gpu_time_conv_fwd.{md,csv}

Rows, in this order (a time budget skips the tail, never silently):
  * generator block  up_conv3x3   512→256 H8, 256→128 H16, 128→64 H32, 64→32 H64, bf16
  * discriminator    conv3x3_pool 3→64 H128, 64→128 H64, 128→256 H32, 256→512 H16, bf16
  * conv3x3 + bias + lrelu alone on the discriminator shapes, bf16
  * the generator and discriminator blocks again in fp32 (TF32 when
    torch.backends.cudnn.allow_tf32, the default, for cuDNN and Triton alike)
Stock formulations: eager NCHW, eager channels_last, torch.compile of the stock code
(bf16 only, compile time counts against the budget) and, for the generator, the exact
transposed-convolution rewrite (4/9 of the FLOPs through cuDNN). "triton" is the
public op (``gankernels.up_conv3x3(..., backend="triton")``, dispatch included);
"kernel" the module-level forward alone. Speed-up = best stock / triton. Floor =
max(stock FLOPs / measured bf16 matmul rate, bytes / measured copy bandwidth), as
ANCHORS.md defines it; "% floor" = floor / triton time.

Timing: ``triton.testing.do_bench`` median (L2 flushed between calls), warmed up,
all formulations in the same process on the same inputs. Imports nothing GPU-only
at module level, so the tests can import the stock formulations on CPU.
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

NAME = "gpu_time_conv_fwd"
ALPHA = 0.2
GEN_ROWS = [(512, 256, 8), (256, 128, 16), (128, 64, 32), (64, 32, 64)]
DISC_ROWS = [(3, 64, 128), (64, 128, 64), (128, 256, 32), (256, 512, 16)]
TARGETS = {"generator": 2.0, "discriminator": 1.5, "conv3x3": 1.2, "generator fp32": 1.5, "discriminator fp32": 1.5}
DISC_FIRST_ROW_TARGET = 5.0  # ANCHORS: the 3→64 discriminator row ≥ 5×


# ----------------------------------------------------------------------------------
# Stock formulations (also used by the CPU test of the transposed-conv rewrite).


def stock_generator_block(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], alpha: float = ALPHA) -> torch.Tensor:
    """nearest 2× upsample → conv3x3 + bias → leaky ReLU, as a PyTorch user writes it."""
    return F.leaky_relu(F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1), alpha)


def transposed_generator_block(x: torch.Tensor, wt: torch.Tensor, b: Optional[torch.Tensor], alpha: float = ALPHA) -> torch.Tensor:
    """The generator block as one exact transposed convolution (``wt`` from
    :func:`gankernels.bench.cases.transposed_kernel`)."""
    return F.leaky_relu(F.conv_transpose2d(x, wt, b, stride=2, padding=1), alpha)


def stock_discriminator_block(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], alpha: float = ALPHA) -> torch.Tensor:
    """conv3x3 + bias → leaky ReLU → 2×2 max-pool."""
    return F.max_pool2d(F.leaky_relu(F.conv2d(x, w, b, padding=1), alpha), 2)


def stock_conv_block(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], alpha: float = ALPHA) -> torch.Tensor:
    """conv3x3 + bias (cuDNN) then the separate leaky-ReLU epilogue."""
    return F.leaky_relu(F.conv2d(x, w, b, padding=1), alpha)


# ----------------------------------------------------------------------------------
# Measurement.


def _bench(fn: Callable[[], object]) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _matmul_rate(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (_bench(lambda: a @ bm) * 1e-3)


def _copy_bandwidth(numel: int = 256 * 2**20) -> float:
    src = torch.empty(numel, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * numel * 4 / (_bench(lambda: dst.copy_(src)) * 1e-3)


def measure_ceilings() -> tuple[float, float]:
    """(bf16 matmul FLOP/s, device copy bytes/s read + written), measured now on this GPU."""
    flops = _matmul_rate()
    bw = _copy_bandwidth()
    torch.cuda.empty_cache()
    return flops, bw


def rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    o, e = out.float(), expect.float()
    return float(torch.linalg.vector_norm(o - e) / torch.linalg.vector_norm(e))


# ----------------------------------------------------------------------------------
# The run.


class Run:
    def __init__(self, out_dir: pathlib.Path, batch: int, budget_s: float, device: str = "cuda"):
        self.device = device  # "cpu" only for the CPU test of this script's bookkeeping
        self.out_dir = out_dir
        self.batch = batch
        self.budget_s = budget_s
        self.start = time.time()
        self.csv_rows: list[dict] = []
        self.md_rows: list[str] = []
        self.notes: list[str] = []
        self.header: list[str] = []
        self.compiled: dict[str, Callable] = {}

    def elapsed(self) -> float:
        return time.time() - self.start

    def time_one(self, block: str, dtype: str, shape: str, variant: str, fn: Callable[[], object]) -> Optional[float]:
        try:
            ms = _bench(fn)
        except Exception as e:  # a failing formulation is reported, not fatal
            self.notes.append(f"{block} {dtype} {shape} {variant}: failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            ms = None
        self.csv_rows.append(dict(block=block, dtype=dtype, shape=shape, variant=variant, ms="" if ms is None else f"{ms:.4f}"))
        return ms

    def compiled_fn(self, name: str, fn: Callable) -> Callable:
        if name not in self.compiled:
            self.compiled[name] = torch.compile(fn, dynamic=False)
        return self.compiled[name]

    def row(self, block: str, ci: int, co: int, h: int, dtype: torch.dtype, ceilings: tuple[float, float]) -> None:
        import gankernels
        from gankernels.triton import conv3x3 as tconv

        n = self.batch
        dname = str(dtype).replace("torch.", "")
        shape = f"{ci}→{co}, {h}"
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(ci * 7 + h)
        x = torch.randn(n, ci, h, h, device=dev, dtype=dtype, generator=g)
        w = (torch.randn(co, ci, 3, 3, device=dev, generator=g) / (3 * math.sqrt(ci))).to(dtype)
        b = (torch.randn(co, device=dev, generator=g) * 0.1).to(dtype)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        w_cl = w.contiguous(memory_format=torch.channels_last)
        kind = block.split()[0]
        if kind == "generator":
            stock, op, fwd = stock_generator_block, gankernels.up_conv3x3, tconv.up_conv3x3_forward
        elif kind == "discriminator":
            stock, op, fwd = stock_discriminator_block, gankernels.conv3x3_pool, tconv.conv3x3_pool_forward
        else:
            stock, op, fwd = stock_conv_block, gankernels.conv3x3, tconv.conv3x3_forward
        ho = 2 * h if kind == "generator" else h  # the 3×3 conv's output size, as stock computes it
        times: dict[str, Optional[float]] = {}
        with torch.no_grad():
            times["eager NCHW"] = self.time_one(block, dname, shape, "eager NCHW", lambda: stock(x, w, b))
            times["eager CL"] = self.time_one(block, dname, shape, "eager CL", lambda: stock(x_cl, w_cl, b))
            if dtype != torch.float32:
                if self.elapsed() < 0.6 * self.budget_s:
                    cf = self.compiled_fn(kind, stock)
                    times["compile CL"] = self.time_one(block, dname, shape, "compile CL", lambda: cf(x_cl, w_cl, b))
                else:
                    times["compile CL"] = None
                    self.notes.append(f"{block} {shape}: torch.compile skipped (time budget)")
            if kind == "generator":
                wt = transposed_kernel(w.float()).to(dtype).contiguous(memory_format=torch.channels_last)
                times["transposed CL"] = self.time_one(
                    block, dname, shape, "transposed CL", lambda: transposed_generator_block(x_cl, wt, b)
                )
            t_op = self.time_one(block, dname, shape, "triton", lambda: op(x_cl, w, b, act="lrelu", alpha=ALPHA, backend="triton"))
            t_kernel = self.time_one(block, dname, shape, "triton kernel", lambda: fwd(x_cl, w, b, "lrelu", ALPHA, 1.0, None))
            # The stock result in fp32 on the same (rounded) inputs is the yardstick here;
            # the GPU tests compare against float64.
            try:
                ours = op(x_cl, w, b, act="lrelu", alpha=ALPHA, backend="triton")
                err = rel_err(ours, stock(x_cl.float(), w_cl.float(), b.float()))
            except Exception as e:
                self.notes.append(f"{block} {dname} {shape} triton check: failed ({type(e).__name__}: {str(e)[:160]})")
                err = float("nan")
        best_name, best = min(((k, v) for k, v in times.items() if v is not None), key=lambda kv: kv[1], default=("-", None))
        if kind == "conv3x3":  # the target is against cuDNN + the separate epilogue
            best_name, best = "eager CL", times["eager CL"]
        speedup = best / t_op if (best and t_op) else None
        flops = 2 * n * co * ci * 9 * ho * ho
        out_numel = n * co * (ho // 2 if kind == "discriminator" else ho) ** 2
        nbytes = (x.numel() + out_numel + w.numel()) * x.element_size()
        floor_ms = max(flops / ceilings[0], nbytes / ceilings[1]) * 1e3
        target = TARGETS[block]
        if kind == "discriminator" and ci == 3 and dtype != torch.float32:
            target = DISC_FIRST_ROW_TARGET
        cfg = "-"
        if x.device.type == "cuda":
            tuned = tconv._tuned.get(tconv._gpu_family(x.device))
            bc = getattr(tuned, "best_config", None)
            if bc is not None:
                kw = bc.kwargs
                cfg = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}/w{bc.num_warps}s{bc.num_stages}"

        def fmt(v: Optional[float]) -> str:
            return "-" if v is None else f"{v:.3f}"

        met = "-" if speedup is None else ("yes" if speedup >= target else "no")
        self.md_rows.append(
            f"| {block} | {dname} | {shape} | {floor_ms:.3f} | {fmt(times.get('eager NCHW'))} | {fmt(times.get('eager CL'))} | "
            f"{fmt(times.get('compile CL'))} | {fmt(times.get('transposed CL'))} | {fmt(t_op)} | {fmt(t_kernel)} | "
            f"{'-' if speedup is None else f'{speedup:.2f}×'} ({best_name}) | ≥{target}× {met} | "
            f"{'-' if not t_op else f'{100 * floor_ms / t_op:.0f} %'} | {err:.1e} | {cfg} |"
        )
        self.csv_rows.append(dict(block=block, dtype=dname, shape=shape, variant="summary",
                                  ms="" if t_op is None else f"{t_op:.4f}",
                                  speedup="" if speedup is None else f"{speedup:.3f}", best_stock=best_name,
                                  floor_ms=f"{floor_ms:.4f}", target=target, rel_err=f"{err:.2e}", config=cfg))
        print(self.md_rows[-1], flush=True)
        self.write()

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        md = list(self.header)
        md += [
            "| block | dtype | Ci→Co, H_in | floor ms | eager NCHW | eager CL | compile CL | transposed CL | triton "
            "| kernel only | speed-up (vs) | target | % floor | rel err | config |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        md += self.md_rows
        md.append("")
        md.append(f"Total {self.elapsed():.0f} s (compilation and autotuning included).")
        md += [f"- {n}" for n in self.notes]
        (self.out_dir / f"{NAME}.md").write_text("\n".join(md) + "\n")
        fields = ["block", "dtype", "shape", "variant", "ms", "speedup", "best_stock", "floor_ms", "target", "rel_err", "config"]
        with open(self.out_dir / f"{NAME}.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=fields)
            wr.writeheader()
            for r in self.csv_rows:
                wr.writerow({k: r.get(k, "") for k in fields})


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=pathlib.Path, help="directory for gpu_time_conv_fwd.md/.csv")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--budget", type=float, default=160.0, help="seconds; later rows are skipped past it (default 160)")
    args = ap.parse_args(argv)

    run = Run(args.out, args.batch, args.budget)
    run.header = [f"## Triton conv3x3 forward vs stock PyTorch ({datetime.date.today()})", ""]
    if not torch.cuda.is_available():
        run.header.append("No CUDA device: nothing measured.")
        run.write()
        print("no CUDA device; nothing measured", file=sys.stderr)
        return 0
    import triton

    import gankernels  # noqa: F401  (registers the backends)

    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    props = torch.cuda.get_device_properties(0)
    ceilings = measure_ceilings()
    run.header += [
        f"`python {' '.join(sys.argv)}` on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"triton {triton.__version__}, cuDNN {torch.backends.cudnn.version()}, batch {args.batch}, leaky ReLU {ALPHA}, "
        f"fwd only, ms = do_bench median. Ceilings measured now: bf16 matmul {ceilings[0] / 1e12:.0f} TFLOP/s, "
        f"copy {ceilings[1] / 1e12:.2f} TB/s. fp32 runs TF32 (cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}).",
        "",
    ]
    run.write()
    plan = [("generator", r, torch.bfloat16) for r in GEN_ROWS]
    plan += [("discriminator", r, torch.bfloat16) for r in DISC_ROWS]
    plan += [("conv3x3", r, torch.bfloat16) for r in DISC_ROWS]
    plan += [("generator fp32", r, torch.float32) for r in GEN_ROWS]
    plan += [("discriminator fp32", r, torch.float32) for r in DISC_ROWS]
    for block, (ci, co, h), dtype in plan:
        if run.elapsed() > args.budget:
            run.notes.append(f"{block} {ci}→{co}, {h}: skipped (time budget {args.budget:.0f} s)")
            continue
        run.row(block, ci, co, h, dtype, ceilings)
        torch.cuda.empty_cache()
    run.write()
    print(f"wrote {args.out / (NAME + '.md')} in {run.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
