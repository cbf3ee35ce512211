"""The eager fast path: what a call costs on the host when nothing is tracing it.

A GAN layer runs for 0.07–0.7 ms on a GPU, and the ``torch.library`` custom-op
machinery costs tens of microseconds per call on the host, so plain eager calls skip
it. The custom ops (:mod:`gankernels.ops.registration`) remain the path whenever
something needs to see them: ``torch.compile``, a ``TorchDispatchMode`` (fake tensors,
``opcheck``, FLOP counters), or tensor subclasses. Both paths run the same backend
code and give the same results.

In eager mode:

* the ``torch`` backend runs the stock composite itself (``F.conv2d`` → activation,
  ``F.interpolate`` → ..., ``F.max_pool2d``) under PyTorch's own autograd, so it saves
  what stock saves, does in its backward what stock does, and allows every in-place use
  of its output that stock allows;
* a fast backend runs through one light ``autograd.Function``; without gradients, its
  kernel is called directly. Its first-order backward is the backend's own; a backward
  that builds a graph (double backward, an R1 penalty) uses the differentiable reference
  formulas, as the custom ops do.

A fast backend's backward may need the forward's output (e.g. the leaky-ReLU
derivative from the sign of ``out``). It keeps a detached alias of it and the
output's version: if the caller modified the output in place afterwards (as stock code
does with ``nn.LeakyReLU(inplace=True)`` after a convolution), the backward recomputes
the forward from the saved inputs instead of failing, so the gradient is stock's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F

from gankernels.ops import reference as ref
from gankernels.ops.dispatch import get_impl

try:  # a stable utility since torch 1.13; without it, dispatch modes cannot be detected
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover

    def _get_current_dispatch_mode():
        return None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def usable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the eager path may serve a call on ``tensors``: not compiling, no dispatch
    mode active, and plain tensors only (no fake tensors or other subclasses)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


def _wants_grad(*tensors: Optional[torch.Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _no_alias(y: torch.Tensor, *inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """A result that is an input (e.g. a linear bias_act without bias) is copied, as the
    custom ops do: callers may modify the result in place."""
    for t in inputs:
        if y is t:
            return y.clone()
    return y


# ----------------------------------------------------------------------------------
# The torch backend: the stock composites, with stock autograd.


def stock_epilogue(act: str, alpha: float, gain: float, clamp: Optional[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ref.epilogue`` specialised to its arguments, with as few Python frames as the
    stock code a user writes (``F.leaky_relu(conv(x), 0.2)``)."""
    if gain == 1 and clamp is None:
        if act == "linear":
            return lambda p: p
        if act == "lrelu":
            return lambda p: F.leaky_relu(p, alpha)
        simple = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu}.get(act)
        if simple is not None:
            return simple
    return lambda p: ref.epilogue(p, act, alpha, gain, clamp)


def stock_conv_runner(op: str, act: str, alpha: float, gain: float, clamp: Optional[float]) -> Callable[..., torch.Tensor]:
    """``run(x, w, b)``: the stock composite of ``op`` (the same ops a user writes)."""
    # torch.max_pool2d is the op F.max_pool2d calls after two Python frames of argument
    # defaulting (stride None -> the kernel size, as the ATen op's empty default does).
    conv2d, max_pool2d, interpolate, leaky_relu = torch.conv2d, torch.max_pool2d, F.interpolate, F.leaky_relu
    if act == "lrelu" and gain == 1 and clamp is None:  # the GAN layer: one Python frame fewer
        if op == "conv3x3":
            return lambda x, w, b: leaky_relu(conv2d(x, w, b, 1, 1), alpha)
        if op == "conv3x3_pool":
            return lambda x, w, b: max_pool2d(leaky_relu(conv2d(x, w, b, 1, 1), alpha), 2)
        return lambda x, w, b: leaky_relu(conv2d(interpolate(x, scale_factor=2, mode="nearest"), w, b, 1, 1), alpha)
    epi = stock_epilogue(act, alpha, gain, clamp)
    if op == "conv3x3":
        return lambda x, w, b: epi(conv2d(x, w, b, 1, 1))
    if op == "conv3x3_pool":
        return lambda x, w, b: max_pool2d(epi(conv2d(x, w, b, 1, 1)), 2)
    return lambda x, w, b: epi(conv2d(interpolate(x, scale_factor=2, mode="nearest"), w, b, 1, 1))


