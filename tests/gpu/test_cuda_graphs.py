"""CUDA-graph capture of converted models (issue 12): the fused ops are capturable (no
host synchronisation, no allocation outside the graph's pool, no autotuning or timing
inside a capture), and a replay after the weights changed in place gives what eager
gives. Skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import gankernels
from gankernels.models import dcgan_discriminator, dcgan_generator

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _one_config_per_kernel(monkeypatch):
    # The first surviving Triton configuration instead of autotuning every one (the
    # whole-step tests meet a dozen new signatures).
    from gankernels.triton import conv3x3 as tconv

    monkeypatch.setattr(tconv, "AUTOTUNE", False)


def _models(seed: int = 0):
    torch.manual_seed(seed)
    g = dcgan_generator(z_dim=16, channels=(32, 16, 8), out_channels=3, layers="stock", channels_last=True)
    d = dcgan_discriminator(in_channels=3, channels=(8, 16, 32), resolution=16, layers="stock", channels_last=True)
    gankernels.convert(g)
    gankernels.convert(d)
    return g.cuda(), d.cuda()


def _step(g, d, z):
    score = d(g(z))
    score.float().mean().backward()
    return score


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_and_replay_forward_and_backward_of_a_converted_gan(dtype):
    g, d = _models()
    params = list(g.parameters()) + list(d.parameters())
    z = torch.randn(4, 16, device="cuda")

    def run():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            return _step(g, d, z)

    # Warm up on a side stream (Triton compiles and autotunes, auto times its
    # candidates), as torch.cuda.graphs requires.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            for p in params:
                p.grad = None
            run()
    torch.cuda.current_stream().wait_stream(s)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    # Change the input and the weights in place (as an optimizer step does), replay.
    with torch.no_grad():
        z.copy_(torch.randn(4, 16, device="cuda"))
        for p in params:
            p.mul_(0.9).add_(0.01)
    graph.replay()
    torch.cuda.synchronize()
    replay_score = captured.detach().clone()
    replay_grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    eager_score = run()
    torch.testing.assert_close(replay_score, eager_score.detach())
    for got, want in zip(replay_grads, [p.grad for p in params], strict=True):
        torch.testing.assert_close(got, want)


def test_no_timing_inside_a_capture(monkeypatch):
    from gankernels.ops import choice

    timed = []
    monkeypatch.setattr(choice, "_timer", [lambda run, device, backend: timed.append(backend) or 1.0])
    choice.clear()
    x = torch.randn(2, 8, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ones(1, device="cuda")  # initialise the stream's context outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gankernels.max_pool2d(x, 2)  # a signature auto has never seen
    graph.replay()
    torch.cuda.synchronize()
    assert timed == []
    torch.testing.assert_close(y, torch.nn.functional.max_pool2d(x, 2))


@pytest.mark.parametrize("convert", [False, True], ids=["stock", "gankernels"])
def test_a_whole_training_step_captured_trains_as_eager(convert):
    """The benchmark's graph-captured training step (both networks' forward and backward
    and both Adam updates in one graph) follows the eager step, step for step."""
    from gankernels.bench.training_step import GANStep, GraphedGANStep, TrainConfig, build_models, make_batches

    cfg = TrainConfig(batch=4, g_channels=(32, 16, 8, 8, 8), d_channels=(8, 16, 16, 32), autocast=None)
    batches = make_batches(cfg, "cuda", 5, seed=1)
    runs = []
    for graphed in (False, True):
        g, d = (m.cuda() for m in build_models(cfg, seed=0))
        if convert:
            gankernels.convert(g)
            gankernels.convert(d)
        step = GANStep(g, d, cfg, "cuda", capturable=graphed)
        if graphed:
            step = GraphedGANStep(step, warmup=2)
        losses = [torch.stack(step(*b)).clone() for b in batches]
        torch.cuda.synchronize()
        runs.append((torch.stack(losses), torch.cat([p.detach().flatten() for p in (*g.parameters(), *d.parameters())])))
    (eager_losses, eager_params), (graph_losses, graph_params) = runs
    assert step.graph is not None and step.calls == 5  # 2 warm-up steps, then 3 replays
    # Capturable Adam computes the same update in another order: fp32 rounding apart.
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(graph_params, eager_params, rtol=1e-4, atol=1e-5)
