// The forward of the 3×3 convolution (padding 1) with few input channels (1 <= Ci <= 4: a
// discriminator's RGB input layer) on tensor cores, fp16 / bf16, with bias, activation,
// gain, clamp and optionally the 2×2 max-pool with its argmax, as conv_small_kernel
// computes them (csrc/conv3x3_small.cu routes the calls this kernel serves here).
//
// Implicit GEMM: M = output pixels, N = output channels (64 per block: 8 n8 tiles), K = the
// 9·Ci (tap, channel) pairs, k = tap·Ci + ci, padded with zeros to whole k16 steps (Ci = 1:
// one step; 2, 3: two; 4: three). mma.sync.m16n8k16, fp32 accumulators (csrc/mma.cuh).
//
// A block owns a 32×32 pixel tile of one image: it stages the tile with its 1-pixel halo
// once (4 channel slots per pixel, zero beyond Ci and outside the image) and the block's
// weights, which every warp then keeps in registers as B fragments. A warp works on
// "groups" of 32 pixels: two full-resolution rows × 16 columns, i.e. 8 pool windows, as two
// m16 tiles. Row r of m16 tile `dy` is the pixel (dy, dx = r / 8) of window r % 8, so the
// four pixels of window g are rows g and g + 8 of the two tiles: exactly the accumulator
// rows lane (g, t) holds. Pooling (and its argmax) is done in-thread, and each lane ends
// with channels (2t, 2t + 1) of every n8 tile: one packed bf16x2 / half2 store each.
//
// The A fragments are gathered from the staged tile: lane (g, t) needs, per k16 step, the
// K indices 2t, 2t+1, 2t+8, 2t+9 (+16 per step) of its 4 pixels; the shared-memory offset of
// each K index from a pixel's slot 0 is computed once per thread, so a gather is one 2-byte
// load at (pixel base + constant). K padding is zeroed with a per-lane mask (not left to the
// zero weights: 0 · inf would be NaN).
#include <atomic>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

namespace gk {
namespace {

constexpr int kTile = 32;                         // output pixels per tile edge
constexpr int kXT = kTile + 2;                    // staged tile edge with the halo
constexpr int kSlots = 4;                         // channel slots per staged pixel (Ci <= 4)
constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kCoBlock = 64, kNTiles = kCoBlock / 8;  // output channels per block, as n8 tiles
constexpr int kGroups = (kTile / 2) * (kTile / 16);   // 32-pixel groups (2 rows × 16 columns) per tile

template <typename T>
struct RgbParams {
  const T* x;
  const T* w;
  const T* b;
  T* out;           // y [N, Co, H, W], or the pooled y [N, Co, H/2, W/2]
  int8_t* argmax;   // pool: dy * 2 + dx of each window's maximum
  int64_t N, H, W, Co;
  int Ci;
  int64_t xs0, xs1, xs2, xs3;
  int64_t tiles_w, tiles_h;
  bool cl;
  bool packed;  // channels_last, Co even, out 4-byte (argmax 2-byte) aligned: channel pairs in one store
  Epilogue e;
};

// Store a lane's channel pairs: pair nt (two 16-bit values, the lower channel in the low
// half) belongs at dst + nt * 8 channels, channel stride cs; `valid` channels from dst on
// exist. packed (channels_last: cs == 1, dst 4-byte aligned, an even channel count): one
// 4-byte store per pair at a constant offset.
template <typename E>
__device__ __forceinline__ void store_pairs(E* dst, const uint32_t (&pairs)[kNTiles], int64_t cs, int valid, bool packed) {
  static_assert(sizeof(E) == 1 || sizeof(E) == 2, "16-bit values or 8-bit argmax codes");
  using Pair = typename std::conditional<sizeof(E) == 2, uint32_t, uint16_t>::type;
  constexpr int kBits = 8 * sizeof(E);
  if (packed) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
      if (nt * 8 < valid) *reinterpret_cast<Pair*>(dst + nt * 8) = (Pair)pairs[nt];
    return;
  }
  const int64_t step = 8 * cs;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt, dst += step) {
    using Bits = typename std::conditional<sizeof(E) == 2, uint16_t, uint8_t>::type;
    if (nt * 8 < valid) *reinterpret_cast<Bits*>(dst) = (Bits)pairs[nt];
    if (nt * 8 + 1 < valid) *reinterpret_cast<Bits*>(dst + cs) = (Bits)(pairs[nt] >> kBits);
  }
}

