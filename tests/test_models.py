"""gankernels.models: the DCGAN builders in stock and gankernels layers are one function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gankernels.nn as gnn
from gankernels.models import dcgan_discriminator, dcgan_generator, set_channels_last
from gankernels.testing import assert_close_rel

# Small but complete configurations (every block kind appears) so float64 is fast.
G_KW = dict(z_dim=16, channels=(24, 12, 8), out_channels=3)
D_KW = dict(in_channels=3, channels=(8, 12), resolution=16)


def _pair(builder, **kw):
    """(stock, gankernels) models, the second loaded with the first's state_dict."""
    stock = builder(layers="stock", **kw)
    fast = builder(layers="gankernels", **kw)
    fast.load_state_dict(stock.state_dict())
    return stock, fast


def test_default_shapes():
    torch.manual_seed(1)
    z = torch.randn(2, 128)
    for layers in ("stock", "gankernels"):
        G = dcgan_generator(layers=layers)
        D = dcgan_discriminator(layers=layers)
        img = G(z)
        assert img.shape == (2, 3, 64, 64)
        assert img.abs().max() <= 1  # tanh
        assert D(img).shape == (2, 1)


@pytest.mark.parametrize("n_blocks", [1, 2, 4])
def test_resolution_follows_channels(n_blocks):
    chans = tuple(8 for _ in range(n_blocks))
    G = dcgan_generator(z_dim=4, channels=chans, out_channels=1)
    assert G(torch.randn(1, 4)).shape == (1, 1, 4 * 2 ** (n_blocks - 1), 4 * 2 ** (n_blocks - 1))


def test_state_dict_keys_identical():
    for builder, kw in ((dcgan_generator, {}), (dcgan_discriminator, {}), (dcgan_generator, G_KW), (dcgan_discriminator, D_KW)):
        stock, fast = builder(layers="stock", **kw), builder(layers="gankernels", **kw)
        s, f = stock.state_dict(), fast.state_dict()
        assert list(s) == list(f)
        assert all(s[k].shape == f[k].shape for k in s)


def test_layouts():
    """Stock: plain torch modules where gankernels.convert looks; gankernels: the fused
    module at the run's Conv2d index, nn.Identity at the run's other indices."""
    G, Gf = dcgan_generator(layers="stock", **G_KW), dcgan_generator(layers="gankernels", **G_KW)
    assert [type(m) for m in G[3:6]] == [nn.Upsample, nn.Conv2d, nn.LeakyReLU]
    assert [type(m) for m in Gf[3:6]] == [nn.Identity, gnn.UpConv3x3, nn.Identity]
    assert [type(m) for m in Gf[-2:]] == [gnn.Conv3x3, nn.Identity]
    D, Df = dcgan_discriminator(layers="stock", **D_KW), dcgan_discriminator(layers="gankernels", **D_KW)
    assert [type(m) for m in D[:3]] == [nn.Conv2d, nn.LeakyReLU, nn.MaxPool2d]
    assert [type(m) for m in Df[:3]] == [gnn.Conv3x3Pool, nn.Identity, nn.Identity]


def test_same_seed_same_weights():
    """One seed initialises both layer kinds identically (the training-loop comparison
    and DDP's identical start rely on it)."""
    for builder, kw in ((dcgan_generator, G_KW), (dcgan_discriminator, D_KW)):
        torch.manual_seed(7)
        a = builder(layers="stock", **kw).state_dict()
        torch.manual_seed(7)
        b = builder(layers="gankernels", **kw).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(a[k].abs().sum() > 0 for k in a if k.endswith("weight"))


@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_and_grads_equal_float64(channels_last):
    torch.manual_seed(3)
    G, Gf = (m.double() for m in _pair(dcgan_generator, **G_KW))
    D, Df = (m.double() for m in _pair(dcgan_discriminator, **D_KW))
    if channels_last:
        for m in (G, Gf, D, Df):
            set_channels_last(m)
    z = torch.randn(3, G_KW["z_dim"], dtype=torch.float64)
    outs = []
    for g, d in ((G, D), (Gf, Df)):
        img = g(z)
        logit = d(img)
        logit.sum().backward()
        outs.append((img, logit, [p.grad for p in g.parameters()] + [p.grad for p in d.parameters()]))
    (img, logit, grads), (img_f, logit_f, grads_f) = outs
    if channels_last:
        assert img_f.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(img_f, img, dtype=torch.float64, what="generator output")
    assert_close_rel(logit_f, logit, dtype=torch.float64, what="discriminator output")
    for i, (a, b) in enumerate(zip(grads_f, grads, strict=True)):
        assert_close_rel(a, b, dtype=torch.float64, what=f"gradient {i}")


def test_argument_errors():
    with pytest.raises(ValueError, match="layers"):
        dcgan_generator(layers="fast")
    with pytest.raises(ValueError, match="resolution"):
        dcgan_discriminator(channels=(8, 8, 8), resolution=20)
    with pytest.raises(ValueError, match="channels"):
        dcgan_generator(channels=())
    with pytest.raises(ValueError, match="act"):
        dcgan_discriminator(act="gelu")
