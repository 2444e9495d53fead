/* A decoder layer's small ops on CPU, one call each (kernels/cpu_native.py builds this file with
 * the others into one library). Float32, contiguous rows.
 *
 * Why: at one decode row these are microseconds of arithmetic behind 3-7 torch ops each (~6 us
 * of dispatch apiece on a 2-core AVX2 box): the pre-norm with its residual add was ~90 us a
 * call, 61 calls a step, and the K/V store ~90 us a layer (bench/decode.py --timers). */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* x [M, D] (+ residual [M, D] when given: x + residual is normed, and written to res_out)
 * -> out [M, D] = weight * x * rsqrt(mean(x^2) + eps). */
void rms_norm(const float *x, const float *residual, float *res_out, const float *weight,
              float *out, int64_t M, int64_t D, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M >= 8)
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * D;
        float *om = out + m * D;
        float ss = 0.f;
        if (residual) {
            const float *rm = residual + m * D;
            float *ro = res_out + m * D;
#pragma omp simd reduction(+ : ss)
            for (int64_t d = 0; d < D; d++) {
                const float v = xm[d] + rm[d];
                ro[d] = v;
                ss += v * v;
            }
            xm = ro;
        } else {
#pragma omp simd reduction(+ : ss)
            for (int64_t d = 0; d < D; d++) ss += xm[d] * xm[d];
        }
        const float inv = 1.f / sqrtf(ss / (float)D + eps);
#pragma omp simd
        for (int64_t d = 0; d < D; d++) om[d] = weight[d] * (xm[d] * inv);
    }
}

/* x [M, 2I] = gate | up -> out [M, I] = silu(gate) * up. */
void silu_and_mul(const float *x, float *out, int64_t M, int64_t I, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M >= 8)
    for (int64_t m = 0; m < M; m++) {
        const float *g = x + m * 2 * I, *u = g + I;
        float *o = out + m * I;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* x [M, 2I] = gate | up -> out [M, I] = gelu_tanh(gate) * up (Gemma's GeGLU:
 * 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))). */
void gelu_tanh_and_mul(const float *x, float *out, int64_t M, int64_t I, int nthreads) {
    const float c = 0.7978845608028654f;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M >= 8)
    for (int64_t m = 0; m < M; m++) {
        const float *g = x + m * 2 * I, *u = g + I;
        float *o = out + m * I;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) {
            const float v = g[i];
            o[i] = 0.5f * v * (1.f + tanhf(c * (v + 0.044715f * v * v * v))) * u[i];
        }
    }
}

/* k, v [T, row] (row = kv heads x head dim, row strides k_row, v_row) -> cache slot
 * slot_mapping[t] of k_cache / v_cache [num_slots, row]; a negative slot skips the token.
 * Returns 1, having written nothing, when a slot is past the cache (as index_copy_ raises). */
int store_kv(const float *k, int64_t k_row, const float *v, int64_t v_row, float *k_cache,
             float *v_cache, const int64_t *slot_mapping, int64_t T, int64_t row,
             int64_t num_slots) {
    for (int64_t t = 0; t < T; t++)
        if (slot_mapping[t] >= num_slots) return 1;
    for (int64_t t = 0; t < T; t++) {
        const int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        memcpy(k_cache + slot * row, k + t * k_row, sizeof(float) * (size_t)row);
        memcpy(v_cache + slot * row, v + t * v_row, sizeof(float) * (size_t)row);
    }
    return 0;
}
