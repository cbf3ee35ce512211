"""The ops as ``torch.library`` custom ops in the ``gankernels`` namespace.

Each op takes its (validated) arguments plus the name of the backend chosen by
``gankernels.ops.dispatch`` and runs that backend's implementation. Registered with
fake kernels (so ``torch.compile(fullgraph=True)`` traces them), and autograd:

* the first-order backward uses the backend's own ``backward`` when it has one;
* otherwise, and always when a graph of the backward is being built (double
  backward, e.g. an R1 penalty), the reference formulas of
  ``gankernels.ops.reference``, which are differentiable.

A backend's fast backward runs inside its own opaque custom op
(``gankernels::<op>_backward``, with a fake kernel), because AOTAutograd traces the
backward with fake tensors under ``torch.compile`` and a raw kernel launch cannot run on
those.

The 3×3 ops return ``(out, saved)``: ``saved`` is whatever the backend keeps for its
backward (empty for the reference). Autocast is applied in ``functional`` before the
op is called, as ``F.conv2d`` does.
"""

from __future__ import annotations

from typing import Optional

import torch

from gankernels.ops import eager
from gankernels.ops import reference as ref
from gankernels.ops.dispatch import get_impl

LIB = "gankernels"


def _empty_saved(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


def _unaliased(t: torch.Tensor, inputs: tuple) -> torch.Tensor:
    """Custom ops may not return an input (or a view of one): copy in that case."""
    for i in inputs:
        if isinstance(i, torch.Tensor) and (
            t is i or (i.numel() and t.untyped_storage().data_ptr() == i.untyped_storage().data_ptr())
        ):
            return t.clone()
    return t


def _fresh(t: torch.Tensor, like: torch.Tensor, inputs: tuple) -> torch.Tensor:
    """``t`` in ``like``'s memory format, and not an input (custom ops may not return one)."""
    out = ref.same_memory_format(t, like)
    return _unaliased(out, inputs) if out is t else out


# ----------------------------------------------------------------------------------
# bias_act


@torch.library.custom_op(f"{LIB}::bias_act", mutates_args=())
def bias_act_op(
    x: torch.Tensor, b: Optional[torch.Tensor], act: str, alpha: float, gain: float, clamp: Optional[float], dim: int, backend: str
) -> torch.Tensor:
    y = get_impl("bias_act", backend).forward(x=x, b=b, act=act, alpha=alpha, gain=gain, clamp=clamp, dim=dim)
    # An elementwise result: laid out as torch.empty_like(x) (a view's stride order kept).
    if y.stride() != (like := torch.empty_like(x)).stride() and y.numel() > 1:
        y = like.copy_(y)
    return _unaliased(y, (x, b))


@bias_act_op.register_fake
def _(x, b, act, alpha, gain, clamp, dim, backend):
    return torch.empty_like(x)


def _bias_act_setup(ctx, inputs, output):
    x, b, act, alpha, gain, clamp, dim, backend = inputs
    ctx.cfg = (act, alpha, gain, clamp, dim, backend)
    # Every backend's backward works from x and b: the output is not kept, so it may be
    # modified in place, as stock's may.
    ctx.save_for_backward(x, b)


@torch.library.custom_op(f"{LIB}::bias_act_backward", mutates_args=())
def bias_act_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    b: Optional[torch.Tensor],
    y: torch.Tensor,
    act: str,
    alpha: float,
    gain: float,
    clamp: Optional[float],
    dim: int,
    need_gb: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend's first-order backward: (gx, gb); gb is empty when there is no bias
    or it needs no gradient (then the backend skips its reduction)."""
    need_gb = need_gb and b is not None
    impl = get_impl("bias_act", backend)
    gx, gb = impl.backward(grad=grad, x=x, b=b, y=y, act=act, alpha=alpha, gain=gain, clamp=clamp, dim=dim, needs=(True, need_gb))
    gx = _fresh(gx, x, (grad, x, y))
    gb = gb.to(b.dtype).contiguous() if need_gb else _empty_saved(x)
    return gx, gb


@bias_act_backward_op.register_fake
def _(grad, x, b, y, act, alpha, gain, clamp, dim, need_gb, backend):
    gb = torch.empty_like(b, memory_format=torch.contiguous_format) if (need_gb and b is not None) else _empty_saved(x)
    return torch.empty_like(x, memory_format=ref.memory_format_of(x)), gb


def bias_act_reference_backward(grad, x, b, act, alpha, gain, clamp, dim, needs) -> tuple:
    """The backward without a backend kernel: while a graph is built (double backward),
    stock's own autograd of ``x + b`` → epilogue on the saved inputs, so second-order
    gradients are stock's (a bias under leaky ReLU gets its zero, not None); else the
    reference formulas."""
    if not torch.is_grad_enabled():
        return ref.bias_act_backward(grad, x, b, act, alpha, gain, clamp, dim)
    pairs = [(t, bool(need) and t is not None) for t, need in zip((x, b), needs, strict=False)]
    wanted = [t for t, want in pairs if want]
    if not wanted:
        return None, None
    with torch.enable_grad():
        y = eager.stock_bias_act(x, None if b is None else b.to(x.dtype), act, alpha, gain, clamp, dim)
        got = iter(torch.autograd.grad(y, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(got) if want else None for _, want in pairs)


def _bias_act_backward(ctx, grad):
    x, b = ctx.saved_tensors
    act, alpha, gain, clamp, dim, backend = ctx.cfg
    impl = get_impl("bias_act", backend)
    if impl.backward is not None and not torch.is_grad_enabled():
        need_gb = b is not None and ctx.needs_input_grad[1]
        gx, gb = bias_act_backward_op(grad, x, b, _empty_saved(x), act, alpha, gain, clamp, dim, need_gb, backend)
        gb = gb if need_gb else None
    else:
        gx, gb = bias_act_reference_backward(grad, x, b, act, alpha, gain, clamp, dim, ctx.needs_input_grad[:2])
    return gx, gb, None, None, None, None, None, None


bias_act_op.register_autograd(_bias_act_backward, setup_context=_bias_act_setup)


# ----------------------------------------------------------------------------------
# conv3x3, conv3x3_pool, up_conv3x3: one pattern, three shapes.


def _conv_out_shape(op: str, x: torch.Tensor, w: torch.Tensor) -> tuple:
    n, _, h, wd = x.shape
    co = w.shape[0]
    if op == "conv3x3":
        return (n, co, h, wd)
    if op == "conv3x3_pool":
        return (n, co, h // 2, wd // 2)
    return (n, co, 2 * h, 2 * wd)


CONV_REFERENCE_BACKWARD = {
    "conv3x3": ref.conv3x3_backward,
    "conv3x3_pool": ref.conv3x3_pool_backward,
    "up_conv3x3": ref.up_conv3x3_backward,
}


def conv_backward_with_graph(op: str, grad, x, w, b, act, alpha, gain, clamp, needs) -> tuple:
    """The first-order gradients as a differentiable graph (double backward: an R1
    penalty), taken from the stock composite's own autograd on the saved inputs: the
    second-order terms are then stock's to the letter, including the zero gradients its
    derivative formulas give (e.g. a conv bias under an R1 penalty through leaky ReLU,
    which the reference formulas would leave None, and Adam would then skip)."""
    wanted = [t for t, need in zip((x, w, b), needs, strict=False) if need and t is not None]
    if not wanted:
        return None, None, None
    with torch.enable_grad():
        y = eager.stock_conv(op, x, w, b, act, alpha, gain, clamp)
        got = iter(torch.autograd.grad(y, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(got) if (need and t is not None) else None for t, need in zip((x, w, b), needs, strict=False))


def conv_reference_backward(op: str, grad, x, w, b, act, alpha, gain, clamp, needs) -> tuple:
    """The backward without a backend kernel: a graph of stock's when one is being built
    (double backward), else the reference formulas (what ``torch.compile`` traces)."""
    if torch.is_grad_enabled():
        return conv_backward_with_graph(op, grad, x, w, b, act, alpha, gain, clamp, needs)
    return CONV_REFERENCE_BACKWARD[op](grad, x, w, b, act, alpha, gain, clamp, needs)


def _make_conv_op(op: str):
    @torch.library.custom_op(f"{LIB}::{op}", mutates_args=())
    def conv_op(
        x: torch.Tensor,
        w: torch.Tensor,
        b: Optional[torch.Tensor],
        act: str,
        alpha: float,
        gain: float,
        clamp: Optional[float],
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, saved = get_impl(op, backend).forward(x=x, w=w, b=b, act=act, alpha=alpha, gain=gain, clamp=clamp)
        return ref.same_memory_format(out, x), saved

    @conv_op.register_fake
    def _(x, w, b, act, alpha, gain, clamp, backend):
        out = x.new_empty(_conv_out_shape(op, x, w)).contiguous(memory_format=ref.memory_format_of(x))
        fake_saved = get_impl(op, backend).fake_saved
        saved = _empty_saved(x) if fake_saved is None else fake_saved(x=x, w=w, b=b, act=act, alpha=alpha, gain=gain, clamp=clamp)
        return out, saved

    def setup(ctx, inputs, output):
        x, w, b, act, alpha, gain, clamp, backend = inputs
        ctx.cfg = (act, alpha, gain, clamp, backend)
        impl = get_impl(op, backend)
        keep_out = impl.backward is not None and (
            impl.backward_needs_output is None or impl.backward_needs_output(act, alpha, gain, clamp)
        )
        # The output is kept only for a backward that reads it (then, as for any saved
        # output, modifying it in place makes the backward raise; the eager path in
        # gankernels.ops.eager recomputes instead).
        ctx.save_for_backward(x, w, b, output[0] if keep_out else _empty_saved(x), output[1])
        ctx.mark_non_differentiable(output[1])

    @torch.library.custom_op(f"{LIB}::{op}_backward", mutates_args=())
    def backward_op(
        grad: torch.Tensor,
        x: torch.Tensor,
        w: torch.Tensor,
        b: Optional[torch.Tensor],
        out: torch.Tensor,
        saved: torch.Tensor,
        act: str,
        alpha: float,
        gain: float,
        clamp: Optional[float],
        needs: list[bool],
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The backend's first-order backward: (gx, gw, gb), each empty where not needed."""
        grads = get_impl(op, backend).backward(
            grad=grad, x=x, w=w, b=b, out=out, saved=saved, act=act, alpha=alpha, gain=gain, clamp=clamp, needs=tuple(needs)
        )
        return tuple(
            _empty_saved(x) if (g is None or not need) else _fresh(g, like, (grad, x, w, out))
            for g, like, need in zip(grads, (x, w, b if b is not None else x), needs, strict=False)
        )

    @backward_op.register_fake
    def _(grad, x, w, b, out, saved, act, alpha, gain, clamp, needs, backend):
        likes = (x, w, b)
        return tuple(
            torch.empty_like(like, memory_format=ref.memory_format_of(like)) if (need and like is not None) else _empty_saved(x)
            for like, need in zip(likes, needs, strict=False)
        )

    def backward(ctx, grad, _grad_saved):
        x, w, b, out, saved = ctx.saved_tensors
        act, alpha, gain, clamp, backend = ctx.cfg
        needs = tuple(ctx.needs_input_grad[:3])
        impl = get_impl(op, backend)
        if impl.backward is not None and not torch.is_grad_enabled():
            needs = (needs[0], needs[1], needs[2] and b is not None)
            grads = backward_op(grad, x, w, b, out, saved, act, alpha, gain, clamp, list(needs), backend)
            gx, gw, gb = (g if need else None for g, need in zip(grads, needs, strict=False))
        else:
            gx, gw, gb = conv_reference_backward(op, grad, x, w, b, act, alpha, gain, clamp, needs)
        return gx, gw, gb, None, None, None, None, None

    conv_op.register_autograd(backward, setup_context=setup)
    return conv_op


conv3x3_op = _make_conv_op("conv3x3")
conv3x3_pool_op = _make_conv_op("conv3x3_pool")
up_conv3x3_op = _make_conv_op("up_conv3x3")


# ----------------------------------------------------------------------------------
# max_pool2d (4-D input). Returns (values, saved): with return_indices, ``saved`` is
# PyTorch's int64 flat per-plane indices; without, whatever the backend keeps for its
# backward (e.g. a 1-byte window position: int64 indices would be most of the bytes a
# bf16 pool moves).


@torch.library.custom_op(f"{LIB}::max_pool2d", mutates_args=())
def max_pool2d_op(
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    return_indices: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, saved = get_impl("max_pool2d", backend).forward(
        x=x,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        ceil_mode=ceil_mode,
        return_indices=return_indices,
    )
    return ref.same_memory_format(out, x), ref.same_memory_format(saved, x) if saved.dim() == 4 else saved


@max_pool2d_op.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices, backend):
    n, c, h, w = x.shape
    ho = ref.pool_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    wo = ref.pool_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    fmt = ref.memory_format_of(x)
    out = x.new_empty((n, c, ho, wo)).contiguous(memory_format=fmt)
    fake_saved = get_impl("max_pool2d", backend).fake_saved
    if return_indices or fake_saved is None:
        saved = x.new_empty((n, c, ho, wo), dtype=torch.int64).contiguous(memory_format=fmt)
    else:
        saved = fake_saved(
            x=x,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            ceil_mode=ceil_mode,
            return_indices=return_indices,
        )
    return out, saved


def _max_pool_setup(ctx, inputs, output):
    x, kernel_size, stride, padding, dilation, ceil_mode, return_indices, backend = inputs
    ctx.cfg = (kernel_size, stride, padding, dilation, ceil_mode, return_indices, backend)
    ctx.save_for_backward(x, output[1])
    ctx.mark_non_differentiable(output[1])


@torch.library.custom_op(f"{LIB}::max_pool2d_backward", mutates_args=())
def max_pool2d_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    saved: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    return_indices: bool,
    backend: str,
) -> torch.Tensor:
    gx = get_impl("max_pool2d", backend).backward(
        grad=grad,
        x=x,
        saved=saved,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        ceil_mode=ceil_mode,
        return_indices=return_indices,
    )
    return _fresh(gx, x, (grad, x))


