"""IQ4_NL: blocks of 32 as indices into a non-linear table; value = d*kvalues[q].

Oracle: ggml quantize_iq4_nl -> quantize_row_iq4_nl_impl(32, 32, ..., ntry=7), which
llama-quantize calls with or without an imatrix. Quirks: weights x^2, or qw*sqrt(sigma2 + x^2)
with sigma2 = 2*mean x^2 of the block; d starts at max/127 (signed value of largest magnitude),
is refit by least squares, then tried at (itry-127)/max for itry in -7..7; best_index_int8 takes
the upper entry on ties; levels use the float d, the file stores f16(d); zero blocks: d=0, 0x88.
"""
from __future__ import annotations

import numpy as np

from qconvert.quant.reference.search import GROUP_MAX_EPS, F, best_index_int8, seqsum, signed_absmax

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


@np.errstate(all="ignore")  # inf/NaN appear where ggml's floats overflow too; the bytes still match
def quantize(rows: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=F)
    nrows, n = rows.shape
    x = rows.reshape(-1, 32)
    sigma2 = seqsum(x * x) * F(2.0 / 32)
    if qw is not None:
        w = np.tile(qw.astype(F).reshape(-1, 32), (nrows, 1)) * np.sqrt(sigma2[:, None] + x * x)
    else:
        w = x * x
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
        d = np.where(zero, F(0), d).astype(F)
        inv = np.where(d != 0, F(1) / np.where(d == 0, F(1), d), F(0)).astype(F)
    L = best_index_int8(KVALUES, inv[:, None] * x).astype(np.uint8)
    out = np.empty((x.shape[0], 18), dtype=np.uint8)
    with np.errstate(over="ignore"):
        out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = L[:, :16] | (L[:, 16:] << 4)
    return out.reshape(nrows, -1)


def dequantize(data: np.ndarray, n_per_row: int) -> np.ndarray:
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16).astype(F)
    q = np.concatenate([b[:, 2:] & 0x0F, b[:, 2:] >> 4], axis=1)
    return (d * KVALUES.astype(F)[q]).reshape(-1, n_per_row)
