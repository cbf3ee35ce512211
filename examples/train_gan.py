#!/usr/bin/env python
"""Train a DCGAN-style GAN whose layers are gankernels' fused kernels.

    python examples/train_gan.py --name demo                       # built-in digits, CPU or GPU
    python examples/train_gan.py --layers stock --name baseline    # the same nets in torch layers
    python examples/train_gan.py --data ~/faces --resolution 64 --amp bf16 --channels-last
    torchrun --nproc_per_node 4 examples/train_gan.py --name ddp   # DistributedDataParallel

Outputs go to ``runs/<name>/``: ``samples/step_XXXXXX.png`` (a grid from fixed noise every
``--sample-every`` steps), ``losses.png`` and ``losses.csv`` at the end, and
``checkpoint.pt`` every ``--ckpt-every`` steps (``--resume`` continues from it; the
generator and discriminator ``state_dict``s are the same for ``--layers stock`` and
``--layers gankernels``, so a run can switch between them).

On the built-in digits, a digits judge (``digits_judge.py``) scores the generator every
``--eval-every`` steps: recognisable samples, digits covered, Fréchet distance to the real
digits. It logs them, writes ``metrics.csv`` and ``metrics.png`` (beside the loss curve),
and warns when coverage falls (mode collapse).

Every random draw of step ``s`` (the batch of real images, the latent noise) is a pure
function of ``(--seed, rank, s)``, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import gankernels
from gankernels.models import LAYERS, dcgan_discriminator, dcgan_generator

# isort: split
# digits_judge.py sits next to this script (on sys.path when the script runs).
from digits_judge import MIN_SHARE, DigitMetrics, collapse_warning, digits_judge, judge_generator, load_digits

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Checkpoint entries that fix the networks' shapes: a checkpoint is only loadable by a
# run that agrees on all of them (``--layers`` may differ: the state_dicts match).
ARCH_KEYS = ("z_dim", "mapping", "width", "d_width", "d_depth", "mbstd", "resolution", "image_channels")
CHECKPOINT_KEYS = ("G", "D", "opt_G", "opt_D", "scaler_G", "scaler_D", "step", "rng", "args", "history")
NUM_SAMPLES = 64
METRICS_FIELDS = ("step", "recognisable", "coverage", "entropy", "frechet") + tuple(f"count_{d}" for d in range(10))


# ----------------------------------------------------------------------------------
# Arguments.


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\nEvery random")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--name", default="gan", help="run name: outputs go to <runs-dir>/<name>/ (default: %(default)s)")
    p.add_argument("--runs-dir", default="runs", help="parent folder of the run folders (default: %(default)s)")
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="folder of images (any size; resized and centre-cropped). Default: scikit-learn's bundled handwritten digits",
    )
    p.add_argument("--resolution", type=int, default=None, help="image size, 4·2^k (default: 32 for the digits, 64 for --data)")
    p.add_argument(
        "--layers",
        choices=LAYERS,
        default="gankernels",
        help="fused gankernels layers or the same networks in stock torch layers (default: %(default)s)",
    )
    p.add_argument(
        "--forward-code",
        action="store_true",
        help="the same networks written as forward code (gankernels.models style='forward_code'); "
        "with --layers gankernels, gankernels.convert fuses their forward",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run of the same --name (without it, an existing run is an error: --resume continues it)",
    )
    p.add_argument(
        "--backend",
        default=None,
        choices=("auto", "torch", "triton", "cuda"),
        help="gankernels backend (default: GANKERNELS_BACKEND or auto)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="total training steps, one D and one G update each (default: 1500 on CPU, 5000 on GPU)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per step per process (default: 32 on CPU, 128 on GPU)")
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="channels of the widest-resolution layer; others double per halving, up to 512 (default: 8 on CPU, 64 on GPU)",
    )
    p.add_argument(
        "--d-width",
        type=int,
        default=None,
        help="the discriminator's channels at full resolution, doubling per halving (default: --width)",
    )
    p.add_argument(
        "--d-depth",
        type=int,
        default=None,
        help="the discriminator's conv + 2×2 max-pool blocks: 1 to log2(resolution) (default: down to 4×4, "
        "log2(resolution/4)); one more block is a deeper discriminator for the same generator",
    )
    p.add_argument(
        "--mbstd",
        type=int,
        default=0,
        metavar="GROUP",
        help="minibatch standard deviation (StyleGAN): before its last layer the discriminator sees, as one more "
        "feature map, how much each group of GROUP images differs, so a generator that repeats itself is caught "
        "(against mode collapse); 0 = off (default: %(default)s)",
    )
    p.add_argument(
        "--mapping",
        type=int,
        default=0,
        metavar="N",
        help="N fully connected layers (z_dim wide, leaky ReLU) in front of the generator, as StyleGAN's mapping "
        "network: the latent Gaussian is bent before the convolutions, which helps the generator split it into "
        "separate digits; 0 = none (default: %(default)s)",
    )
    p.add_argument("--z-dim", type=int, default=128, help="latent size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate, both networks (default: %(default)s)")
    p.add_argument(
        "--lr-d", type=float, default=None, help="the discriminator's Adam learning rate, if not --lr (two time-scale updates)"
    )
    p.add_argument(
        "--lr-rampdown",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="lower both learning rates to 0 along a half cosine over the last FRACTION of --steps, so the networks "
        "settle instead of ending mid-oscillation; 0 = constant (default: %(default)s)",
    )
    p.add_argument(
        "--betas",
        type=float,
        nargs=2,
        default=(0.5, 0.999),
        metavar=("B1", "B2"),
        help="Adam's betas, both networks (default: 0.5 0.999)",
    )
    p.add_argument(
        "--r1",
        type=float,
        default=0.1,
        metavar="GAMMA",
        help="R1 gradient penalty weight on real images (uses double backward); 0 = off (default: %(default)s)",
    )
    p.add_argument(
        "--r1-every",
        type=int,
        default=1,
        metavar="N",
        help="lazy R1: apply the penalty every N steps, weighted N× (StyleGAN2's lazy regularisation; "
        "saves the double backward on the other steps) (default: %(default)s)",
    )
    p.add_argument(
        "--translate",
        type=int,
        default=0,
        metavar="PIXELS",
        help="differentiable augmentation: every image the discriminator sees, real or generated, is shifted "
        "by a random -PIXELS..PIXELS in x and y (background fill), so a small data set is not memorised; "
        "0 = off (default: %(default)s)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.999,
        metavar="BETA",
        help="sample and judge an exponential moving average of the generator's weights, decay BETA per step "
        "(ramped up over the first steps); 0 = the raw generator (default: %(default)s)",
    )
    p.add_argument(
        "--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast dtype; fp16 adds gradient scaling (default: %(default)s)"
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for images, weights and activations")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="capture the whole training step (both networks, both optimizer updates, the moving average) into "
        "CUDA graphs and replay them: no host cost per layer (CUDA only; not with --compile, --amp fp16 or "
        "several processes)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and noise (default: %(default)s)")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: cuda if available; under torchrun each process takes cuda:LOCAL_RANK)",
    )
    p.add_argument("--sample-every", type=int, default=None, help="save a sample grid every N steps (default: steps/10)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        metavar="N",
        help="score the generator with the digits judge every N steps and at the start and end; 0 = never "
        "(default: steps/15; built-in digits only, skipped with --data)",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=1000,
        metavar="N",
        help="samples per judge evaluation, from fixed noise (default: %(default)s)",
    )
    p.add_argument(
        "--ckpt-every",
        type=int,
        default=None,
        help="save runs/<name>/checkpoint.pt every N steps (default: steps/5), and always at the end",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CKPT",
        help="continue from CKPT (default: runs/<name>/checkpoint.pt)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--param-checksum",
        default=None,
        metavar="PATH",
        help="(debugging) each process writes the SHA-256 of its parameters to PATH, '{rank}' replaced by its rank",
    )
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "width", "d_width", "d_depth", "z_dim", "sample_every", "ckpt_every", "r1_every"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {v}")
    if args.eval_every is not None and args.eval_every < 0:
        p.error(f"--eval-every: must be >= 0 (0 = never), got {args.eval_every}")
    if args.eval_samples < 2:
        p.error(f"--eval-samples: must be >= 2 (a Fréchet distance needs a covariance), got {args.eval_samples}")
    if args.r1 < 0:
        p.error(f"--r1: must be >= 0, got {args.r1}")
    if args.lr <= 0 or (args.lr_d is not None and args.lr_d <= 0):
        p.error(f"--lr, --lr-d: must be > 0, got {args.lr}, {args.lr_d}")
    if not 0 <= args.lr_rampdown <= 1:
        p.error(f"--lr-rampdown: a fraction of the steps in [0, 1], got {args.lr_rampdown}")
    if not all(0 <= b < 1 for b in args.betas):
        p.error(f"--betas: each must be in [0, 1), got {args.betas}")
    if args.mbstd < 0 or args.mbstd == 1:
        p.error(f"--mbstd: a group size >= 2 (0 = off), got {args.mbstd}")
    if args.mapping < 0:
        p.error(f"--mapping: must be >= 0 (0 = none), got {args.mapping}")
    if (args.mbstd or args.mapping) and args.forward_code:
        p.error("--mbstd, --mapping: not available with --forward-code (they add layers to the Sequential networks)")
    if args.translate < 0:
        p.error(f"--translate: must be >= 0 (0 = off), got {args.translate}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema: must be in [0, 1) (0 = off), got {args.ema}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution & (args.resolution - 1)):
        p.error(f"--resolution: must be a power of two >= 8 (4·2^k), got {args.resolution}")
    if args.d_depth is not None and args.resolution is not None and (why := d_depth_problem(args.d_depth, args.resolution)):
        p.error(why)
    return args


def d_depth_problem(d_depth: int, resolution: int) -> Optional[str]:
    """Why ``d_depth`` discriminator blocks cannot run at ``resolution`` (each halves it), or
    None. Checked at parsing when --resolution is given, else once the default is filled."""
    if 2**d_depth > resolution:
        return f"--d-depth: {d_depth} blocks halve {resolution}² below 1×1; at most {int(math.log2(resolution))}"
    return None


def fill_defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Defaults that depend on the device: a few minutes of training on 2 CPU cores,
    a longer, wider, larger-batch run on a GPU."""
    gpu = device.type == "cuda"
    if args.resolution is None:
        args.resolution = 32 if args.data is None else 64
    if args.steps is None:
        args.steps = 5000 if gpu else 1500
    if args.batch_size is None:
        args.batch_size = 128 if gpu else 32
    if args.width is None:
        args.width = 64 if gpu else 8
    if args.d_width is None:
        args.d_width = args.width
    if args.d_depth is None:
        args.d_depth = int(math.log2(args.resolution // 4))
    elif why := d_depth_problem(args.d_depth, args.resolution):
        raise SystemExit(why)
    if args.lr_d is None:
        args.lr_d = args.lr
    if args.sample_every is None:
        args.sample_every = max(1, args.steps // 10)
    if args.ckpt_every is None:
        args.ckpt_every = max(1, args.steps // 5)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 15)
    return args


def channel_plan(
    resolution: int, width: int, d_width: Optional[int] = None, d_depth: Optional[int] = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(generator channels, discriminator channels) for a ``resolution``² image: the
    generator doubles 4×4 up to ``resolution``, the discriminator halves it ``d_depth``
    times (default: back to 4×4); ``width`` (``d_width``) channels at full resolution,
    ×2 per halving, capped at 512."""
    blocks = int(math.log2(resolution // 4))
    d_width = width if d_width is None else d_width
    d_depth = blocks if d_depth is None else d_depth
    g = tuple(min(width * 2 ** (blocks - i), 512) for i in range(blocks + 1))
    d = tuple(min(d_width * 2**i, 512) for i in range(d_depth))
    return g, d


# ----------------------------------------------------------------------------------
# Processes.


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device_arg: Optional[str]) -> Dist:
    """One process, or one of ``torchrun``'s: NCCL between GPUs, gloo between CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


# ----------------------------------------------------------------------------------
# Data.


def load_folder(folder: str, resolution: int, verbose: bool = True) -> torch.Tensor:
    """Every readable image under ``folder`` (recursively), RGB, resized so the short
    side is ``resolution`` and centre-cropped to ``resolution``², in [-1, 1]."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SystemExit(f"--data: {folder} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images, skipped = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im = ImageOps.fit(
                    im.convert("RGB"), (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5)
                )
                images.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            skipped.append(path)
    if skipped and verbose:
        shown = ", ".join(str(p.relative_to(root)) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(f"--data: skipped {len(skipped)} unreadable file(s) of {len(files)}: {shown}", file=sys.stderr)
    if not images:
        raise SystemExit(f"--data: no readable images in {root} ({len(files)} file(s), {len(skipped)} unreadable)")
    x = torch.stack(images).permute(0, 3, 1, 2).float()  # [N, 3, R, R]
    return x.div_(127.5).sub_(1.0).contiguous()


class ShardedBatches:
    """Batch ``s`` of process ``rank``: a pure function of (seed, rank, s).

    Each epoch is a seeded permutation of the whole data set; process ``r`` of ``w``
    takes every ``w``-th index from ``r`` (DistributedSampler's rule, ``drop_last``: every
    shard has ``n // w`` images, so all processes change epoch at the same step), and its
    batches are consecutive slices of that shard; a partial last batch is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.shard_size = shard = n // world
        self.per_epoch = shard // batch_size
        if self.per_epoch == 0:
            raise SystemExit(
                f"--batch-size: {batch_size} is larger than this process's share of the data ({shard} of {n} images "
                f"over {world} process(es)); lower --batch-size or add images"
            )
        self._epoch, self._shard = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, 0x5EED, epoch))
            self._shard = torch.randperm(self.n, generator=g)[self.rank :: self.world][: self.shard_size]
            self._epoch = epoch
        return self._shard[i * self.batch_size : (i + 1) * self.batch_size]


def _mix(*values: int) -> int:
    """A 63-bit seed from a few ints (distinct inputs give unrelated streams)."""
    h = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def latent(batch: int, z_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """Standard-normal latents from a dedicated generator (the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, z_dim, generator=g).to(device)


# ----------------------------------------------------------------------------------
# Images and plots.


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, pad: int = 2) -> None:
    """Save ``images`` ([N, C, H, W] in [-1, 1], C = 1 or 3) as one PNG grid; small
    images are enlarged (nearest) so a digit stays visible."""
    from PIL import Image

    x = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    scale = max(1, 64 // h)
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[k]
    arr = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L" if c == 1 else "RGB").save(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_losses(ax, history: list[list[float]]) -> None:
    """Both losses, raw (faint) and smoothed, on ``ax``."""
    steps = [h[0] for h in history]
    # Bias-corrected exponential moving average over about 1/20 of the run (≤ 100 steps).
    beta = 1.0 - 1.0 / max(1, min(100, len(history) // 20))
    for col, label, color in ((1, "discriminator", "tab:blue"), (2, "generator", "tab:orange")):
        raw = [h[col] for h in history]
        ema, smooth = 0.0, []
        for t, v in enumerate(raw, 1):
            ema = beta * ema + (1 - beta) * v
            smooth.append(ema / (1 - beta**t))
        ax.plot(steps, raw, color=color, alpha=0.2, linewidth=0.7)
        ax.plot(steps, smooth, color=color, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("non-saturating loss")
    ax.legend()
    ax.grid(alpha=0.3)


def save_losses(history: list[list[float]], folder: Path, title: str) -> None:
    """``losses.csv`` (step, loss_D, loss_G) and ``losses.png`` (raw and smoothed)."""
    plt = _pyplot()
    with open(folder / "losses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss_D", "loss_G"])
        w.writerows(history)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    _plot_losses(ax, history)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "losses.png")
    plt.close(fig)


def metrics_row(step: int, m: DigitMetrics) -> list[float]:
    """One ``metrics.csv`` row (the columns of :data:`METRICS_FIELDS`)."""
    return [step, round(m.recognisable, 4), m.coverage, round(m.entropy, 4), round(m.frechet, 4), *m.class_counts]


def save_metrics(history: list[list[float]], judged: list[tuple[int, DigitMetrics]], folder: Path, title: str) -> None:
    """``metrics.csv`` (one row per judge evaluation) and ``metrics.png``: the loss curve
    beside recognisable % and coverage, and the Fréchet distance."""
    plt = _pyplot()
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(METRICS_FIELDS)
        w.writerows(metrics_row(step, m) for step, m in judged)
    steps = [step for step, _ in judged]
    fig, (ax_loss, ax_rec, ax_fd) = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    _plot_losses(ax_loss, history)
    ax_loss.set_title("losses", fontsize=9)
    ax_rec.plot(steps, [100 * m.recognisable for _, m in judged], "o-", color="tab:green", markersize=3, label="recognisable %")
    ax_rec.set_ylim(0, 100)
    ax_rec.set_xlabel("step")
    ax_rec.set_ylabel("recognisable samples, %", color="tab:green")
    ax_rec.grid(alpha=0.3)
    ax_cov = ax_rec.twinx()
    ax_cov.step(steps, [m.coverage for _, m in judged], where="post", color="tab:purple", label="digits covered")
    ax_cov.set_ylim(0, 10.5)
    ax_cov.set_yticks(range(0, 11, 2))
    ax_cov.set_ylabel("digits covered (of 10)", color="tab:purple")
    ax_rec.set_title("digits judge: quality and coverage", fontsize=9)
    ax_fd.plot(steps, [max(m.frechet, 1e-3) for _, m in judged], "o-", color="tab:red", markersize=3)
    ax_fd.set_yscale("log")
    ax_fd.set_xlabel("step")
    ax_fd.set_ylabel("Fréchet distance to real digits")
    ax_fd.set_title("Fréchet distance (classifier features, lower is better)", fontsize=9)
    ax_fd.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "metrics.png")
    plt.close(fig)


# ----------------------------------------------------------------------------------
# Checkpoints.


def _unwrap(m: nn.Module) -> nn.Module:
    """The plain module under ``torch.compile`` and ``DistributedDataParallel`` wrappers."""
    while True:
        if hasattr(m, "_orig_mod"):
            m = m._orig_mod
        elif isinstance(m, nn.parallel.DistributedDataParallel):
            m = m.module
        else:
            return m


def _arch(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ARCH_KEYS}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Load and validate ``path`` (``weights_only=True``); any problem is a SystemExit
    that names the file and what is wrong with it."""
    if not path.is_file():
        raise SystemExit(f"--resume: {path} does not exist (train once without --resume, or pass the checkpoint's path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise SystemExit(f"--resume: {path} is not a readable checkpoint (corrupt or truncated?): {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"--resume: {path} is not a train_gan.py checkpoint (expected keys {CHECKPOINT_KEYS}, found {have})")
    saved = dict(ckpt["args"])
    # Checkpoints from before --d-width/--d-depth had the default discriminator.
    saved.setdefault("d_width", saved.get("width"))
    saved.setdefault("d_depth", int(math.log2(saved["resolution"] // 4)) if saved.get("resolution") else None)
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, this run {getattr(args, k)!r}" for k in ARCH_KEYS if saved.get(k) != getattr(args, k)
    ]
    if diff:
        raise SystemExit(f"--resume: {path} was trained with different networks or data ({'; '.join(diff)}); pass the same options")
    return ckpt


def _load_states(path: Path, ckpt: dict[str, Any], pairs: list[tuple[str, Any]]) -> None:
    for key, obj in pairs:
        try:
            obj.load_state_dict(ckpt[key])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise SystemExit(f"--resume: {path}: entry {key!r} does not fit this run: {e}") from e


def with_mapping(G: nn.Sequential, z_dim: int, layers: int, fused: bool) -> nn.Sequential:
    """``G`` (a :func:`dcgan_generator` Sequential) behind ``layers`` × [Linear(z_dim,
    z_dim), leaky ReLU 0.2]: gankernels' ``BiasAct`` for the activation when ``fused``,
    ``nn.LeakyReLU`` otherwise (the same function; the same ``state_dict`` keys).
    Initialised as the builders do: He-normal weights, zero biases."""
    mods: list[nn.Module] = []
    for _ in range(layers):
        fc = nn.Linear(z_dim, z_dim)
        with torch.no_grad():
            fc.weight.normal_(0.0, math.sqrt(2.0 / (1.0 + 0.2**2) / z_dim))
            fc.bias.zero_()
        mods += [fc, gankernels.nn.BiasAct(None, "lrelu", 0.2) if fused else nn.LeakyReLU(0.2)]
    device = next(G.parameters()).device
    return nn.Sequential(*mods, *G.children()).to(device)


class MinibatchStddev(nn.Module):
    """StyleGAN's minibatch standard deviation: ``[N, C, H, W] -> [N, C + 1, H, W]``,
    the extra map of each image being the standard deviation of every feature over its
    group of ``group_size`` consecutive images, averaged over features and positions.

    A generator that gives every latent the same image makes that number small, which
    the discriminator learns to hold against it. Groups are consecutive, so a batch of
    reals followed by fakes (each a multiple of ``group_size``) never mixes the two.
    """

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        if n % g:
            raise ValueError(f"MinibatchStddev: batch {n} is not a multiple of the group size {g}")
        y = x.float().reshape(n // g, g, c, h, w)
        std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [N/g]
        extra = std.to(x.dtype).repeat_interleave(g).view(n, 1, 1, 1).expand(n, 1, h, w)
        return torch.cat([x, extra], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


def with_minibatch_stddev(D: nn.Sequential, group_size: int) -> nn.Sequential:
    """``D`` (a :func:`dcgan_discriminator` Sequential, either layer kind) with a
    :class:`MinibatchStddev` before its ``Flatten``; its last ``Linear`` is rebuilt for
    the extra input map (He-normal weights, zero bias, as the builder initialises)."""
    *blocks, flatten, fc = D.children()
    if not isinstance(flatten, nn.Flatten) or not isinstance(fc, nn.Linear):
        raise TypeError("with_minibatch_stddev: expected a dcgan_discriminator Sequential ending in Flatten, Linear")
    channels = next(m for m in reversed(blocks) if hasattr(m, "weight")).weight.shape[0]
    side2 = fc.in_features // channels
    new_fc = nn.Linear((channels + 1) * side2, 1).to(fc.weight.device)
    with torch.no_grad():
        new_fc.weight.normal_(0.0, math.sqrt(2.0 / (1.0 + 0.2**2) / new_fc.in_features))  # the builder's leaky-ReLU He init
        new_fc.bias.zero_()
    return nn.Sequential(*blocks, MinibatchStddev(group_size), flatten, new_fc)


def lr_factor(step: int, steps: int, rampdown: float) -> float:
    """The learning-rate multiplier at ``step`` (0-based) of ``steps``: 1, then a half
    cosine from 1 to 0 over the last ``rampdown`` of the steps (a function of the step
    alone, so a resumed run follows the same schedule)."""
    start = steps * (1.0 - rampdown)
    if rampdown <= 0 or step < start:
        return 1.0
    t = (step - start) / (steps - start)  # [0, 1): every step still learns a little
    return 0.5 * (1.0 + math.cos(math.pi * t))


def random_shifts(n: int, pixels: int, seed: int, device: torch.device) -> torch.Tensor:
    """``[2, n, 2]`` integer (dy, dx) shifts, uniform in ``-pixels..pixels``, from ``seed``
    (a dedicated generator: the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-pixels, pixels + 1, (2, n, 2), generator=g).to(device)


def translate(images: torch.Tensor, shifts: torch.Tensor, fill: float = -1.0, pad: Optional[int] = None) -> torch.Tensor:
    """Shift image ``i`` of ``images`` ([N, C, H, W]) by ``shifts[i]`` = (dy, dx) pixels,
    filling the uncovered border with ``fill`` (the digits' background, -1).

    DiffAugment's translation: an index gather, so gradients flow to ``images`` (the
    generator learns through it) and double backward works (R1 on shifted reals).
    ``pad``: a bound on ``|shifts|`` known in advance (the ``--translate`` range); without
    it the bound is read from ``shifts``, a host synchronisation (and no CUDA graph can
    hold it). Any bound gives the same result.
    """
    n, _, h, w = images.shape
    p = pad if pad is not None else (int(shifts.abs().max()) if shifts.numel() else 0)
    if p == 0:
        return images
    padded = F.pad(images, (p, p, p, p), value=fill)
    rows = torch.arange(h, device=images.device) + p - shifts[:, 0, None]  # [N, H]: source row of each output row
    cols = torch.arange(w, device=images.device) + p - shifts[:, 1, None]  # [N, W]
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(images))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else torch.contiguous_format
    )


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, beta: float | torch.Tensor) -> None:
    """``average ← beta · average + (1 − beta) · model``, parameter by parameter; buffers
    are copied. ``beta`` may be a 0-dim device tensor (a captured step reads it there)."""
    for a, p in zip(average.parameters(), model.parameters(), strict=True):
        a.lerp_(p.detach(), 1.0 - beta)
    for a, b in zip(average.buffers(), model.buffers(), strict=True):
        a.copy_(b)


def params_checksum(*models: nn.Module) -> str:
    """SHA-256 over every parameter's bytes (to compare processes bit for bit)."""
    h = hashlib.sha256()
    for m in models:
        for name, p in _unwrap(m).named_parameters():
            h.update(name.encode())
            h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------
# Training.


class TrainStep:
    """The body of the training loop: one discriminator step (reals and detached fakes in
    one batch, R1 on the reals when ``penalise``), one generator step through the updated
    discriminator, then the generator's moving average. Returns the step's
    non-saturating D loss and G loss as device tensors (no host synchronisation, so the
    step can be captured whole into a CUDA graph: :class:`CapturedTrainStep`)."""

    def __init__(
        self,
        args: argparse.Namespace,
        nets: tuple[nn.Module, nn.Module, nn.Module, nn.Module],  # G, D and what runs them (DDP / compiled)
        optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],  # G's, D's
        scalers: tuple[torch.amp.GradScaler, torch.amp.GradScaler],  # G's, D's
        G_ema: Optional[nn.Module],
        autocast: torch.autocast,
    ) -> None:
        self.G, self.D, self.G_net, self.D_net = nets
        self.opt_G, self.opt_D = optimizers
        self.scaler_G, self.scaler_D = scalers
        self.G_ema, self.autocast = G_ema, autocast
        self.batch, self.r1, self.r1_every, self.translate = args.batch_size, args.r1, args.r1_every, args.translate

    def __call__(
        self,
        real: torch.Tensor,
        z: torch.Tensor,
        shifts: Optional[torch.Tensor],
        penalise: bool,
        ema_beta: float | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, D, D_net = self.batch, self.D, self.D_net
        # Discriminator: real and (detached) fake in one batch, one forward.
        D.requires_grad_(True)
        with self.autocast:
            fake = self.G_net(z)
        real.requires_grad_(penalise)
        with self.autocast:
            seen = torch.cat([real, fake.detach()])
            if shifts is not None:
                seen = translate(seen, shifts[0], pad=self.translate)
            logits = D_net(seen).float()
            loss_d = loss_ns = F.softplus(logits[B:]).mean() + F.softplus(-logits[:B]).mean()
        if penalise:
            # R1 = E ||∇_x D(x)||² on reals; the gradient is taken of the scaled output
            # under fp16 (as PyTorch's AMP gradient-penalty recipe does) and unscaled.
            out = logits[:B].sum()
            (grad,) = torch.autograd.grad(self.scaler_D.scale(out), real, create_graph=True)
            # scale(1) is the current scale as a device tensor: no host sync, unlike get_scale().
            grad = grad.float() / self.scaler_D.scale(torch.ones((), device=real.device))
            loss_d = loss_d + (self.r1 * self.r1_every / 2) * grad.square().sum(dim=(1, 2, 3)).mean()
        self.opt_D.zero_grad(set_to_none=True)
        self.scaler_D.scale(loss_d).backward()
        self.scaler_D.step(self.opt_D)
        self.scaler_D.update()

        # Generator: non-saturating loss through the updated D; D's weights need no
        # gradient (and under DDP no all-reduce) here.
        D.requires_grad_(False)
        D_ddp = getattr(D_net, "_orig_mod", D_net)
        no_sync = D_ddp.no_sync() if isinstance(D_ddp, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
        with no_sync:
            with self.autocast:
                seen = fake if shifts is None else translate(fake, shifts[1, B:], pad=self.translate)
                loss_g = F.softplus(-D_net(seen).float()).mean()
            self.opt_G.zero_grad(set_to_none=True)
            self.scaler_G.scale(loss_g).backward()
        self.scaler_G.step(self.opt_G)
        self.scaler_G.update()
        if self.G_ema is not None:
            ema_update(self.G_ema, self.G, ema_beta)
        return loss_ns.detach(), loss_g.detach()


def cuda_graph_refusals(args: argparse.Namespace, device: torch.device, world: int) -> list[str]:
    """Every reason ``--cuda-graphs`` cannot capture this run (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"--device {device}: CUDA graphs need a CUDA device")
    if args.compile:
        reasons.append(
            "--compile: torch.compile brings its own CUDA graphs (mode='reduce-overhead'); "
            "a hand-captured step around compiled code is not supported here: pass one of the two"
        )
    if args.amp == "fp16":
        reasons.append(
            "--amp fp16: the gradient scaler reads its inf/NaN check on the host every step, a synchronisation "
            "that a capture forbids: use --amp bf16 (no scaling) or none"
        )
    if world > 1:
        reasons.append(f"{world} processes: DistributedDataParallel's all-reduce is not captured here; run one process")
    return reasons


class CapturedTrainStep:
    """A :class:`TrainStep` captured into CUDA graphs and replayed: the whole step —
    both networks' forward and backward, both Adam updates, the moving average — is
    one graph launch, with no host cost per layer.

    PyTorch's whole-network capture recipe: each kind of step (with R1, without:
    lazy R1 makes two) first runs ``warmup`` times eagerly on a side stream, which fills
    every first-call cache that must not run inside a capture (``auto``'s timed backend
    choice, Triton's autotuner, cuDNN's algorithm search, Adam's state); its next call
    captures it, and every later one replays it. The inputs of every step are copied
    into static tensors the graphs read; the step-dependent scalars (the learning rates,
    the average's decay) live in device tensors the host refills before each replay.
    The optimizers must be capturable, with tensor learning rates (:func:`set_capturable`).
    """

    def __init__(self, step: TrainStep, real: torch.Tensor, z: torch.Tensor, shifts: Optional[torch.Tensor], warmup: int = 3):
        self.step, self.warmup = step, warmup
        self.real = torch.empty_like(real)  # keeps real's memory format
        self.z = torch.empty_like(z)
        self.shifts = None if shifts is None else torch.empty_like(shifts)
        self.ema_beta = torch.zeros((), device=real.device)
        self.runs: dict[bool, int] = {False: 0, True: 0}  # eager warm-up runs per kind
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}

    def __call__(
        self, real: torch.Tensor, z: torch.Tensor, shifts: Optional[torch.Tensor], penalise: bool, ema_beta: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # self.real requires grad when R1 was captured last
            self.real.copy_(real)
            self.z.copy_(z)
            if shifts is not None:
                self.shifts.copy_(shifts)
            self.ema_beta.fill_(ema_beta)
        if penalise in self.graphs:
            graph, losses = self.graphs[penalise]
            graph.replay()
            return losses
        args = (self.real, self.z, self.shifts, penalise, self.ema_beta)
        if self.runs[penalise] < self.warmup:
            self.runs[penalise] += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                losses = self.step(*args)
            torch.cuda.current_stream().wait_stream(side)
            return losses
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            losses = self.step(*args)  # recorded, not run: the replay runs it
        self.graphs[penalise] = (graph, losses)
        graph.replay()
        return losses


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Switch an Adam optimizer (and its loaded state) between the eager form (float
    learning rate, step counts on the host) and the capturable one (learning rate and
    step counts in device tensors, so a CUDA graph can hold the update and the host can
    change the rate between replays). Used after construction and after loading a
    checkpoint written in the other form."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if capturable else lr
        group["capturable"] = capturable
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                step = state["step"]
                state["step"] = step.to(p.device if capturable else "cpu", torch.float32)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate to ``lr``, in place where it is a device tensor (a
    captured step reads it there)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.05)


@contextlib.contextmanager
def _maybe_backend(name: Optional[str]) -> Iterator[None]:
    if name is None:
        yield
    else:
        with gankernels.use_backend(name):
            yield


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by ``args`` (see :func:`parse_args`); returns a summary
    dict (``steps``, ``seconds``, ``images_per_s``, ``loss_D``, ``loss_G``, ``history``,
    ``run_dir``, ``graphs``: the CUDA graphs captured)."""
    d = setup_distributed(args.device)
    try:
        with _maybe_backend(args.backend):
            return _train(args, d)
    finally:
        if d.enabled:
            dist.destroy_process_group()


def _train(args: argparse.Namespace, d: Dist) -> dict[str, Any]:
    if args.data is not None and args.eval_every and d.main:
        print("--eval-every: the digits judge scores only the built-in digits; skipped with --data", file=sys.stderr)
    fill_defaults(args, d.device)
    refusals = cuda_graph_refusals(args, d.device, d.world) if args.cuda_graphs else []
    if refusals:
        raise SystemExit("--cuda-graphs: cannot capture this run:\n" + "\n".join(f"  - {r}" for r in refusals))
    judging = args.data is None and args.eval_every > 0
    run_dir = Path(args.runs_dir) / args.name
    ckpt_path = run_dir / "checkpoint.pt"
    if args.resume is None and not args.overwrite and (ckpt_path.exists() or (run_dir / "samples").exists()):
        raise SystemExit(
            f"--name {args.name}: {run_dir} holds an earlier run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --name"
        )
    data = load_digits(args.resolution) if args.data is None else load_folder(args.data, args.resolution, verbose=d.main)
    args.image_channels = data.shape[1]
    # Keep the data on the device when it is small (the digits are 7 MB).
    if data.numel() * data.element_size() < 2**30:
        data = data.to(d.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    batches = ShardedBatches(len(data), args.batch_size, args.seed, d.rank, d.world)

    # Same seed on every process: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(args.seed)
    g_ch, d_ch = channel_plan(args.resolution, args.width, args.d_width, args.d_depth)
    style = dict(layers="stock", style="forward_code") if args.forward_code else dict(layers=args.layers)
    G = dcgan_generator(args.z_dim, g_ch, args.image_channels, channels_last=args.channels_last, **style).to(d.device)
    D = dcgan_discriminator(args.image_channels, d_ch, args.resolution, channels_last=args.channels_last, **style).to(d.device)
    if args.mapping:
        G = with_mapping(G, args.z_dim, args.mapping, fused=args.layers == "gankernels").to(d.device)
    if args.mbstd:
        if args.batch_size % args.mbstd:
            raise SystemExit(f"--mbstd: the group size {args.mbstd} must divide --batch-size {args.batch_size}")
        D = with_minibatch_stddev(D, args.mbstd).to(d.device)
    if args.forward_code and args.layers == "gankernels":
        G, D = gankernels.convert(G)[0], gankernels.convert(D)[0]  # fuses the forward code in place
    if args.backend not in (None, "auto") and args.layers == "gankernels":
        # Fail now, with every reason, rather than with a traceback at the first step.
        try:
            with torch.no_grad():
                D(G(torch.zeros(1, args.z_dim, device=d.device)))
        except gankernels.BackendUnavailable as e:
            raise SystemExit(f"--backend {args.backend}: cannot run these networks on {d.device.type} here:\n{e}") from None
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=tuple(args.betas))
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=tuple(args.betas))
    if args.cuda_graphs:
        for opt in (opt_G, opt_D):
            set_capturable(opt, True)
    amp_dtype = AMP_DTYPES[args.amp]
    scaler_G = torch.amp.GradScaler(d.device.type, enabled=args.amp == "fp16")
    scaler_D = torch.amp.GradScaler(d.device.type, enabled=args.amp == "fp16")

    # The averaged generator: GAN weights oscillate around a good solution, and their
    # running mean samples cleaner images than any single iterate (as StyleGAN's G_ema).
    G_ema = copy.deepcopy(G).requires_grad_(False) if args.ema > 0 else None

    start, history = 0, []
    judged: list[tuple[int, DigitMetrics]] = []  # (step, the judge's scores), rank 0 only
    if args.resume is not None:
        path = ckpt_path if args.resume == "auto" else Path(args.resume)
        ckpt = load_checkpoint(path, args)
        _load_states(
            path, ckpt, [("G", G), ("D", D), ("opt_G", opt_G), ("opt_D", opt_D), ("scaler_G", scaler_G), ("scaler_D", scaler_D)]
        )
        for opt in (opt_G, opt_D):  # the checkpoint may hold the other form (see set_capturable)
            set_capturable(opt, args.cuda_graphs)
        start, history = int(ckpt["step"]), [list(h) for h in ckpt["history"]]
        judged = [_metrics_from_state(entry) for entry in ckpt.get("metrics", [])]
        if G_ema is not None:
            # A checkpoint written with --ema 0 has no average yet: start it from G.
            _load_states(path, {"G_ema": ckpt.get("G_ema") or ckpt["G"]}, [("G_ema", G_ema)])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if d.device.type == "cuda" and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        if d.main:
            print(f"resumed from {path} at step {start}", file=sys.stderr)
        if start >= args.steps:
            raise SystemExit(f"--resume: {path} is already at step {start} >= --steps {args.steps}; raise --steps to train further")

    G_eval = G_ema if G_ema is not None else G  # what samples and the judge see
    G_net: nn.Module = G
    D_net: nn.Module = D
    if d.enabled:
        G_net = nn.parallel.DistributedDataParallel(G, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        D_net = nn.parallel.DistributedDataParallel(D, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if args.compile:
        G_net = torch.compile(G_net)
        if args.r1 > 0:
            # torch.compile'd graphs do not support double backward, which R1 needs.
            if d.main:
                print("--compile: the discriminator runs eagerly because --r1 needs double backward", file=sys.stderr)
        else:
            D_net = torch.compile(D_net)

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        n_g = sum(p.numel() for p in G.parameters())
        mapping = f"mapping {args.mapping}×{args.z_dim} + " if args.mapping else ""
        n_d = sum(p.numel() for p in D.parameters())
        print(
            f"train_gan: {args.layers} layers, G {mapping}{g_ch} ({n_g / 1e6:.2f} M params), D {d_ch} ({n_d / 1e6:.2f} M), "
            f"{len(data)} images {args.image_channels}×{args.resolution}², batch {args.batch_size}×{d.world}, "
            f"{d.device}, amp {args.amp}{', channels_last' if args.channels_last else ''}{', compile' if args.compile else ''}"
            f", lr {args.lr}{f' (D {args.lr_d})' if args.lr_d != args.lr else ''}, betas {tuple(args.betas)}"
            f"{f', r1 {args.r1}' if args.r1 else ''}{f' every {args.r1_every} steps' if args.r1 and args.r1_every > 1 else ''}"
            f"{f', translate ±{args.translate}' if args.translate else ''}{f', ema {args.ema}' if args.ema else ''} -> {run_dir}/",
            file=sys.stderr,
        )
    fixed_z = latent(NUM_SAMPLES, args.z_dim, _mix(args.seed, 0xF1ED), d.device)
    judge = None
    if judging and d.main:
        t = time.perf_counter()
        judge = digits_judge()
        real = judge.score(load_digits(32)[judge.heldout_index])
        print(
            f"digits judge: classifier trained in {time.perf_counter() - t:.1f} s, held-out accuracy "
            f"{100 * judge.heldout_accuracy:.1f}%; held-out real digits score: {real.line()}",
            file=sys.stderr,
        )
    judge_seconds = 0.0  # time spent judging, left out of images/s
    # A capture must not see autocast's weight-cast cache (torch.cuda.graphs' AMP note).
    autocast = torch.autocast(
        d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None, cache_enabled=not args.cuda_graphs
    )
    B = args.batch_size
    log_every = 10
    pending: list[torch.Tensor] = []  # per-step [loss_D, loss_G], read back every log_every steps
    bar = _progress(args.steps, start, d.main and not args.no_progress)
    t0 = time.perf_counter()

    def log(line: str, err: bool = False) -> None:
        stream = sys.stderr if err else sys.stdout
        if bar is not None:
            bar.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)

    def evaluate(step: int) -> None:
        nonlocal judge_seconds
        t = time.perf_counter()
        # The same latents at every evaluation, so the curve follows the generator, not the noise.
        m = judge_generator(G_eval, args.z_dim, args.eval_samples, seed=_mix(args.seed, 0xE7A1), device=d.device, judge=judge)
        judged.append((step, m))
        log(f"step {step}/{args.steps}: {m.line()}")
        warning = collapse_warning(judged)
        if warning:
            log(f"WARNING: {warning}", err=True)
        judge_seconds += time.perf_counter() - t

    def sample(step: int) -> None:
        with torch.no_grad(), autocast:
            save_grid(G_eval(fixed_z), run_dir / "samples" / f"step_{step:06d}.png")

    def flush() -> None:
        if not pending:
            return
        losses = torch.stack(pending).float()
        if d.enabled:
            dist.all_reduce(losses)
            losses /= d.world
        first = int(history[-1][0]) + 1 if history else start + 1
        history.extend([first + i, ld, lg] for i, (ld, lg) in enumerate(losses.tolist()))
        pending.clear()

    def checkpoint(step: int) -> None:
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if d.device.type == "cuda" else []}
        state = {
            "G": G.state_dict(),
            "G_ema": G_ema.state_dict() if G_ema is not None else None,
            "D": D.state_dict(),
            "opt_G": opt_G.state_dict(),
            "opt_D": opt_D.state_dict(),
            "scaler_G": scaler_G.state_dict(),
            "scaler_D": scaler_D.state_dict(),
            "step": step,
            "rng": rng,
            "args": {k: v for k, v in vars(args).items()},
            "history": history,
            "metrics": [{"step": step, **asdict(m)} for step, m in judged],
        }
        save_checkpoint(ckpt_path, state)

    train_step: TrainStep | CapturedTrainStep = TrainStep(
        args, (G, D, G_net, D_net), (opt_G, opt_D), (scaler_G, scaler_D), G_ema, autocast
    )
    if args.cuda_graphs:
        real_shape = (B, args.image_channels, args.resolution, args.resolution)
        train_step = CapturedTrainStep(
            train_step,
            real=torch.empty(real_shape, dtype=data.dtype, device=d.device).contiguous(memory_format=memory_format),
            z=torch.empty(B, args.z_dim, device=d.device),
            shifts=torch.empty((2, 2 * B, 2), dtype=torch.long, device=d.device) if args.translate else None,
        )
    if judge is not None and start == 0:
        evaluate(0)  # the untrained generator: where the curves start
    for step in range(start, args.steps):
        real = data[batches.indices(step).to(data.device)].to(d.device, non_blocking=True)
        real = real.contiguous(memory_format=memory_format)
        z = latent(B, args.z_dim, _mix(args.seed, d.rank, step), d.device)
        # The augmentation's shifts: [2, 2B] (D step: reals then fakes; G step: the fakes'
        # own draw), a pure function of the step like the batch and the noise.
        shifts = random_shifts(2 * B, args.translate, _mix(args.seed, d.rank, step, 0xA06), d.device) if args.translate else None
        penalise = args.r1 > 0 and step % args.r1_every == 0
        if args.lr_rampdown > 0:
            factor = lr_factor(step, args.steps, args.lr_rampdown)
            set_learning_rate(opt_G, args.lr * factor)
            set_learning_rate(opt_D, args.lr_d * factor)
        # The average's decay ramps up as (1 + s) / (10 + s): it forgets the random initial weights.
        loss_ns, loss_g = train_step(real, z, shifts, penalise, min(args.ema, (1 + step) / (10 + step)))

        # The logged D loss is the non-saturating part alone (comparable with and without R1).
        pending.append(torch.stack([loss_ns, loss_g]))  # a copy: a replay overwrites the graph's outputs
        done = step + 1
        if done % log_every == 0 or done == args.steps:
            flush()
            if bar is not None:
                elapsed = time.perf_counter() - t0 - judge_seconds
                bar.set_postfix(
                    D=f"{history[-1][1]:.3f}", G=f"{history[-1][2]:.3f}", img_s=f"{(done - start) * B * d.world / elapsed:.0f}"
                )
        if bar is not None:
            bar.update(1)
        if done % args.sample_every == 0 or done == args.steps:
            flush()  # collective under DDP: every process, at the same steps
        if judge is not None and (done % args.eval_every == 0 or done == args.steps):
            evaluate(done)
        if d.main and (done % args.sample_every == 0 or done == args.steps):
            sample(done)
            if bar is None:  # without a progress bar, a line per sample grid
                elapsed = time.perf_counter() - t0 - judge_seconds
                print(
                    f"step {done}/{args.steps}: loss D {history[-1][1]:.3f} G {history[-1][2]:.3f}, "
                    f"{(done - start) * B * d.world / elapsed:.0f} images/s",
                    file=sys.stderr,
                    flush=True,
                )
        if done % args.ckpt_every == 0 or done == args.steps:
            flush()
            if d.main:
                checkpoint(done)

    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    flush()
    steps_run = args.steps - start
    ips = steps_run * B * d.world / (seconds - judge_seconds)
    tail = history[-min(50, len(history)) :]
    loss_d_final = sum(h[1] for h in tail) / len(tail)
    loss_g_final = sum(h[2] for h in tail) / len(tail)
    if args.param_checksum:
        out = Path(args.param_checksum.replace("{rank}", str(d.rank)))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(params_checksum(G, D) + "\n")
    if d.main:
        save_losses(history, run_dir, f"{args.name}: {args.layers} layers, batch {B}×{d.world}, {d.device.type}")
        shutil.copyfile(run_dir / "samples" / f"step_{args.steps:06d}.png", run_dir / "samples.png")
        print(
            f"train_gan: {steps_run} steps ({start}→{args.steps}) in {seconds:.1f} s, {ips:.0f} images/s, "
            f"final loss D {loss_d_final:.3f} G {loss_g_final:.3f} (mean of last {len(tail)} steps); outputs in {run_dir}/"
        )
        if judged:
            save_metrics(history, judged, run_dir, f"{args.name}: {args.layers} layers, batch {B}×{d.world}, {d.device.type}")
            print(summarise_metrics(judged, judge_seconds))
    return dict(
        steps=steps_run,
        seconds=seconds,
        judge_seconds=judge_seconds,
        metrics=judged,
        images_per_s=ips,
        loss_D=loss_d_final,
        loss_G=loss_g_final,
        history=history,
        run_dir=run_dir,
        graphs=len(train_step.graphs) if isinstance(train_step, CapturedTrainStep) else 0,
    )


def _metrics_from_state(entry: dict[str, Any]) -> tuple[int, DigitMetrics]:
    fields = {k: v for k, v in entry.items() if k != "step"}
    fields["class_counts"] = tuple(fields["class_counts"])
    return int(entry["step"]), DigitMetrics(**fields)


def summarise_metrics(judged: list[tuple[int, DigitMetrics]], judge_seconds: float) -> str:
    """The end-of-run lines about the judge: the last scores, the best ones, and whether
    digits were lost on the way (coverage below its best)."""
    step, last = judged[-1]
    best_rec_step, best_rec = max(judged, key=lambda h: (h[1].recognisable, -h[0]))
    best_fd_step, best_fd = min(judged, key=lambda h: (h[1].frechet, h[0]))
    best_cov = max(m.coverage for _, m in judged)
    lines = [
        f"digits judge at step {step} ({last.samples} samples): {last.line()}",
        f"  best: recognisable {100 * best_rec.recognisable:.0f}% at step {best_rec_step}, Fréchet {best_fd.frechet:.2f} at step "
        f"{best_fd_step}, coverage {best_cov}/10; {len(judged)} evaluations took {judge_seconds:.1f} s (not in images/s)",
    ]
    if last.coverage < best_cov:
        uncovered = ", ".join(str(k) for k, c in enumerate(last.class_counts) if c < math.ceil(MIN_SHARE * last.samples))
        lines.append(
            f"  WARNING: the run ends covering {last.coverage}/10 digits (not {uncovered}), below its best of {best_cov}/10: "
            "the generator dropped digits (mode collapse)"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
