"""The public functional API: argument checks, autocast, dispatch, the registered op.

Every function takes ``backend=None`` (the default from ``gankernels.use_backend`` or
``GANKERNELS_BACKEND``, else ``"auto"``), ``"auto"``, ``"torch"``, ``"triton"`` or
``"cuda"``. Bad arguments raise ``TypeError``/``ValueError`` naming the argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Optional, Union

import torch

from gankernels.ops import choice, dispatch, eager
from gankernels.ops import registration as reg
from gankernels.ops.reference import ACTIVATIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)

# ----------------------------------------------------------------------------------
# Argument checks.


def _check_tensor(t: Any, name: str, ndim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}; "
            f"convert it with {name}.float()"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _check_same(x: torch.Tensor, other: Optional[torch.Tensor], name: str, dtype: bool = True) -> None:
    if other is None:
        return
    if other.device != x.device:
        raise ValueError(f"{name}: is on {other.device} but x is on {x.device}; move both to the same device")
    if dtype and other.dtype != x.dtype:
        raise TypeError(
            f"{name}: dtype {other.dtype} differs from x's {x.dtype}; cast it ({name}.to(x.dtype)) or run under torch.autocast"
        )


def _check_epilogue(act: Any, alpha: Any, gain: Any, clamp: Any) -> tuple[str, float, float, Optional[float]]:
    if act not in ACTIVATIONS:
        raise ValueError(f"act: unknown activation {act!r}; expected one of {ACTIVATIONS}")
    for name, v in (("alpha", alpha), ("gain", gain)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    if clamp is not None:
        if isinstance(clamp, bool) or not isinstance(clamp, (int, float)):
            raise TypeError(f"clamp: expected a non-negative number or None, got {type(clamp).__name__}")
        if not clamp >= 0:
            raise ValueError(f"clamp: must be >= 0 (the result is clipped to [-clamp, clamp]), got {clamp}")
        clamp = float(clamp)
    return act, float(alpha), float(gain), clamp


def _autocast(*tensors: Optional[torch.Tensor]) -> tuple:
    """Cast like ``F.conv2d`` under ``torch.autocast``: float32/16/bf16 inputs to the
    autocast dtype; float64 is left alone."""
    x = tensors[0]
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if (t is not None and t.dtype in _AUTOCAST_ELIGIBLE) else t for t in tensors)


def _prepare_conv(x, w, b, act, alpha, gain, clamp) -> dict[str, Any]:
    _check_tensor(x, "x", 4)
    _check_tensor(w, "w", 4)
    if b is not None:
        _check_tensor(b, "b", 1)
    if tuple(w.shape[2:]) != (3, 3):
        raise ValueError(f"w: expected a 3×3 kernel of shape [Co, Ci, 3, 3], got {tuple(w.shape)}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w: has {w.shape[1]} input channels (w.shape[1]) but x has {x.shape[1]} (x.shape[1])")
    if b is not None and b.shape[0] != w.shape[0]:
        raise ValueError(f"b: expected length {w.shape[0]} (w.shape[0], the output channels), got {b.shape[0]}")
    _check_same(x, w, "w", dtype=False)
    _check_same(x, b, "b", dtype=False)
    x, w, b = _autocast(x, w, b)
    _check_same(x, w, "w")
    _check_same(x, b, "b")
    act, alpha, gain, clamp = _check_epilogue(act, alpha, gain, clamp)
    return dict(x=x, w=w, b=b, act=act, alpha=alpha, gain=gain, clamp=clamp)


def _prepare_bias_act(x, b, act, alpha, gain, clamp, dim) -> dict[str, Any]:
    _check_tensor(x, "x")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
    if x.dim() == 0:
        raise ValueError("x: expected at least a 1-D tensor, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: {dim} is out of range for x with {x.dim()} dimensions")
    dim = dim % x.dim()
    if b is not None:
        _check_tensor(b, "b", 1)
        _check_same(x, b, "b", dtype=False)
        if b.shape[0] != x.shape[dim]:
            raise ValueError(f"b: expected length {x.shape[dim]} (x.shape[{dim}]), got {b.shape[0]}")
        b = b.to(x.dtype)  # documented: the bias is cast to x's dtype
    act, alpha, gain, clamp = _check_epilogue(act, alpha, gain, clamp)
    return dict(x=x, b=b, act=act, alpha=alpha, gain=gain, clamp=clamp, dim=dim)


def _pair(v: Any, name: str, minimum: int) -> list[int]:
    vals = list(v) if isinstance(v, (tuple, list)) else [v, v]
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or any(isinstance(i, bool) or not isinstance(i, int) for i in vals):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")
    if any(i < minimum for i in vals):
        raise ValueError(f"{name}: every value must be >= {minimum}, got {v!r}")
    return vals


def _prepare_max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=False) -> dict[str, Any]:
    _check_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D [N, C, H, W] (or 3-D [C, H, W]) tensor, got shape {tuple(x.shape)}")
    k = _pair(kernel_size, "kernel_size", 1)
    s = k if (stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)) else _pair(stride, "stride", 1)
    p = _pair(padding, "padding", 0)
    d = _pair(dilation, "dilation", 1)
    for i in range(2):
        # PyTorch's rule (pool2d_shape_check) halves kernel_size itself, whatever the dilation.
        if p[i] > k[i] // 2:
            raise ValueError(
                f"padding: {p} must be at most half of kernel_size {k} (padding <= kernel_size // 2, as F.max_pool2d "
                f"requires whatever the dilation {d}); reduce padding or use a larger kernel_size"
            )
    from gankernels.ops.reference import pool_output_size

    for i, size in enumerate(x.shape[2:]):
        out = pool_output_size(size, k[i], s[i], p[i], d[i], bool(ceil_mode))
        if out <= 0:
            raise ValueError(f"x: spatial size {tuple(x.shape[2:])} is too small for kernel_size {k} (output would be empty)")
        blind = _window_reading_only_padding(size, out, k[i], s[i], p[i], d[i])
        if blind is not None:
            axis = ("row", "column")[i]
            raise ValueError(
                f"dilation: {d} with padding {p} makes the window of output {axis} {blind} read only padding "
                f"(input size {tuple(x.shape[2:])}); F.max_pool2d returns -inf there with an index outside the plane, "
                "and its backward writes into another plane. Reduce dilation or padding."
            )
    return dict(x=x, kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=bool(ceil_mode), return_indices=bool(return_indices))


def _window_reading_only_padding(size: int, out: int, k: int, s: int, p: int, d: int) -> Optional[int]:
    """The first output index (along one axis) whose pooling window holds no input
    element, or None. Only a dilated window can step over the whole input."""
    if d == 1:
        return None  # with padding <= k // 2 every window holds an input element
    for o in range(out):
        start = o * s - p
        first = 0 if start >= 0 else (-start + d - 1) // d  # the first tap at or after index 0
        if not (first < k and start + first * d < size):
            return o
    return None


def _prepare_upsample(x, scale_factor) -> dict[str, Any]:
    _check_tensor(x, "x", 4)
    s = scale_factor
    if isinstance(s, (tuple, list)):
        if len(s) != 2 or s[0] != s[1]:
            raise ValueError(f"scale_factor: expected one integer scale for both axes, got {s!r}")
        s = s[0]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or (isinstance(s, float) and not s.is_integer()):
        raise ValueError(
            f"scale_factor: expected a positive integer (nearest upsampling by an integer factor), got {scale_factor!r}"
        )
    s = int(s)
    if s < 1:
        raise ValueError(f"scale_factor: expected a positive integer, got {scale_factor!r}")
    return dict(x=x, scale_factor=s)


# ----------------------------------------------------------------------------------
# The eager call cache. A call whose tensors (dtype, device, shape, strides,
# requires_grad), other arguments, backend request, grad mode and autocast state were
# all seen before passes the same checks and resolves to the same backend, so an eager
# call that hits it skips both (they cost more host time than a small layer's kernel).
# Cleared with the dispatcher's resolution cache (on every (un)registration).

_CALLS: dict[tuple, tuple] = {}
dispatch.on_clear(_CALLS.clear)


def _tsig(t: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if t is None else (t.dtype, t.device, t.shape, t.stride(), t.requires_grad)


def _autocast_key(x: torch.Tensor) -> Optional[torch.dtype]:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _lookup(key: tuple) -> Optional[tuple]:
    try:
        return _CALLS.get(key)
    except TypeError:  # an unhashable argument: the checks will say what is wrong with it
        return None


# ----------------------------------------------------------------------------------
# Public functions.


def bias_act(
    x: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "linear",
    alpha: float = 0.2,
    gain: float = 1.0,
    clamp: Optional[float] = None,
    dim: int = 1,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``clip(act(x + b) * gain, -clamp, clamp)``, ``b`` broadcast along ``dim`` (cast
    to ``x``'s dtype). Gradients to ``x`` and ``b``, double backward supported."""
    key = None
    if eager.usable(x, b):
        key = ("bias_act", backend or dispatch.default_backend(), torch.is_grad_enabled(), _tsig(x), _tsig(b),
               act, type(alpha), alpha, type(gain), gain, type(clamp), clamp, type(dim), dim)  # fmt: skip
        hit = _lookup(key)
        if hit is not None:
            name, act, alpha, gain, clamp, dim = hit
            if b is not None and b.dtype != x.dtype:
                b = b.to(x.dtype)
            return eager.bias_act(x, b, act, alpha, gain, clamp, dim, name)
    args = _prepare_bias_act(x, b, act, alpha, gain, clamp, dim)
    name = dispatch.resolve("bias_act", backend, args)
    if key is not None:
        _CALLS[key] = (name, args["act"], args["alpha"], args["gain"], args["clamp"], args["dim"])
        return eager.bias_act(**args, backend=name)
    return reg.bias_act_op(**args, backend=name)


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_mode = eager._get_current_dispatch_mode
_grad_enabled = torch.is_grad_enabled
_autocast_on = torch.is_autocast_enabled
_autocast_dtype = torch.get_autocast_dtype
_requested_backend = dispatch._default_backend  # a stack; its top is dispatch.default_backend()


