/* Header-only so every kernel (and each of its CPU-specific clones) inlines them.
 * The scale searches shared by the block quantizers. Each reproduces the ggml function of the
 * same name in ggml/src/ggml-quants.c operation for operation: sums accumulate left to right in
 * float, products keep ggml's association ((w*x)*l, not w*(x*l)), ints convert to float where
 * ggml's do, and nearest_int rounds half to even through the 1.5*2^23 trick. */
#ifndef QK_SEARCH_H
#define QK_SEARCH_H
#include <math.h>
#include <string.h>
#include "qk.h"

/* ggml's `if (ax > amax) { amax = ax; max = x[i]; }` scan: max |x| into *amax_out, and the
 * signed value it came from (the first on ties; 0 when nothing is above 0) */
QK_INLINE float qk_signed_absmax(int n, const float *x, float *amax_out) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    *amax_out = amax;
    return max;
}

/* the same scan for QK_LANES blocks of n at once, block b in lane b of X[i][b] */
/* nearest_int as a pure bit operation, which vectorizes */
QK_INLINE int32_t qk_lane_int(float f) {
    union { float f; int32_t i; } u;
    u.f = f + 12582912.f;
    return (u.i & 0x007fffff) - 0x00400000;
}

QK_INLINE void qk_signed_absmax_lanes(int n, const float X[][QK_LANES], float amax[QK_LANES], float mx[QK_LANES]) {
    for (int b = 0; b < QK_LANES; ++b) amax[b] = mx[b] = 0;
    for (int i = 0; i < n; ++i)
        for (int b = 0; b < QK_LANES; ++b) {
            const float ax = fabsf(X[i][b]);
            const int take = ax > amax[b];
            amax[b] = take ? ax : amax[b];
            mx[b] = take ? X[i][b] : mx[b];
        }
}

/* QK_LANES floats or ints as one value (GCC/clang vector extensions): element-wise operations are
 * the scalar operations, lane by lane, so the bytes stay those of the scalar code. */
typedef float qk_vf __attribute__((vector_size(4 * QK_LANES)));
typedef int32_t qk_vi __attribute__((vector_size(4 * QK_LANES)));

QK_INLINE qk_vf qk_vf_load(const float *p) { qk_vf v; memcpy(&v, p, sizeof v); return v; }
QK_INLINE qk_vi qk_vi_pick(qk_vi mask, qk_vi a, qk_vi b) { return (a & mask) | (b & ~mask); }
QK_INLINE qk_vf qk_vf_pick(qk_vi mask, qk_vf a, qk_vf b) { return (qk_vf)qk_vi_pick(mask, (qk_vi)a, (qk_vi)b); }
/* nearest_int lane by lane (|x| < 2^22), clamped to [lo, hi] */
QK_INLINE qk_vi qk_vi_round_clamp(qk_vf f, int32_t lo, int32_t hi) {
    qk_vi l = ((qk_vi)(f + 12582912.f) & 0x007fffff) - 0x00400000;
    const qk_vi vlo = (qk_vi){0} + lo, vhi = (qk_vi){0} + hi;
    l = qk_vi_pick(l > vhi, vhi, l);
    return qk_vi_pick(l < vlo, vlo, l);
}

/* qk_make_qx_quants(n, nmax, x, L, 1, w) for QK_LANES blocks of n <= 32 at once (block b in
 * lane b; weights given): the same float operations in the same order per lane, so the same
 * scales and levels. */
