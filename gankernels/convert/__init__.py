"""Swap the stock layers of an existing model for fused gankernels ones, in place.

::

    model, report = gankernels.convert(model)
    print(report)

Two passes, both with no option to turn on.

**Forward code.** The forward of every module written by the user (not a torch.nn or
gankernels layer) is traced with ``torch.fx``, its children kept as calls, and these
runs of calls are fused into one gankernels op each:

======================================================================  ====================
calls in forward code                                                   fused op
======================================================================  ====================
nearest 2× upsample → ``Conv2d(3×3, pad 1)`` [→ act]                    ``up_conv3x3``
``Conv2d(3×3, pad 1)`` [→ act] → 2×2 max-pool (monotone ``act`` only)   ``conv3x3_pool``
``Conv2d(3×3, pad 1)`` → act                                            ``conv3x3``
======================================================================  ====================

The upsample is ``nn.Upsample``/``nn.UpsamplingNearest2d``, ``F.interpolate``,
``F.upsample`` or ``F.upsample_nearest`` (``scale_factor=2``, ``mode="nearest"``); the
activation is a module (``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Tanh``, ``nn.Sigmoid``,
``nn.SiLU``), a function (``F.relu``, ``F.leaky_relu(x, 0.2)``, ``torch.tanh``, ...) or a
method (``x.relu()``), in place or not, its slope read from the call; the pool is
``nn.MaxPool2d(2)``, ``F.max_pool2d(x, 2)`` or ``torch.max_pool2d``. A run is fused
only where that stays exact: no intermediate of the run is used elsewhere, and the
fused result is not modified in place afterwards (the fused ops keep it for the
backward) — followed through views, in-place submodules and the module's return
value to the callers convert can see (the model's own output is assumed not to be
modified in place by the code calling the model). A module with fusions gets a new
``forward`` on the instance: the code fx generates from the edited graph, calling the
fused ops with the conv's own Parameters. Its class, attributes, children, hooks and
``state_dict`` stay as they are; ``deepcopy`` and ``torch.compile`` work on it. A module
fx cannot trace (data-dependent control flow, unsupported calls, a ``with`` block or
decorator, ``*args``, a type check of an argument), whose forward reads ``self.training`` or changes module state, keeps its
forward, and the report says why; the modules it calls are still converted. A forward
with parameters defaulting to ``None`` (``forward(self, x, skip=None)``) is traced with
them given: it runs the fused code when they are, and the class's own forward when one
is ``None``. Python decisions in a rewritten forward on anything else (a flag
attribute, a global) are fixed at conversion, as in any traced graph: convert again
after changing them. Why ``torch.fx``: see :mod:`gankernels.convert.tracing`.

**Layers.** Inside every ``nn.Sequential`` (at any depth, also inside custom modules) these runs
are replaced, first match wins, scanning left to right:

======================================================  =====================
stock run                                               fused module
======================================================  =====================
``Upsample(nearest, ×2) → Conv2d(3×3, pad 1) [→ act]``  ``UpConv3x3``
``Conv2d(3×3, pad 1) [→ act] → MaxPool2d(2)``           ``Conv3x3Pool``
``Conv2d(3×3, pad 1) [→ act]``                          ``Conv3x3``
lone ``MaxPool2d`` / ``Upsample(nearest, integer)``     ``gankernels.nn`` twin
======================================================  =====================

``act`` is ``ReLU``, ``LeakyReLU`` (its ``negative_slope`` becomes ``alpha``), ``Tanh``,
``Sigmoid`` or ``SiLU`` (in place or not), or absent (linear). The pool is fused only
after a monotone activation (pooling commutes with it; not SiLU, which keeps
``Conv3x3`` followed by the pool). "Conv2d(3×3, pad 1)" means kernel 3×3, stride 1,
padding 1 (or ``"same"``), dilation 1, groups 1, zero padding.

The fused module takes the place of the run's ``Conv2d`` and the run's other modules
become ``nn.Identity()``, so the Sequential keeps its length and indexing and the
``state_dict`` keeps its keys (a stock checkpoint loads with ``strict=True``). The fused
modules hold the very same ``Parameter`` objects, so an optimizer built before the
conversion trains the converted model. A module of a Sequential that some traced
forward also calls directly is not absorbed into a run.

Everywhere, a gankernels conv (fused or alone) keeps its output for the backward, so
none is put where that output is modified in place afterwards — by a later in-place
module of the Sequential, by the forward that calls it, or possibly by a forward convert
cannot trace, which is assumed to (only the model's own output is assumed to be left
alone by the caller).

Elsewhere (attributes of custom modules, ``ModuleList``/``ModuleDict`` entries,
children of a Sequential subclass that overrides ``forward``) a 3×3 pad-1 ``Conv2d``,
a ``MaxPool2d`` or a nearest integer ``Upsample`` is swapped for its
``gankernels.nn`` subclass, which has the same attributes and the same results; a
layer every call of which the forward-code pass fused keeps its class.

Modules with hooks (e.g. the old ``spectral_norm``/``weight_norm``), parametrizations,
or of a subclass of the torch class (unknown ``forward``) are never touched; every
candidate that was left is in the report, with the reason.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from gankernels.convert.forward_code import ForwardCodeConverter, _is_stock_sequential
from gankernels.convert.layers import _CONV_TYPES, _POOL_TYPES, LayerConverter
from gankernels.convert.report import ConversionReport, Fusion, Left, Replacement
from gankernels.ops.dispatch import _check_backend_name

__all__ = ["ConversionReport", "Fusion", "Left", "Replacement", "convert"]


def convert(model: nn.Module, *, backend: Optional[str] = None) -> tuple[nn.Module, ConversionReport]:
    """Fuse stock layers and calls of ``model`` into gankernels ops, in place.

    ``backend``: passed to every new module and fused call (``None``: the default
    dispatch, see ``gankernels.use_backend``). Returns the same ``model`` object and a
    :class:`ConversionReport` of what was replaced, what was fused in forward code
    (module path and ``file:line``) and what was left, and why. The converted model
    computes the same function (float64: to rounding), has the same ``state_dict``
    keys, and shares its Parameter objects with the original. Converting twice is
    harmless (the second pass finds nothing new).

    Limitations: the fused ``Conv3x3``/``Conv3x3Pool``/``UpConv3x3`` modules need 4-D
    ``[N, C, H, W]`` input (stock ``Conv2d`` also takes unbatched 3-D input; fused
    calls in forward code fall back to the stock calls for it); hooks registered on a
    replaced or absorbed activation/pool/upsample are not carried over (modules with
    hooks are never absorbed, so this only concerns hooks added afterwards); the root
    module itself is never replaced; a model pickled whole (``torch.save(model)``) is
    loaded with its classes' own forwards (convert it again after loading).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        _check_backend_name(backend, "backend")
    report = ConversionReport()
    if isinstance(model, (*_CONV_TYPES, *_POOL_TYPES, nn.Upsample)):
        report.left.append(
            Left("(root)", type(model).__name__, "the model itself is a single layer; convert cannot replace the object it returns")
        )
    code = ForwardCodeConverter(model, backend, report)
    code.run()
    # A stock Sequential also runs its children itself: those are swapped as usual.
    in_sequentials = {id(c) for m in model.modules() if _is_stock_sequential(m) for c in m.children()}
    layers = LayerConverter(
        backend,
        report,
        called_from_code=frozenset(code.called_from_code),
        fused_in_code=frozenset(code.absorbed - code.called_unfused - in_sequentials),
        seq_result_mutated=code.seq_result_mutated,
        call_results_mutated=code.call_results_mutated,
        seq_input_mutated=code.seq_input_mutated,
    )
    # Collect first: the walk must not see the modules it creates.
    parents = list(model.named_modules())
    for prefix, parent in parents:
        if _is_stock_sequential(parent):
            layers.sequential(parent, prefix)
        else:
            for name in list(parent._modules):
                if parent._modules[name] is not None:
                    layers.lone(parent, prefix, name, fuse_conv=False)
    return model, report
