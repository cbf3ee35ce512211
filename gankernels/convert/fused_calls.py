"""The functions a forward rewritten by :func:`gankernels.convert` calls.

Each takes the run's input and the ``Conv2d`` module whose parameters it uses (read at
call time, so the module's ``weight``/``bias`` stay the model's own Parameters), and
the epilogue read from the stock calls. The fused ops need 4-D ``[N, C, H, W]`` input;
any other input (a stock ``Conv2d`` also takes unbatched ``[C, H, W]``) runs the stock
calls instead, so the rewritten forward computes what the original did for every input.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gankernels.ops import functional as gk
from gankernels.ops import reference as ref

__all__ = ["conv3x3", "conv3x3_pool", "up_conv3x3"]


def _stock(
    x: torch.Tensor, conv: nn.Conv2d, act: str, alpha: float, gain: float, clamp: Optional[float], up: bool, pool: bool
) -> torch.Tensor:
    """The run as the stock calls compute it (for inputs the fused ops do not take)."""
    if up:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    y = ref.epilogue(conv._conv_forward(x, conv.weight, conv.bias), act, alpha, gain, clamp)
    return F.max_pool2d(y, 2) if pool else y


def conv3x3(
    x: torch.Tensor, conv: nn.Conv2d, act: str, alpha: float, gain: float, clamp: Optional[float], backend: Optional[str]
) -> torch.Tensor:
    """``act(conv(x))``: :func:`gankernels.conv3x3`."""
    if x.dim() != 4:
        return _stock(x, conv, act, alpha, gain, clamp, up=False, pool=False)
    return gk.conv3x3(x, conv.weight, conv.bias, act, alpha, gain, clamp, backend=backend)


def conv3x3_pool(
    x: torch.Tensor, conv: nn.Conv2d, act: str, alpha: float, gain: float, clamp: Optional[float], backend: Optional[str]
) -> torch.Tensor:
    """``max_pool2d(act(conv(x)), 2)``: :func:`gankernels.conv3x3_pool`."""
    if x.dim() != 4:
        return _stock(x, conv, act, alpha, gain, clamp, up=False, pool=True)
    return gk.conv3x3_pool(x, conv.weight, conv.bias, act, alpha, gain, clamp, backend=backend)


def up_conv3x3(
    x: torch.Tensor, conv: nn.Conv2d, act: str, alpha: float, gain: float, clamp: Optional[float], backend: Optional[str]
) -> torch.Tensor:
    """``act(conv(upsample_nearest(x, 2)))``: :func:`gankernels.up_conv3x3`."""
    if x.dim() != 4:
        return _stock(x, conv, act, alpha, gain, clamp, up=True, pool=False)
    return gk.up_conv3x3(x, conv.weight, conv.bias, act, alpha, gain, clamp, backend=backend)


# ----------------------------------------------------------------------------------
# Augmented assignment and item assignment, as traced calls. ``torch.fx`` proxies
# have no ``__iadd__``, so ``y += z`` would be traced as ``y = y + z``, a new tensor,
# and a forward relying on the in-place update (another reference to ``y``) would
# change meaning; nor ``__setitem__``. The tracer records these instead, so the
# rewritten forward performs the same in-place updates, and the analysis sees them.


def _inplace(op):
    def apply(a, b):
        return op(a, b)

    apply.__name__ = apply.__qualname__ = op.__name__
    apply.__doc__ = f"``a {op.__name__}= b``, in place where ``a`` supports it (``operator.{op.__name__}``)."
    return apply


iadd = _inplace(operator.iadd)
isub = _inplace(operator.isub)
imul = _inplace(operator.imul)
itruediv = _inplace(operator.itruediv)
ifloordiv = _inplace(operator.ifloordiv)
imod = _inplace(operator.imod)
ipow = _inplace(operator.ipow)
imatmul = _inplace(operator.imatmul)
iand = _inplace(operator.iand)
ior = _inplace(operator.ior)
ixor = _inplace(operator.ixor)
ilshift = _inplace(operator.ilshift)
irshift = _inplace(operator.irshift)


def setitem(obj, index, value) -> None:
    """``obj[index] = value``."""
    obj[index] = value


INPLACE_OPERATORS = {
    "__iadd__": iadd,
    "__isub__": isub,
    "__imul__": imul,
    "__itruediv__": itruediv,
    "__ifloordiv__": ifloordiv,
    "__imod__": imod,
    "__ipow__": ipow,
    "__imatmul__": imatmul,
    "__iand__": iand,
    "__ior__": ior,
    "__ixor__": ixor,
    "__ilshift__": ilshift,
    "__irshift__": irshift,
}
"""Proxy method name → the traced function that performs it."""
