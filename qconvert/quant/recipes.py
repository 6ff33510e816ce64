"""Recipes: the per-tensor type policy that `--to` names, as llama.cpp's tools apply it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gguf import LlamaFileType

from qconvert.arch.base import PlannedTensor
from qconvert.errors import UsageError
from qconvert.quant import blocks
from qconvert.quant.blocks import BlockType


def _float_or(kind: type[BlockType], fallback: type[BlockType]) -> Callable[[PlannedTensor], type[BlockType]]:
    """Norms, biases and 1-D tensors stay F32; other weights are `kind`, or `fallback` when
    their rows do not fit `kind`'s block (convert_hf_to_gguf.py: Q8_0 -> F16)."""
    def choose(t: PlannedTensor) -> type[BlockType]:
        if t.force_f32:
            return blocks.F32
        return kind if kind.fits(t.shape[-1]) else fallback
    return choose


@dataclass(frozen=True)
class Recipe:
    name: str  # what --to takes
    label: str  # what output file names carry: model-Q8_0.gguf
    file_type: LlamaFileType
    choose: Callable[[PlannedTensor], type[BlockType]]
    summary: str


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("bf16", "BF16", LlamaFileType.MOSTLY_BF16, _float_or(blocks.BF16, blocks.BF16), "bfloat16, lossless for bf16 checkpoints"),
    Recipe("f16", "F16", LlamaFileType.MOSTLY_F16, _float_or(blocks.F16, blocks.F16), "float16"),
    Recipe("f32", "F32", LlamaFileType.ALL_F32, _float_or(blocks.F32, blocks.F32), "float32, the reference"),
    Recipe("q8_0", "Q8_0", LlamaFileType.MOSTLY_Q8_0, _float_or(blocks.Q8_0, blocks.F16), "8.5 bits per weight, near lossless"),
]}


def parse_targets(spec: str) -> list[Recipe]:
    """`--to q8_0,f16` -> recipes, in order, without repeats."""
    out: list[Recipe] = []
    for part in spec.split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in RECIPES:
            raise UsageError(f"--to: unknown target {part.strip()!r}; known: {', '.join(RECIPES)}")
        if RECIPES[name] not in out:
            out.append(RECIPES[name])
    if not out:
        raise UsageError("--to: name at least one target, e.g. --to q8_0")
    return out
