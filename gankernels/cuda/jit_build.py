"""Build the CUDA extension on first use, when no prebuilt ``gankernels._C`` exists.

``build()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) into
``<cache root>/<key>/``, where the key hashes the sources, the torch and CUDA versions,
the Python version and the arch list, so a changed source or a different torch builds
anew and an unchanged one loads in milliseconds. The cache root is
``$GANKERNELS_CACHE_DIR`` or ``~/.cache/gankernels/extensions``.

Concurrent builds (several processes, e.g. DDP ranks) serialise on an exclusive
``fcntl.flock`` of ``<cache root>/<key>.lock``: the kernel releases it when the holder
dies, so a killed build never leaves the lock stuck (torch's own ``lock`` file in the
build directory can be left behind by a kill, so it is removed while we hold ours).
The build is announced on stderr; a failed build raises :class:`ExtensionBuildError`
carrying the compiler's message.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import torch

CSRC: Path = Path(__file__).resolve().parents[2] / "csrc"
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
# Measured on 2 busy cores for two archs (setup.py build_ext); one arch on a big
# machine takes well under a minute.
BUILD_MINUTES_ESTIMATE = 3
MODULE_NAME = "gankernels_C"


class ExtensionBuildError(RuntimeError):
    """Compiling the CUDA extension failed; the message holds the compiler's output."""


def source_files(csrc: Path = CSRC) -> list[Path]:
    """The files whose content defines the extension (sources and headers), sorted."""
    if not csrc.is_dir():
        return []
    return sorted(p for p in csrc.iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file())


def compiled_sources(csrc: Path = CSRC) -> list[Path]:
    """The translation units handed to the compiler."""
    return [p for p in source_files(csrc) if p.suffix in (".cpp", ".cu")]


def default_arch_list() -> str:
    """``$TORCH_CUDA_ARCH_LIST``, else the arch of every visible GPU (e.g. ``"9.0"``)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return "8.0;9.0"


def cache_key(
    files: Sequence[Path],
    torch_version: str,
    arch_list: str,
    cuda_version: Optional[str] = None,
    python_version: Optional[str] = None,
) -> str:
    """A short hex digest of everything that changes the built library: each source's
    name and bytes, the torch / CUDA / Python versions and the arch list."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    python_version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    for part in (torch_version, str(cuda_version), python_version, arch_list.replace(" ", "")):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def current_key(arch_list: Optional[str] = None) -> str:
    return cache_key(source_files(), torch.__version__, arch_list or default_arch_list(), torch.version.cuda)


def cache_root() -> Path:
    env = os.environ.get("GANKERNELS_CACHE_DIR", "").strip()
    return Path(env) if env else Path.home() / ".cache" / "gankernels" / "extensions"


def built_library(build_dir: Path) -> Optional[Path]:
    """The shared library a finished build left in ``build_dir`` (None if none)."""
    for suffix in (".so", ".pyd", ".dylib"):
        p = build_dir / f"{MODULE_NAME}{suffix}"
        if p.exists():
            return p
    return None


@contextlib.contextmanager
def build_lock(lock_path: Path, announce_wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` for the block. The OS drops it when
    the process exits or is killed, so no stale lock survives a crash."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if announce_wait:
                print(f"gankernels: waiting for another process building the CUDA extension ({lock_path})", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _find_cuda_home() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    import shutil

    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def build_prerequisites() -> list[str]:
    """Why the extension cannot be built here (empty: it can)."""
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if _find_cuda_home() is None:
        reasons.append("nvcc not found (set CUDA_HOME to the CUDA toolkit)")
    if not compiled_sources():
        reasons.append(f"the sources are missing ({CSRC} holds no .cpp/.cu files)")
    return reasons


def build(arch_list: Optional[str] = None, verbose: bool = False) -> Path:
    """Build (or find already built) the extension, load it into this process (which
    registers ``torch.ops.gankernels_cuda.*``) and return the library's path."""
    why = build_prerequisites()
    if why:
        raise ExtensionBuildError("gankernels: cannot build the CUDA extension: " + "; ".join(why))
    arch_list = arch_list or default_arch_list()
    key = current_key(arch_list)
    root = cache_root()
    build_dir = root / key
    with build_lock(root / f"{key}.lock"):
        lib = built_library(build_dir)
        if lib is None:
            lib = _compile(build_dir, arch_list, verbose)
    torch.ops.load_library(str(lib))
    return lib


def _compile(build_dir: Path, arch_list: str, verbose: bool) -> Path:
    cuda_home = _find_cuda_home()
    assert cuda_home is not None
    os.environ.setdefault("CUDA_HOME", cuda_home)
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's FileBaton lock in the build dir survives a killed build and would make
    # every later build wait forever; we hold the flock, so nobody else is building.
    with contextlib.suppress(FileNotFoundError):
        (build_dir / "lock").unlink()
    import torch.utils.cpp_extension as cpp_ext

    if cpp_ext.CUDA_HOME is None:  # imported before CUDA_HOME was set
        cpp_ext.CUDA_HOME = cuda_home
    print(
        f"gankernels: building the CUDA extension for arch {arch_list} into {build_dir} "
        f"(once per source/torch/arch change; about {BUILD_MINUTES_ESTIMATE} min on 2 cores, less on more)...",
        file=sys.stderr,
        flush=True,
    )
    start = time.monotonic()
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        cpp_ext.load(
            name=MODULE_NAME,
            sources=[str(p) for p in compiled_sources()],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=str(build_dir),
            with_cuda=True,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ExtensionBuildError(f"gankernels: building the CUDA extension in {build_dir} failed:\n{e}") from e
    finally:
        if old_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    lib = built_library(build_dir)
    if lib is None:
        raise ExtensionBuildError(f"gankernels: the CUDA extension build in {build_dir} produced no library")
    print(f"gankernels: built the CUDA extension in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return lib
