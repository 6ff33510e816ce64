/* Q2_K and Q3_K: super-blocks of 256 in 16 sub-blocks of 16, levels of 2 bits (Q3_K: and a
 * high bit in hmask). Oracles: ggml quantize_row_q{2,3}_K_ref without an importance matrix and
 * quantize_row_q{2,3}_K_impl with one, as ggml_quantize_chunk calls them
 * (ggml/src/ggml-quants.c). The numpy reference (qconvert/quant/reference/kquants.py) states
 * every quirk; this file follows the same float operations in the same order. */
#include <math.h>
#include <string.h>
#include "qk.h"
#include "search.h"

/* qs[64]: byte 32h + l holds the levels of elements 128h + l + 32k at bits 2k */
static void pack2(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; ++l)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

/* ---- Q2_K: scales[16] (scale | min << 4), qs[64], f16 d, f16 dmin (84 bytes) ------------- */

QK_CLONES static void q2_K_block(const float *x, const float *qw, uint8_t *y) {
    uint8_t L[QK_K], Ls[16], Lm[16];
    float scales[16], mins[16], sw[16];
    uint8_t *sc = y, *qs = y + 16, *dh = y + 80, *dmh = y + 82;
    if (!qw) {
        /* make_qkx2_quants (weights |x|, errors by magnitude) on the 16 sub-blocks, 8 at a time */
        float X[32][QK_LANES], W[32][QK_LANES];
        uint8_t LT[32][QK_LANES];
        for (int h = 0; h < 2; ++h) {
            for (int b = 0; b < QK_LANES; ++b)
                for (int l = 0; l < 16; ++l) {
                    X[l][b] = x[16 * (QK_LANES * h + b) + l];
                    W[l][b] = fabsf(X[l][b]);
                }
            qk_make_qkx_lanes(16, X, W, 3, -0.5f, 0.1f, 15, 0, 1, scales + QK_LANES * h, mins + QK_LANES * h, LT);
            for (int b = 0; b < QK_LANES; ++b)
                for (int l = 0; l < 16; ++l) L[16 * (QK_LANES * h + b) + l] = LT[l][b];
        }
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 16; ++j) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        if (max_scale > 0) {
            const float iscale = 15.f / max_scale;
            for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)qk_nearest_int(iscale * scales[j]);
            qk_put_f16(dh, max_scale / 15.f);
        } else {
            memset(sc, 0, 16);
            qk_put_f16(dh, 0.f);
        }
        if (max_min > 0) {
            const float iscale = 15.f / max_min;
            for (int j = 0; j < 16; ++j) sc[j] |= (uint8_t)(qk_nearest_int(iscale * mins[j]) << 4);
            qk_put_f16(dmh, max_min / 15.f);
        } else {
            qk_put_f16(dmh, 0.f);
        }
    } else {
        float sumx2 = 0;
        for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
        const float sigma2 = sumx2 / QK_K;
        /* make_qkx3_quants on the 16 sub-blocks, 8 at a time, one per lane */
        float X[32][QK_LANES], W[32][QK_LANES];
        uint8_t LT[32][QK_LANES];
        for (int h = 0; h < 2; ++h) {
            for (int b = 0; b < QK_LANES; ++b) {
                const int j = QK_LANES * h + b;
                sw[j] = 0;
                for (int l = 0; l < 16; ++l) {
                    X[l][b] = x[16 * j + l];
                    W[l][b] = qw[16 * j + l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
                }
                for (int l = 0; l < 16; ++l) sw[j] += W[l][b];
            }
            qk_make_qkx_lanes(16, X, W, 3, -0.9f, 0.05f, 36, 1, 0, scales + QK_LANES * h, mins + QK_LANES * h, LT);
            for (int b = 0; b < QK_LANES; ++b)
                for (int l = 0; l < 16; ++l) L[16 * (QK_LANES * h + b) + l] = LT[l][b];
        }
        qk_put_f16(dh, qk_make_qp_quants(16, 15, scales, Ls, sw));
        qk_put_f16(dmh, qk_make_qp_quants(16, 15, mins, Lm, sw));
        for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
    }
    const float dd = qk_get_f16(dh), dm = qk_get_f16(dmh);
    for (int j = 0; j < 16; ++j) {
        const float d = dd * (float)(sc[j] & 0xF);
        if (!d) continue;
        const float m = dm * (float)(sc[j] >> 4);
        for (int ii = 0; ii < 16; ++ii) {
            const int l = qk_nearest_int((x[16 * j + ii] + m) / d);
            L[16 * j + ii] = (uint8_t)QK_MAX(0, QK_MIN(3, l));
        }
    }
    pack2(L, qs);
}

void qk_quantize_q2_K(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_each_superblock(src, dst, nrows, n, qw, 84, q2_K_block);
}

