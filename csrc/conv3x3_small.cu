// Direct 3×3 convolution (padding 1) for small channel counts (Ci <= 4 or Co <= 4: a
// discriminator's RGB input layer, a generator's RGB output layer), where the GEMM
// formulation wastes most of the tensor core and cuDNN is far off the memory floor.
// The fp16 / bf16 forward with Ci <= 4 and Co > 4 runs on tensor cores instead
// (csrc/conv3x3_rgb_mma.cu; the routing is in launch_conv3x3_small_fwd).
//
// Forward: a block owns a 32×32 pixel tile of one image and COB output channels; each
// thread computes a 2×2 quad of pixels for all COB channels (every weight read from
// shared memory feeds 4 FMAs). The input tile with its 1-pixel halo is staged in shared
// memory CIB channels at a time; bias, activation, gain, clamp (and the 2×2 max-pool
// with its argmax) are applied in registers before the single store.
//
// Backward: gp = dL/d(pre-activation) is either recomputed inside the weight-gradient
// kernel (Ci <= 4: the whole input tile fits) or produced by the gp kernel (the forward
// kernel in "gp" mode). The weight gradient is a per-block partial sum over the block's
// pixels reduced across the block with warp shuffles, then over blocks by a second
// kernel, both in a fixed order: deterministic, no float atomics. The input gradient is
// the forward kernel run on gp with the flipped, transposed kernel (done by the caller).
#include "common.cuh"

