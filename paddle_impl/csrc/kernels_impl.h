// The kernels of cpu_kernels.cc, included there once per instruction set inside its own namespace
// (isa_generic, isa_avx2, isa_avx512) under a `#pragma GCC target`: no include guard, no #include here.
// ConvGeom, <cmath>, <algorithm>, <vector> and OpenMP come from the including file.

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

// one row of softmax(scale * x); y may be x
template <typename T>
inline void softmax_row(const T* xr, T* yr, int64_t C, T scale) {
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

// one row of the gradient of softmax(scale * x) with respect to x, from its output y; dr may be gr
template <typename T>
inline void softmax_grad_row(const T* yr, const T* gr, T* dr, int64_t C, T scale) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += gr[c] * yr[c];
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) dr[c] = scale * yr[c] * (gr[c] - s);
}

template <typename T>
void softmax_fwd_k(const T* x, T* y, int64_t rows, int64_t C, T scale) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) softmax_row(x + r * C, y + r * C, C, scale);
}

template <typename T>
void softmax_bwd_k(const T* y, const T* dy, T* dx, int64_t rows, int64_t C, T scale) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) softmax_grad_row(y + r * C, dy + r * C, dx + r * C, C, scale);
}

// Multi-head attention read straight from the qkv projection's output and written straight into the layout the
// output projection reads, so neither side is transposed: qkv [B, N, 3C] (row n of image b: q of every head,
// then k, then v; C = H * D), out [B, N, C]. Each (image, head) is done by one thread: S = Q K^T (BLAS, the
// head's D columns read in place with row stride 3C), P = softmax(scale S) row by row, O = P V written into the
// head's D columns of out. The N x N matrices live in per-thread scratch only; the backward recomputes P.
// P = softmax(scale Q K^T) of one (image, head): Q, K [N, D] with row stride ld, P [N, N]
template <typename T>
inline void attention_probs(const T* q, const T* k, T* P, int64_t N, int64_t D, int64_t ld, T scale) {
  blas::gemm(false, true, N, N, D, q, ld, k, ld, P, N);
  for (int64_t r = 0; r < N; ++r) softmax_row(P + r * N, P + r * N, N, scale);
}

template <typename T>
void attention_fwd_k(const T* qkv, T* out, int64_t B, int64_t N, int64_t H, int64_t D, T scale) {
  const int64_t C = H * D, ld = 3 * C;
#pragma omp parallel
  {
    blas::OneThread one;
    std::vector<T> P(N * N);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* q = qkv + b * N * ld + h * D;  // k at q + C, v at q + 2 C
      attention_probs(q, q + C, P.data(), N, D, ld, scale);
      blas::gemm(false, false, N, D, N, P.data(), N, q + 2 * C, ld, out + b * N * C + h * D, C);
    }
  }
}

// the backward autograd builds for matmul -> softmax -> matmul, per (image, head): P recomputed as in the
// forward, dV = P^T dO, dP = dO V^T, dS = softmax'(dP) (scale included), dQ = dS K, dK = dS^T Q, each written
// into its head's columns of dqkv (every element of dqkv is written once).
template <typename T>
void attention_bwd_k(const T* qkv, const T* dout, T* dqkv, int64_t B, int64_t N, int64_t H, int64_t D, T scale) {
  const int64_t C = H * D, ld = 3 * C;
#pragma omp parallel
  {
    blas::OneThread one;
    std::vector<T> P(N * N), G(N * N);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* q = qkv + b * N * ld + h * D;
      const T* k = q + C;
      const T* v = q + 2 * C;
      const T* go = dout + b * N * C + h * D;
      T* dq = dqkv + b * N * ld + h * D;
      T* dk = dq + C;
      T* dv = dq + 2 * C;
      attention_probs(q, k, P.data(), N, D, ld, scale);
      blas::gemm(true, false, N, D, N, P.data(), N, go, C, dv, ld);
      blas::gemm(false, true, N, N, D, go, C, v, ld, G.data(), N);
      for (int64_t r = 0; r < N; ++r) softmax_grad_row(P.data() + r * N, G.data() + r * N, G.data() + r * N, N, scale);
      blas::gemm(false, false, N, D, N, G.data(), N, k, ld, dq, ld);
      blas::gemm(true, false, N, D, N, G.data(), N, q, ld, dk, ld);
    }
  }
}

template <typename T>
void gelu_fwd_k(const T* x, T* y, int64_t n) {
  const T k = static_cast<T>(kSqrt1_2);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * (T(0.5) + T(0.5) * erf_t<T>(x[i] * k));
}

// GELU and its slope in one pass: y = x Phi(x) (gelu_fwd_k's expression) and d = Phi(x) + x phi(x), the derivative,
// so that a backward that kept d is one product, dx = dy * d (mul_k).
template <typename T>
void gelu_slope_k(const T* x, T* y, T* d, int64_t n) {
  const T k = static_cast<T>(kSqrt1_2);
  const T c = static_cast<T>(kInvSqrt2Pi);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    const T cdf = T(0.5) + T(0.5) * erf_t<T>(v * k);
    const T pdf = c * exp_t<T>(T(-0.5) * v * v);
    y[i] = v * cdf;
    d[i] = cdf + v * pdf;
  }
}

