"""Random cases for every op and the check against the float64 reference, shared by the
property tests of each backend (issue 18):

    tests/test_properties.py                        the torch backend
    tests/interpreter/test_properties_triton.py     the Triton kernels, interpreted
    tests/test_properties_cuda_emu.py               the CUDA kernels, CPU emulation

A case is drawn by a hypothesis strategy (shape from 1 up, odd and even, channel counts
on and off multiples of 8 and 16, dtype, layout or view, activation, gain, clamp, bias or
none, which inputs need a gradient) and carries a seed for its data, so a failing example
prints everything needed to replay it as an explicit regression case.

Kinks. relu/lrelu at 0 and the clamp bounds are where rounding can move a value across
the kink and change its gradient by a whole step; in fp32 that needs a value within
~1e-7 of the kink, which random data does not produce, so fp32 cases draw every
activation and clamp. fp16 cases draw the smooth activations and no clamp (the kinks are
covered in fp32 and by the regression tests with values exactly on them). Likewise a
pooled op's gradient follows its argmax: cases whose float64 pre-pool values have two
window entries closer than rounding can resolve are rejected (``assume``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

import gankernels
from gankernels.ops import reference as ref
from gankernels.testing import assert_close_rel

CHANNELS = (1, 2, 3, 5, 8, 9, 16, 17)  # multiples of 8 and 16, and not
# Layouts a user's tensor arrives in: the two dense formats, a permuted (transposed)
# dense tensor, a contiguous one at a storage offset, and non-dense views of both formats.
LAYOUTS = ("nchw", "channels_last", "transposed", "offset", "cl_sliced_h", "nchw_sliced_c")
SMOOTH_ACTS = ("linear", "tanh", "sigmoid", "silu")
GAINS = (1.0, 0.5, 1.41, -1.0)
CLAMPS = (None, None, 0.4, 2.0)
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def bounded(max_examples: int):
    """Hypothesis settings for a bounded, reproducible search (no deadline: the
    interpreter and the first call of a kernel are slow)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


# ----------------------------------------------------------------------------------
# Tensors in every layout.


