"""GPT-2: GGUF architecture "gpt2" (Conv1D weights transposed to Linear layout)."""
from __future__ import annotations

import gguf
import numpy as np

from qconvert.arch.base import Family, PlannedTensor
from qconvert.read.checkpoint import Tensor

CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GPT2(Family):
    hf_architectures = ("GPT2LMHeadModel",)
    gguf_arch = gguf.MODEL_ARCH.GPT2
    forward_name = "GPT2Forward"
    example = "openai-community/gpt2"

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
        return {**super().config_from_gguf(kv), "activation_function": "gelu_new"}

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
