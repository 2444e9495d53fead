/* The row kernels of the int GEMM (cpu_int_gemm.c drives them over threads; kernels/cpu_native.py
 * builds this file with the others into one library): a weight row dequantized, the few-rows dot
 * products straight from the packed bytes (few_rows), and the many-rows dot products against 3
 * decoded rows (int_dot_rows). The layout is cpu_int_gemm.c's.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))

#ifdef __AVX2__
INLINE float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

/* 32 values of a row as floats q (scale and bias not applied), in 4 registers. */
INLINE void load32(const uint8_t *p, int bits, __m256 w[4]) {
    __m256i v0, v1, v2, v3;
    if (bits == 4) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(raw, mask);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        v0 = _mm256_cvtepu8_epi32(lo);
        v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
        v2 = _mm256_cvtepu8_epi32(hi);
        v3 = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
    } else {
        v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
        v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
        v2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 16)));
        v3 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 24)));
    }
    w[0] = _mm256_cvtepi32_ps(v0);
    w[1] = _mm256_cvtepi32_ps(v1);
    w[2] = _mm256_cvtepi32_ps(v2);
    w[3] = _mm256_cvtepi32_ps(v3);
}
#endif

/* Row n of the weight, dequantized into out[K] (fp32). */
void int_decode_row(const uint8_t *q, const float *s, const float *b, int bits, int64_t K,
                    int64_t G, float *out) {
    for (int64_t k = 0; k < K; k += 32) {
        const float sc = s[k / G], bi = b[k / G];
        const uint8_t *p = bits == 4 ? q + k / 2 : q + k;
#ifdef __AVX2__
        const __m256 vs = _mm256_set1_ps(sc), vb = _mm256_set1_ps(bi);
        __m256 w[4];
        load32(p, bits, w);
        for (int i = 0; i < 4; i++)
            _mm256_storeu_ps(out + k + 8 * i, _mm256_fmadd_ps(w[i], vs, vb));
#else
        for (int j = 0; j < 32; j++) {
            int v = bits == 4 ? (j < 16 ? p[j] & 0x0F : p[j - 16] >> 4) : p[j];
            out[k + j] = (float)v * sc + bi;
        }
#endif
    }
}

#ifdef __AVX2__
/* Few rows (a decode step), straight from the packed row: per 32-chunk c, dot(q_c, x_c) is
 * scaled once; the bias term is sum_g bias[g] * sum(x over group g), from xsum [M, K / G]. */
#define FEW(MT)                                                                               \
    static void few_##MT(const uint8_t *q, const float *s, const float *b, int bits, int64_t K, \
                         int64_t G, const float *x, int64_t ldx, const float *xsum, float *y,  \
                         int64_t ldy) {                                                       \
        __m256 acc[MT];                                                                       \
        for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();                            \
        for (int64_t k = 0; k < K; k += 32) {                                                 \
            __m256 w[4];                                                                      \
            load32(bits == 4 ? q + k / 2 : q + k, bits, w);                                   \
            const __m256 sc = _mm256_set1_ps(s[k / G]);                                       \
            for (int m = 0; m < MT; m++) {                                                    \
                const float *xm = x + m * ldx + k;                                            \
                __m256 c0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xm));                         \
                __m256 c1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xm + 8));                     \
                c0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xm + 16), c0);                     \
                c1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xm + 24), c1);                     \
                acc[m] = _mm256_fmadd_ps(sc, _mm256_add_ps(c0, c1), acc[m]);                  \
            }                                                                                 \
        }                                                                                     \
        FEW_BIAS(MT)                                                                          \
    }

/* The same for groups of 16 (GGUF Q6_K), whose scale changes mid-chunk; 8-bit values only. */
#define FEW16(MT)                                                                             \
    static void few16_##MT(const uint8_t *q, const float *s, const float *b, int64_t K,        \
                           const float *x, int64_t ldx, const float *xsum, float *y,          \
                           int64_t ldy) {                                                     \
        const int64_t G = 16;                                                                 \
        __m256 acc[MT];                                                                       \
        for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();                            \
        for (int64_t k = 0; k < K; k += 32) {                                                 \
            __m256 w[4];                                                                      \
            load32(q + k, 8, w);                                                              \
            const __m256 lo = _mm256_set1_ps(s[k / G]), hi = _mm256_set1_ps(s[k / G + 1]);    \
            for (int m = 0; m < MT; m++) {                                                    \
                const float *xm = x + m * ldx + k;                                            \
                __m256 c0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xm));                         \
                __m256 c1 = _mm256_mul_ps(w[2], _mm256_loadu_ps(xm + 16));                    \
                c0 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xm + 8), c0);                      \
                c1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xm + 24), c1);                     \
                acc[m] = _mm256_fmadd_ps(hi, c1, _mm256_fmadd_ps(lo, c0, acc[m]));            \
            }                                                                                 \
        }                                                                                     \
        FEW_BIAS(MT)                                                                          \
    }

