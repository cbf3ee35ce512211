"""Loading the C++/CUDA extension behind the ``cuda`` backend.

The extension (``csrc/``) defines the ops ``torch.ops.gankernels_cuda.*``; this module
loads it and registers their fake (meta) kernels. :mod:`gankernels.cuda.register` wraps
them as the backend's implementations.

Where the extension comes from:

1. ``gankernels._C``, built ahead of time by ``pip install --no-build-isolation -e .``
   (or ``python setup.py build_ext --inplace``). Imported here, at package import.
2. Otherwise a library built on first use by :mod:`gankernels.cuda.jit_build` into a cache
   keyed by the sources, torch and arch. An already built one is loaded (quickly) the
   first time a CUDA call asks this backend whether it can serve it.
3. A *build* is started only when the ``cuda`` backend is asked for by name
   (``backend="cuda"``, ``use_backend("cuda")``, ``GANKERNELS_BACKEND=cuda``) or by
   :func:`load` ``(build=True)``: it takes minutes, and ``backend="auto"`` never waits for
   it (it passes over ``cuda`` with the reason and uses the next backend). A failed build
   raises :class:`gankernels.cuda.jit_build.ExtensionBuildError` with the compiler's message.

Importing this module is cheap and never raises: problems become reasons that
``supports`` reports (and :func:`extension_status` summarises).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from typing import Optional

import torch

from gankernels.ops import reference as ref

OPS_NAMESPACE = "gankernels_cuda"
OP_NAMES: tuple[str, ...] = (
    "bias_act",
    "bias_act_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "upsample_nearest2d",
    "upsample_nearest2d_backward",
    "conv3x3_small",
    "conv3x3_small_backward",
)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL_CHANNELS = 4  # the direct conv kernel serves Ci <= 4 or Co <= 4

_lock = threading.RLock()
_state: dict = {
    "loaded": None,  # how the ops were loaded, once they are
    "import_error": None,  # why gankernels._C could not be imported
    "build_error": None,  # a failed JIT build (not retried in this process)
    "cache_checked": False,
    "not_built": None,  # _not_built_reason(), computed once: every dispatch asks for it
    "fakes": False,
}


def _not_built_reason() -> str:
    from gankernels.cuda import jit_build as _jit_build

    base = "gankernels._C is not built"
    if _state["import_error"]:
        base = _state["import_error"]
    missing = _jit_build.build_prerequisites()
    if missing:
        return f"{base}, and it cannot be built here: " + "; ".join(missing)
    return (
        f"{base}; pip install --no-build-isolation -e . builds it, or call with backend='cuda' to build it now "
        f"(about {_jit_build.BUILD_MINUTES_ESTIMATE} minutes, once)"
    )


def _mark_loaded(how: str) -> None:
    _state["loaded"] = how
    _register_fakes()


def _import_prebuilt() -> None:
    """Import gankernels._C if it was built; record why not otherwise. Never raises."""
    try:
        if importlib.util.find_spec("gankernels._C") is None:
            return
        importlib.import_module("gankernels._C")
    except Exception as e:  # noqa: BLE001 - a broken build must not break the package
        _state["import_error"] = f"gankernels._C is built but failed to load ({type(e).__name__}: {e}); rebuild it"
        return
    _mark_loaded(f"gankernels._C (prebuilt: {sys.modules['gankernels._C'].__file__})")


def load(build: bool = False) -> Optional[str]:
    """Make the ``gankernels_cuda`` ops available. Returns None when they are, else the
    reason they are not. With ``build=True``, compiles the extension if needed (minutes;
    announced on stderr) and raises ``ExtensionBuildError`` if that fails."""
    with _lock:
        if _state["loaded"]:
            return None
        from gankernels.cuda import jit_build as _jit_build

        if not _state["cache_checked"]:
            _state["cache_checked"] = True
            try:
                if not _jit_build.build_prerequisites():
                    lib = _jit_build.built_library(_jit_build.cache_root() / _jit_build.current_key())
                    if lib is not None:
                        torch.ops.load_library(str(lib))
                        _mark_loaded(f"JIT-built library {lib}")
                        return None
            except Exception as e:  # noqa: BLE001 - a bad cache entry: report, build anew if asked
                _state["import_error"] = f"the cached JIT build failed to load ({type(e).__name__}: {e})"
        if not build:
            if _state["build_error"]:
                return _state["build_error"]
            # The file-system checks behind this cost ~60 µs; dispatch asks on every call.
            if _state["not_built"] is None:
                _state["not_built"] = _not_built_reason()
            return _state["not_built"]
        if _state["build_error"]:
            raise _jit_build.ExtensionBuildError(_state["build_error"])
        try:
            lib = _jit_build.build()
        except _jit_build.ExtensionBuildError as e:
            _state["build_error"] = str(e)
            raise
        except OSError as e:  # build() wraps these; a last guard so none escapes unexplained
            _state["build_error"] = f"gankernels: building or loading the CUDA extension failed: {e}"
            raise _jit_build.ExtensionBuildError(_state["build_error"]) from e
        _mark_loaded(f"JIT-built library {lib}")
        return None


def is_loaded() -> bool:
    return bool(_state["loaded"])


def extension_status() -> str:
    """One line for ``python -m gankernels.env``."""
    if _state["loaded"]:
        return f"loaded: {_state['loaded']}"
    if _state["build_error"]:
        return "JIT build failed: " + _state["build_error"].splitlines()[0]
    return "not loaded: " + _not_built_reason()


def _prepare(**args) -> None:
    """``OpImpl.prepare``: the cuda backend was asked for by name (``backend="cuda"``,
    ``use_backend("cuda")``, ``GANKERNELS_BACKEND=cuda``), so build the extension now if
    it is missing and the call could run (CUDA tensors on a CUDA machine). ``auto``
    never calls this, so it never waits for a build. A failed build raises
    ``ExtensionBuildError`` with the compiler's message."""
    if _state["loaded"]:
        return
    x = args.get("x")
    if isinstance(x, torch.Tensor) and x.is_cuda and torch.cuda.is_available():
        load(build=True)


