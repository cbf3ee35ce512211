"""The static bound beside the measured time: how far the sm_90 machine-code bound
(:mod:`gankernels.bench.static_report`) predicts what a GPU run measured.

    python -m gankernels.bench.bound_vs_time RESULTS [--static STATIC_JSON] [--out FILE]

``RESULTS``: a benchmark run's ``results.json`` (or its folder) from a GPU, e.g. the
``targets`` or ``conv-fwd`` selection, which time each forward ANCHORS row's Triton kernel
alone (the ``kernel triton`` contender). ``--static``: the report recorded for the triton
release the run used (default: ``benchmarks/results/static-<the run's triton>/static.json``).

For each forward row both know (conv3x3, the discriminator block = conv3x3_pool, the
generator block = up_conv3x3; bf16, channels_last), one line:

* rows the tensor cores bound: the kernel's **% of tensor peak** (the multiply-adds the
  convolution needs — the sub-pixel up-conv's 4 taps per phase, not stock's 9 — over the
  time, against 132 SMs × 2048 bf16 multiply-adds per cycle at 1.98 GHz, the constants
  the bound uses) beside the bound's ceiling min(1, 1/load) for the main loop and for the
  whole CTA (prologue and epilogue counted);
* rows the memory bounds (the 3-channel first layer): the kernel's **% of copy
  bandwidth** (the layer's compulsory bytes, the pooled op's int8 positions included, over
  the time, against the copy rate the same run measured) beside min(1, 1/memory-time load);
* **of bound** = measured ÷ bound: 100 % would mean the kernel runs at the rate its
  instruction stream allows; below it, stalls the bound does not count (memory latency,
  barriers, tails) take the rest.

A bound is not a time: it is the most the machine code allows. The constants are the H200's;
the run's GPU is named in the table's heading.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

from gankernels.bench import static_report
from gankernels.bench.report import fmt_ms, load_results
from gankernels.bench.sass import SM90_MACS_PER_CYCLE

# The benchmark's forward ops and the kernel's static op they time.
STATIC_OP = {"conv3x3": "conv3x3", "disc_block": "conv3x3_pool", "gen_block": "up_conv3x3"}
KERNEL_CONTENDER = "kernel triton"
TENSOR_PEAK_FLOPS = 2 * SM90_MACS_PER_CYCLE["BF16"] * static_report.H200_SMS * static_report.H200_SM_CLOCK_HZ


@dataclasses.dataclass
class BoundRow:
    case: str
    static_key: str  # "forward <op> <Ci->Co @H> <config>"
    kernel_ms: float
    best_stock: str
    best_stock_ms: Optional[float]
    measure: str  # "tensor peak" or "copy bandwidth"
    measured: float  # fraction of that peak
    bound: float  # the main loop's ceiling (tensor) or min(1, 1/memory-time load)
    cta_bound: Optional[float]  # tensor rows: min(1, 1/CTA load), prologue and epilogue counted

    @property
    def of_bound(self) -> float:
        return self.measured / self.bound


def static_shape(case: dict) -> Optional[str]:
    """``"forward <op> <Ci->Co @H>"``, the static report's name of the row a benchmark case
    times, or None when the report has no such row (other ops, dtypes, layouts, modes)."""
    op = STATIC_OP.get(case["op"])
    if op is None or case["dtype"] != "bf16" or case["fmt"] != "channels_last" or case["mode"] != "fwd":
        return None
    s = case["shape"]
    return f"forward {op} {s['c']}->{s['co']} @{s['h']}"


def useful_flops(case: dict) -> float:
    """Floating-point operations the kernel's convolution needs (multiply-add = 2): the
    sub-pixel up-conv has 4 taps per output phase, the others 9."""
    s = case["shape"]
    if STATIC_OP[case["op"]] == "up_conv3x3":
        return 2.0 * s["n"] * s["co"] * (2 * s["h"]) * (2 * s["w"]) * 4 * s["c"]
    return 2.0 * s["n"] * s["co"] * s["h"] * s["w"] * 9 * s["c"]


def preferred_rows(static: dict[str, dict]) -> dict[str, dict]:
    """The report's first-configuration rows by ``"kernel op shape"``."""
    return {" ".join(k.split(" ")[:4]): r for k, r in static.items() if r["preferred"]}


