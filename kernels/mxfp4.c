/* MXFP4 (OCP microscaling FP4): 32 weights per block, one E8M0 exponent byte e then qs[16],
 * element j in the low nibble of qs[j] and element j + 16 in its high nibble; each nibble an
 * E2M1 code (sign bit 3); value = kvalues[q] * 2^(e - 128), kvalues being twice E2M1's.
 * Oracle: ggml quantize_row_mxfp4_ref (ggml/src/ggml-quants.c), which quantize_mxfp4 calls
 * whatever the importance matrix. Its quirks, reproduced here: e = floorf(log2f(amax)) - 2 + 127
 * (the largest magnitude may land above 6 * 2^(e-127) and is then clamped to the grid's end),
 * 0 for an all-zero block; each weight takes the first of the 16 codes (+0 before -0) whose
 * value is nearest, compared as |kvalue * d - x| in float. */
#include <math.h>
#include "qk.h"

static const int8_t KVALUES_FP4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* ggml_e8m0_to_fp32_half: 2^(e - 128) */
QK_INLINE float e8m0_half(uint8_t e) {
    uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

QK_INLINE uint8_t best_index(float x, float d) {
    int best = 0;
    float best_err = fabsf((float)KVALUES_FP4[0] * d - x);
    for (int i = 1; i < 16; i++) {
        const float err = fabsf((float)KVALUES_FP4[i] * d - x);
        if (err < best_err) {
            best = i;
            best_err = err;
        }
    }
    return (uint8_t)best;
}

QK_CLONES void qk_quantize_mxfp4(const float *src, uint8_t *dst, int64_t nrows, int64_t n_per_row, const float *qw) {
    (void)qw;  /* ggml's quantize_mxfp4 ignores the importance matrix too */
    const int64_t nb = nrows * (n_per_row / 32);
    for (int64_t i = 0; i < nb; i++) {
        const float *x = src + i * 32;
        uint8_t *y = dst + i * 17;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++)
            if (amax < fabsf(x[j])) amax = fabsf(x[j]);
        /* through int: ggml's direct float -> uint8_t cast of a negative exponent wraps on x86 */
        const uint8_t e = amax > 0.0f ? (uint8_t)(int)(floorf(log2f(amax)) - 2 + 127) : 0;
        const float d = e8m0_half(e);
        y[0] = e;
        for (int j = 0; j < 16; j++) y[1 + j] = (uint8_t)(best_index(x[j], d) | (best_index(x[16 + j], d) << 4));
    }
}

void qk_dequantize_mxfp4(const uint8_t *src, float *dst, int64_t nrows, int64_t n_per_row) {
    const int64_t nb = nrows * (n_per_row / 32);
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = src + i * 17;
        const float d = e8m0_half(b[0]);
        for (int j = 0; j < 16; j++) {
            dst[i * 32 + j] = (float)KVALUES_FP4[b[1 + j] & 0x0F] * d;
            dst[i * 32 + 16 + j] = (float)KVALUES_FP4[b[1 + j] >> 4] * d;
        }
    }
}
