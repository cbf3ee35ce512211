"""Timing and the device ceilings.

CUDA: ``triton.testing.do_bench(fn, warmup, rep, return_mode="median")`` — CUDA events,
L2 flushed between calls (DESIGN.md §7). CPU: the median of wall-clock repeats after a
warm-up call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gankernels.bench.roofline import Ceilings


@dataclass(frozen=True)
class TimingConfig:
    """``warmup_ms``/``rep_ms`` go to do_bench on CUDA; ``cpu_warmup``/``cpu_repeats``
    are call counts on CPU."""

    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_warmup: int = 1
    cpu_repeats: int = 5
    cpu_min_ms: float = 30.0
    cpu_max_repeats: int = 100

    @classmethod
    def for_run(cls, quick: bool) -> TimingConfig:
        return cls(warmup_ms=10, rep_ms=40, cpu_warmup=1, cpu_repeats=3, cpu_min_ms=10.0) if quick else cls()


def time_ms(fn: Callable[[], object], device: str, cfg: TimingConfig) -> float:
    """The median time of one call of ``fn``, in milliseconds."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, return_mode="median"))
    for _ in range(cfg.cpu_warmup):
        fn()
    # At least cpu_repeats calls, more (up to cpu_max_repeats) until cpu_min_ms have
    # passed: tiny calls need many samples for a stable median on a busy machine.
    samples: list[float] = []
    while len(samples) < max(1, cfg.cpu_repeats) or (sum(samples) < cfg.cpu_min_ms and len(samples) < cfg.cpu_max_repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(samples))


def measure_ceilings(device: str, cfg: TimingConfig) -> Ceilings:
    """Copy bandwidth (bytes read + written) and dense matmul rate of ``device``.

    CUDA: a 512 MiB bf16 copy and a bf16 8192³ matmul (ANCHORS.md). CPU: a 64 MiB fp32
    copy and an fp32 1024³ matmul (CPU bf16 matmul is not a meaningful ceiling); the CPU
    floor only shows the protocol working, not a hardware bound worth quoting.
    """
    if device == "cuda":
        n = 256 * 2**20
        src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        t_copy = time_ms(lambda: dst.copy_(src), device, cfg)
        copy = 2 * n * src.element_size() / (t_copy * 1e-3)
        del src, dst
        m = 8192
        a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        t_mm = time_ms(lambda: a @ b, device, cfg)
        del a, b
        torch.cuda.empty_cache()
        return Ceilings(copy, 2 * m**3 / (t_mm * 1e-3), "bf16 8192³ matmul", "512 MiB bf16 copy")
    n = 16 * 2**20
    src = torch.randn(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    cpu_cfg = TimingConfig(cpu_warmup=1, cpu_repeats=5)
    t_copy = time_ms(lambda: dst.copy_(src), device, cpu_cfg)
    m = 1024
    a, b = torch.randn(m, m), torch.randn(m, m)
    t_mm = time_ms(lambda: a @ b, device, cpu_cfg)
    return Ceilings(2 * n * 4 / (t_copy * 1e-3), 2 * m**3 / (t_mm * 1e-3), "fp32 1024³ matmul (CPU)", "64 MiB fp32 copy (CPU)")


def forward_memory_mib(forward: Callable[[], object]) -> tuple[float, float]:
    """CUDA: ``(held, peak)`` MiB of one call of ``forward`` (with autograd recording):
    what stays allocated while its result is alive — the output and everything saved
    for the backward — and the peak during the call, both above what was allocated
    before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = forward()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return held / 2**20, peak / 2**20
