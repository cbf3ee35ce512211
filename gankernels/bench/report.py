"""Writing the results: the environment, a Markdown table, CSV and JSON.

Everything lands in one folder (default ``benchmarks/results/<gpu-or-cpu>-<date>/``):
``results.json`` (all numbers, the environment, the command line — the file the README
section is rendered from), ``results.csv`` (one row per case and contender),
``results.md`` (the table), and the plots (:mod:`gankernels.bench.plots`).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from gankernels.bench.roofline import Ceilings
from gankernels.bench.runner import CaseSummary

SCHEMA_VERSION = 1
CPU_NOTE = (
    "Ran on CPU (no CUDA GPU): tiny shapes and few repeats, to show the protocol works; the headline numbers need a CUDA GPU."
)


def _run(cmd: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        return out or None
    except Exception:  # noqa: BLE001 - absent tool, no driver: the field stays empty
        return None


def environment(device: str, argv: Optional[list[str]] = None) -> dict:
    """Versions, the device and the command line, for the results file."""
    import gankernels

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_version = f"not importable ({e})"
    argv = list(sys.argv[1:] if argv is None else argv)
    env = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "command": "python -m gankernels.bench" + ("" if not argv else " " + shlex.join(argv)),
        "gankernels": gankernels.__version__,
        "git_commit": _run(["git", "-C", str(Path(gankernels.__file__).resolve().parents[1]), "rev-parse", "--short", "HEAD"]),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None,
        "gpu_sms": None,
        "driver": None,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "torch_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = p.name
        env["gpu_sms"] = p.multi_processor_count
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"])
    return env


def device_slug(env: dict) -> str:
    """``nvidia-h200`` / ``cpu``: the folder-name prefix for a run."""
    if env.get("gpu"):
        return re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
    return "cpu"


def default_out_dir(env: dict) -> Path:
    """``benchmarks/results/<gpu-or-cpu>-<date>/`` in the checkout (else the cwd)."""
    import gankernels

    root = Path(gankernels.__file__).resolve().parents[1]
    base = root / "benchmarks" / "results" if (root / "benchmarks").is_dir() else Path.cwd() / "benchmarks" / "results"
    return base / f"{device_slug(env)}-{env['date'][:10]}"


# ----------------------------------------------------------------------------------
# Formatting.


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "—"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 0.1:
        return f"{ms:.3f}"
    return f"{ms:.4f}"


def _cell(rec: Optional[dict]) -> str:
    if rec is None:
        return ""
    if rec["status"] == "ok":
        return fmt_ms(rec["ms"])
    return rec["status"]


def _ratio(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.0f} %"


COLUMN_ORDER = (
    "eager NCHW", "eager CL", "compile", "convT eager", "convT compile", "gk torch", "gk triton", "gk cuda",
    "kernel triton", "kernel cuda",
)  # fmt: skip


def contender_columns(cases: list[dict]) -> list[str]:
    """The contender columns the cases need: the known ones in table order, then any other."""
    cols: list[str] = []
    for c in cases:
        for name in c["contenders"]:
            if name not in cols:
                cols.append(name)
    return [n for n in COLUMN_ORDER if n in cols] + [n for n in cols if n not in COLUMN_ORDER]


def markdown_table(results: dict) -> str:
    """The per-case table (median ms per contender), the notes for every contender that
    did not run (``n/a``/``error``/``FAIL`` with the reason), and the training step."""
    cases = results["cases"]
    lines = []
    if cases:
        cols = contender_columns(cases)
        head = ["case", "floor ms", *cols, "best stock", "best gankernels", "speed-up", "% of floor"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |")
        for c in cases:
            row = [c["id"], fmt_ms(c["floor_ms"])]
            row += [_cell(c["contenders"].get(n)) for n in cols]
            row += [c["best_stock"] or "—", c["best_gankernels"] or "—", _ratio(c["speedup"]), _pct(c["pct_floor_best_gankernels"])]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append(
            "Median ms per contender; speed-up = best stock ÷ best gankernels; % of floor = roofline floor ÷ best gankernels "
            "time (floor = max(FLOPs / matmul rate, bytes / copy bandwidth), stock FLOPs for the up-conv cases). "
            "`kernel <backend>`: the backend's forward called directly (no dispatch, no custom op); never the best time."
        )
        notes: dict[tuple[str, str, str], list[str]] = {}
        for c in cases:
            for name, r in c["contenders"].items():
                if r["status"] != "ok":
                    notes.setdefault((name, r["status"], r["reason"]), []).append(c["id"])
        if notes:
            lines.append("")
            lines.append("Contenders that did not run or did not pass the reference check:")
            for (name, status, reason), ids in notes.items():
                where = ids[0] if len(ids) == 1 else f"{len(ids)} cases"
                lines.append(f"- {name}: {status}: {reason} ({where})")
    ts = results.get("train_step")
    if ts:
        lines.append("")
        lines.append(train_step_table(ts))
    return "\n".join(lines)


def short_table(results: dict) -> str:
    """One line per case: the best stock and best gankernels contender, speed-up, % of floor."""
    lines = [
        "| case | floor ms | best stock | ms | best gankernels | ms | speed-up | % of floor |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for c in results["cases"]:
        lines.append(
            f"| {c['id']} | {fmt_ms(c['floor_ms'])} | {c['best_stock'] or '—'} | {fmt_ms(c['best_stock_ms'])} | "
            f"{c['best_gankernels'] or '—'} | {fmt_ms(c['best_gankernels_ms'])} | {_ratio(c['speedup'])} | "
            f"{_pct(c['pct_floor_best_gankernels'])} |"
        )
    return "\n".join(lines)


def train_step_table(ts: dict) -> str:
    lines = [f"Training step ({ts['config']['description']}):", ""]
    lines.append("| variant | step ms | peak memory MiB | losses vs stock eager | status |")
    lines.append("| --- | ---: | ---: | ---: | --- |")
    for v in ts["variants"]:
        mem = "—" if v["peak_mem_mib"] is None else f"{v['peak_mem_mib']:.0f}"
        diff = "—" if v["max_loss_rel_diff"] is None else f"{v['max_loss_rel_diff']:.1e}"
        status = v["status"] + (f": {v['reason']}" if v["reason"] else "")
        lines.append(f"| {v['name']} | {fmt_ms(v['step_ms'])} | {mem} | {diff} | {status} |")
    lines.append("")
    lines.append(f"Speed-up of the best gankernels variant over the best stock one: {_ratio(ts['speedup'])}.")
    return "\n".join(lines)


def _gbps(nbytes: float, ms: Optional[float]) -> str:
    return "—" if not ms else f"{nbytes / (ms * 1e-3) / 1e9:.0f}"


def targets_table(results: dict) -> str:
    """Every case (and the training step) that ANCHORS.md sets a target for: the
    number reached and met / missed / incomplete (:mod:`gankernels.bench.targets`)."""
    from gankernels.bench.targets import COPY_BANDWIDTH, TRAIN_MEMORY, verdicts

    vs = verdicts(results)
    if not vs:
        return ""
    lines = [
        "Targets (ANCHORS.md):",
        "",
        "| target | case | bound | gankernels ms | against | stock ms | reached | verdict |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | --- |",
    ]
    for v in vs:
        if v.value is None:
            reached = "—"
        elif v.target.kind == COPY_BANDWIDTH:
            reached = f"{v.value:.0f} %"
        elif v.target.kind == TRAIN_MEMORY:
            reached = f"{v.value:.2f}×"
        else:
            reached = _ratio(v.value)
        verdict = v.status + (f" ({v.note})" if v.note and v.status != "met" else "")
        gk = f"{fmt_ms(v.gankernels_ms)} ({v.gankernels})" if v.gankernels_ms else (v.gankernels or "—")
        lines.append(
            f"| {v.target.name} | {v.case} | {v.target.describe()} | {gk} | {v.against or '—'} | {fmt_ms(v.against_ms)} | "
            f"{reached} | {verdict} |"
        )
    if results["env"]["device"] != "cuda":
        lines += ["", "On CPU these verdicts only show the bookkeeping: the targets are for the GPU of ANCHORS.md."]
    return "\n".join(lines)


def memory_bound_table(results: dict) -> str:
    """The memory-bound cases: bytes moved (as ANCHORS.md counts them), and per
    contender the time, GB/s and % of the copy bandwidth measured at the start."""
    from gankernels.bench.cases import CONV_OPS

    cases = [c for c in results["cases"] if c["op"] not in CONV_OPS and c.get("bytes")]  # "bytes": since 2026-12
    if not cases:
        return ""
    copy = results["ceilings"]["copy_bytes_per_s"]
    lines = [
        f"Memory-bound ops (copy bandwidth {copy / 1e9:.0f} GB/s; bytes as ANCHORS.md counts them):",
        "",
        "| case | MB | contender | ms | GB/s | % of copy |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for c in cases:
        for r in c["contenders"].values():
            if r["status"] != "ok":
                continue
            pct = 100.0 * c["bytes"] / (r["ms"] * 1e-3) / copy
            gbps = _gbps(c["bytes"], r["ms"])
            lines.append(f"| {c['id']} | {c['bytes'] / 1e6:.2f} | {r['contender']} | {fmt_ms(r['ms'])} | {gbps} | {pct:.0f} % |")
    return "\n".join(lines)


def backend_tables(results: dict) -> str:
    """One table per gankernels backend that ran: its time (and kernel-only time) per
    case against the best stock formulation, % of the floor, and on CUDA the memory
    its forward keeps for the backward next to stock eager's."""
    from gankernels.ops.dispatch import BACKENDS

    out = []
    for backend in BACKENDS:
        rows = []
        for c in results["cases"]:
            r = c["contenders"].get(f"gk {backend}")
            if r is None or r["status"] != "ok":
                continue
            k = c["contenders"].get(f"kernel {backend}")
            kernel = fmt_ms(k["ms"]) if k and k["status"] == "ok" else "—"
            stock = c["best_stock_ms"]
            eager = c["contenders"].get("eager CL") or {}
            mem = "—"
            if r.get("held_mib") is not None and eager.get("held_mib") is not None:
                mem = f"{eager['held_mib']:.0f} → {r['held_mib']:.0f}"
            rows.append(
                f"| {c['id']} | {fmt_ms(r['ms'])} | {kernel} | {fmt_ms(stock)} ({c['best_stock'] or '—'}) | "
                f"{_ratio(stock / r['ms'] if stock else None)} | {_pct(100.0 * c['floor_ms'] / r['ms'])} | {mem} |"
            )
        if rows:
            out += [
                f"Backend {backend}:",
                "",
                "| case | ms | kernel-only ms | best stock ms | speed-up | % of floor | fwd-held MiB, eager CL → it |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                *rows,
                "",
            ]
    return "\n".join(out).rstrip()