/* y[m] = the scaled dot products plus sum_g bias[g] * xsum[m, g]. */
#define FEW_BIAS(MT)                                                                          \
        const int64_t groups = K / G;                                                         \
        for (int m = 0; m < MT; m++) {                                                        \
            float t = hsum(acc[m]);                                                           \
            for (int64_t g = 0; g < groups; g++) t += b[g] * xsum[m * groups + g];            \
            y[m * ldy] = t;                                                                   \
        }
FEW(1)
FEW(2)
FEW(3)
FEW(4)
FEW16(1)
FEW16(2)
FEW16(3)
FEW16(4)

/* The integer dot products of int8 activations (act_prepare) with 32 weight values as unsigned
 * bytes: dpbusd where the CPU has AVX-VNNI or AVX512-VNNI (-march=native sets the macros), else
 * AVX2's maddubs. 4 bits: maddubs(w, x) (2 * 15 * 127 fits its int16 pairs). 8 bits, whose
 * pairs could saturate (2 * 255 * 127): on w - 128, as maddubs(|w - 128|, x * sign(w - 128))
 * (2 * 128 * 127 fits; |-128| is 128 as an unsigned byte), and the 128 * x the dot lost goes
 * into the bias term (the end of FEWQ). Lanes 0-3 sum values 0-15, lanes 4-7 values 16-31. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (s))
#elif defined(__AVXVNNI__)
#define DPBUSD(u, s) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), (u), (s))
#endif
#ifdef DPBUSD
#define SHIFTED8 0      /* dpbusd takes 0..255 weights as they are */
#else
#define SHIFTED8 128
#endif

/* 32 values in order: 0..15, or (8 bits) 0..255, or w - 128 as signed bytes without DPBUSD. */
INLINE __m256i wbytes(const uint8_t *p, int bits) {
    if (bits == 8) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)p);
        return SHIFTED8 ? _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)) : w;
    }
    const __m128i raw = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

INLINE __m256i idot32(__m256i w, __m256i wabs, __m256i x, int bits) {
#ifdef DPBUSD
    (void)wabs, (void)bits;
    return DPBUSD(w, x);
#else
    const __m256i p = bits == 4 ? _mm256_maddubs_epi16(w, x)
                                : _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

/* FEW's twin on int8 activations xq [MT, K] with block scales xd [MT, K / 32]: per 32-chunk one
 * integer dot product per row, scaled by the weight's and the activation's scales. */
#define FEWQ(MT)                                                                              \
    static void fewq_##MT(const uint8_t *q, const float *s, const float *b, int bits,         \
                          int64_t K, int64_t G, const int8_t *xq, const float *xd,            \
                          const float *xsum, float *y, int64_t ldy) {                         \
        __m256 acc[MT];                                                                       \
        for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();                            \
        for (int64_t k = 0; k < K; k += 32) {                                                 \
            const __m256i w = wbytes(bits == 4 ? q + k / 2 : q + k, bits);                    \
            const __m256i wabs = _mm256_abs_epi8(w);    /* 8 bits without DPBUSD only */      \
            const __m256 sc = G == 16 ? _mm256_setr_m128(_mm_set1_ps(s[k / 16]),             \
                                                         _mm_set1_ps(s[k / 16 + 1]))          \
                                      : _mm256_set1_ps(s[k / G]);                             \
            for (int m = 0; m < MT; m++) {                                                    \
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + m * K + k));     \
                const __m256 d = _mm256_mul_ps(sc, _mm256_set1_ps(xd[m * (K / 32) + k / 32])); \
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot32(w, wabs, xv, bits)), d,    \
                                         acc[m]);                                             \
            }                                                                                 \
        }                                                                                     \
        const int64_t groups = K / G;                                                         \
        const float shift = bits == 8 ? (float)SHIFTED8 : 0.f;                                \
        for (int m = 0; m < MT; m++) {                                                        \
            float t = hsum(acc[m]);                                                           \
            for (int64_t g = 0; g < groups; g++)                                              \
                t += (b[g] + shift * s[g]) * xsum[m * groups + g];                            \
            y[m * ldy] = t;                                                                   \
        }                                                                                     \
    }
FEWQ(1)
FEWQ(2)
FEWQ(3)
FEWQ(4)

/* The kernels by row count (M - 1). */
static void (*const FEW_M[4])(const uint8_t *, const float *, const float *, int, int64_t,
                              int64_t, const float *, int64_t, const float *, float *,
                              int64_t) = {few_1, few_2, few_3, few_4};
static void (*const FEW16_M[4])(const uint8_t *, const float *, const float *, int64_t,
                                const float *, int64_t, const float *, float *,
                                int64_t) = {few16_1, few16_2, few16_3, few16_4};