// KS: k16 steps (ceil(9·Ci / 16)); ACT: the activation (a constant, so that the epilogue
// of the 64 accumulators is that activation's code, not a switch per value).
template <typename T, int KS, bool POOL, int ACT>
__global__ void __launch_bounds__(kThreads) conv_rgb_mma_kernel(RgbParams<T> p) {
  constexpr int KP = 16 * KS;  // padded K
  constexpr int WS = KP + 8;   // weight row stride (elements): B fragment loads hit 32 distinct banks
  __shared__ __align__(16) uint16_t xs[kXT * kXT * kSlots];
  __shared__ __align__(16) uint16_t ws[kCoBlock * WS];
  __shared__ float bs[kCoBlock];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;  // PTX's groupID and threadID_in_group
  int64_t tile = blockIdx.x;
  const int64_t tw = tile % p.tiles_w;
  tile /= p.tiles_w;
  const int64_t th = tile % p.tiles_h;
  const int64_t n = tile / p.tiles_h;
  const int64_t h0 = th * kTile, w0 = tw * kTile;
  const int64_t co0 = (int64_t)blockIdx.y * kCoBlock;
  const int Ci = p.Ci;
  Epilogue e = p.e;
  e.act = ACT;  // folds activate()'s switch away

  // The input tile with its halo, pixel-major, kSlots 2-byte slots per pixel.
  for (int px = tid; px < kXT * kXT; px += kThreads) {
    const int r = px / kXT, c = px % kXT;
    const int64_t ih = h0 - 1 + r, iw = w0 - 1 + c;
    Array<uint16_t, kSlots> v;
#pragma unroll
    for (int ci = 0; ci < kSlots; ++ci) v.v[ci] = 0;
    if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) {
      const T* src = p.x + n * p.xs0 + ih * p.xs2 + iw * p.xs3;
#pragma unroll
      for (int ci = 0; ci < kSlots; ++ci)
        if (ci < Ci) v.v[ci] = bits_of(src[ci * p.xs1]);
    }
    store_array<uint16_t, kSlots>(xs + px * kSlots, v);
  }
  // The weights as B (K × N, stored N-major: ws[j][k] = w[co0 + j][ci][tap]), zero for the
  // K padding and for channels >= Co; the bias (zero without one) seeds the accumulators.
  if (tid < kCoBlock) {
    const int64_t co = co0 + tid;
    int tap = 0, ci = 0;
#pragma unroll
    for (int k = 0; k < KP; ++k) {
      uint16_t v = 0;
      if (k < 9 * Ci && co < p.Co) v = bits_of(p.w[(co * Ci + ci) * 9 + tap]);
      ws[tid * WS + k] = v;
      if (++ci == Ci) {
        ci = 0;
        ++tap;
      }
    }
    bs[tid] = (p.b != nullptr && co < p.Co) ? to_f<T>(p.b[co]) : 0.f;
  }

  // This lane's K indices: offsets from a pixel's slot 0, and the mask of the last step's
  // padding (pairs (2t, 2t+1) and (2t+8, 2t+9)).
  int koff[KS][4];
  uint32_t kmask[2];
