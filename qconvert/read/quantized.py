"""A quantized checkpoint (GPTQ, AWQ GEMM) as weights qconvert's forward can run: each quantized
linear's weight is decoded on demand, through its layout (layouts.py), into float32 in the
checkpoint's layout."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qconvert.errors import InputError
from qconvert.layouts import Layout, Params


def linear_shape(layout: type[Layout], p: Params, prefix: str, parts: dict, where: object) -> tuple[int, int, int]:
    """(out features, in features, group size) of one quantized linear, checked against its
    tensors' shapes (group size -1: one group per output channel)."""
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in parts]
    if missing:
        raise InputError(f"{where}: quantized linear {prefix} has no {missing[0]} tensor")
    shapes = {k: tuple(t.shape) for k, t in parts.items()}
    if len(shapes["qweight"]) != 2 or len(shapes["scales"]) != 2:
        raise InputError(f"{where}: {prefix}.qweight and .scales must be 2-D, got {list(shapes['qweight'])} and "
                         f"{list(shapes['scales'])}")
    n_out, n_in = layout.shape(shapes, p)
    n_groups, cols = shapes["scales"]
    if cols != n_out or n_groups < 1 or n_in % n_groups:
        raise InputError(f"{where}: {prefix}.scales has shape {[n_groups, cols]}, which does not fit a "
                         f"{n_out} x {n_in} {p.bits}-bit weight")
    group = -1 if n_groups == 1 and p.group_size == -1 else n_in // n_groups
    return n_out, n_in, group


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
    """HF name -> tensor; `X.weight` of a quantized linear is decoded from X.qweight & co."""

    def __init__(self, ckpt, family, layout: type[Layout], params: Params):
        """`layout`, `params`: what layout_of() found in the checkpoint's config."""
        self.layout, self.params = layout, params
        self.family = family
        self.where = ckpt.config.path
        self.tensors = {n.replace("language_model.", ""): t for n, t in ckpt.tensors.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or (name.endswith(".weight") and name[:-7] + ".qweight" in self.tensors)

    def __getitem__(self, name: str):
        if name in self.tensors:
            return self.tensors[name]
        prefix = name[:-len(".weight")]
        parts = {k: self.tensors[f"{prefix}.{k}"] for k in self.layout.parts if f"{prefix}.{k}" in self.tensors}
        if "qweight" not in parts:
            raise KeyError(name)
        n_out, n_in, _ = linear_shape(self.layout, self.params, prefix, parts, self.where)
        t = self.family.transposed(name)
        return DequantizedLinear(name, (n_in, n_out) if t else (n_out, n_in), parts, self.layout, self.params, t)
