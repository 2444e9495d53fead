/* Weight-only int4/int8 GEMM for CPUs, for the few rows of a decode step (kernels/cpu_native.py
 * compiles this file once with the system C compiler and calls it through ctypes).
 *
 * Why: at one row a decode step reads every weight once, so its time is the weight's bytes.
 * torch's CPU int4/int8 weight-only kernels measured no faster than the fp32 matmul on AVX2
 * (kernels/quant_gemm.py), and torch.compile's C++ for a fused dequantize-and-reduce was 7-16x
 * slower than fp32 (bench/RESULTS.md, "Native CPU decode kernels"). Up to 4 activation rows read
 * each weight row straight from its packed bytes; more rows share 3 weight rows decoded into an
 * L1 buffer.
 *
 * Layout (CpuIntWeight in kernels/cpu_native.py): N rows of K values, row-major, K % 32 == 0.
 *   bits 8: q[n * K + k], one byte per value.
 *   bits 4: per 32-value chunk c of row n, byte j (0..15) holds value 32c + j in its low nibble
 *           and value 32c + 16 + j in its high nibble (llama.cpp's Q4 order): q[n * K/2 + 16c + j].
 *   scales, bias: float [N, K / G] (G % 32 == 0); w[n, k] = q * scales[n, k/G] + bias[n, k/G].
 * x: float [M, K] (row stride ldx), y: float [M, N] (row stride ldy).
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
INLINE void decode_row(const uint8_t *q, const float *s, const float *b, int bits, int64_t K,
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

#define FEW_ROWS 4    /* up to here each row is read from its packed bytes, once per 4 x rows */

/* y[m, r] = dot(buf row r, x row m) for M rows of x and nr (<= 3) decoded weight rows. */
static void dot_rows(const float *buf, int64_t K, const float *x, int64_t ldx, int64_t M,
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

/* Row n of a weight into out[K] (fp32): one per weight layout. */
typedef void (*row_decoder)(const void *w, int64_t n, float *out);

struct int_rows { const uint8_t *q; const float *s, *b; int bits; int64_t K, G; };

static void decode_int_row(const void *w, int64_t n, float *out) {
    const struct int_rows *r = (const struct int_rows *)w;
    const int64_t row_bytes = r->bits == 4 ? r->K / 2 : r->K, groups = r->K / r->G;
    decode_row(r->q + n * row_bytes, r->s + n * groups, r->b + n * groups, r->bits, r->K, r->G,
               out);
}

/* y = x @ w.T for any layout: each thread decodes 3 weight rows into buf [3][K] and runs them
 * against every row of x (many_MT). Returns 0, or 1 when a buffer could not be allocated. */
static int gemm_decoded(const float *x, int64_t M, int64_t ldx, row_decoder decode,
                        const void *w, int64_t K, int64_t N, float *y, int64_t ldy,
                        int nthreads) {
    int failed = 0;
    const int64_t triples = (N + 2) / 3;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *buf = (float *)malloc(sizeof(float) * 3 * K);
        if (buf == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < triples; t++) {
                const int64_t n = 3 * t;
                const int nr = N - n < 3 ? (int)(N - n) : 3;
                for (int r = 0; r < 3; r++) {   /* missing rows repeat the first, unwritten */
                    const int64_t row = n + (r < nr ? r : 0);
                    decode(w, row, buf + r * K);
                }
                dot_rows(buf, K, x, ldx, M, y + n, ldy, nr);
            }
            free(buf);
        }
    }
    return failed;
}

/* GGUF rows in their blocks (cpu_gguf.c). */
void gguf_block_size(int type, int64_t *values, int64_t *bytes);
void gguf_decode_row(const uint8_t *row, int type, int64_t K, float *out);
int gguf_row_q8(const uint8_t *row, int type, int64_t K, uint8_t *q, float *s, float *b);

INLINE int64_t gguf_row_bytes(int type, int64_t K) {
    int64_t values, bytes;
    gguf_block_size(type, &values, &bytes);
    return K / values * bytes;
}

struct gguf_rows { const uint8_t *w; int type; int64_t K, row_bytes; };

static void decode_gguf_row(const void *w, int64_t n, float *out) {
    const struct gguf_rows *r = (const struct gguf_rows *)w;
    gguf_decode_row(r->w + n * r->row_bytes, r->type, r->K, out);
}

/* Per-group sums of M rows of x: xsum [M, K / G]. */
static void group_sums(const float *x, int64_t M, int64_t ldx, int64_t K, int64_t G,
                       float *xsum) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < K / G; g++) {
            float t = 0.f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) t += x[m * ldx + k];
            xsum[m * (K / G) + g] = t;
        }
}

