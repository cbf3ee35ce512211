"""Compile the package's Triton kernels ahead of time for a GPU target, without a GPU.

``triton.compile`` needs no GPU for a given target (Triton ships its own ``ptxas``), so
the compiled machine code of every kernel can be produced and read on any machine.
What is compiled is derived from the launchers, not copied from them: a launch is
recorded by calling the real host function (``conv3x3_forward``, ``fused_backward``,
...) on *meta* tensors with every module-level ``*_kernel`` replaced by a recorder
(:func:`recording`), and bound with Triton's own binder for the target (:func:`bind`),
so the signature (``*bf16``, ``i32``, ``constexpr`` ...), the integer specialisations
(divisible by 16, equal to 1) and the constexprs are exactly what a GPU launch would
produce. For autotuned kernels the launcher's configuration keys are replaced by the
autotune configurations that survive the kernel's own pruning for that shape
(:func:`autotune_configs`), in list order: the first is what the forward launches with
``GANKERNELS_TRITON_AUTOTUNE=0`` and the lists are ordered most-generally-good first.

Used by ``tests/test_triton_compile.py`` (compile checks: spills, shared memory, MMA)
and :mod:`gankernels.bench.static_report` (the static issue-load bound). Works with
triton 3.6 and 3.8: both have ``ASTSource(fn, signature, constexprs, attrs)`` and the
same private binder (``create_function_from_signature`` / ``JITFunction._pack_args``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget

# The Triton kernel modules; every module-level ``*_kernel`` in them is a launchable kernel.
MODULES = (
    "gankernels.triton.max_pool",
    "gankernels.triton.upsample",
    "gankernels.triton.bias_act",
    "gankernels.triton.conv3x3",
    "gankernels.triton.up_conv3x3",
    "gankernels.triton.up_conv3x3_pairs",
    "gankernels.triton.conv3x3_backward",
)

# Shapes from /work/shared/ANCHORS.md: batch 64; (Ci, Co, H_in) per block row.
N = 64
DISC = [(3, 64, 128), (64, 128, 64), (128, 256, 32), (256, 512, 16)]  # conv3x3(+pool)
GEN = [(512, 256, 8), (256, 128, 16), (128, 64, 32), (64, 32, 64)]  # up_conv3x3


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


def gpu_family(arch: int) -> str:
    return "hopper" if arch >= 90 else "ampere"


# Kernels whose module builds the autotuner on first GPU use (a tuning.FamilyTuning,
# ``_TUNING``; no Autotuner object to read until then).
_LAZY_AUTOTUNED = {
    ("gankernels.triton.conv3x3", "_conv3x3_fwd_kernel"),
    ("gankernels.triton.up_conv3x3", "_up_conv3x3_fwd_kernel"),
    ("gankernels.triton.up_conv3x3_pairs", "_up_conv3x3_pairs_fwd_kernel"),
}


def autotune_configs(launch: Launch, arch: int) -> Optional[list[triton.Config]]:
    """The configurations the autotuner would try for ``launch`` on ``arch`` (after the
    kernel's own pruning, in list order), or None for a kernel launched as is."""
    mod = importlib.import_module(launch.module)
    obj = getattr(mod, launch.name)
    if (launch.module, launch.name) in _LAZY_AUTOTUNED:
        # Autotuned at first GPU use per family (the module's _TUNING); on CPU the
        # launcher passes the interpreter's fixed tile, which the config replaces.
        configs, prune = mod._TUNING.candidates(gpu_family(arch))
    elif isinstance(obj, triton.runtime.Autotuner):
        configs, prune = obj.configs, obj.early_config_prune
    else:
        return None
    if prune is None:
        return list(configs)
    named = dict(zip(unwrap(obj).arg_names, launch.args, strict=False))  # positional args only, as the autotuner
    return list(prune(configs, named, **launch.kwargs))


def cfg_label(c: triton.Config) -> str:
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
            out.append(bind(la, arch, c, f"{label}-{cfg_label(c)}"))
    return out


# ----------------------------------------------------------------------------------
# The representative launches (meta tensors of ANCHORS shapes).

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def meta_tensor(shape: tuple, dtype: str, cl: bool = False, int_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    t = torch.empty(shape, dtype=int_dtype or DTYPES[dtype], device="meta")
    return t.contiguous(memory_format=torch.channels_last) if cl and t.dim() == 4 else t


def launches_of(fn: Callable[[], Any]) -> list[Launch]:
    with recording() as sink:
        fn()
    return list(sink)


def conv_fwd_launches(
    op: str, ci: int, co: int, h: int, dtype: str, cl: bool, act: str = "lrelu", gain: float = 1.0, clamp: Optional[float] = None
) -> list[Launch]:
    from gankernels.triton import conv3x3

    fn = {"conv": conv3x3.conv3x3_forward, "pool": conv3x3.conv3x3_pool_forward, "up": conv3x3.up_conv3x3_forward}[op]
    x, w, b = meta_tensor((N, ci, h, h), dtype, cl), meta_tensor((co, ci, 3, 3), dtype), meta_tensor((co,), dtype)
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
    x, w, b = meta_tensor((N, ci, h, h), dtype, cl), meta_tensor((co, ci, 3, 3), dtype), meta_tensor((co,), dtype)
    ho = {"conv": h, "pool": h // 2, "up": 2 * h}[op]
    grad, out = meta_tensor((N, co, ho, ho), dtype, cl), meta_tensor((N, co, ho, ho), dtype, cl)
    saved = meta_tensor((N, co, ho, ho), dtype, cl, torch.int8) if op == "pool" else x.new_empty((0,))
    return launches_of(lambda: bwd.fused_backward(name, grad, x, w, b, out, saved, act, 0.2, gain, clamp, needs))


def shape_label(op: str, ci: int, co: int, h: int) -> str:
    return f"{op}{ci}to{co}h{h}"


def conv_shapes(op: str) -> list[tuple[int, int, int]]:
    return GEN if op == "up" else DISC


# ----------------------------------------------------------------------------------
# Compiling and reading the binary.


def compile_case(case: Case) -> Any:
    """``triton.compile`` of ``case`` for its target: the ``CompiledKernel`` (its
    ``asm`` holds ``ttir``, ``ttgir``, ``ptx`` and ``cubin``; ``metadata.shared`` the
    shared memory in bytes). Goes through Triton's on-disk cache."""
    from triton.compiler import ASTSource

    jit = unwrap(getattr(importlib.import_module(case.module), case.kernel))
    src = ASTSource(jit, case.signature, constexprs=case.constexprs, attrs=case.attrs)
    return triton.compile(src, target=GPUTarget("cuda", case.arch, 32), options=case.options)


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """The text ``cuobjdump <flags>`` prints for ``cubin`` (Triton's bundled cuobjdump)."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes, name: str) -> tuple[int, int]:
    """(registers, per-thread local memory in bytes) of kernel ``name`` in ``cubin``, from
    ``cuobjdump -res-usage``. Local memory is the stack frame (where ptxas puts spills:
    ``STACK``) plus any ``LOCAL`` array; the driver reports the same number as
    ``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES``, which Triton divides by 4 into ``n_spills``."""
    text = cuobjdump(cubin, "-res-usage")
    m = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage printed no line for {name}:\n{text}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))
