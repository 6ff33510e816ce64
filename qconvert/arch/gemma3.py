"""Gemma 3 (text): GGUF architecture "gemma3".

Transforms llama.cpp expects: RMSNorm weights stored as (1 + w), because Gemma3RMSNorm
multiplies by (1 + weight); token embedding rows beyond the real vocabulary dropped.
"""
from __future__ import annotations

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from qconvert.arch.base import Family, decoder_tensors, layer_types_from_gguf
from qconvert.arch.layers import act, apply_rope, attention, heads, merge, rms_norm
from qconvert.arch.llama import LlamaForward, attention_mlp_groups
from qconvert.arch.spec import Expected, PlannedTensor
from qconvert.errors import InputError
from qconvert.read import tokenizer
from qconvert.read.checkpoint import Tensor
from qconvert.read.config import read_json


def shift_norm(a: np.ndarray, src_dtype: str) -> np.ndarray:
    # llama.cpp's converter adds 1 in the checkpoint's dtype when that is F16 (F32 otherwise)
    if src_dtype == "F16":
        return (a.astype(np.float16) + np.float16(1.0)).astype(np.float32)
    return a + np.float32(1.0)


class Gemma3Forward(LlamaForward):
    """Gemma 3: (1 + w) norms around attention and MLP, scaled embeddings, q/k norms, local and
    global rope (scaling on the global layers only), sliding-window layers, tanh-GELU, optional
    final logit soft-capping."""

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        c = self.cfg
        self.head_dim = c.get(int, "head_dim", default=256, positive=True)
        self.scale = c.get(float, "query_pre_attn_scalar", default=float(self.head_dim), positive=True) ** -0.5
        self.window = c.get(int, "sliding_window", positive=True)
        self.softcap = c.get(float, "final_logit_softcapping", nonnegative=True)
        self.local_theta = float(family.local_rope_theta() or 10000.0)
        self.sliding = family.swa_layers() or [i % 6 < 5 for i in range(family.n_layers)]
        self.act = act(c, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")

    def embed(self, ids):
        e = F.embedding(ids, self.w("model.embed_tokens.weight"))
        return e * torch.tensor(self.cfg.need(int, "hidden_size") ** 0.5, dtype=e.dtype)


    def norm(self, x, name):
        return rms_norm(x, self.w(name), self.eps, plus_one=True)

    def attn(self, i, x):
        p = f"model.layers.{i}."
        q = heads(self.linear(x, p + "self_attn.q_proj"), self.n_head)
        k = heads(self.linear(x, p + "self_attn.k_proj"), self.n_kv)
        v = heads(self.linear(x, p + "self_attn.v_proj"), self.n_kv)
        q, k = self.norm(q, p + "self_attn.q_norm.weight"), self.norm(k, p + "self_attn.k_norm.weight")
        cos, sin = self.rope_of(i, x.shape[1])
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.scale, self.window_of(i))
        return self.linear(merge(o), p + "self_attn.o_proj")

    def layer(self, i, h):
        p = f"model.layers.{i}."
        x = self.norm(h, p + "input_layernorm.weight")
        h = h + self.norm(self.attn(i, x), p + "post_attention_layernorm.weight")
        x = self.norm(h, p + "pre_feedforward_layernorm.weight")
        return h + self.norm(self.mlp(p, x), p + "post_feedforward_layernorm.weight")

    def head(self, h):
        h = self.norm(h, "model.norm.weight")
        name = "lm_head.weight" if self.has("lm_head.weight") else "model.embed_tokens.weight"
        logits = F.linear(h, self.w(name))
        cap = self.softcap
        return torch.tanh(logits / cap) * cap if cap else logits


