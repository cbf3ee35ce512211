// One warp running csrc/mma.cuh's mma_m16n8k16 on fragments given by the caller, for the
// unit test of the emulated tensor-core instruction (tests/test_cuda_extension.py checks
// it against a matmul). Emulation only: not part of the extension.
#include "mma.cuh"

namespace {

// a: 32 lanes × 4 registers, b: 32 × 2, c and d: 32 × 4 floats, in the lanes' order.
__global__ void mma_probe_kernel(int fp16, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int lane = threadIdx.x;
  const uint32_t af[4] = {a[lane * 4], a[lane * 4 + 1], a[lane * 4 + 2], a[lane * 4 + 3]};
  const uint32_t bf[2] = {b[lane * 2], b[lane * 2 + 1]};
  float acc[4] = {c[lane * 4], c[lane * 4 + 1], c[lane * 4 + 2], c[lane * 4 + 3]};
  if (fp16) {
    gk::mma_m16n8k16<__half>(acc, af, bf);
  } else {
    gk::mma_m16n8k16<__nv_bfloat16>(acc, af, bf);
  }
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}

}  // namespace

extern "C" int emu_mma_m16n8k16(int fp16, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  mma_probe_kernel<<<1, 32, 0, nullptr>>>(fp16, a, b, c, d);
  return 0;
}