def _conv(op: str, x, w, b, act, alpha, gain, clamp, backend: Optional[str]) -> torch.Tensor:
    """The checked path (first call of a signature, compile, dispatch modes, subclasses)."""
    args = _prepare_conv(x, w, b, act, alpha, gain, clamp)
    name = dispatch.resolve(op, backend, args)
    return reg.OPS[op](**args, backend=name)[0]


def _make_conv(op: str) -> Callable[..., torch.Tensor]:
    """The public function of one fused conv op.

    Its eager path is the hottest code of the package (every 3×3 layer, every step), so
    it is written flat, in the function itself: ``eager.usable``, the tensors'
    signatures and the autocast state are inlined into one key of the call cache. On an
    interleaved CPU measurement every call and attribute fetch here costs 2-3× what it
    costs in a tight loop (`benchmarks/NOTES.md`, issue 12), so each one counts."""

    def fused(
        x: torch.Tensor,
        w: torch.Tensor,
        b: Optional[torch.Tensor] = None,
        act: str = "linear",
        alpha: float = 0.2,
        gain: float = 1.0,
        clamp: Optional[float] = None,
        *,
        backend: Optional[str] = None,
    ) -> torch.Tensor:
        if (
            type(x) in _PLAIN
            and type(w) in _PLAIN
            and (b is None or type(b) in _PLAIN)
            and not _is_compiling()
            and _dispatch_mode() is None
        ):
            device_type = "cuda" if x.is_cuda else ("cpu" if x.is_cpu else x.device.type)
            ac = _autocast_dtype(device_type) if _autocast_on(device_type) else None
            key = (op, backend or _requested_backend[-1], _grad_enabled(), ac,
                   x.dtype, x.device, x.shape, x.stride(), x.requires_grad,
                   w.dtype, w.device, w.shape, w.stride(), w.requires_grad,
                   None if b is None else (b.dtype, b.device, b.shape, b.stride(), b.requires_grad),
                   act, alpha, gain, clamp, type(alpha), type(gain), type(clamp))  # fmt: skip
            try:
                run = _CALLS.get(key)
            except TypeError:  # an unhashable argument: the checks will say what is wrong with it
                run = None
            if run is not None:
                if ac is not None:
                    x, w, b = _autocast(x, w, b)
                return run(x, w, b)
            args = _prepare_conv(x, w, b, act, alpha, gain, clamp)
            name = dispatch.resolve(op, backend, args)
            run = _CALLS[key] = eager.conv_runner(op, args["act"], args["alpha"], args["gain"], args["clamp"], name)
            return run(args["x"], args["w"], args["b"])
        return _conv(op, x, w, b, act, alpha, gain, clamp, backend)

    fused.__name__ = fused.__qualname__ = op
    fused.__module__ = __name__
    return fused