def stock_conv(op: str, x, w, b, act: str, alpha: float, gain: float, clamp: Optional[float]) -> torch.Tensor:
    return stock_conv_runner(op, act, alpha, gain, clamp)(x, w, b)


def stock_bias_act(x, b, act: str, alpha: float, gain: float, clamp: Optional[float], dim: int) -> torch.Tensor:
    """``x + b.view(...)`` then the epilogue: what a user writes (b already has x's dtype)."""
    if b is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        x = x + b.view(shape)
    return ref.epilogue(x, act, alpha, gain, clamp)


# ----------------------------------------------------------------------------------
# Fast backends: one light autograd.Function per op family.


def _out_if_unmodified(ctx, recompute):
    """The forward's output, if the backward needs it: the saved alias when nobody wrote
    to it since, else recomputed (``recompute()`` returns what the forward returned)."""
    out = ctx.out
    if out is None:
        return None, None
    if out._version != ctx.out_version:
        return recompute()
    return out, None


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(x, w, b, op, backend, act, alpha, gain, clamp):
        out, saved = get_impl(op, backend).forward(x=x, w=w, b=b, act=act, alpha=alpha, gain=gain, clamp=clamp)
        return ref.same_memory_format(out, x), saved

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, op, backend, act, alpha, gain, clamp = inputs
        out, saved = output
        ctx.cfg = (op, backend, act, alpha, gain, clamp)
        ctx.mark_non_differentiable(saved)
        ctx.save_for_backward(x, w, b, saved)
        impl = get_impl(op, backend)
        keep = impl.backward is not None and (
            impl.backward_needs_output is None or impl.backward_needs_output(act, alpha, gain, clamp)
        )
        ctx.out = out.detach() if keep else None  # an alias sharing out's version counter
        ctx.out_version = out._version

    @staticmethod
    def backward(ctx, grad, _grad_saved):
        x, w, b, saved = ctx.saved_tensors
        op, backend, act, alpha, gain, clamp = ctx.cfg
        needs = tuple(ctx.needs_input_grad[:3])
        impl = get_impl(op, backend)
        if impl.backward is not None and not torch.is_grad_enabled():
            needs = (needs[0], needs[1], needs[2] and b is not None)

            def recompute():
                out, s = impl.forward(x=x, w=w, b=b, act=act, alpha=alpha, gain=gain, clamp=clamp)
                return ref.same_memory_format(out, x), s

            out, fresh_saved = _out_if_unmodified(ctx, recompute)
            if fresh_saved is not None:
                saved = fresh_saved
            if out is None:
                out = x.new_empty((0,))
            gx, gw, gb = impl.backward(
                grad=grad, x=x, w=w, b=b, out=out, saved=saved, act=act, alpha=alpha, gain=gain, clamp=clamp, needs=needs
            )
            gx = ref.same_memory_format(gx, x) if (gx is not None and needs[0]) else None
            gw = gw if needs[1] else None
            gb = gb if needs[2] else None
        else:
            from gankernels.ops.registration import conv_reference_backward

            gx, gw, gb = conv_reference_backward(op, grad, x, w, b, act, alpha, gain, clamp, needs)
        return gx, gw, gb, None, None, None, None, None, None


def conv(op: str, x, w, b, act: str, alpha: float, gain: float, clamp: Optional[float], backend: str) -> torch.Tensor:
    return conv_runner(op, act, alpha, gain, clamp, backend)(x, w, b)