@torch.compiler.assume_constant_result
def _extension_reason() -> Optional[str]:
    """Why the extension's ops are not available (None: they are). Never builds.

    A constant to ``torch.compile``: it reads the file system (the JIT cache) and takes a
    lock, which Dynamo cannot trace; the answer cannot change within a traced call.
    """
    if _state["loaded"]:
        return None
    return _state["build_error"] or load(build=False)


_device_reasons: dict[int, Optional[str]] = {}


@torch.compiler.assume_constant_result
def device_reason(device: int) -> Optional[str]:
    """Why the loaded extension cannot run on CUDA device ``device`` (None: it can): it
    holds neither SASS for the GPU's architecture nor PTX the driver can compile for it
    (e.g. a GPU newer than the archs it was built for). Asked of the library once per
    device (``gankernels_cuda::kernel_image_error``); call only once it is loaded."""
    if device in _device_reasons:
        return _device_reasons[device]
    with _lock:
        ops = _ops()
        if not hasattr(ops, "kernel_image_error"):  # a library built before the probe existed
            reason = None
        else:
            error = ops.kernel_image_error(device)
            reason = None
            if error:
                major, minor = torch.cuda.get_device_capability(device)
                reason = (
                    f"the CUDA extension has no kernel for GPU {device} ({torch.cuda.get_device_name(device)}, "
                    f"compute capability {major}.{minor}): {error}; rebuild it for this GPU "
                    f"(TORCH_CUDA_ARCH_LIST='{major}.{minor}' pip install --no-build-isolation -e .)"
                )
        _device_reasons[device] = reason
        return reason


# ----------------------------------------------------------------------------------
# Fake kernels of the extension's ops (shapes, dtypes and strides of what they return).


def _fmt(t: torch.Tensor) -> torch.memory_format:
    return ref.memory_format_of(t)


