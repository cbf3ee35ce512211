"""Instructions per warp of the conv backward's memory-bound helper kernels (``_gp_kernel``:
the pre-activation gradient on the zero-bordered grid and the bias partials; ``_pad_kernel``:
x's zero-bordered copy), read from their sm_90 SASS like the static report reads the GEMMs
(the whole function, every branch counted; no GPU).

    python benchmarks/backward_helpers_sass.py [OP CI CO H ...]   # default: the three block shapes below

A kernel of these issues one pass over a [BLOCK_R, BLOCK_C] tile per CTA; set beside the
cycles the CTA's compulsory bytes take (16.3 B per SM cycle, the static report's constant),
its count says whether issue or memory bounds it. A bound, not a time.
"""

from __future__ import annotations

import sys
from collections import Counter

from gankernels.bench import aot, sass

DEFAULT = [("pool", 64, 128, 64), ("conv", 64, 128, 64), ("up", 128, 64, 32)]


def count(op: str, ci: int, co: int, h: int) -> list[tuple[str, int, list]]:
    launches = aot.conv_bwd_launches(op, ci, co, h, "bf16", True)
    out = []
    for case in aot.cases_for(launches, 90, "helpers", False):
        if case.kernel not in ("_gp_kernel", "_pad_kernel"):
            continue
        ins = sass.parse(aot.cuobjdump(aot.compile_case(case).asm["cubin"], "-sass"))
        out.append((case.kernel, len(ins), Counter(i.op for i in ins).most_common(6)))
    return out


def main(argv: list[str]) -> int:
    shapes = [(argv[i], int(argv[i + 1]), int(argv[i + 2]), int(argv[i + 3])) for i in range(0, len(argv), 4)] or DEFAULT
    print("| backward of | kernel | instructions per warp | most frequent |")
    print("| --- | --- | ---: | --- |")
    for op, ci, co, h in shapes:
        for kernel, n, top in count(op, ci, co, h):
            print(f"| {op} {ci}->{co} @{h} | {kernel} | {n} | {', '.join(f'{k} {v}' for k, v in top)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
