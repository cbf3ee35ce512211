// A CPU emulation of the few CUDA features the kernels of csrc/ use, so that the very
// same kernel source can be compiled by g++ and checked against the reference on a
// machine without a GPU (tests/test_cuda_extension.py). Slow and serial: the threads of
// a block are fibers on one OS thread (launch) or plain calls in turn (launch_serial,
// for kernels without __syncthreads / shuffles); blocks run one after another. It shows
// indexing, layout, masking, reduction-order and synchronisation-placement bugs, not
// performance or races. Not part of any build.
//
// Included before the kernel source (g++ -include); csrc/emu/emu_build.py rewrites the
// `kernel<<<grid, block, smem, stream>>>(args)` launches into gk_emu::launch calls.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <ucontext.h>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // one instance per kernel instantiation: blocks run serially
#define __launch_bounds__(...)
#define __restrict__ __restrict
// csrc/mma.cuh's wrapper calls gk_emu::mma_m16n8k16 instead of the PTX instruction.
#define GK_CPU_EMULATION 1

// The block cap of grid-stride launches, set by the tests (emu_api.cpp).
extern "C" int64_t gk_emu_max_grid_blocks;
#define GK_MAX_GRID_BLOCKS gk_emu_max_grid_blocks

namespace gk_emu {

struct Ctx {
  dim3 thread, block, block_dim, grid_dim;
  bool fibers;    // false under launch_serial, where a sync is a bug
  float* shfl;    // one slot per thread of the block
  uint32_t* mma;  // kMmaSlots per thread of the block: the fragments of an mma
};
inline thread_local Ctx ctx;

// The threads of a block are fibers (ucontext) on one OS thread, run round-robin: each
// runs until its next __syncthreads, so a "phase" ends when all have reached it.
struct Fiber {
  ucontext_t uc;
  std::vector<char> stack;
  bool done;
};
inline thread_local ucontext_t scheduler;
inline thread_local Fiber* current = nullptr;
inline thread_local const std::function<void()>* current_body = nullptr;

inline void sync() {
  if (!ctx.fibers) std::abort();  // a kernel that syncs was launched with launch_serial
  swapcontext(&current->uc, &scheduler);
}

inline void fiber_main() {
  (*current_body)();
  current->done = true;  // returning resumes the scheduler (uc_link)
}

inline unsigned flat_tid() {
  return ctx.thread.x + ctx.block_dim.x * (ctx.thread.y + ctx.block_dim.y * ctx.thread.z);
}

// Every thread of the block must reach the same shuffles (true of the kernels here).
inline float shfl_xor(float v, int lane_mask) {
  const unsigned t = flat_tid();
  ctx.shfl[t] = v;
  sync();
  const unsigned other = (t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask);
  const float r = ctx.shfl[other];
  sync();
  return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, d = a·b + d, for the
// calling lane. Each lane publishes its A and B fragment registers, every lane of the warp
// then rebuilds the rows and columns it needs from its neighbours' registers by the
// fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point
// type"; restated in csrc/mma.cuh), and accumulates in float in k order (the tensor core's
// order and rounding of the sum are unspecified; the products of 16-bit floats are exact).
// Every lane of the warp must make the same calls (true of mma.sync itself).
constexpr int kMmaSlots = 6;  // a[0..3], b[0..1]

inline float half_bits_to_float(bool fp16, uint32_t bits) {
  bits &= 0xffffu;
  if (fp16) {
    __half_raw r;
    r.x = (unsigned short)bits;
    return __half2float(__half(r));
  }
  const uint32_t f = bits << 16;  // bfloat16 is the high half of a float32
  float v;
  std::memcpy(&v, &f, sizeof v);
  return v;
}

inline void mma_m16n8k16(bool fp16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const unsigned t = flat_tid();
  uint32_t* mine = ctx.mma + (size_t)t * kMmaSlots;
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  sync();
  const unsigned warp0 = t & ~31u, lane = t & 31u;
  const unsigned* slots = ctx.mma + (size_t)warp0 * kMmaSlots;
  // A[row][col] is in lane (row % 8) * 4 + (col % 8) / 2, register (row >= 8) + 2 (col >= 8),
  // half col % 2; B[k][col] in lane col * 4 + (k % 8) / 2, register 4 + (k >= 8), half k % 2.
  auto A = [&](int row, int col) {
    const uint32_t reg = slots[((row % 8) * 4 + (col % 8) / 2) * kMmaSlots + (row >= 8) + 2 * (col >= 8)];
    return half_bits_to_float(fp16, reg >> (16 * (col % 2)));
  };
  auto B = [&](int k, int col) {
    const uint32_t reg = slots[(col * 4 + (k % 8) / 2) * kMmaSlots + 4 + (k >= 8)];
    return half_bits_to_float(fp16, reg >> (16 * (k % 2)));
  };
  float out[4];
  for (int i = 0; i < 4; ++i) {  // d[i] = D[g + 8 (i >= 2)][2 t + i % 2]
    const int row = (int)(lane / 4) + 8 * (i >= 2), col = 2 * (int)(lane % 4) + i % 2;
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[i] = acc;
  }
  sync();  // every lane has read the fragments before any publishes its next ones
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

// The emulation runs every kernel, as an sm_90 build would.
inline cudaError_t func_attributes(cudaFuncAttributes* attributes) {
  *attributes = cudaFuncAttributes{};
  attributes->ptxVersion = 90;
  attributes->binaryVersion = 90;
  return cudaSuccess;
}

inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const unsigned nthreads = block.x * block.y * block.z;
  const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
  std::vector<float> shfl(nthreads);
  std::vector<uint32_t> mma((size_t)nthreads * kMmaSlots);
  std::vector<Fiber> fibers(nthreads);
  for (auto& f : fibers) f.stack.resize(1 << 16);
  const Ctx saved = ctx;
  ctx.block_dim = block;
  ctx.grid_dim = grid;
  ctx.fibers = true;
  ctx.shfl = shfl.data();
  ctx.mma = mma.data();
  current_body = &body;
  for (unsigned long long i = 0; i < nblocks; ++i) {
    ctx.block = dim3(i % grid.x, (i / grid.x) % grid.y, i / ((unsigned long long)grid.x * grid.y));
    for (auto& f : fibers) {
      getcontext(&f.uc);
      f.uc.uc_stack.ss_sp = f.stack.data();
      f.uc.uc_stack.ss_size = f.stack.size();
      f.uc.uc_link = &scheduler;
      f.done = false;
      makecontext(&f.uc, fiber_main, 0);
    }
    for (bool running = true; running;) {
      running = false;
      for (unsigned t = 0; t < nthreads; ++t) {
        Fiber& f = fibers[t];
        if (f.done) continue;
        ctx.thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        current = &f;
        swapcontext(&scheduler, &f.uc);
        running |= !f.done;
      }
    }
  }
  ctx = saved;
}

// Kernels without __syncthreads or shuffles: every thread of every block runs in turn
// on the calling thread (much cheaper than real threads).
inline void launch_serial(dim3 grid, dim3 block, const std::function<void()>& body) {
  const unsigned nthreads = block.x * block.y * block.z;
  const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
  const Ctx saved = ctx;
  ctx.block_dim = block;
  ctx.grid_dim = grid;
  ctx.fibers = false;
  ctx.shfl = nullptr;
  ctx.mma = nullptr;
  for (unsigned long long i = 0; i < nblocks; ++i) {
    ctx.block = dim3(i % grid.x, (i / grid.x) % grid.y, i / ((unsigned long long)grid.x * grid.y));
    for (unsigned t = 0; t < nthreads; ++t) {
      ctx.thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      body();
    }
  }
  ctx = saved;
}

}  // namespace gk_emu

#define threadIdx (::gk_emu::ctx.thread)
#define blockIdx (::gk_emu::ctx.block)
#define blockDim (::gk_emu::ctx.block_dim)
#define gridDim (::gk_emu::ctx.grid_dim)
#define __syncthreads() ::gk_emu::sync()
#define __shfl_xor_sync(mask, v, lane_mask) ::gk_emu::shfl_xor((v), (lane_mask))
#define __expf expf
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
using std::isnan;
using std::max;
using std::min;
#define cudaGetLastError() cudaSuccess
#define cudaFuncGetAttributes(attributes, kernel) ::gk_emu::func_attributes(attributes)
#define cudaGetDevice(device) ::gk_emu::get_device(device)
