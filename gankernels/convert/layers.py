"""Stock layers: which ones gankernels can replace, the fused modules that replace
them, and the pass over ``nn.Sequential`` runs and lone layers (see
:mod:`gankernels.convert` for the rules)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from torch import nn
from torch.nn.utils import parametrize

from gankernels import nn as gknn
from gankernels.convert.report import ConversionReport, Left, Replacement
from gankernels.nn import _integer_scale  # the rule gknn.Upsample fuses by
from gankernels.ops.reference import MONOTONE_ACTIVATIONS

# ----------------------------------------------------------------------------------
# Matching single modules. Each ``*_reason`` returns None when the module qualifies,
# else why it does not.

# Exact types only: a subclass may override forward().
_ACTIVATIONS: dict[type, str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "lrelu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.SiLU: "silu",
}
_CONV_TYPES = (nn.Conv2d, gknn.Conv2d)
_POOL_TYPES = (nn.MaxPool2d, gknn.MaxPool2d)
_UPSAMPLE_TYPES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, gknn.Upsample)


def _plain_reason(m: nn.Module, known: tuple[type, ...]) -> Optional[str]:
    """Why ``m`` cannot be swapped at all: an unknown subclass, hooks, parametrizations."""
    if parametrize.is_parametrized(m):
        return "has parametrizations (torch.nn.utils.parametrize, e.g. spectral_norm); fusing would bypass them"
    if type(m) not in known:
        return f"{type(m).__name__} is a subclass of {known[0].__name__} whose forward may differ"
    hooks = (m._forward_pre_hooks, m._forward_hooks, m._backward_hooks, getattr(m, "_backward_pre_hooks", {}))
    if any(len(h) for h in hooks):
        return "has forward/backward hooks (e.g. spectral_norm or weight_norm); fusing would bypass them"
    return None


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _conv_reason(m: nn.Conv2d) -> Optional[str]:
    why = _plain_reason(m, _CONV_TYPES)
    if why:
        return why
    k = _pair(m.kernel_size)
    rule = "only 3×3 stride-1 pad-1 convolutions are fused"
    if k != (3, 3):
        return f"Conv2d {k[0]}×{k[1]}: {rule}"
    if _pair(m.stride) != (1, 1):
        return f"Conv2d stride {_pair(m.stride)}: {rule}"
    if _pair(m.dilation) != (1, 1):
        return f"Conv2d dilation {_pair(m.dilation)}: only dilation 1 is fused"
    if m.padding != "same" and _pair(m.padding) != (1, 1):
        return f"Conv2d padding {m.padding!r}: {rule}"
    if m.groups != 1:
        return f"Conv2d groups={m.groups}: only groups=1 is fused"
    if m.padding_mode != "zeros":
        return f"Conv2d padding_mode={m.padding_mode!r}: only zero padding is fused"
    if not isinstance(m.weight, nn.Parameter) or (m.bias is not None and not isinstance(m.bias, nn.Parameter)):
        return "weight or bias is not an nn.Parameter (computed by a hook?)"
    return None


def _conv_epilogue(m: nn.Conv2d) -> tuple[str, float, float, Optional[float]]:
    """(act, alpha, gain, clamp) a conv applies itself: a gankernels Conv2d may carry one."""
    if isinstance(m, gknn.Conv2d):
        return m.act, m.alpha, m.gain, m.clamp
    return "linear", 0.2, 1.0, None


def _act_of(m: nn.Module) -> Optional[tuple[str, float]]:
    """(act, alpha) if ``m`` is a supported activation module without hooks, else None."""
    act = _ACTIVATIONS.get(type(m))
    if act is None or _plain_reason(m, (type(m),)) is not None:
        return None
    return act, float(m.negative_slope) if act == "lrelu" else 0.2


def _pool_reason(m: nn.MaxPool2d) -> Optional[str]:
    """Why a MaxPool2d cannot be swapped for gankernels.nn.MaxPool2d (any configuration can)."""
    return _plain_reason(m, _POOL_TYPES)


def _is_pool2(m: nn.Module) -> bool:
    """Whether ``m`` is exactly the 2×2 stride-2 max-pool the Conv3x3Pool block fuses."""
    return (
        isinstance(m, _POOL_TYPES)
        and _pool_reason(m) is None
        and _pair(m.kernel_size) == (2, 2)
        and _pair(m.stride) == (2, 2)
        and _pair(m.padding) == (0, 0)
        and _pair(m.dilation) == (1, 1)
        and not m.ceil_mode
        and not m.return_indices
    )


def _upsample_reason(m: nn.Upsample) -> Optional[str]:
    why = _plain_reason(m, _UPSAMPLE_TYPES)
    if why:
        return why
    if m.mode != "nearest":
        return f"Upsample mode={m.mode!r}: only mode='nearest' is fused"
    if m.size is not None:
        return f"Upsample size={m.size!r}: only an integer scale_factor is fused"
    if _integer_scale(m.scale_factor) is None:
        return f"Upsample scale_factor={m.scale_factor!r}: only integer scale factors are fused"
    return None


# ----------------------------------------------------------------------------------
# Building replacements.


def _share_params(fused: nn.Module, conv: nn.Conv2d) -> nn.Module:
    """Give ``fused`` the conv's own Parameter objects (built on meta: no allocation, no
    RNG draw), then its training mode."""
    fused.weight = conv.weight
    fused.bias = conv.bias  # a Parameter or None
    return fused.train(conv.training)


def _fused_conv(
    cls: type, conv: nn.Conv2d, act: str, alpha: float, gain: float, clamp: Optional[float], backend: Optional[str]
) -> nn.Module:
    fused = cls(conv.in_channels, conv.out_channels, conv.bias is not None, act, alpha, gain, clamp, backend=backend, device="meta")
    return _share_params(fused, conv)


def _gk_conv2d(conv: nn.Conv2d, backend: Optional[str]) -> gknn.Conv2d:
    act, alpha, gain, clamp = _conv_epilogue(conv)
    new = gknn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
        device="meta",
        act=act,
        alpha=alpha,
        gain=gain,
        clamp=clamp,
        backend=backend,
    )
    return _share_params(new, conv)


def _gk_pool(m: nn.MaxPool2d, backend: Optional[str]) -> gknn.MaxPool2d:
    new = gknn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode, backend=backend)
    return new.train(m.training)


def _gk_upsample(m: nn.Upsample, backend: Optional[str]) -> gknn.Upsample:
    new = gknn.Upsample(
        size=m.size,
        scale_factor=m.scale_factor,
        mode=m.mode,
        align_corners=m.align_corners,
        recompute_scale_factor=m.recompute_scale_factor,
        backend=backend,
    )
    return new.train(m.training)


def _identity(like: nn.Module) -> nn.Identity:
    return nn.Identity().train(like.training)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class LayerConverter:
    """The pass over Sequential runs and lone layers.

    ``called_from_code``: ids of modules that some traced forward calls directly (such a
    module is not absorbed into a Sequential run: that forward would see the run's
    result); ``fused_in_code``: ids of modules whose every known call was fused by the
    forward-code pass (they keep their class).
    """

    def __init__(
        self,
        backend: Optional[str],
        report: ConversionReport,
        called_from_code: frozenset[int] = frozenset(),
        fused_in_code: frozenset[int] = frozenset(),
        seq_result_mutated: Callable[[nn.Sequential, int], Optional[str]] = lambda seq, i: None,
        call_results_mutated: Callable[[nn.Module], Optional[str]] = lambda m: None,
        seq_input_mutated: Callable[[nn.Sequential], Optional[str]] = lambda seq: None,
    ) -> None:
        self.backend = backend
        self.report = report
        self.called_from_code = called_from_code
        self.fused_in_code = fused_in_code
        # Why a result may be modified in place afterwards (a gankernels conv keeps its
        # output for the backward, which such an update would break): of ``seq[i]``,
        # and of a module called from forward code.
        self.seq_result_mutated = seq_result_mutated
        self.call_results_mutated = call_results_mutated
        self.seq_input_mutated = seq_input_mutated  # an UpConv3x3 keeps its input too

    def backend_for(self, m: nn.Module) -> Optional[str]:
        # A gankernels module keeps its own backend unless one was asked for.
        return self.backend if self.backend is not None else getattr(m, "backend", None)

    def replace(self, parent: nn.Module, prefix: str, names: list[str], at: int, new: nn.Module) -> None:
        """Put ``new`` at ``names[at]`` of ``parent`` and Identity at the other ``names``."""
        stock = []
        for i, name in enumerate(names):
            old = parent._modules[name]
            stock.append((_join(prefix, name), type(old).__name__))
            setattr(parent, name, new if i == at else _identity(old))
        self.report.replaced.append(Replacement(_join(prefix, names[at]), tuple(stock), f"gankernels.nn.{new!r}"))

    def leave(self, path: str, m: nn.Module, reason: str) -> None:
        self.report.left.append(Left(path, type(m).__name__, reason))

    def lone(self, parent: nn.Module, prefix: str, name: str, fuse_conv: bool, seq_index: Optional[int] = None) -> None:
        """Swap one stock layer for its gankernels twin (or say why not). ``fuse_conv``:
        a conv becomes Conv3x3 (inside a Sequential) rather than gankernels.nn.Conv2d;
        ``seq_index``: its index when ``parent`` is a stock Sequential."""
        m = parent._modules[name]
        path = _join(prefix, name)
        if id(m) in self.fused_in_code:
            return
        if isinstance(m, _CONV_TYPES):
            why = _conv_reason(m)
            if why is None and (fuse_conv or type(m) is nn.Conv2d):
                mutated = self.seq_result_mutated(parent, seq_index) if seq_index is not None else self.call_results_mutated(m)
                if mutated:
                    why = f"not swapped: {mutated}; a gankernels conv keeps its output for the backward"
            if why:
                self.leave(path, m, why)
            elif fuse_conv:
                self.replace(parent, prefix, [name], 0, _fused_conv(gknn.Conv3x3, m, *_conv_epilogue(m), self.backend_for(m)))
            elif type(m) is nn.Conv2d:
                self.replace(parent, prefix, [name], 0, _gk_conv2d(m, self.backend_for(m)))
        elif isinstance(m, _POOL_TYPES):
            why = _pool_reason(m)
            if why:
                self.leave(path, m, why)
            elif type(m) is nn.MaxPool2d:
                self.replace(parent, prefix, [name], 0, _gk_pool(m, self.backend))
        elif isinstance(m, nn.Upsample):
            why = _upsample_reason(m)
            if why:
                self.leave(path, m, why)
            elif type(m) is not gknn.Upsample:
                self.replace(parent, prefix, [name], 0, _gk_upsample(m, self.backend))

    def sequential(self, seq: nn.Sequential, prefix: str) -> None:
        names = list(seq._modules)
        mods = [seq._modules[n] for n in names]
        i = 0
        while i < len(mods):
            m = mods[i]
            up = isinstance(m, nn.Upsample) and _upsample_reason(m) is None and _integer_scale(m.scale_factor) == 2
            c = i + 1 if up else i
            if (
                c < len(mods)
                and isinstance(mods[c], _CONV_TYPES)
                and _conv_reason(mods[c]) is None
                and not any(id(mods[k]) in self.called_from_code for k in (i, c, c + 1, c + 2) if k < len(mods))
            ):
                conv = mods[c]
                act, alpha, gain, clamp = _conv_epilogue(conv)
                end = c + 1  # one past the run
                if act == "linear" and gain == 1 and clamp is None and end < len(mods):
                    found = _act_of(mods[end])
                    if found is not None:
                        act, alpha = found
                        end += 1
                backend = self.backend_for(conv)
                pool_next = end < len(mods) and _is_pool2(mods[end]) and act in MONOTONE_ACTIVATIONS and gain >= 0
                mutated = self.seq_result_mutated(seq, end if pool_next else end - 1)
                if mutated and pool_next:  # Conv3x3Pool keeps the pooled result: keep the pool apart
                    self.leave(_join(prefix, names[end]), mods[end], f"not fused into the conv before it: {mutated}")
                    pool_next, mutated = False, self.seq_result_mutated(seq, end - 1)
                input_mutated = self.seq_input_mutated(seq) if up and i == 0 and not mutated else None
                if input_mutated:  # fuse the rest of the run without the upsample
                    run = " → ".join(type(mods[k]).__name__ for k in range(i, end))
                    self.leave(
                        _join(prefix, names[i]), m, f"{run}: the upsample is not fused: {input_mutated}; UpConv3x3 keeps its input"
                    )
                    self.lone(seq, prefix, names[i], fuse_conv=True, seq_index=i)
                    i += 1
                    continue
                if mutated:
                    run = " → ".join(type(mods[k]).__name__ for k in range(i, end))
                    self.leave(_join(prefix, names[c]), conv, f"{run} not fused: {mutated}; the fused module keeps its output")
                    for k in range(i, end):
                        self.lone(seq, prefix, names[k], fuse_conv=True, seq_index=k)
                    i = end
                    continue
                if up:
                    new = _fused_conv(gknn.UpConv3x3, conv, act, alpha, gain, clamp, backend)
                elif pool_next:
                    new = _fused_conv(gknn.Conv3x3Pool, conv, act, alpha, gain, clamp, backend)
                    end += 1
                else:
                    new = _fused_conv(gknn.Conv3x3, conv, act, alpha, gain, clamp, backend)
                self.replace(seq, prefix, names[i:end], c - i, new)
                i = end
                continue
            self.lone(seq, prefix, names[i], fuse_conv=id(m) not in self.called_from_code, seq_index=i)
            i += 1
