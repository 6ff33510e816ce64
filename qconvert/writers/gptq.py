"""The GPTQ checkpoint layout: per quantized linear qweight / qzeros / scales / g_idx.

W[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]). qweight int32 [K*b/32, N] packs codes
along the input dimension; qzeros int32 [G, N*b/32] packs along the output dimension; scales f16
[G, N]; g_idx int32 [K]. checkpoint_format "gptq" (v1) stores zero - 1, "gptq_v2" the zero itself.
"""
from __future__ import annotations

import numpy as np

from qconvert.quant.gptq import GPTQResult
from qconvert.quant.packing import pack_cols, pack_rows, unpack_cols, unpack_rows


def gptq_tensors(r: GPTQResult, bits: int, v2: bool) -> dict[str, np.ndarray]:
    """qweight, qzeros, scales, g_idx of one linear. v1 ("gptq") stores zero - 1; v2 the zero."""
    zeros = r.zeros.numpy().astype(np.int64) - (0 if v2 else 1)
    zeros &= 2 ** bits - 1  # v1 asymmetric zero 0 wraps, as every v1 writer does
    return {"qweight": pack_rows(np.ascontiguousarray(r.q.numpy().T), bits),
            "qzeros": pack_cols(zeros, bits),
            "scales": r.scales.numpy().astype(np.float16),
            "g_idx": r.g_idx.numpy().astype(np.int32)}


def dequantize_gptq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None,
                    bits: int, v2: bool) -> np.ndarray:
    """W [N, K] float32 from a GPTQ checkpoint's tensors."""
    q = unpack_rows(qweight, bits)  # [K, N]
    z = unpack_cols(qzeros, bits)  # [G, N]
    if not v2:
        z = z + 1
    K = q.shape[0]
    if g_idx is None:
        g_idx = np.arange(K) // (K // scales.shape[0])
    s = scales.astype(np.float32)[g_idx]
    return np.ascontiguousarray((s * (q - z[g_idx]).astype(np.float32)).T)
