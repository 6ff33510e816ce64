/* qconvert block kernels: plain C99 functions over rows; no Python here.
 * Build with -ffp-contract=off and never -ffast-math: the bytes depend on the exact order
 * of float operations (see ../shared/FORMATS.md). */
#ifndef QK_H
#define QK_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define QK8_0 32
#define Q8_0_BYTES 34
#define QK_K 256
#define QK_LANES 8  /* blocks searched at once, one per SIMD lane */
#define QK_GROUP_MAX_EPS 1e-15f
#define QK_MAX(a, b) ((a) > (b) ? (a) : (b))
#define QK_MIN(a, b) ((a) < (b) ? (a) : (b))

/* round half to even, |x| < 2^22 (ggml nearest_int) */
static inline int qk_nearest_int(float fval) {
    const float val = fval + 12582912.f;
    int i;
    memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

/* Hot kernels are compiled twice, for AVX2 and for the baseline, and picked at load time. The
 * float operations and their order are the same in both (no FMA: -ffp-contract=off). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define QK_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define QK_CLONES
#endif
/* helpers are forced inline so that each clone gets its own copy compiled for its CPU */
#if defined(__GNUC__)
#define QK_INLINE static inline __attribute__((always_inline))
#else
#define QK_INLINE static inline
#endif

/* the 8-lane scale search in AVX2 (lanes_avx2.c), used when the CPU has it and
 * QCONVERT_NO_SIMD is not set; search.h's plain C computes the same bytes otherwise */
int qk_have_avx2(void);
void qk_make_qkx_lanes_avx2(int n, const float X[32][QK_LANES], const float W[32][QK_LANES], int nmax, float rmin,
                            float rdelta, int nstep, int v3, int mad, float *scale_out, float *the_min_out,
                            uint8_t L[32][QK_LANES]);

/* Every block type: quantize rows (qw: per-column importance or NULL), dequantize rows. */
#define QK_DECLARE(T) \
    void qk_quantize_##T(const float *src, uint8_t *dst, int64_t nrows, int64_t n_per_row, const float *qw); \
    void qk_dequantize_##T(const uint8_t *src, float *dst, int64_t nrows, int64_t n_per_row);
QK_DECLARE(q8_0)
QK_DECLARE(mxfp4)
QK_DECLARE(q1_0)
QK_DECLARE(q4_0)
QK_DECLARE(q4_1)
QK_DECLARE(q5_0)
QK_DECLARE(q5_1)
QK_DECLARE(q2_K)
QK_DECLARE(q3_K)
QK_DECLARE(q4_K)
QK_DECLARE(q5_K)
QK_DECLARE(q6_K)
QK_DECLARE(iq4_nl)
QK_DECLARE(iq4_xs)
QK_DECLARE(tq1_0)
QK_DECLARE(tq2_0)
QK_DECLARE(iq3_xxs)
QK_DECLARE(iq3_s)
QK_DECLARE(iq2_xxs)
QK_DECLARE(iq2_xs)
QK_DECLARE(iq2_s)
QK_DECLARE(iq1_s)
QK_DECLARE(iq1_m)

/* quantize rows of super-blocks of 256: fn(x, its importance weights or NULL, its block) for
 * each, blocks of `bytes` bytes in row order */
typedef void (*qk_superblock_fn)(const float *x, const float *qw, uint8_t *y);
static inline void qk_each_superblock(const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw,
                                      int64_t bytes, qk_superblock_fn fn) {
    const int64_t nb = n / QK_K;
    for (int64_t r = 0; r < nrows; ++r)
        for (int64_t i = 0; i < nb; ++i) fn(src + r * n + i * QK_K, qw ? qw + i * QK_K : NULL, dst + (r * nb + i) * bytes);
}

/* float conversions, round-to-nearest-even, NaN kept quiet */
/* Integer-only fp32 -> fp16, round to nearest even; agrees with ggml's
 * GGML_FP32_TO_FP16 and numpy's astype(float16) for every input. */
static inline uint16_t qk_f32_to_f16(float f) {  /* inline: the quantizers store a scale per block */
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((ax >> 13) & 0x3ffu);  /* NaN, as F16C */
    if (ax >= 0x47800000u) return sign | 0x7c00u;         /* >= 65536 (and inf): inf */
    if (ax >= 0x38800000u) {                              /* normal half */
        const uint32_t r = ax - (112u << 23);             /* rebias 127 -> 15 */
        uint32_t q = r >> 13;
        const uint32_t rem = r & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) q++;  /* may carry into inf */
        return (uint16_t)(sign | q);
    }
    if (ax < 0x33000000u) return sign;                    /* < 2^-25: zero (2^-25 ties to 0) */
    {                                                     /* subnormal half */
        const uint32_t e = ax >> 23;
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - e;                  /* 14..24 */
        uint32_t q = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u);
        const uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
}

float qk_f16_to_f32(uint16_t h);
uint16_t qk_f32_to_bf16(float f);

/* a little-endian f16 in a block */
static inline void qk_put_f16(uint8_t *p, float f) {
    const uint16_t h = qk_f32_to_f16(f);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}
static inline float qk_get_f16(const uint8_t *p) { return qk_f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

void qk_f32_to_f16_n(const float *src, uint16_t *dst, int64_t n);
void qk_f32_to_bf16_n(const float *src, uint16_t *dst, int64_t n);
void qk_f16_to_f32_n(const uint16_t *src, float *dst, int64_t n);
void qk_bf16_to_f32_n(const uint16_t *src, float *dst, int64_t n);
/* index of the first NaN/Inf in src[0..n), or -1 */
int64_t qk_first_nonfinite(const float *src, int64_t n);
/* Q4_0, Q4_1, Q5_0, Q5_1 (kind QK_LEGACY_*): rows as qk_quantize_q4_0 etc.; with importance weights qw,
 * ms (or NULL) gives each row's mean square in place of the row's own (legacy.c) */
enum { QK_LEGACY_Q4_0, QK_LEGACY_Q4_1, QK_LEGACY_Q5_0, QK_LEGACY_Q5_1 };
void qk_quantize_legacy(int kind, const float *src, uint8_t *dst, int64_t nrows, int64_t n, const float *qw,
                        const float *ms);
/* error-feedback rounding of one block of columns w [B][N] in place (feedback.c); a table has 16 levels */
void qk_feedback_round(float *w, const float *u, const float *a, const float *b, const float *table, int levels,
                       uint8_t *codes, float *err, float *targets, int64_t B, int64_t N, int threads);


/* run fn(ctx, row_begin, row_end) over [0, nrows) split into contiguous ranges, one per
 * thread; the split never changes what a row produces */
/* bitsandbytes' 4-bit codes (bnb.c): 0 on success, -1 for a block size it does not take */
int qk_bnb4_quantize(const float *x, int64_t n, int64_t block, const float *bounds, const uint8_t *remap,
                     uint8_t *packed, float *absmax, int threads);
int qk_bnb4_dequantize(const uint8_t *codes, const float *absmax, const float *levels, int64_t n, int64_t block,
                       float *out, int threads);

/* quant/feedback.py's search_scale for blocks of 32 with one scale (feedback.c) */
void qk_search_scale(const float *x, int64_t B, const float *w, const float *levels, int nlev, int table,
                     const float *fr, int C, float *d, int threads);

typedef void (*qk_rows_fn)(void *ctx, int64_t begin, int64_t end);
int qk_parallel_rows(qk_rows_fn fn, void *ctx, int64_t nrows, int nthreads);

#endif
