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

inline float exp_f32(float x) {
  // exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2; the input is clamped to where 2^n is a
  // normal float (below: exp(-87.3) = 1.2e-38, the smallest normal; the softmax never needs less).
  // Written so that GCC vectorises it (std::min/max, floor; built with -fno-trapping-math).
  x = std::min(std::max(x, -87.33654f), 88.37626f);
  const float fn = std::floor(x * 1.44269504088896341f + 0.5f);
  const int32_t n = static_cast<int32_t>(fn);
  // ln 2 split into a part exact in float and the rest
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * __builtin_bit_cast(float, (n + 127) << 23);  // 2^n
}

inline float erf_f32(float x) {
  // Abramowitz & Stegun 7.1.26: erf(|x|) = 1 - t (a1 + a2 t + ... + a5 t^4) exp(-x^2), t = 1 / (1 + p|x|)
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  const float y = 1.0f - q * t * exp_f32(-ax * ax);
  return std::copysign(y, x);
}

template <typename T> inline T exp_t(T x);
template <> inline float exp_t<float>(float x) { return exp_f32(x); }
template <> inline double exp_t<double>(double x) { return std::exp(x); }
template <typename T> inline T erf_t(T x);
template <> inline float erf_t<float>(float x) { return erf_f32(x); }
template <> inline double erf_t<double>(double x) { return std::erf(x); }

constexpr double kSqrt1_2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

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

template <typename T>
void softmax_fwd_k(const T* x, T* y, int64_t rows, int64_t C, T scale) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    T m = xr[0];
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < C; ++c) m = xr[c] > m ? xr[c] : m;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) {
      const T e = exp_t<T>(scale * (xr[c] - m));  // scale > 0, so max(scale * x) = scale * max(x)
      yr[c] = e;
      s += e;
    }
    const T inv = T(1) / s;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] *= inv;
  }
}

template <typename T>
void softmax_bwd_k(const T* y, const T* dy, T* dx, int64_t rows, int64_t C, T scale) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* yr = y + r * C;
    const T* gr = dy + r * C;
    T* dr = dx + r * C;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += gr[c] * yr[c];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dr[c] = scale * yr[c] * (gr[c] - s);
  }
}

std::vector<paddle::Tensor> SoftmaxForward(const paddle::Tensor& x, double scale) {
  check_cpu(x, "moco_softmax");
  PD_CHECK(scale > 0, "moco_softmax: scale must be positive");
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  const int64_t C = x.shape().back();
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_softmax", ([&] {
    softmax_fwd_k<data_t>(x.data<data_t>(), y.data<data_t>(), rows_of(x), C, static_cast<data_t>(scale));
  }));
  return {y};
}

std::vector<paddle::Tensor> SoftmaxBackward(const paddle::Tensor& y, const paddle::Tensor& dy, double scale) {
  check_cpu(y, "moco_softmax_grad");
  check_cpu(dy, "moco_softmax_grad");
  auto dx = paddle::empty(y.shape(), y.dtype(), y.place());
  const int64_t C = y.shape().back();
  PD_DISPATCH_FLOATING_TYPES(y.type(), "moco_softmax_grad", ([&] {
    softmax_bwd_k<data_t>(y.data<data_t>(), dy.data<data_t>(), dx.data<data_t>(), rows_of(y), C,
                          static_cast<data_t>(scale));
  }));
  return {dx};
}

// ---------------------------------------------------------------------------------------------------------
// exact GELU: x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2; derivative Phi(x) + x * phi(x)

template <typename T>
void gelu_fwd_k(const T* x, T* y, int64_t n) {
  const T k = static_cast<T>(kSqrt1_2);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * (T(0.5) + T(0.5) * erf_t<T>(x[i] * k));
}

template <typename T>
void gelu_bwd_k(const T* x, const T* dy, T* dx, int64_t n) {
  const T k = static_cast<T>(kSqrt1_2);
  const T c = static_cast<T>(kInvSqrt2Pi);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    const T cdf = T(0.5) + T(0.5) * erf_t<T>(v * k);
    const T pdf = c * exp_t<T>(T(-0.5) * v * v);
    dx[i] = dy[i] * (cdf + v * pdf);
  }
}

