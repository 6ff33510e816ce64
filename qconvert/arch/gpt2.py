"""GPT-2: GGUF architecture "gpt2" (Conv1D weights transposed to Linear layout)."""
from __future__ import annotations

import gguf
import numpy as np

from qconvert.arch.base import Expected, Family, PlannedTensor
from qconvert.errors import InputError
from qconvert.read.checkpoint import Tensor

CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GPT2(Family):
    hf_architectures = ("GPT2LMHeadModel",)
    gguf_arch = gguf.MODEL_ARCH.GPT2
    forward_name = "GPT2Forward"
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
