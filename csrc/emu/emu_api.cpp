// Flat extern "C" entry points over the launchers of kernels.h, for ctypes (the CPU
// emulation build of csrc/emu/emu_build.py). Pointers are host memory here.
#include "../kernels.h"

using namespace gk;

static Epilogue epi(int act, float alpha, float gain, float clamp, int has_clamp) {
  return Epilogue{act, alpha, gain, clamp, has_clamp};
}

extern "C" {

// Grid-stride launches use at most this many blocks (csrc/common.cuh's grid_for, via
// cuda_emu.h); tests lower it so that each thread walks several grid strides.
int64_t gk_emu_max_grid_blocks = (int64_t)1 << 20;
void emu_set_max_grid_blocks(int64_t blocks) { gk_emu_max_grid_blocks = blocks > 0 ? blocks : (int64_t)1 << 20; }

int emu_bias_act_fwd(int dt, const void* x, const void* b, void* y, int64_t numel, int64_t inner, int64_t C, int act,
                     float alpha, float gain, float clamp, int has_clamp, int vec) {
  return launch_bias_act_fwd(dt, x, b, y, numel, inner, C, epi(act, alpha, gain, clamp, has_clamp), vec, nullptr);
}

int emu_bias_act_bwd(int dt, const void* g, const void* x, const void* b, void* gx, int64_t numel, int64_t inner,
                     int64_t C, int act, float alpha, float gain, float clamp, int has_clamp, int vec) {
  return launch_bias_act_bwd(dt, g, x, b, gx, numel, inner, C, epi(act, alpha, gain, clamp, has_clamp), vec, nullptr);
}

static PoolShape pool_shape(const int64_t* s, const int* k, int cl) {
  PoolShape p{};
  p.N = s[0];
  p.C = s[1];
  p.H = s[2];
  p.W = s[3];
  p.Ho = s[4];
  p.Wo = s[5];
  p.kh = k[0];
  p.kw = k[1];
  p.sh = k[2];
  p.sw = k[3];
  p.ph = k[4];
  p.pw = k[5];
  p.dh = k[6];
  p.dw = k[7];
  p.cl = cl;
  return p;
}

int emu_max_pool2d_fwd(int dt, const void* x, void* y, void* saved, int code, const int64_t* shape6, const int* cfg8,
                       int cl, int vec) {
  return launch_max_pool2d_fwd(dt, x, y, saved, code, pool_shape(shape6, cfg8, cl), vec, nullptr);
}

int emu_max_pool2d_bwd(int dt, const void* g, const void* saved, int code, void* gx, const int64_t* shape6,
                       const int* cfg8, int cl, int vec) {
  return launch_max_pool2d_bwd(dt, g, saved, code, gx, pool_shape(shape6, cfg8, cl), vec, nullptr);
}

int emu_upsample_fwd(int dt, const void* x, void* y, int64_t N, int64_t C, int64_t H, int64_t W, int s, int cl, int vec) {
  return launch_upsample_fwd(dt, x, y, N, C, H, W, s, cl, vec, nullptr);
}

int emu_upsample_bwd(int dt, const void* g, void* gx, int64_t N, int64_t C, int64_t H, int64_t W, int s, int cl,
                     int vec) {
  return launch_upsample_bwd(dt, g, gx, N, C, H, W, s, cl, vec, nullptr);
}

static ConvShape conv_shape(const int64_t* s9, int cl) {
  ConvShape c{};
  c.N = s9[0];
  c.Ci = s9[1];
  c.H = s9[2];
  c.W = s9[3];
  c.Co = s9[4];
  for (int i = 0; i < 4; ++i) c.xs[i] = s9[5 + i];
  c.cl = cl;
  return c;
}

int emu_conv_fwd(int dt, const void* x, const void* w, const void* b, void* out, int8_t* argmax, const int64_t* s9,
                 int cl, int act, float alpha, float gain, float clamp, int has_clamp, int pool) {
  return launch_conv3x3_small_fwd(dt, x, w, b, out, argmax, conv_shape(s9, cl), epi(act, alpha, gain, clamp, has_clamp),
                                  pool, nullptr);
}

int emu_conv_gp(int dt, const void* x, const void* w, const void* b, const void* grad, const int8_t* argmax, void* gp,
                const int64_t* s9, int cl, int act, float alpha, float gain, float clamp, int has_clamp, int pool) {
  return launch_conv3x3_small_gp(dt, x, w, b, grad, argmax, gp, conv_shape(s9, cl),
                                 epi(act, alpha, gain, clamp, has_clamp), pool, nullptr);
}

int emu_conv_rgb_mma_serves(int dt, const int64_t* s9, int cl) { return conv3x3_rgb_mma_serves(dt, conv_shape(s9, cl)); }

int64_t emu_conv_partial_numel(const int64_t* s9, int cl, int fused) {
  return conv3x3_small_wgrad_partial_numel(conv_shape(s9, cl), fused);
}

int emu_conv_wgrad(int dt, int fused, const void* x, const void* w, const void* b, const void* grad,
                   const int8_t* argmax, const void* gp_in, void* gp_out, const void* y, float* partial, float* gw,
                   float* gb, const int64_t* s9, int cl, int act, float alpha, float gain, float clamp, int has_clamp,
                   int pool) {
  return launch_conv3x3_small_wgrad(dt, fused, x, w, b, grad, argmax, gp_in, gp_out, y, partial, gw, gb,
                                    conv_shape(s9, cl), epi(act, alpha, gain, clamp, has_clamp), pool, nullptr);
}

}  // extern "C"
