/* IQ2_XXS, IQ2_XS and IQ2_S: super-blocks of 256 weights on the 2-bit lattices (lattice.h). Each
 * group of 8 weights is a grid point (coordinates 2l+1, l in 0..2) times 8 signs; each sub-block
 * of 32 (XXS) or 16 (XS, S) weights has a 4-bit scale s, value = d * (0.5 + s) * 0.25 * point.
 * Oracles: ggml quantize_iq2_xxs -> quantize_row_iq2_xxs_impl, quantize_iq2_xs ->
 * quantize_row_iq2_xs_impl, quantize_iq2_s -> quantize_row_iq2_s_impl, their neighbour search
 * iq2_find_best_neighbour (ggml/src/ggml-quants.c). One body here, the three types a row each
 * of iq2_kind. Reference and the block layouts: qconvert/quant/reference/iq2.py.
 * Quirks reproduced:
 * - sigma2 = sum x^2 / 256 over the super-block, summed in order (IQ2_S: 2 * sum / 256); the
 *   weights are qw * sqrtf(sigma2 + x^2), or (IQ2_S without importance weights) 0.25 sigma2 + x^2;
 *   the neighbour search weighs squared differences by sqrtf(weight), the scale fits by weight.
 * - the signs are taken off (|x|; -0.0 stays -0.0); XXS and XS keep 7 sign bits, the 8th implied
 *   even: with an odd count of negatives the element of least weight*x^2 (the first on ties) is
 *   flipped back to -|x| and its sign bit toggled. A sub-block whose largest such value is under
 *   GROUP_MAX_EPS (IQ2_S: GROUP_MAX_EPS_IQ2_S, 1e-8) is skipped: scale 0, grid index 0, signs 0,
 *   and it does not enter the super-block's max (a NaN there would otherwise become 0).
 * - trial scales: XXS starts from make_qp_quants(32, 4, ...) and tries (5 + 0.1 is) / (3 scale) for
 *   is in -6..6 (a sub-block whose 3 scale is <= 0 is skipped); XS and S start from max / 5 and try
 *   (5 + 0.1 is) / max for is in -9..9. Each trial rounds nearest_int(0.5 (id |x| - 1)) into 0..2
 *   per coordinate; a group whose point is off the grid takes the neighbour of least weighted
 *   distance at the trial scale 1/id (the first listed on ties); a trial is kept where sumqx^2 >
 *   best * sumq2 (strictly), best starting at 0.
 * - the refit: XXS re-rounds every group at the kept scale, XS and S only the groups whose kept
 *   point came from the neighbour search (and only where one did); both with scale > 0, then the
 *   scale is refit by least squares where sumq2 > 0.
 * - a negative scale is negated and the signs complemented (XXS, XS: within 7 bits).
 * - d = max scale / 31 (IQ2_S stores f16(d * 0.9875)), each scale as clamp(nearest_int(0.5 (s / d
 *   - 1)), 0, 15) with the float 1/d; a super-block whose max scale is 0 stores d = 0 and scales 0;
 *   XXS and XS then zero their grid indexes and signs too, IQ2_S keeps them.
 * Where ggml aborts (GGML_ASSERT: no neighbour with a distance below FLT_MAX, which happens once
 * |x| is so large that the weights overflow; or a NaN scale), this code goes on: the search takes
 * the first listed neighbour and a NaN scale is stored as it comes. */
#include <float.h>
#include <math.h>
#include <string.h>
#include "qk.h"
#include "lattice.h"
#include "search.h"

typedef struct {
    int lattice;    /* QK_LAT_* */
    int sub;        /* weights per scale: 32 or 16 */
    int bytes;      /* per super-block */
    float eps;      /* a sub-block whose largest |x| is under it is skipped */
    int twice;      /* sigma2 = 2 sum x^2 / 256 (IQ2_S) */
    int parity;     /* 7 sign bits, the 8th implied even (XXS, XS) */
    int xxs;        /* trials around make_qp_quants' scale, every group refit (XXS) */
} iq2_kind;

static const iq2_kind IQ2_XXS = {QK_LAT_IQ2_XXS, 32, 66, QK_GROUP_MAX_EPS, 0, 1, 1};
static const iq2_kind IQ2_XS = {QK_LAT_IQ2_XS, 16, 74, QK_GROUP_MAX_EPS, 0, 1, 0};
static const iq2_kind IQ2_S = {QK_LAT_IQ2_S, 16, 82, 1e-8f, 1, 0, 0};

