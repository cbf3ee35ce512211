// max_pool2d forward and backward, PyTorch's exact semantics (NaN wins, the first
// maximum otherwise), NCHW or channels_last, any kernel size / stride / padding /
// dilation and ceil_mode (the output size comes from the caller).
//
// What the forward saves for the backward: PyTorch's int64 flat per-plane indices
// h * W + w when they are asked for, else a 1-byte window code ky * KW + kx (the
// argmax's tap inside its window; the Triton backend's convention). In bf16 the int64
// indices would be most of the bytes the op moves.
//
// Kernels:
// * 2×2 stride 2 (no padding, dilation 1, every window complete): one thread per output
//   and a 16-byte vector of channels (channels_last) or a run of outputs along a row
//   (NCHW, loaded as two 16-byte row segments). Its backward is a scatter of each
//   window into its own four inputs (windows do not overlap): every input written
//   once, no atomics, deterministic.
// * everything else: one thread per output (a vector of channels when channels_last
//   allows), the window scanned tap by tap (unrolled for 3×3); the backward gathers, per
//   input, the outputs whose window covers it and whose saved argmax names it, in a
//   fixed order.
// No kernel divides per element: indices are walked by RadixWalk and the window range
// of the gather uses host-computed FastDivmod.
#include "common.cuh"

