/* Image kernels for the data pipeline (paddle_impl/image_ops.py loads this with ctypes; no Python headers):
   the four ops of ColorJitter and the Gaussian blur on interleaved 8-bit RGB pixels, each giving Pillow's
   bytes (tests/test_image_ops.py checks them against Pillow). Written from the formulas below.

   moco_hue_shift_rgb: the hue shift of torchvision's PIL path (paddle_impl/loader.py adjust_hue), i.e.
   Pillow's 8-bit RGB -> HSV conversion, H += shift (mod 256), Pillow's HSV -> RGB conversion, with the same
   float/double arithmetic.
   moco_brightness_rgb, moco_contrast_rgb, moco_saturation_rgb: ImageEnhance's blends (further below).
   moco_gaussian_blur_rgb: ImageFilter.GaussianBlur, Pillow's box-blur approximation (further below).

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
#include <stdlib.h>
#include <string.h>

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

/* ---- Pillow's ImageEnhance (Brightness, Contrast, Color = saturation): Image.blend(degenerate, image, alpha)
   with alpha = f32(factor); per byte, in f32: t = d + alpha * f32(x - d), then 0 if t <= 0, 255 if t >= 255,
   else truncated (Pillow's interpolation branch for 0 <= alpha <= 1 gives the same bytes: t is in [0, 255]
   there). d: 0 (brightness); the grey level of the mean luma, int(mean + 0.5) (contrast); the pixel's own
   luma (saturation). Luma is Pillow's RGB -> L: (19595 r + 38470 g + 7471 b + 32768) >> 16. */

static inline int32_t blend_byte(int32_t d, int32_t x, float alpha) {
    float t = (float)d + alpha * (float)(x - d);
    return t <= 0.0f ? 0 : (t >= 255.0f ? 255 : (int32_t)t);
}

static inline int32_t luma(int32_t r, int32_t g, int32_t b) {
    return (r * 19595 + g * 38470 + b * 7471 + 32768) >> 16;
}

/* every byte x -> blend(d, x, alpha), d fixed (brightness, contrast) */
static inline __attribute__((always_inline)) void blend_const_rows(uint8_t *px, int64_t nbytes, int32_t d,
                                                                   float alpha) {
    for (int64_t k = 0; k < nbytes; ++k)
        px[k] = (uint8_t)blend_byte(d, px[k], alpha);
}

/* the same through a 256-entry table: faster where the loop above is not vectorised (baseline x86-64) */
static void blend_const_lut(uint8_t *px, int64_t nbytes, int32_t d, float alpha) {
    uint8_t lut[256];
    for (int32_t x = 0; x < 256; ++x)
        lut[x] = (uint8_t)blend_byte(d, x, alpha);
    for (int64_t k = 0; k < nbytes; ++k)
        px[k] = lut[px[k]];
}

static inline __attribute__((always_inline)) int64_t luma_sum_rows(const uint8_t *px, int64_t npix) {
    int64_t total = 0;
    for (int64_t k = 0; k < npix; ++k)
        total += luma(px[3 * k], px[3 * k + 1], px[3 * k + 2]);
    return total;
}

static inline __attribute__((always_inline)) void saturation_rows(uint8_t *px, int64_t npix, float alpha) {
    block_t B;
    for (int64_t start = 0; start < npix; start += BLK) {
        int n = (int)(npix - start < BLK ? npix - start : BLK);
        uint8_t *io = px + 3 * start;
        for (int k = 0; k < n; ++k) {
            B.r[k] = io[3 * k];
            B.g[k] = io[3 * k + 1];
            B.b[k] = io[3 * k + 2];
        }
        for (int k = 0; k < n; ++k) {
            int32_t l = luma(B.r[k], B.g[k], B.b[k]);
            B.r[k] = blend_byte(l, B.r[k], alpha);
            B.g[k] = blend_byte(l, B.g[k], alpha);
            B.b[k] = blend_byte(l, B.b[k], alpha);
        }
        for (int k = 0; k < n; ++k) {
            io[3 * k] = (uint8_t)B.r[k];
            io[3 * k + 1] = (uint8_t)B.g[k];
            io[3 * k + 2] = (uint8_t)B.b[k];
        }
    }
}

