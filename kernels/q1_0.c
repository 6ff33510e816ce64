/* Q1_0: blocks of 128 weights {f16 d; qs[16]} (18 bytes), value = +d or -d. Oracle: ggml
 * quantize_row_q1_0_ref (quantize_q1_0 calls it with or without importance weights: it reads
 * none). d = (|x0| + |x1| + ... + |x127|, summed in float in index order) / 128, stored as f16
 * (round to nearest even; a sum that overflows gives inf); bit j % 8 of qs[j / 8] is set where
 * x[j] >= 0, so -0.0 counts as positive and NaN as negative. The signs do not depend on d.
 *
 * Speed without changing a bit: one block's sum is a chain of 128 dependent adds, so the sums
 * of QK_LANES blocks are run side by side (each still in its own index order); the blocks of a
 * range of rows are contiguous in both src and dst, so lanes may cross rows. */
#include <math.h>
#include "qk.h"

#define QK1_0 128
#define Q1_0_BYTES 18

QK_INLINE void q1_0_signs(const float *x, uint8_t *qs) {
    for (int m = 0; m < QK1_0 / 8; ++m) {
        unsigned byte = 0;
        for (int k = 0; k < 8; ++k) byte |= (unsigned)(x[8 * m + k] >= 0.0f) << k;
        qs[m] = (uint8_t)byte;
    }
}

QK_CLONES static void q1_0_blocks(const float *x, uint8_t *y, int64_t nb) {
    int64_t b = 0;
    for (; b + QK_LANES <= nb; b += QK_LANES) {
        const float *xb = x + b * QK1_0;
        float sum[QK_LANES] = {0};
        for (int j = 0; j < QK1_0; ++j)
            for (int l = 0; l < QK_LANES; ++l) sum[l] += fabsf(xb[l * QK1_0 + j]);
        for (int l = 0; l < QK_LANES; ++l) {
            uint8_t *yb = y + (b + l) * Q1_0_BYTES;
            qk_put_f16(yb, sum[l] / QK1_0);
            q1_0_signs(xb + l * QK1_0, yb + 2);
        }
    }
    for (; b < nb; ++b) {
        const float *xb = x + b * QK1_0;
        float sum = 0.0f;
        for (int j = 0; j < QK1_0; ++j) sum += fabsf(xb[j]);
        qk_put_f16(y + b * Q1_0_BYTES, sum / QK1_0);
        q1_0_signs(xb, y + b * Q1_0_BYTES + 2);
    }
}

void qk_quantize_q1_0(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    (void)qw;
    q1_0_blocks(src, dst, nrows * (n / QK1_0));
}

void qk_dequantize_q1_0(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * (n / QK1_0); ++b) {
        const uint8_t *y = src + b * Q1_0_BYTES;
        const float d = qk_get_f16(y);
        float *out = dst + b * QK1_0;
        for (int j = 0; j < QK1_0; ++j) out[j] = (y[2 + j / 8] >> (j % 8)) & 1 ? d : -d;
    }
}
