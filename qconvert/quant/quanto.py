"""optimum-quanto's weight quantization (0.2.7) as `QuantizedModelForCausalLM.quantize(model,
weights=qint8 | qint4)` computes it on a CPU, in the weight's own dtype (every step below is a
torch operation in that dtype, as quanto does it), so that the tensors are those quanto saves.

qint8 (AbsmaxOptimizer, per output channel): scale = max |w| per row / 127; codes =
clamp(round(w / scale), -128, 127) as int8; w' = codes * scale.

qint4 (MaxOptimizer, affine, float shift): the weight cut into groups of `group` inputs of each
row (quanto's group(): [N K / group, group]; one group per row when the layer has no group
size); per group scale = (max - min) / 15, shift = -min; codes = clamp(round((w + shift) /
scale), 0, 15) as uint8; w' = codes * scale - shift. A layer's group size is 128, or the largest
of 128, 96, 64 (at least 32, in steps of 32) that divides its input width, when the width is
larger than 128; otherwise none (per row). On a CPU, bfloat16 weights with groups of 128 go
through quanto's tinygemm layout, which keeps shift as min + 8 scale and gives back
8 scale - (min + 8 scale) when saved: that lossy round trip (in bfloat16) is the shift written.
Codes are packed two a byte across rows: row r of the first ceil(R/2) in the low nibble, row
r + ceil(R/2) in the high one.
"""
from __future__ import annotations

import torch


def group_size(n_in: int) -> int | None:
    """quanto's QModuleMixin rule for a qint4 linear's group size (None: one group per row)."""
    g = 128
    if n_in > g:
        while n_in % g != 0 and g > 32:
            g -= 32
        if n_in % g == 0:
            return g
    return None


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] int8, scale [N, 1] in w's dtype)."""
    scale = torch.amax(torch.abs(torch.abs(w)), dim=[1], keepdim=True) / 127
    codes = torch.clamp(torch.round(w / scale), min=-128, max=127).to(torch.int8)
    return codes, scale


def quantize_int4(w: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [R, group or K] uint8, scale [R, 1], shift [R, 1] in w's dtype) of w [N, K]."""
    base = w.reshape(-1, group) if group is not None else w
    rmin = torch.amin(base, dim=[1], keepdim=True)
    rmax = torch.amax(base, dim=[1], keepdim=True)
    scale = (rmax - rmin) / 15
    shift = -rmin
    codes = torch.clamp(torch.round((base + shift) / scale), min=0, max=15).to(torch.uint8)
    if w.dtype == torch.bfloat16 and group == 128:  # the tinygemm round trip
        half = 8 * scale
        shift = half - (-shift + half)
    return codes, scale, shift


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """quanto's pack_weights for 4 bits: [R, C] -> [ceil(R/2), C] uint8."""
    half = (len(codes) + 1) // 2
    out = codes[:half].clone()
    out[:len(codes) - half] |= codes[half:] << 4
    return out


def unpack4(packed: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([packed & 0x0F, packed >> 4])[:rows]


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    shape: tuple[int, int]) -> torch.Tensor:
    """quanto's QBitsDequantizer: scale * codes - shift, in the scale's dtype, as [N, K]."""
    return (scale * codes.to(scale.dtype) - shift).reshape(shape)


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return scale * codes.to(scale.dtype)
