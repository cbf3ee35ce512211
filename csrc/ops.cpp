// The torch glue of gankernels._C: op schemas (namespace gankernels_cuda), argument
// checks, output allocation, and launches on the current CUDA stream. The kernels live
// in the .cu files of this directory, which include no torch header (see kernels.h).
//
// The same functions are registered for the CPU dispatch key: the argument checks then
// run (and are tested) on machines without a GPU, and a call that passes them fails
// with "expected CUDA tensors". Fake (meta) kernels are registered in Python
// (gankernels/cuda/loader.py), the module named by set_python_module below.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <Python.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include "kernels.h"

namespace {

constexpr const char* kActNames[] = {"linear", "relu", "lrelu", "tanh", "sigmoid", "silu"};

std::string where(const char* op) { return std::string("gankernels_cuda::") + op + ": "; }

int dtype_code(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return gk::kFloat32;
    case at::kHalf: return gk::kFloat16;
    case at::kBFloat16: return gk::kBFloat16;
    default:
      TORCH_CHECK(false, where(op), name, " must be float32, float16 or bfloat16, got ", t.scalar_type(),
                  " (other dtypes run on gankernels' torch backend)");
  }
  return -1;
}

void check_ndim(const at::Tensor& t, int64_t ndim, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == ndim, where(op), name, " must be a ", ndim, "-D tensor ", shape, ", got shape ", t.sizes());
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), where(op), name, " has dtype ", t.scalar_type(), " but x has ",
              x.scalar_type(), "; cast it to x's dtype");
  TORCH_CHECK(t.device() == x.device(), where(op), name, " is on ", t.device(), " but x is on ", x.device(),
              "; move both to the same CUDA device");
}

// After every argument check: this op has kernels for CUDA tensors only.
void require_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), where(op), "expected CUDA tensors, got x on ", x.device(),
              " (the arguments are valid; on CPU use gankernels' torch backend)");
}

gk::Epilogue make_epilogue(c10::string_view act, double alpha, double gain, std::optional<double> clamp,
                           const char* op) {
  int code = -1;
  for (int i = 0; i < 6; ++i)
    if (act == kActNames[i]) code = i;
  TORCH_CHECK(code >= 0, where(op), "act must be one of linear, relu, lrelu, tanh, sigmoid, silu; got '",
              std::string(act), "'");
  TORCH_CHECK(!clamp.has_value() || *clamp >= 0, where(op), "clamp must be >= 0 or None, got ", clamp.value_or(0));
  gk::Epilogue e;
  e.act = code;
  e.alpha = static_cast<float>(alpha);
  e.gain = static_cast<float>(gain);
  e.clamp = clamp.has_value() ? static_cast<float>(*clamp) : 0.f;
  e.has_clamp = clamp.has_value() ? 1 : 0;
  return e;
}

// The memory format of an op's outputs for input x, the rule of
// gankernels.ops.reference.memory_format_of (the fake kernels use it): a dense tensor is
// channels_last when it is laid out so and not also plain contiguous (a [N, C, 1, 1]
// tensor reads as contiguous); a strided view takes the format its strides suggest, as
// F.conv2d, F.max_pool2d and F.interpolate do.
at::MemoryFormat format_of(const at::Tensor& x) {
  if (x.dim() != 4 || x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  return x.suggest_memory_format();
}

bool aligned16(const at::Tensor& t) { return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0; }

// Test-only: with GANKERNELS_POISON_OUTPUTS=1 every buffer a kernel must fill is first
// filled with NaN (integers: -1), so an element a kernel fails to write shows up.
at::Tensor poisoned(at::Tensor t) {
  const char* env = std::getenv("GANKERNELS_POISON_OUTPUTS");
  if (env != nullptr && env[0] == '1' && t.numel() > 0) {
    if (at::isFloatingType(t.scalar_type())) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      t.fill_(-1);
    }
  }
  return t;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, where(op), "kernel launch failed: ", cudaGetErrorString(err));
}

