"""The whole DCGAN-style training step of ANCHORS.md, stock against gankernels.

Generator z=128 → 4×4×512, four [Upsample, Conv3x3, LeakyReLU] blocks 512→256→128→64→32,
Conv3x3→3, Tanh; discriminator four [Conv3x3, LeakyReLU, MaxPool2d] blocks
3→64→128→256→512, Linear (``gankernels.models``); batch 128, 64×64, Adam, bf16 autocast,
channels_last, non-saturating loss, one D step and one G step.

Variants: ``stock eager``, ``stock compile`` (``torch.compile`` of G and D), the same
models after ``gankernels.convert`` (``gankernels eager``, ``gankernels compile``), and
the same networks written as forward code (``style="forward_code"`` of
``gankernels.models``: ``F.interpolate``, conv, ``F.leaky_relu``, ``F.max_pool2d`` calls in
a loop) after ``gankernels.convert`` fused their forward (``gankernels eager (forward
code)``, ``gankernels compile (forward code)``), and, on CUDA, the eager steps captured
whole into one CUDA graph and replayed (``stock CUDA graph``, ``gankernels CUDA graph``:
no host cost at all, :class:`GraphedGANStep`). Each starts from the same weights and
sees the same batches; the losses of the first steps must agree with ``stock eager``'s
(bf16 autocast on CUDA: within 5e-2 relative; fp32 on CPU: within 1e-4) before the
variant is timed.

CPU version: batch 4, every channel count divided by 8, fp32 (no autocast: the loss
check is then tight, and CPU bf16 autocast would time a path nobody trains on).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gankernels.bench.timing import TimingConfig, time_ms

# The reason of a CUDA-graph variant on a CPU: it does not exist there, so it is no
# missing contender either (targets.train_verdicts).
NO_CUDA_GRAPHS = "CUDA graphs need a CUDA device"


@dataclass(frozen=True)
class TrainConfig:
    batch: int
    z_dim: int = 128
    g_channels: tuple[int, ...] = (512, 256, 128, 64, 32)
    d_channels: tuple[int, ...] = (64, 128, 256, 512)
    resolution: int = 64
    autocast: Optional[str] = "bf16"  # None: fp32
    check_steps: int = 3
    loss_rtol: float = 5e-2

    @classmethod
    def for_device(cls, device: str, quick: bool = False) -> TrainConfig:
        if device == "cuda":
            return cls(batch=128)
        return cls(
            batch=2 if quick else 4,
            g_channels=(64, 32, 16, 8, 4),
            d_channels=(8, 16, 32, 64),
            autocast=None,
            check_steps=2 if quick else 3,
            loss_rtol=1e-4,
        )

    def describe(self) -> str:
        amp = f"{self.autocast} autocast" if self.autocast else "fp32"
        g = "→".join(map(str, self.g_channels))
        d = "→".join(map(str, (3,) + self.d_channels))
        return f"batch {self.batch}, {self.resolution}×{self.resolution}, G z={self.z_dim} {g}→3, D {d}, Adam, {amp}, channels_last"


@dataclass
class VariantResult:
    name: str
    status: str  # "ok" | "FAIL" | "n/a" | "error"
    step_ms: Optional[float] = None
    peak_mem_mib: Optional[float] = None
    losses: list = field(default_factory=list)  # [(loss_D, loss_G)] per checked step
    max_loss_rel_diff: Optional[float] = None
    reason: str = ""
    converted: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def build_models(cfg: TrainConfig, seed: int = 0, style: str = "sequential") -> tuple[nn.Module, nn.Module]:
    """The stock generator and discriminator (``gankernels.models``), channels_last.

    ``style``: ``"sequential"`` or ``"forward_code"`` (the same networks, hence the same
    weights for one seed, written as forward code).
    """
    from gankernels.models import dcgan_discriminator, dcgan_generator

    torch.manual_seed(seed)
    common = dict(layers="stock", channels_last=True, style=style)
    g = dcgan_generator(z_dim=cfg.z_dim, channels=cfg.g_channels, out_channels=3, **common)
    d = dcgan_discriminator(in_channels=3, channels=cfg.d_channels, resolution=cfg.resolution, **common)
    return g, d


class GANStep:
    """One D step and one G step, non-saturating loss, Adam (lr 2e-4, betas 0.5/0.999)."""

    def __init__(self, g: nn.Module, d: nn.Module, cfg: TrainConfig, device: str, compile: bool = False, capturable: bool = False):
        self.g_params, self.d_params = list(g.parameters()), list(d.parameters())
        if compile:
            torch._dynamo.reset()  # G and D share Sequential.forward: start each variant from a clean cache
        self.g = torch.compile(g) if compile else g
        self.d = torch.compile(d) if compile else d
        # capturable: Adam keeps its step count on the device, so a CUDA graph can hold the update.
        self.opt_g = torch.optim.Adam(self.g_params, lr=2e-4, betas=(0.5, 0.999), capturable=capturable)
        self.opt_d = torch.optim.Adam(self.d_params, lr=2e-4, betas=(0.5, 0.999), capturable=capturable)
        self.device = device
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[cfg.autocast]

    def _autocast(self):
        return torch.autocast(self.device, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def __call__(self, real: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            fake = self.g(z)
            loss_d = F.softplus(-self.d(real)).mean() + F.softplus(self.d(fake.detach())).mean()
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        with self._autocast():
            loss_g = F.softplus(-self.d(fake)).mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return loss_d.detach(), loss_g.detach()


class GraphedGANStep:
    """A :class:`GANStep` (built with ``capturable=True``) captured whole into one CUDA
    graph, PyTorch's whole-network capture recipe: the first ``warmup`` steps run
    eagerly on a side stream (they fill every first-call cache — ``auto``'s timed choice,
    Triton's autotuner, cuDNN's algorithm search, Adam's state — none of which may run
    inside a capture), then one step is captured and every call replays it on static
    input tensors. Each call is one training step, the warm-up ones included."""

    def __init__(self, step: GANStep, warmup: int = 2):
        self.step, self.warmup = step, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.calls = 0

    def __call__(self, real: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                losses = self.step(real, z)
            torch.cuda.current_stream().wait_stream(side)
            return losses
        if self.graph is None:
            self.real, self.z = real.clone(), z.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.losses = self.step(self.real, self.z)  # recorded, not run: the replay below runs it
        self.real.copy_(real)
        self.z.copy_(z)
        self.graph.replay()
        return self.losses


def make_batches(cfg: TrainConfig, device: str, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        real = (torch.rand((cfg.batch, 3, cfg.resolution, cfg.resolution), generator=gen) * 2 - 1).to(device)
        z = torch.randn((cfg.batch, cfg.z_dim), generator=gen).to(device)
        out.append((real.contiguous(memory_format=torch.channels_last), z))
    return out


def convert_models(g: nn.Module, d: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    import gankernels

    g, rg = gankernels.convert(g)
    d, rd = gankernels.convert(d)
    return g, d, f"G: {_fused_count(rg)}, D: {_fused_count(rd)}"


def _fused_count(report) -> str:
    if report.fused:
        return f"{len(report.fused)} runs fused in forward code, {len(report.replaced)} layers replaced"
    return f"{len(report.replaced)} runs fused"


def run_training_step(
    device: str,
    cfg: TrainConfig,
    timing: TimingConfig,
    compile: bool = True,
    gankernels: bool = True,
    seed: int = 0,
    compile_skip: str = "torch.compile not run (--no-compile)",
) -> dict:
    """Check and time every variant; returns a JSON-able dict."""
    models = {style: tuple(m.to(device) for m in build_models(cfg, seed, style)) for style in ("sequential", "forward_code")}
    batches = make_batches(cfg, device, cfg.check_steps, seed + 1)
    timed_batch = batches[0]

    variants: list[tuple[str, bool, bool, str, bool]] = [  # name, gankernels, compile, model style, CUDA graph
        ("stock eager", False, False, "sequential", False),
        ("stock compile", False, True, "sequential", False),
        ("stock CUDA graph", False, False, "sequential", True),
        ("gankernels eager", True, False, "sequential", False),
        ("gankernels compile", True, True, "sequential", False),
        ("gankernels CUDA graph", True, False, "sequential", True),
        ("gankernels eager (forward code)", True, False, "forward_code", False),
        ("gankernels compile (forward code)", True, True, "forward_code", False),
    ]
    results: list[VariantResult] = []
    baseline: Optional[list] = None
    for name, use_gk, use_compile, style, graphed in variants:
        res = VariantResult(name, "ok")
        results.append(res)
        if use_compile and not compile:
            res.status, res.reason = "n/a", compile_skip
            continue
        if graphed and device != "cuda":
            res.status, res.reason = "n/a", NO_CUDA_GRAPHS
            continue
        if use_gk and not gankernels:
            res.status, res.reason = "n/a", "gankernels variants not requested (--backends excludes them)"
            continue
        g, d = (copy.deepcopy(m) for m in models[style])
        if use_gk:
            try:
                g, d, res.converted = convert_models(g, d)
            except NotImplementedError:
                res.status, res.reason = "n/a", "skipped: gankernels.convert is not implemented yet (placeholder)"
                continue
            except Exception as e:  # noqa: BLE001
                res.status, res.reason = "error", f"gankernels.convert failed: {type(e).__name__}: {e}"
                continue
        try:
            step = GANStep(g, d, cfg, device, compile=use_compile, capturable=graphed)
            if graphed:  # warm-up steps, then replays: the checked steps include both
                step = GraphedGANStep(step, warmup=max(1, cfg.check_steps - 1))
            losses = [tuple(float(v) for v in step(*b)) for b in batches]  # also compiles / warms up
        except Exception as e:  # noqa: BLE001
            res.status, res.reason = "error", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            continue
        res.losses = [list(pair) for pair in losses]
        if baseline is None:
            if name != "stock eager":
                res.status, res.reason = "n/a", "no stock eager losses to compare with"
                continue
            baseline = losses
            res.max_loss_rel_diff = 0.0
        else:
            diff = max(
                abs(a - b) / max(1.0, abs(b)) for pa, pb in zip(losses, baseline, strict=True) for a, b in zip(pa, pb, strict=True)
            )
            res.max_loss_rel_diff = diff
            if not diff <= cfg.loss_rtol:
                res.status = "FAIL"
                res.reason = (
                    f"losses differ from stock eager by {diff:.2e} (relative) > {cfg.loss_rtol:.0e} over {cfg.check_steps} steps"
                )
                continue
        run: Callable[[], object] = lambda step=step: step(*timed_batch)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            run()
            run()
            torch.cuda.synchronize()
            res.peak_mem_mib = torch.cuda.max_memory_allocated() / 2**20
        res.step_ms = time_ms(run, device, timing)
        del step, g, d
        if device == "cuda":
            torch.cuda.empty_cache()

    stock = [r for r in results if r.name.startswith("stock") and r.status == "ok" and r.step_ms]
    fast = [r for r in results if r.name.startswith("gankernels") and r.status == "ok" and r.step_ms]
    best_s = min(stock, key=lambda r: r.step_ms) if stock else None
    best_g = min(fast, key=lambda r: r.step_ms) if fast else None
    return {
        "config": {**cfg.__dict__, "description": cfg.describe()},
        "variants": [r.as_dict() for r in results],
        "best_stock": best_s.name if best_s else None,
        "best_gankernels": best_g.name if best_g else None,
        "speedup": (best_s.step_ms / best_g.step_ms) if (best_s and best_g) else None,
    }