/* y = x @ w.T for a GGUF weight in its blocks; same contract as int_gemm. The caller checks
 * the type and that K is a multiple of its block (cpu_native.block_gemm). Up to FEW_ROWS rows
 * each thread turns a row into the 8-bit layout (gguf_row_q8, in L1) and runs few_MT on it. */
int block_gemm(const float *x, int64_t M, int64_t ldx, const uint8_t *w, int type, int64_t K,
               int64_t N, float *y, int64_t ldy, int nthreads) {
    const struct gguf_rows rows = {w, type, K, gguf_row_bytes(type, K)};
#ifdef __AVX2__
    const int64_t G = type == 14 ? 16 : 32;     /* Q6_K's sub-blocks are 16 */
    if (M <= FEW_ROWS) {
        int failed = 0;
        float *xsum = (float *)malloc(sizeof(float) * M * (K / G));
        if (xsum == NULL) return 1;
        group_sums(x, M, ldx, K, G, xsum);
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
        {
            uint8_t *q = (uint8_t *)malloc(K + 2 * sizeof(float) * (K / G));
            if (q == NULL) {
                failed = 1;
            } else {
                float *s = (float *)(q + K), *b = s + K / G;   /* K % 32 == 0: aligned */
#pragma omp for schedule(static)
                for (int64_t n = 0; n < N; n++) {
                    gguf_row_q8(w + n * rows.row_bytes, type, K, q, s, b);
                    if (G == 16) {
                        switch (M) {
                            case 1: few16_1(q, s, b, K, x, ldx, xsum, y + n, ldy); break;
                            case 2: few16_2(q, s, b, K, x, ldx, xsum, y + n, ldy); break;
                            case 3: few16_3(q, s, b, K, x, ldx, xsum, y + n, ldy); break;
                            default: few16_4(q, s, b, K, x, ldx, xsum, y + n, ldy); break;
                        }
                        continue;
                    }
                    switch (M) {
                        case 1: few_1(q, s, b, 8, K, G, x, ldx, xsum, y + n, ldy); break;
                        case 2: few_2(q, s, b, 8, K, G, x, ldx, xsum, y + n, ldy); break;
                        case 3: few_3(q, s, b, 8, K, G, x, ldx, xsum, y + n, ldy); break;
                        default: few_4(q, s, b, 8, K, G, x, ldx, xsum, y + n, ldy); break;
                    }
                }
                free(q);
            }
        }
        free(xsum);
        return failed;
    }
#endif
    return gemm_decoded(x, M, ldx, decode_gguf_row, &rows, K, N, y, ldy, nthreads);
}

/* out[N, K] = a GGUF weight dequantized (fp32), for the many rows of a prefill. */
void block_dequantize(const uint8_t *w, int type, int64_t K, int64_t N, float *out,
                      int nthreads) {
    const int64_t row_bytes = gguf_row_bytes(type, K);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) gguf_decode_row(w + n * row_bytes, type, K, out + n * K);
}

/* y = x @ w.T. Returns 0, or 1 when a buffer could not be allocated. */
int int_gemm(const float *x, int64_t M, int64_t ldx, const uint8_t *q, const float *s,
             const float *b, int bits, int64_t K, int64_t G, int64_t N, float *y, int64_t ldy,
             int nthreads) {
#ifdef __AVX2__
    const int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / G;
    /* Up to 2 x FEW_ROWS rows (a speculative verification: 1 + k tokens) each weight row runs
     * through few_MT once per FEW_ROWS of them, its bytes still in L1 the second time: the
     * decoded-float path below cost 5 rows ~1.7x what 4 did (one stream, bench/spec.py). */
    if (M <= 2 * FEW_ROWS && groups <= 512) {
        float xsum[2 * FEW_ROWS * 512];
        group_sums(x, M, ldx, K, G, xsum);
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *qn = q + n * row_bytes;
            const float *sn = s + n * groups, *bn = b + n * groups;
            for (int64_t m = 0; m < M; m += FEW_ROWS) {
                const float *xm = x + m * ldx, *xs = xsum + m * groups;
                float *ym = y + m * ldy + n;
                switch (M - m) {
                    case 1: few_1(qn, sn, bn, bits, K, G, xm, ldx, xs, ym, ldy); break;
                    case 2: few_2(qn, sn, bn, bits, K, G, xm, ldx, xs, ym, ldy); break;
                    case 3: few_3(qn, sn, bn, bits, K, G, xm, ldx, xs, ym, ldy); break;
                    default: few_4(qn, sn, bn, bits, K, G, xm, ldx, xs, ym, ldy); break;
                }
            }
        }
        return 0;
    }
#endif
    const struct int_rows rows = {q, s, b, bits, K, G};
    return gemm_decoded(x, M, ldx, decode_int_row, &rows, K, N, y, ldy, nthreads);
}