// ---------------------------------------------------------------------------------
// bias_act

struct BiasActLayout {
  at::Tensor x;  // dense
  int64_t dim, inner, C;
};

BiasActLayout bias_act_checks(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim, const char* op) {
  dtype_code(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, where(op), "x must have at least one dimension");
  TORCH_CHECK(dim >= -x.dim() && dim < x.dim(), where(op), "dim ", dim, " is out of range for x with ", x.dim(),
              " dimensions");
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  if (b.has_value()) {
    check_ndim(*b, 1, op, "b", "[C]");
    check_like(*b, x, op, "b");
    TORCH_CHECK(b->size(0) == x.size(d), where(op), "b has length ", b->size(0), " but x.size(", d, ") is ",
                x.size(d));
  }
  BiasActLayout l;
  l.x = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  l.dim = d;
  l.C = x.size(d);
  l.inner = l.C > 1 ? l.x.stride(d) : 1;
  return l;
}

at::Tensor bias_act(const at::Tensor& x, const std::optional<at::Tensor>& b, c10::string_view act, double alpha,
                    double gain, std::optional<double> clamp, int64_t dim) {
  const char* op = "bias_act";
  BiasActLayout l = bias_act_checks(x, b, dim, op);
  gk::Epilogue e = make_epilogue(act, alpha, gain, clamp, op);
  require_cuda(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = poisoned(at::empty_like(l.x));  // same strides as the dense input
  at::Tensor bc = b.has_value() ? b->contiguous() : at::Tensor();
  const bool vec = aligned16(l.x) && aligned16(y);
  check_launch(gk::launch_bias_act_fwd(dtype_code(x, op, "x"), l.x.data_ptr(), bc.defined() ? bc.data_ptr() : nullptr,
                                       y.data_ptr(), l.x.numel(), l.inner, l.C, e, vec,
                                       c10::cuda::getCurrentCUDAStream()),
               op);
  return y;
}

at::Tensor bias_act_backward(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& b,
                             c10::string_view act, double alpha, double gain, std::optional<double> clamp,
                             int64_t dim) {
  const char* op = "bias_act_backward";
  BiasActLayout l = bias_act_checks(x, b, dim, op);
  check_like(grad, x, op, "grad");
  TORCH_CHECK(grad.sizes() == x.sizes(), where(op), "grad has shape ", grad.sizes(), " but x has ", x.sizes());
  gk::Epilogue e = make_epilogue(act, alpha, gain, clamp, op);
  require_cuda(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor g = grad.strides() == l.x.strides() ? grad : at::empty_like(l.x).copy_(grad);
  at::Tensor gx = poisoned(at::empty_like(l.x));
  at::Tensor bc = b.has_value() ? b->contiguous() : at::Tensor();
  const bool vec = aligned16(l.x) && aligned16(g) && aligned16(gx);
  check_launch(gk::launch_bias_act_bwd(dtype_code(x, op, "x"), g.data_ptr(), l.x.data_ptr(),
                                       bc.defined() ? bc.data_ptr() : nullptr, gx.data_ptr(), l.x.numel(), l.inner,
                                       l.C, e, vec, c10::cuda::getCurrentCUDAStream()),
               op);
  return gx;
}

// ---------------------------------------------------------------------------------
// max_pool2d

int64_t pool_out(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t numer = size + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t out = (numer >= 0 ? numer / s : -((-numer + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= size + p) --out;
  return out;
}

gk::PoolShape pool_checks(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode, const char* op) {
  check_ndim(x, 4, op, "x", "[N, C, H, W]");
  dtype_code(x, op, "x");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, where(op),
              "kernel_size, stride, padding and dilation must each have 2 values");
  gk::PoolShape p{};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(kernel_size[i] >= 1, where(op), "kernel_size must be >= 1, got ", kernel_size);
    TORCH_CHECK(stride[i] >= 1, where(op), "stride must be >= 1, got ", stride);
    TORCH_CHECK(dilation[i] >= 1, where(op), "dilation must be >= 1, got ", dilation);
    TORCH_CHECK(padding[i] >= 0 && padding[i] <= (dilation[i] * (kernel_size[i] - 1) + 1) / 2, where(op), "padding ",
                padding, " must be >= 0 and at most half of the effective kernel size (kernel_size ", kernel_size,
                ", dilation ", dilation, ")");
  }
  p.N = x.size(0);
  p.C = x.size(1);
  p.H = x.size(2);
  p.W = x.size(3);
  p.Ho = pool_out(p.H, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode);
  p.Wo = pool_out(p.W, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode);
  TORCH_CHECK(p.Ho > 0 && p.Wo > 0, where(op), "x of spatial size ", x.sizes().slice(2), " is too small for kernel_size ",
              kernel_size, " (the output would be empty)");
  p.kh = (int)kernel_size[0];
  p.kw = (int)kernel_size[1];
  p.sh = (int)stride[0];
  p.sw = (int)stride[1];
  p.ph = (int)padding[0];
  p.pw = (int)padding[1];
  p.dh = (int)dilation[0];
  p.dw = (int)dilation[1];
  p.cl = format_of(x) == at::MemoryFormat::ChannelsLast;
  return p;
}

// Whether the forward saves 1-byte window codes (return_indices off and a window of at
// most 128 taps) instead of int64 indices; gankernels/cuda/loader.py has the same rule.
bool pool_saves_code(at::IntArrayRef kernel_size, bool return_indices) {
  return !return_indices && kernel_size[0] * kernel_size[1] <= 128;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode,
                                              bool return_indices) {
  const char* op = "max_pool2d";
  gk::PoolShape p = pool_checks(x, kernel_size, stride, padding, dilation, ceil_mode, op);
  require_cuda(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = format_of(x);
  const bool code = pool_saves_code(kernel_size, return_indices);
  at::Tensor xc = x.contiguous(fmt);
  at::Tensor y = poisoned(at::empty({p.N, p.C, p.Ho, p.Wo}, x.options().memory_format(fmt)));
  at::Tensor saved = poisoned(
      at::empty({p.N, p.C, p.Ho, p.Wo}, x.options().dtype(code ? at::kChar : at::kLong).memory_format(fmt)));
  check_launch(gk::launch_max_pool2d_fwd(dtype_code(x, op, "x"), xc.data_ptr(), y.data_ptr(), saved.data_ptr(), code, p,
                                         aligned16(xc) && aligned16(y) && aligned16(saved),
                                         c10::cuda::getCurrentCUDAStream()),
               op);
  return {y, saved};
}

at::Tensor max_pool2d_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& saved,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "max_pool2d_backward";
  gk::PoolShape p = pool_checks(x, kernel_size, stride, padding, dilation, ceil_mode, op);
  check_like(grad, x, op, "grad");
  const std::vector<int64_t> out_shape = {p.N, p.C, p.Ho, p.Wo};
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(out_shape), where(op), "grad must have the pooled shape ",
              at::IntArrayRef(out_shape), ", got ", grad.sizes());
  const bool code = saved.scalar_type() == at::kChar;
  TORCH_CHECK(saved.scalar_type() == at::kLong || (code && kernel_size[0] * kernel_size[1] <= 128), where(op),
              "saved must be the forward's int64 indices or int8 window codes, got ", saved.scalar_type());
  TORCH_CHECK(saved.sizes() == at::IntArrayRef(out_shape), where(op), "saved must have the pooled shape ",
              at::IntArrayRef(out_shape), ", got ", saved.sizes());
  TORCH_CHECK(saved.device() == x.device(), where(op), "saved is on ", saved.device(), " but x is on ", x.device());
  TORCH_CHECK(p.H + p.ph + p.sh < (int64_t(1) << 31) && p.W + p.pw + p.sw < (int64_t(1) << 31), where(op),
              "x's height and width (plus padding and stride) must be below 2^31, got ", x.sizes());
  require_cuda(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = format_of(x);
  at::Tensor g = grad.contiguous(fmt);
  at::Tensor sc = saved.contiguous(fmt);
  at::Tensor gx = poisoned(at::empty(x.sizes(), x.options().memory_format(fmt)));
  check_launch(gk::launch_max_pool2d_bwd(dtype_code(x, op, "x"), g.data_ptr(), sc.data_ptr(), code, gx.data_ptr(), p,
                                         aligned16(g) && aligned16(sc) && aligned16(gx),
                                         c10::cuda::getCurrentCUDAStream()),
               op);
  return gx;
}

// ---------------------------------------------------------------------------------
// upsample_nearest2d

at::Tensor upsample_nearest2d(const at::Tensor& x, int64_t scale_factor) {
  const char* op = "upsample_nearest2d";
  check_ndim(x, 4, op, "x", "[N, C, H, W]");
  const int dt = dtype_code(x, op, "x");
  TORCH_CHECK(scale_factor >= 1 && scale_factor <= 1024, where(op), "scale_factor must be an integer in [1, 1024], got ",
              scale_factor);
  require_cuda(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = format_of(x);
  at::Tensor xc = x.contiguous(fmt);
  const int64_t s = scale_factor;
  at::Tensor y = poisoned(at::empty({x.size(0), x.size(1), x.size(2) * s, x.size(3) * s}, x.options().memory_format(fmt)));
  check_launch(gk::launch_upsample_fwd(dt, xc.data_ptr(), y.data_ptr(), x.size(0), x.size(1), x.size(2), x.size(3),
                                       (int)s, fmt == at::MemoryFormat::ChannelsLast, aligned16(xc) && aligned16(y),
                                       c10::cuda::getCurrentCUDAStream()),
               op);
  return y;
}

at::Tensor upsample_nearest2d_backward(const at::Tensor& grad, int64_t scale_factor) {
  const char* op = "upsample_nearest2d_backward";
  check_ndim(grad, 4, op, "grad", "[N, C, H*s, W*s]");
  const int dt = dtype_code(grad, op, "grad");
  TORCH_CHECK(scale_factor >= 1 && scale_factor <= 1024, where(op), "scale_factor must be an integer in [1, 1024], got ",
              scale_factor);
  const int64_t s = scale_factor;
  TORCH_CHECK(grad.size(2) % s == 0 && grad.size(3) % s == 0, where(op), "grad's spatial size ", grad.sizes().slice(2),
              " must be divisible by scale_factor ", s);
  require_cuda(grad, op);
  c10::cuda::CUDAGuard guard(grad.device());
  const auto fmt = format_of(grad);
  at::Tensor g = grad.contiguous(fmt);
  const int64_t H = grad.size(2) / s, W = grad.size(3) / s;
  at::Tensor gx = poisoned(at::empty({grad.size(0), grad.size(1), H, W}, grad.options().memory_format(fmt)));
  check_launch(gk::launch_upsample_bwd(dt, g.data_ptr(), gx.data_ptr(), grad.size(0), grad.size(1), H, W, (int)s,
                                       fmt == at::MemoryFormat::ChannelsLast, aligned16(g) && aligned16(gx),
                                       c10::cuda::getCurrentCUDAStream()),
               op);
  return gx;
}

// ---------------------------------------------------------------------------------
// conv3x3_small

gk::ConvShape conv_checks(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, bool pool,
                          const char* op) {
  check_ndim(x, 4, op, "x", "[N, Ci, H, W]");
  dtype_code(x, op, "x");
  check_ndim(w, 4, op, "w", "[Co, Ci, 3, 3]");
  check_like(w, x, op, "w");
  TORCH_CHECK(w.size(2) == 3 && w.size(3) == 3, where(op), "w must be a 3x3 kernel [Co, Ci, 3, 3], got shape ",
              w.sizes());
  TORCH_CHECK(w.size(1) == x.size(1), where(op), "w has ", w.size(1), " input channels (w.size(1)) but x has ",
              x.size(1), " (x.size(1))");
  if (b.has_value()) {
    check_ndim(*b, 1, op, "b", "[Co]");
    check_like(*b, x, op, "b");
    TORCH_CHECK(b->size(0) == w.size(0), where(op), "b has length ", b->size(0), " but w has ", w.size(0),
                " output channels");
  }
  TORCH_CHECK(x.size(1) <= 4 || w.size(0) <= 4, where(op), "Ci = ", x.size(1), " and Co = ", w.size(0),
              " are both > 4: the direct kernel serves Ci <= 4 or Co <= 4");
  if (pool) {
    TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, where(op), "the 2x2 pool needs H and W >= 2, got x of shape ",
                x.sizes());
  }
  gk::ConvShape s{};
  s.N = x.size(0);
  s.Ci = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.Co = w.size(0);
  for (int i = 0; i < 4; ++i) s.xs[i] = x.stride(i);
  s.cl = format_of(x) == at::MemoryFormat::ChannelsLast;
  return s;
}

std::tuple<at::Tensor, at::Tensor> conv3x3_small(const at::Tensor& x, const at::Tensor& w,
                                                 const std::optional<at::Tensor>& b, c10::string_view act,
                                                 double alpha, double gain, std::optional<double> clamp, bool pool) {
  const char* op = "conv3x3_small";
  gk::ConvShape s = conv_checks(x, w, b, pool, op);
  gk::Epilogue e = make_epilogue(act, alpha, gain, clamp, op);
  require_cuda(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = format_of(x);
  at::Tensor wc = w.contiguous();
  at::Tensor bc = b.has_value() ? b->contiguous() : at::Tensor();
  const int64_t Ho = pool ? s.H / 2 : s.H, Wo = pool ? s.W / 2 : s.W;
  at::Tensor out = poisoned(at::empty({s.N, s.Co, Ho, Wo}, x.options().memory_format(fmt)));
  at::Tensor saved = pool ? poisoned(at::empty({s.N, s.Co, Ho, Wo}, x.options().dtype(at::kChar).memory_format(fmt)))
                          : at::empty({0}, x.options());
  check_launch(gk::launch_conv3x3_small_fwd(dtype_code(x, op, "x"), x.data_ptr(), wc.data_ptr(),
                                            bc.defined() ? bc.data_ptr() : nullptr, out.data_ptr(),
                                            pool ? saved.data_ptr<int8_t>() : nullptr, s, e, pool,
                                            c10::cuda::getCurrentCUDAStream()),
               op);
  return {out, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3x3_small_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
    const at::Tensor& saved, const std::optional<at::Tensor>& y, c10::string_view act, double alpha, double gain,
    std::optional<double> clamp, bool pool, std::array<bool, 3> needs) {
  const char* op = "conv3x3_small_backward";
  gk::ConvShape s = conv_checks(x, w, b, pool, op);
  gk::Epilogue e = make_epilogue(act, alpha, gain, clamp, op);
  check_like(grad, x, op, "grad");
  const int64_t Ho = pool ? s.H / 2 : s.H, Wo = pool ? s.W / 2 : s.W;
  const std::vector<int64_t> out_shape = {s.N, s.Co, Ho, Wo};
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(out_shape), where(op), "grad must have the output's shape ",
              at::IntArrayRef(out_shape), ", got ", grad.sizes());
  if (pool) {
    TORCH_CHECK(saved.scalar_type() == at::kChar && saved.sizes() == at::IntArrayRef(out_shape), where(op),
                "saved must be the forward's int8 argmax of shape ", at::IntArrayRef(out_shape), ", got ",
                saved.scalar_type(), " of shape ", saved.sizes());
    TORCH_CHECK(saved.device() == x.device(), where(op), "saved is on ", saved.device(), " but x is on ", x.device());
  }
  if (y.has_value()) {
    check_like(*y, x, op, "y");
    TORCH_CHECK(y->sizes() == at::IntArrayRef(out_shape), where(op), "y must be the forward's output, of shape ",
                at::IntArrayRef(out_shape), ", got ", y->sizes());
  }
  require_cuda(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dt = dtype_code(x, op, "x");
  const auto fmt = format_of(x);
  at::Tensor g = grad.contiguous(fmt);
  at::Tensor am = pool ? saved.contiguous(fmt) : at::Tensor();
  at::Tensor wc = w.contiguous();
  at::Tensor bc = b.has_value() ? b->contiguous() : at::Tensor();
  const void* bptr = bc.defined() ? bc.data_ptr() : nullptr;
  const int8_t* amptr = pool ? am.data_ptr<int8_t>() : nullptr;
  const bool fused = s.Ci <= 4;
  const bool want_gw = needs[1], want_gb = needs[2] && b.has_value();
  // The fused kernel reads the activation's derivative off y where that is exact.
  at::Tensor yc = (fused && y.has_value()) ? y->contiguous(fmt) : at::Tensor();

  at::Tensor gp;  // dL/d(pre-activation), [N, Co, H, W] in x's format
  if (needs[0] || !fused) gp = poisoned(at::empty({s.N, s.Co, s.H, s.W}, x.options().memory_format(fmt)));
  if (!fused) {
    check_launch(gk::launch_conv3x3_small_gp(dt, x.data_ptr(), wc.data_ptr(), bptr, g.data_ptr(), amptr,
                                             gp.data_ptr(), s, e, pool, stream),
                 op);
  }
  at::Tensor gw32, gb32;
  if (want_gw) gw32 = poisoned(at::empty({s.Co, s.Ci, 3, 3}, x.options().dtype(at::kFloat)));
  if (want_gb) gb32 = poisoned(at::empty({s.Co}, x.options().dtype(at::kFloat)));
  // The fused kernel also produces gp for the input gradient, so it runs whenever any
  // gradient is needed; the unfused one only for gw / gb.
  if (fused ? (want_gw || want_gb || needs[0]) : (want_gw || want_gb)) {
    at::Tensor partial =
        poisoned(at::empty({gk::conv3x3_small_wgrad_partial_numel(s, fused)}, x.options().dtype(at::kFloat)));
    check_launch(gk::launch_conv3x3_small_wgrad(dt, fused, x.data_ptr(), wc.data_ptr(), bptr, g.data_ptr(), amptr,
                                                fused ? nullptr : gp.data_ptr(),
                                                (fused && needs[0]) ? gp.data_ptr() : nullptr,
                                                yc.defined() ? yc.data_ptr() : nullptr, partial.data_ptr<float>(), want_gw ? gw32.data_ptr<float>() : nullptr,
                                                want_gb ? gb32.data_ptr<float>() : nullptr, s, e, pool, stream),
                 op);
  }
  at::Tensor gx = at::empty({0}, x.options());
  if (needs[0]) {
    // dL/dx = conv3x3(gp, w flipped and transposed), no bias, linear: the same kernel.
    at::Tensor wt = wc.flip({2, 3}).transpose(0, 1).contiguous();
    gx = poisoned(at::empty(x.sizes(), x.options().memory_format(fmt)));
    gk::ConvShape t = s;
    t.Ci = s.Co;
    t.Co = s.Ci;
    for (int i = 0; i < 4; ++i) t.xs[i] = gp.stride(i);
    gk::Epilogue lin{gk::kLinear, 0.f, 1.f, 0.f, 0};
    check_launch(gk::launch_conv3x3_small_fwd(dt, gp.data_ptr(), wt.data_ptr(), nullptr, gx.data_ptr(), nullptr, t, lin,
                                              false, stream),
                 op);
  }
  at::Tensor gw_out = want_gw ? gw32.to(w.scalar_type()) : at::empty({0}, x.options());
  at::Tensor gb_out = want_gb ? gb32.to(b->scalar_type()) : at::empty({0}, x.options());
  return {gx, gw_out, gb_out};
}

// ---------------------------------------------------------------------------------
// The GPU check: "" when CUDA device `device` can run this library's kernels, else the
// CUDA error every launch would fail with (e.g. a GPU newer than the archs built).

std::string kernel_image_error(int64_t device) {
  TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), where("kernel_image_error"), "device ", device,
              " is not a visible CUDA device (", static_cast<int>(c10::cuda::device_count()), " visible)");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaError_t err = gk::kernel_image_status();
  if (err == cudaSuccess) return "";
  (void)cudaGetLastError();  // not sticky: clear it so torch's next check does not see it
  return cudaGetErrorString(err);
}

}  // namespace

TORCH_LIBRARY(gankernels_cuda, m) {
  m.set_python_module("gankernels.cuda.loader");
  m.def("kernel_image_error(int device) -> str", &kernel_image_error);
  m.def("bias_act(Tensor x, Tensor? b, str act, float alpha, float gain, float? clamp, int dim) -> Tensor");
  m.def(
      "bias_act_backward(Tensor grad, Tensor x, Tensor? b, str act, float alpha, float gain, float? clamp, int dim) "
      "-> Tensor");
  m.def(
      "max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode, "
      "bool return_indices) -> (Tensor, Tensor)");
  m.def(
      "max_pool2d_backward(Tensor grad, Tensor x, Tensor saved, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> Tensor");
  m.def("upsample_nearest2d(Tensor x, int scale_factor) -> Tensor");
  m.def("upsample_nearest2d_backward(Tensor grad, int scale_factor) -> Tensor");
  m.def(
      "conv3x3_small(Tensor x, Tensor w, Tensor? b, str act, float alpha, float gain, float? clamp, bool pool) "
      "-> (Tensor, Tensor)");
  m.def(
      "conv3x3_small_backward(Tensor grad, Tensor x, Tensor w, Tensor? b, Tensor saved, Tensor? y, str act, "
      "float alpha, float gain, float? clamp, bool pool, bool[3] needs) -> (Tensor, Tensor, Tensor)");
}

#define GK_REGISTER_IMPLS(m)                                             \
  m.impl("bias_act", &bias_act);                                        \
  m.impl("bias_act_backward", &bias_act_backward);                      \
  m.impl("max_pool2d", &max_pool2d);                                    \
  m.impl("max_pool2d_backward", &max_pool2d_backward);                  \
  m.impl("upsample_nearest2d", &upsample_nearest2d);                    \
  m.impl("upsample_nearest2d_backward", &upsample_nearest2d_backward);  \
  m.impl("conv3x3_small", &conv3x3_small);                              \
  m.impl("conv3x3_small_backward", &conv3x3_small_backward);

TORCH_LIBRARY_IMPL(gankernels_cuda, CUDA, m) { GK_REGISTER_IMPLS(m) }
// CPU: the argument checks run, then "expected CUDA tensors".
TORCH_LIBRARY_IMPL(gankernels_cuda, CPU, m) { GK_REGISTER_IMPLS(m) }

// `import gankernels._C` (or the JIT-built module) registers the ops above; the module
// itself is empty.
#define GK_CONCAT_(a, b) a##b
#define GK_CONCAT(a, b) GK_CONCAT_(a, b)
#define GK_STR_(a) #a
#define GK_STR(a) GK_STR_(a)
extern "C" PyMODINIT_FUNC GK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, GK_STR(TORCH_EXTENSION_NAME),
                                   "gankernels CUDA kernels; importing this registers torch.ops.gankernels_cuda.*", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
