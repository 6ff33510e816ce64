#include <string.h>
#include "qk.h"

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Integer-only fp32 -> fp16, round to nearest even; agrees with ggml's
 * GGML_FP32_TO_FP16 and numpy's astype(float16) for every input. */
uint16_t qk_f32_to_f16(float f) {
    const uint32_t x = bits_of(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;          /* NaN */
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

float qk_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    if (e == 0x1f) return float_of(sign | 0x7f800000u | (m << 13));
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

void qk_f32_to_f16_n(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = qk_f32_to_f16(src[i]);
}

void qk_f32_to_bf16_n(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = qk_f32_to_bf16(src[i]);
}

void qk_f16_to_f32_n(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = qk_f16_to_f32(src[i]);
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
