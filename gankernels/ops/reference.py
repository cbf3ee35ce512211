"""The specification: every gankernels op in plain PyTorch.

These functions *are* the semantics of the package (DESIGN.md §1). Fast kernels are
tested against them (in float64), and the ``torch`` backend runs them (cuDNN on GPU).
They take already-validated arguments; the public API in ``gankernels.ops.functional``
does the checking.

Operations, in order, for the 3×3 ops:

    conv3x3:      y = clamp(act(conv2d(x, w, pad=1) + b) * gain)
    conv3x3_pool: y = max_pool2d(conv3x3(x, w, b, ...), 2)
    up_conv3x3:   y = conv3x3(upsample_nearest(x, 2), w, b, ...)   (computed so)

Gradients: the backward formulas below (``*_backward``) are written with
differentiable PyTorch ops, so second-order gradients (an R1 penalty) work through
them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS: tuple[str, ...] = ("linear", "relu", "lrelu", "tanh", "sigmoid", "silu")

# Activations for which max(act(a), act(b)) == act(max(a, b)): a max-pool commutes
# with them (and with a positive gain and a clamp), which lets kernels pool first.
MONOTONE_ACTIVATIONS: frozenset[str] = frozenset({"linear", "relu", "lrelu", "tanh", "sigmoid"})


# ----------------------------------------------------------------------------------
# Activation, gain, clamp.


def activate(p: torch.Tensor, act: str, alpha: float) -> torch.Tensor:
    """``act(p)`` for one of :data:`ACTIVATIONS`."""
    if act == "linear":
        return p
    if act == "relu":
        return torch.relu(p)
    if act == "lrelu":
        return F.leaky_relu(p, alpha)
    if act == "tanh":
        return torch.tanh(p)
    if act == "sigmoid":
        return torch.sigmoid(p)
    if act == "silu":
        return F.silu(p)
    raise ValueError(f"act: unknown activation {act!r}; expected one of {ACTIVATIONS}")


def activation_derivative(p: torch.Tensor, act: str, alpha: float) -> torch.Tensor:
    """``d act(p) / dp``, written with differentiable ops (for double backward).

    At p == 0, relu and lrelu take the slope of the negative side, as PyTorch does.
    """
    if act == "linear":
        return torch.ones_like(p)
    if act == "relu":
        return (p > 0).to(p.dtype)
    if act == "lrelu":
        pos = (p > 0).to(p.dtype)
        return pos + (1 - pos) * alpha
    if act == "tanh":
        t = torch.tanh(p)
        return 1 - t * t
    if act == "sigmoid":
        s = torch.sigmoid(p)
        return s * (1 - s)
    if act == "silu":
        s = torch.sigmoid(p)
        return s * (1 + p * (1 - s))
    raise ValueError(f"act: unknown activation {act!r}; expected one of {ACTIVATIONS}")


def epilogue(p: torch.Tensor, act: str, alpha: float, gain: float, clamp: Optional[float]) -> torch.Tensor:
    """``clip(act(p) * gain, -clamp, clamp)``: everything after the bias add."""
    y = activate(p, act, alpha)
    if gain != 1:
        y = y * gain
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    return y


def epilogue_derivative(p: torch.Tensor, act: str, alpha: float, gain: float, clamp: Optional[float]) -> torch.Tensor:
    """``d epilogue(p) / dp``. The clamp passes gradient where -clamp < y < clamp: at
    exactly ``|y| == clamp`` the gradient is 0, as ``F.hardtanh`` gives it in every
    PyTorch version and ``torch.clamp`` (scalar bounds) does in PyTorch 2.14, which
    takes the minimum-norm subgradient there (older releases passed it). Every backend
    agrees, whatever the installed PyTorch."""
    d = activation_derivative(p, act, alpha)
    if gain != 1:
        d = d * gain
    if clamp is not None:
        y = activate(p, act, alpha) * gain
        d = d * ((y > -clamp) & (y < clamp)).to(d.dtype)
    return d


def _bias_view(b: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return b.reshape(shape)


# ----------------------------------------------------------------------------------
# Forward ops.


def bias_act(
    x: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
    dim: int = 1,
) -> torch.Tensor:
    """``clip(act(x + b) * gain)``, with ``b`` broadcast along ``dim``."""
    p = x if b is None else x + _bias_view(b.to(x.dtype), x.ndim, dim)
    return epilogue(p, act, alpha, gain, clamp)


def conv3x3_preact(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv2d(x, w, b, padding=1)``: the pre-activation of :func:`conv3x3`."""
    return F.conv2d(x, w, b, padding=1)


