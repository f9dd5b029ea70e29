// CPU kernels for the ViT's elementwise and row-wise work (softmax, exact GELU, LayerNorm), forward and
// backward, in float32 and float64. Paddle's own CPU kernels for these run on one thread, without SIMD
// (bench/README: softmax of [8, 12, 197, 197] 7 ms vs torch's 1.9 ms). Here every kernel splits its rows
// over the OpenMP threads (each row is done by one thread, in a fixed order: results do not depend on the
// thread count, except the LayerNorm weight/bias gradients, which are summed per thread in a fixed
// order) and its inner loops are SIMD loops.
//
// float64 uses the C library's exp and erf: the float64 parity tests check these kernels against torch.
// float32 uses the polynomial exp (Cephes' expf: range reduction by ln 2, degree-7 polynomial; ~1 ulp) and
// erf (Abramowitz & Stegun 7.1.26, absolute error < 1.5e-7) below, which the compiler vectorises.
// Math constants: the definitions; nothing here is taken from another project's code.
//
// Convolution support (im2col / col2im, the data rearrangement around the GEMM of a convolution): Paddle's
// CPU convolution does it on one thread, which made its 3x3 convolutions ~1.5-2x slower than the GEMM they
// contain. Here it is split over (image, channel) planes; the GEMMs run in Paddle (MKL).
//
// Instruction sets: the kernels (kernels_impl.h) are compiled three times, for AVX-512 (F/CD/BW/DQ/VL,
// 512-bit vectors), AVX2+FMA and baseline x86-64, and the widest one this CPU supports runs (see below).
#include "paddle/extension.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include <dlfcn.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// ---------------------------------------------------------------------------------------------------------
// One copy of every kernel per instruction set (kernels_impl.h included three times, each compiled for its
// ISA by a target pragma), chosen at run time: the library itself is built for baseline x86-64, so a kernel
// cache copied to another machine never runs an instruction that machine lacks. The widest variant this CPU
// supports is the default; moco_set_isa selects a narrower one (MOCO_CPU_ISA, tests), never a wider one.

struct ConvGeom {
  int64_t N, C, H, W, KH, KW, SH, SW, PH, PW, HO, WO;
  bool cn;  // columns laid out [C*KH*KW, N, HO*WO] (one GEMM for the whole batch) instead of [N, C*KH*KW, HO*WO]
  // offset of the column row (n, c, kernel position ij)
  inline int64_t row(int64_t n, int64_t c, int64_t ij) const {
    const int64_t L = HO * WO, KK = KH * KW;
    return cn ? ((c * KK + ij) * N + n) * L : ((n * C + c) * KK + ij) * L;
  }
  // the output columns ow whose input column ow*SW - PW + j lies in [0, W)
  inline void ow_range(int64_t j, int64_t* lo, int64_t* hi) const {
    int64_t a = PW - j;  // ow*SW >= a
    *lo = a <= 0 ? 0 : (a + SW - 1) / SW;
    int64_t b = W - 1 + PW - j;  // ow*SW <= b
    *hi = b < 0 ? 0 : std::min(WO, b / SW + 1);
    if (*lo > *hi) *lo = *hi;
  }
};

// BLAS for the fused attention (kernels_impl.h): cblas_sgemm / cblas_dgemm of the MKL in Paddle's wheel (the
// library Paddle's own matmul runs on), opened at run time (dlopen, path from Python) like oneDNN below; where
// that fails, Python keeps the unfused attention. The CBLAS enums are passed as int (their C ABI). Called from
// inside our OpenMP loops, MKL runs each product on the calling thread: MKL does so by itself inside a parallel
// region (MKL_DYNAMIC, its default), and OneThread below also says so through MKL's per-thread setting where
// the library has it, so that a user's MKL_DYNAMIC=false cannot nest MKL's threads inside ours.
namespace blas {
enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };  // CBLAS_LAYOUT, CBLAS_TRANSPOSE
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                         int);
typedef void (*dgemm_fn)(int, int, int, int, int, int, double, const double*, int, const double*, int, double,
                         double*, int);
typedef int (*set_threads_local_fn)(int);  // MKL_Set_Num_Threads_Local: returns the previous setting
struct State {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
  set_threads_local_fn set_threads_local = nullptr;  // optional
  bool ok = false;
  std::mutex mu;
};
State g_blas;

// MKL runs the products of the calling thread on that thread while this lives (restored after)
struct OneThread {
  int prev = 0;
  OneThread() {
    if (g_blas.set_threads_local != nullptr) prev = g_blas.set_threads_local(1);
  }
  ~OneThread() {
    if (g_blas.set_threads_local != nullptr) g_blas.set_threads_local(prev);
  }
};

bool load(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_blas.mu);
  if (g_blas.ok) return true;
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return false;
  g_blas.sgemm = reinterpret_cast<sgemm_fn>(dlsym(lib, "cblas_sgemm"));
  g_blas.dgemm = reinterpret_cast<dgemm_fn>(dlsym(lib, "cblas_dgemm"));
  g_blas.set_threads_local = reinterpret_cast<set_threads_local_fn>(dlsym(lib, "MKL_Set_Num_Threads_Local"));
  g_blas.ok = g_blas.sgemm != nullptr && g_blas.dgemm != nullptr;
  return g_blas.ok;
}

// row-major C[M, N] = op(A) op(B), op(A) [M, K] (A^T where ta), op(B) [K, N] (B^T where tb)
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc) {
  g_blas.sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(M), int(N), int(K), 1.f, A, int(lda),
               B, int(ldb), 0.f, C, int(ldc));
}
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                 int64_t ldb, double* C, int64_t ldc) {
  g_blas.dgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(M), int(N), int(K), 1., A, int(lda),
               B, int(ldb), 0., C, int(ldc));
}
}  // namespace blas

namespace isa_generic {
#include "kernels_impl.h"
}  // namespace isa_generic

#if defined(__x86_64__) || defined(__i386__)
#define MOCO_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "kernels_impl.h"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512cd,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512")
namespace isa_avx512 {
#include "kernels_impl.h"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

int supported_isa() {
#ifndef MOCO_X86
  return kGeneric;
#else
  __builtin_cpu_init();  // the checks include the OS's support for the wider registers (XCR0)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kGeneric;
#endif
}

const int g_supported = supported_isa();
int g_isa = g_supported;

#ifdef MOCO_X86
#define MOCO_ISA_CALL(fn, ...)                          \
  do {                                                  \
    switch (g_isa) {                                    \
      case kAvx512: isa_avx512::fn(__VA_ARGS__); break; \
      case kAvx2: isa_avx2::fn(__VA_ARGS__); break;     \
      default: isa_generic::fn(__VA_ARGS__); break;     \
    }                                                   \
  } while (0)
#else
#define MOCO_ISA_CALL(fn, ...) isa_generic::fn(__VA_ARGS__)
#endif

// isa < 0: the widest supported; else min(isa, supported). Returns [active, supported].
std::vector<paddle::Tensor> SetIsa(const paddle::Tensor& x, int isa) {
  g_isa = isa < 0 ? g_supported : std::min(isa, g_supported);
  auto out = paddle::empty({2}, paddle::DataType::INT64, x.place());
  out.data<int64_t>()[0] = g_isa;
  out.data<int64_t>()[1] = g_supported;
  return {out};
}

int64_t rows_of(const paddle::Tensor& x) {
  const auto shape = x.shape();
  return x.numel() / shape.back();
}

void check_cpu(const paddle::Tensor& x, const char* what) {
  PD_CHECK(x.is_cpu(), what, ": the tensor must be on the CPU");
  PD_CHECK(x.is_contiguous(), what, ": the tensor must be contiguous");
}

// ---------------------------------------------------------------------------------------------------------
// softmax over the last axis of scale * x

std::vector<paddle::Tensor> SoftmaxForward(const paddle::Tensor& x, double scale) {
  check_cpu(x, "moco_softmax");
  PD_CHECK(scale > 0, "moco_softmax: scale must be positive");
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  const int64_t C = x.shape().back();
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_softmax", ([&] {
    MOCO_ISA_CALL(softmax_fwd_k<data_t>, x.data<data_t>(), y.data<data_t>(), rows_of(x), C, static_cast<data_t>(scale));
  }));
  return {y};
}

