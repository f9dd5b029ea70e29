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


// ---------------------------------------------------------------------------------------------------------
// im2col: x [N, C, H, W] -> cols [N, C*KH*KW, HO*WO] (or [C*KH*KW, N*HO*WO]), row (c, i, j) holding x[n, c, oh*SH - PH + i,
// ow*SW - PW + j] (0 outside the image). col2im is its adjoint: dx[n, c, h, w] = the sum of the dcols entries
// that were read from (n, c, h, w); each (n, c) plane is summed by one thread in a fixed order.

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

template <typename T>
void im2col_k(const T* x, T* cols, const ConvGeom& g) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t c = 0; c < g.C; ++c) {
      const T* xp = x + (n * g.C + c) * g.H * g.W;
      for (int64_t i = 0; i < g.KH; ++i) {
        for (int64_t j = 0; j < g.KW; ++j) {
          T* out = cols + g.row(n, c, i * g.KW + j);
          int64_t lo, hi;
          g.ow_range(j, &lo, &hi);
          for (int64_t oh = 0; oh < g.HO; ++oh) {
            T* orow = out + oh * g.WO;
            const int64_t ih = oh * g.SH - g.PH + i;
            if (ih < 0 || ih >= g.H) {
              std::fill(orow, orow + g.WO, T(0));
              continue;
            }
            const T* xrow = xp + ih * g.W - g.PW + j;  // xrow[ow * SW] = x[ih, ow*SW - PW + j]
            std::fill(orow, orow + lo, T(0));
            if (g.SW == 1) {
              std::copy(xrow + lo, xrow + hi, orow + lo);
            } else {
              for (int64_t ow = lo; ow < hi; ++ow) orow[ow] = xrow[ow * g.SW];
            }
            std::fill(orow + hi, orow + g.WO, T(0));
          }
        }
      }
    }
  }
}

template <typename T>
void col2im_k(const T* cols, T* x, const ConvGeom& g) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t c = 0; c < g.C; ++c) {
      T* xp = x + (n * g.C + c) * g.H * g.W;
      std::fill(xp, xp + g.H * g.W, T(0));
      for (int64_t i = 0; i < g.KH; ++i) {
        for (int64_t j = 0; j < g.KW; ++j) {
          const T* in = cols + g.row(n, c, i * g.KW + j);
          int64_t lo, hi;
          g.ow_range(j, &lo, &hi);
          for (int64_t oh = 0; oh < g.HO; ++oh) {
            const int64_t ih = oh * g.SH - g.PH + i;
            if (ih < 0 || ih >= g.H) continue;
            const T* irow = in + oh * g.WO;
            T* xrow = xp + ih * g.W - g.PW + j;
            if (g.SW == 1) {
#pragma omp simd
              for (int64_t ow = lo; ow < hi; ++ow) xrow[ow] += irow[ow];
            } else {
              for (int64_t ow = lo; ow < hi; ++ow) xrow[ow * g.SW] += irow[ow];
            }
          }
        }
      }
    }
  }
}

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
    im2col_k<data_t>(x.data<data_t>(), cols.data<data_t>(), g);
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
    col2im_k<data_t>(cols.data<data_t>(), x.data<data_t>(), g);
  }));
  return {x};
}


// ---------------------------------------------------------------------------------------------------------
// Optimizer-side updates, in place, one pass (or two) over the parameter on all threads. Sums of squares are
// accumulated in double per thread and added in thread order.

template <typename T>
void ema_k(T* pm, const T* pb, int64_t n, T m) {
  const T w = T(1) - m;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) pm[i] = pm[i] * m + pb[i] * w;  // official: p_m * m + p_b * (1 - m)
}

void EmaInplace(paddle::Tensor& pm, const paddle::Tensor& pb, double m) {
  check_cpu(pm, "moco_ema_");
  check_cpu(pb, "moco_ema_");
  PD_CHECK(pm.numel() == pb.numel() && pm.dtype() == pb.dtype(), "moco_ema_: tensors differ");
  PD_DISPATCH_FLOATING_TYPES(pm.type(), "moco_ema_", ([&] {
    ema_k<data_t>(pm.data<data_t>(), pb.data<data_t>(), pm.numel(), static_cast<data_t>(m));
  }));
}

// LARS (official moco-v3 optimizer.py): for a parameter with ndim > 1, dp = g + wd * p and
// q = tc * ||p|| / ||dp|| (1 where either norm is 0), dp *= q; then mu = momentum * mu + dp, p -= lr * mu.
template <typename T>
void lars_k(T* p, const T* g, T* mu, int64_t n, T lr, T wd, T momentum, double tc, bool adapt) {
  T q = T(1);
  if (adapt) {
    int nthreads = 1;
#ifdef _OPENMP
    nthreads = omp_get_max_threads();
#endif
    std::vector<double> part(static_cast<size_t>(nthreads) * 2, 0.0);
#pragma omp parallel num_threads(nthreads)
    {
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num();
#endif
      int nt = 1;
#ifdef _OPENMP
      nt = omp_get_num_threads();
#endif
      const int64_t lo = n * tid / nt, hi = n * (tid + 1) / nt;  // this thread's share, a fixed split
      double sp = 0, sd = 0;
#pragma omp simd reduction(+ : sp, sd)
      for (int64_t i = lo; i < hi; ++i) {
        const T d = g[i] + wd * p[i];
        sp += static_cast<double>(p[i]) * static_cast<double>(p[i]);
        sd += static_cast<double>(d) * static_cast<double>(d);
      }
      part[2 * tid] = sp;
      part[2 * tid + 1] = sd;
    }
    double sp = 0, sd = 0;
    for (int t = 0; t < nthreads; ++t) {
      sp += part[2 * t];
      sd += part[2 * t + 1];
    }
    const T pn = static_cast<T>(std::sqrt(sp)), dn = static_cast<T>(std::sqrt(sd));
    if (pn > T(0) && dn > T(0)) q = static_cast<T>(tc) * pn / dn;
  }
  const T w = adapt ? wd : T(0);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T d = (g[i] + w * p[i]) * q;
    mu[i] = mu[i] * momentum + d;
    p[i] = p[i] - lr * mu[i];
  }
}

void LarsInplace(paddle::Tensor& p, const paddle::Tensor& g, paddle::Tensor& mu, double lr, double wd,
                 double momentum, double tc, bool adapt) {
  check_cpu(p, "moco_lars_");
  check_cpu(g, "moco_lars_");
  check_cpu(mu, "moco_lars_");
  PD_CHECK(p.numel() == g.numel() && p.numel() == mu.numel(), "moco_lars_: tensors differ in size");
  PD_DISPATCH_FLOATING_TYPES(p.type(), "moco_lars_", ([&] {
    lars_k<data_t>(p.data<data_t>(), g.data<data_t>(), mu.data<data_t>(), p.numel(), static_cast<data_t>(lr),
                   static_cast<data_t>(wd), static_cast<data_t>(momentum), tc, adapt);
  }));
}


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
