"""Named selections of the benchmark: ``python -m gankernels.bench --select NAME``.

A selection is a list of case groups (ops × dtypes × modes × memory formats, optionally
some rows only) plus the contenders to include. They all use the same cases, stock
formulations, float64 reference, floors (:mod:`gankernels.bench.roofline`) and targets
(:mod:`gankernels.bench.targets`) as the full run; a selection only chooses which rows
to run, so ``scripts/gpu_check.sh`` can fit its 10-minute call by running them in turn,
each under its own time cap.

On CPU every group runs in fp32 (the CPU shapes of :func:`gankernels.bench.cases.default_shapes`):
the selection's structure is exercised, its numbers mean nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from gankernels.bench import cases as C
from gankernels.bench.cases import Case, Shape

MEMORY_BOUND = ("max_pool2d", "upsample_nearest2d", "bias_act")


@dataclass(frozen=True)
class Group:
    """Cases ``ops × dtypes × formats × modes`` on the default shapes, those for which
    ``rows`` holds (all when None). ``dtypes`` are the CUDA ones; CPU runs fp32."""

    ops: tuple[str, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    formats: tuple[str, ...] = ("channels_last",)
    rows: Optional[Callable[[Shape], bool]] = None

    def cases(self, device: str, quick: bool) -> list[Case]:
        dtypes = list(self.dtypes) if device == "cuda" else ["fp32"]
        out = []
        for op in self.ops:
            for c in C.build_cases([op], dtypes, list(self.formats), list(self.modes), device, quick):
                if self.rows is None or self.rows(c.shape):
                    out.append(c)
        return out


@dataclass(frozen=True)
class Selection:
    description: str
    groups: tuple[Group, ...] = ()
    backends: Optional[tuple[str, ...]] = None  # gankernels backends to include (None: all)
    kernel_only: bool = False
    train_step: bool = False
    quick: bool = False  # always the --quick shapes

    def cases(self, device: str, quick: bool) -> list[Case]:
        quick = quick or self.quick
        seen: set[Case] = set()
        out = []
        for g in self.groups:
            for c in g.cases(device, quick):
                if c not in seen:
                    seen.add(c)
                    out.append(c)
        return out


def _rgb_input(s: Shape) -> bool:
    return s.c == 3


_BLOCKS = ("gen_block", "disc_block")

SELECTIONS: dict[str, Selection] = {
    "targets": Selection(
        "every case ANCHORS.md sets a target for (but the training step: see 'train'), most telling first: "
        "the blocks and conv3x3 in bf16 forward (with kernel-only times), max-pool and upsample forward and "
        "backward alone, the blocks forward+backward, then fp32 forward",
        (
            Group(_BLOCKS + ("conv3x3",), ("bf16",), ("fwd",)),
            Group(("max_pool2d", "upsample_nearest2d"), ("bf16",), ("fwd", "bwd")),
            Group(_BLOCKS, ("bf16",), ("fwdbwd",)),
            Group(_BLOCKS, ("fp32",), ("fwd",)),
        ),
        kernel_only=True,
    ),
    "conv-fwd": Selection(
        "the 3×3 blocks forward: generator, discriminator and conv3x3 alone in bf16, the blocks in fp32 (TF32), "
        "with the kernel-only times",
        (Group(_BLOCKS + ("conv3x3",), ("bf16",), ("fwd",)), Group(_BLOCKS, ("fp32",), ("fwd",))),
        kernel_only=True,
    ),
    "conv-bwd": Selection(
        "the 3×3 blocks forward+backward in bf16, with the memory each forward keeps for the backward",
        (Group(_BLOCKS, ("bf16",), ("fwdbwd",)),),
    ),
    "memops": Selection(
        "max-pool, upsample and bias+act: forward and backward alone, bf16 and fp16, channels_last and NCHW, "
        "bytes moved and % of copy bandwidth, with the kernel-only times",
        (Group(MEMORY_BOUND, ("bf16", "fp16"), ("fwd", "bwd"), ("channels_last", "nchw")),),
        kernel_only=True,
    ),
    "cuda": Selection(
        "the CUDA extension's rows against stock and Triton: the 3→64 discriminator block and conv, the 32→3 "
        "RGB output layer (forward, forward+backward), the memory-bound ops (forward, backward)",
        (
            Group(("disc_block", "conv3x3"), ("bf16",), ("fwd", "fwdbwd"), rows=_rgb_input),
            Group(("to_rgb",), ("bf16",), ("fwd", "fwdbwd")),
            Group(MEMORY_BOUND, ("bf16",), ("fwd", "bwd")),
        ),
        backends=("cuda", "triton"),
        kernel_only=True,
    ),
    "quick": Selection(
        "the headline rows fast: the first and last ANCHORS row of each block and the memory-bound ops, "
        "bf16 forward and forward+backward",
        (Group(_BLOCKS + MEMORY_BOUND, ("bf16",), ("fwd", "fwdbwd")),),
        quick=True,
    ),
    "train": Selection("the DCGAN training step only: stock eager and compiled vs the converted models", train_step=True),
}
