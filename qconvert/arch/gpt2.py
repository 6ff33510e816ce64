"""GPT-2: GGUF architecture "gpt2" (Conv1D weights transposed to Linear layout)."""
from __future__ import annotations

import math

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from qconvert.arch.base import Family
from qconvert.arch.forward import Forward
from qconvert.arch.layers import act, attention, heads, merge
from qconvert.arch.spec import Expected, PlannedTensor, ScaleSpec
from qconvert.errors import InputError
from qconvert.read.checkpoint import Tensor

CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GPT2Forward(Forward):
    """GPT-2: learned positions, LayerNorm, Conv1D weights ([in, out]), tanh-GELU."""

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        c = self.cfg
        self.n_head = c.need(int, "n_head", "num_attention_heads")
        self.eps = c.get(float, "layer_norm_epsilon", "layer_norm_eps", default=1e-5, nonnegative=True)
        self.act = act(c, "activation_function", default="gelu_new")
        self.prefix = "transformer." if self.has("transformer.wte.weight") else ""

    def conv1d(self, x, name):
        x = self.linear_input(name, x)
        if self.products != "float32":
            return self.low_precision_linear(x, name, self.w(name + ".bias"))
        return x @ self.w(name + ".weight") + self.w(name + ".bias")

    def ln(self, x, p):
        return F.layer_norm(x, (x.shape[-1],), self.w(p + ".weight"), self.w(p + ".bias"), self.eps)

    def linear_weight(self, hf: str) -> torch.Tensor:
        return self.w(hf + ".weight").T  # Conv1D stores [in, out]

    def set_linear_weight(self, hf: str, weight: torch.Tensor) -> None:
        super().set_linear_weight(hf, weight.T.contiguous())

    def embed(self, ids):
        pos = torch.arange(ids.shape[1])
        return F.embedding(ids, self.w(self.prefix + "wte.weight")) + F.embedding(pos, self.w(self.prefix + "wpe.weight"))

    def layer(self, i, h):
        p = f"{self.prefix}h.{i}."
        x = self.ln(h, p + "ln_1")
        q, k, v = (heads(t, self.n_head) for t in self.conv1d(x, p + "attn.c_attn").split(h.shape[-1], dim=-1))
        o = attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
        h = h + self.conv1d(merge(o), p + "attn.c_proj")
        x = self.ln(h, p + "ln_2")
        return h + self.conv1d(self.act(self.conv1d(x, p + "mlp.c_fc")), p + "mlp.c_proj")

    def head(self, h):
        h = self.ln(h, self.prefix + "ln_f")
        name = "lm_head.weight" if self.has("lm_head.weight") else self.prefix + "wte.weight"
        return F.linear(h, self.w(name))


class GPT2(Family):
    hf_architectures = ("GPT2LMHeadModel",)
    gguf_arch = gguf.MODEL_ARCH.GPT2
    forward_class = GPT2Forward
    awq_groups = (ScaleSpec("ln_1", "layernorm", ("attn.c_attn",)), ScaleSpec("ln_2", "layernorm", ("mlp.c_fc",)))
    awq_no_clip = ("c_attn",)
    config_defaults = {"*": {"n_positions": 1024, "layer_norm_epsilon": 1e-5}}  # GPT2Config
    example = "openai-community/gpt2"

    def expected(self) -> list[Expected]:
        c = self.cfg
        H, V = c.positive(int, "n_embd", "hidden_size"), c.positive(int, "vocab_size")
        n_head = c.positive(int, "n_head", "num_attention_heads")
        P = c.positive(int, "n_positions", "n_ctx", "max_position_embeddings")
        ffn = c.get(int, "n_inner") or 4 * H
        if H % n_head:
            raise InputError(f"{c.path}: n_embd {H} is not a multiple of n_head {n_head}")
        pre = "transformer." if any(n.startswith("transformer.") for n in self.ckpt.tensors) else ""
        out = [Expected(pre + "wte.weight", (V, H)), Expected(pre + "wpe.weight", (P, H)),
               Expected(pre + "ln_f.weight", (H,)), Expected(pre + "ln_f.bias", (H,)),
               Expected("lm_head.weight", (V, H), required=False)]
        for i in range(self.n_layers):  # Conv1D weights are stored [in, out]
            p = f"{pre}h.{i}."
            for name, n_in, n_out in (("attn.c_attn", H, 3 * H), ("attn.c_proj", H, H), ("mlp.c_fc", H, ffn),
                                      ("mlp.c_proj", ffn, H)):
                out += [Expected(p + name + ".weight", (n_in, n_out)), Expected(p + name + ".bias", (n_out,))]
            for ln in ("ln_1", "ln_2"):
                out += [Expected(p + ln + ".weight", (H,)), Expected(p + ln + ".bias", (H,))]
        return out

    def tensor(self, hf_name: str, t: Tensor) -> list[PlannedTensor]:
        self.check_float(t)
        name = self.map_name(hf_name)
        if hf_name.endswith(CONV1D):
            return [PlannedTensor(name, t.shape[::-1], t, transform=lambda a, _dt: np.ascontiguousarray(a.T))]
        return [PlannedTensor(name, t.shape, t)]

    def layer_prefix(self, i: int) -> str:
        return ("transformer." if any(n.startswith("transformer.") for n in self.ckpt.tensors) else "") + f"h.{i}."

    def max_positions(self) -> int | None:
        return self.cfg.get(int, "n_positions", "n_ctx", "max_position_embeddings")

    def transposed(self, hf_name: str) -> bool:
        return hf_name.endswith(CONV1D)

    def from_gguf(self, hf_name: str, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.T) if hf_name.endswith(CONV1D) else a

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = {**super().config_from_gguf(kv), "activation_function": "gelu_new"}
        cfg["n_positions"] = cfg.get("max_position_embeddings")  # GPT-2's own key wins over config_defaults
        return cfg

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        c = self.cfg
        n_embd = c.need(int, "n_embd", "hidden_size")
        kv.add_block_count(self.n_layers)
        kv.add_context_length(c.need(int, "n_ctx", "n_positions"))
        kv.add_embedding_length(n_embd)
        kv.add_feed_forward_length(c.get(int, "n_inner") or 4 * n_embd)
        kv.add_head_count(c.need(int, "n_head", "num_attention_heads"))
        kv.add_layer_norm_eps(c.need(float, "layer_norm_epsilon", "layer_norm_eps"))
        kv.add_file_type(file_type)
