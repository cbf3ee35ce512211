"""pytest-benchmark suites over the cases of ``python -m gankernels.bench`` (CUDA only).

    .venv/bin/python -m pytest benchmarks --benchmark-json=benchmarks/results/pytest-bench.json

Without a CUDA GPU every test is skipped (one line each, with the reason). Not collected
by ``make test`` (pyproject's testpaths is ``tests``).

Environment knobs (space-separated lists, as the CLI options): GANKERNELS_BENCH_OPS,
GANKERNELS_BENCH_DTYPES (default bf16), GANKERNELS_BENCH_MODES (default fwd fwdbwd),
GANKERNELS_BENCH_QUICK=1 (the --quick shapes), GANKERNELS_BENCH_COMPILE=0 (no compile).
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="the benchmark suites need a CUDA GPU (python -m gankernels.bench runs a CPU version)")
    for item in items:
        item.add_marker(skip)