namespace gk {
namespace {

constexpr int kThreads = 256;
// At least 2 resident blocks per SM: a register budget of 128. Without the minimum,
// ptxas's own choice for these long int64-indexed bodies spills (28-36 bytes); with 4
// (64 registers) the unrolled 3×3 window over 8 channels with int64 indices spills.
constexpr int kMinBlocks = 2;

// The first tap of a window that lies inside [0, size): PyTorch starts the running
// maximum there (with -inf), so an all -inf window reports that element.
__device__ __forceinline__ int first_tap(int64_t start, int dil) {
  int k = 0;
  while (start + (int64_t)k * dil < 0) ++k;  // at most ceil(pad / dil) steps
  return k;
}

// PyTorch's update rule: replace when strictly greater or NaN (so the last NaN wins).
__device__ __forceinline__ bool better(float v, float best) { return v > best || isnan(v); }

template <typename I>
__device__ __forceinline__ I saved_value(int ky, int kx, int kw, int64_t h, int64_t w, int64_t W) {
  if constexpr (sizeof(I) == 1) {
    return (I)(ky * kw + kx);
  } else {
    return (I)(h * W + w);
  }
}

template <typename T, int V>
__device__ __forceinline__ void load_values(const T* src, float* v) {
  if constexpr (V == 1) {
    v[0] = to_f<T>(src[0]);
  } else {
    const Vec<T> raw = load_vec(src);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = to_f<T>(raw.v[j]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_values(T* dst, const float* v) {
  if constexpr (V == 1) {
    dst[0] = from_f<T>(v[0]);
  } else {
    Vec<T> raw;
#pragma unroll
    for (int j = 0; j < V; ++j) raw.v[j] = from_f<T>(v[j]);
    store_vec(dst, raw);
  }
}

// V saved values, one store (V * sizeof(I) bytes, aligned: the offset is a multiple of V).
template <typename I, int V>
__device__ __forceinline__ void store_saved(I* dst, const I* s) {
  if constexpr (V == 1) {
    dst[0] = s[0];
  } else if constexpr (sizeof(I) == 8) {
#pragma unroll
    for (int j = 0; j < V; j += 2) *reinterpret_cast<longlong2*>(dst + j) = make_longlong2(s[j], s[j + 1]);
  } else {
    static_assert(sizeof(I) == 1 && (V == 2 || V == 4 || V == 8), "window codes: 2, 4 or 8 per store");
    uint64_t packed = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) packed |= (uint64_t)(uint8_t)s[j] << (8 * j);
    if constexpr (V == 8) {
      *reinterpret_cast<uint64_t*>(dst) = packed;
    } else if constexpr (V == 4) {
      *reinterpret_cast<uint32_t*>(dst) = (uint32_t)packed;
    } else {
      *reinterpret_cast<uint16_t*>(dst) = (uint16_t)packed;
    }
  }
}

template <typename I, int V>
__device__ __forceinline__ void load_saved(const I* src, I* s) {
  if constexpr (V == 1 || sizeof(I) == 8) {
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] = src[j];
  } else {
    uint64_t packed;
    if constexpr (V == 8) {
      packed = *reinterpret_cast<const uint64_t*>(src);
    } else if constexpr (V == 4) {
      packed = *reinterpret_cast<const uint32_t*>(src);
    } else {
      packed = *reinterpret_cast<const uint16_t*>(src);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] = (I)(int8_t)(packed >> (8 * j));
  }
}

// ---------------------------------------------------------------------------------
// General forward: one output (or V channels of one, channels_last) per thread.
// KS = 3: a 3×3 window, fully unrolled (all its loads in flight); KS = 0: any size.

template <typename T, int V, typename I, int KS>
__global__ void __launch_bounds__(kThreads, kMinBlocks) max_pool_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                 I* __restrict__ saved, PoolShape p, RadixWalk walk,
                                                                 int64_t total) {
  constexpr bool code = sizeof(I) == 1;  // 1-byte window codes, else int64 flat indices
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= total) return;
  int64_t d[4];
  walk.start(t, d);
  const int kh = KS ? KS : p.kh, kw = KS ? KS : p.kw;
  for (; t < total; t += stride, walk.advance(d)) {
    int64_t n, c, ho, wo;
    if (p.cl) {
      c = d[0] * V, wo = d[1], ho = d[2], n = d[3];
    } else {
      wo = d[0], ho = d[1], c = d[2], n = d[3];
    }
    const int64_t h0 = ho * p.sh - p.ph, w0 = wo * p.sw - p.pw;
    const int ky0 = first_tap(h0, p.dh), kx0 = first_tap(w0, p.dw);
    float best[V];
    I arg[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      best[j] = -INFINITY;
      arg[j] = saved_value<I>(ky0, kx0, kw, h0 + (int64_t)ky0 * p.dh, w0 + (int64_t)kx0 * p.dw, p.W);
    }
    const T* plane = p.cl ? x + n * p.H * p.W * p.C + c : x + (n * p.C + c) * p.H * p.W;
    const int64_t pixel_stride = p.cl ? p.C : 1;
    auto visit = [&](int ky, int kx) {
      const int64_t h = h0 + (int64_t)ky * p.dh, w = w0 + (int64_t)kx * p.dw;
      float v[V];
      load_values<T, V>(plane + (h * p.W + w) * pixel_stride, v);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (better(v[j], best[j])) {
          best[j] = v[j];
          arg[j] = saved_value<I>(ky, kx, kw, h, w, p.W);
        }
      }
    };
    if constexpr (KS > 0) {
#pragma unroll
      for (int ky = 0; ky < KS; ++ky) {
#pragma unroll
        for (int kx = 0; kx < KS; ++kx) {
          const int64_t h = h0 + (int64_t)ky * p.dh, w = w0 + (int64_t)kx * p.dw;
          if (h >= 0 && h < p.H && w >= 0 && w < p.W) visit(ky, kx);
        }
      }
    } else {
      for (int ky = ky0; ky < kh && h0 + (int64_t)ky * p.dh < p.H; ++ky)
        for (int kx = kx0; kx < kw && w0 + (int64_t)kx * p.dw < p.W; ++kx) visit(ky, kx);
    }
    const int64_t o = p.cl ? ((n * p.Ho + ho) * p.Wo + wo) * p.C + c : ((n * p.C + c) * p.Ho + ho) * p.Wo + wo;
    store_values<T, V>(y + o, best);
    store_saved<I, V>(saved + o, arg);
  }
}

