"""DeepSeek-V2 and DeepSeek-V3 (and the models built on them: Kimi K2, DeepSeek-R1, Moonlight):
GGUF architecture "deepseek2".

Attention is multi-head latent attention (MLA): queries from the hidden state (q_proj) or through a
low-rank bottleneck (q_a_proj, its RMS norm, q_b_proj); keys and values from one compressed latent
(kv_a_proj_with_mqa gives the latent and a rope key shared by every head; the latent's RMS norm;
kv_b_proj expands it into each head's key without rope and its value). Rope turns only the
qk_rope_head_dim part of each query and the shared key, as adjacent pairs (DeepSeek's interleaved
layout, llama.cpp's NORM rope; V3 with rope_interleave false: rotate-half). llama.cpp runs MLA
absorbed: its converter splits kv_b_proj into attn_k_b [heads, latent, nope] (each head's key
rows, transposed) and attn_v_b [heads, value, latent], and writes the model as one KV head.

The layers after the first `first_k_dense_replace` are mixtures: a router over n_routed_experts
(V2: softmax; V3: sigmoid, with e_score_correction_bias added for the choice only and the
choice limited to the best topk_group of n_group expert groups), the chosen weights renormalised
where norm_topk_prob says and multiplied by routed_scaling_factor, plus n_shared_experts shared
experts as one gated MLP on every token (ffn_*_shexp). Multi-token-prediction layers past
num_hidden_layers (DeepSeek-V3's layer 61) are left out, as llama.cpp's converter leaves them.
"""
from __future__ import annotations

import math

import gguf
import numpy as np
import torch

from qconvert.arch.base import Family
from qconvert.arch.forward import ScaleGroup
from qconvert.arch.layers import apply_rope, attention, heads, merge, rms_norm
from qconvert.arch.moe import MoEForward
from qconvert.arch.spec import Expected, ModelShape, PlannedTensor
from qconvert.errors import InputError
from qconvert.read.checkpoint import Tensor


