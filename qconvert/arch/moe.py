"""Mixture-of-experts decoders: Qwen3-MoE (GGUF "qwen3moe"), Qwen2-MoE ("qwen2moe": a shared
expert beside the routed ones, weighed by its own sigmoid gate), OLMoE ("olmoe": q/k norms over
the whole projections) and Mixtral (GGUF "llama" with experts). Their attention is Llama's
(Qwen3's q/k norms, Mixtral's rope permutation) but OLMoE's; the MLP of a sparse layer is a
router (mlp.gate / block_sparse_moe.gate, kept F32 in GGUF as ffn_gate_inp) choosing the top k
of n experts per token, each a gated MLP whose matrices the checkpoint stores one expert at a
time (experts.E.gate_proj / w1 ...; or fused, as transformers 5 holds them: base.py's
split_fused_experts) and GGUF stacks into one 3-D tensor per kind (ffn_gate_exps, ffn_up_exps,
ffn_down_exps: base.Family.stacked_experts).

The forward runs each expert on the tokens routed to it, grouped (one matrix product per expert,
not a loop over tokens), through `linear()` under the expert's own HF name, so the layer loop's
observers see each expert's routed inputs (the importance matrix's per-expert sums, as
llama-imatrix keeps them for MUL_MAT_ID)."""
from __future__ import annotations

import re

import gguf
import torch

from qconvert.arch.base import Family, decoder_tensors
from qconvert.arch.forward import ScaleGroup
from qconvert.arch.llama import Llama, LlamaForward
from qconvert.arch.olmo2 import WholeQKNorm, whole_qk_norms
from qconvert.arch.qwen2 import Qwen2
from qconvert.arch.qwen3 import Qwen3
from qconvert.arch.spec import Expected
from qconvert.errors import InputError


