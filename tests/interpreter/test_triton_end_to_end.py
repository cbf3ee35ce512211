"""A whole (tiny) GAN step on the Triton backend, under the interpreter: the fused
layers chosen by ``gankernels.convert`` (up-conv, conv+pool, conv, their backwards)
agree with stock PyTorch layers, forward, backward, and through an R1 penalty."""

import copy

import pytest
import torch

import gankernels
from gankernels.models import dcgan_discriminator, dcgan_generator
from gankernels.testing import assert_close_rel


def _models(channels_last: bool):
    torch.manual_seed(0)
    g = dcgan_generator(z_dim=8, channels=(6, 4), out_channels=3, channels_last=channels_last)
    d = dcgan_discriminator(in_channels=3, channels=(4, 6), resolution=8, channels_last=channels_last)
    return g, d


@pytest.mark.parametrize("channels_last", [False, True])
def test_converted_gan_step_on_triton_matches_stock(channels_last):
    g, d = _models(channels_last)
    g_fused, report_g = gankernels.convert(copy.deepcopy(g))
    d_fused, report_d = gankernels.convert(copy.deepcopy(d))
    assert len(report_g.replaced) >= 2 and len(report_d.replaced) >= 2, (report_g, report_d)

    z = torch.randn(2, 8)
    real = torch.randn(2, 3, 8, 8)
    if channels_last:
        real = real.contiguous(memory_format=torch.channels_last)

    def step(gen, disc):
        fake = gen(z)
        x = real.detach().requires_grad_()
        logits_real = disc(x)
        (grad_x,) = torch.autograd.grad(logits_real.sum(), x, create_graph=True)  # R1: double backward
        loss = torch.nn.functional.softplus(disc(fake)).mean() + torch.nn.functional.softplus(-logits_real).mean()
        loss = loss + 0.5 * grad_x.square().sum()
        loss.backward()
        return fake.detach(), loss.detach()

    fake_ref, loss_ref = step(g, d)
    with gankernels.use_backend("triton"):
        fake, loss = step(g_fused, d_fused)
    assert_close_rel(fake, fake_ref, tol=1e-5, what="generated images")
    assert_close_rel(loss, loss_ref, tol=1e-5, what="loss")
    for (name, p_ref), (_, p) in zip(
        list(g.named_parameters()) + list(d.named_parameters()),
        list(g_fused.named_parameters()) + list(d_fused.named_parameters()),
        strict=True,
    ):
        assert p.grad is not None, name
        assert_close_rel(p.grad, p_ref.grad, tol=1e-4, what=f"grad of {name}")


def test_explain_chooses_triton_for_the_fused_layers():
    x = torch.randn(1, 4, 6, 6)
    w = torch.randn(8, 4, 3, 3)
    for op in ("conv3x3", "conv3x3_pool", "up_conv3x3"):
        assert gankernels.explain(op, x, w, act="lrelu", backend="triton").backend == "triton"
