"""A quantized checkpoint (GPTQ, AWQ GEMM, compressed-tensors FP8, transformers' fp8) seen as a
float one: each quantized linear's weight is decoded on demand, through its layout
(layouts.py), in the checkpoint's layout, so the forward, the GGUF plan and the checkpoint
methods read it as they read any float tensor, one at a time."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qconvert.layouts import Layout, Params


def linear_shape(layout: type[Layout], p: Params, prefix: str, parts: dict, where: object,
                 expected: tuple[int, ...] | None = None) -> tuple[int, int, int]:
    """(out features, in features, group size) of one quantized linear, checked against its
    tensors' shapes (group size -1: one group per output channel); `expected`: its weight's shape
    as the config makes it, where the family knows it."""
    return layout.tensor_shape(p, prefix, parts, where, expected)


@dataclass
class DequantizedLinear:
    """A quantized linear's weight, decoded to float32 when read (codes times scales exactly,
    as llama.cpp's converter and the FP8 kernels take them)."""

    name: str
    shape: tuple[int, ...]
    parts: dict
    layout: type[Layout]
    params: Params
    transposed: bool
    dtype: str = "F32"

    def array(self) -> np.ndarray:
        w = self.layout.unpack({k: np.asarray(t.array()) for k, t in self.parts.items()}, self.params)
        w = w.reshape(self.shape[::-1] if self.transposed else self.shape)  # quanto's groups come as rows
        return np.ascontiguousarray(w.T) if self.transposed else w

    def release(self) -> None:
        for t in self.parts.values():
            t.release()


def dequantized_view(tensors: dict, family, layout: type[Layout], params: Params, config) -> dict:
    """The checkpoint's tensors as a float checkpoint's (names kept): each quantized linear's
    parts replaced by one `X.weight` decoded on demand, its activation scales left out, every
    other tensor as it is."""
    marker = "." + layout.marker
    prefixes = {n[:-len(marker)] for n in tensors if n.endswith(marker)}
    parts_of = {f"{p}.{k}": p for p in prefixes for k in layout.parts}
    unused = {f"{p}.{k}" for p in prefixes for k in layout.unused}
    out = {}
    shapes = {e.name: e.shape for e in family.expected()}
    for name, t in tensors.items():
        if name in unused:
            continue
        prefix = parts_of.get(name)
        if prefix is None:
            out[name] = t
        elif name == f"{prefix}.{layout.marker}":
            parts = {k: tensors[f"{prefix}.{k}"] for k in layout.parts if f"{prefix}.{k}" in tensors}
            hf = prefix.replace("language_model.", "") + ".weight"
            tr = family.transposed(hf)
            expected = shapes.get(hf)
            n_out, n_in, _ = linear_shape(layout, params, prefix, parts, config.path,
                                          expected and (tuple(expected[::-1]) if tr else tuple(expected)))
            out[prefix + ".weight"] = DequantizedLinear(prefix + ".weight", (n_in, n_out) if tr else (n_out, n_in),
                                                        parts, layout, params, tr)
    return out
