"""A quantized checkpoint (GPTQ, AWQ GEMM, compressed-tensors FP8) as weights qconvert's forward
can run: each quantized linear's weight is decoded on demand, through its layout (layouts.py),
into float32 in the checkpoint's layout."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qconvert.layouts import Layout, Params


def linear_shape(layout: type[Layout], p: Params, prefix: str, parts: dict, where: object) -> tuple[int, int, int]:
    """(out features, in features, group size) of one quantized linear, checked against its
    tensors' shapes (group size -1: one group per output channel)."""
    return layout.linear_shape(p, prefix, {k: tuple(t.shape) for k, t in parts.items()}, where)


@dataclass
class DequantizedLinear:
    name: str
    shape: tuple[int, ...]
    parts: dict
    layout: type[Layout]
    params: Params
    transposed: bool
    dtype: str = "F32"

    def array(self) -> np.ndarray:
        w = self.layout.unpack({k: np.asarray(t.array()) for k, t in self.parts.items()}, self.params)
        return np.ascontiguousarray(w.T) if self.transposed else w

    def release(self) -> None:
        for t in self.parts.values():
            t.release()


class QuantizedWeights:
    """HF name -> tensor; `X.weight` of a quantized linear is decoded from its layout's parts
    (X.qweight & co., or an FP8 X.weight with X.weight_scale)."""

    def __init__(self, ckpt, family, layout: type[Layout], params: Params):
        """`layout`, `params`: what layout_of() found in the checkpoint's config."""
        self.layout, self.params = layout, params
        self.family = family
        self.where = ckpt.config.path
        self.tensors = {n.replace("language_model.", ""): t for n, t in ckpt.tensors.items()}

    def _quantized(self, name: str) -> bool:
        return name.endswith(".weight") and f"{name[:-7]}.{self.layout.marker}" in self.tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or self._quantized(name)

    def __getitem__(self, name: str):
        if not self._quantized(name):
            return self.tensors[name]
        prefix = name[:-len(".weight")]
        parts = {k: self.tensors[f"{prefix}.{k}"] for k in self.layout.parts if f"{prefix}.{k}" in self.tensors}
        n_out, n_in, _ = linear_shape(self.layout, self.params, prefix, parts, self.where)
        t = self.family.transposed(name)
        return DequantizedLinear(name, (n_in, n_out) if t else (n_out, n_in), parts, self.layout, self.params, t)
