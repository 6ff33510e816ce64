"""Recipes: the per-tensor type policy that `--to` names, as llama.cpp's tools apply it.

f32/f16/bf16/q8_0 choose as convert_hf_to_gguf.py --outtype does. q4_k_m and iq4_nl choose as
llama-quantize does (src/llama-quant.cpp: tensor_allows_quantization, llama_tensor_get_type,
tensor_type_fallback), for the dense models qconvert supports, visiting tensors in
llama-quantize's order so that its counters (attn_v, ffn_down) advance the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from gguf import LlamaFileType

from qconvert.arch.spec import ModelShape, PlannedTensor
from qconvert.errors import UsageError
from qconvert.quant import blocks
from qconvert.quant.blocks import BlockType


@dataclass
class Overrides:
    """llama-quantize's per-tensor options."""

    tensor_types: list[tuple[re.Pattern, type[BlockType]]] = field(default_factory=list)  # --tensor-type
    output: type[BlockType] | None = None  # --output-tensor-type
    token_embedding: type[BlockType] | None = None  # --token-embedding-type
    pure: bool = False  # --pure: the default type everywhere it is allowed


def _float_or(kind: type[BlockType], fallback: type[BlockType]) -> Callable[[PlannedTensor], type[BlockType]]:
    """Norms, biases and 1-D tensors stay F32; other weights are `kind`, or `fallback` when
    their rows do not fit `kind`'s block (convert_hf_to_gguf.py: Q8_0 -> F16)."""
    def choose(t: PlannedTensor) -> type[BlockType]:
        if t.force_f32:
            return blocks.F32
        return kind if kind.fits(t.shape[-1]) else fallback
    return choose


@dataclass(frozen=True)
class Recipe:
    name: str  # what --to takes
    label: str  # what output file names carry: model-Q8_0.gguf
    file_type: LlamaFileType
    summary: str
    choose: Callable[[PlannedTensor], type[BlockType]] | None = None  # convert_hf_to_gguf.py-style
    default: type[BlockType] | None = None  # llama-quantize-style: the mixture's base type

    @property
    def quantizes_like_llama_quantize(self) -> bool:
        return self.default is not None

    def assign(self, tensors: list[PlannedTensor], shape: ModelShape, overrides: Overrides | None = None,
               has_imatrix: bool = False) -> list[type[BlockType]]:
        if self.choose is not None:
            return [self.choose(t) for t in tensors]
        return _llama_quantize_types(self, tensors, shape, overrides or Overrides(), has_imatrix)


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("bf16", "BF16", LlamaFileType.MOSTLY_BF16, "bfloat16, lossless for bf16 checkpoints",
           choose=_float_or(blocks.BF16, blocks.BF16)),
    Recipe("f16", "F16", LlamaFileType.MOSTLY_F16, "float16", choose=_float_or(blocks.F16, blocks.F16)),
    Recipe("f32", "F32", LlamaFileType.ALL_F32, "float32, the reference", choose=_float_or(blocks.F32, blocks.F32)),
    Recipe("iq4_nl", "IQ4_NL", LlamaFileType.MOSTLY_IQ4_NL, "4.5 bits per weight, non-linear levels",
           default=blocks.IQ4_NL),
    Recipe("q4_k_m", "Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, "4.5-5 bits per weight, K-quant mixture",
           default=blocks.Q4_K),
    Recipe("q8_0", "Q8_0", LlamaFileType.MOSTLY_Q8_0, "8.5 bits per weight, near lossless",
           choose=_float_or(blocks.Q8_0, blocks.F16)),
]}


def parse_type(flag: str, value: str) -> type[BlockType]:
    try:
        return blocks.get(value)
    except ValueError:
        raise UsageError(f"{flag}: unknown type {value!r}; known: {', '.join(sorted(blocks.REGISTRY))}") from None


def parse_tensor_types(values: list[str]) -> list[tuple[re.Pattern, type[BlockType]]]:
    """`--tensor-type REGEX=TYPE` (repeatable), first match wins, as llama-quantize's."""
    out = []
    for v in values:
        pattern, sep, kind = v.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"--tensor-type: must be REGEX=TYPE, got {v!r}")
        try:
            out.append((re.compile(pattern), parse_type("--tensor-type", kind)))
        except re.error as e:
            raise UsageError(f"--tensor-type: bad regular expression {pattern!r}: {e}") from None
    return out


# ---- llama-quantize's choices -------------------------------------------------------------------

def layer_order_key(name: str) -> tuple[int, str]:
    """llama.cpp's weight_name_comparer: non-block tensors first, then by block, then by name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj", "ssm_conv1d",
                  "attn_rel_b.weight", ".position_embd")


def allows_quantization(t: PlannedTensor) -> bool:
    """tensor_allows_quantization, for the tensors qconvert's families produce."""
    name = t.name
    return (len(t.shape) >= 2 and name.endswith("weight") and not any(s in name for s in _NOT_QUANTIZED)
            and name not in ("position_embd.weight", "token_types.weight"))


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_FALLBACK = {"Q4_K": blocks.Q5_0, "Q5_K": blocks.Q5_1, "Q6_K": blocks.Q8_0}


def fallback(kind: type[BlockType], ncols: int) -> type[BlockType]:
    """tensor_type_fallback: a 256-block type whose rows do not fit -> its 32-block stand-in,
    and F16 when even that does not fit."""
    if ncols % kind.block == 0:
        return kind
    if kind.block > 32:
        if kind.name not in _FALLBACK:
            raise UsageError(f"no fallback type for {kind.name} on rows of {ncols}")
        kind = _FALLBACK[kind.name]
    return kind if ncols % kind.block == 0 else blocks.F16


def _llama_quantize_types(recipe: Recipe, tensors: list[PlannedTensor], shape: ModelShape, o: Overrides,
                          has_imatrix: bool) -> list[type[BlockType]]:
    q4_k_m = recipe.name == "q4_k_m"
    cats = [_category(t.name) for t in tensors]
    n_attn_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats)
    tied = "output" not in cats
    i_attn_wv = i_ffn_down = 0
    out: list[type[BlockType]] = []
    for t, cat in zip(tensors, cats):
        if not allows_quantization(t):
            out.append(blocks.F32)  # as converted: llama-quantize keeps the input type
            continue
        if o.token_embedding is not None and cat == "token_embd":
            out.append(o.token_embedding)
            continue
        if o.output is not None and cat == "output":
            out.append(o.output)
            continue
        new = recipe.default
        assert new is not None
        manual = False
        for pattern, kind in o.tensor_types:
            if pattern.search(t.name):
                new, manual = kind, True
                break
        if not manual and not o.pure:
            if cat == "output" or (tied and cat == "token_embd"):
                if o.output is not None:
                    new = o.output
                elif t.shape[-1] % new.block != 0:
                    new = blocks.Q8_0
                elif new is not blocks.Q8_0:
                    new = blocks.Q6_K
            elif cat in ("attn_v", "attn_qkv", "attn_kv_b"):
                if not q4_k_m and shape.n_gqa >= 4:
                    new = blocks.Q5_K
                elif q4_k_m and use_more_bits(i_attn_wv, n_attn_wv):
                    new = blocks.Q6_K
                i_attn_wv += 1
            elif cat == "ffn_down":
                i_layer, n_layer = i_ffn_down, shape.n_layer
                if q4_k_m:
                    if use_more_bits(i_layer, n_layer):
                        new = blocks.Q6_K
                elif i_layer < n_layer // 8 and not has_imatrix:
                    new = blocks.Q5_K
                i_ffn_down += 1
        out.append(fallback(new, t.shape[-1]))
    return out
