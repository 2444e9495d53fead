/* GGUF (llama.cpp) weights straight from their blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
 * Q5_K and Q6_K (kernels/gguf_blocks.py has the table and the plain-torch reference; tests
 * check both against gguf-py's dequantizers).
 *
 * Why from the blocks: the int GEMM layout (cpu_int_gemm.c) keeps a float scale and offset per
 * group of 32 (or 16), so a repacked Q4_K read 6 bits a value instead of its 4.5 and a Q6_K 12
 * instead of 6.6; a decode step's time is the bytes it reads. Here each thread decodes 3 rows
 * of blocks into an L1 buffer and runs them against every activation row (block_gemm_rows in
 * cpu_int_gemm.c), so the weight is read once per step, in its file's bytes.
 *
 * Layout: w [N, K / block * block_bytes] uint8, rows as stored in the file; type: the ggml
 * type id (gguf.GGMLQuantizationType). The decoders follow ggml's dequantize_row_* bit for bit.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

INLINE float f16(const uint8_t *p) {     /* little-endian IEEE half -> float, subnormals too */
    const uint32_t h = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | man << 13;
    } else if (exp != 0) {
        bits = sign | (exp + 112) << 23 | man << 13;
    } else {
        float v = (float)man * (1.0f / 16777216.0f);   /* man * 2^-24 */
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

/* (values per block, bytes per block) of a type, or 0 values for an unknown type. */
void gguf_block_size(int type, int64_t *values, int64_t *bytes) {
    switch (type) {
        case Q4_0: *values = 32; *bytes = 18; return;
        case Q4_1: *values = 32; *bytes = 20; return;
        case Q5_0: *values = 32; *bytes = 22; return;
        case Q5_1: *values = 32; *bytes = 24; return;
        case Q8_0: *values = 32; *bytes = 34; return;
        case Q4_K: *values = 256; *bytes = 144; return;
        case Q5_K: *values = 256; *bytes = 176; return;
        case Q6_K: *values = 256; *bytes = 210; return;
        default: *values = 0; *bytes = 0;
    }
}

INLINE void scale_min_k4(int j, const uint8_t *q, float *sc, float *m) {
    if (j < 4) {
        *sc = (float)(q[j] & 63);
        *m = (float)(q[j + 4] & 63);
    } else {
        *sc = (float)((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
        *m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static void decode_small(const uint8_t *b, int type, float *y) {   /* a block of 32 */
    if (type == Q8_0) {
        const float d = f16(b);
        for (int j = 0; j < 32; j++) y[j] = d * (float)(int8_t)b[2 + j];
        return;
    }
    const float d = f16(b);
    const int has_min = type == Q4_1 || type == Q5_1, five = type == Q5_0 || type == Q5_1;
    const float m = has_min ? f16(b + 2) : (five ? -16.f : -8.f) * d;
    uint32_t qh = 0;
    const uint8_t *qs = b + 2 + 2 * has_min;
    if (five) {
        memcpy(&qh, qs, 4);          /* little-endian, as the file */
        qs += 4;
    }
    for (int j = 0; j < 16; j++) {
        const int h0 = five ? (int)((qh >> j) << 4 & 0x10) : 0;
        const int h1 = five ? (int)(qh >> (j + 12) & 0x10) : 0;
        y[j] = (float)((qs[j] & 0x0F) | h0) * d + m;
        y[j + 16] = (float)((qs[j] >> 4) | h1) * d + m;
    }
}

static void decode_k(const uint8_t *b, int type, float *y) {       /* a super-block of 256 */
    if (type == Q6_K) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = f16(b + 208);
        for (int half = 0; half < 2; half++, y += 128, ql += 64, qh += 32, sc += 8)
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = (ql[l] & 0xF) | (qh[l] & 3) << 4;
                const int q2 = (ql[l + 32] & 0xF) | (qh[l] >> 2 & 3) << 4;
                const int q3 = (ql[l] >> 4) | (qh[l] >> 4 & 3) << 4;
                const int q4 = (ql[l + 32] >> 4) | (qh[l] >> 6 & 3) << 4;
                y[l] = d * sc[is] * (float)(q1 - 32);
                y[l + 32] = d * sc[is + 2] * (float)(q2 - 32);
                y[l + 64] = d * sc[is + 4] * (float)(q3 - 32);
                y[l + 96] = d * sc[is + 6] * (float)(q4 - 32);
            }
        return;
    }
    const float d = f16(b), dmin = f16(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *ql = type == Q5_K ? b + 48 : b + 16;
    for (int j = 0, is = 0; j < 4; j++, is += 2, ql += 32, y += 64) {
        float sc1, m1, sc2, m2;
        scale_min_k4(is, scales, &sc1, &m1);
        scale_min_k4(is + 1, scales, &sc2, &m2);
        const float d1 = d * sc1, d2 = d * sc2, o1 = dmin * m1, o2 = dmin * m2;
        const int u1 = 1 << (2 * j), u2 = 2 << (2 * j);
        for (int l = 0; l < 32; l++) {
            const int h1 = type == Q5_K && (qh[l] & u1) ? 16 : 0;
            const int h2 = type == Q5_K && (qh[l] & u2) ? 16 : 0;
            y[l] = d1 * (float)((ql[l] & 0xF) + h1) - o1;
            y[l + 32] = d2 * (float)((ql[l] >> 4) + h2) - o2;
        }
    }
}

/* One row of K values (K a multiple of the type's block) from its blocks into out[K]. */
void gguf_decode_row(const uint8_t *row, int type, int64_t K, float *out) {
    int64_t values, bytes;
    gguf_block_size(type, &values, &bytes);
    for (int64_t k = 0; k < K; k += values, row += bytes)
        if (values == 256)
            decode_k(row, type, out + k);
        else
            decode_small(row, type, out + k);
}

/* The byte decoders of gguf_row_q8: AVX2 where the compiler has it (the scalar loops did not
 * vectorize, and decoding took longer than the dot product it feeds). */
#ifdef __AVX2__
#define LOW4(v) _mm256_and_si256((v), _mm256_set1_epi8(0x0F))
#define SHR(v, n) _mm256_srli_epi16((v), (n))      /* then masked: no bits cross bytes */
#endif

/* Q6_K, half a super-block: 64 B low nibbles, 32 B 2-bit highs -> 128 values 0..63. */
INLINE void q6_bytes(const uint8_t *ql, const uint8_t *qh, uint8_t *q) {
#ifdef __AVX2__
    const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
    const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
    const __m256i h = _mm256_loadu_si256((const __m256i *)qh), three = _mm256_set1_epi8(3);
    const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(h, three), 4);
    const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(SHR(h, 2), three), 4);
    const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(SHR(h, 4), three), 4);
    const __m256i h3 = _mm256_slli_epi16(_mm256_and_si256(SHR(h, 6), three), 4);
    _mm256_storeu_si256((__m256i *)q, _mm256_or_si256(LOW4(l0), h0));
    _mm256_storeu_si256((__m256i *)(q + 32), _mm256_or_si256(LOW4(l1), h1));
    _mm256_storeu_si256((__m256i *)(q + 64), _mm256_or_si256(LOW4(SHR(l0, 4)), h2));
    _mm256_storeu_si256((__m256i *)(q + 96), _mm256_or_si256(LOW4(SHR(l1, 4)), h3));
#else
    for (int l = 0; l < 32; l++) {
        q[l] = (ql[l] & 0xF) | (qh[l] & 3) << 4;
        q[l + 32] = (ql[l + 32] & 0xF) | (qh[l] >> 2 & 3) << 4;
        q[l + 64] = (ql[l] >> 4) | (qh[l] >> 4 & 3) << 4;
        q[l + 96] = (ql[l + 32] >> 4) | (qh[l] >> 6 & 3) << 4;
    }
#endif
}

/* Q4_K/Q5_K, the j-th 64 values: 32 B of nibble pairs, and for Q5_K (qh not NULL) bits 2j
 * and 2j + 1 of the 32 high-bit bytes. */
INLINE void q45k_bytes(const uint8_t *ql, const uint8_t *qh, int j, uint8_t *q) {
#ifdef __AVX2__
    const __m256i v = _mm256_loadu_si256((const __m256i *)ql);
    __m256i lo = LOW4(v), hi = LOW4(SHR(v, 4));
    if (qh != NULL) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
        const __m256i u1 = _mm256_set1_epi8((char)(1 << (2 * j)));
        const __m256i u2 = _mm256_set1_epi8((char)(2 << (2 * j))), sixteen = _mm256_set1_epi8(16);
        lo = _mm256_or_si256(lo, _mm256_and_si256(
                 _mm256_cmpeq_epi8(_mm256_and_si256(h, u1), u1), sixteen));
        hi = _mm256_or_si256(hi, _mm256_and_si256(
                 _mm256_cmpeq_epi8(_mm256_and_si256(h, u2), u2), sixteen));
    }
    _mm256_storeu_si256((__m256i *)q, lo);
    _mm256_storeu_si256((__m256i *)(q + 32), hi);
#else
    const int u1 = 1 << (2 * j), u2 = 2 << (2 * j);
    for (int l = 0; l < 32; l++) {
        q[l] = (ql[l] & 0xF) | (qh != NULL && (qh[l] & u1) ? 16 : 0);
        q[l + 32] = (ql[l] >> 4) | (qh != NULL && (qh[l] & u2) ? 16 : 0);
    }
#endif
}

