/* IQ1_S: super-blocks of 256 = 8 blocks of 32, block_iq1_s {f16 d; u8 qs[32]; u16 qh[8]} (50
 * bytes). Each group of 8 weights is a point of the 2048-point lattice QK_LAT_IQ1 (levels l in
 * 0..2 per coordinate), index low 8 bits in qs, high 3 bits in qh[block] bits 3k..3k+2; value =
 * d * (2s+1) * (l - 1 + delta), s = qh bits 12..14, delta = -1/8 when qh bit 15 is set, else +1/8.
 * Oracle: ggml quantize_iq1_s -> quantize_row_iq1_s_impl (ggml/src/ggml-quants.c), which needs
 * importance weights (ggml_quantize_requires_imatrix; the bindings never get here without them).
 * Quirks reproduced, in the order they happen:
 * - weights qw * sqrtf(sigma2 + x^2), sigma2 = 2 * sum(x^2) / 256 over the super-block, in order;
 * - a block whose max |x| is under 1e-12 keeps scale 0, indexes 0, shift +;
 * - the values are sorted by glibc's qsort, a top-down merge sort that keeps equal values (and -0
 *   against +0) in index order, then every split i1 <= i2 of the sorted values into levels 0, 1, 2
 *   is scored with the shifted values {-1+delta, delta, 1+delta} and then with delta negated;
 *   prefix sums run in sorted order; a candidate replaces the best when sumq2 > 0 and
 *   sumqx^2 > best * sumq2, best starting at -FLT_MAX (so the first is taken even when its scale
 *   is negative) and becoming scale * sumqx; no candidate at all: the block is left as a zero one;
 * - a negative scale mirrors the levels (2 - l) and negates scale and shift;
 * - a group of 8 levels off the grid takes the neighbour (lattice.h's list) nearest in
 *   sum w * (scale * value - x)^2, the first on ties; if any group moved, the scale is refit by
 *   least squares over the block (only when both sums are > 0);
 * - d = max_scale / 15 is stored as f16(d * 1.125f); s = clamp(nearest_int(0.5 * (s_b / d - 1)),
 *   0, 7) computed as id * s_b with id = 1/d; when every block's scale is 0, d and the scale bits
 *   stay 0 (indexes written before are kept).
 * ggml's fallback when no neighbour has a finite distance scans the whole grid reading x at the
 * grid index (past the block; then it aborts if still nothing is found): it needs |w * diff^2| to
 * overflow float for every neighbour, far beyond what the f16 d holds, and its bytes depend on
 * memory outside the row. We scan the grid with the group's own x, and failing that keep the
 * first neighbour. */
#include <float.h>
#include <math.h>
#include <string.h>
#include "qk.h"
#include "lattice.h"

#define IQ1_DELTA 0.125f
#define IQ1_S_EPS 1e-12f
#define IQ1_S_BYTES 50

/* the values of levels 0, 1, 2 with the shift +delta and -delta */
static const float IQ1_PLUS[3] = {-1 + IQ1_DELTA, IQ1_DELTA, 1 + IQ1_DELTA};
static const float IQ1_MINUS[3] = {-1 - IQ1_DELTA, -IQ1_DELTA, 1 - IQ1_DELTA};

/* glibc's qsort as ggml's iq1_sort_helper drives it: a top-down merge sort (left half n/2) that
 * takes the right element only when the left one compares greater */
static void iq1_sort(const float *x, uint8_t *o, uint8_t *tmp, int n) {
    if (n <= 1) return;
    const int n1 = n / 2;
    iq1_sort(x, o, tmp, n1);
    iq1_sort(x, o + n1, tmp, n - n1);
    int a = 0, b = n1, k = 0;
    while (a < n1 && b < n) tmp[k++] = x[o[a]] > x[o[b]] ? o[b++] : o[a++];
    while (a < n1) tmp[k++] = o[a++];
    memcpy(o, tmp, (size_t)k);
}

/* iq1_find_best_neighbour2: the neighbour of an off-grid group nearest to x in
 * sum w * (scale * xx[l] - x)^2, summed over the 8 coordinates in order. The terms are taken from
 * a table of the 3 levels per coordinate, the same floats as computing them per point. */