#pragma unroll
  for (int s = 0; s < KS; ++s)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = 16 * s + 2 * t + (j & 1) + 8 * (j >> 1);
      const int tap = k / Ci, ci = k - tap * Ci;
      const bool valid = k < 9 * Ci;
      koff[s][j] = valid ? ((tap / 3) * kXT + tap % 3) * kSlots + ci : 0;
      if (s == KS - 1) {
        const uint32_t half = valid ? ((j & 1) ? 0xffff0000u : 0x0000ffffu) : 0u;
        kmask[j >> 1] = (j & 1) ? (kmask[j >> 1] | half) : half;
      }
    }
  __syncthreads();

  uint32_t bfrag[kNTiles][KS][2];
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int s = 0; s < KS; ++s) {
      const uint16_t* row = ws + (nt * 8 + g) * WS + 16 * s + 2 * t;
      bfrag[nt][s][0] = *reinterpret_cast<const uint32_t*>(row);
      bfrag[nt][s][1] = *reinterpret_cast<const uint32_t*>(row + 8);
    }

  const int64_t Hd = POOL ? p.H / 2 : p.H, Wd = POOL ? p.W / 2 : p.W;  // the output's size
  const int64_t cs = p.cl ? 1 : Hd * Wd;                               // its channel stride
  const int cvalid = (int)min((int64_t)kCoBlock, p.Co - co0);          // channels of this block
  for (int gi = warp; gi < kGroups; gi += kWarps) {
    const int pr = gi >> 1, half = gi & 1;        // the group's row pair and column half
    const int r0 = 2 * pr, c0 = 16 * half + 2 * g;  // lane's window: top-left pixel in the tile
    if (h0 + r0 >= p.H || w0 + 16 * half >= p.W) continue;  // warp-uniform: nothing of it inside

    float acc[2][kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      const float b0 = bs[nt * 8 + 2 * t], b1 = bs[nt * 8 + 2 * t + 1];
#pragma unroll
      for (int dy = 0; dy < 2; ++dy) {
        acc[dy][nt][0] = acc[dy][nt][2] = b0;
        acc[dy][nt][1] = acc[dy][nt][3] = b1;
      }
    }
#pragma unroll
    for (int s = 0; s < KS; ++s) {
#pragma unroll
      for (int dy = 0; dy < 2; ++dy) {
        const uint16_t* px0 = xs + ((r0 + dy) * kXT + c0) * kSlots;  // row g: dx = 0
        const uint16_t* px1 = px0 + kSlots;                          // row g + 8: dx = 1
        uint32_t a[4];
        a[0] = pack_bits(px0[koff[s][0]], px0[koff[s][1]]);
        a[1] = pack_bits(px1[koff[s][0]], px1[koff[s][1]]);
        a[2] = pack_bits(px0[koff[s][2]], px0[koff[s][3]]);
        a[3] = pack_bits(px1[koff[s][2]], px1[koff[s][3]]);
        if (s == KS - 1) {
          a[0] &= kmask[0];
          a[1] &= kmask[0];
          a[2] &= kmask[1];
          a[3] &= kmask[1];
        }
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) mma_m16n8k16<T>(acc[dy][nt], a, bfrag[nt][s]);
      }
    }

    // The epilogue in place, clip(act(p) * gain): the clamp (rare) behind one uniform branch
    // per group rather than one per value.
#pragma unroll
    for (int dy = 0; dy < 2; ++dy)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[dy][nt][i] = activate(acc[dy][nt][i], e) * e.gain;
    if (e.has_clamp) {
#pragma unroll
      for (int dy = 0; dy < 2; ++dy)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float y = acc[dy][nt][i];  // torch.clamp keeps NaN
            acc[dy][nt][i] = y < -e.clamp ? -e.clamp : (y > e.clamp ? e.clamp : y);
          }
    }

    if (POOL) {
      // Pool the values as PyTorch would see them: rounded to T, the first maximum of the
      // window (row-major) wins, a NaN replaces anything (the last NaN wins).
      uint32_t vals[kNTiles], args[kNTiles];  // per n8 tile: the channel pair, packed
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        float best[2];
        uint32_t arg[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          best[j] = round_to<T>(acc[0][nt][j]);
          arg[j] = 0;
#pragma unroll
          for (int q = 1; q < 4; ++q) {
            const float y = round_to<T>(acc[q >> 1][nt][(q & 1) * 2 + j]);
            const bool take = y > best[j] || isnan(y);
            best[j] = take ? y : best[j];
            arg[j] = take ? q : arg[j];
          }
        }
        vals[nt] = pack_floats<T>(best[0], best[1]);
        args[nt] = arg[0] | (arg[1] << 8);
      }
      const int64_t hq = h0 / 2 + pr, wq = w0 / 2 + 8 * half + g;
      if (hq >= Hd || wq >= Wd) continue;
      const int64_t o = (p.cl ? ((n * Hd + hq) * Wd + wq) * p.Co : (n * p.Co * Hd + hq) * Wd + wq) + (co0 + 2 * t) * cs;
      store_pairs(p.out + o, vals, cs, cvalid - 2 * t, p.packed);
      store_pairs(p.argmax + o, args, cs, cvalid - 2 * t, p.packed);
    } else {
#pragma unroll
      for (int dy = 0; dy < 2; ++dy)
#pragma unroll
        for (int dx = 0; dx < 2; ++dx) {
          uint32_t vals[kNTiles];
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt)
            vals[nt] = pack_floats<T>(acc[dy][nt][2 * dx], acc[dy][nt][2 * dx + 1]);
          const int64_t h = h0 + r0 + dy, w = w0 + c0 + dx;
          if (h >= Hd || w >= Wd) continue;
          const int64_t o = (p.cl ? ((n * Hd + h) * Wd + w) * p.Co : (n * p.Co * Hd + h) * Wd + w) + (co0 + 2 * t) * cs;
          store_pairs(p.out + o, vals, cs, cvalid - 2 * t, p.packed);
        }
    }
  }
}