def conv_runner(op: str, act: str, alpha: float, gain: float, clamp: Optional[float], backend: str) -> Callable[..., torch.Tensor]:
    """``run(x, w, b)`` for one op, epilogue and backend (what the call cache keeps)."""
    if backend == "torch":
        return stock_conv_runner(op, act, alpha, gain, clamp)
    impl = get_impl(op, backend)

    def run(x, w, b):
        if not _wants_grad(x, w, b):
            out, _ = impl.forward(x=x, w=w, b=b, act=act, alpha=alpha, gain=gain, clamp=clamp)
            return ref.same_memory_format(out, x)
        return _Conv.apply(x, w, b, op, backend, act, alpha, gain, clamp)[0]

    return run


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(x, b, backend, act, alpha, gain, clamp, dim):
        y = get_impl("bias_act", backend).forward(x=x, b=b, act=act, alpha=alpha, gain=gain, clamp=clamp, dim=dim)
        return _no_alias(y, x, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, b, backend, act, alpha, gain, clamp, dim = inputs
        ctx.cfg = (backend, act, alpha, gain, clamp, dim)
        # Every backend's bias_act backward works from x (and b): the output is not
        # kept, so it may be modified in place, as stock's may.
        ctx.save_for_backward(x, b)

    @staticmethod
    def backward(ctx, grad):
        x, b = ctx.saved_tensors
        backend, act, alpha, gain, clamp, dim = ctx.cfg
        impl = get_impl("bias_act", backend)
        if impl.backward is not None and not torch.is_grad_enabled():
            need_gb = b is not None and ctx.needs_input_grad[1]
            y = x.new_empty((0,))  # not kept: every backend's bias_act backward works from x and b
            needs = (True, need_gb)
            gx, gb = impl.backward(grad=grad, x=x, b=b, y=y, act=act, alpha=alpha, gain=gain, clamp=clamp, dim=dim, needs=needs)
            gb = gb.to(b.dtype).reshape(b.shape) if need_gb else None
        else:
            from gankernels.ops.registration import bias_act_reference_backward

            gx, gb = bias_act_reference_backward(grad, x, b, act, alpha, gain, clamp, dim, ctx.needs_input_grad[:2])
        return gx, gb, None, None, None, None, None, None


def bias_act(x, b, act: str, alpha: float, gain: float, clamp: Optional[float], dim: int, backend: str) -> torch.Tensor:
    if backend == "torch":
        return _no_alias(stock_bias_act(x, b, act, alpha, gain, clamp, dim), x, b)
    if not _wants_grad(x, b):
        return _no_alias(
            get_impl("bias_act", backend).forward(x=x, b=b, act=act, alpha=alpha, gain=gain, clamp=clamp, dim=dim), x, b
        )
    return _BiasAct.apply(x, b, backend, act, alpha, gain, clamp, dim)


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(x, backend, pool_args):
        out, saved = get_impl("max_pool2d", backend).forward(x=x, **pool_args)
        return ref.same_memory_format(out, x), saved

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, backend, pool_args = inputs
        ctx.cfg = (backend, pool_args)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, output[1])  # what stock saves: the input and the argmax

    @staticmethod
    def backward(ctx, grad, _grad_saved):
        x, saved = ctx.saved_tensors
        backend, pool_args = ctx.cfg
        impl = get_impl("max_pool2d", backend)
        if impl.backward is not None and not torch.is_grad_enabled():
            gx = impl.backward(grad=grad, x=x, saved=saved, **pool_args)
        else:
            if saved.dtype != torch.int64:  # a compact code: recover PyTorch's indices
                p = pool_args
                _, saved = ref.max_pool2d(x.detach(), p["kernel_size"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"])
            gx = ref.max_pool2d_backward(grad, x, saved)
        return gx, None, None


def max_pool2d(x, backend: str, **pool_args: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(values, indices or None)."""
    p = pool_args
    if backend == "torch":
        if p["return_indices"]:
            return F.max_pool2d(x, p["kernel_size"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"], return_indices=True)
        return F.max_pool2d(x, p["kernel_size"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"]), None
    if not _wants_grad(x):
        out, saved = get_impl("max_pool2d", backend).forward(x=x, **p)
        out = ref.same_memory_format(out, x)
    else:
        out, saved = _MaxPool.apply(x, backend, p)
    return out, (saved if p["return_indices"] else None)


class _Upsample(torch.autograd.Function):
    @staticmethod
    def forward(x, backend, scale_factor):
        return _no_alias(get_impl("upsample_nearest2d", backend).forward(x=x, scale_factor=scale_factor), x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.cfg = inputs[1:]  # saves nothing, as stock

    @staticmethod
    def backward(ctx, grad):
        backend, scale_factor = ctx.cfg
        impl = get_impl("upsample_nearest2d", backend)
        if impl.backward is not None and not torch.is_grad_enabled():
            gx = impl.backward(grad=grad, scale_factor=scale_factor)
        else:
            gx = ref.upsample_nearest2d_backward(grad, scale_factor)
        return gx, None, None


def upsample_nearest2d(x, scale_factor: int, backend: str) -> torch.Tensor:
    if backend == "torch":
        return _no_alias(F.interpolate(x, scale_factor=scale_factor, mode="nearest"), x)
    if not _wants_grad(x):
        return _no_alias(get_impl("upsample_nearest2d", backend).forward(x=x, scale_factor=scale_factor), x)
    return _Upsample.apply(x, backend, scale_factor)
