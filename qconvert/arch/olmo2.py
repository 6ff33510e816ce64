"""OLMo 2 and OLMo 3: GGUF architecture "olmo2".

No norm before attention or the MLP: each block's output is normed (post_attention_layernorm,
post_feedforward_layernorm) before it joins the residual stream; RMS norms over the whole q and
k projections (all heads together, as OLMoE). llama.cpp's converter stores the tensors as they
are (no rotary permutation).

OLMo 3 adds sliding-window attention on the layers its layer_types name (by default all but
every 4th), each layer type with its own rope settings; llama.cpp's converter writes the window
and the pattern (its olmo2 loader reads them), and a sliding layers' rope theta of its own as
rope.freq_base_swa, which llama.cpp's olmo2 reads but does not use (its sliding layers take the
full layers' theta): a GGUF file of such a checkpoint is refused. Rope scaling (the long-context
OLMo 3 models' YaRN) applies to the full layers only, in transformers and in llama.cpp.

AWQ: with no norm before q/k/v or gate/up, only v -> o (without grouped keys) and up -> down
can take scales, as llm-compressor's mappings for OLMo; the other linears are clipped and
quantized as they are.
"""
from __future__ import annotations

import gguf

from qconvert.arch.base import Family, decoder_tensors, layer_types_from_gguf
from qconvert.arch.layers import apply_rope, attention, heads, merge, rms_norm
from qconvert.arch.llama import Llama, LlamaForward
from qconvert.arch.spec import Expected, ScaleSpec
from qconvert.errors import InputError


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
        cos, sin = self.rope_of(i, x.shape[1])
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.attn_scale, self.window_of(i))
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
    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        self.sliding = family.swa_layers()
        self.window = self.cfg.get(int, "sliding_window", positive=True) if any(self.sliding) else None
        local = family.local_rope_theta()
        self.local_theta = float(local) if local is not None else self.theta
        self.rope_kind = str(family.rope_parameters().get("rope_type") or "default").lower()

    def rope_of(self, i: int, T: int):
        """The full layers' rope (scaled, as the full_attention settings say: the long-context OLMo
        3's YaRN); the sliding layers' plain, with their own theta (llama.cpp: freq_scale 1)."""
        if self.rope_kind not in ("default", "yarn", "linear", "llama3"):  # said when the forward first runs
            raise InputError(f"{self.cfg.path}: rope_type {self.rope_kind!r} is not computed by qconvert's OLMo "
                             "forward (GGUF files without calibration, --no-calib, are written as the converter "
                             "writes them)")
        return super().rope_of(i, T)

    def layer(self, i, h):
        p = f"model.layers.{i}."
        h = h + rms_norm(self.attn(i, h), self.w(p + "post_attention_layernorm.weight"), self.eps)
        return h + rms_norm(self.mlp(p, h), self.w(p + "post_feedforward_layernorm.weight"), self.eps)


class Olmo2(Family):
    hf_architectures = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")
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

    def swa_layers(self) -> list[bool]:
        """Which layers slide, as the converter's Olmo2Model decides: layer_types, else (OLMo 3)
        all but every 4th; OLMo 2 has no window."""
        if "sliding_window" not in self.cfg.data or self.cfg.data.get("sliding_window") is None:
            return [False] * self.n_layers
        types = self.cfg.data.get("layer_types")
        if isinstance(types, list) and len(types) == self.n_layers:
            return [t == "sliding_attention" for t in types]
        return [(i + 1) % 4 != 0 for i in range(self.n_layers)]

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        local, full = self.local_rope_theta(), self.rope_parameters().get("rope_theta")
        if local is not None and full is not None and local != full and any(self.swa_layers()):
            raise InputError(f"{self.cfg.path}: the sliding layers' rope theta {local:g} is not the full layers' "
                             f"{full:g}; llama.cpp's olmo2 ropes its sliding layers with the full layers' theta")
        super().write_hparams(kv, file_type)
        if "sliding_window" in self.cfg.data and self.cfg.data.get("sliding_window") is not None:
            kv.add_sliding_window(self.cfg.need(int, "sliding_window"))
            kv.add_sliding_window_pattern(self.swa_layers())

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = {**super().config_from_gguf(kv), "hidden_act": "silu"}
        if (window := kv.get("olmo2.attention.sliding_window")) is not None:
            cfg["sliding_window"] = window  # llama.cpp's olmo2: every 4th layer full unless told
            cfg["layer_types"] = layer_types_from_gguf(kv.get("olmo2.attention.sliding_window_pattern", 4),
                                                       cfg["num_hidden_layers"])
            if (local := kv.get("olmo2.rope.freq_base_swa")) is not None:
                cfg["rope_local_base_freq"] = local
        return cfg
