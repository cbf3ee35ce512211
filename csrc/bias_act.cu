// bias_act forward and backward: y = clip(act(x + b) * gain), elementwise over a dense
// tensor; 16-byte vector loads/stores when the pointers allow, scalar ones otherwise.
//
// The channel of the element at memory offset i is (i / inner) % C. No division per
// element: each thread divides once, for its first vector, and then walks (r, c) =
// (i % inner, (i / inner) % C) forward, by one element inside a vector and by the
// grid stride (host-precomputed as a whole number of channel runs plus a remainder)
// from one vector to the next, with compares and subtracts only. Two layouts need less:
// when inner is a multiple of V (NCHW with H*W % V == 0) a whole vector shares one
// channel; when inner == 1 (channels_last) the V channels are consecutive.
//
// The activation is a template argument (as StyleGAN3's bias_act), so each kernel holds
// one activation's code, not a switch per element.
#include "common.cuh"

namespace gk {
namespace {

constexpr int kThreads = 256;
// At least 2 resident blocks per SM (128 registers): without it ptxas spills the
// sigmoid backward over 4 float32 elements.
constexpr int kMinBlocks = 2;

// Where the channel index of a thread stands, and how it moves.
struct ChannelWalk {
  int64_t inner;   // elements per channel run (x.stride(dim))
  int64_t C;       // channels
  int64_t step_r;  // (grid stride in elements) % inner
  int64_t step_c;  // ((grid stride in elements) / inner) % C
};

// (r, c) += 1 element.
__device__ __forceinline__ void advance_one(int64_t& r, int64_t& c, const ChannelWalk& w) {
  if (++r == w.inner) {
    r = 0;
    if (++c == w.C) c = 0;
  }
}

// (r, c) += one grid stride.
__device__ __forceinline__ void advance_stride(int64_t& r, int64_t& c, const ChannelWalk& w) {
  r += w.step_r;
  int64_t carry = 0;
  if (r >= w.inner) {
    r -= w.inner;
    carry = 1;
  }
  c += w.step_c + carry;  // < 2C: step_c < C
  if (c >= w.C) c -= w.C;
}

// The derivative and the epilogue for a compile-time activation.
template <int A>
__device__ __forceinline__ float act_epilogue(float p, const Epilogue& e) {
  Epilogue s = e;
  s.act = A;  // a constant: the switch in epilogue() folds away
  return epilogue(p, s);
}
template <int A>
__device__ __forceinline__ float act_derivative(float p, const Epilogue& e) {
  Epilogue s = e;
  s.act = A;
  return epilogue_derivative(p, s);
}

template <typename T, int V>
struct Pack {
  T v[V];
};
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  Pack<T, V> out;
  if constexpr (V == 1) {
    out.v[0] = p[0];
  } else {
    const Vec<T> raw = load_vec(p);
#pragma unroll
    for (int j = 0; j < V; ++j) out.v[j] = raw.v[j];
  }
  return out;
}
template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& in) {
  if constexpr (V == 1) {
    p[0] = in.v[0];
  } else {
    Vec<T> raw;
#pragma unroll
    for (int j = 0; j < V; ++j) raw.v[j] = in.v[j];
    store_vec(p, raw);
  }
}

// Channel layout of one kernel instance, known when it is launched.
enum Layout : int { kNoBias = 0, kPlanar = 1, kChannelsLast = 2, kGeneral = 3 };

// One thread: the vectors start, start + stride, ... of V elements each (V = 1: plain
// elements). BACKWARD = false: out = epilogue(x + b); true: out = grad * epilogue'(x + b).
template <typename T, int A, bool BACKWARD, int V, int LAYOUT>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bias_act_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ out,
                    int64_t nvec, ChannelWalk walk, Epilogue e) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t start = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (start >= nvec) return;
  int64_t r = 0, c = 0;
  if (LAYOUT != kNoBias) {  // once per thread
    const int64_t i0 = start * V;
    r = i0 % walk.inner;
    c = (i0 / walk.inner) % walk.C;
  }
  for (int64_t v = start; v < nvec; v += stride) {
    const int64_t i0 = v * V;
    const Pack<T, V> xv = load_pack<T, V>(x + i0);
    Pack<T, V> gv;
    if (BACKWARD) gv = load_pack<T, V>(grad + i0);
    float bias[V];
    if (LAYOUT == kNoBias) {
#pragma unroll
      for (int j = 0; j < V; ++j) bias[j] = 0.f;
    } else if (LAYOUT == kPlanar) {  // one channel for the whole vector
      const float bc = to_f<T>(b[c]);
#pragma unroll
      for (int j = 0; j < V; ++j) bias[j] = bc;
    } else if (LAYOUT == kChannelsLast) {  // inner == 1, C % V == 0: channels c .. c + V - 1
#pragma unroll
      for (int j = 0; j < V; ++j) bias[j] = to_f<T>(b[c + j]);
    } else {
      int64_t rj = r, cj = c;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        bias[j] = to_f<T>(b[cj]);
        advance_one(rj, cj, walk);
      }
    }
    Pack<T, V> ov;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float p = to_f<T>(xv.v[j]) + bias[j];
      const float y = BACKWARD ? to_f<T>(gv.v[j]) * act_derivative<A>(p, e) : act_epilogue<A>(p, e);
      ov.v[j] = from_f<T>(y);
    }
    store_pack<T, V>(out + i0, ov);
    if (LAYOUT != kNoBias) advance_stride(r, c, walk);
  }
}

