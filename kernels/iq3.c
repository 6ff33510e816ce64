/* IQ3_XXS and IQ3_S: super-blocks of 256 = 8 blocks of 32; each block is 8 groups of 4 magnitudes,
 * each group one point of a lattice (kernels/lattice.h: 256 points for IQ3_XXS, 512 for IQ3_S),
 * plus signs and a 4-bit block scale under an f16 super-block scale d.
 * Oracles (ggml/src/ggml-quants.c): quantize_iq3_xxs -> quantize_row_iq3_xxs_impl(256, ...) and
 * quantize_iq3_s -> quantize_row_iq3_s_impl(block_size 32, ...), both searching with
 * iq3_find_best_neighbour; ggml_quantize_chunk calls them with or without importance weights.
 * Dequantization: dequantize_row_iq3_xxs / dequantize_row_iq3_s (equal to gguf.quants').
 *
 * Layouts: IQ3_XXS {f16 d; u8 qs[64]: grid index of each group; u32 scales_and_signs[8]: per
 * block four 7-bit sign masks (bits 0, 7, 14, 21; the 8th sign is the parity) and the 4-bit scale
 * in bits 28..31} (98 bytes), value = d * (0.5 + s) * 0.5 * grid value, grid values 4, 12, ..,
 * 52, 62 (gguf's table: the top level is 62, not 60). IQ3_S {f16 d; u8 qs[64]: low 8 bits of each
 * group's grid index; u8 qh[8]: bit k of qh[b] the 9th bit of block b's group k; u8 signs[32]:
 * 8 signs per 8 weights; u8 scales[4]: block 2j in the low nibble, 2j+1 in the high} (110
 * bytes), value = d * (1 + 2s) * grid value, grid values 1, 3, .., 15.
 *
 * Quirks reproduced:
 * - weights x^2, or qw * sqrtf(sigma2 + x^2) with sigma2 = 2 * sum(x^2) / 256 over the whole
 *   super-block (summed in order); the neighbour search weighs by sqrtf(weight);
 * - the search works on magnitudes; IQ3_XXS keeps an even number of negative signs per 8 by
 *   flipping the sign of the element of least weight*x*x (the first on ties): that element's
 *   magnitude becomes negative;
 * - a block is empty when its largest magnitude (`max > x ? max : x` in order, from element 0)
 *   is under 1e-8 (IQ3_XXS) or is 0 (IQ3_S): scale 0; IQ3_XXS leaves its groups and signs 0,
 *   IQ3_S writes nothing for it AND DOES NOT ADVANCE its qs and signs positions: the next
 *   non-empty block's groups and signs are written where the empty block's would be (its qh bits
 *   stay at the block's own place), and the last positions stay 0;
 * - trial scales id = (15 + is * 0.2f) / max for is in -15..15 (IQ3_XXS) or -9..9 (IQ3_S); each
 *   level l = clamp(nearest_int(0.5f * (id * x - 1)), 0, 7), coordinate 2l + 1; a group off the
 *   grid takes the neighbour (lattice map) of least sum sqrt(w) * (s*q - x)^2 at s = 1/id, the
 *   first on ties; a trial wins when sumqx^2 > best * sumq2 (strictly; scale = sumqx / sumq2,
 *   best = scale * sumqx, starting from best 0 and scale max / 15);
 * - then, when a group of the winner was off the grid (IQ3_S: when no trial ever won, too, since
 *   its groups start off the grid) and scale > 0, the groups are searched again at id = 1/scale
 *   (IQ3_XXS: only those off the grid; IQ3_S: all eight) with the neighbours at `scale`, and the
 *   scale refit by least squares when sumq2 > 0;
 * - a negative scale is made positive with every sign flipped (IQ3_XXS: the 7 stored bits);
 * - d = max_scale / 31 (max_scale by `max > s ? max : s`), stored as f16(d * 1.0125f) (IQ3_XXS)
 *   or f16(d * 1.033f) (IQ3_S); block scale nearest_int(0.5f * (scale / d - 1)) through id = 1/d,
 *   clamped to 0..15; a super-block with max_scale 0 stores d = 0 (IQ3_XXS: everything 0).
 * - where every neighbour's distance is inf or NaN (squares that overflow float: |x| ~ 1e19 and
 *   beyond) ggml aborts (GGML_ASSERT in iq3_find_best_neighbour); here the first neighbour is
 *   taken, as the numpy reference does. Such inputs are beyond the type's range (blocks.py's
 *   `overflow`) and are refused before they get here. */