std::vector<paddle::Tensor> SoftmaxBackward(const paddle::Tensor& y, const paddle::Tensor& dy, double scale) {
  check_cpu(y, "moco_softmax_grad");
  check_cpu(dy, "moco_softmax_grad");
  auto dx = paddle::empty(y.shape(), y.dtype(), y.place());
  const int64_t C = y.shape().back();
  PD_DISPATCH_FLOATING_TYPES(y.type(), "moco_softmax_grad", ([&] {
    MOCO_ISA_CALL(softmax_bwd_k<data_t>, y.data<data_t>(), dy.data<data_t>(), dx.data<data_t>(), rows_of(y), C,
                          static_cast<data_t>(scale));
  }));
  return {dx};
}

// ---------------------------------------------------------------------------------------------------------
// multi-head attention from the qkv projection's output: qkv [B, N, 3 * C] (q of every head, then k, then v;
// C = heads * D) -> out [B, N, C] = softmax(scale q k^T) v of each head in its D columns (kernels_impl.h)

struct AttnShape {
  int64_t B, N, H, D;
};

AttnShape attention_shape(const paddle::Tensor& qkv, int64_t heads, const char* what) {
  check_cpu(qkv, what);
  PD_CHECK(blas::g_blas.ok, what, ": BLAS is not loaded (moco_blas_init)");
  const auto s = qkv.shape();
  PD_CHECK(s.size() == 3 && heads > 0 && s[2] % (3 * heads) == 0, what,
           ": expected qkv [B, N, 3 * heads * head_dim]");
  PD_CHECK(s[1] < (int64_t(1) << 30) && s[2] < (int64_t(1) << 30), what, ": too large for BLAS's int sizes");
  return {s[0], s[1], heads, s[2] / (3 * heads)};
}

std::vector<paddle::Tensor> AttentionForward(const paddle::Tensor& qkv, int64_t heads, double scale) {
  const AttnShape a = attention_shape(qkv, heads, "moco_attention");
  PD_CHECK(scale > 0, "moco_attention: scale must be positive");
  auto out = paddle::empty({a.B, a.N, a.H * a.D}, qkv.dtype(), qkv.place());
  PD_DISPATCH_FLOATING_TYPES(qkv.type(), "moco_attention", ([&] {
    MOCO_ISA_CALL(attention_fwd_k<data_t>, qkv.data<data_t>(), out.data<data_t>(), a.B, a.N, a.H, a.D,
                  static_cast<data_t>(scale));
  }));
  return {out};
}

// d(qkv) from qkv and d(out); the attention matrix is recomputed (nothing was kept from the forward)
std::vector<paddle::Tensor> AttentionBackward(const paddle::Tensor& qkv, const paddle::Tensor& dout, int64_t heads,
                                              double scale) {
  const AttnShape a = attention_shape(qkv, heads, "moco_attention_grad");
  check_cpu(dout, "moco_attention_grad");
  PD_CHECK(dout.shape() == std::vector<int64_t>({a.B, a.N, a.H * a.D}) && dout.dtype() == qkv.dtype(),
           "moco_attention_grad: dout must be [B, N, C] in qkv's dtype");
  auto dqkv = paddle::empty(qkv.shape(), qkv.dtype(), qkv.place());
  PD_DISPATCH_FLOATING_TYPES(qkv.type(), "moco_attention_grad", ([&] {
    MOCO_ISA_CALL(attention_bwd_k<data_t>, qkv.data<data_t>(), dout.data<data_t>(), dqkv.data<data_t>(), a.B, a.N,
                  a.H, a.D, static_cast<data_t>(scale));
  }));
  return {dqkv};
}

// [ok] of the BLAS library at `path` (opened once per process)
std::vector<paddle::Tensor> BlasInit(const paddle::Tensor& x, const std::string& path) {
  auto out = paddle::empty({1}, paddle::DataType::INT64, x.place());
  out.data<int64_t>()[0] = blas::load(path);
  return {out};
}

// out = kernel(a, b) elementwise, for two contiguous CPU tensors of one size and dtype: the checks and the output
// once; `call(a, b, out, n)` runs the kernel on the typed pointers.
template <typename Call>
std::vector<paddle::Tensor> binary_op(const paddle::Tensor& a, const paddle::Tensor& b, const char* what, Call call) {
  check_cpu(a, what);
  check_cpu(b, what);
  PD_CHECK(a.numel() == b.numel() && a.dtype() == b.dtype(), what, ": tensors differ");
  auto out = paddle::empty(a.shape(), a.dtype(), a.place());
  PD_DISPATCH_FLOATING_TYPES(a.type(), what, ([&] {
    call(a.data<data_t>(), b.data<data_t>(), out.data<data_t>(), a.numel());
  }));
  return {out};
}

// the elementwise product a * b on all threads (Paddle's CPU multiply runs on one)
std::vector<paddle::Tensor> Mul(const paddle::Tensor& a, const paddle::Tensor& b) {
  return binary_op(a, b, "moco_mul", [](auto* x, auto* y, auto* out, int64_t n) {
    using T = std::remove_pointer_t<decltype(out)>;
    MOCO_ISA_CALL(mul_k<T>, x, y, out, n);
  });
}

// ---------------------------------------------------------------------------------------------------------
// exact GELU: x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2; derivative Phi(x) + x * phi(x)

std::vector<paddle::Tensor> GeluForward(const paddle::Tensor& x) {
  check_cpu(x, "moco_gelu");
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_gelu", ([&] {
    MOCO_ISA_CALL(gelu_fwd_k<data_t>, x.data<data_t>(), y.data<data_t>(), x.numel());
  }));
  return {y};
}

std::vector<paddle::Tensor> GeluSlope(const paddle::Tensor& x) {
  check_cpu(x, "moco_gelu_slope");
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  auto d = paddle::empty(x.shape(), x.dtype(), x.place());
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_gelu_slope", ([&] {
    MOCO_ISA_CALL(gelu_slope_k<data_t>, x.data<data_t>(), y.data<data_t>(), d.data<data_t>(), x.numel());
  }));
  return {y, d};
}

// BatchNorm (training, NCHW) forward: y from the batch statistics; the running mean and variance RM, RV updated in
// place as torch does (momentum = torch's, the weight of the batch; the variance unbiased)