/* One row as the 8-bit int layout: value k = q[k] * s[k / G] + b[k / G], G = 16 for Q6_K and
 * 32 otherwise (the group the return value gives). The few-row kernel (block_gemm) then reads
 * bytes, as for an int8 weight: decoding to floats first spent more time than the bytes. */
int gguf_row_q8(const uint8_t *row, int type, int64_t K, uint8_t *q, float *s, float *b) {
    int64_t values, bytes;
    gguf_block_size(type, &values, &bytes);
    for (int64_t k = 0; k < K; k += values, row += bytes) {
        uint8_t *qk = q + k;
        if (type == Q6_K) {
            const uint8_t *ql = row, *qh = row + 128;
            const int8_t *sc = (const int8_t *)(row + 192);
            const float d = f16(row + 208);
            for (int half = 0; half < 2; half++, qk += 128, ql += 64, qh += 32)
                q6_bytes(ql, qh, qk);
            for (int g = 0; g < 16; g++) {
                s[k / 16 + g] = d * sc[g];
                b[k / 16 + g] = -32.f * (d * sc[g]);
            }
        } else if (values == 256) {
            const float d = f16(row), dmin = f16(row + 2);
            const uint8_t *scales = row + 4, *qh = row + 16, *ql = type == Q5_K ? row + 48 : row + 16;
            for (int j = 0; j < 4; j++, ql += 32, qk += 64)
                q45k_bytes(ql, type == Q5_K ? qh : NULL, j, qk);
            for (int g = 0; g < 8; g++) {
                float sc, m;
                scale_min_k4(g, scales, &sc, &m);
                s[k / 32 + g] = d * sc;
                b[k / 32 + g] = -(dmin * m);
            }
        } else if (type == Q8_0) {
            const float d = f16(row);
            for (int j = 0; j < 32; j++) qk[j] = (uint8_t)((int8_t)row[2 + j] + 128);
            s[k / 32] = d;
            b[k / 32] = -128.f * d;
        } else {
            const float d = f16(row);
            const int has_min = type == Q4_1 || type == Q5_1, five = type == Q5_0 || type == Q5_1;
            uint32_t qh = 0;
            const uint8_t *qs = row + 2 + 2 * has_min;
            if (five) {
                memcpy(&qh, qs, 4);
                qs += 4;
            }
            for (int j = 0; j < 16; j++) {
                qk[j] = (qs[j] & 0x0F) | (five ? (qh >> j) << 4 & 0x10 : 0);
                qk[j + 16] = (qs[j] >> 4) | (five ? qh >> (j + 12) & 0x10 : 0);
            }
            s[k / 32] = d;
            b[k / 32] = has_min ? f16(row + 2) : (five ? -16.f : -8.f) * d;
        }
    }
    return type == Q6_K ? 16 : 32;
}
