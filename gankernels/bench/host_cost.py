"""Host cost of the eager path: gankernels against the stock code it replaces.

On tiny CPU tensors the arithmetic is negligible, so what is timed is what every call
costs on the host (argument checks, dispatch, the custom-op and autograd machinery):
the same Python runs before each kernel launch on a GPU machine. Stock and gankernels
are timed in one process, on the same inputs, interleaved round by round, and each is
reported as its fastest round's per-call time (thread CPU time, so a loaded machine
inflates neither side).

    python -m gankernels.bench host-cost                 # table on stdout
    python -m gankernels.bench host-cost --out DIR       # also DIR/host_cost.{md,json}
    python -m gankernels.bench host-cost --device cuda   # CUDA tensors: the launch path too

Targets (issue 12): a fused 3×3 op adds at most 10 µs to the stock composite's forward
and costs at most 1.3× it forward + backward; a single op adds at most 10 µs forward and
25 µs forward + backward; a converted tiny DCGAN training step costs at most 1.15×.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import gankernels
import gankernels.nn as gnn

# (kind of target, limit): "add" = at most `limit` µs over stock; "ratio" = at most `limit`× stock.
TARGETS: dict[str, tuple[str, float]] = {
    "fused_fwd": ("add", 10.0),
    "fused_fwdbwd": ("ratio", 1.3),
    "single_fwd": ("add", 10.0),
    "single_fwdbwd": ("add", 25.0),
    "module_fwd": ("add", 10.0),
    "step": ("ratio", 1.15),
}


@dataclass
class Case:
    name: str
    target: str  # a key of TARGETS
    stock: Callable[[], object]
    gankernels: Callable[[], object]
    calls: int = 100  # calls per round


@dataclass
class Row:
    name: str
    stock_us: float
    gankernels_us: float
    ratio: float
    added_us: float
    target: str
    met: bool

    def target_text(self) -> str:
        kind, limit = TARGETS[self.target]
        return f"≤ +{limit:g} µs" if kind == "add" else f"≤ {limit:g}×"


def _lrelu_conv(x, w, b):
    return F.leaky_relu(F.conv2d(x, w, b, padding=1), 0.2)


def _fwd_bwd(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        fn().backward(grad)

    return run


def build_cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    """The calls of issue 12's table, on 1×4×4×4 float32 tensors (and the tiny step).
    On ``device="cuda"`` the launches are asynchronous, so the thread's CPU time is
    still the host's cost of issuing each call (kernel launches included)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=g).to(device)
    w = torch.randn(4, 4, 3, 3, generator=g).to(device)
    b = torch.randn(4, generator=g).to(device)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    cases: list[Case] = []

    def fused(name, stock_fn, op, out_shape_like):
        grad = torch.randn(out_shape_like.shape, generator=g).to(device)
        cases.append(Case(f"{name}, forward", "fused_fwd", lambda: stock_fn(x, w, b), lambda: op(x, w, b, act="lrelu")))
        cases.append(
            Case(
                f"{name}, forward + backward",
                "fused_fwdbwd",
                _fwd_bwd(lambda: stock_fn(xg, wg, bg), grad),
                _fwd_bwd(lambda: op(xg, wg, bg, act="lrelu"), grad),
            )
        )

    fused("conv3x3 + lrelu", _lrelu_conv, gankernels.conv3x3, _lrelu_conv(x, w, b))
    pool_stock = lambda x, w, b: F.max_pool2d(_lrelu_conv(x, w, b), 2)  # noqa: E731
    fused("conv3x3_pool (+ lrelu)", pool_stock, gankernels.conv3x3_pool, pool_stock(x, w, b))
    up_stock = lambda x, w, b: _lrelu_conv(F.interpolate(x, scale_factor=2, mode="nearest"), w, b)  # noqa: E731
    fused("up_conv3x3 (+ lrelu)", up_stock, gankernels.up_conv3x3, up_stock(x, w, b))

    def single(name, stock_fn, gk_fn, out_like):
        grad = torch.randn(out_like.shape, generator=g).to(device)
        cases.append(Case(f"{name}, forward", "single_fwd", lambda: stock_fn(x), lambda: gk_fn(x)))
        cases.append(
            Case(
                f"{name}, forward + backward",
                "single_fwdbwd",
                _fwd_bwd(lambda: stock_fn(xg), grad),
                _fwd_bwd(lambda: gk_fn(xg), grad),
            )
        )

    single("max_pool2d 2×2", lambda t: F.max_pool2d(t, 2), lambda t: gankernels.max_pool2d(t, 2), F.max_pool2d(x, 2))
    up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
    single("upsample ×2", up, lambda t: gankernels.upsample_nearest2d(t, 2), up(x))
    ba_stock = lambda t: F.leaky_relu(t + b.view(1, -1, 1, 1), 0.2)  # noqa: E731
    single("bias + lrelu", ba_stock, lambda t: gankernels.bias_act(t, b, act="lrelu"), ba_stock(x))

    torch.manual_seed(0)
    stock_mod = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.2)).to(device)
    gk_mod = gnn.Conv3x3(4, 4, act="lrelu").to(device)
    gk_mod.load_state_dict({"weight": stock_mod[0].weight.detach(), "bias": stock_mod[0].bias.detach()})
    with torch.no_grad():
        cases.append(
            Case("Conv3x3 module vs Sequential(Conv2d, LeakyReLU), forward", "module_fwd", lambda: stock_mod(x), lambda: gk_mod(x))
        )

    if not quick:
        cases.append(_step_case(device))
    return cases