QK_INLINE void qk_make_qx_lanes(int n, const float X[][QK_LANES], const float W[][QK_LANES], int nmax,
                                float scale_out[QK_LANES], int8_t L[][QK_LANES]) {
    float amax_a[QK_LANES], mx_a[QK_LANES];
    qk_signed_absmax_lanes(n, X, amax_a, mx_a);
    const qk_vi zero_block = qk_vf_load(amax_a) < QK_GROUP_MAX_EPS;
    const qk_vf mx = qk_vf_pick(zero_block, (qk_vf){0} + 1.0f, qk_vf_load(mx_a));  /* results discarded below */
    qk_vf xs[32], ws[32];
    qk_vi LI[32];
    for (int i = 0; i < n; ++i) {
        xs[i] = qk_vf_load(X[i]);
        ws[i] = qk_vf_load(W[i]);
    }
    qk_vf its = (float)(-nmax) / mx, sumlx = {0}, suml2 = {0};
    for (int i = 0; i < n; ++i) {
        const qk_vi l = qk_vi_round_clamp(its * xs[i], -nmax, nmax - 1);
        const qk_vf lf = __builtin_convertvector(l, qk_vf);
        LI[i] = l + nmax;
        sumlx += ws[i] * xs[i] * lf;
        suml2 += ws[i] * lf * lf;
    }
    qk_vf scale = qk_vf_pick(suml2 != 0, sumlx / suml2, (qk_vf){0});
    qk_vf best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        its = -((float)nmax + 0.1f * (float)is) / mx;
        sumlx = suml2 = (qk_vf){0};
        for (int i = 0; i < n; ++i) {
            const qk_vf lf = __builtin_convertvector(qk_vi_round_clamp(its * xs[i], -nmax, nmax - 1), qk_vf);
            sumlx += ws[i] * xs[i] * lf;
            suml2 += ws[i] * lf * lf;
        }
        const qk_vi take = (suml2 > 0) & (sumlx * sumlx > best * suml2);
        int any = 0;
        for (int b = 0; b < QK_LANES; ++b) any |= take[b];
        if (!any) continue;
        scale = qk_vf_pick(take, sumlx / suml2, scale);
        best = qk_vf_pick(take, scale * sumlx, best);
        for (int i = 0; i < n; ++i)
            LI[i] = qk_vi_pick(take, qk_vi_round_clamp(its * xs[i], -nmax, nmax - 1) + nmax, LI[i]);
    }
    scale = qk_vf_pick(zero_block, (qk_vf){0}, scale);
    for (int b = 0; b < QK_LANES; ++b) scale_out[b] = scale[b];
    for (int i = 0; i < n; ++i)
        for (int b = 0; b < QK_LANES; ++b) L[i][b] = zero_block[b] ? 0 : (int8_t)LI[i][b];
}