static void (*const FEWQ_M[4])(const uint8_t *, const float *, const float *, int, int64_t,
                               int64_t, const int8_t *, const float *, const float *, float *,
                               int64_t) = {fewq_1, fewq_2, fewq_3, fewq_4};

/* Many rows: NR (<= 3) weight rows decoded into buf [3][K], against MT (<= 4) rows of x at
 * once: 3 x MT accumulators + 3 weight registers + 1 for x fill the 16 ymm registers, so each
 * k-step issues 3 + MT loads for 3 * MT FMAs (4 weight rows left no register for x, and the
 * compiler re-read x from memory for every FMA). */
#define MANY(MT)                                                                              \
    static void many_##MT(const float *buf, int64_t K, const float *x, int64_t ldx, float *y,  \
                          int64_t ldy, int nr) {                                              \
        __m256 acc[MT][3];                                                                    \
        for (int m = 0; m < MT; m++)                                                          \
            for (int r = 0; r < 3; r++) acc[m][r] = _mm256_setzero_ps();                      \
        for (int64_t k = 0; k < K; k += 8) {                                                  \
            __m256 w0 = _mm256_loadu_ps(buf + k), w1 = _mm256_loadu_ps(buf + K + k);          \
            __m256 w2 = _mm256_loadu_ps(buf + 2 * K + k);                                     \
            __asm__("" : "+x"(w0), "+x"(w1), "+x"(w2));                                       \
            for (int m = 0; m < MT; m++) {                                                    \
                __m256 xv = _mm256_loadu_ps(x + m * ldx + k);                                 \
                __asm__("" : "+x"(xv));  /* registers, not memory operands */     \
                acc[m][0] = _mm256_fmadd_ps(w0, xv, acc[m][0]);                               \
                acc[m][1] = _mm256_fmadd_ps(w1, xv, acc[m][1]);                               \
                acc[m][2] = _mm256_fmadd_ps(w2, xv, acc[m][2]);                               \
            }                                                                                 \
        }                                                                                     \
        for (int m = 0; m < MT; m++)                                                          \
            for (int r = 0; r < nr; r++) y[m * ldy + r] = hsum(acc[m][r]);                    \
    }
MANY(1)
MANY(2)
MANY(3)
MANY(4)
#endif


#ifndef __AVX2__
INLINE int wvalue(const uint8_t *row, int bits, int64_t k) {    /* value k of a packed row */
    return bits == 8 ? row[k] : (row[k / 32 * 16 + k % 16] >> (k % 32 < 16 ? 0 : 4)) & 0x0F;
}
#endif

/* Per-group sums of M rows of x: xsum [M, K / G] (the bias term of the few-rows kernels). */
void group_sums(const float *x, int64_t M, int64_t ldx, int64_t K, int64_t G, float *xsum) {
#pragma omp parallel for schedule(static) if (M >= 64)
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < K / G; g++) {
            float t = 0.f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) t += x[m * ldx + k];
            xsum[m * (K / G) + g] = t;
        }
}

/* Rows of x to 8 bits in blocks of 32, as llama.cpp quantizes activations (its Q8_0): d =
 * absmax / 127, xq = round(x * 127 / absmax) in -127..127, into xq [M, K] and xd [M, K / 32];
 * xsum [M, K / G] gets the group sums of the quantized values (d * xq), so that the bias term
 * and the dot products see the same activations. cpu_native.quantize_rows_ref is the reference. */
void quantize_rows_q8(const float *x, int64_t M, int64_t ldx, int64_t K, int64_t G, int8_t *xq,
                      float *xd, float *xsum) {
    for (int64_t i = 0; i < M * (K / G); i++) xsum[i] = 0.f;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += 32) {
            const float *xk = x + m * ldx + k;
            int8_t *qk = xq + m * K + k;
            float lo, hi, amax = 0.f;
#ifdef __AVX2__
            const __m256 sign = _mm256_set1_ps(-0.0f);
            __m256 v[4], a = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(xk + 8 * i);
                a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v[i]));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
            const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            __m256i i32[4];
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_round_ps(_mm256_mul_ps(v[i], id),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                i32[i] = _mm256_cvtps_epi32(v[i]);
            }
            lo = hsum(_mm256_add_ps(v[0], v[1]));
            hi = hsum(_mm256_add_ps(v[2], v[3]));
            const __m256i i16 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]),
                                                   _mm256_packs_epi32(i32[2], i32[3]));
            _mm256_storeu_si256((__m256i *)qk, _mm256_permutevar8x32_epi32(
                                                   i16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
            for (int j = 0; j < 32; j++) amax = fabsf(xk[j]) > amax ? fabsf(xk[j]) : amax;
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            lo = hi = 0.f;
            for (int j = 0; j < 32; j++) {
                const float r = nearbyintf(xk[j] * id);
                qk[j] = (int8_t)r;
                if (j < 16) lo += r; else hi += r;
            }
#endif
            const float d = amax / 127.f;
            xd[m * (K / 32) + k / 32] = d;
            xsum[m * (K / G) + k / G] += d * lo;
            xsum[m * (K / G) + (k + 16) / G] += d * hi;
        }
}

