/* TQ1_0 and TQ2_0: ternary super-blocks of 256, value = d * (t - 1). Oracles: ggml
 * quantize_row_tq1_0_ref / quantize_row_tq2_0_ref (no importance weights: ggml ignores them).
 * d = max |x| (f16), t = lroundf(x * (1/d)) + 1 (halves away from zero). TQ1_0 packs five trits
 * per byte as ceil(v * 256 / 243), TQ2_0 four per byte; layouts in
 * qconvert/quant/reference/ternary.py. */
#include <math.h>
#include <string.h>
#include "qk.h"

static float tq_scale(const float *x, uint8_t *dh) {
    float amax = 0.0f;
    for (int j = 0; j < QK_K; ++j) amax = QK_MAX(amax, fabsf(x[j]));
    qk_put_f16(dh, amax);
    return amax ? 1.0f / amax : 0.0f;
}

static uint8_t tq_byte(const float *x, int stride, int n, float id, int pad) {
    uint8_t q = 0;
    for (int k = 0; k < n; ++k) q = (uint8_t)(q * 3 + (int)lroundf(x[k * stride] * id) + 1);
    if (pad) q = (uint8_t)(q * 3);
    return (uint8_t)(((uint16_t)q * 256 + 242) / 243);
}

static void tq1_0_block(const float *x, const float *qw, uint8_t *y) {
    (void)qw;
    const float id = tq_scale(x, y + 52);
    for (int m = 0; m < 32; ++m) y[m] = tq_byte(x + m, 32, 5, id, 0);
    for (int m = 0; m < 16; ++m) y[32 + m] = tq_byte(x + 160 + m, 16, 5, id, 0);
    for (int j = 0; j < 4; ++j) y[48 + j] = tq_byte(x + 240 + j, 4, 4, id, 1);
}

void qk_quantize_tq1_0(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_each_superblock(src, dst, nrows, n, qw, 54, tq1_0_block);
}

static float tq1_value(uint8_t byte, int n, float d) {
    static const uint8_t pow3[6] = {1, 3, 9, 27, 81, 243};
    const uint8_t q = (uint8_t)(byte * pow3[n]);
    const int16_t xi = (int16_t)(((uint16_t)q * 3) >> 8);
    return (float)(xi - 1) * d;
}

void qk_dequantize_tq1_0(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / QK_K; ++b) {
        const uint8_t *y = src + b * 54;
        const float d = qk_get_f16(y + 52);
        float *out = dst + b * QK_K;
        for (int k = 0; k < 5; ++k)
            for (int m = 0; m < 32; ++m) *out++ = tq1_value(y[m], k, d);
        for (int k = 0; k < 5; ++k)
            for (int m = 0; m < 16; ++m) *out++ = tq1_value(y[32 + m], k, d);
        for (int k = 0; k < 4; ++k)
            for (int j = 0; j < 4; ++j) *out++ = tq1_value(y[48 + j], k, d);
    }
}

static void tq2_0_block(const float *x, const float *qw, uint8_t *y) {
    (void)qw;
    const float id = tq_scale(x, y + 64);
    for (int h = 0; h < 2; ++h)
        for (int m = 0; m < 32; ++m) {
            uint8_t q = 0;
            for (int k = 0; k < 4; ++k) {
                const int t = (int)lroundf(x[128 * h + m + 32 * k] * id) + 1;
                q = (uint8_t)(q + ((t & 3) << (2 * k)));
            }
            y[32 * h + m] = q;
        }
}

void qk_quantize_tq2_0(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_each_superblock(src, dst, nrows, n, qw, 66, tq2_0_block);
}

void qk_dequantize_tq2_0(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / QK_K; ++b) {
        const uint8_t *y = src + b * 66;
        const float d = qk_get_f16(y + 64);
        float *out = dst + b * QK_K;
        for (int h = 0; h < 2; ++h)
            for (int k = 0; k < 4; ++k)
                for (int m = 0; m < 32; ++m) *out++ = (float)((int8_t)((y[32 * h + m] >> (2 * k)) & 3) - 1) * d;
    }
}
