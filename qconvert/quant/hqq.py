"""HQQ (Badri and Shaji, half-quadratic quantization) as hqq 0.2.8's `Quantizer.quantize` computes
it with the settings transformers' HqqConfig gives it (`hqq_base_quant_config`: channel-wise,
optimize, axis 1, zero rounded before optimizing for 4-bit only), step by step in torch, so that
the codes, scales and zeros are those hqq computes on the same weights.

axis 1: the weight [N, K] flattened row-major and cut into rows of `group` values ([N K / group,
group]); per row, float32: scale = (2^bits - 1) / (max - min) (1 where max - min <= 1e-4;
at most 2e4), zero = -min * scale (rounded for 4-bit). Then the proximal solver
(optimize_weights_proximal_legacy, its defaults: lp norm 0.7, beta 10, 20 iterations): each
iteration q = clamp(round(w scale + zero)), w_r = (q - zero) / scale, e = shrink(w - w_r) (the
generalised soft threshold |x| - |x|^(p-1) / beta, kept when positive, with x's sign),
zero = mean over the row of q - (w - e) scale; it stops at the first iteration whose mean |w -
w_r| over the whole tensor is not below the best so far (keeping that iteration's zero, as hqq
does). The scale is never changed. Finally q = clamp(round(w scale + zero)), and the stored
scale is 1 / scale; transformers' HQQLinear converts scale and zero to its compute dtype (the
model's dtype). Dequantized: (q - zero) * scale in that dtype.

Packing (BitPack): the code rows [R, group] as uint8 (8-bit), two rows per byte row (4-bit: row
r in the high nibble, row r + R/2 in the low), four per byte row (2-bit, the first quarter in the
highest bits), or ten 3-bit rows per int32 row (rows padded with zeros to a multiple of 10, the
first tenth in bits 27..29).
"""
from __future__ import annotations

import torch

BITS = (2, 3, 4, 8)  # the widths hqq packs (its 1-bit and 1.58-bit are left out: not in HqqConfig's docs)
PACKING = {8: "8bit_u8", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8"}
LP_NORM = 0.7
BETA = 10.0
ITERS = 20
GROUPS = (8, 16, 32, 64, 128, 256, 512, 1024)  # hqq_base_quant_config: a multiple of 8


def fits(n_out: int, n_in: int, group: int, bits: int) -> bool:
    """Whether hqq quantizes and packs a weight [n_out, n_in] in groups of `group`: whole groups,
    and whole byte rows of 4-bit (2 code rows) and 2-bit (4) codes."""
    n = n_out * n_in
    return n % group == 0 and (n // group) % {4: 2, 2: 4}.get(bits, 1) == 0


def _shrink(x: torch.Tensor) -> torch.Tensor:
    """hqq's shrink_lp_op for lp_norm < 1, with its in-place steps."""
    out = torch.abs(x)
    out.sub_((1.0 / BETA) * out.pow(LP_NORM - 1)).clamp_min_(0.0)
    out.mul_(torch.sign(x))
    return out


# |x| - |x|^(p-1) / beta <= 0 for |x| <= beta^(-1/p) = 0.170 (p = 0.7, beta = 10): the shrink
# operator gives exactly 0 there. Below this bound (8% margin in |x|^p, far beyond pow's error)
# an iteration whose every |w - w_r| lies under it needs no shrink at all: e = 0 and w - e = w.
NO_SHRINK = 0.16


def quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N K / group, group] uint8, scale [N K / group, 1] float32, zero [same] float32) of a
    weight w [N, K]: hqq's Quantizer.quantize(w, nbits=bits, group_size=group, axis=1,
    channel_wise=True, optimize=True, round_zero=bits == 4), bit for bit.

    The same float32 operations in the same order, but w * scale computed once (the scale never
    changes, and hqq's (w - e) * scale is that product wherever e is 0), and the shrink skipped in
    iterations where it is 0 everywhere (NO_SHRINK): for LLM weights, whose rounding errors are
    far below 0.16, that is every iteration. An iteration with a larger error shrinks the whole
    tensor, as hqq does (torch's vectorised pow and its scalar tail may differ in the last bit, so
    a subset would not do)."""
    W = w.float().reshape(-1, group)
    lo = W.min(dim=1, keepdim=True)[0]
    hi = W.max(dim=1, keepdim=True)[0]
    top = round(2 ** bits - 1)
    denom = hi - lo
    scale = top / denom
    scale = torch.where(denom.abs() <= 1e-4, torch.full_like(scale, 1.0), scale)
    scale = scale.clamp(max=2e4)
    zero = -lo * scale
    if bits == 4:
        zero = torch.round(zero)
    ws = W * scale
    q, d = torch.empty_like(W), torch.empty_like(W)
    best = torch.tensor(torch.inf, dtype=torch.float32)
    for _ in range(ITERS):
        torch.add(ws, zero, out=q).round_().clamp_(0, top)
        torch.sub(q, zero, out=d).div_(scale)  # w_r
        torch.sub(W, d, out=d)  # w - w_r
        ad = torch.abs(d)
        if float(ad.max()) > NO_SHRINK:
            zero = torch.mean(q - (W - _shrink(d)) * scale, dim=1, keepdim=True)
        else:
            zero = torch.mean(q.sub_(ws), dim=1, keepdim=True)
        err = ad.mean().float()
        del ad
        if err < best:
            best = err
        else:
            break
    q = torch.add(ws, zero, out=q).round_().clamp_(0, top)
    return q.to(torch.uint8), 1.0 / scale, zero


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """hqq's BitPack of the code rows [R, group] (uint8)."""
    if bits == 8:
        return q.to(torch.uint8)
    if bits == 4:
        half = len(q) // 2
        return (q[:half] << 4) | q[half:]
    if bits == 2:
        step = len(q) // 4
        return q[:step] << 6 | q[step:2 * step] << 4 | q[2 * step:3 * step] << 2 | q[3 * step:]
    if bits == 3:
        padded = torch.zeros([10 * -(-len(q) // 10), q.shape[1]], dtype=torch.int32)
        padded[:len(q)] = q
        step = len(padded) // 10
        out = padded[:step] << 27
        for j in range(1, 10):
            out |= padded[j * step:(j + 1) * step] << (27 - 3 * j)
        return out
    raise ValueError(f"HQQ packs {', '.join(map(str, BITS))} bits, not {bits}")


def unpack(p: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """The code rows [rows, group] (uint8) of packed p."""
    if bits == 8:
        return p.to(torch.uint8)
    if bits == 3:
        parts = [(p >> (27 - 3 * j)) & 0b111 for j in range(10)]
    else:
        per = 8 // bits
        mask = (1 << bits) - 1
        parts = [(p >> (8 - bits * (j + 1))) & mask for j in range(per)]
    return torch.cat(parts)[:rows].to(torch.uint8)


def packed_rows(rows: int, bits: int) -> int:
    """The packed tensor's number of rows for `rows` code rows."""
    return {8: rows, 4: rows // 2, 2: rows // 4}.get(bits, -(-rows // 10))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """hqq's Quantizer.dequantize: ((q - zero) * scale) in the scale's dtype, reshaped to shape."""
    return ((q.to(scale.dtype) - zero) * scale).reshape(shape)