class Gemma3(Family):
    hf_architectures = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    forward_class = Gemma3Forward
    awq_groups = attention_mlp_groups("norm1p", "pre_feedforward_layernorm")  # (1 + w) norms
    awq_no_clip = ("q_proj", "k_proj")
    example = "google/gemma-3-270m"
    config_defaults = {"*": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6}}  # Gemma3TextConfig

    def expected(self) -> list[Expected]:
        norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
        return decoder_tensors(self.cfg, self.n_layers, norms, qk_norm=True,
                               head_dim=self.cfg.get(int, "head_dim", default=256))

    def tensor(self, hf_name: str, t: Tensor) -> list[PlannedTensor]:
        self.check_float(t)
        name = self.map_name(hf_name)
        if hf_name.endswith("norm.weight"):
            return [PlannedTensor(name, t.shape, t, transform=shift_norm)]
        if "embed_tokens.weight" in hf_name:
            n = min(self.real_vocab(), t.shape[0])
            return [PlannedTensor(name, (n, *t.shape[1:]), t, rows=n)]
        return [PlannedTensor(name, t.shape, t)]

    def from_gguf(self, hf_name: str, a: np.ndarray) -> np.ndarray:
        return a - np.float32(1.0) if hf_name.endswith("norm.weight") else a

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = {**super().config_from_gguf(kv), "hidden_activation": "gelu_pytorch_tanh"}
        n_layers, head_dim = cfg["num_hidden_layers"], cfg.get("head_dim", 256)
        # llama.cpp's attention scale: 1/sqrt(head_dim), but hidden/heads for the 62-layer 27B
        cfg["query_pre_attn_scalar"] = (cfg["hidden_size"] // cfg["num_attention_heads"] if n_layers == 62
                                        else head_dim)
        window = kv.get("gemma3.attention.sliding_window")
        if window:
            cfg["sliding_window"] = window
            cfg["layer_types"] = layer_types_from_gguf(kv.get("gemma3.attention.sliding_window_pattern", 6), n_layers)
        else:
            cfg["layer_types"] = ["full_attention"] * n_layers
        if (local := kv.get("gemma3.rope.freq_base_swa")) is not None:
            cfg["rope_local_base_freq"] = local
        if softcap := kv.get("gemma3.final_logit_softcapping"):
            cfg["final_logit_softcapping"] = softcap
        return cfg

    def real_vocab(self) -> int:
        if self.has_spm():
            return tokenizer.spm_piece_count(self.ckpt.path, self.cfg.get(int, "vocab_size"))
        path = self.ckpt.path / "tokenizer.json"
        tj = read_json(path)
        try:
            return len(tj["model"]["vocab"]) + len(tj.get("added_tokens", []))
        except (KeyError, TypeError, AttributeError):
            raise InputError(f"{path}: no model.vocab in the tokenizer") from None

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        self.generic_hparams(kv, file_type)
        c = self.cfg
        kv.add_context_length(c.get(int, "max_position_embeddings", default=131072))
        kv.add_head_count(c.get(int, "num_attention_heads", default=8))
        kv.add_layer_norm_rms_eps(c.get(float, "rms_norm_eps", default=1e-6))
        head_dim = c.get(int, "head_dim", default=256)
        kv.add_key_length(head_dim)
        kv.add_value_length(head_dim)
        kv.add_rope_freq_base(self.rope_parameters().get("rope_theta", 1_000_000.0))
        if softcap := c.get(float, "final_logit_softcapping"):
            kv.add_final_logit_softcapping(softcap)
        if c.data.get("sliding_window_pattern") != 1:
            kv.add_sliding_window(c.need(int, "sliding_window"))
            pattern = self.swa_layers()
            if pattern is not None and pattern != [i % 6 < 5 for i in range(self.n_layers)]:
                # llama.cpp assumes 5 sliding layers then 1 global unless told; llama.cpp's
                # converter never tells, which breaks checkpoints with another layout
                kv.add_sliding_window_pattern(pattern)
        kv.add_head_count_kv(c.get(int, "num_key_value_heads", default=4))

    def swa_layers(self) -> list[bool] | None:
        types = self.cfg.data.get("layer_types")
        if not isinstance(types, list) or len(types) != self.n_layers:
            return None
        return [t == "sliding_attention" for t in types]

    def write_vocab(self, kv: gguf.GGUFWriter) -> None:
        if self.has_spm():
            tokenizer.spm_vocab(self.ckpt.path, self.cfg.get(int, "vocab_size"), kv)
            kv.add_add_space_prefix(False)
        else:
            tokenizer.bpe_vocab(self.ckpt.path, self.cfg.get(int, "vocab_size"), kv)
