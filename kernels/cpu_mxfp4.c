/* MXFP4 (gpt-oss's experts) GEMM for CPUs, for the few rows of a decode step, straight from the
 * 4-bit blocks (kernels/cpu_native.py builds this file with the others; kernels/mxfp4.py calls
 * it). Layout (kernels/mxfp4.py): blocks uint8 [N, K/2], byte j holds values 2j (low nibble)
 * and 2j+1 (high); scales uint8 [N, K/32], e8m0 (2^(s - 127) per 32 values).
 *
 * Why: a decode step reads every routed expert's weight once, so its time is the weight's bytes;
 * the blocks are 4.25 bits a value, against 32 for the float32 weights a dequantized checkpoint
 * would give. Twice each e2m1 value is an integer (0, 1, 2, 3, 4, 6, 8, 12 and negatives), so
 * AVX2 decodes 32 of them with two byte shuffles of one 16-entry table, and the factor 1/2
 * goes into the group's scale: w = (2v) * 2^(s - 128).
 * x: float [M, K] (contiguous), y: float [M, N]. */
#include <math.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MXFP4_MAX_ROWS 16

static const float FP4_TWICE[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static void scale_table(float tab[256]) {
    for (int i = 0; i < 256; i++) tab[i] = ldexpf(1.f, i - 128);
}

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

/* 32 values (twice their e2m1 value) of one group, in order, as 4 x 8 floats. */
static inline void decode32(const uint8_t *p, __m256 w[4]) {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i mask = _mm_set1_epi8(0x0F), raw = _mm_loadu_si128((const __m128i *)p);
    const __m128i even = _mm_shuffle_epi8(lut, _mm_and_si128(raw, mask));
    const __m128i odd = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(raw, 4), mask));
    const __m128i a = _mm_unpacklo_epi8(even, odd), b = _mm_unpackhi_epi8(even, odd);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
}
#endif

/* y = x @ w.T for M <= MXFP4_MAX_ROWS rows: each weight row is read once from its blocks. */
void mxfp4_gemm(const float *x, int64_t M, int64_t K, const uint8_t *blocks,
                const uint8_t *scales, int64_t N, float *y, int nthreads) {
    float tab[256];
    scale_table(tab);
    const int64_t groups = K / 32;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *bn = blocks + n * (K / 2), *sn = scales + n * groups;
#ifdef __AVX2__
        __m256 acc[MXFP4_MAX_ROWS];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            __m256 w[4];
            decode32(bn + 16 * g, w);
            const __m256 sc = _mm256_set1_ps(tab[sn[g]]);
            for (int64_t m = 0; m < M; m++) {
                const float *xm = x + m * K + 32 * g;
                __m256 c0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xm));
                __m256 c1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xm + 8));
                c0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xm + 16), c0);
                c1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xm + 24), c1);
                acc[m] = _mm256_fmadd_ps(sc, _mm256_add_ps(c0, c1), acc[m]);
            }
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = hsum8(acc[m]);
#else
        float acc[MXFP4_MAX_ROWS] = {0};
        for (int64_t g = 0; g < groups; g++) {
            float w[32];
            for (int j = 0; j < 16; j++) {
                w[2 * j] = FP4_TWICE[bn[16 * g + j] & 0x0F];
                w[2 * j + 1] = FP4_TWICE[bn[16 * g + j] >> 4];
            }
            const float sc = tab[sn[g]];
            for (int64_t m = 0; m < M; m++) {
                float t = 0.f;
                for (int j = 0; j < 32; j++) t += w[j] * x[m * K + 32 * g + j];
                acc[m] += sc * t;
            }
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = acc[m];
#endif
    }
}

/* out[N, K] = the weight in float32, for the many rows of a prefill (one sgemm after). */
void mxfp4_dequantize(const uint8_t *blocks, const uint8_t *scales, int64_t K, int64_t N,
                      float *out, int nthreads) {
    float tab[256];
    scale_table(tab);
    const int64_t groups = K / 32;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *p = blocks + n * (K / 2) + 16 * g;
            const float sc = tab[scales[n * groups + g]];
            float *o = out + n * K + 32 * g;
            for (int j = 0; j < 16; j++) {
                o[2 * j] = FP4_TWICE[p[j] & 0x0F] * sc;
                o[2 * j + 1] = FP4_TWICE[p[j] >> 4] * sc;
            }
        }
}
