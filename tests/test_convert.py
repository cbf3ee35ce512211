"""gankernels.convert: swapping stock layers of a model for fused ones, in place.

Every comparison is float64 on the ``torch`` backend: the converted model must compute
the same function as the stock one to 1e-10 (relative L2), forward and backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gankernels
from gankernels import nn as gknn
from gankernels.testing import assert_close_rel, random_input

F64 = torch.float64


# ----------------------------------------------------------------------------------
# A small DCGAN-like generator and discriminator of stock layers, nested in custom
# modules (the Sequentials are not at the top level).


class GenBlock(nn.Module):
    def __init__(self, ci: int, co: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ci, co, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Generator(nn.Module):
    def __init__(self, z: int = 6, ch: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.ConvTranspose2d(z, ch, 4), nn.BatchNorm2d(ch), nn.ReLU(True))  # 1×1 -> 4×4
        self.blocks = nn.Sequential(GenBlock(ch, ch), GenBlock(ch, ch // 2))  # 4 -> 8 -> 16
        self.to_rgb = nn.Sequential(nn.Conv2d(ch // 2, 3, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_rgb(self.blocks(self.stem(z[:, :, None, None])))


class DiscBlock(nn.Module):
    def __init__(self, ci: int, co: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(ci, co, 3, padding=1), nn.LeakyReLU(0.2), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Discriminator(nn.Module):
    def __init__(self, ch: int = 4) -> None:
        super().__init__()
        self.from_rgb = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2))  # 16 -> 8
        self.blocks = nn.Sequential(
            DiscBlock(ch, 2 * ch),  # 8 -> 4
            nn.Sequential(nn.Conv2d(2 * ch, 2 * ch, 3, padding=1, bias=False), nn.BatchNorm2d(2 * ch), nn.ReLU()),
        )
        self.head = nn.Sequential(nn.Conv2d(2 * ch, 1, 4), nn.Flatten())  # 4×4 -> 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.from_rgb(x)))


GEN_REPLACED = {
    "blocks.0.body.1": ("UpConv3x3", ("Upsample", "Conv2d", "LeakyReLU")),
    "blocks.1.body.1": ("UpConv3x3", ("Upsample", "Conv2d", "LeakyReLU")),
    "to_rgb.0": ("Conv3x3", ("Conv2d", "Tanh")),
}
DISC_REPLACED = {
    "from_rgb.0": ("Conv3x3", ("Conv2d", "SiLU")),  # silu: the pool is not fused ...
    "from_rgb.2": ("MaxPool2d", ("MaxPool2d",)),  # ... but becomes gankernels' own
    "blocks.0.net.0": ("Conv3x3Pool", ("Conv2d", "LeakyReLU", "MaxPool2d")),
    "blocks.1.0": ("Conv3x3", ("Conv2d",)),  # followed by BatchNorm: linear
}


def _models():
    g, d = Generator().to(F64), Discriminator().to(F64)
    return g, d, random_input(3, 6, dtype=F64), random_input(3, 3, 16, 16, dtype=F64)


def _forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, input gradient and parameter gradients of a fixed random projection."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    proj = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    (y * proj).sum().backward()
    # One vector: a gradient that is exactly zero in theory (a bias before a training-mode
    # BatchNorm) is rounding noise, meaningless on its own relative scale.
    return y.detach(), x.grad, torch.cat([p.grad.flatten() for p in model.parameters()])


def _module_at(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


@pytest.mark.parametrize("which", ["generator", "discriminator"])
@pytest.mark.parametrize("training", [True, False])
def test_dcgan_outputs_and_gradients_match(which: str, training: bool) -> None:
    g, d, z, img = _models()
    model, x = (g, z) if which == "generator" else (d, img)
    model.train(training)
    stock = copy.deepcopy(model)
    y0, gx0, gp0 = _forward_backward(stock, x)

    out, report = gankernels.convert(model, backend="torch")
    assert out is model
    y1, gx1, gp1 = _forward_backward(model, x)
    assert_close_rel(y1, y0, tol=1e-10, what="output")
    assert_close_rel(gx1, gx0, tol=1e-10, what="input gradient")
    assert_close_rel(gp1, gp0, tol=1e-10, what="parameter gradients")
    # Every module keeps the model's mode; dtype is kept.
    assert all(m.training == training for m in model.modules())
    assert all(p.dtype == F64 for p in model.parameters())


def test_dcgan_report_lists_replaced_and_left() -> None:
    g, d, _, _ = _models()
    _, rg = gankernels.convert(g)
    _, rd = gankernels.convert(d)
    for model, report, expected in ((g, rg, GEN_REPLACED), (d, rd, DISC_REPLACED)):
        got = {
            r.path: (r.fused.split("(")[0].removeprefix("gankernels.nn."), tuple(t for _, t in r.stock)) for r in report.replaced
        }
        assert got == expected
        for path, (cls, _) in expected.items():
            assert type(_module_at(model, path)) is getattr(gknn, cls)
    assert rg.left == []
    assert [(e.path, e.module) for e in rd.left] == [("head.0", "Conv2d")]
    assert "Conv2d 4×4: only 3×3 stride-1 pad-1 convolutions are fused" in rd.left[0].reason
    # The absorbed modules became Identity, keeping the Sequentials' indexing.
    assert isinstance(g.blocks[0].body[0], nn.Identity) and isinstance(g.blocks[0].body[2], nn.Identity)
    assert len(g.blocks[0].body) == 3 and len(d.blocks[0].net) == 3
    assert isinstance(d.from_rgb[1], nn.Identity) and type(d.from_rgb[2]) is gknn.MaxPool2d
    assert isinstance(d.blocks[1][1], nn.BatchNorm2d) and isinstance(d.blocks[1][2], nn.ReLU)
    text = str(rd)
    assert text.splitlines()[0] == "gankernels.convert: 4 replaced, 0 fused in forward code, 1 left"
    assert "blocks.0.net.0: Conv2d → LeakyReLU → MaxPool2d ⇒ gankernels.nn.Conv3x3Pool(4, 8, act='lrelu', alpha=0.2)" in text
    assert "head.0 (Conv2d): Conv2d 4×4" in text


def test_parameters_are_shared_and_an_old_optimizer_trains_the_converted_model() -> None:
    g, _, z, _ = _models()
    stock = copy.deepcopy(g)
    before = list(g.named_parameters())
    initial = {n: p.detach().clone() for n, p in before}
    opt = torch.optim.SGD(g.parameters(), lr=0.1, momentum=0.9)
    opt_stock = torch.optim.SGD(stock.parameters(), lr=0.1, momentum=0.9)

    gankernels.convert(g, backend="torch")
    after = list(g.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before, strict=True))
    assert g.blocks[0].body[1].weight is before[[n for n, _ in before].index("blocks.0.body.1.weight")][1]

    for _ in range(2):
        for model, o in ((g, opt), (stock, opt_stock)):
            o.zero_grad()
            model(z).square().mean().backward()
            o.step()
    for (n, p), (_, q) in zip(g.named_parameters(), stock.named_parameters(), strict=True):
        assert_close_rel(p, q, tol=1e-10, what=n)
    # The steps moved the shared parameters: the converted model's gradients reached them.
    for path in GEN_REPLACED:
        for name in ("weight", "bias"):
            assert not torch.equal(g.get_parameter(f"{path}.{name}"), initial[f"{path}.{name}"])


def test_state_dict_keys_unchanged_and_stock_checkpoints_load_strictly() -> None:
    g, d, z, img = _models()
    for model, x in ((g, z), (d, img)):
        model.eval()
        stock = copy.deepcopy(model)
        keys = list(model.state_dict())
        gankernels.convert(model)
        assert list(model.state_dict()) == keys
        # A fresh stock model's checkpoint loads into the converted one, and back.
        fresh = type(model)().to(F64).eval()
        model.load_state_dict(fresh.state_dict(), strict=True)
        assert_close_rel(model(x).detach(), fresh(x).detach(), tol=1e-10)
        stock.load_state_dict(model.state_dict(), strict=True)
        assert_close_rel(stock(x).detach(), fresh(x).detach(), tol=1e-10)


def test_non_matching_patterns_are_left_or_converted_only_where_valid() -> None:
    c = 4
    seq = nn.Sequential(
        nn.Conv2d(c, c, 5, padding=2),  # 0: left (5×5)
        nn.ReLU(),  # 1
        nn.Conv2d(c, c, 3, stride=2, padding=1),  # 2: left (stride 2)     12 -> 6
        nn.ReLU(),  # 3
        nn.Upsample(scale_factor=2, mode="bilinear"),  # 4: left (bilinear)   6 -> 12
        nn.Conv2d(c, c, 3, padding=1),  # 5: Conv3x3 relu
        nn.ReLU(),  # 6: Identity
        nn.Conv2d(c, c, 3, padding=1, groups=2),  # 7: left (groups)
        nn.LeakyReLU(0.1),  # 8
        nn.Conv2d(c, c, 3, padding=1),  # 9: Conv3x3 linear (BatchNorm follows)
        nn.BatchNorm2d(c),  # 10
        nn.ReLU(),  # 11
        nn.Conv2d(c, c, 3, padding=1),  # 12: Conv3x3 relu (the pool is not 2×2)
        nn.ReLU(),  # 13: Identity
        nn.MaxPool2d(3, stride=2, padding=1),  # 14: gankernels MaxPool2d   12 -> 6
        nn.Upsample(size=(8, 8)),  # 15: left (size)   6 -> 8
        nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect"),  # 16: left (reflect)
        nn.Conv2d(c, c, 3, padding=2, dilation=2),  # 17: left (dilation)
        nn.Conv2d(c, c, 3, padding=0),  # 18: left (padding 0)     8 -> 6
        nn.Upsample(scale_factor=1.5),  # 19: left (non-integer)   6 -> 9
        nn.Upsample(scale_factor=2),  # 20: gankernels Upsample (a 1×1 conv follows)
        nn.Conv2d(c, c, 1),  # 21: left (1×1)
    ).to(F64)
    x = random_input(2, c, 12, 12, dtype=F64)
    stock = copy.deepcopy(seq)
    y0, gx0, gp0 = _forward_backward(stock, x)
    _, report = gankernels.convert(seq, backend="torch")
    y1, gx1, gp1 = _forward_backward(seq, x)
    assert_close_rel(y1, y0, tol=1e-10)
    assert_close_rel(gx1, gx0, tol=1e-10)
    assert_close_rel(gp1, gp0, tol=1e-10)

    assert len(seq) == 22
    kinds = {i: type(m) for i, m in enumerate(seq)}
    assert kinds[5] is gknn.Conv3x3 and seq[5].act == "relu" and kinds[6] is nn.Identity
    assert kinds[9] is gknn.Conv3x3 and seq[9].act == "linear" and kinds[10] is nn.BatchNorm2d and kinds[11] is nn.ReLU
    assert kinds[12] is gknn.Conv3x3 and seq[12].act == "relu" and kinds[13] is nn.Identity
    assert kinds[14] is gknn.MaxPool2d and (seq[14].kernel_size, seq[14].stride, seq[14].padding) == (3, 2, 1)
    assert kinds[20] is gknn.Upsample
    untouched = [0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 18, 19, 21]
    for i in untouched:
        assert seq[i] is stock_type_check(seq[i]), i
    reasons = {e.path: e.reason for e in report.left}
    assert set(reasons) == {"0", "2", "4", "7", "15", "16", "17", "18", "19", "21"}
    assert reasons["0"] == "Conv2d 5×5: only 3×3 stride-1 pad-1 convolutions are fused"
    assert reasons["2"].startswith("Conv2d stride (2, 2)")
    assert reasons["4"] == "Upsample mode='bilinear': only mode='nearest' is fused"
    assert reasons["7"].startswith("Conv2d groups=2")
    assert reasons["15"].startswith("Upsample size=(8, 8)")
    assert "padding_mode='reflect'" in reasons["16"]
    assert "dilation" in reasons["17"]
    assert "padding" in reasons["18"]
    assert "scale_factor=1.5" in reasons["19"]
    assert reasons["21"].startswith("Conv2d 1×1")


def stock_type_check(m: nn.Module) -> nn.Module:
    """``m`` itself if it is a torch.nn class (not a gankernels one)."""
    assert type(m).__module__.startswith("torch.nn"), type(m)
    return m


ACTS = [
    (None, "linear", 0.2),
    (lambda: nn.ReLU(), "relu", 0.2),
    (lambda: nn.ReLU(inplace=True), "relu", 0.2),
    (lambda: nn.LeakyReLU(0.1), "lrelu", 0.1),
    (lambda: nn.LeakyReLU(0.3, inplace=True), "lrelu", 0.3),
    (lambda: nn.Tanh(), "tanh", 0.2),
    (lambda: nn.Sigmoid(), "sigmoid", 0.2),
    (lambda: nn.SiLU(), "silu", 0.2),
    (lambda: nn.SiLU(inplace=True), "silu", 0.2),
]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a[1] + ("_inplace" if a[0] and getattr(a[0](), "inplace", False) else ""))
@pytest.mark.parametrize("block", ["conv", "conv_pool", "up_conv"])
def test_every_activation_in_every_block(act, block: str) -> None:
    """In-place activations included: the run is replaced and gradients still match."""
    make, name, alpha = act
    ci, co = 3, 5
    mods: list[nn.Module] = []
    if block == "up_conv":
        mods.append(nn.Upsample(scale_factor=2.0))
    mods.append(nn.Conv2d(ci, co, 3, padding=1))
    if make is not None:
        mods.append(make())
    if block == "conv_pool":
        mods.append(nn.MaxPool2d(2))
    seq = nn.Sequential(*mods).to(F64)
    conv_at = 1 if block == "up_conv" else 0
    x = random_input(2, ci, 5, 7, dtype=F64)  # odd sizes: the pool floors
    stock = copy.deepcopy(seq)
    y0, gx0, gp0 = _forward_backward(stock, x)
    _, report = gankernels.convert(seq, backend="torch")
    y1, gx1, gp1 = _forward_backward(seq, x)
    assert_close_rel(y1, y0, tol=1e-10)
    assert_close_rel(gx1, gx0, tol=1e-10)
    assert_close_rel(gp1, gp0, tol=1e-10)

    fused = seq[conv_at]
    expected = {"conv": gknn.Conv3x3, "up_conv": gknn.UpConv3x3, "conv_pool": gknn.Conv3x3Pool}[block]
    if block == "conv_pool" and name == "silu":
        expected = gknn.Conv3x3  # silu does not commute with max: the pool stays separate
        assert type(seq[-1]) is gknn.MaxPool2d
    assert type(fused) is expected
    assert fused.act == name
    if name == "lrelu":
        assert fused.alpha == alpha
    assert len(seq) == len(mods)
    assert all(isinstance(m, nn.Identity) for i, m in enumerate(seq) if m is not fused and not isinstance(m, gknn.MaxPool2d))
    assert report.left == []


def test_upsample_variants_count_as_nearest_x2() -> None:
    for up in (nn.Upsample(scale_factor=2), nn.Upsample(scale_factor=(2.0, 2.0)), nn.UpsamplingNearest2d(scale_factor=2)):
        seq = nn.Sequential(up, nn.Conv2d(2, 3, 3, padding="same")).to(F64)
        x = random_input(1, 2, 3, 4, dtype=F64)
        y0 = seq(x)
        gankernels.convert(seq)
        assert type(seq[1]) is gknn.UpConv3x3 and isinstance(seq[0], nn.Identity)
        assert_close_rel(seq(x), y0, tol=1e-10)
    # ×4 is not the fused block: a gankernels Upsample, then Conv3x3.
    seq = nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()).to(F64)
    x = random_input(1, 2, 3, 4, dtype=F64)
    y0 = seq(x)
    gankernels.convert(seq)
    assert [type(m) for m in seq] == [gknn.Upsample, gknn.Conv3x3, nn.Identity]
    assert_close_rel(seq(x), y0, tol=1e-10)


def test_modules_with_hooks_or_parametrizations_are_left() -> None:
    from torch.nn.utils import parametrizations

    seq = nn.Sequential(
        torch.nn.utils.spectral_norm(nn.Conv2d(2, 2, 3, padding=1)),
        nn.ReLU(),
        parametrizations.spectral_norm(nn.Conv2d(2, 2, 3, padding=1)),
        nn.ReLU(),
    ).to(F64)
    seq.eval()  # no power iteration: the forward is a pure function
    x = random_input(1, 2, 5, 5, dtype=F64)
    y0 = seq(x)
    _, report = gankernels.convert(seq)
    assert report.replaced == []
    assert [type(m) for m in seq][1::2] == [nn.ReLU, nn.ReLU]
    assert "hooks" in report.left[0].reason and "parametrizations" in report.left[1].reason
    assert_close_rel(seq(x), y0, tol=0.0)


def test_layers_outside_sequentials_become_their_gankernels_subclasses() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.conv5 = nn.Conv2d(3, 3, 5, padding=2)
            self.pool = nn.MaxPool2d(2, return_indices=True)
            self.up = nn.Upsample(scale_factor=2)
            self.act = nn.ReLU()
            self.more = nn.ModuleList([nn.MaxPool2d(3, 1, 1)])

        def forward(self, x):
            # No run to fuse: the conv's output is scaled before the activation, the pool
            # follows a 5×5 conv, the upsamples feed no conv.
            y, idx = self.pool(self.conv5(self.act(self.conv(x) * 2)))
            return self.more[0](self.up(y)) + self.up(idx.to(y.dtype))

    m = Custom().to(F64)
    x = random_input(2, 2, 6, 6, dtype=F64)
    y0 = m(x)
    _, report = gankernels.convert(m, backend="torch")
    assert type(m.conv) is gknn.Conv2d and isinstance(m.conv, nn.Conv2d) and m.conv.backend == "torch"
    assert type(m.pool) is gknn.MaxPool2d and m.pool.return_indices
    assert type(m.up) is gknn.Upsample and type(m.more[0]) is gknn.MaxPool2d
    assert type(m.conv5) is nn.Conv2d and type(m.act) is nn.ReLU
    assert [e.path for e in report.left] == ["conv5"] and report.fused == []
    assert "forward" not in m.__dict__
    assert_close_rel(m(x), y0, tol=1e-10)


def test_sequential_subclass_with_its_own_forward_is_fused_as_forward_code() -> None:
    class Residual(nn.Sequential):
        def forward(self, x):  # uses the children out of order: not a Sequential run
            return self[1](self[0](x)) + self[2](x)

    class Chain(nn.Sequential):  # inherits Sequential.forward: fused as usual
        pass

    res = Residual(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1)).to(F64)
    chain = Chain(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()).to(F64)
    x = random_input(1, 2, 4, 4, dtype=F64)
    y0, c0 = res(x), chain(x)
    _, report = gankernels.convert(res)
    gankernels.convert(chain)
    # Its forward is code: self[0] → self[1] is fused there; self[2] is swapped alone.
    assert [(f.conv, f.op) for f in report.fused] == [("0", "gankernels.conv3x3(act='relu')")]
    assert [type(m) for m in res] == [nn.Conv2d, nn.ReLU, gknn.Conv2d]
    assert [type(m) for m in chain] == [gknn.Conv3x3, nn.Identity]
    assert_close_rel(res(x), y0, tol=1e-10)
    assert_close_rel(chain(x), c0, tol=1e-10)


def test_gankernels_conv2d_with_its_own_epilogue_fuses_the_pool() -> None:
    seq = nn.Sequential(
        gknn.Conv2d(2, 3, 3, padding=1, act="lrelu", alpha=0.1, gain=2.0, clamp=0.5), nn.ReLU(), nn.MaxPool2d(2)
    ).to(F64)
    x = random_input(1, 2, 6, 6, dtype=F64)
    y0 = seq(x)
    gankernels.convert(seq)
    # The conv's own epilogue is kept; the ReLU after it is not absorbed (it composes).
    assert type(seq[0]) is gknn.Conv3x3 and (seq[0].act, seq[0].alpha, seq[0].gain, seq[0].clamp) == ("lrelu", 0.1, 2.0, 0.5)
    assert type(seq[1]) is nn.ReLU and type(seq[2]) is gknn.MaxPool2d
    assert_close_rel(seq(x), y0, tol=1e-10)


def test_second_conversion_finds_nothing_and_backend_is_checked() -> None:
    g, _, z, _ = _models()
    g.eval()
    y0 = g(z)
    _, r1 = gankernels.convert(g, backend="torch")
    _, r2 = gankernels.convert(g)
    assert r1.replaced and r2.replaced == [] and r2.left == []
    assert g.blocks[0].body[1].backend == "torch"  # kept when no backend is asked for
    assert_close_rel(g(z), y0, tol=1e-10)
    with pytest.raises(ValueError, match="backend"):
        gankernels.convert(Generator(), backend="cudnn")
    with pytest.raises(TypeError, match="model"):
        gankernels.convert("not a model")
    conv = nn.Conv2d(2, 2, 3, padding=1)
    out, report = gankernels.convert(conv)
    assert out is conv and report.left[0].path == "(root)"


def test_conversion_keeps_the_rng_state() -> None:
    g = Generator()
    state = torch.get_rng_state()
    gankernels.convert(g)
    assert torch.equal(torch.get_rng_state(), state)


def test_torch_compile_fullgraph_of_converted_model_matches_eager() -> None:
    torch._dynamo.reset()
    model = nn.Sequential(
        nn.Upsample(scale_factor=2), nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 2, 3, padding=1), nn.Tanh(),
    )  # fmt: skip
    gankernels.convert(model, backend="torch")
    x = random_input(2, 3, 4, 4)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    assert_close_rel(compiled(x), eager, dtype=torch.float32)
