"""IQ2_XXS, IQ2_XS and IQ2_S: super-blocks of 256 weights on ggml's 2-bit lattices.

Each group of 8 weights is a grid point of its type's lattice (reference/lattice.py: coordinates
2l+1, l in 0..2; the file stores the images {8, 25, 43}) times 8 signs, and each sub-block of 32
(IQ2_XXS) or 16 (IQ2_XS, IQ2_S) weights a 4-bit scale s: value = d * (0.5 + s) * 0.25 * image.

Oracles (ggml/src/ggml-quants.c): quantize_iq2_xxs -> quantize_row_iq2_xxs_impl, quantize_iq2_xs
-> quantize_row_iq2_xs_impl, quantize_iq2_s -> quantize_row_iq2_s_impl, all three searching with
iq2_find_best_neighbour; dequantize_row_iq2_xxs/_xs/_s (equal to gguf.quants' dequantization). The
three differ only in the fields of `Kind`; ggml's floats are reproduced operation for operation
(float32 throughout, sums in order, products associated as ggml's (w*x)*q):

- sigma2 = sum x^2 / 256 over the super-block, summed in order (IQ2_S: (2 * sum) / 256); weights
  qw * sqrt(sigma2 + x^2), or for IQ2_S without importance weights 0.25 * sigma2 + x^2 (IQ2_XXS and
  IQ2_XS have no such path: ggml_quantize_requires_imatrix). The neighbour search weighs squared
  differences by sqrt(weight); the scale fits weigh by weight.
- signs come off first (x >= 0 keeps x, so -0.0 stays -0.0). IQ2_XXS and IQ2_XS store 7 sign bits
  per group, the 8th implied by an even count: with an odd count of negatives the element of least
  weight*x*x (the first on ties, by a strict `<` scan) is flipped back to -|x| and its bit toggled.
- a sub-block whose largest such value (a `>` scan) is under GROUP_MAX_EPS (IQ2_S:
  GROUP_MAX_EPS_IQ2_S = 1e-8) is skipped: scale 0, grid index 0, signs 0, and it does not enter
  the super-block's maximum.
- trial scales: IQ2_XXS starts from make_qp_quants(32, 4, |x|, weight) (a sub-block where 3 times
  that scale is <= 0 is skipped) and tries id = (5 + 0.1 is) / (3 scale) for is in -6..6; IQ2_XS
  and IQ2_S start at max / 5 and try id = (5 + 0.1 is) / max for is in -9..9. A trial rounds
  nearest_int(0.5 * (id * |x| - 1)) into 0..2 per coordinate; a group whose point is off the grid
  takes the listed neighbour (lattice.tables) of least weighted squared distance at the trial's
  scale 1/id, the first on ties; a trial is kept where sumq2 > 0 and sumqx^2 > best * sumq2,
  best = scale * sumqx starting at 0.
- the refit: IQ2_XXS rounds every group again at the kept scale, IQ2_XS and IQ2_S only the groups
  whose kept point came from the neighbour search (and only where there is one); both only where
  the scale is > 0; then scale = sumqx / sumq2 where sumq2 > 0.
- a negative scale is negated and the signs complemented (within 7 bits for IQ2_XXS, IQ2_XS).
- d = max scale / 31, stored f16(d) (IQ2_S: f16(d * 0.9875)); each scale stored as clamp(
  nearest_int(0.5 * ((1/d) * s - 1)), 0, 15) with the float d. A super-block whose max scale is 0
  stores d = 0 and scales 0; IQ2_XXS and IQ2_XS zero its points and signs as well, IQ2_S keeps
  them.
Where ggml aborts (GGML_ASSERT: a group none of whose neighbours is nearer than FLT_MAX, which
happens once |x| is so large that the weights overflow, or a NaN scale), this code and the C
kernel go on: the first listed neighbour is taken and a NaN scale stored as it comes.

Layouts: IQ2_XXS {f16 d; u32 q[16]}: per sub-block of 32, 4 grid-index bytes, then a u32 with
the 4 groups' sign bits at 7k and the scale at bit 28. IQ2_XS {f16 d; u16 qs[32]; u8 scales[8]}:
qs = index | signs << 9, scales two nibbles a byte, the even sub-block low. IQ2_S {f16 d; u8
qs[32] (index low bytes); u8 signs[32]; u8 qh[8] (index bits 8-9 at 2 (g % 4)); u8 scales[8]}.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qconvert.quant.reference import lattice
from qconvert.quant.reference.search import GROUP_MAX_EPS, F, make_qp_quants, nearest_int, seqsum

FLT_MAX = F(np.finfo(np.float32).max)
IMAGES = np.array([8, 25, 43], dtype=F)  # the grid's stored values for levels 0, 1, 2


class Kind(NamedTuple):
    lattice: str
    sub: int  # weights per scale
    bytes: int  # per super-block
    eps: np.float32  # a sub-block whose largest |x| is under it is skipped
    twice: bool  # sigma2 = 2 * sum x^2 / 256
    parity: bool  # 7 sign bits, the 8th implied even
    xxs: bool  # trials around make_qp_quants' scale, every group refit
    plain: bool  # has a path without importance weights


KINDS = {
    "IQ2_XXS": Kind("IQ2_XXS", 32, 66, GROUP_MAX_EPS, False, True, True, False),
    "IQ2_XS": Kind("IQ2_XS", 16, 74, GROUP_MAX_EPS, False, True, False, False),
    "IQ2_S": Kind("IQ2_S", 16, 82, F(1e-8), True, False, False, True),
}

_SHIFTS = 2 * np.arange(8)


def _nearest(name: str, u: np.ndarray, xv: np.ndarray, wa: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """iq2_find_best_neighbour for groups off the grid: u [G] their level indexes, xv and wa
    [G, 8], scale [G] -> grid indexes [G]. Each group's list is scanned in order, d2 summed over
    the 8 coordinates in order; the first strict minimum below FLT_MAX wins (NaN never does)."""
    kmap, nbrs = lattice.tables(name)
    q = lattice.grid(name).astype(F)
    off = -kmap[u].astype(np.int64) - 1
    cnt = nbrs[off].astype(np.int64)
    starts = np.cumsum(cnt) - cnt
    seg = np.repeat(np.arange(len(u)), cnt)
    pos = np.arange(int(cnt.sum())) - starts[seg]
    cand = nbrs[off[seg] + 1 + pos].astype(np.int64)
    qc, s, x, w = q[cand], scale[seg], xv[seg], wa[seg]
    d2 = np.zeros(len(cand), dtype=F)
    for i in range(8):
        diff = s * qc[:, i] - x[:, i]
        d2 = d2 + w[:, i] * diff * diff
    d2 = np.where(np.isnan(d2), F(np.inf), d2)
    low = np.minimum.reduceat(d2, starts)
    first = np.minimum.reduceat(np.where(d2 == low[seg], pos, len(nbrs)), starts)
    first = np.where(low < FLT_MAX, first, 0)  # ggml asserts here; the first neighbour instead
    return cand[starts + first]


def _points(name: str, xv: np.ndarray, wa: np.ndarray, id_: np.ndarray, scale: np.ndarray,
            which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels [C, ng, 8] of the groups xv [C, ng, 8] at inverse scale id_ [C], the groups off the
    grid (among `which` [C, ng]) moved to their nearest neighbour at `scale` [C]; and whether each
    rounded point was on the grid."""
    kmap, _ = lattice.tables(name)
    L = np.clip(nearest_int(F(0.5) * (id_[:, None, None] * xv - F(1))), 0, 2)
    u = (L << _SHIFTS).sum(axis=-1)
    on = kmap[u] >= 0
    off = ~on & which
    if off.any():
        sc = np.broadcast_to(scale[:, None], on.shape)[off]
        L[off] = lattice.levels(name)[_nearest(name, u[off], xv[off], wa[off], sc)]
    return L, on