template <typename T>
void mul_k(const T* a, const T* b, T* out, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

// Two sums over one (n, c) plane of HW values, in T over blocks of kBnBlock values and added up in double: without
// dy, of a = x - k and a^2 (the forward's statistics); with dy, of dy and dy * a (the backward's).
constexpr int64_t kBnBlock = 256;

template <typename T>
inline void bn_plane_sums(const T* xp, const T* gp, int64_t HW, T k, double* q) {
  double s0 = 0, s1 = 0;
  for (int64_t i0 = 0; i0 < HW; i0 += kBnBlock) {
    const int64_t i1 = std::min(HW, i0 + kBnBlock);
    T b0 = 0, b1 = 0;
    if (gp == nullptr) {
#pragma omp simd reduction(+ : b0, b1)
      for (int64_t i = i0; i < i1; ++i) {
        const T a = xp[i] - k;
        b0 += a;
        b1 += a * a;
      }
    } else {
#pragma omp simd reduction(+ : b0, b1)
      for (int64_t i = i0; i < i1; ++i) {
        const T g = gp[i];
        b0 += g;
        b1 += g * (xp[i] - k);
      }
    }
    s0 += b0;
    s1 += b1;
  }
  q[0] = s0;
  q[1] = s1;
}

// BatchNorm in training mode, NCHW (x [N, C, HW]): batch statistics from per-plane sums (bn_plane_sums, planes in
// memory order split between the threads; k = the channel's first value, against cancellation), the channels'
// sums in double; y = (x - k) * a + e with a = w * rstd, e = b - (mean - k) * a; mean and rstd kept (in T) for the
// backward; the running statistics as torch updates them, running = (1 - momentum) * running + momentum * batch
// (the variance unbiased), in double.
template <typename T>
void bn_fwd_k(const T* x, const T* w, const T* b, T* y, T* mean_out, T* rstd_out, T* rm, T* rv, int64_t N, int64_t C,
              int64_t HW, double eps, double momentum) {
  const int64_t P = N * C;
  std::vector<double> part(static_cast<size_t>(P) * 2);
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < P; ++p)
    bn_plane_sums<T>(x + p * HW, nullptr, HW, x[(p % C) * HW], part.data() + p * 2);
  const double cnt = static_cast<double>(N * HW);
  std::vector<T> coef(static_cast<size_t>(C) * 2);
  for (int64_t c = 0; c < C; ++c) {
    double sx = 0, sxx = 0;
    for (int64_t n = 0; n < N; ++n) {
      sx += part[(n * C + c) * 2];
      sxx += part[(n * C + c) * 2 + 1];
    }
    const double ms = sx / cnt;  // mean - k
    const double var = std::max(sxx / cnt - ms * ms, 0.0);
    const double rs = 1.0 / std::sqrt(var + eps);
    const double a = static_cast<double>(w[c]) * rs;
    coef[c * 2] = static_cast<T>(a);
    coef[c * 2 + 1] = static_cast<T>(static_cast<double>(b[c]) - ms * a);
    const double mean = ms + static_cast<double>(x[c * HW]);
    mean_out[c] = static_cast<T>(mean);
    rstd_out[c] = static_cast<T>(rs);
    rm[c] = static_cast<T>((1.0 - momentum) * static_cast<double>(rm[c]) + momentum * mean);
    rv[c] = static_cast<T>((1.0 - momentum) * static_cast<double>(rv[c]) + momentum * var * cnt / (cnt - 1.0));
  }
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < P; ++p) {
    const int64_t c = p % C;
    const T kt = x[c * HW], a = coef[c * 2], e = coef[c * 2 + 1];
    const T* xp = x + p * HW;
    T* op = y + p * HW;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) op[i] = (xp[i] - kt) * a + e;
  }
}

