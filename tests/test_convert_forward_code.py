"""gankernels.convert on models written as forward code (issue 17).

Every model here is written for the test in one of the styles GAN code uses. Each test
compares the converted model with a stock copy in float64 on the ``torch`` backend
(outputs, input gradient, every parameter gradient: relative L2 within 1e-10), loads
a stock checkpoint with ``strict=True``, and counts the gankernels ops that actually
run in the converted forward (a ``TorchDispatchMode`` sees every ``gankernels::`` op).
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gankernels
from gankernels import nn as gknn
from gankernels.models import dcgan_discriminator, dcgan_generator
from gankernels.testing import assert_close_rel, random_input

F64 = torch.float64
HERE = "tests/test_convert_forward_code.py"


class CountGankernelsOps(TorchDispatchMode):
    """Counts ``(op, act)`` of every ``gankernels::`` op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "gankernels":
            act = args[3] if func._opname in ("conv3x3", "conv3x3_pool", "up_conv3x3") else ""
            self.calls[(func._opname, act)] += 1
        return func(*args, **(kwargs or {}))


def ops_run(model: nn.Module, x: torch.Tensor) -> Counter:
    with torch.no_grad(), CountGankernelsOps() as counter:
        model(x)
    return counter.calls


def forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, input gradient and all parameter gradients of a fixed random projection."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    proj = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    (y * proj).sum().backward()
    grads = [p.grad.flatten() for p in model.parameters()]
    assert len(grads) == len(list(model.parameters()))  # every parameter got a gradient
    return y.detach(), x.grad, torch.cat(grads)


def convert_and_compare(make, x: torch.Tensor):
    """Build a stock model (seed 0), convert a copy, compare values and gradients, load a
    stock checkpoint (seed 1) strictly; return (converted, report)."""
    torch.manual_seed(0)
    stock = make().to(F64)
    model = copy.deepcopy(stock)
    keys = list(model.state_dict())
    out, report = gankernels.convert(model, backend="torch")
    assert out is model
    pairs = zip(forward_backward(model, x), forward_backward(stock, x), strict=True)
    for (got, want), what in zip(pairs, ("output", "input grad", "param grads"), strict=True):
        assert_close_rel(got, want, tol=1e-10, what=what)
    assert list(model.state_dict()) == keys
    torch.manual_seed(1)
    fresh = make().to(F64)
    model.load_state_dict(fresh.state_dict(), strict=True)
    assert_close_rel(model(x).detach(), fresh(x).detach(), tol=1e-10, what="after loading a stock checkpoint")
    return model, report


def fused_summary(report) -> list[tuple[str, str, str]]:
    return [(f.module, f.conv, f.op) for f in report.fused]


# ----------------------------------------------------------------------------------
# A dense block (ESRGAN's residual dense block): torch.cat of every earlier output, one
# in-place LeakyReLU module shared by all convs.


