"""The safetensors layouts of quantized linear layers, each defined once: the tensors it stores
for a linear (names, dtypes, shapes), how codes, scales and zero points pack into them and
unpack again, and the quantization_config that names it. Planning and writing a checkpoint
(checkpoint.py) and reading one (read/quantized.py) all go through these classes.

GPTQ: W[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]); qweight int32 [K*b/32, N]
packs codes along the input dimension, qzeros int32 [G, N*b/32] along the output dimension,
scales f16 [G, N], g_idx int32 [K]; checkpoint_format "gptq" (v1) stores zero - 1, "gptq_v2"
the zero itself.

AWQ GEMM (4-bit): qweight int32 [K, N/8] packs codes along the output dimension with AWQ's
interleave (slot i, bits 4i..4i+3, of word c holds column 8c + AWQ_ORDER[i]); qzeros int32
[G, N/8] the same for the zero points (stored as they are); scales f16 [G, N]; no g_idx;
W[k, n] = (q - z) s with the group g = k // group_size.

compressed-tensors pack-quantized: see PackQuantized.

compressed-tensors float-quantized (FP8): weight F8_E4M3 [N, K], the linear's own name;
weight_scale [N, 1] (per output channel) or [ceil(N/128), ceil(K/128)] (per 128 x 128 block) in
the checkpoint's float dtype; W = fp8 value * scale, read back exactly in float32 (quant/fp8.py
holds the maths).

transformers' fp8 (FineGrainedFP8): weight F8_E4M3 [N, K]; weight_scale_inv F32 [ceil(N/128), ceil(K/128)],
one per 128 x 128 block (written: whole blocks only, as transformers' dequantizer needs them;
read: the last row and column of blocks may be partial, as DeepSeek-V3 ships them); W = fp8 value *
weight_scale_inv, in float32.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from qconvert import __version__
from qconvert.errors import InputError
from qconvert.quant import bnb, fp8, hqq, quanto
from qconvert.quant.activations import ActivationQuant
from qconvert.read.safetensors import DTYPES

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass
class Entry:
    """One tensor of a safetensors checkpoint, before its data exists."""

    name: str
    dtype: str  # safetensors spelling
    shape: tuple[int, ...]
    exact: bool = True  # False: `shape` bounds the one known when the data is (it ends its shard; the writer)

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Params:
    """What a checkpoint's quantization_config says about its layout."""

    bits: int
    group_size: int
    v2: bool = False  # GPTQ's checkpoint_format gptq_v2: zero points stored as they are
    dtype: str = "F16"  # the scales' dtype (compressed-tensors: the checkpoint's float dtype)
    block: tuple[int, int] | None = None  # FP8: block scales of this shape, else one per output channel
    acts: ActivationQuant | None = None  # what the loader does to each quantized linear's input; None: nothing
    kind: str = ""  # bitsandbytes 4-bit: "nf4" or "fp4"
    double_quant: bool = False  # bitsandbytes 4-bit: the block scales quantized again (QLoRA's)
    compute_dtype: str = "float32"  # bitsandbytes 4-bit: the dtype its kernels compute in
    hidden: int = 0  # quanto 4-bit, read: the model's hidden size (its tensors alone do not give a linear's shape)


class Layout:
    method: ClassVar[str]  # quant_method in quantization_config
    parts: ClassVar[tuple[str, ...]]  # tensors per linear, after its prefix
    marker: ClassVar[str] = "qweight"  # the part whose presence says a linear is quantized
    unused: ClassVar[tuple[str, ...]] = ()  # a linear's tensors a weight-only reader leaves out (activation scales)
    required: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")

    @classmethod
    def label(cls, p: Params) -> str:
        """The method as `--to` names it."""
        return cls.method

    @classmethod
    def entries(cls, prefix: str, n_out: int, n_in: int, p: Params) -> list[Entry]:
        raise NotImplementedError

    @classmethod
    def pack(cls, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray | None,
             p: Params) -> dict[str, np.ndarray]:
        """Codes q [N, K], scales and zero points [G, N] (and g_idx [K]) -> the linear's tensors."""
        raise NotImplementedError

    @classmethod
    def unpack(cls, parts: dict[str, np.ndarray], p: Params) -> np.ndarray:
        """The linear's tensors -> its weight [N, K] float32."""
        raise NotImplementedError

    @classmethod
    def shape(cls, parts: dict[str, tuple[int, ...]], p: Params) -> tuple[int, int]:
        """(out, in) features of a linear from its tensors' shapes."""
        raise NotImplementedError

    @classmethod
    def linear_shape(cls, p: Params, prefix: str, shapes: dict[str, tuple[int, ...]],
                     where: object) -> tuple[int, int, int]:
        """(out features, in features, group size) of one quantized linear from its tensors'
        shapes, checked (group size -1: one group per output channel)."""
        missing = [k for k in cls.required if k not in shapes]
        if missing:
            raise InputError(f"{where}: quantized linear {prefix} has no {missing[0]} tensor")
        return cls.checked_shape(p, prefix, shapes, where)

    @classmethod
    def tensor_shape(cls, p: Params, prefix: str, parts: dict, where: object,
                     expected: tuple[int, ...] | None = None) -> tuple[int, int, int]:
        """linear_shape from the linear's tensors themselves (a layout whose shapes do not say
        it reads what they hold); `expected`, the weight's [out, in] as the config makes it, where
        known, for a layout whose tensors fit more than one (quanto's)."""
        return cls.linear_shape(p, prefix, {k: tuple(t.shape) for k, t in parts.items()}, where)

    @classmethod
    def checked_shape(cls, p: Params, prefix: str, shapes: dict[str, tuple[int, ...]],
                      where: object) -> tuple[int, int, int]:
        """linear_shape once every required part is there (GPTQ's and AWQ's packed parts)."""
        if len(shapes["qweight"]) != 2 or len(shapes["scales"]) != 2:
            raise InputError(f"{where}: {prefix}.qweight and .scales must be 2-D, got {list(shapes['qweight'])} "
                             f"and {list(shapes['scales'])}")
        n_out, n_in = cls.shape(shapes, p)
        n_groups, cols = shapes["scales"]
        if cols != n_out or n_groups < 1 or n_in % n_groups:
            raise InputError(f"{where}: {prefix}.scales has shape {[n_groups, cols]}, which does not fit a "
                             f"{n_out} x {n_in} {p.bits}-bit weight")
        group = -1 if n_groups == 1 and p.group_size == -1 else n_in // n_groups
        return n_out, n_in, group

    @classmethod
    def config(cls, p: Params, extra: dict) -> dict:
        """quantization_config for config.json."""
        raise NotImplementedError

    @classmethod
    def params(cls, qcfg: dict, where: object) -> Params:
        """Params from a checkpoint's quantization_config; anything this layout cannot decode is
        an InputError naming `where`."""
        raise NotImplementedError


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


def pack_interleaved(codes: np.ndarray) -> np.ndarray:
    """[R, N] 4-bit codes -> int32 [R, N/8] in AWQ's interleaved order."""
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


