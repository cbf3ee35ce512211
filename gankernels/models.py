"""DCGAN-style generator and discriminator builders, in stock torch layers or gankernels ones.

Both builders return an ``nn.Sequential``. With ``layers="stock"`` the blocks are plain
torch modules (``nn.Upsample``, ``nn.Conv2d``, ``nn.LeakyReLU``, ``nn.MaxPool2d``), so
:func:`gankernels.convert` finds the runs it fuses. With ``layers="gankernels"`` each run
is one fused :mod:`gankernels.nn` module placed at the index of the run's ``Conv2d``,
with ``nn.Identity()`` at the run's other indices: the layout ``gankernels.convert``
produces from the stock model. The ``state_dict`` keys are therefore identical, and a
checkpoint moves between the two::

    G = dcgan_generator(layers="stock")
    G_fast = dcgan_generator(layers="gankernels")
    G_fast.load_state_dict(G.state_dict())   # same function, fused kernels

Layouts (``c = channels``, ``s = 4·2^(len(c)-1)`` the output resolution)::

    generator:      0 Linear(z_dim, c0·4·4)   1 ToImage(c0, 4)   2 LeakyReLU
                    then per next channel count k: Upsample(2) · Conv2d(c_{k-1}, c_k, 3, pad 1) · LeakyReLU
                    then Conv2d(c_last, out_channels, 3, pad 1) · Tanh
    discriminator:  per channel count k: Conv2d(c_{k-1}, c_k, 3, pad 1) · LeakyReLU · MaxPool2d(2)
                    then Flatten · Linear(c_last·(resolution/2^len(c))², 1)

Initialisation (the same for both layer kinds, drawn from torch's global RNG in
parameter order, so one seed gives one set of weights): He-normal weights for the
leaky-ReLU slope (``std = sqrt(2 / (1 + alpha²) / fan_in)``), zero biases. There is no
normalisation layer, so a variance-preserving init keeps the signal alive through the
stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

import gankernels.nn as gnn

__all__ = ["LAYERS", "ToImage", "dcgan_discriminator", "dcgan_generator", "set_channels_last"]

LAYERS = ("stock", "gankernels")
Layers = Literal["stock", "gankernels"]

# The activations the builders accept, as (gankernels name, stock module factory).
_ACTS = {
    "lrelu": lambda alpha: nn.LeakyReLU(alpha),
    "relu": lambda alpha: nn.ReLU(),
    "silu": lambda alpha: nn.SiLU(),
}


class ToImage(nn.Module):
    """``[N, C·size·size] -> [N, C, size, size]``, in contiguous or channels_last memory.

    The generator's linear projection produces a 2-D tensor, which has no memory
    format; this module decides the format every later layer inherits (each op keeps
    its input's format). :func:`set_channels_last` flips it together with the weights.
    """

    def __init__(self, channels: int, size: int, channels_last: bool = False) -> None:
        super().__init__()
        self.channels, self.size, self.channels_last = channels, size, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.view(x.shape[0], self.channels, self.size, self.size)
        if self.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def extra_repr(self) -> str:
        return f"{self.channels}, {self.size}" + (", channels_last=True" if self.channels_last else "")


def set_channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Put ``model``'s 4-D weights and every :class:`ToImage` in channels_last (or back).

    Returns ``model`` (modified in place).
    """
    fmt = torch.channels_last if enabled else torch.contiguous_format
    model.to(memory_format=fmt)
    for m in model.modules():
        if isinstance(m, ToImage):
            m.channels_last = enabled
    return model


def _check_common(layers: str, act: str, channels: Sequence[int], name: str, minimum: int) -> tuple[int, ...]:
    if layers not in LAYERS:
        raise ValueError(f"layers: expected one of {LAYERS}, got {layers!r}")
    if act not in _ACTS:
        raise ValueError(f"act: expected one of {tuple(_ACTS)}, got {act!r}")
    chans = tuple(channels)
    if len(chans) < minimum or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chans):
        raise ValueError(f"{name}: expected at least {minimum} positive ints, got {channels!r}")
    return chans