/* A mixture-of-experts layer's grouped GEMM (kernels/fused_moe.py): rows [starts[g], ends[g])
 * of x ([rows, K], the step's pairs sorted by expert) run against expert experts[g], whose q, s
 * and b start q_stride bytes and sb_stride floats after the previous expert's. One parallel loop
 * over every (group, 3 weight rows) unit: a decode step's 8 routed experts still spread over
 * every thread, and no expert without rows is read. Returns 0, or 1 when a buffer could not be
 * allocated. */
int moe_int_gemm(const float *x, int64_t rows, int64_t ldx, const int64_t *starts,
                 const int64_t *ends, const int64_t *experts, int64_t num_groups,
                 const uint8_t *q, int64_t q_stride, const float *s, const float *b,
                 int64_t sb_stride, int bits, int64_t K, int64_t G, int64_t N, float *y,
                 int64_t ldy, int nthreads) {
    const int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / G;
    const int64_t triples = (N + 2) / 3, units = num_groups * triples;
    int failed = 0;
#ifdef __AVX2__
    float *xsum = (float *)malloc(sizeof(float) * (rows * groups + 1));
    if (xsum == NULL) return 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < rows; m++)
        for (int64_t g = 0; g < groups; g++) {
            float t = 0.f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) t += x[m * ldx + k];
            xsum[m * groups + g] = t;
        }
#endif
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *buf = (float *)malloc(sizeof(float) * 3 * K);
        if (buf == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t u = 0; u < units; u++) {
                const int64_t grp = u / triples, n = 3 * (u % triples);
                const int nr = N - n < 3 ? (int)(N - n) : 3;
                const int64_t m0 = starts[grp], M = ends[grp] - m0;
                const uint8_t *qe = q + experts[grp] * q_stride + n * row_bytes;
                const float *se = s + experts[grp] * sb_stride + n * groups;
                const float *be = b + experts[grp] * sb_stride + n * groups;
                const float *xg = x + m0 * ldx;
                float *yg = y + m0 * ldy + n;
#ifdef __AVX2__
                if (M <= FEW_ROWS) {
                    const float *xs = xsum + m0 * groups;
                    for (int r = 0; r < nr; r++) {
                        const uint8_t *qn = qe + r * row_bytes;
                        const float *sn = se + r * groups, *bn = be + r * groups;
                        switch (M) {
                            case 1: few_1(qn, sn, bn, bits, K, G, xg, ldx, xs, yg + r, ldy); break;
                            case 2: few_2(qn, sn, bn, bits, K, G, xg, ldx, xs, yg + r, ldy); break;
                            case 3: few_3(qn, sn, bn, bits, K, G, xg, ldx, xs, yg + r, ldy); break;
                            default: few_4(qn, sn, bn, bits, K, G, xg, ldx, xs, yg + r, ldy); break;
                        }
                    }
                    continue;
                }
#endif
                for (int r = 0; r < 3; r++) {   /* missing rows repeat the first, unwritten */
                    const int64_t i = r < nr ? r : 0;
                    decode_row(qe + i * row_bytes, se + i * groups, be + i * groups, bits, K, G,
                               buf + r * K);
                }
                dot_rows(buf, K, xg, ldx, M, yg, ldy, nr);
            }
            free(buf);
        }
    }
#ifdef __AVX2__
    free(xsum);
#endif
    return failed;
}

/* out[N, K] = the dequantized weight (fp32), for the many rows of a prefill. */
void int_dequantize(const uint8_t *q, const float *s, const float *b, int bits, int64_t K,
                    int64_t G, int64_t N, float *out, int nthreads) {
    const int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / G;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        decode_row(q + n * row_bytes, s + n * groups, b + n * groups, bits, K, G, out + n * K);
}

/* The 8-bit layout of w [N, K] when every group of 32 is exactly d * q (q in -127..127, d =
 * absmax / 127): q + 128 into q8 [N, K], d into d [N, K / 32]. Returns 1 when exact, else 0
 * (cpu_native.py int8_exact: a tied GGUF Q8_0 embedding, dequantized at load, is exact). */
int int8_exact(const float *w, int64_t N, int64_t K, uint8_t *q8, float *d, int nthreads) {
    int inexact = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : inexact)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < K / 32 && !inexact; g++) {
            const float *wg = w + n * K + g * 32;
            float amax = 0.f;
            for (int j = 0; j < 32; j++) amax = fabsf(wg[j]) > amax ? fabsf(wg[j]) : amax;
            const float dg = amax / 127.f;
            d[n * (K / 32) + g] = dg;
            for (int j = 0; j < 32; j++) {
                const float qf = dg > 0.f ? nearbyintf(wg[j] / dg) : 0.f;
                if (qf * dg != wg[j]) inexact = 1;
                q8[n * K + g * 32 + j] = (uint8_t)(int)(qf + 128.f);
            }
        }
    }
    return !inexact;
}
