"""Float conversions, as the GGUF tools do them."""
from __future__ import annotations

import numpy as np


def f32_to_f16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even; numpy's cast agrees with ggml's GGML_FP32_TO_FP16 for finite input."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """As gguf.quants and ggml_compute_fp32_to_bf16: NaN made quiet, else round half to even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = ((u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f16_to_f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).view(np.float16).astype(np.float32)


def first_nonfinite(x: np.ndarray) -> int:
    bad = np.flatnonzero(~np.isfinite(np.asarray(x, dtype=np.float32).reshape(-1)))
    return int(bad[0]) if bad.size else -1
