"""The CUDA extension without a GPU: it is built and importable (when this machine can
build it), its ops are registered with correct fake kernels, its argument checks reject
bad input with clear messages, the JIT build (cache key, lock, crash safety) and the
build defaults behave, and the kernels themselves, compiled by g++ against a CPU
emulation of CUDA (csrc/emu/), match the float64 reference.

On a GPU the kernels run for real: tests/gpu/test_cuda_gpu.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import gankernels  # noqa: F401  (loads the backends)
from gankernels.cuda import jit_build as _jit_build
from gankernels.cuda import loader as cuda_backend
from gankernels.ops import dispatch
from gankernels.ops import reference as ref


def _build_expected() -> tuple[bool, str]:
    """Whether this environment is meant to have built gankernels._C, and why not."""
    if os.environ.get("GANKERNELS_BUILD_CUDA", "").strip() == "0":
        return False, "GANKERNELS_BUILD_CUDA=0"
    missing = _jit_build.build_prerequisites()
    if missing:
        return False, "; ".join(missing)
    return True, ""


def test_extension_is_built_where_it_can_be():
    """CI proves the build: with nvcc and a CUDA torch present, gankernels._C must exist
    and import (pip install --no-build-isolation -e . builds it)."""
    expected, why = _build_expected()
    if not cuda_backend.is_loaded():
        if not expected:
            pytest.skip(f"the CUDA extension is not built here and need not be: {why}")
        pytest.fail(f"nvcc and a CUDA torch are present but the extension is not loaded: {cuda_backend.extension_status()}")
    assert "loaded" in cuda_backend.extension_status()


needs_ext = pytest.mark.skipif(not cuda_backend.is_loaded(), reason="gankernels._C is not built here")
ops = torch.ops.gankernels_cuda


@needs_ext
def test_every_op_is_registered():
    for name in cuda_backend.OP_NAMES:
        packet = getattr(ops, name)
        schema = str(packet.default._schema)
        assert schema.startswith(f"gankernels_cuda::{name}("), schema


# ----------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and strides, on fake and on meta tensors.

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _make(shape, fmt, dtype=torch.float32, device="cpu"):
    return torch.empty(shape, dtype=dtype, device=device).contiguous(memory_format=FORMATS[fmt])


def _expect(t: torch.Tensor, shape, dtype, fmt=None):
    assert tuple(t.shape) == tuple(shape), (tuple(t.shape), shape)
    assert t.dtype == dtype
    if fmt is not None:
        want = torch.empty(shape).contiguous(memory_format=FORMATS[fmt]).stride()
        assert t.stride() == want, (t.stride(), want)


@needs_ext
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("device", ["fake", "meta"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fake_kernels(fmt, device, dtype):
    mode = FakeTensorMode() if device == "fake" else None
    dev = "cpu" if device == "fake" else "meta"
    with mode if mode is not None else torch.no_grad():
        x = _make((2, 3, 9, 11), fmt, dtype, dev)
        w = torch.empty(16, 3, 3, 3, dtype=dtype, device=dev)
        b = torch.empty(16, dtype=dtype, device=dev)

        y = ops.bias_act(x, b, "lrelu", 0.2, 1.0, None, 1)
        assert y.stride() == x.stride() and y.dtype == dtype
        gx = ops.bias_act_backward(x, x, b, "lrelu", 0.2, 1.0, None, 1)
        assert gx.stride() == x.stride()

        for k, s, p, ceil in ((2, 2, 0, False), (3, 2, 1, False), (3, 2, 1, True), (2, 2, 0, True)):
            for return_indices in (True, False):
                out, saved = ops.max_pool2d(x, [k, k], [s, s], [p, p], [1, 1], ceil, return_indices)
                want = F.max_pool2d(torch.zeros(2, 3, 9, 11), k, s, p, ceil_mode=ceil).shape
                _expect(out, want, dtype, fmt)
                _expect(saved, want, torch.int64 if return_indices else torch.int8, fmt)
                g = ops.max_pool2d_backward(out, x, saved, [k, k], [s, s], [p, p], [1, 1], ceil)
                _expect(g, x.shape, dtype, fmt)

        u = ops.upsample_nearest2d(x, 3)
        _expect(u, (2, 3, 27, 33), dtype, fmt)
        _expect(ops.upsample_nearest2d_backward(u, 3), x.shape, dtype, fmt)

        out, saved = ops.conv3x3_small(x, w, b, "lrelu", 0.2, 1.0, None, False)
        _expect(out, (2, 16, 9, 11), dtype, fmt)
        assert saved.numel() == 0
        out, saved = ops.conv3x3_small(x, w, b, "lrelu", 0.2, 1.0, None, True)
        _expect(out, (2, 16, 4, 5), dtype, fmt)
        _expect(saved, (2, 16, 4, 5), torch.int8, fmt)
        gx, gw, gb = ops.conv3x3_small_backward(out, x, w, b, saved, out, "lrelu", 0.2, 1.0, None, True, [True, True, True])
        _expect(gx, x.shape, dtype, fmt)
        _expect(gw, w.shape, dtype)
        _expect(gb, b.shape, dtype)
        gx, gw, gb = ops.conv3x3_small_backward(out, x, w, None, saved, None, "lrelu", 0.2, 1.0, None, True, [False, True, True])
        assert gx.numel() == 0 and gb.numel() == 0 and tuple(gw.shape) == tuple(w.shape)


@needs_ext
def test_fake_saved_matches_the_extension_fake():
    """The backend's fake_saved (used by gankernels::conv3x3_pool's fake) agrees with
    the extension op's fake."""
    impl = dispatch.get_impl("conv3x3_pool", "cuda")
    with FakeTensorMode():
        x = _make((2, 4, 8, 6), "channels_last")
        w = torch.empty(8, 4, 3, 3)
        _, saved = ops.conv3x3_small(x, w, None, "relu", 0.2, 1.0, None, True)
        fs = impl.fake_saved(x=x, w=w, b=None, act="relu", alpha=0.2, gain=1.0, clamp=None)
        assert fs.shape == saved.shape and fs.dtype == saved.dtype and fs.stride() == saved.stride()


# ----------------------------------------------------------------------------------
# Argument checks (TORCH_CHECK), on CPU tensors: they run before "expected CUDA tensors".

x4 = torch.randn(2, 3, 8, 8)
w3 = torch.randn(16, 3, 3, 3)
b16 = torch.randn(16)
pooled = torch.randn(2, 16, 4, 4)
argmax = torch.zeros(2, 16, 4, 4, dtype=torch.int8)
pool_cfg = ([2, 2], [2, 2], [0, 0], [1, 1], False)
NEEDS = [True, True, True]

