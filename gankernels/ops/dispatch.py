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

# The backends ``auto`` considers, per op, in the order ``explain`` lists them. Which
# one runs is measured (gankernels.ops.choice), not read from this order.
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
    first-order gradients fast (see ``gankernels.ops.registration``); its ``needs``
    (one bool per differentiable input: (x, w, b) for the 3×3 ops, (x, b) for
    ``bias_act``) says which gradients are wanted, so it may skip the others' work and
    return None for them. Double backward always uses the reference formulas. ``fake_saved``, for the 3×3 ops, gives the
    (fake) tensor the forward saves for its backward. ``prepare``, if given, is called
    with the same arguments before ``supports`` when the backend was asked for by name
    (never under ``auto``): the place for slow one-time set-up such as building the
    CUDA extension; it may raise (e.g. with the compiler's message).
    ``backward_needs_output``, for the 3×3 ops, takes ``(act, alpha, gain, clamp)`` and
    says whether ``backward`` reads the forward's ``out`` (if not given: it does when
    there is a ``backward``); when it does not, ``out`` is not kept for the backward.
    """

    forward: Callable[..., Any]
    supports: Callable[..., list[str]] = field(default=lambda **_: [])
    backward: Optional[Callable[..., Any]] = None
    fake_saved: Optional[Callable[..., torch.Tensor]] = None
    prepare: Optional[Callable[..., None]] = None
    backward_needs_output: Optional[Callable[[str, float, float, Optional[float]], bool]] = None


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
    clear_resolution_cache()


def unregister(op: str, backend: str) -> None:
    _REGISTRY[op].pop(backend, None)
    clear_resolution_cache()


def set_missing_reason(backend: str, reason: str) -> None:
    """Record why ``backend`` registered nothing (shown in every BackendUnavailable)."""
    _MISSING_BACKEND_REASON[backend] = reason
    clear_resolution_cache()


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


# GANKERNELS_BACKEND is read once, case-insensitively. A bad value must not break
# ``import gankernels`` (nor ``python -m gankernels.env``, which reports it): it is an
# error at the first op call that would use it.
_ENV_RAW = os.environ.get("GANKERNELS_BACKEND", "")
_ENV_NAME = _ENV_RAW.strip().lower() or "auto"
ENV_PROBLEM: Optional[str] = (
    None
    if (_ENV_NAME == "auto" or _ENV_NAME in BACKENDS)
    else f"GANKERNELS_BACKEND: unknown backend {_ENV_RAW!r}; expected 'auto' or one of {BACKENDS} "
    "(case does not matter); fix or unset it"
)
_default_backend: list[str] = [_ENV_NAME]


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
#
# Deciding costs more host time than most kernels take on a GPU, so the decision is
# made once per call signature and cached (_RESOLVED). The key holds everything a
# ``supports`` may look at: device, dtype, shape, strides and the other arguments.
# Registering or unregistering an implementation clears it.

_RESOLVED: dict[tuple, str] = {}
_ON_CLEAR: list[Callable[[], None]] = []


def on_clear(fn: Callable[[], None]) -> None:
    """Call ``fn`` whenever the per-signature decisions are forgotten (caches built on them)."""
    _ON_CLEAR.append(fn)


def clear_resolution_cache() -> None:
    """Forget the per-signature decisions (done on every (un)registration)."""
    _RESOLVED.clear()
    for fn in _ON_CLEAR:
        fn()


def _signature(args: dict[str, Any]) -> tuple:
    key = []
    for v in args.values():
        if isinstance(v, torch.Tensor):
            key.append((v.dtype, v.device, v.shape, v.stride(), v.requires_grad))
        elif isinstance(v, list):
            key.append(tuple(v))
        else:
            key.append(v)
    return tuple(key)


def _reasons(op: str, backend: str, args: dict[str, Any]) -> list[str]:
    impl = _REGISTRY[op].get(backend)
    if impl is None:
        why = _MISSING_BACKEND_REASON.get(backend, f"no {backend} implementation of {op} exists yet")
        return [why]
    return list(impl.supports(**args))


def _candidates(op: str, args: dict[str, Any]) -> tuple[list[str], dict[str, list[str]]]:
    """The backends that can serve the call, in preference order, and why the others cannot."""
    ok, rejected = [], {}
    for cand in PREFERENCE[op]:
        why = _reasons(op, cand, args)
        if why:
            rejected[cand] = why
        else:
            ok.append(cand)
    return ok, rejected


def resolve(op: str, requested: Optional[str], args: dict[str, Any]) -> str:
    """The backend that will run ``op`` on ``args``; raises BackendUnavailable.

    A named backend runs if it can serve the call. ``auto`` runs the one
    :func:`gankernels.ops.choice.choose` picks among those that can: measured on the
    first call of a signature, else cached, recorded, or stock."""
    name = default_backend() if requested is None else requested
    compiling = torch.compiler.is_compiling()
    if not compiling:
        key = (op, name, torch.is_grad_enabled(), _signature(args))
        chosen = _RESOLVED.get(key)
        if chosen is not None:
            return chosen
    if name != "auto":
        if name not in BACKENDS:
            if requested is None and ENV_PROBLEM is not None and name == _ENV_NAME:
                raise ValueError(ENV_PROBLEM)
            _check_backend_name(name, "backend")
        impl = _REGISTRY[op].get(name)
        if impl is not None and impl.prepare is not None and not compiling:
            impl.prepare(**args)
        why = _reasons(op, name, args)
        if why:
            raise BackendUnavailable(op, name, {name: why})
        chosen, rejected, how = name, {}, "asked for by name"
    else:
        from gankernels.ops import choice

        ok, rejected = _candidates(op, args)
        if not ok:
            raise BackendUnavailable(op, "auto", rejected)
        if compiling:
            x = args["x"]
            chosen = ok[0] if len(ok) == 1 else choice.traced_choice(op, tuple(ok), choice.needs_grad(args), x.dtype, x.device.type)
            how = ""
        else:
            picked = choice.choose(op, ok, args)
            chosen, how = picked.backend, picked.describe()
    if not compiling:
        _RESOLVED[key] = chosen
        _log_choice(op, name, chosen, how, rejected, args)
    return chosen


def _describe(args: dict[str, Any]) -> tuple:
    out = []
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            out.append((k, tuple(v.shape), str(v.dtype).replace("torch.", ""), v.device.type))
        else:
            out.append((k, v))
    return tuple(out)


def _log_choice(op: str, requested: str, chosen: str, how: str, rejected: dict[str, list[str]], args: dict[str, Any]) -> None:
    if not logger.isEnabledFor(logging.DEBUG):
        return
    passed = "; ".join(f"{b}: {', '.join(r)}" for b, r in rejected.items()) or "none"
    logger.debug("%s%s -> %s (asked %s; chosen: %s; passed over: %s)", op, _describe(args), chosen, requested, how, passed)


@dataclass(frozen=True)
class Explanation:
    """What ``auto`` (or the named backend) would run, and why the others were not.

    ``candidates`` are the backends that can serve the call; ``how`` says how the one
    run was chosen among them (measured, with the times; cached; recorded; stock)."""

    op: str
    backend: Optional[str]
    rejected: dict[str, list[str]]
    candidates: tuple[str, ...] = ()
    how: str = ""

    def __str__(self) -> str:
        lines = [f"{self.op}: {self.backend or 'no backend can serve this call'}"]
        if self.how:
            lines[0] += f"  [{self.how}]"
        if len(self.candidates) > 1:
            lines.append("  can serve it: " + ", ".join(self.candidates))
        for b, why in self.rejected.items():
            lines.append(f"  {b} passed over: " + "; ".join(why))
        return "\n".join(lines)


def explain_args(op: str, requested: Optional[str], args: dict[str, Any]) -> Explanation:
    """Never times anything: for ``auto`` it reports the cached choice, or what would be
    done on the first call."""
    from gankernels.ops import choice

    name = default_backend() if requested is None else _check_backend_name(requested, "backend")
    ok, rejected = _candidates(op, args)
    for cand in BACKENDS:  # also say why backends outside the preference list would not serve it
        if cand not in PREFERENCE[op]:
            why = _reasons(op, cand, args)
            if why:
                rejected[cand] = why
    if name != "auto":
        chosen = name if name in ok else None
        return Explanation(
            op,
            chosen,
            {b: r for b, r in rejected.items() if b == name or chosen is None},
            tuple(ok),
            "asked for by name" if chosen else "",
        )
    if not ok:
        return Explanation(op, None, rejected, ())
    hit = choice.cached(op, args)
    if hit is not None and hit.backend in ok:
        return Explanation(op, hit.backend, rejected, tuple(ok), hit.describe())
    if len(ok) == 1:
        return Explanation(op, ok[0], rejected, tuple(ok), "only candidate")
    possible, why = choice.timing_possible(args)
    if possible:
        return Explanation(op, None, rejected, tuple(ok), "not measured yet: the first call times " + ", ".join(ok))
    rec = choice.recorded_choice(op, args)
    if rec in ok:
        return Explanation(op, rec, rejected, tuple(ok), f"recorded (no timing: {why})")
    fallback = choice.STOCK if choice.STOCK in ok else ok[0]
    return Explanation(op, fallback, rejected, tuple(ok), f"stock default (no timing: {why}; nothing recorded)")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _configure_logging() -> None:
    level = os.environ.get("GANKERNELS_LOG", "").strip().lower()
    if not level:
        return
    if level not in LOG_LEVELS:
        import warnings

        warnings.warn(
            f"GANKERNELS_LOG: unknown level {os.environ['GANKERNELS_LOG']!r}, ignored; expected one of {LOG_LEVELS}",
            stacklevel=2,
        )
        return
    logger.setLevel(getattr(logging, level.upper()))
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[gankernels %(levelname)s] %(message)s"))
        logger.addHandler(handler)


_configure_logging()
