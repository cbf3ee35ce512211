// Nearest upsampling by an integer scale, forward (a copy with 16-byte stores) and
// backward (each input element gathers and sums its s×s block: no atomics).
#include "common.cuh"

namespace gk {
namespace {

constexpr int kThreads = 256;

// Forward. One thread writes V consecutive output elements: channels_last, V channels
// of one pixel (needs C % V == 0); NCHW, V pixels of one row (needs Wo % V == 0).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) upsample_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t N,
                                                                 int64_t C, int64_t H, int64_t W, int s, bool cl) {
  const int64_t Ho = H * s, Wo = W * s;
  const int64_t groups = N * C * Ho * Wo / V;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < groups; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t o = t * V;  // first output element (memory order)
    if (cl) {
      const int64_t c = o % C;
      int64_t r = o / C;
      const int64_t wo = r % Wo;
      r /= Wo;
      const int64_t ho = r % Ho;
      const int64_t n = r / Ho;
      const T* src = x + ((n * H + ho / s) * W + wo / s) * C + c;
      if (V > 1) {
        store_vec(y + o, load_vec(src));
      } else {
        y[o] = src[0];
      }
    } else {
      const int64_t wo = o % Wo;
      const int64_t row = o / Wo;  // (n * C + c) * Ho + ho
      const int64_t ho = row % Ho;
      const int64_t plane = row / Ho;
      const T* src = x + (plane * H + ho / s) * W;
      if (V > 1) {
        Vec<T> v;
#pragma unroll
        for (int j = 0; j < V; ++j) v.v[j] = src[(wo + j) / s];
        store_vec(y + o, v);
      } else {
        y[o] = src[wo / s];
      }
    }
  }
}

// Backward. One thread per input element, or per V channels of one pixel
// (channels_last, C % V == 0) with 16-byte loads and stores. The s×s block is summed in
// a fixed order in float32.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) upsample_bwd_kernel(const T* __restrict__ grad, T* __restrict__ gx,
                                                                 int64_t N, int64_t C, int64_t H, int64_t W, int s,
                                                                 bool cl) {
  const int64_t Ho = H * s, Wo = W * s;
  const int64_t groups = N * C * H * W / V;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < groups; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t o = t * V;
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
    if (cl) {
      const int64_t c = o % C;
      int64_t r = o / C;
      const int64_t w = r % W;
      r /= W;
      const int64_t h = r % H;
      const int64_t n = r / H;
      for (int i = 0; i < s; ++i) {
        for (int k = 0; k < s; ++k) {
          const T* src = grad + ((n * Ho + h * s + i) * Wo + w * s + k) * C + c;
          if (V > 1) {
            Vec<T> v = load_vec(src);
#pragma unroll
            for (int j = 0; j < V; ++j) acc[j] += to_f<T>(v.v[j]);
          } else {
            acc[0] += to_f<T>(src[0]);
          }
        }
      }
    } else {
      const int64_t w = o % W;
      const int64_t row = o / W;  // (n * C + c) * H + h
      const int64_t h = row % H;
      const int64_t plane = row / H;
      for (int i = 0; i < s; ++i) {
        const T* src = grad + (plane * Ho + h * s + i) * Wo + w * s;
        for (int k = 0; k < s; ++k) acc[0] += to_f<T>(src[k]);
      }
    }
    if (V > 1) {
      Vec<T> v;
#pragma unroll
      for (int j = 0; j < V; ++j) v.v[j] = from_f<T>(acc[j]);
      store_vec(gx + o, v);
    } else {
      gx[o] = from_f<T>(acc[0]);
    }
  }
}

template <typename T>
cudaError_t fwd(const void* x, void* y, int64_t N, int64_t C, int64_t H, int64_t W, int s, bool cl, bool vec,
                cudaStream_t stream) {
  constexpr int V = Vec<T>::N;
  const int64_t outputs = N * C * H * s * W * s;
  if (outputs == 0) return cudaSuccess;
  const bool use_vec = vec && (cl ? C % V == 0 : (W * s) % V == 0);
  auto xs = static_cast<const T*>(x);
  auto ys = static_cast<T*>(y);
  if (use_vec) {
    upsample_fwd_kernel<T, V><<<grid_for(outputs / V, kThreads), kThreads, 0, stream>>>(xs, ys, N, C, H, W, s, cl);
  } else {
    upsample_fwd_kernel<T, 1><<<grid_for(outputs, kThreads), kThreads, 0, stream>>>(xs, ys, N, C, H, W, s, cl);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const void* grad, void* gx, int64_t N, int64_t C, int64_t H, int64_t W, int s, bool cl, bool vec,
                cudaStream_t stream) {
  constexpr int V = Vec<T>::N;
  const int64_t inputs = N * C * H * W;
  if (inputs == 0) return cudaSuccess;
  const bool use_vec = vec && cl && C % V == 0;
  auto gs = static_cast<const T*>(grad);
  auto xs = static_cast<T*>(gx);
  if (use_vec) {
    upsample_bwd_kernel<T, V><<<grid_for(inputs / V, kThreads), kThreads, 0, stream>>>(gs, xs, N, C, H, W, s, cl);
  } else {
    upsample_bwd_kernel<T, 1><<<grid_for(inputs, kThreads), kThreads, 0, stream>>>(gs, xs, N, C, H, W, s, cl);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_upsample_fwd(int dtype, const void* x, void* y, int64_t N, int64_t C, int64_t H, int64_t W, int s,
                                bool cl, bool vec, cudaStream_t stream) {
  return GK_DISPATCH(dtype, fwd, x, y, N, C, H, W, s, cl, vec, stream);
}

cudaError_t launch_upsample_bwd(int dtype, const void* grad, void* gx, int64_t N, int64_t C, int64_t H, int64_t W,
                                int s, bool cl, bool vec, cudaStream_t stream) {
  return GK_DISPATCH(dtype, bwd, grad, gx, N, C, H, W, s, cl, vec, stream);
}

}  // namespace gk
