"""Compile the CUDA kernels of csrc/ for the CPU emulation (csrc/emu/cuda_emu.h) into a
shared library with flat C entry points (csrc/emu/emu_api.cpp), for ctypes.

    python csrc/emu/emu_build.py OUT_DIR      # prints the library's path

The kernel launches ``k<<<grid, block, smem, stream>>>(args);`` are rewritten into
``gk_emu::launch(grid, block, [&] { k(args); });``; everything else compiles as is.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

EMU = Path(__file__).resolve().parent
CSRC = EMU.parent
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


# Kernels that use __syncthreads or warp shuffles need every thread of a block running
# concurrently; the others are run thread after thread (far cheaper).
SYNCING_KERNELS = ("conv_small_kernel", "wgrad_kernel", "wgrad_reduce_kernel", "conv_rgb_mma_kernel", "mma_probe_kernel")


def rewrite(src: str) -> str:
    def sub(m: re.Match) -> str:
        kernel, cfg, args = m.group(1), _split_top(m.group(2)), m.group(3)
        how = "launch" if kernel.split("<")[0] in SYNCING_KERNELS else "launch_serial"
        return f"::gk_emu::{how}(dim3({cfg[0]}), dim3({cfg[1]}), [&] {{ {kernel}({args}); }});"

    out = LAUNCH.sub(sub, src)
    assert "<<<" not in out, "a launch was not rewritten"
    return out


def build(out_dir: Path) -> Path:
    sources = sorted(CSRC.glob("*.cu")) + sorted(EMU.glob("*.cu"))  # + emulation-only probes
    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in [*sources, *sorted(CSRC.glob("*.h")), *sorted(CSRC.glob("*.cuh")), *sorted(EMU.glob("*"))])
    ).hexdigest()[:16]
    lib = out_dir / f"gk_emu_{digest}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    objs = []
    flags = ["-std=c++20", "-O1", "-fPIC", f"-I{CSRC}", f"-I{CUDA_HOME}/include", "-include", str(EMU / "cuda_emu.h"), "-w"]
    for cu in sources:
        cpp = out_dir / f"{cu.stem}.emu.cpp"
        cpp.write_text(rewrite(cu.read_text()))
        obj = out_dir / f"{cu.stem}.o"
        subprocess.run(["g++", *flags, "-c", str(cpp), "-o", str(obj)], check=True)
        objs.append(obj)
    api = out_dir / "emu_api.o"
    subprocess.run(
        ["g++", "-std=c++20", "-O1", "-fPIC", f"-I{CUDA_HOME}/include", "-c", str(EMU / "emu_api.cpp"), "-o", str(api)], check=True
    )
    tmp = lib.with_suffix(".tmp.so")
    subprocess.run(["g++", "-shared", "-o", str(tmp), *map(str, objs), str(api), "-lpthread"], check=True)
    tmp.rename(lib)
    return lib


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
