"""MXFP4 (OCP microscaling FP4): blocks of 32 weights, an E8M0 exponent byte e then qs[16]
(element j in the low nibble of qs[j], element j + 16 in the high one), each nibble an E2M1
code; value = KVALUES[q] * 2^(e - 128), KVALUES being twice E2M1's values.

Oracle: ggml `quantize_row_mxfp4_ref`, which `quantize_mxfp4` calls whatever the importance
matrix. Quirks: e = floorf(log2f(amax)) - 2 + 127 (0 for an all-zero block), so the largest
magnitude may exceed the grid's 6 * 2^(e-127) and clamp; each weight takes the first nearest
code (+0 before -0), compared as |KVALUES[q] * d - x| in float32.
"""
from __future__ import annotations

import numpy as np

QK = 32
BLOCK_BYTES = 17
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: 2^(e - 128), exactly (e 0 and 1 as float32 subnormals)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


def exponents(amax: np.ndarray) -> np.ndarray:
    """floorf(log2f(amax)) - 2 + 127 as uint8 (wrapping as the C cast does), 0 where amax is 0.
    log2f's result is the float64 logarithm rounded to float32 (a value within a float32 step
    below a power of two rounds up to it, as log2f's does)."""
    with np.errstate(divide="ignore"):
        lg = np.log2(amax.astype(np.float64)).astype(np.float32)
    e = np.where(amax > 0, np.floor(np.where(amax > 0, lg, 0)).astype(np.int64) - 2 + 127, 0)
    return (e & 0xFF).astype(np.uint8)


def quantize(rows: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 [nrows, n] -> uint8 [nrows, n/32*17]; importance weights ignored, as ggml's."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n = rows.shape
    x = rows.reshape(-1, QK)
    e = exponents(np.abs(x).max(axis=1))
    d = e8m0_half(e)[:, None, None]
    with np.errstate(over="ignore", invalid="ignore"):  # magnitudes near float32's end, as in C
        err = np.abs(KVALUES[None, None, :] * d - x[:, :, None])  # [B, 32, 16], float32
    q = np.argmin(err, axis=-1).astype(np.uint8)  # the first of equals, as the C loop's strict <
    out = np.empty((x.shape[0], BLOCK_BYTES), dtype=np.uint8)
    out[:, 0] = e
    out[:, 1:] = q[:, :16] | (q[:, 16:] << 4)
    return out.reshape(nrows, n // QK * BLOCK_BYTES)


def dequantize(data: np.ndarray, n_per_row: int) -> np.ndarray:
    """uint8 blocks -> float32 [nrows, n_per_row]."""
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    d = e8m0_half(b[:, 0])[:, None]
    q = np.concatenate((b[:, 1:] & 0x0F, b[:, 1:] >> 4), axis=1)
    return (KVALUES[q] * d).reshape(-1, n_per_row)
