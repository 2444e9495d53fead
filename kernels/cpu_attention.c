/* Decode attention over the paged KV cache on CPU: one query token per row, float32 cache
 * (kernels/cpu_native.py builds this file with cpu_int_gemm.c into one library).
 *
 * Why: the torch reference (kernels/attention.py) runs ~8 ops per decode row per layer,
 * gathering the row's blocks into a fresh K/V copy first; at 16 rows that was two thirds of a
 * decode step on a 2-core AVX2 box (bench/decode.py --timers). Here every row is one task: it
 * reads the row's keys in place through the block table, so a step reads the K/V once.
 *
 * Shapes: q [R, H, D] (row stride q_row), k_cache/v_cache [NB, BS, KH, D] contiguous,
 * block_table [R, bt_row] int32, seq_lens [R] int32, out [R, H, D] (row stride out_row).
 * Query head h reads kv head h / (H / KH) (GQA). Softmax in float32, max-subtracted.
 * window > 0: only the row's last `window` keys (a sliding-window layer). sinks [H] (or NULL):
 * gpt-oss's learned sinks, one more exp(sinks[h]) term in head h's denominator, no value.
 * softcap > 0: each scaled logit s becomes softcap * tanh(s / softcap) (Gemma's
 * attn_logit_softcapping; the sink's logit is not capped).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int decode_attention(const float *q, int64_t q_row, const float *k_cache, const float *v_cache,
                     const int32_t *block_table, int64_t bt_row, const int32_t *seq_lens,
                     int64_t R, int64_t H, int64_t KH, int64_t D, int64_t BS, float scale,
                     const float *sinks, float softcap, int64_t window, float *out,
                     int64_t out_row,
                     int nthreads) {
    /* One task per row: it walks the row's keys once, each key's [KH, D] slot read whole for
     * every query head (a task per (row, kv head) read a third of each slot, strided, and
     * reached ~3 GB/s from DRAM against ~20 for whole slots). */
    const int64_t G = H / KH, slot = KH * D;
    int64_t max_len = 0, keys = 0;
    for (int64_t r = 0; r < R; r++) {
        max_len = seq_lens[r] > max_len ? seq_lens[r] : max_len;
        keys += seq_lens[r];
    }
    /* Threads only for work worth waking them: a speculative verification (5 rows of ~300
     * keys, 9 heads of 64) is ~0.2 ms of one core, where a parallel region on a busy 2-core box
     * cost a step's attention 225 ms of wall against 24 of CPU (one stream, load ~11). */
    const int parallel = R > 1 && keys * H * D >= ((int64_t)1 << 21);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed) if (parallel)
    {
        float *p = (float *)malloc(sizeof(float) * (size_t)(H * (max_len > 0 ? max_len : 1)));
        if (p == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t r = 0; r < R; r++) {
                const int64_t S = seq_lens[r];
                const int64_t j0 = window > 0 && S > window ? S - window : 0, N = S - j0;
                const int32_t *blocks = block_table + r * bt_row;
                const float *qr = q + r * q_row;
                float *orow = out + r * out_row;
                /* scores p[h, j - j0] = scale * q_h . k_j[h / G] */
                for (int64_t j = j0; j < S; j++) {
                    const float *kj = k_cache + ((int64_t)blocks[j / BS] * BS + j % BS) * slot;
                    for (int64_t h = 0; h < H; h++) {
                        const float *qh = qr + h * D, *kh = kj + (h / G) * D;
                        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                        for (int64_t d = 0; d < D; d++) acc += qh[d] * kh[d];
                        p[h * N + j - j0] = acc * scale;
                    }
                }
                if (softcap > 0.f) {
                    for (int64_t i = 0; i < H * N; i++) p[i] = softcap * tanhf(p[i] / softcap);
                }
                for (int64_t h = 0; h < H; h++) {
                    float *ph = p + h * N, mx = sinks ? sinks[h] : -INFINITY, sum = 0.f;
                    for (int64_t j = 0; j < N; j++) mx = ph[j] > mx ? ph[j] : mx;
                    for (int64_t j = 0; j < N; j++) {
                        ph[j] = expf(ph[j] - mx);
                        sum += ph[j];
                    }
                    if (sinks) sum += expf(sinks[h] - mx);
                    const float inv = sum > 0.f ? 1.f / sum : 0.f;
                    for (int64_t j = 0; j < N; j++) ph[j] *= inv;
                    float *oh = orow + h * D;
                    for (int64_t d = 0; d < D; d++) oh[d] = 0.f;
                }
                for (int64_t j = j0; j < S; j++) {
                    const float *vj = v_cache + ((int64_t)blocks[j / BS] * BS + j % BS) * slot;
                    for (int64_t h = 0; h < H; h++) {
                        const float w = p[h * N + j - j0], *vh = vj + (h / G) * D;
                        float *oh = orow + h * D;
#pragma omp simd
                        for (int64_t d = 0; d < D; d++) oh[d] += w * vh[d];
                    }
                }
            }
            free(p);
        }
    }
    return failed;
}