def _conv_doc(what: str) -> str:
    return f"""{what}

    ``x``: [N, Ci, H, W]; ``w``: [Co, Ci, 3, 3]; ``b``: [Co] or None; ``act``: one of
    ``"linear" "relu" "lrelu" "tanh" "sigmoid" "silu"``; ``alpha``: the lrelu slope;
    ``gain`` multiplies after the activation; ``clamp`` (>= 0) clips the result.
    The output keeps ``x``'s memory format. Under ``torch.autocast`` the inputs are cast
    as for ``F.conv2d``. Gradients to x, w, b; double backward supported.
    """


conv3x3 = _make_conv("conv3x3")
conv3x3_pool = _make_conv("conv3x3_pool")
up_conv3x3 = _make_conv("up_conv3x3")
conv3x3.__doc__ = _conv_doc("``clip(act(conv2d(x, w, padding=1) + b) * gain)``: 3×3 convolution, bias, activation, fused.")
conv3x3_pool.__doc__ = _conv_doc("``max_pool2d(conv3x3(x, w, b, ...), 2)``: the discriminator block, fused (odd H/W floor).")
up_conv3x3.__doc__ = (
    _conv_doc("``conv3x3(upsample_nearest(x, 2), w, b, ...)``: the generator block, fused; output [N, Co, 2H, 2W].")
    + """
    Non-finite ``x``: the ``torch`` backend computes the definition, so ±inf propagates
    exactly as upsample-then-conv. The ``triton`` kernel uses the sub-pixel rewrite,
    which adds the taps that read the same input pixel into one weight: wherever the
    definition is finite or ±inf it gives the same, but where the definition is NaN
    because an inf meets taps of opposite sign (``w1·inf + w2·inf``) or a zero tap, it
    may give ±inf instead.
    """
)


