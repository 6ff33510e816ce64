"""A GPTQ or AWQ (GEMM) checkpoint as a model qconvert's forward can run: each quantized linear's
weight is dequantized on demand (qweight, qzeros, scales[, g_idx] -> float32 in the checkpoint's
layout)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qconvert.errors import InputError
from qconvert.writers.awq import dequantize_awq
from qconvert.writers.gptq import dequantize_gptq

PARTS = ("qweight", "qzeros", "scales", "g_idx")


def quant_method(config) -> str | None:
    q = config.data.get("quantization_config")
    return str(q.get("quant_method", "")).lower() if isinstance(q, dict) else None


def linear_layout(config, prefix: str, parts: dict) -> tuple[int, int, int, int]:
    """(out features, in features, bits, group size) of one quantized linear, from its tensors'
    shapes (GPTQ packs codes along the input, AWQ along the output) and quantization_config."""
    q = config.data["quantization_config"]
    method = str(q.get("quant_method", "")).lower()
    bits = q.get("bits", 4)
    if not isinstance(bits, int) or bits not in (2, 3, 4, 8):
        raise InputError(f"{config.path}: quantization_config bits must be 2, 3, 4 or 8, got {bits!r}")
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in parts]
    if missing:
        raise InputError(f"{config.path}: quantized linear {prefix} has no {missing[0]} tensor")
    qw, sc = parts["qweight"].shape, parts["scales"].shape
    if len(qw) != 2 or len(sc) != 2:
        raise InputError(f"{config.path}: {prefix}.qweight and .scales must be 2-D, got {list(qw)} and {list(sc)}")
    if method == "awq":
        n_in, n_out = qw[0], qw[1] * 32 // bits
    else:
        n_in, n_out = qw[0] * 32 // bits, qw[1]
    n_groups = sc[0]
    if sc[1] != n_out or n_groups < 1 or n_in % n_groups:
        raise InputError(f"{config.path}: {prefix}.scales has shape {list(sc)}, which does not fit a "
                         f"{n_out} x {n_in} {bits}-bit weight")
    group = n_in // n_groups
    configured = q.get("group_size")
    if n_groups == 1 and configured == -1:
        group = -1
    return n_out, n_in, bits, group


@dataclass
class DequantizedLinear:
    name: str
    shape: tuple[int, ...]
    parts: dict
    bits: int
    v2: bool
    transposed: bool
    awq: bool = False
    dtype: str = "F32"

    def array(self) -> np.ndarray:
        p = self.parts
        qw, qz, sc = (np.asarray(p[k].array()) for k in ("qweight", "qzeros", "scales"))
        if self.awq:
            w = dequantize_awq(qw, qz, sc)
        else:
            g_idx = np.asarray(p["g_idx"].array()) if "g_idx" in p else None
            w = dequantize_gptq(qw, qz, sc, g_idx, self.bits, self.v2)
        return np.ascontiguousarray(w.T) if self.transposed else w

    def release(self) -> None:
        for t in self.parts.values():
            t.release()


class QuantizedWeights:
    """HF name -> tensor; `X.weight` of a quantized linear is decoded from X.qweight & co."""

    def __init__(self, ckpt, family):
        q = ckpt.config.data["quantization_config"]
        self.awq = str(q.get("quant_method")).lower() == "awq"
        if not self.awq and str(q.get("quant_method")).lower() != "gptq":
            raise InputError(f"{ckpt.config.path}: quant_method {q.get('quant_method')!r} cannot be evaluated")
        if self.awq and (q.get("bits", 4) != 4 or str(q.get("version", "gemm")).lower() != "gemm"):
            raise InputError(f"{ckpt.config.path}: only 4-bit AWQ GEMM checkpoints can be decoded")
        self.bits = int(q.get("bits", 4))
        if self.bits not in (2, 4, 8):
            raise InputError(f"{ckpt.config.path}: {self.bits}-bit GPTQ cannot be decoded (2, 4 and 8 can)")
        self.v2 = str(q.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
        self.family = family
        self.config = ckpt.config
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
        n_out, k_in, _, _ = linear_layout(self.config, prefix, parts)
        t = self.family.transposed(name)
        return DequantizedLinear(name, (k_in, n_out) if t else (n_out, k_in), parts, self.bits, self.v2, t, self.awq)
