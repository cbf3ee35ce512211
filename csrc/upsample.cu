// Nearest upsampling by an integer scale s, forward (a copy) and backward (each input
// element sums its s×s block of the gradient: a gather, no atomics, deterministic).
//
// Both walk the *input*: a work item is G input elements, G = a 16-byte vector of
// channels of one pixel (channels_last) or a run along a row (NCHW), and owns their
// s×s output blocks. So no index is divided by s: the forward loads once and stores
// s × s times (NCHW: s rows of G * s elements, each one 16-byte store when s = 2), the
// backward loads the s×s block (NCHW: s row segments) and stores once. s = 2, the GAN
// case, is a template argument (every load unrolled and in flight); other scales run
// the same code with the loops over s unrolled by 4. Indices are walked by RadixWalk:
// no division per element.
#include "common.cuh"

namespace gk {
namespace {

constexpr int kThreads = 256;
// At least 2 resident blocks per SM (a budget of 128 registers): the runtime-scale
// channels_last backward keeps 16 vector loads in flight, and ptxas's own choice without
// the minimum spills.
constexpr int kMinBlocks = 2;

struct UpShape {
  int64_t N, C, H, W;
  int s;
};

// The item's first input element: channels_last digits (channel group, w, h, n), NCHW
// digits (run along the row, h, plane = n * C + c).
template <bool CL, int G>
__device__ __forceinline__ void item_position(const int64_t d[4], const UpShape& u, int64_t& in_off, int64_t& out_off,
                                              int64_t& out_row) {
  const int64_t s = u.s, Wo = u.W * s;
  if (CL) {
    const int64_t c = d[0] * G, w = d[1], h = d[2], n = d[3];
    in_off = ((n * u.H + h) * u.W + w) * u.C + c;
    out_off = ((n * u.H * s + h * s) * Wo + w * s) * u.C + c;
    out_row = Wo * u.C;  // elements between output rows
  } else {
    const int64_t w = d[0] * G, h = d[1], plane = d[2];
    in_off = (plane * u.H + h) * u.W + w;
    out_off = (plane * u.H * s + h * s) * Wo + w * s;
    out_row = Wo;
  }
}

template <typename T, int G>
__device__ __forceinline__ void load_run(const T* p, T* v) {
  if constexpr (G == 1) {
    v[0] = p[0];
  } else {
    const Array<T, G> a = load_array<T, G>(p);
#pragma unroll
    for (int j = 0; j < G; ++j) v[j] = a.v[j];
  }
}

template <typename T, int G>
__device__ __forceinline__ void store_run(T* p, const T* v) {
  if constexpr (G == 1) {
    p[0] = v[0];
  } else {
    Array<T, G> a;
#pragma unroll
    for (int j = 0; j < G; ++j) a.v[j] = v[j];
    store_array<T, G>(p, a);
  }
}

// S = 2: the scale is 2 (unrolled); S = 0: u.s.
template <typename T, int S, int G, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) upsample_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, UpShape u,
                                                                 RadixWalk walk, int64_t items) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= items) return;
  int64_t d[4];
  walk.start(t, d);
  const int s = S ? S : u.s;
  for (; t < items; t += stride, walk.advance(d)) {
    int64_t in_off, out_off, out_row;
    item_position<CL, G>(d, u, in_off, out_off, out_row);
    T v[G];
    load_run<T, G>(x + in_off, v);
    if constexpr (CL) {  // the same G channels at each of the s×s output pixels
#pragma unroll(S ? S : 4)
      for (int i = 0; i < s; ++i)
#pragma unroll(S ? S : 4)
        for (int k = 0; k < s; ++k) store_run<T, G>(y + out_off + i * out_row + (int64_t)k * u.C, v);
    } else if constexpr (S == 2 && G > 1) {  // one 16-byte row of 2G elements, stored to 2 rows
      T row[2 * G];
#pragma unroll
      for (int j = 0; j < G; ++j) row[2 * j] = row[2 * j + 1] = v[j];
      store_run<T, 2 * G>(y + out_off, row);
      store_run<T, 2 * G>(y + out_off + out_row, row);
    } else {  // G == 1: s copies in each of s rows
      static_assert(G == 1, "NCHW without 16-byte rows: one input element per item");
#pragma unroll(S ? S : 4)
      for (int i = 0; i < s; ++i)
#pragma unroll(S ? S : 4)
        for (int k = 0; k < s; ++k) y[out_off + i * out_row + k] = v[0];
    }
  }
}

