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

/* One block to search: its 32 weights, its 32 importance weights and its row's mean square,
 * and where its bytes go. Blocks are searched QK_LANES at a time, one per SIMD lane; a lane's
 * result does not depend on the others, so the blocks of a lane group may come from several
 * rows (rows of one block: the columns feedback.py quantizes one block at a time). */
typedef struct {
    const float *x, *qw;
    float sigma2;
    uint8_t *y;
} lane_item;

/* the items' blocks and importance weights, one per lane; lanes past m hold zeros (searched,
 * never stored) */
QK_INLINE void lanes_of(const lane_item *it, int m, float X[32][QK_LANES], float W[32][QK_LANES]) {
    for (int b = 0; b < QK_LANES; ++b) {
        float w[32];
        if (b < m) importance(it[b].x, it[b].qw, it[b].sigma2, w);
        for (int j = 0; j < 32; ++j) {
            X[j][b] = b < m ? it[b].x[j] : 0.f;
            W[j][b] = b < m ? w[j] : 0.f;
        }
    }
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

void qk_quantize_q4_0(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_quantize_legacy(QK_LEGACY_Q4_0, src, dst, nrows, n, qw, NULL);
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

void qk_quantize_q4_1(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_quantize_legacy(QK_LEGACY_Q4_1, src, dst, nrows, n, qw, NULL);
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

void qk_quantize_q5_0(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_quantize_legacy(QK_LEGACY_Q5_0, src, dst, nrows, n, qw, NULL);
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

void qk_quantize_q5_1(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_quantize_legacy(QK_LEGACY_Q5_1, src, dst, nrows, n, qw, NULL);
}

void qk_dequantize_q5_1(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / 32; ++b) {
        const uint8_t *y = src + b * 24;
        const float d = qk_get_f16(y), m = qk_get_f16(y + 2);
        for (int j = 0; j < 32; ++j) dst[32 * b + j] = (float)q5_level(y, j, 4) * d + m;
    }
}

/* ---- with importance weights: the lane groups ---------------------------------------------- */

static const int LEGACY_BYTES[4] = {18, 20, 22, 24};

/* the m items' blocks searched at once (make_qx_quants for Q4_0/Q5_0, make_qkx3_quants for
 * Q4_1/Q5_1, as quantize_row_*_impl) and written */
QK_INLINE void legacy_flush(int kind, const lane_item *it, int m) {
    float X[32][QK_LANES], W[32][QK_LANES], d[QK_LANES], min[QK_LANES];
    lanes_of(it, m, X, W);
    if (kind == QK_LEGACY_Q4_0 || kind == QK_LEGACY_Q5_0) {
        int8_t L[32][QK_LANES];
        qk_make_qx_lanes(32, X, W, kind == QK_LEGACY_Q4_0 ? 8 : 16, d, L);
        for (int b = 0; b < m; ++b) {
            uint8_t *yb = it[b].y;
            qk_put_f16(yb, d[b]);
            if (kind == QK_LEGACY_Q4_0) {
                for (int j = 0; j < 16; ++j) yb[2 + j] = (uint8_t)(L[j][b] | (L[j + 16][b] << 4));
            } else {
                uint8_t Lb[32];
                for (int j = 0; j < 32; ++j) Lb[j] = (uint8_t)L[j][b];
                pack_q5(Lb, yb + 6, yb + 2);
            }
        }
    } else {
        uint8_t L[32][QK_LANES];
        qk_make_qkx_lanes(32, X, W, kind == QK_LEGACY_Q4_1 ? 15 : 31, -0.9f, 0.05f, 36, 1, 0, d, min, L);
        for (int b = 0; b < m; ++b) {
            uint8_t *yb = it[b].y;
            qk_put_f16(yb, d[b]);
            qk_put_f16(yb + 2, -min[b]);
            if (kind == QK_LEGACY_Q4_1) {
                for (int j = 0; j < 16; ++j) yb[4 + j] = (uint8_t)(L[j][b] | (L[j + 16][b] << 4));
            } else {
                uint8_t Lb[32];
                for (int j = 0; j < 32; ++j) Lb[j] = L[j][b];
                pack_q5(Lb, yb + 8, yb + 4);
            }
        }
    }
}

QK_CLONES static void legacy_impl(int kind, const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw,
                                  const float *ms) {
    const int bytes = LEGACY_BYTES[kind];
    lane_item it[QK_LANES];
    int m = 0;
    for (int64_t r = 0; r < nrows; ++r) {
        const float *x = src + r * n;
        uint8_t *y = dst + r * (n / 32) * bytes;
        const float sigma2 = ms ? ms[r] : row_sigma2(x, n);
        for (int64_t ib = 0; ib < n / 32; ++ib) {
            it[m].x = x + 32 * ib;
            it[m].qw = qw + 32 * ib;
            it[m].sigma2 = sigma2;
            it[m].y = y + bytes * ib;
            if (++m == QK_LANES) {
                legacy_flush(kind, it, m);
                m = 0;
            }
        }
    }
    if (m) legacy_flush(kind, it, m);
}

QK_CLONES static void legacy_ref(int kind, const float *src, uint8_t *dst, int64_t nrows, int64_t n) {
    const int bytes = LEGACY_BYTES[kind];
    for (int64_t b = 0; b < nrows * (n / 32); ++b) {
        const float *x = src + 32 * b;
        uint8_t *y = dst + bytes * b;
        switch (kind) {
        case QK_LEGACY_Q4_0: q4_0_block_ref(x, y); break;
        case QK_LEGACY_Q4_1: q4_1_block_ref(x, y); break;
        case QK_LEGACY_Q5_0: q5_0_block_ref(x, y); break;
        default: q5_1_block_ref(x, y); break;
        }
    }
}

void qk_quantize_legacy(int kind, const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw,
                        const float *ms) {
    if (qw)
        legacy_impl(kind, src, dst, nrows, n, qw, ms);
    else
        legacy_ref(kind, src, dst, nrows, n);
}
