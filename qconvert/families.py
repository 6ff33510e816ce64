"""The model families qconvert supports: one table by HF architecture name, sorted, built from the
family modules in qconvert/arch/ (each says which architectures it serves)."""
from __future__ import annotations

from qconvert.arch.base import Family
from qconvert.arch.deepseek import DeepseekV2
from qconvert.arch.gemma2 import Gemma2
from qconvert.arch.gemma3 import Gemma3
from qconvert.arch.gpt2 import GPT2
from qconvert.arch.gpt_neox import GPTNeoX
from qconvert.arch.gpt_oss import GptOss
from qconvert.arch.granite import Granite
from qconvert.arch.llama import Llama
from qconvert.arch.moe import Mixtral, Olmoe, Qwen2Moe, Qwen3Moe
from qconvert.arch.olmo2 import Olmo2
from qconvert.arch.phi3 import Phi3
from qconvert.arch.qwen2 import Qwen2
from qconvert.arch.qwen3 import Qwen3
from qconvert.arch.smollm3 import SmolLM3
from qconvert.errors import InputError
from qconvert.read.checkpoint import Checkpoint

# one module per family, each naming the HF architectures it serves; the table is built from them
FAMILY_CLASSES: tuple[type[Family], ...] = (DeepseekV2, Gemma2, Gemma3, GPT2, GPTNeoX, GptOss, Granite, Llama, Mixtral,
                                            Olmo2, Olmoe, Phi3, Qwen2, Qwen2Moe, Qwen3, Qwen3Moe, SmolLM3)


def _table() -> dict[str, type[Family]]:
    table: dict[str, type[Family]] = {}
    for cls in FAMILY_CLASSES:
        for arch in cls.hf_architectures:
            if arch in table:
                raise TypeError(f"architecture {arch} is claimed by {table[arch].__name__} and {cls.__name__}")
            table[arch] = cls
    return dict(sorted(table.items()))


FAMILIES: dict[str, type[Family]] = _table()


def family_for(ckpt: Checkpoint) -> Family:
    arch = ckpt.config.architecture()
    cls = FAMILIES.get(arch)
    if cls is None:
        raise InputError(f"{ckpt.config.path}: unsupported architecture {arch!r}; supported: {', '.join(FAMILIES)}")
    return cls(ckpt)
