"""Tracing one module's forward with ``torch.fx``, its children left as calls.

Why ``torch.fx``: it records a forward as a graph of the module, function and method
calls the Python code makes, with the submodules as opaque ``call_module`` nodes. That
is exactly the level the fusions are stated at (``self.conv`` → ``F.leaky_relu``), the
graph has explicit users (which is how "an intermediate used twice" is seen), and it
generates plain Python back from the edited graph, which can become the module's own
``forward``: the module object, its class, attributes and children stay as they are,
and ``torch.compile`` sees ordinary code. ``torch.export``/dynamo capture would trace
through the children and below autograd, losing the module structure the rewritten
code must keep calling; editing the source (AST) would see no data flow.

What fx cannot see is refused rather than guessed: data-dependent control flow fails
to trace (the module is left, with the tracer's message); so is a forward that changes
module state, creates tensor constants, takes ``*args``, inspects its arguments' types
(``isinstance(x, ...)``), is decorated, or changes grad mode or autocast while running
(``with torch.no_grad()``, also in a helper); :mod:`gankernels.convert.forward_code`
also leaves a forward that reads ``self.training``. Python decisions on anything else
(a flag attribute, a global) are fixed at conversion, as for any traced graph.

Two fx gaps are closed here: ``y += z`` on a proxy would be recorded as ``y = y + z``
(a new tensor, silently losing the in-place update another reference might see) and
``y[i] = z`` would not trace at all; the proxies below record both as calls.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import textwrap
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx, nn

from gankernels.convert import fused_calls

__all__ = ["Traced", "code_location", "trace_module"]


class _Proxy(fx.Proxy):
    """An fx proxy that records augmented and item assignment as in-place calls."""

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", fused_calls.setitem, (self, index, value), {})


def _define_inplace(name: str, fn) -> None:
    def method(self: _Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", fn, (self, other), {})

    method.__name__ = name
    setattr(_Proxy, name, method)


for _name, _fn in fused_calls.INPLACE_OPERATORS.items():
    _define_inplace(_name, _fn)


class _ChildrenAsCalls(fx.Tracer):
    """Traces only the root's own forward: every submodule call is one node."""

    proxy_buffer_attributes = True  # buffers as get_attr nodes, not baked constants

    def __init__(self, stack_traces: bool = True) -> None:
        super().__init__()
        self.record_stack_traces = stack_traces  # for the report's file:line
        self.mode_at_start = _grad_modes()
        self.mode_changed: Optional[fx.Node] = None  # the first call made in another mode

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if self.mode_changed is None and _grad_modes() != self.mode_at_start:
            self.mode_changed = node
        return node