std::vector<paddle::Tensor> BatchNormForward(const paddle::Tensor& x, const paddle::Tensor& w, const paddle::Tensor& b,
                                             paddle::Tensor& rm, paddle::Tensor& rv, double eps, double momentum) {
  for (const paddle::Tensor* t : std::initializer_list<const paddle::Tensor*>{&x, &w, &b, &rm, &rv})
    check_cpu(*t, "moco_batch_norm_");
  const auto xs = x.shape();
  PD_CHECK(xs.size() == 4, "moco_batch_norm_: expected an NCHW tensor");
  for (const paddle::Tensor* t : std::initializer_list<const paddle::Tensor*>{&w, &b, &rm, &rv})
    PD_CHECK(t->numel() == xs[1] && t->dtype() == x.dtype(), "moco_batch_norm_: a per-channel tensor differs");
  PD_CHECK(xs[0] * xs[2] * xs[3] > 1, "moco_batch_norm_: needs more than one value per channel");
  auto y = paddle::empty(xs, x.dtype(), x.place());
  auto mean = paddle::empty({xs[1]}, x.dtype(), x.place());
  auto rstd = paddle::empty({xs[1]}, x.dtype(), x.place());
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_batch_norm_", ([&] {
    MOCO_ISA_CALL(bn_fwd_k<data_t>, x.data<data_t>(), w.data<data_t>(), b.data<data_t>(), y.data<data_t>(),
                  mean.data<data_t>(), rstd.data<data_t>(), rm.data<data_t>(), rv.data<data_t>(), xs[0], xs[1],
                  xs[2] * xs[3], eps, momentum);
  }));
  return {y, mean, rstd};
}

// BatchNorm (training, NCHW) backward: [dx, dweight, dbias] from x, weight, the forward's mean and rstd, and dy

std::vector<paddle::Tensor> BatchNormBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                              const paddle::Tensor& mean, const paddle::Tensor& rstd,
                                              const paddle::Tensor& dy) {
  for (const paddle::Tensor* t : std::initializer_list<const paddle::Tensor*>{&x, &w, &mean, &rstd, &dy})
    check_cpu(*t, "moco_batch_norm_backward");
  const auto xs = x.shape();
  PD_CHECK(xs.size() == 4, "moco_batch_norm_backward: expected an NCHW tensor");
  PD_CHECK(dy.numel() == x.numel() && dy.dtype() == x.dtype(), "moco_batch_norm_backward: dy differs from x");
  for (const paddle::Tensor* t : std::initializer_list<const paddle::Tensor*>{&w, &mean, &rstd})
    PD_CHECK(t->numel() == xs[1] && t->dtype() == x.dtype(), "moco_batch_norm_backward: a per-channel tensor differs");
  auto dx = paddle::empty(xs, x.dtype(), x.place());
  auto dw = paddle::empty({xs[1]}, x.dtype(), x.place());
  auto db = paddle::empty({xs[1]}, x.dtype(), x.place());
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_batch_norm_backward", ([&] {
    MOCO_ISA_CALL(bn_bwd_k<data_t>, x.data<data_t>(), w.data<data_t>(), mean.data<data_t>(), rstd.data<data_t>(),
                  dy.data<data_t>(), dx.data<data_t>(), dw.data<data_t>(), db.data<data_t>(), xs[0], xs[1],
                  xs[2] * xs[3]);
  }));
  return {dx, dw, db};
}

// ReLU's backward from its output (the forward is Paddle's in-place relu_)

std::vector<paddle::Tensor> ReluBackward(const paddle::Tensor& y, const paddle::Tensor& dy) {
  return binary_op(y, dy, "moco_relu_backward", [](auto* yp, auto* dyp, auto* dx, int64_t n) {
    using T = std::remove_pointer_t<decltype(dx)>;
    MOCO_ISA_CALL(relu_bwd_k<T>, yp, dyp, dx, n);
  });
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm over the last axis: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps) (biased var).
// Statistics in T (two passes: the mean, then the squared deviations from it); mean and rstd are kept (in T) for the
// backward.

std::vector<paddle::Tensor> LayerNormForward(const paddle::Tensor& x, const paddle::Tensor& w,
                                             const paddle::Tensor& b, double eps) {
  check_cpu(x, "moco_layer_norm");
  check_cpu(w, "moco_layer_norm");
  check_cpu(b, "moco_layer_norm");
  const int64_t C = x.shape().back(), rows = rows_of(x);
  PD_CHECK(w.numel() == C && b.numel() == C, "moco_layer_norm: weight/bias size != last axis");
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  auto mean = paddle::empty({rows}, x.dtype(), x.place());
  auto rstd = paddle::empty({rows}, x.dtype(), x.place());
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_layer_norm", ([&] {
    MOCO_ISA_CALL(ln_fwd_k<data_t>, x.data<data_t>(), w.data<data_t>(), b.data<data_t>(), y.data<data_t>(),
                     mean.data<data_t>(), rstd.data<data_t>(), rows, C, eps);
  }));
  return {y, mean, rstd};
}

std::vector<paddle::Tensor> LayerNormBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                              const paddle::Tensor& mean, const paddle::Tensor& rstd,
                                              const paddle::Tensor& dy) {
  check_cpu(x, "moco_layer_norm_grad");
  check_cpu(dy, "moco_layer_norm_grad");
  check_cpu(w, "moco_layer_norm_grad");
  const int64_t C = x.shape().back(), rows = rows_of(x);
  auto dx = paddle::empty(x.shape(), x.dtype(), x.place());
  auto dw = paddle::empty({C}, x.dtype(), x.place());
  auto db = paddle::empty({C}, x.dtype(), x.place());
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_layer_norm_grad", ([&] {
    MOCO_ISA_CALL(ln_bwd_k<data_t>, x.data<data_t>(), w.data<data_t>(), mean.data<data_t>(), rstd.data<data_t>(),
                     dy.data<data_t>(), dx.data<data_t>(), dw.data<data_t>(), db.data<data_t>(), rows, C);
  }));
  return {dx, dw, db};
}

// ---------------------------------------------------------------------------------------------------------
// im2col: x [N, C, H, W] -> cols [N, C*KH*KW, HO*WO] (or [C*KH*KW, N*HO*WO]), row (c, i, j) holding x[n, c, oh*SH - PH + i,
// ow*SW - PW + j] (0 outside the image). col2im is its adjoint: dx[n, c, h, w] = the sum of the dcols entries
// that were read from (n, c, h, w); each (n, c) plane is summed by one thread in a fixed order.

ConvGeom make_geom(const std::vector<int64_t>& xs, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                   int64_t pw, bool cn) {
  PD_CHECK(xs.size() == 4, "moco_im2col: expected an NCHW tensor");
  PD_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0, "moco_im2col: bad geometry");
  ConvGeom g{xs[0], xs[1], xs[2], xs[3], kh, kw, sh, sw, ph, pw, 0, 0, cn};
  g.HO = (g.H + 2 * ph - kh) / sh + 1;
  g.WO = (g.W + 2 * pw - kw) / sw + 1;
  PD_CHECK(g.HO > 0 && g.WO > 0, "moco_im2col: kernel larger than the padded input");
  return g;
}

