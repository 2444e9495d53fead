/* Weight-only int4/int8 GEMM for CPUs, for the few rows of a decode step (kernels/cpu_native.py
 * compiles this file once with the system C compiler and calls it through ctypes): the drivers,
 * which split the weight rows over threads; the row kernels are in cpu_int_rows.c.
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

#define INLINE static inline __attribute__((always_inline))
#define FEW_ROWS 4    /* up to here each row is read from its packed bytes, once per 4 x rows */
#define ROW_BLOCK 8   /* weight rows per few_rows call */

/* The row kernels (cpu_int_rows.c). */
void int_decode_row(const uint8_t *q, const float *s, const float *b, int bits, int64_t K,
                    int64_t G, float *out);
void int_dot_rows(const float *buf, int64_t K, const float *x, int64_t ldx, int64_t M, float *y,
                  int64_t ldy, int nr);
void *act_prepare(const float *x, int64_t M, int64_t ldx, int64_t K, int64_t G, int quantize,
                  int8_t **xq, float **xd, float **xsum);
void few_rows(const uint8_t *q, const float *s, const float *b, int bits, int64_t K, int64_t G,
              int64_t n0, int64_t n1, const float *x, int64_t ldx, const int8_t *xq,
              const float *xd, const float *xsum, int64_t M, float *y, int64_t ldy);

/* Row n of a weight into out[K] (fp32): one per weight layout. */
typedef void (*row_decoder)(const void *w, int64_t n, float *out);

struct int_rows { const uint8_t *q; const float *s, *b; int bits; int64_t K, G; };

static void decode_int_row(const void *w, int64_t n, float *out) {
    const struct int_rows *r = (const struct int_rows *)w;
    const int64_t row_bytes = r->bits == 4 ? r->K / 2 : r->K, groups = r->K / r->G;
    int_decode_row(r->q + n * row_bytes, r->s + n * groups, r->b + n * groups, r->bits, r->K, r->G,
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
                int_dot_rows(buf, K, x, ldx, M, y + n, ldy, nr);
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

/* y = x @ w.T for a GGUF weight in its blocks; same contract as int_gemm. The caller checks
 * the type and that K is a multiple of its block (cpu_native.block_gemm). Up to FEW_ROWS rows
 * each thread turns a row into the 8-bit layout (gguf_row_q8, in L1) and runs few_rows on it. */
int block_gemm(const float *x, int64_t M, int64_t ldx, const uint8_t *w, int type, int64_t K,
               int64_t N, float *y, int64_t ldy, int quantize, int nthreads) {
    const struct gguf_rows rows = {w, type, K, gguf_row_bytes(type, K)};
    if (M > FEW_ROWS)
        return gemm_decoded(x, M, ldx, decode_gguf_row, &rows, K, N, y, ldy, nthreads);
    const int64_t G = type == 14 ? 16 : 32;     /* Q6_K's sub-blocks are 16 */
    int failed = 0;
    int8_t *xq;
    float *xd, *xsum;
    void *act = act_prepare(x, M, ldx, K, G, quantize, &xq, &xd, &xsum);
    if (act == NULL) return 1;
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
                few_rows(q, s, b, 8, K, G, 0, 1, x, ldx, xq, xd, xsum, M, y + n, ldy);
            }
            free(q);
        }
    }
    free(act);
    return failed;
}

/* out[N, K] = a GGUF weight dequantized (fp32), for the many rows of a prefill. */
void block_dequantize(const uint8_t *w, int type, int64_t K, int64_t N, float *out,
                      int nthreads) {
    const int64_t row_bytes = gguf_row_bytes(type, K);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) gguf_decode_row(w + n * row_bytes, type, K, out + n * K);
}

/* y = x @ w.T; up to 2 x FEW_ROWS rows (a speculative verification: 1 + k tokens) on int8
 * activations when `quantize` (act_prepare), else on x as it is. Each ROW_BLOCK of weight rows
 * runs through few_rows once per FEW_ROWS of x's rows, its bytes still in cache the second time
 * (the decoded-float path below cost 5 rows ~1.7x what 4 did: one stream, bench/spec_step.py).
 * A row's result does not depend on how many rows share the call (the few-rows kernels keep one
 * accumulator per row in the same order), so a verification row's greedy token is a decode's.
 * Returns 0, or 1 when a buffer could not be allocated. */
int int_gemm(const float *x, int64_t M, int64_t ldx, const uint8_t *q, const float *s,
             const float *b, int bits, int64_t K, int64_t G, int64_t N, float *y, int64_t ldy,
             int quantize, int nthreads) {
    if (M <= 2 * FEW_ROWS) {
        int8_t *xq;
        float *xd, *xsum;
        void *act = act_prepare(x, M, ldx, K, G, quantize, &xq, &xd, &xsum);
        if (act == NULL) return 1;
        const int64_t blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK, groups = K / G;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t t = 0; t < blocks; t++) {
            const int64_t n0 = t * ROW_BLOCK, n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
            for (int64_t m = 0; m < M; m += FEW_ROWS)
                few_rows(q, s, b, bits, K, G, n0, n1, x + m * ldx, ldx,
                         xq ? xq + m * K : NULL, xd ? xd + m * (K / 32) : NULL,
                         xsum + m * groups, M - m < FEW_ROWS ? M - m : FEW_ROWS,
                         y + m * ldy, ldy);
        }
        free(act);
        return 0;
    }
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
                 int64_t ldy, int quantize, int nthreads) {
    const int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / G;
    const int64_t triples = (N + 2) / 3, units = num_groups * triples;
    int failed = 0;
    int8_t *xq;
    float *xd, *xsum;
    void *act = act_prepare(x, rows, ldx, K, G, quantize, &xq, &xd, &xsum);
    if (act == NULL) return 1;
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
                if (M <= FEW_ROWS) {
                    few_rows(qe, se, be, bits, K, G, 0, nr, xg, ldx, xq ? xq + m0 * K : NULL,
                             xd ? xd + m0 * (K / 32) : NULL, xsum + m0 * groups, M, yg, ldy);
                    continue;
                }
                for (int r = 0; r < 3; r++) {   /* missing rows repeat the first, unwritten */
                    const int64_t i = r < nr ? r : 0;
                    int_decode_row(qe + i * row_bytes, se + i * groups, be + i * groups, bits,
                                   K, G, buf + r * K);
                }
                int_dot_rows(buf, K, xg, ldx, M, yg, ldy, nr);
            }
            free(buf);
        }
    }
    free(act);
    return failed;
}

/* out[N, K] = the dequantized weight (fp32), for the many rows of a prefill. */
void int_dequantize(const uint8_t *q, const float *s, const float *b, int bits, int64_t K,
                    int64_t G, int64_t N, float *out, int nthreads) {
    const int64_t row_bytes = bits == 4 ? K / 2 : K, groups = K / G;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        int_decode_row(q + n * row_bytes, s + n * groups, b + n * groups, bits, K, G, out + n * K);
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
