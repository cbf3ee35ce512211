"""Backend registry and dispatch (DESIGN.md §2).

Each op has implementations keyed by backend name (``torch``, ``triton``, ``cuda``).
An implementation says which calls it can serve (``supports`` returns every reason it
cannot; an empty list means it can). A request by name that cannot be served raises
:class:`BackendUnavailable` listing every reason; ``auto`` takes the first backend of
the op's preference list that can serve the call. Nothing falls back silently after a
backend was asked for by name.

This module is traced by ``torch.compile``: resolution is plain Python over module
state, and logging is skipped while compiling.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

BACKENDS: tuple[str, ...] = ("torch", "triton", "cuda")
"""Names a caller may ask for, besides ``auto``."""

OPS: tuple[str, ...] = ("bias_act", "conv3x3", "conv3x3_pool", "up_conv3x3", "max_pool2d", "upsample_nearest2d")

# The order ``auto`` tries backends in, per op. From the benchmark results under
# benchmarks/results/: the fast kernels come first, and each one's ``supports`` narrows
# it to the shapes where it was measured to win; ``torch`` serves everything else.
PREFERENCE: dict[str, tuple[str, ...]] = {op: ("cuda", "triton", "torch") for op in OPS}

logger = logging.getLogger("gankernels")


class BackendUnavailable(RuntimeError):
    """A backend asked for cannot serve the call; ``reasons`` maps each backend that
    was considered to every reason it was passed over."""

    def __init__(self, op: str, requested: str, reasons: dict[str, list[str]]):
        self.op = op
        self.requested = requested
        self.reasons = reasons
        lines = [f"gankernels.{op}: backend {requested!r} cannot serve this call:"]
        for name, why in reasons.items():
            for r in why:
                lines.append(f"  - {name}: {r}")
        if requested != "auto":
            lines.append("Pass backend='auto' (or 'torch') to let gankernels choose one that can.")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of one op.

    ``forward`` takes the op's normalised keyword arguments and returns what the
    registered op returns. ``supports`` takes the same arguments and returns the list
    of reasons it cannot serve them (empty: it can). ``backward``, if given, computes
    first-order gradients fast (see ``gankernels.ops.registration``); double backward
    always uses the reference formulas. ``fake_saved``, for the 3×3 ops, gives the
    (fake) tensor the forward saves for its backward. ``prepare``, if given, is called
    with the same arguments before ``supports`` when the backend was asked for by name
    (never under ``auto``): the place for slow one-time set-up such as building the
    CUDA extension; it may raise (e.g. with the compiler's message).
    """

    forward: Callable[..., Any]
    supports: Callable[..., list[str]] = field(default=lambda **_: [])
    backward: Optional[Callable[..., Any]] = None
    fake_saved: Optional[Callable[..., torch.Tensor]] = None
    prepare: Optional[Callable[..., None]] = None


_REGISTRY: dict[str, dict[str, OpImpl]] = {op: {} for op in OPS}
# Why a backend has no implementations at all (e.g. Triton not importable).
_MISSING_BACKEND_REASON: dict[str, str] = {}