def extra_tables(results: dict) -> str:
    """The target verdicts, the memory-bound table and the per-backend tables."""
    parts = [targets_table(results), memory_bound_table(results), backend_tables(results)]
    return "\n\n".join(p for p in parts if p)


def header(results: dict) -> str:
    env, ce = results["env"], results["ceilings"]
    dev = env["gpu"] or f"CPU ({env['cpu_count']} cores)"
    lines = [
        f"# gankernels benchmark — {dev}, {env['date']}",
        "",
        f"`{env['command']}` · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · cuDNN {env['cudnn']}"
        + (f" · driver {env['driver']}" if env.get("driver") else "")
        + (f" · commit {env['git_commit']}" if env.get("git_commit") else ""),
        "",
        f"Ceilings measured at the start: copy {ce['copy_bytes_per_s'] / 1e9:.1f} GB/s ({ce['copy_what']}), "
        f"matmul {ce['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s ({ce['matmul_what']}).",
    ]
    if env["device"] != "cuda":
        lines += ["", CPU_NOTE]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# Files.


def assemble(env: dict, ceilings: Ceilings, summaries: list[CaseSummary], train_step: Optional[dict], options: dict) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "env": env,
        "options": options,
        "ceilings": dict(ceilings.__dict__),
        "cases": [s.as_dict() for s in summaries],
        "train_step": train_step,
    }


