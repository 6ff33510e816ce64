"""TQ1_0 and TQ2_0: ternary super-blocks of 256, value = d * (t - 1) with t in {0, 1, 2}.

Oracles: ggml quantize_row_tq1_0_ref / quantize_row_tq2_0_ref (ggml_quantize_chunk calls them
with or without an importance matrix: they take none). d = max |x| of the super-block (f16),
t = lroundf(x * (1/d)) + 1, the product in float32 and lroundf rounding halves away from zero (d
= 0: every t is 1).
TQ1_0 {qs[48]; qh[4]; f16 d} (54 bytes): five trits per byte, the first the most significant,
the byte stored as ceil(v * 256 / 243) (v the base-3 number); qs[0..32) hold elements m + 32n
(m < 32, n < 5), qs[32..48) elements 160 + m + 16n (m < 16), qh[j] elements 240 + j + 4n (n <
4) then a zero trit. TQ2_0 {qs[64]; f16 d} (66 bytes): four per byte, element 128h + m + 32n at
bits 2n of byte 32h + m.
"""
from __future__ import annotations

import numpy as np

F = np.float32
POW3 = np.array([1, 3, 9, 27, 81, 243], dtype=np.uint8)


def _trits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(f16 d bytes [B, 2], trits 0..2 [B, 256]) of super-blocks x [B, 256]."""
    d = np.abs(x).max(axis=1).astype(F)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d != 0, F(1) / np.where(d == 0, F(1), d), F(0)).astype(F)
        v = (x * inv[:, None]).astype(np.float64)  # the product in float32, rounded exactly in float64
        d_bytes = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    t = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64) + 1  # lroundf: halves away from zero
    return d_bytes, t


def _base3(groups: np.ndarray) -> np.ndarray:
    """Trits [..., 5] (most significant first) -> bytes ceil(v * 256 / 243)."""
    v = np.zeros(groups.shape[:-1], dtype=np.int64)
    for n in range(groups.shape[-1]):
        v = (v * 3 + groups[..., n]) & 0xFF  # uint8 arithmetic, as ggml's
    return ((v * 256 + 242) // 243).astype(np.uint8)


def quantize(kind: str, rows: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=F)
    x = rows.reshape(-1, 256)
    d_bytes, t = _trits(x)
    B = x.shape[0]
    if kind == "TQ2_0":
        q = t.reshape(B, 2, 4, 32) & 3
        qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(B, 64)
        out = np.concatenate([qs.astype(np.uint8), d_bytes], axis=1)
    else:
        a = _base3(t[:, :160].reshape(B, 5, 32).transpose(0, 2, 1))  # byte m: elements m + 32n
        b = _base3(t[:, 160:240].reshape(B, 5, 16).transpose(0, 2, 1))
        c = t[:, 240:].reshape(B, 4, 4).transpose(0, 2, 1)  # byte j: elements 240 + j + 4n
        h = _base3(np.concatenate([c, np.zeros((B, 4, 1), np.int64)], axis=2))
        out = np.concatenate([a, b, h, d_bytes], axis=1)
    return out.reshape(rows.shape[0], -1)


def dequantize(kind: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    size = 66 if kind == "TQ2_0" else 54
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, size)
    d = b[:, -2:].copy().view(np.float16)[:, 0].astype(F)
    if kind == "TQ2_0":
        q = (b[:, :64].reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
        t = q.reshape(-1, 256).astype(np.int32)
    else:
        def trits(byts: np.ndarray, n: int) -> np.ndarray:  # [B, m] -> [B, n, m]
            q = (byts[:, None, :] * POW3[:n, None]).astype(np.uint8)  # wraps as uint8
            return (q.astype(np.uint16) * 3) >> 8
        t = np.concatenate([trits(b[:, :32], 5).reshape(-1, 160), trits(b[:, 32:48], 5).reshape(-1, 80),
                            trits(b[:, 48:52], 4).reshape(-1, 16)], axis=1).astype(np.int32)
    return ((t - 1).astype(F) * d[:, None]).reshape(-1, n_per_row)
