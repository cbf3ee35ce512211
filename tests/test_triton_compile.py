"""Compile every Triton kernel ahead of time for real GPUs (sm_90, sm_80), without one.

The Triton interpreter (``tests/interpreter/``) runs kernels as Python, so it accepts
code that the real compiler rejects (e.g. a constexpr reassigned inside
``tl.static_range``) and never shows compile time, register spills, shared memory or
whether ``tl.dot`` became a tensor-core instruction. ``triton.compile`` needs no GPU
for a given target (Triton ships its own ``ptxas``), so this file compiles each kernel
to a cubin for ``GPUTarget("cuda", 90, 32)`` (and a subset for 80) and checks:

* the compile succeeds, in under a minute (:data:`COMPILE_SECONDS_LIMIT`);
* no register spills (local memory, what Triton reports as ``n_spills``; read from the
  cubin with the ``cuobjdump`` Triton ships);
* the kernel's shared memory fits one block on the target (227 KB on sm_90, 163 KB on
  sm_80: the opt-in per-block maxima the driver checks at launch);
* kernels that call ``tl.dot`` compile it to tensor-core MMA (``wgmma`` or ``mma`` in
  the PTX), not an FMA fallback (except fp32 with ``input_precision="ieee"``, FMA by
  design).

A failing check listed in :data:`KNOWN_ISSUES` (documented, reported) xfails; an entry
that no longer matches any failure fails :func:`test_known_issues_still_occur`.

What is compiled is derived from the launchers, not copied from them
(:mod:`gankernels.bench.aot`, shared with the static report): each case calls
the real host function (``conv3x3_forward``, ``fused_backward``, ``max_pool2d_forward``,
...) on *meta* tensors of an ANCHORS.md shape, with every module-level ``*_kernel``
replaced by a recorder, and binds the recorded arguments with Triton's own binder for
the target, so the signature (``*bf16``, ``i32``, ``constexpr`` ...), the integer
specialisations (divisible by 16, equal to 1) and the constexprs are exactly what a
GPU launch would produce. For autotuned kernels the launcher's configuration keys are
replaced by the autotune configurations that survive the kernel's own pruning for that
shape: the first one by default (what ``GANKERNELS_TRITON_AUTOTUNE=0`` launches for the
forward), every one in the extended set (``GANKERNELS_SLOW_TESTS=1``).

Compiles run in a process pool (``GANKERNELS_AOT_JOBS``, default 2) and go through
Triton's on-disk cache, so a rerun with unchanged kernels is fast; the budget is for a
cold cache. Works with triton 3.6 (the GPU machine) and 3.8 (here): both have
``ASTSource(fn, signature, constexprs, attrs)`` and the same private binder
(``create_function_from_signature`` / ``JITFunction._pack_args``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import importlib.util
import multiprocessing
import os
import re
import time
from typing import Optional

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 turns kernels into Python functions; run this file without it", allow_module_level=True)

triton = pytest.importorskip("triton")

from gankernels.bench import aot  # noqa: E402
from gankernels.bench.aot import (  # noqa: E402
    DISC,
    GEN,
    MODULES,
    Case,
    Launch,
    N,
    cases_for,
    cfg_label,
    conv_bwd_launches,
    conv_fwd_launches,
    conv_shapes,
    kernel_names,
    launches_of,
    meta_tensor,
    resource_usage,
    shape_label,
)


def _cuda_compile_unavailable() -> Optional[str]:
    """Why this Triton cannot compile CUDA kernels here (None: it can)."""
    try:
        from triton import knobs
        from triton.backends import backends

        if "nvidia" not in backends:
            return f"triton {triton.__version__} has no nvidia backend"
        knobs.nvidia.ptxas.path  # noqa: B018 - raises when no ptxas is found
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot compile"
        return f"triton {triton.__version__} cannot compile for CUDA here: {type(e).__name__}: {e}"
    return None


_UNAVAILABLE = _cuda_compile_unavailable()
if _UNAVAILABLE:
    pytest.skip(_UNAVAILABLE, allow_module_level=True)

SLOW = os.environ.get("GANKERNELS_SLOW_TESTS") == "1"

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): what a
# launch may request. H100/H200 have 228 KB per SM, 227 KB of it per block; A100 164/163.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

# One kernel compiles in 0.1-2 s here; far beyond that is a pathological compile (an
# unrolled loop blowing up, as found once by hand), worth failing on even on a loaded
# shared machine.
COMPILE_SECONDS_LIMIT = 60.0


@dataclasses.dataclass(frozen=True)
class Known:
    """A check known to fail (found by this file, reported, not fixed yet).

    ``pattern`` is a regex on case ids; ``check`` one of "compile", "time", "smem",
    "mma", "spill". A matching case whose failures are all known xfails (with the
    reason). ``extended``: the entry applies to the extended set only, so it cannot
    hide a regression of a default case. ``seen``: the Triton versions (major.minor)
    that show it — register allocation differs between releases (their ptxas too);
    under those versions :func:`test_known_issues_still_occur` fails once the entry
    matches no failing case, so it is removed when the kernel is fixed.
    """

    pattern: str
    check: str
    reason: str
    seen: tuple[str, ...]
    extended: bool = False


KNOWN_ISSUES: tuple[Known, ...] = (
    # Default set.
    Known(
        r"^sm90-(conv3x3_fwd|up_conv3x3_fwd|dgrad|wgrad)_kernel-bf16-nchw-",
        "spill",
        "NCHW input (channel stride != 1: no vector loads along K, per-element offsets): the conv-family kernels "
        "run at 255 registers and spill (triton 3.8: forward 128x128x64 w8 s3 104 B (conv), 40 B (pool); the "
        "four-phase up-conv 64x64x32 w4 s2 120 B, its 9 shifted tiles gathered element by element). The backward "
        "kernels read a channels_last gp grid whatever x's layout. channels_last, the layout the kernels are built "
        "for, does not spill",
        seen=("3.6", "3.8"),
    ),
    Known(
        r"^sm90-max_pool_fwd_kernel-bf16-cl-maxpool2x2-idx$",
        "spill",
        "triton 3.6: max-pool forward 2x2 with int64 indices, channels_last bf16, spills 8 B at 80 registers",
        seen=("3.6",),
    ),
    Known(
        r"^sm90-bias_act_bwd_kernel-bf16-cl-biasact-silu-gain-clamp$",
        "spill",
        "triton 3.8: bias_act backward silu + gain + clamp spills 4 B (8 B stack frame) at 96 registers",
        seen=("3.8",),
    ),
    # Extended set (every autotune configuration).
    Known(
        r"^sm(80|90)-(conv3x3_fwd|dgrad|wgrad)_kernel-",
        "spill",
        "some non-first autotune configurations of the conv kernels spill (8 B to 1.8 KB; the large ones in NCHW and "
        "in the 128x64x64 w4 / 128x256x64 w8 forward tiles); the autotuner times them and should not pick them",
        seen=("3.6", "3.8"),
        extended=True,
    ),
)

# Shapes from /work/shared/ANCHORS.md beyond aot's N, DISC (conv3x3, +pool), GEN (up_conv3x3).
MEM = (64, 128, 64, 64)  # stand-alone max-pool / upsample / bias_act
TORGB = (32, 3, 64)  # the generator's last conv3x3 (32 -> 3, tanh) from the training step


# The representative launches of the stand-alone ops (the conv ones come from aot).
def memop_launches(dtype: str, cl: bool) -> dict[str, list[Launch]]:
    """Forward and backward launches of the stand-alone ops on the ANCHORS shape."""
    from gankernels.triton import bias_act, max_pool, upsample

    n, c, h, w = MEM
    x = meta_tensor(MEM, dtype, cl)
    g_up = meta_tensor((n, c, 2 * h, 2 * w), dtype, cl)
    b = meta_tensor((c,), dtype)
    out: dict[str, list[Launch]] = {}
    out["upsample"] = launches_of(
        lambda: (upsample.upsample_nearest2d_forward(x, 2), upsample.upsample_nearest2d_backward(g_up, 2))
    )
    for k, s, p in (((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1))):
        for ret in (False, True):

            def pool(k=k, s=s, p=p, ret=ret):
                args = (list(k), list(s), list(p), [1, 1], False)
                y, saved = max_pool.max_pool2d_forward(x, *args, return_indices=ret)
                max_pool.max_pool2d_backward(torch.empty_like(y), x, saved, *args, return_indices=ret)

            out[f"maxpool{k[0]}x{k[1]}-{'idx' if ret else 'code'}"] = launches_of(pool)
    epilogues = [("lrelu", 1.0, None), ("silu", 2.0**0.5, 256.0)]
    if dtype == "bf16" and cl:  # every activation once
        epilogues += [("linear", 1.0, None), ("relu", 1.0, None), ("tanh", 1.0, None), ("sigmoid", 1.0, None)]
    for act, gain, clamp in epilogues:

        def ba(act=act, gain=gain, clamp=clamp):
            y = bias_act.bias_act_forward(x, b, act, 0.2, gain, clamp, 1)
            bias_act.bias_act_backward(torch.empty_like(y), x, b, y, act, 0.2, gain, clamp, 1)

        out[f"biasact-{act}{'-gain-clamp' if clamp else ''}"] = launches_of(ba)
    return out


def gp_launches(dtype: str, cl: bool) -> list[Launch]:
    """``pre_activation_grad`` (the materialised gradient behind the cuDNN switch)."""
    from gankernels.triton import conv3x3_backward as bwd

    ci, co, h = DISC[1]
    x, w, b = meta_tensor((N, ci, h, h), dtype, cl), meta_tensor((co, ci, 3, 3), dtype), meta_tensor((co,), dtype)
    grad, out = meta_tensor((N, co, h // 2, h // 2), dtype, cl), meta_tensor((N, co, h // 2, h // 2), dtype, cl)
    saved = meta_tensor((N, co, h // 2, h // 2), dtype, cl, torch.int8)
    return launches_of(lambda: bwd.pre_activation_grad("conv3x3_pool", grad, x, w, b, out, saved, "lrelu", 0.2, 1.0, None))


def build_cases(slow: bool) -> list[Case]:
    """The default set (``slow=False``) or the extended one (every autotune config of
    every ANCHORS shape and layout), deduplicated by compiled binary."""
    cases: list[Case] = []

    def add(launches: list[Launch], arch: int, label: str, every: bool = False) -> None:
        cases.extend(cases_for(launches, arch, label, every))

    ops = ("conv", "pool", "up")
    if not slow:
        # Forward, sm_90: every ANCHORS shape in bf16 channels_last (heuristic config),
        # one shape per mode in bf16 NCHW and fp32 (TF32), the to-RGB conv (Co = 3, tanh).
        for op in ops:
            for ci, co, h in conv_shapes(op):
                add(conv_fwd_launches(op, ci, co, h, "bf16", True), 90, f"bf16-cl-{shape_label(op, ci, co, h)}")
            ci, co, h = conv_shapes(op)[1]
            add(conv_fwd_launches(op, ci, co, h, "bf16", False), 90, f"bf16-nchw-{shape_label(op, ci, co, h)}")
            add(conv_fwd_launches(op, ci, co, h, "fp32", True), 90, f"fp32-cl-{shape_label(op, ci, co, h)}")
            add(conv_fwd_launches(op, ci, co, h, "bf16", True), 80, f"bf16-cl-{shape_label(op, ci, co, h)}")
        # The row-pair up-conv (Co <= 32, channels_last; the loop above reaches it on the last
        # GEN row only): fp32 on sm_90, bf16 on sm_80.
        ci, co, h = GEN[-1]
        add(conv_fwd_launches("up", ci, co, h, "fp32", True), 90, f"fp32-cl-{shape_label('up', ci, co, h)}")
        add(conv_fwd_launches("up", ci, co, h, "bf16", True), 80, f"bf16-cl-{shape_label('up', ci, co, h)}")
        ci, co, h = TORGB
        add(conv_fwd_launches("conv", ci, co, h, "bf16", True, act="tanh"), 90, f"bf16-cl-torgb-{ci}to{co}h{h}-tanh")
        # Every epilogue variant (activation, gain, clamp) once, and fp16.
        ci, co, h = DISC[1]
        for act in ("linear", "relu", "tanh", "sigmoid", "silu"):
            add(conv_fwd_launches("conv", ci, co, h, "bf16", True, act=act), 90, f"bf16-cl-{act}-{shape_label('conv', ci, co, h)}")
        add(
            conv_fwd_launches("pool", ci, co, h, "bf16", True, act="silu", gain=2.0**0.5, clamp=256.0),
            90,
            f"bf16-cl-silu-gain-clamp-{shape_label('pool', ci, co, h)}",
        )
        add(conv_fwd_launches("conv", ci, co, h, "fp16", True), 90, f"fp16-cl-{shape_label('conv', ci, co, h)}")
        # Backward, sm_90: each mode in bf16 channels_last, lrelu (derivative read off y);
        # silu (recomputed pre-activation) for the pooled op; the first discriminator
        # layer (3 -> 64, x needs no gradient: wgrad only); fp32; one mode on sm_80.
        for op in ops:
            ci, co, h = conv_shapes(op)[1]
            add(conv_bwd_launches(op, ci, co, h, "bf16", True), 90, f"bf16-cl-{shape_label(op, ci, co, h)}")
        ci, co, h = DISC[1]
        add(conv_bwd_launches("pool", ci, co, h, "bf16", True, act="silu"), 90, f"bf16-cl-silu-{shape_label('pool', ci, co, h)}")
        for act in ("linear", "relu", "tanh", "sigmoid"):  # derivative read off y, per activation
            add(conv_bwd_launches("conv", ci, co, h, "bf16", True, act=act), 90, f"bf16-cl-{act}-{shape_label('conv', ci, co, h)}")
        add(
            conv_bwd_launches("up", *GEN[1], "bf16", True, gain=2.0**0.5, clamp=256.0),
            90,
            f"bf16-cl-lrelu-gain-clamp-{shape_label('up', *GEN[1])}",
        )
        add(conv_bwd_launches("conv", ci, co, h, "fp32", True), 90, f"fp32-cl-{shape_label('conv', ci, co, h)}")
        add(conv_bwd_launches("pool", ci, co, h, "bf16", False), 90, f"bf16-nchw-{shape_label('pool', ci, co, h)}")
        add(
            conv_bwd_launches("conv", ci, co, h, "bf16", True, needs=(False, False, True)),
            90,
            f"bf16-cl-biasonly-{shape_label('conv', ci, co, h)}",
        )
        ci, co, h = DISC[0]
        add(
            conv_bwd_launches("pool", ci, co, h, "bf16", True, needs=(False, True, True)),
            90,
            f"bf16-cl-wgradonly-{shape_label('pool', ci, co, h)}",
        )
        ci, co, h = GEN[1]
        add(conv_bwd_launches("up", ci, co, h, "bf16", True), 80, f"bf16-cl-{shape_label('up', ci, co, h)}")
        add(gp_launches("bf16", True), 90, "bf16-cl-pool")
        # Memory-bound ops: bf16 in both layouts and fp32 channels_last on sm_90;
        # bf16 channels_last on sm_80.
        for dtype, cl, archs in (("bf16", True, (90, 80)), ("bf16", False, (90,)), ("fp32", True, (90,))):
            for what, launches in memop_launches(dtype, cl).items():
                for arch in archs:
                    add(launches, arch, f"{dtype}-{'cl' if cl else 'nchw'}-{what}")
    else:
        # Every surviving autotune configuration, every ANCHORS shape: bf16 channels_last
        # and NCHW, fp32 channels_last on sm_90; bf16 and fp32 channels_last on sm_80.
        for dtype, cl, arch in (
            ("bf16", True, 90),
            ("bf16", False, 90),
            ("fp32", True, 90),
            ("bf16", True, 80),
            ("fp32", True, 80),
        ):
            lay = f"{dtype}-{'cl' if cl else 'nchw'}"
            for op in ops:
                for ci, co, h in conv_shapes(op):
                    add(conv_fwd_launches(op, ci, co, h, dtype, cl), arch, f"{lay}-{shape_label(op, ci, co, h)}", True)
                    add(conv_bwd_launches(op, ci, co, h, dtype, cl), arch, f"{lay}-{shape_label(op, ci, co, h)}", True)
    unique: dict[str, Case] = {}
    for c in cases:
        unique.setdefault(c.key(), c)
    return list(unique.values())


# ----------------------------------------------------------------------------------
# Compiling (in worker processes) and what is read off the result.


@dataclasses.dataclass
class Result:
    ok: bool
    seconds: float
    error: str = ""
    shared: int = 0
    local_bytes: int = -1  # per-thread stack + local memory (spills); -1: unknown (no cuobjdump)
    registers: int = -1
    mma: str = ""  # "wgmma", "mma" or "" (no tensor-core instruction in the PTX)
    has_dot: bool = False  # a tt.dot survives in the TTIR (constexpr branches can drop it)


def compile_case(case: Case) -> Result:
    """Compile ``case`` for its target and read the checks' inputs off the binary."""
    t0 = time.perf_counter()
    try:
        k = aot.compile_case(case)
    except Exception as e:  # noqa: BLE001 - the failure is the result
        msg = f"{type(e).__name__}: {e}"
        return Result(ok=False, seconds=time.perf_counter() - t0, error=msg[-6000:])
    seconds = time.perf_counter() - t0
    try:
        regs, local = resource_usage(k.asm["cubin"], k.metadata.name)
    except FileNotFoundError:  # no cuobjdump: spills unknown
        regs, local = -1, -1
    ptx = k.asm["ptx"]
    mma = "wgmma" if re.search(r"\bwgmma\.mma_async", ptx) else "mma" if re.search(r"\bmma\.sync", ptx) else ""
    has_dot = re.search(r"\btt\.dot\b", k.asm["ttir"]) is not None
    return Result(ok=True, seconds=seconds, shared=k.metadata.shared, local_bytes=local, registers=regs, mma=mma, has_dot=has_dot)


