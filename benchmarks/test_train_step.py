"""The DCGAN training step (ANCHORS.md), stock and converted, eager and compiled.

The loss agreement between the variants is checked by ``python -m gankernels.bench
--ops train_step``; here each variant's step is only timed (GPU-synchronised).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from gankernels.bench.training_step import GANStep, TrainConfig, build_models, convert_models, make_batches

DEVICE = "cuda"
VARIANTS = [("stock", False), ("stock", True), ("gankernels", False), ("gankernels", True)]
_compile = os.environ.get("GANKERNELS_BENCH_COMPILE", "1") != "0"


@pytest.mark.parametrize("layers,compiled", VARIANTS, ids=[f"{a}-{'compile' if b else 'eager'}" for a, b in VARIANTS])
def test_train_step(benchmark, layers, compiled):
    if compiled and not _compile:
        pytest.skip("GANKERNELS_BENCH_COMPILE=0")
    cfg = TrainConfig.for_device(DEVICE)
    benchmark.group = "train_step " + cfg.describe()
    g, d = build_models(cfg)
    g, d = copy.deepcopy(g).to(DEVICE), copy.deepcopy(d).to(DEVICE)
    if layers == "gankernels":
        try:
            g, d, what = convert_models(g, d)
        except NotImplementedError:
            pytest.skip("gankernels.convert is not implemented yet")
        benchmark.extra_info["converted"] = what
    step = GANStep(g, d, cfg, DEVICE, compile=compiled)
    batch = make_batches(cfg, DEVICE, 1, seed=1)[0]
    for _ in range(3):  # compile and warm up
        step(*batch)
    torch.cuda.synchronize()

    def timed():
        step(*batch)
        torch.cuda.synchronize()

    benchmark(timed)
