"""The AWQ GEMM checkpoint layout (4-bit): per quantized linear qweight / qzeros / scales.

qweight int32 [K, N/8] packs codes along the output dimension with AWQ's interleave: slot i
(bits 4i..4i+3) of word c holds column 8c + AWQ_ORDER[i]; qzeros int32 [G, N/8] the same for
the zero points (stored as they are); scales f16 [G, N]; no g_idx. W[k, n] = (q - z) s with the
group g = k // group_size.
"""
from __future__ import annotations

import numpy as np

from qconvert.quant.awq import AWQResult

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_interleaved(codes: np.ndarray) -> np.ndarray:
    """[R, N] 4-bit codes -> int32 [R, N/8]."""
    R, N = codes.shape
    c = codes.astype(np.uint32).reshape(R, N // 8, 8)
    out = np.zeros((R, N // 8), dtype=np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        out |= c[:, :, col] << np.uint32(4 * i)
    return out.view(np.int32)


def unpack_interleaved(packed: np.ndarray) -> np.ndarray:
    p = packed.view(np.uint32)
    R, W = p.shape
    out = np.empty((R, W, 8), dtype=np.int32)
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = (p >> np.uint32(4 * i)) & np.uint32(15)
    return out.reshape(R, W * 8)


def awq_tensors(r: AWQResult) -> dict[str, np.ndarray]:
    return {"qweight": pack_interleaved(np.ascontiguousarray(r.q.numpy().T)),
            "qzeros": pack_interleaved(r.zeros.numpy()),
            "scales": r.scales.numpy().astype(np.float16)}


def dequantize_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """W [N, K] float32 from an AWQ GEMM checkpoint's tensors."""
    q = unpack_interleaved(qweight)  # [K, N]
    z = unpack_interleaved(qzeros)  # [G, N]
    g = q.shape[0] // scales.shape[0]
    w = (q - np.repeat(z, g, axis=0)).astype(np.float32) * np.repeat(scales.astype(np.float32), g, axis=0)
    return np.ascontiguousarray(w.T)