static int iq1_nearest(const qk_lattice *lat, const uint16_t *nb, const float *x, const float *w, float scale,
                       const float *xx) {
    float t[8][3];
    for (int i = 0; i < 8; ++i)
        for (int l = 0; l < 3; ++l) {
            const float diff = scale * xx[l] - x[i];
            t[i][l] = w[i] * diff * diff;
        }
    float best = FLT_MAX;
    int found = -1;
    for (int j = 1; j <= nb[0]; ++j) {
        const int8_t *g = lat->grid + 8 * nb[j];
        float d2 = 0;
        for (int i = 0; i < 8; ++i) d2 += t[i][g[i] >> 1];
        if (d2 < best) {
            best = d2;
            found = nb[j];
        }
    }
    for (int p = 0; found < 0 && p < lat->size; ++p) {  /* see the header: ggml's x here is x[p] */
        const int8_t *g = lat->grid + 8 * p;
        float d2 = 0;
        for (int i = 0; i < 8; ++i) d2 += t[i][g[i] >> 1];
        if (d2 < best) {
            best = d2;
            found = p;
        }
    }
    return found < 0 ? nb[1] : found;
}

/* Grid indexes for the levels L (0..2) of a block of n, group k valued xx[k][l]: the point itself
 * when on the grid, else its nearest neighbour. Returns the scale, refit by least squares over the
 * block when a group moved (and both sums are > 0). */
static float iq1_snap(const qk_lattice *lat, const float *xb, const float *w, int n, const int8_t *L,
                      const float *const *xx, float scale, uint16_t *index) {
    int moved = 0;
    for (int k = 0; k < n / 8; ++k) {
        int u = 0;
        for (int j = 0; j < 8; ++j) u |= L[8 * k + j] << 2 * j;
        const int32_t m = lat->map[u];
        if (m >= 0) {
            index[k] = (uint16_t)m;
        } else {
            moved = 1;
            index[k] = (uint16_t)iq1_nearest(lat, lat->neighbours - m - 1, xb + 8 * k, w + 8 * k, scale, xx[k]);
        }
    }
    if (!moved) return scale;
    float sumqx = 0, sumq2 = 0;
    for (int k = 0; k < n / 8; ++k) {
        const int8_t *g = lat->grid + 8 * index[k];
        for (int j = 0; j < 8; ++j) {
            const float q = xx[k][g[j] >> 1], wj = w[8 * k + j];
            sumqx += wj * q * xb[8 * k + j];
            sumq2 += wj * q * q;
        }
    }
    return sumqx > 0 && sumq2 > 0 ? sumqx / sumq2 : scale;
}

/* levels of a block of n from its sorted order and best split: 0 below i1, 1 below i2, else 2 */
static void iq1_levels(const uint8_t *order, int n, int i1, int i2, int8_t *L) {
    for (int j = 0; j < n; ++j) L[order[j]] = (int8_t)(j < i1 ? 0 : j < i2 ? 1 : 2);
}

static float block_max(const float *x, int n) {
    float max = fabsf(x[0]);
    for (int i = 1; i < n; ++i) {
        const float a = fabsf(x[i]);
        max = max > a ? max : a;
    }
    return max;
}

/* quantize_row_iq1_s_impl's split search over a block of 32 in sorted order, prefix sums sx
 * (weighted values) and sw (weights): the best (i1, i2) and shift (+1 or -1, 0 when none), and
 * its scale (max when none). */
static float iq1_s_split(const float *sx, const float *sw, float max, int *i1_out, int *i2_out, int *shift_out) {
    float best = -FLT_MAX, scale = max;
    int bi1 = -1, bi2 = -1, shift = 0;
    for (int i1 = 0; i1 <= 32; ++i1)
        for (int i2 = i1; i2 <= 32; ++i2)
            for (int s = 0; s < 2; ++s) {
                const float *v = s ? IQ1_MINUS : IQ1_PLUS;
                const float sumqx = (sx[i1] - sx[0]) * v[0] + (sx[i2] - sx[i1]) * v[1] + (sx[32] - sx[i2]) * v[2];
                const float sumq2 = (sw[i1] - sw[0]) * v[0] * v[0] + (sw[i2] - sw[i1]) * v[1] * v[1] +
                                    (sw[32] - sw[i2]) * v[2] * v[2];
                if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                    scale = sumqx / sumq2;
                    best = scale * sumqx;
                    bi1 = i1;
                    bi2 = i2;
                    shift = s ? -1 : 1;
                }
            }
    *i1_out = bi1;
    *i2_out = bi2;
    *shift_out = shift;
    return scale;
}