class DenseBlock(nn.Module):
    def __init__(self, c: int = 4, g: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, g, 3, 1, 1)
        self.conv2 = nn.Conv2d(c + g, g, 3, 1, 1)
        self.conv3 = nn.Conv2d(c + 2 * g, g, 3, 1, 1)
        self.conv4 = nn.Conv2d(c + 3 * g, c, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.conv4(torch.cat((x, x1, x2, x3), 1))
        return x4 * 0.2 + x


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rdb1, self.rdb2 = DenseBlock(), DenseBlock()

    def forward(self, x):
        return x + 0.2 * self.rdb2(self.rdb1(x))


def _line_of(text: str) -> str:
    """``HERE:line`` of the first line of this file containing ``text``."""
    with open(__file__) as f:
        for i, line in enumerate(f, 1):
            if text in line:
                return f"{HERE}:{i}"
    raise AssertionError(text)


def test_dense_block_with_concat_and_a_shared_inplace_lrelu() -> None:
    x = random_input(2, 4, 6, 5, dtype=F64)
    model, report = convert_and_compare(Trunk, x)
    lrelu = "gankernels.conv3x3(act='lrelu', alpha=0.2)"
    assert fused_summary(report) == [(f"rdb{b}", f"rdb{b}.conv{i}", lrelu) for b in (1, 2) for i in (1, 2, 3)]
    assert [f.where for f in report.fused[:3]] == [
        _line_of("x1 = self.lrelu(self.conv1(x))"),
        _line_of("x2 = self.lrelu(self.conv2("),
        _line_of("x3 = self.lrelu(self.conv3("),
    ]
    assert report.fused[0].calls == ("self.conv1 (Conv2d)", "self.lrelu (LeakyReLU)")
    assert report.left == []
    text = str(report)
    assert text.splitlines()[0] == "gankernels.convert: 2 replaced, 6 fused in forward code, 0 left"
    first = _line_of("x1 = self.lrelu(self.conv1(x))")
    assert f"  rdb1.forward ({first}): self.conv1 (Conv2d) → self.lrelu (LeakyReLU) ⇒ {lrelu}" in text
    # The fused convs keep their class; conv4 (no activation) is swapped one by one.
    for rdb in (model.rdb1, model.rdb2):
        assert [type(rdb.get_submodule(f"conv{i}")) for i in (1, 2, 3, 4)] == [nn.Conv2d] * 3 + [gknn.Conv2d]
        assert type(rdb.lrelu) is nn.LeakyReLU and "forward" in rdb.__dict__
    assert "forward" not in model.__dict__  # nothing fused in Trunk's own forward
    assert [r.path for r in report.replaced] == ["rdb1.conv4", "rdb2.conv4"]
    assert ops_run(model, x) == {("conv3x3", "lrelu"): 6, ("conv3x3", "linear"): 2}


# ----------------------------------------------------------------------------------
# An upsampling tail (ESRGAN's): F.interpolate, conv, shared in-place LeakyReLU.


class UpsampleTail(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv_up1 = nn.Conv2d(c, c, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(c, c, 3, 1, 1)
        self.conv_hr = nn.Conv2d(c, c, 3, 1, 1)
        self.conv_last = nn.Conv2d(c, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, feat):
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


def test_upsampling_tail_with_interpolate() -> None:
    x = random_input(2, 4, 3, 4, dtype=F64)
    model, report = convert_and_compare(UpsampleTail, x)
    assert fused_summary(report) == [
        ("(root)", "conv_up1", "gankernels.up_conv3x3(act='lrelu', alpha=0.2)"),
        ("(root)", "conv_up2", "gankernels.up_conv3x3(act='lrelu', alpha=0.2)"),
        ("(root)", "conv_hr", "gankernels.conv3x3(act='lrelu', alpha=0.2)"),
    ]
    assert report.fused[0].calls == ("F.interpolate", "self.conv_up1 (Conv2d)", "self.lrelu (LeakyReLU)")
    assert report.fused[0].where == _line_of("feat = self.lrelu(self.conv_up1(")
    assert report.left == []
    assert ops_run(model, x) == {("up_conv3x3", "lrelu"): 2, ("conv3x3", "lrelu"): 1, ("conv3x3", "linear"): 1}


class UpsampleForms(nn.Module):
    """Every nearest-2× spelling, and ones that must not count as it."""

    def __init__(self, c: int = 2) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2.0)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(6))

    def forward(self, x):
        x = self.convs[0](self.up(x)).relu_()  # nn.Upsample, in-place method
        x = self.convs[1](F.upsample_nearest(x, scale_factor=2)).tanh()  # F.upsample_nearest, method
        x = F.silu(self.convs[2](F.interpolate(input=x, scale_factor=(2.0, 2.0))))  # silu, keyword input
        x = F.avg_pool2d(x, 4)
        x = torch.sigmoid(self.convs[3](F.interpolate(x, scale_factor=2, mode="bilinear")))  # not nearest
        x = self.convs[4](F.interpolate(x, size=(4, 4)))  # a size, and no activation: nothing to fuse
        return F.relu(self.convs[5](F.interpolate(x, scale_factor=3)))  # ×3: conv3x3 only


@pytest.mark.filterwarnings("ignore:`nn.functional.upsample_nearest` is deprecated")
def test_every_upsample_spelling() -> None:
    x = random_input(2, 2, 3, 3, dtype=F64)
    model, report = convert_and_compare(UpsampleForms, x)
    assert [(f.conv, f.op) for f in report.fused] == [
        ("convs.0", "gankernels.up_conv3x3(act='relu')"),
        ("convs.1", "gankernels.up_conv3x3(act='tanh')"),
        ("convs.2", "gankernels.up_conv3x3(act='silu')"),
        ("convs.3", "gankernels.conv3x3(act='sigmoid')"),
        ("convs.5", "gankernels.conv3x3(act='relu')"),
    ]
    assert ops_run(model, x) == {
        ("up_conv3x3", "relu"): 1,
        ("up_conv3x3", "tanh"): 1,
        ("up_conv3x3", "silu"): 1,
        ("conv3x3", "sigmoid"): 1,
        ("conv3x3", "relu"): 1,
        ("conv3x3", "linear"): 1,  # convs.4, swapped for gankernels.nn.Conv2d
    }


# ----------------------------------------------------------------------------------
# A functional discriminator.


class FunctionalDiscriminator(nn.Module):
    def __init__(self, ch: int = 4) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, ch, 3, padding=1)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, 2 * ch, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.conv4 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * ch, 1)

    def forward(self, x):
        x = F.leaky_relu(self.conv0(x), 0.2)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 16 -> 8
        x = self.pool(F.leaky_relu(self.conv2(x), negative_slope=0.1, inplace=True))  # 8 -> 4
        x = F.max_pool2d(F.silu(self.conv3(x)), 2)  # silu is not monotone: the pool stays     4 -> 2
        x = torch.max_pool2d(self.conv4(x).sigmoid(), kernel_size=2, stride=2)  # 2 -> 1
        return self.fc(x.flatten(1))


