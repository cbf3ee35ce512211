// Device helpers shared by the kernel .cu files: dtype conversion, 16-byte vectors,
// the epilogue and its derivative, dtype dispatch. Plain CUDA, no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels.h"

namespace gk {

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round a float to T and back (to compare values exactly as PyTorch sees them in T).
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_f<T>(from_f<T>(v)); }

// 16 bytes of T: the unit of vector loads and stores.
template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) { return *reinterpret_cast<const Vec<T>*>(p); }
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& v) { *reinterpret_cast<Vec<T>*>(p) = v; }

// N consecutive elements of T moved as one access of N * sizeof(T) bytes (a power of two
// up to 16; the address must be aligned to it).
template <typename T, int N>
struct alignas(N * sizeof(T)) Array {
  T v[N];
};
template <typename T, int N>
__device__ __forceinline__ Array<T, N> load_array(const T* p) { return *reinterpret_cast<const Array<T, N>*>(p); }
template <typename T, int N>
__device__ __forceinline__ void store_array(T* p, const Array<T, N>& a) { *reinterpret_cast<Array<T, N>*>(p) = a; }

__device__ __forceinline__ float sigmoidf_(float p) { return 1.f / (1.f + __expf(-p)); }

// act(p). NaN propagates (comparisons with NaN are false, so NaN takes the last branch).
__device__ __forceinline__ float activate(float p, const Epilogue& e) {
  switch (e.act) {
    case kRelu: return p <= 0.f ? 0.f : p;
    case kLrelu: return p > 0.f ? p : p * e.alpha;
    case kTanh: return tanhf(p);
    case kSigmoid: return sigmoidf_(p);
    case kSilu: return p * sigmoidf_(p);
    default: return p;
  }
}

// clip(act(p) * gain): as the reference, torch.clamp keeps NaN.
__device__ __forceinline__ float epilogue(float p, const Epilogue& e) {
  float y = activate(p, e) * e.gain;
  if (e.has_clamp) y = y < -e.clamp ? -e.clamp : (y > e.clamp ? e.clamp : y);
  return y;
}

// d epilogue(p) / dp; at p == 0 relu and lrelu take the negative side's slope, and the
// clamp passes gradient where -clamp < y < clamp (0 at the bounds, as the reference does).
__device__ __forceinline__ float epilogue_derivative(float p, const Epilogue& e) {
  float d;
  switch (e.act) {
    case kRelu: d = p > 0.f ? 1.f : 0.f; break;
    case kLrelu: d = p > 0.f ? 1.f : e.alpha; break;
    case kTanh: {
      float t = tanhf(p);
      d = 1.f - t * t;
      break;
    }
    case kSigmoid: {
      float s = sigmoidf_(p);
      d = s * (1.f - s);
      break;
    }
    case kSilu: {
      float s = sigmoidf_(p);
      d = s * (1.f + p * (1.f - s));
      break;
    }
    default: d = 1.f;
  }
  d *= e.gain;
  if (e.has_clamp) {
    float y = activate(p, e) * e.gain;
    if (!(y > -e.clamp && y < e.clamp)) d = 0.f;  // 0 at |y| == clamp, as the reference
  }
  return d;
}

// d epilogue(p) / dp read off the op's output y = epilogue(p) instead of p, where that is
// exact: gain > 0 and act linear, relu, lrelu with alpha >= 0 (y > 0 exactly where p > 0),
// tanh (1 - (y/gain)^2) or sigmoid (s (1 - s), s = y/gain); not silu. See
// derivative_from_output(). `clamp_y` is the clamp level as stored in y's dtype: a clamped
// value sits exactly at it.
__device__ __forceinline__ bool derivative_from_output(const Epilogue& e) {
  return e.gain > 0.f && e.act != kSilu && !(e.act == kLrelu && e.alpha < 0.f);
}
__device__ __forceinline__ float epilogue_derivative_from_output(float y, const Epilogue& e, float clamp_y) {
  float d;
  switch (e.act) {
    case kRelu: d = y > 0.f ? e.gain : 0.f; break;
    case kLrelu: d = y > 0.f ? e.gain : e.gain * e.alpha; break;
    case kTanh: {
      const float t = y / e.gain;
      d = e.gain * (1.f - t * t);
      break;
    }
    case kSigmoid: {
      const float s = y / e.gain;
      d = e.gain * s * (1.f - s);
      break;
    }
    default: d = e.gain;
  }
  if (e.has_clamp && !(y > -clamp_y && y < clamp_y)) d = 0.f;
  return d;
}

