/* Decode attention over the paged KV cache on CPU: one query token per row, float32 cache
 * (kernels/cpu_native.py builds this file with cpu_int_gemm.c into one library).
 *
 * Why: the torch reference (kernels/attention.py) runs ~8 ops per decode row per layer,
 * gathering the row's blocks into a fresh K/V copy first; at 16 rows that was two thirds of a
 * decode step on a 2-core AVX2 box (bench/decode.py --timers). Here every (row, kv head) is one
 * task: it reads the row's keys in place through the block table, so a step reads the K/V once.
 *
 * Shapes: q [R, H, D] (row stride q_row), k_cache/v_cache [NB, BS, KH, D] contiguous,
 * block_table [R, bt_row] int32, seq_lens [R] int32, out [R, H, D] (row stride out_row).
 * Query head h reads kv head h / (H / KH) (GQA). Softmax in float32, max-subtracted.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int decode_attention(const float *q, int64_t q_row, const float *k_cache, const float *v_cache,
                     const int32_t *block_table, int64_t bt_row, const int32_t *seq_lens,
                     int64_t R, int64_t H, int64_t KH, int64_t D, int64_t BS, float scale,
                     float *out, int64_t out_row, int nthreads) {
    const int64_t G = H / KH, tasks = R * KH;
    int64_t max_len = 0;
    for (int64_t r = 0; r < R; r++) max_len = seq_lens[r] > max_len ? seq_lens[r] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *p = (float *)malloc(sizeof(float) * (size_t)(G * (max_len > 0 ? max_len : 1)));
        if (p == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < tasks; t++) {
                const int64_t r = t / KH, kh = t % KH, S = seq_lens[r];
                const int32_t *blocks = block_table + r * bt_row;
                const float *qh = q + r * q_row + kh * G * D;
                float *oh = out + r * out_row + kh * G * D;
                /* scores p[g, j] = scale * q_g . k_j */
                for (int64_t j = 0; j < S; j++) {
                    const float *kj = k_cache + (((int64_t)blocks[j / BS] * BS + j % BS) * KH + kh) * D;
                    for (int64_t g = 0; g < G; g++) {
                        const float *qg = qh + g * D;
                        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                        for (int64_t d = 0; d < D; d++) acc += qg[d] * kj[d];
                        p[g * S + j] = acc * scale;
                    }
                }
                for (int64_t g = 0; g < G; g++) {
                    float *pg = p + g * S, mx = -INFINITY, sum = 0.f;
                    for (int64_t j = 0; j < S; j++) mx = pg[j] > mx ? pg[j] : mx;
#pragma omp simd reduction(+ : sum)
                    for (int64_t j = 0; j < S; j++) {
                        pg[j] = expf(pg[j] - mx);
                        sum += pg[j];
                    }
                    const float inv = sum > 0.f ? 1.f / sum : 0.f;
                    float *og = oh + g * D;
                    for (int64_t d = 0; d < D; d++) og[d] = 0.f;
                    for (int64_t j = 0; j < S; j++) {
                        const float *vj = v_cache + (((int64_t)blocks[j / BS] * BS + j % BS) * KH + kh) * D;
                        const float w = pg[j] * inv;
#pragma omp simd
                        for (int64_t d = 0; d < D; d++) og[d] += w * vj[d];
                    }
                }
            }
            free(p);
        }
    }
    return failed;
}
