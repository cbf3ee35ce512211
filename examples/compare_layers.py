#!/usr/bin/env python
"""Train the same GAN twice from the same seed, in stock torch layers and in gankernels'
fused layers, and print the digits judge's scores and the speed of both in one table.

    python examples/compare_layers.py                                   # the demo's settings, both layer kinds
    python examples/compare_layers.py --out docs/demo_compare.md        # also write the table (Markdown)
    python examples/compare_layers.py --steps 3000 --batch-size 64      # any train_gan.py option except --layers

The runs go to ``runs/<name>-stock/`` and ``runs/<name>-gankernels/`` (``--name``,
default ``compare``). Both start from the same weights and see the same batches and
noise, so any difference comes from the layers' arithmetic: float rounding makes two
GAN runs drift apart over many steps, but the scores should agree within the run-to-run
spread. On a CPU the gankernels layers run their torch reference composites (the Triton
and CUDA kernels need a GPU), so there the images/s column compares the same math
arranged differently, not the fused kernels.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

import gankernels

# isort: split
# train_gan.py and digits_judge.py sit next to this script (on sys.path when the script runs).
import train_gan

COLUMNS = ("layers", "images/s", "train s", "CPU s", "recognisable", "coverage", "entropy", "Fréchet", "loss D", "loss G")


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    p.add_argument("--out", default=None, metavar="FILE", help="also write the table, with the command and machine, to FILE")
    p.add_argument("--name", default="compare", help="run names: <name>-stock and <name>-gankernels (default: %(default)s)")
    own, rest = p.parse_known_args(argv)
    if any(a == "--layers" or a.startswith("--layers=") for a in rest):
        p.error("--layers: this script trains both layer kinds; leave --layers out")
    if any(a == "--resume" or a.startswith("--resume=") for a in rest):
        p.error("--resume: each comparison trains from scratch; leave --resume out")
    return own, rest


def row(layers: str, summary: dict[str, Any], cpu_seconds: float) -> list[str]:
    """One table row from :func:`train_gan.train`'s summary and the process CPU time of
    the whole run (judge included): on a busy machine wall-clock time stretches, CPU time
    much less."""
    train_s = summary["seconds"] - summary["judge_seconds"]
    cells = [layers, f"{summary['images_per_s']:.0f}", f"{train_s:.0f}", f"{cpu_seconds:.0f}"]
    if summary["metrics"]:
        _, m = summary["metrics"][-1]
        cells += [f"{100 * m.recognisable:.0f}%", f"{m.coverage}/10", f"{m.entropy:.2f}", f"{m.frechet:.2f}"]
    else:
        cells += ["—"] * 4
    return cells + [f"{summary['loss_D']:.3f}", f"{summary['loss_G']:.3f}"]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| --- |" + " ---: |" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    own, rest = parse_args(argv)
    load_before = os.getloadavg()[0]
    rows, settings = [], None
    for layers in ("stock", "gankernels"):
        args = train_gan.parse_args([*rest, "--name", f"{own.name}-{layers}", "--layers", layers, "--overwrite"])
        cpu = time.process_time()
        summary = train_gan.train(args)
        settings = args
        rows.append(row(layers, summary, time.process_time() - cpu))
    table = markdown_table(rows)
    a = settings
    described = (
        f"{a.steps} steps, batch {a.batch_size}, width {a.width}, {a.resolution}×{a.resolution}, "
        f"D width {a.d_width} depth {a.d_depth}, mapping {a.mapping}, lr {a.lr} (D {a.lr_d}), betas {tuple(a.betas)}, "
        f"r1 {a.r1} every {a.r1_every}"
        + (f", lr ramp-down {a.lr_rampdown}" if a.lr_rampdown else "")
        + (f", translate {a.translate}" if a.translate else "")
        + (f", mbstd {a.mbstd}" if a.mbstd else "")
        + f", ema {a.ema}, seed {a.seed}, amp {a.amp}; "
        f"judged on {a.eval_samples} samples from fixed noise at the last step; "
        "losses: mean of the last 50 steps"
    )
    print(f"\nstock vs gankernels layers, same seed ({described}):\n{table}")
    if own.out:
        command = " ".join(["python examples/compare_layers.py", *(argv if argv is not None else sys.argv[1:])])
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        machine = (
            torch.cuda.get_device_name()
            if device.startswith("cuda")
            else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads, 1-minute load average {load_before:.1f} at the start and "
            f"{os.getloadavg()[0]:.1f} at the end"
        )
        text = (
            f"Recorded {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{command}`\n"
            f"({described}; {device}: {machine}; torch {torch.__version__}, gankernels {gankernels.__version__}).\n\n"
            f"{table}\n"
        )
        Path(own.out).parent.mkdir(parents=True, exist_ok=True)
        Path(own.out).write_text(text)
        print(f"wrote {own.out}")


if __name__ == "__main__":
    main()
