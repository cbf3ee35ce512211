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
