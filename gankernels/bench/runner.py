"""Run the cases: build every contender, check it against the float64 reference, time it.

Contenders of a case, all in the same process on the same input values:

* ``eager NCHW``, ``eager CL`` — the stock code in either memory format (weights in the
  same format, as ``model.to(memory_format=...)`` leaves them);
* ``compile`` — ``torch.compile`` of the same stock code, inputs in the case's format;
* ``convT eager``, ``convT compile`` — generator cases only: the stock transposed-
  convolution rewrite (:func:`gankernels.bench.cases.up_conv_transposed`);
* ``gk torch``, ``gk triton``, ``gk cuda`` — each gankernels backend asked for by name;
* ``kernel triton``, ``kernel cuda`` (forward cases, on request) — the backend's
  registered forward called directly (:func:`gankernels.bench.cases.kernel_call`): the
  kernel without dispatch and the custom op. Family ``kernel``: reported, never the
  "best gankernels" time (a user always pays for the dispatch).

A contender that cannot serve the case is recorded ``n/a`` with the reasons
(``gankernels.explain``); one that raises is ``error``; one whose result (and, for
``fwdbwd``, gradients) is outside the dtype's relative-L2 tolerance of the float64
reference is ``FAIL`` and is not timed. Only ``ok`` contenders count for the best time.

On CUDA, cases with a backward also record the memory each contender's forward keeps
for the backward (``held_mib``) and the forward's peak (``peak_mib``).

Where fp16/bf16 make two answers equally right — which entry of a near-tied pooling
window is the maximum, which side of the leaky ReLU's kink a near-zero pre-activation
falls on — the gradients are also accepted against float64 references that take the
other valid decision (``cases.rounded_argmax_pool_references``,
``cases.kink_consistent_reference``); the record names the reference that matched.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from gankernels.bench import cases as C
from gankernels.bench.cases import Case
from gankernels.bench.roofline import Ceilings, bytes_moved, floor_ms, flops, percent_of_floor
from gankernels.bench.timing import TimingConfig, forward_memory_mib, time_ms
from gankernels.ops import dispatch
from gankernels.ops import reference as ref
from gankernels.testing import rel_l2_error, tolerance

STOCK_FAMILY = "stock"
GK_FAMILY = "gankernels"
KERNEL_FAMILY = "kernel"
GK_BACKENDS: tuple[str, ...] = dispatch.BACKENDS
KERNEL_BACKENDS: tuple[str, ...] = tuple(b for b in GK_BACKENDS if b != "torch")  # the reference's kernel is its composite


class Unavailable(Exception):
    """A contender cannot serve a case; the message says why."""


@dataclass(frozen=True)
class Contender:
    """One way to compute a case. ``make(case)`` returns ``fn(**tensors) -> Tensor`` or
    raises :class:`Unavailable`; ``fmt`` is the memory format of its inputs (None: the
    case's); ``backend`` the gankernels backend it runs (None for stock)."""

    name: str
    family: str
    make: Callable[[Case, dict], Callable[..., torch.Tensor]]
    fmt: Optional[str] = None
    backend: Optional[str] = None


@dataclass
class Record:
    """The outcome of one contender on one case."""

    case: Case
    contender: str
    family: str
    status: str  # "ok" | "FAIL" | "n/a" | "error"
    ms: Optional[float] = None
    err: Optional[float] = None
    tol: Optional[float] = None
    reason: str = ""
    reference: str = ""  # which float64 reference it matched: "exact" or "argmax after rounding at ..."
    held_mib: Optional[float] = None  # CUDA, cases with a backward: memory the forward keeps for it
    peak_mib: Optional[float] = None  # ... and the forward's peak, both above what was allocated before

    def as_dict(self) -> dict:
        return {
            "case": self.case.id,
            "contender": self.contender,
            "family": self.family,
            "status": self.status,
            "ms": self.ms,
            "rel_l2_err": self.err,
            "tol": self.tol,
            "reason": self.reason,
            "reference": self.reference,
            "held_mib": self.held_mib,
            "peak_mib": self.peak_mib,
        }


@dataclass
class CaseSummary:
    """The best stock and best gankernels contender of a case, and the floor."""

    case: Case
    floor_ms: float
    records: list[Record] = field(default_factory=list)

    def _best(self, family: str) -> Optional[Record]:
        ok = [r for r in self.records if r.family == family and r.status == "ok" and r.ms is not None]
        return min(ok, key=lambda r: r.ms) if ok else None

    @property
    def best_stock(self) -> Optional[Record]:
        return self._best(STOCK_FAMILY)

    @property
    def best_gk(self) -> Optional[Record]:
        return self._best(GK_FAMILY)

    @property
    def speedup(self) -> Optional[float]:
        s, g = self.best_stock, self.best_gk
        return s.ms / g.ms if (s and g) else None

    def pct_floor(self, rec: Optional[Record]) -> Optional[float]:
        return percent_of_floor(self.floor_ms, rec.ms) if (rec and rec.ms) else None

    def as_dict(self) -> dict:
        s, g = self.best_stock, self.best_gk
        return {
            **self.case.as_dict(),
            "floor_ms": self.floor_ms,
            "flops": flops(self.case),
            "bytes": bytes_moved(self.case),
            "best_stock": s.contender if s else None,
            "best_stock_ms": s.ms if s else None,
            "best_gankernels": g.contender if g else None,
            "best_gankernels_ms": g.ms if g else None,
            "speedup": self.speedup,
            "pct_floor_best_stock": self.pct_floor(s),
            "pct_floor_best_gankernels": self.pct_floor(g),
            "contenders": {r.contender: r.as_dict() for r in self.records},
        }


# ----------------------------------------------------------------------------------
# Contenders.


def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    # A fresh dynamo cache per contender: the stock lambdas are shared code objects, and
    # after the recompile limit dynamo would silently run them eagerly.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _stock(case: Case, _t: dict) -> Callable[..., torch.Tensor]:
    return C.STOCK[case.op]


def _stock_compiled(case: Case, _t: dict) -> Callable[..., torch.Tensor]:
    return _compiled(C.STOCK[case.op])


def _transposed(case: Case, _t: dict) -> Callable[..., torch.Tensor]:
    return C.TRANSPOSED[case.op]


def _transposed_compiled(case: Case, _t: dict) -> Callable[..., torch.Tensor]:
    return _compiled(C.TRANSPOSED[case.op])


def _gankernels(backend: str) -> Callable[[Case, dict], Callable[..., torch.Tensor]]:
    def make(case: Case, tensors: dict) -> Callable[..., torch.Tensor]:
        why = C.explain_backend(case.op, backend, tensors)
        if why:
            raise Unavailable("; ".join(why))
        return C.gankernels_call(case.op, backend)

    return make


def _kernel_only(backend: str) -> Callable[[Case, dict], Callable[..., torch.Tensor]]:
    def make(case: Case, tensors: dict) -> Callable[..., torch.Tensor]:
        why = C.explain_backend(case.op, backend, tensors)
        if why:
            raise Unavailable("; ".join(why))
        return C.kernel_call(case.op, backend, tensors)

    return make


def _disabled(reason: str) -> Callable[[Case, dict], Callable[..., torch.Tensor]]:
    def make(case: Case, tensors: dict) -> Callable[..., torch.Tensor]:
        raise Unavailable(reason)

    return make


def contenders_for(
    case: Case, compile: bool = True, compile_skip: str = "torch.compile not run (--no-compile)", kernel_only: bool = False
) -> list[Contender]:
    """Every contender of ``case``, in table order; without ``compile`` the compiled ones
    are listed unavailable with the reason ``compile_skip``; with ``kernel_only`` (and
    a forward case) the ``kernel <backend>`` contenders are added."""
    no_compile = _disabled(compile_skip)
    out = [
        Contender("eager NCHW", STOCK_FAMILY, _stock, "nchw"),
        Contender("eager CL", STOCK_FAMILY, _stock, "channels_last"),
        Contender("compile", STOCK_FAMILY, _stock_compiled if compile else no_compile),
    ]
    if case.op in C.TRANSPOSED:
        out += [
            Contender("convT eager", STOCK_FAMILY, _transposed),
            Contender("convT compile", STOCK_FAMILY, _transposed_compiled if compile else no_compile),
        ]
    out += [Contender(f"gk {b}", GK_FAMILY, _gankernels(b), backend=b) for b in GK_BACKENDS]
    if kernel_only and case.mode == "fwd":
        out += [Contender(f"kernel {b}", KERNEL_FAMILY, _kernel_only(b), backend=b) for b in KERNEL_BACKENDS]
    return out


# ----------------------------------------------------------------------------------
# Checking and timing one case.


def _rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    if out.is_cuda and expected.is_cuda and out.shape == expected.shape:
        o, e = out.detach().double(), expected.detach()
        if bool(torch.isfinite(o).all()) and bool(torch.isfinite(e).all()):
            # On device: the CPU path would copy every (possibly GiB-sized) output.
            den = torch.linalg.vector_norm(e)
            num = torch.linalg.vector_norm(o - e)
            return float(num / den) if float(den) != 0 else float(num)
    return rel_l2_error(out, expected)


def _output_names(case: Case) -> list[str]:
    if not case.needs_grad:
        return ["out"]
    return ["out"] + [f"grad_{k}" for k in C.tensor_names(case.op)]


class CaseContext:
    """The inputs of one case in each memory format, the output gradient, and the
    float64 reference results."""

    def __init__(self, case: Case, device: str, seed: int):
        self.case = case
        self.base = C.make_inputs(case, device, seed)
        self.names = C.tensor_names(case.op)
        # The float64 reference, through autograd for the gradients.
        leaves64 = {k: v.detach().double().requires_grad_(case.needs_grad) for k, v in self.base.items()}
        with torch.enable_grad():
            out64 = C.REFERENCE[case.op](**leaves64)
        g = torch.Generator().manual_seed(seed + 1)
        gout = torch.randn(out64.shape, generator=g, dtype=torch.float64).to(device)
        self.grad_out64 = gout
        self.grad_out = {fmt: gout.to(case.torch_dtype).contiguous(memory_format=mf) for fmt, mf in C.FORMATS.items()}
        if case.needs_grad:
            grads = torch.autograd.grad(out64, [leaves64[k] for k in self.names], gout)
            self.expected = [out64.detach(), *grads]
        else:
            self.expected = [out64.detach()]
        self.leaves64 = {k: v.detach() for k, v in leaves64.items()}
        self._rounded: Optional[list[tuple[str, list[torch.Tensor]]]] = None
        self.tol = tolerance(case.torch_dtype, tf32=device == "cuda" and case.op in C.CONV_OPS and torch.backends.cudnn.allow_tf32)

    def tensors(self, fmt: str) -> dict[str, torch.Tensor]:
        """Fresh leaf copies of the inputs: 4-D ones in ``fmt``; requiring grad in fwdbwd/bwd."""
        mf = C.FORMATS[fmt]
        out = {}
        for k, v in self.base.items():
            t = v.detach().clone(memory_format=mf) if v.dim() == 4 else v.detach().clone()
            out[k] = t.requires_grad_(self.case.needs_grad)
        return out

    def rounded_references(self):
        """The rounded-argmax references (conv+pool cases in fp16/bf16, fwdbwd only),
        computed on first use and cached: ``[(description, expected), ...]``."""
        case = self.case
        if not (case.op in C.POOL_CONV_OPS and case.needs_grad and case.dtype in ("fp16", "bf16")):
            return []
        if self._rounded is None:
            self._rounded = [(d, list(e)) for d, e in C.rounded_argmax_pool_references(case, self.leaves64, self.grad_out64)]
        return self._rounded

    def runner(self, fn: Callable[..., torch.Tensor], tensors: dict[str, torch.Tensor]) -> Callable[[], tuple]:
        """``run()`` computing the case with ``fn``: the output, and in fwdbwd/bwd the
        gradients of every input for the fixed output gradient. In ``bwd`` the forward
        runs once, here, and ``run()`` repeats only the backward on its kept graph."""
        if self.case.mode == "fwd":

            def run_fwd() -> tuple:
                return (fn(**tensors),)

            return run_fwd
        leaves = [tensors[k] for k in self.names]

        def grad_for(out: torch.Tensor) -> torch.Tensor:  # laid out like this contender's output
            return self.grad_out["channels_last" if ref.memory_format_of(out) == torch.channels_last else "nchw"]

        if self.case.mode == "bwd":
            kept = fn(**tensors)
            g = grad_for(kept)

            def run_bwd() -> tuple:
                return (kept, *torch.autograd.grad(kept, leaves, g, retain_graph=True))

            return run_bwd
        chosen: list[torch.Tensor] = []

        def run_fwdbwd() -> tuple:
            out = fn(**tensors)
            if not chosen:
                chosen.append(grad_for(out))
            return (out, *torch.autograd.grad(out, leaves, chosen[0]))

        return run_fwdbwd

    def check(self, results: tuple) -> tuple[bool, float, str, str]:
        """(passed, worst error, which reference, what failed)."""
        names = _output_names(self.case)

        def worst(expected: list[torch.Tensor]) -> tuple[float, str]:
            errs = [(_rel_err(r, e), n) for r, e, n in zip(results, expected, names, strict=True)]
            return max(errs, key=lambda t: t[0])

        err, where = worst(self.expected)
        if err <= self.tol:
            return True, err, "exact", ""
        others = list(self.rounded_references())
        if self.case.needs_grad and self.case.op in C.KINK_PREACT:
            others.append(C.kink_consistent_reference(self.case, self.leaves64, self.grad_out64, results[0]))
        for what, expected in others:
            err2, where2 = worst(expected)
            if err2 <= self.tol:
                return True, err2, what, ""
            if err2 < err:
                err, where = err2, where2
        return False, err, "", f"{where}: relative L2 error {err:.2e} > {self.tol:.1e}"


def prepare(ctx: CaseContext, c: Contender, device: str) -> tuple[Record, Optional[Callable[[], tuple]]]:
    """Build contender ``c`` on the case of ``ctx``, run it once (compiling it, if it is a
    compiled one) and check it against the reference. Returns its record and, when the
    record is ``ok``, the ``run()`` to time (``None`` otherwise)."""
    case = ctx.case
    rec = Record(case, c.name, c.family, "ok", tol=ctx.tol)
    tensors = ctx.tensors(c.fmt or case.fmt)
    try:
        fn = c.make(case, tensors)
    except Unavailable as e:
        rec.status, rec.reason = "n/a", str(e)
        return rec, None
    try:
        run = ctx.runner(fn, tensors)  # bwd: runs the forward (and compiles it) here
        results = run()  # also compiles, for the compiled contenders
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - a broken contender is reported, not fatal
        msg = str(e).strip()
        rec.status, rec.reason = "error", f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"
        return rec, None
    ok, err, which, why = ctx.check(results)
    rec.err, rec.reference = err, which
    if not ok:
        rec.status, rec.reason = "FAIL", why
        return rec, None
    if device == "cuda" and case.needs_grad:
        rec.held_mib, rec.peak_mib = forward_memory_mib(lambda: fn(**tensors))
    return rec, run


def run_case(
    case: Case, device: str, contenders: list[Contender], timing: TimingConfig, ceilings: Ceilings, seed: int = 0, progress=None
) -> CaseSummary:
    """Check and time every contender on ``case``."""
    ctx = CaseContext(case, device, seed)
    summary = CaseSummary(case, floor_ms(case, ceilings))
    for c in contenders:
        rec, run = prepare(ctx, c, device)
        if run is not None:
            rec.ms = time_ms(run, device, timing)
        del run
        summary.records.append(rec)
        if progress is not None:
            progress.update(1)
    del ctx
    if device == "cuda":
        torch.cuda.empty_cache()
    return summary


def run_cases(
    cases: list[Case],
    device: str,
    timing: TimingConfig,
    ceilings: Ceilings,
    compile: bool = True,
    compile_skip: str = "torch.compile not run (--no-compile)",
    backends: Optional[list[str]] = None,
    seed: int = 0,
    show_progress: bool = True,
    contenders_fn: Optional[Callable[..., list[Contender]]] = None,
    budget_s: Optional[float] = None,
    stop_s: Optional[float] = None,
    kernel_only: bool = False,
) -> list[CaseSummary]:
    """Every case, with a progress bar on stderr. ``backends`` limits the gankernels
    contenders (the stock ones always run: they are what the speed-up is measured
    against). ``contenders_fn`` defaults to this module's :func:`contenders_for`, looked
    up at call time. After ``budget_s`` seconds, the compiled contenders of the remaining
    cases are listed ``n/a`` instead of compiled; after ``stop_s`` seconds the remaining
    cases are listed with every contender ``n/a`` (so a run under an outer timeout still
    writes its results). ``kernel_only`` adds the kernel-only contenders to forward cases."""
    from tqdm import tqdm

    contenders_fn = contenders_fn or contenders_for

    def plan(case: Case, compile: bool, skip: str) -> list[Contender]:
        cs = contenders_fn(case, compile, skip, kernel_only=kernel_only)
        if backends is not None:
            cs = [c for c in cs if c.backend is None or c.backend in backends]
        return cs

    total = sum(len(plan(case, compile, compile_skip)) for case in cases)
    start = time.monotonic()
    out = []
    with tqdm(total=total, desc="benchmark", unit="run", file=sys.stderr, disable=not show_progress, mininterval=0.5) as bar:
        for case in cases:
            bar.set_postfix_str(case.id, refresh=False)
            elapsed = time.monotonic() - start
            if stop_s is not None and elapsed > stop_s:
                # Past the hard limit: the case is still listed, every contender n/a.
                why = f"not run: the run passed its time limit (--stop-s {stop_s:g})"
                cs = [Contender(c.name, c.family, _disabled(why), c.fmt, c.backend) for c in plan(case, False, why)]
            elif compile and budget_s is not None and elapsed > budget_s:
                # Compiling is what takes the time; past the budget the compiled
                # contenders are listed as not run, so the rest of the table still comes.
                cs = plan(case, False, f"skipped: the run passed its time budget (--budget-s {budget_s:g})")
            else:
                cs = plan(case, compile, compile_skip)
            out.append(run_case(case, device, cs, timing, ceilings, seed, progress=bar))
    return out