def conv3x3(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
) -> torch.Tensor:
    return epilogue(conv3x3_preact(x, w, b), act, alpha, gain, clamp)


def conv3x3_pool(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
) -> torch.Tensor:
    return F.max_pool2d(conv3x3(x, w, b, act, alpha, gain, clamp), 2)


def upsample_nearest2d(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Nearest-neighbour upsampling by an integer factor: ``y[..., i, j] = x[..., i // s, j // s]``."""
    return F.interpolate(x, scale_factor=scale_factor, mode="nearest")


def up_conv3x3_naive(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
) -> torch.Tensor:
    """The definition: upsample by 2, then :func:`conv3x3`."""
    return conv3x3(upsample_nearest2d(x, 2), w, b, act, alpha, gain, clamp)


def subpixel_phase_weights(w: torch.Tensor) -> torch.Tensor:
    """The four 2×2 phase kernels of a 3×3 kernel, as ``[2, 2, Co, Ci, 2, 2]``.

    Along one axis, phase 0 uses taps (w0, w1+w2) on rows (i-1, i) and phase 1 uses
    (w0+w1, w2) on rows (i, i+1) of the low-resolution input (DESIGN.md §4).
    """
    w0, w1, w2 = w[:, :, 0], w[:, :, 1], w[:, :, 2]
    rows = torch.stack([torch.stack([w0, w1 + w2], dim=2), torch.stack([w0 + w1, w2], dim=2)], dim=0)  # [phase_r, Co, Ci, tap_r, 3]
    c0, c1, c2 = rows[..., 0], rows[..., 1], rows[..., 2]
    cols = torch.stack(
        [torch.stack([c0, c1 + c2], dim=-1), torch.stack([c0 + c1, c2], dim=-1)], dim=1
    )  # [phase_r, phase_c, Co, Ci, tap_r, tap_c]
    return cols


def up_conv3x3_preact(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """Pre-activation of :func:`up_conv3x3` by the sub-pixel rewrite (exact for finite
    ``x``; with ±inf in ``x`` it can give ±inf where the definition gives NaN).

    Each output phase (a, b) is a 2×2 convolution of the zero-padded low-resolution
    input; phase a reads padded rows starting at i + a (i.e. rows i-1+a, i+a).
    The 4× upsampled input is never formed. 4/9 of the naive FLOPs.
    """
    n, _, h, wd = x.shape
    co = w.shape[0]
    pw = subpixel_phase_weights(w)
    xp = F.pad(x, (1, 1, 1, 1))
    out = x.new_empty((n, co, 2 * h, 2 * wd))
    for a in range(2):
        for c in range(2):
            phase = F.conv2d(xp[:, :, a : a + h + 1, c : c + wd + 1], pw[a, c], b)
            out[:, :, a::2, c::2] = phase
    return out


def up_conv3x3(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
) -> torch.Tensor:
    """The definition, :func:`up_conv3x3_naive`, computed as written: upsample, then conv.

    Not by the sub-pixel rewrite (:func:`up_conv3x3_preact`): that rewrite pre-sums the
    taps that read the same input pixel, which is exact for finite x but turns
    ``w1·inf + w2·inf`` (NaN when the signs differ) into ``(w1 + w2)·inf``. The
    reference, and so the torch backend, propagates ±inf as stock PyTorch does."""
    return up_conv3x3_naive(x, w, b, act, alpha, gain, clamp)


def max_pool2d(
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.max_pool2d(..., return_indices=True)``: values and flat per-plane indices."""
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)


def pool_output_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output length along one axis (``pooling_output_shape``)."""
    numer = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = numer // s + 1
    # With ceil_mode, the last window must start inside the input or left padding.
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


# ----------------------------------------------------------------------------------
# Backward formulas (differentiable, so they also give double backward).


def bias_act_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    b: Optional[torch.Tensor],
    act: str,
    alpha: float,
    gain: float,
    clamp: Optional[float],
    dim: int,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    p = x if b is None else x + _bias_view(b.to(x.dtype), x.ndim, dim)
    gp = grad * epilogue_derivative(p, act, alpha, gain, clamp)
    gb = None
    if b is not None:
        dims = [d for d in range(x.ndim) if d != dim]
        # sum(dims=[]) would sum everything: a 1-D x along dim 0 has nothing to reduce.
        gb = (gp.sum(dims) if dims else gp).to(b.dtype)
    return gp, gb


def _conv_grads(
    gp: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool, needs: tuple[bool, bool, bool]
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    gx = torch.nn.grad.conv2d_input(x.shape, w, gp, padding=1) if needs[0] else None
    gw = torch.nn.grad.conv2d_weight(x, w.shape, gp, padding=1) if needs[1] else None
    gb = gp.sum((0, 2, 3)) if (has_bias and needs[2]) else None
    return gx, gw, gb


def conv3x3_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    act: str,
    alpha: float,
    gain: float,
    clamp: Optional[float],
    needs: tuple[bool, bool, bool] = (True, True, True),
):
    """Gradients of :func:`conv3x3` w.r.t. (x, w, b); the pre-activation is recomputed."""
    p = conv3x3_preact(x, w, b)
    gp = grad * epilogue_derivative(p, act, alpha, gain, clamp)
    return _conv_grads(gp, x, w, b is not None, needs)


def _unpool(grad: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Route pooled gradients back to the input positions named by ``indices`` (summed
    where windows overlap), as ``max_pool2d``'s backward does."""
    n, c, h, w = shape
    pooled = grad.shape[2] * grad.shape[3]  # explicit: reshape(n, c, -1) is ambiguous when n·c == 0
    flat = grad.new_zeros((n, c, h * w))
    flat = flat.scatter_add(2, indices.reshape(n, c, pooled), grad.reshape(n, c, pooled))
    return flat.view(n, c, h, w)


def conv3x3_pool_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    act: str,
    alpha: float,
    gain: float,
    clamp: Optional[float],
    needs: tuple[bool, bool, bool] = (True, True, True),
):
    p = conv3x3_preact(x, w, b)
    y = epilogue(p, act, alpha, gain, clamp)
    _, idx = F.max_pool2d(y.detach(), 2, return_indices=True)
    gy = _unpool(grad, idx, y.shape)
    gp = gy * epilogue_derivative(p, act, alpha, gain, clamp)
    return _conv_grads(gp, x, w, b is not None, needs)


def upsample_nearest2d_backward(grad: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Sum of each s×s block of ``grad``."""
    n, c, hs, ws = grad.shape
    s = scale_factor
    if memory_format_of(grad) == torch.channels_last:
        # Sum in NHWC order: a view, not a layout-changing copy.
        nhwc = grad.permute(0, 2, 3, 1).reshape(n, hs // s, s, ws // s, s, c).sum((2, 4))
        return nhwc.permute(0, 3, 1, 2)
    return grad.reshape(n, c, hs // s, s, ws // s, s).sum((3, 5))


def up_conv3x3_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    act: str,
    alpha: float,
    gain: float,
    clamp: Optional[float],
    needs: tuple[bool, bool, bool] = (True, True, True),
):
    xu = upsample_nearest2d(x, 2)
    p = conv3x3_preact(xu, w, b)
    gp = grad * epilogue_derivative(p, act, alpha, gain, clamp)
    gxu, gw, gb = _conv_grads(gp, xu, w, b is not None, (needs[0], needs[1], needs[2]))
    gx = upsample_nearest2d_backward(gxu, 2) if gxu is not None else None
    return gx, gw, gb


def max_pool2d_backward(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return _unpool(grad, indices, x.shape)


def same_memory_format(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` laid out in ``like``'s memory format (channels_last or contiguous)."""
    return t.contiguous(memory_format=memory_format_of(like))


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The memory format an op's output takes for input ``t``: channels_last or contiguous.

    A dense tensor is channels_last when it is laid out so and not also plain contiguous
    (a [N, C, 1, 1] tensor reads as contiguous). A strided view (``x_cl[:, :, ::2]``) has
    no exact format; it takes the one its strides suggest, as PyTorch's
    ``suggest_memory_format`` decides and ``F.conv2d``, ``F.max_pool2d`` and
    ``F.interpolate`` follow. csrc/ops.cpp's ``format_of`` is the same rule.
    """
    if t.dim() != 4 or t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if _strides_like_channels_last(t.shape, t.stride()) else torch.contiguous_format


def _strides_like_channels_last(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """ATen's ``is_channels_last_strides_2d``: strides increase in the order C, W, H, N
    (size-1 dims may take any stride that does not contradict it; ambiguous cases read
    as NCHW)."""
    if strides[1] == 0:
        return False
    lowest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < lowest:
            return False
        # [N, 1, 1, 1] with equal strides (or N11W sliced along W): NCHW by default.
        if d == 0 and lowest == strides[1]:
            return False
        lowest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True
