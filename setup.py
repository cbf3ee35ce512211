"""Build gankernels, and gankernels._C (the CUDA extension) when it can be built.

Switches (flash-attention style):
  GANKERNELS_BUILD_CUDA   unset: build _C if torch has CUDA and nvcc is found, warn and
                          go on without it if the build fails;  0: never;  1: always,
                          a failure is fatal.
  TORCH_CUDA_ARCH_LIST    the archs to compile for; default "8.0;9.0+PTX" (SASS for A100 and
                          H100/H200, PTX that newer GPUs compile at load time).
  MAX_JOBS                parallel compile jobs (ninja), as torch.utils.cpp_extension reads it.
  CUDA_HOME               the CUDA toolkit; defaults to /usr/local/cuda when nvcc is there.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Everything below (csrc/, pyproject.toml, --inplace) is relative to the project, not to
# wherever setup.py was started from.
os.chdir(ROOT)
# As gankernels.cuda.jit_build.DEFAULT_ARCH_LIST (tests check that they agree).
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
BUILD_CUDA = os.environ.get("GANKERNELS_BUILD_CUDA", "").strip()
if BUILD_CUDA not in ("", "0", "1"):
    sys.exit(f"GANKERNELS_BUILD_CUDA must be 0, 1 or unset, got {BUILD_CUDA!r}")


def _find_cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def _extension_setup() -> dict:
    """ext_modules and cmdclass for gankernels._C, or {} when it is not built."""
    if BUILD_CUDA == "0":
        return {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    reasons = []
    if not sources:
        reasons.append("csrc/ holds no sources")
    try:
        import torch
    except ImportError:
        torch = None
        reasons.append("torch is not installed (install it first and use --no-build-isolation)")
    if torch is not None and torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        reasons.append("nvcc not found (set CUDA_HOME)")
    if reasons:
        msg = "gankernels: not building the CUDA extension: " + "; ".join(reasons)
        if BUILD_CUDA == "1":
            sys.exit(msg)
        print(msg, file=sys.stderr)
        return {}

    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    class TolerantBuildExtension(BuildExtension):
        """A failed build is fatal only with GANKERNELS_BUILD_CUDA=1."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                if BUILD_CUDA == "1":
                    raise
                print(f"gankernels: CUDA extension build failed, continuing without it: {e}", file=sys.stderr)

    ext = CUDAExtension(
        name="gankernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # No -std flag: torch adds the one its headers need (C++17 for torch 2.11, C++20
        # for newer). No --use_fast_math: the activations (tanhf) must stay exact enough
        # for the float32 tolerance; the kernels are memory- or FMA-bound anyway.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": TolerantBuildExtension.with_options(use_ninja=True)}}


setup(**_extension_setup())
