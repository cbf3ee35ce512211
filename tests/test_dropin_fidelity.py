"""The drop-in fidelity matrix (issue 18): every gankernels module against the stock
module (or stock composite) it replaces, in the same test, under what user code does
to a layer: in-place ops on its output, ``no_grad`` and ``inference_mode``, gradients
to only some inputs, hooks, ``deepcopy``, pickling, ``torch.jit.trace``, ``state_dict``
round trips, ``.half()`` / ``.to(torch.bfloat16)`` / ``.to(memory_format=...)``.

Stock semantics are the specification: where stock accepts something, gankernels must
accept it and give the same values (to float32 tolerance) and gradients; where stock
raises, gankernels may raise too. In-place use of a module's output (issue 18 item 1)
works: the eager path saves what stock saves, or recomputes (gankernels.ops.eager).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gankernels.nn as gknn
from gankernels.testing import assert_close_rel

# ----------------------------------------------------------------------------------
# Stock twins of the fused modules: the same parameters (names, shapes, init), the
# forward written with stock ops.


class _StockFused(nn.Module):
    def __init__(self, ours: nn.Module, forward: Callable):
        super().__init__()
        self.weight = nn.Parameter(ours.weight.detach().clone())
        self.bias = None if ours.bias is None else nn.Parameter(ours.bias.detach().clone())
        self._forward = forward

    def forward(self, x):
        return self._forward(x, self.weight, self.bias)


def _lrelu(t):
    return F.leaky_relu(t, 0.2) * 1.41


PAIRS: dict[str, Callable[[], tuple[nn.Module, nn.Module, tuple[int, ...]]]] = {}


def _pair(name):
    def register(fn):
        PAIRS[name] = fn
        return fn

    return register


@_pair("Conv2d")
def _conv2d():
    ours = gknn.Conv2d(4, 6, 3, padding=1)
    stock = nn.Conv2d(4, 6, 3, padding=1)
    stock.load_state_dict(ours.state_dict())
    return ours, stock, (2, 4, 6, 5)


@_pair("Conv2d+lrelu")
def _conv2d_act():
    ours = gknn.Conv2d(4, 6, 3, padding=1, act="lrelu", gain=1.41)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    conv.load_state_dict(ours.state_dict())
    stock = _StockFused(ours, lambda x, w, b: _lrelu(F.conv2d(x, w, b, padding=1)))
    return ours, stock, (2, 4, 6, 5)


@_pair("MaxPool2d")
def _max_pool():
    return gknn.MaxPool2d(2), nn.MaxPool2d(2), (2, 4, 6, 5)


@_pair("MaxPool2d(3,2,1)")
def _max_pool_3():
    return gknn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1), (2, 4, 7, 6)


@_pair("Upsample")
def _upsample():
    return gknn.Upsample(scale_factor=2), nn.Upsample(scale_factor=2), (2, 4, 3, 5)


@_pair("Conv3x3")
def _conv3x3():
    ours = gknn.Conv3x3(4, 6, act="lrelu", gain=1.41)
    return ours, _StockFused(ours, lambda x, w, b: _lrelu(F.conv2d(x, w, b, padding=1))), (2, 4, 6, 5)


@_pair("Conv3x3Pool")
def _conv3x3_pool():
    ours = gknn.Conv3x3Pool(4, 6, act="lrelu", gain=1.41)
    return ours, _StockFused(ours, lambda x, w, b: F.max_pool2d(_lrelu(F.conv2d(x, w, b, padding=1)), 2)), (2, 4, 6, 5)


@_pair("UpConv3x3")
def _up_conv3x3():
    ours = gknn.UpConv3x3(4, 6, act="lrelu", gain=1.41)
    return (
        ours,
        _StockFused(ours, lambda x, w, b: _lrelu(F.conv2d(F.interpolate(x, scale_factor=2), w, b, padding=1))),
        (2, 4, 3, 4),
    )


@_pair("BiasAct")
def _bias_act():
    ours = gknn.BiasAct(4, act="lrelu", gain=1.41)
    with torch.no_grad():
        ours.bias.normal_()
    stock = _StockFused.__new__(_StockFused)
    nn.Module.__init__(stock)
    stock.bias = nn.Parameter(ours.bias.detach().clone())
    stock._forward = lambda x, w, b: _lrelu(x + b.view(1, -1, 1, 1))
    stock.weight = None
    return ours, stock, (2, 4, 6, 5)


def _make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    ours, stock, shape = PAIRS[name]()
    x = torch.randn(shape)
    return ours, stock, x


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p for p in m.parameters()]


def _run(m: nn.Module, x: torch.Tensor, after: Callable[[torch.Tensor], torch.Tensor], x_grad: bool = True):
    """Forward, ``after`` on the output (in place or not), backward; returns the output
    and the gradients of x (if asked) and of every parameter."""
    x = x.detach().clone().requires_grad_(x_grad)
    for p in m.parameters():
        p.grad = None
    y = after(m(x))
    y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
    return y.detach(), ([x.grad] if x_grad else []) + [p.grad for p in _params(m)]


def _assert_same(ours_result, stock_result, what: str):
    (y, grads), (want, want_grads) = ours_result, stock_result
    assert_close_rel(y, want, what=f"{what}: output")
    assert len(grads) == len(want_grads)
    for i, (g, w) in enumerate(zip(grads, want_grads, strict=True)):
        assert (g is None) == (w is None), f"{what}: gradient {i} is {g} where stock's is {w}"
        if g is not None:
            assert_close_rel(g, w, what=f"{what}: gradient {i}")


# ----------------------------------------------------------------------------------
# In-place ops on the output.

INPLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu_": lambda y: y.relu_(),
    "leaky_relu_inplace": lambda y: F.leaky_relu(y, 0.2, inplace=True),
    "add_": lambda y: y.add_(1.0),
    "mul_": lambda y: y.mul_(2.0),
    "nn.ReLU(inplace=True)": lambda y: nn.ReLU(inplace=True)(y),
}


@pytest.mark.parametrize("op", list(INPLACE))
@pytest.mark.parametrize("name", list(PAIRS))
def test_inplace_op_after_the_module(name, op):
    ours, stock, x = _make(name)
    try:
        want = _run(stock, x, INPLACE[op])
    except RuntimeError as e:  # stock refuses too (it saved the output): nothing to match
        pytest.skip(f"stock refuses: {str(e).splitlines()[0][:80]}")
    _assert_same(_run(ours, x, INPLACE[op]), want, f"{name} then {op}")


# ----------------------------------------------------------------------------------
# Grad modes and partial requires_grad.


@pytest.mark.parametrize("name", list(PAIRS))
def test_no_grad_and_inference_mode(name):
    ours, stock, x = _make(name)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y, want = ours(x), stock(x)
        assert_close_rel(y, want, what=f"{name} under {mode.__name__}")
        assert y.requires_grad == want.requires_grad is False
        assert y.is_inference() == want.is_inference(), mode.__name__
        # An inference tensor takes in-place ops inside the mode, as stock's does.
        with mode():
            assert_close_rel(ours(x).add_(1.0), stock(x).add_(1.0), what=f"{name} add_ under {mode.__name__}")


@pytest.mark.parametrize("which", ["input_only", "params_only", "weight_only"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_requires_grad_on_only_some_inputs(name, which):
    ours, stock, x = _make(name)
    results = []
    for m in (ours, stock):
        params = dict(m.named_parameters())
        for pname, p in params.items():
            p.requires_grad_(which == "params_only" or (which == "weight_only" and pname == "weight"))
        if not any(p.requires_grad for p in params.values()) and which != "input_only":
            pytest.skip("no parameter to train")
        results.append(_run(m, x, lambda y: y, x_grad=which == "input_only"))
    _assert_same(results[0], results[1], f"{name} ({which})")


# ----------------------------------------------------------------------------------
# Hooks, copies, pickling, tracing, state_dict.


@pytest.mark.parametrize("name", list(PAIRS))
def test_hooks_see_what_stock_hooks_see(name):
    ours, stock, x = _make(name)
    seen = []
    for m in (ours, stock):
        log: dict[str, list] = {"pre": [], "fwd": [], "bwd": []}
        m.register_forward_pre_hook(lambda mod, args, log=log: log["pre"].append(args[0].shape))
        m.register_forward_hook(lambda mod, args, out, log=log: log["fwd"].append(out.detach().clone()))
        m.register_full_backward_hook(
            lambda mod, gin, gout, log=log: log["bwd"].append(([g for g in gin if g is not None], [g.clone() for g in gout]))
        )
        _run(m, x, lambda y: y * 1.0)
        seen.append(log)
    ours_log, stock_log = seen
    assert ours_log["pre"] == stock_log["pre"]
    assert_close_rel(ours_log["fwd"][0], stock_log["fwd"][0], what=f"{name} forward hook")
    assert len(ours_log["bwd"]) == len(stock_log["bwd"]) == 1
    (gin, gout), (want_in, want_out) = ours_log["bwd"][0], stock_log["bwd"][0]
    assert len(gin) == len(want_in) and len(gout) == len(want_out)
    for g, w in zip(gin + gout, want_in + want_out, strict=True):
        assert_close_rel(g, w, what=f"{name} backward hook")


@pytest.mark.parametrize("name", list(PAIRS))
def test_deepcopy_and_pickle_give_an_equal_independent_module(name):
    ours, _, x = _make(name)
    want = ours(x)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is type(ours) and repr(clone) == repr(ours)
        assert torch.equal(clone(x), want)
        for p, q in zip(clone.parameters(), ours.parameters(), strict=True):
            assert p is not q and p.data_ptr() != q.data_ptr() and torch.equal(p, q)


# Tracing bakes in the argument checks' shape comparisons (as it does stock's); torch
# 2.14 also announces that jit.trace is deprecated.
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
@pytest.mark.parametrize("name", list(PAIRS))
def test_jit_trace_as_stock(name):
    ours, stock, x = _make(name)
    want = torch.jit.trace(stock, (x,), check_trace=False)(x)
    traced = torch.jit.trace(ours, (x,), check_trace=False)
    assert_close_rel(traced(x), want, what=f"{name} traced")
    x2 = torch.randn_like(x)
    assert_close_rel(traced(x2), stock(x2), what=f"{name} traced, new input")


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_dict_round_trips_with_stock(name):
    ours, stock, x = _make(name)
    assert list(ours.state_dict()) == list(stock.state_dict())
    with torch.no_grad():
        for p in stock.parameters():
            p.add_(0.25)
    ours.load_state_dict(stock.state_dict())
    assert_close_rel(ours(x), stock(x), what=f"{name} after loading stock's state_dict")
    fresh = copy.deepcopy(stock)
    fresh.load_state_dict(ours.state_dict())
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, stock.state_dict()[k]), k


# ----------------------------------------------------------------------------------
# Dtype and memory-format conversions of the module.

CONVERSIONS = {
    "half": (lambda m: m.half(), torch.float16, torch.contiguous_format),
    "bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16, torch.contiguous_format),
    "channels_last": (lambda m: m.to(memory_format=torch.channels_last), torch.float32, torch.channels_last),
}


@pytest.mark.parametrize("conv", list(CONVERSIONS))
@pytest.mark.parametrize("name", list(PAIRS))
def test_module_conversions_as_stock(name, conv):
    ours, stock, x = _make(name)
    convert, dtype, fmt = CONVERSIONS[conv]
    ours, stock = convert(ours), convert(stock)
    for p, q in zip(ours.parameters(), stock.parameters(), strict=True):
        assert p.dtype == q.dtype == dtype and p.stride() == q.stride()
    x = x.to(dtype).contiguous(memory_format=fmt)
    y, want = _run(ours, x, lambda y: y), _run(stock, x, lambda y: y)
    assert y[0].dtype == want[0].dtype == dtype
    assert y[0].stride() == want[0].stride(), f"{name} {conv}: strides {y[0].stride()} != stock's {want[0].stride()}"
    # Low precision: stock and gankernels round differently; compare each with float64.
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    _assert_close_at(y, want, tol, f"{name} {conv}")


def _assert_close_at(ours_result, stock_result, tol, what):
    (y, grads), (want, want_grads) = ours_result, stock_result
    assert_close_rel(y, want, tol=tol, what=f"{what}: output")
    for i, (g, w) in enumerate(zip(grads, want_grads, strict=True)):
        assert_close_rel(g, w, tol=tol, what=f"{what}: gradient {i}")


# ----------------------------------------------------------------------------------
# A model as GAN code commonly writes it, converted.


class _Block(nn.Module):
    """``self.act(self.conv(x))`` with an in-place activation (DCGAN/pix2pix/ESRGAN style)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


@pytest.mark.parametrize(
    "act",
    [
        pytest.param(lambda: nn.LeakyReLU(0.2, inplace=True), id="LeakyReLU(inplace)"),
        pytest.param(lambda: nn.ReLU(inplace=True), id="ReLU(inplace)"),
        pytest.param(lambda: nn.LeakyReLU(0.2), id="LeakyReLU"),
    ],
)
def test_converted_model_with_an_inplace_activation_trains_as_stock(act):
    import gankernels

    torch.manual_seed(0)
    stock = nn.Sequential(_Block(act()), nn.Conv2d(6, 3, 3, padding=1), act())
    ours = copy.deepcopy(stock)
    gankernels.convert(ours)
    x = torch.randn(2, 4, 6, 5)
    _assert_same(_run(ours, x, lambda y: y), _run(stock, x, lambda y: y), "converted model")
