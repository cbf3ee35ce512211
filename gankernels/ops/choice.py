"""How ``auto`` chooses among the backends that can serve a call: by measurement.

When more than one backend can serve a call (``torch``, the stock composite, is always
one of them), ``auto`` does what ``torch.backends.cudnn.benchmark`` does: on the first
call of a *signature* (op, device, dtype, shape, strides, arguments, whether gradients
are needed) it times every candidate on the same inputs, a few runs each with CUDA
events, and keeps the fastest. The choice is cached in memory and on disk
(``$GANKERNELS_CACHE_DIR`` or ``~/.cache/gankernels``, under ``choices/``, one file per
GPU name + torch + triton + gankernels versions), so later processes start warm;
:func:`gankernels.tune` fills the cache ahead of time.

No timing happens while compiling (``torch.compile`` takes the cached choice at trace
time), during CUDA-graph capture, for tensors not on a CUDA device, or when
``GANKERNELS_AUTOTUNE=0``. Then the choice comes from the cache, else from the table
generated from the recorded GPU results under ``benchmarks/results/``
(:data:`RECORDED_TABLE`), else it is ``torch``: stock PyTorch, never slower than itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

STOCK = "torch"
"""The stock composite's backend: the default whenever nothing was measured or recorded."""

ENV_AUTOTUNE = "GANKERNELS_AUTOTUNE"
"""Set to ``0`` to turn the timing off (the cache and the recorded table still apply)."""

RECORDED_TABLE: Path = Path(__file__).with_name("recorded_choices.json")
"""The choices read off recorded GPU benchmark results; regenerate with
``python -m gankernels.ops.choice benchmarks/results``."""

TIMING_REPS = 5


@dataclass
class Choice:
    """The backend ``auto`` runs for one signature, and what it was chosen from."""

    backend: str
    source: str  # "only candidate" | "measured" | "cache" | "recorded" | "stock default"
    times_ms: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        times = ", ".join(f"{b} {t:.4g} ms" for b, t in sorted(self.times_ms.items(), key=lambda kv: kv[1]))
        return f"{self.backend} ({self.source}{': ' + times if times else ''})"


# ----------------------------------------------------------------------------------
# Signatures.