@max_pool2d_backward_op.register_fake
def _(grad, x, saved, kernel_size, stride, padding, dilation, ceil_mode, return_indices, backend):
    return torch.empty_like(x, memory_format=ref.memory_format_of(x))


def _max_pool_backward(ctx, grad, _grad_saved):
    x, saved = ctx.saved_tensors
    kernel_size, stride, padding, dilation, ceil_mode, return_indices, backend = ctx.cfg
    impl = get_impl("max_pool2d", backend)
    if impl.backward is not None and not torch.is_grad_enabled():
        gx = max_pool2d_backward_op(grad, x, saved, kernel_size, stride, padding, dilation, ceil_mode, return_indices, backend)
    else:
        if saved.dtype != torch.int64:
            # The backend kept a compact code: recover PyTorch's indices (same argmax rule).
            _, saved = ref.max_pool2d(x.detach(), kernel_size, stride, padding, dilation, ceil_mode)
        gx = ref.max_pool2d_backward(grad, x, saved)
    return gx, None, None, None, None, None, None, None


max_pool2d_op.register_autograd(_max_pool_backward, setup_context=_max_pool_setup)


# ----------------------------------------------------------------------------------
# upsample_nearest2d


@torch.library.custom_op(f"{LIB}::upsample_nearest2d", mutates_args=())
def upsample_nearest2d_op(x: torch.Tensor, scale_factor: int, backend: str) -> torch.Tensor:
    y = get_impl("upsample_nearest2d", backend).forward(x=x, scale_factor=scale_factor)
    return _fresh(y, x, (x,))