def compile_all(cases: list[Case]) -> dict[str, Result]:
    """Compile ``cases`` in a process pool (``GANKERNELS_AOT_JOBS`` workers, default
    min(2, cores)); results by case id."""
    jobs = int(os.environ.get("GANKERNELS_AOT_JOBS", min(2, os.cpu_count() or 1)))
    # Workers unpickle compile_case by module name: compile in process when this module
    # is not importable by its name (e.g. pytest --import-mode=importlib).
    if jobs <= 1 or importlib.util.find_spec(__name__) is None:
        return {c.id: compile_case(c) for c in cases}
    # spawn: a fresh interpreter per worker (no fork of a process holding torch's threads).
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        # Longest first (the conv kernels) so the pool does not end on one long compile.
        order = sorted(cases, key=lambda c: not c.heavy)
        futures = {c.id: pool.submit(compile_case, c) for c in order}
        results = {}
        for cid, f in futures.items():
            try:
                results[cid] = f.result()
            except Exception as e:  # noqa: BLE001 - e.g. a worker killed by a compiler crash
                results[cid] = Result(ok=False, seconds=0.0, error=f"compile worker failed: {type(e).__name__}: {e}")
        return results


# ----------------------------------------------------------------------------------
# The tests.

_CASES: dict[bool, list[Case]] = {}


