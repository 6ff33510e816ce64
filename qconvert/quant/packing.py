"""Integer packing of 2/4/8-bit codes into int32 words, as GPTQ and AWQ checkpoints store them."""
from __future__ import annotations

import numpy as np


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """[K, N] codes -> int32 [K*bits/32, N], value j of a word at bit bits*j (GPTQ's qweight)."""
    per = 32 // bits
    K, N = codes.shape
    c = codes.astype(np.uint32).reshape(K // per, per, N)
    out = np.zeros((K // per, N), dtype=np.uint32)
    for j in range(per):
        out |= c[:, j, :] << np.uint32(bits * j)
    return out.view(np.int32)


def unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 32 // bits
    p = packed.view(np.uint32)
    mask = np.uint32(2 ** bits - 1)
    out = np.stack([(p >> np.uint32(bits * j)) & mask for j in range(per)], axis=1)
    return out.reshape(p.shape[0] * per, p.shape[1]).astype(np.int32)


def pack_cols(codes: np.ndarray, bits: int) -> np.ndarray:
    """[G, N] -> int32 [G, N*bits/32], packed along the output dimension (GPTQ's qzeros)."""
    return np.ascontiguousarray(pack_rows(np.ascontiguousarray(codes.T), bits).T)


def unpack_cols(packed: np.ndarray, bits: int) -> np.ndarray:
    return np.ascontiguousarray(unpack_rows(np.ascontiguousarray(packed.T), bits).T)
