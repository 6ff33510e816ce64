"""Phi-3 and Phi-4 (Phi3ForCausalLM): GGUF architecture "phi3".

Fused projections: self_attn.qkv_proj holds q, k and v rows in that order, mlp.gate_up_proj the
gate rows then the up rows (up * act(gate)); llama.cpp stores both fused (attn_qkv, ffn_up) and
splits them when it runs. Rope may cover only part of each head (partial_rotary_factor, Phi-4-mini)
and may be LongRoPE (the 128k models): per-frequency divisors, the short ones up to
original_max_position_embeddings positions (what llama.cpp picks for a context up to that), and
cos/sin scaled by sqrt(1 + ln(max / original) / ln(original)); the converter writes the factors
as the rope_factors_long/short tensors and the scale as rope.scaling.attn_factor.

The vocabulary is the converter's Phi-3 reading of tokenizer.model (its own handling of added
tokens), or a GPT-2 BPE for Phi-4's GPT2Tokenizer. llama.cpp's phi3 turns a configured sliding
window off (its loader says so); transformers attends within it, so past sliding_window tokens the
GGUF file computes what llama.cpp's own conversion computes.
"""
from __future__ import annotations

import gguf
import numpy as np

from qconvert.arch.base import Family
from qconvert.arch.forward import ScaleGroup
from qconvert.arch.layers import apply_rope, attention, heads, merge
from qconvert.arch.llama import LlamaForward
from qconvert.arch.spec import Expected, PlannedTensor, ScaleSpec
from qconvert.errors import InputError
from qconvert.read import tokenizer
from qconvert.read.config import read_json


class Phi3Forward(LlamaForward):
    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        self.rot = family.rope_dims()
        self.q_rows, self.kv_rows = self.n_head * self.head_dim, self.n_kv * self.head_dim
        self.window = self.cfg.get(int, "sliding_window", positive=True)
        self.long_rope = family.long_rope()
        if self.long_rope is None and self.has("rope_factors_short.weight"):  # a GGUF file's own tables
            scale = family.rope_parameters().get("attention_factor", 1.0)
            self.long_rope = (self.w("rope_factors_short.weight").numpy(), self.w("rope_factors_long.weight").numpy(),
                              family.original_context(), float(scale))

    def rotary_dims(self) -> int:
        return self.rot

    def rope_factors(self, T: int):
        """LongRoPE: the short factors up to the original context, the long ones past it."""
        if self.long_rope is None:
            return None, 1.0
        short, long, original, scale = self.long_rope
        return (long if T > original else short), scale

    def attn(self, i: int, x):
        p = f"model.layers.{i}.self_attn."
        qkv = self.linear(x, p + "qkv_proj")
        q = heads(qkv[..., :self.q_rows], self.n_head)
        k = heads(qkv[..., self.q_rows:self.q_rows + self.kv_rows], self.n_kv)
        v = heads(qkv[..., self.q_rows + self.kv_rows:], self.n_kv)
        cos, sin = self.rope(x.shape[1])
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.attn_scale, self.window)
        return self.linear(merge(o), p + "o_proj")

    def mlp(self, p: str, x):
        gate, up = self.linear(x, p + "mlp.gate_up_proj").chunk(2, dim=-1)
        return self.linear(up * self.act(gate), p + "mlp.down_proj")

    def scale_groups(self, i: int) -> list[ScaleGroup]:
        """AutoAWQ's Phi-3 groups: input norm -> qkv; qkv's v rows -> o (without grouped keys);
        the MLP's norm -> gate_up; gate_up's up rows -> down."""
        p = self.family.layer_prefix(i)
        norm_qkv, norm_mlp = super().scale_groups(i)
        out = [norm_qkv]
        if self.n_kv == self.n_head:
            out.append(ScaleGroup(("linear", p + "self_attn.qkv_proj"), [p + "self_attn.o_proj"],
                                  rows=slice(self.q_rows + self.kv_rows, None)))
        ffn = self.linear_weight(p + "mlp.down_proj").shape[1]
        return out + [norm_mlp, ScaleGroup(("linear", p + "mlp.gate_up_proj"), [p + "mlp.down_proj"],
                                           rows=slice(ffn, None))]


