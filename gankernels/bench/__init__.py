"""The benchmark library behind ``python -m gankernels.bench`` (DESIGN.md §7), the one
place in the package that times anything.

Layout: :mod:`~gankernels.bench.cases` (what is measured, the stock code, the float64
reference, the transposed-conv rewrite, the kernel-only call), :mod:`~gankernels.bench.roofline`
(FLOPs, bytes, floor), :mod:`~gankernels.bench.targets` (the ANCHORS.md targets as data,
met / missed), :mod:`~gankernels.bench.selections` (the named ``--select`` groups of
cases), :mod:`~gankernels.bench.timing` (do_bench / wall clock, the ceilings, forward
memory), :mod:`~gankernels.bench.runner` (contenders, reference check, timing),
:mod:`~gankernels.bench.training_step`, :mod:`~gankernels.bench.report` (tables, CSV,
JSON), :mod:`~gankernels.bench.plots`, :mod:`~gankernels.bench.readme` (the README
section from a results file), :mod:`~gankernels.bench.summary` (what
``scripts/gpu_check.sh`` prints last), :mod:`~gankernels.bench.cli`.
"""

from gankernels.bench.cases import Case, Shape, build_cases, transposed_kernel, up_conv_transposed
from gankernels.bench.roofline import Ceilings, bytes_moved, floor_ms, flops
from gankernels.bench.runner import CaseContext, Contender, Record, contenders_for, prepare, run_case, run_cases

__all__ = [
    "Case",
    "CaseContext",
    "Ceilings",
    "Contender",
    "Record",
    "Shape",
    "build_cases",
    "bytes_moved",
    "contenders_for",
    "floor_ms",
    "flops",
    "prepare",
    "run_case",
    "run_cases",
    "transposed_kernel",
    "up_conv_transposed",
]
