"""A judge of generated handwritten digits: how recognisable, how diverse, how close to real.

A GAN's losses say little about progress, and they do not show mode collapse (the
generator settling on a few outputs). This module scores samples with a small classifier
trained in about a second on scikit-learn's bundled 8×8 digits, the data
``train_gan.py`` trains on by default::

    from digits_judge import judge_generator
    m = judge_generator(G, z_dim=128)      # any generator of [N, 1 or 3, H, W] images in [-1, 1]
    print(m.line())                        # "recognisable …% · coverage …/10 (entropy …) · Fréchet …"

Every image is averaged down to 8×8 (the classifier's resolution, the digits' native
one) and scored on:

* **recognisable**: the share of samples the classifier assigns to one digit with
  probability ≥ 0.9. The classifier was also shown non-digits (blends of two different
  digits, smooth random blobs, pixel noise) with a uniform target ("outlier exposure"),
  so blobs and noise are not confidently called digits.
* **coverage**: how many of the 10 digits are recognised in at least ``min_share`` of the
  samples, and the normalised entropy (0 = one digit, 1 = all ten equally) of the
  recognised samples' class histogram. A collapsed generator covers few digits.
* **Fréchet distance** between the Gaussians fitted to the classifier's 64 penultimate
  features of the samples and of the real digits: an FID analogue that takes
  milliseconds on a CPU. Lower is closer: held-out real digits score about 1, noise
  over 200.

The classifier is trained on a fixed 80 % of the digits (the other 20 % measure it) from
a fixed seed, without touching torch's global random state; it is built once per
process and seed (:func:`digits_judge`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10
JUDGE_RESOLUTION = 8  # scikit-learn's digits are 8×8: the classifier sees every image at that size
CONFIDENCE = 0.9  # a sample is "recognisable" when one class has at least this probability
MIN_SHARE = 0.02  # a digit is "covered" when at least this share of the samples is recognised as it
HELDOUT_FRACTION = 0.2
# Classifier training: full data passes are cheap (1437 vectors of 64), so a few hundred
# minibatch steps of Adam take about a second on one CPU core.
TRAIN_STEPS = 400
BATCH_REAL, BATCH_OUTLIERS = 256, 128
# Weight of the uniform-target loss on non-digits (outlier exposure). It sets how strict
# "recognisable" is; measured (seed 0) on held-out real digits / 50-50 blends of two
# held-out digits / dark Gaussian noise / smooth blobs:
#   0.1: 86 / 12 / 0 / 0 %     0.03: 90 / 22 / 0 / 0 %     0.01: 91 / 35 / 0 / 1 %     0 (a plain classifier): 94 / 50 / 34 / 30 %
# A plain classifier calls a third of the noise digits; 0.1 also rejects most blends.
OUTLIER_WEIGHT = 0.1


def load_digits(resolution: int) -> torch.Tensor:
    """scikit-learn's 1797 bundled 8×8 handwritten digits (no download), bilinearly
    scaled to ``resolution``², one channel, in [-1, 1]."""
    from sklearn.datasets import load_digits as _load

    x = torch.from_numpy(_load().images).float().div_(16.0).unsqueeze(1)  # [N, 1, 8, 8], 0..1
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.mul_(2).sub_(1).clamp_(-1, 1)


def load_digit_labels() -> torch.Tensor:
    """The class (0-9) of each of :func:`load_digits`' images, in the same order."""
    from sklearn.datasets import load_digits as _load

    return torch.from_numpy(_load().target).long()


