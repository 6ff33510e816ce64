"""IQ3_XXS and IQ3_S: super-blocks of 256 = 8 blocks of 32; each block is 8 groups of 4
magnitudes, each group a point of a lattice (reference/lattice.py: 256 points for IQ3_XXS, 512
for IQ3_S), with signs and a 4-bit block scale under an f16 super-block scale d.

Oracles (ggml/src/ggml-quants.c): quantize_iq3_xxs -> quantize_row_iq3_xxs_impl(256, ...) and
quantize_iq3_s -> quantize_row_iq3_s_impl(block_size 32, ...), both searching with
iq3_find_best_neighbour; ggml_quantize_chunk calls them with or without importance weights.
Dequantization: dequantize_row_iq3_xxs / dequantize_row_iq3_s (gguf.quants.IQ3_XXS / IQ3_S).

Layouts. IQ3_XXS {f16 d; u8 qs[64]: grid index of each group; u32 scales_and_signs[8]: per
block four 7-bit sign masks at bits 0, 7, 14, 21 (the 8th sign is the parity of the 7) and the
4-bit scale s at bits 28..31} (98 bytes): value = d * (0.5 + s) * 0.5 * grid value, the grid's
values 4, 12, .., 52, 62 (gguf's table: the top level is 62, not 60, while the search uses the
coordinates 2l+1). IQ3_S {f16 d; u8 qs[64]: each group's grid index, low 8 bits; u8 qh[8]: bit
k of qh[b] the 9th bit of block b's group k; u8 signs[32], one bit per weight; u8 scales[4]:
block 2j low nibble, 2j+1 high} (110 bytes): value = d * (1 + 2s) * grid value (1, 3, .., 15).

Quirks reproduced, in ggml's float order (every array float32, sums left to right):
- weights x^2, or qw * sqrt(sigma2 + x^2) with sigma2 = 2 * sum(x^2) / 256 over the whole
  super-block; the neighbour search weighs by sqrt(weight);
- the search works on magnitudes (x >= 0 keeps x, else -x with its sign bit set); IQ3_XXS
  keeps an even count of negative signs per 8 weights: where it is odd, the element of least
  weight*x*x (the first on ties) changes sign, so its magnitude goes negative;
- a block is empty when its largest magnitude (the `max > x ? max : x` scan from element 0) is
  under 1e-8 (IQ3_XXS) or equal to 0 (IQ3_S): scale 0. IQ3_XXS leaves its bytes 0; IQ3_S writes
  nothing for it and does NOT advance its qs and signs positions, so the following blocks' groups
  and signs move up one place (their qh bits stay at their own block) and the last places stay 0;
- trial scales id = (15 + is * 0.2) / max, is in -15..15 (IQ3_XXS) or -9..9 (IQ3_S); levels
  l = clamp(nearest_int(0.5 * (id * x - 1)), 0, 7), coordinates 2l + 1; a group whose levels are
  off the grid takes, among its neighbours in the lattice map, the point of least
  sum sqrt(w) * (s * q - x)^2 at s = 1/id (the first on ties; distances inf or NaN never win,
  and where none is finite ggml aborts, which here takes the first neighbour); a trial replaces
  the best when sumqx^2 > best * sumq2 (scale = sumqx / sumq2, best = scale * sumqx; it starts
  at best 0, scale max / 15, no levels: zeros);
- then, where a group of the winner was off the grid (IQ3_S starts with every group marked off
  it, so a block where no trial won goes here too) and scale > 0, groups are searched again at
  id = 1 / scale with neighbours at `scale` (IQ3_XXS: the groups off the grid; IQ3_S: all 8),
  and the scale is refit as sumqx / sumq2 where sumq2 > 0;
- a negative scale (the IQ3_XXS sign flip can give one) becomes positive with every stored sign
  bit flipped;
- d = max_scale / 31 (max_scale by `m > s ? m : s` over the non-empty blocks), stored as
  f16(d * 1.0125) (IQ3_XXS) or f16(d * 1.033) (IQ3_S); block scales
  clamp(nearest_int(0.5 * (id * scale - 1)), 0, 15) with id = 1 / d; a super-block whose
  max_scale is 0 keeps d = 0 (IQ3_XXS: every byte 0, IQ3_S: its groups and signs as written).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from qconvert.quant.reference import lattice
from qconvert.quant.reference.search import F, nearest_int, seqsum

FLT_MAX = np.finfo(F).max
SIZES = {"IQ3_XXS": 98, "IQ3_S": 110}


class Grid(NamedTuple):
    coord: np.ndarray  # float32 [size, 4]: coordinates 2l+1
    levels: np.ndarray  # int8 [size, 4]
    kmap: np.ndarray  # int32 [4096]: grid index, or -(1 + offset of the neighbour list)
    count: np.ndarray  # int64 [4096]: neighbours of each point off the grid (0 on it)
    start: np.ndarray  # int64 [4096]: where its neighbour indexes begin in `neighbours`
    neighbours: np.ndarray  # int64: the lists' indexes (counts included, as ggml lays them out)
    values: np.ndarray  # float32 [size, 4]: what each point dequantizes to (gguf's grid)


@functools.cache
def _grid(kind: str) -> Grid:
    import gguf.quants

    kmap, nb = lattice.tables(kind)
    off = kmap < 0
    head = np.where(off, -kmap.astype(np.int64) - 1, 0)
    count = np.where(off, nb[head], 0).astype(np.int64)
    lv = lattice.levels(kind)
    table = getattr(gguf.quants, kind)
    values = np.asarray(table.grid_map, dtype=F)[lv]
    return Grid(lattice.grid(kind).astype(F), lv.astype(np.int8), kmap, count, head + 1, nb.astype(np.int64), values)


def _neighbour(g: Grid, u: np.ndarray, xv: np.ndarray, waux: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """iq3_find_best_neighbour for G groups: levels index u [G], magnitudes and sqrt-weights
    [G, 4], scale [G] -> the chosen grid index [G]."""
    cnt = g.count[u]
    first = np.cumsum(cnt) - cnt
    seg = np.repeat(np.arange(u.size), cnt)
    pos = np.arange(seg.size) - first[seg]
    cand = g.neighbours[g.start[u][seg] + pos]
    diff = scale[seg, None] * g.coord[cand] - xv[seg]
    t = waux[seg] * diff * diff
    d2 = F(0) + t[:, 0] + t[:, 1] + t[:, 2] + t[:, 3]
    d2 = np.where(d2 < FLT_MAX, d2, F(np.inf))  # `d2 < best` from best = FLT_MAX: inf and NaN never win
    low = np.minimum.reduceat(d2, first)
    hit = np.flatnonzero(d2 == low[seg])  # all inf: every entry hits and the first neighbour is taken
    _, at = np.unique(seg[hit], return_index=True)
    return cand[hit[at]]


def _assign(g: Grid, xval: np.ndarray, waux: np.ndarray, id_: np.ndarray, scale: np.ndarray,
            groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Levels of blocks xval [B, 32] at inverse scale id_ [B], each group off the grid (among
    `groups` [B, 8], all when None) moved to its best neighbour at `scale`: (levels int8
    [B, 32], which groups were on the grid [B, 8])."""
    B = xval.shape[0]
    lv = np.clip(nearest_int(F(0.5) * (id_[:, None] * xval - F(1))), 0, 7).reshape(B, 8, 4)
    u = lv[..., 0] | lv[..., 1] << 3 | lv[..., 2] << 6 | lv[..., 3] << 9
    on = g.kmap[u] >= 0
    need = ~on if groups is None else ~on & groups
    b, k = np.nonzero(need)
    if b.size:
        best = _neighbour(g, u[b, k], xval.reshape(B, 8, 4)[b, k], waux.reshape(B, 8, 4)[b, k], scale[b])
        lv[b, k] = g.levels[best]
    return lv.reshape(B, 32).astype(np.int8), on