// ---------------------------------------------------------------------------------
// Division-free indexing.

// n / d and n % d for a divisor fixed at launch and 0 <= n < 2^31, with a multiply-high
// and a shift (the magic-number method, as PyTorch's IntDivider): the host finds the
// multiplier once, no device code divides.
struct FastDivmod {
  uint32_t d = 1, mul = 1, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t divisor) : d(divisor) {
    while (shift < 32 && (1ull << shift) < divisor) ++shift;
    mul = (uint32_t)(((1ull << 32) * ((1ull << shift) - divisor)) / divisor + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, mul) + n) >> shift; }
  __device__ __forceinline__ uint32_t mod(uint32_t n) const { return n - div(n) * d; }
};

// The flat index t of a grid-stride loop as four digits of a mixed radix (digit 0
// fastest): t = d0 + r0 * (d1 + r1 * (d2 + r2 * d3)). Each thread divides once to find
// its first index's digits; every grid stride then adds the stride's digits (found on
// the host) with a carry: compares and subtracts, no division per element.
struct RadixWalk {
  int64_t r0, r1, r2;      // radices of digits 0..2 (digit 3 is unbounded)
  int64_t s0, s1, s2, s3;  // the grid stride in this radix
  RadixWalk() = default;
  RadixWalk(int64_t r0_, int64_t r1_, int64_t r2_, int64_t stride) : r0(r0_), r1(r1_), r2(r2_) {
    s0 = stride % r0;
    stride /= r0;
    s1 = stride % r1;
    stride /= r1;
    s2 = stride % r2;
    s3 = stride / r2;
  }
  __device__ __forceinline__ void start(int64_t t, int64_t d[4]) const {
    d[0] = t % r0;
    t /= r0;
    d[1] = t % r1;
    t /= r1;
    d[2] = t % r2;
    d[3] = t / r2;
  }
  __device__ __forceinline__ void advance(int64_t d[4]) const {
    d[0] += s0;
    int64_t carry = d[0] >= r0;
    if (carry) d[0] -= r0;
    d[1] += s1 + carry;  // < 2 * r1: s1 < r1
    carry = d[1] >= r1;
    if (carry) d[1] -= r1;
    d[2] += s2 + carry;
    carry = d[2] >= r2;
    if (carry) d[2] -= r2;
    d[3] += s3 + carry;
  }
};

// The most blocks a grid-stride kernel is launched with. The CPU emulation's tests lower
// it (csrc/emu/cuda_emu.h) so that each thread walks several grid strides.
#ifndef GK_MAX_GRID_BLOCKS
#define GK_MAX_GRID_BLOCKS ((int64_t)1 << 20)
#endif

// Blocks for a grid-stride loop over `work` items: enough to fill the GPU, capped so the
// grid stays legal.
inline unsigned grid_for(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > GK_MAX_GRID_BLOCKS) blocks = GK_MAX_GRID_BLOCKS;
  return (unsigned)blocks;
}

}  // namespace gk

// Call F<T>(args...) for the runtime dtype code; evaluates to a cudaError_t.
#define GK_DISPATCH(dtype, F, ...)                                          \
  ((dtype) == ::gk::kFloat32   ? F<float>(__VA_ARGS__)                      \
   : (dtype) == ::gk::kFloat16 ? F<__half>(__VA_ARGS__)                     \
   : (dtype) == ::gk::kBFloat16 ? F<__nv_bfloat16>(__VA_ARGS__)             \
                                : cudaErrorInvalidValue)
