"""The static check of the CUDA kernels (gankernels/bench/static_cuda.py): its division detector
on kernels whose SASS is known, then every kernel of csrc/ compiled for sm_90: no
spills, no runtime integer division inside a loop.

Needs nvcc, nvdisasm (the toolkit's or Triton's copy) and c++filt; no GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from gankernels.bench import static_cuda  # noqa: E402

CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
pytestmark = pytest.mark.skipif(
    static_cuda.find_tool("nvcc", CUDA_HOME) is None or static_cuda.find_tool("nvdisasm", CUDA_HOME) is None,
    reason="needs nvcc and nvdisasm (CUDA_HOME)",
)

PROBES = r"""
// Known answers for the detector.
__global__ void div_s32_in_loop(const int* a, const int* d, int* o, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = a[i] / d[i];
}
__global__ void rem_u32_in_loop(const unsigned* a, const unsigned* d, unsigned* o, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = a[i] % d[i];
}
__global__ void div_s64_in_loop(const long long* a, long long* o, int n, long long d) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = a[i] / d;
}
__global__ void div_s64_before_loop(const long long* a, long long* o, int n, long long d) {
  const long long q = (long long)blockIdx.x / d;
  for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = a[i] + q;
}
__global__ void div_by_constants_in_loop(const long long* a, long long* o, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = a[i] / 7 + a[i] % 9;
}
__global__ void float_div_in_loop(const float* a, float* o, int n, float d) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = a[i] / d;
}
"""


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    src = tmp_path_factory.mktemp("probe_src")
    (src / "probes.cu").write_text(PROBES)
    kernels, _ = static_cuda.check(src, "sm_90", tmp_path_factory.mktemp("probe_build"))
    return {k.name.split("(")[0]: k for k in kernels}


@pytest.mark.parametrize("name", ["div_s32_in_loop", "rem_u32_in_loop", "div_s64_in_loop"])
def test_detector_finds_runtime_division_in_a_loop(probes, name):
    assert probes[name].loops, "the grid-stride loop was not found"
    assert probes[name].int_divisions_in_loops > 0


def test_detector_sees_64_bit_division_routines(probes):
    assert any("div_s64" in r for r in probes["div_s64_in_loop"].division_routines_called)


@pytest.mark.parametrize("name", ["div_s64_before_loop", "div_by_constants_in_loop", "float_div_in_loop"])
def test_detector_passes_what_is_not_a_division_in_a_loop(probes, name):
    assert probes[name].int_divisions_in_loops == 0
    if name == "div_s64_before_loop":
        assert probes[name].int_divisions > 0  # seen, but outside the loop


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    found, meta = static_cuda.check(ROOT / "csrc", "sm_90", tmp_path_factory.mktemp("csrc_build"))
    assert meta["arch"] == "sm_90"
    return found


@pytest.mark.slow
def test_every_kernel_is_analysed(kernels):
    files = {k.file for k in kernels}
    assert files == {p.name for p in (ROOT / "csrc").glob("*.cu")}
    for k in kernels:
        assert k.registers > 0 and k.instructions > 0, k.name


@pytest.mark.slow
def test_no_kernel_spills_or_divides_in_a_loop(kernels):
    assert static_cuda.problems(kernels) == []


@pytest.mark.slow
def test_rgb_conv_runs_on_tensor_cores(kernels):
    """Every instance of the RGB conv (dtype × k16 steps × pool × activation) issues its
    2 m16 tiles × 8 n8 tiles × k16 steps HMMA in one loop (the loop over 32-pixel groups),
    with no runtime integer division inside it and no spills."""
    rgb = [k for k in kernels if k.name.startswith("conv_rgb_mma_kernel<")]
    assert len(rgb) == 2 * 3 * 2 * 6, [k.name for k in rgb]
    for k in rgb:
        steps = int(k.name.split(",")[1])
        hot = static_cuda.hot_mma_loop(k.loops)
        assert hot is not None, f"{k.name}: no loop holds an HMMA"
        assert hot.hmma == k.hmma == 2 * 8 * steps, (k.name, hot.hmma, k.hmma)
        assert hot.int_divisions == 0 and k.int_divisions_in_loops == 0, k.name
        assert k.spill_stores == k.spill_loads == 0, k.name
        assert k.instructions_per_mma == round(hot.instructions / hot.hmma, 1)


@pytest.mark.slow
def test_cuda_core_conv_has_no_tensor_core_instructions(kernels):
    """The kernels left on CUDA cores (float32, Co <= 4, the backward) stay there: the HMMA
    count only sees the RGB forward."""
    others = [k for k in kernels if k.hmma and not k.name.startswith("conv_rgb_mma_kernel<")]
    assert others == []
