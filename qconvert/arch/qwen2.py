"""Qwen2 / Qwen2.5: GGUF architecture "qwen2" (no q/k permutation; q/k/v biases)."""
from __future__ import annotations

import gguf

from qconvert.arch.base import Family
from qconvert.read import tokenizer


class Qwen2(Family):
    hf_architectures = ("Qwen2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    example = "Qwen/Qwen2.5-0.5B"

    def forward(self):
        """The layer-by-layer torch forward that calibration runs (arch/forward.py)."""
        from qconvert.arch.forward import LlamaForward
        return LlamaForward(self)

    def write_vocab(self, kv: gguf.GGUFWriter) -> None:
        if self.has_spm():
            tokenizer.spm_vocab(self.ckpt.path, self.cfg.get(int, "vocab_size"), kv)
        else:
            tokenizer.bpe_vocab(self.ckpt.path, self.cfg.get(int, "vocab_size"), kv)