def rows(results: dict, static: dict[str, dict]) -> list[BoundRow]:
    """One :class:`BoundRow` per case of ``results`` that the static report has a row for
    and whose Triton kernel was timed."""
    copy_rate = results["ceilings"]["copy_bytes_per_s"]
    by_shape = preferred_rows(static)
    out = []
    for case in results["cases"]:
        name = static_shape(case)
        srow = by_shape.get(name) if name else None
        rec = case["contenders"].get(KERNEL_CONTENDER)
        if srow is None or rec is None or rec["status"] != "ok" or srow["error"]:
            continue
        seconds = rec["ms"] / 1e3
        s = case["shape"]
        if srow["epilogue_floor_load"] > static_report.TENSOR_TARGET:  # judged on memory (Row.memory_bound)
            op = "pool" if srow["op"] == "conv3x3_pool" else "conv"
            nbytes = static_report.forward_hbm_bytes(op, s["c"], s["co"], s["h"], s["n"])
            measure, measured = "copy bandwidth", nbytes / seconds / copy_rate
            bound, cta_bound = min(1.0, 1.0 / srow["memory_time_load"]), None
        else:
            measure, measured = "tensor peak", useful_flops(case) / seconds / TENSOR_PEAK_FLOPS
            bound = min(1.0, 1.0 / srow["useful_issue_load"])
            cta_bound = min(1.0, 1.0 / srow["cta_issue_load"]) if srow["cta_issue_load"] else None
        out.append(
            BoundRow(
                case["id"], f"{name} {srow['config']}", rec["ms"], case["best_stock"] or "—", case["best_stock_ms"],
                measure, measured, bound, cta_bound,
            )
        )  # fmt: skip
    return out


def markdown(found: list[BoundRow], results: dict, static_source: str) -> str:
    env = results["env"]
    lines = [
        f"Static bound beside the measured time ({env.get('gpu') or 'CPU'}, torch {env.get('torch')}, "
        f"triton {env.get('triton')}; bound: `{static_source}`). The bound is the most the sm_90 machine code "
        "allows, not a time; 'of bound' = measured ÷ bound.",
        "",
        "| case | kernel | Triton kernel ms | best stock ms | measured | bound (main loop) | bound (whole CTA) | of bound |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in found:
        stock = f"{fmt_ms(r.best_stock_ms)} ({r.best_stock})" if r.best_stock_ms else "—"
        cta = f"{100 * r.cta_bound:.0f} %" if r.cta_bound is not None else "—"
        lines.append(
            f"| {r.case} | {r.static_key} | {fmt_ms(r.kernel_ms)} | {stock} | {100 * r.measured:.0f} % of {r.measure} "
            f"| {100 * r.bound:.0f} % | {cta} | {100 * r.of_bound:.0f} % |"
        )
    if not found:
        lines.append("| (no forward bf16 channels_last row with a Triton kernel time and a static row) | | | | | | | |")
    return "\n".join(lines) + "\n"


def static_path_for(results: dict) -> Path:
    """The recorded report of the triton release the run used."""
    return static_report.default_out_dir().parent / f"static-{results['env'].get('triton')}" / "static.json"


def render(results_path: Path, static_path: Optional[Path] = None) -> str:
    results = load_results(results_path)
    path = static_path or static_path_for(results)
    if not path.is_file():
        raise FileNotFoundError(f"--static: {path} not found; record it with `python -m gankernels.bench static` on that triton")
    return markdown(rows(results, static_report.load(path)), results, str(path))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gankernels.bench.bound_vs_time", description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a GPU run's results.json (or its folder)")
    p.add_argument("--static", type=Path, help="static.json (default: the one recorded for the run's triton release)")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    try:
        text = render(args.results, args.static)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        raise SystemExit(f"bound_vs_time: {e}") from None
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