class MoEForward(LlamaForward):
    """Llama's attention; a sparse layer's MLP routes each token to its top-k experts."""

    # HF names inside a layer: the router, an expert's (gate, up, down) matrices
    router = "mlp.gate"
    expert_names = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        self.n_experts = family.n_experts
        self.top_k = self.cfg.positive(int, "num_experts_per_tok")
        self.norm_topk = family.norm_topk_prob()
        # (expert, tokens routed to it) of the experts that last ran every token for the
        # observers' statistics (Observer.expert_min_tokens), for the method's report
        self.few_token_experts: list[tuple[int, int]] = []

    def mlp(self, p: str, x):
        if not self.has(p + self.router + ".weight"):
            return super().mlp(p, x)  # a dense layer (Qwen3-MoE's mlp_only_layers)
        flat = x.reshape(-1, x.shape[-1])
        logits = self.linear(x, p + self.router).reshape(-1, self.n_experts)  # observers see x as it came
        weights, chosen = self.route(p, logits)
        weights = weights.to(flat.dtype)
        out = torch.zeros_like(flat)
        order = torch.argsort(chosen.reshape(-1), stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(chosen.reshape(-1), minlength=self.n_experts).tolist()
        least = max((o.expert_min_tokens for o in self.observers if o.expert_min_tokens is not None), default=None)
        start = 0
        for e, n in enumerate(counts):
            observed = least is None or n >= max(1, least)
            if not observed:
                self.expert(p, e, flat)  # every token, for the statistics only
                self.few_token_experts.append((e, n))
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            tokens = pairs // self.top_k
            y = self.expert(p, e, flat[tokens]) if observed else self.unobserved(self.expert, p, e, flat[tokens])
            out.index_add_(0, tokens, y * weights.reshape(-1)[pairs, None])
        return out.view(x.shape)

    def route(self, p: str, logits):
        """Each token's expert weights and chosen experts [tokens, top k] from the router's
        logits: as transformers, softmax in float32 over all experts, the top k, renormalised to
        sum 1 where the model does."""
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, chosen

    def unobserved(self, f, *args):
        """f(*args) with the observers silent (an expert's routed tokens, after its statistics
        came from every token: they run on what the observers made of its weights)."""
        observers, self.observers = self.observers, ()
        try:
            return f(*args)
        finally:
            self.observers = observers

    def expert(self, p: str, e: int, x):
        gate, up, down = (p + n.format(e=e) for n in self.expert_names)
        return self.linear(self.act(self.linear(x, gate)) * self.linear(x, up), down)

    def scale_groups(self, i: int) -> list[ScaleGroup]:
        """AWQ's groups, as llm-compressor's MoE mappings make them: Llama's attention groups;
        in a sparse layer the post-attention norm -> the router (kept float, but scaled with the
        others so that routing is unchanged) and every expert's gate and up (and Qwen2-MoE's
        shared expert and its gate), the whole mixture compared; each expert's up -> its down,
        on that expert's tokens."""
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out = [ScaleGroup(("norm", p + "input_layernorm.weight"), [a + "q_proj", a + "k_proj", a + "v_proj"],
                          self.block(i, "attention"))]
        if self.linear_weight(a + "v_proj").shape == self.linear_weight(a + "o_proj").shape:
            out.append(ScaleGroup(("linear", a + "v_proj"), [a + "o_proj"]))
        norm = ("norm", p + "post_attention_layernorm.weight")
        if not self.has(p + self.router + ".weight"):  # a dense layer
            m = p + "mlp."
            return out + [ScaleGroup(norm, [m + "gate_proj", m + "up_proj"], self.block(i, "mlp")),
                          ScaleGroup(("linear", m + "up_proj"), [m + "down_proj"])]
        experts = [[p + n.format(e=e) for n in self.expert_names] for e in range(self.n_experts)]
        first = [p + self.router, *self.shared_inputs(p), *(h for gate, up, _ in experts for h in (gate, up))]
        out.append(ScaleGroup(norm, first, self.block(i, "mlp")))
        out += [ScaleGroup(("linear", up), [down]) for _, up, down in experts]
        return out + self.shared_groups(p)

    def shared_inputs(self, p: str) -> list[str]:
        """Linears besides the router and the experts that take the mixture's input."""
        return []

    def shared_groups(self, p: str) -> list[ScaleGroup]:
        return []


class Qwen2MoeForward(MoEForward):
    """Qwen2MoeSparseMoeBlock: the routed experts plus sigmoid(shared_expert_gate(x)) times the
    shared expert's MLP, on every token."""

    def mlp(self, p: str, x):
        out = super().mlp(p, x)
        if not self.has(p + "mlp.shared_expert_gate.weight"):
            return out
        gate = torch.sigmoid(self.linear(x, p + "mlp.shared_expert_gate"))
        s = p + "mlp.shared_expert."
        shared = self.linear(self.act(self.linear(x, s + "gate_proj")) * self.linear(x, s + "up_proj"), s + "down_proj")
        return out + gate * shared

    def shared_inputs(self, p: str) -> list[str]:
        if not self.has(p + "mlp.shared_expert_gate.weight"):
            return []
        s = p + "mlp.shared_expert."
        return [p + "mlp.shared_expert_gate", s + "gate_proj", s + "up_proj"]

    def shared_groups(self, p: str) -> list[ScaleGroup]:
        s = p + "mlp.shared_expert."
        return [ScaleGroup(("linear", s + "up_proj"), [s + "down_proj"])] if self.has(s + "up_proj.weight") else []


class OlmoeForward(WholeQKNorm, MoEForward):
    """OlmoeAttention: OLMo 2's whole-projection q/k norms and clip_qkv, then the mixture."""

    clips_qkv = True


class MixtralForward(MoEForward):
    router = "block_sparse_moe.gate"
    expert_names = ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                    "block_sparse_moe.experts.{e}.w2")


def moe_tensors(cfg, n_layers: int, sparse: list[bool], n_experts: int, expert_ff: int, router: str,
                names: tuple[str, str, str], **dense) -> list[Expected]:
    """decoder_tensors, each sparse layer's gated MLP replaced by its router [experts, hidden] and
    every expert's gate/up [expert_ff, hidden] and down [hidden, expert_ff]."""
    H = cfg.positive(int, "hidden_size")
    out = []
    for e in decoder_tensors(cfg, n_layers, **dense):
        layer = e.name.split(".")[2] if e.name.startswith("model.layers.") else None
        if layer is not None and sparse[int(layer)] and ".mlp." in e.name:
            continue
        out.append(e)
    for i in range(n_layers):
        if not sparse[i]:
            continue
        p = f"model.layers.{i}."
        out.append(Expected(p + router + ".weight", (n_experts, H)))
        for x in range(n_experts):
            gate, up, down = (p + n.format(e=x) + ".weight" for n in names)
            out += [Expected(gate, (expert_ff, H)), Expected(up, (expert_ff, H)), Expected(down, (H, expert_ff))]
    return out