// ---------------------------------------------------------------------------------
// 2×2 stride 2, every window complete. One work item = P outputs: P channels of one
// output pixel (channels_last) or P consecutive outputs of one row (NCHW).

template <typename T, int P, typename I, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) pool2x2_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                I* __restrict__ saved, PoolShape p, RadixWalk walk,
                                                                int64_t total) {
  constexpr bool code = sizeof(I) == 1;  // 1-byte window codes, else int64 flat indices
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= total) return;
  int64_t d[4];
  walk.start(t, d);
  for (; t < total; t += stride, walk.advance(d)) {
    float best[P];
    I arg[P];
    int64_t o;
    if constexpr (CL) {  // digits (channel group, wo, ho, n)
      const int64_t c = d[0] * P, wo = d[1], ho = d[2], n = d[3];
      const T* src = x + ((n * p.H + 2 * ho) * p.W + 2 * wo) * p.C + c;
      float v[4][P];  // the four taps in PyTorch's scan order: (0,0) (0,1) (1,0) (1,1)
      load_values<T, P>(src, v[0]);
      load_values<T, P>(src + p.C, v[1]);
      load_values<T, P>(src + p.W * p.C, v[2]);
      load_values<T, P>(src + p.W * p.C + p.C, v[3]);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        int q = 0;
        best[j] = v[0][j];
        if (better(v[1][j], best[j])) best[j] = v[1][j], q = 1;
        if (better(v[2][j], best[j])) best[j] = v[2][j], q = 2;
        if (better(v[3][j], best[j])) best[j] = v[3][j], q = 3;
        if constexpr (code) {
          arg[j] = (I)q;
        } else {
          arg[j] = (I)((2 * ho + (q >> 1)) * p.W + 2 * wo + (q & 1));
        }
      }
      o = ((n * p.Ho + ho) * p.Wo + wo) * p.C + c;
    } else {  // digits (group of P columns, ho, c, n)
      const int64_t wo = d[0] * P, ho = d[1], c = d[2], n = d[3];
      const T* row0 = x + ((n * p.C + c) * p.H + 2 * ho) * p.W + 2 * wo;
      float r0[2 * P], r1[2 * P];
      if constexpr (P == 1) {
        r0[0] = to_f<T>(row0[0]), r0[1] = to_f<T>(row0[1]);
        r1[0] = to_f<T>(row0[p.W]), r1[1] = to_f<T>(row0[p.W + 1]);
      } else {
        static_assert(2 * P == Vec<T>::N, "a run of P outputs reads one 16-byte vector per input row");
        load_values<T, 2 * P>(row0, r0);
        load_values<T, 2 * P>(row0 + p.W, r1);
      }
#pragma unroll
      for (int j = 0; j < P; ++j) {
        int q = 0;
        best[j] = r0[2 * j];
        if (better(r0[2 * j + 1], best[j])) best[j] = r0[2 * j + 1], q = 1;
        if (better(r1[2 * j], best[j])) best[j] = r1[2 * j], q = 2;
        if (better(r1[2 * j + 1], best[j])) best[j] = r1[2 * j + 1], q = 3;
        if constexpr (code) {
          arg[j] = (I)q;
        } else {
          arg[j] = (I)((2 * ho + (q >> 1)) * p.W + 2 * (wo + j) + (q & 1));
        }
      }
      o = ((n * p.C + c) * p.Ho + ho) * p.Wo + wo;
    }
    if constexpr (CL || P == 1) {
      store_values<T, P>(y + o, best);
    } else {  // P values = 8 bytes (aligned: Wo % P == 0)
      Vec<T> raw;
#pragma unroll
      for (int j = 0; j < P; ++j) raw.v[j] = from_f<T>(best[j]);
      *reinterpret_cast<uint2*>(y + o) = *reinterpret_cast<const uint2*>(&raw);
    }
    store_saved<I, P>(saved + o, arg);
  }
}

