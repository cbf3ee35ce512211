"""Build the CUDA extension on first use, when no prebuilt ``gankernels._C`` exists.

``build()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) and keeps
the library in ``<cache root>/<key>/``, where the key hashes the sources, the torch,
CUDA and Python versions, the nvcc release, the compiler flags and the arch list, so
any change builds anew and an unchanged one loads in milliseconds. The cache root is
``$GANKERNELS_CACHE_DIR`` or ``~/.cache/gankernels/extensions``.

Crash safety:

* concurrent builds (several processes, e.g. DDP ranks) serialise on an exclusive
  ``fcntl.flock`` of ``<cache root>/<key>.lock``; the kernel releases it when the holder
  dies, so a killed build never leaves the lock stuck;
* every build runs in a fresh folder of its own (``<key>/attempt-<pid>-<random>/``),
  so a build started after a holder died never shares a folder with that holder's
  still-running ninja (which the dead holder's lock no longer covers);
* the library is linked there and, once it has loaded, renamed into place
  (``<key>/gankernels_C.so``) under the lock: a link killed mid-write leaves no
  truncated library where later processes look;
* a cached library that fails to load is set aside and rebuilt once; a second failure
  is reported.

The build is announced on stderr. A failed build, or any ``OSError`` on the way (an
unwritable cache, a full disk, a library that does not load) raises
:class:`ExtensionBuildError` carrying the compiler's or the loader's message.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import secrets
import shutil
import subprocess
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
# What the library is built for when neither TORCH_CUDA_ARCH_LIST nor a GPU says: SASS
# for A100 and H100/H200, and PTX for 9.0 so that newer GPUs can JIT-compile it (as
# setup.py's default).
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# Compiler flags; part of the cache key.
CFLAGS: tuple[str, ...] = ("-O3",)
CUDA_CFLAGS: tuple[str, ...] = ("-O3", "-lineinfo")
ATTEMPT_PREFIX = "attempt-"


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
    return DEFAULT_ARCH_LIST


def cache_key(
    files: Sequence[Path],
    torch_version: str,
    arch_list: str,
    cuda_version: Optional[str] = None,
    python_version: Optional[str] = None,
    nvcc_version: str = "",
    flags: Sequence[str] = (),
) -> str:
    """A short hex digest of everything that changes the built library: each source's
    name and bytes, the torch / CUDA / Python versions, the nvcc release, the compiler
    flags and the arch list."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    python_version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    for part in (torch_version, str(cuda_version), python_version, arch_list.replace(" ", ""), nvcc_version, *flags):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


@functools.cache
def nvcc_version(cuda_home: Optional[str]) -> str:
    """The release line of ``<cuda_home>/bin/nvcc --version`` (e.g. ``"Build
    cuda_13.0.r13.0/compiler.36424714_0"``); empty when there is no nvcc to ask."""
    if cuda_home is None:
        return ""
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def current_key(arch_list: Optional[str] = None) -> str:
    """The cache key of the library this process would build (or load)."""
    return cache_key(
        source_files(),
        torch.__version__,
        arch_list or default_arch_list(),
        torch.version.cuda,
        nvcc_version=nvcc_version(_find_cuda_home()),
        flags=(*CFLAGS, "|", *CUDA_CFLAGS),
    )


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
    registers ``torch.ops.gankernels_cuda.*``) and return the library's path.

    Raises :class:`ExtensionBuildError` (never a bare ``OSError``) when it cannot."""
    why = build_prerequisites()
    if why:
        raise ExtensionBuildError("gankernels: cannot build the CUDA extension: " + "; ".join(why))
    arch_list = arch_list or default_arch_list()
    key = current_key(arch_list)
    root = cache_root()
    build_dir = root / key
    try:
        with build_lock(root / f"{key}.lock"):
            _remove_stale_attempts(build_dir)
            lib = built_library(build_dir)
            if lib is not None:
                try:
                    torch.ops.load_library(str(lib))
                    return lib
                except OSError as e:
                    # Truncated or damaged (a crash, a full disk): set it aside, build once more.
                    print(
                        f"gankernels: the cached CUDA extension {lib} failed to load ({e}); rebuilding it",
                        file=sys.stderr,
                        flush=True,
                    )
                    os.replace(lib, lib.with_name(f"{lib.name}.broken"))
            lib = _compile(build_dir, arch_list, verbose)
            torch.ops.load_library(str(lib))
            return lib
    except OSError as e:
        raise ExtensionBuildError(f"gankernels: building or loading the CUDA extension in {build_dir} failed: {e}") from e


def _remove_stale_attempts(build_dir: Path) -> None:
    """Delete the folders of earlier builds that died (we hold the lock, so no live
    build owns one; a dead holder's ninja may still run in its folder and then fails,
    which harms nobody: its output is never renamed into place)."""
    if not build_dir.is_dir():
        return
    for d in build_dir.glob(f"{ATTEMPT_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)


def _compile(build_dir: Path, arch_list: str, verbose: bool) -> Path:
    """Build in a fresh folder of ``build_dir``, load the library (torch's ``load``
    does), and rename it to ``build_dir/gankernels_C.so``. Call with the lock held."""
    cuda_home = _find_cuda_home()
    assert cuda_home is not None
    os.environ.setdefault("CUDA_HOME", cuda_home)
    attempt = build_dir / f"{ATTEMPT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    attempt.mkdir(parents=True)
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
            extra_cflags=list(CFLAGS),
            extra_cuda_cflags=list(CUDA_CFLAGS),
            build_directory=str(attempt),
            with_cuda=True,
            is_python_module=False,
            verbose=verbose,
        )
        # torch names the library <name>_v<N> when this process already built <name>.
        linked = sorted(p for p in attempt.iterdir() if p.name.startswith(MODULE_NAME) and p.suffix in (".so", ".pyd", ".dylib"))
        if not linked:
            raise ExtensionBuildError(f"gankernels: the CUDA extension build in {attempt} produced no library")
        final = build_dir / f"{MODULE_NAME}{linked[-1].suffix}"
        os.replace(linked[-1], final)  # atomic: a complete library, or none
    except ExtensionBuildError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ExtensionBuildError(f"gankernels: building the CUDA extension in {attempt} failed:\n{e}") from e
    finally:
        if old_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
        shutil.rmtree(attempt, ignore_errors=True)
    print(f"gankernels: built the CUDA extension in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return final