/* ---- Pillow's GaussianBlur(sigma) (ImageFilter.GaussianBlur, torchvision-free SimCLR blur): three passes of
   an extended box blur along x, then three along y, each rounded to 8 bits. The box radius rf (f32) comes
   from sigma as in Gwosdek et al. (SSVM 2011): s2 = sigma^2 / 3; L = f32(sqrt(f64(12 s2 + 1)));
   l = f32(floor((L - 1) / 2)); a = (2l + 1)(l(l + 1) - 3 s2) / (6 (s2 - (l + 1)^2)) (f32); rf = l + a.
   One pass with r = int(rf), ww = u32(f32(2^24) / (2 rf + 1)) (f32 division, truncated), fw = (2^24 - (2r + 1)
   ww) / 2 (integer), indices clamped to the line: out[i] = (ww * sum(in[i-r .. i+r]) + fw * (in[i-r-1] +
   in[i+r+1]) + 2^23) >> 24, exact in 32-bit unsigned integers (the sum of the weights is at most 2^24). */

static float blur_box_radius(float sigma) {
    float s2 = sigma * sigma / 3;
    float L = (float)sqrt(12.0 * (double)s2 + 1.0);
    float l = (float)floor(((double)L - 1.0) / 2.0);
    float a = (2 * l + 1) * (l * (l + 1) - 3 * s2);
    a /= 6 * (s2 - (l + 1) * (l + 1));
    return l + a;
}

static inline int64_t clamp_line(int64_t i, int64_t n) {
    return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

/* one pass along axis 0 of an n x m byte array (m bytes per line), in -> out (not aliased) */
static inline __attribute__((always_inline)) void box_pass_lines(const uint8_t *in, uint8_t *out, int64_t n,
                                                                 int64_t m, int r, uint32_t ww, uint32_t fw,
                                                                 uint32_t *acc) {
    for (int64_t j = 0; j < m; ++j)
        acc[j] = 0;
    for (int64_t k = -r; k <= r; ++k) {
        const uint8_t *line = in + clamp_line(k, n) * m;
        for (int64_t j = 0; j < m; ++j)
            acc[j] += line[j];
    }
    for (int64_t y = 0; y < n; ++y) {
        const uint8_t *lo = in + clamp_line(y - r - 1, n) * m, *hi = in + clamp_line(y + r + 1, n) * m;
        const uint8_t *drop = in + clamp_line(y - r, n) * m;
        uint8_t *o = out + y * m;
        for (int64_t j = 0; j < m; ++j) {
            o[j] = (uint8_t)((acc[j] * ww + ((uint32_t)lo[j] + hi[j]) * fw + (1u << 23)) >> 24);
            acc[j] += (uint32_t)hi[j] - drop[j];  /* the window of y + 1 (mod 2^32: the true sum is >= 0) */
        }
    }
}

/* h x w x 3 -> w x h x 3 */
static void transpose_rgb(const uint8_t *in, uint8_t *out, int64_t h, int64_t w) {
    for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) {
            const uint8_t *s = in + 3 * (y * w + x);
            uint8_t *d = out + 3 * (x * h + y);
            d[0] = s[0];
            d[1] = s[1];
            d[2] = s[2];
        }
}

/* three passes along axis 0: a -> b -> a -> b */
static inline __attribute__((always_inline)) void box_3passes(uint8_t *a, uint8_t *b, int64_t n, int64_t m,
                                                              float rf, uint32_t *acc) {
    int r = (int)rf;
    uint32_t ww = (uint32_t)((float)(1u << 24) / (rf * 2 + 1));
    uint32_t fw = ((1u << 24) - (uint32_t)(r * 2 + 1) * ww) / 2;
    box_pass_lines(a, b, n, m, r, ww, fw, acc);
    box_pass_lines(b, a, n, m, r, ww, fw, acc);
    box_pass_lines(a, b, n, m, r, ww, fw, acc);
}

/* ---- variants: the same code compiled for AVX-512, AVX2 and baseline x86-64 (or only the last elsewhere) */
#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_X86_VARIANTS 1
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi2,prefer-vector-width=512")))
#define TARGET_AVX2 __attribute__((target("avx2,bmi2")))
#define VARIANTS(ret, name, params, call)                          \
    TARGET_AVX512 static ret name##_avx512 params { return call; } \
    TARGET_AVX2 static ret name##_avx2 params { return call; }     \
    static ret name##_generic params { return call; }
