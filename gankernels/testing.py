"""Helpers for kernel authors: compare a fast kernel with the float64 reference.

    from gankernels.testing import assert_close_rel, poison, random_input
    ref = reference_fn(*(t.double() for t in args))
    out = fast_fn(*args)
    assert_close_rel(out, ref, dtype=args[0].dtype)

Tolerances are relative L2 errors ‖out − ref‖ / ‖ref‖ (DESIGN.md §6).
"""

from __future__ import annotations

from typing import Optional

import torch

# ‖out − ref‖ / ‖ref‖ allowed per input dtype.
REL_L2_TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.5e-2,
}
TF32_REL_L2_TOL = 5e-3


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """The relative-L2 tolerance for results computed in ``dtype`` (TF32 when ``tf32``)."""
    if dtype == torch.float32 and tf32:
        return TF32_REL_L2_TOL
    return REL_L2_TOL[dtype]


def rel_l2_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖₂ / ‖ref‖₂ in float64; inf if ``out`` has a NaN/inf that ``ref`` lacks
    (or misses one that ``ref`` has)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    bad_out, bad_ref = ~torch.isfinite(out64), ~torch.isfinite(ref64)
    if not torch.equal(bad_out, bad_ref):
        return float("inf")
    if bad_ref.any():
        # Non-finite entries must match exactly (NaN where NaN, same-signed inf).
        same = torch.isnan(out64[bad_ref]) & torch.isnan(ref64[bad_ref]) | (out64[bad_ref] == ref64[bad_ref])
        if not bool(same.all()):
            return float("inf")
        out64, ref64 = out64[~bad_ref], ref64[~bad_ref]
    denom = torch.linalg.vector_norm(ref64)
    num = torch.linalg.vector_norm(out64 - ref64)
    if denom == 0:
        return float(num)
    return float(num / denom)


def assert_close_rel(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    tol: Optional[float] = None,
    tf32: bool = False,
    what: str = "output",
) -> float:
    """Assert ``rel_l2_error(out, ref) <= tol`` (default: :func:`tolerance` of ``dtype``,
    which defaults to ``out.dtype``). Returns the error."""
    if tol is None:
        tol = tolerance(dtype or out.dtype, tf32)
    err = rel_l2_error(out, ref)
    if not err <= tol:
        raise AssertionError(
            f"{what}: relative L2 error {err:.3e} > {tol:.1e} (dtype {dtype or out.dtype}, shape {tuple(out.shape)})"
        )
    return err


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (in place) so an element a kernel fails to write shows up."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(-1)


def poisoned_empty(*shape: int, dtype=torch.float32, device="cpu", memory_format=torch.contiguous_format) -> torch.Tensor:
    return poison(torch.empty(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format))


def random_input(
    *shape: int,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    layout: str = "nchw",
    generator: Optional[torch.Generator] = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Fresh standard-normal data (never zeros) in ``layout``: ``"nchw"``,
    ``"channels_last"`` or ``"noncontiguous"`` (a strided view of a larger tensor)."""
    if layout == "noncontiguous":
        big = torch.randn((*shape[:-1], shape[-1] * 2), generator=generator, dtype=torch.float64) * scale
        return big.to(dtype=dtype, device=device)[..., ::2]
    t = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout != "nchw":
        raise ValueError(f"layout: expected 'nchw', 'channels_last' or 'noncontiguous', got {layout!r}")
    return t


LAYOUTS = ("nchw", "channels_last", "noncontiguous")