class QwenMoe:
    """What Qwen2-MoE and Qwen3-MoE share: sparse layers by decoder_sparse_step and
    mlp_only_layers, Qwen2MoeModel's expert keys after the base ones, and experts stored fused
    (split into their matrices, as the converter splits them)."""

    fused_experts = True
    float_linears = ("mlp.gate", "mlp.shared_expert_gate")

    def sparse_layers(self) -> list[bool]:
        if self.n_experts < 1:
            raise InputError(f"{self.cfg.path}: num_experts must be positive for {self.cfg.architecture()}")
        step = self.cfg.get(int, "decoder_sparse_step", default=1, positive=True)
        only = self.cfg.data.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise InputError(f"{self.cfg.path}: mlp_only_layers must be a list of layer numbers, got {only!r}")
        # Qwen*MoeDecoderLayer: sparse where not listed and (i + 1) is a multiple of the step
        return [i not in only and (i + 1) % step == 0 for i in range(self.n_layers)]

    def norm_topk_prob(self) -> bool:
        return bool(self.cfg.data.get("norm_topk_prob", False))

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        super().write_hparams(kv, file_type)
        # Qwen2MoeModel.set_gguf_parameters: after the base keys (and the file type)
        if (v := self.cfg.get(int, "moe_intermediate_size")) is not None:
            kv.add_expert_feed_forward_length(v)
        if (v := self.cfg.get(int, "shared_expert_intermediate_size")) is not None:
            kv.add_expert_shared_feed_forward_length(v)


