"""Qwen3 (dense): GGUF architecture "qwen3" (q/k norms, explicit head_dim)."""
from __future__ import annotations

import gguf

from qconvert.arch.qwen2 import Qwen2
from qconvert.errors import InputError


class Qwen3(Qwen2):
    hf_architectures = ("Qwen3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    example = "Qwen/Qwen3-0.6B"
    qk_norm = True

    def __init__(self, ckpt):
        super().__init__(ckpt)
        hints = " ".join(str(x) for x in (ckpt.path.name, self.cfg.data.get("_name_or_path", ""))).lower()
        if "reranker" in hints:
            raise InputError(f"{ckpt.path}: Qwen3 reranker models are not supported (causal LMs only)")