#include <float.h>
#include <math.h>
#include <string.h>
#include "qk.h"
#include "lattice.h"

#define IQ3_XXS_BYTES 98
#define IQ3_S_BYTES 110

/* gguf's IQ3_XXS.grid_map: the value each level dequantizes to */
static const float XXS_VALUES[8] = {4, 12, 20, 28, 36, 44, 52, 62};

/* a lattice as the search reads it: its points' levels */
typedef struct {
    const int32_t *map;
    const uint16_t *neighbours;
    int8_t level[512][4];
    int xxs;  /* IQ3_XXS's variant of the search, else IQ3_S's */
} iq3_grid;

static void iq3_grid_load(iq3_grid *g, const qk_lattice *lat, int xxs) {
    g->map = lat->map;
    g->neighbours = lat->neighbours;
    g->xxs = xxs;
    for (int j = 0; j < lat->size; ++j)
        for (int i = 0; i < 4; ++i) g->level[j][i] = (int8_t)((lat->grid[4 * j + i] - 1) / 2);
}

/* iq3_find_best_neighbour: the listed grid point of least weighted distance
 * sum_i w_i * (scale * q_i - x_i)^2 at `scale` (q_i = 2l_i + 1), its levels into L; the first on
 * ties; the first listed where none is below FLT_MAX (ggml aborts there).
 * Each term depends on one coordinate's level only, so the 4 x 8 possible terms are computed first
 * (each with ggml's operations) and a neighbour's distance adds its four in ggml's order. ggml's
 * running `if (d2 < best)` scan is replaced, 16 neighbours at a time, by the least of those below
 * FLT_MAX (a minimum does not depend on the order it is taken in once NaN is out) and the first
 * index reaching it: the same choice, without the scan's chain of dependent compares. */
QK_INLINE void iq3_neighbour(const iq3_grid *g, const uint16_t *list, const float *xv, const float *w, float scale,
                             int8_t *L) {
    float term[4][8];
    for (int i = 0; i < 4; ++i)
        for (int l = 0; l < 8; ++l) {
            const float diff = scale * (float)(2 * l + 1) - xv[i];
            term[i][l] = w[i] * diff * diff;
        }
    const int n = list[0];
    float best = FLT_MAX;
    int found = list[1];
    for (int j0 = 0; j0 < n; j0 += 16) {
        const int m = n - j0 < 16 ? n - j0 : 16;
        float d2[16], low = INFINITY;
        for (int j = 0; j < m; ++j) {
            const int8_t *lv = g->level[list[1 + j0 + j]];
            float d = 0;
            for (int i = 0; i < 4; ++i) d += term[i][lv[i]];
            d2[j] = d < FLT_MAX ? d : INFINITY;  /* NaN and FLT_MAX never pass ggml's `d2 < best` */
            low = d2[j] < low ? d2[j] : low;
        }
        if (low < best) {
            int j = 0;
            while (d2[j] != low) ++j;
            best = low;
            found = list[1 + j0 + j];
        }
    }
    memcpy(L, g->level[found], 4);
}

/* the levels of the 4 magnitudes xv at inverse scale id */
QK_INLINE void iq3_levels(const float *xv, float id, int8_t *L) {
    for (int i = 0; i < 4; ++i) {
        const int l = qk_nearest_int(0.5f * (id * xv[i] - 1));
        L[i] = (int8_t)QK_MAX(0, QK_MIN(7, l));
    }
}