/* iq2_find_best_neighbour: the listed grid point (nb: count, then indexes) nearest to xv at
 * `scale` by squared differences weighted by wa; the first on ties. A coordinate takes one of
 * three values, so its 3 possible terms wa*diff*diff are computed once, each the very float ggml
 * computes per point; a point's distance adds its 8 terms in ggml's order. The distances of a
 * chunk of points are independent (SIMD across points), the scan for the least stays in order. */
#define IQ2_CHUNK 64
QK_INLINE int iq2_nearest(const qk_lattice *lat, const uint16_t *nb, const float *xv, const float *wa, float scale) {
    float t0[8], t1[8], t2[8];
    for (int i = 0; i < 8; ++i) {
        const float d0 = scale * 1.0f - xv[i], d1 = scale * 3.0f - xv[i], d2 = scale * 5.0f - xv[i];
        t0[i] = wa[i] * d0 * d0;
        t1[i] = wa[i] * d1 * d1;
        t2[i] = wa[i] * d2 * d2;
    }
    float best_d2 = FLT_MAX;
    int best = -1;
    const int n = nb[0];
    for (int j0 = 0; j0 < n; j0 += IQ2_CHUNK) {
        const int m = QK_MIN(IQ2_CHUNK, n - j0);
        uint32_t u[IQ2_CHUNK];
        float dist[IQ2_CHUNK];
        for (int j = 0; j < m; ++j) u[j] = lat->index[nb[1 + j0 + j]];
        for (int j = 0; j < m; ++j) {
            float d2 = 0;
            for (int i = 0; i < 8; ++i) {
                const uint32_t l = u[j] >> 2 * i & 3;
                d2 += l == 0 ? t0[i] : l == 1 ? t1[i] : t2[i];
            }
            dist[j] = d2;
        }
        for (int j = 0; j < m; ++j)
            if (dist[j] < best_d2) {
                best_d2 = dist[j];
                best = nb[1 + j0 + j];
            }
    }
    return best >= 0 ? best : nb[1];  /* ggml asserts here */
}

/* the levels L[8] of group xv at inverse scale id, moved to the nearest grid point (at `scale`)
 * when off the grid; 1 when the rounded point was on the grid */
QK_INLINE int iq2_point(const qk_lattice *lat, const float *xv, const float *wa, float id, float scale, int8_t *L) {
    int u = 0;
    for (int i = 0; i < 8; ++i) {
        int l = qk_nearest_int(0.5f * (id * xv[i] - 1));
        l = QK_MAX(0, QK_MIN(2, l));
        L[i] = (int8_t)l;
        u |= l << 2 * i;
    }
    const int32_t m = lat->map[u];
    if (m >= 0) return 1;
    const int8_t *pg = lat->grid + 8 * iq2_nearest(lat, lat->neighbours - m - 1, xv, wa, scale);
    for (int i = 0; i < 8; ++i) L[i] = (int8_t)((pg[i] - 1) / 2);
    return 0;
}

QK_INLINE void iq2_sums(int n, const float *weight, const float *xval, const int8_t *L, float *sumqx, float *sumq2) {
    float sx = 0, s2 = 0;
    for (int i = 0; i < n; ++i) {
        const float w = weight[i], q = (float)(2 * L[i] + 1);
        sx += w * xval[i] * q;
        s2 += w * q * q;
    }
    *sumqx = sx;
    *sumq2 = s2;
}

/* The trial scales of one group, trial j in lane j: the grid point each rounds to (or the nearest
 * neighbour at the trial's scale 1/id[j], and then off[j] = 1) as q = 2l+1 in Q[i][j]. Lanes past
 * ntrial are computed and ignored. */