#define DISPATCH(isa, name, args) \
    ((isa) == 2 ? name##_avx512 args : (isa) == 1 ? name##_avx2 args : name##_generic args)
#else
#define VARIANTS(ret, name, params, call) static ret name##_generic params { return call; }
#define DISPATCH(isa, name, args) (name##_generic args)
#endif

#define HUE_CALL (hue_rows(src, dst, npix, shift), 0)
VARIANTS(int, hue, (const uint8_t *src, uint8_t *dst, int64_t npix, int shift), HUE_CALL)
VARIANTS(int64_t, luma_sum, (const uint8_t *px, int64_t npix), luma_sum_rows(px, npix))
#define SAT_CALL (saturation_rows(px, npix, alpha), 0)
VARIANTS(int, saturation, (uint8_t *px, int64_t npix, float alpha), SAT_CALL)
#define BLEND_CALL (blend_const_rows(px, nbytes, d, alpha), 0)
VARIANTS(int, blend_vec, (uint8_t *px, int64_t nbytes, int32_t d, float alpha), BLEND_CALL)

static void blend_const(int isa, uint8_t *px, int64_t nbytes, int32_t d, float alpha) {
    if (isa == 0)
        blend_const_lut(px, nbytes, d, alpha);
    else
        DISPATCH(isa, blend_vec, (px, nbytes, d, alpha));
}

#define BOX_CALL (box_3passes(a, b, n, m, rf, acc), 0)
VARIANTS(int, box3, (uint8_t *a, uint8_t *b, int64_t n, int64_t m, float rf, uint32_t *acc), BOX_CALL)

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

static int clamp_isa(int isa) {
    int best = moco_image_isa_supported();
    return (isa < 0 || isa > best) ? best : isa;
}

/* The exported kernels. Images: npix interleaved RGB pixels, C-contiguous; isa: the variant (clamped to what
   the CPU supports). Each returns the variant that ran. */

/* dst = src with the hue shifted by `shift` (mod 256); src == dst is allowed */
int moco_hue_shift_rgb(const uint8_t *src, uint8_t *dst, int64_t npix, int shift, int isa) {
    isa = clamp_isa(isa);
    shift &= 255;
    DISPATCH(isa, hue, (src, dst, npix, shift));
    return isa;
}

/* ImageEnhance.Brightness(img).enhance(factor), in place */
int moco_brightness_rgb(uint8_t *px, int64_t npix, double factor, int isa) {
    isa = clamp_isa(isa);
    blend_const(isa, px, 3 * npix, 0, (float)factor);
    return isa;
}

/* ImageEnhance.Contrast(img).enhance(factor), in place */
int moco_contrast_rgb(uint8_t *px, int64_t npix, double factor, int isa) {
    isa = clamp_isa(isa);
    if (npix <= 0)
        return isa;
    int64_t total = DISPATCH(isa, luma_sum, (px, npix));
    int32_t mean = (int32_t)((double)total / (double)npix + 0.5);
    blend_const(isa, px, 3 * npix, mean, (float)factor);
    return isa;
}

/* ImageEnhance.Color(img).enhance(factor) (torchvision's adjust_saturation), in place */
int moco_saturation_rgb(uint8_t *px, int64_t npix, double factor, int isa) {
    isa = clamp_isa(isa);
    DISPATCH(isa, saturation, (px, npix, (float)factor));
    return isa;
}

/* ImageFilter.GaussianBlur(sigma) on an h x w RGB image, in place. Returns the variant that ran, or -1 (the
   image unchanged) for a radius that is not finite or when the work buffers could not be allocated. */
int moco_gaussian_blur_rgb(uint8_t *px, int64_t h, int64_t w, double sigma, int isa) {
    isa = clamp_isa(isa);
    float rf = blur_box_radius((float)sigma);
    if (!(rf >= 0.0f && rf < 1e6f))  /* not a finite radius: leave it to the caller (PIL) */
        return -1;
    if (h <= 0 || w <= 0 || rf == 0.0f)
        return isa;
    int64_t nbytes = 3 * h * w;
    uint8_t *t1 = malloc((size_t)nbytes), *t2 = malloc((size_t)nbytes);
    uint32_t *acc = malloc(sizeof(uint32_t) * (size_t)(3 * (h > w ? h : w)));
    if (!t1 || !t2 || !acc) {
        free(t1);
        free(t2);
        free(acc);
        return -1;
    }
    transpose_rgb(px, t1, h, w);                     /* lines along x: w lines of 3h bytes */
    DISPATCH(isa, box3, (t1, t2, w, 3 * h, rf, acc)); /* result in t2 */
    transpose_rgb(t2, px, w, h);
    DISPATCH(isa, box3, (px, t1, h, 3 * w, rf, acc)); /* lines along y; result in t1 */
    memcpy(px, t1, (size_t)nbytes);
    free(t1);
    free(t2);
    free(acc);
    return isa;
}