def test_functional_discriminator() -> None:
    x = random_input(3, 3, 16, 16, dtype=F64)
    model, report = convert_and_compare(FunctionalDiscriminator, x)
    assert [(f.conv, f.op) for f in report.fused] == [
        ("conv0", "gankernels.conv3x3(act='lrelu', alpha=0.2)"),
        ("conv1", "gankernels.conv3x3_pool(act='relu')"),
        ("conv2", "gankernels.conv3x3_pool(act='lrelu', alpha=0.1)"),
        ("conv3", "gankernels.conv3x3(act='silu')"),
        ("conv4", "gankernels.conv3x3_pool(act='sigmoid')"),
    ]
    assert report.fused[1].calls == ("self.conv1 (Conv2d)", "F.relu", "F.max_pool2d")
    assert report.fused[2].calls == ("self.conv2 (Conv2d)", "F.leaky_relu", "self.pool (MaxPool2d)")
    assert [(e.path, e.where) for e in report.left] == [("(root)", _line_of("x = F.max_pool2d(F.silu(self.conv3(x)), 2)"))]
    assert "silu is not monotone" in report.left[0].reason
    assert type(model.pool) is nn.MaxPool2d  # absorbed where it is called: not swapped
    assert ops_run(model, x) == {
        ("conv3x3", "lrelu"): 1,
        ("conv3x3_pool", "relu"): 1,
        ("conv3x3_pool", "lrelu"): 1,
        ("conv3x3", "silu"): 1,
        ("conv3x3_pool", "sigmoid"): 1,
    }


# ----------------------------------------------------------------------------------
# Data-dependent control flow: the module is left, its traceable children converted.


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.inner = DenseBlock()

    def forward(self, x):
        y = F.relu(self.conv(x))
        if y.mean() > 0:  # data-dependent: torch.fx cannot trace this
            y = self.inner(y)
        return y


def test_data_dependent_control_flow_is_left_and_traceable_children_are_converted() -> None:
    x = random_input(2, 4, 5, 5, dtype=F64)
    model, report = convert_and_compare(Gated, x)
    assert [(e.path, e.module) for e in report.left] == [("(root)", "Gated"), ("conv", "Conv2d")]
    left = report.left[0]
    assert left.where == _line_of("if y.mean() > 0:")
    assert left.reason.startswith("forward cannot be traced by torch.fx (TraceError: symbolically traced variables")
    # Its own conv is not even swapped alone: an in-place update of the conv's output in
    # the untraced forward would break a gankernels conv's backward.
    assert "forward" not in model.__dict__ and type(model.conv) is nn.Conv2d
    assert report.left[1].reason.startswith("not swapped: it is called from (root).forward (Gated), which convert cannot")
    # The traceable child is converted: its runs fused, its lone conv swapped.
    assert [(f.module, f.conv) for f in report.fused] == [("inner", f"inner.conv{i}") for i in (1, 2, 3)]
    assert [r.path for r in report.replaced] == ["inner.conv4"]
    assert ops_run(model, x) == {("conv3x3", "linear"): 1, ("conv3x3", "lrelu"): 3}


# ----------------------------------------------------------------------------------
# What must not be fused: intermediates used twice, results modified in place later.


class AddOne(nn.Module):
    def forward(self, x):
        x.add_(1.0)
        return x


class LeakyBlock(nn.Module):
    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.leaky_relu(self.conv(x), 0.2)


