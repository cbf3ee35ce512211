"""Loading the fast backends. Each registers its implementations with
``gankernels.ops.dispatch`` when imported; if it cannot be loaded, the reason is
recorded and shown whenever that backend is asked for."""

from __future__ import annotations

import importlib

# backend name -> module whose import registers that backend's implementations
FAST_BACKEND_MODULES: dict[str, str] = {
    "triton": "gankernels.triton.register",
    "cuda": "gankernels.cuda_backend",
}


def load_fast_backends() -> None:
    from gankernels.ops.dispatch import set_missing_reason

    for backend, module in FAST_BACKEND_MODULES.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # not written yet: the per-op "no implementation" reason applies
            set_missing_reason(backend, f"could not import {module}: {e}")
        except Exception as e:  # a broken backend must not break the package
            set_missing_reason(backend, f"could not import {module}: {type(e).__name__}: {e}")
