"""What a GGUF file holds: metadata, tensors, types, bits per weight (read with gguf's reader)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

_LONG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.merges")


def inspect_gguf(path: Path) -> dict:
    from gguf import GGUFValueType

    from qconvert.read.gguf_model import read_gguf

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
    return {"path": str(path), "bytes": path.stat().st_size, "n_params": n_params, "tensor_bytes": n_bytes,
            "bits_per_weight": round(n_bytes * 8 / max(n_params, 1), 4), "types": dict(counts),
            "metadata": meta, "tensors": tensors}
