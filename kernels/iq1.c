/* IQ1_S and IQ1_M, the 1.5- and 1.75-bit lattice i-quants; they share the sort, the neighbour
 * search and the scale refit below (IQ1_M's layout and its own quirks at iq1_m_superblock).
 * IQ1_S: super-blocks of 256 = 8 blocks of 32, block_iq1_s {f16 d; u8 qs[32]; u16 qh[8]} (50
 * bytes). Each group of 8 weights is a point of the 2048-point lattice QK_LAT_IQ1 (levels l in
 * 0..2 per coordinate), index low 8 bits in qs, high 3 bits in qh[block] bits 3k..3k+2; value =
 * d * (2s+1) * (l - 1 + delta), s = qh bits 12..14, delta = -1/8 when qh bit 15 is set, else +1/8.
 * Oracle: ggml quantize_iq1_s -> quantize_row_iq1_s_impl (ggml/src/ggml-quants.c), which needs
 * importance weights (ggml_quantize_requires_imatrix: it asserts without them, and Blocks.quantize
 * refuses; called with none, this kernel weighs by x^2 as IQ1_M does, with no ggml bytes to equal).
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
#define IQ1_M_EPS 1e-7f
#define IQ1_M_BYTES 56
#define IQ1_CHUNK 8  /* candidates scored side by side (see iq1_s_split, iq1_nearest) */

/* the values of levels 0, 1, 2 with the shift +delta and -delta */
static const float IQ1_PLUS[3] = {-1 + IQ1_DELTA, IQ1_DELTA, 1 + IQ1_DELTA};
static const float IQ1_MINUS[3] = {-1 - IQ1_DELTA, -IQ1_DELTA, 1 - IQ1_DELTA};

/* glibc's qsort as ggml's iq1_sort_helper drives it: a top-down merge sort (left half n/2) that
 * takes the right element only when the left one compares greater */
static void iq1_merge_sort(const float *x, uint8_t *o, uint8_t *tmp, int n) {
    if (n <= 1) return;
    const int n1 = n / 2;
    iq1_merge_sort(x, o, tmp, n1);
    iq1_merge_sort(x, o + n1, tmp, n - n1);
    int a = 0, b = n1, k = 0;
    while (a < n1 && b < n) tmp[k++] = x[o[a]] > x[o[b]] ? o[b++] : o[a++];
    while (a < n1) tmp[k++] = o[a++];
    memcpy(o, tmp, (size_t)k);
}

/* order[] = indexes of x[0..n) sorted as ggml's qsort sorts them. Without NaN the comparisons are
 * a total preorder and the merge sort is stable, so value i lands after every smaller value and
 * every equal one (-0 equals +0) of lower index: its rank is counted directly, which vectorizes. */
QK_INLINE void iq1_sort(const float *x, int n, uint8_t *order) {
    int nan = 0;
    for (int i = 0; i < n; ++i) nan |= x[i] != x[i];
    if (nan) {
        uint8_t tmp[32];
        for (int j = 0; j < n; ++j) order[j] = (uint8_t)j;
        iq1_merge_sort(x, order, tmp, n);
        return;
    }
    for (int i = 0; i < n; ++i) {
        int r = 0;
        for (int j = 0; j < n; ++j) r += (x[j] < x[i]) | ((x[j] == x[i]) & (j < i));
        order[r] = (uint8_t)i;
    }
}

/* iq1_find_best_neighbour2: the neighbour of an off-grid group nearest to x in
 * sum w * (scale * xx[l] - x)^2, summed over the 8 coordinates in order, the first on ties. The
 * terms come from a table of the 3 levels per coordinate (the same floats as computing them per
 * point), and IQ1_CHUNK neighbours are summed side by side, each in coordinate order. */