static void iq1_s_superblock(const float *x, const float *qw, uint8_t *y) {
    const qk_lattice *lat = qk_lattice_get(QK_LAT_IQ1);
    uint8_t *qs = y + 2;
    uint16_t qh[8] = {0};
    float scales[8];
    int shifts[8];
    memset(y, 0, IQ1_S_BYTES);
    float sumx2 = 0;
    for (int i = 0; i < QK_K; ++i) sumx2 += x[i] * x[i];
    const float sigma2 = 2 * sumx2 / QK_K;
    float max_scale = 0;
    for (int ib = 0; ib < 8; ++ib) {
        const float *xb = x + 32 * ib;
        float w[32], sx[33], sw[33];
        uint8_t order[32], tmp[32];
        int8_t L[32];
        uint16_t index[4];
        for (int i = 0; i < 32; ++i) w[i] = qw[32 * ib + i] * sqrtf(sigma2 + xb[i] * xb[i]);
        scales[ib] = 0;
        shifts[ib] = 1;
        const float max = block_max(xb, 32);
        if (max < IQ1_S_EPS) continue;
        for (int j = 0; j < 32; ++j) order[j] = (uint8_t)j;
        iq1_sort(xb, order, tmp, 32);
        sx[0] = sw[0] = 0;
        for (int j = 0; j < 32; ++j) {
            const int i = order[j];
            sx[j + 1] = sx[j] + w[i] * xb[i];
            sw[j + 1] = sw[j] + w[i];
        }
        int i1, i2, shift;
        float scale = iq1_s_split(sx, sw, max, &i1, &i2, &shift);
        if (i1 < 0 || i2 < 0 || shift == 0) continue;
        iq1_levels(order, 32, i1, i2, L);
        if (scale < 0) {
            for (int j = 0; j < 32; ++j) L[j] = (int8_t)(2 - L[j]);
            scale = -scale;
            shift = -shift;
        }
        const float *xx = shift == 1 ? IQ1_PLUS : IQ1_MINUS;
        const float *xxs[4] = {xx, xx, xx, xx};
        scale = iq1_snap(lat, xb, w, 32, L, xxs, scale, index);
        for (int k = 0; k < 4; ++k) {
            qs[4 * ib + k] = (uint8_t)(index[k] & 255);
            qh[ib] = (uint16_t)(qh[ib] | (index[k] >> 8) << 3 * k);
        }
        scales[ib] = scale;
        shifts[ib] = shift;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (max_scale) {
        const float d = max_scale / 15;
        qk_put_f16(y, d * 1.125f);
        const float id = 1 / d;
        for (int ib = 0; ib < 8; ++ib) {
            int l = qk_nearest_int(0.5f * (id * scales[ib] - 1));
            l = QK_MAX(0, QK_MIN(7, l));
            if (shifts[ib] == -1) l |= 8;
            qh[ib] = (uint16_t)(qh[ib] | l << 12);
        }
    }
    for (int ib = 0; ib < 8; ++ib) {
        y[34 + 2 * ib] = (uint8_t)(qh[ib] & 0xff);
        y[35 + 2 * ib] = (uint8_t)(qh[ib] >> 8);
    }
}

void qk_quantize_iq1_s(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_each_superblock(src, dst, nrows, n, qw, IQ1_S_BYTES, iq1_s_superblock);
}

/* the lattice value (level - 1) of coordinate j of grid point p */
static inline float iq1_grid_value(const qk_lattice *lat, int p, int j) { return (float)((lat->grid[8 * p + j] >> 1) - 1); }

void qk_dequantize_iq1_s(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    const qk_lattice *lat = qk_lattice_get(QK_LAT_IQ1);
    for (int64_t i = 0; i < nrows * n / QK_K; ++i) {
        const uint8_t *y = src + i * IQ1_S_BYTES;
        const float d = qk_get_f16(y);
        float *out = dst + i * QK_K;
        for (int ib = 0; ib < 8; ++ib) {
            const int qh = y[34 + 2 * ib] | y[35 + 2 * ib] << 8;
            const float dl = d * (float)(2 * ((qh >> 12) & 7) + 1);
            const float delta = qh & 0x8000 ? -IQ1_DELTA : IQ1_DELTA;
            for (int k = 0; k < 4; ++k) {
                const int p = y[2 + 4 * ib + k] | ((qh >> 3 * k) & 7) << 8;
                for (int j = 0; j < 8; ++j) out[32 * ib + 8 * k + j] = dl * (iq1_grid_value(lat, p, j) + delta);
            }
        }
    }
}