std::vector<paddle::Tensor> GeluForward(const paddle::Tensor& x) {
  check_cpu(x, "moco_gelu");
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_gelu", ([&] {
    gelu_fwd_k<data_t>(x.data<data_t>(), y.data<data_t>(), x.numel());
  }));
  return {y};
}

std::vector<paddle::Tensor> GeluBackward(const paddle::Tensor& x, const paddle::Tensor& dy) {
  check_cpu(x, "moco_gelu_grad");
  check_cpu(dy, "moco_gelu_grad");
  auto dx = paddle::empty(x.shape(), x.dtype(), x.place());
  PD_DISPATCH_FLOATING_TYPES(x.type(), "moco_gelu_grad", ([&] {
    gelu_bwd_k<data_t>(x.data<data_t>(), dy.data<data_t>(), dx.data<data_t>(), x.numel());
  }));
  return {dx};
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm over the last axis: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps) (biased var).
// Statistics are accumulated in double for both dtypes; mean and rstd are kept (in T) for the backward.

template <typename T>
void ln_fwd_k(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd, int64_t rows, int64_t C, double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += static_cast<double>(xr[c]);
    const double mu = s / static_cast<double>(C);
    double v = 0;
#pragma omp simd reduction(+ : v)
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(xr[c]) - mu;
      v += d * d;
    }
    const double rs = 1.0 / std::sqrt(v / static_cast<double>(C) + eps);
    const T m_t = static_cast<T>(mu), rs_t = static_cast<T>(rs);
    mean[r] = m_t;
    rstd[r] = rs_t;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - m_t) * rs_t * w[c] + b[c];
  }
}

template <typename T>
void ln_bwd_k(const T* x, const T* w, const T* mean, const T* rstd, const T* dy, T* dx, T* dw, T* db,
              int64_t rows, int64_t C) {
  int nthreads = 1;
#ifdef _OPENMP
  nthreads = omp_get_max_threads();
#endif
  // per-thread partial sums of dw and db (double), added up in thread order afterwards
  std::vector<double> part(static_cast<size_t>(nthreads) * 2 * C, 0.0);
#pragma omp parallel num_threads(nthreads)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    double* pw = part.data() + static_cast<size_t>(tid) * 2 * C;
    double* pb = pw + C;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * C;
      const T* gr = dy + r * C;
      T* dr = dx + r * C;
      const T m = mean[r], rs = rstd[r];
      double sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t c = 0; c < C; ++c) {
        const T xh = (xr[c] - m) * rs;
        const T g = gr[c] * w[c];
        sg += static_cast<double>(g);
        sgx += static_cast<double>(g * xh);
        pw[c] += static_cast<double>(gr[c] * xh);
        pb[c] += static_cast<double>(gr[c]);
      }
      const T mg = static_cast<T>(sg / static_cast<double>(C));
      const T mgx = static_cast<T>(sgx / static_cast<double>(C));
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T xh = (xr[c] - m) * rs;
        dr[c] = rs * (gr[c] * w[c] - mg - xh * mgx);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0, sb = 0;
    for (int t = 0; t < nthreads; ++t) {
      sw += part[static_cast<size_t>(t) * 2 * C + c];
      sb += part[static_cast<size_t>(t) * 2 * C + C + c];
    }
    dw[c] = static_cast<T>(sw);
    db[c] = static_cast<T>(sb);
  }
}

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
    ln_fwd_k<data_t>(x.data<data_t>(), w.data<data_t>(), b.data<data_t>(), y.data<data_t>(),
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
    ln_bwd_k<data_t>(x.data<data_t>(), w.data<data_t>(), mean.data<data_t>(), rstd.data<data_t>(),
                     dy.data<data_t>(), dx.data<data_t>(), dw.data<data_t>(), db.data<data_t>(), rows, C);
  }));
  return {dx, dw, db};
}

std::vector<std::vector<int64_t>> SameShape(const std::vector<int64_t>& x) { return {x}; }
std::vector<paddle::DataType> SameType(const paddle::DataType& x) { return {x}; }
std::vector<std::vector<int64_t>> SameShape2(const std::vector<int64_t>& x, const std::vector<int64_t>&) {
  return {x};
}
std::vector<paddle::DataType> SameType2(const paddle::DataType& x, const paddle::DataType&) { return {x}; }

}  // namespace

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