// The last numel % V elements (fewer than V, one per thread; no loop).
template <typename T, int A, bool BACKWARD>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bias_act_tail_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ out,
                         int64_t first, int64_t numel, int64_t inner, int64_t C, Epilogue e) {
  const int64_t i = first + threadIdx.x;
  if (i >= numel) return;
  const float p = to_f<T>(x[i]) + (b == nullptr ? 0.f : to_f<T>(b[(i / inner) % C]));
  const float y = BACKWARD ? to_f<T>(grad[i]) * act_derivative<A>(p, e) : act_epilogue<A>(p, e);
  out[i] = from_f<T>(y);
}

template <typename T, int A, bool BACKWARD, int V, int LAYOUT>
void launch_body(const T* grad, const T* x, const T* b, T* out, int64_t nvec, int64_t inner, int64_t C, Epilogue e,
                 cudaStream_t stream) {
  const unsigned blocks = grid_for(nvec, kThreads);
  const int64_t stride = (int64_t)blocks * kThreads * V;  // elements per grid stride
  ChannelWalk walk{inner, C, stride % inner, (stride / inner) % C};
  bias_act_kernel<T, A, BACKWARD, V, LAYOUT><<<blocks, kThreads, 0, stream>>>(grad, x, b, out, nvec, walk, e);
}

template <typename T, int A, bool BACKWARD, int V>
void launch_layout(const T* grad, const T* x, const T* b, T* out, int64_t nvec, int64_t inner, int64_t C, Epilogue e,
                   cudaStream_t stream) {
  if (b == nullptr) {
    launch_body<T, A, BACKWARD, V, kNoBias>(grad, x, b, out, nvec, 1, 1, e, stream);
  } else if (inner % V == 0 || C == 1) {  // one channel per vector (C == 1: always channel 0)
    launch_body<T, A, BACKWARD, V, kPlanar>(grad, x, b, out, nvec, inner, C, e, stream);
  } else if (inner == 1 && C % V == 0) {
    launch_body<T, A, BACKWARD, V, kChannelsLast>(grad, x, b, out, nvec, inner, C, e, stream);
  } else {
    launch_body<T, A, BACKWARD, V, kGeneral>(grad, x, b, out, nvec, inner, C, e, stream);
  }
}

template <typename T, int A, bool BACKWARD>
cudaError_t launch_act(const T* grad, const T* x, const T* b, T* out, int64_t numel, int64_t inner, int64_t C,
                       Epilogue e, bool vec, cudaStream_t stream) {
  constexpr int V = Vec<T>::N;
  if (vec) {
    const int64_t nvec = numel / V;
    if (nvec > 0) launch_layout<T, A, BACKWARD, V>(grad, x, b, out, nvec, inner, C, e, stream);
    const int64_t first = nvec * V;
    if (first < numel) {
      bias_act_tail_kernel<T, A, BACKWARD><<<1, kThreads, 0, stream>>>(grad, x, b, out, first, numel, inner, C, e);
    }
  } else {
    launch_layout<T, A, BACKWARD, 1>(grad, x, b, out, numel, inner, C, e, stream);
  }
  return cudaGetLastError();
}

template <typename T, bool BACKWARD>
cudaError_t run(const void* grad, const void* x, const void* b, void* out, int64_t numel, int64_t inner, int64_t C,
                Epilogue e, bool vec, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  auto g = static_cast<const T*>(grad);
  auto xs = static_cast<const T*>(x);
  auto bs = static_cast<const T*>(b);
  auto o = static_cast<T*>(out);
  switch (e.act) {
    case kLinear: return launch_act<T, kLinear, BACKWARD>(g, xs, bs, o, numel, inner, C, e, vec, stream);
    case kRelu: return launch_act<T, kRelu, BACKWARD>(g, xs, bs, o, numel, inner, C, e, vec, stream);
    case kLrelu: return launch_act<T, kLrelu, BACKWARD>(g, xs, bs, o, numel, inner, C, e, vec, stream);
    case kTanh: return launch_act<T, kTanh, BACKWARD>(g, xs, bs, o, numel, inner, C, e, vec, stream);
    case kSigmoid: return launch_act<T, kSigmoid, BACKWARD>(g, xs, bs, o, numel, inner, C, e, vec, stream);
    case kSilu: return launch_act<T, kSilu, BACKWARD>(g, xs, bs, o, numel, inner, C, e, vec, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t fwd(const void* x, const void* b, void* y, int64_t numel, int64_t inner, int64_t C, Epilogue e, bool vec,
                cudaStream_t stream) {
  return run<T, false>(nullptr, x, b, y, numel, inner, C, e, vec, stream);
}

template <typename T>
cudaError_t bwd(const void* grad, const void* x, const void* b, void* gx, int64_t numel, int64_t inner, int64_t C,
                Epilogue e, bool vec, cudaStream_t stream) {
  return run<T, true>(grad, x, b, gx, numel, inner, C, e, vec, stream);
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