QK_INLINE float qk_make_qx_quants(int n, int nmax, const float *x, int8_t *L, int rmse_type, const float *qw) {
    float amax;
    const float max = qk_signed_absmax(n, x, &amax);
    if (amax < QK_GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = (float)(-nmax) / max;
    if (rmse_type == 0) {
        for (int i = 0; i < n; ++i) {
            const int l = qk_nearest_int(iscale * x[i]);
            L[i] = (int8_t)(nmax + QK_MAX(-nmax, QK_MIN(nmax - 1, l)));
        }
        return 1 / iscale;
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = qk_nearest_int(iscale * x[i]);
        l = QK_MAX(-nmax, QK_MIN(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        const float w = qw ? qw[i] : x[i] * x[i];  /* rmse_type 1: the only one qconvert uses */
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = qk_nearest_int(iscale * x[i]);
            l = QK_MAX(-nmax, QK_MIN(nmax - 1, l));
            const float w = qw ? qw[i] : x[i] * x[i];
            sumlx += w * x[i] * (float)l;
            suml2 += w * (float)l * (float)l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                const int l = qk_nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + QK_MAX(-nmax, QK_MIN(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* make_qkx2_quants (weights given; `max == min` test) and make_qkx3_quants (weights may be NULL
 * meaning x^2; `max <= min` test): one body, `v3` picks the variant; errors by squares, or by
 * magnitudes where `mad` (use_mad, Q2_K's). */
QK_INLINE float qk_make_qkx_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L, float *the_min,
                         uint8_t *Laux, float rmin, float rdelta, int nstep, int v3, int mad) {
#define W(i) (weights ? weights[i] : x[i] * x[i])
    float min = x[0], max = x[0];
    float sum_w = W(0);
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        const float w = W(i);
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (v3 ? max <= min : max == min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        const int l = qk_nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)QK_MAX(0, QK_MIN(nmax, l));
        float diff = scale * (float)L[i] + min - x[i];
        diff = mad ? fabsf(diff) : diff * diff;
        best_error += W(i) * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = qk_nearest_int(iscale * (x[i] - min));
            l = QK_MAX(0, QK_MIN(nmax, l));
            Laux[i] = (uint8_t)l;
            const float w = W(i);
            sum_l += w * (float)l;
            sum_l2 += w * (float)l * (float)l;
            sum_xl += w * (float)l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float err = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * (float)Laux[i] + this_min - x[i];
                diff = mad ? fabsf(diff) : diff * diff;
                err += W(i) * diff;
            }
            if (err < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
#undef W
}

/* make_q3_quants with do_rmse (Q3_K without an importance matrix): weights x^2, levels from
 * nearest_int(-nmax/max * x), then up to 5 rounds that move single levels where sumlx^2/suml2
 * grows (running sums); L = level + nmax; an all-zero block gives 0 and levels 0. */
QK_INLINE float qk_make_q3_quants(int n, int nmax, const float *x, int8_t *L) {
    float amax;
    const float max = qk_signed_absmax(n, x, &amax);
    if (amax < QK_GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    const float iscale = (float)(-nmax) / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = qk_nearest_int(iscale * x[i]);
        l = QK_MAX(-nmax, QK_MIN(nmax - 1, l));
        L[i] = (int8_t)l;
        const float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * (float)L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * (float)L[i] * (float)L[i];
                int new_l = qk_nearest_int(x[i] * sl2 / slx);
                new_l = QK_MAX(-nmax, QK_MIN(nmax - 1, new_l));
                if (new_l != L[i]) {
                    slx += w * x[i] * (float)new_l;
                    sl2 += w * (float)new_l * (float)new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

QK_INLINE float qk_make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = QK_MAX(max, x[i]);
    if (max < QK_GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = (float)nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)qk_nearest_int(iscale * x[i]);
    const float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        const float diff = x[i] - scale * (float)L[i];
        best_mse += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        const float iscale_is = (0.1f * (float)is + (float)nmax) / max;
        const float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            const int l = QK_MIN(nmax, qk_nearest_int(iscale_is * x[i]));
            const float diff = x[i] - scale_is * (float)l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        const int l = QK_MIN(nmax, qk_nearest_int(iscale * x[i]));
        L[i] = (uint8_t)l;
        sumlx += qw[i] * x[i] * (float)l;
        suml2 += qw[i] * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = qw[i];
            float slx = sumlx - w * x[i] * (float)L[i];
            float sl2 = suml2 - w * (float)L[i] * (float)L[i];
            if (slx > 0 && sl2 > 0) {
                const int new_l = QK_MIN(nmax, qk_nearest_int(x[i] * sl2 / slx));
                if (new_l != L[i]) {
                    slx += w * x[i] * (float)new_l;
                    sl2 += w * (float)new_l * (float)new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

QK_INLINE int qk_best_index_int8(int n, const int8_t *val, float x) {
    if (x <= val[0]) return 0;
    if (x >= val[n - 1]) return n - 1;
    int ml = 0, mu = n - 1;
    while (mu - ml > 1) {
        const int mav = (ml + mu) / 2;
        if (x < val[mav]) mu = mav; else ml = mav;
    }
    return x - val[mu - 1] < val[mu] - x ? mu - 1 : mu;
}

/* make_qkx2/3_quants for QK_LANES independent blocks of n <= 32 at once, block b in lane b of
 * X[i][b]. Each lane performs exactly the scalar function's float operations in the same order
 * (its sums still run i = 0..n-1); lanes only let the compiler use SIMD across blocks. */

/* Extremes of a block of 32, computed in 8 partial lanes so that they vectorize. A maximum or
 * minimum of non-NaN floats does not depend on the order it is taken in, except between +0 and
 * -0: where a result is zero, the sign a sequential `if (x < min) min = x` loop would keep (the
 * first zero met) is restored. */
QK_INLINE float qk_absmax32(const float *x) {
    float m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < 32; j += 8)
        for (int k = 0; k < 8; ++k) {
            const float a = fabsf(x[j + k]);
            m[k] = m[k] > a ? m[k] : a;
        }
    float r = 0;
    for (int k = 0; k < 8; ++k) r = r > m[k] ? r : m[k];
    return r;
}

/* ggml's `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`: the first value of largest
 * magnitude, or +0 when all are zero */
QK_INLINE float qk_signed_absmax32(const float *x, float *amax_out) {
    const float amax = qk_absmax32(x);
    *amax_out = amax;
    if (amax == 0) return 0.0f;
    uint32_t hit = 0;  /* which elements reach amax; the first of them is ggml's `max` */
    for (int j = 0; j < 32; ++j) hit |= (uint32_t)(fabsf(x[j]) == amax) << j;
#if defined(__GNUC__)
    return x[__builtin_ctz(hit)];
#else
    int j = 0;
    while (!(hit & 1u)) { hit >>= 1; ++j; }
    return x[j];
#endif
}

QK_INLINE void qk_minmax32(const float *x, float *min_out, float *max_out) {
    float lo[8], hi[8];
    for (int k = 0; k < 8; ++k) lo[k] = hi[k] = x[k];
    for (int j = 8; j < 32; j += 8)
        for (int k = 0; k < 8; ++k) {
            lo[k] = x[j + k] < lo[k] ? x[j + k] : lo[k];
            hi[k] = x[j + k] > hi[k] ? x[j + k] : hi[k];
        }
    float mn = lo[0], mx = hi[0];
    for (int k = 1; k < 8; ++k) {
        mn = lo[k] < mn ? lo[k] : mn;
        mx = hi[k] > mx ? hi[k] : mx;
    }
    if (mn == 0 || mx == 0) {  /* the first zero decides the sign, as in a sequential scan */
        for (int j = 0; j < 32; ++j)
            if (x[j] == 0) {
                if (mn == 0) mn = x[j];
                if (mx == 0) mx = x[j];
                break;
            }
    }
    *min_out = mn;
    *max_out = mx;
}

QK_INLINE void qk_make_qkx_lanes_c(int n, const float X[32][QK_LANES], const float W[32][QK_LANES], int nmax,
                                     float rmin, float rdelta, int nstep, int v3, int mad, float *scale_out,
                                     float *the_min_out, uint8_t L[32][QK_LANES]) {
    float mn[QK_LANES], mx[QK_LANES], sum_w[QK_LANES], sum_x[QK_LANES];
    float iscale[QK_LANES], scale[QK_LANES], best[QK_LANES], minv[QK_LANES];
    float sum_l[QK_LANES], sum_l2[QK_LANES], sum_xl[QK_LANES], ts[QK_LANES], tm[QK_LANES], err[QK_LANES];
    int degenerate[QK_LANES], upd[QK_LANES];
    int32_t Laux[32][QK_LANES], LI[32][QK_LANES];
    for (int b = 0; b < QK_LANES; ++b) {
        mn[b] = mx[b] = X[0][b];
        sum_w[b] = W[0][b];
        sum_x[b] = sum_w[b] * X[0][b];
    }
    for (int i = 1; i < n; ++i) {
        for (int b = 0; b < QK_LANES; ++b) {
            mn[b] = X[i][b] < mn[b] ? X[i][b] : mn[b];
            mx[b] = X[i][b] > mx[b] ? X[i][b] : mx[b];
            sum_w[b] += W[i][b];
            sum_x[b] += W[i][b] * X[i][b];
        }
    }
    for (int b = 0; b < QK_LANES; ++b) {
        if (mn[b] > 0) mn[b] = 0;
        degenerate[b] = v3 ? mx[b] <= mn[b] : mx[b] == mn[b];
        iscale[b] = (float)nmax / (degenerate[b] ? 1.0f : mx[b] - mn[b]);
        scale[b] = 1 / iscale[b];
        best[b] = 0;
        minv[b] = mn[b];
    }
    for (int i = 0; i < n; ++i) {
        for (int b = 0; b < QK_LANES; ++b) {
            int32_t l = qk_lane_int(iscale[b] * (X[i][b] - mn[b]));
            l = l < 0 ? 0 : l;
            l = l > nmax ? nmax : l;
            LI[i][b] = l;
            float diff = scale[b] * (float)l + mn[b] - X[i][b];
            diff = mad ? fabsf(diff) : diff * diff;
            best[b] += W[i][b] * diff;
        }
    }
    for (int is = 0; is <= nstep; ++is) {
        for (int b = 0; b < QK_LANES; ++b) {
            const float span = mx[b] - minv[b];
            iscale[b] = (rmin + rdelta * (float)is + (float)nmax) / (span != 0 ? span : 1.0f);
            sum_l[b] = sum_l2[b] = sum_xl[b] = 0;
        }
        for (int i = 0; i < n; ++i) {
            for (int b = 0; b < QK_LANES; ++b) {
                int32_t l = qk_lane_int(iscale[b] * (X[i][b] - minv[b]));
                l = l < 0 ? 0 : l;
                l = l > nmax ? nmax : l;
                Laux[i][b] = l;
                const float w = W[i][b], lf = (float)l;
                sum_l[b] += w * lf;
                sum_l2[b] += w * lf * lf;
                sum_xl[b] += w * lf * X[i][b];
            }
        }
        for (int b = 0; b < QK_LANES; ++b) {
            const float D = sum_w[b] * sum_l2[b] - sum_l[b] * sum_l[b];
            upd[b] = D > 0;
            const float Ds = upd[b] ? D : 1.0f;
            float this_scale = (sum_w[b] * sum_xl[b] - sum_x[b] * sum_l[b]) / Ds;
            float this_min = (sum_l2[b] * sum_x[b] - sum_l[b] * sum_xl[b]) / Ds;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl[b] / sum_l2[b];
            }
            ts[b] = this_scale;
            tm[b] = this_min;
            err[b] = 0;
        }
        for (int i = 0; i < n; ++i) {
            for (int b = 0; b < QK_LANES; ++b) {
                float diff = ts[b] * (float)Laux[i][b] + tm[b] - X[i][b];
                diff = mad ? fabsf(diff) : diff * diff;
                err[b] += W[i][b] * diff;
            }
        }
        int any = 0;
        for (int b = 0; b < QK_LANES; ++b) {
            upd[b] = upd[b] && err[b] < best[b];
            if (upd[b]) {
                best[b] = err[b];
                scale[b] = ts[b];
                minv[b] = tm[b];
            }
            any |= upd[b];
        }
        if (any)
            for (int i = 0; i < n; ++i)
                for (int b = 0; b < QK_LANES; ++b)
                    LI[i][b] = upd[b] ? Laux[i][b] : LI[i][b];
    }
    for (int i = 0; i < n; ++i)
        for (int b = 0; b < QK_LANES; ++b) L[i][b] = (uint8_t)(degenerate[b] ? 0 : LI[i][b]);
    for (int b = 0; b < QK_LANES; ++b) {
        if (degenerate[b]) {
            scale_out[b] = 0.f;
            the_min_out[b] = -mn[b];
        } else {
            scale_out[b] = scale[b];
            the_min_out[b] = -minv[b];
        }
    }
}

QK_INLINE void qk_make_qkx_lanes(int n, const float X[32][QK_LANES], const float W[32][QK_LANES], int nmax, float rmin,
                                 float rdelta, int nstep, int v3, int mad, float *scale_out, float *the_min_out,
                                 uint8_t L[32][QK_LANES]) {
    if (qk_have_avx2())
        qk_make_qkx_lanes_avx2(n, X, W, nmax, rmin, rdelta, nstep, v3, mad, scale_out, the_min_out, L);
    else
        qk_make_qkx_lanes_c(n, X, W, nmax, rmin, rdelta, nstep, v3, mad, scale_out, the_min_out, L);
}

#endif
