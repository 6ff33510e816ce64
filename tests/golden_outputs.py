"""The commands whose outputs formats/outputs/golden.json records (formats/outputs/make_golden.py
writes it, tests/test_golden.py compares): every family's tiny model, every target, every
option given explicitly (targets, calibration samples and length, group sizes, 2 threads), so
that changing a default does not change these files.

GGUF outputs without calibration depend only on the inputs and qconvert's kernels; calibrated
outputs (importance matrices, GPTQ, AWQ) also on torch's float arithmetic, which differs between
CPU kinds and torch versions: the recording holds the inputs' hashes and that environment.
"""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "formats" / "outputs" / "golden.json"
FAMILIES = ["llama", "llama-tied", "llama-wide", "mistral", "qwen2", "qwen3", "gemma3", "gpt_neox-64", "gpt2"]
CALIB = ["--calib-samples", "4", "--calib-seq-len", "64", "-j", "2"]
# (name, arguments after MODEL, whether torch's float arithmetic shapes the bytes)
RUNS = [
    ("gguf-plain", ["--to", "f16,q8_0,q4_k_m,iq4_nl", "--no-calib", "-j", "2"], False),
    ("gguf-calibrated", ["--to", "q4_k_m,iq4_nl", *CALIB], True),
    ("gguf-calibrated-exact", ["--to", "q4_k_m", "--exact-calib", *CALIB], True),
    ("gptq", ["--to", "gptq", "--group-size", "32", *CALIB], True),
    ("gptq-asym-natural", ["--to", "gptq", "--group-size", "32", "--asym", "--no-act-order", *CALIB], True),
    ("gptq-8bit", ["--to", "gptq", "--group-size", "32", "--bits", "8", *CALIB], True),
    ("awq", ["--to", "awq", "--group-size", "32", *CALIB], True),
    ("imatrix", ["imatrix", *CALIB], True),
]


def environment() -> dict:
    import numpy
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags: set[str] = set()
    try:
        flags = set(next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    # the same model name covers CPUs with and without AVX-512 ("AMD EPYC"), whose float32 and
    # bfloat16 products (and so the calibrated outputs) differ
    return {"torch": torch.__version__, "numpy": numpy.__version__, "cpu": cpu or platform.processor(),
            "machine": platform.machine(), "isa": sorted(flags & ISA_FLAGS)}


ISA_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8"}


def tree_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents, sorted)."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def run(model: Path, name: str, args: list[str], out: Path) -> dict[str, str]:
    """Run one command; the sha256 of each output, by output name."""
    from qconvert.cli import main

    out.mkdir(parents=True)
    if args[0] == "imatrix":
        argv = ["imatrix", str(model), "-o", str(out / f"{model.name}.imatrix.gguf"), *args[1:], "-q"]
    else:
        argv = [str(model), *args, "-o", str(out / (model.name + "-" + name.split("-")[0].upper()
                                                   if args[1] in ("gptq", "awq") else "")), "-q"]
    try:
        main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"{' '.join(argv)} exited {e.code}") from None
    return {p.name: tree_hash(p) for p in sorted(out.iterdir())}


def outputs(root: Path) -> dict:
    """Build the tiny models in `root` and run every command on each; inputs' and outputs' hashes."""
    from tests.models import build

    result = {}
    for family in FAMILIES:
        model = build(family, root / "models" / f"tiny-{family}")
        entry = {"input": tree_hash(model), "runs": {}}
        for name, args, calibrated in RUNS:
            entry["runs"][name] = {"calibrated": calibrated,
                                   "outputs": run(model, name, args, root / "out" / family / name)}
        result[family] = entry
    return result
