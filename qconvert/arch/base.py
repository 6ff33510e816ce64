"""What every model family module provides: tensor plan, GGUF metadata, tokenizer.

A family reads the checkpoint's config and tensor index (metadata only) and says, for every
output tensor, its GGUF name, where its data comes from and what transform the GGUF runtime
expects. Tensor names map through gguf's TensorNameMap (llama.cpp's own alias table).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable, ClassVar

import gguf
import numpy as np

from qconvert.errors import InputError
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
_ALWAYS_F32 = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)

Transform = Callable[[np.ndarray, str], np.ndarray]  # (float32 data, source dtype) -> float32 data


@dataclass
class PlannedTensor:
    """One output tensor, before any data is read."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows first); the writer reverses it for GGUF
    source: Tensor | None  # checkpoint tensor, or None for a generated one
    transform: Transform | None = None  # whole-tensor transform; None streams rows as they are
    rows: int | None = None  # use only the first `rows` rows of the source
    make: Callable[[], np.ndarray] | None = None  # data of a generated tensor
    force_f32: bool = False  # norms, biases, 1-D tensors, position embeddings

    @property
    def n_elements(self) -> int:
        return prod(self.shape)

    @property
    def hf_name(self) -> str:
        return self.source.name if self.source is not None else "(generated)"


class Family:
    """Base of the model family modules. Subclasses set the class attributes and override hooks."""

    hf_architectures: ClassVar[tuple[str, ...]]
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    example: ClassVar[str]  # a model that this family serves, for help texts
    forward_name: ClassVar[str]  # its class in arch/forward.py

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.cfg = ckpt.config
        self.n_layers = self.cfg.need(int, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
        self.name_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    # ---- tensors ---------------------------------------------------------------------------

    def plan_tensors(self) -> list[PlannedTensor]:
        out: list[PlannedTensor] = []
        for t in self.extra_tensors():
            out.append(t)
        for hf_name, t in self.ckpt.tensors.items():
            if hf_name.endswith(SKIP_SUFFIXES) or hf_name.startswith(NOT_TEXT) or self.skip(hf_name):
                continue
            hf_name = hf_name.replace("language_model.", "")
            for p in self.tensor(hf_name, t):
                p.force_f32 = p.force_f32 or self.keeps_f32(p)
                out.append(p)
        seen: set[str] = set()
        for p in out:
            if p.name in seen:
                raise InputError(f"{self.ckpt.path}: two tensors map to GGUF name {p.name!r}")
            seen.add(p.name)
        return out

    def shape(self):
        """Head counts and depth, as llama-quantize's choices read them."""
        from qconvert.quant.recipes import ModelShape

        n_head = self.cfg.need(int, "num_attention_heads", "n_head", "n_heads")
        return ModelShape(self.n_layers, n_head, self.cfg.get(int, "num_key_value_heads", "n_kv_heads", default=n_head))

    def forward(self, weights=None):
        """The family's layer-by-layer torch forward (arch/forward.py), reading the checkpoint's
        tensors, or `weights` (HF name -> tensor) such as the dequantized tensors of a GGUF."""
        from qconvert.arch import forward

        return getattr(forward, self.forward_name)(self, weights)

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
               "rope_theta": get("rope.freq_base")}
        scaling, factor = get("rope.scaling.type"), get("rope.scaling.factor")
        if scaling == "linear" and factor:
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
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

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        """Hyperparameters, in the order and with the keys llama.cpp's converter writes."""
        self.generic_hparams(kv, file_type)

    def generic_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        c = self.cfg
        kv.add_block_count(self.n_layers)
        if (v := c.get(int, "max_position_embeddings", "n_ctx", "n_positions", "max_length",
                       "max_sequence_length", "model_max_length")) is not None:
            kv.add_context_length(v)
        if (v := c.get(int, "hidden_size", "n_embd", "dim")) is not None:
            kv.add_embedding_length(v)
        if (v := c.get(int, "prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                       "n_inner", "hidden_dim")) is not None:
            kv.add_feed_forward_length(v)
        if (v := c.get(int, "num_attention_heads", "n_head", "n_heads")) is not None:
            kv.add_head_count(v)
        if (v := c.get(int, "num_key_value_heads", "n_kv_heads")) is not None:
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
                for key, add in (("extrapolation_factor", kv.add_rope_scaling_yarn_ext_factor),
                                 ("beta_fast", kv.add_rope_scaling_yarn_beta_fast),
                                 ("beta_slow", kv.add_rope_scaling_yarn_beta_slow)):
                    if rope.get(key) is not None:
                        add(rope[key])
                if (a := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                    kv.add_rope_scaling_yarn_attn_factor(a)
            elif rope_type in ("su", "longrope"):
                kv.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            elif rope_type not in ("default", "dynamic") and str(rope_type).lower() != "llama3":
                raise InputError(f"{c.path}: unsupported rope_type {rope_type!r}")
        if (theta := rope.get("rope_theta")) is not None:
            kv.add_rope_freq_base(theta)
        if (local := self.local_rope_theta()) is not None:
            kv.add_rope_freq_base_swa(local)
        if (v := c.get(float, "rms_norm_eps", "norm_eps")) is not None:
            kv.add_layer_norm_rms_eps(v)
        if (v := c.get(float, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")) is not None:
            kv.add_layer_norm_eps(v)
        if (v := c.get(int, "head_dim")) is not None:
            kv.add_key_length(v)
            kv.add_value_length(v)
        kv.add_file_type(file_type)

    def local_rope_theta(self) -> float | None:
        c = self.cfg.data
        params = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if isinstance(params.get("sliding_attention"), dict):
            return params["sliding_attention"].get("rope_theta")
        return next((c[k] for k in ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                                    "rope_local_base_freq") if c.get(k) is not None), None)

    def rope_parameters(self) -> dict:
        """rope settings with the global theta mirrored in, as llama.cpp's TextModel does."""
        c = self.cfg.data
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope = dict(rope.get("full_attention", rope))
        for keys, dest in ((("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                             "rotary_emb_base"), "rope_theta"),
                           (("partial_rotary_factor", "rope_pct", "rope_percent"), "partial_rotary_factor")):
            v = next((c[k] for k in keys if c.get(k) is not None), None)
            if dest not in rope and v is not None:
                rope[dest] = v
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        return rope

    def write_vocab(self, kv: gguf.GGUFWriter) -> None:
        """Default: a BPE tokenizer.json (gpt2 model in GGUF terms)."""
        tokenizer.bpe_vocab(self.ckpt.path, self.cfg.get(int, "vocab_size"), kv)

    def has_spm(self) -> bool:
        return (self.ckpt.path / "tokenizer.model").is_file()

    def check_tokenizer(self) -> None:
        """Plan-time check that the files the tokenizer needs are there."""
        p: Path = self.ckpt.path
        if not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
            raise InputError(f"{p}: no tokenizer (tokenizer.json or tokenizer.model); the GGUF file "
                             "needs one to run")
