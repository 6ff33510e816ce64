/* Error-feedback rounding of one block of columns (quant/feedback.py's _round_block, the loop that
 * GPTQ runs column by column): the block's columns are the rows of w [B][N] (one per input
 * column, N output rows each), rounded in order to their grid (value = a c + b, or a table[c]),
 * each column's error divided by u[i][i] and spread over the later columns through row i of the
 * upper Cholesky factor u [B][B] of the inverse Hessian. Every output row n runs on its own (the
 * update of w[j][n] needs only column i's error at n), so the rows are split over threads and
 * taken in tiles that stay in cache; the result does not depend on either. */
#include "qk.h"

#define FB_TILE 64

typedef struct {
    float *w;
    const float *u, *a, *b, *table;
    uint8_t *codes;
    float *err;
    int64_t B, N;
    int levels;
} fb_ctx;

/* codes index of v among the table's levels: how many midpoints lie below v (torch.bucketize) */
QK_INLINE int fb_level(float v, const float *mids, int n) {
    int c = 0;
    while (c < n && mids[c] < v) c++;
    return c;
}

QK_CLONES static void fb_rows(void *p, int64_t n0, int64_t n1) {
    const fb_ctx *c = (const fb_ctx *)p;
    const int64_t B = c->B, N = c->N;
    float mids[255];
    const int nmids = c->levels - 1;
    if (c->table)
        for (int k = 0; k < nmids; k++) mids[k] = (c->table[k + 1] + c->table[k]) / 2;
    for (int64_t t0 = n0; t0 < n1; t0 += FB_TILE) {
        const int64_t t1 = QK_MIN(t0 + FB_TILE, n1);
        for (int64_t i = 0; i < B; i++) {
            float *wi = c->w + i * N, *ei = c->err + i * N;
            const float *ai = c->a + i * N, *bi = c->b + i * N;
            uint8_t *ci = c->codes + i * N;
            const float d = c->u[i * B + i];
            for (int64_t n = t0; n < t1; n++) {
                const float step = ai[n] == 0 ? 1.0f : ai[n];
                float q;
                int code;
                if (c->table) {
                    code = fb_level(wi[n] / step, mids, nmids);
                    q = c->table[code] * ai[n];
                } else {
                    float x = (wi[n] - bi[n]) / step;
                    x = x < 0 ? 0 : (x > (float)(c->levels - 1) ? (float)(c->levels - 1) : x);
                    code = qk_nearest_int(x);
                    q = (float)code * ai[n] + bi[n];
                }
                ci[n] = (uint8_t)code;
                ei[n] = (wi[n] - q) / d;
            }
            for (int64_t j = i + 1; j < B; j++) {
                const float uij = c->u[i * B + j];
                float *wj = c->w + j * N;
                for (int64_t n = t0; n < t1; n++) wj[n] = wj[n] - uij * ei[n];
            }
        }
    }
}

void qk_feedback_round(float *w, const float *u, const float *a, const float *b, const float *table, int levels,
                       uint8_t *codes, float *err, int64_t B, int64_t N, int threads) {
    fb_ctx c = {w, u, a, b, table, codes, err, B, N, levels};
    qk_parallel_rows(fb_rows, &c, N, threads);
}
