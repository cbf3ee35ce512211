"""Drop-in modules.

* ``Conv2d``, ``MaxPool2d``, ``Upsample``: subclasses of the torch classes with the same
  constructor arguments, defaults, ``extra_repr`` and ``state_dict`` keys; the
  configurations gankernels covers run its ops, every other one runs exactly as torch.
  ``Conv2d`` also takes ``act``, ``alpha``, ``gain``, ``clamp`` (applied after the bias).
* ``Conv3x3``, ``Conv3x3Pool``, ``UpConv3x3``: the fused GAN layers, constructed as
  ``(in_channels, out_channels, bias=True, act="linear", alpha=0.2, gain=1.0, clamp=None)``.
* ``BiasAct``: a learned (or absent) bias, then the activation.

Parameters are named ``weight`` and ``bias`` everywhere, so a ``state_dict`` moves
between a stock model and its gankernels twin. Every module takes ``backend=None``
(keyword only), passed to the ops.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn as tnn

from gankernels.ops import functional as gk
from gankernels.ops.reference import ACTIVATIONS

__all__ = ["BiasAct", "Conv2d", "Conv3x3", "Conv3x3Pool", "MaxPool2d", "UpConv3x3", "Upsample"]


def _epilogue_repr(act: str, alpha: float, gain: float, clamp: Optional[float]) -> str:
    parts = [f"act={act!r}"]
    if act == "lrelu":
        parts.append(f"alpha={alpha}")
    if gain != 1:
        parts.append(f"gain={gain}")
    if clamp is not None:
        parts.append(f"clamp={clamp}")
    return ", ".join(parts)


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act: unknown activation {act!r}; expected one of {ACTIVATIONS}")


def _is_identity_epilogue(act: str, gain: float, clamp: Optional[float]) -> bool:
    return act == "linear" and gain == 1 and clamp is None


class Conv2d(tnn.Conv2d):
    """``torch.nn.Conv2d`` plus a fused epilogue: ``clip(act(conv(x) + bias) * gain)``.

    3×3, stride 1, padding 1 (or ``"same"``), dilation 1, groups 1, zero padding runs
    ``gankernels.conv3x3``; any other configuration runs ``torch.nn.Conv2d`` followed by
    ``gankernels.bias_act`` (nothing at all when the epilogue is the identity).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, tuple[int, int]],
        stride: Union[int, tuple[int, int]] = 1,
        padding: Union[str, int, tuple[int, int]] = 0,
        dilation: Union[int, tuple[int, int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        act: str = "linear",
        alpha: float = 0.2,
        gain: float = 1.0,
        clamp: Optional[float] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        _check_act(act)
        self.act, self.alpha, self.gain, self.clamp = act, float(alpha), float(gain), clamp
        self.backend = backend

    @property
    def fused(self) -> bool:
        """Whether this configuration runs the fused ``gankernels.conv3x3``."""
        return (
            self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding in ((1, 1), "same")
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.fused and input.dim() == 4:
            return gk.conv3x3(input, self.weight, self.bias, self.act, self.alpha, self.gain, self.clamp, backend=self.backend)
        y = super().forward(input)
        if _is_identity_epilogue(self.act, self.gain, self.clamp):
            return y
        return gk.bias_act(y, None, self.act, self.alpha, self.gain, self.clamp, dim=y.dim() - 3, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if not _is_identity_epilogue(self.act, self.gain, self.clamp):
            s += ", " + _epilogue_repr(self.act, self.alpha, self.gain, self.clamp)
        return s


class MaxPool2d(tnn.MaxPool2d):
    """``torch.nn.MaxPool2d``, run by ``gankernels.max_pool2d`` (same results)."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input: torch.Tensor):
        return gk.max_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices,
            backend=self.backend,
        )


def _integer_scale(scale_factor) -> Optional[int]:
    s = scale_factor
    if isinstance(s, (tuple, list)):
        if len(s) != 2 or s[0] != s[1]:
            return None
        s = s[0]
    if isinstance(s, (int, float)) and not isinstance(s, bool) and float(s).is_integer() and s >= 1:
        return int(s)
    return None


class Upsample(tnn.Upsample):
    """``torch.nn.Upsample``; nearest mode with an integer ``scale_factor`` on 4-D input
    runs ``gankernels.upsample_nearest2d``, anything else runs as torch."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend

    @property
    def fused(self) -> bool:
        return self.mode == "nearest" and self.size is None and _integer_scale(self.scale_factor) is not None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.fused and input.dim() == 4:
            return gk.upsample_nearest2d(input, _integer_scale(self.scale_factor), backend=self.backend)
        return super().forward(input)


class _FusedConv3x3(tnn.Module):
    """Shared parameters and initialisation of the fused 3×3 layers (as ``nn.Conv2d``)."""

    _op = staticmethod(gk.conv3x3)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        act: str = "linear",
        alpha: float = 0.2,
        gain: float = 1.0,
        clamp: Optional[float] = None,
        *,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_act(act)
        if clamp is not None and clamp < 0:
            raise ValueError(f"clamp: must be >= 0 or None, got {clamp}")
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.act, self.alpha, self.gain, self.clamp = act, float(alpha), float(gain), clamp
        self.backend = backend
        self.weight = tnn.Parameter(torch.empty((out_channels, in_channels, 3, 3), **factory))
        if bias:
            self.bias = tnn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same initialisation as torch.nn.Conv2d.
        tnn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * 9
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            tnn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self)._op(x, self.weight, self.bias, self.act, self.alpha, self.gain, self.clamp, backend=self.backend)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}"
        if self.bias is None:
            s += ", bias=False"
        return s + ", " + _epilogue_repr(self.act, self.alpha, self.gain, self.clamp)


class Conv3x3(_FusedConv3x3):
    """``clip(act(conv2d(x, weight, bias, padding=1)) * gain)`` in one kernel."""

    _op = staticmethod(gk.conv3x3)


class Conv3x3Pool(_FusedConv3x3):
    """:class:`Conv3x3` followed by a 2×2 max-pool, fused (the discriminator block)."""

    _op = staticmethod(gk.conv3x3_pool)


class UpConv3x3(_FusedConv3x3):
    """Nearest 2× upsample followed by :class:`Conv3x3`, fused (the generator block)."""

    _op = staticmethod(gk.up_conv3x3)


class BiasAct(tnn.Module):
    """``clip(act(x + bias) * gain)``, the bias (length ``num_features``, along ``dim``)
    learned and zero-initialised; ``num_features=None`` means no bias."""

    def __init__(
        self,
        num_features: Optional[int] = None,
        act: str = "linear",
        alpha: float = 0.2,
        gain: float = 1.0,
        clamp: Optional[float] = None,
        dim: int = 1,
        *,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_act(act)
        self.num_features = num_features
        self.act, self.alpha, self.gain, self.clamp, self.dim = act, float(alpha), float(gain), clamp, dim
        self.backend = backend
        if num_features is None:
            self.register_parameter("bias", None)
        else:
            self.bias = tnn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gk.bias_act(x, self.bias, self.act, self.alpha, self.gain, self.clamp, self.dim, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, "
            + _epilogue_repr(self.act, self.alpha, self.gain, self.clamp)
            + (f", dim={self.dim}" if self.dim != 1 else "")
        )
