"""Regenerate formats/gguf/golden: ggml's quantizer output for fixed, seeded inputs.

usage: python formats/gguf/make_golden.py   (needs llama-cpp-python installed: its libggml-base.so
is the oracle; its version is recorded in the manifest)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.oracles import ggml_quantize  # noqa: E402
from tests.quant.test_blocks import QUANT_TYPES, cases, importance  # noqa: E402


def main() -> None:
    import gguf
    import llama_cpp

    out = ROOT / "formats" / "gguf" / "golden"
    for old in out.glob("*"):
        old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    qw = importance(256)
    qw.astype("<f4").tofile(out / "imatrix.f32")
    for case, rows in cases(256).items():
        rows = rows[:2]
        inp = f"{case}.f32"
        rows.astype("<f4").tofile(out / inp)
        for name in QUANT_TYPES:
            type_id = int(gguf.GGMLQuantizationType[name])
            for imat in (None, "imatrix.f32"):
                q = ggml_quantize(type_id, rows, qw if imat else None)
                fname = f"{case}.{name.lower()}{'.imatrix' if imat else ''}"
                q.tofile(out / fname)
                entries.append({"type": name, "input": inp, "imatrix": imat, "output": fname,
                                "nrows": rows.shape[0], "n_per_row": rows.shape[1]})
    manifest = {"oracle": "ggml_quantize_chunk from libggml-base.so", "llama_cpp_python": llama_cpp.__version__,
                "made_by": "formats/gguf/make_golden.py", "entries": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