static int iq1_nearest(const qk_lattice *lat, const uint16_t *nb, const float *x, const float *w, float scale,
                       const float *xx) {
    float t[8][3];
    for (int i = 0; i < 8; ++i)
        for (int l = 0; l < 3; ++l) {
            const float diff = scale * xx[l] - x[i];
            t[i][l] = w[i] * diff * diff;
        }
    const int count = nb[0];
    float best = FLT_MAX;
    int found = -1;
    for (int j0 = 0; j0 < count; j0 += IQ1_CHUNK) {
        const int m = QK_MIN(IQ1_CHUNK, count - j0);
        const int8_t *g[IQ1_CHUNK];
        float d2[IQ1_CHUNK];
        for (int c = 0; c < IQ1_CHUNK; ++c) {
            g[c] = lat->grid + 8 * nb[1 + j0 + (c < m ? c : 0)];
            d2[c] = 0;
        }
        for (int i = 0; i < 8; ++i)
            for (int c = 0; c < IQ1_CHUNK; ++c) d2[c] += t[i][g[c][i] >> 1];
        for (int c = 0; c < m; ++c)
            if (d2[c] < best) {
                best = d2[c];
                found = nb[1 + j0 + c];
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

/* levels of a block of n from its sorted order and best split: 0 below i1, 1 below i2, else 2;
 * a negative scale mirrors them (2 - l) and is negated. Returns whether it was. */
static int iq1_levels(const uint8_t *order, int n, int i1, int i2, float *scale, int8_t *L) {
    for (int j = 0; j < n; ++j) L[order[j]] = (int8_t)(j < i1 ? 0 : j < i2 ? 1 : 2);
    if (*scale >= 0) return 0;
    for (int j = 0; j < n; ++j) L[j] = (int8_t)(2 - L[j]);
    *scale = -*scale;
    return 1;
}

/* the super-block's weights: qw * sqrtf(sigma2 + x^2), sigma2 = 2 * sum(x^2) / 256 summed in
 * order, or x^2 without qw (IQ1_M only) */
QK_INLINE void iq1_weights(const float *x, const float *qw, float *w) {
    float sumx2 = 0;
    for (int i = 0; i < QK_K; ++i) sumx2 += x[i] * x[i];
    const float sigma2 = 2 * sumx2 / QK_K;
    for (int i = 0; i < QK_K; ++i) w[i] = qw ? qw[i] * sqrtf(sigma2 + x[i] * x[i]) : x[i] * x[i];
}

/* a block scale's 3 bits against the super-block's 1/d */
static inline int iq1_scale_bits(float id, float scale) {
    const int l = qk_nearest_int(0.5f * (id * scale - 1));
    return QK_MAX(0, QK_MIN(7, l));
}

static float iq1_block_max(const float *x, int n) {
    float max = fabsf(x[0]);
    for (int i = 1; i < n; ++i) {
        const float a = fabsf(x[i]);
        max = max > a ? max : a;
    }
    return max;
}

/* A split's candidates are scored in chunks of IQ1_CHUNK values of i2 at once, every chunk's
 * floats computed exactly as the sequential loop computes them (the same operations, in the same
 * association). A chunk none of whose candidates passes `sumq2 > 0 && sumqx^2 > best * sumq2`
 * against the best it starts with leaves the best as it was, so a chunk is walked in order only
 * from its first passing candidate, re-testing each against the best as it changes. */

/* quantize_row_iq1_s_impl's split search over a block of 32 in sorted order, prefix sums sx
 * (weighted values) and sw (weights), padded to 33 + IQ1_CHUNK entries: for each (i1, i2), sign +
 * then -, sumqx = ((sx[i1] - sx[0])*v0 + (sx[i2] - sx[i1])*v1) + (sx[32] - sx[i2])*v2 and
 * sumq2 = ((sw[i1] - sw[0])*v0*v0 + (sw[i2] - sw[i1])*v1*v1) + (sw[32] - sw[i2])*v2*v2. The best
 * (i1, i2) and shift (+1 or -1, 0 when none), and its scale (max when none). */
QK_INLINE float iq1_s_split(const float *sx, const float *sw, float max, int *i1_out, int *i2_out, int *shift_out) {
    enum { N = 32, PAD = N + 1 + IQ1_CHUNK };
    const float *v[2] = {IQ1_PLUS, IQ1_MINUS};
    float cx[2][PAD], c2[2][PAD];  /* the terms of i2 alone */
    for (int s = 0; s < 2; ++s)
        for (int i2 = 0; i2 < PAD; ++i2) {
            cx[s][i2] = (sx[N] - sx[i2]) * v[s][2];
            c2[s][i2] = (sw[N] - sw[i2]) * v[s][2] * v[s][2];
        }
    float best = -FLT_MAX, scale = max;
    int bi1 = -1, bi2 = -1, shift = 0;
    for (int i1 = 0; i1 <= N; ++i1) {
        float ax[2], a2[2];  /* the terms of i1 alone */
        for (int s = 0; s < 2; ++s) {
            ax[s] = (sx[i1] - sx[0]) * v[s][0];
            a2[s] = (sw[i1] - sw[0]) * v[s][0] * v[s][0];
        }
        for (int c = i1; c <= N; c += IQ1_CHUNK) {
            float qx[2][IQ1_CHUNK], q2[2][IQ1_CHUNK];
            int pass[IQ1_CHUNK];
            for (int t = 0; t < IQ1_CHUNK; ++t) {
                const int i2 = c + t;
                const float dx = sx[i2] - sx[i1], dw = sw[i2] - sw[i1];
                pass[t] = 0;
                for (int s = 0; s < 2; ++s) {
                    qx[s][t] = ax[s] + dx * v[s][1] + cx[s][i2];
                    q2[s][t] = a2[s] + dw * v[s][1] * v[s][1] + c2[s][i2];
                    pass[t] |= (i2 <= N) & (q2[s][t] > 0) & (qx[s][t] * qx[s][t] > best * q2[s][t]);
                }
            }
            int first = 0;
            while (first < IQ1_CHUNK && !pass[first]) ++first;
            for (int t = first; t < IQ1_CHUNK && c + t <= N; ++t)
                for (int s = 0; s < 2; ++s)
                    if (q2[s][t] > 0 && qx[s][t] * qx[s][t] > best * q2[s][t]) {
                        scale = qx[s][t] / q2[s][t];
                        best = scale * qx[s][t];
                        bi1 = i1;
                        bi2 = c + t;
                        shift = s ? -1 : 1;
                    }
        }
    }
    *i1_out = bi1;
    *i2_out = bi2;
    *shift_out = shift;
    return scale;
}

QK_CLONES static void iq1_s_superblock(const float *x, const float *qw, uint8_t *y) {
    const qk_lattice *lat = qk_lattice_get(QK_LAT_IQ1);
    uint8_t *qs = y + 2;
    uint16_t qh[8] = {0};
    float weights[QK_K], scales[8];
    int shifts[8];
    memset(y, 0, IQ1_S_BYTES);
    iq1_weights(x, qw, weights);
    float max_scale = 0;
    for (int ib = 0; ib < 8; ++ib) {
        const float *xb = x + 32 * ib, *w = weights + 32 * ib;
        float sx[33 + IQ1_CHUNK], sw[33 + IQ1_CHUNK];
        uint8_t order[32];
        int8_t L[32];
        uint16_t index[4];
        scales[ib] = 0;
        shifts[ib] = 1;
        const float max = iq1_block_max(xb, 32);
        if (max < IQ1_S_EPS) continue;
        iq1_sort(xb, 32, order);
        sx[0] = sw[0] = 0;
        for (int j = 0; j < 32; ++j) {
            const int i = order[j];
            sx[j + 1] = sx[j] + w[i] * xb[i];
            sw[j + 1] = sw[j] + w[i];
        }
        for (int j = 33; j < 33 + IQ1_CHUNK; ++j) sx[j] = sw[j] = 0;  /* padding, never chosen */
        int i1, i2, shift;
        float scale = iq1_s_split(sx, sw, max, &i1, &i2, &shift);
        if (i1 < 0 || i2 < 0 || shift == 0) continue;
        if (iq1_levels(order, 32, i1, i2, &scale, L)) shift = -shift;
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
        for (int ib = 0; ib < 8; ++ib)
            qh[ib] = (uint16_t)(qh[ib] | (iq1_scale_bits(id, scales[ib]) | (shifts[ib] == -1 ? 8 : 0)) << 12);
    }
    for (int ib = 0; ib < 8; ++ib) {
        y[34 + 2 * ib] = (uint8_t)(qh[ib] & 0xff);
        y[35 + 2 * ib] = (uint8_t)(qh[ib] >> 8);
    }
}

void qk_quantize_iq1_s(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_each_superblock(src, dst, nrows, n, qw, IQ1_S_BYTES, iq1_s_superblock);
}

/* quantize_row_iq1_m_impl's split search over a block of 16 in sorted order `order`, weighted
 * values wx and weights w: prefix sums per half of the block (the other half's entry copied); for
 * each split, per half h and sign v, qx = px[h][16]*v2 - (px[h][i1] + px[h][i2]) and
 * q2 = (pw[h][16]*v2*v2 + pw[h][i1]*c1) + pw[h][i2]*c2 (c1 = v0^2 - v1^2, c2 = v1^2 - v2^2), and
 * the four sign pairs k = (first half, second half): 0 ++, 1 +-, 2 -+, 3 -- as sums of the halves.
 * The best (i1, i2, k) (i1 = -1 when none) and its scale (max when none). */
QK_INLINE float iq1_m_split(const uint8_t *order, const float *wx, const float *w, float max, int *i1_out,
                            int *i2_out, int *k_out) {
    enum { N = 16, PAD = N + 1 + IQ1_CHUNK };
    float px[2][PAD], pw[2][PAD];
    px[0][0] = px[1][0] = pw[0][0] = pw[1][0] = 0;
    for (int j = 0; j < N; ++j) {
        const int i = order[j], h = i < N / 2 ? 0 : 1;
        px[h][j + 1] = px[h][j] + wx[i];
        px[1 - h][j + 1] = px[1 - h][j];
        pw[h][j + 1] = pw[h][j] + w[i];
        pw[1 - h][j + 1] = pw[1 - h][j];
    }
    for (int h = 0; h < 2; ++h)
        for (int j = N + 1; j < PAD; ++j) px[h][j] = pw[h][j] = 0;  /* padding, never chosen */
    const float *v[2] = {IQ1_PLUS, IQ1_MINUS};
    float c1[2], c2[2], tx[2][2], t2[2][2];  /* [sign], [sign][half] */
    for (int s = 0; s < 2; ++s) {
        c1[s] = v[s][0] * v[s][0] - v[s][1] * v[s][1];
        c2[s] = v[s][1] * v[s][1] - v[s][2] * v[s][2];
        for (int h = 0; h < 2; ++h) {
            tx[s][h] = px[h][N] * v[s][2];
            t2[s][h] = pw[h][N] * v[s][2] * v[s][2];
        }
    }
    static const int PAIR[4][2] = {{0, 0}, {0, 1}, {1, 0}, {1, 1}};  /* k -> sign of each half */
    float best = -FLT_MAX, scale = max;
    int bi1 = -1, bi2 = -1, bk = -1;
    for (int i1 = 0; i1 <= N; ++i1) {
        float a2[2][2];
        for (int s = 0; s < 2; ++s)
            for (int h = 0; h < 2; ++h) a2[s][h] = t2[s][h] + pw[h][i1] * c1[s];
        for (int c = i1; c <= N; c += IQ1_CHUNK) {
            float qx[4][IQ1_CHUNK], q2[4][IQ1_CHUNK];
            int pass[IQ1_CHUNK];
            for (int t = 0; t < IQ1_CHUNK; ++t) {
                const int i2 = c + t;
                float hx[2][2], h2[2][2];  /* [sign][half] */
                for (int h = 0; h < 2; ++h) {
                    const float sxh = px[h][i1] + px[h][i2];
                    for (int s = 0; s < 2; ++s) {
                        hx[s][h] = tx[s][h] - sxh;
                        h2[s][h] = a2[s][h] + pw[h][i2] * c2[s];
                    }
                }
                pass[t] = 0;
                for (int k = 0; k < 4; ++k) {
                    qx[k][t] = hx[PAIR[k][0]][0] + hx[PAIR[k][1]][1];
                    q2[k][t] = h2[PAIR[k][0]][0] + h2[PAIR[k][1]][1];
                    pass[t] |= (i2 <= N) & (q2[k][t] > 0) & (qx[k][t] * qx[k][t] > best * q2[k][t]);
                }
            }
            int first = 0;
            while (first < IQ1_CHUNK && !pass[first]) ++first;
            for (int t = first; t < IQ1_CHUNK && c + t <= N; ++t)
                for (int k = 0; k < 4; ++k)
                    if (q2[k][t] > 0 && qx[k][t] * qx[k][t] > best * q2[k][t]) {
                        scale = qx[k][t] / q2[k][t];
                        best = scale * qx[k][t];
                        bi1 = i1;
                        bi2 = c + t;
                        bk = k;
                    }
        }
    }
    *i1_out = bi1;
    *i2_out = bi2;
    *k_out = bk;
    return scale;
}

/* IQ1_M: super-blocks of 256 = 16 blocks of 16, block_iq1_m {u8 qs[32]; u8 qh[16]; u16 sc[4]}
 * (56 bytes). Group k (0, 1) of block b: index qs[2b+k] | ((qh[b] >> 4k) & 7) << 8, delta
 * negative when qh[b] bit 4k+3 is set; block scale d * (2s+1), s 3 bits at sc[b/4] bits 3(b%4);
 * the f16 d is spread over the top nibbles of sc[0..3], its lowest bits in sc[0]. Oracle: ggml
 * quantize_iq1_m -> quantize_row_iq1_m_impl, with importance weights or without (weights x^2:
 * ggml's assert on them is commented out). Quirks beyond IQ1_S's: blocks under 1e-7 are zero
 * blocks; each half of a block takes its own sign (see iq1_m_split); a mirrored block's sign pair
 * becomes 3 - k; the block scales are rounded as IQ1_S's against d = max_scale / 15, then d is
 * refit by least squares over the whole super-block with the final values xx[l] * (2s+1) (zero
 * blocks included, at grid point 0 with sign +) and stored as f16(d * 1.1125f); when every block's
 * scale is 0 only the indexes are written. */
QK_CLONES static void iq1_m_superblock(const float *x, const float *qw, uint8_t *y) {
    static const uint8_t SIGN_BITS[4] = {0x00, 0x80, 0x08, 0x88};
    const qk_lattice *lat = qk_lattice_get(QK_LAT_IQ1);
    uint8_t *qs = y, *qh = y + 32;
    uint16_t sc[4] = {0, 0, 0, 0};
    float w[QK_K], scales[16];
    int signs[16];
    uint16_t index[16][2];
    memset(y, 0, IQ1_M_BYTES);
    memset(index, 0, sizeof index);
    iq1_weights(x, qw, w);
    float max_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float *xb = x + 16 * ib, *wb = w + 16 * ib;
        float wx[16];
        uint8_t order[16];
        int8_t L[16];
        scales[ib] = 0;
        signs[ib] = 0;
        const float max = iq1_block_max(xb, 16);
        if (max < IQ1_M_EPS) continue;
        for (int j = 0; j < 16; ++j) wx[j] = wb[j] * xb[j];
        iq1_sort(xb, 16, order);
        int i1, i2, k;
        float scale = iq1_m_split(order, wx, wb, max, &i1, &i2, &k);
        if (i1 < 0 || i2 < 0 || k < 0) continue;
        if (iq1_levels(order, 16, i1, i2, &scale, L)) k = 3 - k;  /* both halves' signs flipped */
        const float *xx[2] = {k < 2 ? IQ1_PLUS : IQ1_MINUS, k % 2 == 0 ? IQ1_PLUS : IQ1_MINUS};
        scale = iq1_snap(lat, xb, wb, 16, L, xx, scale, index[ib]);
        qs[2 * ib] = (uint8_t)(index[ib][0] & 255);
        qs[2 * ib + 1] = (uint8_t)(index[ib][1] & 255);
        qh[ib] = (uint8_t)(index[ib][0] >> 8 | (index[ib][1] >> 8) << 4);
        scales[ib] = scale;
        signs[ib] = k;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (!max_scale) return;
    float d = max_scale / 15;
    const float id = 1 / d;
    float sumqx = 0, sumq2 = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const int l = iq1_scale_bits(id, scales[ib]);
        sc[ib / 4] = (uint16_t)(sc[ib / 4] | l << 3 * (ib % 4));
        qh[ib] |= SIGN_BITS[signs[ib]];
        const float *xx[2] = {signs[ib] < 2 ? IQ1_PLUS : IQ1_MINUS, signs[ib] % 2 == 0 ? IQ1_PLUS : IQ1_MINUS};
        for (int k = 0; k < 2; ++k) {
            const int8_t *g = lat->grid + 8 * index[ib][k];
            for (int j = 0; j < 8; ++j) {
                const int i = 16 * ib + 8 * k + j;
                const float q = xx[k][g[j] >> 1] * (float)(2 * l + 1);
                sumqx += w[i] * q * x[i];
                sumq2 += w[i] * q * q;
            }
        }
    }
    if (sumq2 > 0) d = sumqx / sumq2;
    const uint16_t s = qk_f32_to_f16(d * 1.1125f);
    sc[0] = (uint16_t)(sc[0] | (s & 0x000f) << 12);
    sc[1] = (uint16_t)(sc[1] | (s & 0x00f0) << 8);
    sc[2] = (uint16_t)(sc[2] | (s & 0x0f00) << 4);
    sc[3] = (uint16_t)(sc[3] | (s & 0xf000));
    for (int j = 0; j < 4; ++j) {
        y[48 + 2 * j] = (uint8_t)(sc[j] & 0xff);
        y[49 + 2 * j] = (uint8_t)(sc[j] >> 8);
    }
}

void qk_quantize_iq1_m(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    qk_each_superblock(src, dst, nrows, n, qw, IQ1_M_BYTES, iq1_m_superblock);
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

void qk_dequantize_iq1_m(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    const qk_lattice *lat = qk_lattice_get(QK_LAT_IQ1);
    for (int64_t i = 0; i < nrows * n / QK_K; ++i) {
        const uint8_t *y = src + i * IQ1_M_BYTES;
        uint16_t sc[4];
        for (int j = 0; j < 4; ++j) sc[j] = (uint16_t)(y[48 + 2 * j] | y[49 + 2 * j] << 8);
        const float d = qk_f16_to_f32((uint16_t)(sc[0] >> 12 | (sc[1] >> 8 & 0x00f0) | (sc[2] >> 4 & 0x0f00) |
                                                 (sc[3] & 0xf000)));
        float *out = dst + i * QK_K;
        for (int ib = 0; ib < 16; ++ib) {
            const float dl = d * (float)(2 * ((sc[ib / 4] >> 3 * (ib % 4)) & 7) + 1);
            const int qh = y[32 + ib];
            for (int k = 0; k < 2; ++k) {
                const int p = y[2 * ib + k] | ((qh >> 4 * k) & 7) << 8;
                const float delta = qh & (0x08 << 4 * k) ? -IQ1_DELTA : IQ1_DELTA;
                for (int j = 0; j < 8; ++j) out[16 * ib + 8 * k + j] = dl * (iq1_grid_value(lat, p, j) + delta);
            }
        }
    }
}
