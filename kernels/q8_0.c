/* Q8_0: 32 weights per block, f16 scale d then int8 qs[32]; value = d*q.
 * Oracle: ggml quantize_row_q8_0_ref (ggml/src/ggml-quants.c), which ggml_quantize_chunk
 * calls for Q8_0 (the importance matrix is ignored). Its quirks, reproduced here:
 * amax by sequential fmax, d = amax/127 in float, id = 1/d (0 for an all-zero block),
 * q = roundf(x*id) (half away from zero, not nearest_int), d stored as f16 after use. */
#include <math.h>
#include <string.h>
#include "qk.h"
#include "search.h"

/* roundf for |v| < 2^31 without the library call, so that the loop vectorizes: truncate, then
 * step away from zero where the (exact) remainder is a half or more */
QK_INLINE int32_t round_away(float v) {
    int32_t i = (int32_t)v;
    const float frac = v - (float)i;
    i += (frac >= 0.5f) - (frac <= -0.5f);
    return i;
}

QK_INLINE void quantize_block(const float *x, uint8_t *out) {
    const float amax = qk_absmax32(x);
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t dh = qk_f32_to_f16(d);
    out[0] = (uint8_t)(dh & 0xff);
    out[1] = (uint8_t)(dh >> 8);
    for (int j = 0; j < QK8_0; j++) {
        const float x0 = x[j] * id;
        out[2 + j] = (uint8_t)(int8_t)round_away(x0);
    }
}

QK_CLONES void qk_quantize_q8_0(const float *src, uint8_t *dst, int64_t nrows, int64_t n_per_row, const float *qw) {
    (void)qw;  /* ggml's quantize_q8_0 ignores the importance matrix too */
    const int64_t nb = nrows * (n_per_row / QK8_0);
    for (int64_t i = 0; i < nb; i++) quantize_block(src + i * QK8_0, dst + i * Q8_0_BYTES);
}

void qk_dequantize_q8_0(const uint8_t *src, float *dst, int64_t nrows, int64_t n_per_row) {
    const int64_t nb = nrows * (n_per_row / QK8_0);
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = src + i * Q8_0_BYTES;
        const float d = qk_f16_to_f32((uint16_t)(b[0] | (b[1] << 8)));
        for (int j = 0; j < QK8_0; j++) dst[i * QK8_0 + j] = d * (float)(int8_t)b[2 + j];
    }
}
