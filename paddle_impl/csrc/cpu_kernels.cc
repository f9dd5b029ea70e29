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
#include <vector>

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
// exact GELU: x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2; derivative Phi(x) + x * phi(x)

std::vector<paddle::Tensor> GeluForward(const paddle::Tensor& x) {
  check_cpu(x, "moco_gelu");
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_gelu", ([&] {
    MOCO_ISA_CALL(gelu_fwd_k<data_t>, x.data<data_t>(), y.data<data_t>(), x.numel());
  }));
  return {y};
}

std::vector<paddle::Tensor> GeluBackward(const paddle::Tensor& x, const paddle::Tensor& dy) {
  check_cpu(x, "moco_gelu_grad");
  check_cpu(dy, "moco_gelu_grad");
  auto dx = paddle::empty(x.shape(), x.dtype(), x.place());
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_gelu_grad", ([&] {
    MOCO_ISA_CALL(gelu_bwd_k<data_t>, x.data<data_t>(), dy.data<data_t>(), dx.data<data_t>(), x.numel());
  }));
  return {dx};
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm over the last axis: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps) (biased var).
// Statistics are accumulated in double for both dtypes; mean and rstd are kept (in T) for the backward.

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

PD_BUILD_OP(moco_gelu_grad_k)
    .Inputs({"X", "DY"})
    .Outputs({"DX"})
    .SetKernelFn(PD_KERNEL(GeluBackward));

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
