"""Fusing runs of calls in forward code (``self.lrelu(self.conv(x))``,
``F.max_pool2d(F.relu(self.conv(x)), 2)``, ...), module by module.

Each custom module's forward is traced with :mod:`gankernels.convert.tracing`
(children as calls). In the graph, a run is a 3×3 ``Conv2d`` call with, around it,
a nearest 2× upsample feeding it, an activation taking its output, and a 2×2 max-pool
taking that. The run is fused into one call of
:mod:`gankernels.convert.fused_calls` only where that stays exact:

* every intermediate has the run's next call as its only user (a conv output also
  used elsewhere cannot disappear into a fused op);
* the fused result is not modified in place afterwards: the fused ops keep their
  output for the backward, so an in-place update would make the backward fail where
  the stock calls did not. "Afterwards" follows the result through views and
  aliases, into submodules that modify their input, and out through the module's
  return value to its callers: traced forwards and stock Sequentials are followed; a
  forward that cannot be traced may do anything (nothing it receives is fused); the
  code calling the model is assumed to leave the model's output alone;
* for an upsample run, the input is not modified in place afterwards either (the fused
  op keeps it instead of the upsampled copy).

A run that breaks a rule loses its pool or upsample, or is not fused at all, and the
report says why. The same analysis tells the layer pass where a gankernels conv may
replace a stock one at all (:meth:`ForwardCodeConverter.seq_result_mutated`,
:meth:`ForwardCodeConverter.call_results_mutated`). A module with at least one fusion gets a new ``forward``, the code fx
generates from the edited graph, set on the instance: its class, attributes, children,
parameters and hooks stay as they are.
"""

from __future__ import annotations

import inspect
import linecache
import operator
import types
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from gankernels import nn as gknn
from gankernels.convert import fused_calls
from gankernels.convert.layers import (
    _CONV_TYPES,
    _act_of,
    _conv_epilogue,
    _conv_reason,
    _is_pool2,
    _pair,
    _upsample_reason,
)
from gankernels.convert.report import ConversionReport, Fusion, Left
from gankernels.convert.tracing import Traced, code_location, trace_module
from gankernels.nn import _integer_scale
from gankernels.ops import functional as gk
from gankernels.ops.reference import MONOTONE_ACTIVATIONS

__all__ = ["ForwardCodeConverter", "is_rewritten"]

# ----------------------------------------------------------------------------------
# Calls, by what they are. Argument names in call order, for binding a node's args.

_ACT_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.relu: ("relu", ("input", "inplace")),
    torch.relu: ("relu", ("input",)),
    torch.relu_: ("relu", ("input",)),  # also F.relu_
    F.leaky_relu: ("lrelu", ("input", "negative_slope", "inplace")),
    F.leaky_relu_: ("lrelu", ("input", "negative_slope")),
    torch.tanh: ("tanh", ("input",)),
    torch.tanh_: ("tanh", ("input",)),
    F.tanh: ("tanh", ("input",)),
    torch.sigmoid: ("sigmoid", ("input",)),
    torch.sigmoid_: ("sigmoid", ("input",)),
    F.sigmoid: ("sigmoid", ("input",)),
    F.silu: ("silu", ("input", "inplace")),
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
_ACT_DEFAULTS = {"negative_slope": 0.01, "inplace": False}

_UPSAMPLE_FUNCTIONS: dict[Any, tuple[str, ...]] = {
    F.interpolate: ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"),
    F.upsample: ("input", "size", "scale_factor", "mode", "align_corners"),
    F.upsample_nearest: ("input", "size", "scale_factor"),
}
_UPSAMPLE_DEFAULTS = {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None, "antialias": False}

_POOL_FUNCTIONS: dict[Any, tuple[str, ...]] = {
    F.max_pool2d: ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    torch.max_pool2d: ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
}
_POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}

