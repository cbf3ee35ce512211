// max_pool2d forward (values + int64 indices, PyTorch's exact semantics) and backward
// (a gather: no atomics, deterministic). Any kernel size / stride / padding / dilation
// and ceil_mode (the output size comes from the caller); NCHW or channels_last.
#include "common.cuh"

namespace gk {
namespace {

constexpr int kThreads = 256;

// The window of output row `o` along one axis: first index (>= 0) and end (exclusive).
__device__ __forceinline__ void window(int64_t o, int s, int p, int k, int d, int64_t size, int64_t& start,
                                       int64_t& end) {
  start = o * s - p;
  end = start + (int64_t)(k - 1) * d + 1;
  if (end > size) end = size;
  while (start < 0) start += d;
}

// One output element per thread (or, when vec, one 16-byte group of channels of a
// channels_last tensor). PyTorch's rule: max starts at -inf with the index of the first
// window element; a value replaces it if greater or NaN (so the last NaN wins).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) max_pool_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                 int64_t* __restrict__ idx, PoolShape p) {
  constexpr int V = VEC ? Vec<T>::N : 1;
  const int64_t Cg = p.C / V;  // channel groups
  const int64_t total = p.N * Cg * p.Ho * p.Wo;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    int64_t n, c, ho, wo;
    if (p.cl) {
      c = (t % Cg) * V;
      int64_t r = t / Cg;
      wo = r % p.Wo;
      r /= p.Wo;
      ho = r % p.Ho;
      n = r / p.Ho;
    } else {
      wo = t % p.Wo;
      int64_t r = t / p.Wo;
      ho = r % p.Ho;
      r /= p.Ho;
      c = r % p.C;
      n = r / p.C;
    }
    int64_t hs, he, ws, we;
    window(ho, p.sh, p.ph, p.kh, p.dh, p.H, hs, he);
    window(wo, p.sw, p.pw, p.kw, p.dw, p.W, ws, we);
    float best[V];
    int64_t arg[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      best[j] = -INFINITY;
      arg[j] = hs * p.W + ws;
    }
    for (int64_t h = hs; h < he; h += p.dh) {
      for (int64_t w = ws; w < we; w += p.dw) {
        float v[V];
        if (p.cl) {
          const T* src = x + ((n * p.H + h) * p.W + w) * p.C + c;
          if (VEC) {
            Vec<T> xv = load_vec(src);
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] = to_f<T>(xv.v[j]);
          } else {
            v[0] = to_f<T>(src[0]);
          }
        } else {
          v[0] = to_f<T>(x[((n * p.C + c) * p.H + h) * p.W + w]);
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (v[j] > best[j] || isnan(v[j])) {
            best[j] = v[j];
            arg[j] = h * p.W + w;
          }
        }
      }
    }
    const int64_t o = p.cl ? ((n * p.Ho + ho) * p.Wo + wo) * p.C + c : ((n * p.C + c) * p.Ho + ho) * p.Wo + wo;
    if (VEC) {
      Vec<T> ov;
#pragma unroll
      for (int j = 0; j < V; ++j) ov.v[j] = from_f<T>(best[j]);
      store_vec(y + o, ov);
      // V int64 indices = V * 8 bytes, 16-byte aligned since o is a multiple of V >= 2.
#pragma unroll
      for (int j = 0; j < V; j += 2) {
        *reinterpret_cast<longlong2*>(idx + o + j) = make_longlong2(arg[j], arg[j + 1]);
      }
    } else {
      y[o] = from_f<T>(best[0]);
      idx[o] = arg[0];
    }
  }
}

// One input element per thread: sum, in increasing (ho, wo) order, the gradients of the
// outputs whose window covers it and whose index names it.
template <typename T>
__global__ void __launch_bounds__(kThreads) max_pool_bwd_kernel(const T* __restrict__ grad,
                                                                 const int64_t* __restrict__ idx, T* __restrict__ gx,
                                                                 PoolShape p) {
  const int64_t total = p.N * p.C * p.H * p.W;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    int64_t n, c, h, w;
    if (p.cl) {
      c = t % p.C;
      int64_t r = t / p.C;
      w = r % p.W;
      r /= p.W;
      h = r % p.H;
      n = r / p.H;
    } else {
      w = t % p.W;
      int64_t r = t / p.W;
      h = r % p.H;
      r /= p.H;
      c = r % p.C;
      n = r / p.C;
    }
    // Outputs o with o*s - pad <= h <= o*s - pad + (k-1)*d.
    const int64_t span_h = (int64_t)(p.kh - 1) * p.dh, span_w = (int64_t)(p.kw - 1) * p.dw;
    const int64_t ho0 = h + p.ph < span_h ? 0 : (h + p.ph - span_h + p.sh - 1) / p.sh;
    const int64_t ho1 = min((h + p.ph) / p.sh, p.Ho - 1);
    const int64_t wo0 = w + p.pw < span_w ? 0 : (w + p.pw - span_w + p.sw - 1) / p.sw;
    const int64_t wo1 = min((w + p.pw) / p.sw, p.Wo - 1);
    const int64_t me = h * p.W + w;
    float acc = 0.f;
    for (int64_t ho = ho0; ho <= ho1; ++ho) {
      for (int64_t wo = wo0; wo <= wo1; ++wo) {
        const int64_t o = p.cl ? ((n * p.Ho + ho) * p.Wo + wo) * p.C + c : ((n * p.C + c) * p.Ho + ho) * p.Wo + wo;
        if (idx[o] == me) acc += to_f<T>(grad[o]);
      }
    }
    gx[t] = from_f<T>(acc);
  }
}

template <typename T>
cudaError_t fwd(const void* x, void* y, int64_t* idx, PoolShape p, bool vec, cudaStream_t stream) {
  const int64_t outputs = p.N * p.C * p.Ho * p.Wo;
  if (outputs == 0) return cudaSuccess;
  const bool use_vec = vec && p.cl && p.C % Vec<T>::N == 0;
  if (use_vec) {
    max_pool_fwd_kernel<T, true><<<grid_for(outputs / Vec<T>::N, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), idx, p);
  } else {
    max_pool_fwd_kernel<T, false><<<grid_for(outputs, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), idx, p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const void* grad, const int64_t* idx, void* gx, PoolShape p, cudaStream_t stream) {
  const int64_t inputs = p.N * p.C * p.H * p.W;
  if (inputs == 0) return cudaSuccess;
  max_pool_bwd_kernel<T><<<grid_for(inputs, kThreads), kThreads, 0, stream>>>(static_cast<const T*>(grad), idx,
                                                                               static_cast<T*>(gx), p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_max_pool2d_fwd(int dtype, const void* x, void* y, int64_t* idx, PoolShape p, bool vec,
                                  cudaStream_t stream) {
  return GK_DISPATCH(dtype, fwd, x, y, idx, p, vec, stream);
}

cudaError_t launch_max_pool2d_bwd(int dtype, const void* grad, const int64_t* idx, void* gx, PoolShape p,
                                  cudaStream_t stream) {
  return GK_DISPATCH(dtype, bwd, grad, idx, gx, p, stream);
}

}  // namespace gk