std::vector<paddle::Tensor> Im2Col(const paddle::Tensor& x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                   int64_t ph, int64_t pw, bool cn) {
  check_cpu(x, "moco_im2col");
  const ConvGeom g = make_geom(x.shape(), kh, kw, sh, sw, ph, pw, cn);
  auto cols = cn ? paddle::empty({g.C * kh * kw, g.N * g.HO * g.WO}, x.dtype(), x.place())
                 : paddle::empty({g.N, g.C * kh * kw, g.HO * g.WO}, x.dtype(), x.place());
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_im2col", ([&] {
    MOCO_ISA_CALL(im2col_k<data_t>, x.data<data_t>(), cols.data<data_t>(), g);
  }));
  return {cols};
}

std::vector<paddle::Tensor> Col2Im(const paddle::Tensor& cols, int64_t N, int64_t C, int64_t H, int64_t W,
                                   int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool cn) {
  check_cpu(cols, "moco_col2im");
  const ConvGeom g = make_geom({N, C, H, W}, kh, kw, sh, sw, ph, pw, cn);
  PD_CHECK(cols.numel() == N * C * kh * kw * g.HO * g.WO, "moco_col2im: columns do not match the geometry");
  auto x = paddle::empty({g.N, C, H, W}, cols.dtype(), cols.place());
  PD_DISPATCH_FLOATING_TYPES(cols.type(), "moco_col2im", ([&] {
    MOCO_ISA_CALL(col2im_k<data_t>, cols.data<data_t>(), x.data<data_t>(), g);
  }));
  return {x};
}

// ---------------------------------------------------------------------------------------------------------
// Optimizer-side updates, in place, one pass (or two) over the parameter on all threads. Sums of squares are
// accumulated in double per thread and added in thread order.

void EmaInplace(paddle::Tensor& pm, const paddle::Tensor& pb, double m) {
  check_cpu(pm, "moco_ema_");
  check_cpu(pb, "moco_ema_");
  PD_CHECK(pm.numel() == pb.numel() && pm.dtype() == pb.dtype(), "moco_ema_: tensors differ");
  PD_DISPATCH_FLOATING_TYPES(pm.type(), "moco_ema_", ([&] {
    MOCO_ISA_CALL(ema_k<data_t>, pm.data<data_t>(), pb.data<data_t>(), pm.numel(), static_cast<data_t>(m));
  }));
}

// LARS (official moco-v3 optimizer.py): for a parameter with ndim > 1, dp = g + wd * p and
// q = tc * ||p|| / ||dp|| (1 where either norm is 0), dp *= q; then mu = momentum * mu + dp, p -= lr * mu.

void LarsInplace(paddle::Tensor& p, const paddle::Tensor& g, paddle::Tensor& mu, double lr, double wd,
                 double momentum, double tc, bool adapt) {
  check_cpu(p, "moco_lars_");
  check_cpu(g, "moco_lars_");
  check_cpu(mu, "moco_lars_");
  PD_CHECK(p.numel() == g.numel() && p.numel() == mu.numel(), "moco_lars_: tensors differ in size");
  PD_DISPATCH_FLOATING_TYPES(p.type(), "moco_lars_", ([&] {
    MOCO_ISA_CALL(lars_k<data_t>, p.data<data_t>(), g.data<data_t>(), mu.data<data_t>(), p.numel(), static_cast<data_t>(lr),
                   static_cast<data_t>(wd), static_cast<data_t>(momentum), tc, adapt);
  }));
}

// AdamW with torch's formula (kernels_impl.h adamw_k) on Paddle's accumulators: moment1, moment2 and the
// one-element beta1^t, beta2^t of this step (Paddle's Beta1Pow/Beta2Pow), which are then advanced by one step.

void AdamwInplace(paddle::Tensor& p, const paddle::Tensor& g, paddle::Tensor& m, paddle::Tensor& v,
                  paddle::Tensor& b1pow, paddle::Tensor& b2pow, double lr, double beta1, double beta2, double eps,
                  double wd) {
  const std::vector<const paddle::Tensor*> all{&p, &g, &m, &v, &b1pow, &b2pow};
  for (const paddle::Tensor* t : all) check_cpu(*t, "moco_adamw_");
  PD_CHECK(p.numel() == g.numel() && p.numel() == m.numel() && p.numel() == v.numel(),
           "moco_adamw_: tensors differ in size");
  PD_CHECK(b1pow.numel() == 1 && b2pow.numel() == 1, "moco_adamw_: beta powers must have one element");
  PD_CHECK(g.dtype() == p.dtype() && m.dtype() == p.dtype() && v.dtype() == p.dtype() &&
               b1pow.dtype() == p.dtype() && b2pow.dtype() == p.dtype(),
           "moco_adamw_: tensors differ in dtype");
  PD_DISPATCH_FLOATING_TYPES(p.type(), "moco_adamw_", ([&] {
    data_t* bp1 = b1pow.data<data_t>();
    data_t* bp2 = b2pow.data<data_t>();
    const double bc1 = 1.0 - static_cast<double>(bp1[0]), bc2 = 1.0 - static_cast<double>(bp2[0]);
    MOCO_ISA_CALL(adamw_k<data_t>, p.data<data_t>(), g.data<data_t>(), m.data<data_t>(), v.data<data_t>(), p.numel(),
                  static_cast<data_t>(1.0 - lr * wd), static_cast<data_t>(1.0 - beta1), static_cast<data_t>(beta2),
                  static_cast<data_t>(1.0 - beta2), static_cast<data_t>(-(lr / bc1)),
                  static_cast<data_t>(std::sqrt(bc2)), static_cast<data_t>(eps));
    bp1[0] = bp1[0] * static_cast<data_t>(beta1);
    bp2[0] = bp2[0] * static_cast<data_t>(beta2);
  }));
}

// ---------------------------------------------------------------------------------------------------------
// Direct float32 convolution through oneDNN (forward, backward data, backward weights), the library torch
// uses for its CPU convolutions. Paddle's wheel ships oneDNN (paddle/libs/libdnnl.so.3, the v3.x C API) but
// not its headers, so the few types, enum values and functions used here are declared below, written from
// oneDNN v3.6.2's public headers (include/oneapi/dnnl/dnnl.h, dnnl_common.h, dnnl_types.h,
// dnnl_common_types.h; the library in Paddle 3.3's wheel is 3.6.2): handles are opaque pointers, the C enums
// are passed as int. The library is opened at run time (dlopen, path from Python) and its version checked;
// where that fails, Python keeps the im2col path. oneDNN picks its own tensor layouts (format tag "any");
// plain NCHW / OIHW tensors are reordered to and from them around each primitive. Primitives are built
// once per convolution shape and kept. The forward primitive is created for forward_inference: the same
// computation as forward_training for a convolution (no workspace), and oneDNN 3.6 then picks its brgemm
// kernel (one thread, batch 8: ~2x faster than the jit kernel forward_training gets on the 7x7 stem and the
// strided 256-channel 3x3). oneDNN in Paddle's build runs on the same OpenMP runtime (libgomp) as the kernels
// above, so both use the same thread count. float64 never comes here (oneDNN has no f64
// convolution): the float64 parity path is im2col + GEMM.

