"""gankernels.nn: the drop-in modules against the torch classes and the reference.

The drop-ins (``Conv2d``, ``MaxPool2d``, ``Upsample``) are built with the same
constructor arguments as the torch class, given the same weights, and must agree in
float64 (exactly or to 1e-10) and float32; the fused modules (``Conv3x3``,
``Conv3x3Pool``, ``UpConv3x3``, ``BiasAct``) are checked, with gradients, against the
float64 reference of ``gankernels.ops.reference``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gankernels import nn as gknn
from gankernels.ops import reference as ref
from gankernels.testing import assert_close_rel, random_input

F64, F32 = torch.float64, torch.float32
DTYPES = [F64, F32]



def _grads(y: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    """Gradients of a fixed random projection of ``y`` with respect to ``inputs``."""
    proj = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    return list(torch.autograd.grad((y * proj).sum(), inputs))


# ----------------------------------------------------------------------------------
# Conv2d


CONV_CONFIGS = {
    # fused configurations (run gankernels.conv3x3)
    "3x3_pad1": dict(kernel_size=3, padding=1),
    "3x3_same_nobias": dict(kernel_size=3, padding="same", bias=False),
    "3x3_tuple": dict(kernel_size=(3, 3), padding=(1, 1), stride=(1, 1)),
    # everything else runs as torch
    "5x5": dict(kernel_size=5, padding=2),
    "3x3_stride2": dict(kernel_size=3, stride=2, padding=1),
    "3x3_pad0": dict(kernel_size=3),
    "3x3_groups": dict(kernel_size=3, padding=1, groups=2),
    "3x3_dilation": dict(kernel_size=3, padding=2, dilation=2),
    "3x3_reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "1x1": dict(kernel_size=1),
    "4x4_s2": dict(kernel_size=4, stride=2, padding=1, bias=False),
}
FUSED_CONFIGS = {"3x3_pad1", "3x3_same_nobias", "3x3_tuple"}


def _conv_pair(cfg: dict, dtype: torch.dtype, **epilogue) -> tuple[nn.Conv2d, gknn.Conv2d]:
    stock = nn.Conv2d(4, 6, **cfg, dtype=dtype)
    ours = gknn.Conv2d(4, 6, **cfg, dtype=dtype, backend="torch", **epilogue)
    ours.load_state_dict(stock.state_dict(), strict=True)
    return stock, ours


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONV_CONFIGS)
def test_conv2d_matches_torch(config: str, dtype: torch.dtype) -> None:
    cfg = CONV_CONFIGS[config]
    stock, ours = _conv_pair(cfg, dtype)
    assert ours.fused == (config in FUSED_CONFIGS)
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert ours.extra_repr() == stock.extra_repr()
    assert repr(ours) == repr(stock)
    for layout in ("nchw", "channels_last"):
        x = random_input(2, 4, 7, 9, dtype=dtype, layout=layout).requires_grad_(True)
        y0, y1 = stock(x), ours(x)
        assert y1.dtype == dtype and y1.is_contiguous(memory_format=ref.memory_format_of(y0))
        assert_close_rel(y1, y0)  # float64: 1e-10, float32: 1e-5
        params0 = [x, stock.weight] + ([stock.bias] if stock.bias is not None else [])
        params1 = [x, ours.weight] + ([ours.bias] if ours.bias is not None else [])
        for g1, g0 in zip(_grads(y1, params1), _grads(y0, params0), strict=True):
            assert_close_rel(g1, g0, what="gradient")


@pytest.mark.parametrize("config", ["3x3_pad1", "3x3_same_nobias", "5x5", "3x3_stride2", "3x3_groups"])
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_conv2d_with_epilogue_matches_reference(config: str, act: str) -> None:
    epi = dict(act=act, alpha=0.1, gain=1.5, clamp=0.8)
    stock, ours = _conv_pair(CONV_CONFIGS[config], F64, **epi)
    x = random_input(2, 4, 6, 5, dtype=F64).requires_grad_(True)
    y = ours(x)
    expected = ref.epilogue(stock(x), **epi)  # torch's conv (bias included), then the epilogue
    assert_close_rel(y, expected)
    inputs0 = [x, stock.weight] + ([stock.bias] if stock.bias is not None else [])
    inputs1 = [x, ours.weight] + ([ours.bias] if ours.bias is not None else [])
    for g1, g0 in zip(_grads(y, inputs1), _grads(expected, inputs0), strict=True):
        assert_close_rel(g1, g0, what="gradient")
    # The epilogue shows in the repr, after torch's own fields.
    assert (
        ours.extra_repr()
        == stock.extra_repr() + ", act=" + repr(act) + (", alpha=0.1" if act == "lrelu" else "") + ", gain=1.5, clamp=0.8"
    )


def test_conv2d_same_init_and_defaults_as_torch() -> None:
    torch.manual_seed(3)
    stock = nn.Conv2d(4, 6, 3, padding=1)
    torch.manual_seed(3)
    ours = gknn.Conv2d(4, 6, 3, padding=1)
    assert torch.equal(ours.weight, stock.weight) and torch.equal(ours.bias, stock.bias)
    assert (ours.act, ours.alpha, ours.gain, ours.clamp, ours.backend) == ("linear", 0.2, 1.0, None, None)
    with pytest.raises(ValueError, match="act"):
        gknn.Conv2d(4, 6, 3, act="gelu")


def test_conv2d_unbatched_input_runs_as_torch() -> None:
    stock, ours = _conv_pair(CONV_CONFIGS["3x3_pad1"], F64)
    x = random_input(4, 5, 5, dtype=F64)
    assert_close_rel(ours(x), stock(x))


# ----------------------------------------------------------------------------------
# MaxPool2d


POOL_CONFIGS = {
    "k2": dict(kernel_size=2),
    "k2_ceil": dict(kernel_size=2, ceil_mode=True),
    "k3_s2_p1": dict(kernel_size=3, stride=2, padding=1),
    "k3_s1_p1_ceil": dict(kernel_size=3, stride=1, padding=1, ceil_mode=True),
    "k2x3_s_1x2": dict(kernel_size=(2, 3), stride=(1, 2)),
    "k3_dilation2": dict(kernel_size=3, dilation=2, padding=1),
    "k2_indices": dict(kernel_size=2, return_indices=True),
    "k3_s2_p1_ceil_indices": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, return_indices=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", POOL_CONFIGS)
def test_max_pool2d_matches_torch(config: str, dtype: torch.dtype) -> None:
    cfg = POOL_CONFIGS[config]
    stock, ours = nn.MaxPool2d(**cfg), gknn.MaxPool2d(**cfg, backend="torch")
    assert ours.extra_repr() == stock.extra_repr() and repr(ours) == repr(stock)
    assert ours.state_dict() == {} == stock.state_dict()
    for shape, layout in (((2, 3, 7, 9), "nchw"), ((2, 3, 8, 7), "channels_last"), ((3, 7, 7), "nchw")):
        x = random_input(*shape, dtype=dtype, layout=layout).requires_grad_(True)
        y0, y1 = stock(x), ours(x)
        if cfg.get("return_indices"):
            (y0, i0), (y1, i1) = y0, y1
            assert i1.dtype == torch.int64 and torch.equal(i1, i0)
        assert torch.equal(y1, y0)  # a max is exact
        assert y1.is_contiguous(memory_format=ref.memory_format_of(y0))
        assert torch.equal(_grads(y1, [x])[0], _grads(y0, [x])[0])


# ----------------------------------------------------------------------------------
# Upsample


UPSAMPLE_CONFIGS = {
    "x2": (dict(scale_factor=2), True),
    "x2_float": (dict(scale_factor=2.0), True),
    "x3_nearest": (dict(scale_factor=3, mode="nearest"), True),
    "x2_tuple": (dict(scale_factor=(2, 2)), True),
    "x1.5": (dict(scale_factor=1.5), False),
    "x2x3": (dict(scale_factor=(2, 3)), False),
    "size": (dict(size=(9, 11)), False),
    "bilinear": (dict(scale_factor=2, mode="bilinear"), False),
    "bilinear_align": (dict(scale_factor=2, mode="bilinear", align_corners=True), False),
    "nearest_exact": (dict(scale_factor=2, mode="nearest-exact"), False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", UPSAMPLE_CONFIGS)
def test_upsample_matches_torch(config: str, dtype: torch.dtype) -> None:
    cfg, fused = UPSAMPLE_CONFIGS[config]
    stock, ours = nn.Upsample(**cfg), gknn.Upsample(**cfg, backend="torch")
    assert ours.fused == fused
    assert ours.extra_repr() == stock.extra_repr() and repr(ours) == repr(stock)
    assert ours.state_dict() == {} == stock.state_dict()
    for layout in ("nchw", "channels_last"):
        x = random_input(2, 3, 4, 5, dtype=dtype, layout=layout).requires_grad_(True)
        y0, y1 = stock(x), ours(x)
        if fused:
            assert torch.equal(y1, y0)  # a copy is exact
        else:
            assert_close_rel(y1, y0, tol=1e-10 if dtype == F64 else 1e-6)
        assert y1.is_contiguous(memory_format=ref.memory_format_of(y0))
        assert_close_rel(_grads(y1, [x])[0], _grads(y0, [x])[0], tol=1e-10 if dtype == F64 else 1e-6)


# ----------------------------------------------------------------------------------
# Fused modules against the reference, with gradients.


FUSED = {
    "conv3x3": (gknn.Conv3x3, ref.conv3x3),
    "conv3x3_pool": (gknn.Conv3x3Pool, ref.conv3x3_pool),
    "up_conv3x3": (gknn.UpConv3x3, ref.up_conv3x3_naive),  # the definition, not the rewrite
}
EPILOGUES = [
    dict(act="linear"),
    dict(act="relu", gain=2.0),
    dict(act="lrelu", alpha=0.1, clamp=0.5),
    dict(act="tanh"),
    dict(act="sigmoid", gain=0.5),
    dict(act="silu", gain=1.4, clamp=1.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("epi", EPILOGUES, ids=lambda e: e["act"])
@pytest.mark.parametrize("op", FUSED)
def test_fused_module_matches_reference(op: str, epi: dict, bias: bool, dtype: torch.dtype) -> None:
    cls, reference = FUSED[op]
    m = cls(3, 5, bias, **epi, backend="torch", dtype=dtype)
    assert m.weight.shape == (5, 3, 3, 3) and (m.bias is not None) == bias
    assert list(m.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    for layout in ("nchw", "channels_last", "noncontiguous"):
        x = random_input(2, 3, 5, 7, dtype=dtype, layout=layout).requires_grad_(True)
        y = m(x)
        params = [m.weight] + ([m.bias] if bias else [])
        x64 = x.detach().double().requires_grad_(True)
        p64 = [p.detach().double().requires_grad_(True) for p in params]
        expected = reference(x64, p64[0], p64[1] if bias else None, **epi)
        assert y.dtype == dtype and y.shape == expected.shape
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close_rel(y, expected, dtype=dtype)
        for g, g64 in zip(_grads(y, [x, *params]), _grads(expected, [x64, *p64]), strict=True):
            assert_close_rel(g, g64, dtype=dtype, what="gradient")


def test_fused_module_constructor_and_repr() -> None:
    torch.manual_seed(5)
    stock = nn.Conv2d(4, 6, 3, padding=1)
    torch.manual_seed(5)
    fused = gknn.Conv3x3(4, 6)
    # Same initialisation as nn.Conv2d, parameter for parameter.
    assert torch.equal(fused.weight, stock.weight) and torch.equal(fused.bias, stock.bias)
    assert repr(fused) == "Conv3x3(4, 6, act='linear')"
    assert (
        repr(gknn.UpConv3x3(4, 6, False, "lrelu", 0.1, gain=2.0, clamp=3.0))
        == "UpConv3x3(4, 6, bias=False, act='lrelu', alpha=0.1, gain=2.0, clamp=3.0)"
    )
    assert repr(gknn.Conv3x3Pool(4, 6, act="relu")) == "Conv3x3Pool(4, 6, act='relu')"
    with pytest.raises(ValueError, match="act"):
        gknn.Conv3x3(4, 6, act="gelu")
    with pytest.raises(ValueError, match="clamp"):
        gknn.Conv3x3(4, 6, clamp=-1.0)


@pytest.mark.parametrize("dim", [1, -1, 0])
@pytest.mark.parametrize("epi", EPILOGUES, ids=lambda e: e["act"])
def test_bias_act_module_matches_reference(epi: dict, dim: int) -> None:
    x = random_input(3, 4, 5, dtype=F64).requires_grad_(True)
    m = gknn.BiasAct(x.shape[dim], **epi, dim=dim, backend="torch", dtype=F64)
    assert list(m.state_dict()) == ["bias"] and torch.equal(m.bias, torch.zeros_like(m.bias))
    with torch.no_grad():
        m.bias.copy_(random_input(x.shape[dim], dtype=F64))  # a zero bias would test nothing
    y = m(x)
    x64 = x.detach().clone().requires_grad_(True)
    b64 = m.bias.detach().clone().requires_grad_(True)
    expected = ref.bias_act(x64, b64, **epi, dim=dim % x.dim())
    assert_close_rel(y, expected)
    for g, g64 in zip(_grads(y, [x, m.bias]), _grads(expected, [x64, b64]), strict=True):
        assert_close_rel(g, g64, what="gradient")
    # No bias: only the epilogue.
    nobias = gknn.BiasAct(None, **epi, backend="torch")
    assert nobias.bias is None and nobias.state_dict() == {}
    assert_close_rel(nobias(x), ref.epilogue(x.detach(), epi["act"], epi.get("alpha", 0.2), epi.get("gain", 1.0), epi.get("clamp")))


def test_bias_act_float32_and_repr() -> None:
    m = gknn.BiasAct(4, act="lrelu", backend="torch")
    with torch.no_grad():
        m.bias.copy_(random_input(4))
    x = random_input(2, 4, 3, 3, layout="channels_last")
    assert_close_rel(m(x), ref.bias_act(x.double(), m.bias.detach().double(), "lrelu"), dtype=F32)
    assert repr(m) == "BiasAct(4, act='lrelu', alpha=0.2)"
    assert repr(gknn.BiasAct(None, dim=2)) == "BiasAct(None, act='linear', dim=2)"


# ----------------------------------------------------------------------------------
# State dicts between stock and gankernels models; autocast.


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_state_dicts_move_between_conv2d_and_conv3x3(bias: bool) -> None:
    stock = nn.Conv2d(4, 6, 3, padding=1, bias=bias, dtype=F64)
    fused = gknn.Conv3x3(4, 6, bias, act="lrelu", backend="torch", dtype=F64)
    fused.load_state_dict(stock.state_dict(), strict=True)
    x = random_input(2, 4, 5, 5, dtype=F64)
    assert_close_rel(fused(x), F.leaky_relu(stock(x), 0.2))
    # ... and back, from a freshly initialised fused module.
    fused2 = gknn.Conv3x3(4, 6, bias, dtype=F64)
    stock.load_state_dict(fused2.state_dict(), strict=True)
    assert_close_rel(fused2(x), stock(x))
    # The drop-in Conv2d and the up/pool blocks share the keys too.
    for other in (gknn.Conv2d(4, 6, 3, padding=1, bias=bias), gknn.UpConv3x3(4, 6, bias), gknn.Conv3x3Pool(4, 6, bias)):
        other.load_state_dict(stock.state_dict(), strict=True)


@pytest.mark.parametrize("cls", [gknn.Conv3x3, gknn.Conv2d])
def test_autocast_bf16_like_conv2d(cls: type) -> None:
    stock = nn.Conv2d(8, 16, 3, padding=1)
    ours = cls(8, 16, 3, padding=1) if cls is gknn.Conv2d else cls(8, 16)
    ours.backend = "torch"
    ours.load_state_dict(stock.state_dict(), strict=True)
    x = random_input(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0, y1 = stock(x), ours(x)
    assert y0.dtype == torch.bfloat16 and y1.dtype == torch.bfloat16
    assert_close_rel(y1, y0.float(), dtype=torch.bfloat16)
    # Outside autocast: float32 again, and the parameters were never cast.
    assert ours(x).dtype == F32 and ours.weight.dtype == F32
