"""SmolLM3: GGUF architecture "smollm3".

A Llama whose attention skips the rotary embedding in some layers: config.json's
no_rope_layers (1: rope, 0: none), by default every no_rope_layer_interval-th layer (4) without.
llama.cpp's smollm3 hard-codes every 4th layer and has no sliding window, and its converter
writes neither, so a GGUF file is refused for a checkpoint with another pattern (it would load
and compute something else).
"""
from __future__ import annotations

import gguf

from qconvert.arch.llama import Llama, LlamaForward
from qconvert.errors import InputError

LLAMA_CPP_INTERVAL = 4  # llama.cpp's smollm3: n_no_rope_layer_step


def rope_layers(cfg, n_layers: int) -> list[bool]:
    """Whether each layer applies rope, as SmolLM3Config builds no_rope_layers."""
    given = cfg.data.get("no_rope_layers")
    if given is None:
        interval = cfg.get(int, "no_rope_layer_interval", default=4, positive=True)
        return [(i + 1) % interval != 0 for i in range(n_layers)]
    if not isinstance(given, list) or len(given) != n_layers or any(v not in (0, 1) for v in given):
        raise InputError(f"{cfg.path}: no_rope_layers must list 0 or 1 for each of the {n_layers} layers")
    return [bool(v) for v in given]


class SmolLM3Forward(LlamaForward):
    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        self.rope_in = rope_layers(self.cfg, family.n_layers)

    def rope_of(self, i: int, T: int):
        return super().rope_of(i, T) if self.rope_in[i] else None


class SmolLM3(Llama):
    hf_architectures = ("SmolLM3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.SMOLLM3
    forward_class = SmolLM3Forward
    example = "HuggingFaceTB/SmolLM3-3B"
    config_defaults = {"*": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6}}  # SmolLM3Config

    def __init__(self, ckpt):
        super().__init__(ckpt)
        rope_layers(self.cfg, self.n_layers)
        if self.cfg.data.get("use_sliding_window"):
            raise InputError(f"{self.cfg.path}: SmolLM3 with use_sliding_window is not supported (qconvert's "
                             "forward and llama.cpp's smollm3 attend to every earlier position)")

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        pattern = rope_layers(self.cfg, self.n_layers)
        if pattern != [(i + 1) % LLAMA_CPP_INTERVAL != 0 for i in range(self.n_layers)]:
            off = [i for i, r in enumerate(pattern) if not r]
            raise InputError(f"{self.cfg.path}: no_rope_layers leaves rope out of layers {off}; llama.cpp's smollm3 "
                             f"leaves it out of every {LLAMA_CPP_INTERVAL}th layer and cannot be told otherwise")
        super().write_hparams(kv, file_type)
