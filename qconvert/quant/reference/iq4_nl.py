"""IQ4_NL: blocks of 32 as indices into a non-linear table; value = d*kvalues[q].

Oracle: ggml quantize_iq4_nl -> quantize_row_iq4_nl_impl(32, 32, ..., ntry=7), which
llama-quantize calls with or without an imatrix. Quirks: weights x^2, or qw*sqrt(sigma2 + x^2)
with sigma2 = 2*mean x^2 of the block; d starts at max/127 (signed value of largest magnitude),
is refit by least squares, then tried at (itry-127)/max for itry in -7..7; best_index_int8 takes
the upper entry on ties; levels use the float d, the file stores f16(d); zero blocks: d=0, 0x88.
"""
from __future__ import annotations

import numpy as np

from qconvert.quant.reference.search import GROUP_MAX_EPS, F, best_index_int8, nearest_int, seqsum, signed_absmax

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


def search(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """quantize_row_iq4_nl_impl's scale search for blocks x [B, 32] with weights w: d [B], 0 for
    a block whose largest magnitude is under GROUP_MAX_EPS."""
    amax, mx = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    safe_mx = np.where(zero, F(1), mx).astype(F)
    vals = KVALUES.astype(F)

    def fit(inv):
        q = vals[best_index_int8(KVALUES, inv[:, None] * x)]
        return seqsum(w * q * x), seqsum(w * q * q)

    with np.errstate(divide="ignore", invalid="ignore"):
        d = (-safe_mx / F(-127)).astype(F)
        sumqx, sumq2 = fit((F(1) / d).astype(F))
        d = np.where(sumq2 > 0, sumqx / sumq2, F(0)).astype(F)
        best = d * sumqx
        for itry in range(-7, 8):
            sqx, sq2 = fit((F(itry - 127) / safe_mx).astype(F))
            better = (sq2 > 0) & (sqx * sqx > best * sq2)
            d = np.where(better, sqx / sq2, d).astype(F)
            best = np.where(better, d * sqx, best).astype(F)
    return np.where(zero, F(0), d).astype(F)


def _weights(x: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray, nrows: int) -> np.ndarray:
    """x^2, or qw * sqrt(sigma2 + x^2) with sigma2 [B] per block of x [B, 32]."""
    if qw is None:
        return x * x
    return np.tile(qw.astype(F).reshape(-1, 32), (nrows, 1)) * np.sqrt(sigma2[:, None] + x * x)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d != 0, F(1) / np.where(d == 0, F(1), d), F(0)).astype(F)


def _pack(L: np.ndarray) -> np.ndarray:
    """Indices [B, 32] -> qs [B, 16]: element j low nibble, j + 16 high."""
    L = L.astype(np.uint8)
    return L[:, :16] | (L[:, 16:] << 4)


@np.errstate(all="ignore")  # inf/NaN appear where ggml's floats overflow too; the bytes still match
def quantize(rows: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=F)
    nrows, n = rows.shape
    x = rows.reshape(-1, 32)
    d = search(x, _weights(x, qw, seqsum(x * x) * F(2.0 / 32), nrows))
    L = best_index_int8(KVALUES, _inverse(d)[:, None] * x)
    out = np.empty((x.shape[0], 18), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = _pack(L)
    return out.reshape(nrows, -1)


def dequantize(data: np.ndarray, n_per_row: int) -> np.ndarray:
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16).astype(F)
    q = np.concatenate([b[:, 2:] & 0x0F, b[:, 2:] >> 4], axis=1)
    return (d * KVALUES.astype(F)[q]).reshape(-1, n_per_row)


@np.errstate(all="ignore")
def quantize_xs(rows: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """IQ4_XS: super-blocks of 256 = 8 blocks of 32; block_iq4_xs {f16 d; u16 scales_h; u8
    scales_l[4]; u8 qs[128]}, value = d * (ls - 32) * kvalues[q] with ls 6 bits per block.

    Oracle: quantize_iq4_xs -> quantize_row_iq4_nl_impl(256, 32, ..., ntry 7). Quirks: sigma2 is
    2*mean x^2 of the whole super-block, summed in order; each block's d is searched as IQ4_NL's;
    the super-block's d = -max_scale/32 (max_scale: the block d of largest magnitude, the first
    on ties; an all-zero super-block stores -0.0); ls = clamp(nearest_int(d_b / d), -32, 31); the
    levels are searched again with the float d*ls (index 8 where that is 0)."""
    rows = np.ascontiguousarray(rows, dtype=F)
    nrows, n = rows.shape
    sb = rows.reshape(-1, 256)
    sigma2 = seqsum(sb * sb) * F(2.0 / 256)
    x = sb.reshape(-1, 32)
    db = search(x, _weights(x, qw, np.repeat(sigma2, 8), nrows)).reshape(-1, 8)
    pick = np.argmax(np.where(np.isnan(db), F(-1), np.abs(db)), axis=1)  # `abs_d > amax_scale`: the first
    max_scale = np.take_along_axis(db, pick[:, None], axis=1)[:, 0]
    max_scale = np.where(np.abs(max_scale) > 0, max_scale, F(0)).astype(F)  # none above 0: stays +0
    d = (-max_scale / F(32)).astype(F)
    ls = np.clip(nearest_int(_inverse(d)[:, None] * db), -32, 31)
    dl = (d[:, None] * ls.astype(F)).astype(F)
    L = best_index_int8(KVALUES, _inverse(dl.reshape(-1))[:, None] * x)
    u = (ls + 32).astype(np.uint16)
    low = (u & 0xF).astype(np.uint8)
    scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
    scales_h = np.zeros(len(u), dtype=np.uint16)
    for b in range(8):
        scales_h |= (u[:, b] >> 4) << (2 * b)
    out = np.empty((len(sb), 136), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = scales_h.astype("<u2").view(np.uint8).reshape(-1, 2)
    out[:, 4:8] = scales_l
    out[:, 8:] = _pack(L).reshape(-1, 128)
    return out.reshape(nrows, -1)


def dequantize_xs(data: np.ndarray, n_per_row: int) -> np.ndarray:
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, 136)
    d = b[:, :2].copy().view(np.float16)[:, 0].astype(F)
    scales_h = b[:, 2:4].copy().view("<u2")[:, 0].astype(np.int32)
    low = np.stack([b[:, 4 + k // 2] >> (4 * (k % 2)) & 0xF for k in range(8)], axis=1).astype(np.int32)
    ls = low | (((scales_h[:, None] >> (2 * np.arange(8))) & 3) << 4)
    dl = d[:, None] * (ls - 32).astype(F)
    qs = b[:, 8:].reshape(-1, 8, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)
    return (dl[:, :, None] * KVALUES.astype(F)[q]).reshape(-1, n_per_row)
