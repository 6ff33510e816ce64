"""What every model family module provides: tensor plan, GGUF metadata, tokenizer.

A family reads the checkpoint's config and tensor index (metadata only) and says, for every
output tensor, its GGUF name, where its data comes from and what transform the GGUF runtime
expects. Tensor names map through gguf's TensorNameMap (llama.cpp's own alias table).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import gguf
import numpy as np

from qconvert.arch.generic import TransformersForward
from qconvert.arch.spec import Expected, ModelShape, PlannedTensor, ScaleSpec
from qconvert.errors import InputError, QConvertError
from qconvert.read import tokenizer
from qconvert.read.checkpoint import Checkpoint, Tensor

# HF buffers that are not weights (llama.cpp's converter drops them too)
SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq",
                 ".attn.bias", ".attn.masked_bias")

# multimodal parts of a checkpoint: a GGUF text model leaves them out (llama.cpp writes them
# to a separate mmproj file)
NOT_TEXT = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
            "audio_tower.", "model.audio_tower.")

# GGUF tensors llama.cpp keeps in F32 whatever the target (convert_hf_to_gguf.py, prepare_tensors)
_ALWAYS_F32 = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP, gguf.MODEL_TENSOR.POS_EMBD,
               gguf.MODEL_TENSOR.TOKEN_TYPES)


_ROPE_NUMBERS = ("rope_theta", "factor", "partial_rotary_factor", "original_max_position_embeddings",
                 "low_freq_factor", "high_freq_factor", "extrapolation_factor", "beta_fast", "beta_slow",
                 "attention_factor", "attn_factor")
_ROPE_NEEDS = {"linear": ("factor",), "yarn": ("factor", "original_max_position_embeddings"), "llama3": ("factor",)}

# the router's scoring function, under the config keys the converter reads it from
GATING_KEYS = ("score_function", "scoring_func", "score_func", "moe_router_activation", "moe_router_activation_func",
               "expert_selection_fn")
_GATING = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
# one expert's matrix in a mixture-of-experts layer, as checkpoints store them (Qwen-MoE's
# mlp.experts.3.gate_proj.weight, Mixtral's block_sparse_moe.experts.3.w1.weight)
EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.weight$")
# one expert's weight or bias (gpt-oss: mlp.experts.3.gate_proj.bias), both stacked per kind
EXPERT_TENSOR = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.(?P<kind>weight|bias)$")


def merged_expert(m: re.Match) -> str:
    """The module name of an EXPERT match's kind with the expert left out (mlp.experts.gate_proj),
    under which GGUF stacks a layer's experts."""
    return f"{m['prefix']}.{m['proj']}"


# a layer's experts fused into 3-D tensors, as transformers 5 holds them (and saves some models):
# mlp.experts.gate_up_proj [experts, 2 * ff, hidden] (gate rows, then up rows) and
# mlp.experts.down_proj [experts, hidden, ff]
FUSED_EXPERTS = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")


