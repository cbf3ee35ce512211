"""What the benchmark measures: the cases (op, shape, dtype, memory format, mode), the
stock PyTorch code each one stands for, its float64 reference, and its gankernels call.

Cases (DESIGN.md §7, shapes from ANCHORS.md):

* ``gen_block`` — nearest 2× upsample → conv3x3 + bias → leaky ReLU 0.2 (the four
  ANCHORS generator rows); gankernels: ``up_conv3x3(act="lrelu")``.
* ``disc_block`` — conv3x3 + bias → leaky ReLU → 2×2 max-pool (the four ANCHORS
  discriminator rows); gankernels: ``conv3x3_pool(act="lrelu")``.
* ``conv3x3`` — conv3x3 + bias → leaky ReLU, no pool (the discriminator rows, as ANCHORS
  quotes them); gankernels: ``conv3x3(act="lrelu")``.
* ``up_conv3x3``, ``conv3x3_pool`` — the bare fused ops (bias, no activation) on one
  representative row each (add rows with ``--shapes``).
* ``to_rgb`` — the generator's RGB output layer: conv3x3 32→3 + bias → tanh (batch
  128, 64×64), a row the CUDA extension's direct convolution serves.
* ``bias_act``, ``max_pool2d``, ``upsample_nearest2d`` — the memory-bound ops on the
  ANCHORS shape 64×128×64×64 (bias + leaky ReLU, 2×2 pool, 2× nearest).

Modes: ``fwd`` (forward), ``fwdbwd`` (forward, then the gradients of every input for a
fixed output gradient) and ``bwd`` (the backward alone, on a graph kept from one
forward: what ANCHORS's "bwd" columns time).

Every case function takes its tensors by keyword: ``x`` and, where the op has them,
``w`` ([Co, Ci, 3, 3]) and ``b`` ([Co] or [C] for ``bias_act``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import gankernels
from gankernels.ops import reference as ref

ALPHA = 0.2
"""The leaky-ReLU slope of every block (ANCHORS)."""

OPS: tuple[str, ...] = (
    "bias_act",
    "conv3x3",
    "conv3x3_pool",
    "up_conv3x3",
    "max_pool2d",
    "upsample_nearest2d",
    "gen_block",
    "disc_block",
    "to_rgb",
)
"""Op and block cases; ``train_step`` (see :mod:`gankernels.bench.training_step`) is separate."""

ALL_CHOICES: tuple[str, ...] = OPS + ("train_step",)
CONV_OPS = frozenset({"conv3x3", "conv3x3_pool", "up_conv3x3", "gen_block", "disc_block", "to_rgb"})
UP_OPS = frozenset({"up_conv3x3", "gen_block"})
POOL_CONV_OPS = frozenset({"conv3x3_pool", "disc_block"})

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS: dict[str, torch.memory_format] = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
MODES: tuple[str, ...] = ("fwd", "fwdbwd", "bwd")
DEFAULT_MODES: tuple[str, ...] = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class Shape:
    """An input ``[n, c, h, w]`` and, for the 3×3 ops, ``co`` output channels."""

    n: int
    c: int
    h: int
    w: int
    co: int

    def label(self, op: str) -> str:
        if op in CONV_OPS:
            return f"{self.c}→{self.co}, {self.h}×{self.w}, N={self.n}"
        return f"{self.n}×{self.c}×{self.h}×{self.w}"


@dataclass(frozen=True)
class Case:
    """One row of the benchmark: an op at one shape, dtype, memory format and mode."""

    op: str
    shape: Shape
    dtype: str
    fmt: str
    mode: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def id(self) -> str:
        fmt = "CL" if self.fmt == "channels_last" else "NCHW"
        return f"{self.op} {self.shape.label(self.op)} {self.dtype} {fmt} {self.mode}"

    @property
    def needs_grad(self) -> bool:
        """Whether gradients are computed (and checked): ``fwdbwd`` and ``bwd``."""
        return self.mode != "fwd"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["id"] = self.id
        return d


# ----------------------------------------------------------------------------------
# Default shapes.

_GEN_ROWS_GPU = [Shape(64, 512, 8, 8, 256), Shape(64, 256, 16, 16, 128), Shape(64, 128, 32, 32, 64), Shape(64, 64, 64, 64, 32)]
_DISC_ROWS_GPU = [Shape(64, 3, 128, 128, 64), Shape(64, 64, 64, 64, 128), Shape(64, 128, 32, 32, 256), Shape(64, 256, 16, 16, 512)]
_MEM_GPU = [Shape(64, 128, 64, 64, 128)]
_RGB_GPU = [Shape(128, 32, 64, 64, 3)]

# CPU: the same structure at sizes 2 shared cores finish in seconds.
_GEN_ROWS_CPU = [Shape(2, 64, 8, 8, 32), Shape(2, 16, 32, 32, 8)]
_DISC_ROWS_CPU = [Shape(2, 3, 64, 64, 16), Shape(2, 32, 16, 16, 64)]
_MEM_CPU = [Shape(4, 32, 32, 32, 32)]
_RGB_CPU = [Shape(2, 8, 16, 16, 3)]


def default_shapes(op: str, device: str, quick: bool) -> list[Shape]:
    """The ANCHORS shapes on CUDA (``quick``: the first and last row of each block);
    small ones on CPU (``quick``: one row)."""
    gpu = device == "cuda"
    gen = _GEN_ROWS_GPU if gpu else _GEN_ROWS_CPU
    disc = _DISC_ROWS_GPU if gpu else _DISC_ROWS_CPU
    mem = _MEM_GPU if gpu else _MEM_CPU
    table = {
        "gen_block": gen,
        "disc_block": disc,
        "conv3x3": disc,
        "up_conv3x3": [gen[1]] if gpu else [gen[0]],
        "conv3x3_pool": [disc[1]],
        "bias_act": mem,
        "max_pool2d": mem,
        "upsample_nearest2d": mem,
        "to_rgb": _RGB_GPU if gpu else _RGB_CPU,
    }
    rows = table[op]
    if quick and len(rows) > 1:
        rows = [rows[0], rows[-1]] if gpu else [rows[-1]]
    return list(rows)


_SHAPE_RE = re.compile(r"^\s*(\d+),(\d+),(\d+),(\d+)(?::(\d+))?\s*$")


def parse_shape(text: str) -> Shape:
    """``"N,C,H,W"`` or ``"N,C,H,W:Co"`` (``Co`` defaults to ``C``)."""
    m = _SHAPE_RE.match(text)
    if not m:
        raise ValueError(f"--shapes: expected N,C,H,W or N,C,H,W:Co with positive integers, got {text!r}")
    n, c, h, w = (int(m.group(i)) for i in range(1, 5))
    co = int(m.group(5)) if m.group(5) else c
    if min(n, c, h, w, co) <= 0:
        raise ValueError(f"--shapes: every size must be positive, got {text!r}")
    return Shape(n, c, h, w, co)


def build_cases(
    ops: list[str],
    dtypes: list[str],
    formats: list[str],
    modes: list[str],
    device: str,
    quick: bool,
    shapes: Optional[list[Shape]] = None,
) -> list[Case]:
    """Every combination, in the order of ``ops`` (the train step is not a case)."""
    cases = []
    for op in ops:
        if op == "train_step":
            continue
        if op not in OPS:
            raise ValueError(f"--ops: unknown op {op!r}; expected some of {ALL_CHOICES}")
        for shape in shapes if shapes else default_shapes(op, device, quick):
            if op in POOL_CONV_OPS | {"max_pool2d"} and (shape.h < 2 or shape.w < 2):
                raise ValueError(f"--shapes: {op} needs H, W >= 2, got {shape}")
            for dtype in dtypes:
                for fmt in formats:
                    for mode in modes:
                        cases.append(Case(op, shape, dtype, fmt, mode))
    return cases


# ----------------------------------------------------------------------------------
# The transposed-convolution rewrite of the generator block (ANCHORS.md).


def transposed_kernel(w: torch.Tensor) -> torch.Tensor:
    """The ``[Ci, Co, 4, 4]`` kernel ``K`` with ``conv_transpose2d(x, K, stride=2, padding=1)
    == conv2d(upsample_nearest(x, 2), w, padding=1)``.

    Derivation, along one axis: output ``o = 2i + a`` of upsample-then-conv is
    ``Σ_k w[k]·x[(o+k-1)//2]``, i.e. ``y[2i] = w0·x[i-1] + (w1+w2)·x[i]`` and
    ``y[2i+1] = (w0+w1)·x[i] + w2·x[i+1]``. A stride-2, pad-1 transposed convolution
    gives ``y[o] = Σ_i x[i]·K[o+1-2i]``, so ``K = (w2, w1+w2, w0+w1, w0)``: the 3-tap
    kernel summed over its two shifts ``(w0, w0+w1, w1+w2, w2)``, flipped. In 2-D, the
    sum runs over the four (0/1, 0/1) shifts; ``conv_transpose2d`` wants in/out swapped.
    Written with differentiable ops so the weight gradient flows back to ``w``.
    """
    k = sum(F.pad(w, (t, 1 - t, s, 1 - s)) for s in (0, 1) for t in (0, 1))
    return k.flip((2, 3)).transpose(0, 1)


def up_conv_transposed(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """Upsample-then-conv3x3 (pre-activation) as one transposed convolution.

    The 4×4 kernel is formed in float32 and cast to ``w``'s dtype, as a model with fp32
    weights under autocast does: summing taps in bf16/fp16 (and summing the kernel's
    gradient back in it) costs the weight gradient several times the dtype's tolerance.
    """
    wk = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
    k = transposed_kernel(wk).to(w.dtype).contiguous(memory_format=ref.memory_format_of(x))
    return F.conv_transpose2d(x, k, b, stride=2, padding=1)


# ----------------------------------------------------------------------------------
# The code each case stands for.


def _lrelu(t: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(t, ALPHA)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


# Stock PyTorch, written the way a user writes it.
STOCK: dict[str, Callable[..., torch.Tensor]] = {
    "bias_act": lambda x, b: _lrelu(x + b.view(1, -1, 1, 1)),
    "conv3x3": lambda x, w, b: _lrelu(F.conv2d(x, w, b, padding=1)),
    "conv3x3_pool": lambda x, w, b: F.max_pool2d(F.conv2d(x, w, b, padding=1), 2),
    "up_conv3x3": lambda x, w, b: F.conv2d(_up(x), w, b, padding=1),
    "max_pool2d": lambda x: F.max_pool2d(x, 2),
    "upsample_nearest2d": lambda x: _up(x),
    "gen_block": lambda x, w, b: _lrelu(F.conv2d(_up(x), w, b, padding=1)),
    "disc_block": lambda x, w, b: F.max_pool2d(_lrelu(F.conv2d(x, w, b, padding=1)), 2),
    "to_rgb": lambda x, w, b: torch.tanh(F.conv2d(x, w, b, padding=1)),
}

# The transposed-convolution rewrite (generator-side cases only).
TRANSPOSED: dict[str, Callable[..., torch.Tensor]] = {
    "up_conv3x3": lambda x, w, b: up_conv_transposed(x, w, b),
    "gen_block": lambda x, w, b: _lrelu(up_conv_transposed(x, w, b)),
}

# The specification (run in float64): gankernels.ops.reference, upsample by definition.
REFERENCE: dict[str, Callable[..., torch.Tensor]] = {
    "bias_act": lambda x, b: ref.bias_act(x, b, "lrelu", ALPHA),
    "conv3x3": lambda x, w, b: ref.conv3x3(x, w, b, "lrelu", ALPHA),
    "conv3x3_pool": lambda x, w, b: ref.conv3x3_pool(x, w, b, "linear"),
    "up_conv3x3": lambda x, w, b: ref.up_conv3x3_naive(x, w, b, "linear"),
    "max_pool2d": lambda x: ref.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)[0],
    "upsample_nearest2d": lambda x: ref.upsample_nearest2d(x, 2),
    "gen_block": lambda x, w, b: ref.up_conv3x3_naive(x, w, b, "lrelu", ALPHA),
    "disc_block": lambda x, w, b: ref.conv3x3_pool(x, w, b, "lrelu", ALPHA),
    "to_rgb": lambda x, w, b: ref.conv3x3(x, w, b, "tanh"),
}

# The gankernels call: (public op name, keyword arguments besides the tensors).
GANKERNELS: dict[str, tuple[str, dict]] = {
    "bias_act": ("bias_act", {"act": "lrelu", "alpha": ALPHA}),
    "conv3x3": ("conv3x3", {"act": "lrelu", "alpha": ALPHA}),
    "conv3x3_pool": ("conv3x3_pool", {"act": "linear"}),
    "up_conv3x3": ("up_conv3x3", {"act": "linear"}),
    "max_pool2d": ("max_pool2d", {"kernel_size": 2}),
    "upsample_nearest2d": ("upsample_nearest2d", {"scale_factor": 2}),
    "gen_block": ("up_conv3x3", {"act": "lrelu", "alpha": ALPHA}),
    "disc_block": ("conv3x3_pool", {"act": "lrelu", "alpha": ALPHA}),
    "to_rgb": ("conv3x3", {"act": "tanh"}),
}

# The activation of the pooled conv cases (for the rounded-argmax reference).
POOL_ACT: dict[str, str] = {"conv3x3_pool": "linear", "disc_block": "lrelu"}


def tensor_names(op: str) -> tuple[str, ...]:
    if op in CONV_OPS:
        return ("x", "w", "b")
    if op == "bias_act":
        return ("x", "b")
    return ("x",)


def gankernels_call(op: str, backend: str) -> Callable[..., torch.Tensor]:
    """``fn(**tensors)`` running the case's gankernels op on ``backend`` (by name: an
    unavailable backend raises ``BackendUnavailable``, never falls back)."""
    name, kwargs = GANKERNELS[op]
    fn = getattr(gankernels, name)
    if op in CONV_OPS:
        return lambda x, w, b: fn(x, w, b, **kwargs, backend=backend)
    if op == "bias_act":
        return lambda x, b: fn(x, b, **kwargs, backend=backend)
    return lambda x: fn(x, **kwargs, backend=backend)


def kernel_call(op: str, backend: str, tensors: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn(**tensors)`` calling ``backend``'s registered forward directly: the kernel
    (with its launcher's own tensor set-up) without the public op's argument checks,
    dispatch and ``torch.library`` custom op — the "kernel only" time of a forward.

    The arguments are normalised once, here, as the public op would; ``tensors``
    supplies the values it is normalised for (the same shapes are then timed)."""
    import inspect

    from gankernels.ops import dispatch, functional

    name, kwargs = GANKERNELS[op]
    impl = dispatch.get_impl(name, backend)  # KeyError: not registered (callers check explain_backend first)
    bound = inspect.signature(getattr(gankernels, name)).bind(**{k: tensors[k] for k in tensor_names(op)}, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop("backend")
    fixed = functional._PREPARE[name](**params)  # the public op's normalisation, the one definition of it
    if impl.prepare is not None:
        impl.prepare(**fixed)
    names = tensor_names(op)

    def forward(**t: torch.Tensor) -> torch.Tensor:
        out = impl.forward(**{**fixed, **{k: t[k] for k in names}})
        return out[0] if isinstance(out, tuple) else out  # (out, saved) / (out, indices)

    return forward


def explain_backend(op: str, backend: str, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every reason ``backend`` cannot serve this case (empty: it can)."""
    name, kwargs = GANKERNELS[op]
    args = [tensors[k] for k in tensor_names(op)]
    try:
        ex = gankernels.explain(name, *args, **kwargs, backend=backend)
    except gankernels.BackendUnavailable as e:  # defensive: explain reports, it should not raise
        return [r for rs in e.reasons.values() for r in rs]
    if ex.backend == backend:
        return []
    return list(ex.rejected.get(backend, [f"{backend} cannot serve {name}"]))


def make_inputs(case: Case, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fresh seeded standard-normal tensors (never zeros) in the case's dtype; ``x`` in
    the case's memory format. Weights are scaled like a Kaiming init so activations stay
    O(1) through the conv."""
    g = torch.Generator().manual_seed(seed)
    s = case.shape
    dt = case.torch_dtype
    fmt = FORMATS[case.fmt]
    x = torch.randn((s.n, s.c, s.h, s.w), generator=g, dtype=torch.float64)
    out: dict[str, torch.Tensor] = {"x": x.to(device=device, dtype=dt).contiguous(memory_format=fmt)}
    if case.op in CONV_OPS:
        w = torch.randn((s.co, s.c, 3, 3), generator=g, dtype=torch.float64) / (9 * s.c) ** 0.5
        out["w"] = w.to(device=device, dtype=dt)
        out["b"] = (torch.randn((s.co,), generator=g, dtype=torch.float64) * 0.1).to(device=device, dtype=dt)
    elif case.op == "bias_act":
        out["b"] = torch.randn((s.c,), generator=g, dtype=torch.float64).to(device=device, dtype=dt)
    return out


# Where a low-precision conv+pool implementation rounds the activation to its dtype
# before pooling: (after the convolution, after the bias add, after the activation).
# Eager CUDA (cuDNN, then a separate bias add and activation): all three; eager CPU
# (bias fused into the convolution): the last two; torch.compile (the bias add and
# activation fused in fp32 after an extern convolution): the first, and maybe the last.
ROUNDING_POINTS: tuple[tuple[bool, bool, bool], ...] = (
    (True, True, True),
    (False, True, True),
    (True, False, True),
    (True, False, False),
    (False, False, True),
)


def _describe_rounding(points: tuple[bool, bool, bool]) -> str:
    where = [name for name, on in zip(("conv", "bias", "act"), points, strict=True) if on]
    return "argmax after rounding at " + "+".join(where)


def rounded_argmax_pool_references(case: Case, inputs64: dict[str, torch.Tensor], grad_out64: torch.Tensor):
    """Yield ``(description, (out, grad_x, grad_w, grad_b))`` in float64 for a conv+pool
    case, with each pooling window's argmax taken on the activation as a fp16/bf16
    implementation has it: rounded to the dtype at each of the :data:`ROUNDING_POINTS`.

    Where two entries of a window are equal or nearly so at the dtype's precision, an
    implementation that rounds before pooling (stock PyTorch does) picks a different
    maximum than exact arithmetic, and one that pools in fp32 registers picks the exact
    one. Both are correct, and their gradients at those windows differ by far more than
    the dtype's relative-L2 tolerance, so the gradients of these cases are accepted
    against any of these references (the exact one is tried first, elsewhere). Variants
    that pick the same maxima as one already yielded are skipped.
    """
    x, w, b = inputs64["x"], inputs64["w"], inputs64["b"]
    act = POOL_ACT[case.op]
    dt = case.torch_dtype
    conv = ref.conv3x3_preact(x, w, None)
    p = conv + b.view(1, -1, 1, 1)
    y = ref.epilogue(p, act, ALPHA, 1.0, None)
    d_act = ref.epilogue_derivative(p, act, ALPHA, 1.0, None)
    n, c, _, _ = y.shape
    seen: list[torch.Tensor] = []

    def rnd(t: torch.Tensor, on: bool) -> torch.Tensor:
        return t.to(dt).to(torch.float64) if on else t  # exact in float64 afterwards: ties survive

    for points in ROUNDING_POINTS:
        r_conv, r_bias, r_act = points
        p_low = rnd(rnd(conv, r_conv) + b.to(dt).to(torch.float64).view(1, -1, 1, 1), r_bias)
        y_low = rnd(ref.epilogue(p_low, act, ALPHA, 1.0, None), r_act)
        _, idx = F.max_pool2d(y_low, 2, return_indices=True)
        if any(torch.equal(idx, s) for s in seen):
            continue
        seen.append(idx)
        out = torch.gather(y.reshape(n, c, -1), 2, idx.reshape(n, c, -1)).reshape(idx.shape)
        gp = ref._unpool(grad_out64, idx, y.shape) * d_act
        gx, gw, gb = ref._conv_grads(gp, x, w, True, (True, True, True))
        yield _describe_rounding(points), (out, gx, gw, gb)


# The pre-activation of the cases whose activation (leaky ReLU) has a kink and no pool.
KINK_PREACT: dict[str, Callable[..., torch.Tensor]] = {
    "gen_block": lambda x, w, b: ref.conv3x3_preact(ref.upsample_nearest2d(x, 2), w, b),
    "conv3x3": lambda x, w, b: ref.conv3x3_preact(x, w, b),
    "bias_act": lambda x, b: x + b.view(1, -1, 1, 1),
}


def kink_consistent_reference(
    case: Case, inputs64: dict[str, torch.Tensor], grad_out64: torch.Tensor, out: torch.Tensor
) -> tuple[str, list[torch.Tensor]]:
    """Gradients in float64 with the leaky ReLU's slope at each element taken on the side
    of 0 where the contender's own output ``out`` lies (``sign(lrelu(p)) == sign(p)``).

    A pre-activation within rounding of 0 may land on either side in fp16/bf16; the
    gradient there then differs by ``(1 - alpha)·grad``, and a handful of such elements
    exceed the dtype's relative-L2 tolerance. (The transposed-convolution rewrite rounds
    its summed 4×4 kernel, an absolute error that moves near-zero pre-activations across
    0; rounding the result, as stock does, never changes a sign.) The contender's forward
    output is checked against the exact reference separately, so this only forgives the
    side of the kink, not a wrong slope or a wrong backward.
    """
    names = tensor_names(case.op)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs64.items()}
    p = KINK_PREACT[case.op](**leaves)
    slope = torch.where(out.detach().to(device=p.device, dtype=torch.float64) > 0, 1.0, ALPHA)
    grads = torch.autograd.grad(p * slope, [leaves[k] for k in names], grad_out64)
    out64 = REFERENCE[case.op](**{k: v.detach() for k, v in inputs64.items()})
    return "lrelu slope on the contender's side of 0", [out64, *grads]
