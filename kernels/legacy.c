/* Q4_0, Q4_1, Q5_0, Q5_1: 32 weights per block, the types llama.cpp falls back to when a row is
 * not a multiple of 256. Oracles: ggml quantize_row_q{4,5}_{0,1}_ref (no importance matrix) and
 * quantize_row_q{4,5}_{0,1}_impl (with one), ggml/src/ggml-quants.c.
 * Quirks reproduced: the _ref scales use the signed value of largest magnitude (d = max/-8,
 * max/-16) and quantize by truncation, (int8)(x*id + 8.5f) clamped to 15 (16.5f/31 for Q5_0;
 * Q4_1/Q5_1 add 0.5f, Q5_1 without a clamp); the _impl paths weight by qw*sqrt(sigma2 + x^2)
 * with sigma2 the mean square of the whole row. */
#include <math.h>
#include <string.h>
#include "qk.h"
#include "search.h"

QK_INLINE float row_sigma2(const float *x, int64_t n) {
    float sum_x2 = 0;
    for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
    return sum_x2 / (float)n;
}

QK_INLINE void importance(const float *xb, const float *qw, float sigma2, float *w) {
    for (int j = 0; j < 32; ++j) w[j] = qw[j] * sqrtf(sigma2 + xb[j] * xb[j]);
}

/* Blocks 0 .. m-1 (m <= QK_LANES) of x and their importance weights, one block per lane; lanes
 * past m hold zeros (searched, never stored) */
QK_INLINE void lanes_of(const float *x, const float *qw, float sigma2, int m, float X[32][QK_LANES],
                        float W[32][QK_LANES]) {
    for (int b = 0; b < QK_LANES; ++b) {
        float w[32];
        if (b < m) importance(x + 32 * b, qw + 32 * b, sigma2, w);
        for (int j = 0; j < 32; ++j) {
            X[j][b] = b < m ? x[32 * b + j] : 0.f;
            W[j][b] = b < m ? w[j] : 0.f;
        }
    }
}

/* Q4_0 / Q5_0 with importance: m blocks searched at once, make_qx_quants per lane */
QK_INLINE void qx_blocks(const float *x, const float *qw, float sigma2, int m, int nmax, float d[QK_LANES],
                         int8_t L[32][QK_LANES]) {
    float X[32][QK_LANES], W[32][QK_LANES];
    lanes_of(x, qw, sigma2, m, X, W);
    qk_make_qx_lanes(32, X, W, nmax, d, L);
}

/* 5th bits of 32 levels -> qh, nibbles -> qs (elements j and j+16 share a byte) */
QK_INLINE void pack_q5(const uint8_t *L, uint8_t *qs, uint8_t *qh_out) {
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
        const uint8_t a = L[j], b = L[j + 16];
        qs[j] = (uint8_t)((a & 0x0F) | ((b & 0x0F) << 4));
        qh |= ((a & 0x10u) >> 4) << (j + 0);
        qh |= ((b & 0x10u) >> 4) << (j + 16);
    }
    memcpy(qh_out, &qh, 4);  /* little-endian hosts, as ggml */
}

/* ---- Q4_0: d f16, qs[16] ; value = d*(q-8) ---------------------------------------------- */

QK_INLINE void q4_0_block_ref(const float *x, uint8_t *y) {
    float amax;
    const float max = qk_signed_absmax32(x, &amax);
    const float d = max / -8;
    const float id = d ? 1.0f / d : 0.0f;
    qk_put_f16(y, d);
    int32_t L[32];
    for (int j = 0; j < 32; ++j) {
        const int32_t l = (int32_t)(x[j] * id + 8.5f);  /* truncation, as (int8_t) of it */
        L[j] = l < 15 ? l : 15;
    }
    for (int j = 0; j < 16; ++j) y[2 + j] = (uint8_t)(L[j] | (L[16 + j] << 4));
}