class Hazards(nn.Module):
    def __init__(self, c: int = 3) -> None:
        super().__init__()
        for name in ("ok", "a", "b", "c", "d", "g", "h0", "h"):
            setattr(self, f"conv_{name}", nn.Conv2d(c, c, 3, padding=1))
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        self.add_one = AddOne()
        self.block_e = LeakyBlock(c)  # its result is modified in place here
        self.seq_f = nn.Sequential(LeakyBlock(c), nn.LeakyReLU(0.2, inplace=True))

    def forward(self, x):
        a = self.lrelu(self.conv_ok(x))  # fused
        h = self.conv_a(a)
        y = F.leaky_relu(h, 0.2) + h  # A: the conv output is used twice
        y = F.leaky_relu(self.conv_b(y), 0.2)
        y += a  # B: an in-place update of the fused result
        z = F.leaky_relu(self.conv_c(y), 0.2)
        z = self.lrelu(z)  # C: the shared in-place activation applied to the result
        w = F.silu(self.conv_d(z))
        w[:, :1].mul_(0.5)  # D: an in-place update through a view
        e = self.block_e(w)
        e.mul_(2.0)  # E: the caller modifies a submodule's result
        f = self.seq_f(e)  # F: the next module of a Sequential runs in place
        g = self.add_one(F.leaky_relu(self.conv_g(f), 0.2))  # G: a submodule modifies its input
        h0 = self.conv_h0(g) * 1.0
        u = F.relu(self.conv_h(F.interpolate(h0, scale_factor=2)))
        h0.add_(1.0)  # H: the upsample's input is modified afterwards
        return u + F.interpolate(h0, scale_factor=2)


def test_intermediates_used_twice_or_modified_in_place_are_not_fused() -> None:
    x = random_input(2, 3, 4, 4, dtype=F64)
    model, report = convert_and_compare(Hazards, x)
    assert [(f.module, f.conv, f.op) for f in report.fused] == [
        ("(root)", "conv_ok", "gankernels.conv3x3(act='lrelu', alpha=0.2)"),
        ("(root)", "conv_h", "gankernels.conv3x3(act='relu')"),  # without the upsample
    ]
    reasons = {e.where: (e.path, e.reason) for e in report.left}
    expected = {
        "h = self.conv_a(a)": "the conv's output is used 2 times",
        "y = F.leaky_relu(self.conv_b(y), 0.2)": "the in-place '+=' at " + _line_of("y += a"),
        "z = F.leaky_relu(self.conv_c(y), 0.2)": "self.lrelu, which runs in place (LeakyReLU(inplace=True)) at "
        + _line_of("z = self.lrelu(z)"),
        "w = F.silu(self.conv_d(z))": "the in-place .mul_() at " + _line_of("w[:, :1].mul_(0.5)"),
        "return F.leaky_relu(self.conv(x), 0.2)": None,  # E and F: both in LeakyBlock.forward
        "g = self.add_one(": "self.add_one, which modifies its input in place (the in-place .add_() at " + _line_of("x.add_(1.0)"),
        "u = F.relu(self.conv_h(": "the upsample's input is modified in place afterwards (the in-place .add_() at "
        + _line_of("h0.add_(1.0)"),
    }
    for text, want in expected.items():
        path, reason = reasons.pop(_line_of(text))
        if want is not None:
            assert path == "(root)" and want in reason, (text, reason)
    assert reasons == {}
    block_left = sorted(e.path for e in report.left if e.where == _line_of("return F.leaky_relu(self.conv(x), 0.2)"))
    assert block_left == ["block_e", "seq_f.0"]
    e_reason = next(e.reason for e in report.left if e.path == "block_e")
    assert "the in-place .mul_() at " + _line_of("e.mul_(2.0)") in e_reason
    f_reason = next(e.reason for e in report.left if e.path == "seq_f.0")
    assert "the next module in Sequential seq_f (LeakyReLU) runs in place" in f_reason
    # conv_ok fused; conv_h fused without its upsample; the rest swapped one by one.
    assert ops_run(model, x) == {("conv3x3", "lrelu"): 1, ("conv3x3", "relu"): 1, ("conv3x3", "linear"): 8}


class ReadsTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return F.dropout(y, 0.5, training=self.training)


class ChangesState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return F.relu(self.conv(x))


