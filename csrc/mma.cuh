// One warp-wide tensor-core multiply-add, D = A·B + C with A 16×16, B 16×8 (fp16 or bf16)
// and C = D 16×8 (fp32): PTX `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32`
// (sm_80 and newer).
//
// Fragments, per lane (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"; the same as CUTLASS's SM80_16x8x16_F32{F16,BF16}... atoms), with
// g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group); each 32-bit register holds
// two 16-bit elements, the lower-indexed one in the low half:
//   a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//   a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]   d[2], d[3] = D[g+8][2t, 2t+1]
// Every lane of the warp must make the call (it is .sync.aligned).
//
// The CPU emulation (csrc/emu/cuda_emu.h, GK_CPU_EMULATION) runs the same call through an
// exchange of the lanes' fragments that follows these layouts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace gk {

// The raw bits of a 16-bit float, and two of them as one 32-bit register (lo in the low half).
__device__ __forceinline__ uint16_t bits_of(__half v) { return static_cast<__half_raw>(v).x; }
__device__ __forceinline__ uint16_t bits_of(__nv_bfloat16 v) { return static_cast<__nv_bfloat16_raw>(v).x; }
__device__ __forceinline__ uint32_t pack_bits(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

// Two floats rounded to T and packed into one register (one conversion instruction on sm_80+).
template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack_floats<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return pack_bits(bits_of(__low2half(v)), bits_of(__high2half(v)));
}
template <>
__device__ __forceinline__ uint32_t pack_floats<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return pack_bits(bits_of(__low2bfloat16(v)), bits_of(__high2bfloat16(v)));
}

// d = a·b + d, T = __half or __nv_bfloat16 (the element type of a and b).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16 operands");
#if defined(GK_CPU_EMULATION)
  ::gk_emu::mma_m16n8k16(std::is_same<T, __half>::value, d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  // Compiled for a GPU older than sm_80: no such instruction. The launcher asks which
  // virtual architecture the kernel was built for and never launches this one.
  __trap();
#endif
}

}  // namespace gk