class Phi3(Family):
    hf_architectures = ("Phi3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.PHI3
    forward_class = Phi3Forward
    awq_groups = (ScaleSpec("input_layernorm", "norm", ("self_attn.qkv_proj",), "attention"),
                  ScaleSpec("post_attention_layernorm", "norm", ("mlp.gate_up_proj",), "mlp"))
    # queries and keys stay unclipped, as for every family; the fused qkv_proj holds them (AutoAWQ's
    # substring rule, "q_" / "k_", happens to miss it and clips Phi-3's)
    awq_no_clip = ("qkv_proj",)
    example = "microsoft/Phi-3-mini-4k-instruct"
    config_defaults = {"*": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5,  # Phi3Config's
                             "original_max_position_embeddings": 4096}}

    def expected(self) -> list[Expected]:
        c = self.cfg
        H, V, ffn = c.positive(int, "hidden_size"), c.positive(int, "vocab_size"), c.positive(int, "intermediate_size")
        n_head = c.positive(int, "num_attention_heads")
        n_kv = c.get(int, "num_key_value_heads") or n_head
        if n_head % n_kv:
            raise InputError(f"{c.path}: num_key_value_heads must divide num_attention_heads ({n_head}), got {n_kv}")
        hd = c.get(int, "head_dim") or H // n_head
        out = [Expected("model.embed_tokens.weight", (V, H)), Expected("model.norm.weight", (H,)),
               Expected("lm_head.weight", (V, H), required=False)]
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            out += [Expected(p + "input_layernorm.weight", (H,)), Expected(p + "post_attention_layernorm.weight", (H,)),
                    Expected(p + "self_attn.qkv_proj.weight", ((n_head + 2 * n_kv) * hd, H)),
                    Expected(p + "self_attn.o_proj.weight", (H, n_head * hd)),
                    Expected(p + "mlp.gate_up_proj.weight", (2 * ffn, H)), Expected(p + "mlp.down_proj.weight", (H, ffn))]
        return out

    def rope_dims(self) -> int:
        """Rotated dims per head, as the converter computes them: int(factor * hidden) // heads."""
        c = self.cfg
        factor = self.rope_parameters().get("partial_rotary_factor", 1.0)
        return int(factor * c.need(int, "hidden_size")) // c.need(int, "num_attention_heads")

    def original_context(self) -> int:
        rope = self.rope_parameters()
        v = rope.get("original_max_position_embeddings") or self.cfg.get(int, "original_max_position_embeddings")
        if v is None:
            raise InputError(f"{self.cfg.path}: Phi-3 needs original_max_position_embeddings")
        return int(v)

    def long_rope(self) -> tuple[np.ndarray, np.ndarray, int, float] | None:
        """(short factors, long factors, original context, cos/sin scale) of LongRoPE; None without."""
        rope = self.rope_parameters()
        long, short = rope.get("long_factor"), rope.get("short_factor")
        if not long:
            return None
        kind = str(rope.get("rope_type", "")).lower()
        if kind not in ("longrope", "su"):
            raise InputError(f"{self.cfg.path}: rope long_factor with rope_type {kind!r}: only longrope is supported")
        half = self.rope_dims() // 2
        numbers = [isinstance(f, list) and len(f) == half and
                   all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in f)
                   for f in (long, short)]
        if not all(numbers):
            raise InputError(f"{self.cfg.path}: rope long_factor and short_factor must each hold {half} positive "
                             "numbers")
        original = self.original_context()
        scale = rope.get("attention_factor")
        if scale is None:
            ratio = self.cfg.need(int, "max_position_embeddings") / original
            scale = float(np.sqrt(1 + np.log(ratio) / np.log(original))) if ratio > 1.0 else 1.0
        return np.array(short, np.float32), np.array(long, np.float32), original, float(scale)

    def extra_tensors(self) -> list[PlannedTensor]:
        lr = self.long_rope()
        if lr is None:
            return []
        out = []
        for key, factors in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, lr[1]), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, lr[0])):
            out.append(PlannedTensor(gguf.TENSOR_NAMES[key] + ".weight", factors.shape, None,
                                     make=lambda f=factors: f, force_f32=True))
        return out

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        c = self.cfg
        kv.add_context_length(c.need(int, "max_position_embeddings"))
        kv.add_rope_scaling_orig_ctx_len(self.original_context())
        kv.add_embedding_length(c.need(int, "hidden_size"))
        kv.add_feed_forward_length(c.need(int, "intermediate_size"))
        kv.add_block_count(self.n_layers)
        kv.add_head_count(c.need(int, "num_attention_heads"))
        kv.add_head_count_kv(c.get(int, "num_key_value_heads") or c.need(int, "num_attention_heads"))
        kv.add_layer_norm_rms_eps(c.need(float, "rms_norm_eps"))
        kv.add_rope_dimension_count(self.rope_dims())
        kv.add_rope_freq_base(self.rope_parameters().get("rope_theta", 10000.0))
        kv.add_file_type(file_type)
        kv.add_sliding_window(c.get(int, "sliding_window") or 0)

    def write_early_hparams(self, kv: gguf.GGUFWriter) -> None:
        if (lr := self.long_rope()) is not None:  # written with the rope factor tensors, first
            kv.add_rope_scaling_attn_factors(lr[3])

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = {**super().config_from_gguf(kv), "hidden_act": "silu"}
        n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
        rot = kv.get("phi3.rope.dimension_count", n_embd // n_head)
        # a factor whose int(factor * hidden) // heads is exactly rot again (rope_dims)
        rope = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta", 10000.0),
                "partial_rotary_factor": (rot * n_head + 0.5) / n_embd}
        if (scale := kv.get("phi3.rope.scaling.attn_factor")) is not None:  # LongRoPE: factors in the tensors
            rope["attention_factor"] = scale
        cfg["original_max_position_embeddings"] = kv.get("phi3.rope.scaling.original_context_length")
        cfg["rope_parameters"] = rope
        cfg.pop("head_dim", None)
        return cfg

    def write_vocab(self, kv: gguf.GGUFWriter) -> None:
        tcfg = self.ckpt.path / "tokenizer_config.json"
        if tcfg.is_file() and read_json(tcfg).get("tokenizer_class") == "GPT2Tokenizer":  # Phi-4
            tokenizer.bpe_vocab(self.ckpt.path, self.cfg.get(int, "vocab_size"), kv)
            return
        if not self.has_spm():
            raise InputError(f"{self.ckpt.path}: Phi-3 needs tokenizer.model (or a GPT2Tokenizer's files)")
        tokenizer.spm_vocab(self.ckpt.path, self.cfg.get(int, "vocab_size"), kv, added_as_written=True)
