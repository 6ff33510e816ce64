"""Q8_0: blocks of 32 weights, f16 scale d then int8 qs[32]; value = d*q.

Oracle: ggml `quantize_row_q8_0_ref` (ggml/src/ggml-quants.c), which `ggml_quantize_chunk`
calls for GGML_TYPE_Q8_0; the importance matrix is ignored there and here.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK = 32
BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][1]  # gguf's size table: 34


def roundf(x: np.ndarray) -> np.ndarray:
    """C roundf: half away from zero (np.round would round half to even)."""
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0).astype(x.dtype)


def quantize(rows: np.ndarray) -> np.ndarray:
    """float32 [nrows, n] -> uint8 [nrows, n/32*34]."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n = rows.shape
    blocks = rows.reshape(-1, QK)
    amax = np.abs(blocks).max(axis=1, keepdims=True)  # max is exact in any order
    d = amax / np.float32(127)  # float division, as `amax / ((1 << 7) - 1)`
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    # quirk: the levels use the float d; only the stored scale is rounded to f16
    qs = roundf(blocks * inv).astype(np.int8)
    out = np.empty((blocks.shape[0], BLOCK_BYTES), dtype=np.uint8)
    with np.errstate(over="ignore"):  # as ggml: a scale beyond f16 is stored as inf (the pipeline refuses it)
        out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = qs.view(np.uint8)
    return out.reshape(nrows, n // QK * BLOCK_BYTES)


def dequantize(data: np.ndarray, n_per_row: int) -> np.ndarray:
    """uint8 blocks -> float32 [nrows, n_per_row]."""
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(-1, n_per_row)
