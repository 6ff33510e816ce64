/* Q4_K, Q5_K, Q6_K: super-blocks of 256 weights. Oracles: ggml quantize_row_q{4,5,6}_K_ref
 * (no importance matrix) and quantize_row_q{4,5,6}_K_impl (with one), ggml/src/ggml-quants.c.
 * Quirks reproduced: without an imatrix the 8 sub-block scales and mins are searched with
 * make_qkx2_quants on weights sqrt(mean x^2) + |x|, then rounded to 6 bits against the largest;
 * with one, make_qkx3_quants on qw*sqrt(sigma2 + x^2), sigma2 = 2*mean x^2 of the super-block,
 * and the 6-bit scales come from make_qp_quants weighted by each sub-block's weight sum. Every
 * level is then recomputed from the f16-rounded d and dmin. */
#include <math.h>
#include <string.h>
#include "qk.h"
#include "search.h"

/* 6-bit scale ls and min lm of sub-block j into the 12-byte scales array (get_scale_min_k4) */
static void put_scale_min(uint8_t *s, int j, uint8_t ls, uint8_t lm) {
    if (j < 4) {
        s[j] = ls;
        s[j + 4] = lm;
    } else {
        s[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
        s[j - 4] |= (uint8_t)((ls >> 4) << 6);
        s[j - 0] |= (uint8_t)((lm >> 4) << 6);
    }
}

static void get_scale_min(const uint8_t *q, int j, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

/* the common part of Q4_K and Q5_K: scales/mins of 8 sub-blocks of 32, then levels 0..nmax */
QK_CLONES static void kx_superblock(const float *x, const float *qw, int nmax, float rmin_ref, int nstep_ref,
                          uint8_t *d_out, uint8_t *scales12, uint8_t *L) {
    float X[32][QK_LANES], W[32][QK_LANES], mins[8], scales[8];
    uint8_t LT[32][QK_LANES];
    memset(scales12, 0, 12);
    for (int j = 0; j < 8; ++j)
        for (int l = 0; l < 32; ++l) X[l][j] = x[32 * j + l];
    if (!qw) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; ++j) {
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
            const float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; ++l) W[l][j] = av_x + fabsf(x[32 * j + l]);
        }
        qk_make_qkx_lanes(32, X, W, nmax, rmin_ref, 0.1f, nstep_ref, 0, 0, scales, mins, LT);
        for (int j = 0; j < 8; ++j) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < 8; ++j) {
            uint8_t ls = (uint8_t)qk_nearest_int(inv_scale * scales[j]);
            uint8_t lm = (uint8_t)qk_nearest_int(inv_min * mins[j]);
            put_scale_min(scales12, j, QK_MIN(63, ls), QK_MIN(63, lm));
        }
        qk_put_f16(d_out, max_scale / 63.f);
        qk_put_f16(d_out + 2, max_min / 63.f);
    } else {
        float sum_x2 = 0, sw[8];
        for (int l = 0; l < QK_K; ++l) sum_x2 += x[l] * x[l];
        const float sigma2 = 2 * sum_x2 / QK_K;
        uint8_t Ls[8], Lm[8];
        for (int j = 0; j < 8; ++j) {
            float sumw = 0;
            for (int l = 0; l < 32; ++l) {
                W[l][j] = qw[32 * j + l] * sqrtf(sigma2 + x[32 * j + l] * x[32 * j + l]);
                sumw += W[l][j];
            }
            sw[j] = sumw;
        }
        qk_make_qkx_lanes(32, X, W, nmax, -0.9f, 0.05f, 36, 1, 0, scales, mins, LT);
        const float d_block = qk_make_qp_quants(8, 63, scales, Ls, sw);
        const float m_block = qk_make_qp_quants(8, 63, mins, Lm, sw);
        for (int j = 0; j < 8; ++j) put_scale_min(scales12, j, QK_MIN(63, Ls[j]), QK_MIN(63, Lm[j]));
        qk_put_f16(d_out, d_block);
        qk_put_f16(d_out + 2, m_block);
    }
    for (int j = 0; j < 8; ++j)
        for (int l = 0; l < 32; ++l) L[32 * j + l] = LT[l][j];
    const float dd = qk_get_f16(d_out), dmin = qk_get_f16(d_out + 2);
    for (int j = 0; j < 8; ++j) {
        uint8_t sc, m;
        get_scale_min(scales12, j, &sc, &m);
        const float d = dd * (float)sc;
        if (!d) continue;
        const float dm = dmin * (float)m;
        for (int ii = 0; ii < 32; ++ii) {
            const int l = qk_nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)QK_MAX(0, QK_MIN(nmax, l));
        }
    }
}

/* ---- Q4_K: d, dmin, scales[12], qs[128] ----------------------------------------------------- */

QK_CLONES void qk_quantize_q4_K(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    uint8_t L[QK_K];
    for (int64_t r = 0; r < nrows; ++r) {
        for (int64_t i = 0; i < n / QK_K; ++i) {
            const float *x = src + r * n + i * QK_K;
            uint8_t *y = dst + (r * (n / QK_K) + i) * 144;
            kx_superblock(x, qw ? qw + i * QK_K : NULL, 15, -1.f, 20, y, y + 4, L);
            uint8_t *q = y + 16;
            for (int j = 0; j < QK_K; j += 64, q += 32)
                for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
        }
    }
}