def test_forward_reading_self_training_or_changing_state_is_left() -> None:
    for cls, reason in (
        (ReadsTraining, "its forward reads self.training"),
        (ChangesState, "its forward changes module state while running (ChangesState.calls)"),
    ):
        model = cls().to(F64).eval()
        _, report = gankernels.convert(model, backend="torch")
        assert report.fused == [] and "forward" not in model.__dict__
        assert [e.path for e in report.left] == ["(root)", "conv"] and reason in report.left[0].reason, report.left
        assert type(model.conv) is nn.Conv2d and report.left[1].reason.startswith("not swapped: it is called from (root)")
    assert model.calls == 0  # tracing did not run the forward's side effects on the module


# ----------------------------------------------------------------------------------
# What a user keeps: the forward-code DCGAN of gankernels.models.

G_KW = dict(z_dim=8, channels=(8, 6, 4), out_channels=3, style="forward_code")
D_KW = dict(in_channels=3, channels=(4, 6), resolution=8, style="forward_code")


def test_forward_code_dcgan_fuses_every_block_like_the_sequential() -> None:
    z, img = random_input(2, 8, dtype=F64), random_input(2, 3, 8, 8, dtype=F64)
    g, rg = convert_and_compare(lambda: dcgan_generator(**G_KW), z)
    d, rd = convert_and_compare(lambda: dcgan_discriminator(**D_KW), img)
    assert ops_run(g, z) == {("up_conv3x3", "lrelu"): 2, ("conv3x3", "tanh"): 1}
    assert ops_run(d, img) == {("conv3x3_pool", "lrelu"): 2}
    assert rg.left == [] and rd.left == [] and rg.replaced == [] and rd.replaced == []
    # The same weights as the Sequential built from the same seed (1: the checkpoint
    # convert_and_compare loaded), the same function.
    torch.manual_seed(1)
    seq = dcgan_generator(**{**G_KW, "style": "sequential"}).to(F64)
    assert_close_rel(g(z), seq(z), tol=1e-10)


def test_converted_model_keeps_object_classes_parameters_modes_hooks() -> None:
    torch.manual_seed(0)
    g = dcgan_generator(**G_KW).to(F64)
    classes = {name: type(m) for name, m in g.named_modules()}
    attrs = {name: set(vars(m)) for name, m in g.named_modules()}
    params = dict(g.named_parameters())
    seen = []
    g.fc.register_forward_hook(lambda m, i, o: seen.append("fc"))
    g.register_forward_hook(lambda m, i, o: seen.append("root"))
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    stock = copy.deepcopy(g)
    out, _ = gankernels.convert(g, backend="torch")
    assert out is g
    assert {name: type(m) for name, m in g.named_modules()} == classes
    assert {name: set(vars(m)) - {"forward"} for name, m in g.named_modules()} == attrs
    assert all(p is params[n] for n, p in g.named_parameters())
    z = random_input(2, 8, dtype=F64)
    seen.clear()
    g(z)
    assert seen == ["fc", "root"]  # hooks on untouched modules and on the rewritten one fire
    # An optimizer built before trains the converted model like the stock one.
    opt_stock = torch.optim.SGD(stock.parameters(), lr=0.1)
    for model, o in ((g, opt), (stock, opt_stock)):
        o.zero_grad()
        model(z).square().mean().backward()
        o.step()
    for (n, p), (_, q) in zip(g.named_parameters(), stock.named_parameters(), strict=True):
        assert_close_rel(p, q, tol=1e-10, what=n)
    # train()/eval() reach every module.
    g.eval()
    assert not any(m.training for m in g.modules())
    g.train()
    assert all(m.training for m in g.modules())


def test_deepcopy_and_second_conversion() -> None:
    torch.manual_seed(0)
    d = dcgan_discriminator(**D_KW).to(F64)
    _, r1 = gankernels.convert(d, backend="torch")
    img = random_input(2, 3, 8, 8, dtype=F64)
    twin = copy.deepcopy(d)
    assert twin.forward.__self__ is twin and twin.convs[0].weight is not d.convs[0].weight
    with torch.no_grad():
        twin.convs[0].weight.mul_(2)  # the copy runs its own parameters
    assert not torch.allclose(twin(img), d(img))
    assert ops_run(twin, img) == {("conv3x3_pool", "lrelu"): 2}
    _, r2 = gankernels.convert(d)
    assert len(r1.fused) == 2 and r2.fused == [] and r2.replaced == [] and r2.left == []
    assert [type(c) for c in d.convs] == [nn.Conv2d, nn.Conv2d]


