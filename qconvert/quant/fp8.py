"""FP8 (E4M3) weights with float scales, as compressed-tensors 0.20 computes them for
llm-compressor's FP8_DYNAMIC (one scale per output channel) and FP8_BLOCK (one per 128 x 128
block) schemes: every step in the weight's own dtype (bfloat16 for a bfloat16 checkpoint), so
the codes and scales are the bytes llm-compressor writes for the same weights.

    scale = max(|min(w, 0)|, max(w, 0)) / 448  over the channel or block, in w's dtype;
            a zero scale becomes that dtype's epsilon (compressed-tensors' calculate_qparams)
    code  = fp8(clamp(w / scale + 0, -448, 448))  the division rounded to w's dtype first,
            then round-to-nearest-even to E4M3; "+ 0" is the zero point compressed-tensors
            adds (it turns -0.0 into +0.0); a block's rows and columns past the tensor's edge
            are zero padding, which no maximum above 0 can change
    w'    = fp8 value * scale, rounded to the scale's dtype (compressed-tensors' dequantize)

transformers' own `fp8` layout (FineGrainedFP8Config, DeepSeek-V3's and Qwen3-FP8's) is made
by its Fp8Quantize op in float32 instead: per 128 x 128 block, m = max |w| (1 where it is 0),
code = fp8(clamp(w * (448 / m), -448, 448)), and it stores weight_scale_inv = 1 / (448 / m),
float32; w' = code * weight_scale_inv.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def _scales(absmax: torch.Tensor) -> torch.Tensor:
    s = absmax / E4M3_MAX
    return torch.where(s == 0, torch.tensor(torch.finfo(s.dtype).eps, dtype=s.dtype), s)


def _codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(w / scale + 0.0, -E4M3_MAX, E4M3_MAX).to(FP8)


def channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn [N, K], scales [N, 1] in w's dtype) of w [N, K]."""
    absmax = torch.maximum(w.amin(1, keepdim=True).clamp(max=0).abs(), w.amax(1, keepdim=True).clamp(min=0))
    s = _scales(absmax)
    return _codes(w, s), s


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w [N, K] zero-padded to whole blocks, as [N/bh, bh, K/bw, bw]."""
    bh, bw = block
    N, K = w.shape
    padded = torch.nn.functional.pad(w, (0, -K % bw, 0, -N % bh))
    return padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)


def blockwise(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn [N, K], scales [ceil(N/bh), ceil(K/bw)] in w's dtype) of w [N, K]."""
    N, K = w.shape
    b = _blocks(w, block)
    absmax = torch.maximum(b.amin((1, 3)).clamp(max=0).abs(), b.amax((1, 3)).clamp(min=0))
    s = _scales(absmax)
    codes = _codes(b, s[:, None, :, None]).reshape(b.shape[0] * block[0], b.shape[2] * block[1])
    return codes[:N, :K].contiguous(), s


def transformers_blockwise(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn [N, K], weight_scale_inv float32 [N/bh, K/bw]) of w [N, K] (whole
    blocks only) as transformers' Fp8Quantize computes them."""
    N, K = w.shape
    b = w.float().reshape(N // block[0], block[0], K // block[1], block[1])
    m = b.abs().amax((1, 3))
    scales = E4M3_MAX / torch.where(m > 0, m, torch.ones_like(m))
    scales = torch.where(m > 0, scales, torch.ones_like(scales))
    codes = torch.clamp(b * scales[:, None, :, None], -E4M3_MAX, E4M3_MAX).to(FP8)
    return codes.reshape(N, K), (1.0 / scales).float()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """Weights [N, K] in the scales' dtype from codes [N, K] and scales: per output channel
    [N, 1] or for the whole tensor ([1] or [1, 1]) without `block`, else one per block."""
    N, K = codes.shape
    x = codes.to(scales.dtype)
    if block is None:
        return x * scales.reshape(-1, 1)
    s = scales.repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)[:, :K]
    return x * s
