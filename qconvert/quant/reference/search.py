"""The scale searches behind ggml's block quantizers, in numpy, vectorized across blocks.

Each function reproduces the ggml function of the same name (ggml/src/ggml-quants.c) bit for
bit: every array is float32, sums run left to right over a block (never numpy's pairwise sum),
products keep ggml's association ((w*x)*l), and levels stored in uint8 wrap as C's do. The
comments name the quirks; the tests compare every type against ggml_quantize_chunk.
"""
from __future__ import annotations

import numpy as np

F = np.float32
GROUP_MAX_EPS = F(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml nearest_int: add 1.5*2^23 in float32 and read the mantissa (round half to even)."""
    bits = (np.asarray(v, dtype=F) + F(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis one element at a time, as a C loop does."""
    s = np.zeros(a.shape[:-1], dtype=F)
    for i in range(a.shape[-1]):
        s = s + a[..., i]
    return s


def signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max |x|, the signed x it came from), the first one on ties, as `if (ax > amax)` keeps."""
    ax = np.abs(x)
    idx = np.argmax(np.where(np.isnan(ax), F(-1), ax), axis=-1)  # NaN never wins `ax > amax`
    mx = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
    mx = np.where(np.abs(mx) > 0, mx, F(0)).astype(F)  # nothing above 0: amax and max stay +0
    return np.abs(mx), mx


def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(d == 0, F(1), d).astype(F)


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """rmse_type 1: (scale [B], levels 0..2*nmax-1 [B, n]). Weights qw, or x^2 without."""
    w = qw if qw is not None else x * x
    amax, mx = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = _safe(mx)

    def levels(iscale):
        return np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)

    def sums(l):
        lf = l.astype(F)
        return seqsum(w * x * lf), seqsum(w * lf * lf)

    with np.errstate(divide="ignore", invalid="ignore"):
        l = levels(F(-nmax) / mx)
        sumlx, suml2 = sums(l)
        scale = np.where(suml2 != 0, sumlx / suml2, F(0)).astype(F)
        best = scale * sumlx
        for i in (*range(-9, 0), *range(1, 10)):
            iscale = -(F(nmax) + F(0.1) * F(i)) / mx
            li = levels(iscale)
            slx, sl2 = sums(li)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            l = np.where(better[:, None], li, l)
            scale = np.where(better, slx / sl2, scale).astype(F)
            best = np.where(better, scale * slx, best).astype(F)
    L = (l + nmax).astype(np.int8)
    L[zero] = 0
    return np.where(zero, F(0), scale).astype(F), L


def make_qkx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None, rmin: float, rdelta: float,
                    nstep: int, v3: bool, mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants (v3 False: weights given, `max == min` test) or make_qkx3_quants
    (v3 True: weights may be None meaning x^2, `max <= min` test): (scale, the_min, L uint8).
    mad: errors weighted by |diff| instead of diff^2 (use_mad, Q2_K's)."""
    w = weights if weights is not None else x * x
    sum_w = seqsum(w)
    sum_x = seqsum(w * x)
    mn = np.minimum(x.min(axis=-1), F(0))
    mx = x.max(axis=-1)
    degenerate = (mx <= mn) if v3 else (mx == mn)

    def levels(iscale, minv):
        return np.clip(nearest_int(iscale[:, None] * (x - minv[:, None])), 0, nmax)

    def error(scale, lf, minv):
        diff = scale[:, None] * lf + minv[:, None] - x
        return seqsum(w * (np.abs(diff) if mad else diff * diff))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(nmax) / _safe(mx - mn)
        scale = (F(1) / iscale).astype(F)
        L = levels(iscale, mn)
        best = error(scale, L.astype(F), mn)
        minv = mn.copy()
        for i in range(nstep + 1):
            # quirk: the running best min moves the grid: later steps use max - min of the best so far
            iscale = (F(rmin) + F(rdelta) * F(i) + F(nmax)) / _safe(mx - minv)
            li = levels(iscale, minv)
            lf = li.astype(F)
            sum_l, sum_l2, sum_xl = seqsum(w * lf), seqsum(w * lf * lf), seqsum(w * lf * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F(0), this_min).astype(F)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(F)
            err = error(this_scale, lf, this_min)
            better = (D > 0) & (err < best)
            L = np.where(better[:, None], li, L)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale).astype(F)
            minv = np.where(better, this_min, minv).astype(F)
    L = L.astype(np.uint8)
    L[degenerate] = 0
    scale = np.where(degenerate, F(0), scale).astype(F)
    minv = np.where(degenerate, mn, minv).astype(F)
    return scale, (-minv).astype(F), L