def test_double_backward_r1_penalty_matches_stock() -> None:
    torch.manual_seed(0)
    stock = dcgan_discriminator(**D_KW).to(F64)
    d = copy.deepcopy(stock)
    gankernels.convert(d, backend="torch")

    real = random_input(2, 3, 8, 8, dtype=F64)

    def r1(model):
        img = real.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(img).sum(), img, create_graph=True)
        model.zero_grad(set_to_none=True)
        g.square().sum().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]

    # A bias enters the input gradient only through the activation's slope, piecewise
    # constant: its R1 gradient is zero (stock returns zeros, the fused op's double
    # backward may return None; both are compared as zeros).
    got, want = r1(d), r1(stock)
    assert_close_rel(torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want]), tol=1e-10)
    for g, w, (name, _) in zip(got, want, d.named_parameters(), strict=True):
        if name.endswith("weight"):
            assert_close_rel(g, w, tol=1e-10, what=name)


def test_torch_compile_fullgraph_of_rewritten_forward_matches_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    g = dcgan_generator(**G_KW)
    gankernels.convert(g, backend="torch")
    z = random_input(2, 8)
    compiled = torch.compile(g, fullgraph=True)
    assert_close_rel(compiled(z), g(z), dtype=torch.float32)


def test_unbatched_input_runs_the_stock_calls() -> None:
    model = UpsampleTail().to(F64)
    stock = copy.deepcopy(model)
    gankernels.convert(model, backend="torch")
    x = random_input(4, 3, 3, dtype=F64)  # [C, H, W]: F.interpolate upsamples only W
    assert_close_rel(model(x), stock(x), tol=1e-10)
    assert ops_run(model, x) == {}


