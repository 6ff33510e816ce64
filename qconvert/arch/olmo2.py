"""OLMo 2: GGUF architecture "olmo2".

No norm before attention or the MLP: each block's output is normed (post_attention_layernorm,
post_feedforward_layernorm) before it joins the residual stream; RMS norms over the whole q and
k projections (all heads together, as OLMoE). llama.cpp's converter stores the tensors as they
are (no rotary permutation).

AWQ: with no norm before q/k/v or gate/up, only v -> o (without grouped keys) and up -> down
can take scales, as llm-compressor's mappings for OLMo; the other linears are clipped and
quantized as they are.
"""
from __future__ import annotations

import gguf

from qconvert.arch.base import Family, decoder_tensors
from qconvert.arch.layers import apply_rope, attention, heads, merge, rms_norm
from qconvert.arch.llama import Llama, LlamaForward
from qconvert.arch.spec import Expected, ScaleSpec


class WholeQKNorm:
    """Attention with RMS norms over the whole q and k projections (not per head), heads and
    rotary embeddings: OLMo 2's and OLMoE's; with `clips_qkv`, q, k and v clamped to the config's
    clip_qkv first (OLMoE's; OLMo 2 ignores the key)."""

    clips_qkv = False

    def attn(self, i: int, x):
        p = f"model.layers.{i}.self_attn."
        q = rms_norm(self.linear(x, p + "q_proj"), self.w(p + "q_norm.weight"), self.eps)
        k = rms_norm(self.linear(x, p + "k_proj"), self.w(p + "k_norm.weight"), self.eps)
        v = self.linear(x, p + "v_proj")
        clip = self.cfg.get(float, "clip_qkv") if self.clips_qkv else None
        if clip is not None:
            q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
        q, k, v = heads(q, self.n_head), heads(k, self.n_kv), heads(v, self.n_kv)
        cos, sin = self.rope(x.shape[1])
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.attn_scale)
        return self.linear(merge(o), p + "o_proj")


def whole_qk_norms(expected: list[Expected], cfg, n_layers: int) -> list[Expected]:
    """decoder_tensors' `expected` with WholeQKNorm's q and k norms, [heads * head_dim] and
    [kv heads * head_dim], in place of per-head ones."""
    H, n_head = cfg.positive(int, "hidden_size"), cfg.positive(int, "num_attention_heads")
    hd = cfg.get(int, "head_dim") or H // n_head
    q, kv = n_head * hd, (cfg.get(int, "num_key_value_heads") or n_head) * hd
    return [e for e in expected if not e.name.endswith(("q_norm.weight", "k_norm.weight"))] + \
        [e for i in range(n_layers) for e in (Expected(f"model.layers.{i}.self_attn.q_norm.weight", (q,)),
                                              Expected(f"model.layers.{i}.self_attn.k_norm.weight", (kv,)))]


class Olmo2Forward(WholeQKNorm, LlamaForward):
    def layer(self, i, h):
        p = f"model.layers.{i}."
        h = h + rms_norm(self.attn(i, h), self.w(p + "post_attention_layernorm.weight"), self.eps)
        return h + rms_norm(self.mlp(p, h), self.w(p + "post_feedforward_layernorm.weight"), self.eps)


class Olmo2(Family):
    hf_architectures = ("Olmo2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.OLMO2
    forward_class = Olmo2Forward
    awq_groups = (ScaleSpec("self_attn.v_proj", "linear", ("self_attn.o_proj",), same_shape=True),
                  ScaleSpec("mlp.up_proj", "linear", ("mlp.down_proj",)))
    awq_no_clip = Llama.awq_no_clip
    example = "allenai/OLMo-2-0425-1B"
    config_defaults = {"*": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5}}  # Olmo2Config

    def expected(self) -> list[Expected]:
        norms = ("post_attention_layernorm", "post_feedforward_layernorm")
        return whole_qk_norms(decoder_tensors(self.cfg, self.n_layers, norms), self.cfg, self.n_layers)

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        return {**super().config_from_gguf(kv), "hidden_act": "silu"}