def _move_levels(x: np.ndarray, w: np.ndarray, L: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray,
                 lo: int | None, hi: int, q3: bool) -> tuple[np.ndarray, np.ndarray]:
    """The refinement make_q3_quants and make_qp_quants share: up to 5 rounds over each block's
    levels L [B, n] (changed in place), in order, moving level i to nearest_int(x_i * sl2 / slx)
    (the running sums without it; clamped to [lo, hi]) where that raises sumlx^2 / suml2.
    make_q3_quants (q3) needs slx > 0 before and sl2 > 0 after; make_qp_quants needs slx > 0 and
    sl2 > 0 before and stores the level through uint8. Returns the final (sumlx, suml2)."""
    for _ in range(5):
        changed = np.zeros(x.shape[0], dtype=bool)
        for i in range(x.shape[1]):
            wi, xi, Li = w[:, i], x[:, i], L[:, i].astype(F)
            slx = sumlx - wi * xi * Li
            sl2 = suml2 - wi * Li * Li
            new_l = np.clip(nearest_int(xi * sl2 / _safe(slx)), lo, hi)
            nf = new_l.astype(F)
            slx2 = slx + wi * xi * nf
            sl22 = sl2 + wi * nf * nf
            ok = (slx > 0) & ((sl22 > 0) if q3 else (sl2 > 0))
            accept = ok & (new_l != L[:, i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(accept, new_l if q3 else new_l & 0xFF, L[:, i])
            sumlx = np.where(accept, slx2, sumlx).astype(F)
            suml2 = np.where(accept, sl22, suml2).astype(F)
            changed |= accept
        if not changed.any():
            break  # a block with no change this round would not change in the next either
    return sumlx, suml2


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants with do_rmse (Q3_K without an importance matrix): (scale [B], levels
    0..2*nmax-1 int8 [B, n]). Weights x^2; levels start at nearest_int(-nmax/max * x), then up to
    5 rounds move one level at a time where that raises sumlx^2/suml2 (the running sums, not
    recomputed); an all-zero block (max |x| under GROUP_MAX_EPS) gives scale 0 and levels 0."""
    w = x * x
    amax, mx = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = (F(-nmax) / _safe(mx)).astype(F)
        L = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = L.astype(F)
        sumlx, suml2 = _move_levels(x, w, L, seqsum(w * x * lf), seqsum(w * lf * lf), -nmax, nmax - 1, q3=True)
        scale = np.where(suml2 > 0, sumlx / _safe(suml2), F(0)).astype(F)
    L = (L + nmax).astype(np.int8)
    L[zero] = 0
    return np.where(zero, F(0), scale).astype(F), L


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, L uint8) for non-negative x (the K-quants' sub-block scales and mins)."""
    mx = np.maximum(x.max(axis=-1), F(0))
    zero = mx < GROUP_MAX_EPS
    mx = _safe(mx)

    def mse(scale, lf):
        diff = x - scale[:, None] * lf
        return seqsum(qw * diff * diff)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = (F(nmax) / mx).astype(F)
        L0 = (nearest_int(iscale[:, None] * x) & 0xFF).astype(F)  # quirk: stored in uint8 first
        best = mse((F(1) / iscale).astype(F), L0)
        for i in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_i = ((F(0.1) * F(i) + F(nmax)) / mx).astype(F)
            li = np.minimum(nmax, nearest_int(iscale_i[:, None] * x)).astype(F)
            m = mse((F(1) / iscale_i).astype(F), li)
            better = m < best
            best = np.where(better, m, best)
            iscale = np.where(better, iscale_i, iscale).astype(F)
        l = np.minimum(nmax, nearest_int(iscale[:, None] * x))
        sumlx = seqsum(qw * x * l.astype(F))
        suml2 = seqsum(qw * l.astype(F) * l.astype(F))
        L = (l & 0xFF).astype(np.int64)
        sumlx, suml2 = _move_levels(x, qw, L, sumlx, suml2, None, nmax, q3=False)
        scale = np.where(suml2 > 0, sumlx / _safe(suml2), F(0)).astype(F)
    L = L.astype(np.uint8)
    L[zero] = 0
    return np.where(zero, F(0), scale).astype(F), L


def best_index_int8(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml best_index_int8: the nearest table entry, the upper one on ties."""
    vals = values.astype(F)
    mu = np.clip(np.searchsorted(vals, x, side="right"), 1, len(vals) - 1)
    lower = x - vals[mu - 1] < vals[mu] - x
    idx = np.where(lower, mu - 1, mu)
    idx = np.where(x <= vals[0], 0, idx)
    return np.where(x >= vals[-1], len(vals) - 1, idx)
