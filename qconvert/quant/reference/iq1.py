"""IQ1_S and IQ1_M: super-blocks of 256 whose groups of 8 weights are points of the 2048-point
IQ1 lattice (reference/lattice.py, levels l in 0..2), valued scale * (l - 1 + delta), delta = +-1/8.

Oracles: ggml quantize_iq1_s -> quantize_row_iq1_s_impl and quantize_iq1_m ->
quantize_row_iq1_m_impl (ggml/src/ggml-quants.c). IQ1_S needs importance weights
(ggml_quantize_requires_imatrix: ggml asserts without them); IQ1_M takes weights x^2 without.

Layouts. IQ1_S {f16 d; u8 qs[32]; u16 qh[8]} (50 bytes), blocks of 32: group k of block b has
index qs[4b+k] | ((qh[b] >> 3k) & 7) << 8, the block scale is d * (2s+1) with s = qh[b] bits 12..14,
and bit 15 makes delta negative. IQ1_M {u8 qs[32]; u8 qh[16]; u16 sc[4]} (56 bytes), blocks of 16:
group k of block b has index qs[2b+k] | ((qh[b] >> 4k) & 7) << 8 and delta negative when bit 4k+3
of qh[b] is set (each half of a block has its own sign); block scale d * (2s+1) with s 3 bits at
sc[b/4] bits 3(b%4); the f16 d is spread over the top nibbles of sc[0..3], lowest bits first.

The search, per block of n (32 or 16), every sum in float32 and in the order written:
- weights qw * sqrt(sigma2 + x^2), sigma2 = 2 * sum(x^2) / 256 over the super-block (IQ1_M
  without qw: x^2); a block whose max |x| is under 1e-12 (IQ1_S) or 1e-7 (IQ1_M) stays a zero
  block: scale 0, indexes 0, delta +;
- the values are sorted by glibc's qsort, whose merge sort keeps equal values (and -0 against +0)
  in index order, exactly numpy's stable argsort for values without NaN;
- every split i1 <= i2 of the sorted values into levels 0, 1, 2 (i1 outer, i2 inner) is scored
  from prefix sums in sorted order (every expression left to right). IQ1_S: for delta + then -,
  sumqx = (sx[i1] - sx[0])*v0 + (sx[i2] - sx[i1])*v1 + (sx[n] - sx[i2])*v2 and likewise sumq2 with
  (sw[.] - sw[.])*v*v. IQ1_M keeps prefix sums per half (the other half's entry copied) and, per
  half h, qx = tx_h*v2 - (px_h[i1] + px_h[i2]) and q2 = tw_h*v2*v2 + pw_h[i1]*c1 + pw_h[i2]*c2
  (c1 = v0^2 - v1^2, c2 = v1^2 - v2^2), then the four sign pairs (++, +-, -+, --) as sums of the
  halves. A candidate wins when sumq2 > 0 and sumqx^2 > best * sumq2; best starts at -FLT_MAX (so
  the first is taken even with a negative scale) and becomes scale * sumqx, scale = sumqx / sumq2.
  Nothing won: a zero block;
- a negative scale mirrors the levels (2 - l) and the signs;
- a group of 8 levels off the grid takes the neighbour nearest in sum_i w_i (scale*v[l_i] - x_i)^2
  (summed in coordinate order, the first on ties); when some group moved, the scale is refit by
  least squares over the block, only if both sums are > 0;
- the block scales s_b become s = clamp(nearest_int(0.5 * (id*s_b - 1)), 0, 7) with id = 1/d,
  d = max_scale / 15. IQ1_S stores f16(d * 1.125). IQ1_M refits d by least squares over the
  super-block with the final values v[l]*(2s+1) (zero blocks included, at grid point 0 with sign +;
  only if sumq2 > 0) and stores f16(d * 1.1125). When every scale is 0 only the indexes are
  written (no d, scale or sign bits).
ggml's fallback when no neighbour's distance is below FLT_MAX reads x at the grid index, past the
block (and aborts if that finds nothing); it needs w * diff^2 to overflow float for every neighbour,
far beyond what the f16 d holds, and its bytes depend on memory outside the row: we scan the grid
with the group's own x instead, and failing that keep the first neighbour.
"""
from __future__ import annotations

import functools

