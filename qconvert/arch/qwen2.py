"""Qwen2 / Qwen2.5: GGUF architecture "qwen2" (no q/k permutation; q/k/v biases)."""
from __future__ import annotations

import gguf

from qconvert.arch.base import Family, decoder_tensors
from qconvert.arch.llama import Llama, LlamaForward
from qconvert.arch.spec import Expected
from qconvert.read import tokenizer


class Qwen2(Family):
    hf_architectures = ("Qwen2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    forward_class = LlamaForward
    awq_groups = Llama.awq_groups
    awq_no_clip = Llama.awq_no_clip
    example = "Qwen/Qwen2.5-0.5B"
    config_defaults = {"*": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6}}  # Qwen2Config, Qwen3Config

    qk_norm = False  # Qwen3's q/k norms

    def expected(self) -> list[Expected]:
        return decoder_tensors(self.cfg, self.n_layers, qk_norm=self.qk_norm)

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        return {**super().config_from_gguf(kv), "hidden_act": "silu"}

    def write_vocab(self, kv: gguf.GGUFWriter) -> None:
        if self.has_spm():
            tokenizer.spm_vocab(self.ckpt.path, self.cfg.get(int, "vocab_size"), kv)
        else:
            tokenizer.bpe_vocab(self.ckpt.path, self.cfg.get(int, "vocab_size"), kv)
