#include <stdlib.h>
#include <string.h>
#include "qk.h"

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float qk_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    if (e == 0x1f) return float_of(sign | 0x7f800000u | (m ? 0x400000u : 0u) | (m << 13));  /* NaN quieted, as F16C */
    if (e == 0) {
        if (m == 0) return float_of(sign);
        int k = 0;                                        /* normalise the subnormal */
        while (!(m & 0x400u)) { m <<= 1; k++; }
        return float_of(sign | ((uint32_t)(113 - k) << 23) | ((m & 0x3ffu) << 13));
    }
    return float_of(sign | ((e + 112u) << 23) | (m << 13));
}

/* as gguf.quants (BF16) and ggml_compute_fp32_to_bf16: NaN -> quiet, else round half even */
uint16_t qk_f32_to_bf16(float f) {
    const uint32_t u = bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64u);
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

/* x86 F16C converts 8 values at once with IEEE round-to-nearest-even: the same bits as the
 * scalar code above (checked by the tests on every float class). Chosen at run time. */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define QK_HAVE_F16C 1
__attribute__((target("avx,f16c")))
static int64_t f32_to_f16_f16c(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(void *)(dst + i), h);
    }
    return i;
}

__attribute__((target("avx,f16c")))
static int64_t f16_to_f32_f16c(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(src + i))));
    return i;
}

static int have_f16c(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
        if (getenv("QCONVERT_NO_SIMD")) cached = 0;
    }
    return cached;
}
#endif

void qk_f32_to_f16_n(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
#ifdef QK_HAVE_F16C
    if (have_f16c()) i = f32_to_f16_f16c(src, dst, n);
#endif
    for (; i < n; i++) dst[i] = qk_f32_to_f16(src[i]);
}

void qk_f32_to_bf16_n(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = qk_f32_to_bf16(src[i]);
}

void qk_f16_to_f32_n(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
#ifdef QK_HAVE_F16C
    if (have_f16c()) i = f16_to_f32_f16c(src, dst, n);
#endif
    for (; i < n; i++) dst[i] = qk_f16_to_f32(src[i]);
}

void qk_bf16_to_f32_n(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = float_of((uint32_t)src[i] << 16);
}

int64_t qk_first_nonfinite(const float *src, int64_t n) {
    const uint32_t *u = (const uint32_t *)(const void *)src;
    for (int64_t i = 0; i < n; i++) {
        if ((u[i] & 0x7f800000u) == 0x7f800000u) return i;
    }
    return -1;
}