def _yarn_mscale(factor: float, m: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


class DeepseekForward(MoEForward):
    """MLA attention and DeepSeek's routing, as transformers' DeepseekV2/V3 modules compute them."""

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        c = self.cfg
        self.q_lora = c.get(int, "q_lora_rank", positive=True)
        self.kv_lora = c.positive(int, "kv_lora_rank")
        self.nope = c.positive(int, "qk_nope_head_dim")
        self.rope_dim = c.positive(int, "qk_rope_head_dim")
        self.v_dim = c.positive(int, "v_head_dim")
        self.v3 = family.v3
        # V2 turns adjacent pairs (complex numbers); V3 too unless rope_interleave is false
        self.interleaved = not self.v3 or c.data.get("rope_interleave", True) is not False
        self.sigmoid = family.scoring() == "sigmoid"
        self.topk_method = c.data.get("topk_method") or ("noaux_tc" if self.v3 else "greedy")
        self.n_group = c.get(int, "n_group", positive=True) or 1
        self.topk_group = c.get(int, "topk_group", positive=True) or 1
        self.scale_routed = float(c.get(float, "routed_scaling_factor", default=1.0))
        rope = family.rope_parameters()
        scale = (self.nope + self.rope_dim) ** -0.5
        if str(rope.get("rope_type", "default")).lower() not in ("default", "none") and rope.get("mscale_all_dim"):
            m = _yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"]))
            scale *= m * m
        self.attn_scale = scale

    def rotary_dims(self) -> int:
        return self.rope_dim

    def attn(self, i: int, x):
        a = f"model.layers.{i}.self_attn."
        if self.q_lora:
            q = self.linear(rms_norm(self.linear(x, a + "q_a_proj"), self.w(a + "q_a_layernorm.weight"), self.eps),
                            a + "q_b_proj")
        else:
            q = self.linear(x, a + "q_proj")
        q = heads(q, self.n_head)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_pe = self.linear(x, a + "kv_a_proj_with_mqa").split([self.kv_lora, self.rope_dim], dim=-1)
        latent = rms_norm(latent, self.w(a + "kv_a_layernorm.weight"), self.eps)
        kv = heads(self.linear(latent, a + "kv_b_proj"), self.n_head)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_pe = k_pe[:, None]  # one rope key for every head
        if self.interleaved:  # pairs (0, 1), (2, 3) ... as halves: the same scores as turning them in place
            q_pe = torch.cat((q_pe[..., 0::2], q_pe[..., 1::2]), dim=-1)
            k_pe = torch.cat((k_pe[..., 0::2], k_pe[..., 1::2]), dim=-1)
        cos, sin = self.rope(x.shape[1])
        q_pe, k_pe = apply_rope(q_pe, cos, sin), apply_rope(k_pe, cos, sin)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.n_head, -1, -1)), dim=-1)
        if any(hasattr(o, "stacked_input") for o in self.observers):
            o = self.observed_attention(a, q_nope, q, k, v, latent)
        else:
            o = attention(q, k, v, self.attn_scale)
        return self.linear(merge(o), a + "o_proj")

    def observed_attention(self, a: str, q_nope, q, k, v, latent):
        """The attention's output from its weights, which also give what llama.cpp's absorbed
        MLA multiplies its attn_k_b and attn_v_b matrices by, per head, offered to the importance
        matrix (as llama-imatrix sees them): each head's query without rope, and each head's
        attention-weighted latent."""
        T = q.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2)) * self.attn_scale
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        weighted = probs @ latent[:, None]  # [B, heads, T, latent]
        for o in self.observers:
            if hasattr(o, "stacked_input"):
                o.stacked_input(self, a + "k_b_proj", q_nope.transpose(0, 1))
                o.stacked_input(self, a + "v_b_proj", weighted.transpose(0, 1))
        return probs @ v

    def route(self, p: str, logits):
        """transformers' DeepseekV2TopkRouter (softmax; greedy or group_limited_greedy) and
        DeepseekV3TopkRouter (sigmoid, the correction bias for the choice, the best 2 of each
        group summed to rank the groups)."""
        scores = torch.sigmoid(logits.float()) if self.sigmoid else torch.softmax(logits, dim=-1, dtype=torch.float32)
        choice = scores
        if self.has(p + "mlp.gate.e_score_correction_bias"):
            choice = scores + self.w(p + "mlp.gate.e_score_correction_bias")
        top2 = self.v3 or self.topk_method == "noaux_tc"  # V3's (and llama.cpp's) group ranking
        if self.n_group > 1 and (top2 or self.topk_method == "group_limited_greedy"):
            g = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            rank = g.topk(min(2, g.shape[-1]), dim=-1)[0].sum(-1) if top2 else g.max(dim=-1).values
            keep = torch.zeros_like(rank).scatter_(1, torch.topk(rank, self.topk_group, dim=-1, sorted=False)[1], 1)
            keep = keep.bool()[:, :, None].expand_as(g).reshape(-1, self.n_experts)
            choice = choice.masked_fill(~keep, float("-inf") if top2 else 0.0)
        chosen = torch.topk(choice, self.top_k, dim=-1)[1]
        weights = scores.gather(1, chosen)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if self.v3 else 0.0))
        return weights * self.scale_routed, chosen

    def mlp(self, p: str, x):
        out = super().mlp(p, x)
        s = p + "mlp.shared_experts."
        if not self.has(p + self.router + ".weight") or not self.has(s + "gate_proj.weight"):
            return out  # a leading dense layer, or no shared experts
        return out + self.linear(self.act(self.linear(x, s + "gate_proj")) * self.linear(x, s + "up_proj"),
                                 s + "down_proj")

    def scale_groups(self, i: int) -> list[ScaleGroup]:
        """AWQ's groups, as llm-compressor's DeepSeek mappings make them: the input norm -> the
        query projection (or q_a_proj) and kv_a_proj_with_mqa (the attention compared); q_a's
        norm -> q_b_proj; the latent's norm -> kv_b_proj; then the MLP as the other mixtures'
        (the router scaled with the experts, each expert's up -> its down, the shared experts'
        up -> down)."""
        p = f"model.layers.{i}."
        a = p + "self_attn."
        q = [a + "q_a_proj"] if self.q_lora else [a + "q_proj"]
        out = [ScaleGroup(("norm", p + "input_layernorm.weight"), q + [a + "kv_a_proj_with_mqa"],
                          self.block(i, "attention"))]
        if self.q_lora:
            out.append(ScaleGroup(("norm", a + "q_a_layernorm.weight"), [a + "q_b_proj"]))
        out.append(ScaleGroup(("norm", a + "kv_a_layernorm.weight"), [a + "kv_b_proj"]))
        norm = ("norm", p + "post_attention_layernorm.weight")
        if not self.has(p + self.router + ".weight"):
            m = p + "mlp."
            return out + [ScaleGroup(norm, [m + "gate_proj", m + "up_proj"], self.block(i, "mlp")),
                          ScaleGroup(("linear", m + "up_proj"), [m + "down_proj"])]
        experts = [[p + n.format(e=e) for n in self.expert_names] for e in range(self.n_experts)]
        s = p + "mlp.shared_experts."
        shared = self.has(s + "gate_proj.weight")
        first = [p + self.router, *([s + "gate_proj", s + "up_proj"] if shared else []),
                 *(h for gate, up, _ in experts for h in (gate, up))]
        out.append(ScaleGroup(norm, first, self.block(i, "mlp")))
        out += [ScaleGroup(("linear", up), [down]) for _, up, down in experts]
        return out + ([ScaleGroup(("linear", s + "up_proj"), [s + "down_proj"])] if shared else [])


