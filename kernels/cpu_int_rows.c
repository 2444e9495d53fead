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

/* y[m, n] for M (<= FEW_ROWS) rows of x and weight rows n0 <= n < n1, each read straight from
 * its packed bytes (q, s, b point at weight row 0; xsum from group_sums). G == 16 (GGUF Q6_K
 * turned into bytes) needs bits 8. The portable path dequantizes value by value. */
void few_rows(const uint8_t *q, const float *s, const float *b, int bits, int64_t K, int64_t G,
              int64_t n0, int64_t n1, const float *x, int64_t ldx, const float *xsum, int64_t M,
              float *y, int64_t ldy) {
    const int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / G;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *qn = q + n * row_bytes;
        const float *sn = s + n * groups, *bn = b + n * groups;
#ifdef __AVX2__
        if (G == 16) {
            switch (M) {
                case 1: few16_1(qn, sn, bn, K, x, ldx, xsum, y + n, ldy); break;
                case 2: few16_2(qn, sn, bn, K, x, ldx, xsum, y + n, ldy); break;
                case 3: few16_3(qn, sn, bn, K, x, ldx, xsum, y + n, ldy); break;
                default: few16_4(qn, sn, bn, K, x, ldx, xsum, y + n, ldy); break;
            }
            continue;
        }
        switch (M) {
            case 1: few_1(qn, sn, bn, bits, K, G, x, ldx, xsum, y + n, ldy); break;
            case 2: few_2(qn, sn, bn, bits, K, G, x, ldx, xsum, y + n, ldy); break;
            case 3: few_3(qn, sn, bn, bits, K, G, x, ldx, xsum, y + n, ldy); break;
            default: few_4(qn, sn, bn, bits, K, G, x, ldx, xsum, y + n, ldy); break;
        }
#else
        (void)xsum;
        for (int64_t m = 0; m < M; m++) {
            float t = 0.f;
            for (int64_t k = 0; k < K; k++) {
                const int v = bits == 4 ? (qn[k / 32 * 16 + k % 16] >> (k % 32 < 16 ? 0 : 4)) & 0x0F
                                        : qn[k];
                t += ((float)v * sn[k / G] + bn[k / G]) * x[m * ldx + k];
            }
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

