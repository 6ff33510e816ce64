"""Q1_0: blocks of 128 weights {f16 d; qs[16]} (18 bytes), value = +d or -d: one sign bit each.

Oracle: ggml quantize_row_q1_0_ref (ggml/src/ggml-quants.c); quantize_q1_0, which
ggml_quantize_chunk calls, runs it with or without an importance matrix: it reads none, nor does
this. d = (|x0| + |x1| + ... + |x127|) / 128, the sum in float32 in index order (not numpy's
pairwise order: the low bits of d, and so its f16 rounding, depend on it), stored as f16 (round to
nearest even; a sum that overflows gives inf). Bit j % 8 of qs[j / 8] is set where x[j] >= 0, so
-0.0 counts as positive and NaN as negative. The signs do not depend on d.
"""
from __future__ import annotations

import numpy as np

F = np.float32
QK = 128


@np.errstate(over="ignore")  # a sum that overflows float gives inf, as ggml's
def quantize(rows: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 [nrows, n] -> uint8 [nrows, n/128*18]; `qw` is ignored, as ggml ignores it."""
    rows = np.ascontiguousarray(rows, dtype=F)
    x = rows.reshape(-1, QK)
    a = np.abs(x)
    total = np.zeros(x.shape[0], F)
    for j in range(QK):  # one float32 add per element, in ggml's order
        total += a[:, j]
    d = (total / F(QK)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    qs = np.packbits(x >= 0, axis=1, bitorder="little")
    return np.concatenate([d, qs], axis=1).reshape(rows.shape[0], -1)


def dequantize(data: np.ndarray, n_per_row: int) -> np.ndarray:
    """ggml dequantize_row_q1_0: bit set -> d, clear -> -d."""
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16)[:, 0].astype(F)[:, None]
    bits = np.unpackbits(b[:, 2:], axis=1, bitorder="little").astype(bool)
    return np.where(bits, d, -d).reshape(-1, n_per_row)