@dataclass
class ExpertSlice:
    """One expert's matrix inside a fused 3-D checkpoint tensor, under the per-expert name
    (mlp.experts.E.gate_proj.weight): rows [r0, r1) of expert e, read from the fused tensor's
    memory map when asked for."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    fused: Tensor
    expert: int
    r0: int

    def array(self) -> np.ndarray:
        return self.fused.array()[self.expert, self.r0:self.r0 + self.shape[0]]

    def release(self) -> None:
        self.fused.release()


def split_fused_experts(tensors: dict[str, Tensor], path) -> dict[str, Tensor]:
    """The checkpoint's tensors with every fused expert tensor replaced by its experts' matrices
    (gate_up_proj split on its rows, as convert_hf_to_gguf splits it), in checkpoint order."""
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        m = FUSED_EXPERTS.match(name)
        if m is None or len(t.shape) != 3:
            out[name] = t
            continue
        E, rows, cols = t.shape
        if m["proj"] == "gate_up_proj":
            if rows % 2:
                raise InputError(f"{path}: tensor {name!r} has shape {list(t.shape)}: gate_up_proj needs an even "
                                 "number of rows (gate rows, then up rows)")
            halves = (("gate_proj", 0), ("up_proj", rows // 2))
        else:
            halves = (("down_proj", 0),)
        n = rows // len(halves)
        for e in range(E):
            for proj, r0 in halves:
                full = f"{m['prefix']}.{e}.{proj}.weight"
                out[full] = ExpertSlice(full, t.dtype, (n, cols), t, e, r0)
    return out


def layer_types_from_gguf(pattern, n_layers: int) -> list[str]:
    """HF layer_types from llama.cpp's sliding_window_pattern: a bool per layer (true: sliding),
    or n: every n-th layer full, the others sliding."""
    swa = [bool(x) for x in pattern] if isinstance(pattern, list) else [i % pattern < pattern - 1
                                                                         for i in range(n_layers)]
    return ["sliding_attention" if x else "full_attention" for x in swa]


def decoder_tensors(cfg, n_layers: int, norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm"),
                    qk_norm: bool = False, head_dim: int | None = None) -> list[Expected]:
    """The tensors of a Llama-style decoder (Llama, Mistral, Qwen2/3, Gemma 3): embeddings, final
    norm, optional separate head; per layer the norms, q/k/v/o (optional biases, q/k norms)
    and the gated MLP, with the shapes the config gives."""
    H = cfg.positive(int, "hidden_size")
    V = cfg.positive(int, "vocab_size")
    ffn = cfg.positive(int, "intermediate_size")
    n_head = cfg.positive(int, "num_attention_heads")
    n_kv = cfg.get(int, "num_key_value_heads") or n_head
    if n_kv < 1 or n_head % n_kv:
        raise InputError(f"{cfg.path}: num_key_value_heads must divide num_attention_heads ({n_head}), got {n_kv}")
    hd = head_dim or cfg.get(int, "head_dim") or H // n_head
    if hd < 1:
        raise InputError(f"{cfg.path}: head_dim must be positive, got {hd}")
    q, kv = n_head * hd, n_kv * hd
    out = [Expected("model.embed_tokens.weight", (V, H)), Expected("model.norm.weight", (H,)),
           Expected("lm_head.weight", (V, H), required=False)]
    for i in range(n_layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out += [Expected(p + n + ".weight", (H,)) for n in norms]
        out += [Expected(a + "q_proj.weight", (q, H)), Expected(a + "k_proj.weight", (kv, H)),
                Expected(a + "v_proj.weight", (kv, H)), Expected(a + "o_proj.weight", (H, q)),
                Expected(a + "q_proj.bias", (q,), False), Expected(a + "k_proj.bias", (kv,), False),
                Expected(a + "v_proj.bias", (kv,), False), Expected(a + "o_proj.bias", (H,), False),
                Expected(a + "q_norm.weight", (hd,), qk_norm), Expected(a + "k_norm.weight", (hd,), qk_norm),
                Expected(m + "gate_proj.weight", (ffn, H)), Expected(m + "up_proj.weight", (ffn, H)),
                Expected(m + "down_proj.weight", (H, ffn))]
    return out


class Family:
    """Base of the model family modules. Subclasses set the class attributes and override hooks."""

    hf_architectures: ClassVar[tuple[str, ...]]
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    example: ClassVar[str]  # a model that this family serves, for help texts
    forward_class: ClassVar[type | None] = None  # its forward (an arch.forward.Forward subclass, in its module)
    awq_groups: ClassVar[tuple[ScaleSpec, ...]] = ()  # AWQ's scale groups, in AutoAWQ's order
    awq_no_clip: ClassVar[tuple[str, ...]] = ()  # linears AWQ leaves unclipped (queries and keys)
    # keys llama.cpp needs that a config may leave out: the values transformers' config class
    # then assumes, by HF architecture ("*": any of the family's)
    config_defaults: ClassVar[dict[str, dict[str, object]]] = {}
    fused_experts: ClassVar[bool] = False  # reads experts saved fused (split_fused_experts)
    # layer matrices that a quantized safetensors checkpoint keeps in float, by the module's
    # last name parts (a mixture's router, Qwen2-MoE's shared-expert gate), as GPTQModel,
    # llm-compressor and the published checkpoints keep them
    float_linears: ClassVar[tuple[str, ...]] = ()
    # tensors a quantized safetensors checkpoint keeps in float32, by the end of their names
    # (DeepSeek-V3's router correction bias, a float32 buffer in transformers' model)
    float32_tensors: ClassVar[tuple[str, ...]] = ()
    # False: GGUF only, no quantized safetensors checkpoint (--to gptq, awq, fp8 ...) yet
    safetensors_targets: ClassVar[bool] = True

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.cfg = ckpt.config
        arch = self.cfg.architecture()
        for key, value in {**self.config_defaults.get("*", {}), **self.config_defaults.get(arch, {})}.items():
            if self.cfg.data.get(key) is None:
                self.cfg.data[key] = value
        self.n_layers = self.cfg.positive(int, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
        if ckpt.tensors:  # before anything is sized by the layer count
            self.check_depth({int(m.group(1)) for n in ckpt.tensors
                              if not n.startswith(NOT_TEXT) and (m := _LAYER_INDEX.search(n))})
        # routed experts per mixture-of-experts layer (0: a dense model)
        self.n_experts = self.cfg.get(int, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0
        used = self.cfg.get(int, "num_experts_per_tok", positive=True)
        if self.n_experts and used and used > self.n_experts:
            raise InputError(f"{self.cfg.path}: num_experts_per_tok ({used}) is more than the {self.n_experts} experts")
        if ckpt.tensors:
            ckpt.tensors = self.own_names(ckpt.tensors)
        self.name_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    # ---- tensors ---------------------------------------------------------------------------

    def check_depth(self, layers: set[int]) -> None:
        """The config's layer count against the decoder layers the tensors hold."""
        present = max(layers) + 1 if layers else 0
        if present != self.n_layers or len(layers) != present:
            held = f"layers 0..{present - 1}" if len(layers) == present else f"{len(layers)} of layers 0..{present - 1}"
            raise InputError(f"{self.cfg.path}: the config gives {self.n_layers} decoder layers, the tensors hold "
                             f"{held if layers else 'none'}")

    def expected(self) -> list[Expected]:
        """Every tensor the forward and llama.cpp need, with its shape from the config."""
        return []

    def check_tensors(self, shape_of: Callable[[str], tuple[int, ...] | None], where: Path) -> None:
        """Before any compute: every expected tensor is there with the shape the config gives.
        `shape_of(HF name)`: the tensor's shape, or None when it is absent."""
        for e in self.expected():
            shape = shape_of(e.name)
            if shape is None:
                if e.required:
                    raise InputError(f"{where}: tensor {e.name!r} is missing ({self.cfg.architecture()} with "
                                     f"{self.n_layers} layers needs it)")
                continue
            if tuple(shape) != e.shape:
                raise InputError(f"{where}: tensor {e.name!r} has shape {list(shape)}, the config makes it "
                                 f"{list(e.shape)} ({self.cfg.path.name})")

    def check_checkpoint(self) -> None:
        """check_tensors on the checkpoint's own tensors (the text-model prefix dropped), and no
        tensor the family does not know (llama.cpp refuses a file with one it does not expect)."""
        shapes = {n.replace("language_model.", ""): t.shape for n, t in self.ckpt.tensors.items()
                  if not (n.endswith(SKIP_SUFFIXES) or n.startswith(NOT_TEXT) or self.skip(n))}
        self.check_tensors(shapes.get, self.ckpt.path)
        known = {e.name for e in self.expected()}
        if known:
            extra = sorted(set(shapes) - known)
            if extra:
                raise InputError(f"{self.ckpt.path}: tensor {extra[0]!r} is not part of a {self.cfg.architecture()} "
                                 f"model with this config ({len(extra)} such tensors)")

    def plan_tensors(self) -> list[PlannedTensor]:
        out: list[PlannedTensor] = []
        for t in self.extra_tensors():
            out.append(t)
        experts: dict[str, dict[int, Tensor]] = {}
        for hf_name, t in self.ckpt.tensors.items():
            if hf_name.endswith(SKIP_SUFFIXES) or hf_name.startswith(NOT_TEXT) or self.skip(hf_name):
                continue
            hf_name = hf_name.replace("language_model.", "")
            if self.n_experts and (m := EXPERT_TENSOR.match(hf_name)):
                experts.setdefault(f"{merged_expert(m)}.{m['kind']}", {})[int(m["expert"])] = t
                continue
            for p in self.tensor(hf_name, t):
                p.force_f32 = p.force_f32 or self.keeps_f32(p)
                out.append(p)
        out += [self.stacked_experts(name, parts) for name, parts in experts.items()]
        seen: set[str] = set()
        for p in out:
            if p.name in seen:
                raise InputError(f"{self.ckpt.path}: two tensors map to GGUF name {p.name!r}")
            seen.add(p.name)
        return out

    def stacked_experts(self, merged: str, parts: dict[int, Tensor]) -> PlannedTensor:
        """A layer's experts' matrices of one kind as one 3-D tensor [expert, rows, columns], as
        llama.cpp's converter stacks them (torch.stack in expert order) under the merged name
        (mlp.experts.gate_proj.weight -> blk.N.ffn_gate_exps.weight)."""
        if sorted(parts) != list(range(self.n_experts)):
            missing = sorted(set(range(self.n_experts)) - set(parts))
            raise InputError(f"{self.ckpt.path}: {merged.replace('.weight', '')}: the config gives {self.n_experts} "
                             f"experts, the checkpoint lacks expert {missing[0] if missing else max(parts)} "
                             f"({len(parts)} present)")
        ts = [parts[e] for e in range(self.n_experts)]
        for t in ts:
            self.check_float(t)
            if len(t.shape) != (2 if merged.endswith(".weight") else 1) or t.shape != ts[0].shape \
                    or t.dtype != ts[0].dtype:
                raise InputError(f"{self.ckpt.path}: tensor {t.name!r} is {t.dtype} {list(t.shape)}, expert 0's is "
                                 f"{ts[0].dtype} {list(ts[0].shape)}: experts must share shape and type")
        p = PlannedTensor(self.map_name(merged), (self.n_experts, *ts[0].shape), ts[0], parts=tuple(ts))
        p.force_f32 = self.keeps_f32(p)  # the biases
        if all(getattr(t, "gguf_type", None) for t in ts) and len({t.gguf_type for t in ts}) == 1:
            p.native = ts[0].gguf_type  # experts already in a GGUF type (gpt-oss's MXFP4)
        return p

    def shape(self) -> ModelShape:
        """Head counts and depth, as llama-quantize's choices read them."""
        n_head = self.cfg.need(int, "num_attention_heads", "n_head", "n_heads")
        return ModelShape(self.n_layers, n_head, self.cfg.get(int, "num_key_value_heads", "n_kv_heads", default=n_head),
                          self.arch_name, self.n_experts)

    def forward(self, weights=None):
        """The family's layer-by-layer torch forward, reading the checkpoint's tensors, or
        `weights` (HF name -> tensor) such as the dequantized tensors of a GGUF. The family's
        hand-written one; transformers' own modules (arch/generic.py) for a family without one,
        or everywhere with QCONVERT_FORWARD=transformers (but for mixtures of experts, whose
        transformers modules hold the experts fused, not as the checkpoint's per-expert matrices)."""
        generic = os.environ.get("QCONVERT_FORWARD", "") == "transformers" and not self.n_experts
        if self.forward_class is None or generic:
            return TransformersForward(self, weights)
        return self.forward_class(self, weights)

    def layer_prefix(self, i: int) -> str:
        """Decoder layer i's tensor names begin with this (text-model prefix removed)."""
        return f"model.layers.{i}."

    def own_names(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The checkpoint's tensors under the names this family's forward and converter read: its
        experts one matrix each where they are stored fused (split_fused_experts). Applied again
        to a quantized checkpoint's tensors once its linears are decoded (model.open_model)."""
        return split_fused_experts(tensors, self.ckpt.path) if self.fused_experts else tensors

    def output_name(self, name: str) -> str:
        """The name a written safetensors checkpoint gives the checkpoint tensor `name`: the
        one transformers 5 and GPTQModel load (Mixtral's legacy names renamed)."""
        return name

    def keeps_float(self, hf: str) -> bool:
        """Whether layer matrix `hf` (a module prefix) stays unquantized in a safetensors
        checkpoint (float_linears)."""
        return any(hf.endswith("." + n) for n in self.float_linears)

    def skip(self, hf_name: str) -> bool:
        return False

    def map_name(self, hf_name: str) -> str:
        new = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InputError(f"{self.ckpt.path}: tensor {hf_name!r} has no GGUF name for "
                             f"architecture {self.arch_name} (unexpected tensor for {self.cfg.architecture()})")
        return new

    def tensor(self, hf_name: str, t: Tensor) -> list[PlannedTensor]:
        """The GGUF tensor(s) made from one checkpoint tensor. Override to transform."""
        self.check_float(t)
        return [PlannedTensor(self.map_name(hf_name), t.shape, t)]

    def extra_tensors(self) -> list[PlannedTensor]:
        return []

    def awq_extra_tensors(self) -> list[tuple[str, tuple[int, ...], int]]:
        """Tensors an AWQ checkpoint adds for this family: (name, shape, decoder layer)."""
        return []

    def max_positions(self) -> int | None:
        """The most positions the forward can take, when limited (learned position embeddings)."""
        return None

    def transposed(self, hf_name: str) -> bool:
        """Whether a linear layer's weight is stored [in, out] (GPT-2's Conv1D) rather than [out, in]."""
        return False

    # ---- back from GGUF (evaluation of a GGUF file with the family's forward) ----------------

    def from_gguf(self, hf_name: str, a: np.ndarray) -> np.ndarray:
        """Undo `tensor()`'s transform: GGUF data (float32) -> the checkpoint's layout."""
        return a

    def joined_from_gguf(self, hf_name: str) -> tuple[list[str], Callable, tuple[int, ...]] | None:
        """For a checkpoint tensor that `tensor()` splits into several GGUF tensors: the names
        the parts answer to in a GGUF file, the function joining their arrays back into the
        checkpoint's, and its shape; None for every other tensor."""
        return None

    @classmethod
    def reads_gguf(cls, kv: dict) -> bool:
        """Whether a GGUF file of this family's architecture is this family's (Llama and
        Mixtral share "llama"; the experts tell them apart)."""
        return True

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        """The config.json entries the forward reads, from a GGUF file's metadata (as llama.cpp
        reads them). Subclasses add their own."""
        arch = gguf.MODEL_ARCH_NAMES[cls.gguf_arch]

        def get(key: str):
            return kv.get(f"{arch}.{key}")
        cfg = {"architectures": [cls.hf_architectures[0]],
               "num_hidden_layers": get("block_count"),
               "hidden_size": get("embedding_length"),
               "intermediate_size": get("feed_forward_length"),
               "num_attention_heads": get("attention.head_count"),
               "num_key_value_heads": get("attention.head_count_kv"),
               "head_dim": get("attention.key_length"),
               "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
               "layer_norm_eps": get("attention.layer_norm_epsilon"),
               "max_position_embeddings": get("context_length"),
               "rope_theta": get("rope.freq_base"),
               "num_experts": get("expert_count"),
               "num_experts_per_tok": get("expert_used_count"),
               "moe_intermediate_size": get("expert_feed_forward_length")}
        scaling, factor = get("rope.scaling.type"), get("rope.scaling.factor")
        if scaling == "linear" and factor:
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        elif scaling == "yarn" and factor and get("rope.scaling.original_context_length"):
            yarn = {"rope_type": "yarn", "factor": factor,
                    "original_max_position_embeddings": get("rope.scaling.original_context_length"),
                    "attention_factor": get("rope.scaling.yarn_attn_factor"),
                    "beta_fast": get("rope.scaling.yarn_beta_fast"), "beta_slow": get("rope.scaling.yarn_beta_slow")}
            cfg["rope_scaling"] = {k: v for k, v in yarn.items() if v is not None}
        elif scaling not in (None, "none") and factor not in (None, 1.0):
            raise InputError(f"rope scaling {scaling!r} is not supported by qconvert's forward")
        return {k: v for k, v in cfg.items() if v is not None}

    def check_float(self, t: Tensor) -> None:
        if t.dtype not in ("F32", "F16", "BF16", "F64"):
            raise InputError(f"{self.ckpt.path}: tensor {t.name!r} is {t.dtype}; float weights are needed "
                             "(pre-quantized checkpoints are not supported)")

    def is_tensor(self, name: str, key: gguf.MODEL_TENSOR) -> bool:
        if key not in gguf.MODEL_TENSORS[self.gguf_arch]:
            return False
        base = gguf.TENSOR_NAMES[key]
        if "{bid}" in base:
            return any(name == base.format(bid=i) + ".weight" for i in range(self.n_layers))
        return name == base + ".weight"

    def keeps_f32(self, p: PlannedTensor) -> bool:
        return (len(p.shape) <= 1 or p.name.endswith("_norm.weight") or not p.name.endswith(".weight")
                or any(self.is_tensor(p.name, k) for k in _ALWAYS_F32))

    # ---- metadata --------------------------------------------------------------------------

    def write_early_hparams(self, kv: gguf.GGUFWriter) -> None:
        """Keys the converter writes before general.type (while it makes its extra tensors)."""

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        """Hyperparameters, in the order and with the keys llama.cpp's converter writes."""
        self.generic_hparams(kv, file_type)

    def generic_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        c = self.cfg
        kv.add_block_count(self.n_layers)
        if (v := c.get(int, "max_position_embeddings", "n_ctx", "n_positions", "max_length",
                       "max_sequence_length", "model_max_length", positive=True)) is not None:
            kv.add_context_length(v)
        if (v := c.get(int, "hidden_size", "n_embd", "dim", positive=True)) is not None:
            kv.add_embedding_length(v)
        if (v := c.get(int, "prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                       "n_inner", "hidden_dim", positive=True)) is not None:
            kv.add_feed_forward_length(v)
        if (v := c.get(int, "num_attention_heads", "n_head", "n_heads", positive=True)) is not None:
            kv.add_head_count(v)
        if (v := c.get(int, "num_key_value_heads", "n_kv_heads", positive=True)) is not None:
            kv.add_head_count_kv(v)
        if c.data.get("is_causal") is False:
            kv.add_causal_attention(False)
        rope = self.rope_parameters()
        if (rope_type := rope.get("rope_type")) is not None:
            factor = rope.get("factor")
            if rope_type == "linear" and factor is not None:
                kv.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                kv.add_rope_scaling_factor(factor)
            elif rope_type == "yarn" and factor is not None:
                kv.add_rope_scaling_type(gguf.RopeScalingType.YARN)
                kv.add_rope_scaling_factor(factor)
                kv.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
                if rope.get("extrapolation_factor") is not None:
                    kv.add_rope_scaling_yarn_ext_factor(rope["extrapolation_factor"])
                if (a := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                    kv.add_rope_scaling_yarn_attn_factor(a)
                if rope.get("beta_fast") is not None:
                    kv.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
                if rope.get("beta_slow") is not None:
                    kv.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
            elif rope_type in ("su", "longrope"):
                kv.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            elif rope_type not in ("default", "dynamic") and str(rope_type).lower() != "llama3":
                raise InputError(f"{c.path}: unsupported rope_type {rope_type!r}")
        if (theta := rope.get("rope_theta")) is not None:
            kv.add_rope_freq_base(theta)
        if (local := self.local_rope_theta()) is not None:
            kv.add_rope_freq_base_swa(local)
        if (v := c.get(float, "rms_norm_eps", "norm_eps", nonnegative=True)) is not None:
            kv.add_layer_norm_rms_eps(v)
        if (v := c.get(float, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", nonnegative=True)) is not None:
            kv.add_layer_norm_eps(v)
        if (v := c.get(int, "num_local_experts", "num_experts", "n_routed_experts")) is not None:
            kv.add_expert_count(v)
        if (v := c.get(int, "num_experts_per_tok", "num_experts_per_token", "top_k_experts")) is not None:
            kv.add_expert_used_count(v)
        if (v := c.get(int, "n_group")) is not None:
            kv.add_expert_group_count(v)
        if (v := c.get(int, "topk_group")) is not None:
            kv.add_expert_group_used_count(v)
        if (v := next((c.data[k] for k in GATING_KEYS if c.data.get(k) is not None), None)) is not None:
            if not isinstance(v, str) or v not in _GATING:
                raise InputError(f"{c.path}: expert scoring function {v!r} is not one qconvert writes "
                                 f"({', '.join(_GATING)})")
            kv.add_expert_gating_func(_GATING[v])
        if (v := c.get(int, "head_dim", positive=True)) is not None:
            kv.add_key_length(v)
            kv.add_value_length(v)
        kv.add_file_type(file_type)

    def local_rope_theta(self) -> float | None:
        c = self.cfg.data
        params = self._rope_block()
        if isinstance(params.get("sliding_attention"), dict):
            v = params["sliding_attention"].get("rope_theta")
        else:
            v = next((c[k] for k in ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                                     "rope_local_base_freq") if c.get(k) is not None), None)
        return None if v is None else self._rope_number("local rope theta", v)

    def _rope_block(self) -> dict:
        c = self.cfg.data
        for key in ("rope_parameters", "rope_scaling"):
            v = c.get(key)
            if v is not None and not isinstance(v, dict):
                raise InputError(f"{self.cfg.path}: key {key!r} must be an object, got {v!r}")
        return c.get("rope_parameters") or c.get("rope_scaling") or {}

    def _rope_number(self, key: str, v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise InputError(f"{self.cfg.path}: rope setting {key!r} must be a positive number, got {v!r}")
        return v

    def rope_parameters(self) -> dict:
        """rope settings with the global theta mirrored in, as llama.cpp's TextModel does; every
        number checked, and the settings each scaling type needs present."""
        c = self.cfg.data
        rope = dict(self._rope_block())
        full = rope.get("full_attention", rope)
        if not isinstance(full, dict):
            raise InputError(f"{self.cfg.path}: rope setting 'full_attention' must be an object, got {full!r}")
        rope = dict(full)
        for keys, dest in ((("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                             "rotary_emb_base"), "rope_theta"),
                           (("partial_rotary_factor", "rope_pct", "rope_percent"), "partial_rotary_factor")):
            v = next((c[k] for k in keys if c.get(k) is not None), None)
            if dest not in rope and v is not None:
                rope[dest] = v
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        kind = rope.get("rope_type")
        if kind is not None and not isinstance(kind, str):
            raise InputError(f"{self.cfg.path}: rope_type must be a name, got {kind!r}")
        for key in _ROPE_NUMBERS:
            if rope.get(key) is not None:
                rope[key] = self._rope_number(key, rope[key])
        if not isinstance(rope.get("original_max_position_embeddings", 1), int):
            raise InputError(f"{self.cfg.path}: rope setting 'original_max_position_embeddings' must be an integer, "
                             f"got {rope['original_max_position_embeddings']!r}")
        for key in _ROPE_NEEDS.get(str(kind).lower(), ()):
            if rope.get(key) is None:
                raise InputError(f"{self.cfg.path}: rope_type {kind!r} needs {key!r}")
        return rope

    def write_vocab(self, kv: gguf.GGUFWriter) -> None:
        """Default: a BPE tokenizer.json (gpt2 model in GGUF terms)."""
        tokenizer.bpe_vocab(self.ckpt.path, self.cfg.get(int, "vocab_size"), kv)

    def bos_id(self) -> int | None:
        """The BOS id when the tokenizer adds one (llama-imatrix and llama-perplexity start each
        chunk with it): what the GGUF file's tokenizer.ggml.add_bos_token says, found without
        building the vocabulary. Families that override a tokenizer's choice in write_vocab
        override it here too."""
        try:
            n = tokenizer.spm_piece_count(self.ckpt.path, self.cfg.get(int, "vocab_size")) if self.has_spm() else None
            return tokenizer.added_bos(self.ckpt.path, n)
        except QConvertError:
            raise
        except Exception as e:  # gguf's SpecialVocab reads the tokenizer files itself
            raise InputError(f"{self.ckpt.path}: cannot read the tokenizer files: {type(e).__name__}: {e}") from None

    def has_spm(self) -> bool:
        return (self.ckpt.path / "tokenizer.model").is_file()

    def check_tokenizer(self) -> None:
        """Plan-time check that the files the tokenizer needs are there."""
        p: Path = self.ckpt.path
        if not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
            raise InputError(f"{p}: no tokenizer (tokenizer.json or tokenizer.model); the GGUF file "
                             "needs one to run")