import numpy as np

from qconvert.quant.reference import lattice
from qconvert.quant.reference.search import F, nearest_int, seqsum

FLT_MAX = F(np.finfo(np.float32).max)
DELTA = F(0.125)
PLUS = np.array([-1 + 0.125, 0.125, 1 + 0.125], dtype=F)  # the values of levels 0, 1, 2, delta +
MINUS = np.array([-1 - 0.125, -0.125, 1 - 0.125], dtype=F)
SHIFTED = np.stack([PLUS, MINUS])  # [sign: 0 = +, 1 = -, level]
EPS = {"IQ1_S": F(1e-12), "IQ1_M": F(1e-7)}
BLOCK = {"IQ1_S": 32, "IQ1_M": 16}
BYTES = {"IQ1_S": 50, "IQ1_M": 56}


@functools.cache
def _lattice() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels uint8 [2048, 8], map int32, neighbours uint16) of the IQ1 lattice."""
    kmap, neighbours = lattice.tables("IQ1")
    return lattice.levels("IQ1"), kmap, neighbours


@functools.cache
def _splits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (i1, i2), 0 <= i1 <= i2 <= n, in ggml's loop order."""
    i1, i2 = np.triu_indices(n + 1)
    return i1, i2


def _sorted_prefix(v: np.ndarray, order: np.ndarray) -> np.ndarray:
    """[B, n+1]: 0 then the running sums of v taken in sorted order, one add at a time."""
    s = np.take_along_axis(v, order, axis=1)
    return np.concatenate([np.zeros((v.shape[0], 1), F), np.cumsum(s, axis=1, dtype=F)], axis=1)


