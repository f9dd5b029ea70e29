/* Image kernels for the data pipeline (paddle_impl/image_ops.py loads this with ctypes; no Python headers).

   moco_hue_shift_rgb: the hue shift of torchvision's PIL path (paddle_impl/loader.py adjust_hue), i.e.
   Pillow's 8-bit RGB -> HSV conversion, H += shift (mod 256), Pillow's HSV -> RGB conversion, on interleaved
   uint8 RGB pixels, with the same float/double arithmetic, so that every output byte equals Pillow's
   (tests/test_image_ops.py compares all 2^24 colours).

   The arithmetic, step by step (f32 = float, f64 = double; the order of operations matters):
     RGB -> HSV:  v = max(r, g, b), m = min(r, g, b); grey (v == m): h = s = 0. Otherwise
       c = f32(v - m);  s = c / f32(v);  rc, gc, bc = f32(v - r) / c, f32(v - g) / c, f32(v - b) / c  (f32)
       h = bc - gc if r is the max, else 2 + rc - bc if g is, else 4 + gc - rc   (f64 sums, stored as f32)
       x = f32(fmod(f64(h) / 6 + 1, 1))  (the argument is in [5/6, 11/6]: fmod is x - 1 when x >= 1, exact)
       H = int(f64(x) * 255), S = int(f64(s) * 255)   (truncation)
     HSV -> RGB:  S == 0: (v, v, v). Otherwise
       a = f64(H) * 6 / 255;  i = floor(a);  f = f32(a - i);  fs = f32(f64(S) / 255)
       p = round(v * (1 - fs)),  q = round(v * (1 - f32(fs * f))),  t = round(v * (1 - fs * (1 - f)))  (f64,
       round half away from zero), and (R, G, B) by i mod 6: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q).
   f32 sums, differences and products of f32 values are computed here in f64 and rounded once to f32: the
   same result (a double has more than twice a float's precision). Built without FMA contraction.

   Pixels are processed in blocks: de-interleaved into planar arrays, then branch-free loops the compiler
   vectorises; three variants (AVX-512, AVX2, baseline x86-64) are compiled from the same code and the
   caller picks one (moco_image_isa_supported says which the CPU runs). */
#include <math.h>
#include <stdint.h>

#define BLK 256

typedef struct {
    int32_t r[BLK], g[BLK], b[BLK];
    int32_t h[BLK], s[BLK], v[BLK];
    int32_t p[BLK], q[BLK], t[BLK], i[BLK];
} block_t;

/* floor(x) for 0 <= x < 2^31: truncation (one instruction in every variant, SSE2 included) */
static inline double floor_pos(double x) {
    return (double)(int32_t)x;
}

/* round half away from zero (C's round) for 0 <= x < 2^31, exact: floor(x) + (x - floor(x) >= 0.5); the
   difference is exact */
static inline double round_pos(double x) {
    double fl = floor_pos(x);
    return fl + ((x - fl) >= 0.5 ? 1.0 : 0.0);
}

static inline __attribute__((always_inline)) void to_hsv(block_t *B, int n, int shift) {
    for (int k = 0; k < n; ++k) {
        int32_t r = B->r[k], g = B->g[k], b = B->b[k];
        int32_t mx = r > g ? r : g;
        mx = mx > b ? mx : b;
        int32_t mn = r < g ? r : g;
        mn = mn < b ? mn : b;
        int grey = mx == mn;
        float c = (float)(grey ? 1 : mx - mn);
        float vf = (float)(mx > 0 ? mx : 1);
        float s = c / vf;
        double rc = (double)((float)(mx - r) / c);
        double gc = (double)((float)(mx - g) / c);
        double bc = (double)((float)(mx - b) / c);
        int rmax = r == mx, gmax = (r != mx) & (g == mx);
        double base = rmax ? 0.0 : (gmax ? 2.0 : 4.0);
        double plus = rmax ? bc : (gmax ? rc : gc);
        double minus = rmax ? gc : (gmax ? bc : rc);
        float h = (float)((base + plus) - minus);
        double x = (double)h / 6.0 + 1.0;
        x = (double)(float)(x >= 1.0 ? x - 1.0 : x);
        int32_t hh = (int32_t)(x * 255.0);
        int32_t ss = (int32_t)((double)s * 255.0);
        B->h[k] = grey ? shift : ((hh + shift) & 255);
        B->s[k] = grey ? 0 : ss;
        B->v[k] = mx;
    }
}

