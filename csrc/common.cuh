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
// clamp passes gradient where -clamp <= y <= clamp (as the reference does).
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
    if (!(y >= -e.clamp && y <= e.clamp)) d = 0.f;
  }
  return d;
}

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