BAD_CALLS = {
    "conv x not 4-D": (lambda: ops.conv3x3_small(x4[0], w3, b16, "relu", 0.2, 1.0, None, False), r"x must be a 4-D tensor"),
    "conv x int": (
        lambda: ops.conv3x3_small(x4.long(), w3, b16, "relu", 0.2, 1.0, None, False),
        r"x must be float32, float16 or bfloat16",
    ),
    "conv channel mismatch": (
        lambda: ops.conv3x3_small(x4, torch.randn(16, 5, 3, 3), None, "relu", 0.2, 1.0, None, False),
        r"w has 5 input channels \(w.size\(1\)\) but x has 3",
    ),
    "conv 5x5": (lambda: ops.conv3x3_small(x4, torch.randn(16, 3, 5, 5), None, "relu", 0.2, 1.0, None, False), r"3x3 kernel"),
    "conv w dtype": (
        lambda: ops.conv3x3_small(x4, w3.half(), None, "relu", 0.2, 1.0, None, False),
        r"w has dtype Half but x has Float",
    ),
    "conv bias length": (
        lambda: ops.conv3x3_small(x4, w3, torch.randn(7), "relu", 0.2, 1.0, None, False),
        r"b has length 7 but w has 16",
    ),
    "conv wide": (
        lambda: ops.conv3x3_small(torch.randn(1, 8, 4, 4), torch.randn(8, 8, 3, 3), None, "relu", 0.2, 1.0, None, False),
        r"Ci = 8 and Co = 8 are both > 4: the direct kernel serves Ci <= 4 or Co <= 4",
    ),
    "conv act": (lambda: ops.conv3x3_small(x4, w3, b16, "gelu", 0.2, 1.0, None, False), r"act must be one of .*got 'gelu'"),
    "conv clamp": (lambda: ops.conv3x3_small(x4, w3, b16, "relu", 0.2, 1.0, -1.0, False), r"clamp must be >= 0"),
    "conv pool too small": (
        lambda: ops.conv3x3_small(torch.randn(1, 3, 1, 8), w3, None, "relu", 0.2, 1.0, None, True),
        r"needs H and W >= 2",
    ),
    "conv bwd grad shape": (
        lambda: ops.conv3x3_small_backward(pooled, x4, w3, b16, argmax, None, "relu", 0.2, 1.0, None, False, NEEDS),
        r"grad must have the output's shape \[2, 16, 8, 8\]",
    ),
    "conv bwd y shape": (
        lambda: ops.conv3x3_small_backward(pooled, x4, w3, b16, argmax, x4, "relu", 0.2, 1.0, None, True, NEEDS),
        r"y must be the forward's output, of shape \[2, 16, 4, 4\]",
    ),
    "conv bwd saved dtype": (
        lambda: ops.conv3x3_small_backward(pooled, x4, w3, b16, argmax.long(), None, "relu", 0.2, 1.0, None, True, NEEDS),
        r"saved must be the forward's int8 argmax",
    ),
    "pool x not 4-D": (lambda: ops.max_pool2d(x4[0], *pool_cfg, False), r"x must be a 4-D tensor"),
    "pool kernel 0": (lambda: ops.max_pool2d(x4, [0, 2], [2, 2], [0, 0], [1, 1], False, False), r"kernel_size must be >= 1"),
    "pool stride 0": (lambda: ops.max_pool2d(x4, [2, 2], [0, 2], [0, 0], [1, 1], False, False), r"stride must be >= 1"),
    "pool padding": (
        lambda: ops.max_pool2d(x4, [2, 2], [2, 2], [2, 2], [1, 1], False, True),
        r"padding \[2, 2\] must be >= 0 and at most half",
    ),
    "pool too small": (
        lambda: ops.max_pool2d(torch.randn(1, 1, 2, 2), [3, 3], [1, 1], [0, 0], [1, 1], False, False),
        r"too small",
    ),
    "pool bwd grad shape": (lambda: ops.max_pool2d_backward(x4, x4, x4.long(), *pool_cfg), r"grad must have the pooled shape"),
    "pool bwd index dtype": (
        lambda: ops.max_pool2d_backward(torch.randn(2, 3, 4, 4), x4, torch.zeros(2, 3, 4, 4, dtype=torch.int32), *pool_cfg),
        r"saved must be the forward's int64 indices or int8 window codes, got Int",
    ),
    "upsample scale": (lambda: ops.upsample_nearest2d(x4, 0), r"scale_factor must be an integer in \[1, 1024\]"),
    "upsample bwd divisible": (
        lambda: ops.upsample_nearest2d_backward(torch.randn(1, 1, 5, 6), 2),
        r"must be divisible by scale_factor 2",
    ),
    "bias_act length": (
        lambda: ops.bias_act(x4, torch.randn(4), "relu", 0.2, 1.0, None, 1),
        r"b has length 4 but x.size\(1\) is 3",
    ),
    "bias_act dim": (lambda: ops.bias_act(x4, None, "relu", 0.2, 1.0, None, 4), r"dim 4 is out of range"),
    "bias_act dtype": (
        lambda: ops.bias_act(x4.double(), None, "relu", 0.2, 1.0, None, 1),
        r"x must be float32, float16 or bfloat16, got Double",
    ),
    "bias_act bwd grad": (lambda: ops.bias_act_backward(x4[:1], x4, None, "relu", 0.2, 1.0, None, 1), r"grad has shape"),
}

VALID_CPU_CALLS = {
    "conv": lambda: ops.conv3x3_small(x4, w3, b16, "relu", 0.2, 1.0, None, True),
    "conv bwd": lambda: ops.conv3x3_small_backward(pooled, x4, w3, b16, argmax, pooled, "relu", 0.2, 1.0, None, True, NEEDS),
    "pool": lambda: ops.max_pool2d(x4, *pool_cfg, False),
    "upsample": lambda: ops.upsample_nearest2d(x4, 2),
    "bias_act": lambda: ops.bias_act(x4, torch.randn(3), "silu", 0.2, 1.0, 1.0, 1),
}


@needs_ext
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_argument_checks_reject_bad_input(case):
    call, message = BAD_CALLS[case]
    with pytest.raises(RuntimeError, match=message) as info:
        call()
    assert "gankernels_cuda::" in str(info.value)


@needs_ext
@pytest.mark.parametrize("case", list(VALID_CPU_CALLS))
def test_valid_cpu_call_says_expected_cuda(case):
    with pytest.raises(RuntimeError, match=r"expected CUDA tensors, got x on cpu"):
        VALID_CPU_CALLS[case]()


# ----------------------------------------------------------------------------------
# The backend as the dispatcher sees it.


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU reasons")
def test_supports_says_no_cuda_device():
    x = torch.randn(1, 3, 8, 8)
    w = torch.randn(8, 3, 3, 3)
    for op, args in (
        ("conv3x3", (x, w)),
        ("conv3x3_pool", (x, w)),
        ("max_pool2d", (x, 2)),
        ("upsample_nearest2d", (x, 2)),
        ("bias_act", (x,)),
    ):
        ex = gankernels.explain(op, *args)
        assert ex.backend == "torch"
        assert "no CUDA device" in ex.rejected["cuda"]
    with pytest.raises(gankernels.BackendUnavailable, match="no CUDA device"):
        gankernels.conv3x3(x, w, backend="cuda")


def test_supports_refuses_wide_convolutions():
    x = torch.randn(1, 8, 4, 4)
    reasons = gankernels.explain("conv3x3", x, torch.randn(8, 8, 3, 3), backend="cuda").rejected["cuda"]
    assert any("Ci and Co both > 4: the direct kernel serves Ci <= 4 or Co <= 4" in r for r in reasons)
    assert "up_conv3x3" not in [op for op in dispatch.OPS if "cuda" in dispatch.registered_backends(op)]


def test_prepare_runs_only_when_the_backend_is_named():
    """A build may start only when the cuda backend is named (not under auto, not in explain)."""
    seen = []
    original = dispatch.get_impl("upsample_nearest2d", "cuda")
    assert original.prepare is cuda_backend._prepare

    def supports(**_):
        return ["test"]

    impl = dispatch.OpImpl(forward=original.forward, supports=supports, prepare=lambda **args: seen.append(sorted(args)))
    dispatch.register("upsample_nearest2d", "cuda", impl)
    try:
        args = {"x": torch.randn(1, 1, 2, 2), "scale_factor": 2}
        with pytest.raises(gankernels.BackendUnavailable):
            dispatch.resolve("upsample_nearest2d", "cuda", args)
        dispatch.resolve("upsample_nearest2d", "auto", args)
        with gankernels.use_backend("cuda"), pytest.raises(gankernels.BackendUnavailable):
            dispatch.resolve("upsample_nearest2d", None, args)
        dispatch.explain_args("upsample_nearest2d", "cuda", args)
    finally:
        dispatch.register("upsample_nearest2d", "cuda", original)
    assert seen == [["scale_factor", "x"], ["scale_factor", "x"]]


def test_prepare_never_builds_for_cpu_tensors(monkeypatch):
    monkeypatch.setattr(cuda_backend, "load", lambda build=False: pytest.fail("must not build for CPU tensors"))
    cuda_backend._prepare(x=torch.randn(1, 1, 2, 2), scale_factor=2)


def test_extension_status_is_one_informative_line():
    status = cuda_backend.extension_status()
    assert "\n" not in status
    assert status.startswith(("loaded:", "not loaded:", "JIT build failed:"))


# ----------------------------------------------------------------------------------
# The JIT build: cache key, lock, and the build driver (with the compiler stubbed out).


def _write_sources(d: Path, text: str = "int x;") -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.cu").write_text(text)
    (d / "b.cpp").write_text("int y;")
    (d / "k.h").write_text("#pragma once")
    (d / "notes.txt").write_text("ignored")
    return _jit_build.source_files(d)