namespace dnnl {
typedef void* handle;  // dnnl_engine_t, dnnl_stream_t, dnnl_memory_t, dnnl_memory_desc_t, dnnl_primitive_t, ...
typedef int status;    // dnnl_status_t
struct ExecArg {       // dnnl_exec_arg_t
  int arg;
  handle memory;
};
struct Version {  // dnnl_version_t
  int major, minor, patch;
  const char* hash;
  unsigned cpu_runtime, gpu_runtime;
};
constexpr int kMaxDims = 12;  // DNNL_MAX_NDIMS (dnnl_dims_t = int64_t[12])
enum : int {
  kSuccess = 0,                                               // dnnl_success
  kF32 = 3,                                                   // dnnl_f32
  kTagAny = 1, kTagAbcd = 5,                                  // dnnl_format_tag_any, dnnl_abcd (nchw, oihw)
  kCpu = 1,                                                   // dnnl_cpu
  kInOrder = 1,                                               // dnnl_stream_in_order (the default flags)
  kForwardInference = 96, kBackwardData = 160, kBackwardWeights = 192,  // dnnl_prop_kind_t
  kConvDirect = 1,                                            // dnnl_convolution_direct
  kScratchpadUser = 1,                                        // dnnl_scratchpad_mode_user
  kQuerySrc = 129, kQueryDiffSrc = 130, kQueryWeights = 131,  // dnnl_query_{src,diff_src,weights}_md
  kQueryDiffWeights = 132, kQueryDst = 133, kQueryDiffDst = 134, kQueryScratchpad = 136,
  kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgScratchpad = 80,  // DNNL_ARG_*; FROM = SRC, TO = DST
  kArgDiffSrc = 129, kArgDiffDst = 145, kArgDiffWeights = 161,
};

struct Api {
  const Version* (*version)();
  status (*engine_create)(handle*, int kind, size_t index);
  status (*stream_create)(handle*, handle engine, unsigned flags);
  status (*stream_wait)(handle);
  status (*md_create_with_tag)(handle*, int ndims, const int64_t* dims, int dtype, int tag);
  status (*md_destroy)(handle);
  int (*md_equal)(handle, handle);
  size_t (*md_get_size)(handle);
  status (*memory_create)(handle*, handle md, handle engine, void* data);
  status (*memory_destroy)(handle);
  status (*attr_create)(handle*);
  status (*attr_set_scratchpad_mode)(handle, int);
  status (*conv_fwd_pd)(handle*, handle engine, int prop, int alg, handle src, handle weights, handle bias,
                        handle dst, const int64_t* strides, const int64_t* dilates, const int64_t* pad_l,
                        const int64_t* pad_r, handle attr);
  status (*conv_bwd_data_pd)(handle*, handle engine, int alg, handle diff_src, handle weights, handle diff_dst,
                             const int64_t* strides, const int64_t* dilates, const int64_t* pad_l,
                             const int64_t* pad_r, handle hint_fwd, handle attr);
  status (*conv_bwd_weights_pd)(handle*, handle engine, int alg, handle src, handle diff_weights, handle diff_bias,
                                handle diff_dst, const int64_t* strides, const int64_t* dilates,
                                const int64_t* pad_l, const int64_t* pad_r, handle hint_fwd, handle attr);
  status (*reorder_pd)(handle*, handle src_md, handle src_engine, handle dst_md, handle dst_engine, handle attr);
  handle (*pd_query_md)(handle pd, int what, int index);
  status (*primitive_create)(handle*, handle pd);
  status (*primitive_execute)(handle, handle stream, int nargs, const ExecArg* args);
};

struct State {
  Api api{};
  handle engine = nullptr, stream = nullptr, attr = nullptr;
  int major = 0, minor = 0, patch = 0;
  bool ok = false;
  std::mutex mu;
};
State g_dnnl;

template <typename F>
bool bind(void* lib, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  return *fn != nullptr;
}

bool bind_all(void* lib, Api* a) {
  return bind(lib, "dnnl_version", &a->version) && bind(lib, "dnnl_engine_create", &a->engine_create) &&
         bind(lib, "dnnl_stream_create", &a->stream_create) && bind(lib, "dnnl_stream_wait", &a->stream_wait) &&
         bind(lib, "dnnl_memory_desc_create_with_tag", &a->md_create_with_tag) &&
         bind(lib, "dnnl_memory_desc_destroy", &a->md_destroy) &&
         bind(lib, "dnnl_memory_desc_equal", &a->md_equal) &&
         bind(lib, "dnnl_memory_desc_get_size", &a->md_get_size) &&
         bind(lib, "dnnl_memory_create", &a->memory_create) && bind(lib, "dnnl_memory_destroy", &a->memory_destroy) &&
         bind(lib, "dnnl_primitive_attr_create", &a->attr_create) &&
         bind(lib, "dnnl_primitive_attr_set_scratchpad_mode", &a->attr_set_scratchpad_mode) &&
         bind(lib, "dnnl_convolution_forward_primitive_desc_create", &a->conv_fwd_pd) &&
         bind(lib, "dnnl_convolution_backward_data_primitive_desc_create", &a->conv_bwd_data_pd) &&
         bind(lib, "dnnl_convolution_backward_weights_primitive_desc_create", &a->conv_bwd_weights_pd) &&
         bind(lib, "dnnl_reorder_primitive_desc_create", &a->reorder_pd) &&
         bind(lib, "dnnl_primitive_desc_query_md", &a->pd_query_md) &&
         bind(lib, "dnnl_primitive_create", &a->primitive_create) &&
         bind(lib, "dnnl_primitive_execute", &a->primitive_execute);
}

// Opens the library once (later calls return the first result): 3.x only (the C API declared above).
bool load(const std::string& path) {
  State& s = g_dnnl;
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.ok) return true;
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr || !bind_all(lib, &s.api)) return false;
  const Version* v = s.api.version();
  s.major = v->major, s.minor = v->minor, s.patch = v->patch;
  if (v->major != 3) return false;
  s.ok = s.api.engine_create(&s.engine, kCpu, 0) == kSuccess &&
         s.api.stream_create(&s.stream, s.engine, kInOrder) == kSuccess &&
         s.api.attr_create(&s.attr) == kSuccess && s.api.attr_set_scratchpad_mode(s.attr, kScratchpadUser) == kSuccess;
  return s.ok;
}

void check(status st, const char* what) {
  PD_CHECK(st == kSuccess, "oneDNN ", what, " failed (dnnl_status_t ", st, ")");
}

handle plain_md(int64_t a, int64_t b, int64_t c, int64_t d, int tag) {
  int64_t dims[kMaxDims] = {a, b, c, d};
  handle md = nullptr;
  check(g_dnnl.api.md_create_with_tag(&md, 4, dims, kF32, tag), "dnnl_memory_desc_create_with_tag");
  return md;
}

// A primitive with its scratchpad size (user-managed scratchpad: allocated per call from Paddle's allocator).
struct Prim {
  handle pd = nullptr, prim = nullptr;
  size_t scratch = 0;
};

Prim make_prim(handle pd, const char* what) {
  Prim p;
  p.pd = pd;
  check(g_dnnl.api.primitive_create(&p.prim, pd), what);
  handle md = g_dnnl.api.pd_query_md(pd, kQueryScratchpad, 0);
  p.scratch = md ? g_dnnl.api.md_get_size(md) : 0;
  return p;
}