def _sums(weight: np.ndarray, xval: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = (2 * L + 1).astype(F)
    return seqsum(weight * xval * q), seqsum(weight * q * q)


def _running_max(a: np.ndarray) -> np.ndarray:
    """`m = a[0]; m = m > a[i] ? m : a[i]` over the last axis"""
    m = a[..., 0]
    for i in range(1, a.shape[-1]):
        m = np.where(m > a[..., i], m, a[..., i])
    return m


def _signs(k: Kind, x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|x| with the parity fix-up, sign bytes [S, ng]) for sub-blocks x [S, ng, 8]."""
    neg = ~(x >= 0)
    xval = np.where(neg, -x, x)
    s = (neg.astype(np.int64) << np.arange(8)).sum(axis=-1)
    if k.parity:
        a = weight * x * x
        imin = np.zeros(s.shape, dtype=np.int64)
        low = a[..., 0]
        for i in range(1, 8):
            take = a[..., i] < low
            low = np.where(take, a[..., i], low)
            imin = np.where(take, i, imin)
        odd = neg.sum(axis=-1) % 2 == 1
        at = np.arange(8) == imin[..., None]
        xval = np.where(odd[..., None] & at, -xval, xval)
        s = np.where(odd, s ^ (1 << imin), s) & 127
    return xval, s


@np.errstate(all="ignore")  # inf/NaN appear where ggml's floats overflow too; the bytes still match
def quantize(kind: str, rows: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    k = KINDS[kind]
    if qw is None and not k.plain:
        raise ValueError(f"{kind}: importance weights are required (ggml cannot quantize it without them)")
    rows = np.ascontiguousarray(rows, dtype=F)
    nrows, n = rows.shape
    sb = rows.reshape(-1, 256)
    nsub, ng = 256 // k.sub, k.sub // 8
    sumx2 = seqsum(sb * sb)
    sigma2 = np.repeat(((F(2) * sumx2 if k.twice else sumx2) / F(256)).astype(F), nsub)[:, None]
    x = sb.reshape(-1, k.sub)
    if qw is None:
        weight = F(0.25) * sigma2 + x * x
    else:
        weight = np.tile(np.asarray(qw, dtype=F).reshape(-1, k.sub), (nrows, 1)) * np.sqrt(sigma2 + x * x)
    waux = np.sqrt(weight)
    xval, signs = _signs(k, x.reshape(-1, ng, 8), weight.reshape(-1, ng, 8))
    xval = xval.reshape(-1, k.sub)
    top = _running_max(xval)
    coded = ~(top < k.eps)
    if k.xxs:
        scale0, _ = make_qp_quants(xval, 4, weight)  # its levels are never kept: every group is refit
        base, ntry = scale0 * F(3), 6
        coded &= ~(base <= 0)
    else:
        scale0, base, ntry = top / F(5), top, 9

    c = np.flatnonzero(coded)
    xv, w, wa = xval[c], weight[c], waux[c]
    xg, wg = xv.reshape(-1, ng, 8), wa.reshape(-1, ng, 8)
    scale, base = scale0[c].astype(F), base[c].astype(F)
    every = np.ones((len(c), ng), dtype=bool)
    L = np.zeros((len(c), ng, 8), dtype=np.int64)
    on = every.copy()
    best = np.zeros(len(c), dtype=F)
    for i in range(-ntry, ntry + 1):
        id_ = ((F(5) + F(i) * F(0.1)) / base).astype(F)
        Laux, on_aux = _points(k.lattice, xg, wg, id_, (F(1) / id_).astype(F), every)
        sumqx, sumq2 = _sums(w, xv, Laux.reshape(len(c), k.sub))
        keep = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = np.where(keep, sumqx / sumq2, scale).astype(F)
        best = np.where(keep, scale * sumqx, best).astype(F)
        L = np.where(keep[:, None, None], Laux, L)
        on = np.where(keep[:, None], on_aux, on)
    redo = every if k.xxs else ~on
    refit = redo.any(axis=1) & (scale > 0)
    redo = redo & refit[:, None]
    Lr, _ = _points(k.lattice, xg, wg, (F(1) / scale).astype(F), scale, redo)
    L = np.where(redo[..., None], Lr, L)
    sumqx, sumq2 = _sums(w, xv, L.reshape(len(c), k.sub))
    scale = np.where(refit & (sumq2 > 0), sumqx / sumq2, scale).astype(F)
    flip = scale < 0
    scale = np.where(flip, -scale, scale).astype(F)
    mask = 127 if k.parity else 255

    kmap, _ = lattice.tables(k.lattice)
    index = np.zeros((len(x), ng), dtype=np.int64)
    index[c] = np.maximum(kmap[(L << _SHIFTS).sum(axis=-1)], 0)
    sg = np.zeros((len(x), ng), dtype=np.int64)
    sg[c] = np.where(flip[:, None], ~signs[c] & mask, signs[c])
    scales = np.zeros(len(x), dtype=F)
    scales[c] = scale

    # the super-block: its max over the coded sub-blocks, d, the 4-bit scales
    nb = len(sb)
    scales, coded = scales.reshape(nb, nsub), coded.reshape(nb, nsub)
    max_scale = np.zeros(nb, dtype=F)
    for j in range(nsub):
        max_scale = np.where(coded[:, j] & ~(max_scale > scales[:, j]), scales[:, j], max_scale)
    zero = max_scale == 0
    d = (max_scale / F(31)).astype(F)
    stored = d if k.parity else (d * F(0.9875)).astype(F)
    ls = np.clip(nearest_int(F(0.5) * ((F(1) / d)[:, None] * scales - F(1))), 0, 15)
    ls[zero] = 0
    d_bytes = np.where(zero, F(0), stored).astype(np.float16).view(np.uint8).reshape(-1, 2)
    index, sg = index.reshape(nb, 32), sg.reshape(nb, 32)
    if k.parity:
        index[zero] = 0
        sg[zero] = 0
    out = np.zeros((nb, k.bytes), dtype=np.uint8)
    out[:, :2] = d_bytes
    if kind == "IQ2_XXS":
        aux = (ls.astype(np.uint32) << 28) | (sg.reshape(nb, 8, 4).astype(np.uint32) << (7 * np.arange(4))).sum(
            axis=-1, dtype=np.uint32)
        q = np.concatenate([index.reshape(nb, 8, 4).astype(np.uint8), aux.astype("<u4").view(np.uint8).reshape(nb, 8, 4)],
                           axis=2)
        out[:, 2:] = q.reshape(nb, 64)
    elif kind == "IQ2_XS":
        out[:, 2:66] = (index | (sg << 9)).astype("<u2").view(np.uint8).reshape(nb, 64)
        out[:, 66:] = ls[:, 0::2] | (ls[:, 1::2] << 4)
    else:
        out[:, 2:34] = index & 255
        out[:, 34:66] = sg
        out[:, 66:74] = ((index >> 8).reshape(nb, 8, 4) << (2 * np.arange(4))).sum(axis=-1)
        out[:, 74:] = ls[:, 0::2] | (ls[:, 1::2] << 4)
    return out.reshape(nrows, -1)


def _even_signs(s7: np.ndarray) -> np.ndarray:
    """7 stored sign bits -> 8, the 8th making the count of negatives even (ggml's ksigns_iq2xs)"""
    s7 = s7.astype(np.int64)
    parity = np.zeros_like(s7)
    for b in range(7):
        parity ^= (s7 >> b) & 1
    return s7 | (parity << 7)


def dequantize(kind: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    k = KINDS[kind]
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, k.bytes)
    nb = len(b)
    d = b[:, :2].copy().view(np.float16)[:, 0].astype(F)
    if kind == "IQ2_XXS":
        q = b[:, 2:].reshape(nb, 8, 8)
        aux = q[:, :, 4:].copy().view("<u4")[:, :, 0].astype(np.int64)
        index = q[:, :, :4].reshape(nb, 32).astype(np.int64)
        signs = _even_signs((aux[:, :, None] >> (7 * np.arange(4))) & 127).reshape(nb, 32)
        ls = np.repeat(aux >> 28, 4, axis=1)
    else:
        scales = b[:, -8:].astype(np.int64)
        ls = np.repeat(np.stack([scales & 15, scales >> 4], axis=2).reshape(nb, 16), 2, axis=1)
        if kind == "IQ2_XS":
            v = b[:, 2:66].copy().view("<u2").astype(np.int64)
            index, signs = v & 511, _even_signs(v >> 9)
        else:
            qh = b[:, 66:74].astype(np.int64)
            high = (qh[:, :, None] >> (2 * np.arange(4))) & 3
            index = b[:, 2:34].astype(np.int64) | (high.reshape(nb, 32) << 8)
            signs = b[:, 34:66].astype(np.int64)
    db = d[:, None] * (F(0.5) + ls.astype(F)) * F(0.25)
    values = IMAGES[lattice.levels(k.lattice)][index]  # [nb, 32, 8]
    sign = np.where((signs[..., None] >> np.arange(8)) & 1, F(-1), F(1))
    return (db[:, :, None] * values * sign).reshape(-1, n_per_row)
