#!/usr/bin/env python3
"""The benchmark's headline cases, quickly, for scripts/gpu_check.sh.

    python scripts/gpu_time_bench.py --out DIR

Runs ``python -m gankernels.bench --quick`` on the generator and discriminator blocks and
the stand-alone memory-bound ops (bf16, channels_last, fwd and fwd+bwd; the first and
last ANCHORS row of each block), with a time budget after which torch.compile is
skipped and a later one after which no further case runs (those contenders are listed
as n/a, never dropped silently), so the script ends inside gpu_check's 180 s. The full results
(JSON, CSV, table, plots) go to DIR/gpu_time_bench/; the short table to
DIR/gpu_time_bench.md and the per-contender CSV to DIR/gpu_time_bench.csv.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

OPS = ["gen_block", "disc_block", "max_pool2d", "upsample_nearest2d", "bias_act"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--budget-s", type=float, default=70.0, help="seconds after which compile is skipped (gpu_check allows 180 in all)"
    )
    p.add_argument("--stop-s", type=float, default=130.0, help="seconds after which no further case is run (listed n/a)")
    args = p.parse_args()

    from gankernels.bench.cli import main as bench_main
    from gankernels.bench.report import CPU_NOTE, load_results, short_table

    full = args.out / "gpu_time_bench"
    argv = ["--quick", "--ops", *OPS, "--out", str(full), "--budget-s", str(args.budget_s), "--stop-s", str(args.stop_s)]
    argv.append("--no-progress")
    rc = bench_main(argv)
    results = load_results(full)
    env = results["env"]
    title = f"### gankernels.bench --quick ({env['gpu'] or 'CPU'}, torch {env['torch']}, triton {env['triton']})"
    note = "" if env["device"] == "cuda" else f"\n\n{CPU_NOTE}"
    (args.out / "gpu_time_bench.md").write_text(f"{title}\n\n{short_table(results)}{note}\n")
    shutil.copyfile(full / "results.csv", args.out / "gpu_time_bench.csv")
    return rc


if __name__ == "__main__":
    sys.exit(main())