def _cases(slow: bool) -> list[Case]:
    if slow not in _CASES:
        _CASES[slow] = build_cases(slow)
        if slow:  # the extended set runs only what the default set does not
            fast = {c.key() for c in _cases(False)}
            _CASES[slow] = [c for c in _CASES[slow] if c.key() not in fast]
    return _CASES[slow]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Cases are built at collection (cheap: meta tensors), not at import, so compile
    # workers importing this module do not rebuild them.
    if "case_id" in metafunc.fixturenames:
        slow = metafunc.function.__name__ == "test_compiles_extended"
        if slow and not SLOW:
            off = pytest.mark.skip(reason="extended compile set: set GANKERNELS_SLOW_TESTS=1")
            metafunc.parametrize("case_id", [pytest.param("every-autotune-config", marks=off)])
            return
        metafunc.parametrize("case_id", [c.id for c in _cases(slow)])


@pytest.fixture(scope="module")
def results() -> dict[str, Result]:
    t0 = time.perf_counter()
    res = compile_all(_cases(False))
    _report(res, time.perf_counter() - t0)
    return res


@pytest.fixture(scope="module")
def results_extended() -> dict[str, Result]:
    if not SLOW:
        pytest.skip("extended compile set: set GANKERNELS_SLOW_TESTS=1")
    t0 = time.perf_counter()
    res = compile_all(_cases(True))
    _report(res, time.perf_counter() - t0)
    return res


