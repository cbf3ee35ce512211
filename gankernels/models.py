"""DCGAN-style generator and discriminator builders, in stock torch layers or gankernels ones.

Both builders return an ``nn.Sequential`` by default. With ``layers="stock"`` the blocks are plain
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

``style="forward_code"`` builds the same networks (stock layers, the same parameter
order and shapes, hence the same weights for one seed) as a custom module whose forward
is written as code, the way most GAN code is: :class:`ForwardCodeGenerator` calls
``F.interpolate``, its convs and ``F.leaky_relu`` in a loop; :class:`ForwardCodeDiscriminator`
``F.max_pool2d(F.leaky_relu(conv(x), alpha), 2)``. :func:`gankernels.convert` fuses those
calls by rewriting the forward (every block becomes one fused op, as for the
Sequential); its ``state_dict`` keys are its own (``fc``, ``convs.<i>``, ``to_rgb``).

Initialisation (the same for both layer kinds and styles, drawn from torch's global RNG in
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
import torch.nn.functional as F
from torch import nn

import gankernels.nn as gnn

__all__ = [
    "LAYERS",
    "STYLES",
    "ForwardCodeDiscriminator",
    "ForwardCodeGenerator",
    "ToImage",
    "dcgan_discriminator",
    "dcgan_generator",
    "set_channels_last",
]

LAYERS = ("stock", "gankernels")
Layers = Literal["stock", "gankernels"]
STYLES = ("sequential", "forward_code")
Style = Literal["sequential", "forward_code"]

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


def _activate(x: torch.Tensor, act: str, alpha: float) -> torch.Tensor:
    """The builders' activations as function calls (forward-code style)."""
    if act == "lrelu":
        return F.leaky_relu(x, alpha)
    if act == "relu":
        return F.relu(x)
    return F.silu(x)


class ForwardCodeGenerator(nn.Module):
    """:func:`dcgan_generator` written as forward code (``style="forward_code"``).

    ``fc`` projects ``z`` to ``channels[0]×4×4``, ``to_image`` reshapes, then per conv of
    ``convs``: nearest 2× ``F.interpolate``, the conv, the activation; ``to_rgb`` and
    ``torch.tanh`` last.
    """

    def __init__(
        self, z_dim: int, channels: tuple[int, ...], out_channels: int, act: str, alpha: float, channels_last: bool
    ) -> None:
        super().__init__()
        self.act, self.alpha = act, float(alpha)
        self.fc = nn.Linear(z_dim, channels[0] * 16)
        self.to_image = ToImage(channels[0], 4, channels_last)
        self.convs = nn.ModuleList(nn.Conv2d(ci, co, 3, padding=1) for ci, co in zip(channels[:-1], channels[1:], strict=True))
        self.to_rgb = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = _activate(self.to_image(self.fc(z)), self.act, self.alpha)
        for conv in self.convs:
            x = _activate(conv(F.interpolate(x, scale_factor=2, mode="nearest")), self.act, self.alpha)
        return torch.tanh(self.to_rgb(x))


class ForwardCodeDiscriminator(nn.Module):
    """:func:`dcgan_discriminator` written as forward code (``style="forward_code"``):
    per conv of ``convs``, ``F.max_pool2d(act(conv(x)), 2)``; then ``fc`` on the
    flattened features."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], side: int, act: str, alpha: float) -> None:
        super().__init__()
        self.act, self.alpha = act, float(alpha)
        self.convs = nn.ModuleList(
            nn.Conv2d(ci, co, 3, padding=1) for ci, co in zip((in_channels,) + channels[:-1], channels, strict=True)
        )
        self.fc = nn.Linear(channels[-1] * side * side, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.max_pool2d(_activate(conv(x), self.act, self.alpha), 2)
        return self.fc(torch.flatten(x, 1))


def _check_style(style: str, layers: str) -> bool:
    """Whether the forward-code style was asked for (it is built of stock layers)."""
    if style not in STYLES:
        raise ValueError(f"style: expected one of {STYLES}, got {style!r}")
    if style == "forward_code" and layers != "stock":
        raise ValueError(
            "layers: style='forward_code' is built of stock layers (layers='stock'); "
            "gankernels.convert(model) then fuses its forward code"
        )
    return style == "forward_code"


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


def _finish(model: nn.Module, act: str, alpha: float, channels_last: bool) -> nn.Module:
    _init_(model, alpha if act == "lrelu" else 0.0)
    return set_channels_last(model) if channels_last else model


def dcgan_generator(
    z_dim: int = 128,
    channels: Sequence[int] = (512, 256, 128, 64, 32),
    out_channels: int = 3,
    layers: Layers = "stock",
    act: str = "lrelu",
    alpha: float = 0.2,
    *,
    channels_last: bool = False,
    style: Style = "sequential",
) -> nn.Module:
    """A DCGAN-style generator: ``z [N, z_dim] -> image [N, out_channels, R, R]`` in [-1, 1].

    ``R = 4·2^(len(channels)-1)``. ``z`` is projected by a linear layer to
    ``channels[0]×4×4``, activated, then each further channel count adds one
    [nearest 2× upsample, conv3x3, activation] block; a final conv3x3 to
    ``out_channels`` and ``tanh``. ``layers`` picks stock torch layers or the fused
    gankernels ones (same ``state_dict`` keys, see the module docstring).
    ``channels_last`` sets the memory format of the activations (see :class:`ToImage`).
    ``style="forward_code"``: the same network as a :class:`ForwardCodeGenerator`.
    """
    chans = _check_common(layers, act, channels, "channels", 1)
    if z_dim < 1 or out_channels < 1:
        raise ValueError(f"z_dim and out_channels: must be >= 1, got z_dim={z_dim}, out_channels={out_channels}")
    if _check_style(style, layers):
        return _finish(ForwardCodeGenerator(z_dim, chans, out_channels, act, alpha, channels_last), act, alpha, channels_last)
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
    return _finish(nn.Sequential(*mods), act, alpha, channels_last)


def dcgan_discriminator(
    in_channels: int = 3,
    channels: Sequence[int] = (64, 128, 256, 512),
    resolution: int = 64,
    layers: Layers = "stock",
    act: str = "lrelu",
    alpha: float = 0.2,
    *,
    channels_last: bool = False,
    style: Style = "sequential",
) -> nn.Module:
    """A DCGAN-style discriminator: ``image [N, in_channels, R, R] -> logit [N, 1]``.

    Each channel count adds one [conv3x3, activation, 2×2 max-pool] block; then the
    features are flattened into a linear layer with one output. ``resolution`` must be
    divisible by ``2^len(channels)``. ``layers`` and ``style`` as in :func:`dcgan_generator`
    (``style="forward_code"``: a :class:`ForwardCodeDiscriminator`).
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
    side = resolution // factor
    if _check_style(style, layers):
        return _finish(ForwardCodeDiscriminator(in_channels, chans, side, act, alpha), act, alpha, channels_last)
    fused = layers == "gankernels"
    mods: list[nn.Module] = []
    for ci, co in zip((in_channels,) + chans[:-1], chans, strict=True):
        if fused:
            mods += [gnn.Conv3x3Pool(ci, co, act=act, alpha=alpha), nn.Identity(), nn.Identity()]
        else:
            mods += [nn.Conv2d(ci, co, 3, padding=1), _ACTS[act](alpha), nn.MaxPool2d(2)]
    mods += [nn.Flatten(), nn.Linear(chans[-1] * side * side, 1)]
    return _finish(nn.Sequential(*mods), act, alpha, channels_last)