def _grad_modes() -> tuple:
    """Grad mode, inference mode and autocast: state fx does not record, so a forward
    that changes it while running (``torch.no_grad()`` anywhere) cannot be traced."""
    autocast = tuple(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast


@dataclass
class Traced:
    """The outcome of tracing one module: ``graph`` or, when it could not be traced,
    ``error`` (why) and ``where`` (``file:line``, when known)."""

    module: nn.Module
    graph: Optional[fx.Graph] = None
    error: str = ""
    where: str = ""


def forward_file(module: nn.Module) -> str:
    code = getattr(type(module).forward, "__code__", None)
    return code.co_filename if code is not None else ""


def _short(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive (Windows)
        return filename
    return filename if rel.startswith("..") else rel


def code_location(node: fx.Node, module: nn.Module) -> str:
    """``file:line`` of the call that made ``node``: the line in ``module``'s forward
    (a call into a helper function is located at the call), else the innermost frame
    in the forward's file, else the innermost frame outside torch."""
    frames = [(f, int(n), name) for f, n, name in re.findall(r'File "([^"]+)", line (\d+), in (\S+)', node.stack_trace or "")]
    code = getattr(type(module).forward, "__code__", None)
    if code is not None:
        last = max((ln for _, _, ln in code.co_lines() if ln is not None), default=code.co_firstlineno)
        for filename, line, name in reversed(frames):
            if filename == code.co_filename and name == code.co_name and code.co_firstlineno <= line <= last:
                return f"{_short(filename)}:{line}"
    for filename, line, _ in reversed(frames):
        if filename == forward_file(module):
            return f"{_short(filename)}:{line}"
    for filename, line, _ in reversed(frames):
        if f"{os.sep}torch{os.sep}" not in filename:
            return f"{_short(filename)}:{line}"
    return ""


def _error_location(err: BaseException, module: nn.Module) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    ffile = forward_file(module)
    for frame in reversed(frames):
        if frame.filename == ffile:
            return f"{_short(frame.filename)}:{frame.lineno}"
    return ""


def _state(module: nn.Module) -> list[tuple[nn.Module, dict, dict, dict, dict]]:
    return [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in module.modules()]


def _restore(snapshot) -> list[str]:
    """Put every module's attributes back; return the names that tracing changed."""
    changed = []
    for m, attrs, params, buffers, modules in snapshot:
        for now, before, kind in (
            (m.__dict__, attrs, ""),
            (m._parameters, params, "parameter "),
            (m._buffers, buffers, "buffer "),
            (m._modules, modules, "submodule "),
        ):
            keys = set(now) | set(before)
            diff = sorted(k for k in keys if now.get(k, _MISSING) is not before.get(k, _MISSING))
            changed += [f"{kind}{type(m).__name__}.{k}" for k in diff]
            now.clear()
            now.update(before)
    return changed


_MISSING = object()


def _set_training(module: nn.Module, mode: bool) -> None:
    for m in module.modules():
        m.training = mode


_SOURCE_CHECKS: dict[Any, str] = {}


def _untraceable_source(forward) -> str:
    """Why the forward's source holds something fx would silently drop, or '' (cached
    per function: a model has many instances of few classes)."""
    if forward not in _SOURCE_CHECKS:
        _SOURCE_CHECKS[forward] = _check_source(forward)
    return _SOURCE_CHECKS[forward]


def _check_source(forward) -> str:
    if hasattr(forward, "__wrapped__"):
        return "its forward is wrapped by a decorator, whose effect torch.fx does not record"
    sig = inspect.signature(forward)
    varargs = [p.name for p in sig.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if varargs:
        return f"its forward takes *{varargs[0]}: the values tracing sees are not the ones passed"
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return ""  # no source (e.g. built at run time): nothing to check
    if tree.body and getattr(tree.body[0], "decorator_list", None):
        return "its forward has a decorator, whose effect torch.fx does not record"
    params = set(list(sig.parameters)[1:])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and _call_name(node.func) in ("isinstance", "type", "torch.is_tensor", "is_tensor")
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in params
        ):
            return (
                f"its forward inspects the type of its argument {node.args[0].id!r} "
                f"(line {forward.__code__.co_firstlineno + node.lineno - 1}): traced, it is a proxy, not a tensor"
            )
        if isinstance(node, (ast.With, ast.AsyncWith)):
            return (
                f"its forward has a with-block (line {forward.__code__.co_firstlineno + node.lineno - 1}, e.g. "
                "torch.no_grad or autocast) that torch.fx does not record"
            )
    return ""


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return ""


def trace_module(module: nn.Module, training: Optional[bool] = None, stack_traces: bool = True) -> Traced:
    """Trace ``module``'s class ``forward`` with its children as calls.

    ``training``: trace as if in that mode (the flags are put back after);
    ``stack_traces``: record where each call is (slower). The
    module's attributes are restored after tracing; a forward that changed any is
    refused. Tensors baked into the graph as constants are refused too, as are
    forwards taking ``*args``/``**kwargs``, decorated or holding a ``with`` block (fx
    records none of these faithfully).
    """
    why = _untraceable_source(type(module).forward)
    if why:
        return Traced(module, error=why)
    snapshot = _state(module)
    try:
        if training is not None:
            _set_training(module, training)
        tracer = _ChildrenAsCalls(stack_traces)
        try:
            graph = tracer.trace(module)
        except Exception as e:  # noqa: BLE001 - any failure means: cannot be traced
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return Traced(module, error=f"{type(e).__name__}: {msg}", where=_error_location(e, module))
    finally:
        changed = _restore(snapshot)
    if tracer.mode_changed is not None:
        return Traced(
            module,
            error="its forward changes the grad mode or autocast while running (torch.no_grad, autocast), "
            "which torch.fx does not record",
            where=code_location(tracer.mode_changed, module),
        )
    changed = [c for c in changed if not c.endswith(".training")]
    if changed:
        return Traced(module, error=f"its forward changes module state while running ({', '.join(changed[:3])})")
    for node in graph.nodes:
        if node.op == "get_attr" and not _resolves(module, node.target):
            return Traced(
                module,
                error=f"its forward creates a tensor that tracing would freeze as a constant ({node.target})",
                where=code_location(node, module),
            )
    return Traced(module, graph=graph)


def _resolves(module: nn.Module, target: str) -> bool:
    obj: Any = module
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return isinstance(obj, (torch.Tensor, nn.Module))