static inline __attribute__((always_inline)) void to_rgb(block_t *B, int n) {
    for (int k = 0; k < n; ++k) {
        double v = (double)B->v[k];
        double a = (double)B->h[k] * 6.0 / 255.0;
        double fi = floor_pos(a);
        double f = (double)(float)(a - fi);
        double fs = (double)(float)((double)B->s[k] / 255.0);
        double fsf = (double)(float)(fs * f);
        B->p[k] = (int32_t)round_pos(v * (1.0 - fs));
        B->q[k] = (int32_t)round_pos(v * (1.0 - fsf));
        B->t[k] = (int32_t)round_pos(v * (1.0 - fs * (1.0 - f)));
        B->i[k] = (int32_t)fi;
    }
}

static inline __attribute__((always_inline)) void store_rgb(block_t *B, uint8_t *dst, int n) {
    for (int k = 0; k < n; ++k) {  /* (R, G, B) into (r, g, b): branch-free, vectorised */
        int32_t v = B->v[k], p = B->p[k], q = B->q[k], t = B->t[k], i = B->i[k];
        /* i in 0..6; 6 only for H = 255 (f = 0), the same as 0; grey (S == 0): (v, v, v) */
        int32_t grey = -(int32_t)(B->s[k] == 0);
        int32_t i0 = -(int32_t)((i == 0) | (i == 6)), i1 = -(int32_t)(i == 1), i2 = -(int32_t)(i == 2);
        int32_t i3 = -(int32_t)(i == 3), i4 = -(int32_t)(i == 4), i5 = -(int32_t)(i == 5);
        int32_t rv = grey | i0 | i5, gv = grey | i1 | i2, bv = grey | i3 | i4;
        B->r[k] = (rv & v) | (~rv & ((i1 & q) | (i4 & t) | ((i2 | i3) & p)));
        B->g[k] = (gv & v) | (~gv & ((i3 & q) | (i0 & t) | ((i4 | i5) & p)));
        B->b[k] = (bv & v) | (~bv & ((i5 & q) | (i2 & t) | ((i0 | i1) & p)));
    }
    for (int k = 0; k < n; ++k) {
        dst[3 * k] = (uint8_t)B->r[k];
        dst[3 * k + 1] = (uint8_t)B->g[k];
        dst[3 * k + 2] = (uint8_t)B->b[k];
    }
}

static inline __attribute__((always_inline)) void hue_rows(const uint8_t *src, uint8_t *dst, int64_t npix,
                                                           int shift) {
    block_t B;
    for (int64_t start = 0; start < npix; start += BLK) {
        int n = (int)(npix - start < BLK ? npix - start : BLK);
        const uint8_t *in = src + 3 * start;
        for (int k = 0; k < n; ++k) {
            B.r[k] = in[3 * k];
            B.g[k] = in[3 * k + 1];
            B.b[k] = in[3 * k + 2];
        }
        to_hsv(&B, n, shift);
        to_rgb(&B, n);
        store_rgb(&B, dst + 3 * start, n);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi2,prefer-vector-width=512")))
static void hue_avx512(const uint8_t *src, uint8_t *dst, int64_t npix, int shift) {
    hue_rows(src, dst, npix, shift);
}

__attribute__((target("avx2,bmi2")))
static void hue_avx2(const uint8_t *src, uint8_t *dst, int64_t npix, int shift) {
    hue_rows(src, dst, npix, shift);
}
#define HAVE_X86_VARIANTS 1
#endif

static void hue_generic(const uint8_t *src, uint8_t *dst, int64_t npix, int shift) {
    hue_rows(src, dst, npix, shift);
}

/* the widest variant this CPU runs: 0 generic, 1 AVX2, 2 AVX-512 */
int moco_image_isa_supported(void) {
#ifdef HAVE_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return 2;
    if (__builtin_cpu_supports("avx2"))
        return 1;
#endif
    return 0;
}

/* dst[k] = src[k] with the hue shifted by `shift` (mod 256) for npix interleaved RGB pixels (src == dst is
   allowed); isa: the variant (clamped to what the CPU supports). Returns the variant that ran. */
int moco_hue_shift_rgb(const uint8_t *src, uint8_t *dst, int64_t npix, int shift, int isa) {
    int best = moco_image_isa_supported();
    if (isa < 0 || isa > best)
        isa = best;
    shift &= 255;
#ifdef HAVE_X86_VARIANTS
    if (isa == 2) {
        hue_avx512(src, dst, npix, shift);
        return 2;
    }
    if (isa == 1) {
        hue_avx2(src, dst, npix, shift);
        return 1;
    }
#endif
    hue_generic(src, dst, npix, shift);
    return 0;
}