void qk_dequantize_q4_K(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / QK_K; ++b) {
        const uint8_t *y = src + b * 144, *q = y + 16;
        const float d = qk_get_f16(y), min = qk_get_f16(y + 2);
        float *out = dst + b * QK_K;
        for (int j = 0, is = 0; j < QK_K; j += 64, is += 2, q += 32) {
            uint8_t sc, m;
            get_scale_min(y + 4, is, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            get_scale_min(y + 4, is + 1, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; ++l) *out++ = d1 * (float)(q[l] & 0xF) - m1;
            for (int l = 0; l < 32; ++l) *out++ = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

/* ---- Q5_K: d, dmin, scales[12], qh[32], qs[128] --------------------------------------------- */

QK_CLONES void qk_quantize_q5_K(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    uint8_t L[QK_K];
    for (int64_t r = 0; r < nrows; ++r) {
        for (int64_t i = 0; i < n / QK_K; ++i) {
            const float *x = src + r * n + i * QK_K;
            uint8_t *y = dst + (r * (n / QK_K) + i) * 176;
            kx_superblock(x, qw ? qw + i * QK_K : NULL, 31, -0.5f, 15, y, y + 4, L);
            uint8_t *qh = y + 16, *ql = y + 48;
            memset(qh, 0, 32);
            uint8_t m1 = 1, m2 = 2;
            for (int k = 0; k < QK_K; k += 64, ql += 32) {
                for (int j = 0; j < 32; ++j) {
                    int l1 = L[k + j], l2 = L[k + j + 32];
                    if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
                    if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
                    ql[j] = (uint8_t)(l1 | (l2 << 4));
                }
                m1 <<= 2;
                m2 <<= 2;
            }
        }
    }
}

void qk_dequantize_q5_K(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / QK_K; ++b) {
        const uint8_t *y = src + b * 176, *qh = y + 16, *ql = y + 48;
        const float d = qk_get_f16(y), min = qk_get_f16(y + 2);
        float *out = dst + b * QK_K;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0, is = 0; j < QK_K; j += 64, is += 2, ql += 32) {
            uint8_t sc, m;
            get_scale_min(y + 4, is, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            get_scale_min(y + 4, is + 1, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; ++l) *out++ = d1 * (float)((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; ++l) *out++ = d2 * (float)((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
            u1 <<= 2;
            u2 <<= 2;
        }
    }
}

/* ---- Q6_K: ql[128], qh[64], scales int8[16], d f16 (last) ; value = d*sc*(q-32) ------------
 * Quirk: the block scale is -128/max_scale with max_scale the signed sub-block scale of
 * largest magnitude; with an imatrix, make_qx_quants takes the raw qw as weights. */

QK_CLONES void qk_quantize_q6_K(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    int8_t L[QK_K];
    float scales[16];
    for (int64_t r = 0; r < nrows; ++r) {
        for (int64_t i = 0; i < n / QK_K; ++i) {
            const float *x = src + r * n + i * QK_K;
            uint8_t *y = dst + (r * (n / QK_K) + i) * 210;
            uint8_t *ql = y, *qh = y + 128;
            int8_t *sc = (int8_t *)(y + 192);
            float max_scale = 0, max_abs_scale = 0;
            for (int ib0 = 0; ib0 < 16; ib0 += QK_LANES) {  /* QK_LANES sub-blocks at once, one per lane */
                float X[16][QK_LANES], W[16][QK_LANES];
                int8_t LT[16][QK_LANES];
                for (int b = 0; b < QK_LANES; ++b)
                    for (int l = 0; l < 16; ++l) {
                        const int j = 16 * (ib0 + b) + l;
                        X[l][b] = x[j];
                        W[l][b] = qw ? qw[i * QK_K + j] : x[j] * x[j];
                    }
                qk_make_qx_lanes(16, X, W, 32, scales + ib0, LT);
                for (int b = 0; b < QK_LANES; ++b)
                    for (int l = 0; l < 16; ++l) L[16 * (ib0 + b) + l] = LT[l][b];
            }
            for (int ib = 0; ib < 16; ++ib) {
                const float s = scales[ib];
                if (fabsf(s) > max_abs_scale) { max_abs_scale = fabsf(s); max_scale = s; }
            }
            if (max_abs_scale < QK_GROUP_MAX_EPS) {
                memset(y, 0, 210);
                continue;
            }
            const float iscale = -128.f / max_scale;
            qk_put_f16(y + 208, 1 / iscale);
            for (int ib = 0; ib < 16; ++ib) sc[ib] = (int8_t)QK_MIN(127, qk_nearest_int(iscale * scales[ib]));
            const float dd = qk_get_f16(y + 208);
            for (int j = 0; j < 16; ++j) {
                const float d = dd * (float)sc[j];
                if (!d) continue;
                for (int ii = 0; ii < 16; ++ii) {
                    const int l = qk_nearest_int(x[16 * j + ii] / d);
                    L[16 * j + ii] = (int8_t)(QK_MAX(-32, QK_MIN(31, l)) + 32);
                }
            }
            for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
                for (int l = 0; l < 32; ++l) {
                    const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF;
                    const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
                    ql[l] = (uint8_t)(q1 | (q3 << 4));
                    ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
                    qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                                      | ((L[j + l + 96] >> 4) << 6));
                }
            }
        }
    }
}

void qk_dequantize_q6_K(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / QK_K; ++b) {
        const uint8_t *y = src + b * 210, *ql = y, *qh = y + 128;
        const int8_t *sc = (const int8_t *)(y + 192);
        const float d = qk_get_f16(y + 208);
        float *out = dst + b * QK_K;
        for (int k = 0; k < QK_K; k += 128, out += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int q1 = (int8_t)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                out[l] = d * sc[is] * q1;
                out[l + 32] = d * sc[is + 2] * q2;
                out[l + 64] = d * sc[is + 4] * q3;
                out[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}
