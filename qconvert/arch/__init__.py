"""The model families qconvert supports: one explicit table, sorted by HF architecture name."""
from __future__ import annotations

from qconvert.arch.base import Family
from qconvert.arch.gemma3 import Gemma3
from qconvert.arch.gpt2 import GPT2
from qconvert.arch.gpt_neox import GPTNeoX
from qconvert.arch.llama import Llama
from qconvert.arch.qwen2 import Qwen2
from qconvert.arch.qwen3 import Qwen3
from qconvert.errors import InputError
from qconvert.read.checkpoint import Checkpoint

FAMILIES: dict[str, type[Family]] = {
    "GPT2LMHeadModel": GPT2,
    "GPTNeoXForCausalLM": GPTNeoX,
    "Gemma3ForCausalLM": Gemma3,
    "Gemma3ForConditionalGeneration": Gemma3,
    "LLaMAForCausalLM": Llama,
    "LlamaForCausalLM": Llama,
    "MistralForCausalLM": Llama,
    "Qwen2ForCausalLM": Qwen2,
    "Qwen3ForCausalLM": Qwen3,
}
assert list(FAMILIES) == sorted(FAMILIES), "keep FAMILIES sorted"


def family_for(ckpt: Checkpoint) -> Family:
    arch = ckpt.config.architecture()
    cls = FAMILIES.get(arch)
    if cls is None:
        raise InputError(f"{ckpt.config.path}: unsupported architecture {arch!r}; supported: {', '.join(FAMILIES)}")
    return cls(ckpt)
