"""GPT-NeoX / Pythia: GGUF architecture "gptneox" (fused qkv regrouped, partial rotary)."""
from __future__ import annotations

import math

import gguf
import numpy as np
import torch.nn.functional as F

from qconvert.arch.base import Family
from qconvert.arch.forward import Forward
from qconvert.arch.layers import act, apply_rope, attention, merge, rope_tables
from qconvert.arch.spec import Expected, PlannedTensor, ScaleSpec
from qconvert.errors import InputError
from qconvert.read.checkpoint import Tensor


def regroup_qkv(a: np.ndarray, n_head: int) -> np.ndarray:
    """HF interleaves q,k,v per head ([head][q|k|v][dim]); GGUF wants all q, then k, then v."""
    per = a.shape[0] // (3 * n_head)
    g = a.reshape(n_head, 3, per, *a.shape[1:])
    return np.concatenate([g[:, i].reshape(n_head * per, *a.shape[1:]) for i in range(3)], axis=0)


def ungroup_qkv(a: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of regroup_qkv: all q, k, v back to per-head [q|k|v]."""
    per = a.shape[0] // (3 * n_head)
    return np.ascontiguousarray(a.reshape(3, n_head, per, *a.shape[1:]).swapaxes(0, 1)).reshape(a.shape)


class GPTNeoXForward(Forward):
    """GPT-NeoX / Pythia: LayerNorm, fused qkv per head, partial rotary, parallel residual."""

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        c = self.cfg
        self.n_head = c.need(int, "num_attention_heads")
        self.head_dim = c.need(int, "hidden_size") // self.n_head
        rope = family.rope_parameters()
        pct = c.get(float, "rotary_pct", default=rope.get("partial_rotary_factor", 0.25))
        self.rot = int(self.head_dim * pct)
        self.theta = float(rope.get("rope_theta", 10000.0))
        self.eps = c.get(float, "layer_norm_eps", default=1e-5, nonnegative=True)
        self.parallel = c.data.get("use_parallel_residual", True)
        self.act = act(c, "hidden_act", default="gelu")

    def ln(self, x, p):
        return F.layer_norm(x, (x.shape[-1],), self.w(p + ".weight"), self.w(p + ".bias"), self.eps)

    def embed(self, ids):
        return F.embedding(ids, self.w("gpt_neox.embed_in.weight"))

    def layer(self, i, h):
        p = f"gpt_neox.layers.{i}."
        B, T, _ = h.shape
        x = self.ln(h, p + "input_layernorm")
        qkv = self.linear(x, p + "attention.query_key_value").view(B, T, self.n_head, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
        cos, sin = rope_tables(self.rot, self.theta, T)
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, 1.0 / math.sqrt(self.head_dim))
        a = self.linear(merge(o), p + "attention.dense")
        if self.parallel:
            m = self.mlp(p, self.ln(h, p + "post_attention_layernorm"))
            return h + a + m
        h = h + a
        return h + self.mlp(p, self.ln(h, p + "post_attention_layernorm"))

    def mlp(self, p, x):
        a = self.act(self.linear(x, p + "mlp.dense_h_to_4h"))
        if self.has(p + "mlp.act.scales"):  # AWQ checkpoints: transformers' ScaledActivation, act(x) / scales
            a = a / self.w(p + "mlp.act.scales")
        return self.linear(a, p + "mlp.dense_4h_to_h")

    def head(self, h):
        return F.linear(self.ln(h, "gpt_neox.final_layer_norm"), self.w("embed_out.weight"))


class GPTNeoX(Family):
    hf_architectures = ("GPTNeoXForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GPTNEOX
    forward_class = GPTNeoXForward
    awq_groups = (ScaleSpec("input_layernorm", "layernorm", ("attention.query_key_value",)),
                  ScaleSpec("post_attention_layernorm", "layernorm", ("mlp.dense_h_to_4h",)),
                  ScaleSpec("mlp.act.scales", "act", ("mlp.dense_4h_to_h",)))
    awq_no_clip = ("query_key_value",)
    config_defaults = {"*": {"max_position_embeddings": 2048, "layer_norm_eps": 1e-5}}  # GPTNeoXConfig
    example = "EleutherAI/pythia-70m"

    def expected(self) -> list[Expected]:
        c = self.cfg
        H, V, ffn = c.positive(int, "hidden_size"), c.positive(int, "vocab_size"), c.positive(int, "intermediate_size")
        n_head = c.positive(int, "num_attention_heads")
        if H % n_head:
            raise InputError(f"{c.path}: hidden_size {H} is not a multiple of num_attention_heads {n_head}")
        out = [Expected("gpt_neox.embed_in.weight", (V, H)), Expected("embed_out.weight", (V, H)),
               Expected("gpt_neox.final_layer_norm.weight", (H,)), Expected("gpt_neox.final_layer_norm.bias", (H,))]
        for i in range(self.n_layers):
            p = f"gpt_neox.layers.{i}."
            for ln in ("input_layernorm", "post_attention_layernorm"):
                out += [Expected(p + ln + ".weight", (H,)), Expected(p + ln + ".bias", (H,))]
            for name, n_out, n_in in (("attention.query_key_value", 3 * H, H), ("attention.dense", H, H),
                                      ("mlp.dense_h_to_4h", ffn, H), ("mlp.dense_4h_to_h", H, ffn)):
                out += [Expected(p + name + ".weight", (n_out, n_in)), Expected(p + name + ".bias", (n_out,), False)]
        return out

    def tensor(self, hf_name: str, t: Tensor) -> list[PlannedTensor]:
        self.check_float(t)
        name = self.map_name(hf_name)
        if ".attention.query_key_value." in hf_name:
            n_head = self.cfg.need(int, "num_attention_heads")
            return [PlannedTensor(name, t.shape, t, transform=lambda a, _dt: regroup_qkv(a, n_head))]
        return [PlannedTensor(name, t.shape, t)]

    def layer_prefix(self, i: int) -> str:
        return f"gpt_neox.layers.{i}."

    def awq_extra_tensors(self) -> list[tuple[str, tuple[int, ...], int]]:
        """transformers loads AWQ GPT-NeoX with a ScaledActivation before dense_4h_to_h, whose
        scales the checkpoint must carry (AutoAWQ scales that activation too)."""
        n = self.cfg.need(int, "intermediate_size")
        return [(f"gpt_neox.layers.{i}.mlp.act.scales", (n,), i) for i in range(self.n_layers)]

    def from_gguf(self, hf_name: str, a: np.ndarray) -> np.ndarray:
        if ".attention.query_key_value." in hf_name:
            return ungroup_qkv(a, self.cfg.need(int, "num_attention_heads"))
        return a

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = {**super().config_from_gguf(kv), "hidden_act": "gelu",
               "use_parallel_residual": bool(kv.get("gptneox.use_parallel_residual", True))}
        rot = kv.get("gptneox.rope.dimension_count")
        if rot is not None:
            cfg["rotary_pct"] = rot / (cfg["hidden_size"] // cfg["num_attention_heads"])
        return cfg

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        c = self.cfg
        hidden, n_head = c.need(int, "hidden_size"), c.need(int, "num_attention_heads")
        rope = self.rope_parameters()
        pct = c.get(float, "rotary_pct", default=rope.get("partial_rotary_factor", 0.25))
        kv.add_context_length(c.need(int, "max_position_embeddings"))
        kv.add_embedding_length(hidden)
        kv.add_block_count(self.n_layers)
        kv.add_feed_forward_length(c.need(int, "intermediate_size"))
        kv.add_rope_dimension_count(int(pct * (hidden // n_head)))
        kv.add_head_count(n_head)
        kv.add_parallel_residual(c.data.get("use_parallel_residual", True))
        kv.add_layer_norm_eps(c.need(float, "layer_norm_eps"))
        # llama.cpp's converter writes neither; llama.cpp then assumes theta 10000 and no file type
        theta = rope.get("rope_theta", 10000.0)
        if theta != 10000.0:
            kv.add_rope_freq_base(theta)
        kv.add_file_type(file_type)