// One argument of a convolution primitive: the plain (NCHW / OIHW) layout of the Paddle tensor, the layout the
// primitive chose, and the reorder between them (none where they agree).
struct Port {
  handle plain = nullptr, chosen = nullptr;
  Prim reorder;  // plain -> chosen (an input) or chosen -> plain (an output); prim == nullptr: same layout
  size_t bytes = 0;
};

Port make_port(handle plain, handle pd, int query, bool input) {
  Port p;
  p.plain = plain;
  p.chosen = g_dnnl.api.pd_query_md(pd, query, 0);
  PD_CHECK(p.chosen != nullptr, "oneDNN: a convolution primitive has no memory descriptor for query ", query);
  p.bytes = g_dnnl.api.md_get_size(p.chosen);
  if (!g_dnnl.api.md_equal(p.plain, p.chosen)) {
    handle rpd = nullptr;
    handle from = input ? p.plain : p.chosen, to = input ? p.chosen : p.plain;
    check(g_dnnl.api.reorder_pd(&rpd, from, g_dnnl.engine, to, g_dnnl.engine, g_dnnl.attr),
          "dnnl_reorder_primitive_desc_create");
    p.reorder = make_prim(rpd, "dnnl_primitive_create (reorder)");
  }
  return p;
}

// A float32 buffer of at least `bytes` bytes from Paddle's allocator (freed when the tensor goes).
paddle::Tensor scratch_tensor(size_t bytes, const paddle::Place& place) {
  return paddle::empty({static_cast<int64_t>(bytes / sizeof(float) + 1)}, paddle::DataType::FLOAT32, place);
}

void execute(const Prim& p, std::vector<ExecArg> args, const paddle::Place& place) {
  paddle::Tensor pad;
  handle pad_mem = nullptr;
  if (p.scratch > 0) {
    pad = scratch_tensor(p.scratch, place);
    handle md = g_dnnl.api.pd_query_md(p.pd, kQueryScratchpad, 0);
    check(g_dnnl.api.memory_create(&pad_mem, md, g_dnnl.engine, pad.data<float>()), "dnnl_memory_create");
    args.push_back({kArgScratchpad, pad_mem});
  }
  status st = g_dnnl.api.primitive_execute(p.prim, g_dnnl.stream, static_cast<int>(args.size()), args.data());
  if (st == kSuccess) st = g_dnnl.api.stream_wait(g_dnnl.stream);
  if (pad_mem) g_dnnl.api.memory_destroy(pad_mem);
  check(st, "dnnl_primitive_execute");
}

// A Paddle tensor's data bound to a port for one call: memory objects (and a temporary buffer in the chosen
// layout, where it differs) that live as long as this object.
class Bound {
 public:
  Bound(const Port& port, void* data, const paddle::Place& place, bool input) : port_(port), place_(place) {
    check(g_dnnl.api.memory_create(&user_, port.plain, g_dnnl.engine, data), "dnnl_memory_create");
    if (port.reorder.prim == nullptr) {
      mem_ = user_;
      return;
    }
    tmp_ = scratch_tensor(port.bytes, place);
    check(g_dnnl.api.memory_create(&mem_, port.chosen, g_dnnl.engine, tmp_.data<float>()), "dnnl_memory_create");
    if (input) execute(port.reorder, {{kArgSrc, user_}, {kArgDst, mem_}}, place);
  }
  handle mem() const { return mem_; }
  void write_back() {  // an output: the chosen layout -> the Paddle tensor
    if (mem_ != user_) execute(port_.reorder, {{kArgSrc, mem_}, {kArgDst, user_}}, place_);
  }
  ~Bound() {
    if (mem_ != user_ && mem_) g_dnnl.api.memory_destroy(mem_);
    if (user_) g_dnnl.api.memory_destroy(user_);
  }
  Bound(const Bound&) = delete;
  Bound& operator=(const Bound&) = delete;

 private:
  const Port& port_;
  paddle::Place place_;
  handle user_ = nullptr, mem_ = nullptr;
  paddle::Tensor tmp_;
};

// The primitives of one convolution shape (N, C, H, W, Co, KH, KW, SH, SW, PH, PW): forward built at once,
// the two backward ones at their first use.
struct Conv {
  int64_t N, C, H, W, CO, KH, KW, SH, SW, PH, PW, HO, WO;
  handle x_md, w_md, y_md;  // plain layouts
  Prim fwd, bwd_data, bwd_weights;
  Port f_src, f_w, f_dst, d_ddst, d_w, d_dsrc, w_src, w_ddst, w_dw;
};

struct ConvDims {
  int64_t strides[kMaxDims], dilates[kMaxDims], pad_l[kMaxDims], pad_r[kMaxDims];
};

// oneDNN's padding on the bottom/right: what makes (H + pad_l + pad_r - KH) / SH + 1 = HO exact, as in
// oneDNN's own convention (pad_r = (HO - 1) * SH + KH - H - pad_l; may be negative when rows are dropped).
ConvDims conv_dims(const Conv& c) {
  ConvDims d{};
  d.strides[0] = c.SH, d.strides[1] = c.SW;
  d.pad_l[0] = c.PH, d.pad_l[1] = c.PW;
  d.pad_r[0] = (c.HO - 1) * c.SH + c.KH - c.H - c.PH;
  d.pad_r[1] = (c.WO - 1) * c.SW + c.KW - c.W - c.PW;
  return d;
}

void build_forward(Conv* c) {
  Api& a = g_dnnl.api;
  const ConvDims d = conv_dims(*c);
  handle src = plain_md(c->N, c->C, c->H, c->W, kTagAny), wts = plain_md(c->CO, c->C, c->KH, c->KW, kTagAny),
         dst = plain_md(c->N, c->CO, c->HO, c->WO, kTagAny), pd = nullptr;
  check(a.conv_fwd_pd(&pd, g_dnnl.engine, kForwardInference, kConvDirect, src, wts, nullptr, dst, d.strides,
                      d.dilates, d.pad_l, d.pad_r, g_dnnl.attr),
        "dnnl_convolution_forward_primitive_desc_create");
  for (handle md : {src, wts, dst}) a.md_destroy(md);  // the primitive keeps its own copies
  c->fwd = make_prim(pd, "dnnl_primitive_create (convolution forward)");
  c->f_src = make_port(c->x_md, pd, kQuerySrc, true);
  c->f_w = make_port(c->w_md, pd, kQueryWeights, true);
  c->f_dst = make_port(c->y_md, pd, kQueryDst, false);
}

void build_backward_data(Conv* c) {
  Api& a = g_dnnl.api;
  const ConvDims d = conv_dims(*c);
  handle dsrc = plain_md(c->N, c->C, c->H, c->W, kTagAny), wts = plain_md(c->CO, c->C, c->KH, c->KW, kTagAny),
         ddst = plain_md(c->N, c->CO, c->HO, c->WO, kTagAny), pd = nullptr;
  check(a.conv_bwd_data_pd(&pd, g_dnnl.engine, kConvDirect, dsrc, wts, ddst, d.strides, d.dilates, d.pad_l,
                           d.pad_r, c->fwd.pd, g_dnnl.attr),
        "dnnl_convolution_backward_data_primitive_desc_create");
  for (handle md : {dsrc, wts, ddst}) a.md_destroy(md);  // the primitive keeps its own copies
  c->bwd_data = make_prim(pd, "dnnl_primitive_create (convolution backward data)");
  c->d_ddst = make_port(c->y_md, pd, kQueryDiffDst, true);
  c->d_w = make_port(c->w_md, pd, kQueryWeights, true);
  c->d_dsrc = make_port(c->x_md, pd, kQueryDiffSrc, false);
}

