"""What a file holds: a GGUF file's metadata, tensors, types and bits per weight (read with gguf's
reader), or a safetensors checkpoint's quantization config and quantized layers."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from qconvert.errors import InputError
from qconvert.layouts import layout_of
from qconvert.read.checkpoint import open_checkpoint
from qconvert.read.gguf_model import read_gguf
from qconvert.read.quantized import linear_shape
from qconvert.read.safetensors import DTYPES

_LONG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.merges")


def inspect_gguf(path: Path) -> dict:
    from gguf import GGUFValueType


    r = read_gguf(path)
    meta: dict[str, object] = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        t = f.types[0] if f.types else None
        if t == GGUFValueType.ARRAY:
            n = len(f.data)
            meta[name] = f"[{n} items]" if name in _LONG_ARRAYS or n > 16 else f.contents()
        else:
            v = f.contents()
            meta[name] = v if not (isinstance(v, str) and len(v) > 200) else v[:200] + "…"
    tensors = []
    n_params = n_bytes = 0
    for t in r.tensors:
        n = int(np.prod(t.shape, dtype=np.int64))
        n_params += n
        n_bytes += int(t.n_bytes)
        tensors.append({"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                        "bytes": int(t.n_bytes)})
    counts = Counter(t["type"] for t in tensors)
    return {"path": str(path), "kind": "gguf", "bytes": path.stat().st_size, "n_params": n_params,
            "tensor_bytes": n_bytes,
            "bits_per_weight": round(n_bytes * 8 / max(n_params, 1), 4), "types": dict(counts),
            "metadata": meta, "tensors": tensors}


_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def _expected_shapes(ckpt) -> dict[str, tuple[int, ...]]:
    """The weight shapes the config gives, by name, where qconvert knows the architecture (a
    layout whose tensors fit more than one shape needs them: quanto's); none otherwise."""
    from qconvert.families import family_for

    try:
        family = family_for(ckpt)
        return {e.name: e.shape for e in family.expected() if not family.transposed(e.name)}
    except InputError:
        return {}


def inspect_checkpoint(source: str) -> dict:
    """A safetensors checkpoint directory (or hub id): its quantization config, every quantized
    linear's method, bits and group size by decoder layer, size on disk and bits per weight."""

    ckpt = open_checkpoint(source)
    try:
        found = layout_of(ckpt.config)
        method = found[0].method if found else None
        raw = ckpt.config.data.get("quantization_config")
        qcfg = raw if found else None
        mxfp4 = found is None and isinstance(raw, dict) and str(raw.get("quant_method", "")).lower() == "mxfp4"
        if mxfp4:  # gpt-oss's MXFP4 experts (arch/gpt_oss.py decodes them)
            method, qcfg = "mxfp4", raw
        tensors = ckpt.tensors
        marker = "." + found[0].marker if found else None
        quantized = sorted({n[:-len(marker)] for n in tensors if n.endswith(marker)}) if found else []
        parts_of = set()
        linears = []
        shapes = _expected_shapes(ckpt) if quantized else {}
        for prefix in quantized:
            layout, params = found
            parts = {k: tensors[f"{prefix}.{k}"] for k in layout.parts if f"{prefix}.{k}" in tensors}
            parts_of |= {f"{prefix}.{k}" for k in parts}
            n_out, n_in, group = linear_shape(layout, params, prefix, parts, ckpt.config.path,
                                              shapes.get(prefix.replace("language_model.", "") + ".weight"))
            nbytes = sum(t_bytes(t) for t in parts.values())
            m = _LAYER.search(prefix)
            linears.append({"name": prefix, "layer": int(m.group(1)) if m else None, "method": layout.label(params),
                            "bits": params.bits, "group_size": group, "shape": [n_out, n_in], "bytes": nbytes,
                            "bits_per_weight": round(nbytes * 8 / (n_out * n_in), 4)})
        others = [{"name": n, "dtype": t.dtype, "shape": list(t.shape), "bytes": t_bytes(t)}
                  for n, t in tensors.items() if n not in parts_of]
    finally:
        ckpt.close()
    def weights(x: dict) -> int:  # MXFP4: two weights per byte of blocks, none in the exponents
        n = int(np.prod(x["shape"], dtype=np.int64))
        if mxfp4 and x["dtype"] == "U8" and x["name"].endswith(("_blocks", "_scales")):
            return 2 * n if x["name"].endswith("_blocks") else 0
        return n
    n_params = sum(x["shape"][0] * x["shape"][1] for x in linears) + sum(weights(x) for x in others)
    tensor_bytes = sum(x["bytes"] for x in linears) + sum(x["bytes"] for x in others)
    on_disk = sum(p.stat().st_size for p in ckpt.path.iterdir() if p.is_file())
    layers: dict[int, list[dict]] = {}
    for x in linears:
        if x["layer"] is not None:
            layers.setdefault(x["layer"], []).append(x)
    by_layer = [{"layer": i, "linears": len(xs), "methods": sorted({x["method"] for x in xs}),
                 "bits": sorted({x["bits"] for x in xs}), "group_sizes": sorted({x["group_size"] for x in xs}),
                 "bits_per_weight": round(sum(x["bytes"] for x in xs) * 8 /
                                          sum(x["shape"][0] * x["shape"][1] for x in xs), 4)}
                for i, xs in sorted(layers.items())]
    return {"path": str(ckpt.path), "kind": "checkpoint", "architecture": ckpt.config.architecture(),
            "quant_method": method, "quantization_config": qcfg, "bytes": on_disk, "tensor_bytes": tensor_bytes,
            "n_params": n_params, "bits_per_weight": round(tensor_bytes * 8 / max(n_params, 1), 4),
            "types": dict(Counter(x["dtype"] for x in others)), "quantized_linears": len(linears),
            "layers": by_layer, "linears": linears, "tensors": others}


def t_bytes(t) -> int:

    return int(np.prod(t.shape, dtype=np.int64)) * DTYPES[t.dtype].itemsize
