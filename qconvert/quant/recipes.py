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
        if t.native is not None:  # the converter copies MXFP4 experts whatever --outtype says
            return blocks.get(t.native)
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
    needs_imatrix: bool = False  # llama-quantize writes it only from an importance matrix
    takes_imatrix: bool = True  # False: none of its types reads importance weights (mxfp4_moe), no calibration

    @property
    def quantizes_like_llama_quantize(self) -> bool:
        return self.default is not None

    def assign(self, tensors: list[PlannedTensor], shape: ModelShape, overrides: Overrides | None = None,
               has_imatrix: bool = False) -> list[type[BlockType]]:
        if self.choose is not None:
            return [self.choose(t) for t in tensors]
        return _llama_quantize_types(self, tensors, shape, overrides or Overrides(), has_imatrix)


_FLOATS = [
    Recipe("bf16", "BF16", LlamaFileType.MOSTLY_BF16, "bfloat16, lossless for bf16 checkpoints",
           choose=_float_or(blocks.BF16, blocks.BF16)),
    Recipe("f16", "F16", LlamaFileType.MOSTLY_F16, "float16", choose=_float_or(blocks.F16, blocks.F16)),
    Recipe("f32", "F32", LlamaFileType.ALL_F32, "float32, the reference", choose=_float_or(blocks.F32, blocks.F32)),
    Recipe("q8_0", "Q8_0", LlamaFileType.MOSTLY_Q8_0, "8.5 bits per weight, near lossless",
           choose=_float_or(blocks.Q8_0, blocks.F16)),
]

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
    # ggml_n_dims: dimensions of size 1 at the end of GGUF's order (the start of ours) do not
    # count, so Qwen2-MoE's shared-expert gate [1, hidden] is a vector, never quantized
    dims = len(t.shape) - next((i for i, d in enumerate(t.shape) if d != 1), len(t.shape))
    return (dims >= 2 and name.endswith("weight") and not any(s in name for s in _NOT_QUANTIZED)
            and name not in ("position_embd.weight", "token_types.weight"))


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# Q1_0 (blocks of 128) has no entry, as in tensor_type_fallback: its rows either fit or
# llama-quantize stops ("no tensor type fallback is defined for type q1_0"), and so does fallback()
_FALLBACK = {**dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
             **dict.fromkeys(("Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"), "Q4_K": "Q5_0", "Q5_K": "Q5_1",
             "Q6_K": "Q8_0"}


def fallback(kind: type[BlockType], ncols: int, where: str = "") -> type[BlockType]:
    """tensor_type_fallback: a 256-block type whose rows do not fit -> its 32-block stand-in,
    and F16 when even that does not fit. `where` ("--to q1_0: blk.0.attn_k.weight") names the
    tensor in the error for a type without a stand-in."""
    if ncols % kind.block == 0:
        return kind
    if kind.block > 32:
        if kind.name not in _FALLBACK:
            raise UsageError(f"{where + ': ' if where else ''}rows of {ncols} fit no {kind.name} block of "
                             f"{kind.block}, and llama-quantize has no fallback type for {kind.name}")
        kind = blocks.get(_FALLBACK[kind.name])
    return kind if ncols % kind.block == 0 else blocks.F16


@dataclass
class _State:
    """quantize_state_impl's counters, advanced in llama-quantize's tensor order."""

    n_attention_wv: int
    n_layer: int
    tied: bool
    has_imatrix: bool
    output: type[BlockType] | None  # --output-tensor-type, which a tied token_embd takes too
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


F = LlamaFileType
_IQ2_FAMILY = (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M)


def _layer(counter: int, name: str, n_expert: int) -> int:
    """layer_info: the counter's value, or with experts the layer in the tensor's name (their
    FFN tensors need not come one per layer)."""
    if n_expert > 1:
        m = re.match(r"blk\.(\d+)\.", name)
        if m is None:
            raise UsageError(f"cannot tell the layer of tensor {name}")
        return int(m.group(1))
    return counter


def _bump(ftype: LlamaFileType, new: type[BlockType], t: PlannedTensor, cat: str, shape: ModelShape,
          st: _State) -> type[BlockType]:
    """llama_tensor_get_type_impl for the families qconvert converts (no Falcon): the mixture's
    type for one tensor, advancing the counters as llama.cpp does. With experts, the rules of
    8-expert models (Mixtral's) fire, and the FFN rules take the layer from the tensor's name
    (layer_info), not from the counters."""
    B = blocks
    gqa, n_expert = shape.n_gqa, shape.n_expert
    if cat == "output" or (st.tied and cat == "token_embd"):
        if st.output is not None:
            return st.output
        if ftype == F.MOSTLY_MXFP4_MOE or t.shape[-1] % new.block != 0:
            return B.Q8_0
        if ftype in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S,
                     F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M):
            return B.Q5_K
        return new if new is B.Q8_0 else B.Q6_K
    if ftype == F.MOSTLY_MXFP4_MOE:  # experts (3-D, more than one) MXFP4, every other matrix Q8_0
        return B.get("MXFP4") if len(t.shape) == 3 and t.shape[0] > 1 else B.Q8_0
    if cat == "token_embd":
        if ftype in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
            return B.get("Q2_K")
        if ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ3_XXS):
            return B.get("IQ3_S")
        if ftype in (F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0):
            return B.Q4_K
        return new  # q1_0's too: only Q2_0 (not here) joins the ternary types' Q4_K
    if ftype in _IQ2_FAMILY:
        iq3 = ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M)
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            new = B.Q4_K if gqa >= 4 or n_expert >= 4 else B.get("IQ3_S" if iq3 else "Q2_K")
            st.i_attention_wv += 1
        elif n_expert == 8 and cat == "attn_k":
            new = B.Q4_K
        elif cat == "ffn_down":
            if st.i_ffn_down < st.n_layer // 8:
                new = B.get("IQ3_S" if iq3 else "Q2_K")
            st.i_ffn_down += 1
        elif cat == "attn_output":
            if n_expert == 8:
                new = B.Q5_K
            elif ftype in (F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
                new = B.get("IQ2_XXS")
            elif iq3:
                new = B.get("IQ3_S")
        return new
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        if ftype == F.MOSTLY_Q2_K:
            new = B.Q4_K if gqa >= 4 else B.get("Q3_K")
        elif ftype == F.MOSTLY_Q2_K_S and gqa >= 4:
            new = B.Q4_K
        elif ftype == F.MOSTLY_IQ3_XXS:
            new = B.Q4_K if gqa >= 4 else B.get("IQ3_XXS" if st.has_imatrix else "IQ3_S")
        elif ftype in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and gqa >= 4:
            new = B.Q4_K
        elif ftype == F.MOSTLY_IQ3_M:
            new = B.Q4_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = B.Q5_K if st.i_attention_wv < 2 else B.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = B.Q5_K
        elif ftype in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and gqa >= 4:
            new = B.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = B.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and st.i_attention_wv < 4:
            new = B.Q5_K
        if shape.is_70b and new.name in ("Q3_K", "Q4_K"):
            new = B.Q5_K
        if n_expert == 8:
            new = B.Q8_0
        st.i_attention_wv += 1
    elif cat == "attn_k":
        if n_expert == 8:
            new = B.Q8_0
        elif ftype == F.MOSTLY_IQ3_XS:
            new = B.get("IQ3_XXS")
        elif ftype == F.MOSTLY_IQ3_XXS:
            new = B.get("IQ2_S")
    elif cat == "attn_q":
        if ftype == F.MOSTLY_IQ3_XS:
            new = B.get("IQ3_XXS")
        elif ftype == F.MOSTLY_IQ3_XXS:
            new = B.get("IQ2_S")
    elif cat == "ffn_down":
        i, n = _layer(st.i_ffn_down, t.name, n_expert), st.n_layer
        if ftype == F.MOSTLY_Q2_K:
            new = B.get("Q3_K")
        elif ftype == F.MOSTLY_Q2_K_S:
            if i < n // 8:
                new = B.Q4_K
        elif ftype == F.MOSTLY_IQ3_XXS and not st.has_imatrix:
            new = B.Q4_K if i < n // 8 else B.get("Q3_K")
        elif ftype == F.MOSTLY_Q3_K_M:
            new = B.Q5_K if i < n // 16 else B.Q4_K  # (Falcon alone keeps Q3_K off use_more_bits)
        elif ftype == F.MOSTLY_IQ3_M and (i < n // 8 or (n_expert == 8 and use_more_bits(i, n))):
            new = B.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = B.Q5_K
        elif ftype == F.MOSTLY_Q4_K_M:
            if use_more_bits(i, n):
                new = B.Q6_K
        elif i < n // 8 and ftype in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and not st.has_imatrix:
            new = B.Q5_K
        elif ftype == F.MOSTLY_Q5_K_M and use_more_bits(i, n):
            new = B.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and i < n // 8:
            new = B.Q5_K
        elif ftype in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and st.has_imatrix and i < n // 8:
            new = B.Q4_1 if ftype == F.MOSTLY_Q4_0 else B.Q5_1
        st.i_ffn_down += 1
    elif cat == "attn_output" and n_expert == 8:
        if ftype in (F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL,
                     F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M, F.MOSTLY_IQ4_XS):
            new = B.Q5_K
    elif cat == "attn_output":
        name = {F.MOSTLY_Q2_K: "Q3_K", F.MOSTLY_IQ3_XXS: "IQ3_S", F.MOSTLY_Q3_K_M: "Q4_K", F.MOSTLY_Q3_K_L: "Q5_K",
                F.MOSTLY_IQ3_M: "Q4_K"}.get(ftype)
        if name is not None:
            new = B.get(name)
    elif cat == "attn_qkv":
        if ftype in (F.MOSTLY_Q3_K_M, F.MOSTLY_Q3_K_L, F.MOSTLY_IQ3_M):
            new = B.Q4_K
        elif ftype == F.MOSTLY_Q4_K_M:
            new = B.Q5_K
        elif ftype == F.MOSTLY_Q5_K_M:
            new = B.Q6_K
    elif cat in ("ffn_gate", "ffn_up"):
        i = _layer(st.i_ffn_gate if cat == "ffn_gate" else st.i_ffn_up, t.name, n_expert)
        if ftype == F.MOSTLY_IQ3_XS and st.n_layer // 8 <= i < 7 * st.n_layer // 8:
            new = B.get("IQ3_XXS")
        if cat == "ffn_gate":
            st.i_ffn_gate += 1
        else:
            st.i_ffn_up += 1
    return new


# llama-quantize's file types for text models: (--to, its file type, its default tensor type,
# the other types its rules can choose besides Q6_K / Q8_0 for the output, summary)
_LADDER = [
    ("q2_k", "MOSTLY_Q2_K", "Q2_K", ("Q3_K", "Q4_K"), "2.6-3 bits per weight, K-quant mixture"),
    ("q2_k_s", "MOSTLY_Q2_K_S", "Q2_K", ("Q4_K",), "2.6 bits per weight, K-quant mixture"),
    ("q3_k_s", "MOSTLY_Q3_K_S", "Q3_K", (), "3.4 bits per weight, K-quant"),
    ("q3_k_m", "MOSTLY_Q3_K_M", "Q3_K", ("Q4_K", "Q5_K"), "3.7-3.9 bits per weight, K-quant mixture"),
    ("q3_k_l", "MOSTLY_Q3_K_L", "Q3_K", ("Q5_K",), "4-4.3 bits per weight, K-quant mixture"),
    ("q4_0", "MOSTLY_Q4_0", "Q4_0", ("Q4_1",), "4.5 bits per weight, legacy blocks of 32"),
    ("q4_1", "MOSTLY_Q4_1", "Q4_1", (), "5 bits per weight, legacy blocks of 32 with a minimum"),
    ("q5_0", "MOSTLY_Q5_0", "Q5_0", ("Q5_1",), "5.5 bits per weight, legacy blocks of 32"),
    ("q5_1", "MOSTLY_Q5_1", "Q5_1", (), "6 bits per weight, legacy blocks of 32 with a minimum"),
    ("q4_k_s", "MOSTLY_Q4_K_S", "Q4_K", ("Q5_K",), "4.5-4.6 bits per weight, K-quant mixture"),
    ("q4_k_m", "MOSTLY_Q4_K_M", "Q4_K", (), "4.5-5 bits per weight, K-quant mixture"),
    ("q5_k_s", "MOSTLY_Q5_K_S", "Q5_K", (), "5.5 bits per weight, K-quant"),
    ("q5_k_m", "MOSTLY_Q5_K_M", "Q5_K", (), "5.5-5.7 bits per weight, K-quant mixture"),
    ("q6_k", "MOSTLY_Q6_K", "Q6_K", (), "6.6 bits per weight, K-quant"),
    ("iq4_nl", "MOSTLY_IQ4_NL", "IQ4_NL", ("Q5_K",), "4.5 bits per weight, non-linear levels"),
    ("iq4_xs", "MOSTLY_IQ4_XS", "IQ4_XS", ("Q5_K",), "4.25 bits per weight, non-linear levels, super-blocks"),
    ("iq3_xxs", "MOSTLY_IQ3_XXS", "IQ3_XXS", ("IQ3_S", "IQ2_S", "Q3_K", "Q4_K"),
     "3.1 bits per weight, lattice"),
    ("iq3_xs", "MOSTLY_IQ3_XS", "IQ3_S", ("IQ3_XXS", "Q4_K"),
     "3.3 bits per weight, lattice mixture"),
    ("iq3_s", "MOSTLY_IQ3_S", "IQ3_S", ("Q4_K",), "3.4 bits per weight, lattice"),
    ("iq3_m", "MOSTLY_IQ3_M", "IQ3_S", ("Q4_K",), "3.7 bits per weight, lattice mixture"),
    ("iq2_xxs", "MOSTLY_IQ2_XXS", "IQ2_XXS", ("Q2_K", "Q4_K", "Q5_K"),
     "2.1 bits per weight, lattice"),
    ("iq2_xs", "MOSTLY_IQ2_XS", "IQ2_XS", ("Q2_K", "Q4_K", "Q5_K"),
     "2.3 bits per weight, lattice"),
    ("iq2_s", "MOSTLY_IQ2_S", "IQ2_XS", ("IQ3_S", "Q4_K", "Q5_K"),
     "2.5 bits per weight, lattice mixture"),
    ("iq2_m", "MOSTLY_IQ2_M", "IQ2_S", ("IQ3_S", "Q4_K", "Q5_K"),
     "2.7 bits per weight, lattice mixture"),
    ("iq1_s", "MOSTLY_IQ1_S", "IQ1_S", ("IQ2_XXS", "Q2_K", "Q4_K", "Q5_K"),
     "1.6 bits per weight, lattice"),
    ("iq1_m", "MOSTLY_IQ1_M", "IQ1_M", ("IQ2_XXS", "Q2_K", "Q4_K", "Q5_K"),
     "1.75 bits per weight, lattice"),
    ("mxfp4_moe", "MOSTLY_MXFP4_MOE", "MXFP4", (), "MXFP4 experts (4.25 bits per weight), Q8_0 elsewhere"),
    ("tq1_0", "MOSTLY_TQ1_0", "TQ1_0", ("Q4_K",), "1.7 bits per weight, ternary"),
    ("tq2_0", "MOSTLY_TQ2_0", "TQ2_0", ("Q4_K",), "2.1 bits per weight, ternary"),
    # no rule of llama_tensor_get_type names Q1_0: every tensor is Q1_0 but the output (Q6_K, or
    # Q8_0 where its rows fit no block of 128)
    ("q1_0", "MOSTLY_Q1_0", "Q1_0", (), "1.125 bits per weight, signs"),
]


def _needs(default: str, extra: tuple[str, ...]) -> set[str]:
    """Every tensor type a mixture can write: its own, its rules', the output's, and their
    fallbacks for rows that fit no block."""
    out = {default, *extra, "Q6_K", "Q8_0", "F16"}
    while True:
        more = {_FALLBACK[n] for n in out if n in _FALLBACK} - out
        if not more:
            return out
        out |= more


_NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")


def _ladder() -> list[Recipe]:
    """Every mixture of the table; each tensor type it can write must have a block type here."""
    out = []
    for name, ftype, default, extra, summary in _LADDER:
        lacking = {n for n in _needs(default, extra) if n not in blocks.REGISTRY}
        if lacking:
            raise ImportError(f"recipe {name} writes {', '.join(sorted(lacking))}, which have no block type")
        # tensor_requires_imatrix names one of its types (Q2_K only in a q2_k_s file)
        needs = name == "q2_k_s" or bool(_needs(default, extra) & set(_NEEDS_IMATRIX))
        if needs:
            summary += " (needs an importance matrix)"
        out.append(Recipe(name, name.upper(), LlamaFileType[ftype], summary, default=blocks.get(default),
                          needs_imatrix=needs, takes_imatrix=name != "mxfp4_moe"))  # MXFP4, Q8_0 ignore one
    return out


RECIPES: dict[str, Recipe] = {r.name: r for r in sorted([*_FLOATS, *_ladder()], key=lambda r: r.name)}


def requires_imatrix(name: str, kind: type[BlockType], recipe: Recipe) -> bool:
    """tensor_requires_imatrix: the types llama-quantize refuses to write without an importance
    matrix, and Q2_K in a q2_k_s file; token_embd and output never need one."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return kind.name in _NEEDS_IMATRIX or (kind.name == "Q2_K" and recipe.file_type == LlamaFileType.MOSTLY_Q2_K_S)


def _llama_quantize_types(recipe: Recipe, tensors: list[PlannedTensor], shape: ModelShape, o: Overrides,
                          has_imatrix: bool) -> list[type[BlockType]]:
    """llama_tensor_get_type over the tensors in llama-quantize's order."""
    cats = [_category(t.name) for t in tensors]
    st = _State(sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats), shape.n_layer, "output" not in cats,
                has_imatrix, o.output)
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
            new = _bump(recipe.file_type, new, t, cat, shape, st)
        out.append(fallback(new, t.shape[-1], f"--to {recipe.name}: {t.name}"))
    return out
