/* bitsandbytes' 4-bit (NF4, FP4) blockwise codes, as its CPU backend's default kernel makes them
 * (quant/bnb.py holds the specification, torch, and the tests hold both equal): per block of
 * `block` float32 weights (the last may be shorter) absmax = max |w|; whole blocks scale by the
 * reciprocal, x = clamp(w * (1 / max(absmax, 1e-38)), -1, 1), a short last block divides,
 * x = clamp(w / max(absmax, 1e-38), -1, 1); the code is the number of the 15 sorted midpoints
 * strictly below x (torch.bucketize), mapped through `remap` (FP4's levels are not in code order);
 * two codes a byte, the first in the high nibble; an odd count pads with the code of 0. */
#include <math.h>
#include <string.h>
#include "qk.h"

typedef struct {
    const float *x;
    int64_t n, block;
    const float *bounds;   /* 15 */
    const uint8_t *remap;  /* 16 */
    uint8_t *packed;
    float *absmax;
    const uint8_t *codes;  /* dequantize: packed codes */
    const float *levels;   /* dequantize: 16 */
    float *out;
} bnb4_ctx;

static inline uint8_t code_of(const bnb4_ctx *c, float v) {
    int q = 0;
    for (int i = 0; i < 15; i++) q += c->bounds[i] < v;
    return c->remap[q];
}

static void quantize_blocks(void *p, int64_t b0, int64_t b1) {
    const bnb4_ctx *c = p;
    float scaled[4096];
    for (int64_t b = b0; b < b1; b++) {
        const int64_t lo = b * c->block, hi = lo + c->block < c->n ? lo + c->block : c->n, len = hi - lo;
        const float *w = c->x + lo;
        float m = 0.0f;
        for (int64_t i = 0; i < len; i++) m = fmaxf(m, fabsf(w[i]));
        c->absmax[b] = m;
        const float d = m > 1e-38f ? m : 1e-38f;
        if (len == c->block) {
            const float r = 1.0f / d;
            for (int64_t i = 0; i < len; i++) scaled[i] = fminf(fmaxf(w[i] * r, -1.0f), 1.0f);
        } else {
            for (int64_t i = 0; i < len; i++) scaled[i] = fminf(fmaxf(w[i] / d, -1.0f), 1.0f);
        }
        /* blocks are even-sized (32 ... 4096), so each starts a byte; only the last may end
         * half-way through one, padded with the code of 0 */
        uint8_t *y = c->packed + lo / 2;
        int64_t i = 0;
        for (; i + 1 < len; i += 2) y[i / 2] = (uint8_t)(code_of(c, scaled[i]) << 4 | code_of(c, scaled[i + 1]));
        if (i < len) y[i / 2] = (uint8_t)(code_of(c, scaled[i]) << 4 | code_of(c, 0.0f));
    }
}

static void dequantize_blocks(void *p, int64_t b0, int64_t b1) {
    const bnb4_ctx *c = p;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t lo = b * c->block, hi = lo + c->block < c->n ? lo + c->block : c->n;
        const float a = c->absmax[b];
        for (int64_t i = lo; i < hi; i++) {
            const uint8_t byte = c->codes[i / 2];
            c->out[i] = c->levels[i & 1 ? byte & 15 : byte >> 4] * a;
        }
    }
}

int qk_bnb4_quantize(const float *x, int64_t n, int64_t block, const float *bounds, const uint8_t *remap,
                     uint8_t *packed, float *absmax, int threads) {
    if (block < 2 || block > 4096 || block % 2) return -1;
    bnb4_ctx c = {x, n, block, bounds, remap, packed, absmax, NULL, NULL, NULL};
    return qk_parallel_rows(quantize_blocks, &c, (n + block - 1) / block, threads);
}

int qk_bnb4_dequantize(const uint8_t *codes, const float *absmax, const float *levels, int64_t n, int64_t block,
                       float *out, int threads) {
    if (block < 2 || block % 2) return -1;
    bnb4_ctx c = {NULL, n, block, NULL, NULL, NULL, (float *)absmax, codes, levels, out};
    return qk_parallel_rows(dequantize_blocks, &c, (n + block - 1) / block, threads);
}
