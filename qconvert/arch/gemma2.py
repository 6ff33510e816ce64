"""Gemma 2: GGUF architecture "gemma2".

Gemma 3's layer without its q/k norms: (1 + w) norms before and after attention and the MLP,
scaled embeddings, tanh-GELU; attention scores soft-capped (attn_logit_softcapping: cap *
tanh(score / cap)) and the logits too (final_logit_softcapping); every other layer (the first
included) attends within a sliding window, one rope theta for all.

llama.cpp's converter writes its own short list of keys (no rope theta: llama.cpp's 10000), ties
the output to the token embeddings (lm_head dropped) and adds 1 to the norms as Gemma 3's. What
llama.cpp's gemma2 cannot be told (an attention scale other than its 1/sqrt(head_dim), or
hidden/heads at 46 layers; an output matrix of its own) makes a GGUF file refused here rather
than written wrong; a rope theta other than 10000 is written, which the converter leaves out.
"""
from __future__ import annotations

import math

import gguf

from qconvert.arch.base import decoder_tensors, layer_types_from_gguf
from qconvert.arch.gemma3 import Gemma3, Gemma3Forward, shift_norm
from qconvert.arch.layers import apply_rope, attention, heads, merge
from qconvert.arch.spec import Expected, PlannedTensor
from qconvert.errors import InputError
from qconvert.read.checkpoint import Tensor

LLAMA_CPP_THETA = 10000.0


class Gemma2Forward(Gemma3Forward):
    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        self.sliding = family.swa_layers()
        self.attn_softcap = self.cfg.get(float, "attn_logit_softcapping", nonnegative=True)

    def attn(self, i, x):
        p = f"model.layers.{i}."
        q = heads(self.linear(x, p + "self_attn.q_proj"), self.n_head)
        k = heads(self.linear(x, p + "self_attn.k_proj"), self.n_kv)
        v = heads(self.linear(x, p + "self_attn.v_proj"), self.n_kv)
        cos, sin = self.rope(x.shape[1])  # one rope for every layer, sliding or not
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.scale, self.window_of(i),
                      self.attn_softcap)
        return self.linear(merge(o), p + "self_attn.o_proj")


class Gemma2(Gemma3):
    hf_architectures = ("Gemma2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    forward_class = Gemma2Forward
    example = "google/gemma-2-2b"
    # Gemma2Config's
    config_defaults = {"*": {"max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "head_dim": 256,
                             "query_pre_attn_scalar": 256, "sliding_window": 4096}}
    SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}  # absent: these; null: none

    def __init__(self, ckpt):
        super().__init__(ckpt)
        for key, value in self.SOFTCAPS.items():
            self.cfg.data.setdefault(key, value)

    def expected(self) -> list[Expected]:
        norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
        return decoder_tensors(self.cfg, self.n_layers, norms, head_dim=self.cfg.get(int, "head_dim"))

    def skip(self, hf_name: str) -> bool:
        return hf_name == "lm_head.weight"  # llama.cpp's gemma2 computes the logits with the embeddings

    def tensor(self, hf_name: str, t: Tensor) -> list[PlannedTensor]:
        self.check_float(t)
        name = self.map_name(hf_name)
        if hf_name.endswith("norm.weight"):
            return [PlannedTensor(name, t.shape, t, transform=shift_norm)]
        return [PlannedTensor(name, t.shape, t)]

    def swa_layers(self) -> list[bool] | None:
        return super().swa_layers() or [i % 2 == 0 for i in range(self.n_layers)]

    def llama_cpp_scale(self) -> float:
        """The query scale llama.cpp's gemma2 uses: 1/sqrt(head_dim), or 1/sqrt(hidden / heads) at 46 layers."""
        c = self.cfg
        if self.n_layers == 46:
            return 1 / math.sqrt(c.need(int, "hidden_size") // c.need(int, "num_attention_heads"))
        return 1 / math.sqrt(c.need(int, "head_dim"))

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        c = self.cfg
        scalar = c.get(float, "query_pre_attn_scalar", positive=True)
        if not math.isclose(scalar ** -0.5, self.llama_cpp_scale(), rel_tol=1e-6):
            raise InputError(f"{c.path}: query_pre_attn_scalar {scalar:g} gives attention scale {scalar ** -0.5:.6g}; "
                             f"llama.cpp's gemma2 uses {self.llama_cpp_scale():.6g} and cannot be told otherwise")
        if "lm_head.weight" in self.ckpt.tensors and c.data.get("tie_word_embeddings") is False:
            raise InputError(f"{c.path}: the checkpoint has an lm_head of its own; llama.cpp's gemma2 computes the "
                             "logits with the token embeddings")
        for key in self.SOFTCAPS:
            if not c.get(float, key, nonnegative=True):
                raise InputError(f"{c.path}: {key} is {c.data.get(key)!r} (no soft-capping); llama.cpp's gemma2 "
                                 "always soft-caps and cannot be told otherwise")
        kind = str(self.rope_parameters().get("rope_type") or "default").lower()
        if kind != "default":
            raise InputError(f"{c.path}: rope_type {kind!r}: llama.cpp's gemma2 is not told of rope scaling "
                             "(its converter writes none)")
        kv.add_context_length(c.need(int, "max_position_embeddings"))
        kv.add_embedding_length(c.need(int, "hidden_size"))
        kv.add_block_count(self.n_layers)
        kv.add_feed_forward_length(c.need(int, "intermediate_size"))
        kv.add_head_count(c.need(int, "num_attention_heads"))
        kv.add_head_count_kv(c.get(int, "num_key_value_heads") or c.need(int, "num_attention_heads"))
        kv.add_layer_norm_rms_eps(c.need(float, "rms_norm_eps"))
        kv.add_key_length(c.need(int, "head_dim"))
        kv.add_value_length(c.need(int, "head_dim"))
        kv.add_file_type(file_type)
        kv.add_attn_logit_softcapping(c.need(float, "attn_logit_softcapping"))
        kv.add_final_logit_softcapping(c.need(float, "final_logit_softcapping"))
        kv.add_sliding_window(c.need(int, "sliding_window"))
        if self.swa_layers() != [i % 2 == 0 for i in range(self.n_layers)]:
            kv.add_sliding_window_pattern(self.swa_layers())  # llama.cpp assumes every other layer unless told
        if (theta := self.rope_parameters().get("rope_theta", LLAMA_CPP_THETA)) != LLAMA_CPP_THETA:
            kv.add_rope_freq_base(theta)

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = super(Gemma3, cls).config_from_gguf(kv)  # the base's, not Gemma 3's
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        n_layers = cfg["num_hidden_layers"]
        cfg["query_pre_attn_scalar"] = (cfg["hidden_size"] // cfg["num_attention_heads"] if n_layers == 46
                                        else cfg.get("head_dim", 256))
        cfg["sliding_window"] = kv.get("gemma2.attention.sliding_window", 4096)
        cfg["layer_types"] = layer_types_from_gguf(kv.get("gemma2.attention.sliding_window_pattern", 2), n_layers)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if (v := kv.get(f"gemma2.{key}")) is not None:
                cfg[key] = v
        cfg.setdefault("rope_theta", LLAMA_CPP_THETA)
        return cfg