def register(op: str, backend: str, impl: OpImpl) -> None:
    """Register ``impl`` as ``backend``'s implementation of ``op``."""
    if op not in _REGISTRY:
        raise ValueError(f"op: unknown op {op!r}; expected one of {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY[op][backend] = impl


def unregister(op: str, backend: str) -> None:
    _REGISTRY[op].pop(backend, None)


def set_missing_reason(backend: str, reason: str) -> None:
    """Record why ``backend`` registered nothing (shown in every BackendUnavailable)."""
    _MISSING_BACKEND_REASON[backend] = reason


def get_impl(op: str, backend: str) -> OpImpl:
    return _REGISTRY[op][backend]


def registered_backends(op: str) -> list[str]:
    return list(_REGISTRY[op])


# ----------------------------------------------------------------------------------
# The default backend: GANKERNELS_BACKEND, overridden by use_backend(...).


def _check_backend_name(name: str, what: str) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"{what}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name


_default_backend: list[str] = [_check_backend_name(os.environ.get("GANKERNELS_BACKEND", "auto") or "auto", "GANKERNELS_BACKEND")]


def default_backend() -> str:
    return _default_backend[-1]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, ops called without ``backend=`` use ``name``.

    >>> with gankernels.use_backend("torch"):
    ...     y = gankernels.conv3x3(x, w, b, act="lrelu")
    """
    _default_backend.append(_check_backend_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _default_backend.pop()


# ----------------------------------------------------------------------------------
# Resolution.


def _reasons(op: str, backend: str, args: dict[str, Any]) -> list[str]:
    impl = _REGISTRY[op].get(backend)
    if impl is None:
        why = _MISSING_BACKEND_REASON.get(backend, f"no {backend} implementation of {op} exists yet")
        return [why]
    return list(impl.supports(**args))


def resolve(op: str, requested: Optional[str], args: dict[str, Any]) -> str:
    """The backend that will run ``op`` on ``args``; raises BackendUnavailable."""
    name = default_backend() if requested is None else _check_backend_name(requested, "backend")
    if name != "auto":
        impl = _REGISTRY[op].get(name)
        if impl is not None and impl.prepare is not None and not torch.compiler.is_compiling():
            impl.prepare(**args)
        why = _reasons(op, name, args)
        if why:
            raise BackendUnavailable(op, name, {name: why})
        chosen = name
        rejected: dict[str, list[str]] = {}
    else:
        rejected = {}
        chosen = ""
        for cand in PREFERENCE[op]:
            why = _reasons(op, cand, args)
            if not why:
                chosen = cand
                break
            rejected[cand] = why
        if not chosen:
            raise BackendUnavailable(op, "auto", rejected)
    if not torch.compiler.is_compiling():
        _log_choice(op, name, chosen, rejected, args)
    return chosen


_logged: set[tuple] = set()


def _describe(args: dict[str, Any]) -> tuple:
    out = []
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            out.append((k, tuple(v.shape), str(v.dtype).replace("torch.", ""), v.device.type))
        else:
            out.append((k, v))
    return tuple(out)


def _log_choice(op: str, requested: str, chosen: str, rejected: dict[str, list[str]], args: dict[str, Any]) -> None:
    if not logger.isEnabledFor(logging.DEBUG):
        return
    key = (op, requested, chosen, _describe(args))
    if key in _logged:
        return
    _logged.add(key)
    passed = "; ".join(f"{b}: {', '.join(r)}" for b, r in rejected.items()) or "none"
    logger.debug("%s%s -> %s (asked %s; passed over: %s)", op, key[3], chosen, requested, passed)


@dataclass(frozen=True)
class Explanation:
    """What ``auto`` (or the named backend) would run, and why the others were not."""

    op: str
    backend: Optional[str]
    rejected: dict[str, list[str]]

    def __str__(self) -> str:
        lines = [f"{self.op}: {self.backend or 'no backend can serve this call'}"]
        for b, why in self.rejected.items():
            lines.append(f"  {b} passed over: " + "; ".join(why))
        return "\n".join(lines)


def explain_args(op: str, requested: Optional[str], args: dict[str, Any]) -> Explanation:
    name = default_backend() if requested is None else _check_backend_name(requested, "backend")
    order = PREFERENCE[op] if name == "auto" else (name,)
    rejected: dict[str, list[str]] = {}
    chosen = None
    for cand in order:
        why = _reasons(op, cand, args)
        if why:
            rejected[cand] = why
        elif chosen is None:
            chosen = cand
    # Also say why the backends after the chosen one would not have served it.
    for cand in BACKENDS:
        if cand not in order:
            why = _reasons(op, cand, args)
            if why:
                rejected[cand] = why
    return Explanation(op, chosen, rejected)


def _configure_logging() -> None:
    level = os.environ.get("GANKERNELS_LOG", "").strip().lower()
    if not level:
        return
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[gankernels %(levelname)s] %(message)s"))
        logger.addHandler(handler)


_configure_logging()