def make_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, gen: torch.Generator, scale: float = 1.0, device: str = "cpu"
) -> torch.Tensor:
    """Standard-normal data (times ``scale``) of ``shape`` in ``layout`` on ``device``;
    4-D layouts only for 4-D shapes (others fall back to a contiguous tensor at a
    storage offset). The view is taken on the device, so it stays a view."""

    def randn(*s: int) -> torch.Tensor:
        return (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    if len(shape) != 4:
        if layout == "nchw":
            return randn(*shape)
        if layout == "transposed" and len(shape) >= 2:
            return randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
        numel = math.prod(shape)
        return randn(numel + 3)[3:].view(shape)
    n, c, h, w = shape
    if layout == "nchw":
        return randn(n, c, h, w)
    if layout == "channels_last":
        return randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # dense, H and W swapped in memory
        return randn(n, c, w, h).transpose(2, 3)
    if layout == "offset":  # contiguous, starting 5 elements into its storage
        return randn(n * c * h * w + 5)[5:].view(n, c, h, w)
    if layout == "cl_sliced_h":  # a non-dense channels_last view: x_cl[:, :, 1::2]
        return randn(n, c, 2 * h + 1, w).contiguous(memory_format=torch.channels_last)[:, :, 1::2]
    if layout == "nchw_sliced_c":  # a channel slice of a wider NCHW tensor
        return randn(n, c + 3, h, w)[:, 2 : 2 + c]
    raise ValueError(f"layout: unknown {layout!r}; expected one of {LAYOUTS}")


def strided_bias(c: int, dtype: torch.dtype, gen: torch.Generator, strided: bool, device: str = "cpu") -> torch.Tensor:
    b = (torch.randn(2 * c if strided else c, generator=gen, dtype=torch.float64) * 0.5).to(device=device, dtype=dtype)
    return b[::2] if strided else b


# ----------------------------------------------------------------------------------
# Cases.


@dataclass
class Case:
    """One drawn call: the op, its tensor shapes and layout, its epilogue, and which
    inputs need a gradient."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str
    seed: int
    act: str = "linear"
    alpha: float = 0.2
    gain: float = 1.0
    clamp: Optional[float] = None
    bias: bool = True
    co: int = 0  # output channels of the 3×3 ops
    dim: int = 1  # bias_act's bias dimension
    strided_bias: bool = False
    pool: tuple = ()  # max_pool2d: (kernel, stride, padding, dilation, ceil_mode)
    factor: int = 2  # upsample_nearest2d's scale_factor
    needs: tuple[bool, ...] = field(default=(True, True, True))
    scale: float = 1.0  # x's standard deviation (large: fp16 overflow)
    specials: bool = False  # NaN, +inf and -inf at a few positions of x
    device: str = "cpu"


def _epilogue(draw, dtype: torch.dtype, acts: tuple[str, ...]) -> dict:
    smooth = dtype != torch.float32
    return dict(
        act=draw(st.sampled_from(SMOOTH_ACTS if smooth else acts)),
        alpha=draw(st.sampled_from((0.2, 0.01))),
        gain=draw(st.sampled_from(GAINS)),
        clamp=None if smooth else draw(st.sampled_from(CLAMPS)),
    )


@st.composite
def conv_cases(
    draw,
    op: str,
    dtypes: tuple[torch.dtype, ...],
    layouts: tuple[str, ...] = LAYOUTS,
    acts: tuple[str, ...] = ref.ACTIVATIONS,
    max_n: int = 3,
    max_hw: int = 9,
    ci_choices: tuple[int, ...] = CHANNELS,
    co_choices: tuple[int, ...] = CHANNELS,
) -> Case:
    low = 2 if op == "conv3x3_pool" else 1
    dtype = draw(st.sampled_from(dtypes))
    needs = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any))
    return Case(
        op=op,
        shape=(
            draw(st.integers(1, max_n)),
            draw(st.sampled_from(ci_choices)),
            draw(st.integers(low, max_hw)),
            draw(st.integers(low, max_hw)),
        ),
        co=draw(st.sampled_from(co_choices)),
        dtype=dtype,
        layout=draw(st.sampled_from(layouts)),
        seed=draw(st.integers(0, 2**16)),
        bias=draw(st.booleans()),
        needs=needs,
        **_epilogue(draw, dtype, acts),
    )


@st.composite
def bias_act_cases(draw, dtypes: tuple[torch.dtype, ...], layouts: tuple[str, ...] = LAYOUTS, max_size: int = 9) -> Case:
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.sampled_from(CHANNELS)) if d == 1 else draw(st.integers(1, max_size)) for d in range(ndim))
    dim = draw(st.integers(-ndim, ndim - 1))
    return Case(
        op="bias_act",
        shape=shape,
        dtype=dtype,
        layout=draw(st.sampled_from(layouts)),
        seed=draw(st.integers(0, 2**16)),
        bias=draw(st.booleans()),
        dim=dim,
        strided_bias=draw(st.booleans()),
        needs=draw(st.tuples(st.booleans(), st.booleans()).filter(any)),
        **_epilogue(draw, dtype, ref.ACTIVATIONS),
    )


# (kernel, stride, padding, dilation) for the kernels that serve only the GAN configurations.
GAN_POOLS = ((2, 2, 0, 1), (3, 2, 1, 1))


@st.composite
def max_pool_cases(draw, dtypes, layouts: tuple[str, ...] = LAYOUTS, configs=None, max_hw: int = 9) -> Case:
    if configs is None:
        k = draw(st.integers(1, 3))
        cfg = (k, draw(st.integers(1, 3)), draw(st.integers(0, k // 2)), draw(st.integers(1, 2)))
    else:
        cfg = draw(st.sampled_from(configs))
    k, s, p, d = cfg
    ceil = draw(st.booleans())
    span = d * (k - 1) + 1
    low = max(1, span - 2 * p)
    shape = (
        draw(st.integers(1, 3)),
        draw(st.sampled_from(CHANNELS)),
        draw(st.integers(low, max_hw)),
        draw(st.integers(low, max_hw)),
    )
    # Windows that read only padding are refused by the argument check (stock returns
    # an index outside the plane there): not a case.
    from gankernels.ops.functional import _window_reading_only_padding

    for size in shape[2:]:
        assume(_window_reading_only_padding(size, ref.pool_output_size(size, k, s, p, d, ceil), k, s, p, d) is None)
    return Case(
        op="max_pool2d",
        shape=shape,
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(layouts)),
        seed=draw(st.integers(0, 2**16)),
        pool=(k, s, p, d, ceil),
        needs=(True,),
    )


@st.composite
def upsample_cases(draw, dtypes, layouts: tuple[str, ...] = LAYOUTS, max_scale: int = 3, max_hw: int = 7) -> Case:
    shape = (draw(st.integers(1, 3)), draw(st.sampled_from(CHANNELS)), draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw)))
    return Case(
        op="upsample_nearest2d",
        shape=shape,
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(layouts)),
        seed=draw(st.integers(0, 2**16)),
        factor=draw(st.integers(1, max_scale)),
        needs=(True,),
    )


# ----------------------------------------------------------------------------------
# Inputs and the reference.


def inputs(case: Case) -> list[Optional[torch.Tensor]]:
    """The case's tensors, in the op's argument order (None for an absent bias)."""
    gen = torch.Generator().manual_seed(case.seed)
    x = make_tensor(case.shape, case.dtype, case.layout, gen, case.scale, case.device)
    if case.specials and x.numel():
        flat = torch.randperm(x.numel(), generator=gen)[:3]
        with torch.no_grad():
            specials = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=x.dtype, device=x.device)
            x[torch.unravel_index(flat.to(x.device), x.shape)] = specials[: flat.numel()]
    if case.op in ("conv3x3", "conv3x3_pool", "up_conv3x3"):
        ci = case.shape[1]
        w = (torch.randn(case.co, ci, 3, 3, generator=gen, dtype=torch.float64) / (3 * ci**0.5)).to(case.device, case.dtype)
        b = strided_bias(case.co, case.dtype, gen, case.strided_bias, case.device) if case.bias else None
        return [x, w, b]
    if case.op == "bias_act":
        b = strided_bias(case.shape[case.dim], case.dtype, gen, case.strided_bias, case.device) if case.bias else None
        return [x, b]
    return [x]


def reference(case: Case, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """The op's float64 reference (differentiable with stock autograd)."""
    if case.op == "bias_act":
        x, b = tensors
        return ref.bias_act(x, b, case.act, case.alpha, case.gain, case.clamp, case.dim % x.dim())
    if case.op == "max_pool2d":
        k, s, p, d, ceil = case.pool
        return ref.max_pool2d(tensors[0], [k, k], [s, s], [p, p], [d, d], ceil)[0]
    if case.op == "upsample_nearest2d":
        return ref.upsample_nearest2d(tensors[0], case.factor)
    fn = {"conv3x3": ref.conv3x3, "conv3x3_pool": ref.conv3x3_pool, "up_conv3x3": ref.up_conv3x3_naive}[case.op]
    return fn(*tensors, case.act, case.alpha, case.gain, case.clamp)


def call(case: Case, backend: str, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """The public op on ``tensors`` with ``backend``."""
    if case.op == "bias_act":
        x, b = tensors
        return gankernels.bias_act(x, b, case.act, case.alpha, case.gain, case.clamp, case.dim, backend=backend)
    if case.op == "max_pool2d":
        k, s, p, d, ceil = case.pool
        return gankernels.max_pool2d(tensors[0], k, s, p, d, ceil, backend=backend)
    if case.op == "upsample_nearest2d":
        return gankernels.upsample_nearest2d(tensors[0], case.factor, backend=backend)
    return getattr(gankernels, case.op)(*tensors, case.act, case.alpha, case.gain, case.clamp, backend=backend)


def check_forward_special_values(case: Case, backend: Union[str, Runner]) -> None:
    """The forward on data with NaN/±inf (``case.specials``) or values that overflow the
    dtype (``case.scale``): the float64 reference rounded to the dtype, so overflow
    becomes ±inf as it does in PyTorch's own low-precision ops, and every NaN and ±inf in
    the same place with the same sign (``assert_close_rel`` requires it)."""
    tensors = inputs(case)
    want = reference(case, *(None if t is None else t.double() for t in tensors)).to(case.dtype)
    if isinstance(backend, str):
        out = call(case, backend, *tensors)
    else:
        out, _ = backend(case, tensors, torch.zeros_like(want), [])
    assert_close_rel(out, want, dtype=case.dtype, what=f"{case.op} output with special values")


def assume_pool_argmax_is_resolvable(case: Case, x64: torch.Tensor, w64: torch.Tensor, b64: Optional[torch.Tensor]) -> None:
    """Reject a conv3x3_pool case where two entries of a 2×2 window are closer than the
    op's rounding can order (see the module docstring)."""
    y = ref.conv3x3(x64, w64, b64, case.act, case.alpha, case.gain, case.clamp)
    ho, wo = y.shape[2] // 2, y.shape[3] // 2
    win = y[:, :, : 2 * ho, : 2 * wo].unfold(2, 2, 2).unfold(3, 2, 2).reshape(*y.shape[:2], ho, wo, 4)
    top = win.topk(2, dim=-1).values
    gap = top[..., 0] - top[..., 1]
    resolvable = (gap > 64 * EPS[case.dtype] * top[..., 0].abs().clamp_min(1e-3)) | (gap == 0)
    assume(bool(resolvable.all()))


Runner = Callable[[Case, list, torch.Tensor, list], tuple[torch.Tensor, tuple]]


def _run_public_op(backend: str) -> Runner:
    def run(case: Case, tensors: list, grad: torch.Tensor, wants_grad: list) -> tuple[torch.Tensor, tuple]:
        # detach() keeps each input's strides and storage offset (a clone would not).
        leaves = [None if t is None else t.detach().requires_grad_(i in wants_grad) for i, t in enumerate(tensors)]
        out = call(case, backend, *leaves)
        grads = torch.autograd.grad(out, [leaves[i] for i in wants_grad], grad) if wants_grad else ()
        return out, grads

    return run


def check(case: Case, backend: Union[str, Runner], repeat: bool = False) -> None:
    """Run ``case`` on ``backend`` (a backend name for the public op, or a runner that
    computes ``(out, grads)`` some other way) and compare the output and every gradient
    asked for with the float64 reference; for the public op also the output's memory
    format. With ``repeat``, run it twice and require bitwise-equal results."""
    tensors = inputs(case)
    present = [i for i, t in enumerate(tensors) if t is not None]
    wants_grad = [i for i in present if case.needs[min(i, len(case.needs) - 1)]]
    t64 = [None if t is None else t.detach().double().requires_grad_(i in wants_grad) for i, t in enumerate(tensors)]
    if case.op == "conv3x3_pool":
        assume_pool_argmax_is_resolvable(case, *(t if t is None else t.detach() for t in t64))
    want = reference(case, *t64)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(case.seed + 1), dtype=torch.float64)
    grad = grad.to(device=want.device, dtype=case.dtype)
    want_grads = torch.autograd.grad(want, [t64[i] for i in wants_grad], grad.double()) if wants_grad else ()

    run = _run_public_op(backend) if isinstance(backend, str) else backend
    results = [run(case, tensors, grad, wants_grad) for _ in range(2 if repeat else 1)]

    out, grads = results[0]
    assert out.dtype == case.dtype
    assert_close_rel(out, want, dtype=case.dtype, what=f"{case.op} output")
    if isinstance(backend, str) and case.op == "bias_act":
        # elementwise: laid out as stock's elementwise ops lay it (torch.empty_like(x))
        like = torch.empty_like(tensors[0])
        same = all(a == b for a, b, n in zip(out.stride(), like.stride(), out.shape, strict=True) if n > 1)
        assert same, f"bias_act: output strides {out.stride()}, an elementwise op gives {like.stride()}"
    elif isinstance(backend, str):
        fmt = ref.memory_format_of(tensors[0])
        assert out.is_contiguous(memory_format=fmt), f"{case.op}: output strides {out.stride()} not in x's format {fmt}"
    names = ("x", "w", "b") if len(tensors) == 3 else ("x", "b")
    for i, g, gw in zip(wants_grad, grads, want_grads, strict=True):
        assert g.shape == tensors[i].shape and g.dtype == tensors[i].dtype, names[i]
        assert_close_rel(g, gw, dtype=case.dtype, what=f"{case.op} grad {names[i]}")
    if repeat:
        out2, grads2 = results[1]
        assert torch.equal(out.nan_to_num(), out2.nan_to_num()), f"{case.op}: output differs run to run"
        for g, g2 in zip(grads, grads2, strict=True):
            assert torch.equal(g.nan_to_num(), g2.nan_to_num()), f"{case.op}: a gradient differs run to run"
