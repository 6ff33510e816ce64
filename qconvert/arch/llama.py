"""Llama 2/3, SmolLM, TinyLlama, Mistral: GGUF architecture "llama"."""
from __future__ import annotations

import math

import gguf
import numpy as np
import torch.nn.functional as F

from qconvert.arch.base import Family, decoder_tensors
from qconvert.arch.forward import Forward
from qconvert.arch.layers import act, apply_rope, attention, heads, merge, rms_norm, rope_tables
from qconvert.arch.spec import Expected, PlannedTensor, ScaleSpec
from qconvert.errors import InputError
from qconvert.read import tokenizer
from qconvert.read.checkpoint import Tensor


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows with the rotary halves split; GGUF's llama wants them interleaved."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_rope: GGUF's interleaved q/k rows back to HF's split halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def attention_mlp_groups(norm_kind: str, mlp_norm: str) -> tuple[ScaleSpec, ...]:
    """AutoAWQ's groups for a Llama-style layer: input norm -> q, k, v (the attention block
    compared); v -> o when their shapes match; the MLP's norm -> gate, up (the MLP compared);
    up -> down."""
    return (ScaleSpec("input_layernorm", norm_kind, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                      "attention"),
            ScaleSpec("self_attn.v_proj", "linear", ("self_attn.o_proj",), same_shape=True),
            ScaleSpec(mlp_norm, norm_kind, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScaleSpec("mlp.up_proj", "linear", ("mlp.down_proj",)))


class LlamaForward(Forward):
    """Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), with Llama 3 rope scaling."""

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        c = self.cfg
        self.n_head = c.need(int, "num_attention_heads")
        self.n_kv = c.get(int, "num_key_value_heads", default=self.n_head)
        self.head_dim = c.get(int, "head_dim", positive=True) or c.positive(int, "hidden_size") // self.n_head
        self.eps = c.get(float, "rms_norm_eps", default=1e-6, nonnegative=True)
        rope = family.rope_parameters()
        self.theta = float(rope.get("rope_theta", 10000.0))
        self.factors = None  # per-frequency divisors: Llama 3 scaling, or linear scaling's factor
        if self.has("rope_freqs.weight"):  # a GGUF's own table, as llama.cpp reads it
            self.factors = self.w("rope_freqs.weight").numpy().copy()
        elif str(rope.get("rope_type", "")).lower() == "llama3":
            self.factors = llama3_rope_factors(rope, self.head_dim)
        elif str(rope.get("rope_type", "")).lower() == "linear":
            self.factors = np.full(self.head_dim // 2, float(rope["factor"]), dtype=np.float32)
        self.rope_scale = 1.0  # cos/sin multiplier (YaRN's attention factor)
        if str(rope.get("rope_type", "")).lower() == "yarn":
            self.factors, self.rope_scale = yarn_rope_factors(rope, self.head_dim,
                                                              c.get(int, "max_position_embeddings"))
        self.act = act(c, "hidden_act", default="silu")
        self.attn_scale = 1.0 / math.sqrt(self.head_dim)
        self._rope: dict[int, tuple] = {}
        # sliding-window layers (Gemma 2/3, OLMo 3), set by the families that have them: their
        # window, and their rope (plain, with a theta of their own)
        self.sliding = [False] * family.n_layers
        self.window: int | None = None
        self.local_theta = self.theta
        self._local_rope: dict[int, tuple] = {}

    def rotary_dims(self) -> int:
        """The dims of each head that rope turns (all of them but for Phi's partial rotary)."""
        return self.head_dim

    def rope_factors(self, T: int) -> tuple[np.ndarray | None, float]:
        """Per-frequency divisors and the cos/sin scale for T positions."""
        return self.factors, self.rope_scale

    def rope(self, T: int):
        if T not in self._rope:
            factors, scale = self.rope_factors(T)
            cos, sin = rope_tables(self.rotary_dims(), self.theta, T, factors)
            self._rope = {T: (cos * scale, sin * scale) if scale != 1.0 else (cos, sin)}
        return self._rope[T]

    def rope_of(self, i: int, T: int):
        """Layer i's (cos, sin) for T positions, or None where the layer takes no rope (SmolLM3)."""
        if not self.sliding[i]:
            return self.rope(T)
        if T not in self._local_rope:
            self._local_rope = {T: rope_tables(self.rotary_dims(), self.local_theta, T)}
        return self._local_rope[T]

    def window_of(self, i: int) -> int | None:
        return self.window if self.sliding[i] else None

    def embed(self, ids):
        return F.embedding(ids, self.w("model.embed_tokens.weight"))

    def attn(self, i: int, x):
        p = f"model.layers.{i}."
        q = heads(self.linear(x, p + "self_attn.q_proj"), self.n_head)
        k = heads(self.linear(x, p + "self_attn.k_proj"), self.n_kv)
        v = heads(self.linear(x, p + "self_attn.v_proj"), self.n_kv)
        if self.has(p + "self_attn.q_norm.weight"):  # Qwen3
            q = rms_norm(q, self.w(p + "self_attn.q_norm.weight"), self.eps)
            k = rms_norm(k, self.w(p + "self_attn.k_norm.weight"), self.eps)
        if (rope := self.rope_of(i, x.shape[1])) is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = attention(q, k, v, self.attn_scale, self.window_of(i))
        return self.linear(merge(o), p + "self_attn.o_proj")

    def mlp(self, p: str, x):
        g = self.linear(x, p + "mlp.gate_proj")
        u = self.linear(x, p + "mlp.up_proj")
        return self.linear(self.act(g) * u, p + "mlp.down_proj")

    def block(self, i, name):
        if name == "attention":
            return lambda x: self.attn(i, x)
        return lambda x: self.mlp(f"model.layers.{i}.", x)

    def layer(self, i, h):
        p = f"model.layers.{i}."
        x = rms_norm(h, self.w(p + "input_layernorm.weight"), self.eps)
        h = h + self.attn(i, x)
        x = rms_norm(h, self.w(p + "post_attention_layernorm.weight"), self.eps)
        return h + self.mlp(p, x)

    def head(self, h):
        h = rms_norm(h, self.w("model.norm.weight"), self.eps)
        name = "lm_head.weight" if self.has("lm_head.weight") else "model.embed_tokens.weight"
        return F.linear(h, self.w(name))


class Llama(Family):
    hf_architectures = ("LLaMAForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    forward_class = LlamaForward
    awq_groups = attention_mlp_groups("norm", "post_attention_layernorm")
    awq_no_clip = ("q_proj", "k_proj")
    example = "HuggingFaceTB/SmolLM2-135M"
    config_defaults = {"*": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6},  # LlamaConfig
                       "MistralForCausalLM": {"max_position_embeddings": 4096 * 32}}  # MistralConfig

    def __init__(self, ckpt):
        super().__init__(ckpt)
        self.n_head = self.cfg.need(int, "num_attention_heads", "n_heads")
        self.n_head_kv = self.cfg.get(int, "num_key_value_heads", "n_kv_heads", default=self.n_head)

    def expected(self) -> list[Expected]:
        return decoder_tensors(self.cfg, self.n_layers, head_dim=self.head_dim())

    def tensor(self, hf_name: str, t: Tensor) -> list[PlannedTensor]:
        self.check_float(t)
        heads = self.rope_heads(hf_name)
        if heads is None:
            return [PlannedTensor(self.map_name(hf_name), t.shape, t)]
        if t.shape[0] % (2 * heads):
            raise InputError(f"{self.ckpt.path}: tensor {t.name!r} has {t.shape[0]} rows, not a multiple of "
                             f"2*{heads} heads")
        return [PlannedTensor(self.map_name(hf_name), t.shape, t, transform=lambda a, _dt, h=heads: permute_rope(a, h))]

    def rope_heads(self, hf_name: str) -> int | None:
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return self.n_head
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return self.n_head_kv
        return None

    def from_gguf(self, hf_name: str, a: np.ndarray) -> np.ndarray:
        heads = self.rope_heads(hf_name)
        return a if heads is None else unpermute_rope(a, heads)

    @classmethod
    def reads_gguf(cls, kv: dict) -> bool:
        return not kv.get(f"{gguf.MODEL_ARCH_NAMES[cls.gguf_arch]}.expert_count")

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        return {**super().config_from_gguf(kv), "hidden_act": "silu"}

    def extra_tensors(self) -> list[PlannedTensor]:
        rope = self.rope_parameters()
        if str(rope.get("rope_type", "")).lower() != "llama3":
            return []
        factors = llama3_rope_factors(rope, self.head_dim())
        return [PlannedTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape, None,
                              make=lambda: factors, force_f32=True)]

    def head_dim(self) -> int:
        return self.cfg.get(int, "head_dim") or self.cfg.need(int, "hidden_size") // self.n_head

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        self.generic_hparams(kv, file_type)
        kv.add_vocab_size(self.cfg.need(int, "vocab_size"))
        kv.add_rope_dimension_count(self.head_dim())

    def bos_id(self) -> int | None:
        # llama.cpp's converter: no BOS for 49152-token vocabularies (SmolLM), as write_vocab
        return None if self.cfg.get(int, "vocab_size") == 49152 else super().bos_id()

    def write_vocab(self, kv: gguf.GGUFWriter) -> None:
        tcfg = self.ckpt.path / "tokenizer_config.json"
        if tcfg.is_file():
            data = tokenizer._json_or_empty(tcfg)
            if data.get("add_prefix_space") is not None:
                kv.add_add_space_prefix(data["add_prefix_space"])
        vocab_size = self.cfg.get(int, "vocab_size")
        if self.has_spm():
            tokenizer.spm_vocab(self.ckpt.path, vocab_size, kv)
        else:
            tokenizer.bpe_vocab(self.ckpt.path, vocab_size, kv)
        # llama.cpp's converter: CodeLlama's infill tokens, and no BOS for 49152-token vocabularies
        if vocab_size == 32016:
            sv = gguf.SpecialVocab(self.ckpt.path, load_merges=False,
                                   special_token_types=["prefix", "suffix", "middle", "eot"])
            for kind, i in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                sv._set_special_token(kind, i)
            sv.add_to_gguf(kv, quiet=True)
        if vocab_size == 49152:
            kv.add_add_bos_token(False)


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """Llama 3.1 rope scaling as per-frequency factors (the rope_freqs tensor llama.cpp reads)."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / float(f)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def yarn_rope_factors(rope: dict, dim: int, max_positions: int | None) -> tuple[np.ndarray, float]:
    """YaRN (transformers' _compute_yarn_parameters) as per-frequency divisors of the plain
    inverse frequencies, and the cos/sin scale (attention factor): frequencies below the
    correction range are interpolated (divided by factor), above it kept, ramped between."""
    base, factor = float(rope.get("rope_theta", 10000.0)), rope.get("factor")
    original = rope["original_max_position_embeddings"]
    if factor is None:
        factor = max_positions / original
    scale = rope.get("attention_factor")
    if scale is None:
        def mscale(m: float = 1.0) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        scale = mscale(m) / mscale(m_all) if m and m_all else mscale()
    fast, slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = correction(fast), correction(slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return (1.0 / (keep + (1 - keep) / factor)).astype(np.float32), float(scale)