def _report(res: dict[str, Result], wall: float) -> None:
    """One line per case (visible with ``pytest -s``): time, registers, spills, smem, MMA."""
    print(f"\n{len(res)} AOT compiles in {wall:.1f} s (triton {triton.__version__})")
    for cid, r in sorted(res.items(), key=lambda kv: -kv[1].seconds):
        state = "ok" if r.ok else "FAILED"
        print(
            f"  {r.seconds:6.1f} s  {state:6s} regs={r.registers:4d} local={r.local_bytes:5d} B "
            f"smem={r.shared // 1024:4d} KB  {r.mma or '-':5s}  {cid}"
        )


def _problems(case: Case, r: Result) -> dict[str, str]:
    """Every check ``r`` fails: {check: message} (empty: all pass)."""
    if not r.ok:
        return {"compile": f"compile failed for sm_{case.arch}: {r.error}"}
    problems = {}
    if r.seconds > COMPILE_SECONDS_LIMIT:
        problems["time"] = f"compiling took {r.seconds:.0f} s (limit {COMPILE_SECONDS_LIMIT:.0f} s): pathological compile"
    limit = SMEM_LIMIT[case.arch]
    if r.shared > limit:
        problems["smem"] = f"shared memory {r.shared} B exceeds the sm_{case.arch} per-block limit {limit} B"
    if r.has_dot and not case.ieee_fp32 and not r.mma:
        problems["mma"] = "tl.dot compiled without tensor-core MMA (no wgmma/mma in the PTX): FMA fallback"
    if r.local_bytes > 0:
        problems["spill"] = (
            f"register spills: {r.local_bytes} B of local memory (n_spills={r.local_bytes // 4}, {r.registers} registers)"
        )
    return problems