def to_judge_input(images: torch.Tensor) -> torch.Tensor:
    """``[N, 1 or 3, H, W]`` images in [-1, 1] (H, W ≥ 8) -> ``[N, 64]`` float32 on the
    CPU: grey (the channel mean), area-averaged to 8×8, flattened."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a [N, 1 or 3, H, W] tensor, got {shape}")
    if images.shape[2] < JUDGE_RESOLUTION or images.shape[3] < JUDGE_RESOLUTION:
        raise ValueError(f"images: need H, W >= {JUDGE_RESOLUTION}, got {tuple(images.shape[2:])}")
    x = images.detach().float().cpu().mean(dim=1, keepdim=True)
    x = F.interpolate(x, size=(JUDGE_RESOLUTION, JUDGE_RESOLUTION), mode="area")
    return x.flatten(1)


@dataclass(frozen=True)
class DigitMetrics:
    """The judge's scores of one set of samples (see the module docstring)."""

    samples: int
    recognisable: float  # share in [0, 1]
    coverage: int  # digits covered, 0..10
    entropy: float  # normalised entropy of the recognised samples' class histogram, [0, 1]
    frechet: float  # Fréchet distance to the real digits in the classifier's feature space
    class_counts: tuple[int, ...]  # recognised samples per digit 0..9

    def line(self) -> str:
        return (
            f"recognisable {100 * self.recognisable:.0f}% · coverage {self.coverage}/{NUM_CLASSES} "
            f"(entropy {self.entropy:.2f}) · Fréchet {self.frechet:.2f}"
        )


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the judge's tiny matrix products on one thread: OpenMP hand-offs cost more
    than the work, and on a busy machine they stall (seen: 1.5 s -> 76 s of training)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _outliers(real: torch.Tensor, labels: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` 8×8 non-digits (flattened): blends of two digits of different classes,
    smooth random blobs, and pixel noise on a dark background, a third each."""
    k = n // 3
    a = torch.randint(len(real), (k,), generator=g)
    b = torch.randint(len(real), (k,), generator=g)
    different = labels[a] != labels[b]
    w = 0.3 + 0.4 * torch.rand(k, 1, generator=g)
    blends = (w * real[a] + (1 - w) * real[b])[different]
    coarse = int(torch.randint(2, 5, (1,), generator=g))
    blobs = torch.randn(k, 1, coarse, coarse, generator=g) * 1.5 - 0.5
    blobs = F.interpolate(blobs, size=(JUDGE_RESOLUTION, JUDGE_RESOLUTION), mode="bilinear", align_corners=False)
    blobs = blobs.tanh().flatten(1)
    density = torch.rand(n - 2 * k, 1, generator=g)
    noise = (torch.rand(n - 2 * k, JUDGE_RESOLUTION**2, generator=g) < density).float() * 2 - 1
    return torch.cat([blends, blobs, noise])


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½) in float64.

    tr (Σ₁ Σ₂)^½ is the sum of the square roots of the eigenvalues of the symmetric
    Σ₁^½ Σ₂ Σ₁^½ (same spectrum as Σ₁ Σ₂), so only symmetric eigensolvers are needed.
    """
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    e1, v1 = torch.linalg.eigh(cov1)
    sqrt1 = (v1 * e1.clamp_min(0).sqrt()) @ v1.T
    inner = torch.linalg.eigvalsh(sqrt1 @ cov2 @ sqrt1).clamp_min(0)
    d = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * inner.sqrt().sum()
    return max(float(d), 0.0)


def _gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    return f.mean(0), torch.cov(f.T)


class DigitsJudge:
    """The classifier and the real digits' feature statistics. Build it with
    :func:`digits_judge` (cached per seed); score with :meth:`score` or
    :func:`judge_generator`."""

    def __init__(self, seed: int = 0) -> None:
        with _one_thread():
            self._build(seed)

    def _build(self, seed: int) -> None:
        self.seed = seed
        real = to_judge_input(load_digits(32))  # the pipeline every sample goes through
        labels = load_digit_labels()
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(real), generator=g)
        n_held = round(HELDOUT_FRACTION * len(real))
        self.heldout_index, self.train_index = perm[:n_held], perm[n_held:]

        # Weights are initialised under a forked RNG so the caller's random stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(nn.Linear(JUDGE_RESOLUTION**2, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
            self.head = nn.Linear(64, NUM_CLASSES)
        x_tr, y_tr = real[self.train_index], labels[self.train_index]
        params = [*self.features.parameters(), *self.head.parameters()]
        opt = torch.optim.Adam(params, lr=3e-3, weight_decay=1e-4)
        for _ in range(TRAIN_STEPS):
            idx = torch.randint(len(x_tr), (BATCH_REAL,), generator=g)
            loss = F.cross_entropy(self._logits(x_tr[idx]), y_tr[idx])
            # Outlier exposure: push non-digits towards the uniform distribution.
            log_p = self._logits(_outliers(x_tr, y_tr, BATCH_OUTLIERS, g)).log_softmax(1)
            loss = loss - OUTLIER_WEIGHT * log_p.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for p in params:
            p.requires_grad_(False)
        self.features.eval()
        self.head.eval()

        with torch.no_grad():
            held = self._logits(real[self.heldout_index]).argmax(1)
            self.heldout_accuracy = float((held == labels[self.heldout_index]).double().mean())
            self.real_mu, self.real_cov = _gaussian(self.features(real))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities [N, 10], penultimate features [N, 64]) of ``images``."""
        with _one_thread():
            f = self.features(to_judge_input(images))
            return self.head(f).softmax(1), f

    def score(self, images: torch.Tensor, min_share: float = MIN_SHARE) -> DigitMetrics:
        """Score ``images`` ([N, 1 or 3, H, W] in [-1, 1], N ≥ 2; use the same N to
        compare runs: the Fréchet distance of a finite sample is biased upwards, more
        so for small N)."""
        if not 0 < min_share <= 1:
            raise ValueError(f"min_share: expected a share in (0, 1], got {min_share}")
        if images.shape[0] < 2:
            raise ValueError(f"images: need at least 2 samples for a covariance, got {images.shape[0]}")
        probs, feats = self.classify(images)
        n = len(probs)
        conf, cls = probs.max(1)
        recognised = cls[conf >= CONFIDENCE]
        counts = torch.bincount(recognised, minlength=NUM_CLASSES)
        coverage = int((counts >= math.ceil(min_share * n)).sum())
        entropy = 0.0
        if len(recognised):
            p = counts.double() / len(recognised)
            p = p[p > 0]
            entropy = max(0.0, float(-(p * p.log()).sum() / math.log(NUM_CLASSES)))
        mu, cov = _gaussian(feats)
        return DigitMetrics(
            samples=n,
            recognisable=len(recognised) / n,
            coverage=coverage,
            entropy=entropy,
            frechet=frechet_distance(mu, cov, self.real_mu, self.real_cov),
            class_counts=tuple(counts.tolist()),
        )


@functools.lru_cache(maxsize=4)
def digits_judge(seed: int = 0) -> DigitsJudge:
    """The judge for ``seed``, trained on first use (about a second on one CPU core) and
    kept for the rest of the process."""
    return DigitsJudge(seed)


def judge_generator(
    generator: Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]],
    z_dim: int,
    num_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 500,
    device: Optional[Union[str, torch.device]] = None,
    judge: Optional[DigitsJudge] = None,
) -> DigitMetrics:
    """Score ``generator`` (latents ``[B, z_dim]`` -> images ``[B, 1 or 3, H, W]`` in
    [-1, 1]) on ``num_samples`` samples from standard-normal latents drawn from ``seed``.

    ``device`` defaults to the device of the generator's first parameter (CPU if it has
    none). The latents come from a dedicated generator: torch's global RNG is untouched.
    An ``nn.Module`` is put in eval mode for the call and restored after.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples: need at least 2, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if device is None:
        first = next(generator.parameters(), None) if isinstance(generator, nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
    z = torch.randn(num_samples, z_dim, generator=torch.Generator().manual_seed(seed))
    was_training = isinstance(generator, nn.Module) and generator.training
    if was_training:
        generator.eval()
    try:
        with torch.no_grad():
            batches = [generator(z[i : i + batch_size].to(device)).float().cpu() for i in range(0, num_samples, batch_size)]
            images = torch.cat(batches)
    finally:
        if was_training:
            generator.train()
    return (judge or digits_judge()).score(images)


def collapse_warning(history: Sequence[tuple[int, DigitMetrics]], drop: int = 2) -> Optional[str]:
    """A warning when the latest coverage in ``history`` ((step, metrics) pairs, oldest
    first) is at least ``drop`` digits below the best coverage before it: the generator
    is dropping digits (mode collapse). ``None`` when it is not."""
    if len(history) < 2:
        return None
    step, last = history[-1]
    best_step, best = max(history[:-1], key=lambda h: (h[1].coverage, -h[0]))
    if last.coverage > best.coverage - drop:
        return None
    lost = [str(d) for d in range(NUM_CLASSES) if best.class_counts[d] > 0 and last.class_counts[d] == 0]
    return (
        f"mode collapse? coverage fell from {best.coverage}/{NUM_CLASSES} at step {best_step} to "
        f"{last.coverage}/{NUM_CLASSES} at step {step} (entropy {best.entropy:.2f} -> {last.entropy:.2f}"
        + (f"; digits no longer produced: {', '.join(lost)}" if lost else "")
        + "). Try a lower --lr or a larger --r1."
    )