QK_INLINE int iq3_index(const int8_t *L) { return L[0] | L[1] << 3 | L[2] << 6 | L[3] << 9; }

/* one block of 32 weights xb with weights w: its scale; its groups' grid indexes and its 4 sign
 * bytes; *empty when ggml skips the block */
QK_CLONES static float iq3_block(const iq3_grid *g, const float *xb, const float *w, uint16_t idx[8], uint8_t signs[4],
                       int *empty) {
    float xval[32], waux[32], wx[32];
    int8_t L[32], Laux[32];
    int on_grid[8], on_grid_aux[8];
    const int ntry = g->xxs ? 15 : 9;
    for (int i = 0; i < 32; ++i) waux[i] = sqrtf(w[i]);
    for (int k = 0; k < 4; ++k) {
        int nflip = 0;
        uint8_t s = 0;
        for (int i = 0; i < 8; ++i) {
            const float v = xb[8 * k + i];
            if (v >= 0) {
                xval[8 * k + i] = v;
            } else {
                xval[8 * k + i] = -v;
                ++nflip;
                s |= (uint8_t)(1 << i);
            }
        }
        if (g->xxs && nflip % 2) {  /* an odd count: the least important element changes sign */
            int imin = 0;
            float min = w[8 * k] * xb[8 * k] * xb[8 * k];
            for (int i = 1; i < 8; ++i) {
                const float ax = w[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                if (ax < min) {
                    min = ax;
                    imin = i;
                }
            }
            xval[8 * k + imin] = -xval[8 * k + imin];
            s ^= (uint8_t)(1 << imin);
        }
        signs[k] = g->xxs ? s & 127 : s;
    }
    float max = xval[0];
    for (int i = 1; i < 32; ++i) max = max > xval[i] ? max : xval[i];
    *empty = g->xxs ? max < 1e-8f : max == 0;
    if (*empty) return 0;
    for (int i = 0; i < 32; ++i) wx[i] = w[i] * xval[i];  /* ggml's w*xval*q is (w*xval)*q: the product is kept */
    memset(L, 0, sizeof L);
    float best = 0, scale = max / 15;
    for (int k = 0; k < 8; ++k) on_grid[k] = g->xxs;
    for (int is = -ntry; is <= ntry; ++is) {
        const float id = (15 + (float)is * 0.2f) / max;
        const float this_scale = 1 / id;
        for (int k = 0; k < 8; ++k) {
            iq3_levels(xval + 4 * k, id, Laux + 4 * k);
            const int32_t m = g->map[iq3_index(Laux + 4 * k)];
            on_grid_aux[k] = m >= 0;
            if (m < 0) iq3_neighbour(g, g->neighbours - m - 1, xval + 4 * k, waux + 4 * k, this_scale, Laux + 4 * k);
        }
        float sumqx = 0, sumq2 = 0;
        for (int i = 0; i < 32; ++i) {
            const float q = (float)(2 * Laux[i] + 1);
            sumqx += wx[i] * q;
            sumq2 += w[i] * q * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, sizeof L);
            memcpy(on_grid, on_grid_aux, sizeof on_grid);
        }
    }
    int off = 0;
    for (int k = 0; k < 8; ++k) off += !on_grid[k];
    if (off > 0 && scale > 0) {
        const float id = 1 / scale;
        for (int k = 0; k < 8; ++k) {
            if (g->xxs && on_grid[k]) continue;
            int8_t l[4];
            iq3_levels(xval + 4 * k, id, l);
            const int32_t m = g->map[iq3_index(l)];
            if (m < 0) iq3_neighbour(g, g->neighbours - m - 1, xval + 4 * k, waux + 4 * k, scale, l);
            memcpy(L + 4 * k, l, 4);
        }
        float sumqx = 0, sumq2 = 0;
        for (int i = 0; i < 32; ++i) {
            const float q = (float)(2 * L[i] + 1);
            sumqx += wx[i] * q;
            sumq2 += w[i] * q * q;
        }
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    if (scale < 0) {  /* ggml: "should never happen"; it can, through the parity flip */
        scale = -scale;
        for (int k = 0; k < 4; ++k) signs[k] = g->xxs ? ~signs[k] & 127 : (uint8_t)~signs[k];
    }
    for (int k = 0; k < 8; ++k) idx[k] = (uint16_t)g->map[iq3_index(L + 4 * k)];  /* always on the grid */
    return scale;
}

/* weights of block b of super-block x: x^2, or qw * sqrtf(sigma2 + x^2) */
static void iq3_weights(const float *xb, const float *qw, float sigma2, float *w) {
    if (qw) {
        for (int i = 0; i < 32; ++i) w[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    } else {
        for (int i = 0; i < 32; ++i) w[i] = xb[i] * xb[i];
    }
}

static float iq3_sigma2(const float *x) {
    float sumx2 = 0;
    for (int i = 0; i < QK_K; ++i) sumx2 += x[i] * x[i];
    return 2 * sumx2 / QK_K;
}

/* the 4-bit block scale of `scale` under id = 1/d */
static int iq3_block_scale(float id, float scale) {
    const int l = qk_nearest_int(0.5f * (id * scale - 1));
    return QK_MAX(0, QK_MIN(15, l));
}

static void iq3_xxs_superblock(const iq3_grid *g, const float *x, const float *qw, uint8_t *y) {
    float w[32], scales[8], max_scale = 0;
    uint32_t sas[8] = {0};
    const float sigma2 = iq3_sigma2(x);
    memset(y, 0, IQ3_XXS_BYTES);
    for (int ib = 0; ib < 8; ++ib) {
        uint16_t idx[8];
        uint8_t signs[4];
        int empty;
        iq3_weights(x + 32 * ib, qw ? qw + 32 * ib : NULL, sigma2, w);
        const float scale = iq3_block(g, x + 32 * ib, w, idx, signs, &empty);
        scales[ib] = scale;
        if (empty) continue;
        for (int k = 0; k < 8; ++k) y[2 + 8 * ib + k] = (uint8_t)idx[k];
        sas[ib] = signs[0] | (uint32_t)signs[1] << 7 | (uint32_t)signs[2] << 14 | (uint32_t)signs[3] << 21;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (max_scale == 0) {
        memset(y, 0, IQ3_XXS_BYTES);
        return;
    }
    const float d = max_scale / 31;
    qk_put_f16(y, d * 1.0125f);
    const float id = 1 / d;
    for (int ib = 0; ib < 8; ++ib) {
        const uint32_t v = sas[ib] | (uint32_t)iq3_block_scale(id, scales[ib]) << 28;
        for (int b = 0; b < 4; ++b) y[66 + 4 * ib + b] = (uint8_t)(v >> 8 * b);
    }
}

static void iq3_s_superblock(const iq3_grid *g, const float *x, const float *qw, uint8_t *y) {
    float w[32], scales[8], max_scale = 0;
    uint8_t *qs = y + 2, *qh = y + 66, *signs = y + 74, *sc = y + 106;
    const float sigma2 = iq3_sigma2(x);
    memset(y, 0, IQ3_S_BYTES);
    int slot = 0;  /* where the next block's qs and signs go: empty blocks do not advance it */
    for (int ib = 0; ib < 8; ++ib) {
        uint16_t idx[8];
        uint8_t bs[4];
        int empty;
        iq3_weights(x + 32 * ib, qw ? qw + 32 * ib : NULL, sigma2, w);
        const float scale = iq3_block(g, x + 32 * ib, w, idx, bs, &empty);
        scales[ib] = scale;
        if (empty) continue;
        for (int k = 0; k < 8; ++k) {
            qs[8 * slot + k] = (uint8_t)(idx[k] & 255);
            qh[ib] |= (uint8_t)((idx[k] >> 8) << k);
        }
        memcpy(signs + 4 * slot, bs, 4);
        ++slot;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (max_scale == 0) return;
    const float d = max_scale / 31;
    qk_put_f16(y, d * 1.033f);
    const float id = 1 / d;
    for (int ib = 0; ib < 8; ib += 2)
        sc[ib / 2] = (uint8_t)(iq3_block_scale(id, scales[ib]) | iq3_block_scale(id, scales[ib + 1]) << 4);
}

static void iq3_quantize(int which, const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    const qk_lattice *lat = qk_lattice_get(which);
    if (!lat) return;  /* the bindings build it first */
    iq3_grid g;
    const int xxs = which == QK_LAT_IQ3_XXS;
    iq3_grid_load(&g, lat, xxs);
    const int64_t nb = n / QK_K, bytes = xxs ? IQ3_XXS_BYTES : IQ3_S_BYTES;
    for (int64_t r = 0; r < nrows; ++r)
        for (int64_t i = 0; i < nb; ++i) {
            const float *x = src + r * n + i * QK_K, *w = qw ? qw + i * QK_K : NULL;
            uint8_t *y = dst + (r * nb + i) * bytes;
            if (xxs)
                iq3_xxs_superblock(&g, x, w, y);
            else
                iq3_s_superblock(&g, x, w, y);
        }
}

void qk_quantize_iq3_xxs(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    iq3_quantize(QK_LAT_IQ3_XXS, src, dst, nrows, n, qw);
}

void qk_quantize_iq3_s(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw) {
    iq3_quantize(QK_LAT_IQ3_S, src, dst, nrows, n, qw);
}

void qk_dequantize_iq3_xxs(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    const qk_lattice *lat = qk_lattice_get(QK_LAT_IQ3_XXS);
    if (!lat) return;
    for (int64_t b = 0; b < nrows * n / QK_K; ++b) {
        const uint8_t *y = src + b * IQ3_XXS_BYTES;
        const float d = qk_get_f16(y);
        float *out = dst + b * QK_K;
        for (int ib = 0; ib < 8; ++ib) {
            const uint8_t *p = y + 66 + 4 * ib;
            const uint32_t v = p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
            const float db = d * (0.5f + (float)(v >> 28)) * 0.5f;
            for (int k = 0; k < 4; ++k) {
                uint8_t s = (uint8_t)((v >> 7 * k) & 127), parity = s;
                parity ^= parity >> 4;
                parity ^= parity >> 2;
                parity ^= parity >> 1;
                s |= (uint8_t)((parity & 1) << 7);  /* the 8th sign makes the count of minus signs even */
                for (int h = 0; h < 2; ++h) {
                    const int8_t *pt = lat->grid + 4 * y[2 + 8 * ib + 2 * k + h];
                    for (int j = 0; j < 4; ++j) {
                        const float sign = s >> (4 * h + j) & 1 ? -1.f : 1.f;
                        *out++ = db * XXS_VALUES[(pt[j] - 1) / 2] * sign;
                    }
                }
            }
        }
    }
}

void qk_dequantize_iq3_s(const uint8_t *src, float *dst, int64_t nrows, int64_t n) {
    const qk_lattice *lat = qk_lattice_get(QK_LAT_IQ3_S);
    if (!lat) return;
    for (int64_t b = 0; b < nrows * n / QK_K; ++b) {
        const uint8_t *y = src + b * IQ3_S_BYTES;
        const float d = qk_get_f16(y);
        float *out = dst + b * QK_K;
        for (int ib = 0; ib < 8; ++ib) {
            const float db = d * (float)(1 + 2 * ((y[106 + ib / 2] >> 4 * (ib % 2)) & 15));
            for (int k = 0; k < 8; ++k) {
                const int gi = y[2 + 8 * ib + k] | ((y[66 + ib] >> k) & 1) << 8;
                const int8_t *pt = lat->grid + 4 * gi;
                const uint8_t s = y[74 + 4 * ib + k / 2];
                for (int j = 0; j < 4; ++j) {
                    const float sign = s >> (4 * (k % 2) + j) & 1 ? -1.f : 1.f;
                    *out++ = db * (float)pt[j] * sign;
                }
            }
        }
    }
}
