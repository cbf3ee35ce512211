"""The benchmark library behind ``python -m gankernels.bench`` (DESIGN.md §7).

Layout: :mod:`~gankernels.bench.cases` (what is measured, the stock code, the float64
reference, the transposed-conv rewrite), :mod:`~gankernels.bench.roofline` (FLOPs,
bytes, floor), :mod:`~gankernels.bench.timing` (do_bench / wall clock, the ceilings),
:mod:`~gankernels.bench.runner` (contenders, reference check, timing),
:mod:`~gankernels.bench.training_step`, :mod:`~gankernels.bench.report` (table, CSV,
JSON), :mod:`~gankernels.bench.plots`, :mod:`~gankernels.bench.readme` (the README
section from a results file), :mod:`~gankernels.bench.cli`.
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
