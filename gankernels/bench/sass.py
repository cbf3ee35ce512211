"""Read NVIDIA SASS (the GPU's machine code): find a kernel's main loop and count what it issues.

Input is the text ``cuobjdump -sass`` prints for a cubin (Triton ships ``cuobjdump``
with its NVIDIA backend, so no CUDA toolkit is needed). Each instruction line reads
``/*3690*/  @!P4 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4].tnspB, R24 ;``: a byte
address, an optional predicate guard, the opcode with its modifiers, the operands.

A loop is a backward branch: ``BRA`` to an address at or before its own. The *main
loop* of a GEMM kernel is the loop that holds the most tensor-core instructions (the
innermost such loop when loops nest). Everything between the branch target and the
branch itself is one iteration's code; if the body holds forward branches, the count
is the longest path (every instruction), an upper bound on what one iteration issues.

Instruction classes (per warp; each SASS instruction takes one issue slot of its
warp's scheduler, whatever its width):

* ``tensor`` — tensor-core MMA: ``HGMMA`` (sm_90 warpgroup MMA), ``HMMA``/``IMMA``
  (warp MMA), and their relatives;
* ``memory`` — loads and stores of any space: ``LDG``, ``STG``, ``LDGSTS`` (cp.async),
  ``LDS``, ``STS``, ``LDSM``, constant loads (``LDC``, ``ULDC``), TMA (``UTMALDG``...),
  and the async-copy bookkeeping ``LDGDEPBAR``;
* ``integer`` — integer and predicate arithmetic, address computation: ``IMAD``,
  ``IADD3``, ``LEA``, ``LOP3``, ``SHF``, ``ISETP``, ``SEL``, ``PLOP3``... including the
  uniform-datapath forms (``UIADD3``, ``ULEA``...);
* ``other`` — everything else: moves, conversions, float arithmetic, barriers and
  dependency waits (``BAR``, ``DEPBAR``, ``WARPGROUP.ARRIVE``), branches.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Optional

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")

TENSOR_OPS = frozenset({"HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA", "IGMMA", "BGMMA"})
MEMORY_OPS = frozenset(
    {
        "LDG", "STG", "LDGSTS", "LDGDEPBAR", "LDS", "STS", "LDSM", "STSM", "LD", "ST", "LDL", "STL",
        "LDC", "ULDC", "ATOM", "ATOMS", "ATOMG", "RED", "REDG", "UTMALDG", "UTMASTG", "UTMAPF",
        "UBLKCP", "UBLKRED", "UBLKPF", "SYNCS", "CCTL", "LDCU",
    }
)  # fmt: skip
INTEGER_OPS = frozenset(
    {
        "IMAD", "IADD3", "IADD", "IADD32I", "VIADD", "VIADDMNMX", "VIMNMX3", "IMUL", "IMUL32I", "IABS",
        "IMNMX", "VIMNMX", "ISCADD", "LEA",
        "LOP", "LOP3", "LOP32I", "SHF", "SHL", "SHR", "ISETP", "ICMP", "SEL", "PLOP3", "PSETP", "PRMT",
        "BMSK", "BREV", "FLO", "POPC", "IDP", "IDP4A", "SGXT", "LEPC", "P2R", "R2P",
    }
)  # fmt: skip
CLASSES = ("tensor", "memory", "integer", "other")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One SASS instruction: byte address, guard predicate (``""`` if none), opcode with
    modifiers (``HGMMA.64x128x16.F32.BF16``), operand text."""

    address: int
    guard: str
    opcode: str
    operands: str

    @property
    def op(self) -> str:
        """The base opcode, without modifiers (``HGMMA``)."""
        return self.opcode.split(".", 1)[0]

    @property
    def klass(self) -> str:
        """``tensor``, ``memory``, ``integer`` or ``other`` (see the module docstring)."""
        return classify(self.op)

    def branch_target(self) -> Optional[int]:
        """The target address of a direct branch, else None."""
        if self.op not in ("BRA", "BRX", "JMP"):
            return None
        m = _BRANCH_TARGET.search(self.operands)
        return int(m.group(1), 16) if m else None


def classify(op: str) -> str:
    """The class of a base opcode. Uniform-datapath integer ops (``UIADD3``, ``ULEA``)
    count as integer like their vector forms; ``UMOV`` and other uniform ops as other."""
    if op in TENSOR_OPS:
        return "tensor"
    if op in MEMORY_OPS:
        return "memory"
    if op in INTEGER_OPS or (op.startswith("U") and op[1:] in INTEGER_OPS):
        return "integer"
    return "other"


def parse(sass: str, function: Optional[str] = None) -> list[Instruction]:
    """The instructions of ``function`` (the first function when None) in ``cuobjdump
    -sass`` text, in address order."""
    chunks = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    # chunks = [preamble, name1, body1, name2, body2, ...]
    bodies = dict(zip(chunks[1::2], chunks[2::2], strict=True))
    if not bodies:
        raise ValueError("no 'Function :' section in the SASS text (expected `cuobjdump -sass` output)")
    if function is None:
        body = next(iter(bodies.values()))
    elif function in bodies:
        body = bodies[function]
    else:
        raise ValueError(f"function {function!r} not in the SASS; it has {sorted(bodies)}")
    out = []
    for m in _LINE.finditer(body):
        addr, guard, opcode, operands = m.groups()
        out.append(Instruction(int(addr, 16), (guard or "").strip(), opcode, operands.strip()))
    if not out:
        raise ValueError(f"no instructions parsed for function {function!r}")
    return _without_end_padding(out)


