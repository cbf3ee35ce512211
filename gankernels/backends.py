"""The one registry of backends. Each backend is a package with a ``register`` module
whose import registers its implementations with ``gankernels.ops.dispatch``:

    gankernels/reference/   "torch"   stock PyTorch composites, the reference; serves every call
    gankernels/triton/      "triton"  Triton kernels
    gankernels/cuda/        "cuda"    the C++/CUDA extension (sources in csrc/)

If a backend cannot be loaded, the reason is recorded and shown whenever that backend
is asked for. To add a backend: create the package, give it a ``register.py``, add it
here and to ``dispatch.BACKENDS`` (see the README's "Adding a kernel")."""

from __future__ import annotations

import importlib

# backend name -> package whose ``register`` module registers that backend's implementations
BACKEND_PACKAGES: dict[str, str] = {
    "torch": "gankernels.reference",
    "triton": "gankernels.triton",
    "cuda": "gankernels.cuda",
}


def load_backends() -> None:
    from gankernels.ops.dispatch import set_missing_reason

    for backend, package in BACKEND_PACKAGES.items():
        module = f"{package}.register"
        if backend == "torch":
            importlib.import_module(module)  # the reference must load; a failure is a bug
            continue
        try:
            importlib.import_module(module)
        except Exception as e:  # a broken fast backend must not break the package
            set_missing_reason(backend, f"could not import {module}: {type(e).__name__}: {e}")