class Qwen2Moe(QwenMoe, Qwen2):
    hf_architectures = ("Qwen2MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE
    forward_class = Qwen2MoeForward
    example = "Qwen/Qwen1.5-MoE-A2.7B"
    awq_groups = ()

    def __init__(self, ckpt):
        super().__init__(ckpt)
        self.sparse = self.sparse_layers()

    def expected(self) -> list[Expected]:
        H = self.cfg.positive(int, "hidden_size")
        out = moe_tensors(self.cfg, self.n_layers, self.sparse, self.n_experts,
                          self.cfg.positive(int, "moe_intermediate_size"), MoEForward.router, MoEForward.expert_names)
        shared = self.cfg.positive(int, "shared_expert_intermediate_size")
        for i in range(self.n_layers):
            if self.sparse[i]:
                s = f"model.layers.{i}.mlp.shared_expert"
                out += [Expected(f"{s}.gate_proj.weight", (shared, H)), Expected(f"{s}.up_proj.weight", (shared, H)),
                        Expected(f"{s}.down_proj.weight", (H, shared)), Expected(f"{s}_gate.weight", (1, H))]
        return out

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = super().config_from_gguf(kv)
        cfg["shared_expert_intermediate_size"] = kv.get("qwen2moe.expert_shared_feed_forward_length")
        cfg["norm_topk_prob"] = False  # llama.cpp's qwen2moe never renormalises the top k
        return cfg


class Qwen3Moe(QwenMoe, Qwen3):
    hf_architectures = ("Qwen3MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    forward_class = MoEForward
    example = "Qwen/Qwen3-30B-A3B"
    awq_groups = ()  # AWQ on experts: not yet

    def __init__(self, ckpt):
        super().__init__(ckpt)
        self.sparse = self.sparse_layers()

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        return {**super().config_from_gguf(kv), "norm_topk_prob": True}  # llama.cpp's qwen3moe always renormalises

    def expected(self) -> list[Expected]:
        return moe_tensors(self.cfg, self.n_layers, self.sparse, self.n_experts,
                           self.cfg.positive(int, "moe_intermediate_size"), MoEForward.router,
                           MoEForward.expert_names, qk_norm=True)


class Olmoe(Family):
    hf_architectures = ("OlmoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.OLMOE
    forward_class = OlmoeForward
    example = "allenai/OLMoE-1B-7B-0924"
    config_defaults = {"*": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}}  # OlmoeConfig
    fused_experts = True  # transformers 5 holds them as the Qwens' (the converter reads them per expert only)
    float_linears = ("mlp.gate",)

    def __init__(self, ckpt):
        super().__init__(ckpt)
        if self.n_experts < 1:
            raise InputError(f"{self.cfg.path}: num_experts must be positive for {self.cfg.architecture()}")

    def norm_topk_prob(self) -> bool:
        return bool(self.cfg.data.get("norm_topk_prob", False))

    def expected(self) -> list[Expected]:
        return whole_qk_norms(moe_tensors(self.cfg, self.n_layers, [True] * self.n_layers, self.n_experts,
                                          self.cfg.positive(int, "intermediate_size"), MoEForward.router,
                                          MoEForward.expert_names), self.cfg, self.n_layers)

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        super().write_hparams(kv, file_type)
        # OlmoeModel.set_gguf_parameters sets the RMS epsilon to 1e-5 again, whatever the config
        # says: the key keeps its place with the new value
        kv.kv_data[0]["olmoe.attention.layer_norm_rms_epsilon"].value = 1e-5

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        return {**super().config_from_gguf(kv), "hidden_act": "silu", "norm_topk_prob": False,
                "num_experts": kv.get("olmoe.expert_count")}


# Mixtral's experts as the published checkpoints name them (block_sparse_moe.experts.E.w1 = gate,
# w3 = up, w2 = down) and as transformers 5 names them (mlp.experts.E.gate_proj ...; it renames
# the legacy names on loading, and holds the experts fused, mlp.experts.gate_up_proj)
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_LEGACY_PROJ = {v: k for k, v in _MIXTRAL_PROJ.items()}
_MIXTRAL_LEGACY = re.compile(r"\.block_sparse_moe\.(?:gate(?=\.|$)|experts\.\d+\.(w[123])(?=\.|$))")
_MIXTRAL_NEW = re.compile(r"\.mlp\.(?:gate(?=\.weight$)|experts\.\d+\.(gate_proj|up_proj|down_proj)(?=\.weight$))")


def _renamed(m: re.Match, to: str, proj: dict[str, str]) -> str:
    s = m.group(0).split(".", 2)[2]  # gate, or experts.E.PROJ
    if m.group(1):
        s = s[:-len(m.group(1))] + proj[m.group(1)]
    return f".{to}.{s}"


class Mixtral(Llama):
    hf_architectures = ("MixtralForCausalLM",)
    forward_class = MixtralForward
    example = "mistralai/Mixtral-8x7B-v0.1"
    awq_groups = ()
    config_defaults = {"*": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5}}  # MixtralConfig
    fused_experts = True  # as transformers 5 saves them (mlp.experts.gate_up_proj)
    float_linears = ("block_sparse_moe.gate",)

    def __init__(self, ckpt):
        super().__init__(ckpt)
        if self.n_experts < 1:
            raise InputError(f"{self.cfg.path}: num_local_experts must be positive for {self.cfg.architecture()}")

    def own_names(self, tensors):
        # the legacy names (the converter's, and the forward's)
        return {_MIXTRAL_NEW.sub(lambda m: _renamed(m, "block_sparse_moe", _MIXTRAL_LEGACY_PROJ), n): t
                for n, t in super().own_names(tensors).items()}

    def output_name(self, name: str) -> str:
        return _MIXTRAL_LEGACY.sub(lambda m: _renamed(m, "mlp", _MIXTRAL_PROJ), name)

    def norm_topk_prob(self) -> bool:
        return True  # MixtralSparseMoeBlock always renormalises the top k

    @classmethod
    def reads_gguf(cls, kv: dict) -> bool:
        return bool(kv.get("llama.expert_count"))

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = super().config_from_gguf(kv)
        cfg["num_local_experts"] = cfg.pop("num_experts", None)
        cfg["architectures"] = [cls.hf_architectures[0]]
        return cfg

    def expected(self) -> list[Expected]:
        return moe_tensors(self.cfg, self.n_layers, [True] * self.n_layers, self.n_experts,
                           self.cfg.positive(int, "intermediate_size"), MixtralForward.router,
                           MixtralForward.expert_names, head_dim=self.head_dim())