CSV_FIELDS = [
    "case", "op", "shape", "dtype", "fmt", "mode", "contender", "family", "status", "ms", "rel_l2_err", "tol",
    "reference", "reason", "held_mib", "peak_mib", "floor_ms", "bytes", "flops", "case_best_stock_ms",
    "case_best_gankernels_ms", "case_speedup",
]  # fmt: skip


def write_csv(results: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for c in results["cases"]:
            s = c["shape"]
            shape = f"{s['n']},{s['c']},{s['h']},{s['w']}:{s['co']}"
            for r in c["contenders"].values():
                w.writerow(
                    {
                        "case": c["id"], "op": c["op"], "shape": shape, "dtype": c["dtype"], "fmt": c["fmt"], "mode": c["mode"],
                        "contender": r["contender"], "family": r["family"], "status": r["status"], "ms": r["ms"],
                        "rel_l2_err": r["rel_l2_err"], "tol": r["tol"], "reference": r["reference"], "reason": r["reason"],
                        "held_mib": r.get("held_mib"), "peak_mib": r.get("peak_mib"), "floor_ms": c["floor_ms"],
                        "bytes": c.get("bytes"), "flops": c.get("flops"), "case_best_stock_ms": c["best_stock_ms"],
                        "case_best_gankernels_ms": c["best_gankernels_ms"], "case_speedup": c["speedup"],
                    }
                )  # fmt: skip
        ts = results.get("train_step")
        if ts:
            for v in ts["variants"]:
                w.writerow(
                    {
                        "case": "train_step " + ts["config"]["description"], "op": "train_step", "contender": v["name"],
                        "family": "gankernels" if v["name"].startswith("gankernels") else "stock", "status": v["status"],
                        "ms": v["step_ms"], "reason": v["reason"],
                    }
                )  # fmt: skip


def write_all(results: dict, out_dir: Path, plots: bool = True) -> dict[str, Path]:
    """Write results.json, results.csv, results.md and the plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "md": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_csv(results, paths["csv"])
    extra = extra_tables(results)
    paths["md"].write_text(header(results) + "\n\n" + markdown_table(results) + "\n" + (f"\n{extra}\n" if extra else ""))
    if plots:
        from gankernels.bench.plots import write_plots

        paths.update(write_plots(results, out_dir))
    return paths


def load_results(path: str | Path) -> dict:
    """A results.json, given it or the folder holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"results: no results.json at {p}; pass a folder written by `python -m gankernels.bench --out DIR`")
    data = json.loads(p.read_text())
    if data.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"results: {p} has schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")
    return data