void build_backward_weights(Conv* c) {
  Api& a = g_dnnl.api;
  const ConvDims d = conv_dims(*c);
  handle src = plain_md(c->N, c->C, c->H, c->W, kTagAny), dw = plain_md(c->CO, c->C, c->KH, c->KW, kTagAny),
         ddst = plain_md(c->N, c->CO, c->HO, c->WO, kTagAny), pd = nullptr;
  check(a.conv_bwd_weights_pd(&pd, g_dnnl.engine, kConvDirect, src, dw, nullptr, ddst, d.strides, d.dilates,
                              d.pad_l, d.pad_r, c->fwd.pd, g_dnnl.attr),
        "dnnl_convolution_backward_weights_primitive_desc_create");
  for (handle md : {src, dw, ddst}) a.md_destroy(md);  // the primitive keeps its own copies
  c->bwd_weights = make_prim(pd, "dnnl_primitive_create (convolution backward weights)");
  c->w_src = make_port(c->x_md, pd, kQuerySrc, true);
  c->w_ddst = make_port(c->y_md, pd, kQueryDiffDst, true);
  c->w_dw = make_port(c->w_md, pd, kQueryDiffWeights, false);
}

// The cached primitives of a shape (kept for the life of the process: a training run repeats its shapes).
Conv& conv_for(const std::vector<int64_t>& xs, const std::vector<int64_t>& ws, int64_t sh, int64_t sw, int64_t ph,
               int64_t pw) {
  static std::map<std::array<int64_t, 11>, std::unique_ptr<Conv>> cache;
  PD_CHECK(g_dnnl.ok, "moco_dnnl_conv: oneDNN is not loaded (call moco_dnnl_init first)");
  PD_CHECK(xs.size() == 4 && ws.size() == 4 && xs[1] == ws[1], "moco_dnnl_conv: expected NCHW x and OIHW weight");
  PD_CHECK(sh > 0 && sw > 0 && ph >= 0 && pw >= 0, "moco_dnnl_conv: bad geometry");
  const std::array<int64_t, 11> key{xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], sh, sw, ph, pw};
  std::lock_guard<std::mutex> lock(g_dnnl.mu);
  auto& slot = cache[key];
  if (!slot) {
    auto c = std::make_unique<Conv>();
    *c = Conv{xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], sh, sw, ph, pw, 0, 0};
    c->HO = (c->H + 2 * ph - c->KH) / sh + 1;
    c->WO = (c->W + 2 * pw - c->KW) / sw + 1;
    PD_CHECK(c->HO > 0 && c->WO > 0, "moco_dnnl_conv: kernel larger than the padded input");
    c->x_md = plain_md(c->N, c->C, c->H, c->W, kTagAbcd);
    c->w_md = plain_md(c->CO, c->C, c->KH, c->KW, kTagAbcd);
    c->y_md = plain_md(c->N, c->CO, c->HO, c->WO, kTagAbcd);
    build_forward(c.get());
    slot = std::move(c);
  }
  return *slot;
}

// Runs primitive `p` on two inputs and one output, each a Paddle tensor's data in its plain layout (reordered to
// and from the layouts the primitive chose), bound in this order: input a, input b, output.
void run(const Prim& p, const Port& in_a, int arg_a, const float* a, const Port& in_b, int arg_b, const float* b,
         const Port& out, int arg_out, float* y, const paddle::Place& place) {
  Bound ba(in_a, const_cast<float*>(a), place, true);
  Bound bb(in_b, const_cast<float*>(b), place, true);
  Bound bo(out, y, place, false);
  execute(p, {{arg_a, ba.mem()}, {arg_b, bb.mem()}, {arg_out, bo.mem()}}, place);
  bo.write_back();
}

// Builds a backward primitive of `c` at its first use (`built`: whether it exists).
void build_once(Conv* c, const Prim& built, void (*build)(Conv*)) {
  std::lock_guard<std::mutex> lock(g_dnnl.mu);
  if (built.prim == nullptr) build(c);
}

void check_f32(const paddle::Tensor& t, const char* what) {
  check_cpu(t, what);
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, what, ": oneDNN convolutions are float32 only");
}

}  // namespace dnnl

// [ok, major, minor, patch] of the oneDNN library at `path` (opened once per process).
std::vector<paddle::Tensor> DnnlInit(const paddle::Tensor& x, const std::string& path) {
  const bool ok = dnnl::load(path);
  auto out = paddle::empty({4}, paddle::DataType::INT64, x.place());
  int64_t* o = out.data<int64_t>();
  o[0] = ok, o[1] = dnnl::g_dnnl.major, o[2] = dnnl::g_dnnl.minor, o[3] = dnnl::g_dnnl.patch;
  return {out};
}

std::vector<paddle::Tensor> DnnlConvForward(const paddle::Tensor& x, const paddle::Tensor& w, int64_t sh, int64_t sw,
                                            int64_t ph, int64_t pw) {
  dnnl::check_f32(x, "moco_dnnl_conv");
  dnnl::check_f32(w, "moco_dnnl_conv");
  dnnl::Conv& c = dnnl::conv_for(x.shape(), w.shape(), sh, sw, ph, pw);
  auto y = paddle::empty({c.N, c.CO, c.HO, c.WO}, x.dtype(), x.place());
  dnnl::run(c.fwd, c.f_src, dnnl::kArgSrc, x.data<float>(), c.f_w, dnnl::kArgWeights, w.data<float>(), c.f_dst,
            dnnl::kArgDst, y.data<float>(), x.place());
  return {y};
}

// dx from dy and the weight; H, W: the input's size (several input sizes give one output size when SH > 1).
std::vector<paddle::Tensor> DnnlConvBackwardData(const paddle::Tensor& w, const paddle::Tensor& dy, int64_t H,
                                                 int64_t W, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  dnnl::check_f32(w, "moco_dnnl_conv_grad_x");
  dnnl::check_f32(dy, "moco_dnnl_conv_grad_x");
  const auto ws = w.shape();
  dnnl::Conv& c = dnnl::conv_for({dy.shape()[0], ws[1], H, W}, ws, sh, sw, ph, pw);
  PD_CHECK(dy.shape() == std::vector<int64_t>({c.N, c.CO, c.HO, c.WO}),
           "moco_dnnl_conv_grad_x: dy has the wrong shape");
  dnnl::build_once(&c, c.bwd_data, dnnl::build_backward_data);
  auto dx = paddle::empty({c.N, c.C, c.H, c.W}, dy.dtype(), dy.place());
  dnnl::run(c.bwd_data, c.d_ddst, dnnl::kArgDiffDst, dy.data<float>(), c.d_w, dnnl::kArgWeights, w.data<float>(),
            c.d_dsrc, dnnl::kArgDiffSrc, dx.data<float>(), dy.place());
  return {dx};
}