#define IQ2_LANES 24  /* at least the 19 trials of XS and S */
QK_INLINE void iq2_trials(const qk_lattice *lat, int ntrial, const float *xv, const float *wa, const float *id,
                          float Q[][IQ2_LANES], uint8_t *off) {
    int32_t u[IQ2_LANES];
    for (int j = 0; j < IQ2_LANES; ++j) u[j] = 0;
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < IQ2_LANES; ++j) {
            int32_t l = qk_lane_int(0.5f * (id[j] * xv[i] - 1));
            l = l < 0 ? 0 : l > 2 ? 2 : l;
            u[j] |= l << 2 * i;
            Q[i][j] = (float)(2 * l + 1);
        }
    for (int j = 0; j < ntrial; ++j) {
        const int32_t m = lat->map[u[j]];
        off[j] = m < 0;
        if (m < 0) {
            const int8_t *pg = lat->grid + 8 * iq2_nearest(lat, lat->neighbours - m - 1, xv, wa, 1 / id[j]);
            for (int i = 0; i < 8; ++i) Q[i][j] = (float)pg[i];
        }
    }
}

/* One sub-block of t->sub weights: 0 when skipped (index and signs 0), else 1 with its scale,
 * its groups' grid indexes and sign bytes. */
QK_CLONES static int iq2_subblock(const iq2_kind *t, const qk_lattice *lat, const float *xb, const float *qw, float sigma2,
                        float *scale_out, uint16_t *index, uint8_t *signs) {
    const int n = t->sub, ng = n / 8;
    float weight[32], waux[32], xval[32] = {0};  /* zeroed only to quiet -Wmaybe-uninitialized */
    int8_t L[32];
    int on[4];
    uint8_t s[4];
    memset(index, 0, (size_t)ng * sizeof *index);
    memset(signs, 0, (size_t)ng);
    for (int i = 0; i < n; ++i) weight[i] = qw ? qw[i] * sqrtf(sigma2 + xb[i] * xb[i]) : 0.25f * sigma2 + xb[i] * xb[i];
    for (int i = 0; i < n; ++i) waux[i] = sqrtf(weight[i]);
    for (int i = 0; i < n; ++i) xval[i] = xb[i] >= 0 ? xb[i] : -xb[i];
    for (int k = 0; k < ng; ++k) {
        const float *x = xb + 8 * k;
        float *xv = xval + 8 * k;
        int neg = 0;
        s[k] = 0;
        for (int i = 0; i < 8; ++i)
            if (!(x[i] >= 0)) {
                ++neg;
                s[k] |= (uint8_t)(1 << i);
            }
        if (t->parity && neg % 2) {
            const float *w = weight + 8 * k;
            int imin = 0;
            float min = w[0] * x[0] * x[0];
            for (int i = 1; i < 8; ++i) {
                const float a = w[i] * x[i] * x[i];
                if (a < min) {
                    min = a;
                    imin = i;
                }
            }
            xv[imin] = -xv[imin];
            s[k] ^= (uint8_t)(1 << imin);
        }
        if (t->parity) s[k] &= 127;
    }
    float max = xval[0];
    for (int i = 1; i < n; ++i) max = max > xval[i] ? max : xval[i];
    if (max < t->eps) return 0;

    float scale, base;
    int ntry;
    if (t->xxs) {
        uint8_t Lqp[32];  /* make_qp_quants' levels: never kept (every group is refit) */
        scale = qk_make_qp_quants(n, 4, xval, Lqp, weight);
        base = scale * 3;
        if (base <= 0) return 0;
        ntry = 6;
    } else {
        scale = max / 5;
        base = max;
        ntry = 9;
    }
    float Q[32][IQ2_LANES], sx[IQ2_LANES], s2[IQ2_LANES], id[IQ2_LANES];
    uint8_t off[4][IQ2_LANES];
    const int ntrial = 2 * ntry + 1;
    for (int j = 0; j < IQ2_LANES; ++j) id[j] = (5.0f + (float)(QK_MIN(j, ntrial - 1) - ntry) * 0.1f) / base;
    for (int k = 0; k < ng; ++k) iq2_trials(lat, ntrial, xval + 8 * k, waux + 8 * k, id, Q + 8 * k, off[k]);
    for (int j = 0; j < IQ2_LANES; ++j) sx[j] = s2[j] = 0;
    for (int i = 0; i < n; ++i) {
        const float w = weight[i], wx = w * xval[i];
        for (int j = 0; j < IQ2_LANES; ++j) {
            sx[j] += wx * Q[i][j];
            s2[j] += w * Q[i][j] * Q[i][j];
        }
    }
    float best = 0, sumqx, sumq2;
    int kept = -1;
    for (int j = 0; j < ntrial; ++j)
        if (s2[j] > 0 && sx[j] * sx[j] > best * s2[j]) {
            scale = sx[j] / s2[j];
            best = scale * sx[j];
            kept = j;
        }
    for (int i = 0; i < n; ++i) L[i] = (int8_t)(kept < 0 ? 0 : ((int)Q[i][kept] - 1) / 2);
    for (int k = 0; k < ng; ++k) on[k] = kept < 0 || !off[k][kept];
    int refit = t->xxs;
    for (int k = 0; k < ng; ++k) refit |= !on[k];
    if (refit && scale > 0) {
        const float id = 1 / scale;
        for (int k = 0; k < ng; ++k)
            if (t->xxs || !on[k]) iq2_point(lat, xval + 8 * k, waux + 8 * k, id, scale, L + 8 * k);
        iq2_sums(n, weight, xval, L, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    if (scale < 0) {
        scale = -scale;
        for (int k = 0; k < ng; ++k) s[k] = (uint8_t)(~s[k] & (t->parity ? 127 : 255));
    }
    for (int k = 0; k < ng; ++k) {
        int u = 0;
        for (int i = 0; i < 8; ++i) u |= L[8 * k + i] << 2 * i;
        index[k] = (uint16_t)QK_MAX(0, lat->map[u]);  /* always on the grid here */
        signs[k] = s[k];
    }
    *scale_out = scale;
    return 1;
}

static void iq2_superblock(const iq2_kind *t, const float *x, const float *qw, uint8_t *y) {
    const qk_lattice *lat = qk_lattice_get(t->lattice);
    const int nsub = QK_K / t->sub, ng = t->sub / 8;
    float scales[16];
    uint16_t index[32];
    uint8_t signs[32], ls[16];
    float sumx2 = 0;
    for (int i = 0; i < QK_K; ++i) sumx2 += x[i] * x[i];
    const float sigma2 = (t->twice ? 2 * sumx2 : sumx2) / QK_K;
    float max_scale = 0;
    for (int ib = 0; ib < nsub; ++ib) {
        scales[ib] = 0;
        if (iq2_subblock(t, lat, x + t->sub * ib, qw ? qw + t->sub * ib : NULL, sigma2, &scales[ib], index + ng * ib,
                         signs + ng * ib))
            max_scale = max_scale > scales[ib] ? max_scale : scales[ib];
    }
    memset(y, 0, (size_t)t->bytes);
    memset(ls, 0, sizeof ls);
    if (!max_scale) {
        if (t->parity) return;  /* XXS, XS: all zero; IQ2_S keeps its points and signs */
    } else {
        const float d = max_scale / 31;
        qk_put_f16(y, t->parity ? d : d * 0.9875f);
        const float id = 1 / d;
        for (int ib = 0; ib < nsub; ++ib) {
            const int l = qk_nearest_int(0.5f * (id * scales[ib] - 1));
            ls[ib] = (uint8_t)QK_MAX(0, QK_MIN(15, l));
        }
    }
    uint8_t *q = y + 2;
    if (t->lattice == QK_LAT_IQ2_XXS) {  /* per 32: 4 index bytes, then u32 of 4 x 7 sign bits and the scale */
        for (int ib = 0; ib < nsub; ++ib) {
            uint32_t aux = (uint32_t)ls[ib] << 28;
            for (int k = 0; k < 4; ++k) {
                q[8 * ib + k] = (uint8_t)index[4 * ib + k];
                aux |= (uint32_t)signs[4 * ib + k] << 7 * k;
            }
            for (int b = 0; b < 4; ++b) q[8 * ib + 4 + b] = (uint8_t)(aux >> 8 * b);
        }
    } else if (t->lattice == QK_LAT_IQ2_XS) {  /* u16 per group: index | signs << 9; then 8 scale bytes */
        for (int g = 0; g < 32; ++g) {
            const uint16_t v = (uint16_t)(index[g] | signs[g] << 9);
            q[2 * g] = (uint8_t)(v & 0xff);
            q[2 * g + 1] = (uint8_t)(v >> 8);
        }
        for (int ib = 0; ib < nsub; ++ib) q[64 + ib / 2] |= (uint8_t)(ls[ib] << 4 * (ib % 2));
    } else {  /* qs: 32 index low bytes, 32 sign bytes; qh: 2 high index bits per group; scales */
        for (int g = 0; g < 32; ++g) {
            q[g] = (uint8_t)(index[g] & 255);
            q[32 + g] = signs[g];
            q[64 + g / 4] |= (uint8_t)((index[g] >> 8) << 2 * (g % 4));
        }
        for (int ib = 0; ib < nsub; ++ib) q[72 + ib / 2] |= (uint8_t)(ls[ib] << 4 * (ib % 2));
    }
}

static void iq2_xxs_block(const float *x, const float *qw, uint8_t *y) { iq2_superblock(&IQ2_XXS, x, qw, y); }
static void iq2_xs_block(const float *x, const float *qw, uint8_t *y) { iq2_superblock(&IQ2_XS, x, qw, y); }
static void iq2_s_block(const float *x, const float *qw, uint8_t *y) { iq2_superblock(&IQ2_S, x, qw, y); }

void qk_quantize_iq2_xxs(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_each_superblock(src, dst, nrows, n, qw, IQ2_XXS.bytes, iq2_xxs_block);
}
void qk_quantize_iq2_xs(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_each_superblock(src, dst, nrows, n, qw, IQ2_XS.bytes, iq2_xs_block);
}
void qk_quantize_iq2_s(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_each_superblock(src, dst, nrows, n, qw, IQ2_S.bytes, iq2_s_block);
}

/* Dequantization: value = d * (0.5 + s) * 0.25 * {8, 25, 43}[l] * sign, every product exact. */
static const float IQ2_VALUES[3] = {8.f, 25.f, 43.f};

/* one group of 8: grid point g of lattice `which`, sign byte `sg` (bit i: element i negative) */
static void iq2_put_group(const qk_lattice *lat, int g, uint8_t sg, float db, float *out) {
    const int8_t *pg = lat->grid + 8 * g;
    for (int i = 0; i < 8; ++i) out[i] = db * IQ2_VALUES[(pg[i] - 1) / 2] * (sg >> i & 1 ? -1.f : 1.f);
}

/* 7 stored sign bits -> 8, the 8th making the count of negatives even */
static uint8_t iq2_even_signs(unsigned s7) {
    unsigned p = s7;
    p ^= p >> 4;
    p ^= p >> 2;
    p ^= p >> 1;
    return (uint8_t)(s7 | (p & 1) << 7);
}

static void iq2_dequantize(const iq2_kind *t, const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    const qk_lattice *lat = qk_lattice_get(t->lattice);
    for (int64_t b = 0; b < nrows * n / QK_K; ++b) {
        const uint8_t *y = src + b * t->bytes, *q = y + 2;
        const float d = qk_get_f16(y);
        float *out = dst + b * QK_K;
        for (int g = 0; g < 32; ++g) {
            int index, ls;
            uint8_t sg;
            if (t->lattice == QK_LAT_IQ2_XXS) {
                const uint8_t *a = q + 8 * (g / 4);
                const uint32_t aux = (uint32_t)a[4] | (uint32_t)a[5] << 8 | (uint32_t)a[6] << 16 | (uint32_t)a[7] << 24;
                index = a[g % 4];
                sg = iq2_even_signs(aux >> 7 * (g % 4) & 127);
                ls = (int)(aux >> 28);
            } else if (t->lattice == QK_LAT_IQ2_XS) {
                const int v = q[2 * g] | q[2 * g + 1] << 8;
                index = v & 511;
                sg = iq2_even_signs((unsigned)v >> 9);
                ls = q[64 + g / 4] >> 4 * (g / 2 % 2) & 15;
            } else {
                index = q[g] | (q[64 + g / 4] >> 2 * (g % 4) & 3) << 8;
                sg = q[32 + g];
                ls = q[72 + g / 4] >> 4 * (g / 2 % 2) & 15;
            }
            iq2_put_group(lat, index, sg, d * (0.5f + (float)ls) * 0.25f, out + 8 * g);
        }
    }
}

void qk_dequantize_iq2_xxs(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    iq2_dequantize(&IQ2_XXS, src, dst, nrows, n);
}
void qk_dequantize_iq2_xs(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    iq2_dequantize(&IQ2_XS, src, dst, nrows, n);
}
void qk_dequantize_iq2_s(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    iq2_dequantize(&IQ2_S, src, dst, nrows, n);
}