// Backward of the 2×2 stride-2 pool: each window writes its four inputs (the gradient
// at its argmax, 0 elsewhere). With odd H or W the last input row / column belongs to
// no window; the windows next to it write its zeros.
template <typename T, int P, typename I, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) pool2x2_bwd_kernel(const T* __restrict__ grad,
                                                                const I* __restrict__ saved, T* __restrict__ gx,
                                                                PoolShape p, RadixWalk walk, int64_t total) {
  constexpr bool code = sizeof(I) == 1;  // 1-byte window codes, else int64 flat indices
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= total) return;
  int64_t d[4];
  walk.start(t, d);
  const float zeros[2 * P] = {};
  for (; t < total; t += stride, walk.advance(d)) {
    int64_t n, c, ho, wo;
    if (CL) {
      c = d[0] * P, wo = d[1], ho = d[2], n = d[3];
    } else {
      wo = d[0] * P, ho = d[1], c = d[2], n = d[3];
    }
    const int64_t o = CL ? ((n * p.Ho + ho) * p.Wo + wo) * p.C + c : ((n * p.C + c) * p.Ho + ho) * p.Wo + wo;
    float g[P];
    I s[P];
    if constexpr (CL || P == 1) {
      load_values<T, P>(grad + o, g);
    } else {
      Vec<T> raw;
      *reinterpret_cast<uint2*>(&raw) = *reinterpret_cast<const uint2*>(grad + o);
#pragma unroll
      for (int j = 0; j < P; ++j) g[j] = to_f<T>(raw.v[j]);
    }
    load_saved<I, P>(saved + o, s);
    // Window position q (0..3) of the argmax; from int64 indices by comparison only.
    int q[P];
#pragma unroll
    for (int j = 0; j < P; ++j) {
      if constexpr (code) {
        q[j] = (int)s[j];
      } else {
        const int64_t top_left = 2 * ho * p.W + 2 * (CL ? wo : wo + j);
        const int64_t i = (int64_t)s[j];
        q[j] = i == top_left ? 0 : i == top_left + 1 ? 1 : i == top_left + p.W ? 2 : 3;
      }
    }
    const bool last_row = 2 * ho + 2 == p.H - 1, last_col = CL ? 2 * wo + 2 == p.W - 1 : false;
    if constexpr (CL) {
      T* dst = gx + ((n * p.H + 2 * ho) * p.W + 2 * wo) * p.C + c;
      float out[4][P];
#pragma unroll
      for (int k = 0; k < 4; ++k)
#pragma unroll
        for (int j = 0; j < P; ++j) out[k][j] = q[j] == k ? g[j] : 0.f;
      store_values<T, P>(dst, out[0]);
      store_values<T, P>(dst + p.C, out[1]);
      store_values<T, P>(dst + p.W * p.C, out[2]);
      store_values<T, P>(dst + p.W * p.C + p.C, out[3]);
      if (last_col) {
        store_values<T, P>(dst + 2 * p.C, zeros);
        store_values<T, P>(dst + p.W * p.C + 2 * p.C, zeros);
      }
      if (last_row) {
        store_values<T, P>(dst + 2 * p.W * p.C, zeros);
        store_values<T, P>(dst + 2 * p.W * p.C + p.C, zeros);
        if (last_col) store_values<T, P>(dst + 2 * p.W * p.C + 2 * p.C, zeros);
      }
    } else {
      T* row0 = gx + ((n * p.C + c) * p.H + 2 * ho) * p.W + 2 * wo;
      float r0[2 * P], r1[2 * P];
#pragma unroll
      for (int j = 0; j < P; ++j) {
        r0[2 * j] = q[j] == 0 ? g[j] : 0.f;
        r0[2 * j + 1] = q[j] == 1 ? g[j] : 0.f;
        r1[2 * j] = q[j] == 2 ? g[j] : 0.f;
        r1[2 * j + 1] = q[j] == 3 ? g[j] : 0.f;
      }
      if constexpr (P == 1) {
        row0[0] = from_f<T>(r0[0]), row0[1] = from_f<T>(r0[1]);
        row0[p.W] = from_f<T>(r1[0]), row0[p.W + 1] = from_f<T>(r1[1]);
        if (2 * wo + 2 == p.W - 1) {  // odd W: the last column
          row0[2] = from_f<T>(0.f), row0[p.W + 2] = from_f<T>(0.f);
          if (last_row) row0[2 * p.W + 2] = from_f<T>(0.f);
        }
        if (last_row) row0[2 * p.W] = from_f<T>(0.f), row0[2 * p.W + 1] = from_f<T>(0.f);
      } else {  // W % (2P) == 0: no odd column
        store_values<T, 2 * P>(row0, r0);
        store_values<T, 2 * P>(row0 + p.W, r1);
        if (last_row) store_values<T, 2 * P>(row0 + 2 * p.W, zeros);
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// General backward: one input element per thread gathers, in increasing (ho, wo)
// order, the gradients of the outputs whose window covers it and whose saved argmax
// names it.

struct GatherDivisors {
  FastDivmod sh, sw, dh, dw;
};

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    max_pool_bwd_kernel(const T* __restrict__ grad, const I* __restrict__ saved, T* __restrict__ gx, PoolShape p,
                        RadixWalk walk, GatherDivisors div, int64_t total) {
  constexpr bool code = sizeof(I) == 1;  // 1-byte window codes, else int64 flat indices
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= total) return;
  int64_t d[4];
  walk.start(t, d);
  const int span_h = (p.kh - 1) * p.dh, span_w = (p.kw - 1) * p.dw;
  for (; t < total; t += stride, walk.advance(d)) {
    int64_t n, c, h, w;
    if (p.cl) {
      c = d[0], w = d[1], h = d[2], n = d[3];
    } else {
      w = d[0], h = d[1], c = d[2], n = d[3];
    }
    // Outputs o with o*s - pad <= h <= o*s - pad + span (h + pad < 2^31: checked on the host).
    const uint32_t hp = (uint32_t)(h + p.ph), wp = (uint32_t)(w + p.pw);
    const int64_t ho0 = hp < (uint32_t)span_h ? 0 : div.sh.div(hp - span_h + p.sh - 1);
    const int64_t ho1 = min((int64_t)div.sh.div(hp), p.Ho - 1);
    const int64_t wo0 = wp < (uint32_t)span_w ? 0 : div.sw.div(wp - span_w + p.sw - 1);
    const int64_t wo1 = min((int64_t)div.sw.div(wp), p.Wo - 1);
    const int64_t me = h * p.W + w;
    float acc = 0.f;
    for (int64_t ho = ho0; ho <= ho1; ++ho) {
      // (h, w)'s tap in window (ho, wo), when on the dilated grid: h - (ho*sh - ph) = ky*dh.
      const uint32_t dy = (uint32_t)(hp - ho * p.sh);
      const uint32_t ky = div.dh.div(dy);
      const bool on_grid_h = ky * p.dh == dy;
      for (int64_t wo = wo0; wo <= wo1; ++wo) {
        const int64_t o = p.cl ? ((n * p.Ho + ho) * p.Wo + wo) * p.C + c : ((n * p.C + c) * p.Ho + ho) * p.Wo + wo;
        bool mine;
        if constexpr (code) {
          const uint32_t dx = (uint32_t)(wp - wo * p.sw);
          const uint32_t kx = div.dw.div(dx);
          mine = on_grid_h && kx * p.dw == dx && (int64_t)saved[o] == (int64_t)(ky * p.kw + kx);
        } else {
          mine = (int64_t)saved[o] == me;
        }
        if (mine) acc += to_f<T>(grad[o]);
      }
    }
    gx[t] = from_f<T>(acc);
  }
}

// ---------------------------------------------------------------------------------
// Launchers.

bool is_2x2_stride_2(const PoolShape& p) {
  return p.kh == 2 && p.kw == 2 && p.sh == 2 && p.sw == 2 && p.ph == 0 && p.pw == 0 && p.dh == 1 && p.dw == 1 &&
         p.Ho == p.H / 2 && p.Wo == p.W / 2;  // every window complete (ceil_mode adds none)
}

// The 2×2 fast path's work items: P outputs each, as digits (P-group, wo|ho, ho|c, n).
template <int P>
RadixWalk pool2x2_walk(const PoolShape& p, int64_t& items, int64_t& stride, unsigned& blocks) {
  const int64_t r0 = p.cl ? p.C / P : p.Wo / P, r1 = p.cl ? p.Wo : p.Ho, r2 = p.cl ? p.Ho : p.C;
  items = r0 * r1 * r2 * p.N;
  blocks = grid_for(items, kThreads);
  stride = (int64_t)blocks * kThreads;
  return RadixWalk(r0, r1, r2, stride);
}

template <typename T, typename I, int P, bool CL>
void launch_2x2_fwd(const T* x, T* y, I* saved, const PoolShape& p, cudaStream_t stream) {
  int64_t items, stride;
  unsigned blocks;
  const RadixWalk walk = pool2x2_walk<P>(p, items, stride, blocks);
  pool2x2_fwd_kernel<T, P, I, CL><<<blocks, kThreads, 0, stream>>>(x, y, saved, p, walk, items);
}

template <typename T, typename I, int P, bool CL>
void launch_2x2_bwd(const T* grad, const I* saved, T* gx, const PoolShape& p, cudaStream_t stream) {
  int64_t items, stride;
  unsigned blocks;
  const RadixWalk walk = pool2x2_walk<P>(p, items, stride, blocks);
  pool2x2_bwd_kernel<T, P, I, CL><<<blocks, kThreads, 0, stream>>>(grad, saved, gx, p, walk, items);
}

// Which 2×2 kernel: channels_last with 16-byte channel groups, NCHW with 16-byte row
// segments, or one output per thread.
enum Pool2x2Path { kScalarCl, kVecCl, kScalarNchw, kVecNchw };
template <typename T>
Pool2x2Path pool2x2_path(const PoolShape& p, bool aligned) {
  constexpr int V = Vec<T>::N;
  if (p.cl) return aligned && p.C % V == 0 ? kVecCl : kScalarCl;
  return aligned && p.W % V == 0 ? kVecNchw : kScalarNchw;
}

template <typename T, typename I>
void fwd_typed(const T* x, T* y, I* saved, const PoolShape& p, bool vec, cudaStream_t stream) {
  constexpr int V = Vec<T>::N;
  if (is_2x2_stride_2(p)) {
    switch (pool2x2_path<T>(p, vec)) {
      case kVecCl: return launch_2x2_fwd<T, I, V, true>(x, y, saved, p, stream);
      case kScalarCl: return launch_2x2_fwd<T, I, 1, true>(x, y, saved, p, stream);
      case kVecNchw: return launch_2x2_fwd<T, I, V / 2, false>(x, y, saved, p, stream);
      case kScalarNchw: return launch_2x2_fwd<T, I, 1, false>(x, y, saved, p, stream);
    }
  }
  const bool use_vec = vec && p.cl && p.C % V == 0;
  const int64_t r0 = p.cl ? p.C / (use_vec ? V : 1) : p.Wo, r1 = p.cl ? p.Wo : p.Ho, r2 = p.cl ? p.Ho : p.C;
  const int64_t items = r0 * r1 * r2 * p.N;
  const unsigned blocks = grid_for(items, kThreads);
  const RadixWalk walk(r0, r1, r2, (int64_t)blocks * kThreads);
  const bool three = p.kh == 3 && p.kw == 3;
  if (use_vec) {
    if (three) {
      max_pool_fwd_kernel<T, V, I, 3><<<blocks, kThreads, 0, stream>>>(x, y, saved, p, walk, items);
    } else {
      max_pool_fwd_kernel<T, V, I, 0><<<blocks, kThreads, 0, stream>>>(x, y, saved, p, walk, items);
    }
  } else if (three) {
    max_pool_fwd_kernel<T, 1, I, 3><<<blocks, kThreads, 0, stream>>>(x, y, saved, p, walk, items);
  } else {
    max_pool_fwd_kernel<T, 1, I, 0><<<blocks, kThreads, 0, stream>>>(x, y, saved, p, walk, items);
  }
}

template <typename T, typename I>
void bwd_typed(const T* grad, const I* saved, T* gx, const PoolShape& p, bool vec, cudaStream_t stream) {
  constexpr int V = Vec<T>::N;
  if (is_2x2_stride_2(p)) {
    switch (pool2x2_path<T>(p, vec)) {
      case kVecCl: return launch_2x2_bwd<T, I, V, true>(grad, saved, gx, p, stream);
      case kScalarCl: return launch_2x2_bwd<T, I, 1, true>(grad, saved, gx, p, stream);
      case kVecNchw: return launch_2x2_bwd<T, I, V / 2, false>(grad, saved, gx, p, stream);
      case kScalarNchw: return launch_2x2_bwd<T, I, 1, false>(grad, saved, gx, p, stream);
    }
  }
  const int64_t r0 = p.cl ? p.C : p.W, r1 = p.cl ? p.W : p.H, r2 = p.cl ? p.H : p.C;
  const int64_t items = r0 * r1 * r2 * p.N;
  const unsigned blocks = grid_for(items, kThreads);
  const RadixWalk walk(r0, r1, r2, (int64_t)blocks * kThreads);
  const GatherDivisors div{FastDivmod((uint32_t)p.sh), FastDivmod((uint32_t)p.sw), FastDivmod((uint32_t)p.dh),
                           FastDivmod((uint32_t)p.dw)};
  max_pool_bwd_kernel<T, I><<<blocks, kThreads, 0, stream>>>(grad, saved, gx, p, walk, div, items);
}

template <typename T>
cudaError_t fwd(const void* x, void* y, void* saved, bool code, PoolShape p, bool vec, cudaStream_t stream) {
  if (p.N * p.C * p.Ho * p.Wo == 0) return cudaSuccess;
  auto xs = static_cast<const T*>(x);
  auto ys = static_cast<T*>(y);
  if (code) {
    fwd_typed<T, int8_t>(xs, ys, static_cast<int8_t*>(saved), p, vec, stream);
  } else {
    fwd_typed<T, int64_t>(xs, ys, static_cast<int64_t*>(saved), p, vec, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const void* grad, const void* saved, bool code, void* gx, PoolShape p, bool vec, cudaStream_t stream) {
  if (p.N * p.C * p.H * p.W == 0) return cudaSuccess;
  // FastDivmod takes numerators below 2^31 (h + pad + stride at most).
  if (p.H + p.ph + p.sh >= ((int64_t)1 << 31) || p.W + p.pw + p.sw >= ((int64_t)1 << 31)) return cudaErrorInvalidValue;
  auto gs = static_cast<const T*>(grad);
  auto gxs = static_cast<T*>(gx);
  if (code) {
    bwd_typed<T, int8_t>(gs, static_cast<const int8_t*>(saved), gxs, p, vec, stream);
  } else {
    bwd_typed<T, int64_t>(gs, static_cast<const int64_t*>(saved), gxs, p, vec, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_max_pool2d_fwd(int dtype, const void* x, void* y, void* saved, bool code, PoolShape p, bool vec,
                                  cudaStream_t stream) {
  return GK_DISPATCH(dtype, fwd, x, y, saved, code, p, vec, stream);
}

cudaError_t launch_max_pool2d_bwd(int dtype, const void* grad, const void* saved, bool code, void* gx, PoolShape p,
                                  bool vec, cudaStream_t stream) {
  return GK_DISPATCH(dtype, bwd, grad, saved, code, gx, p, vec, stream);
}

}  // namespace gk