def test_cache_key(tmp_path):
    files = _write_sources(tmp_path / "src")
    assert [f.name for f in files] == ["a.cu", "b.cpp", "k.h"]
    k = _jit_build.cache_key(files, "2.11.0", "9.0", "13.0", "3.12")
    assert re.fullmatch(r"[0-9a-f]{20}", k)
    assert k == _jit_build.cache_key(list(reversed(files)), "2.11.0", "9.0", "13.0", "3.12")  # order-free
    assert k == _jit_build.cache_key(files, "2.11.0", "9.0 ", "13.0", "3.12")  # spacing-free arch list
    assert k != _jit_build.cache_key(files, "2.12.0", "9.0", "13.0", "3.12")
    assert k != _jit_build.cache_key(files, "2.11.0", "8.0;9.0", "13.0", "3.12")
    assert k != _jit_build.cache_key(files, "2.11.0", "9.0", "12.8", "3.12")
    assert k != _jit_build.cache_key(files, "2.11.0", "9.0", "13.0", "3.11")
    files2 = _write_sources(tmp_path / "src", text="int x = 1;")
    assert k != _jit_build.cache_key(files2, "2.11.0", "9.0", "13.0", "3.12")
    # The compiler release and the flags count too.
    files = _write_sources(tmp_path / "src")
    base = _jit_build.cache_key(files, "2.11.0", "9.0", "13.0", "3.12", nvcc_version="V13.0.88", flags=("-O3",))
    assert base != k
    assert base != _jit_build.cache_key(files, "2.11.0", "9.0", "13.0", "3.12", nvcc_version="V13.1.10", flags=("-O3",))
    assert base != _jit_build.cache_key(files, "2.11.0", "9.0", "13.0", "3.12", nvcc_version="V13.0.88", flags=("-O2",))
    # The real sources: every .cu/.cpp/.h(.cuh) of csrc/, and a stable key.
    assert {p.suffix for p in _jit_build.source_files()} <= {".cu", ".cpp", ".h", ".cuh"}
    assert _jit_build.current_key("9.0") == _jit_build.current_key("9.0")


def test_current_key_follows_nvcc_and_flags(monkeypatch):
    key = _jit_build.current_key("9.0")
    monkeypatch.setattr(_jit_build, "nvcc_version", lambda cuda_home: "Build cuda_99.0")
    assert _jit_build.current_key("9.0") != key
    monkeypatch.undo()
    monkeypatch.setattr(_jit_build, "CUDA_CFLAGS", ("-O2",))
    assert _jit_build.current_key("9.0") != key


def _locked(path: Path) -> bool:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def test_build_lock_is_released_when_the_holder_is_killed(tmp_path):
    lock = tmp_path / "k.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import importlib.util, time
                from pathlib import Path
                # The module alone, not the package (which would load the extension).
                spec = importlib.util.spec_from_file_location("jit", {_jit_build.__file__!r})
                jit = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(jit)
                with jit.build_lock(Path({str(lock)!r})):
                    print("held", flush=True)
                    time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _locked(lock)
        holder.send_signal(signal.SIGKILL)  # a build killed mid-way
        holder.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _locked(lock) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _locked(lock)
        with _jit_build.build_lock(lock):  # and it can be taken again
            assert _locked(lock)
        assert not _locked(lock)
    finally:
        if holder.poll() is None:
            holder.kill()


