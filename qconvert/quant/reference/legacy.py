"""Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32. Oracles: ggml quantize_row_q{4,5}_{0,1}_ref (no
importance matrix) and quantize_row_q{4,5}_{0,1}_impl (with one), which ggml_quantize_chunk
calls. Quirks: the _ref paths truncate, (int8)(x*id + 8.5f) clamped to 15 (16.5f and 31 for Q5_0,
+0.5f for Q4_1/Q5_1, Q5_1 unclamped), with d = max/-8 or max/-16 from the signed value of
largest magnitude; the _impl paths weight by qw*sqrt(sigma2 + x^2), sigma2 = mean x^2 of the row.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qconvert.quant.reference.search import F, make_qkx_quants, make_qx_quants, seqsum, signed_absmax

BYTES = {name: GGML_QUANT_SIZES[GGMLQuantizationType[name]][1] for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1")}  # gguf's size table


def _f16(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _nibbles(L: np.ndarray) -> np.ndarray:
    L = L.astype(np.uint8)
    return (L[:, :16] & 0x0F) | ((L[:, 16:] & 0x0F) << 4)


def _qh(L: np.ndarray) -> np.ndarray:
    bits = ((L.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _trunc_u8(v: np.ndarray) -> np.ndarray:
    """C's (int8_t) of a float, then as uint8: truncation toward zero."""
    return np.trunc(v).astype(np.int64).astype(np.int8).astype(np.uint8)


def row_mean_squares(rows: np.ndarray) -> np.ndarray:
    """Each row's mean square as quantize_row_*_impl sums it: sigma2 of the importance weights."""
    return seqsum(rows * rows) / F(rows.shape[1])


def _importance(rows: np.ndarray, qw: np.ndarray, ms: np.ndarray | None = None) -> np.ndarray:
    sigma2 = row_mean_squares(rows) if ms is None else ms.astype(F)
    blocks = rows.reshape(rows.shape[0], -1, 32)
    w = qw.reshape(1, -1, 32).astype(F) * np.sqrt(sigma2[:, None, None] + blocks * blocks)
    return w.reshape(-1, 32)


@np.errstate(all="ignore")  # inf/NaN appear where ggml's floats overflow too; the bytes still match
def quantize(kind: str, rows: np.ndarray, qw: np.ndarray | None, ms: np.ndarray | None = None) -> np.ndarray:
    """ms: with qw, each row's mean square in the importance weights in place of its own."""
    rows = np.ascontiguousarray(rows, dtype=F)
    x = rows.reshape(-1, 32)
    out = np.zeros((x.shape[0], BYTES[kind]), dtype=np.uint8)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if qw is not None:
            w = _importance(rows, qw, ms)
            if kind in ("Q4_0", "Q5_0"):
                d, L = make_qx_quants(x, 8 if kind == "Q4_0" else 16, w)
                out[:, :2] = _f16(d)
            else:
                d, the_min, L = make_qkx_quants(x, 15 if kind == "Q4_1" else 31, w, -0.9, 0.05, 36, True)
                out[:, :2], out[:, 2:4] = _f16(d), _f16(-the_min)
        elif kind in ("Q4_0", "Q5_0"):
            _, mx = signed_absmax(x)
            d = (mx / F(-8 if kind == "Q4_0" else -16)).astype(F)
            inv = np.where(d != 0, F(1) / np.where(d == 0, F(1), d), F(0)).astype(F)
            top, off = (15, F(8.5)) if kind == "Q4_0" else (31, F(16.5))
            L = np.minimum(top, _trunc_u8(x * inv[:, None] + off))
            out[:, :2] = _f16(d)
        else:
            mn, mx = x.min(axis=1), x.max(axis=1)
            d = ((mx - mn) / F(15 if kind == "Q4_1" else 31)).astype(F)
            inv = np.where(d != 0, F(1) / np.where(d == 0, F(1), d), F(0)).astype(F)
            L = _trunc_u8((x - mn[:, None]) * inv[:, None] + F(0.5))
            if kind == "Q4_1":
                L = np.minimum(15, L)
            out[:, :2], out[:, 2:4] = _f16(d), _f16(mn)
    if kind == "Q4_0":
        out[:, 2:] = _nibbles(L)
    elif kind == "Q4_1":
        out[:, 4:] = _nibbles(L)
    elif kind == "Q5_0":
        out[:, 2:6], out[:, 6:] = _qh(L), _nibbles(L)
    else:
        out[:, 4:8], out[:, 8:] = _qh(L), _nibbles(L)
    return out.reshape(rows.shape[0], -1)


def dequantize(kind: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BYTES[kind])
    d = b[:, :2].copy().view(np.float16).astype(F)
    qs_at = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[kind]
    qs = b[:, qs_at:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)
    if kind in ("Q5_0", "Q5_1"):
        qh = b[:, qs_at - 4:qs_at].copy().view("<u4")
        q |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)
    if kind == "Q4_0":
        y = (q - 8).astype(F) * d
    elif kind == "Q5_0":
        y = (q - 16).astype(F) * d
    else:
        m = b[:, 2:4].copy().view(np.float16).astype(F)
        y = q.astype(F) * d + m
    return y.reshape(-1, n_per_row)