def _is_dense(x: torch.Tensor) -> bool:
    """``Tensor::is_non_overlapping_and_dense``: the non-trivial dims, ordered by stride,
    tile memory without gaps or overlaps."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(x.stride(), x.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense_like(x: torch.Tensor) -> torch.Tensor:
    """What the extension allocates for an elementwise result: x's strides when x is
    dense, else contiguous."""
    if _is_dense(x):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _register_fakes() -> None:
    if _state["fakes"]:
        return
    ns = OPS_NAMESPACE

    @torch.library.register_fake(f"{ns}::bias_act")
    def _bias_act(x, b, act, alpha, gain, clamp, dim):
        return _dense_like(x)

    @torch.library.register_fake(f"{ns}::bias_act_backward")
    def _bias_act_backward(grad, x, b, act, alpha, gain, clamp, dim):
        return _dense_like(x)

    @torch.library.register_fake(f"{ns}::max_pool2d")
    def _max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        saved = pool_saved(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
        return x.new_empty(saved.shape).contiguous(memory_format=_fmt(x)), saved

    @torch.library.register_fake(f"{ns}::max_pool2d_backward")
    def _max_pool2d_backward(grad, x, saved, kernel_size, stride, padding, dilation, ceil_mode):
        return x.new_empty(x.shape).contiguous(memory_format=_fmt(x))

    @torch.library.register_fake(f"{ns}::upsample_nearest2d")
    def _upsample(x, scale_factor):
        n, c, h, w = x.shape
        return x.new_empty((n, c, h * scale_factor, w * scale_factor)).contiguous(memory_format=_fmt(x))

    @torch.library.register_fake(f"{ns}::upsample_nearest2d_backward")
    def _upsample_backward(grad, scale_factor):
        n, c, h, w = grad.shape
        return grad.new_empty((n, c, h // scale_factor, w // scale_factor)).contiguous(memory_format=_fmt(grad))

    @torch.library.register_fake(f"{ns}::conv3x3_small")
    def _conv(x, w, b, act, alpha, gain, clamp, pool):
        return _conv_out(x, w, pool), _conv_saved(x, w, pool)

    @torch.library.register_fake(f"{ns}::conv3x3_small_backward")
    def _conv_backward(grad, x, w, b, saved, y, act, alpha, gain, clamp, pool, needs):
        gx = x.new_empty(x.shape).contiguous(memory_format=_fmt(x)) if needs[0] else x.new_empty((0,))
        gw = w.new_empty(w.shape) if needs[1] else x.new_empty((0,))
        gb = b.new_empty(b.shape) if (needs[2] and b is not None) else x.new_empty((0,))
        return gx, gw, gb

    _state["fakes"] = True


def pool_saves_code(kernel_size: list[int], return_indices: bool) -> bool:
    """Whether ``max_pool2d`` saves 1-byte window codes ``ky * kw + kx`` (the Triton
    backend's convention) rather than int64 indices: when the indices are not asked for
    and the window has at most 128 taps (ops.cpp's ``pool_saves_code``)."""
    return not return_indices and kernel_size[0] * kernel_size[1] <= 128


def pool_saved(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> torch.Tensor:
    """An empty tensor like the ``saved`` the extension's ``max_pool2d`` returns: int64
    indices or int8 window codes, pooled shape, x's memory format (x may be fake)."""
    n, c, h, w = x.shape
    ho = ref.pool_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    wo = ref.pool_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    dtype = torch.int8 if pool_saves_code(kernel_size, return_indices) else torch.int64
    return x.new_empty((n, c, ho, wo), dtype=dtype).contiguous(memory_format=_fmt(x))


def _conv_out(x: torch.Tensor, w: torch.Tensor, pool: bool) -> torch.Tensor:
    n, _, h, wd = x.shape
    shape = (n, w.shape[0], h // 2, wd // 2) if pool else (n, w.shape[0], h, wd)
    return x.new_empty(shape).contiguous(memory_format=_fmt(x))


def _conv_saved(x: torch.Tensor, w: torch.Tensor, pool: bool) -> torch.Tensor:
    """The forward's ``saved``: the int8 argmax (dy * 2 + dx) of each pooled value, in the
    output's memory format; empty without the pool."""
    if not pool:
        return x.new_empty((0,))
    n, _, h, wd = x.shape
    return x.new_empty((n, w.shape[0], h // 2, wd // 2), dtype=torch.int8).contiguous(memory_format=_fmt(x))


def _ops():
    return getattr(torch.ops, OPS_NAMESPACE)


_import_prebuilt()
