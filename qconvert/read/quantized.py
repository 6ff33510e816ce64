"""A GPTQ checkpoint as a model qconvert's forward can run: each quantized linear's weight is
dequantized on demand (qweight, qzeros, scales, g_idx -> float32 in the checkpoint's layout)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qconvert.errors import InputError
from qconvert.writers.gptq import dequantize_gptq

PARTS = ("qweight", "qzeros", "scales", "g_idx")


def quant_method(config) -> str | None:
    q = config.data.get("quantization_config")
    return str(q.get("quant_method", "")).lower() if isinstance(q, dict) else None


@dataclass
class DequantizedLinear:
    name: str
    shape: tuple[int, ...]
    parts: dict
    bits: int
    v2: bool
    transposed: bool
    dtype: str = "F32"

    def array(self) -> np.ndarray:
        p = self.parts
        g_idx = np.asarray(p["g_idx"].array()) if "g_idx" in p else None
        w = dequantize_gptq(np.asarray(p["qweight"].array()), np.asarray(p["qzeros"].array()),
                            np.asarray(p["scales"].array()), g_idx, self.bits, self.v2)
        return np.ascontiguousarray(w.T) if self.transposed else w

    def release(self) -> None:
        for t in self.parts.values():
            t.release()


class QuantizedWeights:
    """HF name -> tensor; `X.weight` of a quantized linear is decoded from X.qweight & co."""

    def __init__(self, ckpt, family):
        q = ckpt.config.data["quantization_config"]
        if str(q.get("quant_method")).lower() != "gptq":
            raise InputError(f"{ckpt.config.path}: quant_method {q.get('quant_method')!r} cannot be evaluated")
        self.bits = int(q.get("bits", 4))
        if self.bits not in (2, 4, 8):
            raise InputError(f"{ckpt.config.path}: {self.bits}-bit GPTQ cannot be decoded (2, 4 and 8 can)")
        self.v2 = str(q.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
        self.family = family
        self.tensors = {n.replace("language_model.", ""): t for n, t in ckpt.tensors.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or (name.endswith(".weight") and name[:-7] + ".qweight" in self.tensors)

    def __getitem__(self, name: str):
        if name in self.tensors:
            return self.tensors[name]
        prefix = name[:-len(".weight")]
        parts = {k: self.tensors[f"{prefix}.{k}"] for k in PARTS if f"{prefix}.{k}" in self.tensors}
        if "qweight" not in parts or "qzeros" not in parts or "scales" not in parts:
            raise KeyError(name)
        k_in = parts["qweight"].shape[0] * 32 // self.bits
        n_out = parts["qweight"].shape[1]
        t = self.family.transposed(name)
        return DequantizedLinear(name, (k_in, n_out) if t else (n_out, k_in), parts, self.bits, self.v2, t)