QK_CLONES void qk_quantize_q4_0(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    for (int64_t r = 0; r < nrows; ++r) {
        const float *x = src + r * n;
        uint8_t *y = dst + r * (n / 32) * 18;
        const float sigma2 = qw ? row_sigma2(x, n) : 0;
        if (!qw) {
            for (int64_t ib = 0; ib < n / 32; ++ib) q4_0_block_ref(x + 32 * ib, y + 18 * ib);
            continue;
        }
        for (int64_t ib = 0; ib < n / 32; ib += QK_LANES) {
            const int m = (int)QK_MIN((int64_t)QK_LANES, n / 32 - ib);
            float d[QK_LANES];
            int8_t L[32][QK_LANES];
            qx_blocks(x + 32 * ib, qw + 32 * ib, sigma2, m, 8, d, L);
            for (int b = 0; b < m; ++b) {
                uint8_t *yb = y + 18 * (ib + b);
                qk_put_f16(yb, d[b]);
                for (int j = 0; j < 16; ++j) yb[2 + j] = (uint8_t)(L[j][b] | (L[j + 16][b] << 4));
            }
        }
    }
}

void qk_dequantize_q4_0(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / 32; ++b) {
        const uint8_t *y = src + b * 18;
        const float d = qk_get_f16(y);
        for (int j = 0; j < 16; ++j) {
            dst[32 * b + j] = (float)((y[2 + j] & 0x0F) - 8) * d;
            dst[32 * b + j + 16] = (float)((y[2 + j] >> 4) - 8) * d;
        }
    }
}

/* ---- Q4_1: d f16, m f16, qs[16] ; value = d*q + m ------------------------------------------ */

QK_INLINE void q4_1_block_ref(const float *x, uint8_t *y) {
    float min, max;
    qk_minmax32(x, &min, &max);
    const float d = (max - min) / 15;
    const float id = d ? 1.0f / d : 0.0f;
    qk_put_f16(y, d);
    qk_put_f16(y + 2, min);
    int32_t L[32];
    for (int j = 0; j < 32; ++j) {
        const int32_t l = (int32_t)((x[j] - min) * id + 0.5f);  /* truncation, as (int8_t) of it */
        L[j] = l < 15 ? l : 15;
    }
    for (int j = 0; j < 16; ++j) y[4 + j] = (uint8_t)(L[j] | (L[16 + j] << 4));
}

/* Q4_1 / Q5_1 with importance: m blocks searched at once, make_qkx3 per lane */
QK_INLINE void qkx_blocks(const float *x, const float *qw, float sigma2, int m, int nmax, float *d, float *min,
                          uint8_t L[32][QK_LANES]) {
    float X[32][QK_LANES], W[32][QK_LANES];
    lanes_of(x, qw, sigma2, m, X, W);
    qk_make_qkx_lanes(32, X, W, nmax, -0.9f, 0.05f, 36, 1, 0, d, min, L);
}

QK_CLONES void qk_quantize_q4_1(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    for (int64_t r = 0; r < nrows; ++r) {
        const float *x = src + r * n;
        uint8_t *y = dst + r * (n / 32) * 20;
        if (!qw) {
            for (int64_t ib = 0; ib < n / 32; ++ib) q4_1_block_ref(x + 32 * ib, y + 20 * ib);
            continue;
        }
        const float sigma2 = row_sigma2(x, n);
        for (int64_t ib = 0; ib < n / 32; ib += QK_LANES) {
            const int m = (int)QK_MIN((int64_t)QK_LANES, n / 32 - ib);
            float d[QK_LANES], min[QK_LANES];
            uint8_t L[32][QK_LANES];
            qkx_blocks(x + 32 * ib, qw + 32 * ib, sigma2, m, 15, d, min, L);
            for (int b = 0; b < m; ++b) {
                uint8_t *yb = y + 20 * (ib + b);
                qk_put_f16(yb, d[b]);
                qk_put_f16(yb + 2, -min[b]);
                for (int j = 0; j < 16; ++j) yb[4 + j] = (uint8_t)(L[j][b] | (L[j + 16][b] << 4));
            }
        }
    }
}

void qk_dequantize_q4_1(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / 32; ++b) {
        const uint8_t *y = src + b * 20;
        const float d = qk_get_f16(y), m = qk_get_f16(y + 2);
        for (int j = 0; j < 16; ++j) {
            dst[32 * b + j] = (float)(y[4 + j] & 0x0F) * d + m;
            dst[32 * b + j + 16] = (float)(y[4 + j] >> 4) * d + m;
        }
    }
}

/* ---- Q5_0: d f16, qh u32, qs[16] ; value = d*(q-16) --------------------------------------- */