/* The activations of a few-rows call in one buffer (free it; NULL when out of memory): xsum
 * [M, K / G], and with `quantize` xq [M, K] and xd [M, K / 32] (else NULL: fp32 x is used). */
void *act_prepare(const float *x, int64_t M, int64_t ldx, int64_t K, int64_t G, int quantize,
                  int8_t **xq, float **xd, float **xsum) {
    const int64_t floats = M * (K / G) + (quantize ? M * (K / 32) : 0);
    void *mem = malloc(sizeof(float) * (size_t)floats + (quantize ? (size_t)(M * K) : 0) + 1);
    if (mem == NULL) return NULL;
    *xsum = (float *)mem;
    *xq = NULL;
    *xd = NULL;
    if (!quantize) {
        group_sums(x, M, ldx, K, G, *xsum);
        return mem;
    }
    *xd = *xsum + M * (K / G);
    *xq = (int8_t *)(*xd + M * (K / 32));
    quantize_rows_q8(x, M, ldx, K, G, *xq, *xd, *xsum);
    return mem;
}

/* y[m, n] for M (<= FEW_ROWS) rows of x and weight rows n0 <= n < n1, each read straight from
 * its packed bytes (q, s, b point at weight row 0; xq, xd, xsum from act_prepare: xq NULL runs
 * on the fp32 x). G == 16 (GGUF Q6_K turned into bytes) needs bits 8. The portable path works
 * value by value. */
void few_rows(const uint8_t *q, const float *s, const float *b, int bits, int64_t K, int64_t G,
              int64_t n0, int64_t n1, const float *x, int64_t ldx, const int8_t *xq,
              const float *xd, const float *xsum, int64_t M, float *y, int64_t ldy) {
    const int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / G;
    if (M < 1 || M > 4) return;    /* the callers send 1..FEW_ROWS rows */
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *qn = q + n * row_bytes;
        const float *sn = s + n * groups, *bn = b + n * groups;
        if (xq != NULL) {
#ifdef __AVX2__
            FEWQ_M[M - 1](qn, sn, bn, bits, K, G, xq, xd, xsum, y + n, ldy);
#else
            for (int64_t m = 0; m < M; m++) {
                float t = 0.f;
                for (int64_t k = 0; k < K; k += 16) {
                    int32_t dot = 0;
                    for (int64_t j = k; j < k + 16; j++)
                        dot += wvalue(qn, bits, j) * xq[m * K + j];
                    t += (float)dot * (sn[k / G] * xd[m * (K / 32) + k / 32]);
                }
                for (int64_t g = 0; g < groups; g++) t += bn[g] * xsum[m * groups + g];
                y[m * ldy + n] = t;
            }
#endif
            continue;
        }
#ifdef __AVX2__
        if (G == 16)
            FEW16_M[M - 1](qn, sn, bn, K, x, ldx, xsum, y + n, ldy);
        else
            FEW_M[M - 1](qn, sn, bn, bits, K, G, x, ldx, xsum, y + n, ldy);
#else
        (void)xsum;
        for (int64_t m = 0; m < M; m++) {
            float t = 0.f;
            for (int64_t k = 0; k < K; k++)
                t += ((float)wvalue(qn, bits, k) * sn[k / G] + bn[k / G]) * x[m * ldx + k];
            y[m * ldy + n] = t;
        }
#endif
    }
}

/* y[m, r] = dot(buf row r, x row m) for M rows of x and nr (<= 3) decoded weight rows. */
void int_dot_rows(const float *buf, int64_t K, const float *x, int64_t ldx, int64_t M,
                  float *y, int64_t ldy, int nr) {
    int64_t m = 0;
#ifdef __AVX2__
    for (; m + 4 <= M; m += 4) many_4(buf, K, x + m * ldx, ldx, y + m * ldy, ldy, nr);
    switch (M - m) {
        case 3: many_3(buf, K, x + m * ldx, ldx, y + m * ldy, ldy, nr); break;
        case 2: many_2(buf, K, x + m * ldx, ldx, y + m * ldy, ldy, nr); break;
        case 1: many_1(buf, K, x + m * ldx, ldx, y + m * ldy, ldy, nr); break;
    }
#else
    for (; m < M; m++)
        for (int r = 0; r < nr; r++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += buf[r * K + k] * x[m * ldx + k];
            y[m * ldy + r] = acc;
        }
#endif
}

