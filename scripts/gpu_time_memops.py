#!/usr/bin/env python3
"""Time the memory-bound ops, stock PyTorch vs the Triton kernels, against the GPU's
measured copy bandwidth (ANCHORS.md, "Stand-alone memory-bound ops").

    python scripts/gpu_time_memops.py --out DIR        # writes DIR/gpu_time_memops.{md,csv}

Measures the device copy bandwidth first (a 1 GiB ``Tensor.copy_``, bytes read +
written), then for max_pool2d 2×2, nearest 2× upsample and bias + leaky ReLU, forward
and backward, bf16 and fp16, channels_last and NCHW, on 64×128×64×64: the median time
(``triton.testing.do_bench``, L2 flushed between calls) of stock PyTorch and of the
Triton kernel (the backend function itself; ``api ms`` is the forward through the
public ``gankernels`` call, dispatch and custom op included). Bytes are counted as
ANCHORS.md does (the fewest an op must move):

* max-pool fwd: read x, write x/4; bwd: read grad/4 and an index/4 *of the same
  element size*, write grad_in. The kernels really move a saved tensor of their own
  (``% copy, actual``): ``max_pool2d`` is the training default (``return_indices=False``),
  which saves a 1-byte window code per output (x + x/4 + 1 B × numel/4 forward, grad/4
  + 1 B × numel/4 + grad_in backward); ``max_pool2d_idx64`` is ``return_indices=True``,
  PyTorch's 8-byte indices (8 B × numel/4 instead). Both have the same ANCHORS bytes and
  the same stock PyTorch times (stock always keeps int64 indices);
* upsample: read x, write 4x, and the reverse;
* bias + lrelu fwd: read x, write y; bwd: read x and grad, write grad_in. The stock
  backward is ``leaky_relu_backward`` alone; the Triton backward also produces the
  bias gradient (its per-tile partial sums are included in its time).

Each Triton result is checked against the stock one before timing (``check``).

``--smoke`` runs the same pipeline on CPU under ``TRITON_INTERPRET=1`` with a tiny
shape and a wall-clock timer, to test this script without a GPU (its times mean
nothing and it says so).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

NAME = "gpu_time_memops"
ANCHOR_SHAPE = (64, 128, 64, 64)
# Bytes per pooled output of what each max-pool row saves for its backward.
SAVED_BYTES = {"max_pool2d": 1, "max_pool2d_idx64": 8}  # int8 window code / int64 index


# ----------------------------------------------------------------------------------
# Byte accounting (pure, tested on CPU).


def anchor_bytes(op: str, direction: str, numel: int, esize: int) -> int:
    """Bytes the op must move as ANCHORS.md counts them; ``numel`` is the element count
    of the op's (full-resolution side) input x, ``esize`` its element size."""
    full = numel * esize
    if op in SAVED_BYTES:
        # fwd: x + x/4; bwd: grad/4 + index/4 (counted at the element size) + grad_in.
        return full + full // 4 if direction == "fwd" else full // 4 + full // 4 + full
    if op == "upsample2x":
        return full + 4 * full  # fwd: x + 4x; bwd: 4 grad + grad_in
    if op == "bias_lrelu":
        return 2 * full if direction == "fwd" else 3 * full
    raise ValueError(f"op: unknown op {op!r}")