def _init_(model: nn.Module, alpha: float) -> None:
    """He-normal weights (leaky-ReLU gain), zero biases, in parameter order."""
    gain_sq = 2.0 / (1.0 + alpha**2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, math.sqrt(gain_sq / fan_in))


def dcgan_generator(
    z_dim: int = 128,
    channels: Sequence[int] = (512, 256, 128, 64, 32),
    out_channels: int = 3,
    layers: Layers = "stock",
    act: str = "lrelu",
    alpha: float = 0.2,
    *,
    channels_last: bool = False,
) -> nn.Sequential:
    """A DCGAN-style generator: ``z [N, z_dim] -> image [N, out_channels, R, R]`` in [-1, 1].

    ``R = 4·2^(len(channels)-1)``. ``z`` is projected by a linear layer to
    ``channels[0]×4×4``, activated, then each further channel count adds one
    [nearest 2× upsample, conv3x3, activation] block; a final conv3x3 to
    ``out_channels`` and ``tanh``. ``layers`` picks stock torch layers or the fused
    gankernels ones (same ``state_dict`` keys, see the module docstring).
    ``channels_last`` sets the memory format of the activations (see :class:`ToImage`).
    """
    chans = _check_common(layers, act, channels, "channels", 1)
    if z_dim < 1 or out_channels < 1:
        raise ValueError(f"z_dim and out_channels: must be >= 1, got z_dim={z_dim}, out_channels={out_channels}")
    fused = layers == "gankernels"
    mods: list[nn.Module] = [nn.Linear(z_dim, chans[0] * 16), ToImage(chans[0], 4, channels_last)]
    mods.append(gnn.BiasAct(None, act, alpha) if fused else _ACTS[act](alpha))
    for ci, co in zip(chans[:-1], chans[1:], strict=True):
        if fused:
            mods += [nn.Identity(), gnn.UpConv3x3(ci, co, act=act, alpha=alpha), nn.Identity()]
        else:
            mods += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ci, co, 3, padding=1), _ACTS[act](alpha)]
    if fused:
        mods += [gnn.Conv3x3(chans[-1], out_channels, act="tanh"), nn.Identity()]
    else:
        mods += [nn.Conv2d(chans[-1], out_channels, 3, padding=1), nn.Tanh()]
    model = nn.Sequential(*mods)
    _init_(model, alpha if act == "lrelu" else 0.0)
    if channels_last:
        set_channels_last(model)
    return model


def dcgan_discriminator(
    in_channels: int = 3,
    channels: Sequence[int] = (64, 128, 256, 512),
    resolution: int = 64,
    layers: Layers = "stock",
    act: str = "lrelu",
    alpha: float = 0.2,
    *,
    channels_last: bool = False,
) -> nn.Sequential:
    """A DCGAN-style discriminator: ``image [N, in_channels, R, R] -> logit [N, 1]``.

    Each channel count adds one [conv3x3, activation, 2×2 max-pool] block; then the
    features are flattened into a linear layer with one output. ``resolution`` must be
    divisible by ``2^len(channels)``. ``layers`` as in :func:`dcgan_generator`.
    """
    chans = _check_common(layers, act, channels, "channels", 1)
    if in_channels < 1:
        raise ValueError(f"in_channels: must be >= 1, got {in_channels}")
    factor = 2 ** len(chans)
    if resolution < factor or resolution % factor:
        raise ValueError(
            f"resolution: {resolution} must be a multiple of 2^len(channels) = {factor} (each block halves it); "
            f"change resolution or drop a channel count"
        )
    fused = layers == "gankernels"
    mods: list[nn.Module] = []
    for ci, co in zip((in_channels,) + chans[:-1], chans, strict=True):
        if fused:
            mods += [gnn.Conv3x3Pool(ci, co, act=act, alpha=alpha), nn.Identity(), nn.Identity()]
        else:
            mods += [nn.Conv2d(ci, co, 3, padding=1), _ACTS[act](alpha), nn.MaxPool2d(2)]
    side = resolution // factor
    mods += [nn.Flatten(), nn.Linear(chans[-1] * side * side, 1)]
    model = nn.Sequential(*mods)
    _init_(model, alpha if act == "lrelu" else 0.0)
    if channels_last:
        set_channels_last(model)
    return model