def needs_grad(args: dict[str, Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in args.values())


def describe(args: dict[str, Any]) -> tuple:
    """Plain values for everything a choice may depend on (traceable by Dynamo)."""
    parts = []
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            parts.append((k, v.dtype, v.device.type, tuple(v.shape), tuple(v.stride())))
        elif isinstance(v, list):
            parts.append((k, tuple(v)))
        else:
            parts.append((k, v))
    return tuple(parts)


def signature_of(op: str, grad: bool, parts: tuple) -> str:
    """A stable text key for the call."""
    out = [op, "fwdbwd" if grad else "fwd"]
    for p in parts:
        if len(p) == 5:  # a tensor
            k, dtype, dev, shape, stride = p
            out.append(f"{k}={str(dtype)[6:]}:{dev}:{list(shape)}:{list(stride)}")
        elif p[1] is not None:
            out.append(f"{p[0]}={p[1]}")
    return "|".join(out)


def signature(op: str, args: dict[str, Any]) -> str:
    return signature_of(op, needs_grad(args), describe(args))


# ----------------------------------------------------------------------------------
# Timing (injectable for tests).

Timer = Callable[[Callable[[], None], torch.device, str], float]
"""``timer(run, device, backend) -> milliseconds`` for one candidate's timed run."""


def cuda_event_timer(fn: Callable[[], None], device: torch.device, backend: str = "") -> float:
    """Median milliseconds of ``fn`` over TIMING_REPS runs, CUDA events, after 2 warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(TIMING_REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


_timer: list[Timer] = [cuda_event_timer]
_timed_devices: list[tuple[str, ...]] = [("cuda",)]


def set_timer(timer: Timer, devices: Iterable[str] = ("cuda",)) -> None:
    """Use ``timer`` to measure candidates, for tensors on ``devices`` (tests inject a
    fake timer and ``("cpu",)``)."""
    _timer[0] = timer
    _timed_devices[0] = tuple(devices)


def reset_timer() -> None:
    set_timer(cuda_event_timer, ("cuda",))


# The functional layer registers, per op, how to build a timed run of one backend:
# runner(args, backend) -> a callable doing the forward (and the backward if gradients
# are needed) on copies of the inputs.
RUNNERS: dict[str, Callable[[dict[str, Any], str], Callable[[], None]]] = {}


def timing_possible(args: dict[str, Any]) -> tuple[bool, str]:
    """Whether candidates may be timed now, and why not."""
    if os.environ.get(ENV_AUTOTUNE, "1").strip() == "0":
        return False, f"{ENV_AUTOTUNE}=0"
    if torch.compiler.is_compiling():
        return False, "compiling"
    x = next(v for v in args.values() if isinstance(v, torch.Tensor))
    if x.device.type not in _timed_devices[0]:
        return False, f"tensors on {x.device.type}"
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False, "CUDA-graph capture"
    return True, ""


# ----------------------------------------------------------------------------------
# The caches.

_lock = threading.Lock()
_memory: dict[str, Choice] = {}
_disk: dict[str, dict] = {}
_disk_state = {"loaded": False}
_recorded_table: dict[str, str] = {}
_recorded_state = {"loaded": False}


def _versions_key() -> str:
    import gankernels

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    text = f"{gpu}|torch {torch.__version__}|triton {triton_version}|gankernels {gankernels.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_file() -> Path:
    base = os.environ.get("GANKERNELS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gankernels")
    return Path(base) / "choices" / f"{_versions_key()}.json"


def _load_disk() -> None:
    if _disk_state["loaded"]:
        return
    _disk_state["loaded"] = True
    try:
        _disk.update(json.loads(cache_file().read_text()))
    except (OSError, ValueError):
        pass  # no cache yet, or an unreadable one: it is rewritten on the next measurement


def _save_disk() -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_disk, indent=0, sort_keys=True))
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    except OSError:
        pass  # a read-only home: the in-memory cache still serves this process


def clear(memory: bool = True, disk: bool = False) -> None:
    """Forget the choices (in this process; with ``disk=True`` also the file)."""
    from gankernels.ops import dispatch

    dispatch.clear_resolution_cache()
    with _lock:
        if memory:
            _memory.clear()
            _disk.clear()
            _disk_state["loaded"] = False
            _recorded_table.clear()
            _recorded_state["loaded"] = False
        if disk:
            try:
                cache_file().unlink()
            except OSError:
                pass


def _device_name(device_type: str) -> str:
    return torch.cuda.get_device_name() if device_type == "cuda" else device_type


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # the bench's names


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype)[6:])


def table_key(device: str, op: str, dtype: str, fmt: str, mode: str, dims: str = "") -> str:
    """A key of the recorded table, ``device|op|dtype|format|mode|NxCxHxW->Co``; without
    ``dims``, the prefix every shape of that op shares (what a trace looks up)."""
    return f"{device}|{op}|{dtype}|{fmt}|{mode}|{dims}"


def _recorded_key(op: str, grad: bool, parts: tuple) -> Optional[str]:
    tensors = {p[0]: p for p in parts if len(p) == 5}
    if "x" not in tensors or len(tensors["x"][3]) != 4:
        return None
    _, dtype, dev, (n, c, h, wd), stride = tensors["x"]
    co = tensors["w"][3][0] if "w" in tensors else c
    # channels_last: C innermost (stride 1) and not also plain contiguous.
    fmt = "channels_last" if (c > 1 and stride[1] == 1 and stride[3] == c) else "nchw"
    return table_key(_device_name(dev), op, _dtype_name(dtype), fmt, "fwdbwd" if grad else "fwd", f"{n}x{c}x{h}x{wd}->{co}")


def _recorded(op: str, grad: bool, parts: tuple) -> Optional[str]:
    if not _recorded_state["loaded"]:
        _recorded_state["loaded"] = True
        try:
            _recorded_table.update(json.loads(RECORDED_TABLE.read_text()).get("choices", {}))
        except (OSError, ValueError):
            pass
    if not _recorded_table:
        return None
    key = _recorded_key(op, grad, parts)
    return _recorded_table.get(key) if key else None


def recorded_choice(op: str, args: dict[str, Any]) -> Optional[str]:
    """The backend the recorded GPU results say is fastest for this call, if recorded."""
    return _recorded(op, needs_grad(args), describe(args))


def _lookup(sig: str, candidates: Iterable[str]) -> Optional[Choice]:
    with _lock:
        hit = _memory.get(sig)
        if hit is None:
            _load_disk()
            entry = _disk.get(sig)
            if entry is not None:
                hit = _memory[sig] = Choice(entry["backend"], "cache", dict(entry.get("times_ms", {})))
    return hit if (hit is not None and hit.backend in candidates) else None


def _untimed(op: str, candidates: list[str], grad: bool, parts: tuple) -> Choice:
    recorded = _recorded(op, grad, parts)
    if recorded in candidates:
        return Choice(recorded, "recorded")
    if STOCK in candidates:
        return Choice(STOCK, "stock default")
    return Choice(candidates[0], "first candidate (stock cannot serve it)")


@torch.compiler.assume_constant_result
def traced_choice(op: str, candidates: tuple, grad: bool, dtype: torch.dtype, device_type: str) -> str:
    """The choice while ``torch.compile`` traces a call. Never times. Shapes may be
    symbolic while tracing, so it is the backend the eager choices (cached in memory or
    on disk) picked most often for this op, dtype, device and gradient mode; else the
    recorded table's majority for them; else stock. A constant to Dynamo."""
    if len(candidates) == 1:
        return candidates[0]
    prefix = f"{op}|{'fwdbwd' if grad else 'fwd'}|"
    tag = f"|x={str(dtype)[6:]}:{device_type}:"
    with _lock:
        _load_disk()
        seen = {sig: e["backend"] for sig, e in _disk.items()}
        seen.update({sig: c.backend for sig, c in _memory.items()})
    votes = Counter(b for sig, b in seen.items() if sig.startswith(prefix) and tag in sig and b in candidates)
    if not votes:
        _recorded(op, grad, ())  # loads the table
        mode = "fwdbwd" if grad else "fwd"
        heads = tuple(table_key(_device_name(device_type), op, _dtype_name(dtype), fmt, mode) for fmt in ("channels_last", "nchw"))
        votes = Counter(b for k, b in _recorded_table.items() if k.startswith(heads) and b in candidates)
    if votes:
        top = max(votes.values())
        winners = [b for b, n in votes.items() if n == top]
        return STOCK if STOCK in winners else sorted(winners)[0]
    return STOCK if STOCK in candidates else candidates[0]


def choose(op: str, candidates: list[str], args: dict[str, Any]) -> Choice:
    """The backend to run among ``candidates`` (each can serve the call), in eager mode."""
    if len(candidates) == 1:
        return Choice(candidates[0], "only candidate")
    grad, parts = needs_grad(args), describe(args)
    sig = signature_of(op, grad, parts)
    hit = _lookup(sig, candidates)
    if hit is not None:
        return hit
    possible, _why = timing_possible(args)
    if possible and op in RUNNERS:
        device = next(v for v in args.values() if isinstance(v, torch.Tensor)).device
        times = {}
        for cand in candidates:
            times[cand] = float(_timer[0](RUNNERS[op](args, cand), device, cand))
        best = min(candidates, key=lambda c: (times[c], c != STOCK))  # a tie goes to stock
        choice = Choice(best, "measured", times)
        with _lock:
            _memory[sig] = choice
            _disk[sig] = {"backend": best, "times_ms": times}
            _save_disk()
        return choice
    return _untimed(op, candidates, grad, parts)


def cached(op: str, args: dict[str, Any]) -> Optional[Choice]:
    """The choice made for this signature, if any (for ``explain``); never times."""
    sig = signature(op, args)
    with _lock:
        if sig in _memory:
            return _memory[sig]
        _load_disk()
        entry = _disk.get(sig)
    return Choice(entry["backend"], "cache", dict(entry.get("times_ms", {}))) if entry else None


# ----------------------------------------------------------------------------------
# The recorded table, generated from benchmark results.


def table_from_results(results_dir: Path) -> dict[str, str]:
    """``{recorded key: backend}`` from every GPU ``results.json`` under ``results_dir``:
    per case, the fastest gankernels backend if it beat the fastest stock formulation,
    else ``torch``. CPU results are skipped (``auto`` only times GPU calls)."""
    table: dict[str, str] = {}
    for path in sorted(Path(results_dir).rglob("results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        env = data.get("env", {})
        gpu = env.get("gpu") or env.get("device_name")
        if env.get("device") != "cuda" or not gpu:
            continue
        for case in data.get("cases", []):
            if case.get("op") not in RUNNER_OPS:
                continue
            best, best_ms = STOCK, case.get("best_stock_ms")
            for name, c in case.get("contenders", {}).items():
                if c.get("family") != "stock" and c.get("status") == "ok" and name.startswith("gk "):
                    backend = name[3:]
                    if best_ms is not None and c.get("ms") is not None and c["ms"] < best_ms:
                        best, best_ms = backend, c["ms"]
            sh = case["shape"]
            fmt = "channels_last" if case.get("fmt") == "channels_last" else "nchw"
            dims = f"{sh['n']}x{sh['c']}x{sh['h']}x{sh['w']}->{sh.get('co', sh['c'])}"
            key = table_key(gpu, case["op"], case["dtype"], fmt, case["mode"], dims)
            table[key] = best
    return table


RUNNER_OPS = ("bias_act", "conv3x3", "conv3x3_pool", "up_conv3x3", "max_pool2d", "upsample_nearest2d")


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m gankernels.ops.choice", description="Regenerate auto's recorded table from GPU benchmark results."
    )
    p.add_argument("results", type=Path, nargs="?", default=Path("benchmarks/results"))
    p.add_argument("--out", type=Path, default=RECORDED_TABLE)
    args = p.parse_args(argv)
    table = table_from_results(args.results)
    doc = {
        "generated_by": "python -m gankernels.ops.choice " + str(args.results),
        "note": "per recorded GPU case, the fastest gankernels backend if it beat stock, else torch",
        "choices": dict(sorted(table.items())),
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(table)} recorded choices -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
