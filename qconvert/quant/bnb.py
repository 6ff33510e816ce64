"""bitsandbytes' weight formats as its CPU backend (bitsandbytes 0.50) computes them, so that the
codes and statistics are the bytes transformers saves after loading the same weights with a
BitsAndBytesConfig.

4-bit (NF4, FP4; functional.quantize_4bit and its default kernel): the weight flattened in
row-major order, as float32, in blocks of `blocksize` (the last one may be shorter);
absmax = max |w| per block; x = clamp(w * (1 / absmax), -1, 1) for the whole blocks, w / absmax
for a last short one (a reciprocal and a division: the two round differently); the code is the
index of x's bucket among the midpoints of the sorted 16 levels, a value on a midpoint going to
the lower level (torch.bucketize); FP4's levels are not sorted in code order, so the bucket is
mapped back through their argsort (its +0 and -0 levels are equal: values just below zero take
the first of them in that order, values just above the second). Two codes per byte, the first
in the high nibble.

Double quantization (QLoRA's, `compress_statistics`): offset = mean(absmax) (float32, torch's
reduction); absmax - offset quantized blockwise, 256 per block, to 8-bit codes of the signed
dynamic map (create_dynamic_map: seven decades of linearly spaced fractions and their
negatives, 0 and 1), by the C kernel's lookup table (quantize_nested).

8-bit (LLM.int8(), Int8Params): the weight rounded to float16 first; row_stats = max |w| per
row (float32); codes = round(w * (127 / row_stats)) (float32, half to even) as int8; the
checkpoint stores the codes as `weight` and row_stats as `SCB`; w' = codes * SCB / 127.
"""
from __future__ import annotations

import json
from functools import cache

import torch

from qconvert.quant.blocks import _k

# QLoRA's NormalFloat levels (the quantiles of N(0, 1) scaled to [-1, 1]), as bitsandbytes' get_4bit_type("nf4")
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bits; code 1 is its subnormal), before dividing by the largest;
# code 8 is "-0" in its source, an integer literal: +0.0 in the quant_map it writes
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
NESTED_BLOCK = 256  # double quantization's block of absmax values
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit takes


@cache
def levels(kind: str) -> torch.Tensor:
    """The 16 levels of a 4-bit code ("nf4" or "fp4"), float32, in code order: the `quant_map`."""
    data = torch.tensor(_NF4 if kind == "nf4" else _FP4, dtype=torch.float32)
    return data / data.abs().max()


