"""IBM Granite (3.x dense): GGUF architecture "granite".

A Llama with four multipliers: the embeddings are scaled by embedding_multiplier, attention
scores by attention_multiplier (in place of 1/sqrt(head_dim)), each block's output by
residual_multiplier before it joins the residual stream, and the logits divided by
logits_scaling. llama.cpp's converter writes them as granite.embedding_scale,
granite.attention.scale, granite.residual_scale and granite.logit_scale, and drops a config's
head_dim (llama.cpp's granite takes hidden_size / num_attention_heads): a head_dim other than that
refuses a GGUF file.
"""
from __future__ import annotations

import gguf
import torch.nn.functional as F

from qconvert.arch.layers import rms_norm
from qconvert.arch.llama import Llama, LlamaForward
from qconvert.errors import InputError

# the multipliers: config key, llama.cpp key (after the architecture's name), GGUFWriter method
MULTIPLIERS = (("attention_multiplier", "attention.scale", "add_attention_scale"),
               ("embedding_multiplier", "embedding_scale", "add_embedding_scale"),
               ("residual_multiplier", "residual_scale", "add_residual_scale"),
               ("logits_scaling", "logit_scale", "add_logit_scale"))


class GraniteForward(LlamaForward):
    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        c = self.cfg
        self.attn_scale = c.get(float, "attention_multiplier", positive=True)
        self.embedding_scale = c.get(float, "embedding_multiplier", positive=True)
        self.residual_scale = c.get(float, "residual_multiplier", positive=True)
        self.logit_scale = c.get(float, "logits_scaling", positive=True)

    def embed(self, ids):
        return super().embed(ids) * self.embedding_scale

    def layer(self, i, h):
        p = f"model.layers.{i}."
        x = rms_norm(h, self.w(p + "input_layernorm.weight"), self.eps)
        h = h + self.attn(i, x) * self.residual_scale
        x = rms_norm(h, self.w(p + "post_attention_layernorm.weight"), self.eps)
        return h + self.mlp(p, x) * self.residual_scale

    def head(self, h):
        h = rms_norm(h, self.w("model.norm.weight"), self.eps)
        name = "lm_head.weight" if self.has("lm_head.weight") else "model.embed_tokens.weight"
        return F.linear(h, self.w(name)) / self.logit_scale


class Granite(Llama):
    hf_architectures = ("GraniteForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GRANITE
    forward_class = GraniteForward
    example = "ibm-granite/granite-3.3-2b-instruct"
    # GraniteConfig's defaults: a config without a multiplier runs with 1.0 in transformers, so
    # the file says so (llama.cpp would take an absent attention scale for 1/sqrt(head_dim))
    config_defaults = {"*": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "attention_multiplier": 1.0,
                             "embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0}}

    def __init__(self, ckpt):
        super().__init__(ckpt)
        if self.cfg.get(int, "head_dim") == self.plain_head_dim():
            self.cfg.data.pop("head_dim")  # as the converter: no key_length written

    def plain_head_dim(self) -> int:
        return self.cfg.need(int, "hidden_size") // self.n_head

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        if (hd := self.cfg.get(int, "head_dim")) is not None:
            raise InputError(f"{self.cfg.path}: head_dim {hd} is not hidden_size / num_attention_heads "
                             f"({self.plain_head_dim()}); llama.cpp's granite cannot be told otherwise")
        super().write_hparams(kv, file_type)
        for key, _, add in MULTIPLIERS:
            getattr(kv, add)(self.cfg.get(float, key, positive=True))

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = super().config_from_gguf(kv)
        cfg.pop("head_dim", None)
        for key, gkey, _ in MULTIPLIERS:
            if (v := kv.get(f"granite.{gkey}")) is not None:
                cfg[key] = v
        if "attention_multiplier" not in cfg:  # llama.cpp's granite without the key: 1/sqrt(head_dim)
            cfg["attention_multiplier"] = (cfg["hidden_size"] // cfg["num_attention_heads"]) ** -0.5
        return cfg