def _known(case: Case, slow: bool) -> dict[str, str]:
    """The :data:`KNOWN_ISSUES` entries matching ``case`` in the default (``slow=False``)
    or extended set: {check: reason}."""
    return {k.check: k.reason for k in KNOWN_ISSUES if (slow or not k.extended) and re.search(k.pattern, case.id)}


def _check(case_id: str, res: dict[str, Result], slow: bool) -> None:
    case = next(c for c in _cases(slow) if c.id == case_id)
    problems = _problems(case, res[case_id])
    known = _known(case, slow)
    new = {check: msg for check, msg in problems.items() if check not in known}
    assert not new, f"{case_id}:\n  " + "\n  ".join(new.values())
    if problems:
        pytest.xfail("known: " + "; ".join(f"{problems[c]} ({known[c]})" for c in problems))


def test_compiles(case_id: str, results: dict[str, Result]) -> None:
    """Each default case compiles, fits shared memory, does not spill, uses MMA for dots."""
    _check(case_id, results, slow=False)


@pytest.mark.slow
def test_compiles_extended(case_id: str, results_extended: dict[str, Result]) -> None:
    """The same checks for every surviving autotune configuration (GANKERNELS_SLOW_TESTS=1)."""
    _check(case_id, results_extended, slow=True)


def test_every_kernel_is_covered() -> None:
    """Every launchable kernel of every Triton module is compiled by a default case on
    sm_90 (a new kernel without a case fails here)."""
    covered = {(c.module, c.kernel) for c in _cases(False) if c.arch == 90}
    missing = [(m, k) for m in MODULES for k in kernel_names(m) if (m, k) not in covered]
    assert not missing, f"kernels no default AOT case launches (add a launch in build_cases): {missing}"


