"""What the rest of qconvert knows of a model family, as plain data: the tensors a family plans
(PlannedTensor), expects (Expected), the shape llama-quantize's choices read (ModelShape) and
AWQ's scale groups (ScaleSpec). No torch here: importing this is cheap (--help reads the recipes)."""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # annotations only (they stay strings here)
    from qconvert.read.checkpoint import Tensor

Transform = Callable[[np.ndarray, str], np.ndarray]  # (float32 data, source dtype) -> float32 data


@dataclass(frozen=True)
class ScaleSpec:
    """One of AWQ's groups in every decoder layer of a family: linear layers (paths inside the
    layer) that share an input, the operation before them that absorbs 1/s (a norm, a linear, or
    a scale after the activation), and the block whose output the scale search compares."""

    prev: str  # path inside the layer: a norm module, a linear, or ("act") the tensor of the new scales
    kind: str  # "norm" | "norm1p" (Gemma's 1 + w) | "layernorm" (weight and bias) | "linear" | "act"
    linears: tuple[str, ...]
    inspect: str | None = None  # the block compared: "attention" or "mlp"; None: the first linear itself
    same_shape: bool = False  # only when prev's weight has the shape of the first linear's (v -> o without GQA)
    rows: slice | None = None  # kind "linear": prev's output rows that feed the linears (a fused qkv's v)


@dataclass(frozen=True)
class ModelShape:
    """What llama-quantize's choices depend on besides tensor names."""

    n_layer: int
    n_head: int
    n_head_kv: int
    arch: str = ""  # the GGUF architecture name
    n_expert: int = 0  # routed experts per layer (llama.cpp's hparams.n_expert; 0: dense)

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(self.n_head_kv, 1)

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B, which bumps attn_v: 80 layers of Llama with grouped keys,
        or of Qwen2 (its load_hparams)."""
        return self.n_layer == 80 and (self.arch == "qwen2" or (self.arch == "llama" and self.n_head != self.n_head_kv))


@dataclass(frozen=True)
class Expected:
    """A tensor the family's forward and llama.cpp need, with the shape config.json gives it."""

    name: str  # HF name, without the text-model prefix ("language_model.")
    shape: tuple[int, ...]
    required: bool = True  # False: optional (a bias, q/k norms), but its shape is still checked


@dataclass
class PlannedTensor:
    """One output tensor, before any data is read."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows first); the writer reverses it for GGUF
    source: Tensor | None  # checkpoint tensor (the first of `parts`), or None for a generated one
    transform: Transform | None = None  # whole-tensor transform; None streams rows as they are
    rows: int | None = None  # use only the first `rows` rows of the source
    make: Callable[[], np.ndarray] | None = None  # data of a generated tensor
    force_f32: bool = False  # norms, biases, 1-D tensors, position embeddings
    # experts: checkpoint tensors stacked on a new first axis, in order (shape[0] of them), each
    # streamed in turn; `transform` then applies to each part
    parts: tuple[Tensor, ...] = ()
    # the GGUF type whose bytes the source already holds (gpt-oss's MXFP4 experts): an output of
    # that type copies them (each part's gguf_bytes()), as the converter and llama-quantize do
    native: str | None = None

    @property
    def n_elements(self) -> int:
        return prod(self.shape)

    @property
    def hf_name(self) -> str:
        return self.source.name if self.source is not None else "(generated)"