def _first_best(qx: np.ndarray, q2: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The running choice over candidates [B, C] in order: a candidate wins when q2 > 0 and
    qx^2 > best * q2 (best from -FLT_MAX, then scale * qx). (winner or -1 [B], its scale [B])."""
    B, C = qx.shape
    best = np.full(B, -FLT_MAX, F)
    pick = np.full(B, -1)
    scale = scale.copy()
    for c in range(C):
        x, q = qx[:, c], q2[:, c]
        win = (q > 0) & (x * x > best * q)
        if win.any():
            s = x / np.where(win, q, F(1))
            scale = np.where(win, s, scale)
            best = np.where(win, s * x, best).astype(F)
            pick = np.where(win, c, pick)
    return pick, scale


def _split_s(x: np.ndarray, w: np.ndarray, order: np.ndarray, max_: np.ndarray):
    """quantize_row_iq1_s_impl's search over blocks [B, n] sorted by `order`: (i1, i2, sign 0 = +,
    1 = -, scale), i1 = -1 where nothing won."""
    sx, sw = _sorted_prefix(w * x, order), _sorted_prefix(w, order)
    n = x.shape[1]
    i1, i2 = _splits(n)
    a, b, c = sx[:, i1] - sx[:, :1], sx[:, i2] - sx[:, i1], sx[:, n:] - sx[:, i2]
    wa, wb, wc = sw[:, i1] - sw[:, :1], sw[:, i2] - sw[:, i1], sw[:, n:] - sw[:, i2]
    qx = np.stack([a * v[0] + b * v[1] + c * v[2] for v in SHIFTED], axis=2)  # [B, splits, sign]
    q2 = np.stack([wa * v[0] * v[0] + wb * v[1] * v[1] + wc * v[2] * v[2] for v in SHIFTED], axis=2)
    pick, scale = _first_best(qx.reshape(len(x), -1), q2.reshape(len(x), -1), max_)
    split = np.maximum(pick, 0) // 2
    return np.where(pick >= 0, i1[split], -1), i2[split], np.maximum(pick, 0) % 2, scale


def _split_m(x: np.ndarray, w: np.ndarray, order: np.ndarray, max_: np.ndarray):
    """quantize_row_iq1_m_impl's search over blocks [B, n] sorted by `order`: (i1, i2, sign pair
    0 = ++, 1 = +-, 2 = -+, 3 = --, scale), i1 = -1 where nothing won. A half's prefix sums add +0
    where ggml copies the entry: the same floats, as a sum started at +0 is never -0."""
    n = x.shape[1]
    second = order >= n // 2  # which half each sorted value is in
    wx, ws = np.take_along_axis(w * x, order, axis=1), np.take_along_axis(w, order, axis=1)
    zero = np.zeros((len(x), 1), F)
    px = [np.concatenate([zero, np.cumsum(np.where(second == h, wx, F(0)), axis=1, dtype=F)], axis=1)
          for h in (0, 1)]
    pw = [np.concatenate([zero, np.cumsum(np.where(second == h, ws, F(0)), axis=1, dtype=F)], axis=1)
          for h in (0, 1)]
    i1, i2 = _splits(n)
    qx, q2 = [], []  # per sign (+, -) the two halves' sums [B, splits]
    for v in SHIFTED:
        c1, c2 = v[0] * v[0] - v[1] * v[1], v[1] * v[1] - v[2] * v[2]
        qx.append([px[h][:, n:] * v[2] - (px[h][:, i1] + px[h][:, i2]) for h in (0, 1)])
        q2.append([pw[h][:, n:] * v[2] * v[2] + pw[h][:, i1] * c1 + pw[h][:, i2] * c2 for h in (0, 1)])
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]  # (first half's sign, second half's)
    sumqx = np.stack([qx[a][0] + qx[b][1] for a, b in pairs], axis=2)
    sumq2 = np.stack([q2[a][0] + q2[b][1] for a, b in pairs], axis=2)
    pick, scale = _first_best(sumqx.reshape(len(x), -1), sumq2.reshape(len(x), -1), max_)
    split = np.maximum(pick, 0) // 4
    return np.where(pick >= 0, i1[split], -1), i2[split], np.maximum(pick, 0) % 4, scale


def _nearest(x: np.ndarray, w: np.ndarray, scale: np.ndarray, xx: np.ndarray, u: np.ndarray) -> np.ndarray:
    """iq1_find_best_neighbour2 for groups x, w [G, 8] off the grid at levels index u [G], group
    values xx [G, 3]: the grid index."""
    levels, kmap, neighbours = _lattice()
    diff = scale[:, None, None] * xx[:, None, :] - x[:, :, None]
    t = w[:, :, None] * diff * diff  # [G, coordinate, level]
    off = -kmap[u].astype(np.int64) - 1
    count = neighbours[off].astype(np.int64)
    m = np.arange(1, count.max() + 1)
    cand = neighbours[np.minimum(off[:, None] + m, len(neighbours) - 1)].astype(np.int64)  # [G, M]

    def distances(points: np.ndarray, rows: np.ndarray) -> np.ndarray:
        lv = levels[points].astype(np.intp)  # [G, M, 8]
        d2 = np.zeros(points.shape, F)
        for i in range(8):
            d2 = d2 + np.take_along_axis(t[rows, i], lv[:, :, i], axis=1)
        return d2

    g = np.arange(len(u))
    d2 = distances(cand, g)
    d2 = np.where((m <= count[:, None]) & (d2 < FLT_MAX), d2, np.inf)  # NaN never wins `d2 < best`
    found = np.argmin(d2, axis=1)  # the first of the smallest
    index = cand[g, found]
    lost = np.flatnonzero(np.isinf(d2[g, found]))
    if lost.size:  # see the docstring: ggml reads past the block here
        every = np.broadcast_to(np.arange(len(levels)), (lost.size, len(levels)))
        d2 = distances(every, lost)
        d2 = np.where(d2 < FLT_MAX, d2, np.inf)
        p = np.argmin(d2, axis=1)
        index[lost] = np.where(np.isinf(d2[np.arange(lost.size), p]), cand[lost, 0], p)
    return index


def _snap(x: np.ndarray, w: np.ndarray, L: np.ndarray, xx: np.ndarray, scale: np.ndarray):
    """Grid indexes [B, n/8] for levels L [B, n] of blocks x, w [B, n], group k valued xx [B, n/8, 3],
    and the scale, refit over the block where a group moved off its own levels."""
    levels, kmap, _ = _lattice()
    B, n = x.shape
    u = (L.reshape(B, n // 8, 8).astype(np.int64) << (2 * np.arange(8))).sum(axis=2)
    index = kmap[u].astype(np.int64)
    off = index < 0
    if off.any():
        b, k = np.nonzero(off)
        index[b, k] = _nearest(x.reshape(B, -1, 8)[b, k], w.reshape(B, -1, 8)[b, k], scale[b], xx[b, k], u[b, k])
    moved = off.any(axis=1)
    q = np.take_along_axis(xx, levels[index].astype(np.int64), axis=2).reshape(B, n)
    sumqx, sumq2 = seqsum(w * q * x), seqsum(w * q * q)
    refit = moved & (sumqx > 0) & (sumq2 > 0)
    return index, np.where(refit, sumqx / np.where(refit, sumq2, F(1)), scale).astype(F)


def _weights(x: np.ndarray, qw: np.ndarray | None, nrows: int) -> np.ndarray:
    """Per super-block row of x [S, 256]: qw * sqrt(sigma2 + x^2), or x^2 without qw."""
    if qw is None:
        return x * x
    sigma2 = F(2) * seqsum(x * x) / F(256)
    return np.tile(qw.astype(F).reshape(-1, 256), (nrows, 1)) * np.sqrt(sigma2[:, None] + x * x)


def _block_max(x: np.ndarray) -> np.ndarray:
    m = np.abs(x[:, 0])
    for i in range(1, x.shape[1]):
        a = np.abs(x[:, i])
        m = np.where(m > a, m, a)
    return m


def _group_signs(kind: str, code: np.ndarray) -> np.ndarray:
    """[B, groups]: 0 (+) or 1 (-) per group of 8 from a block's sign code."""
    if kind == "IQ1_S":
        return np.repeat(code[:, None], 4, axis=1)
    return np.stack([code >> 1, code & 1], axis=1)