def _meta(extra: dict) -> dict:
    return {"quantizer": [f"qconvert:{__version__}"], **extra}


class GPTQ(Layout):
    method = "gptq"
    parts = ("qweight", "qzeros", "scales", "g_idx")

    @classmethod
    def entries(cls, prefix: str, n_out: int, n_in: int, p: Params) -> list[Entry]:
        n_groups = -(-n_in // (n_in if p.group_size == -1 else p.group_size))
        return [Entry(prefix + ".qweight", "I32", (n_in * p.bits // 32, n_out)),
                Entry(prefix + ".qzeros", "I32", (n_groups, n_out * p.bits // 32)),
                Entry(prefix + ".scales", "F16", (n_groups, n_out)),
                Entry(prefix + ".g_idx", "I32", (n_in,))]

    @classmethod
    def pack(cls, q, scales, zeros, g_idx, p):
        z = zeros.astype(np.int64) - (0 if p.v2 else 1)
        z &= 2 ** p.bits - 1  # v1 asymmetric zero 0 wraps, as every v1 writer does
        return {"qweight": pack_rows(np.ascontiguousarray(q.T), p.bits), "qzeros": pack_cols(z, p.bits),
                "scales": scales.astype(np.float16), "g_idx": g_idx.astype(np.int32)}

    @classmethod
    def unpack(cls, parts, p):
        q = unpack_rows(parts["qweight"], p.bits)  # [K, N]
        z = unpack_cols(parts["qzeros"], p.bits)  # [G, N]
        if not p.v2:
            z = z + 1
        scales = parts["scales"]
        K = q.shape[0]
        g_idx = parts.get("g_idx")
        if g_idx is None:
            g_idx = np.arange(K) // (K // scales.shape[0])
        s = scales.astype(np.float32)[g_idx]
        return np.ascontiguousarray((s * (q - z[g_idx]).astype(np.float32)).T)

    @classmethod
    def shape(cls, parts, p):
        qw = parts["qweight"]
        return qw[1], qw[0] * 32 // p.bits

    @classmethod
    def config(cls, p: Params, extra: dict) -> dict:
        fmt = "gptq_v2" if p.v2 else "gptq"
        act_order = extra.get("act_order", False)
        return {"bits": p.bits, "group_size": p.group_size, "desc_act": False, "sym": not p.v2,
                "lm_head": False, "quant_method": "gptq", "checkpoint_format": fmt, "format": fmt,
                "pack_dtype": "int32", "damp_percent": extra["damp_percent"], "true_sequential": True,
                "static_groups": act_order, "meta": _meta(extra)}

    @classmethod
    def params(cls, qcfg: dict, where: object) -> Params:
        bits = qcfg.get("bits", 4)
        if bits not in (2, 4, 8):
            raise InputError(f"{where}: {bits}-bit GPTQ cannot be decoded (2, 4 and 8 can)")
        fmt = str(qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))).lower()
        return Params(bits, _group(qcfg, where), v2=fmt == "gptq_v2")


class AWQ(Layout):
    method = "awq"
    parts = ("qweight", "qzeros", "scales")

    @classmethod
    def entries(cls, prefix: str, n_out: int, n_in: int, p: Params) -> list[Entry]:
        n_groups = -(-n_in // (n_in if p.group_size == -1 else p.group_size))
        return [Entry(prefix + ".qweight", "I32", (n_in, n_out * p.bits // 32)),
                Entry(prefix + ".qzeros", "I32", (n_groups, n_out * p.bits // 32)),
                Entry(prefix + ".scales", "F16", (n_groups, n_out))]

    @classmethod
    def pack(cls, q, scales, zeros, g_idx, p):
        return {"qweight": pack_interleaved(np.ascontiguousarray(q.T)), "qzeros": pack_interleaved(zeros),
                "scales": scales.astype(np.float16)}

    @classmethod
    def unpack(cls, parts, p):
        q = unpack_interleaved(parts["qweight"])  # [K, N]
        z = unpack_interleaved(parts["qzeros"])  # [G, N]
        scales = parts["scales"]
        g = q.shape[0] // scales.shape[0]
        w = (q - np.repeat(z, g, axis=0)).astype(np.float32) * np.repeat(scales.astype(np.float32), g, axis=0)
        return np.ascontiguousarray(w.T)

    @classmethod
    def shape(cls, parts, p):
        qw = parts["qweight"]
        return qw[1] * 32 // p.bits, qw[0]

    @classmethod
    def config(cls, p: Params, extra: dict) -> dict:
        return {"quant_method": "awq", "bits": p.bits, "group_size": p.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None, "meta": _meta(extra)}

    @classmethod
    def params(cls, qcfg: dict, where: object) -> Params:
        if qcfg.get("bits", 4) != 4 or str(qcfg.get("version", "gemm")).lower() != "gemm":
            raise InputError(f"{where}: only 4-bit AWQ GEMM checkpoints can be decoded")
        return Params(4, _group(qcfg, where))


def _group(qcfg: dict, where: object) -> int:
    g = qcfg.get("group_size", 128)
    if type(g) is not int or not (g == -1 or g > 0):
        raise InputError(f"{where}: quantization_config group_size must be -1 or positive, got {g!r}")
    return g


TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as the bytes a safetensors writer takes (bfloat16 and float8 as their bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A checkpoint tensor's array (as read/safetensors.py views it) as a torch tensor of `dtype`."""
    a = np.ascontiguousarray(a).reshape(np.shape(a))  # ascontiguousarray makes a scalar 1-D
    if dtype == "BF16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    if dtype == "F8_E4M3":
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(a.copy())


def float_tensor(a: np.ndarray) -> torch.Tensor:
    """A float checkpoint tensor's array as read (bfloat16 as its uint16 bits) as torch, its dtype kept."""
    a = np.asarray(a)
    return from_numpy(a, {np.dtype(np.uint16): "BF16", np.dtype(np.float16): "F16"}.get(a.dtype, "F32"))


class CompressedTensors(Layout):
    """What compressed-tensors' formats share: quant_method, one config group targeting Linear,
    the quantization_config as llm-compressor saves it (compressed-tensors 0.20's
    ModelCompressor.update_config), with qconvert named in `meta` (compressed-tensors ignores
    keys it does not know)."""

    method = "compressed-tensors"
    format: ClassVar[str]

    @classmethod
    def compressed_tensors_config(cls, weights: dict, acts: dict | None, extra: dict) -> dict:
        return {"version": "0.20.0", "quant_method": cls.method, "sparsity_config": {}, "transform_config": {},
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                              "output_activations": None, "format": cls.format}},
                "kv_cache_scheme": None, "format": cls.format, "quantization_status": "compressed",
                "global_compression_ratio": None,
                "ignore": [x if x == "lm_head" else f"re:.*{x}.*" for x in extra.get("ignore", ["lm_head"])],
                "moe_sparsity_config": None, "meta": _meta({k: v for k, v in extra.items() if k != "ignore"})}

    @classmethod
    def group(cls, qcfg: dict, where: object) -> dict:
        """The one config group."""
        groups = qcfg.get("config_groups")
        if not isinstance(groups, dict) or len(groups) != 1:
            raise InputError(f"{where}: compressed-tensors checkpoints with {len(groups or {})} config groups "
                             "cannot be read (one can)")
        return next(iter(groups.values()))

    @classmethod
    def weight_args(cls, qcfg: dict, where: object) -> dict:
        """The one config group's weight arguments."""
        return cls.group(qcfg, where).get("weights") or {}

    @classmethod
    def activations(cls, qcfg: dict, where: object) -> ActivationQuant | None:
        """The one config group's input activations."""
        return ActivationQuant.from_compressed_tensors(cls.group(qcfg, where).get("input_activations"), where)


class FloatQuantized(CompressedTensors):
    """compressed-tensors' float-quantized format: FP8 E4M3 weights with float scales per output
    channel (llm-compressor's FP8_DYNAMIC) or per block (FP8_BLOCK), activations quantized
    dynamically by the loader (per token, or per group of 128 with block weights)."""

    format = "float-quantized"
    parts = ("weight", "weight_scale")
    marker = "weight_scale"
    required = parts
    unused = ("input_scale", "input_zero_point", "weight_zero_point", "output_scale", "output_zero_point")

    @classmethod
    def label(cls, p: Params) -> str:
        return "fp8" if p.block is None else "fp8-block"

    @classmethod
    def scale_shape(cls, n_out: int, n_in: int, p: Params) -> tuple[int, int]:
        if p.block is None:
            return (n_out, 1)
        return (-(-n_out // p.block[0]), -(-n_in // p.block[1]))

    @classmethod
    def entries(cls, prefix: str, n_out: int, n_in: int, p: Params) -> list[Entry]:
        return [Entry(prefix + ".weight", "F8_E4M3", (n_out, n_in)),
                Entry(prefix + ".weight_scale", p.dtype, cls.scale_shape(n_out, n_in, p))]

    @classmethod
    def pack(cls, q, scales, zeros, g_idx, p):
        return {"weight": q, "weight_scale": scales}

    @classmethod
    def unpack(cls, parts, p):
        codes = from_numpy(parts["weight"], "F8_E4M3")
        # the exact products, in float32 (as FP8 kernels and llama.cpp's converter take them;
        # compressed-tensors' own decompression rounds them to the scales' dtype)
        return fp8.dequantize(codes.float(), float_tensor(parts["weight_scale"]).float(), p.block).numpy()

    @classmethod
    def checked_shape(cls, p, prefix, shapes, where):
        w, s = shapes["weight"], tuple(shapes["weight_scale"])
        if len(w) != 2:
            raise InputError(f"{where}: {prefix}.weight must be 2-D, got {list(w)}")
        n_out, n_in = w
        fits = (s in ((1,), (1, 1)) and p.block is None) or s == cls.scale_shape(n_out, n_in, p)
        if not fits:
            raise InputError(f"{where}: {prefix}.weight_scale has shape {list(s)}, which does not fit a "
                             f"{n_out} x {n_in} weight with {_scheme(p)} scales")
        return n_out, n_in, -1

    @classmethod
    def config(cls, p: Params, extra: dict) -> dict:
        """As llm-compressor saves it (compressed-tensors 0.20's ModelCompressor.update_config),
        with qconvert named in `meta` (compressed-tensors ignores keys it does not know)."""
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                   "strategy": "channel", "dynamic": False}
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
                "dynamic": True}
        if p.block is not None:
            weights = {**weights, "strategy": "block", "block_structure": list(p.block)}
            acts = {**acts, "group_size": p.block[1], "strategy": "group"}
        return cls.compressed_tensors_config(weights, acts, extra)

    @classmethod
    def params(cls, qcfg: dict, where: object) -> Params:
        w = cls.weight_args(qcfg, where)
        strategy = str(w.get("strategy", "")).lower()
        if (w.get("num_bits"), str(w.get("type", "")).lower()) != (8, "float") or not w.get("symmetric", True) \
                or strategy not in ("channel", "tensor", "block"):
            raise InputError(f"{where}: float-quantized weights {w.get('num_bits')}-bit {w.get('type')} "
                             f"{strategy or '(no strategy)'} cannot be read; 8-bit float with channel, tensor or "
                             "block scales can")
        block = None
        if strategy == "block":
            b = w.get("block_structure")
            if not (isinstance(b, list) and len(b) == 2 and all(type(x) is int and x > 0 for x in b)):
                raise InputError(f"{where}: block_structure must be two positive integers, got {b!r}")
            block = (b[0], b[1])
        return Params(8, -1, block=block, acts=cls.activations(qcfg, where))


class TransformersFP8(Layout):
    """transformers' `fp8` quantization (FineGrainedFP8Config): FP8 E4M3 weights with float32
    block scales stored as `weight_scale_inv`, dynamic activations; the layout DeepSeek-V3,
    Qwen3-FP8 and Kimi ship, which vLLM serves and transformers dequantizes on a CPU."""

    method = "fp8"
    parts = ("weight", "weight_scale_inv")
    marker = "weight_scale_inv"
    required = parts
    unused = ("activation_scale",)

    @classmethod
    def label(cls, p: Params) -> str:
        return "fp8-block"

    @classmethod
    def entries(cls, prefix: str, n_out: int, n_in: int, p: Params) -> list[Entry]:
        bh, bw = p.block
        return [Entry(prefix + ".weight", "F8_E4M3", (n_out, n_in)),
                Entry(prefix + ".weight_scale_inv", "F32", (n_out // bh, n_in // bw))]

    @classmethod
    def pack(cls, q, scales, zeros, g_idx, p):
        return {"weight": q, "weight_scale_inv": scales}

    @classmethod
    def unpack(cls, parts, p):
        codes = from_numpy(parts["weight"], "F8_E4M3")
        scales = from_numpy(np.asarray(parts["weight_scale_inv"], np.float32), "F32")
        return fp8.dequantize(codes.float(), scales, p.block).numpy()

    @classmethod
    def checked_shape(cls, p, prefix, shapes, where):
        w, s = shapes["weight"], tuple(shapes["weight_scale_inv"])
        if len(w) != 2:
            raise InputError(f"{where}: {prefix}.weight must be 2-D, got {list(w)}")
        n_out, n_in = w
        # the last row and column of blocks may be partial: DeepSeek-V3's kv_a_proj_with_mqa has
        # 576 rows, 5 rows of scales (the converter, vLLM and DeepSeek's own kernels crop them)
        if s != (-(-n_out // p.block[0]), -(-n_in // p.block[1])):
            raise InputError(f"{where}: {prefix}.weight_scale_inv has shape {list(s)}, which does not fit a "
                             f"{n_out} x {n_in} weight with {_scheme(p)} scales")
        return n_out, n_in, -1

    @classmethod
    def config(cls, p: Params, extra: dict) -> dict:
        """As DeepSeek-V3 and Qwen3-FP8 ship it (transformers' FineGrainedFP8Config takes the
        rest as defaults), with qconvert named in `meta`."""
        return {"quant_method": cls.method, "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": list(p.block), "modules_to_not_convert": extra.get("ignore", ["lm_head"]),
                "meta": _meta({k: v for k, v in extra.items() if k != "ignore"})}

    @classmethod
    def params(cls, qcfg: dict, where: object) -> Params:
        b = qcfg.get("weight_block_size")
        if not (isinstance(b, list) and len(b) == 2 and all(type(x) is int and x > 0 for x in b)):
            raise InputError(f"{where}: fp8 weight_block_size must be two positive integers, got {b!r} (per-tensor "
                             "fp8 checkpoints cannot be read)")
        fmt = str(qcfg.get("scale_fmt", "float")).lower()
        if fmt != "float":
            raise InputError(f"{where}: fp8 scale_fmt {fmt!r} cannot be read (float can)")
        scheme = str(qcfg.get("activation_scheme", "dynamic")).lower()
        acts = ActivationQuant("fp8", b[1], simulated=scheme == "dynamic")  # transformers' act_quant, per weight block width
        return Params(8, -1, dtype="F32", block=(b[0], b[1]), acts=acts)


class PackQuantized(CompressedTensors):
    """compressed-tensors' pack-quantized format (W4A16 and kin, which vLLM prefers for 4-bit
    weights): the integer codes of a GPTQ or AWQ linear, written as llm-compressor writes its
    GPTQ and AWQ. weight_packed int32 [N, ceil(K*b/32)]: each row's codes, stored unsigned
    (value + 2^(b-1)), packed densely along the input dimension (element j of every 32 at bit
    j*b); weight_scale [N, G]; weight_shape int64 [2] = (N, K); asymmetric: weight_zero_point
    int32 [ceil(N*b/32), G], the zero points stored unsigned and packed the same way along the
    output dimension; symmetric ones are 2^(b-1). W = (q - z) s, group k // group_size (or
    weight_g_idx[k] where a checkpoint has it)."""

    format = "pack-quantized"
    parts = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
    marker = "weight_packed"
    required = ("weight_packed", "weight_scale", "weight_shape")

    @classmethod
    def label(cls, p: Params) -> str:
        return "int-packed"

    @classmethod
    def entries(cls, prefix: str, n_out: int, n_in: int, p: Params) -> list[Entry]:
        n_groups = -(-n_in // (n_in if p.group_size == -1 else p.group_size))
        out = [Entry(prefix + ".weight_packed", "I32", (n_out, -(-n_in * p.bits // 32))),
               Entry(prefix + ".weight_scale", "F16", (n_out, n_groups)),
               Entry(prefix + ".weight_shape", "I64", (2,))]
        if p.v2:
            out.append(Entry(prefix + ".weight_zero_point", "I32", (-(-n_out * p.bits // 32), n_groups)))
        return out

    @classmethod
    def pack(cls, q, scales, zeros, g_idx, p):
        N, K = q.shape
        out = {"weight_packed": pack_cols(q, p.bits), "weight_scale": np.ascontiguousarray(scales.T).astype(np.float16),
               "weight_shape": np.array([N, K], dtype=np.int64)}
        if p.v2:
            out["weight_zero_point"] = pack_rows(np.ascontiguousarray(zeros.T), p.bits)
        return out

    @classmethod
    def unpack(cls, parts, p):
        N, K = (int(x) for x in np.asarray(parts["weight_shape"]))
        q = unpack_cols(parts["weight_packed"], p.bits)[:, :K]
        s = parts["weight_scale"].astype(np.float32)  # [N, G]
        if "weight_zero_point" in parts:
            z = unpack_rows(parts["weight_zero_point"], p.bits)[:N]
        else:
            z = np.full(s.shape, 2 ** (p.bits - 1), dtype=np.int32)
        g_idx = parts.get("weight_g_idx")
        g = np.asarray(g_idx, dtype=np.int64) if g_idx is not None else np.arange(K) // -(-K // s.shape[1])
        return (q - z[:, g]).astype(np.float32) * s[:, g]

    @classmethod
    def checked_shape(cls, p, prefix, shapes, where):
        w, s = shapes["weight_packed"], shapes["weight_scale"]
        if len(w) != 2 or len(s) != 2 or w[0] != s[0] or tuple(shapes["weight_shape"]) != (2,):
            raise InputError(f"{where}: {prefix}.weight_packed {list(w)} and .weight_scale {list(s)} do not fit one "
                             f"{p.bits}-bit linear")
        n_out = w[0]
        n_in = s[1] * p.group_size if p.group_size > 0 else w[1] * 32 // p.bits
        if -(-n_in * p.bits // 32) != w[1] or (p.group_size <= 0 and s[1] != 1):
            raise InputError(f"{where}: {prefix}.weight_packed has shape {list(w)}, which does not fit {s[1]} groups "
                             f"of {p.group_size} {p.bits}-bit weights")
        return n_out, n_in, p.group_size if p.group_size > 0 else -1

    @classmethod
    def config(cls, p: Params, extra: dict) -> dict:
        """As llm-compressor saves a GPTQ or AWQ W4A16 checkpoint (static activation order
        recorded as actorder "weight"), with qconvert named in `meta`."""
        weights = {"num_bits": p.bits, "type": "int", "symmetric": not p.v2,
                   "group_size": None if p.group_size == -1 else p.group_size,
                   "strategy": "channel" if p.group_size == -1 else "group", "dynamic": False}
        if extra.get("act_order"):
            weights["actorder"] = "weight"
        return cls.compressed_tensors_config(weights, None, extra)

    @classmethod
    def params(cls, qcfg: dict, where: object) -> Params:
        w = cls.weight_args(qcfg, where)
        bits, strategy = w.get("num_bits"), str(w.get("strategy", "")).lower()
        if str(w.get("type", "int")).lower() != "int" or bits not in (2, 4, 8) or strategy not in ("group", "channel"):
            raise InputError(f"{where}: pack-quantized weights {bits}-bit {w.get('type', 'int')} {strategy or '?'} "
                             "cannot be read; 2-, 4- and 8-bit integers with group or channel scales can")
        g = w.get("group_size") if strategy == "group" else -1
        if strategy == "group" and not (type(g) is int and g > 0):
            raise InputError(f"{where}: group_size must be a positive integer, got {g!r}")
        return Params(bits, g, v2=not w.get("symmetric", True), acts=cls.activations(qcfg, where))


class IntQuantized(CompressedTensors):
    """compressed-tensors' int-quantized format (W8A8 int8, llm-compressor's INT8_W8A8 scheme):
    weight I8 [N, K] (the symmetric codes themselves), weight_scale [N, 1] (one per output
    channel; [1] or [1, 1] for the tensor), activations quantized per token by the loader at
    run time; W = q * scale."""

    format = "int-quantized"
    parts = ("weight", "weight_scale")
    marker = "weight_scale"
    required = parts
    unused = ("input_scale", "input_zero_point", "weight_zero_point")

    @classmethod
    def label(cls, p: Params) -> str:
        return "w8a8"

    @classmethod
    def entries(cls, prefix: str, n_out: int, n_in: int, p: Params) -> list[Entry]:
        return [Entry(prefix + ".weight", "I8", (n_out, n_in)), Entry(prefix + ".weight_scale", "F16", (n_out, 1))]

    @classmethod
    def pack(cls, q, scales, zeros, g_idx, p):
        return {"weight": (q.astype(np.int32) - zeros.T).astype(np.int8),
                "weight_scale": np.ascontiguousarray(scales.T).astype(np.float16)}

    @classmethod
    def unpack(cls, parts, p):
        s = parts["weight_scale"]
        scale = from_numpy(s, "BF16").float().numpy() if s.dtype == np.uint16 else s.astype(np.float32)
        return parts["weight"].astype(np.float32) * scale.reshape(-1, 1)

    @classmethod
    def checked_shape(cls, p, prefix, shapes, where):
        w, s = shapes["weight"], tuple(shapes["weight_scale"])
        if len(w) != 2 or s not in ((w[0], 1), (1,), (1, 1)):
            raise InputError(f"{where}: {prefix}.weight {list(w)} and .weight_scale {list(s)} do not fit one "
                             "per-channel int8 linear")
        return w[0], w[1], -1

    @classmethod
    def config(cls, p: Params, extra: dict) -> dict:
        """As llm-compressor saves its W8A8 int8 (INT8_W8A8), with qconvert named in `meta`."""
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
                   "dynamic": False}
        if extra.get("act_order"):
            weights["actorder"] = "weight"
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
                "dynamic": True}
        return cls.compressed_tensors_config(weights, acts, extra)

    @classmethod
    def params(cls, qcfg: dict, where: object) -> Params:
        w = cls.weight_args(qcfg, where)
        strategy = str(w.get("strategy", "")).lower()
        if (w.get("num_bits"), str(w.get("type", "int")).lower()) != (8, "int") or not w.get("symmetric", True) \
                or strategy not in ("channel", "tensor"):
            raise InputError(f"{where}: int-quantized weights {w.get('num_bits')}-bit {strategy or '?'} "
                             f"{'symmetric' if w.get('symmetric', True) else 'asymmetric'} cannot be read; "
                             "8-bit symmetric with channel or tensor scales can")
        return Params(8, -1, acts=cls.activations(qcfg, where))


def _bnb_config(p: Params, four: bool) -> dict:
    """quantization_config as transformers' BitsAndBytesConfig.to_dict() writes it (5.x), key for
    key; qconvert is named in the shards' metadata instead of a `meta` key."""
    return {"_load_in_4bit": four, "_load_in_8bit": not four,
            "bnb_4bit_compute_dtype": p.compute_dtype if four else "float32", "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": p.kind if four else "fp4", "bnb_4bit_use_double_quant": four and p.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": four, "load_in_8bit": not four,
            "quant_method": "bitsandbytes"}


class BitsAndBytes4bit(Layout):
    """bitsandbytes' 4-bit (NF4, FP4) Linear4bit as transformers saves it: `weight` U8
    [ceil(N*K/2), 1] (two codes a byte, the first in the high nibble, row-major over [N, K]);
    `weight.absmax` F32 [blocks] (one per `blocksize` weights), or with double quantization U8
    codes of absmax - offset by the dynamic map in `weight.nested_quant_map` F32 [256], scaled by
    `weight.nested_absmax` F32 (one per 256 blocks); `weight.quant_map` F32 [16], the levels;
    `weight.quant_state.bitsandbytes__nf4` (or __fp4) U8: the JSON of the rest (quant_type,
    blocksize, dtype, shape, and nested_blocksize, nested_dtype, nested_offset). quant/bnb.py holds
    the maths."""

    method = "bitsandbytes"
    parts = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
             "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")
    marker = "weight.quant_map"
    required = ("weight", "weight.absmax", "weight.quant_map")

    @classmethod
    def label(cls, p: Params) -> str:
        return p.kind or "bnb-4bit"

    @classmethod
    def state_part(cls, parts: dict) -> str:
        found = [k for k in parts if k.startswith("weight.quant_state.bitsandbytes__")]
        return found[0] if len(found) == 1 else ""

    @classmethod
    def entries(cls, prefix: str, n_out: int, n_in: int, p: Params) -> list[Entry]:
        n = n_out * n_in
        blocks = -(-n // p.group_size)
        w = prefix + ".weight"
        out = [Entry(w, "U8", (-(-n // 2), 1)),
               Entry(w + ".absmax", "U8" if p.double_quant else "F32", (blocks,)),
               Entry(w + ".quant_map", "F32", (16,))]
        dtype = str(TORCH_DTYPES[p.dtype]).removeprefix("torch.")
        state = {"quant_type": p.kind, "blocksize": p.group_size, "dtype": dtype, "shape": [n_out, n_in]}
        if p.double_quant:
            out += [Entry(w + ".nested_absmax", "F32", (-(-blocks // bnb.NESTED_BLOCK),)),
                    Entry(w + ".nested_quant_map", "F32", (256,))]
            # the offset's digits are known once the weight is: its longest float repr bounds them
            state.update({"nested_blocksize": bnb.NESTED_BLOCK, "nested_dtype": "float32",
                          "nested_offset": -1.1754943508222875e-38})
        out.append(Entry(f"{w}.quant_state.bitsandbytes__{p.kind}", "U8", (len(json.dumps(state)),),
                         exact=not p.double_quant))
        return out

    @classmethod
    def unpack(cls, parts, p):
        key = cls.state_part(parts)
        state = bnb.read_state(parts[key])
        return bnb.dequantize_4bit({k: torch.from_numpy(np.array(v)) for k, v in parts.items() if k != key},
                                   state).numpy()

    @classmethod
    def tensor_shape(cls, p, prefix, parts, where, expected=None):
        missing = [k for k in cls.required if k not in parts]
        key = cls.state_part(parts)
        if missing or not key:
            raise InputError(f"{where}: bitsandbytes 4-bit linear {prefix} has no "
                             f"{missing[0] if missing else 'single weight.quant_state.bitsandbytes__* tensor'}")
        try:
            state = bnb.read_state(parts[key].array())
            n_out, n_in = (int(x) for x in state["shape"])
            block = int(state["blocksize"])
            nested = "nested_blocksize" in state
            nested_block = int(state["nested_blocksize"]) if nested else 1
            if nested and not math.isfinite(float(state["nested_offset"])):
                raise ValueError(f"nested_offset {state['nested_offset']!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{where}: {prefix}.{key} is not bitsandbytes' quant state JSON ({e})") from None
        blocks = -(-n_out * n_in // max(block, 1))
        shape = {k: tuple(t.shape) for k, t in parts.items()}
        fits = (block > 0 and n_out > 0 and n_in > 0 and shape["weight"] in ((-(-n_out * n_in // 2), 1),
                                                                             (-(-n_out * n_in // 2),))
                and shape["weight.absmax"] == (blocks,) and shape["weight.quant_map"] == (16,))
        if nested:  # the absmax codes index a 256-level map, each 256 of them share a scale
            fits = fits and nested_block > 0 and parts["weight.absmax"].dtype == "U8" \
                and shape.get("weight.nested_quant_map") == (256,) \
                and shape.get("weight.nested_absmax") == (-(-blocks // nested_block),)
        if not fits:
            raise InputError(f"{where}: {prefix}'s bitsandbytes tensors {shape} do not fit a {n_out} x {n_in} 4-bit "
                             f"weight in blocks of {block}{' with double quantization' if nested else ''}")
        return n_out, n_in, block

    @classmethod
    def config(cls, p: Params, extra: dict) -> dict:
        return _bnb_config(p, True)

    @classmethod
    def params(cls, qcfg: dict, where: object) -> Params:
        kind = str(qcfg.get("bnb_4bit_quant_type", "fp4")).lower()
        if kind not in ("nf4", "fp4"):
            raise InputError(f"{where}: bitsandbytes 4-bit quant type {kind!r} cannot be read (nf4 and fp4 can)")
        return Params(4, -1, kind=kind, double_quant=bool(qcfg.get("bnb_4bit_use_double_quant")),
                      compute_dtype=str(qcfg.get("bnb_4bit_compute_dtype", "float32")))


class BitsAndBytes8bit(Layout):
    """bitsandbytes' LLM.int8() Linear8bitLt as transformers saves it: `weight` I8 [N, K], `SCB`
    F32 [N] (each row's max |w|), `weight_format` U8 scalar (0: row-major); W = weight * SCB / 127."""

    method = "bitsandbytes"
    parts = ("weight", "SCB", "weight_format")
    marker = "SCB"
    required = ("weight", "SCB")

    @classmethod
    def label(cls, p: Params) -> str:
        return "int8"

    @classmethod
    def entries(cls, prefix: str, n_out: int, n_in: int, p: Params) -> list[Entry]:
        return [Entry(prefix + ".weight", "I8", (n_out, n_in)), Entry(prefix + ".SCB", "F32", (n_out,)),
                Entry(prefix + ".weight_format", "U8", ())]

    @classmethod
    def unpack(cls, parts, p):
        return bnb.dequantize_int8(torch.from_numpy(np.array(parts["weight"])),
                                   torch.from_numpy(np.array(parts["SCB"]))).numpy()

    @classmethod
    def checked_shape(cls, p, prefix, shapes, where):
        w, s = shapes["weight"], tuple(shapes["SCB"])
        if len(w) != 2 or s != (w[0],):
            raise InputError(f"{where}: {prefix}.weight {list(w)} and .SCB {list(s)} do not fit one int8 linear")
        return w[0], w[1], -1

    @classmethod
    def config(cls, p: Params, extra: dict) -> dict:
        return _bnb_config(p, False)

    @classmethod
    def params(cls, qcfg: dict, where: object) -> Params:
        return Params(8, -1)


def _hqq_scalars(p: Params) -> dict[str, np.ndarray]:
    """An HQQ linear's metadata tensors as hqq's HQQLinear.state_dict encodes them for
    safetensors (encode_safetensor_type: bools U8, ints I32, strings and dtypes as U8 character
    codes, the shape I64), axis 1, transformers' settings."""
    def text(s: str) -> np.ndarray:
        return np.frombuffer(s.encode(), np.uint8).copy()

    def flag(b: bool) -> np.ndarray:
        return np.array(int(b), np.uint8)

    return {"nbits": np.array(p.bits, np.int32), "group_size": np.array(p.group_size, np.int32),
            "axis": np.array(1, np.int32), "packing": text(hqq.PACKING[p.bits]),
            "unpack_view_dtype": text("torch.int32" if p.bits == 3 else "torch.uint8"),
            "view_as_float": flag(False), "quant_scale": flag(False), "quant_zero": flag(False),
            "compute_dtype": text(str(TORCH_DTYPES[p.dtype])), "offload_meta": flag(False),
            "encoded_state_dict": flag(True), "stores_quant_config": flag(True), "channel_wise": flag(True),
            "optimize": flag(True), "round_zero": flag(p.bits == 4)}


class HQQ(Layout):
    """HQQ's HQQLinear as transformers 4.x saves it (HqqConfig; hqq 0.2.8's state_dict, encoded
    for safetensors): `W_q` the packed codes (U8; I32 for 3-bit; quant/hqq.py), `scale` and `zero`
    [N K / group, 1] in the compute dtype (one per group of `group` consecutive weights of the
    row-major weight, axis 1), `shape` I64 [2] = (N, K), and the settings as scalar or character
    tensors (nbits, group_size, axis, packing, unpack_view_dtype, view_as_float, quant_scale,
    quant_zero, compute_dtype, offload_meta, encoded_state_dict, stores_quant_config, channel_wise,
    optimize, round_zero). W = ((q - zero) * scale) in the compute dtype, reshaped to `shape`."""

    method = "hqq"
    parts = ("W_q", "nbits", "group_size", "shape", "scale", "zero", "axis", "packing", "unpack_view_dtype",
             "view_as_float", "quant_scale", "quant_zero", "compute_dtype", "offload_meta", "encoded_state_dict",
             "stores_quant_config", "channel_wise", "optimize", "round_zero")
    marker = "W_q"
    required = ("W_q", "nbits", "group_size", "shape", "scale", "zero", "axis")

    @classmethod
    def label(cls, p: Params) -> str:
        return "hqq"

    @classmethod
    def entries(cls, prefix: str, n_out: int, n_in: int, p: Params) -> list[Entry]:
        rows = n_out * n_in // p.group_size
        out = [Entry(f"{prefix}.W_q", "I32" if p.bits == 3 else "U8", (hqq.packed_rows(rows, p.bits), p.group_size)),
               Entry(f"{prefix}.scale", p.dtype, (rows, 1)), Entry(f"{prefix}.zero", p.dtype, (rows, 1)),
               Entry(f"{prefix}.shape", "I64", (2,))]
        kinds = {np.dtype(np.uint8): "U8", np.dtype(np.int32): "I32"}
        out += [Entry(f"{prefix}.{k}", kinds[v.dtype], v.shape) for k, v in _hqq_scalars(p).items()]
        return out

    @classmethod
    def quantized(cls, w: torch.Tensor, p: Params) -> tuple[dict[str, np.ndarray], torch.Tensor]:
        """(the linear's tensors, its dequantized weight) of a weight; scale and zero stored in the
        compute dtype (the checkpoint's), as HQQLinear keeps them."""
        q, scale, zero = hqq.quantize(w, p.bits, p.group_size)
        dtype = TORCH_DTYPES[p.dtype]
        scale, zero = scale.to(dtype), zero.to(dtype)
        return ({"W_q": hqq.pack(q, p.bits).numpy(), "scale": to_numpy(scale), "zero": to_numpy(zero),
                 "shape": np.array(tuple(w.shape), np.int64), **_hqq_scalars(p)},
                hqq.dequantize(q, scale, zero, tuple(w.shape)))

    @classmethod
    def unpack(cls, parts, p):
        return cls.decode(parts, p).float().numpy()

    @classmethod
    def decode(cls, parts, p) -> torch.Tensor:
        """The weight in the compute dtype, as hqq's HQQLinear.dequantize gives it (either axis)."""
        meta = _hqq_meta(parts)
        w_q = torch.from_numpy(np.array(parts["W_q"]))
        if w_q.dtype != torch.int32 and meta["packing"] == "3bit_32":
            w_q = w_q.view(torch.int32)
        elif w_q.dtype != torch.uint8 and meta["packing"] != "3bit_32":
            w_q = w_q.view(torch.uint8)
        scale, zero = float_tensor(parts["scale"]), float_tensor(parts["zero"])
        n_out, n_in = meta["shape"]
        rows = n_out * n_in // meta["group_size"] if meta["axis"] == 1 else meta["group_size"]
        return hqq.dequantize(hqq.unpack(w_q, meta["nbits"], rows), scale, zero, (n_out, n_in))

    @classmethod
    def tensor_shape(cls, p, prefix, parts, where, expected=None):
        missing = [k for k in cls.required if k not in parts]
        if missing:
            raise InputError(f"{where}: HQQ linear {prefix} has no {missing[0]} tensor")
        try:
            meta = _hqq_meta({k: v.array() for k, v in parts.items() if k != "W_q"})
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{where}: {prefix}'s HQQ settings cannot be read ({e})") from None
        n_out, n_in = meta["shape"]
        bits, group, axis = meta["nbits"], meta["group_size"], meta["axis"]
        n = n_out * n_in
        fits = n_out > 0 and n_in > 0 and group > 0 and n % group == 0 and bits in hqq.BITS and axis in (0, 1) \
            and meta["packing"] == hqq.PACKING.get(bits)
        if fits:
            rows, cols = (n // group, group) if axis == 1 else (group, n // group)
            stats = (rows, 1) if axis == 1 else (1, cols)
            fits = tuple(parts["W_q"].shape) == (hqq.packed_rows(rows, bits), cols) \
                and tuple(parts["scale"].shape) == stats and tuple(parts["zero"].shape) == stats
        if not fits:
            shapes = {k: list(parts[k].shape) for k in ("W_q", "scale", "zero")}
            raise InputError(f"{where}: {prefix}'s HQQ tensors {shapes} do not fit a {n_out} x {n_in} {bits}-bit "
                             f"weight in groups of {group} along axis {axis}")
        return n_out, n_in, group

    @classmethod
    def config(cls, p: Params, extra: dict) -> dict:
        """quantization_config as transformers 4.x's HqqConfig writes it (hqq_base_quant_config)."""
        return {"quant_config": {"offload_meta": False, "scale_quant_params": None,
                                 "weight_quant_params": {"axis": 1, "channel_wise": True, "group_size": p.group_size,
                                                         "nbits": p.bits, "optimize": True,
                                                         "round_zero": p.bits == 4, "view_as_float": False},
                                 "zero_quant_params": None},
                "quant_method": "hqq", "skip_modules": list(extra.get("ignore", ["lm_head"]))}

    @classmethod
    def params(cls, qcfg: dict, where: object) -> Params:
        q = qcfg.get("quant_config")
        w = q.get("weight_quant_params") if isinstance(q, dict) else None
        if not isinstance(w, dict):
            raise InputError(f"{where}: HQQ quant_config without one weight_quant_params for every linear (per-layer "
                             "settings) cannot be read")
        if q.get("scale_quant_params") or q.get("zero_quant_params"):
            raise InputError(f"{where}: HQQ with quantized scales or zeros cannot be read")
        return Params(int(w.get("nbits", 4)), int(w.get("group_size") or -1))


def _hqq_meta(parts: dict) -> dict:
    """An HQQ linear's settings from its encoded tensors (decode_safetensor_type)."""
    def text(k: str) -> str:
        return bytes(np.asarray(parts[k], np.uint8).tolist()).decode()

    def number(k: str) -> int:
        return int(np.asarray(parts[k]).reshape(()))

    shape = [int(x) for x in np.asarray(parts["shape"]).reshape(-1)]
    if len(shape) != 2:
        raise ValueError(f"shape {shape}")
    bits = number("nbits")
    return {"nbits": bits, "group_size": number("group_size"), "axis": number("axis"), "shape": tuple(shape),
            "packing": text("packing") if "packing" in parts else hqq.PACKING.get(bits, "")}


class Quanto(Layout):
    """optimum-quanto's frozen QLinear as QuantizedModelForCausalLM.save_pretrained writes it (no
    quantization_config; `quanto_qmap.json` names each quantized module's weight qtype). qint8:
    `P.weight._data` I8 [N, K], `P.weight._scale` [N, 1]; qint4: `P.weight._data._data` U8
    [ceil(R/2), C] (the codes of [R, C] = [N K / group, group], or [N, K] without groups, packed
    two a byte across rows, the first half of the rows in the low nibbles), `P.weight._scale` and
    `P.weight._shift` [R, 1]; both: `P.input_scale`, `P.output_scale` scalars 1 (no activation
    quantization); every float tensor in the weight's dtype. W = codes * scale (qint8), codes *
    scale - shift (qint4). quant/quanto.py holds the maths."""

    method = "quanto"
    parts = ("weight._data", "weight._data._data", "weight._scale", "weight._shift", "input_scale", "output_scale")
    marker = "weight._scale"
    required = ("weight._scale",)

    @classmethod
    def label(cls, p: Params) -> str:
        return f"quanto-int{p.bits}"

    @classmethod
    def grid(cls, n_out: int, n_in: int) -> tuple[int, int]:
        """(rows, columns) of a qint4 linear's codes."""
        g = quanto.group_size(n_in)
        return (n_out * n_in // g, g) if g else (n_out, n_in)

    @classmethod
    def entries(cls, prefix: str, n_out: int, n_in: int, p: Params) -> list[Entry]:
        if p.bits == 8:
            out = [Entry(f"{prefix}.weight._data", "I8", (n_out, n_in)), Entry(f"{prefix}.weight._scale", p.dtype, (n_out, 1))]
        else:
            rows, cols = cls.grid(n_out, n_in)
            out = [Entry(f"{prefix}.weight._data._data", "U8", (-(-rows // 2), cols)),
                   Entry(f"{prefix}.weight._scale", p.dtype, (rows, 1)), Entry(f"{prefix}.weight._shift", p.dtype, (rows, 1))]
        return out + [Entry(f"{prefix}.input_scale", p.dtype, ()), Entry(f"{prefix}.output_scale", p.dtype, ())]

    @classmethod
    def quantized(cls, w: torch.Tensor, p: Params) -> tuple[dict[str, np.ndarray], torch.Tensor]:
        """(the linear's tensors, its dequantized weight) of a weight in the checkpoint's dtype."""
        one = to_numpy(torch.ones((), dtype=w.dtype))
        if p.bits == 8:
            codes, scale = quanto.quantize_int8(w)
            return ({"weight._data": codes.numpy(), "weight._scale": to_numpy(scale), "input_scale": one,
                     "output_scale": one}, quanto.dequantize_int8(codes, scale))
        codes, scale, shift = quanto.quantize_int4(w, quanto.group_size(w.shape[1]))
        return ({"weight._data._data": quanto.pack4(codes).numpy(), "weight._scale": to_numpy(scale),
                 "weight._shift": to_numpy(shift), "input_scale": one, "output_scale": one},
                quanto.dequantize_int4(codes, scale, shift, tuple(w.shape)))

    @classmethod
    def unpack(cls, parts, p):
        scale = float_tensor(parts["weight._scale"])
        if "weight._data" in parts:
            return quanto.dequantize_int8(torch.from_numpy(np.array(parts["weight._data"])), scale).float().numpy()
        # [R, C] rows of the row-major weight: the reader reshapes them to [N, K]
        codes = quanto.unpack4(torch.from_numpy(np.array(parts["weight._data._data"])), len(scale))
        shift = float_tensor(parts["weight._shift"])
        return quanto.dequantize_int4(codes, scale, shift, tuple(codes.shape)).float().numpy()

    @classmethod
    def tensor_shape(cls, p, prefix, parts, where, expected=None):
        shape = {k: tuple(t.shape) for k, t in parts.items()}
        if "weight._data" in shape:  # qint8
            w = shape["weight._data"]
            if len(w) != 2 or shape["weight._scale"] != (w[0], 1):
                raise InputError(f"{where}: {prefix}'s quanto int8 tensors {shape} do not fit one linear")
            return w[0], w[1], -1
        if "weight._data._data" not in shape or "weight._shift" not in shape:
            raise InputError(f"{where}: quanto linear {prefix} has no weight._data or weight._data._data tensor")
        packed, rows = shape["weight._data._data"], shape["weight._scale"][0]
        if len(packed) != 2 or packed[0] != -(-rows // 2) or shape["weight._shift"] != (rows, 1) \
                or shape["weight._scale"] != (rows, 1):
            raise InputError(f"{where}: {prefix}'s quanto int4 tensors {shape} do not fit one linear")
        # [rows, cols] is [N, K] (no groups) or [N K / g, g] (groups): one of N and K is the hidden size
        cols, h = packed[1], p.hidden
        fits = set()
        if quanto.group_size(cols) is None and h in (rows, cols):
            fits.add((rows, cols))
        if h and rows * cols % h == 0:
            for n_out, n_in in ((rows * cols // h, h), (h, rows * cols // h)):
                if quanto.group_size(n_in) == cols and n_in > cols:
                    fits.add((n_out, n_in))
        if expected is not None and tuple(expected) in fits:
            fits = {tuple(expected)}
        if len(fits) != 1:
            raise InputError(f"{where}: {prefix}'s quanto int4 codes [{rows}, {cols}] fit "
                             f"{'no' if not fits else 'more than one'} linear shape of a model with hidden size {h}")
        n_out, n_in = fits.pop()
        return n_out, n_in, cls.grid(n_out, n_in)[1]

    @classmethod
    def config(cls, p: Params, extra: dict) -> dict | None:
        return None  # quanto writes none: quanto_qmap.json names the modules instead

    @classmethod
    def qmap(cls, prefixes: list[str], p: Params) -> dict:
        return {prefix: {"weights": f"qint{p.bits}", "activations": "none"} for prefix in prefixes}

    @classmethod
    def params_from_qmap(cls, qmap: object, hidden: int, where: object) -> Params:
        kinds = {str(v.get("weights")) for v in qmap.values() if isinstance(v, dict)} if isinstance(qmap, dict) else set()
        acts = {str(v.get("activations", "none")) for v in qmap.values() if isinstance(v, dict)} \
            if isinstance(qmap, dict) else set()
        if len(kinds) != 1 or not kinds <= {"qint4", "qint8"} or acts - {"none"}:
            raise InputError(f"{where}: quanto checkpoints with one weight qtype for every module, qint4 or qint8, "
                             f"and no activation quantization can be read; this one has weights "
                             f"{sorted(kinds) or 'none'}, activations {sorted(acts) or 'none'}")
        return Params(4 if kinds == {"qint4"} else 8, -1, hidden=hidden)


def _scheme(p: Params) -> str:
    return "per-channel" if p.block is None else f"{p.block[0]} x {p.block[1]} block"


LAYOUTS: dict[str, type[Layout]] = {cls.method: cls for cls in (AWQ, GPTQ, TransformersFP8, HQQ)}
COMPRESSED_TENSORS: dict[str, type[Layout]] = {cls.format: cls for cls in (FloatQuantized, PackQuantized,
                                                                             IntQuantized)}


def layout_of(config) -> tuple[type[Layout], Params] | None:
    """The layout and its parameters a checkpoint's config.json names, or None when it names no
    quantization; a quant_method (or compressed-tensors format) no layout decodes is an
    InputError."""
    q = config.data.get("quantization_config")
    qmap = Path(config.path).parent / "quanto_qmap.json"
    if q is None and qmap.is_file():  # optimum-quanto's checkpoints name their modules there instead
        try:
            found = json.loads(qmap.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{qmap}: not readable JSON ({e})") from None
        text = config.data.get("text_config") if isinstance(config.data.get("text_config"), dict) else config.data
        hidden = text.get("hidden_size")
        return Quanto, Quanto.params_from_qmap(found, hidden if isinstance(hidden, int) else 0, qmap)
    if q is None:
        return None
    if not isinstance(q, dict):
        raise InputError(f"{config.path}: quantization_config must be an object, got {q!r}")
    method = str(q.get("quant_method", "")).lower()
    if method == "mxfp4" and config.architecture() == "GptOssForCausalLM":
        return None  # OpenAI's MXFP4 experts: the gpt-oss family decodes them itself (arch/gpt_oss.py)
    if method == FloatQuantized.method:
        fmt = str(q.get("format", "")).lower()
        if fmt not in COMPRESSED_TENSORS:
            raise InputError(f"{config.path}: compressed-tensors format {q.get('format')!r} cannot be read; qconvert "
                             f"reads {', '.join(COMPRESSED_TENSORS)}")
        layout = COMPRESSED_TENSORS[fmt]
        return layout, layout.params(q, config.path)
    if method == BitsAndBytes4bit.method:
        four = bool(q.get("load_in_4bit", q.get("_load_in_4bit")))
        if not four and not q.get("load_in_8bit", q.get("_load_in_8bit")):
            raise InputError(f"{config.path}: a bitsandbytes quantization_config that loads neither 4-bit nor 8-bit")
        layout = BitsAndBytes4bit if four else BitsAndBytes8bit
        return layout, layout.params(q, config.path)
    if method not in LAYOUTS:
        raise InputError(f"{config.path}: quant_method {q.get('quant_method')!r} cannot be read; qconvert reads "
                         f"{', '.join([*LAYOUTS, FloatQuantized.method, BitsAndBytes4bit.method])}")
    return LAYOUTS[method], LAYOUTS[method].params(q, config.path)