// BatchNorm's backward in training mode, NCHW, from the forward's batch mean and rstd: per-plane sums of dy and
// dy * (x - mean) (bn_plane_sums, memory order), dbeta = sum dy, dgamma = rstd * sum dy * (x - mean), and a second
// pass in memory order writes dx = w * rstd * (dy - dbeta / n - xhat * dgamma / n), xhat = (x - mean) * rstd.
template <typename T>
void bn_bwd_k(const T* x, const T* w, const T* mean, const T* rstd, const T* dy, T* dx, T* dw, T* db, int64_t N,
              int64_t C, int64_t HW) {
  const int64_t P = N * C;
  std::vector<double> part(static_cast<size_t>(P) * 2);
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < P; ++p) bn_plane_sums<T>(x + p * HW, dy + p * HW, HW, mean[p % C], part.data() + p * 2);
  const double cnt = static_cast<double>(N * HW);
  std::vector<T> coef(static_cast<size_t>(C) * 3);
  for (int64_t c = 0; c < C; ++c) {
    double sd = 0, sdx = 0;
    for (int64_t n = 0; n < N; ++n) {
      sd += part[(n * C + c) * 2];
      sdx += part[(n * C + c) * 2 + 1];
    }
    const double rs = static_cast<double>(rstd[c]), dgam = sdx * rs;
    dw[c] = static_cast<T>(dgam);
    db[c] = static_cast<T>(sd);
    // dx = a1 * dy + a2 * (x - mean) + a3
    const double wr = static_cast<double>(w[c]) * rs;
    coef[c * 3] = static_cast<T>(wr);
    coef[c * 3 + 1] = static_cast<T>(-wr * rs * dgam / cnt);
    coef[c * 3 + 2] = static_cast<T>(-wr * sd / cnt);
  }
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < P; ++p) {
    const int64_t c = p % C;
    const T m = mean[c], a1 = coef[c * 3], a2 = coef[c * 3 + 1], a3 = coef[c * 3 + 2];
    const T* xp = x + p * HW;
    const T* gp = dy + p * HW;
    T* op = dx + p * HW;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) op[i] = a1 * gp[i] + a2 * (xp[i] - m) + a3;
  }
}

// ReLU's gradient from its output: dx = dy where y > 0, else 0 (Paddle's relu_grad; a NaN y gives 0)
template <typename T>
void relu_bwd_k(const T* y, const T* dy, T* dx, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dx[i] = y[i] > T(0) ? dy[i] : T(0);
}

template <typename T>
void ln_fwd_k(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd, int64_t rows, int64_t C, double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += xr[c];
    const T m_t = s / static_cast<T>(C);
    T v = 0;
#pragma omp simd reduction(+ : v)
    for (int64_t c = 0; c < C; ++c) {
      const T d = xr[c] - m_t;
      v += d * d;
    }
    const T rs_t = static_cast<T>(1.0 / std::sqrt(static_cast<double>(v) / static_cast<double>(C) + eps));
    mean[r] = m_t;
    rstd[r] = rs_t;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - m_t) * rs_t * w[c] + b[c];
  }
}

constexpr int64_t kLnFlush = 32;

template <typename T>
void ln_bwd_k(const T* x, const T* w, const T* mean, const T* rstd, const T* dy, T* dx, T* dw, T* db,
              int64_t rows, int64_t C) {
  int nthreads = 1;
#ifdef _OPENMP
  nthreads = omp_get_max_threads();
#endif
  // per-thread partial sums of dw and db: in T over up to kLnFlush rows, then into double; added up in thread
  // order afterwards. The row sums of dy * w and dy * w * xhat in T (C terms).
  std::vector<double> part(static_cast<size_t>(nthreads) * 2 * C, 0.0);
#pragma omp parallel num_threads(nthreads)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    double* pw = part.data() + static_cast<size_t>(tid) * 2 * C;
    double* pb = pw + C;
    std::vector<T> acc(static_cast<size_t>(2 * C), T(0));
    T* aw = acc.data();
    T* ab = aw + C;
    int64_t pending = 0;
    auto flush = [&]() {
      for (int64_t c = 0; c < C; ++c) {
        pw[c] += static_cast<double>(aw[c]);
        pb[c] += static_cast<double>(ab[c]);
        aw[c] = T(0);
        ab[c] = T(0);
      }
      pending = 0;
    };
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * C;
      const T* gr = dy + r * C;
      T* dr = dx + r * C;
      const T m = mean[r], rs = rstd[r];
      T sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t c = 0; c < C; ++c) {
        const T xh = (xr[c] - m) * rs;
        const T g = gr[c] * w[c];
        sg += g;
        sgx += g * xh;
        aw[c] += gr[c] * xh;
        ab[c] += gr[c];
      }
      const T mg = sg / static_cast<T>(C);
      const T mgx = sgx / static_cast<T>(C);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T xh = (xr[c] - m) * rs;
        dr[c] = rs * (gr[c] * w[c] - mg - xh * mgx);
      }
      if (++pending == kLnFlush) flush();
    }
    flush();
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

template <typename T>
void ema_k(T* pm, const T* pb, int64_t n, T m) {
  const T w = T(1) - m;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) pm[i] = pm[i] * m + pb[i] * w;  // official: p_m * m + p_b * (1 - m)
}

// AdamW (torch.optim.AdamW, single-tensor path), one pass: p *= 1 - lr * wd; m = m + (1 - beta1) (g - m);
// v = v * beta2 + (1 - beta2) g g; p = p + (-lr / bc1) * (m / (sqrt(v) / sqrt(bc2) + eps)). The scalars come
// computed in double and rounded to T once, as torch's Python scalars are.
template <typename T>
void adamw_k(T* p, const T* g, T* m, T* v, int64_t n, T decay, T w1, T b2, T w2, T nstep, T bc2s, T eps) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i];
    const T mi = m[i] + w1 * (gi - m[i]);
    const T vi = v[i] * b2 + w2 * gi * gi;
    const T denom = std::sqrt(vi) / bc2s + eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay + nstep * (mi / denom);
  }
}

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