def test_conv_configs_cover_both_lists() -> None:
    """The default set compiles at least one configuration of each forward kernel's Hopper
    list for sm_90 and of its Ampere list for sm_80."""
    from gankernels.triton import conv3x3, up_conv3x3, up_conv3x3_pairs

    kernels = (
        (conv3x3, "_conv3x3_fwd_kernel"),
        (up_conv3x3, "_up_conv3x3_fwd_kernel"),
        (up_conv3x3_pairs, "_up_conv3x3_pairs_fwd_kernel"),
    )
    for mod, kernel in kernels:
        for arch, configs in ((90, mod._CONFIGS_HOPPER), (80, mod._CONFIGS_AMPERE)):
            labels = {cfg_label(c) for c in configs}
            used = {c.id.rsplit("-", 1)[-1] for c in _cases(False) if c.kernel == kernel and c.arch == arch}
            assert used & labels, f"{kernel}, sm_{arch}: no default case uses a configuration of its list {sorted(labels)}"


def test_known_issues_still_occur(request: pytest.FixtureRequest, results: dict[str, Result]) -> None:
    """Every :data:`KNOWN_ISSUES` entry still matches a failing case (of the sets this run
    compiled): a fixed kernel's entry must be removed, so it cannot hide a regression."""
    runs = [(False, results)]
    if SLOW:
        runs.append((True, request.getfixturevalue("results_extended")))
    stale = []
    version = ".".join(triton.__version__.split(".")[:2])
    for k in KNOWN_ISSUES:
        if (k.extended and not SLOW) or version not in k.seen:
            continue
        hit = any(
            re.search(k.pattern, c.id) and k.check in _problems(c, res[c.id])
            for slow, res in runs
            if slow or not k.extended
            for c in _cases(slow)
        )
        if not hit:
            stale.append(f"{k.pattern} ({k.check})")
    assert not stale, f"KNOWN_ISSUES entries that match no failing case any more (remove them): {stale}"
