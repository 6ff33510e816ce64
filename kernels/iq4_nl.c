/* IQ4_NL: 32 weights, f16 scale d, qs[16] of indices into a non-linear table; value =
 * d*kvalues[q]. Oracle: ggml quantize_iq4_nl -> quantize_row_iq4_nl_impl(32, 32, ..., ntry 7)
 * (ggml/src/ggml-quants.c); llama-quantize always calls it this way, imatrix or not.
 * Quirks reproduced: weights x^2 without an imatrix, qw*sqrt(sigma2 + x^2) with one (sigma2 =
 * 2*mean x^2 of the block); d starts at max/127 (max: signed value of largest magnitude), is refit
 * by least squares, then 15 trial scales (itry-127)/max; best_index_int8 takes the upper index
 * on ties; the final levels use the float d, the file stores f16(d); a zero block is d=0, 0x88. */
#include <math.h>
#include <string.h>
#include "qk.h"
#include "search.h"

static const int8_t KVALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static void iq4_nl_block(const float *xb, const float *qw, uint8_t *y) {
    const int ntry = 7;
    float weight[32];
    uint8_t L[32];
    float sigma2 = 0;
    for (int j = 0; j < 32; ++j) sigma2 += xb[j] * xb[j];
    sigma2 *= 2.f / 32;
    if (qw) {
        for (int j = 0; j < 32; ++j) weight[j] = qw[j] * sqrtf(sigma2 + xb[j] * xb[j]);
    } else {
        for (int j = 0; j < 32; ++j) weight[j] = xb[j] * xb[j];
    }
    float amax;
    const float max = qk_signed_absmax(32, xb, &amax);
    float d = 0;
    if (amax >= QK_GROUP_MAX_EPS) {
        d = -max / KVALUES[0];
        float id = 1 / d;
        float sumqx = 0, sumq2 = 0;
        for (int j = 0; j < 32; ++j) {
            const int l = qk_best_index_int8(16, KVALUES, id * xb[j]);
            const float q = KVALUES[l], w = weight[j];
            sumqx += w * q * xb[j];
            sumq2 += w * q * q;
        }
        d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
        float best = d * sumqx;
        for (int itry = -ntry; itry <= ntry; ++itry) {
            id = (float)(itry + KVALUES[0]) / max;
            sumqx = sumq2 = 0;
            for (int j = 0; j < 32; ++j) {
                const int l = qk_best_index_int8(16, KVALUES, id * xb[j]);
                const float q = KVALUES[l], w = weight[j];
                sumqx += w * q * xb[j];
                sumq2 += w * q * q;
            }
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
    }
    const uint16_t dh = qk_f32_to_f16(d);
    y[0] = (uint8_t)(dh & 0xff);
    y[1] = (uint8_t)(dh >> 8);
    const float id = d ? 1 / d : 0;
    for (int j = 0; j < 32; ++j) L[j] = (uint8_t)qk_best_index_int8(16, KVALUES, id * xb[j]);
    for (int j = 0; j < 16; ++j) y[2 + j] = (uint8_t)(L[j] | (L[16 + j] << 4));
}

/* best_index_int8 for one lane, branch-free: the entries either side of x, the upper on ties */
QK_INLINE int32_t nl_index(float al) {
    int32_t cnt = 0;
    for (int k = 0; k < 16; ++k) cnt += !(al < (float)KVALUES[k]);  /* NaN counts as above all, as ggml's search */
    const int32_t mu = cnt < 1 ? 1 : cnt > 15 ? 15 : cnt;
    const float lo = (float)KVALUES[mu - 1], hi = (float)KVALUES[mu];
    int32_t idx = al - lo < hi - al ? mu - 1 : mu;
    idx = al <= (float)KVALUES[0] ? 0 : idx;
    return al >= (float)KVALUES[15] ? 15 : idx;
}

/* The scale search of quantize_row_iq4_nl_impl for QK_LANES blocks of 32 at once (block b in
 * lane b), weights W given: the same float operations in the same order per lane as the scalar
 * code, so the bytes are the same; lanes let SIMD work. d[b]: the block's scale, 0 for a block
 * whose largest magnitude is under GROUP_MAX_EPS. */
QK_INLINE void iq4_search_lanes(const float X[32][QK_LANES], const float W[32][QK_LANES], float d[QK_LANES]) {
    float A[32][QK_LANES];
    int32_t I[32][QK_LANES];
    float amax[QK_LANES], mx[QK_LANES], best[QK_LANES] = {0}, id[QK_LANES], sumqx[QK_LANES], sumq2[QK_LANES];
    qk_signed_absmax_lanes(32, X, amax, mx);
    for (int b = 0; b < QK_LANES; ++b) {
        if (amax[b] < QK_GROUP_MAX_EPS) mx[b] = 1.0f;  /* a zero block: results discarded below */
        d[b] = -mx[b] / KVALUES[0];
        id[b] = 1 / d[b];
    }
    for (int itry = -8; itry <= 7; ++itry) {  /* -8: the least-squares refit of d = max/127 */
        if (itry > -8)
            for (int b = 0; b < QK_LANES; ++b) id[b] = (float)(itry + KVALUES[0]) / mx[b];
        for (int b = 0; b < QK_LANES; ++b) sumqx[b] = sumq2[b] = 0;
        for (int j = 0; j < 32; ++j)
            for (int b = 0; b < QK_LANES; ++b) {
                const float al = id[b] * X[j][b];
                int32_t cnt = 0;
                for (int k = 0; k < 16; ++k) cnt += !(al < (float)KVALUES[k]);  /* NaN counts as above all, as ggml's search */
                A[j][b] = al;
                I[j][b] = cnt;
            }
        for (int j = 0; j < 32; ++j)
            for (int b = 0; b < QK_LANES; ++b) {
                const float al = A[j][b];
                const int32_t cnt = I[j][b];
                const int32_t mu = cnt < 1 ? 1 : cnt > 15 ? 15 : cnt;
                const float lo = (float)KVALUES[mu - 1], hi = (float)KVALUES[mu];
                float q = al - lo < hi - al ? lo : hi;
                q = al <= (float)KVALUES[0] ? (float)KVALUES[0] : q;
                q = al >= (float)KVALUES[15] ? (float)KVALUES[15] : q;
                const float w = W[j][b];
                sumqx[b] += w * q * X[j][b];
                sumq2[b] += w * q * q;
            }
        for (int b = 0; b < QK_LANES; ++b) {
            if (itry == -8) {
                d[b] = sumq2[b] > 0 ? sumqx[b] / sumq2[b] : 0.f;
                best[b] = d[b] * sumqx[b];
            } else if (sumq2[b] > 0 && sumqx[b] * sumqx[b] > best[b] * sumq2[b]) {
                d[b] = sumqx[b] / sumq2[b];
                best[b] = d[b] * sumqx[b];
            }
        }
    }
    for (int b = 0; b < QK_LANES; ++b)
        if (amax[b] < QK_GROUP_MAX_EPS) d[b] = 0;
}

/* iq4_nl_block for QK_LANES blocks at once */
QK_CLONES static void iq4_nl_lanes(const float *xs, const float *qws, uint8_t *ys) {
    float X[32][QK_LANES], W[32][QK_LANES], sigma2[QK_LANES], d[QK_LANES];
    for (int b = 0; b < QK_LANES; ++b)
        for (int j = 0; j < 32; ++j) X[j][b] = xs[32 * b + j];
    for (int b = 0; b < QK_LANES; ++b) sigma2[b] = 0;
    for (int j = 0; j < 32; ++j)
        for (int b = 0; b < QK_LANES; ++b) sigma2[b] += X[j][b] * X[j][b];
    for (int b = 0; b < QK_LANES; ++b) sigma2[b] *= 2.f / 32;
    for (int j = 0; j < 32; ++j)
        for (int b = 0; b < QK_LANES; ++b)
            W[j][b] = qws ? qws[32 * b + j] * sqrtf(sigma2[b] + X[j][b] * X[j][b]) : X[j][b] * X[j][b];
    iq4_search_lanes(X, W, d);
    for (int b = 0; b < QK_LANES; ++b) {
        const uint16_t dh = qk_f32_to_f16(d[b]);
        uint8_t *y = ys + 18 * b;
        y[0] = (uint8_t)(dh & 0xff);
        y[1] = (uint8_t)(dh >> 8);
        const float inv = d[b] ? 1 / d[b] : 0;
        uint8_t L[32];
        for (int j = 0; j < 32; ++j) L[j] = (uint8_t)nl_index(inv * X[j][b]);
        for (int j = 0; j < 16; ++j) y[2 + j] = (uint8_t)(L[j] | (L[16 + j] << 4));
    }
}

/* IQ4_XS: super-blocks of 256 = 8 blocks of 32, block_iq4_xs {f16 d; u16 scales_h; u8
 * scales_l[4]; u8 qs[128]} (136 bytes); value = d * (ls - 32) * kvalues[q], ls 6 bits per block
 * (low 4 in scales_l, high 2 in scales_h). Oracle: quantize_iq4_xs ->
 * quantize_row_iq4_nl_impl(256, 32, ..., ntry 7). Quirks: sigma2 = 2*mean x^2 of the whole
 * super-block, summed in order; each block's d found as IQ4_NL's (0 under GROUP_MAX_EPS); the
 * super-block's d = -max_scale/32, max_scale the block d of largest magnitude (the first on
 * ties), so an all-zero super-block stores -0.0 (0x8000); ls = clamp(nearest_int(d_b/d), -32,
 * 31); the levels are searched again with the float d*ls, and a block whose d*ls is 0 gets
 * index 8 (value 1, nearest 0, the upper on the tie). The 8 blocks are the 8 lanes. */
QK_CLONES static void iq4_xs_superblock(const float *x, const float *qw, uint8_t *y) {
    float X[32][QK_LANES], W[32][QK_LANES], d[QK_LANES];
    float sigma2 = 0;
    for (int j = 0; j < QK_K; ++j) sigma2 += x[j] * x[j];
    sigma2 *= 2.f / QK_K;
    for (int b = 0; b < QK_LANES; ++b)
        for (int j = 0; j < 32; ++j) {
            const float v = x[32 * b + j];
            X[j][b] = v;
            W[j][b] = qw ? qw[32 * b + j] * sqrtf(sigma2 + v * v) : v * v;
        }
    iq4_search_lanes(X, W, d);
    float max_scale = 0, amax_scale = 0;
    for (int b = 0; b < QK_LANES; ++b) {
        const float abs_d = fabsf(d[b]);
        if (abs_d > amax_scale) { amax_scale = abs_d; max_scale = d[b]; }
    }
    const float dd = -max_scale / 32;
    const uint16_t dh = qk_f32_to_f16(dd);
    const float id = dd ? 1 / dd : 0.f;
    uint16_t scales_h = 0;
    uint8_t *scales_l = y + 4, *qs = y + 8;
    memset(scales_l, 0, 4);
    for (int b = 0; b < QK_LANES; ++b) {
        int l = qk_nearest_int(id * d[b]);
        l = QK_MAX(-32, QK_MIN(31, l));
        const float dl = dd * l;
        const float idl = dl ? 1 / dl : 0.f;
        uint8_t L[32];
        for (int j = 0; j < 32; ++j) L[j] = (uint8_t)nl_index(idl * X[j][b]);
        for (int j = 0; j < 16; ++j) qs[16 * b + j] = (uint8_t)(L[j] | (L[16 + j] << 4));
        l += 32;
        scales_l[b / 2] |= (uint8_t)((l & 0xf) << 4 * (b % 2));
        scales_h |= (uint16_t)((l >> 4) << 2 * b);
    }
    y[0] = (uint8_t)(dh & 0xff);
    y[1] = (uint8_t)(dh >> 8);
    y[2] = (uint8_t)(scales_h & 0xff);
    y[3] = (uint8_t)(scales_h >> 8);
}

void qk_quantize_iq4_xs(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_each_superblock(src, dst, nrows, n, qw, 136, iq4_xs_superblock);
}

void qk_dequantize_iq4_xs(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t i = 0; i < nrows * n / QK_K; ++i) {
        const uint8_t *y = src + i * 136;
        const float d = qk_f16_to_f32((uint16_t)(y[0] | (y[1] << 8)));
        const int scales_h = y[2] | (y[3] << 8);
        float *out = dst + i * QK_K;
        for (int b = 0; b < 8; ++b) {
            const int ls = ((y[4 + b / 2] >> 4 * (b % 2)) & 0xf) | (((scales_h >> 2 * b) & 3) << 4);
            const float dl = d * (ls - 32);
            for (int j = 0; j < 16; ++j) {
                out[32 * b + j] = dl * KVALUES[y[8 + 16 * b + j] & 0xf];
                out[32 * b + j + 16] = dl * KVALUES[y[8 + 16 * b + j] >> 4];
            }
        }
    }
}

void qk_quantize_iq4_nl(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    const int64_t nb = n / 32;
    for (int64_t r = 0; r < nrows; ++r) {
        int64_t ib = 0;
        for (; ib + QK_LANES <= nb; ib += QK_LANES)
            iq4_nl_lanes(src + r * n + 32 * ib, qw ? qw + 32 * ib : NULL, dst + (r * nb + ib) * 18);
        for (; ib < nb; ++ib)
            iq4_nl_block(src + r * n + 32 * ib, qw ? qw + 32 * ib : NULL, dst + (r * nb + ib) * 18);
    }
}

void qk_dequantize_iq4_nl(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    for (int64_t b = 0; b < nrows * n / 32; ++b) {
        const uint8_t *y = src + b * 18;
        const float d = qk_f16_to_f32((uint16_t)(y[0] | (y[1] << 8)));
        for (int j = 0; j < 16; ++j) {
            dst[32 * b + j] = d * KVALUES[y[2 + j] & 0xf];
            dst[32 * b + j + 16] = d * KVALUES[y[2 + j] >> 4];
        }
    }
}
