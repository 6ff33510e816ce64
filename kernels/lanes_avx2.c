/* qk_make_qkx_lanes in AVX2 intrinsics: one __m256 holds the 8 lanes, so every operation is
 * the scalar code's operation on 8 blocks at once, in the same order (sums still run over
 * i = 0..n-1, no FMA): the bytes equal search.h's plain C, which remains the fallback. */
#include <stdlib.h>
#include "qk.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2"))) static inline __m256i nearest_int8(__m256 v) {
    const __m256i bits = _mm256_castps_si256(_mm256_add_ps(v, _mm256_set1_ps(12582912.f)));
    return _mm256_sub_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x00400000));
}

__attribute__((target("avx2"))) static inline __m256i clamp8(__m256i l, __m256i hi) {
    return _mm256_min_epi32(_mm256_max_epi32(l, _mm256_setzero_si256()), hi);
}

__attribute__((target("avx2")))
void qk_make_qkx_lanes_avx2(int n, const float X[32][QK_LANES], const float W[32][QK_LANES], int nmax, float rmin,
                            float rdelta, int nstep, int v3, int mad, float *scale_out, float *the_min_out,
                            uint8_t L[32][QK_LANES]) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), fnmax = _mm256_set1_ps((float)nmax);
    const __m256i inmax = _mm256_set1_epi32(nmax);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mn = _mm256_loadu_ps(X[0]), mx = mn;
    __m256 sum_w = _mm256_loadu_ps(W[0]);
    __m256 sum_x = _mm256_mul_ps(sum_w, mn);
    for (int i = 1; i < n; ++i) {
        const __m256 x = _mm256_loadu_ps(X[i]), w = _mm256_loadu_ps(W[i]);
        mn = _mm256_blendv_ps(mn, x, _mm256_cmp_ps(x, mn, _CMP_LT_OQ));
        mx = _mm256_blendv_ps(mx, x, _mm256_cmp_ps(x, mx, _CMP_GT_OQ));
        sum_w = _mm256_add_ps(sum_w, w);
        sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(w, x));
    }
    mn = _mm256_blendv_ps(mn, zero, _mm256_cmp_ps(mn, zero, _CMP_GT_OQ));
    const __m256 degenerate = v3 ? _mm256_cmp_ps(mx, mn, _CMP_LE_OQ) : _mm256_cmp_ps(mx, mn, _CMP_EQ_OQ);
    __m256 iscale = _mm256_div_ps(fnmax, _mm256_blendv_ps(_mm256_sub_ps(mx, mn), one, degenerate));
    __m256 scale = _mm256_div_ps(one, iscale);
    __m256 best = zero, minv = mn;
    __m256i LI[32], Laux[32];
    for (int i = 0; i < n; ++i) {
        const __m256 x = _mm256_loadu_ps(X[i]);
        const __m256i l = clamp8(nearest_int8(_mm256_mul_ps(iscale, _mm256_sub_ps(x, mn))), inmax);
        LI[i] = l;
        __m256 diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, _mm256_cvtepi32_ps(l)), mn), x);
        diff = mad ? _mm256_andnot_ps(sign, diff) : _mm256_mul_ps(diff, diff);
        best = _mm256_add_ps(best, _mm256_mul_ps(_mm256_loadu_ps(W[i]), diff));
    }
    for (int is = 0; is <= nstep; ++is) {
        const __m256 num = _mm256_set1_ps(rmin + rdelta * (float)is + (float)nmax);
        const __m256 span = _mm256_sub_ps(mx, minv);
        iscale = _mm256_div_ps(num, _mm256_blendv_ps(span, one, _mm256_cmp_ps(span, zero, _CMP_EQ_OQ)));
        __m256 sum_l = zero, sum_l2 = zero, sum_xl = zero;
        for (int i = 0; i < n; ++i) {
            const __m256 x = _mm256_loadu_ps(X[i]), w = _mm256_loadu_ps(W[i]);
            const __m256i l = clamp8(nearest_int8(_mm256_mul_ps(iscale, _mm256_sub_ps(x, minv))), inmax);
            Laux[i] = l;
            const __m256 lf = _mm256_cvtepi32_ps(l), wl = _mm256_mul_ps(w, lf);
            sum_l = _mm256_add_ps(sum_l, wl);
            sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wl, lf));
            sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wl, x));
        }
        const __m256 D = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
        const __m256 valid = _mm256_cmp_ps(D, zero, _CMP_GT_OQ);
        const __m256 Ds = _mm256_blendv_ps(one, D, valid);
        __m256 ts = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l)), Ds);
        __m256 tm = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl)), Ds);
        const __m256 pos = _mm256_cmp_ps(tm, zero, _CMP_GT_OQ);
        tm = _mm256_blendv_ps(tm, zero, pos);
        ts = _mm256_blendv_ps(ts, _mm256_div_ps(sum_xl, sum_l2), pos);
        __m256 err = zero;
        for (int i = 0; i < n; ++i) {
            const __m256 x = _mm256_loadu_ps(X[i]);
            __m256 diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(ts, _mm256_cvtepi32_ps(Laux[i])), tm), x);
            diff = mad ? _mm256_andnot_ps(sign, diff) : _mm256_mul_ps(diff, diff);
            err = _mm256_add_ps(err, _mm256_mul_ps(_mm256_loadu_ps(W[i]), diff));
        }
        const __m256 upd = _mm256_and_ps(valid, _mm256_cmp_ps(err, best, _CMP_LT_OQ));
        if (_mm256_movemask_ps(upd)) {
            best = _mm256_blendv_ps(best, err, upd);
            scale = _mm256_blendv_ps(scale, ts, upd);
            minv = _mm256_blendv_ps(minv, tm, upd);
            const __m256i mask = _mm256_castps_si256(upd);
            for (int i = 0; i < n; ++i) LI[i] = _mm256_blendv_epi8(LI[i], Laux[i], mask);
        }
    }
    const __m256i dmask = _mm256_castps_si256(degenerate);
    for (int i = 0; i < n; ++i) {
        int32_t tmp[8];
        _mm256_storeu_si256((__m256i *)(void *)tmp, _mm256_andnot_si256(dmask, LI[i]));
        for (int b = 0; b < QK_LANES; ++b) L[i][b] = (uint8_t)tmp[b];
    }
    _mm256_storeu_ps(scale_out, _mm256_blendv_ps(scale, zero, degenerate));
    /* -min by flipping the sign bit, as C negation does (0 - x would turn -0 into +0) */
    _mm256_storeu_ps(the_min_out, _mm256_xor_ps(_mm256_blendv_ps(minv, mn, degenerate), _mm256_set1_ps(-0.0f)));
}

int qk_have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && !getenv("QCONVERT_NO_SIMD");
    }
    return cached;
}
#else
int qk_have_avx2(void) { return 0; }
#endif
