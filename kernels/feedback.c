/* Error-feedback rounding of one block of columns (quant/feedback.py's _round_block, the loop that
 * GPTQ runs column by column): the block's columns are the rows of w [B][N] (one per input
 * column, N output rows each), rounded in order to their grid (value = a c + b, or a table[c]),
 * each column's error divided by u[i][i] and spread over the later columns through row i of the
 * upper Cholesky factor u [B][B] of the inverse Hessian; targets (or NULL) gets each weight as it
 * was when rounded. Every output row n runs on its own (the
 * update of w[j][n] needs only column i's error at n), so the rows are split over threads and
 * taken in tiles that stay in cache; the result does not depend on either. */
#include <math.h>

#include "qk.h"

#define FB_TILE 64
#define FB_TABLE 16  /* levels of a non-uniform grid (IQ4_NL, IQ4_XS) */

typedef struct {
    float *w;
    const float *u, *a, *b, *table;
    uint8_t *codes;
    float *err, *targets;
    int64_t B, N;
    int levels;
} fb_ctx;

/* column i's weights w at rows t0..t1 rounded to their grid: codes, and the errors (w - q) / d */
QK_INLINE void fb_round_uniform(const float *w, const float *a, const float *b, int levels, float d, uint8_t *codes,
                                float *err, int64_t t0, int64_t t1) {
    const float top = (float)(levels - 1);
    for (int64_t n = t0; n < t1; n++) {
        const float step = a[n] == 0 ? 1.0f : a[n];
        float x = (w[n] - b[n]) / step;
        x = x < 0 ? 0 : x;
        x = x > top ? top : x;
        const float c = (x + 12582912.f) - 12582912.f;  /* half to even, as torch.round (0 <= x < 2^22) */
        codes[n] = (uint8_t)(int)c;
        err[n] = (w[n] - (c * a[n] + b[n])) / d;
    }
}

/* the same with levels lv[c]: c counts the midpoints md between levels below w / a
 * (torch.bucketize of the sorted midpoints); lv and md are the caller's local arrays, so the
 * loop stays in vector lanes */
QK_INLINE void fb_round_table(const float *w, const float *a, const float lv[FB_TABLE], const float md[FB_TABLE - 1],
                              float d, uint8_t *codes, float *err, int64_t t0, int64_t t1) {
    for (int64_t n = t0; n < t1; n++) {
        const float step = a[n] == 0 ? 1.0f : a[n];
        const float v = w[n] / step;
        float c = 0, level = lv[0];
        for (int k = 0; k < FB_TABLE - 1; k++) {  /* a select, not lv[c] */
            const int above = md[k] < v;
            c = above ? (float)(k + 1) : c;
            level = above ? lv[k + 1] : level;
        }
        codes[n] = (uint8_t)(int)c;
        err[n] = (w[n] - level * a[n]) / d;
    }
}

QK_CLONES static void fb_rows(void *p, int64_t n0, int64_t n1) {
    const fb_ctx *c = (const fb_ctx *)p;
    const int64_t B = c->B, N = c->N;
    float lv[FB_TABLE], md[FB_TABLE - 1];
    if (c->table) {
        for (int k = 0; k < FB_TABLE; k++) lv[k] = c->table[k];
        for (int k = 0; k < FB_TABLE - 1; k++) md[k] = (lv[k + 1] + lv[k]) / 2;
    }
    for (int64_t t0 = n0; t0 < n1; t0 += FB_TILE) {
        const int64_t t1 = QK_MIN(t0 + FB_TILE, n1);
        for (int64_t i = 0; i < B; i++) {
            float *wi = c->w + i * N, *ei = c->err + i * N;
            const float d = c->u[i * B + i];
            if (c->targets) memcpy(c->targets + i * N + t0, wi + t0, (size_t)(t1 - t0) * sizeof(float));
            if (c->table)
                fb_round_table(wi, c->a + i * N, lv, md, d, c->codes + i * N, ei, t0, t1);
            else
                fb_round_uniform(wi, c->a + i * N, c->b + i * N, c->levels, d, c->codes + i * N, ei, t0, t1);
            for (int64_t j = i + 1; j < B; j++) {
                const float uij = c->u[i * B + j];
                float *wj = c->w + j * N;
                for (int64_t n = t0; n < t1; n++) wj[n] = wj[n] - uij * ei[n];
            }
        }
    }
}

void qk_feedback_round(float *w, const float *u, const float *a, const float *b, const float *table, int levels,
                       uint8_t *codes, float *err, float *targets, int64_t B, int64_t N, int threads) {
    fb_ctx c = {w, u, a, b, table, codes, err, targets, B, N, levels};
    if (B * B * N < (int64_t)1 << 22) threads = 1;  /* starting threads costs more than this work */
    qk_parallel_rows(fb_rows, &c, N, threads);
}