void qk_dequantize_q2_K(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / QK_K; ++b) {
        const uint8_t *y = src + b * 84, *sc = y, *q = y + 16;
        const float d = qk_get_f16(y + 80), min = qk_get_f16(y + 82);
        float *out = dst + b * QK_K;
        int is = 0;
        for (int h = 0; h < 2; ++h, q += 32)
            for (int shift = 0; shift < 8; shift += 2)
                for (int half = 0; half < 2; ++half, ++is) {
                    const float dl = d * (float)(sc[is] & 0xF), ml = min * (float)(sc[is] >> 4);
                    for (int l = 0; l < 16; ++l) *out++ = dl * (float)((q[16 * half + l] >> shift) & 3) - ml;
                }
    }
}

/* ---- Q3_K: hmask[32], qs[64], scales[12] (6 bits each, minus 32), f16 d (110 bytes) ------- */

static int q3_scale(const uint8_t *s, int j) {
    const int low = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
    return (low | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
}

QK_CLONES static void q3_K_block(const float *x, const float *qw, uint8_t *y) {
    int8_t L[QK_K], Ls[16], LT[16][QK_LANES];
    float scales[16], weight[16], sw[16], X[16][QK_LANES], W[16][QK_LANES];
    uint8_t *hmask = y, *qs = y + 32, *s = y + 96, *dh = y + 108;
    memset(s, 0, 12);
    if (!qw) {
        float max_scale = 0, amax = 0;
        for (int j = 0; j < 16; ++j) {
            scales[j] = qk_make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
            const float a = fabsf(scales[j]);
            if (a > amax) { amax = a; max_scale = scales[j]; }
        }
        if (max_scale) {
            const float iscale = -32.f / max_scale;
            for (int j = 0; j < 16; ++j) {
                const int l = QK_MAX(-32, QK_MIN(31, qk_nearest_int(iscale * scales[j]))) + 32;
                if (j < 8) s[j] = (uint8_t)(l & 0xF); else s[j - 8] |= (uint8_t)((l & 0xF) << 4);
                s[8 + j % 4] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
            }
            qk_put_f16(dh, 1 / iscale);
        } else {
            qk_put_f16(dh, 0.f);
        }
    } else {
        float sumx2 = 0;
        for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
        const float sigma2 = 2 * sumx2 / QK_K;
        for (int j = 0; j < 16; ++j) {
            for (int l = 0; l < 16; ++l) weight[l] = qw[16 * j + l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
            float sumw = 0;
            for (int l = 0; l < 16; ++l) sumw += weight[l];
            sw[j] = sumw;
            for (int l = 0; l < 16; ++l) {
                X[l][j % QK_LANES] = x[16 * j + l];
                W[l][j % QK_LANES] = weight[l];
            }
            if (j % QK_LANES == QK_LANES - 1) {  /* 8 sub-blocks at once, one per lane */
                const int j0 = j - (QK_LANES - 1);
                qk_make_qx_lanes(16, X, W, 4, scales + j0, LT);
                for (int b = 0; b < QK_LANES; ++b)
                    for (int l = 0; l < 16; ++l) L[16 * (j0 + b) + l] = LT[l][b];
            }
        }
        const float d_block = qk_make_qx_quants(16, 32, scales, Ls, 1, sw);
        for (int j = 0; j < 16; ++j) {
            const int l = Ls[j];
            if (j < 8) s[j] = (uint8_t)(l & 0xF); else s[j - 8] |= (uint8_t)((l & 0xF) << 4);
            s[8 + j % 4] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
        }
        qk_put_f16(dh, d_block);
    }
    const float dd = qk_get_f16(dh);
    for (int j = 0; j < 16; ++j) {
        const float d = dd * (float)q3_scale(s, j);
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            const int l = qk_nearest_int(x[16 * j + ii] / d);
            L[16 * j + ii] = (int8_t)(QK_MAX(-4, QK_MIN(3, l)) + 4);
        }
    }
    /* levels 0..7: the high bit of element 32k + m goes to bit k of hmask[m], the low two to qs
     * (branch-free, so it vectorizes over m) */
    memset(hmask, 0, 32);
    uint8_t U[QK_K];
    for (int k = 0; k < 8; ++k)
        for (int m = 0; m < 32; ++m) {
            const uint8_t l = (uint8_t)L[32 * k + m];
            hmask[m] |= (uint8_t)((l >> 2) << k);
            U[32 * k + m] = l & 3;
        }
    pack2(U, qs);
}

void qk_quantize_q3_K(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_each_superblock(src, dst, nrows, n, qw, 110, q3_K_block);
}

void qk_dequantize_q3_K(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / QK_K; ++b) {
        const uint8_t *y = src + b * 110, *hm = y, *q = y + 32, *s = y + 96;
        const float d = qk_get_f16(y + 108);
        float *out = dst + b * QK_K;
        int is = 0;
        uint8_t m = 1;
        for (int h = 0; h < 2; ++h, q += 32)
            for (int shift = 0; shift < 8; shift += 2, m <<= 1)
                for (int half = 0; half < 2; ++half, ++is) {
                    const float dl = d * (float)q3_scale(s, is);
                    for (int l = 0; l < 16; ++l) {
                        const int k = 16 * half + l;
                        *out++ = dl * (float)(((q[k] >> shift) & 3) - ((hm[k] & m) ? 0 : 4));
                    }
                }
    }
}