class DeepseekV2(Family):
    hf_architectures = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
    gguf_arch = gguf.MODEL_ARCH.DEEPSEEK2
    forward_class = DeepseekForward
    example = "deepseek-ai/DeepSeek-V2-Lite"
    fused_experts = True  # as transformers 5 saves them (mlp.experts.gate_up_proj)
    float_linears = ("mlp.gate",)
    float32_tensors = ("e_score_correction_bias",)
    # what transformers' DeepseekV2Config / DeepseekV3Config assume for keys a config leaves out
    config_defaults = {
        "*": {"rms_norm_eps": 1e-6, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
              "v_head_dim": 128},
        "DeepseekV2ForCausalLM": {"max_position_embeddings": 2048, "first_k_dense_replace": 0,
                                  "n_shared_experts": 2, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
                                  "moe_intermediate_size": 1407, "topk_method": "greedy"},
        "DeepseekV3ForCausalLM": {"max_position_embeddings": 4096, "first_k_dense_replace": 3,
                                  "n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                                  "moe_intermediate_size": 2048, "n_group": 8, "topk_group": 4},
    }

    def __init__(self, ckpt):
        self.v3 = ckpt.config.architecture() == "DeepseekV3ForCausalLM"
        super().__init__(ckpt)
        c = self.cfg
        if self.n_experts < 1:
            raise InputError(f"{c.path}: n_routed_experts must be positive for {c.architecture()}")
        # as transformers' configs: a query bottleneck of 1536 unless the config says (null: none)
        if "q_lora_rank" not in c.data:
            c.data["q_lora_rank"] = 1536
        # head_dim is the rope part; every head its own key and value
        c.data.setdefault("head_dim", c.positive(int, "qk_rope_head_dim"))
        if c.data.get("num_key_value_heads") is None:
            c.data["num_key_value_heads"] = c.need(int, "num_attention_heads")
        if (g := c.get(int, "n_group", positive=True)) and self.n_experts % g:
            raise InputError(f"{c.path}: n_group ({g}) must divide n_routed_experts ({self.n_experts})")
        if (k := c.get(int, "topk_group", positive=True)) and k > (g or 1):
            raise InputError(f"{c.path}: topk_group ({k}) is more than n_group ({g or 1})")
        self.n_dense = c.get(int, "first_k_dense_replace", default=0, nonnegative=True)
        self.n_head = c.need(int, "num_attention_heads")

    def scoring(self) -> str:
        s = self.cfg.data.get("scoring_func") or ("sigmoid" if self.v3 else "softmax")
        if not isinstance(s, str) or s not in ("softmax", "sigmoid"):
            raise InputError(f"{self.cfg.path}: scoring_func {s!r} is not one DeepSeek's router has (softmax, sigmoid)")
        return s

    def norm_topk_prob(self) -> bool:
        return bool(self.cfg.data.get("norm_topk_prob", False))

    # ---- tensors ---------------------------------------------------------------------------

    def check_depth(self, layers: set[int]) -> None:
        # DeepSeek-V3's multi-token-prediction layers follow the decoder's; the converter drops them
        mtp = self.cfg.get(int, "num_nextn_predict_layers", default=0, nonnegative=True) or 0
        super().check_depth({i for i in layers if i < self.n_layers} if mtp else layers)

    def skip(self, hf_name: str) -> bool:
        parts = hf_name.split(".")
        return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and \
            int(parts[2]) >= self.n_layers

    def expected(self) -> list[Expected]:
        c = self.cfg
        H, V = c.positive(int, "hidden_size"), c.positive(int, "vocab_size")
        n, nope, rope, vd = self.n_head, c.positive(int, "qk_nope_head_dim"), c.positive(int, "qk_rope_head_dim"), \
            c.positive(int, "v_head_dim")
        kv, ql = c.positive(int, "kv_lora_rank"), c.get(int, "q_lora_rank", positive=True)
        ff, eff = c.positive(int, "intermediate_size"), c.positive(int, "moe_intermediate_size")
        shared = eff * c.get(int, "n_shared_experts", default=0, nonnegative=True)
        out = [Expected("model.embed_tokens.weight", (V, H)), Expected("model.norm.weight", (H,)),
               Expected("lm_head.weight", (V, H), required=False)]
        for i in range(self.n_layers):
            p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            out += [Expected(p + "input_layernorm.weight", (H,)), Expected(p + "post_attention_layernorm.weight", (H,))]
            if ql:
                out += [Expected(a + "q_a_proj.weight", (ql, H)), Expected(a + "q_a_layernorm.weight", (ql,)),
                        Expected(a + "q_b_proj.weight", (n * (nope + rope), ql))]
            else:
                out.append(Expected(a + "q_proj.weight", (n * (nope + rope), H)))
            out += [Expected(a + "kv_a_proj_with_mqa.weight", (kv + rope, H)), Expected(a + "kv_a_layernorm.weight", (kv,)),
                    Expected(a + "kv_b_proj.weight", (n * (nope + vd), kv)), Expected(a + "o_proj.weight", (H, n * vd))]
            if i < self.n_dense:
                out += [Expected(m + "gate_proj.weight", (ff, H)), Expected(m + "up_proj.weight", (ff, H)),
                        Expected(m + "down_proj.weight", (H, ff))]
                continue
            out += [Expected(m + "gate.weight", (self.n_experts, H)),
                    Expected(m + "gate.e_score_correction_bias", (self.n_experts,), required=False)]
            for e in range(self.n_experts):
                x = f"{m}experts.{e}."
                out += [Expected(x + "gate_proj.weight", (eff, H)), Expected(x + "up_proj.weight", (eff, H)),
                        Expected(x + "down_proj.weight", (H, eff))]
            if shared:
                s = m + "shared_experts."
                out += [Expected(s + "gate_proj.weight", (shared, H)), Expected(s + "up_proj.weight", (shared, H)),
                        Expected(s + "down_proj.weight", (H, shared))]
        return out

    def map_name(self, hf_name: str) -> str:
        if hf_name.endswith("e_score_correction_bias"):  # as the converter renames it
            hf_name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")
        return super().map_name(hf_name)

    def kv_b_dims(self) -> tuple[int, int, int, int]:
        """kv_b_proj's heads, key rows (without rope) and value rows per head, and latent width."""
        c = self.cfg
        return (self.n_head, c.positive(int, "qk_nope_head_dim"), c.positive(int, "v_head_dim"),
                c.positive(int, "kv_lora_rank"))

    def tensor(self, hf_name: str, t: Tensor) -> list[PlannedTensor]:
        if not hf_name.endswith("self_attn.kv_b_proj.weight"):
            return super().tensor(hf_name, t)
        self.check_float(t)
        n, nope, vd, rank = self.kv_b_dims()

        def k_b(a: np.ndarray, _dt) -> np.ndarray:
            return a.reshape(n, nope + vd, rank)[:, :nope].transpose(0, 2, 1)

        def v_b(a: np.ndarray, _dt) -> np.ndarray:
            return a.reshape(n, nope + vd, rank)[:, nope:]
        return [PlannedTensor(self.map_name(hf_name.replace("kv_b_proj", "k_b_proj")), (n, rank, nope), t, transform=k_b),
                PlannedTensor(self.map_name(hf_name.replace("kv_b_proj", "v_b_proj")), (n, vd, rank), t, transform=v_b)]

    def joined_from_gguf(self, hf_name: str):
        if not hf_name.endswith("self_attn.kv_b_proj.weight"):
            return None
        n, nope, vd, rank = self.kv_b_dims()
        a = hf_name[: -len("kv_b_proj.weight")]

        def join(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:  # [n, rank, nope], [n, v, rank]
            return np.concatenate((k_b.transpose(0, 2, 1), v_b), axis=1).reshape(n * (nope + vd), rank)
        return [a + "k_b_proj.weight", a + "v_b_proj.weight"], join, (n * (nope + vd), rank)

    def shape(self) -> ModelShape:
        s = super().shape()
        return ModelShape(s.n_layer, s.n_head, 1, s.arch, s.n_expert)  # the converter's one KV head

    # ---- metadata --------------------------------------------------------------------------

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        """DeepseekV2Model.set_gguf_parameters: the base keys (the expert groups and gating
        function among them) with one KV head (MLA as MQA), then the MLA and expert keys."""
        c = self.cfg
        self.generic_hparams(kv, file_type)
        kv.kv_data[0][f"{self.arch_name}.attention.head_count_kv"].value = 1
        kv.add_leading_dense_block_count(self.n_dense)
        kv.add_vocab_size(c.need(int, "vocab_size"))
        if (ql := c.get(int, "q_lora_rank")) is not None:
            kv.add_q_lora_rank(ql)
        rank, rope = c.positive(int, "kv_lora_rank"), c.positive(int, "qk_rope_head_dim")
        kv.add_kv_lora_rank(rank)
        kv.add_key_length(rank + rope)
        kv.add_value_length(rank)
        kv.add_key_length_mla(c.positive(int, "qk_nope_head_dim") + rope)
        kv.add_value_length_mla(c.positive(int, "v_head_dim"))
        kv.add_expert_feed_forward_length(c.positive(int, "moe_intermediate_size"))
        kv.add_expert_count(self.n_experts)
        kv.add_expert_shared_count(c.get(int, "n_shared_experts", default=0))
        if (s := c.get(float, "routed_scaling_factor")) is not None:
            kv.add_expert_weights_scale(s)
        if self.norm_topk_prob():
            kv.add_expert_weights_norm(True)
        kv.add_rope_dimension_count(rope)
        if (m := self.rope_parameters().get("mscale_all_dim")) is not None:
            kv.add_rope_scaling_yarn_log_mul(0.1 * m)

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = super().config_from_gguf(kv)

        def get(key: str):
            return kv.get(f"deepseek2.{key}")
        gating = get("expert_gating_func")
        sigmoid = gating == int(gguf.ExpertGatingFuncType.SIGMOID.value)
        rank, rope = get("attention.kv_lora_rank"), get("rope.dimension_count")
        k_mla, v_mla = get("attention.key_length_mla"), get("attention.value_length_mla")
        cfg.update({"architectures": ["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"],
                    "hidden_act": "silu", "num_key_value_heads": cfg.get("num_attention_heads"),
                    "head_dim": rope, "kv_lora_rank": rank, "q_lora_rank": get("attention.q_lora_rank"),
                    "qk_rope_head_dim": rope, "qk_nope_head_dim": None if k_mla is None else k_mla - rope,
                    "v_head_dim": v_mla, "n_routed_experts": get("expert_count"),
                    "n_shared_experts": get("expert_shared_count"),
                    "first_k_dense_replace": get("leading_dense_block_count") or 0,
                    "routed_scaling_factor": get("expert_weights_scale") or 1.0,
                    "norm_topk_prob": bool(get("expert_weights_norm")),
                    "n_group": get("expert_group_count"), "topk_group": get("expert_group_used_count"),
                    "scoring_func": "sigmoid" if sigmoid else "softmax",
                    "topk_method": "noaux_tc"})  # llama.cpp ranks the groups by their best two, as V3
        cfg.pop("num_experts", None)
        return {k: v for k, v in cfg.items() if v is not None}
