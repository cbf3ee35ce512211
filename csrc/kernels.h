// Launchers for the gankernels CUDA kernels: raw pointers, sizes, a stream.
//
// This header is shared by the kernel .cu files (compiled by nvcc without any torch
// or ATen header, so they compile fast) and csrc/ops.cpp (the torch glue, which does
// every argument check before calling a launcher). All element offsets are 64-bit.
//
// Layouts: every 4-D tensor a launcher writes, and every 4-D tensor it reads except
// the conv input x (which is read through explicit strides), is dense in one of two
// memory formats: NCHW (cl = false) or channels_last NHWC (cl = true).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace gk {

// Element type of every floating-point tensor of one call.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Activation codes; the order matches ACT_NAMES in ops.cpp.
enum Act : int { kLinear = 0, kRelu = 1, kLrelu = 2, kTanh = 3, kSigmoid = 4, kSilu = 5 };

// y = clip(act(p) * gain, -clamp, clamp) (clip only when has_clamp).
struct Epilogue {
  int act;
  float alpha;
  float gain;
  float clamp;
  int has_clamp;
};

// cudaSuccess when the current device can run this library's kernels, else the error
// (cudaErrorNoKernelImageForDevice, ...) every launch would fail with.
cudaError_t kernel_image_status();

// ---------------------------------------------------------------------------------
// bias_act on a dense tensor (any memory format): the channel of the element at
// memory offset i is (i / inner) % C, with inner = x.stride(dim). b may be null.
// vec: all pointers 16-byte aligned (16-byte vector loads/stores for the bulk).
cudaError_t launch_bias_act_fwd(int dtype, const void* x, const void* b, void* y, int64_t numel, int64_t inner,
                                int64_t C, Epilogue e, bool vec, cudaStream_t stream);
// gx = grad * d epilogue(x + b) / dx (grad dense in x's layout). The bias gradient is
// the caller's (deterministic) reduction of gx.
cudaError_t launch_bias_act_bwd(int dtype, const void* grad, const void* x, const void* b, void* gx, int64_t numel,
                                int64_t inner, int64_t C, Epilogue e, bool vec, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// max_pool2d with PyTorch's semantics (NaN wins, first maximum otherwise). What the
// forward saves for the backward (`saved`, the pooled shape and layout):
//  code = false: int64 flat per-plane indices h * W + w (PyTorch's return_indices);
//  code = true: int8 window codes ky * kw + kx, the argmax's tap in its window (needs
//    kh * kw <= 128); position (ho * sh - ph + ky * dh, wo * sw - pw + kx * dw).
// vec: x, y / grad, gx and saved are 16-byte aligned.
struct PoolShape {
  int64_t N, C, H, W, Ho, Wo;
  int kh, kw, sh, sw, ph, pw, dh, dw;
  bool cl;
};
cudaError_t launch_max_pool2d_fwd(int dtype, const void* x, void* y, void* saved, bool code, PoolShape p, bool vec,
                                  cudaStream_t stream);
// gx from the pooled grad and `saved`; every input element is written once, no atomics,
// deterministic. Needs H + ph + sh and W + pw + sw below 2^31.
cudaError_t launch_max_pool2d_bwd(int dtype, const void* grad, const void* saved, bool code, void* gx, PoolShape p,
                                  bool vec, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// Nearest upsampling by an integer scale s: x [N, C, H, W] -> y [N, C, H*s, W*s].
cudaError_t launch_upsample_fwd(int dtype, const void* x, void* y, int64_t N, int64_t C, int64_t H, int64_t W, int s,
                                bool cl, bool vec, cudaStream_t stream);
// gx [N, C, H, W] = sum of each s×s block of grad [N, C, H*s, W*s] (gathered).
cudaError_t launch_upsample_bwd(int dtype, const void* grad, void* gx, int64_t N, int64_t C, int64_t H, int64_t W, int s,
                                bool cl, bool vec, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// Direct 3×3 convolution (padding 1) for small channel counts, fused bias + epilogue.
// x is read through its strides xs (elements, NCHW order); w is contiguous
// [Co, Ci, 3, 3]; b is [Co] or null. Outputs (out, argmax, gp) and the incoming grad
// are dense in the `cl` layout.
struct ConvShape {
  int64_t N, Ci, H, W, Co;
  int64_t xs[4];
  bool cl;
};
// pool = false: out [N, Co, H, W]. pool = true: out [N, Co, H/2, W/2] (floor) and
// argmax (int8, dy * 2 + dx of the maximum in each 2×2 window, PyTorch's tie rule).
cudaError_t launch_conv3x3_small_fwd(int dtype, const void* x, const void* w, const void* b, void* out, int8_t* argmax,
                                     ConvShape s, Epilogue e, bool pool, cudaStream_t stream);
// gp [N, Co, H, W] = (gradient of the op's output w.r.t. the pre-activation): grad is
// [N, Co, H, W] (pool = false) or the pooled [N, Co, H/2, W/2] with its argmax.
cudaError_t launch_conv3x3_small_gp(int dtype, const void* x, const void* w, const void* b, const void* grad,
                                    const int8_t* argmax, void* gp, ConvShape s, Epilogue e, bool pool,
                                    cudaStream_t stream);
// Weight and bias gradients, deterministic: per-block partial sums (float32) written to
// `partial`, then reduced over blocks in a fixed order into gw [Co, Ci, 3, 3] and gb [Co]
// (float32; gb may be null). gw and gb are always written: zero when there are no
// pixels (N == 0 or H * W == 0).
//  fused (Ci <= 4): the pre-activation gradient is recomputed in the kernel from x, w,
//    b, grad (and argmax when pool), and also written to gp_out when it is not null.
//    With y (the forward's output, pooled when pool; may be null) the activation's
//    derivative is read off y where that is exact (gain > 0; linear, relu, lrelu with
//    alpha >= 0, tanh, sigmoid): no conv is recomputed.
//  not fused: it is read from gp_in ([N, Co, H, W], `cl` layout, the conv dtype).
int64_t conv3x3_small_wgrad_partial_numel(ConvShape s, bool fused);
cudaError_t launch_conv3x3_small_wgrad(int dtype, bool fused, const void* x, const void* w, const void* b,
                                       const void* grad, const int8_t* argmax, const void* gp_in, void* gp_out,
                                       const void* y, float* partial, float* gw, float* gb, ConvShape s, Epilogue e,
                                       bool pool, cudaStream_t stream);

// The forward above on tensor cores (csrc/conv3x3_rgb_mma.cu) for the calls it serves:
// fp16 / bf16, 1 <= Ci <= 4, Co > 4 (a discriminator's RGB input layer), on a GPU the
// kernel was built for with sm_80+ code. launch_conv3x3_small_fwd routes to it by this
// predicate; float32 and Co <= 4 layers stay on the CUDA-core kernel.
bool conv3x3_rgb_mma_serves(int dtype, const ConvShape& s);
cudaError_t launch_conv3x3_rgb_mma_fwd(int dtype, const void* x, const void* w, const void* b, void* out,
                                       int8_t* argmax, ConvShape s, Epilogue e, bool pool, cudaStream_t stream);

}  // namespace gk