template <typename T, int S, int G, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) upsample_bwd_kernel(const T* __restrict__ grad, T* __restrict__ gx, UpShape u,
                                                                 RadixWalk walk, int64_t items) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= items) return;
  int64_t d[4];
  walk.start(t, d);
  const int s = S ? S : u.s;
  for (; t < items; t += stride, walk.advance(d)) {
    int64_t in_off, out_off, out_row;
    item_position<CL, G>(d, u, in_off, out_off, out_row);
    float acc[G];
#pragma unroll
    for (int j = 0; j < G; ++j) acc[j] = 0.f;
    if constexpr (CL) {  // s×s pixels of G channels, summed row by row in a fixed order
#pragma unroll(S ? S : 4)
      for (int i = 0; i < s; ++i)
#pragma unroll(S ? S : 4)
        for (int k = 0; k < s; ++k) {
          T v[G];
          load_run<T, G>(grad + out_off + i * out_row + (int64_t)k * u.C, v);
#pragma unroll
          for (int j = 0; j < G; ++j) acc[j] += to_f<T>(v[j]);
        }
    } else if constexpr (S == 2 && G > 1) {  // two 16-byte row segments of 2G elements
      T r0[2 * G], r1[2 * G];
      load_run<T, 2 * G>(grad + out_off, r0);
      load_run<T, 2 * G>(grad + out_off + out_row, r1);
#pragma unroll
      for (int j = 0; j < G; ++j)
        acc[j] = ((to_f<T>(r0[2 * j]) + to_f<T>(r0[2 * j + 1])) + to_f<T>(r1[2 * j])) + to_f<T>(r1[2 * j + 1]);
    } else {
      static_assert(G == 1, "NCHW without 16-byte rows: one input element per item");
#pragma unroll(S ? S : 4)
      for (int i = 0; i < s; ++i)
#pragma unroll(S ? S : 4)
        for (int k = 0; k < s; ++k) acc[0] += to_f<T>(grad[out_off + i * out_row + k]);
    }
    T out[G];
#pragma unroll
    for (int j = 0; j < G; ++j) out[j] = from_f<T>(acc[j]);
    store_run<T, G>(gx + in_off, out);
  }
}

template <typename T, bool BACKWARD, int S, int G, bool CL>
void launch(const T* in, T* out, const UpShape& u, const RadixWalk& walk, int64_t items, unsigned blocks,
            cudaStream_t stream) {
  if constexpr (BACKWARD) {
    upsample_bwd_kernel<T, S, G, CL><<<blocks, kThreads, 0, stream>>>(in, out, u, walk, items);
  } else {
    upsample_fwd_kernel<T, S, G, CL><<<blocks, kThreads, 0, stream>>>(in, out, u, walk, items);
  }
}

template <typename T, bool BACKWARD, int S>
void launch_scale(const T* in, T* out, const UpShape& u, const RadixWalk& walk, int64_t items, unsigned blocks,
                  bool cl, int G, cudaStream_t stream) {
  constexpr int V = Vec<T>::N;
  if (cl) {
    if (G == V) {
      launch<T, BACKWARD, S, V, true>(in, out, u, walk, items, blocks, stream);
    } else {
      launch<T, BACKWARD, S, 1, true>(in, out, u, walk, items, blocks, stream);
    }
  } else if (S == 2 && G == V / 2) {
    launch<T, BACKWARD, S, (S == 2 ? V / 2 : 1), false>(in, out, u, walk, items, blocks, stream);
  } else {
    launch<T, BACKWARD, S, 1, false>(in, out, u, walk, items, blocks, stream);
  }
}

// G input elements per item: a 16-byte vector of channels (channels_last, C % V == 0),
// a run of V / 2 along a row (NCHW, s = 2, W % (V / 2) == 0: 16-byte output rows), or 1.
template <typename T, bool BACKWARD>
cudaError_t run(const void* src, void* dst, UpShape u, bool cl, bool vec, cudaStream_t stream) {
  constexpr int V = Vec<T>::N;
  if (u.N * u.C * u.H * u.W == 0) return cudaSuccess;
  const bool two = u.s == 2;
  const int G = cl ? (vec && u.C % V == 0 ? V : 1) : (vec && two && u.W % (V / 2) == 0 ? V / 2 : 1);
  const int64_t r0 = cl ? u.C / G : u.W / G, r1 = cl ? u.W : u.H, r2 = cl ? u.H : u.N * u.C;
  const int64_t items = r0 * r1 * r2 * (cl ? u.N : 1);
  const unsigned blocks = grid_for(items, kThreads);
  const RadixWalk walk(r0, r1, r2, (int64_t)blocks * kThreads);
  auto in = static_cast<const T*>(src);
  auto out = static_cast<T*>(dst);
  if (two) {
    launch_scale<T, BACKWARD, 2>(in, out, u, walk, items, blocks, cl, G, stream);
  } else {
    launch_scale<T, BACKWARD, 0>(in, out, u, walk, items, blocks, cl, G, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd(const void* x, void* y, int64_t N, int64_t C, int64_t H, int64_t W, int s, bool cl, bool vec,
                cudaStream_t stream) {
  return run<T, false>(x, y, UpShape{N, C, H, W, s}, cl, vec, stream);
}

template <typename T>
cudaError_t bwd(const void* grad, void* gx, int64_t N, int64_t C, int64_t H, int64_t W, int s, bool cl, bool vec,
                cudaStream_t stream) {
  return run<T, true>(grad, gx, UpShape{N, C, H, W, s}, cl, vec, stream);
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
