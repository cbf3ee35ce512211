"""Instructions per warp of the conv backward's memory-bound helper kernels (``_gp_kernel``:
the pre-activation gradient on the zero-bordered grid and the bias partials; ``_pad_kernel``:
x's zero-bordered copy), read from their sm_90 SASS like the static report reads the GEMMs
(the whole function, every branch counted; no GPU).

    python -m gankernels.bench.static_helpers [--no-write] [--out DIR]

Writes ``helpers.json`` and ``helpers.md`` beside the static report
(``benchmarks/results/static-<triton version>/``); ``tests/test_static_report.py`` fails
when a recorded count rises by more than its margin. A CTA of these kernels makes one pass
over a [BLOCK_R, BLOCK_C] tile with 4 warps, one per scheduler, so the count is the CTA's
issue cycles: set beside the cycles its compulsory bytes take (benchmarks/NOTES.md), it
says whether issue or memory bounds the kernel. A bound, not a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from gankernels.bench import aot, sass, static_report

# The backward of a discriminator block (pooled), a plain conv and a generator block (up-conv).
SHAPES = (("pool", 64, 128, 64), ("conv", 64, 128, 64), ("up", 128, 64, 32))
KERNELS = ("_gp_kernel", "_pad_kernel")


def measure(shapes=SHAPES) -> list[dict]:
    """One row per (shape, helper kernel): instructions per warp and the most frequent opcodes."""
    rows = []
    for op, ci, co, h in shapes:
        for case in aot.cases_for(aot.conv_bwd_launches(op, ci, co, h, "bf16", True), 90, "helpers", False):
            if case.kernel not in KERNELS:
                continue
            ins = sass.parse(aot.cuobjdump(aot.compile_case(case).asm["cubin"], "-sass"))
            rows.append(
                {
                    "key": f"{op} {ci}->{co} @{h} {case.kernel}",
                    "instructions": len(ins),
                    "top_opcodes": dict(Counter(i.op for i in ins).most_common(6)),
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        f"# The conv backward's helper kernels, sm_90, triton {static_report.triton_version()}",
        "",
        "Instructions per warp of the whole function (every branch counted; bf16 channels_last, batch 64). "
        "Produced by `python -m gankernels.bench.static_helpers`; what they mean beside the memory time: "
        "`benchmarks/NOTES.md`. A bound, not a time.",
        "",
        "| backward of, kernel | instructions per warp | most frequent |",
        "| --- | ---: | --- |",
    ]
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in r["top_opcodes"].items())
        lines.append(f"| {r['key']} | {r['instructions']} | {top} |")
    return "\n".join(lines) + "\n"


def load(path: Optional[Path] = None) -> dict[str, dict]:
    path = path or static_report.default_out_dir() / "helpers.json"
    return {r["key"]: r for r in json.loads(path.read_text())["rows"]}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gankernels.bench.static_helpers", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/static-<triton version>/)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    rows = measure()
    text = markdown(rows)
    print(text, end="")
    if not args.no_write:
        out = args.out or static_report.default_out_dir()
        out.mkdir(parents=True, exist_ok=True)
        (out / "helpers.json").write_text(json.dumps({"triton": static_report.triton_version(), "rows": rows}, indent=1) + "\n")
        (out / "helpers.md").write_text(text)
        print(f"results: {out / 'helpers.md'}, {out / 'helpers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
