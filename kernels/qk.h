/* qconvert block kernels: plain C99 functions over rows; no Python here.
 * Build with -ffp-contract=off and never -ffast-math: the bytes depend on the exact order
 * of float operations (see ../shared/FORMATS.md). */
#ifndef QK_H
#define QK_H
#include <stddef.h>
#include <stdint.h>

#define QK8_0 32
#define Q8_0_BYTES 34

/* float conversions, round-to-nearest-even, NaN kept quiet */
uint16_t qk_f32_to_f16(float f);
float qk_f16_to_f32(uint16_t h);
uint16_t qk_f32_to_bf16(float f);

void qk_f32_to_f16_n(const float *src, uint16_t *dst, int64_t n);
void qk_f32_to_bf16_n(const float *src, uint16_t *dst, int64_t n);
void qk_f16_to_f32_n(const uint16_t *src, float *dst, int64_t n);
void qk_bf16_to_f32_n(const uint16_t *src, float *dst, int64_t n);
/* index of the first NaN/Inf in src[0..n), or -1 */
int64_t qk_first_nonfinite(const float *src, int64_t n);

/* Q8_0: n_per_row % 32 == 0; rows are independent */
void qk_quantize_q8_0(const float *src, uint8_t *dst, int64_t nrows, int64_t n_per_row);
void qk_dequantize_q8_0(const uint8_t *src, float *dst, int64_t nrows, int64_t n_per_row);

/* run fn(ctx, row_begin, row_end) over [0, nrows) split into contiguous ranges, one per
 * thread; the split never changes what a row produces */
typedef void (*qk_rows_fn)(void *ctx, int64_t begin, int64_t end);
int qk_parallel_rows(qk_rows_fn fn, void *ctx, int64_t nrows, int nthreads);

#endif