std::vector<paddle::Tensor> DnnlConvBackwardWeights(const paddle::Tensor& x, const paddle::Tensor& dy, int64_t kh,
                                                    int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  dnnl::check_f32(x, "moco_dnnl_conv_grad_w");
  dnnl::check_f32(dy, "moco_dnnl_conv_grad_w");
  dnnl::Conv& c = dnnl::conv_for(x.shape(), {dy.shape()[1], x.shape()[1], kh, kw}, sh, sw, ph, pw);
  PD_CHECK(dy.shape() == std::vector<int64_t>({c.N, c.CO, c.HO, c.WO}),
           "moco_dnnl_conv_grad_w: dy has the wrong shape");
  dnnl::build_once(&c, c.bwd_weights, dnnl::build_backward_weights);
  auto dw = paddle::empty({c.CO, c.C, c.KH, c.KW}, x.dtype(), x.place());
  dnnl::run(c.bwd_weights, c.w_src, dnnl::kArgSrc, x.data<float>(), c.w_ddst, dnnl::kArgDiffDst, dy.data<float>(),
            c.w_dw, dnnl::kArgDiffWeights, dw.data<float>(), x.place());
  return {dw};
}

}  // namespace

PD_BUILD_OP(moco_set_isa)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"isa: int"})
    .SetKernelFn(PD_KERNEL(SetIsa));

PD_BUILD_OP(moco_softmax)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"scale: double"})
    .SetKernelFn(PD_KERNEL(SoftmaxForward));

PD_BUILD_OP(moco_softmax_grad_k)
    .Inputs({"Y", "DY"})
    .Outputs({"DX"})
    .Attrs({"scale: double"})
    .SetKernelFn(PD_KERNEL(SoftmaxBackward));

PD_BUILD_OP(moco_gelu)
    .Inputs({"X"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(GeluForward));

PD_BUILD_OP(moco_gelu_slope)
    .Inputs({"X"})
    .Outputs({"Out", "Slope"})
    .SetKernelFn(PD_KERNEL(GeluSlope));

PD_BUILD_OP(moco_mul)
    .Inputs({"A", "B"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(Mul));

PD_BUILD_OP(moco_batch_norm_)
    .Inputs({"X", "W", "B", "RM", "RV"})
    .Outputs({"Y", "Mean", "Rstd", "RMOut", "RVOut"})
    .Attrs({"eps: double", "momentum: double"})
    .SetInplaceMap({{"RM", "RMOut"}, {"RV", "RVOut"}})
    .SetKernelFn(PD_KERNEL(BatchNormForward));

PD_BUILD_OP(moco_batch_norm_backward)
    .Inputs({"X", "W", "Mean", "Rstd", "DY"})
    .Outputs({"DX", "DW", "DB"})
    .SetKernelFn(PD_KERNEL(BatchNormBackward));

PD_BUILD_OP(moco_relu_backward)
    .Inputs({"Y", "DY"})
    .Outputs({"DX"})
    .SetKernelFn(PD_KERNEL(ReluBackward));

PD_BUILD_OP(moco_layer_norm)
    .Inputs({"X", "W", "B"})
    .Outputs({"Y", "Mean", "Rstd"})
    .Attrs({"eps: double"})
    .SetKernelFn(PD_KERNEL(LayerNormForward));

PD_BUILD_OP(moco_layer_norm_grad_k)
    .Inputs({"X", "W", "Mean", "Rstd", "DY"})
    .Outputs({"DX", "DW", "DB"})
    .SetKernelFn(PD_KERNEL(LayerNormBackward));

PD_BUILD_OP(moco_im2col)
    .Inputs({"X"})
    .Outputs({"Cols"})
    .Attrs({"kh: int64_t", "kw: int64_t", "sh: int64_t", "sw: int64_t", "ph: int64_t", "pw: int64_t", "cn: bool"})
    .SetKernelFn(PD_KERNEL(Im2Col));

PD_BUILD_OP(moco_col2im)
    .Inputs({"Cols"})
    .Outputs({"X"})
    .Attrs({"N: int64_t", "C: int64_t", "H: int64_t", "W: int64_t", "kh: int64_t", "kw: int64_t", "sh: int64_t",
            "sw: int64_t", "ph: int64_t", "pw: int64_t", "cn: bool"})
    .SetKernelFn(PD_KERNEL(Col2Im));

PD_BUILD_OP(moco_ema_)
    .Inputs({"PM", "PB"})
    .Outputs({"PMOut"})
    .Attrs({"m: double"})
    .SetInplaceMap({{"PM", "PMOut"}})
    .SetKernelFn(PD_KERNEL(EmaInplace));

PD_BUILD_OP(moco_lars_)
    .Inputs({"P", "G", "Mu"})
    .Outputs({"POut", "MuOut"})
    .Attrs({"lr: double", "wd: double", "momentum: double", "tc: double", "adapt: bool"})
    .SetInplaceMap({{"P", "POut"}, {"Mu", "MuOut"}})
    .SetKernelFn(PD_KERNEL(LarsInplace));

PD_BUILD_OP(moco_adamw_)
    .Inputs({"P", "G", "M1", "M2", "B1Pow", "B2Pow"})
    .Outputs({"POut", "M1Out", "M2Out", "B1PowOut", "B2PowOut"})
    .Attrs({"lr: double", "beta1: double", "beta2: double", "eps: double", "wd: double"})
    .SetInplaceMap({{"P", "POut"}, {"M1", "M1Out"}, {"M2", "M2Out"}, {"B1Pow", "B1PowOut"}, {"B2Pow", "B2PowOut"}})
    .SetKernelFn(PD_KERNEL(AdamwInplace));

PD_BUILD_OP(moco_blas_init)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"path: std::string"})
    .SetKernelFn(PD_KERNEL(BlasInit));

PD_BUILD_OP(moco_attention)
    .Inputs({"QKV"})
    .Outputs({"Out"})
    .Attrs({"heads: int64_t", "scale: double"})
    .SetKernelFn(PD_KERNEL(AttentionForward));

PD_BUILD_OP(moco_attention_grad)
    .Inputs({"QKV", "DOut"})
    .Outputs({"DQKV"})
    .Attrs({"heads: int64_t", "scale: double"})
    .SetKernelFn(PD_KERNEL(AttentionBackward));

PD_BUILD_OP(moco_dnnl_init)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"path: std::string"})
    .SetKernelFn(PD_KERNEL(DnnlInit));

PD_BUILD_OP(moco_dnnl_conv)
    .Inputs({"X", "W"})
    .Outputs({"Y"})
    .Attrs({"sh: int64_t", "sw: int64_t", "ph: int64_t", "pw: int64_t"})
    .SetKernelFn(PD_KERNEL(DnnlConvForward));

PD_BUILD_OP(moco_dnnl_conv_grad_x)
    .Inputs({"W", "DY"})
    .Outputs({"DX"})
    .Attrs({"in_h: int64_t", "in_w: int64_t", "sh: int64_t", "sw: int64_t", "ph: int64_t", "pw: int64_t"})
    .SetKernelFn(PD_KERNEL(DnnlConvBackwardData));

PD_BUILD_OP(moco_dnnl_conv_grad_w)
    .Inputs({"X", "DY"})
    .Outputs({"DW"})
    .Attrs({"kh: int64_t", "kw: int64_t", "sh: int64_t", "sw: int64_t", "ph: int64_t", "pw: int64_t"})
    .SetKernelFn(PD_KERNEL(DnnlConvBackwardWeights));
