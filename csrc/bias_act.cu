// bias_act forward and backward: y = clip(act(x + b) * gain), elementwise over a dense
// tensor, 16-byte vector loads/stores for the bulk and a scalar tail.
#include "common.cuh"

namespace gk {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float bias_at(const T* b, int64_t i, int64_t inner, int64_t C) {
  return b == nullptr ? 0.f : to_f<T>(b[(i / inner) % C]);
}

// BACKWARD = false: out = epilogue(x + b). BACKWARD = true: out = grad * epilogue'(x + b).
template <typename T, bool BACKWARD>
__global__ void __launch_bounds__(kThreads)
    bias_act_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ out,
                    int64_t numel, int64_t inner, int64_t C, Epilogue e, bool vec) {
  constexpr int V = Vec<T>::N;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t start = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (vec) {
    const int64_t nvec = numel / V;
    for (int64_t v = start; v < nvec; v += stride) {
      const int64_t i0 = v * V;
      Vec<T> xv = load_vec(x + i0);
      Vec<T> gv;
      if (BACKWARD) gv = load_vec(grad + i0);
      Vec<T> ov;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float p = to_f<T>(xv.v[j]) + bias_at(b, i0 + j, inner, C);
        float r = BACKWARD ? to_f<T>(gv.v[j]) * epilogue_derivative(p, e) : epilogue(p, e);
        ov.v[j] = from_f<T>(r);
      }
      store_vec(out + i0, ov);
    }
    tail = nvec * V;
  }
  for (int64_t i = tail + start; i < numel; i += stride) {
    float p = to_f<T>(x[i]) + bias_at(b, i, inner, C);
    float r = BACKWARD ? to_f<T>(grad[i]) * epilogue_derivative(p, e) : epilogue(p, e);
    out[i] = from_f<T>(r);
  }
}

template <typename T>
cudaError_t fwd(const void* x, const void* b, void* y, int64_t numel, int64_t inner, int64_t C, Epilogue e, bool vec,
                cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int64_t work = vec ? numel / Vec<T>::N + Vec<T>::N : numel;
  bias_act_kernel<T, false><<<grid_for(work, kThreads), kThreads, 0, stream>>>(
      nullptr, static_cast<const T*>(x), static_cast<const T*>(b), static_cast<T*>(y), numel, inner, C, e, vec);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const void* grad, const void* x, const void* b, void* gx, int64_t numel, int64_t inner, int64_t C,
                Epilogue e, bool vec, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int64_t work = vec ? numel / Vec<T>::N + Vec<T>::N : numel;
  bias_act_kernel<T, true><<<grid_for(work, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const T*>(b), static_cast<T*>(gx), numel,
      inner, C, e, vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bias_act_fwd(int dtype, const void* x, const void* b, void* y, int64_t numel, int64_t inner,
                                int64_t C, Epilogue e, bool vec, cudaStream_t stream) {
  return GK_DISPATCH(dtype, fwd, x, b, y, numel, inner, C, e, vec, stream);
}

cudaError_t launch_bias_act_bwd(int dtype, const void* grad, const void* x, const void* b, void* gx, int64_t numel,
                                int64_t inner, int64_t C, Epilogue e, bool vec, cudaStream_t stream) {
  return GK_DISPATCH(dtype, bwd, grad, x, b, gx, numel, inner, C, e, vec, stream);
}

}  // namespace gk