template <typename T, int KS, bool POOL, int ACT>
cudaError_t launch_on(const RgbParams<T>& p, dim3 grid, cudaStream_t stream) {
  conv_rgb_mma_kernel<T, KS, POOL, ACT><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int KS, bool POOL>
cudaError_t launch_act(const RgbParams<T>& p, dim3 grid, cudaStream_t stream) {
  switch (p.e.act) {
    case kLinear: return launch_on<T, KS, POOL, kLinear>(p, grid, stream);
    case kRelu: return launch_on<T, KS, POOL, kRelu>(p, grid, stream);
    case kLrelu: return launch_on<T, KS, POOL, kLrelu>(p, grid, stream);
    case kTanh: return launch_on<T, KS, POOL, kTanh>(p, grid, stream);
    case kSigmoid: return launch_on<T, KS, POOL, kSigmoid>(p, grid, stream);
    case kSilu: return launch_on<T, KS, POOL, kSilu>(p, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, bool POOL>
cudaError_t launch_steps(const RgbParams<T>& p, dim3 grid, cudaStream_t stream) {
  switch ((9 * p.Ci + 15) / 16) {
    case 1: return launch_act<T, 1, POOL>(p, grid, stream);
    case 2: return launch_act<T, 2, POOL>(p, grid, stream);
    case 3: return launch_act<T, 3, POOL>(p, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

inline bool aligned_to(const void* ptr, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0; }

template <typename T>
cudaError_t fwd(const void* x, const void* w, const void* b, void* out, int8_t* argmax, ConvShape s, Epilogue e,
                bool pool, cudaStream_t stream) {
  if (s.Ci < 1 || s.Ci > 4) return cudaErrorInvalidValue;
  RgbParams<T> p{};
  p.x = static_cast<const T*>(x);
  p.w = static_cast<const T*>(w);
  p.b = static_cast<const T*>(b);
  p.out = static_cast<T*>(out);
  p.argmax = argmax;
  p.N = s.N;
  p.H = s.H;
  p.W = s.W;
  p.Co = s.Co;
  p.Ci = (int)s.Ci;
  p.xs0 = s.xs[0];
  p.xs1 = s.xs[1];
  p.xs2 = s.xs[2];
  p.xs3 = s.xs[3];
  p.cl = s.cl;
  p.e = e;
  p.tiles_w = (s.W + kTile - 1) / kTile;
  p.tiles_h = (s.H + kTile - 1) / kTile;
  p.packed = s.cl && s.Co % 2 == 0 && aligned_to(out, 4) && (!pool || aligned_to(argmax, 2));
  const int64_t blocks = s.N * p.tiles_w * p.tiles_h;
  const int64_t chunks = (s.Co + kCoBlock - 1) / kCoBlock;
  if (blocks == 0 || chunks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL || chunks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid((unsigned)blocks, (unsigned)chunks);
  return pool ? launch_steps<T, true>(p, grid, stream) : launch_steps<T, false>(p, grid, stream);
}

// Whether the kernels of this file hold sm_80+ code for the current device (mma.sync with
// bf16 needs it; a build for an older virtual architecture has a trapping stub instead).
// Asked of the runtime once per device.
bool built_for_sm80() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0: not asked yet, 1: yes, -1: no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (device >= 0 && device < kMaxDevices && known[device].load(std::memory_order_relaxed) != 0)
    return known[device].load(std::memory_order_relaxed) > 0;
  cudaFuncAttributes attributes{};
  const auto probe = conv_rgb_mma_kernel<__half, 1, false, kLinear>;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, probe);
  if (err != cudaSuccess) (void)cudaGetLastError();
  const bool ok = err == cudaSuccess && attributes.ptxVersion >= 80;
  if (device >= 0 && device < kMaxDevices) known[device].store(ok ? 1 : -1, std::memory_order_relaxed);
  return ok;
}

}  // namespace

bool conv3x3_rgb_mma_serves(int dtype, const ConvShape& s) {
  return (dtype == kFloat16 || dtype == kBFloat16) && s.Ci >= 1 && s.Ci <= 4 && s.Co > 4 && built_for_sm80();
}

cudaError_t launch_conv3x3_rgb_mma_fwd(int dtype, const void* x, const void* w, const void* b, void* out,
                                       int8_t* argmax, ConvShape s, Epilogue e, bool pool, cudaStream_t stream) {
  if (dtype == kFloat16) return fwd<__half>(x, w, b, out, argmax, s, e, pool, stream);
  if (dtype == kBFloat16) return fwd<__nv_bfloat16>(x, w, b, out, argmax, s, e, pool, stream);
  return cudaErrorInvalidValue;  // float32 runs on the CUDA-core kernel
}

}  // namespace gk
