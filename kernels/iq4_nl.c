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

/* best_index_int8 for one lane, branch-free. ggml picks, between the entries lo <= x < hi
 * either side of x, lo where x - lo < hi - x, hi otherwise; for this table both differences are
 * exact floats wherever they are close (x is near a midpoint, so x, lo and hi share a binade or x
 * and the differences do), so that is x < (lo + hi) / 2, the midpoints being exact half
 * integers: the index is the count of midpoints x is not below (a tie takes the upper entry, NaN
 * counts as above all, as ggml's search), and the level the first value plus the gaps passed. */
static const float MIDS[15] = {-115.5f, -93.5f, -74.f, -57.f, -42.f, -28.5f, -16.f, -4.5f, 7.f, 19.f, 31.5f,
                               45.5f, 61.f, 79.f, 101.f};
static const float GAPS[15] = {23, 21, 18, 16, 14, 13, 12, 11, 12, 12, 13, 15, 16, 20, 24};

QK_INLINE int32_t nl_index(float al) {
    int32_t idx = 0;
    for (int k = 0; k < 15; ++k) idx += !(al < MIDS[k]);
    return idx;
}

/* The scale search of quantize_row_iq4_nl_impl for QK_LANES blocks of 32 at once (block b in
 * lane b), weights W given: the same float operations in the same order per lane as the scalar
 * code, so the bytes are the same; lanes let SIMD work. d[b]: the block's scale, 0 for a block
 * whose largest magnitude is under GROUP_MAX_EPS. */
QK_INLINE void iq4_search_lanes(const float X[32][QK_LANES], const float W[32][QK_LANES], float d_out[QK_LANES]) {
    float amax_a[QK_LANES], mx_a[QK_LANES];
    qk_signed_absmax_lanes(32, X, amax_a, mx_a);
    const qk_vi zero_block = qk_vf_load(amax_a) < QK_GROUP_MAX_EPS;
    const qk_vf mx = qk_vf_pick(zero_block, (qk_vf){0} + 1.0f, qk_vf_load(mx_a));  /* results discarded below */
    qk_vf xs[32], ws[32];
    for (int j = 0; j < 32; ++j) {
        xs[j] = qk_vf_load(X[j]);
        ws[j] = qk_vf_load(W[j]);
    }
    qk_vf d = -mx / (float)KVALUES[0], best = {0};
    qk_vf id = 1 / d;
    for (int itry = -8; itry <= 7; ++itry) {  /* -8: the least-squares refit of d = max/127 */
        if (itry > -8) id = (float)(itry + KVALUES[0]) / mx;
        qk_vf sumqx = {0}, sumq2 = {0};
        for (int j = 0; j < 32; ++j) {
            const qk_vf al = id * xs[j];
            qk_vf q = (qk_vf){0} + (float)KVALUES[0];
            for (int k = 0; k < 15; ++k) q += (qk_vf)((qk_vi)((qk_vf){0} + GAPS[k]) & ~(al < MIDS[k]));
            sumqx += ws[j] * q * xs[j];
            sumq2 += ws[j] * q * q;
        }
        if (itry == -8) {
            d = qk_vf_pick(sumq2 > 0, sumqx / sumq2, (qk_vf){0});
            best = d * sumqx;
        } else {
            const qk_vi take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2);
            d = qk_vf_pick(take, sumqx / sumq2, d);
            best = qk_vf_pick(take, d * sumqx, best);
        }
    }
    d = qk_vf_pick(zero_block, (qk_vf){0}, d);
    for (int b = 0; b < QK_LANES; ++b) d_out[b] = d[b];
}

/* m <= QK_LANES consecutive blocks of 32 at once, one per lane (lanes past m hold zeros, not
 * stored), lane b's importance weights at qws[b] (NULL: none): the weights x^2 without an imatrix,
 * qw*sqrt(sigma2 + x^2) with one (sigma2 = 2*mean x^2 of the block). A lane's result does not
 * depend on the others, so the blocks may come from several rows. */
QK_CLONES static void iq4_nl_lanes(const float *xs, const float *const *qws, uint8_t *ys, int m) {
    float X[32][QK_LANES], W[32][QK_LANES], sigma2[QK_LANES], d[QK_LANES];
    for (int b = 0; b < QK_LANES; ++b)
        for (int j = 0; j < 32; ++j) X[j][b] = b < m ? xs[32 * b + j] : 0.f;
    for (int b = 0; b < QK_LANES; ++b) sigma2[b] = 0;
    for (int j = 0; j < 32; ++j)
        for (int b = 0; b < QK_LANES; ++b) sigma2[b] += X[j][b] * X[j][b];
    for (int b = 0; b < QK_LANES; ++b) sigma2[b] *= 2.f / 32;
    for (int j = 0; j < 32; ++j)
        for (int b = 0; b < QK_LANES; ++b)
            W[j][b] = b < m && qws[b] ? qws[b][j] * sqrtf(sigma2[b] + X[j][b] * X[j][b]) : X[j][b] * X[j][b];
    iq4_search_lanes(X, W, d);
    for (int b = 0; b < m; ++b) {
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

/* the rows' blocks in order, QK_LANES at a time across row ends (a row of one block, as
 * feedback.py quantizes a block column, still fills the lanes) */
void qk_quantize_iq4_nl(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    const int64_t nb = n / 32, total = nrows * nb;
    for (int64_t b = 0; b < total; b += QK_LANES) {
        const int m = (int)QK_MIN((int64_t)QK_LANES, total - b);
        const float *qws[QK_LANES] = {0};
        for (int l = 0; l < m; ++l) qws[l] = qw ? qw + 32 * ((b + l) % nb) : NULL;
        iq4_nl_lanes(src + 32 * b, qws, dst + 18 * b, m);
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