@upsample_nearest2d_op.register_fake
def _(x, scale_factor, backend):
    n, c, h, w = x.shape
    return x.new_empty((n, c, h * scale_factor, w * scale_factor)).contiguous(memory_format=ref.memory_format_of(x))


def _upsample_setup(ctx, inputs, output):
    _, scale_factor, backend = inputs
    ctx.cfg = (scale_factor, backend)


@torch.library.custom_op(f"{LIB}::upsample_nearest2d_backward", mutates_args=())
def upsample_nearest2d_backward_op(grad: torch.Tensor, scale_factor: int, backend: str) -> torch.Tensor:
    gx = get_impl("upsample_nearest2d", backend).backward(grad=grad, scale_factor=scale_factor)
    return _fresh(gx, grad, (grad,))


@upsample_nearest2d_backward_op.register_fake
def _(grad, scale_factor, backend):
    n, c, h, w = grad.shape
    return grad.new_empty((n, c, h // scale_factor, w // scale_factor)).contiguous(memory_format=ref.memory_format_of(grad))


def _upsample_backward(ctx, grad):
    scale_factor, backend = ctx.cfg
    impl = get_impl("upsample_nearest2d", backend)
    if impl.backward is not None and not torch.is_grad_enabled():
        gx = upsample_nearest2d_backward_op(grad, scale_factor, backend)
    else:
        gx = ref.upsample_nearest2d_backward(grad, scale_factor)
    return gx, None, None


upsample_nearest2d_op.register_autograd(_upsample_backward, setup_context=_upsample_setup)


OPS = {
    "bias_act": bias_act_op,
    "conv3x3": conv3x3_op,
    "conv3x3_pool": conv3x3_pool_op,
    "up_conv3x3": up_conv3x3_op,
    "max_pool2d": max_pool2d_op,
    "upsample_nearest2d": upsample_nearest2d_op,
}