namespace gk {
namespace {

// ---------------------------------------------------------------------------------
// Forward / gp kernel.

constexpr int kQ = 16;             // quads per tile edge: the tile is 32×32 pixels
constexpr int kThreads = kQ * kQ;  // one thread per quad
constexpr int kCIB = 4;            // input channels staged per step
constexpr int kXT = 2 * kQ + 2;    // staged tile edge with halo
constexpr int kXS = kXT + 1;       // its row stride in shared memory (odd: fewer bank conflicts)

enum Mode : int { kFwd = 0, kFwdPool = 1, kGp = 2, kGpPool = 3 };

template <typename T>
struct ConvParams {
  const T* x;
  const T* w;
  const T* b;
  const T* grad;          // kGp*: incoming gradient (full res, or pooled for kGpPool)
  const int8_t* argmax;   // kGpPool: the forward's argmax
  T* out;                 // kFwd: y; kFwdPool: pooled y; kGp*: gp
  int8_t* argmax_out;     // kFwdPool
  int64_t N, Ci, H, W, Co;
  int64_t xs0, xs1, xs2, xs3;
  int64_t tiles_w, tiles_h;
  bool cl;
  bool vec;  // channels_last output with 16-byte aligned COB-channel groups
  Epilogue e;
};

// Offset of (n, c, h, w) in a dense [N, C, Hd, Wd] tensor of layout cl.
__device__ __forceinline__ int64_t dense_off(bool cl, int64_t n, int64_t c, int64_t h, int64_t w, int64_t C, int64_t Hd,
                                             int64_t Wd) {
  return cl ? ((n * Hd + h) * Wd + w) * C + c : ((n * C + c) * Hd + h) * Wd + w;
}

// Store COB channel values of one pixel (nvalid of them are real) at `dst` (channel
// co0's element); channel stride cs. 16-byte stores when `vec` and the group is full.
template <typename T, int COB>
__device__ __forceinline__ void store_channels(T* dst, const float* v, int nvalid, int64_t cs, bool vec) {
  constexpr int V = Vec<T>::N;
  if constexpr ((COB * sizeof(T)) % 16 == 0) {
    if (vec && nvalid == COB) {
#pragma unroll
      for (int g = 0; g < COB / V; ++g) {
        Vec<T> pk;
#pragma unroll
        for (int j = 0; j < V; ++j) pk.v[j] = from_f<T>(v[g * V + j]);
        store_vec(dst + g * V, pk);
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < COB; ++j)
    if (j < nvalid) dst[j * cs] = from_f<T>(v[j]);
}

template <typename T, int COB, int MODE>
__global__ void __launch_bounds__(kThreads) conv_small_kernel(ConvParams<T> p) {
  __shared__ float xs[kCIB][kXT][kXS];
  __shared__ __align__(16) float ws[kCIB][9][COB];

  const int tid = threadIdx.x;
  const int tx = tid % kQ, ty = tid / kQ;
  int64_t tile = blockIdx.x;
  const int64_t tw = tile % p.tiles_w;
  tile /= p.tiles_w;
  const int64_t th = tile % p.tiles_h;
  const int64_t n = tile / p.tiles_h;
  const int64_t h0 = th * 2 * kQ, w0 = tw * 2 * kQ;
  const int64_t co0 = (int64_t)blockIdx.y * COB;
  const int nco = (int)min((int64_t)COB, p.Co - co0);

  float acc[4][COB];
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int j = 0; j < COB; ++j) acc[q][j] = 0.f;

  for (int64_t ci0 = 0; ci0 < p.Ci; ci0 += kCIB) {
    __syncthreads();  // the previous step's reads are done
    for (int e = tid; e < kCIB * kXT * kXT; e += kThreads) {
      int c, r, col;
      if (p.cl) {  // channel fastest: consecutive threads read consecutive addresses
        c = e % kCIB;
        const int rest = e / kCIB;
        col = rest % kXT;
        r = rest / kXT;
      } else {
        col = e % kXT;
        const int rest = e / kXT;
        r = rest % kXT;
        c = rest / kXT;
      }
      const int64_t ci = ci0 + c, ih = h0 - 1 + r, iw = w0 - 1 + col;
      float v = 0.f;
      if (ci < p.Ci && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W)
        v = to_f<T>(p.x[n * p.xs0 + ci * p.xs1 + ih * p.xs2 + iw * p.xs3]);
      xs[c][r][col] = v;
    }
    for (int e = tid; e < kCIB * 9 * COB; e += kThreads) {
      const int j = e % COB, k = (e / COB) % 9, c = e / (9 * COB);
      const int64_t ci = ci0 + c, co = co0 + j;
      ws[c][k][j] = (ci < p.Ci && co < p.Co) ? to_f<T>(p.w[(co * p.Ci + ci) * 9 + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kCIB; ++c) {
      if (ci0 + c >= p.Ci) break;  // uniform across the block
      float xv[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int k = 0; k < 4; ++k) xv[i][k] = xs[c][2 * ty + i][2 * tx + k];
#pragma unroll
      for (int k = 0; k < 9; ++k) {
        const int kh = k / 3, kw = k % 3;
#pragma unroll
        for (int j = 0; j < COB; ++j) {
          const float wv = ws[c][k][j];
          acc[0][j] = fmaf(wv, xv[kh][kw], acc[0][j]);
          acc[1][j] = fmaf(wv, xv[kh][kw + 1], acc[1][j]);
          acc[2][j] = fmaf(wv, xv[kh + 1][kw], acc[2][j]);
          acc[3][j] = fmaf(wv, xv[kh + 1][kw + 1], acc[3][j]);
        }
      }
    }
  }

  float bias[COB];
#pragma unroll
  for (int j = 0; j < COB; ++j) bias[j] = (p.b != nullptr && j < nco) ? to_f<T>(p.b[co0 + j]) : 0.f;

  const int64_t qh = h0 / 2 + ty, qw = w0 / 2 + tx;  // this thread's quad
  if (MODE == kFwdPool) {
    const int64_t Ho = p.H / 2, Wo = p.W / 2;
    if (qh >= Ho || qw >= Wo) return;
    float best[COB];
    int8_t arg[COB];
#pragma unroll
    for (int j = 0; j < COB; ++j) {
      // Pool the values as PyTorch would see them: rounded to T, first maximum wins,
      // a NaN replaces anything (the last NaN wins).
      best[j] = round_to<T>(epilogue(acc[0][j] + bias[j], p.e));
      arg[j] = 0;
#pragma unroll
      for (int q = 1; q < 4; ++q) {
        const float y = round_to<T>(epilogue(acc[q][j] + bias[j], p.e));
        if (y > best[j] || isnan(y)) {
          best[j] = y;
          arg[j] = (int8_t)q;
        }
      }
    }
    const int64_t o = dense_off(p.cl, n, co0, qh, qw, p.Co, Ho, Wo);
    const int64_t cs = p.cl ? 1 : Ho * Wo;
    store_channels<T, COB>(p.out + o, best, nco, cs, p.vec);
#pragma unroll
    for (int j = 0; j < COB; ++j)
      if (j < nco) p.argmax_out[o + j * cs] = arg[j];
    return;
  }

  const int64_t Hp = p.H / 2, Wp = p.W / 2;  // pooled size (kGpPool)
  const bool has_pooled = MODE == kGpPool && qh < Hp && qw < Wp;
  const int64_t cs = p.cl ? 1 : p.H * p.W;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t h = 2 * qh + q / 2, w = 2 * qw + q % 2;
    if (h >= p.H || w >= p.W) continue;
    float v[COB];
#pragma unroll
    for (int j = 0; j < COB; ++j) {
      const float pre = acc[q][j] + bias[j];
      if (MODE == kFwd) {
        v[j] = epilogue(pre, p.e);
      } else {
        float g = 0.f;
        if (j < nco) {
          if (MODE == kGp) {
            g = to_f<T>(p.grad[dense_off(p.cl, n, co0 + j, h, w, p.Co, p.H, p.W)]);
          } else if (has_pooled) {
            const int64_t po = dense_off(p.cl, n, co0 + j, qh, qw, p.Co, Hp, Wp);
            if (p.argmax[po] == q) g = to_f<T>(p.grad[po]);
          }
        }
        v[j] = g * epilogue_derivative(pre, p.e);
      }
    }
    store_channels<T, COB>(p.out + dense_off(p.cl, n, co0, h, w, p.Co, p.H, p.W), v, nco, cs, p.vec);
  }
}

template <typename T>
ConvParams<T> make_params(const void* x, const void* w, const void* b, ConvShape s, Epilogue e, bool out_aligned) {
  ConvParams<T> p{};
  p.x = static_cast<const T*>(x);
  p.w = static_cast<const T*>(w);
  p.b = static_cast<const T*>(b);
  p.N = s.N;
  p.Ci = s.Ci;
  p.H = s.H;
  p.W = s.W;
  p.Co = s.Co;
  p.xs0 = s.xs[0];
  p.xs1 = s.xs[1];
  p.xs2 = s.xs[2];
  p.xs3 = s.xs[3];
  p.cl = s.cl;
  p.vec = out_aligned;
  p.e = e;
  return p;
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

template <typename T, int COB, int MODE>
cudaError_t launch_conv_on(const ConvParams<T>& base, cudaStream_t stream) {
  ConvParams<T> p = base;
  p.tiles_w = (p.W + 2 * kQ - 1) / (2 * kQ);
  p.tiles_h = (p.H + 2 * kQ - 1) / (2 * kQ);
  const int64_t blocks = p.N * p.tiles_w * p.tiles_h;
  const int64_t chunks = (p.Co + COB - 1) / COB;
  if (blocks == 0 || chunks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL || chunks > 65535) return cudaErrorInvalidConfiguration;
  p.vec = p.vec && p.cl && (p.Co * (int64_t)sizeof(T)) % 16 == 0 && (COB * sizeof(T)) % 16 == 0;
  conv_small_kernel<T, COB, MODE><<<dim3((unsigned)blocks, (unsigned)chunks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd(const void* x, const void* w, const void* b, void* out, int8_t* argmax, ConvShape s, Epilogue e,
                bool pool, cudaStream_t stream) {
  ConvParams<T> p = make_params<T>(x, w, b, s, e, aligned16(out));
  p.out = static_cast<T*>(out);
  p.argmax_out = argmax;
  // Few output channels: 4 per block (no wasted lanes); otherwise 16 (more reuse of
  // each staged input value).
  if (s.Co <= 4) {
    return pool ? launch_conv_on<T, 4, kFwdPool>(p, stream) : launch_conv_on<T, 4, kFwd>(p, stream);
  }
  return pool ? launch_conv_on<T, 16, kFwdPool>(p, stream) : launch_conv_on<T, 16, kFwd>(p, stream);
}

template <typename T>
cudaError_t gp(const void* x, const void* w, const void* b, const void* grad, const int8_t* argmax, void* gpo,
               ConvShape s, Epilogue e, bool pool, cudaStream_t stream) {
  ConvParams<T> p = make_params<T>(x, w, b, s, e, aligned16(gpo));
  p.out = static_cast<T*>(gpo);
  p.grad = static_cast<const T*>(grad);
  p.argmax = argmax;
  return pool ? launch_conv_on<T, 4, kGpPool>(p, stream) : launch_conv_on<T, 4, kGp>(p, stream);
}

// ---------------------------------------------------------------------------------
// Weight gradient.

constexpr int kWTH = 8, kWTW = 32, kWPX = kWTH * kWTW;  // pixel tile: 8 rows × 32 columns
constexpr int kWCOB = 16, kWCIC = 4;                    // output / input channels per block
constexpr int kWXS = 368;  // per-channel stride of the staged input (>= 10 * 34, = 16 mod 32)
constexpr int kPStride = kWCOB * kWCIC * 9 + kWCOB;     // partials per block: gw taps, then gb
constexpr int kWThreads = 256;                          // 4 co groups × 4 ci × 16 pixel lanes
static_assert((kWTH + 2) * (kWTW + 2) <= kWXS, "staged tile too big");

template <typename T>
struct WgradParams {
  const T* x;
  const T* w;
  const T* b;
  const T* grad;
  const int8_t* argmax;
  const T* gp_in;
  T* gp_out;
  const T* y;  // fused: the forward's output (pooled when pool); the derivative is read off it
  float* partial;
  int64_t N, Ci, H, W, Co;
  int64_t xs0, xs1, xs2, xs3;
  int64_t bands;  // ceil(H / kWTH)
  bool cl;
  Epilogue e;
};

// Block (n, row band) × co chunk (blockIdx.y) × ci chunk (blockIdx.z). Walks the band's
// column tiles; thread (co group, ci, lane) accumulates 4 co × (9 taps + bias) over the
// pixels lane, lane + 16, ...; the 16 lanes are then summed with shuffles in a fixed
// order and written as this block's partials.
template <typename T, bool FUSED, bool POOL>
__global__ void __launch_bounds__(kWThreads) wgrad_kernel(WgradParams<T> p) {
  __shared__ float xs[kWCIC * kWXS];
  __shared__ float gs[kWCOB][kWPX];
  __shared__ float wsm[kWCOB][kWCIC * 9];
  __shared__ float bsm[kWCOB];

  const int tid = threadIdx.x;
  const int lane = tid & 15, cil = (tid >> 4) & 3, cog = tid >> 6;
  const int64_t n = blockIdx.x / p.bands;
  const int64_t h0 = (blockIdx.x % p.bands) * kWTH;
  const int64_t co0 = (int64_t)blockIdx.y * kWCOB;
  const int64_t ci0 = (int64_t)blockIdx.z * kWCIC;

  if (FUSED) {  // the whole (<= 4 channel) kernel for this co chunk, for the recompute
    for (int e = tid; e < kWCOB * kWCIC * 9; e += kWThreads) {
      const int j = e / (kWCIC * 9), ck = e % (kWCIC * 9), c = ck / 9, k = ck % 9;
      const int64_t co = co0 + j, ci = ci0 + c;
      wsm[j][ck] = (co < p.Co && ci < p.Ci) ? to_f<T>(p.w[(co * p.Ci + ci) * 9 + k]) : 0.f;
    }
    if (tid < kWCOB) bsm[tid] = (p.b != nullptr && co0 + tid < p.Co) ? to_f<T>(p.b[co0 + tid]) : 0.f;
  }

  float acc[4][10];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int k = 0; k < 10; ++k) acc[j][k] = 0.f;

  const int64_t Hp = p.H / 2, Wp = p.W / 2;
  // The fused kernels take the epilogue's derivative from y where it is exact (no conv
  // recomputed), else from the recomputed pre-activation.
  const bool from_y = FUSED && p.y != nullptr && derivative_from_output(p.e);
  const float clamp_y = round_to<T>(p.e.clamp);
  for (int64_t w0 = 0; w0 < p.W; w0 += kWTW) {
    __syncthreads();  // previous tile fully consumed (and wsm/bsm written)
    constexpr int XT_H = kWTH + 2, XT_W = kWTW + 2;
    for (int e = tid; e < kWCIC * XT_H * XT_W; e += kWThreads) {
      int c, r, col;
      if (p.cl) {
        c = e % kWCIC;
        const int rest = e / kWCIC;
        col = rest % XT_W;
        r = rest / XT_W;
      } else {
        col = e % XT_W;
        const int rest = e / XT_W;
        r = rest % XT_H;
        c = rest / XT_H;
      }
      const int64_t ci = ci0 + c, ih = h0 - 1 + r, iw = w0 - 1 + col;
      float v = 0.f;
      if (ci < p.Ci && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W)
        v = to_f<T>(p.x[n * p.xs0 + ci * p.xs1 + ih * p.xs2 + iw * p.xs3]);
      xs[c * kWXS + r * XT_W + col] = v;
    }
    if (!FUSED) {
      for (int e = tid; e < kWCOB * kWPX; e += kWThreads) {
        int j, px;
        if (p.cl) {
          j = e % kWCOB;
          px = e / kWCOB;
        } else {
          px = e % kWPX;
          j = e / kWPX;
        }
        const int64_t h = h0 + px / kWTW, w = w0 + px % kWTW, co = co0 + j;
        gs[j][px] = (co < p.Co && h < p.H && w < p.W) ? to_f<T>(p.gp_in[dense_off(p.cl, n, co, h, w, p.Co, p.H, p.W)])
                                                       : 0.f;
      }
    }
    __syncthreads();
    if (FUSED && !POOL) {
      // Recompute the pre-activation of pixel `tid` for the chunk's channels and turn
      // the incoming gradient into gp (kept in float32 for the weight gradient, stored
      // in T for the input gradient).
      const int r = tid / kWTW, cc = tid % kWTW;
      const int64_t h = h0 + r, w = w0 + cc;
      const bool inside = h < p.H && w < p.W;
      float xv[kWCIC][9];
#pragma unroll
      for (int c = 0; c < kWCIC; ++c)
#pragma unroll
        for (int k = 0; k < 9; ++k) xv[c][k] = xs[c * kWXS + (r + k / 3) * XT_W + cc + k % 3];
#pragma unroll 4
      for (int j = 0; j < kWCOB; ++j) {
        const int64_t co = co0 + j;
        float g = 0.f;
        if (inside && co < p.Co) {
          const int64_t o = dense_off(p.cl, n, co, h, w, p.Co, p.H, p.W);
          float d;
          if (from_y) {
            d = epilogue_derivative_from_output(to_f<T>(p.y[o]), p.e, clamp_y);
          } else {
            float pre = bsm[j];
#pragma unroll
            for (int c = 0; c < kWCIC; ++c) {
              if (c >= p.Ci) break;  // uniform: skip the zero padding channels
#pragma unroll
              for (int k = 0; k < 9; ++k) pre = fmaf(wsm[j][c * 9 + k], xv[c][k], pre);
            }
            d = epilogue_derivative(pre, p.e);
          }
          g = to_f<T>(p.grad[o]) * d;
          if (p.gp_out != nullptr) p.gp_out[o] = from_f<T>(g);
        }
        gs[j][tid] = g;
      }
      __syncthreads();
    }
    if (FUSED && POOL) {
      // Only the argmax pixel of each 2x2 window gets a gradient: thread = (quad of the
      // tile, group of 4 channels); recompute the pre-activation there alone. Pixels of
      // a window without a pooled output (odd H/W edge) get 0.
      constexpr int QW = kWTW / 2;  // quads per tile row
      const int quad = tid >> 2, jg = tid & 3;
      const int qr = quad / QW, qc = quad % QW;
      const int64_t hq = h0 / 2 + qr, wq = w0 / 2 + qc;  // h0, w0 are even
      const bool exists = hq < Hp && wq < Wp;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int j = jg * 4 + jj;
        const int64_t co = co0 + j;
        float g = 0.f;  // the gradient at the argmax pixel `am` of this window
        int am = 0;
        if (exists && co < p.Co) {
          const int64_t po = dense_off(p.cl, n, co, hq, wq, p.Co, Hp, Wp);
          am = p.argmax[po] & 3;
          float d;
          if (from_y) {  // the pooled output is y at the argmax pixel
            d = epilogue_derivative_from_output(to_f<T>(p.y[po]), p.e, clamp_y);
          } else {
            const int r = 2 * qr + (am >> 1), cc = 2 * qc + (am & 1);
            float pre = bsm[j];
#pragma unroll
            for (int c = 0; c < kWCIC; ++c) {
              if (c >= p.Ci) break;
#pragma unroll
              for (int k = 0; k < 9; ++k)
                pre = fmaf(wsm[j][c * 9 + k], xs[c * kWXS + (r + k / 3) * XT_W + cc + k % 3], pre);
            }
            d = epilogue_derivative(pre, p.e);
          }
          g = to_f<T>(p.grad[po]) * d;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int r = 2 * qr + (q >> 1), cc = 2 * qc + (q & 1);
          const float gv = q == am ? g : 0.f;  // no dynamic register indexing
          gs[j][r * kWTW + cc] = gv;
          const int64_t h = h0 + r, w = w0 + cc;
          if (p.gp_out != nullptr && co < p.Co && h < p.H && w < p.W)
            p.gp_out[dense_off(p.cl, n, co, h, w, p.Co, p.H, p.W)] = from_f<T>(gv);
        }
      }
      __syncthreads();
    }
    // Accumulate this tile.
    const float* xc = xs + cil * kWXS;
    for (int px = lane; px < kWPX; px += 16) {
      const int r = px / kWTW, cc = px % kWTW;
      float g[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) g[j] = gs[cog * 4 + j][px];
#pragma unroll
      for (int k = 0; k < 9; ++k) {
        const float xk = xc[(r + k / 3) * XT_W + cc + k % 3];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j][k] = fmaf(g[j], xk, acc[j][k]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j][9] += g[j];
    }
  }

  // Sum the 16 lanes (they are 16 consecutive threads of one warp) in a fixed order.
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int k = 0; k < 10; ++k) {
      float v = acc[j][k];
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[j][k] = v;
    }
  if (lane == 0) {
    const int64_t g = (int64_t)blockIdx.y * gridDim.z + blockIdx.z;
    float* out = p.partial + (g * gridDim.x + blockIdx.x) * kPStride;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = cog * 4 + j;
#pragma unroll
      for (int k = 0; k < 9; ++k) out[col * (kWCIC * 9) + cil * 9 + k] = acc[j][k];
      if (cil == 0) out[kWCOB * kWCIC * 9 + col] = acc[j][9];
    }
  }
}

// partial [chunks][nblk][kPStride] -> gw [Co, Ci, 9], gb [Co]. Block: one chunk (x) and
// 32 partial slots (y); 8 lanes stride over the blocks, then lane 0 sums the 8 in order.
__global__ void __launch_bounds__(256) wgrad_reduce_kernel(const float* __restrict__ partial, int64_t nblk,
                                                           int64_t nci_chunks, int64_t Co, int64_t Ci,
                                                           float* __restrict__ gw, float* __restrict__ gb) {
  __shared__ float red[8][33];
  const int ol = threadIdx.x & 31, bl = threadIdx.x >> 5;
  const int64_t g = blockIdx.x;
  const int o = blockIdx.y * 32 + ol;
  float s = 0.f;
  if (o < kPStride) {
    const float* src = partial + g * nblk * kPStride + o;
    for (int64_t blk = bl; blk < nblk; blk += 8) s += src[blk * kPStride];
  }
  red[bl][ol] = s;
  __syncthreads();
  if (bl != 0 || o >= kPStride) return;
  float t = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) t += red[i][ol];
  const int64_t cochunk = g / nci_chunks, cichunk = g % nci_chunks;
  if (o < kWCOB * kWCIC * 9) {
    const int64_t co = cochunk * kWCOB + o / (kWCIC * 9);
    const int64_t ci = cichunk * kWCIC + (o % (kWCIC * 9)) / 9;
    if (co < Co && ci < Ci) gw[(co * Ci + ci) * 9 + o % 9] = t;
  } else {
    const int64_t co = cochunk * kWCOB + (o - kWCOB * kWCIC * 9);
    if (gb != nullptr && cichunk == 0 && co < Co) gb[co] = t;
  }
}

void wgrad_grid(const ConvShape& s, bool fused, int64_t& bands, int64_t& nco, int64_t& nci) {
  bands = (s.H + kWTH - 1) / kWTH;
  nco = (s.Co + kWCOB - 1) / kWCOB;
  nci = fused ? 1 : (s.Ci + kWCIC - 1) / kWCIC;
}

template <typename T>
cudaError_t wgrad(bool fused, const void* x, const void* w, const void* b, const void* grad, const int8_t* argmax,
                  const void* gp_in, void* gp_out, const void* y, float* partial, float* gw, float* gb, ConvShape s, Epilogue e,
                  bool pool, cudaStream_t stream) {
  if (fused && s.Ci > kWCIC) return cudaErrorInvalidValue;
  int64_t bands, nco, nci;
  wgrad_grid(s, fused, bands, nco, nci);
  const int64_t nblk = s.N * bands;
  if (nco == 0 || nci == 0) return cudaSuccess;  // Co == 0 or Ci == 0: gw and gb are empty
  if (nblk > 0x7fffffffLL || nco > 65535 || nci > 65535) return cudaErrorInvalidConfiguration;
  WgradParams<T> p{};
  p.x = static_cast<const T*>(x);
  p.w = static_cast<const T*>(w);
  p.b = static_cast<const T*>(b);
  p.grad = static_cast<const T*>(grad);
  p.argmax = argmax;
  p.gp_in = static_cast<const T*>(gp_in);
  p.gp_out = static_cast<T*>(gp_out);
  p.y = static_cast<const T*>(y);
  p.partial = partial;
  p.N = s.N;
  p.Ci = s.Ci;
  p.H = s.H;
  p.W = s.W;
  p.Co = s.Co;
  p.xs0 = s.xs[0];
  p.xs1 = s.xs[1];
  p.xs2 = s.xs[2];
  p.xs3 = s.xs[3];
  p.bands = bands;
  p.cl = s.cl;
  p.e = e;
  // No pixels (N == 0, or H == 0) means no partials, but the reduction below still runs
  // and writes gw = 0 and gb = 0: the caller never returns an unwritten gradient.
  if (nblk > 0) {
    const dim3 grid((unsigned)nblk, (unsigned)nco, (unsigned)nci);
    if (!fused) {
      wgrad_kernel<T, false, false><<<grid, kWThreads, 0, stream>>>(p);
    } else if (pool) {
      wgrad_kernel<T, true, true><<<grid, kWThreads, 0, stream>>>(p);
    } else {
      wgrad_kernel<T, true, false><<<grid, kWThreads, 0, stream>>>(p);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (gw == nullptr && gb == nullptr) return cudaSuccess;
  const dim3 rgrid((unsigned)(nco * nci), (unsigned)((kPStride + 31) / 32));
  wgrad_reduce_kernel<<<rgrid, 256, 0, stream>>>(partial, nblk, nci, s.Co, s.Ci, gw, gb);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_conv3x3_small_fwd(int dtype, const void* x, const void* w, const void* b, void* out, int8_t* argmax,
                                     ConvShape s, Epilogue e, bool pool, cudaStream_t stream) {
  // fp16 / bf16 with Ci <= 4 and Co > 4 run on tensor cores (csrc/conv3x3_rgb_mma.cu);
  // float32 (no 16-bit tensor-core operands without changing its precision) and Co <= 4
  // layers (an n8 tile would be mostly padding) stay on the CUDA-core kernel below.
  if (conv3x3_rgb_mma_serves(dtype, s)) return launch_conv3x3_rgb_mma_fwd(dtype, x, w, b, out, argmax, s, e, pool, stream);
  return GK_DISPATCH(dtype, fwd, x, w, b, out, argmax, s, e, pool, stream);
}

cudaError_t launch_conv3x3_small_gp(int dtype, const void* x, const void* w, const void* b, const void* grad,
                                    const int8_t* argmax, void* gpo, ConvShape s, Epilogue e, bool pool,
                                    cudaStream_t stream) {
  return GK_DISPATCH(dtype, gp, x, w, b, grad, argmax, gpo, s, e, pool, stream);
}

int64_t conv3x3_small_wgrad_partial_numel(ConvShape s, bool fused) {
  int64_t bands, nco, nci;
  wgrad_grid(s, fused, bands, nco, nci);
  return nco * nci * s.N * bands * kPStride;
}

cudaError_t launch_conv3x3_small_wgrad(int dtype, bool fused, const void* x, const void* w, const void* b,
                                       const void* grad, const int8_t* argmax, const void* gp_in, void* gp_out,
                                       const void* y, float* partial, float* gw, float* gb, ConvShape s, Epilogue e,
                                       bool pool, cudaStream_t stream) {
  return GK_DISPATCH(dtype, wgrad, fused, x, w, b, grad, argmax, gp_in, gp_out, y, partial, gw, gb, s, e, pool,
                     stream);
}

}  // namespace gk