def _without_end_padding(instructions: list[Instruction]) -> list[Instruction]:
    """``instructions`` without what follows the kernel's last instruction and is never
    issued: the NOPs that pad the function to its alignment and the ``BRA`` to itself that
    ptxas puts after the final ``EXIT`` (a trap no thread reaches)."""
    end = len(instructions)
    while end > 1 and instructions[end - 1].op == "NOP":
        end -= 1
    last = instructions[end - 1]
    if end > 1 and last.branch_target() == last.address and instructions[end - 2].op == "EXIT":
        end -= 1
    return instructions[:end]


@dataclasses.dataclass(frozen=True)
class Loop:
    """One loop: the instructions from the backward branch's target to the branch."""

    start: int  # address of the first instruction of the body
    end: int  # address of the backward branch
    body: tuple[Instruction, ...]

    @property
    def size(self) -> int:
        return len(self.body)

    def count(self, klass: Optional[str] = None) -> int:
        """Instructions of the body (of one class, or all)."""
        return sum(1 for i in self.body if klass is None or i.klass == klass)

    def by_class(self) -> dict[str, int]:
        return {k: self.count(k) for k in CLASSES}

    def opcodes(self) -> Counter:
        """Base opcode -> count in the body."""
        return Counter(i.op for i in self.body)

    def has_inner_branches(self) -> bool:
        """Whether the body branches other than by its closing backward branch."""
        return any(i.branch_target() is not None for i in self.body[:-1])


def loops(instructions: list[Instruction]) -> list[Loop]:
    """Every loop (backward branch) of a function, in address order of the branch."""
    by_addr = {i.address: k for k, i in enumerate(instructions)}
    out = []
    for k, ins in enumerate(instructions):
        target = ins.branch_target()
        if target is None or target > ins.address or target not in by_addr:
            continue
        if target == ins.address:  # the `BRA self` trap after EXIT, not a loop
            continue
        out.append(Loop(target, ins.address, tuple(instructions[by_addr[target] : k + 1])))
    return out


def main_loop(instructions: list[Instruction]) -> Loop:
    """The loop holding the most tensor-core instructions; among equals the shortest
    (the innermost of a nest). A kernel whose K loop has a single step has no loop once
    compiled: then the whole function, if it has MMA and no loop at all (``Loop.start``
    is its first address), as one step. Raises ValueError otherwise."""
    found = loops(instructions)
    candidates = [lp for lp in found if lp.count("tensor")]
    if candidates:
        return max(candidates, key=lambda lp: (lp.count("tensor"), -lp.size))
    whole = Loop(instructions[0].address, instructions[-1].address, tuple(instructions))
    if whole.count("tensor") and not found:
        return whole
    raise ValueError("no loop with tensor-core instructions (no MMA main loop in this kernel)")


# Dense tensor-core throughput of one H100/H200 SM, in multiply-adds per cycle, by the
# MMA's input type: bf16/fp16 989 TFLOP/s at 1.83 GHz on 132 SMs is 2048; TF32 half of
# that, fp8 twice (the Hopper whitepaper's per-SM rates).
SM90_MACS_PER_CYCLE = {"BF16": 2048, "F16": 2048, "TF32": 1024, "E4M3": 4096, "E5M2": 4096}
# Ampere (A100) per SM: 1024 bf16/fp16, 512 tf32.
SM80_MACS_PER_CYCLE = {"BF16": 1024, "F16": 1024, "TF32": 512}

_GMMA_SHAPE = re.compile(r"^[A-Z]+\.(\d+)x(\d+)x(\d+)\.")
_HMMA_SHAPE = {"1688": (16, 8, 8), "16816": (16, 8, 16), "884": (8, 8, 4), "16832": (16, 8, 32)}


# Input-type modifiers the disassembler writes after the accumulator type; without one
# the inputs are fp16 (``HGMMA.64x64x16.F32``, ``HMMA.16816.F32``, ``HMMA.16816.F16``).
_MMA_INPUT_TYPES = ("BF16", "TF32", "E4M3", "E5M2")


def mma_macs(ins: Instruction) -> tuple[int, str, str]:
    """(multiply-adds, input type, scope) of one tensor-core instruction: scope
    ``warpgroup`` for ``HGMMA`` (the 4 warps of a warpgroup each issue it, together they
    compute the m×n×k product once), ``warp`` for ``HMMA``."""
    parts = ins.opcode.split(".")
    input_type = parts[-1] if parts[-1] in _MMA_INPUT_TYPES else "F16"
    if ins.op.endswith("GMMA"):
        m = _GMMA_SHAPE.match(ins.opcode)
        if not m:
            raise ValueError(f"cannot read the shape of {ins.opcode}")
        macs = int(m.group(1)) * int(m.group(2)) * int(m.group(3))
        return macs, input_type, "warpgroup"
    if ins.op == "HMMA":
        shape = _HMMA_SHAPE.get(parts[1])
        if shape is None:
            raise ValueError(f"cannot read the shape of {ins.opcode}")
        return shape[0] * shape[1] * shape[2], input_type, "warp"
    raise ValueError(f"{ins.opcode}: not a floating-point MMA this module knows")


# Bytes one thread moves per global-memory instruction, by width modifier.
_WIDTH_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def global_bytes_per_warp(ins: Instruction) -> int:
    """Bytes a warp reads or writes from global memory with one ``LDG``/``LDGSTS``/``STG``
    (32 threads × the width; 4 bytes when no width is given). 0 for other instructions.
    A predicated-off thread moves nothing; this counts every thread (an upper bound)."""
    if ins.op not in ("LDG", "LDGSTS", "STG"):
        return 0
    width = 4
    for mod in ins.opcode.split(".")[1:]:
        if mod in _WIDTH_BYTES:
            width = _WIDTH_BYTES[mod]
    return 32 * width