def max_pool2d(
    x: torch.Tensor,
    kernel_size: Union[int, tuple[int, int]],
    stride: Optional[Union[int, tuple[int, int]]] = None,
    padding: Union[int, tuple[int, int]] = 0,
    dilation: Union[int, tuple[int, int]] = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    *,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``F.max_pool2d`` with the same signature and results (NaN propagates; indices
    are flat per-plane positions). Accepts [N, C, H, W] or [C, H, W].

    One configuration stock accepts is refused (``ValueError`` naming ``dilation``): a
    dilated window whose taps all fall in the padding, where ``F.max_pool2d`` returns
    -inf with an index outside the plane and its backward writes into another plane."""
    unbatched = isinstance(x, torch.Tensor) and x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    key = None
    if eager.usable(x):
        key = ("max_pool2d", backend or dispatch.default_backend(), torch.is_grad_enabled(), _tsig(x),
               kernel_size, stride, padding, dilation, ceil_mode, return_indices)  # fmt: skip
        hit = _lookup(key)
    if key is not None and hit is not None:
        name, pool_args = hit
    else:
        args = _prepare_max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
        name = dispatch.resolve("max_pool2d", backend, args)
        pool_args = {k: v for k, v in args.items() if k != "x"}
        if key is not None:
            _CALLS[key] = (name, pool_args)
    if key is not None:
        out, idx = eager.max_pool2d(x, backend=name, **pool_args)
    else:
        out, idx = reg.max_pool2d_op(**args, backend=name)
    if unbatched:
        out, idx = out.squeeze(0), (idx.squeeze(0) if idx is not None else None)
    return (out, idx) if return_indices else out


def upsample_nearest2d(x: torch.Tensor, scale_factor: Union[int, float] = 2, *, backend: Optional[str] = None) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=s, mode="nearest")`` for an integer ``s``."""
    key = None
    if eager.usable(x):
        key = (
            "upsample_nearest2d",
            backend or dispatch.default_backend(),
            torch.is_grad_enabled(),
            _tsig(x),
            type(scale_factor),
            scale_factor,
        )
        hit = _lookup(key)
        if hit is not None:
            return eager.upsample_nearest2d(x, hit[1], hit[0])
    args = _prepare_upsample(x, scale_factor)
    name = dispatch.resolve("upsample_nearest2d", backend, args)
    if key is not None:
        _CALLS[key] = (name, args["scale_factor"])
        return eager.upsample_nearest2d(**args, backend=name)
    return reg.upsample_nearest2d_op(**args, backend=name)


_PREPARE: dict[str, Callable[..., dict[str, Any]]] = {
    "bias_act": _prepare_bias_act,
    "conv3x3": _prepare_conv,
    "conv3x3_pool": _prepare_conv,
    "up_conv3x3": _prepare_conv,
    "max_pool2d": _prepare_max_pool,
    "upsample_nearest2d": _prepare_upsample,
}
_PUBLIC = {
    "bias_act": bias_act,
    "conv3x3": conv3x3,
    "conv3x3_pool": conv3x3_pool,
    "up_conv3x3": up_conv3x3,
    "max_pool2d": max_pool2d,
    "upsample_nearest2d": upsample_nearest2d,
}


def explain(op: Union[str, Callable], *args: Any, **kwargs: Any) -> dispatch.Explanation:
    """Which backend would run ``op(*args, **kwargs)``, and why each other one would not.

    >>> print(gankernels.explain("conv3x3", x, w, b, act="lrelu"))
    """
    name = op if isinstance(op, str) else getattr(op, "__name__", "")
    if name not in _PUBLIC:
        raise ValueError(f"op: unknown op {op!r}; expected one of {tuple(_PUBLIC)}")
    bound = inspect.signature(_PUBLIC[name]).bind(*args, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    backend = params.pop("backend")
    if name == "max_pool2d" and isinstance(params["x"], torch.Tensor) and params["x"].dim() == 3:
        params["x"] = params["x"].unsqueeze(0)
    prepared = _PREPARE[name](**params)
    return dispatch.explain_args(name, backend, prepared)


# ----------------------------------------------------------------------------------
# Timed runs for ``auto``'s measurement (gankernels.ops.choice).


def _timed_run(op: str) -> Callable[[dict[str, Any], str], Callable[[], None]]:
    public = _PUBLIC[op]

    def make(args: dict[str, Any], backend: str) -> Callable[[], None]:
        # Copies that share the caller's storage but not its autograd graph or .grad.
        inputs = {k: (v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        if op == "max_pool2d":
            inputs["return_indices"] = False
        with_grad = choice.needs_grad(args)
        grad: list[torch.Tensor] = []

        def run() -> None:
            out = public(**inputs, backend=backend)
            if with_grad:
                if not grad:
                    grad.append(torch.randn_like(out))
                out.backward(grad[0])

        return run

    return make


for _op in _PUBLIC:
    choice.RUNNERS[_op] = _timed_run(_op)


def tune(model: Callable[..., Any], *example_inputs: Any, backward: bool = True) -> dict[str, choice.Choice]:
    """Fill ``auto``'s choice cache ahead of time for every gankernels call ``model``
    makes on ``example_inputs``: forward, and forward + backward when ``backward`` (the
    parameters' ``.grad`` are left as they were). Returns the choices made, by call
    signature. On a GPU each signature's candidates are timed once and the result is
    kept on disk for later processes; elsewhere nothing is timed.

    >>> gankernels.tune(G, z)
    """
    before = set(choice._memory)
    params = [p for p in getattr(model, "parameters", lambda: [])()]
    grads = [p.grad for p in params]
    with torch.no_grad():
        model(*example_inputs)
    if backward:
        out = model(*example_inputs)
        outs = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor) and t.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        for p, g in zip(params, grads, strict=True):
            p.grad = g
    return {sig: c for sig, c in choice._memory.items() if sig not in before}
