"""Every op and block case against every contender, grouped by case.

Each contender is checked against the float64 reference before it is timed (the same
check as ``python -m gankernels.bench``): a contender that cannot serve the case is
skipped with the reason, one that is wrong fails the test instead of being timed.
The timed function synchronises the GPU, so pytest-benchmark's wall clock measures the
kernels, not the launch.
"""

from __future__ import annotations

import os

import pytest
import torch

from gankernels.bench import cases as C
from gankernels.bench.runner import CaseContext, contenders_for, prepare

DEVICE = "cuda"


def env_list(name: str, default: list[str]) -> list[str]:
    return os.environ.get(name, "").split() or default


_compile = os.environ.get("GANKERNELS_BENCH_COMPILE", "1") != "0"
CASES = C.build_cases(
    [op for op in env_list("GANKERNELS_BENCH_OPS", list(C.OPS)) if op != "train_step"],
    env_list("GANKERNELS_BENCH_DTYPES", ["bf16"]),
    ["channels_last"],
    env_list("GANKERNELS_BENCH_MODES", list(C.DEFAULT_MODES)),
    DEVICE,
    quick=os.environ.get("GANKERNELS_BENCH_QUICK") == "1",
)
PARAMS = [
    pytest.param(case, c, id=f"{case.id} | {c.name}".replace(" ", "_"))
    for case in CASES
    for c in contenders_for(case, compile=_compile, compile_skip="GANKERNELS_BENCH_COMPILE=0")
]

_contexts: dict = {}


def _context(case: C.Case) -> CaseContext:
    # One context (inputs + float64 reference) per case, shared by its contenders.
    if case not in _contexts:
        _contexts.clear()
        torch.cuda.empty_cache()
        _contexts[case] = CaseContext(case, DEVICE, seed=0)
    return _contexts[case]


@pytest.mark.parametrize("case,contender", PARAMS)
def test_case(benchmark, case, contender):
    benchmark.group = case.id
    benchmark.extra_info.update(case.as_dict())
    benchmark.extra_info["contender"] = contender.name
    rec, run = prepare(_context(case), contender, DEVICE)
    if rec.status == "n/a":
        pytest.skip(rec.reason)
    if run is None:
        pytest.fail(f"{contender.name} on {case.id}: {rec.status}: {rec.reason}")
    benchmark.extra_info["rel_l2_err"] = rec.err

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark(timed)
