"""Static check of the CUDA kernels of csrc/: compile each .cu for one architecture and
read what the compiler made of it, without a GPU.

    python -m gankernels.bench static-cuda [--csrc csrc] [--arch sm_90] [--out benchmarks/results/static-cuda]

For every kernel (every template instance) it records

* from ``ptxas -v``: registers per thread, spill stores / loads, stack frame, shared
  memory;
* from the SASS (``nvdisasm`` of the cubin): the instruction count, the loops (a loop
  is the range between a backward branch and its target) and, per loop, the number of
  instructions and of the ones that matter for these kernels: global loads and stores,
  FFMA (the CUDA-core conv's work), HMMA (tensor-core mma.sync: the RGB conv's work), MUFU
  (transcendentals), and runtime integer divisions;
* the instructions per element of each memory-bound kernel's main loop (the
  grid-stride loop): its static length divided by the elements one iteration handles.
  Static means every instruction of the body counted once: every branch (e.g. the
  int64 and the window-code forms where both are compiled) and every inner loop (a
  window's taps) once. For a loop-free body it bounds what one element executes; with
  inner loops (the general max-pool kernels) it is neither a bound nor a count;
* for the tensor-core kernels, the instructions per MMA of the hot loop (the loop
  holding the most HMMA): its static length over its HMMA count, everything the loop
  issues besides the MMAs (operand gathers, epilogue, stores) charged to them.

Runtime integer division, and how it is found. A division by a value known only at run
time compiles to one of two sequences, both recognisable in SASS:

* 32-bit (and the 32-bit fast path of a 64-bit one): ``I2F.RP`` / ``I2F.U32.RP`` /
  ``I2F.U64.RP`` of the divisor, ``MUFU.RCP``, ``F2I.FTZ.U32.TRUNC``, then ``IMAD.HI``
  and two correction steps. The round-towards-+inf integer-to-float conversion
  (``I2F...RP``) appears in no other sequence nvcc emits, so it marks each place where
  a reciprocal of an integer is computed;
* 64-bit: a ``CALL`` to the ``__cuda_sm20_{div,rem}_{s,u}64`` subroutine (nvcc emits it
  next to a 32-bit fast path when it cannot prove the operands fit in 32 bits).

A division counts as *in a loop* when either mark lies inside a loop's range. When the
divisor is loop-invariant, nvcc hoists the reciprocal out of the loop and leaves an
``IMAD.HI`` plus two compare-and-correct steps inside: that is the same work as a
host-precomputed "fast divmod" (a multiply-high and a shift), cheap, and not counted.
Division by a compile-time constant is a multiply-high and a shift, not counted either.
What this cannot see: a division in a function that is not inlined (none here).

Writes ``<out>/report.json`` and ``<out>/report.md``; ``--check`` exits non-zero when
any kernel spills or divides in a loop. Needs nvcc (``$CUDA_HOME``, default
/usr/local/cuda) and nvdisasm (the CUDA toolkit's, or the copy Triton ships) and c++filt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
# The flags of the real build (torch's cpp_extension adds the -D and --expt ones to ours
# from gankernels/cuda/jit_build.py and setup.py), plus ptxas -v.
NVCC_FLAGS = (
    "-O3",
    "-lineinfo",
    "-std=c++17",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-Xptxas",
    "-v",
)

INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^(\.L_x_\d+|\$__internal_\w+\$\w+|\.text\.\S+):\s*$")
BRANCH = re.compile(r"\bBRA\b(?:\s+!?P\d,)?\s+`\((\.L_x_\d+)\)")
CALL = re.compile(r"CALL\.\S+\s+`\((\$__internal_\w+\$(\w+))\)")
INT_RECIPROCAL = re.compile(r"\bI2F(?:\.[A-Z0-9]+)*\.RP\b")
INT_DIV_ROUTINE = re.compile(r"__cuda_sm\d+_(?:div|rem)_[su]64")
HMMA = re.compile(r"\bHMMA\.")


@dataclass
class Loop:
    start: int  # address of the first instruction (the branch target)
    end: int  # address of the backward branch
    instructions: int = 0
    global_loads: int = 0
    global_stores: int = 0
    ffma: int = 0
    hmma: int = 0
    mufu: int = 0
    int_divisions: int = 0
    depth: int = 0  # 0: outermost


@dataclass
class Kernel:
    file: str
    mangled: str
    name: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0
    instructions: int = 0
    int_divisions: int = 0  # anywhere in the kernel body
    int_divisions_in_loops: int = 0
    division_routines_called: list[str] = field(default_factory=list)
    loops: list[Loop] = field(default_factory=list)
    elements_per_iteration: Optional[int] = None
    main_loop_instructions: Optional[int] = None
    instructions_per_element: Optional[float] = None
    hmma: int = 0  # tensor-core instructions anywhere in the kernel body
    hot_mma_loop_instructions: Optional[int] = None
    hot_mma_loop_hmma: Optional[int] = None
    instructions_per_mma: Optional[float] = None


def find_tool(name: str, cuda_home: str) -> Optional[str]:
    """``$CUDA_HOME/bin/<name>``, else PATH, else the copy bundled with Triton."""
    candidate = Path(cuda_home, "bin", name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    return None


def demangle(names: list[str]) -> dict[str, str]:
    """Short readable names: ``max_pool_fwd_kernel<float, true>``."""
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout.splitlines()
    short = {}
    for mangled, full in zip(names, out, strict=True):
        s = full.replace("gk::(anonymous namespace)::", "").replace("(anonymous namespace)::", "")
        s = s.removeprefix("void ")
        depth, cut = 0, len(s)
        for i, ch in enumerate(s):  # drop the argument list: the first '(' at template depth 0
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = i
                break
        short[mangled] = s[:cut].replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    return short


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel: registers, spills, stack, smem, from ``ptxas -v``."""
    info: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = info.setdefault(m.group(1), {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return info


def parse_sass(text: str) -> dict[str, list[tuple[int, str, Optional[str]]]]:
    """Per mangled kernel: its body as (address, instruction, label-before) triples. The
    body stops at the first ``$__internal_*`` subroutine (division, float reciprocal
    slow paths), which nvdisasm places after the kernel in the same section."""
    kernels: dict[str, list] = {}
    body = None
    pending_label = None
    for line in text.splitlines():
        m = re.match(r"^\s*\.section\s+\.text\.(\S+?),", line)
        if m:
            body = kernels.setdefault(m.group(1), [])
            pending_label = None
            continue
        if body is None:
            continue
        m = LABEL.match(line)
        if m:
            if m.group(1).startswith("$__internal_"):
                body = None  # subroutines: not part of the kernel's own code
                continue
            pending_label = m.group(1)
            continue
        m = INSTR.match(line)
        if m:
            body.append((int(m.group(1), 16), m.group(2), pending_label))
            pending_label = None
    return kernels


def analyse_body(body: list[tuple[int, str, Optional[str]]]) -> tuple[list[Loop], int, list[str]]:
    labels = {label: addr for addr, _, label in body if label}
    loops = []
    for addr, ins, _ in body:
        m = BRANCH.search(ins)
        if m and m.group(1) in labels and labels[m.group(1)] < addr:
            loops.append(Loop(start=labels[m.group(1)], end=addr))
        # A branch to itself after EXIT is padding, not a loop (target == addr: not < addr).
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    for lp in loops:
        lp.depth = sum(1 for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end)
    divisions = 0
    routines = []
    for addr, ins, _ in body:
        is_div = bool(INT_RECIPROCAL.search(ins))
        call = CALL.search(ins)
        if call and INT_DIV_ROUTINE.search(call.group(2)):
            is_div = True
            routines.append(call.group(2))
        divisions += is_div
        for lp in loops:
            if lp.start <= addr <= lp.end:
                lp.instructions += 1
                lp.global_loads += ins.split()[0].startswith("LDG") or " LDG" in ins
                lp.global_stores += ins.split()[0].startswith("STG") or " STG" in ins
                lp.ffma += bool(re.search(r"\bFFMA\b", ins))
                lp.hmma += bool(HMMA.search(ins))
                lp.mufu += "MUFU." in ins
                lp.int_divisions += is_div
    return loops, divisions, sorted(set(routines))


def elements_per_iteration(name: str) -> Optional[int]:
    """Elements one iteration of a memory-bound kernel's main (outermost) loop writes
    (forward: outputs; backward: input-gradient elements), from its template arguments;
    None for the conv kernels (FFMA-bound: see ffma) and where it depends on a runtime
    value. Knows the kernels' template signatures before and after issue 16."""
    m = re.match(r"(\w+)<(.*)>$", name)
    if not m:
        return None
    base, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
    size = {"float": 4, "fp16": 2, "bf16": 2}.get(args[0])
    if size is None:
        return None
    vec = 16 // size
    if base == "bias_act_kernel":  # <T, act, backward, V, layout>; before: <T, backward>, vectors first
        return int(args[3]) if len(args) >= 4 else vec
    if base in ("upsample_fwd_kernel", "upsample_bwd_kernel"):
        if len(args) == 2:  # before: <T, V>, V output (forward) or input (backward) elements
            return int(args[1])
        scale, group = int(args[1]), int(args[2])  # <T, S, G, CL>: G input elements, s×s outputs each
        if base == "upsample_bwd_kernel":
            return group
        return group * scale * scale if scale else None
    if base == "max_pool_fwd_kernel":  # <T, V, I, KS>; before: <T, VEC>
        return (vec if args[1] == "true" else 1) if args[1] in ("true", "false") else int(args[1])
    if base == "max_pool_bwd_kernel":
        return 1
    if base == "pool2x2_fwd_kernel":  # <T, P, I, CL>: P outputs
        return int(args[1])
    if base == "pool2x2_bwd_kernel":  # P windows of 4 inputs
        return 4 * int(args[1])
    return None


def check(csrc: Path, arch: str, workdir: Path) -> tuple[list[Kernel], dict]:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = find_tool("nvcc", cuda_home)
    nvdisasm = find_tool("nvdisasm", cuda_home)
    if nvcc is None or nvdisasm is None:
        raise RuntimeError(f"need nvcc and nvdisasm (nvcc: {nvcc}, nvdisasm: {nvdisasm}); set CUDA_HOME")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    kernels: list[Kernel] = []
    for cu in sorted(csrc.glob("*.cu")):
        cubin = workdir / f"{cu.stem}.cubin"
        res = subprocess.run(
            [nvcc, "-cubin", f"-arch={arch}", *NVCC_FLAGS, f"-I{csrc}", str(cu), "-o", str(cubin)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed on {cu}:\n{res.stderr}")
        regs = parse_ptxas(res.stderr)
        sass = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        bodies = parse_sass(sass)
        names = demangle(sorted(bodies))
        for mangled in sorted(bodies, key=lambda k: names[k]):
            loops, divisions, routines = analyse_body(bodies[mangled])
            k = Kernel(file=cu.name, mangled=mangled, name=names[mangled], **regs.get(mangled, {}))
            k.instructions = len(bodies[mangled])
            k.loops = loops
            k.int_divisions = divisions
            k.int_divisions_in_loops = sum(1 for addr, ins, _ in bodies[mangled] if _in_loop(addr, loops) and _is_div(ins))
            k.division_routines_called = routines
            k.elements_per_iteration = elements_per_iteration(k.name)
            k.hmma = sum(1 for _, ins, _ in bodies[mangled] if HMMA.search(ins))
            hot = hot_mma_loop(loops)
            if hot is not None:
                k.hot_mma_loop_instructions, k.hot_mma_loop_hmma = hot.instructions, hot.hmma
                k.instructions_per_mma = round(hot.instructions / hot.hmma, 1)
            outer = [lp for lp in loops if lp.depth == 0]
            if k.elements_per_iteration and outer:
                k.main_loop_instructions = outer[0].instructions
                k.instructions_per_element = round(outer[0].instructions / k.elements_per_iteration, 1)
            kernels.append(k)
    meta = {"arch": arch, "nvcc": version, "nvcc_flags": list(NVCC_FLAGS), "nvdisasm": nvdisasm, "csrc": str(csrc)}
    return kernels, meta


def hot_mma_loop(loops: list[Loop]) -> Optional[Loop]:
    """The loop holding the most tensor-core instructions (the innermost on a tie), or None."""
    with_mma = [lp for lp in loops if lp.hmma]
    return max(with_mma, key=lambda lp: (lp.hmma, lp.depth), default=None)


def _in_loop(addr: int, loops: list[Loop]) -> bool:
    return any(lp.start <= addr <= lp.end for lp in loops)


def _is_div(ins: str) -> bool:
    call = CALL.search(ins)
    return bool(INT_RECIPROCAL.search(ins)) or bool(call and INT_DIV_ROUTINE.search(call.group(2)))


def problems(kernels: list[Kernel]) -> list[str]:
    """What the check rejects: spills, and integer division inside a loop."""
    out = []
    for k in kernels:
        if k.spill_stores or k.spill_loads:
            out.append(f"{k.name}: spills ({k.spill_stores} B stores, {k.spill_loads} B loads)")
        if k.int_divisions_in_loops:
            out.append(f"{k.name}: {k.int_divisions_in_loops} integer division(s) inside a loop")
    return out


def markdown(kernels: list[Kernel], meta: dict) -> str:
    lines = [
        "# Static check of the CUDA kernels",
        "",
        f"`python -m gankernels.bench static-cuda` on {meta.get('sources', 'csrc/')} — {meta['arch']}, {meta['nvcc']}, "
        f"flags `{' '.join(meta['nvcc_flags'])}`; "
        "SASS from nvdisasm. No GPU involved: these are compiler facts, not timings.",
        "",
        "Columns: registers per thread; spill stores/loads (bytes); shared memory (bytes); SASS instructions of the "
        "kernel; loops; runtime integer divisions anywhere / inside a loop (see the script's doc for how they are "
        "found); for the memory-bound kernels, the static length of the main loop and that over the elements one "
        "iteration writes (each instruction counted once: a bound for loop-free bodies, not for the general max-pool "
        "kernels, whose window loops run several times); for the others, FFMA and all instructions of "
        "the innermost loop that holds FFMAs; for the tensor-core kernels, HMMA in the kernel, and HMMA, all "
        "instructions and instructions per HMMA of the loop holding the most HMMA (its operand gathers and "
        "epilogue, every branch of the runtime activation switch, counted once).",
        "",
        "Template arguments: `bias_act_kernel<T, act, backward, V, layout>` (act 0 linear, 1 relu, 2 lrelu, "
        "3 tanh, 4 sigmoid, 5 silu; layout 0 no bias, 1 one channel per vector, 2 channels_last, 3 general); "
        "`max_pool_fwd_kernel<T, V, saved type, 3 for an unrolled 3×3 else 0>`; "
        "`pool2x2_{fwd,bwd}_kernel<T, outputs per item, saved type, channels_last>` (the 2×2 stride-2 path; "
        "`signed char` = 1-byte window codes, `long` = int64 indices); "
        "`upsample_{fwd,bwd}_kernel<T, scale (0: runtime), input elements per item, channels_last>`; "
        "`conv_small_kernel<T, output channels per block, mode (0 forward, 1 forward + pool, 2 gp, 3 gp + pool)>`; "
        "`conv_rgb_mma_kernel<T, k16 steps (ceil(9 Ci / 16)), pool>`.",
        "",
        "| file | kernel | regs | spill st/ld | smem | instr | loops | div (all/in loops) | main loop | elem/iter "
        "| instr/elem | FFMA / instr (hot loop) | HMMA | HMMA / instr (hot loop) | instr/MMA |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in kernels:
        ffma_loops = [lp for lp in k.loops if lp.ffma]
        hot = max(ffma_loops, key=lambda lp: (lp.depth, lp.ffma), default=None)
        hot_s = f"{hot.ffma} / {hot.instructions}" if hot else ""
        mma_s = f"{k.hot_mma_loop_hmma} / {k.hot_mma_loop_instructions}" if k.hot_mma_loop_hmma else ""
        lines.append(
            f"| {k.file} | `{k.name}` | {k.registers} | {k.spill_stores}/{k.spill_loads} | {k.smem} | {k.instructions} | "
            f"{len(k.loops)} | {k.int_divisions}/{k.int_divisions_in_loops} | {k.main_loop_instructions or ''} | "
            f"{k.elements_per_iteration or ''} | {k.instructions_per_element or ''} | {hot_s} | {k.hmma or ''} | {mma_s} | "
            f"{k.instructions_per_mma or ''} |"
        )
    bad = problems(kernels)
    lines += ["", "Check: " + ("no spills, no integer division inside a loop." if not bad else "; ".join(bad)), ""]
    return "\n".join(lines)


def _family(k: dict) -> str:
    """``bias_act_kernel bf16``: the kernel's base name and element type."""
    m = re.match(r"(\w+)(?:<(\w+))?", k["name"])
    return f"{m.group(1)} {m.group(2) or ''}".strip()


def compare(before: dict, after: dict) -> str:
    """Per kernel family (base name and dtype): instances, the most registers, spill
    bytes, division marks inside loops, and the range of instructions per element."""

    def summary(report: dict) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for k in report["kernels"]:
            f = out.setdefault(_family(k), {"n": 0, "regs": 0, "spill": 0, "div": 0, "ipe": [], "ipm": []})
            f["n"] += 1
            f["regs"] = max(f["regs"], k["registers"])
            f["spill"] += k["spill_stores"] + k["spill_loads"]
            f["div"] += k["int_divisions_in_loops"]
            if k["instructions_per_element"] is not None:
                f["ipe"].append(k["instructions_per_element"])
            if k.get("instructions_per_mma") is not None:  # absent from reports before issue 16
                f["ipm"].append(k["instructions_per_mma"])
        return out

    def span(f: Optional[dict], key: str) -> str:
        if f is None or not f[key]:
            return ""
        lo, hi = min(f[key]), max(f[key])
        return f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"

    b, a = summary(before), summary(after)
    lines = [
        f"Before: {before.get('sources', '?')}. After: {after.get('sources', '?')}.",
        "",
        "| kernel family | instances | max regs | spill bytes (st+ld, all instances) | division marks in loops | instr/elem "
        "| instr/MMA |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(x: Optional[dict], y: Optional[dict], key: str) -> str:
        return f"{x[key] if x else '–'} → {y[key] if y else '–'}"

    for fam in sorted(set(b) | set(a)):
        x, y = b.get(fam), a.get(fam)
        cells = " | ".join(cell(x, y, key) for key in ("n", "regs", "spill", "div"))
        ipe = f"{span(x, 'ipe') or '–'} → {span(y, 'ipe') or '–'}"
        ipm = f"{span(x, 'ipm') or '–'} → {span(y, 'ipm') or '–'}"
        lines.append(f"| `{fam}` | {cells} | {ipe} | {ipm} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, meta: dict, kernels: list[dict]) -> None:
    """The report as JSON, one kernel per line (compact, and diffs stay readable)."""
    head = json.dumps(meta, indent=1)[:-2]  # without the closing "\n}"
    body = ",\n".join("  " + json.dumps(k, separators=(",", ":")) for k in kernels)
    path.write_text(f'{head},\n "kernels": [\n{body}\n ]\n}}\n')


def _describe(csrc: Path) -> str:
    """``csrc/ at <commit>`` (``+ local changes``) when csrc is this checkout's."""
    if csrc != ROOT / "csrc":
        return str(csrc)
    git = ["git", "-C", str(ROOT)]
    try:
        rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "csrc"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "csrc/"
    return f"csrc/ at {rev.stdout.strip()}" + (" + local changes" if dirty.stdout.strip() else "")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gankernels.bench static-cuda", description=__doc__.split("\n\n")[0])
    ap.add_argument("--csrc", type=Path, default=ROOT / "csrc")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", type=Path, default=None, help="write report.json and report.md here")
    ap.add_argument("--check", action="store_true", help="exit 1 on spills or integer division in a loop")
    ap.add_argument("--label", default="", help="what the sources are (e.g. a commit), recorded in the report")
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier report.json: add a before → after table")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        kernels, meta = check(args.csrc.resolve(), args.arch, Path(tmp))
    meta["sources"] = args.label or _describe(args.csrc.resolve())
    del meta["csrc"]
    md = markdown(kernels, meta)
    if args.baseline:
        after = {**meta, "kernels": [asdict(k) for k in kernels]}
        md += "\n## Before → after\n\n" + compare(json.loads(args.baseline.read_text()), after)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "report.json", meta, [asdict(k) for k in kernels])
        (args.out / "report.md").write_text(md)
    print(md)
    bad = problems(kernels)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
