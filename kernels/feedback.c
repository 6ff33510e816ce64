/* Error-feedback rounding of one block of columns (quant/feedback.py's _round_block, the loop that
 * GPTQ runs column by column): the block's columns are the rows of w [B][N] (one per input
 * column, N output rows each), rounded in order to their grid (value = a c + b, or a table[c]),
 * each column's error divided by u[i][i] and spread over the later columns through row i of the
 * upper Cholesky factor u [B][B] of the inverse Hessian; targets (or NULL) gets each weight as it
 * was when rounded. Every output row n runs on its own (the
 * update of w[j][n] needs only column i's error at n), so the rows are split over threads and
 * taken in tiles that stay in cache; the result does not depend on either. */
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
