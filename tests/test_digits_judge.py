"""examples/digits_judge.py: the classifier-based scores of generated digits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
pytest.importorskip("sklearn")
import digits_judge as dj  # noqa: E402


@pytest.fixture(scope="module")
def judge() -> dj.DigitsJudge:
    return dj.digits_judge(0)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return dj.load_digits(32), dj.load_digit_labels()


def test_real_heldout_digits_cover_all_classes(judge, digits):
    """Digits the classifier never trained on: every class covered, mostly recognisable,
    close to the real statistics."""
    x, y = digits
    assert judge.heldout_accuracy > 0.95
    m = judge.score(x[judge.heldout_index])
    assert m.samples == len(judge.heldout_index) == 359
    assert m.coverage == 10
    assert m.recognisable > 0.8
    assert m.entropy > 0.95
    assert m.frechet < 3.0
    probs, features = judge.classify(x[judge.heldout_index])
    assert probs.shape == (359, 10) and features.shape == (359, 64)
    accuracy = (probs.argmax(1) == y[judge.heldout_index]).double().mean()
    assert float(accuracy) == pytest.approx(judge.heldout_accuracy)


def test_any_resolution_and_rgb(judge, digits):
    """The judge averages every image down to 8×8 and greys RGB: a 64×64 RGB copy of the
    digits scores like the 32×32 grey ones."""
    x, _ = digits
    held = x[judge.heldout_index]
    rgb64 = nn.functional.interpolate(held, scale_factor=2, mode="nearest").expand(-1, 3, -1, -1)
    a, b = judge.score(held), judge.score(rgb64)
    assert a.class_counts == b.class_counts and a.coverage == b.coverage
    assert b.frechet == pytest.approx(a.frechet, rel=1e-4, abs=1e-4)


class _Collapsed(nn.Module):
    """A generator that ignores part of its input: it returns ``pool[k]`` where ``k``
    picks among ``len(pool)`` images by the first latent's quantile."""

    def __init__(self, pool: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pool", pool)
        self.scale = nn.Parameter(torch.ones(()))  # gives the module a device

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        k = (torch.special.ndtr(z[:, 0]) * len(self.pool)).long().clamp_max(len(self.pool) - 1)
        return self.pool[k] * self.scale


def test_collapsed_generators_have_low_coverage_and_warn(judge, digits):
    x, y = digits
    held_x, held_y = x[judge.heldout_index], y[judge.heldout_index]
    healthy = judge.score(held_x)
    one = held_x[(held_y == 4).nonzero()[0]]  # one constant image
    two = torch.cat([held_x[held_y == 3][:1], held_x[held_y == 7][:1]])  # two digits only
    m1 = dj.judge_generator(_Collapsed(one), z_dim=8, num_samples=400, judge=judge)
    m2 = dj.judge_generator(_Collapsed(two), z_dim=8, num_samples=400, judge=judge)
    assert m1.coverage <= 1 and m1.entropy == pytest.approx(0.0, abs=1e-9)
    assert m2.coverage <= 2 and m2.entropy <= 0.31  # log 2 / log 10 = 0.30
    assert sum(c > 0 for c in m2.class_counts) <= 2
    for collapsed in (m1, m2):
        assert collapsed.frechet > 20 * healthy.frechet

    warning = dj.collapse_warning([(0, healthy), (100, healthy), (200, m2)])
    assert warning is not None and "mode collapse" in warning
    assert f"coverage fell from 10/10 at step 0 to {m2.coverage}/10 at step 200" in warning
    assert dj.collapse_warning([(0, m1), (100, healthy)]) is None  # coverage rising: no warning
    assert dj.collapse_warning([(0, healthy), (100, healthy)]) is None
    assert dj.collapse_warning([(0, healthy)]) is None


def test_noise_is_far_from_digits(judge, digits):
    x, _ = digits
    g = torch.Generator().manual_seed(1)
    noise = judge.score(torch.rand(1000, 1, 32, 32, generator=g) * 2 - 1)
    blobs = nn.functional.interpolate(torch.randn(1000, 1, 4, 4, generator=g), size=32, mode="bilinear").tanh()
    blob = judge.score(blobs)
    real = judge.score(x[judge.heldout_index])
    for m in (noise, blob):
        assert m.recognisable < 0.02 and m.coverage == 0
        assert m.frechet > 50 * real.frechet and m.frechet > 50


def test_deterministic_for_a_seed(judge, digits):
    """A freshly trained judge of the same seed scores identically; the global RNG is
    left alone; the latents of judge_generator are a function of its seed."""
    x, _ = digits
    state = torch.get_rng_state()
    again = dj.DigitsJudge(0)
    assert torch.equal(torch.get_rng_state(), state)
    assert again is not judge and dj.digits_judge(0) is judge  # cached per seed
    images = x[judge.heldout_index]
    assert again.score(images) == judge.score(images)

    torch.manual_seed(3)
    G = nn.Sequential(nn.Linear(16, 32 * 32), nn.Tanh(), nn.Unflatten(1, (1, 32, 32)))
    a = dj.judge_generator(G, 16, num_samples=200, seed=5, judge=judge)
    b = dj.judge_generator(G, 16, num_samples=200, seed=5, batch_size=64, judge=again)
    c = dj.judge_generator(G, 16, num_samples=200, seed=6, judge=judge)
    assert a == b
    assert c.frechet != a.frechet
    assert G.training  # restored after the call


def test_frechet_distance_matches_scipy():
    """The eigen-based formula against scipy's matrix square root, in float64."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 6, generator=g, dtype=torch.float64)
    b = torch.randn(50, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    mu1, mu2 = a.mean(0), b.mean(0) + 0.5
    cov1, cov2 = torch.cov(a.T), torch.cov(b.T)
    covmean = scipy_linalg.sqrtm(cov1.numpy() @ cov2.numpy()).real
    expected = float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * torch.from_numpy(covmean).trace())
    assert dj.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-9)
    assert dj.frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-9)


def test_argument_errors(judge):
    with pytest.raises(ValueError, match="images: expected a \\[N, 1 or 3, H, W\\]"):
        judge.score(torch.zeros(4, 2, 32, 32))
    with pytest.raises(ValueError, match="H, W >= 8"):
        judge.score(torch.zeros(4, 1, 4, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        judge.score(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="min_share"):
        judge.score(torch.zeros(4, 1, 8, 8), min_share=0)
    with pytest.raises(ValueError, match="num_samples"):
        dj.judge_generator(nn.Identity(), 4, num_samples=1)
