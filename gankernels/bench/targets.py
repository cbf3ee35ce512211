"""The ANCHORS.md targets, as data, and the verdict of a run against them.

Every target is a row of :data:`TARGETS`: which cases it applies to, what it is
measured against, and the bound. The table in ANCHORS.md ("Targets") is the source;
nothing else in the package states a target, so the report, the README section and
``scripts/gpu_check.sh`` all read them from here.

"Stock" (ANCHORS.md): every formulation a PyTorch user could write with stock ops —
eager in either memory format, ``torch.compile``, and for the generator block the
transposed-convolution rewrite — and a speed-up target is a ratio to the *fastest* of
them on that row. A verdict is only ``met``/``missed`` when every stock formulation
the target compares with was measured; if one was not (``torch.compile`` skipped for
time, say), the verdict is ``incomplete`` and says which, never a ratio to eager alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from gankernels.bench.cases import Shape
from gankernels.bench.training_step import NO_CUDA_GRAPHS

MET, MISSED, INCOMPLETE, NO_RESULT = "met", "missed", "incomplete", "no result"

SPEEDUP = "speedup"  # best gankernels time vs the fastest of `baseline` (stock) contenders: ≥ bound ×
COPY_BANDWIDTH = "copy_bandwidth"  # best gankernels time as % of copy bandwidth (ANCHORS bytes): ≥ bound %
TRAIN_SPEEDUP = "train_speedup"  # training step: fastest stock variant / fastest gankernels variant ≥ bound
TRAIN_MEMORY = "train_memory"  # training step: gankernels peak memory / stock eager's ≤ bound

ALL_STOCK: Optional[tuple[str, ...]] = None
"""``baseline`` meaning every stock contender of the case (the fastest stock formulation)."""


def _any_shape(_s: Shape) -> bool:
    return True


def _rgb_input_row(s: Shape) -> bool:
    # ANCHORS: "the 3→64 row" — the discriminator's RGB input layer (Ci = 3); on the
    # CPU shapes it is the Ci = 3 row as well.
    return s.c == 3


def _not_rgb_input_row(s: Shape) -> bool:
    return s.c != 3


@dataclass(frozen=True)
class Target:
    """One ANCHORS.md target.

    ``ops``/``dtypes``/``modes`` and ``rows`` (a predicate on the shape) select the
    cases it applies to; ``kind`` says what is compared and ``bound`` the threshold
    (× for the speed-ups, % for copy bandwidth, a ratio for memory). ``baseline`` names
    the stock contenders the speed-up is against (``None``: all of them)."""

    name: str
    anchors: str  # the row of ANCHORS.md's target table, as written there
    kind: str
    bound: float
    ops: frozenset[str] = frozenset()
    dtypes: frozenset[str] = frozenset()
    modes: frozenset[str] = frozenset()
    rows: Callable[[Shape], bool] = _any_shape
    baseline: Optional[tuple[str, ...]] = ALL_STOCK

    def applies(self, op: str, shape: Shape, dtype: str, mode: str) -> bool:
        return op in self.ops and dtype in self.dtypes and mode in self.modes and self.rows(shape)

    def describe(self) -> str:
        if self.kind == SPEEDUP:
            vs = "the fastest stock formulation" if self.baseline is None else " / ".join(self.baseline)
            return f"≥ {self.bound:g}× vs {vs}"
        if self.kind == COPY_BANDWIDTH:
            return f"≥ {self.bound:g} % of copy bandwidth"
        if self.kind == TRAIN_SPEEDUP:
            return f"≥ {self.bound:g}× vs the fastest stock step"
        return f"peak memory ≤ {self.bound:g}× stock eager"


_LOW = frozenset({"bf16", "fp16"})
_BOTH = frozenset({"fwd", "fwdbwd"})

# Order matters: a case takes the first target that applies (the 3→64 row's 5× comes
# before the discriminator's 1.5×).
TARGETS: tuple[Target, ...] = (
    Target(
        "generator block", "generator block, fwd / fwd+bwd: ≥ 2.0× faster than the fastest stock formulation",
        SPEEDUP, 2.0, frozenset({"gen_block"}), _LOW, _BOTH,
    ),
    Target(
        "discriminator 3→64 row", "discriminator block, the 3→64 row: ≥ 5×",
        SPEEDUP, 5.0, frozenset({"disc_block"}), _LOW, _BOTH, _rgb_input_row,
    ),
    Target(
        "discriminator block", "discriminator block, fwd and fwd+bwd: ≥ 1.5× faster, every row",
        SPEEDUP, 1.5, frozenset({"disc_block"}), _LOW, _BOTH, _not_rgb_input_row,
    ),
    Target(
        "conv3x3 + bias + act", "conv3x3 + bias + act alone: ≥ 1.2× faster than cuDNN + the separate epilogue",
        SPEEDUP, 1.2, frozenset({"conv3x3"}), _LOW, _BOTH, baseline=("eager NCHW", "eager CL"),
    ),
    Target(
        "fp32 (TF32) blocks", "fp32 (TF32) blocks: ≥ 1.5× faster than the fastest stock fp32 formulation",
        SPEEDUP, 1.5, frozenset({"gen_block", "disc_block"}), frozenset({"fp32"}), _BOTH,
    ),
    Target(
        "max-pool / upsample", "stand-alone max-pool and upsample, fwd and bwd: ≥ 80 % of copy bandwidth",
        COPY_BANDWIDTH, 80.0, frozenset({"max_pool2d", "upsample_nearest2d"}), frozenset({"bf16", "fp16", "fp32"}),
        frozenset({"fwd", "bwd"}),
    ),
)  # fmt: skip

TRAIN_TARGETS: tuple[Target, ...] = (
    Target("training step", "the training step: ≤ 4.7 ms (2× eager) with gankernels layers, same losses", TRAIN_SPEEDUP, 2.0),
    Target("training peak memory", "training peak memory: ≤ 0.7× eager", TRAIN_MEMORY, 0.7),
)


def target_for(op: str, shape: Shape, dtype: str, mode: str) -> Optional[Target]:
    """The target a case is held to, or None (no ANCHORS target for it)."""
    return next((t for t in TARGETS if t.applies(op, shape, dtype, mode)), None)


@dataclass(frozen=True)
class Verdict:
    """A case (or the training step) against its target."""

    target: Target
    case: str
    status: str  # MET | MISSED | INCOMPLETE | NO_RESULT
    value: Optional[float] = None  # × or % or memory ratio
    gankernels: str = ""  # the contender measured
    gankernels_ms: Optional[float] = None
    against: str = ""  # the stock contender compared with
    against_ms: Optional[float] = None
    note: str = ""

    def as_dict(self) -> dict:
        return {
            "target": self.target.name,
            "anchors": self.target.anchors,
            "bound": self.target.describe(),
            "case": self.case,
            "status": self.status,
            "value": self.value,
            "gankernels": self.gankernels,
            "gankernels_ms": self.gankernels_ms,
            "against": self.against,
            "against_ms": self.against_ms,
            "note": self.note,
        }


def _shape(case: dict) -> Shape:
    s = case["shape"]
    return Shape(s["n"], s["c"], s["h"], s["w"], s["co"])


def _best(records: list[dict]) -> Optional[dict]:
    ok = [r for r in records if r["status"] == "ok" and r["ms"] is not None]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def case_verdict(case: dict) -> Optional[Verdict]:
    """The verdict of one case of a results dict (``results["cases"][i]``), or None
    when no target applies to it."""
    target = target_for(case["op"], _shape(case), case["dtype"], case["mode"])
    if target is None:
        return None
    recs = list(case["contenders"].values())
    gk = _best([r for r in recs if r["family"] == "gankernels"])
    if gk is None:
        return Verdict(target, case["id"], NO_RESULT, note="no gankernels contender passed the reference check")
    if target.kind == COPY_BANDWIDTH:
        pct = 100.0 * case["floor_ms"] / gk["ms"]  # memory-bound: the floor is bytes / copy bandwidth
        status = MET if pct >= target.bound else MISSED
        return Verdict(target, case["id"], status, pct, gk["contender"], gk["ms"])
    stock = [r for r in recs if r["family"] == "stock" and (target.baseline is None or r["contender"] in target.baseline)]
    missing = [r["contender"] for r in stock if r["status"] != "ok"]
    best = _best(stock)
    if best is None:
        return Verdict(target, case["id"], INCOMPLETE, None, gk["contender"], gk["ms"], note="no stock formulation was measured")
    ratio = best["ms"] / gk["ms"]
    v = dict(value=ratio, gankernels=gk["contender"], gankernels_ms=gk["ms"], against=best["contender"], against_ms=best["ms"])
    if missing:
        why = "; ".join(f"{r['contender']}: {r['status']}" for r in stock if r["status"] != "ok")
        return Verdict(target, case["id"], INCOMPLETE, note=f"not every stock formulation was measured ({why})", **v)
    return Verdict(target, case["id"], MET if ratio >= target.bound else MISSED, **v)


def train_verdicts(train_step: Optional[dict]) -> list[Verdict]:
    """The training step against its two targets (empty when it did not run)."""
    if not train_step:
        return []
    by = {v["name"]: v for v in train_step["variants"]}
    case = "train_step " + train_step["config"]["description"]
    speed, memory = TRAIN_TARGETS
    out = []
    # Stock formulations that cannot exist on this device are no missing contenders.
    stock = [v for v in by.values() if v["name"].startswith("stock") and v.get("reason") != NO_CUDA_GRAPHS]
    gk = [v for v in by.values() if v["name"].startswith("gankernels") and v["status"] == "ok" and v["step_ms"]]
    best_gk = min(gk, key=lambda v: v["step_ms"]) if gk else None
    ok_stock = [v for v in stock if v["status"] == "ok" and v["step_ms"]]
    best_stock = min(ok_stock, key=lambda v: v["step_ms"]) if ok_stock else None
    if best_gk is None or best_stock is None:
        out.append(Verdict(speed, case, NO_RESULT, note="no gankernels variant (or no stock variant) ran"))
    else:
        ratio = best_stock["step_ms"] / best_gk["step_ms"]
        v = dict(gankernels=best_gk["name"], gankernels_ms=best_gk["step_ms"], against=best_stock["name"])
        v["against_ms"] = best_stock["step_ms"]
        missing = [f"{s['name']}: {s['status']}" for s in stock if s["status"] != "ok"]
        if missing:
            out.append(Verdict(speed, case, INCOMPLETE, ratio, note=f"not every stock variant ran ({'; '.join(missing)})", **v))
        else:
            out.append(Verdict(speed, case, MET if ratio >= speed.bound else MISSED, ratio, **v))
    eager = by.get("stock eager")
    gk_mem = [v for v in gk if v["peak_mem_mib"]]
    if not eager or not eager.get("peak_mem_mib") or not gk_mem:
        out.append(Verdict(memory, case, NO_RESULT, note="peak memory is measured on CUDA only"))
    else:
        lowest = min(gk_mem, key=lambda v: v["peak_mem_mib"])
        ratio = lowest["peak_mem_mib"] / eager["peak_mem_mib"]
        out.append(
            Verdict(
                memory, case, MET if ratio <= memory.bound else MISSED, ratio, lowest["name"], note="peak MiB ratio to stock eager"
            )
        )
    return out


def verdicts(results: dict) -> list[Verdict]:
    """Every case of ``results`` that has a target, then the training step's."""
    out = [v for v in (case_verdict(c) for c in results["cases"]) if v is not None]
    return out + train_verdicts(results.get("train_step"))