@pytest.mark.parametrize("inplace", [False, True])
def test_channels_last_and_fp32(inplace: bool) -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)

        def forward(self, x):
            return F.max_pool2d(F.leaky_relu(self.conv(x), 0.2, inplace=inplace), 2)

    torch.manual_seed(0)
    model = Block().to(memory_format=torch.channels_last)
    stock = copy.deepcopy(model)
    gankernels.convert(model, backend="torch")
    x = random_input(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    y = model(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(y, stock(x), dtype=torch.float32)
    assert ops_run(model, x) == {("conv3x3_pool", "lrelu"): 1}


class DecoderBlock(nn.Module):
    """A U-Net decoder block: an optional skip connection, defaulting to None."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, skip=None):
        x = F.leaky_relu(self.conv1(F.interpolate(x, scale_factor=2, mode="nearest")), 0.2)
        if skip is not None:
            x = x + skip
        return F.relu(self.conv2(x))


def test_optional_argument_runs_the_fused_code_only_when_given() -> None:
    torch.manual_seed(0)
    stock = DecoderBlock().to(F64)
    model = copy.deepcopy(stock)
    _, report = gankernels.convert(model, backend="torch")
    assert [f.op for f in report.fused] == [
        "gankernels.up_conv3x3(act='lrelu', alpha=0.2)",
        "gankernels.conv3x3(act='relu')",
    ]
    x, skip = random_input(2, 3, 3, 3, dtype=F64), random_input(2, 3, 6, 6, dtype=F64)
    assert_close_rel(model(x, skip), stock(x, skip), tol=1e-10)
    assert_close_rel(model(x, skip=skip), stock(x, skip=skip), tol=1e-10)
    assert_close_rel(model(x), stock(x), tol=1e-10)  # traced with a skip: runs the class's forward
    with torch.no_grad(), CountGankernelsOps() as with_skip:
        model(x, skip)
    assert with_skip.calls == {("up_conv3x3", "lrelu"): 1, ("conv3x3", "relu"): 1}
    assert ops_run(model, x) == {}


class NoGradInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        with torch.no_grad():  # fx would drop this context
            y = F.relu(self.conv(x))
        return x + y


class VarArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, *xs):
        return F.relu(self.conv(xs[0]))


class Decorated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    @torch.no_grad()  # fx would drop this too
    def forward(self, x):
        return F.relu(self.conv(x))


class NoGradInHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def frozen(self, x):
        with torch.no_grad():  # in a helper: the source check of forward cannot see it
            return F.relu(self.conv(x))

    def forward(self, x):
        return x + self.frozen(x)


class InspectsType(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        if isinstance(x, (tuple, list)):  # traced, x is a proxy: this test would be skipped
            x = x[0]
        return F.relu(self.conv(x))


def test_forward_with_a_with_block_a_decorator_or_varargs_is_left() -> None:
    x = random_input(1, 2, 4, 4, dtype=F64)
    for cls, reason in (
        (NoGradInside, "its forward has a with-block (line"),
        (VarArgs, "its forward takes *xs"),
        (Decorated, "its forward is wrapped by a decorator"),
        (NoGradInHelper, "its forward changes the grad mode or autocast while running"),
        (InspectsType, "its forward inspects the type of its argument 'x'"),
    ):
        model = cls().to(F64)
        stock = copy.deepcopy(model)
        _, report = gankernels.convert(model, backend="torch")
        assert report.fused == [] and [e.path for e in report.left] == ["(root)", "conv"]
        assert reason in report.left[0].reason and "cannot be traced by torch.fx" in report.left[0].reason
        assert type(model.conv) is nn.Conv2d
        assert_close_rel(model(x), stock(x), tol=1e-10)


def test_modules_with_hooks_are_not_absorbed_and_their_hooks_still_fire() -> None:
    torch.manual_seed(0)
    model = DenseBlock().to(F64)
    fired = []
    model.conv1.register_forward_hook(lambda m, i, o: fired.append("conv1"))
    model.lrelu.register_forward_pre_hook(lambda m, i: fired.append("lrelu"))
    stock = copy.deepcopy(model)
    _, report = gankernels.convert(model, backend="torch")
    assert report.fused == []  # conv1 has a hook; every other run ends in the hooked lrelu
    x = random_input(1, 4, 4, 4, dtype=F64)
    fired.clear()
    assert_close_rel(model(x), stock(x), tol=1e-10)
    assert fired.count("conv1") == 2 and fired.count("lrelu") == 6  # stock model's hooks fired too


def test_pickled_model_loads_with_its_class_forward_and_converts_again() -> None:
    import io

    torch.manual_seed(0)
    d = dcgan_discriminator(**D_KW).to(F64)
    gankernels.convert(d, backend="torch")
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    img = random_input(2, 3, 8, 8, dtype=F64)
    assert_close_rel(loaded(img), d(img), tol=1e-10)
    assert ops_run(loaded, img) == {}  # the class's own forward: stock calls
    _, report = gankernels.convert(loaded, backend="torch")
    assert len(report.fused) == 2 and report.left == []
    assert ops_run(loaded, img) == {("conv3x3_pool", "lrelu"): 2}


class ResidualStage(nn.Module):
    """A residual update after a block: the block returns a new tensor, so the fused
    result is not touched by the in-place ``+=``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        self.block = DenseBlock()
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())

    def forward(self, x):
        h = self.lrelu(self.conv(x))
        y = self.block(h)
        y += h
        # The Sequential's conv is also called on its own: its run must not be fused.
        return self.seq(y) + self.seq[0](y)


def test_residual_update_after_a_block_and_a_sequential_child_called_directly() -> None:
    x = random_input(2, 4, 4, 4, dtype=F64)
    model, report = convert_and_compare(ResidualStage, x)
    assert [(f.module, f.conv) for f in report.fused] == [("(root)", "conv")] + [("block", f"block.conv{i}") for i in (1, 2, 3)]
    assert [type(m) for m in model.seq] == [gknn.Conv2d, nn.ReLU]
    assert ops_run(model, x) == {("conv3x3", "lrelu"): 4, ("conv3x3", "linear"): 3}


class SharedUpsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        u = F.interpolate(x, scale_factor=2)
        return F.relu(self.conv(u)) + u  # the upsampled tensor is used twice


def test_upsample_used_twice_stays_separate() -> None:
    x = random_input(2, 2, 3, 3, dtype=F64)
    model, report = convert_and_compare(SharedUpsample, x)
    assert [f.op for f in report.fused] == ["gankernels.conv3x3(act='relu')"]
    assert len(report.left) == 1 and "the upsampled tensor is also used elsewhere" in report.left[0].reason
    assert report.left[0].where == _line_of("return F.relu(self.conv(u)) + u")
    assert ops_run(model, x) == {("conv3x3", "relu"): 1}


class PoolThenInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        y = F.max_pool2d(F.leaky_relu(self.conv(x), 0.2), 2)
        y.mul_(2.0)  # the pooled result is modified in place: the pool stays separate
        return y


def test_pooled_result_modified_in_place_keeps_the_pool_separate() -> None:
    x = random_input(2, 2, 6, 6, dtype=F64)
    model, report = convert_and_compare(PoolThenInPlace, x)
    assert [f.op for f in report.fused] == ["gankernels.conv3x3(act='lrelu', alpha=0.2)"]
    assert len(report.left) == 1
    assert "F.max_pool2d not fused into gankernels.conv3x3(act='lrelu', alpha=0.2)" in report.left[0].reason
    assert "the in-place .mul_() at " + _line_of("y.mul_(2.0)") in report.left[0].reason
    assert ops_run(model, x) == {("conv3x3", "lrelu"): 1}


def test_a_failure_of_the_analysis_leaves_the_forward_as_it_is(monkeypatch) -> None:
    from gankernels.convert.forward_code import ForwardCodeConverter

    def broken(self, owner, node):
        raise RuntimeError("simulated gap")

    monkeypatch.setattr(ForwardCodeConverter, "plan", broken)
    x = random_input(2, 4, 3, 4, dtype=F64)
    model, report = convert_and_compare(UpsampleTail, x)
    assert report.fused == [] and "forward" not in model.__dict__
    assert (report.left[0].path, report.left[0].reason) == (
        "(root)",
        "convert could not analyse its forward (RuntimeError: simulated gap); its forward code is left as it is",
    )
    # Nor are its convs swapped one by one: the forward is not understood.
    assert [e.path for e in report.left[1:]] == ["conv_up1", "conv_up2", "conv_hr", "conv_last"]
    assert all(e.reason.startswith("not swapped: ") for e in report.left[1:])


def test_a_conv_whose_output_is_then_modified_in_place_is_not_swapped_alone() -> None:
    """gankernels' convs keep their output for the backward: a lone swap must not be made
    where an in-place update follows (here: activations that cannot be absorbed)."""

    def make():
        hooked = nn.LeakyReLU(0.2, inplace=True)
        hooked.register_forward_hook(lambda m, i, o: None)  # a hook: never absorbed
        block = DenseBlock()
        block.lrelu = hooked
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), hooked, block, nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())

    x = random_input(2, 4, 4, 4, dtype=F64)
    model, report = convert_and_compare(make, x)
    left = {e.path: e.reason for e in report.left}
    assert set(left) == {"0", "2.conv1", "2.conv2", "2.conv3"}
    assert left["0"].startswith("not swapped: the next module in Sequential (root) (LeakyReLU) runs in place")
    assert left["2.conv1"].startswith("not swapped: its result in 2.forward (" + _line_of("x1 = self.lrelu(self.conv1(x))"))
    assert [type(m) for m in model] == [nn.Conv2d, nn.LeakyReLU, DenseBlock, gknn.Conv3x3, nn.Identity]
    assert type(model[2].conv4) is gknn.Conv2d
    assert ops_run(model, x) == {("conv3x3", "linear"): 1, ("conv3x3", "relu"): 1}


class CallerUpdatesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU())
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        h = self.conv(x) * 1.0
        y = self.up(h)
        h.add_(1.0)  # the Sequential's input, modified after the call: UpConv3x3 keeps it
        return y + F.interpolate(h, scale_factor=2)


def test_sequential_upsample_run_whose_input_the_caller_modifies_is_not_fused() -> None:
    x = random_input(2, 2, 3, 3, dtype=F64)
    model, report = convert_and_compare(CallerUpdatesInput, x)
    assert [type(m) for m in model.up] == [gknn.Upsample, gknn.Conv3x3, nn.Identity]  # Conv3x3 relu, no upsample
    assert model.up[1].act == "relu"
    assert [e.path for e in report.left] == ["up.0"]
    assert "Upsample → Conv2d → ReLU: the upsample is not fused: the in-place .add_() at " in report.left[0].reason


class PooledThenUpdated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.LeakyReLU(0.2), nn.MaxPool2d(2))
        self.head = nn.Conv2d(3, 3, 5, padding=2)  # not a candidate: keeps conv5 stock

    def forward(self, x):
        y = self.block(x)
        y.mul_(2.0)  # updated by the caller: Conv3x3Pool would keep this result
        return self.head(y)


def test_sequential_pool_whose_result_the_caller_modifies_stays_apart() -> None:
    x = random_input(2, 2, 6, 6, dtype=F64)
    model, report = convert_and_compare(PooledThenUpdated, x)
    assert [type(m) for m in model.block] == [gknn.Conv3x3, nn.Identity, gknn.MaxPool2d]
    assert model.block[0].act == "lrelu"
    left = {e.path: e.reason for e in report.left}
    assert left["block.2"] == "not fused into the conv before it: the in-place .mul_() at {} modifies it afterwards".format(
        _line_of("y.mul_(2.0)  # updated by the caller")
    )
    assert ops_run(model, x) == {("conv3x3", "lrelu"): 1, ("max_pool2d", ""): 1}