/* The scale search of quant/feedback.py's search_scale for blocks of 32 with one scale (value =
 * d * level): for each block of x [B][32] with importance weights w [32], among its quantizer's
 * d (d[b] on entry) and m / (levels[0] fr[c]) for the C fractions fr (m: the block's first weight
 * of largest magnitude), each rounded to f16 and refitted by weighted least squares for the
 * levels it rounds to, the first with the lowest sum w (x - d l)^2 (NaN counts as infinite);
 * d[b] on return. levels: nlev ascending values; uniform (table 0): the integers from levels[0]. */
typedef struct {
    const float *x, *w, *levels, *fr;
    float *d;
    int nlev, table, C;
} ss_ctx;

/* the weighted error of scale d on block x and the least-squares scale for the levels it rounds
 * to; the sums in 8 lanes, added in a fixed order (so the loop stays in vector lanes) */
QK_INLINE float ss_error(const float *x, const float *w, float d, const float lv[FB_TABLE],
                         const float md[FB_TABLE - 1], float lo, float hi, int table, float *fit) {
    const float step = d == 0 ? 1.0f : d;
    float e8[8] = {0}, n8[8] = {0}, d8[8] = {0};
    for (int i0 = 0; i0 < 32; i0 += 8) {
        for (int j = 0; j < 8; j++) {
            const float xi = x[i0 + j], wi = w[i0 + j], v = xi / step;
            float l;
            if (table) {  /* torch.bucketize over the midpoints: a tie goes to the lower level */
                l = lv[0];
                for (int k = 0; k < FB_TABLE - 1; k++) l = md[k] < v ? lv[k + 1] : l;
            } else {
                float c = v < lo ? lo : v;
                c = c > hi ? hi : c;
                l = (c + 12582912.f) - 12582912.f;  /* half to even, as torch.round (|c| < 2^22) */
            }
            const float r = xi - d * l;
            e8[j] += wi * r * r;
            n8[j] += wi * xi * l;
            d8[j] += wi * l * l;
        }
    }
    float e = 0, num = 0, den = 0;
    for (int j = 0; j < 8; j++) e += e8[j], num += n8[j], den += d8[j];
    if (fit) *fit = den > 0 ? qk_f16_to_f32(qk_f32_to_f16(num / den)) : d;
    return e != e ? INFINITY : e;
}

QK_CLONES static void ss_rows(void *ctx, int64_t begin, int64_t end) {
    const ss_ctx *c = ctx;
    float lv[FB_TABLE] = {0}, md[FB_TABLE - 1] = {0};
    const float lo = c->levels[0], hi = c->levels[c->nlev - 1];
    if (c->table) {  /* FB_TABLE levels (the caller checks) */
        for (int k = 0; k < FB_TABLE; k++) lv[k] = c->levels[k];
        for (int k = 0; k + 1 < FB_TABLE; k++) md[k] = (lv[k] + lv[k + 1]) * 0.5f;
    }
    for (int64_t b = begin; b < end; b++) {
        const float *x = c->x + b * 32;
        int at = 0;
        for (int i = 1; i < 32; i++) at = fabsf(x[i]) > fabsf(x[at]) ? i : at;
        float best = c->d[b], best_e = INFINITY;
        for (int k = 0; k <= c->C; k++) {
            float d = k == 0 ? c->d[b] : qk_f16_to_f32(qk_f32_to_f16(x[at] / (c->levels[0] * c->fr[k - 1])));
            float fit, e, e2;
            if (c->table) {  /* each a loop of its own, in vector lanes */
                e = ss_error(x, c->w, d, lv, md, lo, hi, 1, &fit);
                e2 = ss_error(x, c->w, fit, lv, md, lo, hi, 1, NULL);
            } else {
                e = ss_error(x, c->w, d, lv, md, lo, hi, 0, &fit);
                e2 = ss_error(x, c->w, fit, lv, md, lo, hi, 0, NULL);
            }
            if (e2 < e) d = fit, e = e2;
            if (e < best_e) best = d, best_e = e;
        }
        c->d[b] = best;
    }
}

void qk_search_scale(const float *x, int64_t B, const float *w, const float *levels, int nlev, int table,
                     const float *fr, int C, float *d, int threads) {
    ss_ctx c = {x, w, levels, fr, d, nlev, table, C};
    if (B < 512) threads = 1;  /* 2 us a block: starting threads costs more below */
    qk_parallel_rows(ss_rows, &c, B, threads);
}
