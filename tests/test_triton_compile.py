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

What is compiled is derived from the launchers, not copied from them: each case calls
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
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 turns kernels into Python functions; run this file without it", allow_module_level=True)

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


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

# The Triton kernel modules; every module-level ``*_kernel`` in them must be covered.
MODULES = (
    "gankernels.triton.max_pool",
    "gankernels.triton.upsample",
    "gankernels.triton.bias_act",
    "gankernels.triton.conv3x3",
    "gankernels.triton.conv3x3_backward",
)

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
        r"^sm90-(conv3x3_fwd|dgrad|wgrad)_kernel-bf16-nchw-",
        "spill",
        "NCHW input (channel stride != 1; likely cause: 64-bit per-element pointers, no vector loads along K): the "
        "conv-family kernels run at 255 registers and spill. triton 3.8: forward 128x128x64 w8 944 B (conv), 112 B "
        "(pool), 872 B (up-conv), dgrad pool 128 B, wgrad pool 32 B; triton 3.6: wgrad pool 8 B. channels_last, "
        "the layout the kernels are built for, does not spill there",
        seen=("3.6", "3.8"),
    ),
    Known(
        r"^sm90-wgrad_kernel-bf16-cl-(silu-)?pool.*-64x64x64w4s3$",
        "spill",
        "triton 3.6 (the GPU machine's): the pool-mode wgrad (conv3x3_pool backward, the discriminator's training "
        "path) spills 16 B (8 B with silu) at 255 registers in its first config 64x64x64 w4 s3; triton 3.8 does not",
        seen=("3.6",),
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

# Shapes from /work/shared/ANCHORS.md: batch 64; (Ci, Co, H_in) per block row.
N = 64
DISC = [(3, 64, 128), (64, 128, 64), (128, 256, 32), (256, 512, 16)]  # conv3x3(+pool)
GEN = [(512, 256, 8), (256, 128, 16), (128, 64, 32), (64, 32, 64)]  # up_conv3x3
MEM = (64, 128, 64, 64)  # stand-alone max-pool / upsample / bias_act
TORGB = (32, 3, 64)  # the generator's last conv3x3 (32 -> 3, tanh) from the training step


# ----------------------------------------------------------------------------------
# Recording what the launchers launch.


@dataclasses.dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call made by a launcher."""

    module: str
    name: str
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, module: str, name: str, sink: list[Launch]) -> None:
        self.module, self.name, self.sink = module, name, sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.sink.append(Launch(self.module, self.name, args, dict(kwargs)))

        return launch


def kernel_names(module: str) -> list[str]:
    """The launchable kernels of ``module``: module-level Triton objects named ``*_kernel``
    (the modules' convention; ``@triton.jit`` device helpers have other names)."""
    mod = importlib.import_module(module)
    return sorted(
        name for name, obj in vars(mod).items() if name.endswith("_kernel") and isinstance(obj, triton.runtime.KernelInterface)
    )


def unwrap(obj: Any) -> triton.runtime.JITFunction:
    """The ``JITFunction`` under ``triton.autotune`` / ``triton.heuristics`` wrappers."""
    while not isinstance(obj, triton.runtime.JITFunction):
        if not hasattr(obj, "fn"):
            raise TypeError(f"{obj!r} is not a Triton kernel (no JITFunction under it)")
        obj = obj.fn
    return obj


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Replace every kernel of :data:`MODULES` by a recorder for the duration; yields the
    list the launches are appended to. TF32 is pinned on (the default) so fp32 convs
    bind ``PRECISION="tf32"`` deterministically."""
    sink: list[Launch] = []
    saved = []
    old_tf32 = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        for module in MODULES:
            mod = importlib.import_module(module)
            for name in kernel_names(module):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, _Recorder(module, name, sink))
        # The backward picks TF32 only for CUDA tensors (the interpreter is exact): let
        # the meta tensors stand for CUDA ones there, as they do everywhere else.
        bwd = importlib.import_module("gankernels.triton.conv3x3_backward")
        precision = bwd._precision
        saved.append((bwd, "_precision", precision))
        bwd._precision = lambda dtype, device: precision(dtype, torch.device("cuda") if device.type == "meta" else device)
        yield sink
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)
        torch.backends.cudnn.allow_tf32 = old_tf32


# ----------------------------------------------------------------------------------
# Binding a launch for a target: Triton's own specialisation, no GPU.


@functools.cache
def _backend(arch: int):
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


@dataclasses.dataclass
class Case:
    """One compilation: a kernel bound for one target with one configuration."""

    id: str
    module: str
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    ieee_fp32: bool  # tl.dot(input_precision="ieee") on fp32 operands: FMA by design
    heavy: bool  # calls tl.dot (compiled first: the long compiles)

    def key(self) -> str:
        """Identity of the compiled binary (cases with equal keys compile once)."""
        return repr(
            (
                self.module,
                self.kernel,
                self.arch,
                sorted(self.signature.items()),
                sorted(self.constexprs.items()),
                sorted(self.attrs.items()),
                sorted(self.options.items()),
            )
        )


def bind(launch: Launch, arch: int, config: Optional[triton.Config], label: str) -> Case:
    """The :class:`Case` a GPU of compute capability ``arch`` would compile for
    ``launch`` (with ``config``'s keys replacing the launcher's, for autotuned kernels)."""
    from triton.runtime.jit import create_function_from_signature

    jit = unwrap(getattr(importlib.import_module(launch.module), launch.name))
    kwargs = dict(launch.kwargs)
    if config is not None:
        for k in config.kwargs:
            kwargs.pop(k, None)
        kwargs.update(config.all_kwargs())
    backend = _backend(arch)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, opts)
    return Case(
        id=f"sm{arch}-{launch.name.strip('_')}-{label}",
        module=launch.module,
        kernel=launch.name,
        arch=arch,
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        options=dict(options.__dict__),
        ieee_fp32="ieee" in constexprs.values() and _operand_dtype(signature) == "*fp32",
        heavy="tl.dot(" in jit.src,
    )


def _operand_dtype(signature: dict) -> str:
    """The kernel's first pointer type: the dtype of what it feeds ``tl.dot``."""
    return next((v for v in signature.values() if v.startswith("*")), "")


def _family(arch: int) -> str:
    return "hopper" if arch >= 90 else "ampere"


def autotune_configs(launch: Launch, arch: int) -> Optional[list[triton.Config]]:
    """The configurations the autotuner would try for ``launch`` on ``arch`` (after the
    kernel's own pruning, in list order), or None for a kernel launched as is."""
    mod = importlib.import_module(launch.module)
    obj = getattr(mod, launch.name)
    if launch.module == "gankernels.triton.conv3x3" and launch.name == "_conv3x3_fwd_kernel":
        # Autotuned at first GPU use per family (conv3x3._tuned_kernel); on CPU the
        # launcher passes the interpreter's fixed tile, which the config replaces.
        family = _family(arch)
        configs = mod._CONFIGS_HOPPER if family == "hopper" else mod._CONFIGS_AMPERE
        prune = functools.partial(mod._prune_configs, smem_limit=mod._SMEM_LIMIT[family])
    elif isinstance(obj, triton.runtime.Autotuner):
        configs, prune = obj.configs, obj.early_config_prune
    else:
        return None
    if prune is None:
        return list(configs)
    named = dict(zip(unwrap(obj).arg_names, launch.args, strict=False))  # positional args only, as the autotuner
    return list(prune(configs, named, **launch.kwargs))


def _cfg_label(c: triton.Config) -> str:
    blocks = "x".join(str(v) for v in c.kwargs.values())
    return f"{blocks}w{c.num_warps}s{c.num_stages}"


def cases_for(launches: list[Launch], arch: int, label: str, every_config: bool) -> list[Case]:
    """Bind each launch for ``arch``: autotuned kernels with their first surviving
    configuration (or every one)."""
    out = []
    for la in launches:
        configs = autotune_configs(la, arch)
        if configs is None:
            out.append(bind(la, arch, None, label))
            continue
        for c in configs if every_config else configs[:1]:
            out.append(bind(la, arch, c, f"{label}-{_cfg_label(c)}"))
    return out


# ----------------------------------------------------------------------------------
# The representative launches (meta tensors of ANCHORS shapes).

_DT = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _t(shape: tuple, dtype: str, cl: bool = False, int_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    t = torch.empty(shape, dtype=int_dtype or _DT[dtype], device="meta")
    return t.contiguous(memory_format=torch.channels_last) if cl and t.dim() == 4 else t


def launches_of(fn: Callable[[], Any]) -> list[Launch]:
    with recording() as sink:
        fn()
    return list(sink)


def memop_launches(dtype: str, cl: bool) -> dict[str, list[Launch]]:
    """Forward and backward launches of the stand-alone ops on the ANCHORS shape."""
    from gankernels.triton import bias_act, max_pool, upsample

    n, c, h, w = MEM
    x = _t(MEM, dtype, cl)
    g_up = _t((n, c, 2 * h, 2 * w), dtype, cl)
    b = _t((c,), dtype)
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


def conv_fwd_launches(
    op: str, ci: int, co: int, h: int, dtype: str, cl: bool, act: str = "lrelu", gain: float = 1.0, clamp: Optional[float] = None
) -> list[Launch]:
    from gankernels.triton import conv3x3

    fn = {"conv": conv3x3.conv3x3_forward, "pool": conv3x3.conv3x3_pool_forward, "up": conv3x3.up_conv3x3_forward}[op]
    x, w, b = _t((N, ci, h, h), dtype, cl), _t((co, ci, 3, 3), dtype), _t((co,), dtype)
    return launches_of(lambda: fn(x, w, b, act, 0.2, gain, clamp))


def conv_bwd_launches(
    op: str,
    ci: int,
    co: int,
    h: int,
    dtype: str,
    cl: bool,
    act: str = "lrelu",
    needs: tuple[bool, bool, bool] = (True, True, True),
    gain: float = 1.0,
    clamp: Optional[float] = None,
) -> list[Launch]:
    """The backward's launches (dgrad, wgrad; plus the forward that recomputes the
    pre-activation when the derivative cannot be read off the output)."""
    from gankernels.triton import conv3x3_backward as bwd

    name = {"conv": "conv3x3", "pool": "conv3x3_pool", "up": "up_conv3x3"}[op]
    x, w, b = _t((N, ci, h, h), dtype, cl), _t((co, ci, 3, 3), dtype), _t((co,), dtype)
    ho = {"conv": h, "pool": h // 2, "up": 2 * h}[op]
    grad, out = _t((N, co, ho, ho), dtype, cl), _t((N, co, ho, ho), dtype, cl)
    saved = _t((N, co, ho, ho), dtype, cl, torch.int8) if op == "pool" else x.new_empty((0,))
    return launches_of(lambda: bwd.fused_backward(name, grad, x, w, b, out, saved, act, 0.2, gain, clamp, needs))


def gp_launches(dtype: str, cl: bool) -> list[Launch]:
    """``pre_activation_grad`` (the materialised gradient behind the cuDNN switch)."""
    from gankernels.triton import conv3x3_backward as bwd

    ci, co, h = DISC[1]
    x, w, b = _t((N, ci, h, h), dtype, cl), _t((co, ci, 3, 3), dtype), _t((co,), dtype)
    grad, out = _t((N, co, h // 2, h // 2), dtype, cl), _t((N, co, h // 2, h // 2), dtype, cl)
    saved = _t((N, co, h // 2, h // 2), dtype, cl, torch.int8)
    return launches_of(lambda: bwd.pre_activation_grad("conv3x3_pool", grad, x, w, b, out, saved, "lrelu", 0.2, 1.0, None))


def _shape_label(op: str, ci: int, co: int, h: int) -> str:
    return f"{op}{ci}to{co}h{h}"


def _conv_shapes(op: str) -> list[tuple[int, int, int]]:
    return GEN if op == "up" else DISC


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
            for ci, co, h in _conv_shapes(op):
                add(conv_fwd_launches(op, ci, co, h, "bf16", True), 90, f"bf16-cl-{_shape_label(op, ci, co, h)}")
            ci, co, h = _conv_shapes(op)[1]
            add(conv_fwd_launches(op, ci, co, h, "bf16", False), 90, f"bf16-nchw-{_shape_label(op, ci, co, h)}")
            add(conv_fwd_launches(op, ci, co, h, "fp32", True), 90, f"fp32-cl-{_shape_label(op, ci, co, h)}")
            add(conv_fwd_launches(op, ci, co, h, "bf16", True), 80, f"bf16-cl-{_shape_label(op, ci, co, h)}")
        ci, co, h = TORGB
        add(conv_fwd_launches("conv", ci, co, h, "bf16", True, act="tanh"), 90, f"bf16-cl-torgb-{ci}to{co}h{h}-tanh")
        # Every epilogue variant (activation, gain, clamp) once, and fp16.
        ci, co, h = DISC[1]
        for act in ("linear", "relu", "tanh", "sigmoid", "silu"):
            add(conv_fwd_launches("conv", ci, co, h, "bf16", True, act=act), 90, f"bf16-cl-{act}-{_shape_label('conv', ci, co, h)}")
        add(
            conv_fwd_launches("pool", ci, co, h, "bf16", True, act="silu", gain=2.0**0.5, clamp=256.0),
            90,
            f"bf16-cl-silu-gain-clamp-{_shape_label('pool', ci, co, h)}",
        )
        add(conv_fwd_launches("conv", ci, co, h, "fp16", True), 90, f"fp16-cl-{_shape_label('conv', ci, co, h)}")
        # Backward, sm_90: each mode in bf16 channels_last, lrelu (derivative read off y);
        # silu (recomputed pre-activation) for the pooled op; the first discriminator
        # layer (3 -> 64, x needs no gradient: wgrad only); fp32; one mode on sm_80.
        for op in ops:
            ci, co, h = _conv_shapes(op)[1]
            add(conv_bwd_launches(op, ci, co, h, "bf16", True), 90, f"bf16-cl-{_shape_label(op, ci, co, h)}")
        ci, co, h = DISC[1]
        add(conv_bwd_launches("pool", ci, co, h, "bf16", True, act="silu"), 90, f"bf16-cl-silu-{_shape_label('pool', ci, co, h)}")
        for act in ("linear", "relu", "tanh", "sigmoid"):  # derivative read off y, per activation
            add(conv_bwd_launches("conv", ci, co, h, "bf16", True, act=act), 90, f"bf16-cl-{act}-{_shape_label('conv', ci, co, h)}")
        add(
            conv_bwd_launches("up", *GEN[1], "bf16", True, gain=2.0**0.5, clamp=256.0),
            90,
            f"bf16-cl-lrelu-gain-clamp-{_shape_label('up', *GEN[1])}",
        )
        add(conv_bwd_launches("conv", ci, co, h, "fp32", True), 90, f"fp32-cl-{_shape_label('conv', ci, co, h)}")
        add(conv_bwd_launches("pool", ci, co, h, "bf16", False), 90, f"bf16-nchw-{_shape_label('pool', ci, co, h)}")
        add(
            conv_bwd_launches("conv", ci, co, h, "bf16", True, needs=(False, False, True)),
            90,
            f"bf16-cl-biasonly-{_shape_label('conv', ci, co, h)}",
        )
        ci, co, h = DISC[0]
        add(
            conv_bwd_launches("pool", ci, co, h, "bf16", True, needs=(False, True, True)),
            90,
            f"bf16-cl-wgradonly-{_shape_label('pool', ci, co, h)}",
        )
        ci, co, h = GEN[1]
        add(conv_bwd_launches("up", ci, co, h, "bf16", True), 80, f"bf16-cl-{_shape_label('up', ci, co, h)}")
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
                for ci, co, h in _conv_shapes(op):
                    add(conv_fwd_launches(op, ci, co, h, dtype, cl), arch, f"{lay}-{_shape_label(op, ci, co, h)}", True)
                    add(conv_bwd_launches(op, ci, co, h, dtype, cl), arch, f"{lay}-{_shape_label(op, ci, co, h)}", True)
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


def _resource_usage(cubin: bytes, name: str) -> tuple[int, int]:
    """(registers, per-thread local memory in bytes) of kernel ``name`` in ``cubin``, from
    ``cuobjdump -res-usage``. Local memory is the stack frame (where ptxas puts spills:
    ``STACK``) plus any ``LOCAL`` array; the driver reports the same number as
    ``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES``, which Triton divides by 4 into ``n_spills``."""
    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - no cuobjdump: spills unknown
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage printed no line for {name}:\n{text}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def compile_case(case: Case) -> Result:
    """Compile ``case`` for its target and read the checks' inputs off the binary."""
    jit = unwrap(getattr(importlib.import_module(case.module), case.kernel))
    src = ASTSource(jit, case.signature, constexprs=case.constexprs, attrs=case.attrs)
    t0 = time.perf_counter()
    try:
        k = triton.compile(src, target=GPUTarget("cuda", case.arch, 32), options=case.options)
    except Exception as e:  # noqa: BLE001 - the failure is the result
        msg = f"{type(e).__name__}: {e}"
        return Result(ok=False, seconds=time.perf_counter() - t0, error=msg[-6000:])
    seconds = time.perf_counter() - t0
    regs, local = _resource_usage(k.asm["cubin"], k.metadata.name)
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
    """The default set compiles at least one configuration of the forward's Hopper list
    for sm_90 and of its Ampere list for sm_80."""
    from gankernels.triton import conv3x3

    for arch, configs in ((90, conv3x3._CONFIGS_HOPPER), (80, conv3x3._CONFIGS_AMPERE)):
        labels = {_cfg_label(c) for c in configs}
        used = {c.id.rsplit("-", 1)[-1] for c in _cases(False) if c.kernel == "_conv3x3_fwd_kernel" and c.arch == arch}
        assert used & labels, f"sm_{arch}: no default case uses a configuration of its list {sorted(labels)}"


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