# Calls whose result never shares memory with their inputs (unless flagged in place).
_FRESH_FUNCTIONS = frozenset(
    {
        operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
        operator.pow, operator.neg, operator.matmul,
        torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.stack, torch.matmul, torch.bmm, torch.mm,
        torch.relu, torch.tanh, torch.sigmoid, torch.exp, torch.sqrt, torch.rsqrt, torch.abs, torch.where,
        torch.sum, torch.mean, torch.clamp, torch.lerp, torch.addcmul, torch.square,
        torch.randn_like, torch.rand_like, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
        F.conv2d, F.conv_transpose2d, F.linear, F.interpolate, F.upsample, F.upsample_nearest, F.max_pool2d,
        F.avg_pool2d, F.adaptive_avg_pool2d, F.pad, F.batch_norm, F.instance_norm, F.layer_norm, F.group_norm,
        F.normalize, F.softplus, F.gelu, F.elu, F.silu, F.relu, F.leaky_relu, F.tanh, F.sigmoid, F.pixel_shuffle,
        F.embedding, F.hardtanh, F.mish,
        gk.conv3x3, gk.conv3x3_pool, gk.up_conv3x3, gk.bias_act, gk.max_pool2d, gk.upsample_nearest2d,
        fused_calls.conv3x3, fused_calls.conv3x3_pool, fused_calls.up_conv3x3,
    }
)  # fmt: skip
_FRESH_METHODS = frozenset(
    {
        "add", "sub", "mul", "div", "true_divide", "rsub", "pow", "neg", "matmul", "mm", "bmm", "clone", "repeat",
        "sum", "mean", "std", "var", "norm", "amax", "amin", "prod", "cumsum", "softmax", "log_softmax",
        "tanh", "sigmoid", "relu", "exp", "abs", "sqrt", "rsqrt", "square", "clamp", "clip", "lerp", "addcmul",
        "floor", "ceil", "round", "sign", "new_zeros", "new_ones", "new_empty", "new_full",
    }
)  # fmt: skip
# torch.nn layers whose output is a new tensor (when not in place).
_FRESH_MODULES = (
    nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample, nn.Embedding,
    nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.GELU, nn.ELU, nn.Softplus, nn.Hardtanh, nn.PReLU,
    nn.Mish, nn.Hardswish, nn.Softmax,
)  # fmt: skip
_INPLACE_FUNCTIONS = frozenset(fused_calls.INPLACE_OPERATORS.values()) | {fused_calls.setitem}


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The node's arguments by name, defaults filled in; None if they do not fit."""
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    bound = {k: v for k, v in defaults.items() if k in names}
    bound.update(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound if "input" in bound else None


_SIGNATURES: dict[Any, Optional[inspect.Signature]] = {}


def _signature_of(fn: Any) -> Optional[inspect.Signature]:
    """``inspect.signature(fn)``, cached; None for callables without one (builtins)."""
    try:
        return _SIGNATURES[fn]
    except KeyError:
        pass
    except TypeError:  # unhashable
        return None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    _SIGNATURES[fn] = sig
    return sig


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _constant(v: Any) -> bool:
    """Whether ``v`` (an argument) holds no traced value."""
    found = []
    fx.node.map_arg(v, found.append)
    return not found


_AUGMENTED = {"iadd": "+=", "isub": "-=", "imul": "*=", "itruediv": "/=", "ifloordiv": "//=", "ipow": "**="}


def _fn_name(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__name__", repr(fn))
    if fn is fused_calls.setitem:
        return "item assignment"
    if fn in _INPLACE_FUNCTIONS:
        return f"'{_AUGMENTED.get(name, name)}'"
    if mod.startswith("torch.nn.functional") or mod == "torch._C._nn":
        return f"F.{name}"
    if mod.startswith("torch") or isinstance(fn, types.BuiltinFunctionType):
        return f"torch.{name}"
    return name


def _describe(node: fx.Node, owner: nn.Module) -> str:
    if node.op == "call_module":
        return f"self.{node.target} ({type(owner.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return _fn_name(node.target)
    return node.name


def is_rewritten(m: nn.Module) -> bool:
    """Whether ``m``'s forward was rewritten by an earlier :func:`gankernels.convert`."""
    fwd = m.__dict__.get("forward")
    return isinstance(fwd, types.MethodType) and hasattr(fwd.__func__, "_gankernels_stock_forward")


def _instance_forward(m: nn.Module) -> bool:
    """Whether ``m`` has a forward of its own on the instance, other than the class's
    (which a pickled and reloaded converted module has) or one convert wrote."""
    fwd = m.__dict__.get("forward")
    if fwd is None or is_rewritten(m):
        return False
    return not (isinstance(fwd, types.MethodType) and fwd.__func__ is type(m).forward and fwd.__self__ is m)


def _is_custom(m: nn.Module) -> bool:
    """A module whose forward is user code: not a torch.nn or gankernels layer, not a
    stock Sequential (the layer pass handles those), not a container without forward."""
    cls = type(m)
    if cls.__module__.startswith("torch.") or cls.__module__ == gknn.__name__:
        return False
    if isinstance(m, nn.Sequential) and cls.forward is nn.Sequential.forward:
        return False
    return cls.forward is not nn.Module.forward


def _is_stock_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _has_conv_candidates(m: nn.Module) -> bool:
    """Whether a qualifying 3×3 Conv2d is a child of ``m`` (or inside a child
    ModuleList/ModuleDict/Sequential): a call its forward could fuse."""
    stack = list(m.children())
    while stack:
        c = stack.pop()
        if isinstance(c, _CONV_TYPES) and _conv_reason(c) is None:
            return True
        if isinstance(c, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            stack.extend(c.children())
    return False


# ----------------------------------------------------------------------------------
# Where a module is called from: a traced forward (a call_module node) or a Sequential.


@dataclass(frozen=True)
class _GraphSite:
    owner: nn.Module
    node: fx.Node


@dataclass(frozen=True)
class _SeqSite:
    seq: nn.Sequential
    index: int


_Site = Union[_GraphSite, _SeqSite]


@dataclass
class _Run:
    """One fusable run in one forward: ``nodes`` in graph order, conv included."""

    owner: nn.Module
    conv_node: fx.Node
    conv: nn.Conv2d
    up: Optional[fx.Node] = None
    up_input: Optional[fx.Node] = None  # as planned (the rewrite reads it again)
    act: Optional[fx.Node] = None
    pool: Optional[fx.Node] = None
    epilogue: tuple[str, float, float, Optional[float]] = ("linear", 0.2, 1.0, None)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (what was dropped, why)

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for n in (self.up, self.conv_node, self.act, self.pool) if n is not None]

    @property
    def core(self) -> fx.Node:
        """The conv, or the activation absorbed after it: the fused result before pooling."""
        return self.act if self.act is not None else self.conv_node

    @property
    def input(self) -> fx.Node:
        return self.up_input if self.up is not None else self.conv_node.args[0]

    @property
    def kind(self) -> str:
        return "up_conv3x3" if self.up is not None else ("conv3x3_pool" if self.pool is not None else "conv3x3")

    def op_text(self) -> str:
        act, alpha, gain, clamp = self.epilogue
        parts = [f"act={act!r}"] + ([f"alpha={alpha}"] if act == "lrelu" else [])
        parts += ([f"gain={gain}"] if gain != 1 else []) + ([f"clamp={clamp}"] if clamp is not None else [])
        return f"gankernels.{self.kind}({', '.join(parts)})"


_FUSED_FUNCTION = {
    "conv3x3": fused_calls.conv3x3,
    "conv3x3_pool": fused_calls.conv3x3_pool,
    "up_conv3x3": fused_calls.up_conv3x3,
}


class ForwardCodeConverter:
    """The forward-code pass over one model (see the module docstring)."""

    def __init__(self, model: nn.Module, backend: Optional[str], report: ConversionReport) -> None:
        self.model = model
        self.backend = backend
        self.report = report
        self.paths: dict[int, str] = {}
        self.parents: dict[int, list[nn.Module]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(m), name)
            if name:
                self.parents.setdefault(id(m), []).append(model.get_submodule(name.rpartition(".")[0]))
        self.opaque: dict[int, str] = {}  # custom modules whose forward could not be traced: why
        self.traced: dict[int, Traced] = {}
        self.sites: dict[int, list[_Site]] = {}
        self.order: dict[int, dict[fx.Node, int]] = {}
        self._mutates_cache: dict[int, Optional[str]] = {}
        self._fresh_cache: dict[tuple, bool] = {}
        self._in_progress: set = set()
        self.called_from_code: set[int] = set()
        self.absorbed: set[int] = set()  # modules called inside a fused run
        self.called_unfused: set[int] = set()  # modules with a call outside any fused run

    # -- paths and tracing ---------------------------------------------------------

    def path(self, m: nn.Module) -> str:
        return self.paths.get(id(m), "") or "(root)"

    def trace(self, m: nn.Module) -> Traced:
        t = self.traced.get(id(m))
        if t is None:
            if _instance_forward(m):
                t = Traced(m, error="its forward is replaced on the instance; only a class's forward is traced")
            elif parametrize.is_parametrized(m):
                t = Traced(m, error="it has parametrizations (torch.nn.utils.parametrize); tracing would freeze them")
            else:
                t = trace_module(m)
            self.traced[id(m)] = t
            if t.graph is not None:
                self.order[id(m)] = {n: i for i, n in enumerate(t.graph.nodes)}
        return t

    def collect(self) -> list[nn.Module]:
        """Trace every custom module and index where each module is called; return the
        modules whose forward may hold runs."""
        seen: set[int] = set()
        owners = []
        for m in self.model.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            if _is_stock_sequential(m):
                for i, child in enumerate(m):
                    self.sites.setdefault(id(child), []).append(_SeqSite(m, i))
            if is_rewritten(m):  # by an earlier convert: nothing new to fuse
                self._index_rewritten(m)
                continue
            if not _is_custom(m):
                continue
            t = self.trace(m)
            if t.graph is None:
                self.opaque[id(m)] = t.error
                if _has_conv_candidates(m):
                    self.report.left.append(
                        Left(
                            self.path(m),
                            type(m).__name__,
                            f"forward cannot be traced by torch.fx ({t.error}); its forward code is left as it is "
                            "(its layers are at most swapped one by one)",
                            t.where,
                        )
                    )
                continue
            owners.append(m)
            for node in t.graph.nodes:
                if node.op == "call_module":
                    sub = m.get_submodule(node.target)
                    self.sites.setdefault(id(sub), []).append(_GraphSite(m, node))
                    self.called_from_code.add(id(sub))
        return owners

    def _index_rewritten(self, m: nn.Module) -> None:
        """Record the calls of a forward rewritten by an earlier convert (its graph is
        kept on the function): the convs it fuses keep their class."""
        graph = m.forward.__func__._gankernels_graph
        self.traced[id(m)] = Traced(m, graph=graph)
        self.order[id(m)] = {n: i for i, n in enumerate(graph.nodes)}
        for node in graph.nodes:
            if node.op == "call_module":
                sub = m.get_submodule(node.target)
                self.sites.setdefault(id(sub), []).append(_GraphSite(m, node))
                self.called_from_code.add(id(sub))
                self.called_unfused.add(id(sub))
            elif node.op == "get_attr" and any(u.target in _FUSED_FUNCTION.values() for u in node.users):
                self.absorbed.add(id(m.get_submodule(node.target)))

    # -- matching ------------------------------------------------------------------

    def _module(self, owner: nn.Module, node: fx.Node) -> nn.Module:
        return owner.get_submodule(node.target)

    def _activation(self, owner: nn.Module, node: fx.Node, x: fx.Node) -> Optional[tuple[str, float]]:
        """(act, alpha) if ``node`` applies a supported activation to ``x`` alone."""
        if node.op == "call_module":
            if node.args == (x,) and not node.kwargs:
                return _act_of(self._module(owner, node))
            return None
        if node.op == "call_method":
            act = _ACT_METHODS.get(node.target)
            return (act, 0.2) if act and node.args == (x,) and not node.kwargs else None
        if node.op != "call_function" or node.target not in _ACT_FUNCTIONS:
            return None
        act, names = _ACT_FUNCTIONS[node.target]
        bound = _bind(node, names, _ACT_DEFAULTS)
        if bound is None or bound["input"] is not x or not all(_constant(v) for k, v in bound.items() if k != "input"):
            return None
        slope = bound.get("negative_slope", 0.2)
        if not _is_number(slope) or not isinstance(bound.get("inplace", False), bool):
            return None
        return act, float(slope)

    def _upsample2_input(self, owner: nn.Module, node: fx.Node) -> Optional[fx.Node]:
        """The input of ``node`` if it is a nearest 2× upsample, else None."""
        if node.op == "call_module":
            m = self._module(owner, node)
            ok = (
                isinstance(m, (nn.Upsample, gknn.Upsample))
                and len(node.args) == 1
                and not node.kwargs
                and isinstance(node.args[0], fx.Node)
                and _upsample_reason(m) is None
                and _integer_scale(m.scale_factor) == 2
            )
            return node.args[0] if ok else None
        if node.op != "call_function" or node.target not in _UPSAMPLE_FUNCTIONS:
            return None
        bound = _bind(node, _UPSAMPLE_FUNCTIONS[node.target], _UPSAMPLE_DEFAULTS)
        ok = (
            bound is not None
            and isinstance(bound["input"], fx.Node)
            and all(_constant(v) for k, v in bound.items() if k != "input")
            and bound["size"] is None
            and bound.get("mode", "nearest") == "nearest"
            and bound.get("align_corners") is None
            and not bound.get("antialias", False)
            and _integer_scale(bound["scale_factor"]) == 2
        )
        return bound["input"] if ok else None

    def _is_pool2(self, owner: nn.Module, node: fx.Node, x: fx.Node) -> bool:
        """Whether ``node`` is a 2×2 stride-2 max-pool of ``x``."""
        if node.op == "call_module":
            return node.args == (x,) and not node.kwargs and _is_pool2(self._module(owner, node))
        if node.op != "call_function" or node.target not in _POOL_FUNCTIONS:
            return False
        bound = _bind(node, _POOL_FUNCTIONS[node.target], _POOL_DEFAULTS)
        if bound is None or bound["input"] is not x or not all(_constant(v) for k, v in bound.items() if k != "input"):
            return False
        stride = bound["stride"]
        try:
            return (
                _pair(bound["kernel_size"]) == (2, 2)
                and (stride is None or stride in ((), []) or _pair(stride) == (2, 2))
                and _pair(bound["padding"]) == (0, 0)
                and _pair(bound["dilation"]) == (1, 1)
                and not bound["ceil_mode"]
                and not bound.get("return_indices", False)
            )
        except TypeError:
            return False

    # -- aliasing and in-place updates -----------------------------------------------

    def _output_fresh(self, m: nn.Module) -> bool:
        """Whether module ``m`` always returns a tensor that shares no memory with its input."""
        if isinstance(m, (gknn.Conv3x3, gknn.Conv3x3Pool, gknn.UpConv3x3, gknn.BiasAct)):
            return True
        if _is_stock_sequential(m):
            return any(self._output_fresh(c) for c in m)
        if _is_custom(m) and not is_rewritten(m):
            return self._custom_output_fresh(m)
        return isinstance(m, _FRESH_MODULES) and not getattr(m, "inplace", False)

    def _custom_output_fresh(self, m: nn.Module) -> bool:
        """Whether the traced forward of ``m`` returns nothing that may share memory with
        its inputs (False when it cannot be traced)."""
        key = ("fresh", id(m))
        if key in self._fresh_cache:
            return self._fresh_cache[key]
        if key in self._in_progress:
            return False
        self._in_progress.add(key)
        try:
            t = self.trace(m)
            fresh = t.graph is not None
            if fresh:
                out = next(n for n in reversed(t.graph.nodes) if n.op == "output")
                returned = set(out.all_input_nodes)
                fresh = not any(returned & self._alias_class(m, p) for p in t.graph.nodes if p.op == "placeholder")
        finally:
            self._in_progress.discard(key)
        self._fresh_cache[key] = fresh
        return fresh

    def _may_alias_input(self, owner: nn.Module, n: fx.Node) -> bool:
        """Whether ``n``'s result may share memory with one of its inputs."""
        if n.op == "call_module":
            return not self._output_fresh(self._module(owner, n))
        if n.op == "call_method":
            return n.target not in _FRESH_METHODS
        if n.op == "call_function":
            return n.target not in _FRESH_FUNCTIONS or self._flagged_inplace(n)
        return False

    @staticmethod
    def _flagged_inplace(n: fx.Node) -> bool:
        if n.kwargs.get("inplace") is True:
            return True
        spec = _ACT_FUNCTIONS.get(n.target)
        if spec is not None:
            names = spec[1]
            return "inplace" in names and len(n.args) > names.index("inplace") and n.args[names.index("inplace")] is True
        sig = _signature_of(n.target)
        if sig is None or "inplace" not in sig.parameters:
            return False
        try:
            bound = sig.bind(*n.args, **n.kwargs)
        except TypeError:
            return False
        return bound.arguments.get("inplace") is True

    def _alias_class(self, owner: nn.Module, node: fx.Node) -> set[fx.Node]:
        """The nodes whose results may share memory with ``node``'s: up through
        aliasing producers to the roots, then down through aliasing users."""
        upstream, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in upstream:
                continue
            upstream.add(n)
            if self._may_alias_input(owner, n):
                stack.extend(i for i in n.all_input_nodes if i.op != "get_attr")
        aliases, stack = set(), list(upstream)
        while stack:
            n = stack.pop()
            if n in aliases:
                continue
            aliases.add(n)
            stack.extend(u for u in n.users if self._may_alias_input(owner, u))
        return aliases

    def _mutated_inputs(self, owner: nn.Module, n: fx.Node) -> tuple[list[fx.Node], str]:
        """The input nodes ``n`` may modify in place, and how (for the report)."""
        first = [n.args[0]] if n.args and isinstance(n.args[0], fx.Node) else []
        if n.op == "call_method":
            name = str(n.target)
            if name.endswith("_") and not name.startswith("_"):
                return first, f"the in-place .{name}()"
        elif n.op == "call_function":
            name = getattr(n.target, "__name__", "")
            if n.target in _INPLACE_FUNCTIONS:
                return first, f"the in-place {_fn_name(n.target)}"
            if name.endswith("_") and not name.startswith("_"):
                return first, f"the in-place {_fn_name(n.target)}"
            if self._flagged_inplace(n):
                return first, f"{_fn_name(n.target)}(inplace=True)"
            out = n.kwargs.get("out")
            if isinstance(out, fx.Node):
                return [out], f"{_fn_name(n.target)}(out=...)"
        elif n.op == "call_module":
            why = self._module_mutates(self._module(owner, n))
            if why:
                return list(n.all_input_nodes), f"self.{n.target}, which {why}"
        return [], ""

    def _module_mutates(self, m: nn.Module) -> Optional[str]:
        """Why calling ``m`` may modify its input in place (None: it does not)."""
        key = id(m)
        if key in self._mutates_cache:
            return self._mutates_cache[key]
        if key in self._in_progress:  # a module calling itself: decided by its other paths
            return None
        self._in_progress.add(key)
        try:
            why = self._module_mutates_uncached(m)
        finally:
            self._in_progress.discard(key)
        self._mutates_cache[key] = why
        return why

    def _module_mutates_uncached(self, m: nn.Module) -> Optional[str]:
        if _is_stock_sequential(m):
            for child in m:
                why = self._module_mutates(child)
                if why or self._output_fresh(child):
                    return why
            return None
        if not _is_custom(m):
            return f"runs in place ({type(m).__name__}(inplace=True))" if getattr(m, "inplace", False) is True else None
        t = self.trace(m)
        if t.graph is None:
            return f"cannot be traced ({t.error}), so it may modify its input in place"
        for p in (n for n in t.graph.nodes if n.op == "placeholder"):
            aliases = self._alias_class(m, p)
            for n in t.graph.nodes:
                hit, how = self._mutated_inputs(m, n)
                if set(hit) & aliases:
                    return f"modifies its input in place ({how} at {code_location(n, m) or self.path(m)})"
        return None

    def _mutated_after(self, owner: nn.Module, node: fx.Node, after: fx.Node, seen: set) -> Optional[str]:
        """Why the value of ``node`` may be modified in place once ``after`` has run
        (None: it is not, as far as convert can see)."""
        key = (id(owner), node, after)
        if key in seen:
            return None
        seen.add(key)
        graph = self.traced[id(owner)].graph
        order = self.order[id(owner)]
        aliases = self._alias_class(owner, node)
        for n in graph.nodes:
            if order[n] <= order[after] or n.op == "output":
                continue
            hit, how = self._mutated_inputs(owner, n)
            if set(hit) & aliases:
                at = code_location(n, owner)
                return f"{how}{f' at {at}' if at else ''} modifies it afterwards"
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        if set(out.all_input_nodes) & aliases:  # returned to the callers
            for site in self.sites.get(id(owner), []):
                why = self._site_mutates(site, None, seen)
                if why:
                    return why
            why = self.opaque_caller(owner)
            if why:
                return why
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for p in (n for n in placeholders if n in aliases):  # an input of the forward
            if p.target.startswith("*"):
                continue  # *args/**kwargs: the caller's values cannot be told apart
            for site in self.sites.get(id(owner), []):
                why = self._site_mutates(site, (placeholders.index(p), p.target), seen)
                if why:
                    return why
            why = self.opaque_caller(owner)
            if why:
                return why
        return None

    def opaque_caller(self, m: nn.Module) -> Optional[str]:
        """Why code convert cannot see may call ``m`` (None: only seen code does).

        A forward calls its own children (directly or through a ModuleList/ModuleDict),
        rarely deeper: an untraceable owner is such a caller; a module no seen code
        calls may be called by any untraceable ancestor."""
        owners, stack = [], list(self.parents.get(id(m), []))
        while stack:  # the nearest ancestors that have a forward
            a = stack.pop()
            if isinstance(a, (nn.ModuleList, nn.ModuleDict)):
                stack.extend(self.parents.get(id(a), []))
            else:
                owners.append(a)
        suspects = owners
        if not self.sites.get(id(m)):
            suspects, stack, seen = [], list(owners), set()
            while stack:
                a = stack.pop()
                if id(a) not in seen:
                    seen.add(id(a))
                    suspects.append(a)
                    stack.extend(self.parents.get(id(a), []))
        for a in suspects:
            if id(a) in self.opaque:
                return (
                    f"it is called from {self.path(a)}.forward ({type(a).__name__}), which convert cannot trace "
                    f"({self.opaque[id(a)]}), so an in-place update of its result there cannot be ruled out"
                )
        return None

    def seq_result_mutated(self, seq: nn.Sequential, index: int) -> Optional[str]:
        """Why the result of ``seq[index]`` may be modified in place afterwards."""
        try:
            return self._site_mutates(_SeqSite(seq, index), None, set())
        except Exception as e:  # noqa: BLE001 - unknown: assume it may be
            return f"convert could not analyse its callers ({type(e).__name__}: {e})"

    def seq_input_mutated(self, seq: nn.Sequential) -> Optional[str]:
        """Why the input of ``seq`` may be modified in place after ``seq`` ran (an
        ``UpConv3x3`` at its start keeps that input for the backward)."""
        try:
            return self._site_mutates(_SeqSite(seq, 0), (0, "input"), set())
        except Exception as e:  # noqa: BLE001 - unknown: assume it may be
            return f"convert could not analyse its callers ({type(e).__name__}: {e})"

    def call_results_mutated(self, m: nn.Module) -> Optional[str]:
        """Why a result of calling ``m`` (outside a stock Sequential) may be modified in
        place afterwards, by the forwards that call it."""
        try:
            for site in self.sites.get(id(m), []):
                if isinstance(site, _GraphSite):
                    why = self._mutated_after(site.owner, site.node, site.node, set())
                    if why:
                        at = code_location(site.node, site.owner)
                        where = f" ({at})" if at else ""
                        return f"its result in {self.path(site.owner)}.forward{where} is modified in place: {why}"
            return self.opaque_caller(m)
        except Exception as e:  # noqa: BLE001 - unknown: assume it may be
            return f"convert could not analyse its callers ({type(e).__name__}: {e})"

    def _site_mutates(self, site: _Site, arg: Optional[tuple[int, str]], seen: set) -> Optional[str]:
        """Why the caller at ``site`` may modify in place, after the call, the callee's
        result (``arg`` None) or the argument it passed for parameter ``arg`` (position
        among the forward's parameters, name); None: it does not, as far as seen."""
        if isinstance(site, _GraphSite):
            if id(site.owner) not in self.order:
                return None
            call = site.node
            value = site.node if arg is None else call.kwargs.get(arg[1], call.args[arg[0]] if arg[0] < len(call.args) else None)
            if not isinstance(value, fx.Node):
                return None
            return self._mutated_after(site.owner, value, call, seen)
        if arg is None:
            # In a stock Sequential the later children see the result.
            for child in list(site.seq)[site.index + 1 :]:
                why = self._module_mutates(child)
                if why:
                    return f"the next module in Sequential {self.path(site.seq)} ({type(child).__name__}) {why}"
                if self._output_fresh(child):
                    return None
            outer = (w for o in self.sites.get(id(site.seq), []) if (w := self._site_mutates(o, None, seen)))
            return next(outer, None) or self.opaque_caller(site.seq)
        if site.index == 0 and arg[0] == 0:  # the Sequential's own input
            outer = (w for o in self.sites.get(id(site.seq), []) if (w := self._site_mutates(o, arg, seen)))
            return next(outer, None) or self.opaque_caller(site.seq)
        return None  # an earlier child's result: only this module and later ones see it

    # -- planning ------------------------------------------------------------------

    def plan(self, owner: nn.Module, c: fx.Node) -> Optional[_Run]:
        """The run around conv call ``c``, or None (no run, or one that was refused:
        the report then says why)."""
        conv = self._module(owner, c)
        if len(c.args) != 1 or c.kwargs or not isinstance(c.args[0], fx.Node):
            return None
        run = _Run(owner, c, conv, epilogue=_conv_epilogue(conv))
        x = c.args[0]
        up_input = self._upsample2_input(owner, x)
        if up_input is not None:
            if len(x.users) == 1:
                run.up, run.up_input = x, up_input
            else:
                run.notes.append((_describe(x, owner), "the upsampled tensor is also used elsewhere"))
        act, alpha, gain, clamp = run.epilogue
        if act == "linear" and gain == 1 and clamp is None:
            acts = [(u, found) for u in c.users if (found := self._activation(owner, u, c)) is not None]
            if acts and len(c.users) > 1:
                self._refuse(run, f"the conv's output is used {len(c.users)} times; the fused op would not produce it")
                return None
            if acts:
                run.act, (act, alpha) = acts[0]
                run.epilogue = (act, alpha, gain, clamp)
        core = run.core
        pools = [u for u in core.users if self._is_pool2(owner, u, core)]
        if pools and act in MONOTONE_ACTIVATIONS and gain >= 0:
            if len(core.users) == 1:
                run.pool = pools[0]
            else:
                run.notes.append((_describe(pools[0], owner), "the activation's output is also used elsewhere"))
        elif pools:
            run.notes.append((_describe(pools[0], owner), f"{act} is not monotone: pooling does not commute with it"))
        if run.up is None and run.act is None and run.pool is None:
            if run.notes:  # a candidate all of whose parts were left
                self._refuse(run, "; ".join(f"{what}: {why}" for what, why in run.notes))
            return None
        # In-place updates afterwards: the fused op keeps its output (and input).
        if run.pool is not None:
            why = self._mutated_after(owner, run.pool, run.pool, set())
            if why:
                run.notes.append((_describe(run.pool, owner), f"the pooled result is modified in place ({why})"))
                run.pool = None
        why = self._mutated_after(owner, run.core, run.nodes[-1], set())
        if why:
            self._refuse(run, f"its result is modified in place afterwards: {why}; the fused op keeps it for the backward")
            return None
        if run.up is not None:
            why = self._mutated_after(owner, run.input, run.nodes[-1], set())
            if why:
                run.notes.append((_describe(run.up, owner), f"the upsample's input is modified in place afterwards ({why})"))
                run.up = None
        if run.up is None and run.act is None and run.pool is None:
            self._refuse(run, "; ".join(f"{what}: {why}" for what, why in run.notes))
            return None
        return run

    def _refuse(self, run: _Run, why: str) -> None:
        calls = " → ".join(_describe(n, run.owner) for n in run.nodes)
        self.report.left.append(
            Left(self.path(run.owner), type(run.owner).__name__, f"{calls}: {why}", code_location(run.conv_node, run.owner))
        )

    # -- rewriting -----------------------------------------------------------------

    def run(self) -> None:
        """Plan every module's runs, then rewrite the forwards that have some."""
        plans: list[tuple[nn.Module, list[_Run]]] = []
        for owner in self.collect():
            graph = self.traced[id(owner)].graph
            calls = [n for n in graph.nodes if n.op == "call_module"]
            runs: list[_Run] = []
            left_before = len(self.report.left)
            try:
                for node in calls:
                    sub = self._module(owner, node)
                    if isinstance(sub, _CONV_TYPES) and _conv_reason(sub) is None:
                        r = self.plan(owner, node)
                        if r is not None:
                            runs.append(r)
            except Exception as e:  # noqa: BLE001 - a gap in the analysis must not break the model
                del self.report.left[left_before:]
                self._leave_unanalysed(owner, e)
                runs = []
            in_runs = {n for r in runs for n in r.nodes}
            self.called_unfused.update(id(self._module(owner, n)) for n in calls if n not in in_runs)
            if runs:
                plans.append((owner, runs))
        for owner, runs in plans:
            why = self._mode_dependent(owner)
            if why:
                self.opaque[id(owner)] = "its forward reads self.training"
                self.report.left.append(Left(self.path(owner), type(owner).__name__, why))
                self.called_unfused.update(id(self._module(owner, n)) for r in runs for n in r.nodes if n.op == "call_module")
                continue
            try:
                self._rewrite(owner, runs)
            except Exception as e:  # noqa: BLE001 - as above: the forward stays the class's
                self._leave_unanalysed(owner, e)
                self.called_unfused.update(id(self._module(owner, n)) for r in runs for n in r.nodes if n.op == "call_module")

    def _leave_unanalysed(self, owner: nn.Module, err: Exception) -> None:
        self.opaque[id(owner)] = f"convert could not analyse it: {type(err).__name__}: {err}"
        self.report.left.append(
            Left(
                self.path(owner),
                type(owner).__name__,
                f"convert could not analyse its forward ({type(err).__name__}: {err}); its forward code is left as it is",
            )
        )

    def _mode_dependent(self, owner: nn.Module) -> Optional[str]:
        other = trace_module(owner, training=not owner.training, stack_traces=False)
        if other.graph is None or _signature(other.graph) != _signature(self.traced[id(owner)].graph):
            return (
                "its forward reads self.training (the traced code differs between train() and eval()); "
                "its forward code is left as it is"
            )
        return None

    def _rewrite(self, owner: nn.Module, runs: list[_Run]) -> None:
        """Edit the owner's graph (planning is over: nothing reads it again), install it as
        the forward, then report, so that a failure leaves no trace in the report."""
        fused_entries, left_entries, absorbed = [], [], set()
        graph = self.traced[id(owner)].graph
        for r in runs:
            last = r.nodes[-1]
            where = code_location(last, owner)
            calls = tuple(_describe(n, owner) for n in r.nodes)
            backend = self.backend if self.backend is not None else getattr(r.conv, "backend", None)
            # Read the input now: an earlier fusion may have replaced the node it was.
            x = self._upsample2_input(owner, r.up) if r.up is not None else r.conv_node.args[0]
            with graph.inserting_before(last):
                conv = graph.get_attr(r.conv_node.target)
                fused = graph.call_function(_FUSED_FUNCTION[r.kind], (x, conv, *r.epilogue, backend))
            fused.meta["stack_trace"] = last.meta.get("stack_trace")
            last.replace_all_uses_with(fused)
            for n in reversed(r.nodes):
                graph.erase_node(n)
            fused_entries.append(Fusion(self.path(owner), where, calls, r.op_text(), self.path(r.conv)))
            left_entries += [
                Left(self.path(owner), type(owner).__name__, f"{what} not fused into {r.op_text()}: {why}", where)
                for what, why in r.notes
            ]
            absorbed.update(id(self._module(owner, n)) for n in r.nodes if n.op == "call_module")
        graph.lint()
        _install(owner, graph)
        # The later passes analyse the rewritten graph: renumber it, drop the erased calls.
        self.order[id(owner)] = {n: i for i, n in enumerate(graph.nodes)}
        erased = {n for r in runs for n in r.nodes}
        for key, sites in self.sites.items():
            self.sites[key] = [x for x in sites if not (isinstance(x, _GraphSite) and x.node in erased)]
        self.report.fused += fused_entries
        self.report.left += left_entries
        self.absorbed |= absorbed


def _signature(graph: fx.Graph) -> list[tuple]:
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes]


_counter = count()


def _install(owner: nn.Module, graph: fx.Graph) -> None:
    """Make the code of ``graph`` ``owner``'s forward (set on the instance)."""
    code = graph.python_code(root_module="self")
    cls = type(owner)
    filename = f"<gankernels.convert: {cls.__qualname__}.forward #{next(_counter)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(keepends=True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - code fx generated from the traced graph
    forward = namespace["forward"]
    optional = _none_defaults(cls.forward)
    if optional:
        forward = _guarded(forward, cls.forward, optional)
    forward.__qualname__ = f"{cls.__qualname__}.forward"
    forward.__doc__ = f"{cls.__qualname__}.forward with runs fused by gankernels.convert (generated code; see the report)."
    forward._gankernels_stock_forward = cls.forward
    forward._gankernels_graph = graph
    owner.forward = types.MethodType(forward, owner)


def _none_defaults(forward) -> list[tuple[Optional[int], str]]:
    """The forward's parameters that default to None, as (position or None, name).

    Tracing passes a proxy for every parameter, so the graph is the code path taken
    when such a parameter is given (``if skip is not None`` is true for a proxy)."""
    params = list(inspect.signature(forward).parameters.values())[1:]  # without self
    return [
        (i if p.kind != p.KEYWORD_ONLY else None, p.name)
        for i, p in enumerate(params)
        if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY, p.KEYWORD_ONLY)
    ]


def _guarded(fused, stock, optional: list[tuple[Optional[int], str]]):
    """``fused`` when every parameter of ``optional`` is given (not None), else the
    class's own ``stock`` forward, the code path tracing did not follow."""

    def forward(self, *args, **kwargs):
        for i, name in optional:
            value = kwargs.get(name, args[i] if i is not None and i < len(args) else None)
            if value is None:
                return stock(self, *args, **kwargs)
        return fused(self, *args, **kwargs)

    return forward