def actual_bytes(op: str, direction: str, numel: int, esize: int) -> int:
    """Bytes the kernels really move (differs from :func:`anchor_bytes` only for
    max-pool, which saves ``SAVED_BYTES[op]`` per pooled output, not ``esize``)."""
    if op in SAVED_BYTES:
        full = numel * esize
        saved = (numel // 4) * SAVED_BYTES[op]
        # fwd: x + out + saved; bwd: grad + saved + grad_in (the same total).
        return full + full // 4 + saved
    return anchor_bytes(op, direction, numel, esize)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


@dataclass
class Row:
    op: str
    direction: str
    dtype: str
    layout: str
    stock_ms: float
    triton_ms: float
    api_ms: Optional[float]
    bytes_anchor: int
    bytes_actual: int
    copy_gbps: float
    check: str
    derived: dict = field(default_factory=dict)

    def finish(self) -> Row:
        d = self.derived
        d["stock_gbps"] = gbps(self.bytes_anchor, self.stock_ms)
        d["stock_pct"] = 100 * d["stock_gbps"] / self.copy_gbps
        d["triton_gbps"] = gbps(self.bytes_anchor, self.triton_ms)
        d["triton_pct"] = 100 * d["triton_gbps"] / self.copy_gbps
        d["triton_pct_actual"] = 100 * gbps(self.bytes_actual, self.triton_ms) / self.copy_gbps
        d["speedup"] = self.stock_ms / self.triton_ms
        return self


CSV_FIELDS = (
    "op", "direction", "dtype", "layout", "stock_ms", "stock_gbps", "stock_pct", "triton_ms", "triton_gbps", "triton_pct",
    "triton_pct_actual", "api_ms", "speedup", "bytes_anchor", "bytes_actual", "copy_gbps", "check",
)


def row_dict(r: Row) -> dict:
    d = dict(
        op=r.op, direction=r.direction, dtype=r.dtype, layout=r.layout, stock_ms=r.stock_ms, triton_ms=r.triton_ms,
        api_ms="" if r.api_ms is None else r.api_ms, bytes_anchor=r.bytes_anchor, bytes_actual=r.bytes_actual,
        copy_gbps=r.copy_gbps, check=r.check,
    )
    d.update(r.derived)
    return {k: d[k] for k in CSV_FIELDS}


def markdown(rows: list[Row], header: list[str]) -> str:
    lines = list(header)
    lines.append("")
    lines.append(
        "| op | dir | dtype | layout | stock ms | stock % copy | triton ms | triton GB/s | triton % copy | "
        "% copy, actual bytes | api ms | speed-up | check |"
    )
    lines.append("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        d = r.derived
        api = "-" if r.api_ms is None else f"{r.api_ms:.3f}"
        lines.append(
            f"| {r.op} | {r.direction} | {r.dtype} | {r.layout} | {r.stock_ms:.3f} | {d['stock_pct']:.0f} % | "
            f"{r.triton_ms:.3f} | {d['triton_gbps']:.0f} | {d['triton_pct']:.0f} % | {d['triton_pct_actual']:.0f} % | "
            f"{api} | {d['speedup']:.2f}× | {r.check} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str, rows: list[Row], header: list[str]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    md = markdown(rows, header)
    with open(os.path.join(out_dir, f"{NAME}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, f"{NAME}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(row_dict(r))
    return md


# ----------------------------------------------------------------------------------
# Timing.


def make_timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    if smoke:

        def wall(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

        return wall
    import triton.testing

    return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(timer, device: str, nbytes: int) -> float:
    """Device copy bandwidth in GB/s, bytes read + written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return gbps(2 * nbytes, ms)


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    if exact:
        return bool(torch.equal(a, b))
    from gankernels.testing import rel_l2_error, tolerance

    return rel_l2_error(a, b) <= tolerance(a.dtype)


def as_indices(saved: torch.Tensor, k: int, s: int, p: int, width: int) -> torch.Tensor:
    """PyTorch's flat per-plane indices from what the triton max-pool saved: int64
    indices as they are, int8 window codes ``ky * k + kx`` decoded."""
    if saved.dtype == torch.int64:
        return saved
    ho = torch.arange(saved.shape[2], device=saved.device).view(-1, 1)
    wo = torch.arange(saved.shape[3], device=saved.device).view(1, -1)
    code = saved.long()
    return (ho * s - p + code // k) * width + (wo * s - p + code % k)


def run_cases(timer, device: str, shape: tuple[int, ...], copy_gbps: float, dtypes, layouts) -> list[Row]:
    import gankernels
    from gankernels.triton import bias_act as tba
    from gankernels.triton import max_pool as tmp
    from gankernels.triton import upsample as tup

    n, c, h, w = shape
    numel = n * c * h * w
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []

    def add(op, direction, dtype, layout, stock, fast, api, check):
        esize = torch.empty((), dtype=dtype).element_size()
        ok = "ok" if check() else "MISMATCH"
        rows.append(
            Row(
                op, direction, str(dtype).replace("torch.", ""), layout,
                stock_ms=timer(stock), triton_ms=timer(fast), api_ms=None if api is None else timer(api),
                bytes_anchor=anchor_bytes(op, direction, numel, esize), bytes_actual=actual_bytes(op, direction, numel, esize),
                copy_gbps=copy_gbps, check=ok,
            ).finish()
        )
        print(markdown(rows[-1:], []).splitlines()[-1], flush=True)

    k2, s2, p0, d1 = [2, 2], [2, 2], [0, 0], [1, 1]

    def bench(dtype: torch.dtype, layout: str) -> None:
        """Every case of one dtype and layout (a function, so its tensors are freed on return)."""
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

        def rnd(*shp):
            return torch.randn(shp, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)

        x = rnd(*shape)
        b = torch.randn(c, generator=gen).to(device=device, dtype=dtype)

        # max_pool2d 2×2: the 1-byte window code (return_indices=False, what training
        # runs) and PyTorch's int64 indices (return_indices=True).
        ref_out, ref_idx = F.max_pool2d(x, 2, return_indices=True)
        g = rnd(*ref_out.shape)

        def stock_bwd():
            return torch.ops.aten.max_pool2d_with_indices_backward(g, x, k2, s2, p0, d1, False, ref_idx)

        for op, want_indices in (("max_pool2d", False), ("max_pool2d_idx64", True)):
            out, saved = tmp.max_pool2d_forward(x, k2, s2, p0, d1, False, want_indices)
            add(
                op, "fwd", dtype, layout,
                lambda: F.max_pool2d(x, 2),
                lambda wi=want_indices: tmp.max_pool2d_forward(x, k2, s2, p0, d1, False, wi),
                lambda wi=want_indices: gankernels.max_pool2d(x, 2, return_indices=wi, backend="triton"),
                lambda out=out, saved=saved: _same(out, ref_out, True) and _same(as_indices(saved, 2, 2, 0, w), ref_idx, True),
            )

            def pool_bwd(saved=saved, wi=want_indices):
                return tmp.max_pool2d_backward(g, x, saved, k2, s2, p0, d1, False, wi)

            add(op, "bwd", dtype, layout, stock_bwd, pool_bwd, None, lambda f=pool_bwd: _same(f(), stock_bwd(), True))
            del out, saved

        # nearest 2× upsample
        add(
            "upsample2x", "fwd", dtype, layout,
            lambda: F.interpolate(x, scale_factor=2, mode="nearest"),
            lambda: tup.upsample_nearest2d_forward(x, 2),
            lambda: gankernels.upsample_nearest2d(x, 2, backend="triton"),
            lambda: _same(tup.upsample_nearest2d_forward(x, 2), F.interpolate(x, scale_factor=2, mode="nearest"), True),
        )
        g = rnd(n, c, 2 * h, 2 * w)

        def up_bwd_stock():
            return torch.ops.aten.upsample_nearest2d_backward(g, [2 * h, 2 * w], [n, c, h, w], 2.0, 2.0)

        add(
            "upsample2x", "bwd", dtype, layout,
            up_bwd_stock,
            lambda: tup.upsample_nearest2d_backward(g, 2),
            None,
            lambda: _same(tup.upsample_nearest2d_backward(g, 2).float(), up_bwd_stock().float(), False),
        )

        # bias + leaky ReLU
        def ba_stock():
            return F.leaky_relu(x + b.view(1, -1, 1, 1), 0.2)

        add(
            "bias_lrelu", "fwd", dtype, layout,
            ba_stock,
            lambda: tba.bias_act_forward(x, b, "lrelu", 0.2, 1.0, None, 1),
            lambda: gankernels.bias_act(x, b, "lrelu", backend="triton"),
            lambda: _same(tba.bias_act_forward(x, b, "lrelu", 0.2, 1.0, None, 1), ba_stock(), False),
        )
        p = x + b.view(1, -1, 1, 1)
        g = rnd(*shape)
        add(
            "bias_lrelu", "bwd", dtype, layout,
            lambda: torch.ops.aten.leaky_relu_backward(g, p, 0.2, False),
            lambda: tba.bias_act_backward(g, x, b, None, "lrelu", 0.2, 1.0, None, 1),
            None,
            lambda: _same(
                tba.bias_act_backward(g, x, b, None, "lrelu", 0.2, 1.0, None, 1)[0],
                torch.ops.aten.leaky_relu_backward(g, p, 0.2, False),
                False,
            ),
        )

    for dtype in dtypes:
        for layout in layouts:
            bench(dtype, layout)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu_time_memops.md and .csv")
    ap.add_argument(
        "--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shape, meaningless times (tests the script)"
    )
    args = ap.parse_args(argv)

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 set before Python starts", file=sys.stderr)
            return 2
        device, shape, dtypes, copy_bytes = "cpu", (1, 3, 6, 10), (torch.float16,), 2**20
    else:
        if not torch.cuda.is_available():
            print(f"{NAME}: needs a CUDA GPU (use --smoke with TRITON_INTERPRET=1 to test the script on CPU)", file=sys.stderr)
            return 2
        device, shape, dtypes, copy_bytes = "cuda", ANCHOR_SHAPE, (torch.bfloat16, torch.float16), 2**30

    import triton

    timer = make_timer(args.smoke)
    start = time.time()
    copy_gbps = copy_bandwidth(timer, device, copy_bytes)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    header = [
        f"## Memory-bound ops: stock PyTorch vs Triton ({'SMOKE RUN, times meaningless' if args.smoke else gpu})",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {gpu}, torch {torch.__version__}, triton {triton.__version__}; "
        f"`python scripts/{NAME}.py {' '.join(sys.argv[1:] if argv is None else argv)}`.",
        f"Shape {'×'.join(map(str, shape))}; do_bench median, L2 flushed; copy bandwidth {copy_gbps:.0f} GB/s (read + write, "
        f"{copy_bytes >> 20} MiB copy_). GB/s and % copy count bytes as ANCHORS.md; '% copy, actual bytes' counts what "
        "the max-pool kernels really save and read back: max_pool2d (return_indices=False, training's default) a 1-byte "
        "window code, max_pool2d_idx64 (return_indices=True) PyTorch's 8-byte indices. "
        "bias_lrelu bwd: stock is leaky_relu_backward alone, triton also computes the bias gradient.",
    ]
    print("\n".join(header), flush=True)
    rows = run_cases(timer, device, shape, copy_gbps, dtypes, ("channels_last", "nchw"))
    md = write_outputs(args.out, rows, header)
    print(f"\n{NAME}: {len(rows)} rows in {time.time() - start:.0f} s\n")
    print(md)
    return 0 if all(r.check == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