def _sums(wx: np.ndarray, w: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = (2 * L.astype(np.int32) + 1).astype(F)
    return seqsum(wx * q), seqsum(w * q * q)


def _signs(xb: np.ndarray, w: np.ndarray, parity: bool) -> tuple[np.ndarray, np.ndarray]:
    """Magnitudes [B, 32] and sign bytes [B, 4] of blocks xb; with `parity` (IQ3_XXS) an odd
    count of negatives in 8 flips the element of least w*x*x and keeps 7 bits."""
    B = xb.shape[0]
    x8 = xb.reshape(B, 4, 8)
    neg = ~(x8 >= 0)
    xval = np.where(neg, -x8, x8).astype(F)
    s = (neg.astype(np.int64) << np.arange(8)).sum(axis=2)
    if parity:
        a = w.reshape(B, 4, 8) * x8 * x8
        imin = np.argmin(np.where(np.isnan(a), F(np.inf), a), axis=2)  # the first `ax < min`
        imin = np.where(np.isnan(a[..., 0]), 0, imin)
        odd = neg.sum(axis=2) % 2 == 1
        bb, kk = np.nonzero(odd)
        xval[bb, kk, imin[bb, kk]] = -xval[bb, kk, imin[bb, kk]]
        s = np.where(odd, s ^ (1 << imin), s) & 127
    return xval.reshape(B, 32), s


def search(kind: str, xb: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The block search of quantize_row_iq3_{xxs,s}_impl for blocks xb [B, 32] with weights w:
    (scale [B], grid index of each group [B, 8], sign bytes [B, 4], empty [B])."""
    g = _grid(kind)
    xxs = kind == "IQ3_XXS"
    B = xb.shape[0]
    waux = np.sqrt(w)
    xval, signs = _signs(xb, w, xxs)
    mx = xval[:, 0]
    for i in range(1, 32):
        mx = np.where(mx > xval[:, i], mx, xval[:, i])
    empty = mx < F(1e-8) if xxs else mx == 0
    # the empty blocks run along with the rest on a stand-in maximum; their results are dropped
    mx = np.where(empty, F(1), mx).astype(F)
    wx = w * xval
    best = np.zeros(B, F)
    scale = (mx / F(15)).astype(F)
    L = np.zeros((B, 32), np.int8)
    on_grid = np.full((B, 8), xxs)
    ntry = 15 if xxs else 9
    for i in range(-ntry, ntry + 1):
        id_ = ((F(15) + F(i) * F(0.2)) / mx).astype(F)
        Laux, on = _assign(g, xval, waux, id_, (F(1) / id_).astype(F), None)
        sumqx, sumq2 = _sums(wx, w, Laux)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = np.where(better, sumqx / sumq2, scale).astype(F)
        best = np.where(better, scale * sumqx, best).astype(F)
        L = np.where(better[:, None], Laux, L)
        on_grid = np.where(better[:, None], on, on_grid)
    redo = np.flatnonzero((~on_grid).any(axis=1) & (scale > 0))
    if redo.size:
        s = scale[redo]
        groups = ~on_grid[redo] if xxs else np.ones((redo.size, 8), bool)
        Lr, _ = _assign(g, xval[redo], waux[redo], (F(1) / s).astype(F), s, groups)
        Lr = np.where(np.repeat(groups, 4, axis=1), Lr, L[redo])
        L[redo] = Lr
        sumqx, sumq2 = _sums(wx[redo], w[redo], Lr)
        scale[redo] = np.where(sumq2 > 0, sumqx / sumq2, s)
    flip = scale < 0
    scale = np.where(flip, -scale, scale).astype(F)
    signs = np.where(flip[:, None], ~signs & (127 if xxs else 255), signs)
    lv = L.reshape(B, 8, 4).astype(np.int64)
    idx = g.kmap[lv[..., 0] | lv[..., 1] << 3 | lv[..., 2] << 6 | lv[..., 3] << 9]
    return np.where(empty, F(0), scale).astype(F), idx.astype(np.int64), signs.astype(np.int64), empty


def _block_scales(scales: np.ndarray, empty: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(max_scale [S], d [S], 4-bit block scales [S, 8]) of super-blocks' block scales [S, 8]."""
    ms = np.zeros(scales.shape[0], F)
    for ib in range(8):
        ms = np.where(empty[:, ib], ms, np.where(ms > scales[:, ib], ms, scales[:, ib])).astype(F)
    d = (ms / F(31)).astype(F)
    inv = (F(1) / np.where(ms == 0, F(1), d)).astype(F)
    ls = np.clip(nearest_int(F(0.5) * (inv[:, None] * scales - F(1))), 0, 15)
    return ms, d, ls


@np.errstate(all="ignore")  # inf/NaN appear where ggml's floats overflow too; the bytes still match
def quantize(kind: str, rows: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=F)
    nrows, n = rows.shape
    x = rows.reshape(-1, 256)
    S = x.shape[0]
    sigma2 = (F(2) * seqsum(x * x) / F(256)).astype(F)
    xb = x.reshape(-1, 32)
    if qw is None:
        w = xb * xb
    else:
        w = np.tile(qw.astype(F).reshape(-1, 32), (nrows, 1)) * np.sqrt(np.repeat(sigma2, 8)[:, None] + xb * xb)
    scale, idx, signs, empty = search(kind, xb, w.astype(F))
    scales, idx, signs, empty = scale.reshape(S, 8), idx.reshape(S, 8, 8), signs.reshape(S, 8, 4), empty.reshape(S, 8)
    ms, d, ls = _block_scales(scales, empty)
    out = np.zeros((S, SIZES[kind]), np.uint8)
    if kind == "IQ3_XXS":
        kept = ~empty[:, :, None]
        out[:, 2:66] = np.where(kept, idx, 0).reshape(S, 64)
        packed = np.where(empty, 0, signs[..., 0] | signs[..., 1] << 7 | signs[..., 2] << 14 | signs[..., 3] << 21)
        out[:, 66:] = (packed | ls << 28).astype("<u4").view(np.uint8).reshape(S, 32)
        out[:, :2] = (d * F(1.0125)).astype(np.float16).view(np.uint8).reshape(S, 2)
        out[ms == 0] = 0
    else:
        slot = np.cumsum(~empty, axis=1) - 1  # the empty blocks do not move ggml's qs and signs pointers
        sb, ib = np.nonzero(~empty)
        qs = np.zeros((S, 8, 8), np.uint8)
        sg = np.zeros((S, 8, 4), np.uint8)
        qs[sb, slot[sb, ib]] = idx[sb, ib] & 255
        sg[sb, slot[sb, ib]] = signs[sb, ib]
        qh = np.where(empty[:, :, None], 0, (idx >> 8) << np.arange(8)).sum(axis=2)
        out[:, 2:66] = qs.reshape(S, 64)
        out[:, 66:74] = qh
        out[:, 74:106] = sg.reshape(S, 32)
        live = ms != 0
        out[live, :2] = (d[live] * F(1.033)).astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[live, 106:] = (ls[live, 0::2] | ls[live, 1::2] << 4)
    return out.reshape(nrows, -1)


def dequantize(kind: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    g = _grid(kind)
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, SIZES[kind])
    S = b.shape[0]
    d = b[:, :2].copy().view(np.float16)[:, 0].astype(F)
    if kind == "IQ3_XXS":
        idx = b[:, 2:66].reshape(S, 8, 8).astype(np.int64)
        v = b[:, 66:].copy().view("<u4").astype(np.int64)  # [S, 8]
        db = (d[:, None] * (F(0.5) + (v >> 28).astype(F)) * F(0.5)).astype(F)
        s7 = (v[:, :, None] >> np.array([0, 7, 14, 21])) & 127  # [S, 8, 4]
        bits = (s7[..., None] >> np.arange(7)) & 1
        neg = np.concatenate([bits, bits.sum(axis=-1, keepdims=True) & 1], axis=-1)  # the 8th: the parity
    else:
        lo = b[:, 2:66].reshape(S, 8, 8).astype(np.int64)
        hi = (b[:, 66:74, None].astype(np.int64) >> np.arange(8)) & 1
        idx = lo | hi << 8
        sc = b[:, 106:110].astype(np.int64)
        s4 = np.stack([sc & 15, sc >> 4], axis=2).reshape(S, 8)
        db = (d[:, None] * (1 + 2 * s4).astype(F)).astype(F)
        neg = (b[:, 74:106].reshape(S, 8, 4, 1).astype(np.int64) >> np.arange(8)) & 1
    sign = np.where(neg.reshape(S, 8, 32) == 1, F(-1), F(1))
    vals = g.values[idx].reshape(S, 8, 32)
    return (db[:, :, None] * vals * sign).astype(F).reshape(-1, n_per_row)