QK_INLINE void q5_0_block_ref(const float *x, uint8_t *y) {
    float amax;
    const float max = qk_signed_absmax32(x, &amax);
    const float d = max / -16;
    const float id = d ? 1.0f / d : 0.0f;
    qk_put_f16(y, d);
    uint8_t L[32];
    for (int j = 0; j < 32; ++j) L[j] = (uint8_t)QK_MIN(31, (int8_t)(x[j] * id + 16.5f));
    pack_q5(L, y + 6, y + 2);
}

QK_CLONES void qk_quantize_q5_0(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    for (int64_t r = 0; r < nrows; ++r) {
        const float *x = src + r * n;
        uint8_t *y = dst + r * (n / 32) * 22;
        const float sigma2 = qw ? row_sigma2(x, n) : 0;
        if (!qw) {
            for (int64_t ib = 0; ib < n / 32; ++ib) q5_0_block_ref(x + 32 * ib, y + 22 * ib);
            continue;
        }
        for (int64_t ib = 0; ib < n / 32; ib += QK_LANES) {
            const int m = (int)QK_MIN((int64_t)QK_LANES, n / 32 - ib);
            float d[QK_LANES];
            int8_t L[32][QK_LANES];
            qx_blocks(x + 32 * ib, qw + 32 * ib, sigma2, m, 16, d, L);
            for (int b = 0; b < m; ++b) {
                uint8_t *yb = y + 22 * (ib + b), Lb[32];
                for (int j = 0; j < 32; ++j) Lb[j] = (uint8_t)L[j][b];
                qk_put_f16(yb, d[b]);
                pack_q5(Lb, yb + 6, yb + 2);
            }
        }
    }
}

static int q5_level(const uint8_t *y, int j, int hi_off) {
    uint32_t qh;
    memcpy(&qh, y + hi_off, 4);
    const int lo = j < 16 ? (y[hi_off + 4 + j] & 0x0F) : (y[hi_off + 4 + j - 16] >> 4);
    return lo | (int)(((qh >> j) & 1u) << 4);
}

void qk_dequantize_q5_0(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / 32; ++b) {
        const uint8_t *y = src + b * 22;
        const float d = qk_get_f16(y);
        for (int j = 0; j < 32; ++j) dst[32 * b + j] = (float)(q5_level(y, j, 2) - 16) * d;
    }
}

/* ---- Q5_1: d f16, m f16, qh u32, qs[16] ; value = d*q + m ---------------------------------- */

QK_INLINE void q5_1_block_ref(const float *x, uint8_t *y) {
    float min, max;
    qk_minmax32(x, &min, &max);
    const float d = (max - min) / 31;
    const float id = d ? 1.0f / d : 0.0f;
    qk_put_f16(y, d);
    qk_put_f16(y + 2, min);
    uint8_t L[32];
    for (int j = 0; j < 32; ++j) L[j] = (uint8_t)((x[j] - min) * id + 0.5f);
    pack_q5(L, y + 8, y + 4);
}

QK_CLONES void qk_quantize_q5_1(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    for (int64_t r = 0; r < nrows; ++r) {
        const float *x = src + r * n;
        uint8_t *y = dst + r * (n / 32) * 24;
        if (!qw) {
            for (int64_t ib = 0; ib < n / 32; ++ib) q5_1_block_ref(x + 32 * ib, y + 24 * ib);
            continue;
        }
        const float sigma2 = row_sigma2(x, n);
        for (int64_t ib = 0; ib < n / 32; ib += QK_LANES) {
            const int m = (int)QK_MIN((int64_t)QK_LANES, n / 32 - ib);
            float d[QK_LANES], min[QK_LANES];
            uint8_t L[32][QK_LANES];
            qkx_blocks(x + 32 * ib, qw + 32 * ib, sigma2, m, 31, d, min, L);
            for (int b = 0; b < m; ++b) {
                uint8_t *yb = y + 24 * (ib + b);
                qk_put_f16(yb, d[b]);
                qk_put_f16(yb + 2, -min[b]);
                uint8_t Lb[32];
                for (int j = 0; j < 32; ++j) Lb[j] = L[j][b];
                pack_q5(Lb, yb + 8, yb + 4);
            }
        }
    }
}

void qk_dequantize_q5_1(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / 32; ++b) {
        const uint8_t *y = src + b * 24;
        const float d = qk_get_f16(y), m = qk_get_f16(y + 2);
        for (int j = 0; j < 32; ++j) dst[32 * b + j] = (float)q5_level(y, j, 4) * d + m;
    }
}