def test_build_compiles_once_then_reuses_the_cache(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setenv("GANKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_jit_build, "build_prerequisites", lambda: [])
    monkeypatch.setattr(_jit_build, "_find_cuda_home", lambda: "/usr/local/cuda")
    compiles, loads = [], []

    def fake_load(name, sources, build_directory, **kwargs):
        compiles.append((name, sources, kwargs["with_cuda"]))
        # A fresh folder per build: torch's lock and objects of a killed build are not seen.
        assert Path(build_directory).parent == key_dir and not any(Path(build_directory).iterdir())
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    monkeypatch.setattr(cpp_ext, "load", fake_load)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loads.append(path))
    key_dir = tmp_path / "cache" / _jit_build.current_key("9.0")
    (key_dir / "attempt-1-dead").mkdir(parents=True)  # left behind by a killed build
    (key_dir / "attempt-1-dead" / "lock").write_text("")

    lib1 = _jit_build.build(arch_list="9.0")
    assert "building the CUDA extension for arch 9.0" in capsys.readouterr().err
    lib2 = _jit_build.build(arch_list="9.0")
    assert lib1 == lib2 and lib1.parent == key_dir
    assert len(compiles) == 1 and compiles[0][2] is True
    assert {Path(s).suffix for s in compiles[0][1]} == {".cu", ".cpp"}
    assert loads == [str(lib1), str(lib2)]
    assert "building" not in capsys.readouterr().err  # a cache hit is silent
    assert sorted(p.name for p in key_dir.iterdir()) == [lib1.name]  # no attempt folder is left


def test_failed_build_raises_with_the_compiler_message(tmp_path, monkeypatch):
    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setenv("GANKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_jit_build, "build_prerequisites", lambda: [])
    monkeypatch.setattr(_jit_build, "_find_cuda_home", lambda: "/usr/local/cuda")

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension 'gankernels_C': conv3x3_small.cu(42): error: identifier \"oops\" is undefined")

    monkeypatch.setattr(cpp_ext, "load", failing_load)
    with pytest.raises(_jit_build.ExtensionBuildError, match=r'conv3x3_small.cu\(42\): error: identifier "oops"'):
        _jit_build.build(arch_list="9.0")
    # The lock is free again afterwards.
    assert not _locked(tmp_path / "cache" / f"{_jit_build.current_key('9.0')}.lock")


def _fake_build_env(tmp_path, monkeypatch):
    """The JIT build driver with a stubbed compiler: returns the key folder."""
    monkeypatch.setenv("GANKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_jit_build, "build_prerequisites", lambda: [])
    monkeypatch.setattr(_jit_build, "_find_cuda_home", lambda: "/usr/local/cuda")
    monkeypatch.setattr(_jit_build, "nvcc_version", lambda cuda_home: "nvcc for tests")
    return tmp_path / "cache" / _jit_build.current_key("9.0")


def _loader_that_rejects(loads: list, bad: bytes):
    """A torch.ops.load_library stand-in: OSError for a library whose bytes are `bad`."""

    def load_library(path):
        if Path(path).read_bytes() == bad:
            raise OSError(f"{path}: file too short")
        loads.append(Path(path).read_bytes())

    return load_library


def _linker_writing(content: bytes):
    """A cpp_extension.load stand-in whose link writes `content` as the library."""

    def load(name, build_directory, **kwargs):
        (Path(build_directory) / f"{name}.so").write_bytes(content)

    return load


def test_a_link_killed_mid_write_leaves_no_library(tmp_path, monkeypatch):
    """The linker writes into the build's own folder; only a library that loaded is
    renamed into place, so a truncated one is never found by a later process."""
    import torch.utils.cpp_extension as cpp_ext

    key_dir = _fake_build_env(tmp_path, monkeypatch)
    loads: list = []
    monkeypatch.setattr(torch.ops, "load_library", _loader_that_rejects(loads, b"trunc"))

    def killed_link(name, build_directory, **kwargs):
        (Path(build_directory) / f"{name}.so").write_bytes(b"trunc")
        raise RuntimeError("ninja: build stopped: interrupted by user.")

    monkeypatch.setattr(cpp_ext, "load", killed_link)
    with pytest.raises(_jit_build.ExtensionBuildError, match="interrupted"):
        _jit_build.build(arch_list="9.0")
    assert _jit_build.built_library(key_dir) is None

    monkeypatch.setattr(cpp_ext, "load", _linker_writing(b"good"))
    lib = _jit_build.build(arch_list="9.0")
    assert lib.read_bytes() == b"good" and loads == [b"good"]


def test_a_cached_library_that_fails_to_load_is_rebuilt_once(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp_ext

    key_dir = _fake_build_env(tmp_path, monkeypatch)
    key_dir.mkdir(parents=True)
    (key_dir / "gankernels_C.so").write_bytes(b"trunc")  # e.g. from an older, unsafe build
    loads: list = []
    monkeypatch.setattr(torch.ops, "load_library", _loader_that_rejects(loads, b"trunc"))
    monkeypatch.setattr(cpp_ext, "load", _linker_writing(b"good"))
    lib = _jit_build.build(arch_list="9.0")
    assert lib.read_bytes() == b"good" and loads == [b"good"]
    assert "failed to load" in capsys.readouterr().err

    # A rebuild whose library does not load either is reported, not retried forever.
    (key_dir / "gankernels_C.so").write_bytes(b"trunc")
    monkeypatch.setattr(cpp_ext, "load", _linker_writing(b"trunc"))
    with pytest.raises(_jit_build.ExtensionBuildError, match="file too short"):
        _jit_build.build(arch_list="9.0")


def test_os_errors_become_build_errors(tmp_path, monkeypatch):
    """An unwritable cache (here: under a regular file) is an ExtensionBuildError, which
    the loader reports, never a bare OSError."""
    _fake_build_env(tmp_path, monkeypatch)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GANKERNELS_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.raises(_jit_build.ExtensionBuildError, match="file"):
        _jit_build.build(arch_list="9.0")

    def raising_build():
        raise OSError("No space left on device")

    monkeypatch.setattr(_jit_build, "build", raising_build)
    for key, value in (("loaded", None), ("build_error", None), ("cache_checked", True)):
        monkeypatch.setitem(cuda_backend._state, key, value)
    with pytest.raises(_jit_build.ExtensionBuildError, match="No space left on device"):
        cuda_backend.load(build=True)
    assert "No space left" in cuda_backend._state["build_error"]


def test_a_dead_holders_ninja_does_not_share_the_next_builds_folder(tmp_path):
    """The lock holder is killed while its ninja still runs (the lock dies with the
    holder, ninja does not). The next build must not share ninja's folder: ninja's late
    output must not land where the finished library lives."""
    cache = tmp_path / "cache"
    done = tmp_path / "orphan_done"
    script = textwrap.dedent(
        f"""
        import importlib.util, subprocess, sys, time
        from pathlib import Path
        import torch, torch.utils.cpp_extension as cpp_ext
        spec = importlib.util.spec_from_file_location("jit", {_jit_build.__file__!r})
        jit = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(jit)
        jit.build_prerequisites = lambda: []
        jit._find_cuda_home = lambda: "/usr/local/cuda"
        jit.nvcc_version = lambda cuda_home: "nvcc for tests"
        torch.ops.load_library = lambda path: None
        ORPHAN = (
            "import sys, time\\n"
            "time.sleep(3)\\n"
            "try:\\n"
            "    open(sys.argv[1], 'wb').write(b'orphan')\\n"
            "finally:\\n"
            "    open(sys.argv[2], 'w').close()\\n"
        )
        def holder_load(name, build_directory, **kwargs):
            # ninja, still linking when its parent dies
            subprocess.Popen([sys.executable, "-c", ORPHAN, str(Path(build_directory) / (name + ".so")), {str(done)!r}])
            print("building", flush=True)
            time.sleep(120)
        if sys.argv[1] == "holder":
            cpp_ext.load = holder_load
        else:
            cpp_ext.load = lambda name, build_directory, **kw: (Path(build_directory) / (name + ".so")).write_bytes(b"good")
        print(jit.build(arch_list="9.0"), flush=True)
        """
    )
    env = {**os.environ, "GANKERNELS_CACHE_DIR": str(cache)}
    holder = subprocess.Popen([sys.executable, "-c", script, "holder"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "building"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        out = subprocess.run([sys.executable, "-c", script, "next"], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        lib = Path(out.stdout.strip().splitlines()[-1])
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert done.exists(), "the orphaned 'ninja' did not finish"
        assert lib.read_bytes() == b"good"
    finally:
        if holder.poll() is None:
            holder.kill()


def test_cannot_build_without_prerequisites(monkeypatch):
    monkeypatch.setattr(_jit_build, "build_prerequisites", lambda: ["nvcc not found (set CUDA_HOME to the CUDA toolkit)"])
    with pytest.raises(_jit_build.ExtensionBuildError, match="nvcc not found"):
        _jit_build.build(arch_list="9.0")


def test_reference_memory_format_agrees_with_the_extension_rule():
    """ops.cpp's format_of and the reference's memory_format_of are the same rule; the
    fake kernels rely on it. A 1×1 spatial channels_last tensor reads as contiguous."""
    t = torch.empty(2, 3, 1, 1).contiguous(memory_format=torch.channels_last)
    assert ref.memory_format_of(t) == torch.contiguous_format


# ----------------------------------------------------------------------------------
# The kernels themselves, on CPU: csrc/*.cu compiled by g++ against a small emulation
# of the CUDA features they use (csrc/emu/), called through ctypes with the buffers
# ops.cpp would allocate (poisoned), and compared with the float64 reference. This is
# the kernels' source, not a model of it; what it cannot show is GPU-only behaviour
# (performance, memory-model races beyond __syncthreads, the torch glue's launches).

EMU_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACT_CODES = {a: i for i, a in enumerate(("linear", "relu", "lrelu", "tanh", "sigmoid", "silu"))}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    import ctypes
    import importlib.util
    import shutil

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if shutil.which("g++") is None or not Path(cuda_home, "include", "cuda_bf16.h").exists():
        pytest.skip("the kernel emulation needs g++ and the CUDA headers (CUDA_HOME)")
    spec = importlib.util.spec_from_file_location("emu_build", _jit_build.CSRC / "emu" / "emu_build.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    lib = ctypes.CDLL(str(builder.build(tmp_path_factory.mktemp("emu"))))
    P, I, L, Fl = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    epi = [I, Fl, Fl, Fl, I]
    signatures = {
        "emu_bias_act_fwd": [I, P, P, P, L, L, L, *epi, I],
        "emu_bias_act_bwd": [I, P, P, P, P, L, L, L, *epi, I],
        "emu_max_pool2d_fwd": [I, P, P, P, I, P, P, I, I],
        "emu_max_pool2d_bwd": [I, P, P, I, P, P, P, I, I],
        "emu_upsample_fwd": [I, P, P, L, L, L, L, I, I, I],
        "emu_upsample_bwd": [I, P, P, L, L, L, L, I, I, I],
        "emu_conv_fwd": [I, P, P, P, P, P, P, I, *epi, I],
        "emu_conv_gp": [I, P, P, P, P, P, P, P, I, *epi, I],
        "emu_conv_partial_numel": [P, I, I],
        "emu_conv_wgrad": [I, I, P, P, P, P, P, P, P, P, P, P, P, P, I, *epi, I],
        "emu_conv_rgb_mma_serves": [I, P, I],
        "emu_mma_m16n8k16": [I, P, P, P, P],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = L if name == "emu_conv_partial_numel" else I
    return lib


def _p(t):
    return None if t is None else t.data_ptr()


def _i64(*vals):
    import ctypes

    return (ctypes.c_int64 * len(vals))(*vals)


def _epi(act, alpha, gain, clamp):
    return (ACT_CODES[act], alpha, gain, clamp or 0.0, int(clamp is not None))


def _empty(shape, dtype, fmt):
    return cuda_backend._dense_like(torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)).fill_(
        float("nan") if dtype.is_floating_point else -1
    )


def _cl(t):
    return ref.memory_format_of(t) == torch.channels_last


EMU_LAYOUTS = ("nchw", "channels_last", "noncontiguous")


POOL_CFGS = {  # kernel_size, stride, padding, dilation, ceil_mode
    "2x2": ((2, 2), (2, 2), (0, 0), (1, 1), False),  # the fast path (odd H/W: an uncovered row / column)
    "2x2 ceil": ((2, 2), (2, 2), (0, 0), (1, 1), True),  # clipped windows: the general kernel
    "3x3/2 pad 1 ceil": ((3, 3), (2, 2), (1, 1), (1, 1), True),  # the unrolled 3×3 kernel
    "3x3/1 dil 2": ((3, 3), (1, 1), (1, 1), (2, 2), False),
    "3x2 mixed": ((3, 2), (1, 2), (1, 0), (1, 2), False),
}


def _emu_pool(emu, x, cfg, return_indices, vec=1):
    """ops.cpp's max_pool2d on the emulated kernels: (values, saved, code?)."""
    import ctypes

    k, s, p, d, ceil = cfg
    n, c, h, w = x.shape
    fmt = ref.memory_format_of(x)
    ho = ref.pool_output_size(h, k[0], s[0], p[0], d[0], ceil)
    wo = ref.pool_output_size(w, k[1], s[1], p[1], d[1], ceil)
    code = cuda_backend.pool_saves_code(list(k), return_indices)
    y = _empty((n, c, ho, wo), x.dtype, fmt)
    saved = _empty((n, c, ho, wo), torch.int8 if code else torch.int64, fmt)
    shape, conf = _i64(n, c, h, w, ho, wo), (ctypes.c_int * 8)(k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1])
    rc = emu.emu_max_pool2d_fwd(EMU_DTYPES[x.dtype], _p(x), _p(y), _p(saved), int(code), shape, conf, int(_cl(x)), vec)
    assert rc == 0
    return y, saved, code, (shape, conf)


def _decode_window_codes(saved, cfg, w):
    """PyTorch's flat indices from window codes ky * kw + kx."""
    k, s, p, d, _ = cfg
    ho = torch.arange(saved.shape[2]).view(1, 1, -1, 1)
    wo = torch.arange(saved.shape[3]).view(1, 1, 1, -1)
    ky, kx = saved.long() // k[1], saved.long() % k[1]
    return (ho * s[0] - p[0] + ky * d[0]) * w + (wo * s[1] - p[1] + kx * d[1])


POOL_CASES = [(cfg, (2, 16, 9, 11)) for cfg in POOL_CFGS] + [("2x2", (1, 8, 6, 16))]  # + NCHW 16-byte rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("cfg,shape", POOL_CASES)
@pytest.mark.parametrize("return_indices", [False, True])
def test_emulated_max_pool2d(small_grids, dtype, layout, cfg, shape, return_indices):
    """Values, saved indices or window codes, and the gradient (every element of gx
    written: the buffers start as NaN), against PyTorch and the float64 reference."""
    from gankernels.testing import assert_close_rel, random_input

    emu, cfg = small_grids, POOL_CFGS[cfg]
    x = random_input(*shape, dtype=dtype, layout=layout, generator=torch.Generator().manual_seed(1))
    x[0, 0, 0, 0] = float("nan")
    x[0, 1, :2, :2] = float("-inf")
    x[0, 2, 1, :] = x[0, 2, 0, :]  # ties: the first maximum wins
    fmt = ref.memory_format_of(x)
    y, saved, code, (shape6, conf) = _emu_pool(emu, x, cfg, return_indices)
    assert code == (not return_indices)
    want, widx = F.max_pool2d(x.float(), *cfg, return_indices=True)
    assert torch.equal(y.float().nan_to_num(7.0), want.nan_to_num(7.0))
    assert torch.equal(_decode_window_codes(saved, cfg, shape[3]) if code else saved, widx)
    grad = random_input(*y.shape, dtype=dtype, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=fmt)
    gx = _empty(shape, dtype, fmt)
    rc = emu.emu_max_pool2d_bwd(EMU_DTYPES[dtype], _p(grad), _p(saved), int(code), _p(gx), shape6, conf, int(_cl(x)), 1)
    assert rc == 0
    assert_close_rel(gx, ref.max_pool2d_backward(grad.double(), x.double(), widx), dtype=dtype)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_emulated_max_pool2d_without_vectors(emu, layout):
    """Unaligned buffers (vec = 0): the scalar 2×2 and general kernels."""
    from gankernels.testing import random_input

    x = random_input(2, 16, 8, 16, dtype=torch.bfloat16, layout=layout, generator=torch.Generator().manual_seed(3))
    for cfg in (POOL_CFGS["2x2"], POOL_CFGS["3x3/2 pad 1 ceil"]):
        y, saved, code, _ = _emu_pool(emu, x, cfg, False, vec=0)
        want, widx = F.max_pool2d(x.float(), *cfg, return_indices=True)
        assert torch.equal(y.float(), want) and torch.equal(_decode_window_codes(saved, cfg, 16), widx)


@pytest.mark.parametrize("dtype", list(EMU_DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("scale", [2, 3])
def test_emulated_upsample(emu, dtype, layout, scale):
    from gankernels.testing import assert_close_rel, random_input

    x = random_input(2, 16, 5, 8, dtype=dtype, layout=layout, generator=torch.Generator().manual_seed(3))
    fmt = ref.memory_format_of(x)
    y = _empty((2, 16, 5 * scale, 8 * scale), dtype, fmt)
    assert emu.emu_upsample_fwd(EMU_DTYPES[dtype], _p(x), _p(y), 2, 16, 5, 8, scale, int(_cl(x)), 1) == 0
    assert torch.equal(y, F.interpolate(x, scale_factor=scale, mode="nearest"))
    gx = _empty((2, 16, 5, 8), dtype, fmt)
    assert emu.emu_upsample_bwd(EMU_DTYPES[dtype], _p(y), _p(gx), 2, 16, 5, 8, scale, int(_cl(x)), 1) == 0
    assert_close_rel(gx, ref.upsample_nearest2d_backward(y.double(), scale), dtype=dtype)


@pytest.mark.parametrize("act", list(ACT_CODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", EMU_LAYOUTS)
def test_emulated_bias_act(emu, act, dtype, layout):
    from gankernels.testing import assert_close_rel, random_input

    gen = torch.Generator().manual_seed(4)
    x = random_input(3, 5, 7, 9, dtype=dtype, layout=layout, generator=gen)
    b = random_input(5, dtype=dtype, generator=gen)
    for gain, clamp in ((1.0, None), (1.41, 0.7)):
        xd = x if cuda_backend._is_dense(x) else x.contiguous()
        y = _empty(xd.shape, dtype, ref.memory_format_of(xd))
        assert y.stride() == xd.stride()
        epi = _epi(act, 0.2, gain, clamp)
        assert emu.emu_bias_act_fwd(EMU_DTYPES[dtype], _p(xd), _p(b), _p(y), xd.numel(), xd.stride(1), 5, *epi, 1) == 0
        assert_close_rel(y, ref.bias_act(x.double(), b.double(), act, 0.2, gain, clamp), dtype=dtype)
        grad = torch.empty_like(xd).copy_(random_input(3, 5, 7, 9, dtype=dtype, generator=gen))
        gx = _empty(xd.shape, dtype, ref.memory_format_of(xd))
        assert emu.emu_bias_act_bwd(EMU_DTYPES[dtype], _p(grad), _p(xd), _p(b), _p(gx), xd.numel(), xd.stride(1), 5, *epi, 1) == 0
        want, _ = ref.bias_act_backward(grad.double(), x.double(), b.double(), act, 0.2, gain, clamp, 1)
        assert_close_rel(gx, want, dtype=dtype)


def _emu_conv(emu, x, w, b, act, gain, clamp, pool):
    """ops.cpp's conv3x3_small, on the emulated kernels."""
    n, ci, h, wd = x.shape
    co = w.shape[0]
    fmt = ref.memory_format_of(x)
    s9 = _i64(n, ci, h, wd, co, *x.stride())
    out = _empty((n, co, h // 2, wd // 2) if pool else (n, co, h, wd), x.dtype, fmt)
    saved = _empty(tuple(out.shape), torch.int8, fmt) if pool else None
    rc = emu.emu_conv_fwd(
        EMU_DTYPES[x.dtype], _p(x), _p(w), _p(b), _p(out), _p(saved), s9, int(_cl(x)), *_epi(act, 0.2, gain, clamp), int(pool)
    )
    assert rc == 0
    return out, saved


def _emu_conv_backward(emu, grad, x, w, b, saved, act, gain, clamp, pool, y=None):
    """ops.cpp's conv3x3_small_backward (all gradients), on the emulated kernels; y, the
    forward's output, lets the fused kernel read the derivative off it."""
    n, ci, h, wd = x.shape
    co = w.shape[0]
    fmt = ref.memory_format_of(x)
    dt, cl, epi = EMU_DTYPES[x.dtype], int(_cl(x)), _epi(act, 0.2, gain, clamp)
    s9 = _i64(n, ci, h, wd, co, *x.stride())
    g = grad.contiguous(memory_format=fmt)
    fused = ci <= 4
    gp = _empty((n, co, h, wd), x.dtype, fmt)
    if not fused:
        assert emu.emu_conv_gp(dt, _p(x), _p(w), _p(b), _p(g), _p(saved), _p(gp), s9, cl, *epi, int(pool)) == 0
    gw, gb = _empty(tuple(w.shape), torch.float32, torch.contiguous_format), _empty((co,), torch.float32, torch.contiguous_format)
    partial = _empty((emu.emu_conv_partial_numel(s9, cl, int(fused)),), torch.float32, torch.contiguous_format)
    rc = emu.emu_conv_wgrad(
        dt,
        int(fused),
        _p(x),
        _p(w),
        _p(b),
        _p(g),
        _p(saved),
        None if fused else _p(gp),
        _p(gp) if fused else None,
        _p(y.contiguous(memory_format=fmt)) if (fused and y is not None) else None,
        _p(partial),
        _p(gw),
        _p(gb),
        s9,
        cl,
        *epi,
        int(pool),
    )
    assert rc == 0
    assert not partial.isnan().any(), "a partial sum was not written"
    wt = w.flip((2, 3)).transpose(0, 1).contiguous()
    gx = _empty(tuple(x.shape), x.dtype, fmt)
    t9 = _i64(n, co, h, wd, ci, *gp.stride())
    assert emu.emu_conv_fwd(dt, _p(gp), _p(wt), None, _p(gx), None, t9, cl, *_epi("linear", 0.2, 1.0, None), 0) == 0
    return gx, gw.to(w.dtype), gb.to(w.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ci,co", [(3, 20), (1, 5), (12, 3), (7, 1)])
@pytest.mark.parametrize("pool", [False, True])
def test_emulated_conv3x3_small(emu, dtype, ci, co, pool):
    from gankernels.testing import assert_close_rel, random_input

    gen = torch.Generator().manual_seed(ci * 100 + co)
    for layout, (n, h, wd), act, gain, clamp in (
        ("channels_last", (2, 9, 11), "lrelu", 1.0, None),
        ("nchw", (1, 10, 7), "silu", 1.41, 0.6),
        ("noncontiguous", (1, 6, 8), "tanh", 1.0, None),
    ):
        x = random_input(n, ci, h, wd, dtype=dtype, layout=layout, generator=gen)
        w = (torch.randn(co, ci, 3, 3, generator=gen, dtype=torch.float64) / (3 * ci**0.5)).to(dtype)
        b = (torch.randn(co, generator=gen, dtype=torch.float64) * 0.2).to(dtype)
        what = f"{ci}->{co} {layout} {act} pool={pool}"
        out, saved = _emu_conv(emu, x, w, b, act, gain, clamp, pool)
        want = (ref.conv3x3_pool if pool else ref.conv3x3)(x.double(), w.double(), b.double(), act, 0.2, gain, clamp)
        assert_close_rel(out, want, dtype=dtype, what=what)
        grad = random_input(*out.shape, dtype=dtype, generator=gen)
        # Ci <= 4: lrelu and tanh read the derivative off out, silu recomputes the conv.
        gx, gw, gb = _emu_conv_backward(emu, grad, x, w, b, saved, act, gain, clamp, pool, y=out)
        if pool:
            p = ref.conv3x3_preact(x.double(), w.double(), b.double())
            qh = torch.arange(h // 2).view(1, 1, -1, 1)
            qw = torch.arange(wd // 2).view(1, 1, 1, -1)
            am = saved.long()
            assert ((am >= 0) & (am < 4)).all()
            idx = (2 * qh + am // 2) * wd + (2 * qw + am % 2)
            gp = ref._unpool(grad.double(), idx, p.shape) * ref.epilogue_derivative(p, act, 0.2, gain, clamp)
            want_g = ref._conv_grads(gp, x.double(), w.double(), True, (True, True, True))
        else:
            want_g = ref.conv3x3_backward(grad.double(), x.double(), w.double(), b.double(), act, 0.2, gain, clamp)
        for got, exp, name in zip((gx, gw, gb), want_g, ("x", "w", "b"), strict=True):
            assert_close_rel(got, exp, dtype=dtype, what=f"{what} grad {name}")


@pytest.mark.parametrize("act", ["linear", "relu", "lrelu", "tanh", "sigmoid"])
@pytest.mark.parametrize("pool", [False, True])
def test_emulated_conv3x3_small_backward_reads_the_derivative_off_y(emu, act, pool):
    """Ci <= 4 with the forward's output y: the fused weight-gradient kernel takes the
    activation's derivative from y (gain > 0, clamp included) instead of recomputing the
    conv, and every gradient still matches the reference (float32)."""
    from gankernels.testing import assert_close_rel, random_input

    gen = torch.Generator().manual_seed(50 + ACT_CODES[act])
    x = random_input(2, 3, 9, 10, layout="channels_last", generator=gen)
    w = torch.randn(12, 3, 3, 3, generator=gen, dtype=torch.float64).float() / 3
    b = torch.randn(12, generator=gen, dtype=torch.float64).float() * 0.2
    gain, clamp = 1.41, 0.7
    out, saved = _emu_conv(emu, x, w, b, act, gain, clamp, pool)
    grad = random_input(*out.shape, generator=gen)
    from_y = _emu_conv_backward(emu, grad, x, w, b, saved, act, gain, clamp, pool, y=out)
    recomputed = _emu_conv_backward(emu, grad, x, w, b, saved, act, gain, clamp, pool)
    if pool:
        p = ref.conv3x3_preact(x.double(), w.double(), b.double())
        am = saved.long()
        idx = (2 * torch.arange(4).view(1, 1, -1, 1) + am // 2) * 10 + 2 * torch.arange(5).view(1, 1, 1, -1) + am % 2
        gp = ref._unpool(grad.double(), idx, p.shape) * ref.epilogue_derivative(p, act, 0.2, gain, clamp)
        want = ref._conv_grads(gp, x.double(), w.double(), True, (True, True, True))
    else:
        want = ref.conv3x3_backward(grad.double(), x.double(), w.double(), b.double(), act, 0.2, gain, clamp)
    for got, exp, name in zip(from_y, want, ("x", "w", "b"), strict=True):
        assert_close_rel(got, exp, dtype=torch.float32, what=f"{act} pool={pool} grad {name} from y")
    for got, exp, name in zip(recomputed, want, ("x", "w", "b"), strict=True):
        assert_close_rel(got, exp, dtype=torch.float32, what=f"{act} pool={pool} grad {name} recomputed")


def test_emulated_conv3x3_small_several_tiles(emu):
    """More than one 32×32 forward tile and 8-row wgrad band, odd sizes, 16-channel chunks."""
    from gankernels.testing import assert_close_rel, random_input

    gen = torch.Generator().manual_seed(5)
    x = random_input(1, 3, 34, 35, layout="channels_last", generator=gen)
    w = torch.randn(17, 3, 3, 3, generator=gen) / 5
    b = torch.randn(17, generator=gen) * 0.2
    for pool in (False, True):
        out, saved = _emu_conv(emu, x, w, b, "relu", 1.0, None, pool)
        want = (ref.conv3x3_pool if pool else ref.conv3x3)(x.double(), w.double(), b.double(), "relu")
        assert_close_rel(out, want, dtype=torch.float32)
    grad = random_input(1, 17, 34, 35, generator=gen)
    _, saved = _emu_conv(emu, x, w, b, "relu", 1.0, None, False)
    got = _emu_conv_backward(emu, grad, x, w, b, None, "relu", 1.0, None, False)
    want = ref.conv3x3_backward(grad.double(), x.double(), w.double(), b.double(), "relu", 0.2, 1.0, None)
    for g, e in zip(got, want, strict=True):
        assert_close_rel(g, e, dtype=torch.float32)


@pytest.mark.parametrize("ci,co", [(3, 16), (12, 3)])
@pytest.mark.parametrize("shape", [(0, 6, 8), (2, 0, 8), (2, 6, 0)])
def test_emulated_conv3x3_small_backward_without_pixels(emu, ci, co, shape):
    """No pixels (N = 0 or H·W = 0): the weight and bias gradients are zeros, as stock
    autograd gives, not the unwritten (poisoned) buffers."""
    n, h, wd = shape
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(n, ci, h, wd, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(co, ci, 3, 3, generator=gen)
    b = torch.randn(co, generator=gen)
    grad = torch.randn(n, co, h, wd, generator=gen)
    gx, gw, gb = _emu_conv_backward(emu, grad, x, w, b, None, "lrelu", 1.0, None, False)
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


# ----------------------------------------------------------------------------------
# The tensor-core forward of the RGB layers (csrc/conv3x3_rgb_mma.cu), through the
# emulated mma.sync (csrc/emu/cuda_emu.h). launch_conv3x3_small_fwd routes fp16 / bf16
# calls with 1 <= Ci <= 4 and Co > 4 to it, so the conv tests above run it too.

MMA_TYPES = {torch.float16: 1, torch.bfloat16: 0}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw 16 bits of a float16 / bfloat16 tensor, as int64 in [0, 2^16)."""
    return t.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def _fragments(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """A [16, 16], B [16, 8] (16-bit) and C [16, 8] (float32) as the lanes' registers, from
    the PTX ISA's tables ("Matrix Fragments for mma.m16n8k16 with floating point type"):
    with g = lane // 4, t = lane % 4, element a_i (i < 8) is at row g + 8 for i in {2, 3, 6, 7}
    (else g), column 2t + i % 2 (+ 8 for i >= 4); b_i (i < 4) at row 2t + i % 2 (+ 8 for
    i >= 2), column g; c_i at row g (+ 8 for i >= 2), column 2t + i % 2. Two 16-bit
    elements share a register, a_{2r} in the low half."""
    ab, bb = _bits(a), _bits(b)
    ra, rb, rc = torch.zeros(32, 4, dtype=torch.int64), torch.zeros(32, 2, dtype=torch.int64), torch.zeros(32, 4)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(8):
            row = g + 8 * (i in (2, 3, 6, 7))
            col = 2 * t + i % 2 + 8 * (i >= 4)
            ra[lane, i // 2] |= ab[row, col] << (16 * (i % 2))
        for i in range(4):
            rb[lane, i // 2] |= bb[2 * t + i % 2 + 8 * (i >= 2), g] << (16 * (i % 2))
            rc[lane, i] = c[g + 8 * (i >= 2), 2 * t + i % 2]
    to_u32 = lambda r: r.to(torch.int32).contiguous()  # noqa: E731 (the same 32 bits)
    return to_u32(ra), to_u32(rb), rc.contiguous()


def _unfragment(d: torch.Tensor) -> torch.Tensor:
    """D [16, 8] from the lanes' d registers (the C table)."""
    out = torch.full((16, 8), float("nan"))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            out[g + 8 * (i >= 2), 2 * t + i % 2] = d[lane, i]
    return out


@pytest.mark.parametrize("dtype", list(MMA_TYPES))
def test_emulated_mma_is_a_matmul(emu, dtype):
    """The emulated mma.m16n8k16 (via csrc/mma.cuh's wrapper) on random fragments is
    A·B + C, with every element placed by the PTX ISA's fragment layout."""
    gen = torch.Generator().manual_seed(21)
    for _ in range(3):
        a = torch.randn(16, 16, generator=gen).to(dtype)
        b = torch.randn(16, 8, generator=gen).to(dtype)
        c = torch.randn(16, 8, generator=gen)
        ra, rb, rc = _fragments(a, b, c)
        d = torch.full((32, 4), float("nan"))
        assert emu.emu_mma_m16n8k16(MMA_TYPES[dtype], _p(ra), _p(rb), _p(rc), _p(d)) == 0
        want = a.double() @ b.double() + c.double()
        torch.testing.assert_close(_unfragment(d).double(), want, rtol=1e-6, atol=1e-5)


def test_rgb_mma_routing(emu):
    """The launcher's predicate: fp16 / bf16, 1 <= Ci <= 4, Co > 4; float32, wider inputs
    and Co <= 4 layers stay on the CUDA-core kernel."""

    def serves(dtype, ci, co):
        s9 = _i64(1, ci, 8, 8, co, ci * 64, 1, 8 * ci, ci)
        return bool(emu.emu_conv_rgb_mma_serves(EMU_DTYPES[dtype], s9, 1))

    assert serves(torch.bfloat16, 3, 64) and serves(torch.float16, 3, 64)
    assert serves(torch.bfloat16, 1, 5) and serves(torch.bfloat16, 4, 200)
    assert not serves(torch.float32, 3, 64)
    assert not serves(torch.bfloat16, 5, 64) and not serves(torch.bfloat16, 0, 64)
    assert not serves(torch.bfloat16, 3, 4) and not serves(torch.float16, 12, 3)


RGB_CASES = (  # layout, (N, H, W), Co, act, gain, clamp, bias
    ("channels_last", (2, 9, 11), 64, "lrelu", 1.0, None, True),  # odd H/W, packed stores
    ("nchw", (1, 6, 35), 70, "silu", 1.41, 0.6, True),  # two column tiles, two 64-channel chunks
    ("noncontiguous", (1, 7, 5), 13, "tanh", 1.0, None, False),  # strided x, odd Co
    ("channels_last", (1, 5, 34), 21, "sigmoid", 1.0, None, False),  # odd Co: unpacked channels_last
)


@pytest.mark.parametrize("dtype", list(MMA_TYPES))
@pytest.mark.parametrize("ci", [1, 2, 3, 4])
@pytest.mark.parametrize("pool", [False, True])
def test_emulated_conv3x3_rgb_mma(emu, dtype, ci, pool):
    """Against the float64 reference: one, two and three k16 steps (Ci = 1, 2-3, 4),
    borders, odd sizes, several tiles and channel chunks, bias or not, every layout."""
    from gankernels.testing import assert_close_rel, random_input

    gen = torch.Generator().manual_seed(30 + ci)
    for layout, (n, h, wd), co, act, gain, clamp, bias in RGB_CASES:
        x = random_input(n, ci, h, wd, dtype=dtype, layout=layout, generator=gen)
        assert emu.emu_conv_rgb_mma_serves(EMU_DTYPES[dtype], _i64(n, ci, h, wd, co, *x.stride()), int(_cl(x)))
        w = (torch.randn(co, ci, 3, 3, generator=gen, dtype=torch.float64) / (3 * ci**0.5)).to(dtype)
        b = (torch.randn(co, generator=gen, dtype=torch.float64) * 0.2).to(dtype) if bias else None
        out, _ = _emu_conv(emu, x, w, b, act, gain, clamp, pool)
        bd = b.double() if bias else None
        want = (ref.conv3x3_pool if pool else ref.conv3x3)(x.double(), w.double(), bd, act, 0.2, gain, clamp)
        assert out.stride() == torch.empty_like(want, dtype=dtype).contiguous(memory_format=ref.memory_format_of(x)).stride()
        assert_close_rel(out, want, dtype=dtype, what=f"Ci={ci} Co={co} {layout} {act} pool={pool}")


@pytest.mark.parametrize("act", list(ACT_CODES))
@pytest.mark.parametrize("dtype", list(MMA_TYPES))
def test_emulated_conv3x3_rgb_mma_pool_is_in_thread(emu, act, dtype):
    """Every activation; the in-thread pool sees exactly the values the unpooled kernel
    stores and picks PyTorch's window maximum (the first one on ties: relu's zeros)."""
    from gankernels.testing import assert_close_rel, random_input

    gen = torch.Generator().manual_seed(40 + ACT_CODES[act])
    for layout in ("channels_last", "nchw"):
        x = random_input(2, 3, 10, 13, dtype=dtype, layout=layout, generator=gen)
        w = (torch.randn(64, 3, 3, 3, generator=gen, dtype=torch.float64) / 5).to(dtype)
        b = (torch.randn(64, generator=gen, dtype=torch.float64) * 0.2).to(dtype)
        full, _ = _emu_conv(emu, x, w, b, act, 1.0, None, False)
        assert_close_rel(full, ref.conv3x3(x.double(), w.double(), b.double(), act), dtype=dtype, what=f"{act} {layout}")
        pooled, argmax = _emu_conv(emu, x, w, b, act, 1.0, None, True)
        want, widx = F.max_pool2d(full.float(), 2, return_indices=True)
        assert torch.equal(pooled.float(), want)
        qh = torch.arange(5).view(1, 1, -1, 1)
        qw = torch.arange(6).view(1, 1, 1, -1)
        am = argmax.long()
        assert torch.equal((2 * qh + am // 2) * 13 + 2 * qw + am % 2, widx)


# ----------------------------------------------------------------------------------
# Build defaults.

ROOT = _jit_build.CSRC.parent


def test_setup_py_works_from_any_directory(tmp_path):
    """setup.py finds csrc/ (and the project metadata) wherever it is started from."""
    env = {k: v for k, v in os.environ.items() if k != "GANKERNELS_BUILD_CUDA"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "setup.py"), "--name"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "holds no sources" not in out.stderr
    assert out.stdout.strip().splitlines()[-1] == "gankernels"


def test_default_arch_lists_agree_and_carry_ptx():
    """Without TORCH_CUDA_ARCH_LIST, setup.py and the JIT build compile the same archs,
    with PTX for the newest, so a GPU newer than the list still gets a kernel."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    values = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_ARCH_LIST" for t in node.targets)
    ]
    assert values == [_jit_build.DEFAULT_ARCH_LIST]
    assert _jit_build.DEFAULT_ARCH_LIST.split(";")[-1].endswith("+PTX")


def test_supports_checks_the_gpu_architecture(monkeypatch):
    """A GPU the library has no kernel for (newer than the archs built, no PTX) is a
    reason the backend cannot serve the call, asked of the library once per device, so
    ``auto`` passes over cuda instead of failing with "no kernel image"."""
    from types import SimpleNamespace

    from gankernels.cuda import register

    asked = []

    def kernel_image_error(device):
        asked.append(device)
        return "no kernel image is available for execution on the device"

    monkeypatch.setattr(cuda_backend, "_ops", lambda: SimpleNamespace(kernel_image_error=kernel_image_error))
    monkeypatch.setattr(cuda_backend, "_device_reasons", {})
    monkeypatch.setattr(register, "_extension_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a future GPU")
    x = SimpleNamespace(device=torch.device("cuda", 1), dtype=torch.bfloat16)
    for _ in range(2):
        reasons = register._base_reasons(x)
        assert len(reasons) == 1, reasons
        assert "no kernel for GPU 1 (a future GPU, compute capability 12.0)" in reasons[0]
        assert "TORCH_CUDA_ARCH_LIST='12.0'" in reasons[0]
    assert asked == [1]

    monkeypatch.setattr(cuda_backend, "_device_reasons", {})
    monkeypatch.setattr(cuda_backend, "_ops", lambda: SimpleNamespace(kernel_image_error=lambda device: ""))
    assert register._base_reasons(x) == []


@pytest.fixture
def small_grids(emu):
    """Grid-stride kernels launched with at most 2 blocks: each thread walks many strides."""
    emu.emu_set_max_grid_blocks.argtypes = [__import__("ctypes").c_int64]
    emu.emu_set_max_grid_blocks(2)
    yield emu
    emu.emu_set_max_grid_blocks(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,layout,dim",
    [
        ((2, 3, 4, 8), "nchw", 1),  # H*W % V == 0: one channel per vector
        ((2, 16, 3, 5), "channels_last", 1),  # inner == 1, C % V == 0: consecutive channels
        ((2, 6, 3, 5), "channels_last", 1),  # inner == 1, C % V != 0: the general walk
        ((3, 5, 7, 9), "nchw", 1),  # general walk, and a tail of numel % V elements
        ((3, 5, 7, 9), "nchw", 2),
        ((3, 5, 7, 9), "channels_last", 3),
        ((4, 1, 3, 3), "nchw", 1),  # C == 1
        ((700,), "nchw", 0),  # 1-D: channel = element
    ],
)
@pytest.mark.parametrize("vec", [1, 0])
def test_emulated_bias_act_channel_walk(small_grids, dtype, shape, layout, dim, vec):
    """The per-thread channel walk (no division per element) in every layout, with and
    without 16-byte vectors, over several grid strides and across the scalar tail."""
    from gankernels.testing import assert_close_rel, random_input

    emu = small_grids
    gen = torch.Generator().manual_seed(20)
    x = random_input(*shape, dtype=dtype, layout=layout if len(shape) == 4 else "nchw", generator=gen)
    b = random_input(shape[dim], dtype=dtype, generator=gen)
    inner = x.stride(dim) if shape[dim] > 1 else 1
    epi = _epi("lrelu", 0.2, 1.0, None)
    y = torch.full_like(x, float("nan"))
    assert emu.emu_bias_act_fwd(EMU_DTYPES[dtype], _p(x), _p(b), _p(y), x.numel(), inner, shape[dim], *epi, vec) == 0
    assert_close_rel(y, ref.bias_act(x.double(), b.double(), "lrelu", 0.2, 1.0, None, dim), dtype=dtype)
    grad = torch.empty_like(x).copy_(random_input(*shape, dtype=dtype, generator=gen))
    gx = torch.full_like(x, float("nan"))
    rc = emu.emu_bias_act_bwd(EMU_DTYPES[dtype], _p(grad), _p(x), _p(b), _p(gx), x.numel(), inner, shape[dim], *epi, vec)
    assert rc == 0
    want, _ = ref.bias_act_backward(grad.double(), x.double(), b.double(), "lrelu", 0.2, 1.0, None, dim)
    assert_close_rel(gx, want, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "shape,scale,vec", [((1, 3, 5, 7), 2, 1), ((1, 16, 3, 8), 2, 0), ((1, 8, 3, 4), 1, 1), ((1, 3, 2, 3), 4, 1)]
)
def test_emulated_upsample_every_path(small_grids, dtype, layout, shape, scale, vec):
    """The scalar paths (C or W not a multiple of the vector, unaligned buffers) and
    runtime scales, over several grid strides."""
    from gankernels.testing import assert_close_rel, random_input

    emu = small_grids
    n, c, h, w = shape
    x = random_input(*shape, dtype=dtype, layout=layout, generator=torch.Generator().manual_seed(6))
    fmt = ref.memory_format_of(x)
    y = _empty((n, c, h * scale, w * scale), dtype, fmt)
    assert emu.emu_upsample_fwd(EMU_DTYPES[dtype], _p(x), _p(y), n, c, h, w, scale, int(_cl(x)), vec) == 0
    assert torch.equal(y, F.interpolate(x, scale_factor=scale, mode="nearest"))
    grad = random_input(*y.shape, dtype=dtype, generator=torch.Generator().manual_seed(7)).contiguous(memory_format=fmt)
    gx = _empty(shape, dtype, fmt)
    assert emu.emu_upsample_bwd(EMU_DTYPES[dtype], _p(grad), _p(gx), n, c, h, w, scale, int(_cl(x)), vec) == 0
    assert_close_rel(gx, ref.upsample_nearest2d_backward(grad.double(), scale), dtype=dtype)


@needs_ext
def test_kernel_image_error_is_registered():
    """The GPU check the backend's supports() asks once per device."""
    if torch.cuda.is_available():
        assert ops.kernel_image_error(torch.cuda.current_device()) == ""
    else:
        with pytest.raises(RuntimeError, match=r"device 0 is not a visible CUDA device \(0 visible\)"):
            ops.kernel_image_error(0)


def test_bias_gradient_only_when_needed(monkeypatch):
    """bias_act's backward skips the bias reduction (a second full read of gx) when b
    needs no gradient."""
    from types import SimpleNamespace

    from gankernels.cuda import register

    gx = torch.randn(2, 3, 4, 4)
    monkeypatch.setattr(register, "_ops", lambda: SimpleNamespace(bias_act_backward=lambda *args: gx))
    b = torch.randn(3)
    args = dict(grad=gx, x=gx, b=b, y=gx, act="relu", alpha=0.2, gain=1.0, clamp=None, dim=1)
    got_gx, gb = register._bias_act_backward(**args)
    assert got_gx is gx and torch.allclose(gb, gx.sum((0, 2, 3)))
    got_gx, gb = register._bias_act_backward(**args, needs=(True, False))
    assert got_gx is gx and gb is None