@cache
def _buckets(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 15 midpoints of the sorted levels, each bucket's code as uint8): the levels' argsort,
    the identity for NF4, whose levels are sorted."""
    code = levels(kind)
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order.to(torch.uint8)


@cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): for decades
    10^-6 .. 10^0, 2^i (i = 0..6) fractions, the midpoints of a float32 linspace(0.1, 1), times
    the decade and its negative; then 0 and 1; sorted; float32."""
    data: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (-6 + i)
        data += (decade * means).tolist() + (-decade * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _blocks(a: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, the values scaled into [-1, 1]) of float32 a as quantize_4bit scales them."""
    n = a.numel()
    full = n - n % block
    whole = a[:full].reshape(-1, block)
    absmax = whole.abs().amax(1)
    scaled = torch.clamp(whole * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    if full < n:
        am = a[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / am, -1, 1)])
    return absmax, scaled


def quantize_4bit(w: torch.Tensor, block: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2), 1], absmax float32 [blocks]) of weight w (any float dtype); the C
    kernel (kernels/bnb.c) unless QCONVERT_PUREPYTHON=1, the same bytes."""
    a = w.reshape(-1).float().contiguous()
    bounds, codes = _buckets(kind)
    if _k is not None and block <= 4096:
        packed = torch.empty((a.numel() + 1) // 2, dtype=torch.uint8)
        absmax = torch.empty(-(-a.numel() // block), dtype=torch.float32)
        _k.bnb4_quantize(a.numpy(), packed.numpy(), absmax.numpy(), block, bounds.numpy(), codes.numpy(),
                         torch.get_num_threads())
        return packed[:, None], absmax
    absmax, scaled = _blocks(a, block)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = codes[torch.bucketize(scaled, bounds)]
    return ((q[::2] << 4) | q[1::2])[:, None], absmax


LUT_BINS = 65536  # bitsandbytes' CPU 8-bit quantizer: [-1, 1] in this many bins, each mapped to a level


@cache
def _lut() -> torch.Tensor:
    """The level of each of the LUT_BINS bins of [-1, 1], as bitsandbytes' build_quantize_lut
    makes it for the dynamic map: bin i stands for -1 + 2i / 65535 (float32) and takes the
    level nearest to that, a value on a midpoint the lower level."""
    code = dynamic_map()
    mids = 0.5 * (code[:-1] + code[1:])
    centres = -1.0 + (2.0 * torch.arange(LUT_BINS, dtype=torch.float32)) / (LUT_BINS - 1)
    return torch.searchsorted(mids, centres, right=False).to(torch.uint8)


def quantize_nested(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, float32 scales per 256) of float32 v by the dynamic map, as bitsandbytes'
    C kernel (quantize_cpu) computes them: scale = max |v| of the block (a zero block's codes are
    0); x = v * (1 / scale); the code is the level of x's bin, bin = trunc((x + 1) * 0.5 * 65535
    + 0.5), the last multiply and add fused (one rounding, as the kernel's FMA gives)."""
    n = v.numel()
    pad = -n % NESTED_BLOCK
    blocks = torch.nn.functional.pad(v, (0, pad)).reshape(-1, NESTED_BLOCK)
    scale = blocks.abs().amax(1)
    zero = scale[:, None] == 0
    x = torch.clamp(torch.where(zero, 0.0, blocks * (1.0 / scale)[:, None]), -1.0, 1.0)
    half = (x + 1.0) * 0.5
    bins = (half.double() * (LUT_BINS - 1) + 0.5).float().long()  # float64 holds the product exactly: an FMA
    codes = torch.where(zero, torch.zeros((), dtype=torch.uint8), _lut()[bins])
    return codes.reshape(-1)[:n], scale


def quantize_linear_4bit(w: torch.Tensor, block: int, kind: str, double_quant: bool) -> dict[str, torch.Tensor]:
    """Weight w [N, K] in the dtype transformers loads it in -> the linear's tensors."""
    packed, absmax = quantize_4bit(w, block, kind)
    state = {"quant_type": kind, "blocksize": block, "dtype": str(w.dtype).removeprefix("torch."),
             "shape": list(w.shape)}
    parts = {"weight": packed, "weight.absmax": absmax, "weight.quant_map": levels(kind).clone()}
    if double_quant:
        offset = absmax.mean()
        codes, scales = quantize_nested(absmax - offset)
        parts.update({"weight.absmax": codes, "weight.nested_absmax": scales,
                      "weight.nested_quant_map": dynamic_map().clone()})
        state.update({"nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": offset.item()})
    parts[f"weight.quant_state.bitsandbytes__{kind}"] = torch.frombuffer(bytearray(json.dumps(state).encode()),
                                                                         dtype=torch.uint8)
    return parts


def read_state(blob) -> dict:
    """The JSON a `quant_state.bitsandbytes__*` tensor holds."""
    return json.loads(bytes(memoryview(blob).cast("B")).decode("utf-8"))


def dequantize_4bit(parts: dict[str, torch.Tensor], state: dict) -> torch.Tensor:
    """The linear's tensors (names after its prefix) -> its weight, float32, as bitsandbytes'
    dequantize_4bit computes it (level times the block's absmax, in float32; with double
    quantization absmax = dynamic level * nested scale + offset)."""
    block, shape = int(state["blocksize"]), [int(x) for x in state["shape"]]
    code = parts["weight.quant_map"].float()
    absmax = parts["weight.absmax"]
    if "nested_blocksize" in state:
        nb = int(state["nested_blocksize"])
        dyn = parts["weight.nested_quant_map"].float()[absmax.long()]
        scales = parts["weight.nested_absmax"].float()
        absmax = dyn * scales.repeat_interleave(nb)[:absmax.numel()] + float(state["nested_offset"])
    absmax = absmax.float().contiguous()
    n = shape[0] * shape[1]
    packed = parts["weight"].reshape(-1).contiguous()
    if _k is not None:
        out = torch.empty(n, dtype=torch.float32)
        _k.bnb4_dequantize(packed.numpy(), absmax.numpy(), code.contiguous().numpy(), out.numpy(), block,
                           torch.get_num_threads())
        return out.reshape(shape)
    q = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]
    vals = code[q.long()]
    full = n - n % block
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (vals[:full].reshape(-1, block) * absmax[:full // block, None]).reshape(-1)
    if full < n:
        out[full:] = vals[full:] * absmax[-1]
    return out.reshape(shape)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [N, K], SCB float32 [N]) of weight w [N, K], as Int8Params quantizes it."""
    h = w.to(torch.float16)
    row_stats = h.abs().amax(1).float()
    codes = torch.round(h * (127.0 / row_stats[:, None]))
    return codes.nan_to_num(0.0).to(torch.int8), row_stats


def dequantize_int8(codes: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    return codes.float() * (scb.float()[:, None] / 127.0)