def _search(kind: str, x: np.ndarray, w: np.ndarray):
    """Every block of super-blocks x, w [S, 256]: (scale [B], sign code [B], grid indexes
    [B, n/8]), a zero block scale 0, code 0, indexes 0."""
    n = BLOCK[kind]
    xb, wb = x.reshape(-1, n), w.reshape(-1, n)
    B = len(xb)
    scale, code, index = np.zeros(B, F), np.zeros(B, np.int64), np.zeros((B, n // 8), np.int64)
    max_ = _block_max(xb)
    live = np.flatnonzero(max_ >= EPS[kind])
    if not live.size:
        return scale, code, index
    x1, w1 = xb[live], wb[live]
    order = np.argsort(x1, axis=1, kind="stable")
    i1, i2, c, sc = (_split_s if kind == "IQ1_S" else _split_m)(x1, w1, order, max_[live])
    rank = np.argsort(order, axis=1)
    L = np.where(rank < i1[:, None], 0, np.where(rank < i2[:, None], 1, 2))
    neg = sc < 0  # mirrored: levels 2 - l, every sign flipped
    L = np.where(neg[:, None], 2 - L, L)
    sc = np.where(neg, -sc, sc).astype(F)
    c = np.where(neg, (1 if kind == "IQ1_S" else 3) - c, c)
    ok = i1 >= 0
    xx = SHIFTED[_group_signs(kind, c[ok])]  # [blocks, groups, level]
    idx, sc = _snap(x1[ok], w1[ok], L[ok], xx, sc[ok])
    live = live[ok]
    scale[live], code[live], index[live] = sc, c[ok], idx
    return scale, code, index


def _iq1_s(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    S = x.shape[0]
    scale, sign, index = (a.reshape(S, 8, *a.shape[1:]) for a in _search("IQ1_S", x, w))
    max_scale = scale.max(axis=1)
    has = max_scale != 0
    d = max_scale / F(15)
    dh = np.where(has, d * F(1.125), F(0)).astype(F).astype(np.float16)
    inv = (F(1) / np.where(has, d, F(1))).astype(F)
    l = np.clip(nearest_int(F(0.5) * (inv[:, None] * scale - F(1))), 0, 7) | (sign << 3)
    qh = ((index >> 8) << (3 * np.arange(4))).sum(axis=2) | np.where(has[:, None], l << 12, 0)
    out = np.empty((S, 50), np.uint8)
    out[:, :2] = dh.view(np.uint8).reshape(S, 2)
    out[:, 2:34] = (index & 255).reshape(S, 32)
    out[:, 34:] = qh.astype("<u2").view(np.uint8).reshape(S, 16)
    return out


SIGN_BITS = np.array([0x00, 0x80, 0x08, 0x88])  # IQ1_M's qh bits of sign pairs ++, +-, -+, --


def _iq1_m(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    S = x.shape[0]
    scale, code, index = (a.reshape(S, 16, *a.shape[1:]) for a in _search("IQ1_M", x, w))
    max_scale = scale.max(axis=1)
    has = max_scale != 0
    d = max_scale / F(15)
    inv = (F(1) / np.where(has, d, F(1))).astype(F)
    l = np.clip(nearest_int(F(0.5) * (inv[:, None] * scale - F(1))), 0, 7)  # [S, 16]
    # d refit over the super-block with the final values, zero blocks (grid point 0, sign +) included
    xx = SHIFTED[_group_signs("IQ1_M", code.reshape(-1))].reshape(S, 16, 2, 3)
    q = np.take_along_axis(xx, _lattice()[0][index].astype(np.intp), axis=3)  # [S, 16, 2, 8]
    q = (q * (2 * l + 1).astype(F)[:, :, None, None]).reshape(S, 256)
    sumqx, sumq2 = seqsum(w * q * x), seqsum(w * q * q)
    d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F(1)), d).astype(F)
    s = (d * F(1.1125)).astype(np.float16).view(np.uint16).astype(np.int64)
    sc = (l.reshape(S, 4, 4) << (3 * np.arange(4))).sum(axis=2)
    sc |= ((s[:, None] >> (4 * np.arange(4))) & 0xF) << 12  # d's nibbles, lowest first
    out = np.empty((S, 56), np.uint8)
    out[:, :32] = (index & 255).reshape(S, 32)
    out[:, 32:48] = (index[:, :, 0] >> 8) | ((index[:, :, 1] >> 8) << 4) | np.where(has[:, None], SIGN_BITS[code], 0)
    out[:, 48:] = np.where(has[:, None], sc, 0).astype("<u2").view(np.uint8).reshape(S, 8)
    return out


@np.errstate(all="ignore")  # inf/NaN appear where ggml's floats overflow too; the bytes still match
def quantize(kind: str, rows: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=F)
    nrows, n = rows.shape
    if kind == "IQ1_S" and qw is None:
        raise ValueError("IQ1_S: importance weights are required (ggml cannot quantize it without them)")
    x = rows.reshape(-1, 256)
    out = (_iq1_s if kind == "IQ1_S" else _iq1_m)(x, _weights(x, qw, nrows))
    return out.reshape(nrows, -1)


def dequantize(kind: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """dequantize_row_iq1_s / dequantize_row_iq1_m: d * (2s+1) * (grid value + delta)."""
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BYTES[kind])
    S = b.shape[0]
    g = _lattice()[0].astype(F) - F(1)  # [2048, 8]: level - 1
    if kind == "IQ1_S":
        d = b[:, :2].copy().view(np.float16).astype(F)  # [S, 1]
        qh = b[:, 34:].copy().view("<u2").astype(np.int64)  # [S, 8 blocks]
        index = b[:, 2:34].reshape(S, 8, 4) | (((qh[:, :, None] >> (3 * np.arange(4))) & 7) << 8)
        s = (qh >> 12) & 7
        negative = np.repeat((qh & 0x8000)[:, :, None] != 0, 4, axis=2)
    else:
        sc = b[:, 48:].copy().view("<u2").astype(np.int64)  # [S, 4]
        bits = ((sc >> 12) << (4 * np.arange(4))).sum(axis=1)  # the f16 d, from the top nibbles
        d = bits.astype(np.uint16).view(np.float16).astype(F)[:, None]
        qh = b[:, 32:48].astype(np.int64)[:, :, None] >> (4 * np.arange(2))  # [S, 16 blocks, group]
        index = b[:, :32].reshape(S, 16, 2) | ((qh & 7) << 8)
        s = ((sc[:, :, None] >> (3 * np.arange(4))) & 7).reshape(S, 16)
        negative = (qh & 0x08) != 0
    dl = d * (2 * s + 1).astype(F)  # [S, blocks]
    delta = np.where(negative, -DELTA, DELTA).astype(F)  # [S, blocks, groups]
    v = dl[:, :, None, None] * (g[index] + delta[:, :, :, None])
    return v.reshape(-1, n_per_row)