def _step_case(device: str = "cpu") -> Case:
    """A tiny DCGAN training step (8 channels, batch 2, 64×64, fp32), stock vs converted."""
    from gankernels.bench.training_step import GANStep, TrainConfig, build_models, make_batches

    cfg = TrainConfig(batch=2, g_channels=(8, 8, 8, 8, 8), d_channels=(8, 8, 8, 8), autocast=None)
    g0, d0 = (m.to(device) for m in build_models(cfg, seed=0))
    g1, d1 = (m.to(device) for m in build_models(cfg, seed=0))
    gankernels.convert(g1)
    gankernels.convert(d1)
    stock_step, gk_step = GANStep(g0, d0, cfg, device), GANStep(g1, d1, cfg, device)
    real, z = make_batches(cfg, device, 1, seed=1)[0]
    return Case(
        "tiny DCGAN training step (8 ch, batch 2, 64×64)", "step", lambda: stock_step(real, z), lambda: gk_step(real, z), calls=5
    )


def measure(
    cases: list[Case], rounds: int = 7, clock: Callable[[], int] = time.thread_time_ns, sync: Callable[[], None] = lambda: None
) -> list[Row]:
    """Per case, the fastest of ``rounds`` interleaved rounds' per-call times. The clock is
    this thread's CPU time and the minimum is taken, so a busy machine (time spent
    waiting for a core, another process's interruptions) inflates neither side."""
    rows = []
    for case in cases:
        for fn in (case.stock, case.gankernels):  # warm up (first-call caches, lazy imports)
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {"stock": [], "gankernels": []}
        for r in range(rounds):
            # Alternate which goes first, so drift in the machine's state hits both alike.
            order = ("stock", "gankernels") if r % 2 == 0 else ("gankernels", "stock")
            for which in order:
                fn = case.stock if which == "stock" else case.gankernels
                t0 = clock()
                for _ in range(case.calls):
                    fn()
                times[which].append((clock() - t0) / case.calls / 1e3)
                sync()  # outside the timed part: the GPU's queue drains between rounds
        s, k = min(times["stock"]), min(times["gankernels"])
        kind, limit = TARGETS[case.target]
        met = (k - s <= limit) if kind == "add" else (k / s <= limit)
        rows.append(Row(case.name, s, k, k / s, k - s, case.target, met))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [
        "| call (1×4×4×4 fp32) | stock µs | gankernels µs | ratio | added µs | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.target == "step":  # in ms
            s, k, added = f"{r.stock_us / 1e3:.2f} ms", f"{r.gankernels_us / 1e3:.2f} ms", f"{r.added_us / 1e3:+.1f} ms"
        else:
            s, k, added = f"{r.stock_us:.1f}", f"{r.gankernels_us:.1f}", f"{r.added_us:+.1f}"
        lines.append(f"| {r.name} | {s} | {k} | {r.ratio:.2f}× | {added} | {r.target_text()} | {'met' if r.met else 'MISSED'} |")
    return "\n".join(lines)


def environment() -> dict:
    import triton

    return {
        "gankernels": gankernels.__version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gankernels.bench host-cost", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write host_cost.md and host_cost.json here")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="skip the training step")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the tensors live (default: cpu)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = measure(build_cases(args.quick, args.device), rounds=args.rounds, sync=sync)
    table = format_table(rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        cmd = "python -m gankernels.bench host-cost" + (" --quick" if args.quick else "") + f" --device {args.device}"
        env = environment()
        head = f"# Host cost of the eager path ({args.device} tensors)"
        how = f"`{cmd}`, {env['date']}, torch {env['torch']}, triton {env['triton']}, Python {env['python']}"
        md = f"{head}\n\n{how}, 1 thread, per-thread CPU time, fastest of {args.rounds} interleaved rounds.\n\n{table}\n"
        (args.out / "host_cost.md").write_text(md)
        (args.out / "host_cost.json").write_text(
            json.dumps({"command": cmd, "environment": env, "rows": [asdict(r) for r in rows]}, indent=1)
        )
    return 0 if all(r.met for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
